"""Do the section 5 gate weights show up as per-expert learning speed? (synthetic task, scaled GD)

Under scaled GD with per-token gates ``g_it``, expert ``i``'s map moves towards its target at a rate
proportional (first order, experts decoupled) to

    per-expert Riemannian, gate power p = 1:    E_t[g_it^2]           (w(g) = g^2)
    + engineering strategy, p = 0.5:           E_t[g_it^1.5]         (w(g) = g^1.5)
    gate-rescaled preconditioner, p = 1:       E_t[g_it^2] / c_i^2 = 1   (w(g) = 1)

(the gradient carries ``g^p`` and the function change one more ``g``; the gate-rescaled preconditioner
divides by ``c_i^2 = E_t[g_it^2]``). The check trains the three variants at one common learning rate,
measures each expert's speed as ``-ln(err_i(T)) / T`` (``err_i`` the relative error of its map after ``T``
steps) and fits the slope of ``ln speed`` against ``ln E[g^2]`` across experts. Predicted slopes: 1,
the slope of ``ln E[g^1.5]`` against ``ln E[g^2]`` over the same experts (computed from the gates), and 0.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .synthetic import train_synthetic

VARIANTS = (  # key, label, preconditioner, gate power, gate moment predicting the speed (None = constant)
    ("riem", "per-expert Riemannian (w = g^2)", "riemannian", 1.0, "g^2"),
    ("riem_p05", "+ engineering strategy (w = g^1.5)", "riemannian", 0.5, "g^1.5"),
    ("gate_rescaled", "gate-rescaled (w = 1)", "gate_rescaled", 1.0, None),
)
MIN_SELECTED = 0.1  # experts routed for fewer tokens than this have too little data to time


def expert_speeds(events: list[dict[str, Any]], at_step: int) -> list[float]:
    """Per expert, ``-ln(err(T)) / T`` at the first evaluation at or after ``at_step``."""
    evals = [e for e in events if e.get("split") == "validation" and e["step"] >= at_step]
    if not evals:
        raise ValueError(f"no evaluation at or after step {at_step}")
    first = evals[0]
    return [-math.log(max(err, 1e-12)) / first["step"] for err in first["expert_errors"]]


def fit_slope(x: list[float], y: list[float]) -> float:
    """Least-squares slope of ``ln y`` against ``ln x`` (points with ``y <= 0`` are dropped)."""
    pts = [(math.log(a), math.log(b)) for a, b in zip(x, y) if a > 0 and b > 0]
    if len(pts) < 2:
        return float("nan")
    xs, ys = np.array(pts).T
    return float(np.polyfit(xs, ys, 1)[0])


def run_gate_weight_check(seeds: tuple[int, ...], lr: float = 0.1, steps: int = 40, at_step: int = 20,
                          batch_size: int = 128) -> dict[str, Any]:
    """Train the three variants with ``RiemannianSGD`` at learning rate ``lr`` for each seed and return the
    per-expert speeds, the gate moments, the fitted and the predicted slopes."""
    out: dict[str, Any] = {"lr": lr, "steps": steps, "at_step": at_step, "seeds": list(seeds), "variants": {}}
    moments = None
    for key, label, preconditioner, power, moment in VARIANTS:
        runs, finals = [], []
        for seed in seeds:
            result = train_synthetic(optimizer="sgd", preconditioner=preconditioner, gate_power=power,
                                     single_lora=False, lr=lr, seed=seed, steps=steps, batch_size=batch_size,
                                     eval_every=5, evaluate_test=False)
            moments = result["gate_moments"]
            runs.append(expert_speeds(result["events"], at_step))
            finals.append(result["validation"])
        out["variants"][key] = {"label": label, "moment": moment, "speeds": runs, "final_validation": finals}
    assert moments is not None
    keep = [i for i, s in enumerate(moments["selected"]) if s >= MIN_SELECTED]
    g2 = [moments["g^2"][i] for i in keep]
    out["moments"] = moments
    out["experts"] = keep
    predicted = {"g^2": 1.0, "g^1.5": fit_slope(g2, [moments["g^1.5"][i] for i in keep]), None: 0.0}
    for entry in out["variants"].values():
        slopes = [fit_slope(g2, [speeds[i] for i in keep]) for speeds in entry["speeds"]]
        entry["slopes"] = slopes
        entry["slope_mean"] = float(np.mean(slopes))
        entry["slope_std"] = float(np.std(slopes, ddof=1)) if len(slopes) > 1 else float("nan")
        entry["predicted_slope"] = predicted[entry["moment"]]
        mean_speed = np.mean(np.array(entry["speeds"])[:, keep], axis=0)
        entry["mean_speed"] = [float(v) for v in mean_speed]
    # Same constants for every variant (only the gate factor differs), so the speed ratio to per-expert
    # Riemannian is predicted in absolute terms: E[g^1.5] / E[g^2], and 1 / E[g^2] for gate-rescaled.
    top = keep[0]
    base = out["variants"]["riem"]["mean_speed"][0]
    for entry in out["variants"].values():
        moment = entry["moment"]
        predicted_ratio = (moments[moment][top] if moment else 1.0) / moments["g^2"][top]
        entry["top_expert_ratio"] = {"expert": top, "predicted": predicted_ratio,
                                     "measured": entry["mean_speed"][0] / base if base > 0 else float("nan")}
    return out
