"""Multiple choice about images, from your own files: ``image_mc_file``.

Rows (JSON Lines or a JSON list)::

    {"image": "images/0001.png", "question": "What colour is the square?", "choices": ["red", "blue"], "answer": 1}

``image`` is a path relative to the data file; ``choices`` and ``answer`` are as for ``mc_file`` (``answer``
a 0-based index, a letter or the choice's text; ``context`` optional). Files are found like the other file
tasks' (``data_dir`` with ``train.*`` / ``validation.*`` / ``test.*``, or ``train_file`` / ``test_file``).
Every image is opened once when the task loads: a missing or unreadable image, or a row without one, is an
error naming the data file, its line and the image path.

The prompt is the ``mc_file`` prompt after an image placeholder line (``<image>``), which the model's
processor replaces with the image's tokens.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from .errors import MalformedRowError
from .example import Example, TaskData
from .generic import _assemble, _resolve_files, mc_row_parser, read_rows
from .io import parse_rows
from .registry import register_task
from .splits import DEFAULT_SPLIT_SEED

IMAGE_PLACEHOLDER = "<image>"


def image_row_parser(folder: Path, answer_format: str = "letter", image_field: str = "image"):
    """Row parser of ``image_mc_file``: ``mc_file``'s, plus the image (checked now, resolved against
    ``folder``, the data file's folder)."""
    from ..vision import load_image

    parse_mc = mc_row_parser(answer_format=answer_format)

    def parse(row: dict[str, Any]) -> Example:
        name = row.get(image_field)
        if not isinstance(name, str) or not name.strip():
            raise MalformedRowError(f"a row of an image task needs {image_field!r} (a path relative to the data "
                                    f"file); this one has {sorted(row)}")
        path = (folder / name).resolve()
        load_image(path)  # fails here, at this file and line, rather than in a training step
        example = parse_mc(row)
        return replace(example, prompt=f"{IMAGE_PLACEHOLDER}\n{example.prompt}", image=str(path))
    return parse


@register_task("image_mc_file")
def load_image_mc_file(
    name: str = "image_mc_file", *, data_dir: str | Path | None = None, train_file: str | Path | None = None,
    validation_file: str | Path | None = None, test_file: str | Path | None = None, answer_format: str = "letter",
    image_field: str = "image", split_seed: int = DEFAULT_SPLIT_SEED,
) -> TaskData:
    """Multiple choice about images from your own files (see the module docstring)."""
    train_path, val_path, test_path = _resolve_files(data_dir, train_file, validation_file, test_file, name)

    def load(path: Path | None) -> list[Example] | None:
        if path is None:
            return None
        return parse_rows(path, read_rows(path), image_row_parser(path.parent, answer_format, image_field))

    train = load(train_path)
    assert train is not None
    train, validation, test, notes = _assemble(train, load(val_path), load(test_path), split_seed)
    return TaskData(
        name=name, kind="multiple_choice", train=train, validation=validation, test=test, metric="accuracy",
        num_labels=max(len(e.options) for e in train + validation + test), answer_format=answer_format,
        description=f"image multiple choice from {train_path}" + (f"; {notes}" if notes else ""),
        info={"modality": "image"},
    )


# --- Visual7W (telling) ----------------------------------------------------------------------------------

V7W_FILES = ("dataset_v7w_telling.json", "dataset.json")


@register_task("visual7w")
def load_visual7w(
    name: str = "visual7w", *, data_dir: str | Path | None = None, answer_format: str = "letter",
    images_dir: str = "images", split_seed: int = DEFAULT_SPLIT_SEED,
) -> TaskData:
    """Visual7W's telling QA in its public layout: ``data_dir`` holds ``dataset_v7w_telling.json`` (or the
    toolkit's ``dataset.json``) and the images folder (``images/``).

    The JSON is ``{"images": [{"filename", "split": "train" | "val" | "test", "qa_pairs": [{"qa_id",
    "question", "answer", "multiple_choices": [three wrong answers], "type"}]}]}``. The four candidates are
    the answer and the three wrong ones, in an order fixed per question (seeded by its id), since the
    answer always comes first in the file. Splits are the dataset's own. Images are checked to exist when
    the task loads (opening 47,300 of them would take minutes); one that cannot be read fails in its batch,
    naming it.
    """
    import json

    from .errors import DataError
    from .io import find_file
    from .prompts import mc_example
    from .splits import hash_order

    if data_dir is None:
        raise DataError(f"task {name!r} needs data_dir=<folder with {V7W_FILES[0]} and {images_dir}/>")
    path = find_file(data_dir, V7W_FILES, "Visual7W telling annotations")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise MalformedRowError(f"invalid JSON ({err.msg})", path, err.lineno) from None
    images = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(images, list):
        raise MalformedRowError("expected an object with an 'images' list", path)
    folder = Path(data_dir).expanduser() / images_dir
    splits: dict[str, list[Example]] = {"train": [], "val": [], "test": []}
    for i, image in enumerate(images):
        where = f"images[{i}]"
        try:
            filename, split = image["filename"], image["split"]
            pairs = image["qa_pairs"]
        except (KeyError, TypeError):
            raise MalformedRowError("an image entry needs 'filename', 'split' and 'qa_pairs'", path,
                                    record=where) from None
        if split not in splits:
            raise MalformedRowError(f"split {split!r} is not train, val or test", path, record=where)
        image_path = (folder / filename).resolve()
        if not image_path.is_file():
            raise MalformedRowError(f"image {image_path} does not exist", path, record=where)
        for j, pair in enumerate(pairs):
            try:
                wrong = [str(c) for c in pair["multiple_choices"]]
                qa_id = str(pair.get("qa_id", f"{i}.{j}"))
                candidates = [str(pair["answer"]), *wrong]
                question = str(pair["question"])
            except (KeyError, TypeError):
                raise MalformedRowError("a QA pair needs 'question', 'answer' and 'multiple_choices'", path,
                                        record=f"{where}.qa_pairs[{j}]") from None
            order = hash_order([f"{qa_id}:{k}" for k in range(len(candidates))], str, split_seed)
            order_index = [int(key.rsplit(":", 1)[1]) for key in order]
            example = mc_example(question, [candidates[k] for k in order_index], order_index.index(0), None,
                                 answer_format=answer_format, uid=qa_id)
            splits[split].append(replace(example, prompt=f"{IMAGE_PLACEHOLDER}\n{example.prompt}",
                                         image=str(image_path)))
    train, validation, test = splits["train"], splits["val"], splits["test"]
    return TaskData(
        name=name, kind="multiple_choice", train=train, validation=validation, test=test, metric="accuracy",
        num_labels=4, answer_format=answer_format, info={"modality": "image", "source": str(path)},
        description=f"Visual7W telling QA from {path}: {len(train)} train, {len(validation)} val, {len(test)} test",
    )


# --- VMCBench -------------------------------------------------------------------------------------------

VMC_SPLITS = {"dev": "train", "test": "test"}  # the dataset's split -> ours (validation is carved from dev)
VMC_CHOICE_COLUMNS = ("A", "B", "C", "D", "E", "F", "G", "H")


@register_task("vmcbench")
def load_vmcbench(
    name: str = "vmcbench", *, data_dir: str | Path | None = None, answer_format: str = "letter",
    cache_dir: str | Path | None = None, split_seed: int = DEFAULT_SPLIT_SEED,
) -> TaskData:
    """VMCBench in its public layout: ``data_dir`` holds ``dev-*.parquet`` and ``test-*.parquet`` (directly or
    in ``data/``), one row per question with ``question``, the choices in columns ``A``, ``B``, ``C``,
    ``D`` (a column that is empty on a row is not a choice of that row), ``answer`` (the right letter),
    ``image`` (the encoded image, as the ``datasets`` Image feature stores it: ``{"bytes", "path"}``, or
    raw bytes, or base64 text) and optionally ``index`` and ``category``.

    ``dev`` trains (its validation split carved out by hash) and ``test`` tests. The images are decoded
    from the files once, checked, and written under ``cache_dir`` (default ``$MOELORA_CACHE``) named by
    their content hash, so a second load writes nothing. A row with a missing, empty or undecodable image,
    no question, fewer than two choices or an answer that is not one of its letters is an error naming the
    file and the row.
    """
    from .errors import DataError

    if data_dir is None:
        raise DataError(f"task {name!r} needs data_dir=<folder with dev-*.parquet and test-*.parquet>")
    folder = Path(data_dir).expanduser()
    files = {split: sorted([*folder.glob(f"{split}-*.parquet"), *folder.glob(f"data/{split}-*.parquet")])
             for split in VMC_SPLITS}
    if not files["dev"]:
        from .errors import DataFileNotFoundError

        raise DataFileNotFoundError(folder / "data" / "dev-00000-of-00001.parquet", "VMCBench dev split",
                                    f"looked for dev-*.parquet in {folder} and {folder / 'data'}")
    from ..cache import resolve_cache_dir

    image_folder = resolve_cache_dir(cache_dir) / "images" / "vmcbench"
    splits: dict[str, list[Example]] = {"train": [], "test": []}
    for split, paths in files.items():
        for path in paths:
            splits[VMC_SPLITS[split]].extend(_vmcbench_file(path, image_folder, answer_format))
    train, validation, test, notes = _assemble(splits["train"], None, splits["test"] or None, split_seed)
    return TaskData(
        name=name, kind="multiple_choice", train=train, validation=validation, test=test, metric="accuracy",
        num_labels=max(len(e.options) for e in train + validation + test), answer_format=answer_format,
        info={"modality": "image", "source": str(folder)},
        description=f"VMCBench from {folder}: {len(train)} train, {len(validation)} validation, {len(test)} test"
                    + (f"; {notes}" if notes else ""),
    )


def _vmcbench_file(path: Path, image_folder: Path, answer_format: str) -> list[Example]:
    """The examples of one VMCBench parquet file, their images written to ``image_folder``."""
    from .prompts import mc_example

    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("reading VMCBench's parquet files needs pyarrow: pip install 'moelora[vision]'") from None
    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several error types for a file that is not parquet
        raise MalformedRowError(f"cannot be read as a parquet file ({err})", path) from None
    missing = {"question", "answer", "image"} - set(table.column_names)
    if missing:
        raise MalformedRowError(f"has no column {sorted(missing)} (columns: {table.column_names})", path)
    letters = [c for c in VMC_CHOICE_COLUMNS if c in table.column_names]
    examples = []
    for number, row in enumerate(table.to_pylist()):
        where = f"{number}" + (f" (index {row['index']})" if row.get("index") is not None else "")
        try:
            choices = [(letter, str(row[letter]).strip()) for letter in letters
                       if row[letter] is not None and str(row[letter]).strip() and str(row[letter]) != "nan"]
            question = str(row["question"] or "").strip()
            if not question:
                raise MalformedRowError("has no question")
            if len(choices) < 2:
                raise MalformedRowError(f"has {len(choices)} choice(s) in columns {letters}; at least 2 are needed")
            answer = str(row["answer"] or "").strip().upper()
            kept = [letter for letter, _ in choices]
            if answer not in kept:
                raise MalformedRowError(f"answer {row['answer']!r} is not one of its choices {kept}")
            image = _stored_image(row["image"], image_folder)
        except MalformedRowError as err:
            raise err.at(path, record=where) from None
        uid = str(row.get("index", f"{path.stem}:{number}"))
        example = mc_example(question, [text for _, text in choices], kept.index(answer), None,
                             answer_format=answer_format, uid=uid)
        examples.append(replace(example, prompt=f"{IMAGE_PLACEHOLDER}\n{example.prompt}", image=str(image)))
    return examples


def _stored_image(value: Any, image_folder: Path) -> Path:
    """Decode one parquet image cell (``{"bytes", "path"}``, bytes or base64 text), check that Pillow reads
    it, and write it once to ``image_folder/<sha256>.<format>``; the path written."""
    import base64
    import binascii
    import hashlib
    import io

    from PIL import Image, UnidentifiedImageError

    from ...atomic import write_bytes_atomic

    data = value.get("bytes") if isinstance(value, dict) else value
    if isinstance(data, str):
        try:
            data = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise MalformedRowError("has an image that is text but not base64") from None
    if not isinstance(data, bytes | bytearray) or not data:
        raise MalformedRowError("has no image bytes (the image column is empty)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
            kind = (image.format or "png").lower()
    except (UnidentifiedImageError, OSError, SyntaxError):
        raise MalformedRowError("has an image that Pillow cannot decode (not an image, or a damaged one)") from None
    target = image_folder / f"{hashlib.sha256(data).hexdigest()[:32]}.{kind}"
    if not target.is_file():
        image_folder.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(target, bytes(data))
    return target
