"""Write ``docs/results.md``: the exact command, what ran, the learning rates chosen, tables (mean ± std over
seeds and every run), intervals, the figures, and a plain statement of which claims reproduce."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from ..atomic import write_text_atomic
from .aggregate import Comparison, TaskResults, compare, t_quantile, versus_zero_shot
from .grid import METHODS, Grid

# (a, b, what the paper or the method note claims, expected sign of a - b in "better" terms)
CLAIMS = (
    ("riem_p05", "riem", "the paper's method (engineering strategy, gate power 0.5) beats per-expert Riemannian"),
    ("gate_rescaled", "riem", "the gate-rescaled preconditioner (derived) beats per-expert Riemannian"),
    ("plain_p05", "moe", "ablation: gate power 0.5 helps a plain optimizer"),
    ("riem", "moe", "per-expert Riemannian preconditioning beats plain MoE-LoRA"),
    ("moe", "lora", "MoE-LoRA beats a single LoRA of the same size"),
)


def _pct(value: float | None) -> str:
    return "–" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def _fmt_value(spec, value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.2e}" if spec.kind == "synthetic" else f"{100 * value:.1f}"


def _mean_std(spec, stats) -> str:
    if not stats.runs:
        return "not run"
    values = stats.values
    diverged = sum(r.diverged for r in stats.runs)
    extra = f", {diverged} diverged" if diverged else ""
    if not values:
        return f"diverged ({len(stats.runs)})"
    if spec.kind == "synthetic":
        text = f"{stats.mean:.2e} ± {stats.std:.1e}" if len(values) > 1 else f"{values[0]:.2e}"
    else:
        text = f"{100 * stats.mean:.1f} ± {100 * stats.std:.1f}" if len(values) > 1 else f"{100 * values[0]:.1f}"
    return f"{text} (n={len(values)}{extra})"


def _unit(spec) -> str:
    return "log10 ratio of relative MSE" if spec.kind == "synthetic" else "accuracy points"


def _comparison_row(spec, c: Comparison, claim: str) -> str:
    verdict = c.verdict(spec.higher_is_better)
    statement = {"a better": "**reproduces**", "b better": "**reversed**",
                 "no clear difference": "does not reproduce (no difference beyond the noise)",
                 "too few runs": "undecided (fewer than 2 paired seeds)"}[verdict]
    ci = "–" if math.isnan(c.low) else f"[{c.low:+.2f}, {c.high:+.2f}]"
    boot = "" if c.bootstrap is None else f"{c.bootstrap[0]:+.1f} [{c.bootstrap[1]:+.1f}, {c.bootstrap[2]:+.1f}]"
    per_seed = ", ".join(f"{d:+.2f}" for d in c.per_seed)
    std = "–" if math.isnan(c.std) else f"{c.std:.2f}"
    return (f"| {spec.key} | {c.optimizer} | {claim} (`{c.a}` − `{c.b}`) | {c.mean:+.2f} ± {std} | {ci} | "
            f"{boot or 'n/a'} | {per_seed} | {statement} |")


def claims_table(results: dict[str, TaskResults]) -> list[str]:
    lines = [
        "| task | optimizer | claim (a − b) | mean ± std over seeds | 95 % t-interval over seeds | "
        "paired bootstrap over held-out examples (points) | per seed | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for _key, res in results.items():
        for opt in ("sgd", "adamw"):
            for a, b, claim in CLAIMS:
                c = compare(res, opt, a, b)
                if c is not None:
                    lines.append(_comparison_row(res.spec, c, claim))
    return lines


def _sweep_table(res: TaskResults) -> list[str]:
    spec = res.spec
    lines = ["| optimizer | method | candidates: final validation value (mean over sweep seeds) | chosen lr |", "|---|---|---|---|"]
    for (opt, method), stats in res.cells.items():
        if not stats.sweep:
            lines.append(f"| {opt} | {method} | (sweep not finished) | – |")
            continue
        values = stats.sweep["values"]
        cells = ", ".join(f"{lr:g}: {'diverged' if v is None else _fmt_value(spec, v)}" for lr, v in sorted(values.items()))
        edge = " (edge of the grid)" if stats.sweep.get("edge") else ""
        lines.append(f"| {opt} | {method} | {cells} | **{stats.lr:g}**{edge} |")
    return lines


def _main_table(res: TaskResults) -> list[str]:
    spec = res.spec
    opts = [o for o in ("sgd", "adamw") if o in spec.rows]
    head = "| method | " + " | ".join(f"{o}: mean ± std" for o in opts) + " |"
    lines = [head, "|---|" + "---|" * len(opts)]
    for key in METHODS:
        if not any(key in spec.rows[o] for o in opts):
            continue
        cells = []
        for o in opts:
            stats = res.cells.get((o, key))
            cells.append("(row cut)" if stats is None else _mean_std(spec, stats))
        lines.append(f"| {key}: {METHODS[key].label} | " + " | ".join(cells) + " |")
    return lines


def _every_run(res: TaskResults) -> list[str]:
    spec = res.spec
    ci_head = "" if spec.kind == "synthetic" else " 95 % Wilson interval (n) |"
    lines = [f"| optimizer | method | lr | seed | held-out {spec.metric} |{ci_head} final training loss | time (s) |",
             "|---|---|---|---|---|" + ("---|" if ci_head else "") + "---|---|"]
    for (opt, method), stats in res.cells.items():
        for run in stats.runs:
            s = run.summary
            value = "diverged" if run.diverged else _fmt_value(spec, run.value)
            ci = ""
            if ci_head:
                interval = s.get("test_interval")
                ci = f" [{_pct(interval[0])}, {_pct(interval[1])}] ({s.get('test_n')}) |" if interval else " – |"
            loss = s.get("final_train_loss")
            loss_text = "–" if loss is None else f"{loss:.4f}"
            lines.append(f"| {opt} | {method} | {run.lr:g} | {run.seed} | {value} |{ci} {loss_text} | "
                         f"{s.get('wall_time_s', 0):.0f} |")
    return lines


def _zero_shot_lines(res: TaskResults) -> list[str]:
    if res.zero_shot is None:
        return []
    z = res.zero_shot
    lines = [f"Zero-shot (base model, no adapter): held-out accuracy {_pct(z['test'])} % "
             f"(95 % Wilson [{_pct(z['test_interval'][0])}, {_pct(z['test_interval'][1])}], n = {z['test_n']}); "
             f"validation {_pct(z['validation'])} % (n = {z['validation_n']}).", ""]
    rows = []
    for (opt, method), _stats in res.cells.items():
        diff = versus_zero_shot(res, opt, method)
        if diff is not None:
            rows.append(f"| {opt} | {method} | {diff[0]:+.1f} | [{diff[1]:+.1f}, {diff[2]:+.1f}] | "
                        f"{'yes' if diff[1] > 0 else ('below' if diff[2] < 0 else 'no')} |")
    if rows:
        lines += ["Fine-tuned (seed-averaged per-example correctness) minus zero-shot, paired bootstrap over the "
                  "held-out examples:", "",
                  "| optimizer | method | difference (points) | 95 % interval | moved above zero-shot? |",
                  "|---|---|---|---|---|", *rows, ""]
    return lines


def _settings(res: TaskResults) -> str:
    spec = res.spec
    if spec.kind == "synthetic":
        from .synthetic import SyntheticSetup

        s = SyntheticSetup()
        return (f"d_in = {s.d_in} (one constant feature), d_out = {s.d_out}, E = {s.num_experts}, top_k = {s.top_k}, "
                f"r = {s.rank}, alpha = {s.alpha:g}; router = the teacher's, frozen; {spec.steps} steps of "
                f"{spec.batch_size} fresh inputs, constant learning rate; held-out: {s.n_validation} validation / "
                f"{s.n_test} test inputs; metric: relative MSE (lower is better).")
    o = spec.overrides
    return (f"model `{o.get('model.name')}`, task `{o.get('data.task')}` {o.get('data.options', '')}; adapter "
            f"E = {o.get('adapter.num_experts')}, top_k = {o.get('adapter.top_k')}, r = {o.get('adapter.rank')}, "
            f"alpha = {o.get('adapter.alpha'):g}, dropout 0, on {', '.join(o.get('adapter.target_modules', []))} "
            f"(single LoRA: rank {o['adapter.num_experts'] * o['adapter.rank']}, same alpha/r); "
            f"{spec.steps} steps of {spec.batch_size} examples, 3 warm-up steps then linear decay to 0.1x; router lr = "
            f"lr/1000 (SGD) or lr/330 (AdamW); held-out accuracy on the first {spec.test_examples} test examples; "
            f"curve: {spec.curve_examples} validation examples every {spec.eval_every} steps; sweep: final "
            f"accuracy on {spec.sweep_examples} validation examples.")


def _gate_weight_lines(check: dict[str, Any] | None) -> list[str]:
    if not check:
        return ["The per-expert gate-weight check has not run yet.", ""]
    m = check["moments"]
    lines = [
        f"Scaled GD (`RiemannianSGD`, no momentum) at one common learning rate {check['lr']:g}, {len(check['seeds'])} "
        f"seeds, speed of expert i = −ln(err_i(T))/T at T = {check['at_step']} steps (err_i = relative error of its "
        f"map s·B_i·A_i). Experts routed for at least 10 % of the inputs: {check['experts']}; their E[g²]: "
        + ", ".join(f"{m['g^2'][i]:.3f}" for i in check["experts"]) + ".",
        "",
        f"| variant | predicted slope of ln speed vs ln E[g²] | measured slope (mean ± std over seeds) | mean speed "
        f"per expert | speed of the most-routed expert relative to per-expert Riemannian: predicted / measured | "
        f"held-out relative MSE after {check['steps']} steps (mean over seeds) |",
        "|---|---|---|---|---|---|",
    ]
    for _key, e in check["variants"].items():
        finals = e.get("final_validation") or []
        final = f"{sum(finals) / len(finals):.2e}" if finals else "–"
        lines.append(f"| {e['label']} | {e['predicted_slope']:.2f} | {e['slope_mean']:.2f} ± {e['slope_std']:.2f} | "
                     + ", ".join(f"{v:.3f}" for v in e["mean_speed"]) + f" | {_ratio(e)} | {final} |")
    lines += ["", gate_weight_verdict(check), ""]
    return lines


def _ratio(entry: dict[str, Any]) -> str:
    r = entry.get("top_expert_ratio")
    return "–" if not r else f"{r['predicted']:.2f} / {r['measured']:.2f}"


def gate_weight_verdict(check: dict[str, Any]) -> str:
    """A plain sentence: does the measured ordering (and size) of the slopes follow the prediction?"""
    v = check["variants"]
    order = sorted(v, key=lambda k: -v[k]["slope_mean"])
    predicted = sorted(v, key=lambda k: -v[k]["predicted_slope"])
    n = len(check["seeds"])
    within = []
    for key, e in v.items():
        half = t_quantile(n - 1) * e["slope_std"] / math.sqrt(n) if n > 1 else float("nan")
        if abs(e["slope_mean"] - e["predicted_slope"]) <= half:
            within.append(key)
    text = ("The measured slopes are ordered as predicted (" if order == predicted else
            "The measured slopes are NOT ordered as predicted (") + " > ".join(order) + ")"
    text += ("; the predicted slope lies inside the 95 % t-interval for: " + (", ".join(within) or "none")
             + "; outside for: " + (", ".join(k for k in v if k not in within) or "none") + ".")
    return text


def _run_times(res: TaskResults) -> tuple[float | None, float | None]:
    """Mean measured wall time of a finished (main, sweep) run of the task."""
    main = [r.summary.get("wall_time_s") or 0.0 for c in res.cells.values() for r in c.runs]
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return mean(main), mean(res.sweep_times)


def _status_table(results: dict[str, TaskResults]) -> list[str]:
    lines = ["| task | reported runs finished | sweep runs finished | mean time per run (s), main / sweep | "
             "projected time left, one single-threaded worker |", "|---|---|---|---|---|"]
    for key, res in results.items():
        main_t, sweep_t = _run_times(res)
        left = None
        if main_t is not None and sweep_t is not None:
            left = (res.expected_runs - res.finished_runs) * main_t + (res.sweep_expected - res.sweep_finished) * sweep_t
        fmt = lambda t: "–" if t is None else f"{t:.0f}"  # noqa: E731
        left_text = "done" if res.finished_runs >= res.expected_runs and res.sweep_finished >= res.sweep_expected else (
            "not measured yet" if left is None else f"{left / 60:.0f} min")
        lines.append(f"| {key} | {res.finished_runs} / {res.expected_runs} | {res.sweep_finished} / "
                     f"{res.sweep_expected} | {fmt(main_t)} / {fmt(sweep_t)} | {left_text} |")
    return [*lines, ""]


def _claims_summary(results: dict[str, TaskResults]) -> list[str]:
    """Plain statements: which comparisons reproduce, which do not, which are reversed."""
    groups: dict[str, list[str]] = {"reproduces": [], "does not reproduce": [], "reversed": []}
    for key, res in results.items():
        for opt in ("sgd", "adamw"):
            for a, b, claim in CLAIMS:
                c = compare(res, opt, a, b)
                if c is None or c.n < 2:
                    continue
                verdict = c.verdict(res.spec.higher_is_better)
                unit = "log10 MSE ratio" if res.spec.kind == "synthetic" else "points"
                item = f"{claim} — {key}, {opt}: {c.mean:+.2f} {unit} [{c.low:+.2f}, {c.high:+.2f}], {c.n} seeds"
                groups[{"a better": "reproduces", "b better": "reversed"}.get(verdict, "does not reproduce")].append(item)
    lines = ["## In plain words", ""]
    for title, items in groups.items():
        lines.append(f"**{title.capitalize()}** ({len(items)}):")
        lines.append("")
        lines += [f"- {i}" for i in items] or ["- none"]
        lines.append("")
    return lines


def write_results(grid: Grid, results: dict[str, TaskResults], path: Path, command: str, cache: Path,
                  gate_check: dict[str, Any] | None, figures: dict[str, str]) -> None:
    """Write the Markdown results page to ``path`` (atomically)."""
    total = sum(r.expected_runs for r in results.values())
    done = sum(r.finished_runs for r in results.values())
    sweep_total = sum(r.sweep_expected for r in results.values())
    sweep_done = sum(r.sweep_finished for r in results.values())
    lines = [
        "# Reproduction: the paper's comparison on data that installs here",
        "",
        "Generated by `moelora reproduce` from the runs cached in its cache folder; every number below was "
        "measured with the command shown, on a 2-core CPU.",
        "",
        "```bash",
        command,
        "```",
        "",
        "(`python -m moelora.reproduce` takes the same arguments. `--jobs 2` runs two single-threaded runs at once, "
        "which is how the full grid fits in about 3 hours of an idle 2-core CPU; `--time-limit MINUTES` stops "
        "starting new runs, so the grid can be spread over several sittings.)",
        "",
        f"Status: {done} of {total} reported runs and {sweep_done} of {sweep_total} learning-rate sweep runs "
        f"finished ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}). Runs are cached: the same command "
        "continues the grid where it stopped and rewrites this page.",
        "",
    ]
    lines += _status_table(results)
    missing = [k for k, r in results.items() if r.finished_runs < r.expected_runs or r.sweep_finished < r.sweep_expected]
    if missing:
        lines += [f"**Not finished yet:** {', '.join(f'`{k}`' for k in missing)}. Continue with the same command "
                  "(finished runs are skipped):", "", "```bash", command, "```", ""]
    lines += _claims_summary(results)
    lines += [
        "## Methods (rows)",
        "",
        *[f"- `{k}`: {m.label} — preconditioner `{m.preconditioner}`, backward gate power {m.gate_power:g}"
          + (", one expert of rank E·r" if m.single_lora else "") for k, m in METHODS.items()],
        "",
        "Each (task, optimizer, method) gets its own learning rate from the same candidate list (sweep runs with "
        "their own seeds — two on the synthetic task, one on real tasks — judged by the final validation value), "
        "then the reported runs use seeds "
        f"{', '.join(map(str, grid.seeds))}. Differences are paired by seed.",
        "",
        "## Deviations from the paper's protocol (method.md section 7)",
        "",
        "- Budgets fit a 2-core CPU: 40 (SmolLM2) or 120 (MiniLM) optimizer steps of 8 or 16 examples instead of "
        "2000 steps of 80; fp32 base models of 135 M / 23 M parameters instead of 4-bit Llama-3.2-3B; dropout 0 "
        "(the fused path); the adapter itself is the paper's (E = 20, top_k = 10, r = 4, alpha = 16, q/k/v/o).",
        "- The paper uses one learning rate for its baseline and its method; here every method gets its own from "
        "the same candidates (a method cannot win only because the shared rate suits it). The real-task sweeps use "
        "one seed; the synthetic section 5 check below also compares the variants at one common rate.",
        "- Router learning rate = expert rate / 1000 (SGD) or / 330 (AdamW), the paper's ratios; linear decay to "
        "0.1x as in the paper, with 3 warm-up steps.",
        "- Social IQa is scored by the log-likelihood of each answer text (cloze), not by a generated letter "
        "(a 135 M model answers letters at chance); the MiniLM classification head is new and trains with the "
        "experts' learning rate and the plain update.",
        "- Intervals: mean ± std over seeds; 95 % Student-t intervals over seeds for paired differences; Wilson "
        "intervals for a single run's accuracy; paired bootstrap over held-out examples for seed-averaged "
        "differences.",
        "",
        "## Claims",
        "",
        "A claim reproduces when the 95 % t-interval of the per-seed differences excludes zero in the claimed "
        "direction and, on real tasks, so does the paired bootstrap interval over the held-out examples (every "
        "seed is scored on the same examples, so both the seed noise and the test-set noise must be cleared). "
        "On the synthetic task differences are log10 ratios of the held-out relative MSE (negative = "
        "a is better); on real tasks accuracy points (positive = a is better).",
        "",
        *claims_table(results),
        "",
    ]
    if "synthetic" in results:
        lines += ["### Section 5 weights as per-expert learning speed (synthetic task)", "",
                  *_gate_weight_lines(gate_check)]
        if "gate_weights" in figures:
            lines += [f"![per-expert speed]({figures['gate_weights']})", ""]
    for key, res in results.items():
        spec = res.spec
        lines += [f"## {spec.title} (`{key}`)", "", _settings(res), "",
                  "Rows run: " + "; ".join(f"{o}: {', '.join(r)}" for o, r in spec.rows.items()) + ".", ""]
        cut = {o: [m for m in METHODS if m not in spec.rows.get(o, ())] for o in ("sgd", "adamw")}
        cut = {o: ms for o, ms in cut.items() if ms}
        if cut:
            lines += ["Rows cut to fit the budget (seeds were kept instead): "
                      + "; ".join(f"{o}: " + ("all rows" if len(ms) == len(METHODS) else ", ".join(ms))
                                  for o, ms in cut.items()) + ".", ""]
        lines += _zero_shot_lines(res)
        lines += ["Learning rates:", "", *_sweep_table(res), "",
                  f"Held-out {spec.metric} (test split{'' if spec.kind == 'synthetic' else ', %'}), mean ± std over seeds:",
                  "", *_main_table(res), ""]
        if key in figures:
            lines += [f"![{key}]({figures[key]})", ""]
        lines += ["<details><summary>Every run</summary>", "", *_every_run(res), "", "</details>", ""]
    write_text_atomic(path, "\n".join(lines) + "\n")
