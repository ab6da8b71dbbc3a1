"""Confidence intervals: Wilson for a proportion, percentile bootstrap for any metric, and the paired
bootstrap for the difference between two systems evaluated on the same examples."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from statistics import NormalDist

import numpy as np

from .metrics import ArrayLike, accuracy

# Resamples are drawn in chunks of this many to bound memory (chunk x n indices).
_CHUNK = 500


@dataclass(frozen=True)
class Interval:
    """A two-sided confidence interval ``[low, high]`` at level ``confidence``."""

    low: float
    high: float
    confidence: float = 0.95
    method: str = ""

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Difference:
    """``estimate = metric(a) - metric(b)`` with a paired-bootstrap interval.

    ``p_value`` is the two-sided bootstrap p-value of "no difference": twice the smaller fraction of
    resampled differences on either side of 0 (at most 1).
    """

    estimate: float
    interval: Interval
    p_value: float
    n: int
    n_resamples: int

    @property
    def excludes_zero(self) -> bool:
        return not self.interval.contains(0.0)

    def to_dict(self) -> dict:
        return {"estimate": self.estimate, "interval": self.interval.to_dict(), "p_value": self.p_value,
                "n": self.n, "n_resamples": self.n_resamples, "excludes_zero": self.excludes_zero}


def _z(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> Interval:
    """Wilson score interval of a proportion ``successes / n``::

        (p + z^2 / 2n  ±  z sqrt(p (1 - p) / n + z^2 / 4n^2)) / (1 + z^2 / n)

    Unlike the normal approximation it stays inside [0, 1] and is sensible near 0 and 1.
    """
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, n], got {successes} of {n}")
    z = _z(confidence)
    p = successes / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    scale = 1 + z * z / n
    # The bounds hold p exactly, also where rounding would put an end a hair past it (p = 0 or 1).
    low, high = min(p, max(0.0, (centre - half) / scale)), max(p, min(1.0, (centre + half) / scale))
    return Interval(low, high, confidence, "wilson")


def _resample_indices(n: int, n_resamples: int, seed: int):
    """Chunks of ``(k, n)`` bootstrap index arrays, ``n_resamples`` rows in total."""
    rng = np.random.default_rng(seed)
    done = 0
    while done < n_resamples:
        k = min(_CHUNK, n_resamples - done)
        yield rng.integers(0, n, size=(k, n))
        done += k


def _percentiles(samples: np.ndarray, confidence: float, method: str) -> Interval:
    alpha = (1 - confidence) / 2
    low, high = np.quantile(samples, [alpha, 1 - alpha])
    return Interval(float(low), float(high), confidence, method)


def bootstrap_interval(
    metric: Callable[[ArrayLike, ArrayLike], float],
    predictions: ArrayLike,
    labels: ArrayLike,
    *,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Percentile bootstrap interval of ``metric(predictions, labels)`` over resampled examples."""
    p, y = np.asarray(predictions), np.asarray(labels)
    if len(p) != len(y) or len(p) == 0:
        raise ValueError("predictions and labels must be non-empty and of equal length")
    _z(confidence)
    samples = np.array([metric(p[i], y[i]) for chunk in _resample_indices(len(p), n_resamples, seed) for i in chunk])
    return _percentiles(samples, confidence, "percentile bootstrap")


def paired_bootstrap(
    a: ArrayLike,
    b: ArrayLike,
    labels: ArrayLike | None = None,
    *,
    metric: Callable[[ArrayLike, ArrayLike], float] | None = None,
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Difference:
    """Paired bootstrap of the difference ``a - b`` between two systems on the same examples.

    Each resample draws ``n`` example indices with replacement and evaluates both systems on the same
    draw, so the example-to-example variation shared by both cancels.

    Args:
        a, b: per-example scores (e.g. 0/1 correctness) when ``labels`` is ``None``, the difference of
            means is bootstrapped (vectorised); otherwise per-example predictions, compared with
            ``metric(predictions, labels)`` (default accuracy).
        labels: the true labels, for a metric of predictions.
        n_resamples, confidence, seed: bootstrap settings; the same seed gives the same interval.
    """
    a_arr, b_arr = np.asarray(a), np.asarray(b)
    if a_arr.shape != b_arr.shape or a_arr.ndim != 1 or len(a_arr) == 0:
        raise ValueError(f"a and b must be non-empty 1-D arrays of equal length, got {a_arr.shape}, {b_arr.shape}")
    _z(confidence)
    n = len(a_arr)
    if labels is None:
        if metric is not None:
            raise ValueError("metric needs labels (a and b are then predictions)")
        delta = a_arr.astype(np.float64) - b_arr.astype(np.float64)
        estimate = float(delta.mean())
        samples = np.concatenate([delta[idx].mean(axis=1) for idx in _resample_indices(n, n_resamples, seed)])
    else:
        y = np.asarray(labels)
        if y.shape != a_arr.shape:
            raise ValueError("labels must have the same length as the predictions")
        metric = metric or accuracy
        estimate = metric(a_arr, y) - metric(b_arr, y)
        samples = np.array([
            metric(a_arr[i], y[i]) - metric(b_arr[i], y[i])
            for chunk in _resample_indices(n, n_resamples, seed) for i in chunk
        ])
    p_value = min(1.0, 2 * min(np.mean(samples <= 0), np.mean(samples >= 0)))
    return Difference(estimate, _percentiles(samples, confidence, "paired bootstrap"), float(p_value), n, n_resamples)


def paired_bootstrap_difference(
    a: ArrayLike, b: ArrayLike, *, n_resamples: int = 10_000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """``(mean(a) - mean(b), low, high)``: ``paired_bootstrap`` of per-example scores as a tuple.

    E.g. ``a`` = fine-tuned correctness, ``b`` = zero-shot correctness on the same examples: the
    improvement in accuracy and its interval.
    """
    result = paired_bootstrap(a, b, n_resamples=n_resamples, confidence=confidence, seed=seed)
    return result.estimate, result.interval.low, result.interval.high
