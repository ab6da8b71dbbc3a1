"""Run the grid with a per-run cache: a finished run is never run again, so the grid can be stopped and
continued (``--cache``, default ``runs/reproduce/``).

Layout of the cache::

    <cache>/<task>/<stage>/<optimizer>-<method>/lr<lr>-seed<seed>-<hash>/
        cell.json          the cell and its full settings
        metrics.jsonl      training events (step, loss) and validation events (split, value)
        summary.json       written last: the run is finished when it exists
        test_result.json   real tasks: the held-out evaluation with per-example correctness
    <cache>/<task>/zero-shot-<hash>/summary.json      the base model on the held-out split
    <cache>/<task>/gate-weights-<hash>/summary.json   synthetic: the section 5 weight check

``<hash>`` covers every setting of the run, so a changed budget or learning rate gets a new folder. A run
that diverges (non-finite loss, failed factorisation) is finished too: its summary says so and it counts
as the worst value in the sweep. A folder without ``summary.json`` is a run that was interrupted: it is
cleared and run again.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any, TypedDict

from ..atomic import write_text_atomic
from .grid import MAIN, METHODS, SWEEP, SWEEP_SEED, Cell, Grid, TaskSpec, cell_overrides, config_hash

logger = logging.getLogger(__name__)

DEFAULT_CACHE = Path("runs") / "reproduce"


def _write_json(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=1) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def cell_settings(spec: TaskSpec, cell: Cell) -> dict[str, Any]:
    """Everything that determines a run's result."""
    if spec.kind == "synthetic":
        method = METHODS[cell.method]
        return {"kind": "synthetic", "optimizer": cell.optimizer, "preconditioner": method.preconditioner,
                "gate_power": method.gate_power, "single_lora": method.single_lora, "lr": cell.lr,
                "seed": cell.seed, "steps": spec.steps, "batch_size": spec.batch_size,
                "eval_every": spec.eval_every, "stage": cell.stage}
    return {"kind": "train", "stage": cell.stage, **cell_overrides(spec, cell)}


def cell_dir(cache: Path, spec: TaskSpec, cell: Cell) -> Path:
    lr = f"lr{cell.lr:g}"
    return (cache / cell.task / cell.stage / f"{cell.optimizer}-{cell.method}"
            / f"{lr}-seed{cell.seed}-{config_hash(cell_settings(spec, cell))}")


def is_done(folder: Path) -> bool:
    return (folder / "summary.json").is_file()


# ------------------------------------------------------------------------------------------ one cell
def run_cell(spec: TaskSpec, cell: Cell, folder: Path, keep_weights: bool = False) -> dict[str, Any]:
    """Run one cell into ``folder`` (cleared first) and return its summary; never raises on divergence."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    settings = cell_settings(spec, cell)
    start = time.perf_counter()
    try:
        if spec.kind == "synthetic":
            summary = _run_synthetic(spec, cell, folder)
        else:
            summary = _run_trainer(spec, cell, folder, settings)
        summary["diverged"] = False
    except _divergence_errors() as err:  # recorded as a finished (diverged) run; the grid goes on
        logger.warning("%s diverged: %s", cell.name, err)
        summary = {"diverged": True, "error": str(err).splitlines()[0][:300]}
    summary.update({"cell": cell.__dict__, "wall_time_s": time.perf_counter() - start})
    # written after the run: the trainer starts in an empty folder
    _write_json(folder / "cell.json", {"cell": cell.__dict__, "name": cell.name, "settings": settings})
    if not keep_weights:
        for sub in ("checkpoints", "adapter"):
            if (folder / sub).is_dir():
                shutil.rmtree(folder / sub)
    _write_json(folder / "summary.json", summary)
    return summary


def _divergence_errors() -> tuple[type[BaseException], ...]:
    """Non-finite losses (the loop's ``TrainingError``, the synthetic ``Diverged``) and failed solves."""
    import torch

    from ..finetune.trainer import TrainingError
    from .synthetic import Diverged

    return TrainingError, Diverged, torch.linalg.LinAlgError


def _run_synthetic(spec: TaskSpec, cell: Cell, folder: Path) -> dict[str, Any]:
    from .synthetic import train_synthetic, write_jsonl

    assert cell.lr is not None, "a cell is only run once its learning rate is known"
    method = METHODS[cell.method]
    result = train_synthetic(
        optimizer=cell.optimizer, preconditioner=method.preconditioner, gate_power=method.gate_power,
        single_lora=method.single_lora, lr=cell.lr, seed=cell.seed, steps=spec.steps,
        batch_size=spec.batch_size, eval_every=spec.eval_every, evaluate_test=cell.stage == MAIN,
    )
    events = result.pop("events")
    write_jsonl(folder / "metrics.jsonl", events)
    losses = [e["loss"] for e in events if "loss" in e]
    summary = {"validation": result["validation"], "train_time_s": result["train_time_s"],
               "final_train_loss": sum(losses[-10:]) / len(losses[-10:]),
               "gate_moments": result["gate_moments"]}
    if "test" in result:
        summary["test"] = result["test"]
    return summary


def _trainer_callback(folder: Path):
    """Keeps the held-out test result with its per-example correctness (``test_result.json``)."""
    from ..finetune.trainer import TrainerCallback

    class KeepTestResult(TrainerCallback):
        def on_eval(self, trainer, split, step, result) -> None:
            if split == "test":
                _write_json(folder / "test_result.json", result.to_dict())

    return KeepTestResult()


def _run_trainer(spec: TaskSpec, cell: Cell, folder: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """One real-model run through ``Trainer``; a sweep run stops at the final validation (the test split
    is never looked at), a main run also evaluates on the test split."""
    from ..finetune.run_config import RunConfig, replace_values
    from ..finetune.trainer import Trainer

    values = {k: v for k, v in settings.items() if k not in ("kind", "stage")}
    config = replace_values(RunConfig(), {**values, "output_dir": str(folder)})
    trainer = Trainer(config, progress=False, callbacks=[_trainer_callback(folder)])
    try:
        trainer.setup()
        trainer.fit()
        result = trainer.evaluate(test=cell.stage == MAIN)
    finally:
        trainer.close()
    out: dict[str, Any] = {"validation": result.validation.value if result.validation else None,
                           "train_time_s": result.train_time_s, "final_train_loss": result.final_train_loss}
    if result.test is not None:
        out["test"] = result.test.value
        out["test_interval"] = [result.test.interval.low, result.test.interval.high] if result.test.interval else None
        out["test_n"] = result.test.n
    return out


def zero_shot_dir(cache: Path, spec: TaskSpec) -> Path:
    settings = {"zero_shot": True, **spec.overrides, "test_examples": spec.test_examples,
                "curve_examples": spec.curve_examples}
    return cache / spec.key / f"zero-shot-{config_hash(settings)}"


def run_zero_shot(spec: TaskSpec, folder: Path) -> dict[str, Any]:
    """The base model (no adapter) on the held-out test split and on the validation curve's examples."""
    from ..finetune.base_models import load_model_and_tokenizer
    from ..finetune.run_config import RunConfig, replace_values
    from ..finetune.tasks import TaskRuntime

    folder.mkdir(parents=True, exist_ok=True)
    config = replace_values(RunConfig(), {**spec.overrides, "data.max_eval": max(spec.test_examples, spec.curve_examples),
                                          "train.eval_examples": spec.curve_examples})
    runtime = TaskRuntime.load(config)
    model, tokenizer = load_model_and_tokenizer(config.model.name, config.model.dtype, config.model.random_config)
    runtime.attach(model, tokenizer)
    test = runtime.evaluate_test(progress=False, label="zero-shot").to_dict()
    validation = runtime.evaluate_validation(progress=False)
    _write_json(folder / "test_result.json", test)
    summary = {"test": test["value"], "test_interval": test["interval"], "test_n": test["n"],
               "validation": validation.value, "validation_n": validation.n}
    _write_json(folder / "summary.json", summary)
    return summary


class _GateCheck(TypedDict):
    lr: float
    steps: int
    at_step: int
    min_seeds: int


GATE_CHECK: _GateCheck = {"lr": 0.1, "steps": 60, "at_step": 40, "min_seeds": 5}


def gate_weights_dir(cache: Path, seeds: tuple[int, ...]) -> Path:
    return cache / "synthetic" / f"gate-weights-{config_hash({**GATE_CHECK, 'seeds': list(seeds)})}"


def gate_check_seeds(seeds: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(range(max(GATE_CHECK["min_seeds"], len(seeds))))


def run_gate_weights(folder: Path, seeds: tuple[int, ...]) -> dict[str, Any]:
    """The section 5 check of ``gate_weights.py``, cached in ``folder``."""
    from .gate_weights import run_gate_weight_check

    folder.mkdir(parents=True, exist_ok=True)
    check = run_gate_weight_check(seeds, lr=GATE_CHECK["lr"], steps=GATE_CHECK["steps"],
                                  at_step=GATE_CHECK["at_step"])
    _write_json(folder / "summary.json", check)
    return check


# ------------------------------------------------------------------------------------------ workers
def _init_worker(threads: int) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


# ------------------------------------------------------------------------------------------ the grid
def choose_lr(spec: TaskSpec, results: dict[float, list[dict[str, Any] | None]]) -> tuple[float | None, dict[str, Any]]:
    """The sweep's pick from ``{lr: [summary of each sweep seed, None if not finished]}``: the best final
    validation value (averaged over sweep seeds; geometric mean for the synthetic relative error), ties to
    the smaller rate; a rate with a diverged seed ranks last. Returns ``(lr, {"values": {lr: value or None},
    "edge": bool})``; ``lr`` is None until every sweep run has finished."""
    values: dict[float, float | None] = {}
    for lr, summaries in results.items():
        finished = [s for s in summaries if s is not None]
        if not summaries or len(finished) < len(summaries):  # none, or a sweep run not finished yet
            return None, {}
        if any(s.get("diverged") or s.get("validation") is None for s in finished):
            values[lr] = None
            continue
        finals = [s["validation"] for s in finished]
        if spec.kind == "synthetic":
            values[lr] = 10 ** (sum(math.log10(max(v, 1e-300)) for v in finals) / len(finals))
        else:
            values[lr] = sum(finals) / len(finals)
    finite = {lr: v for lr, v in values.items() if v is not None}
    if not finite:
        best = min(values)
    else:
        sign = -1.0 if spec.higher_is_better else 1.0
        best = min(sorted(finite), key=lambda lr: sign * finite[lr])
    ordered = sorted(values)
    return best, {"values": values, "edge": len(ordered) > 1 and best in (ordered[0], ordered[-1])}


class GridRunner:
    """Runs ``grid`` into ``cache``: for each row, its learning-rate sweep, then its main runs at the chosen
    rate, in ``Grid.work_order``.

    ``jobs`` worker processes with ``threads`` threads each, kept busy across rows and tasks (a row's main
    runs start while other rows still sweep); no new run starts after ``deadline`` (a ``time.time()``
    value), so a sitting can end cleanly.
    """

    def __init__(self, grid: Grid, cache: Path = DEFAULT_CACHE, jobs: int = 1, threads: int = 1,
                 deadline: float | None = None) -> None:
        self.grid, self.cache, self.jobs, self.threads, self.deadline = grid, Path(cache), jobs, threads, deadline
        self.ran = 0
        self.skipped = 0

    def _time_left(self) -> bool:
        return self.deadline is None or time.time() < self.deadline

    def chosen_lrs(self, task: str, pair: tuple[str, str] | None = None
                   ) -> tuple[dict[tuple[str, str], float], dict[tuple[str, str], dict]]:
        """From the cache: the chosen rate and the sweep values of every finished (optimizer, method) of
        ``task`` (only ``pair`` when given)."""
        spec = self.grid.tasks[task]
        chosen, details = {}, {}
        for opt, method in [pair] if pair else self.grid.pairs(task):
            results: dict[float, list] = {}
            for lr in spec.lrs[opt]:
                results[lr] = []
                for i in range(spec.sweep_seeds):
                    folder = cell_dir(self.cache, spec, Cell(task, opt, method, SWEEP_SEED + i, SWEEP, lr))
                    results[lr].append(read_json(folder / "summary.json") if is_done(folder) else None)
            best, detail = choose_lr(spec, results)
            if best is not None:
                chosen[(opt, method)] = best
                details[(opt, method)] = detail
        return chosen, details

    # -------------------------------------------------------------------------------- scheduling
    def _next_job(self, started: set[Path]) -> tuple[str, Any, Path] | None:
        """The next job to start: a zero-shot evaluation, a sweep run, or a main run whose sweep has
        finished (so main runs never wait for other rows' sweeps), in ``Grid.work_order``; None when every
        remaining job waits on a running sweep or nothing is left."""
        for spec in self.grid.tasks.values():
            if spec.zero_shot:
                folder = zero_shot_dir(self.cache, spec)
                if not is_done(folder) and folder not in started:
                    return "zero-shot", spec, folder
        for key, pair in self.grid.work_order():
            spec = self.grid.tasks[key]
            sweep = [(c, cell_dir(self.cache, spec, c)) for c in self.grid.sweep_cells(key, pair)]
            todo = [(c, f) for c, f in sweep if not is_done(f)]
            for cell, folder in todo:
                if folder not in started:
                    return "cell", (spec, cell), folder
            if todo:
                continue  # this row's sweep is still running
            chosen, _ = self.chosen_lrs(key, pair)
            for cell in self.grid.main_cells(key, chosen, pair):
                folder = cell_dir(self.cache, spec, cell)
                if not is_done(folder) and folder not in started:
                    return "cell", (spec, cell), folder
        return None

    def _count_done(self) -> int:
        done = 0
        for key, pair in self.grid.work_order():
            spec = self.grid.tasks[key]
            chosen, _ = self.chosen_lrs(key, pair)
            cells = self.grid.sweep_cells(key, pair) + [c for c in self.grid.main_cells(key, chosen, pair)
                                                         if c.lr is not None]
            done += sum(is_done(cell_dir(self.cache, spec, c)) for c in cells)
        return done

    def run(self) -> None:
        """Run every job of the grid not in the cache, ``jobs`` at a time, until done or past the deadline."""
        already = self._count_done()
        for spec in self.grid.tasks.values():
            if spec.kind == "synthetic" and self._time_left():
                seeds = gate_check_seeds(self.grid.seeds)
                folder = gate_weights_dir(self.cache, seeds)
                if not is_done(folder):
                    logger.info("section 5 gate-weight check")
                    _init_worker(self.threads)
                    run_gate_weights(folder, seeds)
        started: set[Path] = set()
        with _Pool(self.jobs, self.threads) as pool:
            while True:
                while pool.free() and self._time_left():
                    job = self._next_job(started)
                    if job is None:
                        break
                    kind, payload, folder = job
                    started.add(folder)
                    logger.info("run %s", _job_name(kind, payload))
                    pool.submit(kind, payload, folder)
                if not pool.busy():
                    break
                kind, folder, summary = pool.wait_one()
                if kind == "cell":
                    self.ran += 1
                logger.info("done %s: %s", folder, _short(summary))
        if not self._time_left() and self._next_job(started) is not None:
            logger.warning("time limit reached: no new run started")
        self.skipped = already


class _Pool:
    """``jobs`` worker processes (spawned, ``threads`` threads each), or the calling process when
    ``jobs <= 1``: ``submit`` a job, ``wait_one`` for the first to finish."""

    def __init__(self, jobs: int, threads: int) -> None:
        self.jobs, self.threads = max(1, jobs), threads
        self._executor: ProcessPoolExecutor | None = None
        self._running: dict[Any, tuple[str, Path]] = {}
        self._finished: list[tuple[str, Path, dict[str, Any]]] = []

    def __enter__(self) -> _Pool:
        if self.jobs > 1:
            self._executor = ProcessPoolExecutor(self.jobs, mp_context=get_context("spawn"),
                                                 initializer=_init_worker, initargs=(self.threads,))
        else:
            _init_worker(self.threads)
        return self

    def __exit__(self, *exc) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)

    def free(self) -> bool:
        return len(self._running) + len(self._finished) < self.jobs

    def busy(self) -> bool:
        return bool(self._running or self._finished)

    def submit(self, kind: str, payload: Any, folder: Path) -> None:
        if self._executor is None:  # in process: run now, report at the next wait_one
            self._finished.append((kind, folder, _run_job(kind, payload, str(folder))))
            return
        self._running[self._executor.submit(_run_job, kind, payload, str(folder))] = (kind, folder)

    def wait_one(self) -> tuple[str, Path, dict[str, Any]]:
        if self._finished:
            return self._finished.pop(0)
        done = next(iter(_wait_first(set(self._running))))
        kind, folder = self._running.pop(done)
        return kind, folder, done.result()


def _run_job(kind: str, payload: Any, folder: str) -> dict[str, Any]:
    if kind == "zero-shot":
        return run_zero_shot(payload, Path(folder))
    spec, cell = payload
    return run_cell(spec, cell, Path(folder))


def _job_name(kind: str, payload: Any) -> str:
    return f"zero-shot {payload.key}" if kind == "zero-shot" else payload[1].name


def _wait_first(futures):
    from concurrent.futures import FIRST_COMPLETED, wait

    done, _ = wait(futures, return_when=FIRST_COMPLETED)
    return done


def _short(summary: dict[str, Any]) -> str:
    if summary.get("diverged"):
        return "diverged"
    parts = [f"{k}={summary[k]:.4g}" for k in ("validation", "test") if isinstance(summary.get(k), float)]
    parts.append(f"{summary.get('wall_time_s', 0):.0f}s")
    return " ".join(parts)
