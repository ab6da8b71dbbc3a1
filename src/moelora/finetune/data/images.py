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
