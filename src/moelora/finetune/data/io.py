"""Line-aware readers for dataset files (JSONL, JSON, CSV, TSV).

Each reader yields ``(line, row)`` pairs, ``line`` being the 1-based line where the row starts, so that a
row parser's error can name the file and the line (``parse_rows``).
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

from .errors import DataFileNotFoundError, MalformedRowError

logger = logging.getLogger(__name__)

T = TypeVar("T")
Row = dict[str, Any]
# The csv.QUOTE_* constants (QUOTE_MINIMAL, QUOTE_ALL, QUOTE_NONNUMERIC, QUOTE_NONE), as csv.reader accepts them.
CsvQuoting = Literal[0, 1, 2, 3]


def require_file(path: str | Path, what: str = "dataset file", hint: str = "") -> Path:
    """``path`` as a ``Path`` if it is an existing file, else a ``DataFileNotFoundError`` naming it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataFileNotFoundError(path, what, hint)
    return path


def find_file(directory: str | Path, candidates: Sequence[str], what: str) -> Path:
    """The first of ``candidates`` (names relative to ``directory``) that exists.

    The error names every path that was tried, so the user sees which file layout is expected.
    """
    directory = Path(directory).expanduser()
    for name in candidates:
        if (directory / name).is_file():
            return directory / name
    tried = ", ".join(str(directory / name) for name in candidates)
    raise DataFileNotFoundError(directory / candidates[0], what, f"looked for: {tried}")


def open_text(path: Path) -> io.TextIOBase:
    """Open a text file, decompressing ``.gz`` / ``.bz2`` transparently."""
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    if path.suffix == ".bz2":
        return bz2.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def not_utf8(path: Path) -> MalformedRowError:
    """The error for a file that is not UTF-8 text, naming its first undecodable line and byte."""
    opener = gzip.open if path.suffix == ".gz" else bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as err:
                return MalformedRowError(f"not UTF-8 text (byte {err.start} of the line): save the file as UTF-8",
                                         path, line_no)
    return MalformedRowError("not UTF-8 text: save the file as UTF-8", path)


def read_jsonl(path: str | Path) -> Iterator[tuple[int, Row]]:
    """``(line, object)`` for every non-blank line of a JSON Lines file."""
    path = require_file(path)
    try:
        yield from _read_jsonl(path)
    except UnicodeDecodeError:
        raise not_utf8(path) from None


def _read_jsonl(path: Path) -> Iterator[tuple[int, Row]]:
    with open_text(path) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise MalformedRowError(f"invalid JSON ({err.msg} at column {err.colno})", path, line_no) from None
            if not isinstance(row, dict):
                raise MalformedRowError(f"expected a JSON object, got {type(row).__name__}", path, line_no)
            yield line_no, row


def read_json_records(path: str | Path) -> Iterator[tuple[str, Row]]:
    """``(key, object)`` for every record of a JSON document.

    A top-level list yields ``(index, item)``; a top-level object whose values are objects (e.g.
    ScienceQA's ``problems.json``, keyed by problem id) yields ``(key, value)``; an object with a list
    under ``"data"`` or ``"examples"`` yields that list's items.
    """
    path = require_file(path)
    with open_text(path) as f:
        try:
            doc = json.load(f)
        except json.JSONDecodeError as err:
            raise MalformedRowError(f"invalid JSON ({err.msg})", path, err.lineno) from None
        except UnicodeDecodeError:
            raise not_utf8(path) from None
    if isinstance(doc, dict):
        for key in ("data", "examples"):
            if isinstance(doc.get(key), list):
                doc = doc[key]
                break
    items: Iterable[tuple[str, Any]]
    items = ((str(i), item) for i, item in enumerate(doc)) if isinstance(doc, list) else doc.items()
    for key, item in items:
        if not isinstance(item, dict):
            raise MalformedRowError(f"expected a JSON object, got {type(item).__name__}", path, record=key)
        yield key, item


def read_delimited(
    path: str | Path,
    *,
    delimiter: str = ",",
    columns: Sequence[str] | None = None,
    quoting: CsvQuoting = csv.QUOTE_MINIMAL,
    min_columns: int | None = None,
) -> Iterator[tuple[int, Row]]:
    """``(line, row)`` for every record of a CSV / TSV file.

    Args:
        columns: the column names of a file without a header row; ``None`` reads them from the first
            line.
        quoting: ``csv.QUOTE_NONE`` for files where quote characters are plain text (the GLUE TSVs).
        min_columns: rows with fewer fields are malformed (default: exactly the header's count; extra
            trailing fields are malformed too unless ``min_columns`` is given).
    """
    path = require_file(path)
    try:
        yield from _read_delimited(path, delimiter, columns, quoting, min_columns)
    except UnicodeDecodeError:
        raise not_utf8(path) from None


def _read_delimited(path: Path, delimiter: str, columns: Sequence[str] | None, quoting: CsvQuoting,
                    min_columns: int | None) -> Iterator[tuple[int, Row]]:
    with open_text(path) as f:
        reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
        header = list(columns) if columns is not None else None
        start = 1
        for fields in reader:
            line_no, start = start, reader.line_num + 1  # a quoted field may span several lines
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                continue
            if header is None:
                header = [name.strip().lstrip("\ufeff") for name in fields]  # MRPC starts with a BOM
                continue
            expected = len(header) if min_columns is None else min_columns
            if len(fields) < expected or (min_columns is None and len(fields) != len(header)):
                raise MalformedRowError(
                    f"expected {len(header)} {'tab' if delimiter == chr(9) else 'comma'}-separated fields "
                    f"({', '.join(header)}), got {len(fields)}",
                    path,
                    line_no,
                )
            yield line_no, dict(zip(header, fields))
        if header is None:
            logger.debug("%s is empty", path)


def parse_rows(
    path: str | Path, rows: Iterable[tuple[int | str, Row]], parser: Callable[[Row], T | None]
) -> list[T]:
    """``parser(row)`` for every row, locating any ``MalformedRowError`` at the row's file and line.

    ``parser`` may return ``None`` to skip a row on purpose (e.g. ScienceQA rows with an image).
    """
    out = []
    for where, row in rows:
        try:
            item = parser(row)
        except MalformedRowError as err:
            if err.path is not None:
                raise
            located = err.at(path, line=where) if isinstance(where, int) else err.at(path, record=where)
            raise located from None
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
            reason = f"missing field {err}" if isinstance(err, KeyError) else str(err)
            location = {"line": where} if isinstance(where, int) else {"record": where}
            raise MalformedRowError(reason, path, **location) from None
        if item is not None:
            out.append(item)
    return out
