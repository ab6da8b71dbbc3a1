"""One entry point for evaluating a model on a task: ``evaluate(model, tokenizer, task, examples)``."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast, get_args

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ...errors import ConfigError
from ..data.chat import TrainOn
from ..data.collate import EncoderCollator
from ..data.example import Example, TaskData
from ..errors import EvaluationError
from .generation import extract_answer, generate_image_texts, generate_texts
from .intervals import Interval, bootstrap_interval, wilson_interval
from .metrics import accuracy, get_metric, pearson, spearman
from .scoring import score_image_options, score_options

logger = logging.getLogger(__name__)

# How a causal LM is evaluated: option log-likelihood, or generation with answer extraction.
LMEvalMethod = Literal["loglik", "generate"]
# ... and an encoder, through its classification head.
EvalMethod = Literal[LMEvalMethod, "classifier"]
EVAL_METHODS: tuple[str, ...] = get_args(EvalMethod)


@dataclass
class EvalResult:
    """The outcome of ``evaluate``.

    Attributes:
        task, method: what was evaluated and how (``"loglik"``, ``"generate"`` or ``"classifier"``).
        metric, value: the task's headline metric and its value (accuracy as a fraction in [0, 1]).
        interval: its confidence interval: Wilson for accuracy, percentile bootstrap otherwise.
        predictions: per example, the predicted option / class index (``-1`` when no answer could be
            extracted from generated text) or the predicted value (regression).
        labels: per example, the true label.
        correct: per example, whether the prediction is right (``None`` for regression).
        metrics: every metric computed (e.g. ``accuracy`` next to ``f1``, ``pearson`` and ``spearman``).
        scores: per example, the option scores (``loglik``) or class logits (``classifier``).
        generations: per example, the generated text (``generate``).
        intervals: an interval per metric that has one (generative tasks: exact match, contains, token F1).
        per_example: per example, the value of each further metric (generative tasks: ``contains``,
            ``token_f1``), for paired comparisons; ``correct`` holds the headline's.
    """

    task: str
    method: str
    metric: str
    value: float
    interval: Interval | None
    predictions: list
    labels: list
    correct: list[bool] | None
    metrics: dict[str, float] = field(default_factory=dict)
    scores: list[list[float]] | None = None
    generations: list[str] | None = None
    intervals: dict[str, Interval] = field(default_factory=dict)
    per_example: dict[str, list[float]] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.predictions)

    def summary(self) -> str:
        """E.g. ``"accuracy 78.2 % (95 % CI 75.5-80.7 %), n=1000, loglik"``."""
        percent = self.metric in ("accuracy", "exact_match")
        scale, unit = (100, " %") if percent else (1, "")
        text = f"{self.metric} {self.value * scale:.{1 if percent else 3}f}{unit}"
        if self.interval is not None:
            text += (f" ({self.interval.confidence * 100:.0f} % CI {self.interval.low * scale:.{1 if percent else 3}f}-"
                     f"{self.interval.high * scale:.{1 if percent else 3}f}{unit})")
        return f"{text}, n={self.n}, {self.method}"

    def to_dict(self, *, per_example: bool = True) -> dict[str, Any]:
        """A JSON-serialisable form: ``interval`` is ``[low, high]`` (level in ``confidence``); with
        ``per_example``, also ``predictions``, ``labels``, ``correct`` (and ``generations``)."""
        out: dict[str, Any] = {
            "task": self.task, "method": self.method, "metric": self.metric, "value": self.value,
            "interval": None if self.interval is None else [self.interval.low, self.interval.high],
            "confidence": None if self.interval is None else self.interval.confidence,
            "n": self.n, "metrics": dict(self.metrics),
        }
        if self.intervals:
            out["intervals"] = {k: [v.low, v.high] for k, v in self.intervals.items()}
        if per_example:
            out.update(predictions=list(self.predictions), labels=list(self.labels), correct=self.correct)
            if self.generations is not None:
                out["generations"] = list(self.generations)
            if self.per_example:
                out["per_example"] = {k: list(v) for k, v in self.per_example.items()}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalResult:
        """The inverse of ``to_dict`` (per-example scores are not stored, so they come back as ``None``)."""
        interval = data.get("interval")
        confidence = data.get("confidence") or 0.95
        return cls(
            task=data["task"], method=data["method"], metric=data["metric"], value=data["value"],
            interval=None if interval is None else Interval(interval[0], interval[1], confidence),
            predictions=list(data.get("predictions") or []), labels=list(data.get("labels") or []),
            correct=data.get("correct"), metrics=dict(data.get("metrics") or {}), generations=data.get("generations"),
            intervals={k: Interval(v[0], v[1], confidence) for k, v in (data.get("intervals") or {}).items()},
            per_example={k: list(v) for k, v in (data.get("per_example") or {}).items()},
        )


def _default_method(model: nn.Module, task: TaskData) -> str:
    can_generate = getattr(model, "can_generate", None)
    causal = bool(can_generate()) if callable(can_generate) else hasattr(model, "generate")
    if task.kind == "regression" or not causal:
        return "classifier"
    return "loglik"


def _classify(
    model: nn.Module, tokenizer: Any, examples: Sequence[Example], *, batch_size: int, max_length: int | None,
    progress: bool, desc: str | None,
) -> tuple[list, list[list[float]]]:
    collator = EncoderCollator(tokenizer, max_length or 256)
    device = next(model.parameters()).device
    predictions: list = []
    logits_out: list[list[float]] = []
    with torch.no_grad():
        for start in tqdm(range(0, len(examples), batch_size), desc=desc or "classifying", disable=not progress, leave=False):
            batch = collator(examples[start : start + batch_size])
            batch.pop("labels")
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float()  # (B, num_labels)
            if logits.shape[-1] == 1:
                predictions.extend(logits[:, 0].tolist())
            else:
                predictions.extend(logits.argmax(-1).tolist())
            logits_out.extend(logits.tolist())
    return predictions, logits_out


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    task: TaskData,
    examples: Sequence[Example] | None = None,
    *,
    method: str | None = None,
    batch_size: int = 16,
    normalize: str = "mean",
    max_new_tokens: int = 10,
    max_length: int | None = None,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
    progress: bool = False,
    desc: str | None = None,
    chat_template: str | None = None,
    train_on: str = "all",
) -> EvalResult:
    """Evaluate ``model`` on ``examples`` (default: the task's held-out test split).

    A generative task (conversations) is evaluated by generation: ``generative.evaluate_generative``
    (``method`` must then be ``None`` or ``"generate"``; ``chat_template`` and ``train_on`` go to it).

    Methods:
        ``"loglik"`` (default for causal LMs): the option with the highest log-likelihood
            (``scoring.score_options``; ``normalize`` is ``"mean"`` per option token or ``"sum"``).
        ``"generate"``: greedy generation of ``max_new_tokens`` tokens, then the option named in the
            text (the answer letter, or the option's words for ``answer_format="text"`` tasks).
        ``"classifier"`` (default for encoders and regression): argmax of a sequence-classification
            head's logits, or its single output for regression.

    The model is put in eval mode and gradients are off during the evaluation; its previous training
    mode is restored afterwards. ``progress`` shows a tqdm bar labelled ``desc``.
    """
    examples = list(task.test if examples is None else examples)
    if not examples:
        raise ConfigError(f"no examples to evaluate for task {task.name!r}")
    if task.kind == "generative":
        from .generative import evaluate_generative

        if method not in (None, "generate"):
            raise ConfigError(f"task {task.name!r} is generative: it is evaluated by generation (method='generate')")
        return evaluate_generative(
            model, tokenizer, task, examples, chat_template=chat_template, train_on=cast(TrainOn, train_on),
            batch_size=batch_size, max_new_tokens=max_new_tokens, max_length=max_length, confidence=confidence,
            n_resamples=n_resamples, seed=seed, progress=progress, desc=desc,
        )
    method = method or _default_method(model, task)
    if method not in EVAL_METHODS:
        raise ConfigError(f"method must be one of {EVAL_METHODS}, got {method!r}")
    if task.kind == "regression" and method != "classifier":
        raise ConfigError(f"task {task.name!r} is a regression task: evaluate it with method='classifier' "
                         "(a model with a one-output sequence-classification head)")
    if task.kind == "multiple_choice" and method == "classifier":
        raise ConfigError(f"task {task.name!r} has per-example options: use method='loglik' or 'generate'")

    labels = [e.label for e in examples]
    scores = generations = None
    was_training = model.training
    model.eval()
    try:
        if method == "loglik" and task.info.get("modality") == "image":  # ``tokenizer`` is the model's processor
            scores = score_image_options(model, tokenizer, examples, batch_size=batch_size, normalize=normalize,
                                         max_length=max_length, progress=progress, desc=desc)
            predictions = [int(np.argmax(s)) for s in scores]
        elif method == "loglik":
            scores = score_options(model, tokenizer, examples, batch_size=batch_size, normalize=normalize,
                                   max_length=max_length, progress=progress, desc=desc)
            predictions = [int(np.argmax(s)) for s in scores]
        elif method == "generate":
            if task.info.get("modality") == "image":
                generations = generate_image_texts(model, tokenizer, examples, max_new_tokens=max_new_tokens,
                                                   batch_size=batch_size, progress=progress, desc=desc)
            else:
                generations = generate_texts(model, tokenizer, [e.prompt for e in examples],
                                             max_new_tokens=max_new_tokens, batch_size=batch_size,
                                             max_length=max_length, progress=progress, desc=desc)
            predictions = [extract_answer(g, e.options, task.answer_format) for g, e in zip(generations, examples)]
            missing = sum(p < 0 for p in predictions)
            if missing:
                logger.info("%s: no answer found in %d of %d generations", task.name, missing, len(predictions))
        else:
            predictions, scores = _classify(model, tokenizer, examples, batch_size=batch_size,
                                            max_length=max_length, progress=progress, desc=desc)
    finally:
        model.train(was_training)
    if scores is not None:
        bad = [i for i, row in enumerate(scores) if not all(math.isfinite(float(v)) for v in np.ravel(row))]
        if bad:  # argmax would pick option 0 for a NaN row and report a plausible accuracy
            raise EvaluationError(
                f"{task.name}: the model's scores are not finite (NaN or inf) for {len(bad)} of {len(scores)} "
                f"examples (the first: #{bad[0]}); the adapter or the model diverged"
            )

    metric_fn = get_metric(task.metric)
    value = float(metric_fn(predictions, labels))
    metrics = {task.metric: value}
    if task.kind == "regression":
        correct = None
        metrics.update(pearson=pearson(predictions, labels), spearman=spearman(predictions, labels))
    else:
        correct = [p == y for p, y in zip(predictions, labels)]
        metrics["accuracy"] = accuracy(predictions, labels)
    if task.metric == "accuracy":
        assert correct is not None  # accuracy is a classification metric, so correct was set above
        interval = wilson_interval(sum(correct), len(correct), confidence)
    else:
        interval = bootstrap_interval(metric_fn, predictions, labels, n_resamples=n_resamples,
                                      confidence=confidence, seed=seed)
    if any(isinstance(v, float) and math.isnan(v) for v in metrics.values()):
        logger.warning("%s: a metric is NaN: %s", task.name, metrics)
    result = EvalResult(task.name, method, task.metric, value, interval, predictions, labels, correct,
                        metrics, scores, generations)
    logger.info("%s: %s", task.name, result.summary())
    return result
