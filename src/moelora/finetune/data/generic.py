"""Your own multiple-choice or classification data, from JSONL / JSON / CSV / TSV files.

``mc_file`` rows (field names configurable)::

    {"question": "...", "choices": ["...", "..."], "answer": 1, "context": "..."}        # JSONL
    question,context,A,B,C,answer                                                      # CSV

``choices`` is a list of strings or of ``{"label", "text"}`` objects (in CSV: a JSON list in a
``choices`` column, or one column per option named ``A``, ``B``, ...). ``answer`` is a 0-based index,
a letter, a choice label, or the text of the correct choice. ``context`` is optional.

``classification_file`` rows::

    {"text": "...", "text_pair": "...", "label": "positive"}

``label`` is a class name or a 0-based index into ``labels`` (the class names, in order; inferred as the
sorted distinct labels of the training file when not given). With ``regression=True`` labels are numbers.

Files: ``train_file`` is required; ``test_file`` (held out) and ``validation_file`` are optional, and a
missing one is carved out of train by hash (20 % for test, 5 % for validation, see ``splits.py``).
``data_dir`` may replace the three paths: it is searched for ``train.*``, ``validation.*`` / ``dev.*``
and ``test.*`` with a supported suffix.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .errors import DataError, LabelOutOfRangeError, MalformedRowError
from .example import Example, TaskData
from .io import parse_rows, read_delimited, read_json_records, read_jsonl, require_file
from .prompts import LETTERS, label_index, mc_example, normalize_space
from .registry import register_task
from .splits import DEFAULT_SPLIT_SEED, carve, example_key, split_sizes

logger = logging.getLogger(__name__)

SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")


def read_rows(path: str | Path) -> Iterator[tuple[int | str, dict]]:
    """Rows of a JSONL / JSON / CSV / TSV file (by suffix, ``.gz`` / ``.bz2`` allowed) with locations."""
    path = require_file(path)
    suffixes = [s for s in path.suffixes if s not in (".gz", ".bz2")]
    suffix = suffixes[-1].lower() if suffixes else ""
    if suffix == ".jsonl":
        return read_jsonl(path)
    if suffix == ".json":
        return read_json_records(path)
    if suffix in (".csv", ".tsv"):
        return read_delimited(path, delimiter="\t" if suffix == ".tsv" else ",")
    raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(SUFFIXES)}")


def _find_in_dir(data_dir: Path, stems: Sequence[str]) -> Path | None:
    for stem in stems:
        for suffix in SUFFIXES:
            if (data_dir / f"{stem}{suffix}").is_file():
                return data_dir / f"{stem}{suffix}"
    return None


def _resolve_files(
    data_dir: str | Path | None, train_file, validation_file, test_file, task: str
) -> tuple[Path, Path | None, Path | None]:
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        train_file = train_file or _find_in_dir(root, ["train"]) or root / "train.jsonl"
        validation_file = validation_file or _find_in_dir(root, ["validation", "valid", "val", "dev"])
        test_file = test_file or _find_in_dir(root, ["test"])
    if train_file is None:
        raise DataError(f"task {task!r} needs train_file=<path> (or data_dir=<folder with train.jsonl>)")
    return (
        require_file(train_file, "training file"),
        require_file(validation_file, "validation file") if validation_file else None,
        require_file(test_file, "test file") if test_file else None,
    )


def _assemble(
    train: list[Example], validation: list[Example] | None, test: list[Example] | None, split_seed: int
) -> tuple[list[Example], list[Example], list[Example], str]:
    notes = []
    if test is None:
        train, test = carve(train, split_sizes(len(train), 0.2), example_key, split_seed)
        notes.append("test = hash-chosen 20 % of train")
    if validation is None:
        train, validation = carve(train, split_sizes(len(train), 0.05, maximum=1000), example_key, split_seed)
        notes.append("validation = hash-chosen 5 % of train")
    return train, validation, test, "; ".join(notes)


# --- multiple choice -----------------------------------------------------------------------------------

def _choices(row: dict, choices_field: str) -> tuple[list[str], list[str]]:
    """``(texts, labels)`` of a row's choices."""
    raw: Any = row.get(choices_field)
    if raw is None:
        letters = [c for c in LETTERS if c in row and str(row[c]).strip()]
        if not letters:
            raise MalformedRowError(f"missing field {choices_field!r} (or option columns A, B, ...)")
        return [str(row[c]) for c in letters], letters
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            raise MalformedRowError(f"{choices_field!r} must be a list (in CSV: a JSON list)") from None
    if isinstance(raw, dict) and "text" in raw:
        raw = [{"label": label, "text": t} for label, t in zip(raw.get("label", LETTERS), raw["text"])]
    if not isinstance(raw, list):
        raise MalformedRowError(f"{choices_field!r} must be a list, got {type(raw).__name__}")
    texts, labels = [], []
    for i, choice in enumerate(raw):
        if isinstance(choice, dict):
            texts.append(str(choice["text"]))
            labels.append(str(choice.get("label", LETTERS[i] if i < len(LETTERS) else i)))
        else:
            texts.append(str(choice))
            labels.append(LETTERS[i] if i < len(LETTERS) else str(i))
    return texts, labels


def _answer_index(answer: Any, texts: list[str], labels: list[str]) -> int:
    if isinstance(answer, bool):
        raise LabelOutOfRangeError(f"answer {answer!r} is not an index, letter, label or choice text")
    if isinstance(answer, float) and answer.is_integer():
        answer = int(answer)
    if isinstance(answer, int):
        index = answer
    else:
        key = str(answer).strip()
        if key in labels:
            return labels.index(key)
        normalized = [normalize_space(t).lower() for t in texts]
        if normalize_space(key).lower() in normalized:
            return normalized.index(normalize_space(key).lower())
        if re.fullmatch(r"-?\d+", key):
            index = int(key)
        elif len(key) == 1 and key.upper() in LETTERS:
            index = LETTERS.index(key.upper())
        else:
            raise LabelOutOfRangeError(f"answer {answer!r} is not an index, letter, label or choice text")
    if not 0 <= index < len(texts):
        raise LabelOutOfRangeError(f"answer {answer!r} is outside the {len(texts)} choices")
    return index


def mc_row_parser(
    *,
    answer_format: str = "letter",
    question_field: str = "question",
    choices_field: str = "choices",
    answer_field: str = "answer",
    context_field: str = "context",
) -> Callable[[dict], Example]:
    """Row parser of ``mc_file`` (see the module docstring)."""
    def parse(row: dict) -> Example:
        texts, labels = _choices(row, choices_field)
        label = _answer_index(row[answer_field], texts, labels)
        context = row.get(context_field)
        return mc_example(str(row[question_field]), texts, label, str(context) if context else None,
                          answer_format=answer_format, uid=str(row.get("id", "")))
    return parse


@register_task("mc_file")
def load_mc_file(
    name: str = "mc_file",
    *,
    data_dir: str | Path | None = None,
    train_file: str | Path | None = None,
    validation_file: str | Path | None = None,
    test_file: str | Path | None = None,
    answer_format: str = "letter",
    question_field: str = "question",
    choices_field: str = "choices",
    answer_field: str = "answer",
    context_field: str = "context",
    split_seed: int = DEFAULT_SPLIT_SEED,
) -> TaskData:
    """Multiple-choice data from your own files (see the module docstring)."""
    train_path, val_path, test_path = _resolve_files(data_dir, train_file, validation_file, test_file, name)
    parse = mc_row_parser(answer_format=answer_format, question_field=question_field,
                          choices_field=choices_field, answer_field=answer_field, context_field=context_field)

    def load(path: Path | None) -> list[Example] | None:
        return None if path is None else parse_rows(path, read_rows(path), parse)

    train = parse_rows(train_path, read_rows(train_path), parse)  # required: never None, unlike the other two
    train, validation, test, notes = _assemble(train, load(val_path), load(test_path), split_seed)
    return TaskData(
        name=name, kind="multiple_choice", train=train, validation=validation, test=test, metric="accuracy",
        num_labels=max(len(e.options) for e in train + validation + test), answer_format=answer_format,
        description=f"multiple choice from {train_path}" + (f"; {notes}" if notes else ""),
    )


# --- classification / regression ----------------------------------------------------------------------

@register_task("classification_file")
def load_classification_file(
    name: str = "classification_file",
    *,
    data_dir: str | Path | None = None,
    train_file: str | Path | None = None,
    validation_file: str | Path | None = None,
    test_file: str | Path | None = None,
    labels: Sequence[str] | None = None,
    regression: bool = False,
    question: str = "Which label fits this text?",
    answer_format: str = "letter",
    text_field: str = "text",
    text_pair_field: str = "text_pair",
    label_field: str = "label",
    metric: str | None = None,
    split_seed: int = DEFAULT_SPLIT_SEED,
) -> TaskData:
    """Classification (or regression) data from your own files (see the module docstring).

    The causal-LM prompt is the paper's format with the text (pair) as context, ``question`` as the
    question and the class names as options.
    """
    train_path, val_path, test_path = _resolve_files(data_dir, train_file, validation_file, test_file, name)
    if labels is None and not regression:
        values = {str(row[label_field]).strip() for _, row in read_rows(train_path) if label_field in row}
        if not values:
            raise DataError(f"{train_path}: no rows with a {label_field!r} field")
        labels = sorted(values, key=lambda v: (0, int(v)) if v.lstrip("-").isdigit() else (1, v))
        logger.info("%s: inferred labels %s from %s", name, labels, train_path)
    if isinstance(labels, str):  # a YAML scalar where a list was meant: never split it into characters
        raise DataError(f"{name}: labels must be a list of class names, e.g. [negative, positive], got {labels!r}")
    names = tuple(str(n) for n in labels or ())

    def parse(row: dict) -> Example:
        text = normalize_space(row[text_field])
        pair = row.get(text_pair_field)
        pair = normalize_space(pair) if pair not in (None, "") else None
        if not text:
            raise MalformedRowError(f"field {text_field!r} is empty")
        context = text if pair is None else f"Text 1: {text} Text 2: {pair}"
        if regression:
            try:
                value = float(row[label_field])
            except (TypeError, ValueError):
                raise MalformedRowError(f"label {row[label_field]!r} is not a number") from None
            prompt = f"Context: {context}\nQuestion: {normalize_space(question)}\nAnswer:"
            return Example(prompt=prompt, options=(), label=value, text=text, text_pair=pair)
        label = label_index(row[label_field], names)
        example = mc_example(question, names, label, context, answer_format=answer_format)
        return Example(example.prompt, example.options, example.label, text, pair, str(row.get("id", "")))

    def load(path: Path | None) -> list[Example] | None:
        return None if path is None else parse_rows(path, read_rows(path), parse)

    train = parse_rows(train_path, read_rows(train_path), parse)  # required: never None, unlike the other two
    train, validation, test, notes = _assemble(train, load(val_path), load(test_path), split_seed)
    return TaskData(
        name=name,
        kind="regression" if regression else "classification",
        train=train, validation=validation, test=test,
        metric=metric or ("pearson_spearman" if regression else "accuracy"),
        num_labels=1 if regression else len(names),
        label_names=names,
        answer_format="none" if regression else answer_format,
        description=f"{'regression' if regression else 'classification'} from {train_path}" + (f"; {notes}" if notes else ""),
    )
