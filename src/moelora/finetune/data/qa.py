"""Question-answering datasets of the paper, read from local files in their public formats.

Every task is posed in the paper's multiple-choice format (``prompts.py``). Splits:

- ``scienceqa``: ``problems.json`` of the official release (a JSON object keyed by problem id; each
  problem has ``question``, ``choices``, ``answer`` (0-based index), ``hint``, ``image`` and ``split``
  in ``train`` / ``val`` / ``test``), or ``train.jsonl`` / ``validation.jsonl`` / ``test.jsonl`` with the
  same fields (the hub export). Text-only filter: problems whose ``image`` is empty are kept. The hint
  is the context. Official splits.
- ``commonsense_qa``: ``train_rand_split.jsonl`` and ``dev_rand_split.jsonl`` (rows
  ``{"id", "question": {"stem", "choices": [{"label", "text"}]}, "answerKey"}``). The public test file
  has no answers, so the official dev set is the held-out test split and validation is a fixed 5 % of
  train (at most 1,000).
- ``openbookqa``: ``train.jsonl``, ``dev.jsonl``, ``test.jsonl`` of the ``Main`` (or ``Additional``)
  folder, same row layout as CommonsenseQA. Official splits. ``use_fact=True`` puts the ``Additional``
  rows' ``fact1`` in the context.
- ``boolq``: ``train.jsonl`` and ``dev.jsonl`` (rows ``{"question", "passage", "answer": bool}``, or
  SuperGLUE's ``val.jsonl`` with ``"label"``). Test = dev, validation from train as for
  CommonsenseQA. A classification task with classes ``("yes", "no")``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import DataError, LabelOutOfRangeError, MalformedRowError
from .example import Example, TaskData
from .io import find_file, parse_rows, read_json_records, read_jsonl
from .prompts import label_index, letter_index, mc_example, normalize_space
from .registry import register_task
from .splits import DEFAULT_SPLIT_SEED, example_key, validation_from_train

logger = logging.getLogger(__name__)


def _need_dir(data_dir: str | Path | None, task: str, files: str) -> Path:
    if data_dir is None:
        raise DataError(f"task {task!r} reads local files: pass data_dir=<folder with {files}>")
    return Path(data_dir).expanduser()


def _load_jsonl(path: Path, parser: Callable[[dict], Example | None]) -> list[Example]:
    return parse_rows(path, read_jsonl(path), parser)


# --- ScienceQA -----------------------------------------------------------------------------------------

_SCIENCEQA_SPLITS = {"train": "train", "val": "validation", "validation": "validation", "dev": "validation", "test": "test"}


def scienceqa_parser(answer_format: str = "letter") -> Callable[[dict], Example | None]:
    """Row parser for ScienceQA problems; returns ``None`` for problems with an image."""
    def parse(row: dict) -> Example | None:
        if row.get("image"):
            return None
        choices = row["choices"]
        if not isinstance(choices, list):
            raise MalformedRowError(f"'choices' must be a list, got {type(choices).__name__}")
        answer = row["answer"]
        if isinstance(answer, bool) or not isinstance(answer, int):
            raise LabelOutOfRangeError(f"'answer' must be a 0-based option index, got {answer!r}")
        if not 0 <= answer < len(choices):
            raise LabelOutOfRangeError(f"answer {answer} is outside the {len(choices)} choices")
        return mc_example(row["question"], choices, answer, row.get("hint") or None,
                          answer_format=answer_format, uid=str(row.get("id", "")))
    return parse


@register_task("scienceqa")
def load_scienceqa(
    name: str = "scienceqa", *, data_dir: str | Path | None = None, answer_format: str = "letter"
) -> TaskData:
    """Text-only ScienceQA (see the module docstring)."""
    root = _need_dir(data_dir, name, "problems.json")
    parse = scienceqa_parser(answer_format)
    splits: dict[str, list[Example]] = {"train": [], "validation": [], "test": []}
    if (root / "problems.json").is_file() or not (root / "train.jsonl").is_file():
        path = find_file(root, ["problems.json"], "ScienceQA problems file")

        def parse_with_split(row: dict) -> tuple[str, Example] | None:
            split = _SCIENCEQA_SPLITS.get(str(row.get("split", "")).lower())
            example = parse(row)
            return None if example is None or split is None else (split, example)

        for split, example in parse_rows(path, read_json_records(path), parse_with_split):
            splits[split].append(example)
    else:
        for split, names in (("train", ["train.jsonl"]), ("validation", ["validation.jsonl", "val.jsonl"]),
                             ("test", ["test.jsonl"])):
            splits[split] = _load_jsonl(find_file(root, names, f"ScienceQA {split} file"), parse)
    return TaskData(
        name=name, kind="multiple_choice", metric="accuracy", answer_format=answer_format,
        num_labels=max((len(e.options) for s in splits.values() for e in s), default=2),
        description="ScienceQA, text-only problems (no image), official splits",
        train=splits["train"], validation=splits["validation"], test=splits["test"],
    )


# --- CommonsenseQA / OpenBookQA --------------------------------------------------------------------------

def choices_parser(answer_format: str = "letter", *, use_fact: bool = False) -> Callable[[dict], Example]:
    """Row parser for ``{"question": {"stem", "choices": [{"label", "text"}]}, "answerKey"}`` rows.

    Also reads the hub layout ``{"question": str | "question_stem": str, "choices": {"label": [...],
    "text": [...]}, "answerKey"}``. The answer key is looked up among the choices' labels (so numeric
    labels such as ``"1"`` .. ``"4"`` work too).
    """
    def parse(row: dict) -> Example:
        question: Any = row.get("question", row.get("question_stem"))
        choices: Any = row.get("choices")
        if isinstance(question, dict):
            choices = question.get("choices", choices)
            question = question.get("stem")
        if question is None:
            raise MalformedRowError("missing field 'question' (or 'question.stem')")
        if isinstance(choices, dict):  # hub layout: parallel lists
            choices = [{"label": label, "text": t} for label, t in zip(choices["label"], choices["text"])]
        if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
            raise MalformedRowError("'choices' must be a list of {label, text} objects")
        labels = [str(c.get("label", "")).strip() for c in choices]
        key = str(row["answerKey"]).strip()
        if key in labels:
            label = labels.index(key)
        else:
            label = letter_index(key, len(choices))
        context = row.get("fact1") if use_fact else None
        return mc_example(question, [c["text"] for c in choices], label, context,
                          answer_format=answer_format, uid=str(row.get("id", "")))
    return parse


@register_task("commonsense_qa")
def load_commonsense_qa(
    name: str = "commonsense_qa",
    *,
    data_dir: str | Path | None = None,
    answer_format: str = "letter",
    split_seed: int = DEFAULT_SPLIT_SEED,
) -> TaskData:
    """CommonsenseQA: test = official dev, validation = 5 % of train (see the module docstring)."""
    root = _need_dir(data_dir, name, "train_rand_split.jsonl, dev_rand_split.jsonl")
    parse = choices_parser(answer_format)
    train = _load_jsonl(find_file(root, ["train_rand_split.jsonl", "train.jsonl"], "CommonsenseQA train file"), parse)
    test = _load_jsonl(find_file(root, ["dev_rand_split.jsonl", "dev.jsonl", "validation.jsonl"], "CommonsenseQA dev file"), parse)
    train, validation = validation_from_train(train, example_key, split_seed=split_seed)
    return TaskData(
        name=name, kind="multiple_choice", train=train, validation=validation, test=test, metric="accuracy",
        num_labels=5, answer_format=answer_format,
        description=f"CommonsenseQA; test = official dev; validation = hash-chosen 5 % of train (split seed {split_seed})",
    )


@register_task("openbookqa")
def load_openbookqa(
    name: str = "openbookqa",
    *,
    data_dir: str | Path | None = None,
    answer_format: str = "letter",
    use_fact: bool = False,
) -> TaskData:
    """OpenBookQA with its official train / dev / test splits."""
    root = _need_dir(data_dir, name, "train.jsonl, dev.jsonl, test.jsonl")
    parse = choices_parser(answer_format, use_fact=use_fact)
    splits: dict[str, list[Example]] = {}
    for split, stem in (("train", "train"), ("validation", "dev"), ("test", "test")):
        splits[split] = _load_jsonl(
            find_file(root, [f"{stem}.jsonl", f"Main/{stem}.jsonl", f"Additional/{stem}_complete.jsonl"],
                      f"OpenBookQA {stem} file"),
            parse,
        )
    return TaskData(
        name=name, kind="multiple_choice", metric="accuracy", num_labels=4, answer_format=answer_format,
        description="OpenBookQA, official splits",
        train=splits["train"], validation=splits["validation"], test=splits["test"],
    )


# --- BoolQ ---------------------------------------------------------------------------------------------

BOOLQ_LABELS = ("yes", "no")


def boolq_parser(answer_format: str = "letter") -> Callable[[dict], Example]:
    """Row parser for BoolQ (``answer``) and SuperGLUE BoolQ (``label``) rows."""
    def parse(row: dict) -> Example:
        raw = row["answer"] if "answer" in row else row["label"]
        if isinstance(raw, bool):
            label = 0 if raw else 1
        else:
            label = label_index(raw, BOOLQ_LABELS, aliases={"true": 0, "false": 1})
        question = normalize_space(row["question"])
        if question and not question.endswith("?"):
            question += "?"
        question = question[:1].upper() + question[1:]
        return mc_example(question, BOOLQ_LABELS, label, row["passage"], answer_format=answer_format,
                          uid=str(row.get("idx", "")))
    return parse


@register_task("boolq")
def load_boolq(
    name: str = "boolq",
    *,
    data_dir: str | Path | None = None,
    answer_format: str = "letter",
    split_seed: int = DEFAULT_SPLIT_SEED,
) -> TaskData:
    """BoolQ: test = official dev, validation = 5 % of train."""
    root = _need_dir(data_dir, name, "train.jsonl, dev.jsonl")
    parse = boolq_parser(answer_format)
    train = _load_jsonl(find_file(root, ["train.jsonl"], "BoolQ train file"), parse)
    test = _load_jsonl(find_file(root, ["dev.jsonl", "val.jsonl", "validation.jsonl"], "BoolQ dev file"), parse)
    train, validation = validation_from_train(train, example_key, split_seed=split_seed)
    return TaskData(
        name=name, kind="classification", train=train, validation=validation, test=test, metric="accuracy",
        num_labels=2, label_names=BOOLQ_LABELS, answer_format=answer_format,
        description=f"BoolQ; test = official dev; validation = hash-chosen 5 % of train (split seed {split_seed})",
    )
