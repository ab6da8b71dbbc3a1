"""``moelora bench``: every speed comparison, each against its baseline in the same run, as one table."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

import torch

from ..errors import ConfigError

# (comparison, target, how to read the ratio)
TARGETS = {
    "layer.speedup_vs_per_expert_loop": (">=", 5.0),
    "layer.cost_vs_dense_lora": ("<=", 1.05),  # dropout 0
    "layer_dropout.speedup_vs_per_expert_loop": (">=", 5.0),
    "layer_dropout.cost_vs_dense_lora": ("<=", 1.2),
    "layer_sparse.sparse_speedup_vs_dense": (">=", 1.0),
    "optimizer.cost_vs_torch_adamw_foreach": ("<=", 1.3),
    "optimizer.speedup_vs_per_expert_loop": (">=", 10.0),
    "optimizer.speedup_vs_peft_r80": (">=", 1.0),
    "train.step.cost_vs_peft_lora": ("<=", 1.0),
    "train.throughput.speedup_vs_plain": (">=", 1.3),
    "train.memory.ratio_vs_peft_lora": ("<=", 0.9),
    "precision.bf16.cost_vs_peft_lora": ("<=", 1.1),
    "precision.nf4.cost_vs_peft_lora": ("<=", 1.1),
    "generate.decode_b1.cost_vs_peft_lora": ("<=", 1.15),
    "generate.decode_b1.cost_vs_base": ("<=", 1.3),
    "generate.decode_b8.cost_vs_peft_lora": ("<=", 1.1),
}


def machine() -> dict:
    return {
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "processor": platform.machine(),
        "date": datetime.date.today().isoformat(),
    }


def _lookup(results: dict, dotted: str):
    node = results
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def run_benchmarks(quick: bool = False, json_out: str | None = None, only: list[str] | None = None,
                   device: str = "cpu") -> dict:
    """Run the comparisons (``only`` picks some of: layer, layer_dropout, layer_sparse, optimizer, train,
    precision, generate) and print a table. ``device="cuda"`` runs the GPU check instead (``moelora.bench.gpu_check``)."""
    if device != "cpu":
        if not device.startswith("cuda"):
            raise ConfigError(f"moelora bench --device takes cpu or cuda, got {device!r}")
        from . import gpu_check

        return gpu_check.run(quick=quick, json_out=json_out)
    from . import generate_bench, layer_bench, optim_bench, precision_bench, train_bench

    suites = {
        "layer": lambda: layer_bench.run(quick=quick),
        "layer_dropout": lambda: layer_bench.run(quick=quick, dropout=0.05),
        "layer_sparse": lambda: layer_bench.run_sparse(quick=quick),
        "optimizer": lambda: optim_bench.run(quick=quick),
        "train": lambda: train_bench.run(quick=quick),
        "precision": lambda: precision_bench.run(quick=quick),
        "generate": lambda: generate_bench.run(quick=quick),
    }
    unknown = sorted(set(only or []) - set(suites))
    if unknown:
        raise ConfigError(f"unknown benchmark(s) {unknown}; choose from {sorted(suites)}")
    results: dict = {"machine": machine(), "quick": quick}
    for name, suite in suites.items():
        if only and name not in only:
            continue
        print(f"running {name} ...", flush=True)
        results[name] = suite()
    print(format_table(results))
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(results, indent=2) + "\n")
    return results


def format_table(results: dict) -> str:
    lines = ["| comparison | ratio | by round: quartiles | target | met |", "|---|---:|:---:|---:|:---:|"]
    for key, (op, target) in TARGETS.items():
        value = _lookup(results, key)
        if value is None:
            continue
        met = value >= target if op == ">=" else value <= target
        spread = _lookup(results, key + "_by_round")  # the per-round ratios' quartiles, where recorded
        rounds = f"{spread['q1']:.2f}–{spread['q3']:.2f}" if isinstance(spread, dict) else ""
        lines.append(f"| {key} | {value:.2f} | {rounds} | {op} {target:g} | {'yes' if met else 'no'} |")
    m = results["machine"]
    lines.append("")
    lines.append(f"{m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), {m['date']}")
    return "\n".join(lines)
