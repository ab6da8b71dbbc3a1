"""``hf:<dataset>[:<config>]``: datasets from the Hugging Face hub through the ``datasets`` library.

Only used when ``datasets`` is installed and the hub is reachable (``HF_HUB_OFFLINE=1`` forbids
downloads, but a dataset already in the ``datasets`` cache still loads). Rows are converted by the same
parsers as the local files; the hub layouts of these datasets are known:

``boolq`` / ``google/boolq``, ``super_glue:boolq``, ``commonsense_qa`` / ``tau/commonsense_qa``,
``openbookqa`` / ``allenai/openbookqa``, ``derek-thomas/ScienceQA`` (text-only filter),
``social_i_qa`` / ``allenai/social_i_qa``, ``rotten_tomatoes`` / ``cornell-movie-review-data/rotten_tomatoes``,
``glue:<task>`` / ``nyu-mll/glue:<task>``.

Others need ``row_format="mc"`` (``mc_file`` fields) or ``row_format="classification"`` (``text`` /
``label`` with the class names from the dataset's ``ClassLabel`` feature).

Splits: the hub's ``train`` / ``validation`` / ``test``; when the test split has no labels (GLUE,
BoolQ, CommonsenseQA) or is missing, validation becomes the held-out test split and a hash-chosen 5 % of
train the validation split.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import DataError
from .example import Example, TaskData, TaskKind
from .generic import mc_row_parser
from .glue import GLUE_TASKS, glue_parser
from .io import parse_rows
from .prompts import mc_example
from .qa import boolq_parser, choices_parser, scienceqa_parser
from .registry import register_task
from .rotten_tomatoes import LABEL_NAMES as RT_LABELS
from .rotten_tomatoes import review_prompt
from .splits import DEFAULT_SPLIT_SEED, example_key, validation_from_train

logger = logging.getLogger(__name__)

# Hub column names of the GLUE configs (the hub re-encodes every label as 0-based ints in our order).
_HUB_GLUE_COLUMNS = {
    "cola": ("sentence", None), "sst2": ("sentence", None), "mrpc": ("sentence1", "sentence2"),
    "qqp": ("question1", "question2"), "qnli": ("question", "sentence"), "stsb": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"), "rte": ("sentence1", "sentence2"), "mnli": ("premise", "hypothesis"),
}
_FORMATS = {
    "boolq": "boolq", "google/boolq": "boolq", "super_glue:boolq": "boolq", "aps/super_glue:boolq": "boolq",
    "commonsense_qa": "choices", "tau/commonsense_qa": "choices",
    "openbookqa": "choices", "allenai/openbookqa": "choices",
    "derek-thomas/scienceqa": "scienceqa",
    "social_i_qa": "siqa", "allenai/social_i_qa": "siqa",
    "rotten_tomatoes": "rotten_tomatoes", "cornell-movie-review-data/rotten_tomatoes": "rotten_tomatoes",
}
ROW_FORMATS = ("mc", "classification", "boolq", "choices", "scienceqa", "siqa", "rotten_tomatoes", "glue")


def _import_datasets():
    try:
        return importlib.import_module("datasets")
    except ImportError:
        raise DataError(
            "hf:<dataset> needs the `datasets` library and a reachable hub: pip install datasets "
            "(or use a local-file task such as mc_file / classification_file)"
        ) from None


def _siqa_parser(answer_format: str) -> Callable[[dict], Example]:
    def parse(row: dict) -> Example:
        options = [row["answerA"], row["answerB"], row["answerC"]]
        label = int(row["label"]) - 1  # the hub's labels are "1", "2", "3"
        return mc_example(row["question"], options, label, row["context"], answer_format=answer_format)
    return parse


def _rt_parser(row: dict) -> Example:
    text = str(row["text"])
    label = 1 - int(row["label"])  # hub: 1 = positive; ours: 0 = positive
    return Example(review_prompt(text), tuple(" " + n for n in RT_LABELS), label, text)


@register_task("hf:", prefix=True)
def load_hub(
    name: str,
    *,
    cache_dir: str | Path | None = None,
    row_format: str | None = None,
    answer_format: str = "letter",
    split_seed: int = DEFAULT_SPLIT_SEED,
    **fields: Any,
) -> TaskData:
    """Load ``hf:<dataset>[:<config>]`` (see the module docstring); ``fields`` go to the row parser
    (``question_field``, ``text_field``, ...)."""
    spec = name.split(":", 1)[1]
    path, _, config = spec.partition(":")
    key = f"{path}:{config}".lower() if config else path.lower()
    glue_task = config.lower() if path.lower() in ("glue", "nyu-mll/glue") else None
    fmt = row_format or ("glue" if glue_task else _FORMATS.get(key) or _FORMATS.get(path.lower()))
    if fmt is None:
        raise DataError(f"no known row layout for hub dataset {path!r}: pass row_format= one of {ROW_FORMATS}")
    if fmt not in ROW_FORMATS:
        raise ValueError(f"row_format must be one of {ROW_FORMATS}, got {fmt!r}")
    datasets = _import_datasets()
    try:
        dataset = datasets.load_dataset(path, config or None, cache_dir=None if cache_dir is None else str(Path(cache_dir) / "hf"))
    except Exception as err:  # the library raises many types for "offline", "not found", "gated"
        raise DataError(
            f"could not load {path!r} from the hub ({type(err).__name__}: {err}); check the name and that the "
            "hub is reachable (HF_HUB_OFFLINE=1 allows only datasets already cached)"
        ) from err

    kind: TaskKind = "multiple_choice"
    label_names: tuple[str, ...] = ()
    metric, num_labels = "accuracy", 0
    if fmt == "glue":
        if glue_task not in GLUE_TASKS:
            raise DataError(f"unknown GLUE config {config!r}; available: {', '.join(GLUE_TASKS)}")
        text, pair = _HUB_GLUE_COLUMNS[glue_task]
        glue = dataclasses.replace(GLUE_TASKS[glue_task], text=text, text_pair=pair, label="label", columns=None)
        parse = glue_parser(glue, answer_format)
        kind = "classification" if glue.label_names else "regression"
        metric, label_names = glue.metric, glue.label_names
        num_labels = len(label_names) or 1
    elif fmt == "classification":
        features = dataset["train"].features
        label_field = fields.pop("label_field", "label")
        text_field, pair_field = fields.pop("text_field", "text"), fields.pop("text_pair_field", None)
        label_names = tuple(getattr(features[label_field], "names", ()) or ())
        if not label_names:
            raise DataError(f"{path}: the {label_field!r} feature has no class names; pass row_format='mc'")
        question = fields.pop("question", "Which label fits this text?")
        kind, num_labels = "classification", len(label_names)

        def parse(row: dict) -> Example:
            pair = row.get(pair_field) if pair_field else None
            context = row[text_field] if not pair else f"Text 1: {row[text_field]} Text 2: {pair}"
            ex = mc_example(question, label_names, int(row[label_field]), context, answer_format=answer_format)
            return Example(ex.prompt, ex.options, ex.label, str(row[text_field]), pair)
    elif fmt == "boolq":
        parse, kind, label_names, num_labels = boolq_parser(answer_format), "classification", ("yes", "no"), 2
    elif fmt == "rotten_tomatoes":
        parse, kind, label_names, num_labels = _rt_parser, "classification", RT_LABELS, 2
    else:
        parse = {
            "mc": lambda: mc_row_parser(answer_format=answer_format, **fields),
            "choices": lambda: choices_parser(answer_format),
            "scienceqa": lambda: scienceqa_parser(answer_format),
            "siqa": lambda: _siqa_parser(answer_format),
        }[fmt]()

    def rows(split: str) -> list[Example]:
        data = dataset[split]
        return parse_rows(f"hf:{spec}[{split}]", ((i + 1, dict(r)) for i, r in enumerate(data)), parse)

    def labelled(split: str) -> bool:
        if split not in dataset or len(dataset[split]) == 0:
            return False
        first = dict(dataset[split][0])
        value = first.get("label", first.get("answerKey", first.get("answer", 0)))
        return value not in (-1, "", None)

    if "train" not in dataset:
        raise DataError(f"hub dataset {spec!r} has no train split (splits: {list(dataset)})")
    val_name = next((s for s in ("validation", "validation_matched", "dev") if s in dataset), None)
    test_name = next((s for s in ("test", "test_matched") if labelled(s)), None)
    train = rows("train")
    if test_name is None:
        if val_name is None:
            raise DataError(f"hub dataset {spec!r} has no labelled validation or test split")
        test = rows(val_name)
        train, validation = validation_from_train(train, example_key, split_seed=split_seed)
        note = f"test = hub {val_name}; validation = hash-chosen 5 % of train"
    else:
        test = rows(test_name)
        if val_name is None:
            train, validation = validation_from_train(train, example_key, split_seed=split_seed)
        else:
            validation = rows(val_name)
        note = "hub splits"
    if kind == "multiple_choice":
        num_labels = max(len(e.options) for e in train + validation + test)
    return TaskData(
        name=name, kind=kind, train=train, validation=validation, test=test, metric=metric,
        num_labels=num_labels, label_names=label_names,
        answer_format="text" if fmt == "rotten_tomatoes" else ("none" if kind == "regression" else answer_format),
        description=f"hub dataset {spec} ({note})",
    )
