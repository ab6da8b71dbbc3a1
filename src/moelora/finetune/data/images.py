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
