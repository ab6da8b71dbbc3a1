"""The reproduction package: grid definition, cache and resume, the synthetic teacher, aggregation and the
results page, on a tiny synthetic grid (seconds)."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch

from moelora.reproduce import add_parser, build_grid, run_from_args
from moelora.reproduce.aggregate import collect, compare, mean_curve, t_quantile
from moelora.reproduce.gate_weights import expert_speeds, fit_slope
from moelora.reproduce.grid import (
    MAIN,
    METHODS,
    MOE_ROWS,
    SWEEP,
    SWEEP_SEED,
    Cell,
    Grid,
    TaskSpec,
    cell_overrides,
    full_tasks,
)
from moelora.reproduce.report import write_results
from moelora.reproduce.runner import GridRunner, cell_dir, choose_lr, is_done, run_cell
from moelora.reproduce.synthetic import SyntheticSetup, Teacher, build_student, sample_inputs, train_synthetic


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_grid(steps: int = 6, seeds: tuple[int, ...] = (0, 1)) -> Grid:
    spec = TaskSpec(key="synthetic", title="tiny synthetic", kind="synthetic",
                    rows={"sgd": ("riem", "riem_p05")}, lrs={"sgd": (0.1, 0.3)}, steps=steps, batch_size=32,
                    eval_every=3, metric="relative MSE", higher_is_better=False)
    return Grid(tasks={"synthetic": spec}, seeds=seeds)


# ------------------------------------------------------------------------------------------ grid
def test_full_grid_rows_optimizers_and_seeds():
    grid = build_grid()
    assert list(grid.tasks) == ["synthetic", "rt-minilm", "rt-smollm2", "siqa-smollm2"]
    assert grid.seeds == (0, 1, 2)
    for key, spec in grid.tasks.items():
        assert set(MOE_ROWS) <= set(spec.rows["adamw"]), key  # the four MoE-LoRA rows under AdamW everywhere
        for opt in spec.rows:
            assert len(spec.lrs[opt]) >= 2, (key, opt)  # a real sweep
            assert set(build_grid(quick=True).tasks.get(key, spec).lrs.get(opt, ())) <= set(spec.lrs[opt])
    synthetic = grid.tasks["synthetic"]
    assert synthetic.rows == {"sgd": tuple(METHODS), "adamw": tuple(METHODS)}
    # The paper's comparison runs first.
    assert grid.pairs("synthetic")[:2] == [("adamw", "riem"), ("adamw", "riem_p05")]
    names = [c.name for k in grid.tasks for c in grid.sweep_cells(k) + grid.main_cells(k, {p: 1.0 for p in grid.pairs(k)})]
    assert len(names) == len(set(names))
    assert len(grid.main_cells("siqa-smollm2")) == 4 * 3


def test_methods_match_the_issue():
    assert (METHODS["riem"].preconditioner, METHODS["riem"].gate_power) == ("riemannian", 1.0)
    assert (METHODS["riem_p05"].preconditioner, METHODS["riem_p05"].gate_power) == ("riemannian", 0.5)
    assert (METHODS["gate_rescaled"].preconditioner, METHODS["gate_rescaled"].gate_power) == ("gate_rescaled", 1.0)
    assert (METHODS["plain_p05"].preconditioner, METHODS["plain_p05"].gate_power) == ("none", 0.5)
    assert (METHODS["moe"].preconditioner, METHODS["moe"].gate_power) == ("none", 1.0)
    assert METHODS["lora"].single_lora


def test_cell_overrides_single_lora_has_the_same_size_and_scale():
    spec = full_tasks()["rt-smollm2"]
    moe = cell_overrides(spec, Cell("rt-smollm2", "adamw", "riem_p05", 0, MAIN, 1e-3))
    lora = cell_overrides(spec, Cell("rt-smollm2", "adamw", "lora", 0, MAIN, 1e-3))
    assert (lora["adapter.num_experts"], lora["adapter.top_k"]) == (1, 1)
    assert lora["adapter.rank"] == moe["adapter.num_experts"] * moe["adapter.rank"]
    assert lora["adapter.alpha"] / lora["adapter.rank"] == moe["adapter.alpha"] / moe["adapter.rank"]
    assert moe["adapter.gate_backward_power"] == 0.5 and moe["optim.preconditioner"] == "riemannian"
    assert moe["eval.zero_shot"] is False and moe["data.max_eval"] == spec.test_examples
    sweep = cell_overrides(spec, Cell("rt-smollm2", "adamw", "riem", SWEEP_SEED, SWEEP, 1e-3))
    assert sweep["train.eval_every"] == spec.steps and sweep["data.max_eval"] == spec.sweep_examples
    with pytest.raises(ValueError, match="not chosen"):
        cell_overrides(spec, Cell("rt-smollm2", "adamw", "riem", 0, MAIN, None))


def test_overrides_load_as_a_valid_run_config():
    from moelora.finetune.run_config import load_config

    spec = full_tasks()["rt-minilm"]
    values = cell_overrides(spec, Cell("rt-minilm", "sgd", "lora", 0, MAIN, 0.3))
    config = load_config(None, [f"{k}={json.dumps(v)}" for k, v in values.items()])
    assert config.adapter.rank == 80 and config.optim.name == "sgd" and config.train.steps == spec.steps


def test_quick_grid_and_bad_arguments():
    quick = build_grid(quick=True)
    assert set(quick.tasks) == {"synthetic", "rt-minilm"}
    # The quick MiniLM runs use the full grid's settings, so they are shared through the cache.
    full = full_tasks()["rt-minilm"]
    assert quick.tasks["rt-minilm"].steps == full.steps and quick.tasks["rt-minilm"].overrides == full.overrides
    assert list(build_grid(tasks=["synthetic"]).tasks) == ["synthetic"]
    with pytest.raises(ValueError, match="unknown task"):
        build_grid(tasks=["mnist"])
    with pytest.raises(ValueError, match="seeds"):
        build_grid(seeds=0)


def test_choose_lr():
    spec = tiny_grid().tasks["synthetic"]  # lower is better
    assert choose_lr(spec, {0.1: [{"validation": 0.5}], 0.3: [None]}) == (None, {})
    lr, detail = choose_lr(spec, {0.1: [{"validation": 0.5}], 0.3: [{"validation": 0.2}], 1.0: [{"diverged": True}]})
    assert lr == 0.3 and detail["values"][1.0] is None and not detail["edge"]
    lr, detail = choose_lr(spec, {0.1: [{"validation": 0.2}], 0.3: [{"validation": 0.2}]})
    assert lr == 0.1 and detail["edge"]  # ties: the smaller rate
    # Several sweep seeds: geometric mean on the synthetic task; one diverged seed disqualifies the rate.
    lr, detail = choose_lr(spec, {0.1: [{"validation": 1e-2}, {"validation": 1e-4}],
                                  0.3: [{"validation": 1e-5}, {"diverged": True}]})
    assert lr == 0.1 and detail["values"][0.1] == pytest.approx(1e-3) and detail["values"][0.3] is None
    accuracy = full_tasks()["rt-minilm"]  # higher is better
    assert choose_lr(accuracy, {0.1: [{"validation": 0.7}], 0.3: [{"validation": 0.8}]})[0] == 0.3


# ------------------------------------------------------------------------------------------ synthetic
def test_teacher_is_a_mixture_the_student_can_represent_exactly():
    setup = SyntheticSetup()
    teacher = Teacher(setup)
    x = sample_inputs(256, setup.d_in, torch.Generator().manual_seed(0))
    assert torch.all(x[:, -1] == 1)
    g = teacher.gates(x)
    assert torch.allclose(g.sum(1), torch.ones(256))
    assert torch.all((g > 0).sum(1) == setup.top_k)
    assert torch.linalg.matrix_rank(teacher.maps[0]).item() == setup.rank
    # Routing differs across experts (that is what makes the gate weights visible).
    moments = teacher.gate_moments(x)
    assert max(moments["g^2"]) > 10 * sorted(moments["g^2"])[len(moments["g^2"]) // 2]
    student = build_student(setup, teacher, gate_power=0.5, single_lora=False, seed=0)
    with torch.no_grad():
        student.lora_A.copy_(teacher.factors_a)
        student.lora_B.copy_(teacher.factors_b / student.scaling)
        assert torch.allclose(student(x), teacher(x), atol=1e-5)
    assert not student.router.weight.requires_grad


def test_synthetic_training_learns_and_is_deterministic():
    kwargs = dict(optimizer="sgd", preconditioner="gate_rescaled", gate_power=1.0, single_lora=False, lr=0.1,
                  seed=3, steps=30, batch_size=64, eval_every=10)
    a = train_synthetic(**kwargs)
    b = train_synthetic(**kwargs)
    assert a["validation"] == b["validation"] and a["test"] == b["test"]
    assert a["validation"] < 0.2 < a["events"][0]["value"]
    speeds = expert_speeds(a["events"], 10)
    assert len(speeds) == SyntheticSetup().num_experts
    assert fit_slope([1, 10, 100], [2, 20, 200]) == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------ cache
def test_runner_caches_and_resumes(tmp_path):
    grid = tiny_grid()
    runner = GridRunner(grid, tmp_path)
    runner.run()
    assert runner.ran == 2 * 2 + 2 * 2  # sweep (2 methods x 2 rates x 1 seed) + main (2 methods x 2 seeds)
    again = GridRunner(grid, tmp_path)
    again.run()
    assert again.ran == 0 and again.skipped == 8
    # An interrupted run (no summary.json) is cleared and run again; the others are kept.
    chosen, _ = again.chosen_lrs("synthetic")
    cell = grid.main_cells("synthetic", chosen)[0]
    folder = cell_dir(tmp_path, grid.tasks["synthetic"], cell)
    (folder / "summary.json").unlink()
    (folder / "stale.txt").write_text("x")
    third = GridRunner(grid, tmp_path)
    third.run()
    assert third.ran == 1 and is_done(folder) and not (folder / "stale.txt").exists()
    # A changed budget is a different run (new folder).
    longer = tiny_grid(steps=9)
    assert cell_dir(tmp_path, longer.tasks["synthetic"], cell) != folder


def test_work_order_puts_the_papers_comparison_first():
    grid = build_grid()
    order = grid.work_order()
    assert sorted(order) == sorted((t, p) for t in grid.tasks for p in grid.pairs(t))
    paper = [(t, p) for t, p in order if p[0] == "adamw" and p[1] in ("riem", "riem_p05")]
    kept = [(t, p) for t, p in order if p[0] == "adamw" and p[1] in MOE_ROWS]
    assert order[:len(paper)] == paper and {t for t, _ in paper} == set(grid.tasks)
    assert set(order[:len(kept)]) == set(kept)


def test_main_runs_start_while_other_rows_still_sweep(tmp_path):
    grid = tiny_grid()
    runner = GridRunner(grid, tmp_path)
    started = set()

    def take():
        job = runner._next_job(started)
        if job is not None:
            started.add(job[2])
        return job

    first = [take() for _ in range(4)]
    assert [job[1][1].stage for job in first] == ["sweep"] * 4
    assert [job[1][1].method for job in first] == ["riem", "riem", "riem_p05", "riem_p05"]
    assert take() is None  # everything left waits on a running sweep
    for kind, (spec, cell), folder in first[:2]:  # the first row's sweep finishes
        run_cell(spec, cell, folder)
    kind, (spec, cell), folder = take()
    assert (cell.stage, cell.method, cell.lr) == ("main", "riem", runner.chosen_lrs("synthetic")[0][("sgd", "riem")])


def test_two_worker_processes_give_the_same_runs(tmp_path):
    grid = tiny_grid()
    serial, parallel = GridRunner(grid, tmp_path / "serial"), GridRunner(grid, tmp_path / "parallel", jobs=2)
    serial.run()
    parallel.run()
    assert serial.ran == parallel.ran == 8
    for key, pair in grid.work_order():
        chosen, _ = serial.chosen_lrs(key, pair)
        assert parallel.chosen_lrs(key, pair)[0] == chosen
        for cell in grid.sweep_cells(key, pair) + grid.main_cells(key, chosen, pair):
            a, b = (json.loads((cell_dir(r.cache, grid.tasks[key], cell) / "summary.json").read_text())
                    for r in (serial, parallel))
            assert a["validation"] == b["validation"] and a.get("test") == b.get("test")


def test_time_limit_starts_nothing(tmp_path):
    runner = GridRunner(tiny_grid(), tmp_path, deadline=0.0)
    runner.run()
    assert runner.ran == 0


# ------------------------------------------------------------------------------------------ aggregate + report
def test_aggregation_and_results_page(tmp_path):
    grid = tiny_grid(seeds=(0, 1, 2))
    GridRunner(grid, tmp_path / "cache").run()
    results = collect(grid, tmp_path / "cache")
    res = results["synthetic"]
    assert res.finished_runs == res.expected_runs == 6
    stats = res.cells[("sgd", "riem")]
    values = [json.loads((r.folder / "summary.json").read_text())["test"] for r in stats.runs]
    assert stats.values == values
    assert stats.mean == pytest.approx(np.mean(values)) and stats.std == pytest.approx(np.std(values, ddof=1))
    c = compare(res, "sgd", "riem_p05", "riem")
    other = res.cells[("sgd", "riem_p05")]
    expected = [math.log10(a) - math.log10(b) for a, b in zip(other.values, stats.values)]
    assert c.per_seed == pytest.approx(expected)
    half = t_quantile(2) * np.std(expected, ddof=1) / math.sqrt(3)
    assert (c.low, c.high) == pytest.approx((np.mean(expected) - half, np.mean(expected) + half))
    steps, mean, low, high = mean_curve([[(1, 1.0), (2, 3.0)], [(1, 3.0), (2, 5.0), (3, 9.0)]])
    assert list(steps) == [1, 2] and list(mean) == [2.0, 4.0] and list(low) == [1.0, 3.0]

    page = tmp_path / "docs" / "results.md"
    write_results(grid, results, page, "moelora reproduce --tasks synthetic", tmp_path / "cache", None, {})
    text = page.read_text()
    assert "moelora reproduce --tasks synthetic" in text
    assert "6 of 6 reported runs" in text
    assert "the paper's method" in text and "`riem_p05` − `riem`" in text
    assert any(v in text for v in ("**reproduces**", "does not reproduce", "**reversed**"))
    assert text.count("| sgd | riem |") == 3 + 1  # three runs, and the sweep row
    assert "gate-weight check has not run" in text


def test_cli_parser_and_report_only(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="moelora")
    sub = parser.add_subparsers(dest="command")
    add_parser(sub)
    args = parser.parse_args(["reproduce", "--quick", "--tasks", "synthetic", "--seeds", "2", "--cache",
                              str(tmp_path / "c"), "--report-only", "--results", str(tmp_path / "r.md")])
    assert args.command == "reproduce" and args.quick and args.seeds == 2
    assert run_from_args(args) == 0
    text = (tmp_path / "r.md").read_text()
    assert "moelora reproduce --quick --tasks synthetic --seeds 2" in text and "0 of" in text


def test_real_model_path_on_a_tiny_random_llama(tmp_path, monkeypatch):
    """Sweep, main runs, zero-shot and the paired comparisons through ``moelora.finetune.Trainer``."""
    from pathlib import Path

    data = Path(__file__).resolve().parents[1] / "configs" / "data" / "smoke_sentiment.jsonl"
    overrides = {
        "model.name": "random-llama", "model.random_config": {"hidden_size": 32, "intermediate_size": 64,
                                                              "num_hidden_layers": 1},
        "data.task": "classification_file",
        "data.options": {"train_file": str(data), "answer_format": "text",
                         "question": "Is this review positive or negative?"},
        "data.max_length": 96, "adapter.num_experts": 4, "adapter.top_k": 2, "adapter.rank": 2,
        "adapter.alpha": 4.0, "adapter.dropout": 0.0,
        "adapter.target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
    }
    spec = TaskSpec(key="tiny", title="tiny real-model task", kind="train", rows={"adamw": ("riem", "riem_p05")},
                    lrs={"adamw": (1e-3, 1e-2)}, steps=4, batch_size=4, eval_every=2, curve_examples=8,
                    test_examples=20, sweep_examples=8, overrides=overrides, zero_shot=True)
    grid = Grid(tasks={"tiny": spec}, seeds=(0, 1))
    runner = GridRunner(grid, tmp_path)
    runner.run()
    assert runner.ran == 4 + 4
    results = collect(grid, tmp_path)["tiny"]
    assert results.finished_runs == 4 and results.zero_shot["test_n"] == 20
    run = results.cells[("adamw", "riem_p05")].runs[0]
    assert not (run.folder / "checkpoints").exists()  # weights are not kept in the cache
    assert len(json.loads((run.folder / "test_result.json").read_text())["correct"]) == 20
    events = [json.loads(line) for line in (run.folder / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("split") == "validation"] == [2, 4]
    c = compare(results, "adamw", "riem_p05", "riem")
    assert c.n == 2 and c.bootstrap is not None
    # The sweep never evaluated the test split.
    sweep_folder = cell_dir(tmp_path, spec, Cell("tiny", "adamw", "riem", SWEEP_SEED, SWEEP, 1e-3))
    assert not (sweep_folder / "test_result.json").exists()
    page = tmp_path / "results.md"
    write_results(grid, {"tiny": results}, page, "moelora reproduce", tmp_path, None, {})
    assert "Zero-shot (base model, no adapter)" in page.read_text()


def test_verdict_needs_both_seed_and_example_intervals():
    from moelora.reproduce.aggregate import Comparison

    clear = Comparison("a", "b", "adamw", [0.5, 0.6, 0.4], 0.5, 0.1, 0.25, 0.75)
    assert clear.verdict(higher_is_better=True) == "a better"
    assert clear.verdict(higher_is_better=False) == "b better"
    noisy_examples = Comparison("a", "b", "adamw", [0.5, 0.6, 0.4], 0.5, 0.1, 0.25, 0.75, bootstrap=(0.5, -0.2, 1.3))
    assert noisy_examples.verdict(higher_is_better=True) == "no clear difference"
    assert Comparison("a", "b", "sgd", [1.0], 1.0, math.nan, math.nan, math.nan).verdict(True) == "too few runs"
