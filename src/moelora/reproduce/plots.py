"""Convergence figures in the style of the paper: training loss and held-out metric against optimizer
steps, one column per optimizer, one line per method (mean over seeds, band = min..max over seeds)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .aggregate import TaskResults, mean_curve, run_curves

COLORS = {"lora": "tab:gray", "moe": "tab:blue", "riem": "tab:orange", "riem_p05": "tab:red",
          "gate_rescaled": "tab:green", "plain_p05": "tab:purple"}
OPT_TITLES = {"sgd": "scaled GD (SGD)", "adamw": "scaled AdamW"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    plt = _pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def plot_task(results: TaskResults, path: Path) -> bool:
    """Write the figure of one task; ``False`` (nothing written) when no run has finished."""
    spec = results.spec
    optimizers = [opt for opt in ("sgd", "adamw") if any(
        results.cells[(opt, m)].runs for m in spec.rows.get(opt, ()))]
    if not optimizers:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(2, len(optimizers), figsize=(5.2 * len(optimizers), 7), squeeze=False)
    synthetic = spec.kind == "synthetic"
    smooth = 10 if synthetic else 5
    for col, opt in enumerate(optimizers):
        top, bottom = axes[0][col], axes[1][col]
        for method in spec.rows[opt]:
            stats = results.cells[(opt, method)]
            runs = [r for r in stats.runs if not r.diverged]
            if not runs:
                continue
            curves = [run_curves(r.folder) for r in runs]
            label = f"{method} (lr {stats.lr:g}, {len(runs)} seeds)"
            steps, mean, low, high = mean_curve([c[0] for c in curves], smooth=smooth)
            if len(steps):
                top.plot(steps, mean, color=COLORS[method], label=label, lw=1.4)
                top.fill_between(steps, low, high, color=COLORS[method], alpha=0.15)
            steps, mean, low, high = mean_curve([c[1] for c in curves])
            if len(steps):
                values = mean if synthetic else 100 * mean
                bottom.plot(steps, values, color=COLORS[method], marker="o", ms=3, lw=1.4, label=label)
                lo, hi = (low, high) if synthetic else (100 * low, 100 * high)
                bottom.fill_between(steps, lo, hi, color=COLORS[method], alpha=0.15)
        if results.zero_shot and not synthetic:
            bottom.axhline(100 * results.zero_shot["validation"], color="black", ls=":", lw=1,
                           label="zero-shot")
        top.set(title=f"{OPT_TITLES[opt]}: training loss", xlabel="optimizer step",
                ylabel="relative MSE (training batch)" if synthetic else "training loss (answer / label)")
        bottom.set(title=f"{OPT_TITLES[opt]}: held-out (validation)", xlabel="optimizer step",
                   ylabel="relative MSE" if synthetic else "accuracy (%)")
        if synthetic:
            top.set_yscale("log")
            bottom.set_yscale("log")
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
        bottom.legend(fontsize=7)
    fig.suptitle(spec.title, fontsize=10)
    _save(fig, path)
    return True


def plot_gate_weights(check: dict[str, Any], path: Path) -> None:
    """Per-expert learning speed against the expert's mean squared gate, log-log, one line per variant."""
    plt = _pyplot()
    keep = check["experts"]
    g2 = [check["moments"]["g^2"][i] for i in keep]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for key, entry in check["variants"].items():
        speeds = entry["mean_speed"]
        pts = [(x, y) for x, y in zip(g2, speeds) if y > 0]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=COLORS[key],
                label=f"{key}: slope {entry['slope_mean']:.2f} (predicted {entry['predicted_slope']:.2f})")
    ax.set(xscale="log", yscale="log", xlabel="E[g^2] of the expert",
           ylabel=f"speed -ln(err)/T at T={check['at_step']}",
           title=f"Per-expert learning speed, scaled GD lr {check['lr']:g}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    _save(fig, path)


__all__ = ["plot_gate_weights", "plot_task"]
