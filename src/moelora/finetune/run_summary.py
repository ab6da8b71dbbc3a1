"""The end of a run: ``summary.json``, ``summary.md`` and the plots, from ``metrics.jsonl`` and evaluations."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..atomic import write_text_atomic
from .eval import EvalResult, paired_bootstrap_difference
from .run_config import RunConfig


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _fmt(result: dict | None) -> str:
    if not result:
        return "n/a"
    low, high = result.get("interval") or (math.nan, math.nan)
    if result.get("metric", "") not in ("accuracy", "exact_match", "") and "metric" in result:
        return f"{result['value']:.3f} (95 % CI {low:.3f} – {high:.3f}, n = {result.get('n')})"
    return f"{100 * result['value']:.1f} % (95 % CI {100 * low:.1f} – {100 * high:.1f}, n = {result.get('n')})"


def write_report(run_dir: Path, config: RunConfig, runtime, *, zero_shot: EvalResult | None, final: EvalResult,
                 train_time_s: float, last_loss: float, router: dict, resumed_from: int | None,
                 sharding: dict[str, int] | None = None) -> dict[str, Any]:
    """Write the summary files and plots of a finished run; returns the summary (``summary.json``).

    The evaluations are used in their JSON form, as ``summary.json`` stores them.
    """
    return _write_summary(run_dir, config, runtime, zero_shot.to_dict() if zero_shot is not None else None,
                          final.to_dict(), train_time_s, last_loss, router, resumed_from, sharding)


def _write_summary(run_dir: Path, config: RunConfig, runtime, zero_shot: dict | None, final: dict,
                   train_time_s: float, last_loss: float, router: dict, resumed_from: int | None,
                   sharding: dict[str, int] | None) -> dict[str, Any]:
    difference: dict[str, Any] | None = None
    if zero_shot and zero_shot.get("correct") and final.get("correct"):
        difference = _paired(final["correct"], zero_shot["correct"], config.train.seed)
    # Generative tasks: the paired difference of every further per-example metric (contains, token F1).
    differences = {
        name: _paired(values, zero_shot["per_example"][name], config.train.seed)
        for name, values in (final.get("per_example") or {}).items()
        if zero_shot and name in (zero_shot.get("per_example") or {})
    }
    metrics = read_metrics(run_dir)
    train_events = [m for m in metrics if "loss" in m]
    throughput = [m["tokens_per_s"] for m in train_events if "tokens_per_s" in m]
    summary: dict[str, Any] = {
        "task": runtime.task.name,
        "model": config.model.name,
        "method": {
            "adapter": f"MoE-LoRA E={config.adapter.num_experts} top_k={config.adapter.top_k} r={config.adapter.rank}",
            "gate_backward_power": config.adapter.gate_backward_power,
            "optimizer": config.optim.name,
            "preconditioner": config.optim.preconditioner,
            "lr": config.optim.lr,
        },
        "steps": config.train.steps,
        "batch_size": config.train.batch_size,
        "metric": final.get("metric"),
        "zero_shot": _strip(zero_shot),
        "fine_tuned": _strip(final),
        "difference": difference,
        "differences": differences or None,
        "final_train_loss": last_loss,
        "train_time_s": train_time_s,
        "median_tokens_per_s": sorted(throughput)[len(throughput) // 2] if throughput else None,
        "resumed_from_step": resumed_from,
        "split_sizes": runtime.task.sizes(),
        "router_by_tower": router_by_tower(router),
        "skipped_too_long": getattr(runtime, "skipped", 0),
        "sharding": sharding,
    }
    write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    lines = [
        f"# Run summary: {summary['task']} / {summary['model']}",
        "",
        f"- method: {summary['method']['adapter']}, gate power {config.adapter.gate_backward_power:g}, "
        f"{config.optim.name} with preconditioner `{config.optim.preconditioner}`, lr {config.optim.lr:g}",
        f"- {config.train.steps} steps of {config.train.batch_size} examples; training took {train_time_s:.0f} s",
        f"- held-out {final.get('metric')}: zero-shot {_fmt(zero_shot)}; fine-tuned {_fmt(final)}",
    ]
    if difference:
        lines.append(
            f"- difference (paired bootstrap): {100 * difference['value']:+.1f} points, 95 % CI "
            f"{100 * difference['interval'][0]:+.1f} to {100 * difference['interval'][1]:+.1f}"
        )
    for name, diff in differences.items():
        lines.append(
            f"- {name}: zero-shot {_fmt(_metric(zero_shot, name))}; fine-tuned {_fmt(_metric(final, name))}; "
            f"difference {100 * diff['value']:+.1f} points, 95 % CI {100 * diff['interval'][0]:+.1f} to "
            f"{100 * diff['interval'][1]:+.1f}"
        )
    for tower, stats in (summary["router_by_tower"] or {}).items():
        lines.append(f"- routers of the {tower} tower ({stats['layers']} layers): mean gate entropy "
                     f"{stats['mean_gate_entropy']:.3f} nats, most loaded expert {100 * stats['mean_max_load']:.1f} %")
    if "loss" in final.get("metrics", {}):
        before = (zero_shot or {}).get("metrics", {})
        after = final["metrics"]
        was = f"zero-shot {before['loss']:.3f} (perplexity {before['perplexity']:.2f}); " if "loss" in before else ""
        lines.append(f"- held-out loss per assistant token: {was}fine-tuned {after['loss']:.3f} "
                     f"(perplexity {after['perplexity']:.2f})")
    write_text_atomic(run_dir / "summary.md", "\n".join(lines) + "\n")
    plot_run(run_dir, metrics, zero_shot, final, router, config.train.steps)
    return summary


_VISION_PARTS = ("vision_tower", "vision_model", "visual")


def router_by_tower(router: dict) -> dict[str, dict[str, float]] | None:
    """For a vision-language model, the routers of each tower (``vision``, ``language``): layer count, mean
    gate entropy and mean share of the most loaded expert, from ``router_stats``; None for one tower."""
    groups: dict[str, list[dict]] = {}
    for name, stats in router.items():
        tower = "vision" if any(f".{part}." in f".{name}." for part in _VISION_PARTS) else "language"
        groups.setdefault(tower, []).append(stats)
    if len(groups) < 2:
        return None
    return {tower: {"layers": len(stats), "mean_gate_entropy": sum(s["gate_entropy"] for s in stats) / len(stats),
                    "mean_max_load": sum(max(s["expert_load"]) for s in stats) / len(stats)}
            for tower, stats in groups.items()}


def _paired(a: list, b: list, seed: int) -> dict[str, Any]:
    diff, low, high = paired_bootstrap_difference(a, b, seed=seed)
    return {"value": diff, "interval": [low, high], "excludes_zero": bool(low > 0 or high < 0)}


def _metric(result: dict | None, name: str) -> dict | None:
    """A further metric of an evaluation in the form ``_fmt`` reads (value, interval, n)."""
    if not result or name not in result.get("metrics", {}):
        return None
    return {"value": result["metrics"][name], "interval": (result.get("intervals") or {}).get(name),
            "n": result.get("n")}


def _strip(result: dict | None) -> dict | None:
    if result is None:
        return None
    return {k: v for k, v in result.items() if k not in ("correct", "predictions", "per_example")}


def plot_run(run_dir: Path, metrics: list[dict], zero_shot: dict | None, final: dict, router: dict, steps: int) -> None:
    """``loss.png``, ``accuracy.png`` and ``expert_load.png`` (expert load per layer, last forward)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [m for m in metrics if "loss" in m]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([m["step"] for m in train], [m["loss"] for m in train], marker=".")
    ax.set(xlabel="optimizer step", ylabel="training loss (answer tokens)", title="Training loss")
    ax.grid(alpha=0.3)
    _save(fig, run_dir / "loss.png")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    validation = [m for m in metrics if m.get("split") == "validation"]
    if validation:
        ax.plot([m["step"] for m in validation], [m["value"] for m in validation], marker="o", label="validation")
    points = [(0, zero_shot, "zero-shot (test)"), (steps, final, "fine-tuned (test)")]
    for step, result, label in points:
        if result:
            low, high = result["interval"]
            below, above = max(0.0, result["value"] - low), max(0.0, high - result["value"])
            ax.errorbar([step], [result["value"]], yerr=[[below], [above]],
                        fmt="s", capsize=4, label=label)
    ax.set(xlabel="optimizer step", ylabel=final.get("metric", "metric"), title="Held-out metric")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, run_dir / "accuracy.png")

    if router:
        names = list(router)
        loads = [router[n]["expert_load"] for n in names]
        fig, ax = plt.subplots(figsize=(7, min(9.0, max(2.5, 0.06 * len(names) + 1.5))))
        image = ax.imshow(loads, aspect="auto", cmap="viridis")
        ax.set(xlabel="expert", ylabel="layer", title="Expert load (share of token assignments, last batch)")
        step = max(1, len(names) // 12)
        ax.set_yticks(range(0, len(names), step))
        ax.set_yticklabels([_short(n) for n in names[::step]], fontsize=6)
        fig.colorbar(image, ax=ax)
        _save(fig, run_dir / "expert_load.png")


def _short(name: str) -> str:
    parts = name.split(".")
    digits = [p for p in parts if p.isdigit()]
    return f"{digits[0] if digits else ''}.{parts[-1]}"


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
