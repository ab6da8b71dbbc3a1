"""Metrics as pure functions of predictions and labels (NumPy, no SciPy)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

ArrayLike = Sequence[float] | np.ndarray


def _pair(predictions: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    p, y = np.asarray(predictions), np.asarray(labels)
    if p.shape != y.shape or p.ndim != 1:
        raise ValueError(f"predictions and labels must be 1-D of equal length, got {p.shape} and {y.shape}")
    if p.size == 0:
        raise ValueError("cannot compute a metric on zero examples")
    return p, y


def accuracy(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Fraction of predictions equal to their label."""
    p, y = _pair(predictions, labels)
    return float(np.mean(p == y))


def matthews_corrcoef(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Matthews correlation coefficient (CoLA's metric), multi-class form (Gorodkin 2004).

    With confusion matrix ``C``, ``t_k`` the true and ``p_k`` the predicted count of class ``k``, ``c``
    the correct and ``s`` the total count::

        MCC = (c s - sum_k p_k t_k) / sqrt((s^2 - sum_k p_k^2) (s^2 - sum_k t_k^2))

    which for two classes is ``(TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN))``. Returns 0 when a
    factor of the denominator is 0 (a constant prediction or a single class), as is customary.
    Predictions outside the label set (e.g. -1 for "no answer") count as their own class.
    """
    p, y = _pair(predictions, labels)
    classes = np.union1d(p, y)
    p_idx, y_idx = np.searchsorted(classes, p), np.searchsorted(classes, y)
    k = len(classes)
    confusion = np.zeros((k, k), dtype=np.float64)
    np.add.at(confusion, (y_idx, p_idx), 1)
    t, q = confusion.sum(axis=1), confusion.sum(axis=0)
    c, s = np.trace(confusion), confusion.sum()
    denominator = np.sqrt((s * s - q @ q) * (s * s - t @ t))
    return 0.0 if denominator == 0 else float((c * s - q @ t) / denominator)


def f1_score(predictions: ArrayLike, labels: ArrayLike, positive: int = 1) -> float:
    """F1 of the ``positive`` class (MRPC / QQP): ``2 TP / (2 TP + FP + FN)``; 0 when undefined."""
    p, y = _pair(predictions, labels)
    tp = np.sum((p == positive) & (y == positive))
    fp = np.sum((p == positive) & (y != positive))
    fn = np.sum((p != positive) & (y == positive))
    denominator = 2 * tp + fp + fn
    return 0.0 if denominator == 0 else float(2 * tp / denominator)


def pearson(x: ArrayLike, y: ArrayLike) -> float:
    """Pearson correlation; 0 when either input is constant."""
    a, b = _pair(x, y)
    a, b = a.astype(np.float64) - a.mean(), b.astype(np.float64) - b.mean()
    denominator = np.sqrt((a @ a) * (b @ b))
    return 0.0 if denominator == 0 else float((a @ b) / denominator)


def rankdata(x: ArrayLike) -> np.ndarray:
    """1-based ranks with ties given their average rank (SciPy's ``method="average"``)."""
    values = np.asarray(x, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    # boundaries of runs of equal values
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    average = (starts + ends + 1) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat(average, ends - starts)
    return ranks


def spearman(x: ArrayLike, y: ArrayLike) -> float:
    """Spearman rank correlation: Pearson on average ranks."""
    a, b = _pair(x, y)
    return pearson(rankdata(a), rankdata(b))


def pearson_spearman(predictions: ArrayLike, labels: ArrayLike) -> float:
    """The mean of Pearson and Spearman correlation (GLUE's combined STS-B score)."""
    return (pearson(predictions, labels) + spearman(predictions, labels)) / 2


METRICS: dict[str, Callable[[ArrayLike, ArrayLike], float]] = {
    "accuracy": accuracy,
    "mcc": matthews_corrcoef,
    "f1": f1_score,
    "pearson": pearson,
    "spearman": spearman,
    "pearson_spearman": pearson_spearman,
}


def get_metric(name: str) -> Callable[[ArrayLike, ArrayLike], float]:
    """The metric function called ``name`` (one of ``METRICS``)."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; available: {', '.join(METRICS)}")
    return METRICS[name]
