"""The two data types every loader produces: one ``Example`` and one ``TaskData`` per task."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field, replace
from typing import Literal

from .errors import EmptySplitError, LabelOutOfRangeError

logger = logging.getLogger(__name__)

TaskKind = Literal["multiple_choice", "classification", "regression", "generative"]
TASK_KINDS = ("multiple_choice", "classification", "regression", "generative")
METRICS = ("accuracy", "mcc", "f1", "pearson_spearman", "exact_match")
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Example:
    """One example, ready for a causal LM and for an encoder classifier.

    Attributes:
        prompt: the full prompt text of a causal LM; an answer is scored (or generated) as the text that
            follows it directly, so ``prompt + options[i]`` is the complete sequence for option ``i``.
        options: the answer continuations, e.g. ``(" positive", " negative")`` or
            ``(" The answer is A.", " The answer is B.")``; empty for regression.
        label: index into ``options`` of the correct one (``int``); the target value (``float``) for
            regression.
        text: the raw input of an encoder classifier (first segment).
        text_pair: the optional second segment of an encoder classifier (sentence pairs, passages).
        uid: an identifier that is stable across loads (the source's id when it has one).
        image: the path of the example's image (image tasks: the prompt holds one image placeholder, which
            the model's processor expands into its image tokens); ``None`` for text-only examples.
        messages: a generative (chat) example's conversation ``({"role", "content"}, ...)``, ending with
            the assistant turn to learn and to generate; ``options`` then holds the acceptable answers
            (the first is that last turn's text) and ``label`` is 0.
    """

    prompt: str
    options: tuple[str, ...]
    label: int | float
    text: str
    text_pair: str | None = None
    uid: str = ""
    messages: tuple[dict[str, str], ...] = ()
    image: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.options, tuple):
            object.__setattr__(self, "options", tuple(self.options))
        if not isinstance(self.messages, tuple):
            object.__setattr__(self, "messages", tuple(self.messages))
        if self.options:
            if isinstance(self.label, bool) or not isinstance(self.label, int):
                raise LabelOutOfRangeError(
                    f"label must be an integer index into the {len(self.options)} options, got {self.label!r}"
                )
            if not 0 <= self.label < len(self.options):
                raise LabelOutOfRangeError(
                    f"label {self.label} is outside the options (valid: 0..{len(self.options) - 1})"
                )
        elif isinstance(self.label, bool) or not isinstance(self.label, (int, float)):
            raise LabelOutOfRangeError(f"a regression label must be a number, got {self.label!r}")

    @property
    def answer(self) -> str:
        """The correct continuation ``options[label]`` (the training target of a causal LM)."""
        if not self.options:
            raise ValueError("a regression example has no answer continuation")
        return self.options[int(self.label)]

    @property
    def context(self) -> list[dict[str, str]]:
        """A generative example's conversation before its last (assistant) turn: the generation prompt."""
        return list(self.messages[:-1])


@dataclass
class TaskData:
    """A task with its three splits.

    Attributes:
        name: registry name, e.g. ``"rotten_tomatoes"``, ``"siqa"``, ``"glue:cola"``.
        kind: ``"multiple_choice"`` (options differ per example; scored by a causal LM),
            ``"classification"`` (a fixed label set ``label_names``: a causal LM scores the options, an
            encoder predicts ``num_labels`` logits), ``"regression"`` (encoder only) or ``"generative"``
            (conversations: trained on the assistant turns, evaluated by generating the last one).
        train, validation, test: the splits; ``test`` is held out (never used for model selection).
        metric: the headline metric: ``"accuracy"``, ``"mcc"``, ``"f1"``, ``"pearson_spearman"`` or, for
            generative tasks, ``"exact_match"``.
        num_labels: classes of an encoder head (1 for regression, the largest option count for
            multiple choice).
        label_names: class names of a classification task, in label order.
        answer_format: ``"letter"`` (options are ``" The answer is X."``), ``"text"`` (options are the
            answer words themselves), or ``"none"`` for regression and generative tasks. Answer extraction
            from generated text depends on it.
        option_letters: letter ``option_letters[i]`` names option ``i`` in ``"letter"`` format.
        description: where the data come from and how the splits were made.
        answer_pattern: a generative task's regular expression reading the answer out of a generation
            (its first group, or the whole match); ``None``: the whole generation is the answer.
    """

    name: str
    kind: TaskKind
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    metric: str = "accuracy"
    num_labels: int = 2
    label_names: tuple[str, ...] = ()
    answer_format: str = "letter"
    option_letters: str = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    description: str = ""
    info: dict = field(default_factory=dict)
    answer_pattern: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise ValueError(f"kind must be one of {TASK_KINDS}, got {self.kind!r}")
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}")
        for split in SPLITS:
            if not getattr(self, split):
                raise EmptySplitError(
                    f"task {self.name!r}: the {split} split is empty; check the data files "
                    f"(or the max_train / max_eval limits)"
                )

    def split(self, name: str) -> list[Example]:
        """The split called ``name`` (``"train"``, ``"validation"`` or ``"test"``)."""
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        return getattr(self, name)

    def sizes(self) -> dict[str, int]:
        """Number of examples per split."""
        return {split: len(getattr(self, split)) for split in SPLITS}

    def limit(self, *, max_train: int | None = None, max_eval: int | None = None, seed: int = 0) -> TaskData:
        """A copy with at most ``max_train`` training and ``max_eval`` validation / test examples.

        The training subset is a seeded random sample (in the original order); the evaluation subsets
        are prefixes of the splits, whose order is already a fixed pseudo-random one, so a smaller
        evaluation set is always contained in a larger one and does not depend on ``seed``.
        """
        for key, value in (("max_train", max_train), ("max_eval", max_eval)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{key} must be a positive integer or None, got {value!r}")
        train = self.train
        if max_train is not None and max_train < len(train):
            keep = sorted(random.Random(seed).sample(range(len(train)), max_train))
            train = [train[i] for i in keep]
        validation, test = self.validation, self.test
        if max_eval is not None:
            validation, test = validation[:max_eval], test[:max_eval]
        return replace(self, train=train, validation=validation, test=test, info=dict(self.info))
