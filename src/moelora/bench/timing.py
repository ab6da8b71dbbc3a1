"""Interleaved timing: run candidates in rounds (A B C, C A B, ...) so that machine noise hits all of them alike.

Each round runs every candidate once, in an order shuffled afresh (from a fixed seed, so a run is
repeatable): with a fixed order each candidate would always follow the same one, and on a CPU what ran
just before (which buffers the allocator hands back, whether they page-fault, what is in the caches)
moves a candidate's time by a few percent, always in the same direction.
"""

from __future__ import annotations

import gc
import random
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch


@dataclass
class Timing:
    """Per-candidate wall-clock samples (seconds) of one interleaved comparison."""

    samples: dict[str, list[float]] = field(default_factory=dict)

    def median(self, name: str) -> float:
        return statistics.median(self.samples[name])

    def ratio(self, name: str, baseline: str) -> float:
        """``median(name) / median(baseline)``: below 1 means ``name`` is faster."""
        return self.median(name) / self.median(baseline)

    def round_ratios(self, name: str, baseline: str) -> list[float]:
        """``name``'s time over ``baseline``'s in each round: the two ran seconds apart, so a slow spell of
        the machine mostly cancels in each ratio."""
        return [a / b for a, b in zip(self.samples[name], self.samples[baseline], strict=True)]

    def ratio_spread(self, name: str, baseline: str) -> dict[str, float]:
        """Quartiles of ``round_ratios``: how far one run's ratio moves from round to round."""
        ratios = self.round_ratios(name, baseline)
        if len(ratios) < 2:
            return {"q1": ratios[0], "median": ratios[0], "q3": ratios[0]}
        q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
        return {"q1": q1, "median": median, "q3": q3}

    def as_dict(self) -> dict[str, dict[str, float]]:
        return {
            name: {"median_s": self.median(name), "min_s": min(s), "repeats": len(s)}
            for name, s in self.samples.items()
        }


def time_interleaved(candidates: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 2,
                     seed: int = 0) -> Timing:
    """Time every candidate ``repeats`` times in rounds, each round in a freshly shuffled order (from
    ``seed``), after ``warmup`` rounds."""
    order = random.Random(seed)
    names = list(candidates)
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    timing = Timing({name: [] for name in candidates})
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            order.shuffle(names)
            for name in names:
                start = time.perf_counter()
                candidates[name]()
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                timing.samples[name].append(time.perf_counter() - start)
    finally:
        if gc_was_enabled:
            gc.enable()
    return timing
