"""Collect the cached runs of a grid into per-cell statistics, curves and paired comparisons.

Per (task, optimizer, method): every seed's final held-out number, their mean and standard deviation
(``ddof=1``). A comparison of two methods pairs runs by seed: the mean of the per-seed differences with a
Student-t interval over seeds (the seed-to-seed noise), and, on real tasks, a paired bootstrap over the
held-out examples of the seed-averaged correctness (the test-set noise). On the synthetic task values are
relative errors spanning decades, so differences are taken in ``log10``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .grid import MAIN, Cell, Grid, TaskSpec
from .runner import cell_dir, is_done, read_json, zero_shot_dir

# Two-sided 95 % Student-t quantiles by degrees of freedom (no scipy dependency).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def t_quantile(df: int) -> float:
    return _T95.get(df, 1.96 + 2.5 / max(df, 1))


@dataclass
class Run:
    seed: int
    lr: float
    folder: Path
    summary: dict[str, Any]

    @property
    def diverged(self) -> bool:
        return bool(self.summary.get("diverged"))

    @property
    def value(self) -> float | None:
        return None if self.diverged else self.summary.get("test")


@dataclass
class CellStats:
    optimizer: str
    method: str
    lr: float | None
    runs: list[Run] = field(default_factory=list)
    sweep: dict[str, Any] = field(default_factory=dict)

    @property
    def values(self) -> list[float]:
        return [r.value for r in self.runs if r.value is not None]

    @property
    def mean(self) -> float:
        return float(np.mean(self.values)) if self.values else float("nan")

    @property
    def std(self) -> float:
        return float(np.std(self.values, ddof=1)) if len(self.values) > 1 else float("nan")


@dataclass
class TaskResults:
    spec: TaskSpec
    cells: dict[tuple[str, str], CellStats]
    zero_shot: dict[str, Any] | None
    expected_runs: int
    finished_runs: int
    sweep_expected: int
    sweep_finished: int
    sweep_times: list[float] = field(default_factory=list)  # wall time of each finished sweep run (s)


def collect(grid: Grid, cache: Path) -> dict[str, TaskResults]:
    """Everything finished in ``cache`` for ``grid`` (missing runs are simply absent)."""
    from .runner import GridRunner

    runner = GridRunner(grid, cache)
    out: dict[str, TaskResults] = {}
    for key, spec in grid.tasks.items():
        chosen, details = runner.chosen_lrs(key)
        cells: dict[tuple[str, str], CellStats] = {}
        finished = 0
        for opt, method in grid.pairs(key):
            stats = CellStats(opt, method, chosen.get((opt, method)), sweep=details.get((opt, method), {}))
            if stats.lr is not None:
                for seed in grid.seeds:
                    folder = cell_dir(cache, spec, Cell(key, opt, method, seed, MAIN, stats.lr))
                    if is_done(folder):
                        stats.runs.append(Run(seed, stats.lr, folder, read_json(folder / "summary.json")))
                        finished += 1
            cells[(opt, method)] = stats
        sweep_cells = grid.sweep_cells(key)
        sweep_done = [cell_dir(cache, spec, c) for c in sweep_cells if is_done(cell_dir(cache, spec, c))]
        sweep_finished = len(sweep_done)
        sweep_times = [read_json(f / "summary.json").get("wall_time_s") or 0.0 for f in sweep_done]
        zs_folder = zero_shot_dir(cache, spec)
        zero_shot = read_json(zs_folder / "summary.json") if spec.zero_shot and is_done(zs_folder) else None
        out[key] = TaskResults(spec, cells, zero_shot, len(grid.main_cells(key)), finished,
                               len(sweep_cells), sweep_finished, sweep_times)
    return out


# ------------------------------------------------------------------------------------------ curves
def read_events(folder: Path) -> list[dict[str, Any]]:
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_curves(folder: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """``(training loss by step, validation value by step)`` of one run."""
    events = read_events(folder)
    train = [(e["step"], e["loss"]) for e in events if "loss" in e]
    validation = [(e["step"], e["value"]) for e in events if e.get("split") == "validation"]
    return train, validation


def mean_curve(curves: list[list[tuple[int, float]]], smooth: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(steps, mean, min, max)`` over runs at the steps all runs share (after a moving average)."""
    curves = [c for c in curves if c]
    if not curves:
        empty = np.array([])
        return empty, empty, empty, empty
    common = sorted(set.intersection(*(set(s for s, _ in c) for c in curves)))
    table = np.array([[dict(c)[s] for s in common] for c in curves], dtype=float)
    if smooth > 1 and table.shape[1] >= smooth:
        kernel = np.ones(smooth) / smooth
        table = np.array([np.convolve(row, kernel, mode="valid") for row in table])
        common = common[smooth - 1:]
    return np.array(common), table.mean(0), table.min(0), table.max(0)


# ------------------------------------------------------------------------------------------ comparisons
@dataclass
class Comparison:
    """``a - b`` (accuracy points x 100, or log10 of the relative error on the synthetic task)."""

    a: str
    b: str
    optimizer: str
    per_seed: list[float]
    mean: float
    std: float
    low: float
    high: float
    bootstrap: tuple[float, float, float] | None = None  # (estimate, low, high) over held-out examples

    @property
    def n(self) -> int:
        return len(self.per_seed)

    def verdict(self, higher_is_better: bool) -> str:
        """``"a better"``, ``"b better"`` or ``"no clear difference"`` at 95 % over seeds."""
        if self.n < 2 or math.isnan(self.low):
            return "too few runs"
        better_sign = 1 if higher_is_better else -1
        seeds_clear = self.low > 0 or self.high < 0
        # On real tasks every seed is scored on the same held-out examples: the difference must also
        # clear the test-set noise (paired bootstrap over examples), not only the seed-to-seed noise.
        examples_clear = self.bootstrap is None or self.bootstrap[1] > 0 or self.bootstrap[2] < 0
        if seeds_clear and examples_clear:
            return "a better" if (self.mean > 0) == (better_sign > 0) else "b better"
        return "no clear difference"


def _transform(value: float, spec: TaskSpec) -> float:
    return math.log10(max(value, 1e-12)) if spec.kind == "synthetic" else 100.0 * value


def compare(results: TaskResults, optimizer: str, a: str, b: str) -> Comparison | None:
    """Paired by seed; ``None`` when either cell is missing."""
    spec = results.spec
    ca, cb = results.cells.get((optimizer, a)), results.cells.get((optimizer, b))
    if ca is None or cb is None:
        return None
    ra = {r.seed: r for r in ca.runs if r.value is not None}
    rb = {r.seed: r for r in cb.runs if r.value is not None}
    seeds = sorted(set(ra) & set(rb))
    if not seeds:
        return None
    diffs = []
    for s in seeds:
        value_a, value_b = ra[s].value, rb[s].value
        assert value_a is not None and value_b is not None  # runs without a value were left out above
        diffs.append(_transform(value_a, spec) - _transform(value_b, spec))
    mean = float(np.mean(diffs))
    if len(diffs) > 1:
        std = float(np.std(diffs, ddof=1))
        half = t_quantile(len(diffs) - 1) * std / math.sqrt(len(diffs))
    else:
        std = half = float("nan")
    comparison = Comparison(a, b, optimizer, diffs, mean, std, mean - half, mean + half)
    if spec.kind != "synthetic":
        comparison.bootstrap = _bootstrap([ra[s].folder for s in seeds], [rb[s].folder for s in seeds])
    return comparison


def _correct(folder: Path) -> np.ndarray | None:
    path = folder / "test_result.json"
    if not path.is_file():
        return None
    correct = read_json(path).get("correct")
    return None if correct is None else np.asarray(correct, dtype=float)


def _bootstrap(folders_a: list[Path], folders_b: list[Path]) -> tuple[float, float, float] | None:
    from ..finetune.eval import paired_bootstrap_difference

    a = [x for x in (_correct(f) for f in folders_a) if x is not None]
    b = [x for x in (_correct(f) for f in folders_b) if x is not None]
    if len(a) < len(folders_a) or len(b) < len(folders_b):  # a run without per-example correctness
        return None
    est, low, high = paired_bootstrap_difference(np.mean(a, axis=0), np.mean(b, axis=0))
    return 100 * est, 100 * low, 100 * high


def versus_zero_shot(results: TaskResults, optimizer: str, method: str) -> tuple[float, float, float] | None:
    """Seed-averaged fine-tuned correctness minus zero-shot, paired bootstrap over examples (points)."""
    if results.zero_shot is None:
        return None
    from ..finetune.eval import paired_bootstrap_difference
    from .runner import zero_shot_dir

    zero = _correct(zero_shot_dir(_cache_of(results), results.spec))
    stats = results.cells.get((optimizer, method))
    if zero is None or stats is None or not stats.runs:
        return None
    finished = [r for r in stats.runs if not r.diverged]
    tuned = [t for t in (_correct(r.folder) for r in finished) if t is not None]
    if not tuned or len(tuned) < len(finished):  # none, or a run without per-example correctness
        return None
    est, low, high = paired_bootstrap_difference(np.mean(tuned, axis=0), zero)
    return 100 * est, 100 * low, 100 * high


def _cache_of(results: TaskResults) -> Path:
    """The cache folder, recovered from any run folder (``<cache>/<task>/<stage>/<cell>/<run>``)."""
    for stats in results.cells.values():
        for run in stats.runs:
            return run.folder.parents[3]
    raise ValueError("no finished run")


__all__ = ["CellStats", "Comparison", "Run", "TaskResults", "collect", "compare", "mean_curve", "run_curves",
           "versus_zero_shot"]
