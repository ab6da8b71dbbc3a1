"""Metrics and intervals against hand-computed values and independent (SciPy-free) references."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moelora.finetune.eval import (
    accuracy,
    bootstrap_interval,
    f1_score,
    matthews_corrcoef,
    paired_bootstrap,
    paired_bootstrap_difference,
    pearson,
    pearson_spearman,
    rankdata,
    spearman,
    wilson_interval,
)

PRED = [1, 1, 0, 0, 1, 0]
GOLD = [1, 0, 0, 0, 1, 1]  # TP 2, FP 1, TN 2, FN 1


def test_accuracy():
    assert accuracy(PRED, GOLD) == pytest.approx(4 / 6)
    assert accuracy([-1, 2], [0, 2]) == 0.5  # an unanswered item (-1) is wrong
    with pytest.raises(ValueError):
        accuracy([1], [1, 2])
    with pytest.raises(ValueError):
        accuracy([], [])


def test_mcc_binary_by_hand():
    # (TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (4 - 1) / sqrt(3^4) = 1/3
    assert matthews_corrcoef(PRED, GOLD) == pytest.approx(1 / 3)
    assert matthews_corrcoef(GOLD, GOLD) == pytest.approx(1.0)
    assert matthews_corrcoef([1 - g for g in GOLD], GOLD) == pytest.approx(-1.0)
    assert matthews_corrcoef([1] * 6, GOLD) == 0.0  # constant prediction: defined as 0


def _mcc_reference(pred, gold):
    """MCC as the correlation of one-hot indicator matrices (Gorodkin's definition, computed directly)."""
    classes = sorted(set(pred) | set(gold))
    x = np.array([[p == c for c in classes] for p in pred], dtype=float)
    y = np.array([[g == c for c in classes] for g in gold], dtype=float)
    x -= x.mean(0)
    y -= y.mean(0)
    return (x * y).sum() / math.sqrt((x * x).sum() * (y * y).sum())


def test_mcc_multiclass_against_reference():
    rng = np.random.default_rng(0)
    gold = rng.integers(0, 3, 50)
    pred = np.where(rng.random(50) < 0.6, gold, rng.integers(0, 3, 50))
    assert matthews_corrcoef(pred, gold) == pytest.approx(_mcc_reference(pred.tolist(), gold.tolist()))


def test_f1_by_hand():
    assert f1_score(PRED, GOLD) == pytest.approx(2 / 3)  # precision 2/3, recall 2/3
    assert f1_score(PRED, GOLD, positive=0) == pytest.approx(2 / 3)
    assert f1_score([0, 0], [0, 0]) == 0.0  # no positives at all


def test_pearson_spearman_by_hand():
    assert pearson([1, 2, 3, 4], [2, 4, 6, 8]) == pytest.approx(1.0)
    assert pearson([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)  # 4 / sqrt(5 * 5)
    assert pearson([1, 1, 1], [1, 2, 3]) == 0.0
    assert rankdata([10, 20, 20, 30]).tolist() == [1, 2.5, 2.5, 4]
    assert rankdata([3, 1, 2]).tolist() == [3, 1, 2]
    assert spearman([1, 2, 3, 4], [1, 8, 27, 64]) == pytest.approx(1.0)
    assert pearson([1, 2, 3, 4], [1, 8, 27, 64]) < 0.99
    # with ties: ranks x = [1, 2.5, 2.5, 4], y = [1, 2, 3, 4] -> Pearson of the ranks
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(pearson([1, 2.5, 2.5, 4], [1, 2, 3, 4]))
    assert pearson_spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx((0.8 + 0.8) / 2)


def test_wilson_interval():
    z2 = 1.959963984540054 ** 2
    low, high = wilson_interval(0, 10).low, wilson_interval(0, 10).high
    assert low == pytest.approx(0.0, abs=1e-12) and high == pytest.approx(z2 / (10 + z2))  # closed form at 0 successes
    a, b = wilson_interval(78, 100), wilson_interval(22, 100)
    assert a.low == pytest.approx(1 - b.high) and a.high == pytest.approx(1 - b.low)  # symmetry
    assert a.low == pytest.approx(0.6892, abs=1e-3) and a.high == pytest.approx(0.8498, abs=1e-3)
    assert wilson_interval(78, 100, confidence=0.99).low < a.low
    with pytest.raises(ValueError):
        wilson_interval(5, 4)
    for n in range(1, 200):  # the interval holds the estimate exactly at 0 and at n (a plot's error bars need it)
        assert wilson_interval(0, n).low == 0.0 and wilson_interval(n, n).high == 1.0


def test_paired_bootstrap_extremes_and_determinism():
    ones, zeros = np.ones(50), np.zeros(50)
    d = paired_bootstrap(ones, zeros)
    assert d.estimate == 1.0 and d.interval.low == d.interval.high == 1.0 and d.excludes_zero and d.p_value == 0.0
    same = paired_bootstrap(ones, ones)
    assert same.estimate == 0.0 and not same.excludes_zero and same.p_value == 1.0
    rng = np.random.default_rng(1)
    a, b = rng.random(400) < 0.78, rng.random(400) < 0.44
    first, second = paired_bootstrap(a, b, seed=3), paired_bootstrap(a, b, seed=3)
    assert first == second
    assert paired_bootstrap_difference(a, b, seed=3) == (first.estimate, first.interval.low, first.interval.high)
    # close to the normal approximation of the paired difference
    delta = a.astype(float) - b.astype(float)
    se = delta.std(ddof=1) / math.sqrt(len(delta))
    assert first.estimate == pytest.approx(delta.mean())
    assert first.interval.high - first.interval.low == pytest.approx(2 * 1.96 * se, rel=0.1)
    assert first.interval.contains(first.estimate) and first.excludes_zero


def test_paired_bootstrap_of_a_metric():
    rng = np.random.default_rng(2)
    gold = rng.integers(0, 2, 200)
    good = np.where(rng.random(200) < 0.9, gold, 1 - gold)
    bad = np.where(rng.random(200) < 0.5, gold, 1 - gold)
    d = paired_bootstrap(good, bad, gold, metric=matthews_corrcoef, n_resamples=500)
    assert d.estimate == pytest.approx(matthews_corrcoef(good, gold) - matthews_corrcoef(bad, gold))
    assert d.excludes_zero and d.interval.low > 0
    acc = paired_bootstrap(good, bad, gold, n_resamples=500)
    assert acc.estimate == pytest.approx(accuracy(good, gold) - accuracy(bad, gold))


def test_bootstrap_interval():
    rng = np.random.default_rng(3)
    gold = rng.integers(0, 2, 300)
    pred = np.where(rng.random(300) < 0.8, gold, 1 - gold)
    interval = bootstrap_interval(f1_score, pred, gold, n_resamples=500, seed=0)
    assert interval.contains(f1_score(pred, gold)) and interval.high - interval.low < 0.2
    assert interval == bootstrap_interval(f1_score, pred, gold, n_resamples=500, seed=0)
