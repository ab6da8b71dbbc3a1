"""Interleaved timing: run candidates A B A B ... so that machine noise hits all of them alike."""

from __future__ import annotations

import gc
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

    def as_dict(self) -> dict[str, dict[str, float]]:
        return {
            name: {"median_s": self.median(name), "min_s": min(s), "repeats": len(s)}
            for name, s in self.samples.items()
        }


def time_interleaved(candidates: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 2) -> Timing:
    """Time every candidate ``repeats`` times, interleaved (A B C A B C ...), after ``warmup`` rounds."""
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    timing = Timing({name: [] for name in candidates})
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            for name, fn in candidates.items():
                start = time.perf_counter()
                fn()
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                timing.samples[name].append(time.perf_counter() - start)
    finally:
        if gc_was_enabled:
            gc.enable()
    return timing
