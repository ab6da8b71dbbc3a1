"""The reproduction grid: methods (rows) x optimizers x tasks x seeds, and the learning-rate candidates.

A ``Cell`` is one training run: a task, an optimizer family, a method, a learning rate and a seed, in one
of two stages: ``"sweep"`` (learning-rate selection on the validation split, one seed) or ``"main"``
(the reported runs, several seeds, at the learning rate the sweep chose). ``build_grid`` lists the
cells of every stage; the main cells' learning rates are filled in by the runner once the sweep of their
(task, optimizer, method) has finished.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError

SWEEP_SEED = 1000  # the sweep uses its own seeds (1000, 1001, ...): no reported run is one its rate was picked on

SWEEP = "sweep"
MAIN = "main"


@dataclass(frozen=True)
class Method:
    """A row of the comparison: how the adapter is built and which preconditioner trains it.

    ``single_lora`` turns the MoE-LoRA config into one expert of rank ``num_experts * rank`` with the same
    output scale ``alpha / rank`` (so ``alpha`` grows with the rank): exactly a plain LoRA with as many
    expert parameters as the mixture.
    """

    key: str
    label: str
    preconditioner: str
    gate_power: float
    single_lora: bool = False


METHODS: dict[str, Method] = {m.key: m for m in (
    Method("lora", "single LoRA (rank E*r)", "none", 1.0, single_lora=True),
    Method("moe", "MoE-LoRA", "none", 1.0),
    Method("riem", "MoE-LoRA + per-expert Riemannian (paper's baseline)", "riemannian", 1.0),
    Method("riem_p05", "+ engineering strategy, gate power 0.5 (paper's method)", "riemannian", 0.5),
    Method("gate_rescaled", "+ gate-rescaled preconditioner (derived)", "gate_rescaled", 1.0),
    Method("plain_p05", "ablation: gate power 0.5, plain optimizer", "none", 0.5),
)}
ALL_ROWS = tuple(METHODS)
MOE_ROWS = ("riem", "riem_p05", "gate_rescaled", "moe")  # kept on every task under AdamW
OPTIMIZERS = ("sgd", "adamw")
# Run order inside a task: the paper's comparison first, so that a partly finished grid has whole cells
# (sweep and every seed) for the most important rows.
PRIORITY = ("riem", "riem_p05", "gate_rescaled", "moe", "lora", "plain_p05")
OPTIMIZER_PRIORITY = ("adamw", "sgd")
# Router learning rate as a fraction of the expert one (the paper's 3e-8 against 3e-5 / 1e-5).
ROUTER_LR_RATIO = {"sgd": 1e-3, "adamw": 3e-3}


@dataclass(frozen=True)
class TaskSpec:
    """One task of the grid, with its model, budget and learning-rate candidates.

    ``kind`` is ``"synthetic"`` (the teacher-student regression, ``moelora.reproduce.synthetic``) or
    ``"train"`` (a real model through ``moelora.finetune.Trainer``). ``overrides`` are ``--set``-style
    ``RunConfig`` values shared by every run of the task; ``rows`` maps an optimizer to the methods run
    under it; ``lrs`` maps an optimizer to the sweep candidates. ``eval_steps`` lists when the held-out
    curve is measured (on ``curve_examples`` validation examples); the final held-out number is on the
    test split (``test_examples``). ``sweep_examples`` validation examples pick the learning rate.
    """

    key: str
    title: str
    kind: str
    rows: dict[str, tuple[str, ...]]
    lrs: dict[str, tuple[float, ...]]
    steps: int
    batch_size: int
    eval_every: int
    curve_examples: int = 0
    test_examples: int = 0
    sweep_examples: int = 0
    overrides: dict[str, Any] = field(default_factory=dict)
    zero_shot: bool = False
    sweep_seeds: int = 1
    metric: str = "accuracy"
    higher_is_better: bool = True


SMOLLM2_ADAPTER = {
    "adapter.num_experts": 20, "adapter.top_k": 10, "adapter.rank": 4, "adapter.alpha": 16.0,
    "adapter.dropout": 0.0, "adapter.target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
}
MINILM_ADAPTER = {
    "adapter.num_experts": 20, "adapter.top_k": 10, "adapter.rank": 4, "adapter.alpha": 16.0,
    "adapter.dropout": 0.0, "adapter.target_modules": ["query", "key", "value", "attention.output.dense"],
}
# Shared loop settings: short warm-up, linear decay to 0.1x (as the paper), no intermediate checkpoints.
_LOOP = {"train.warmup_steps": 3, "train.final_lr_ratio": 0.1, "train.save_every": 0, "train.log_every": 1}


def _both(rows: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    return {"sgd": rows, "adamw": rows}


def full_tasks() -> dict[str, TaskSpec]:
    """The full grid's tasks, sized for about 3 hours on a 2-core CPU (two single-threaded workers)."""
    return {t.key: t for t in (
        TaskSpec(
            key="synthetic", title="Synthetic teacher-student regression (a known mixture of low-rank maps)",
            kind="synthetic", rows=_both(ALL_ROWS),
            lrs={"sgd": (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0), "adamw": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)},
            steps=300, batch_size=128, eval_every=10, metric="relative MSE", higher_is_better=False, sweep_seeds=2,
        ),
        TaskSpec(
            key="rt-minilm", title="Rotten Tomatoes, MiniLM-L6 encoder (classification head)", kind="train",
            rows={"adamw": ALL_ROWS, "sgd": MOE_ROWS},
            lrs={"sgd": (0.3, 1.0, 3.0), "adamw": (3e-4, 1e-3, 3e-3)},
            steps=120, batch_size=16, eval_every=30, curve_examples=300, test_examples=1000, sweep_examples=500,
            overrides={"model.name": "minilm", "data.task": "rotten_tomatoes", "data.max_length": 128,
                       **MINILM_ADAPTER},
        ),
        TaskSpec(
            key="rt-smollm2", title="Rotten Tomatoes, SmolLM2-135M-Instruct (next-token answer)", kind="train",
            rows={"adamw": (*MOE_ROWS, "lora"), "sgd": ("riem", "riem_p05")},
            lrs={"sgd": (0.01, 0.03), "adamw": (3e-4, 1e-3, 3e-3)},
            steps=40, batch_size=8, eval_every=10, curve_examples=100, test_examples=600, sweep_examples=200,
            overrides={"model.name": "smollm2-135m-instruct", "data.task": "rotten_tomatoes",
                       "data.max_length": 160, **SMOLLM2_ADAPTER},
            zero_shot=True,
        ),
        TaskSpec(
            key="siqa-smollm2", title="Social IQa, SmolLM2-135M-Instruct (answer text scored by log-likelihood)",
            kind="train", rows={"adamw": MOE_ROWS},
            lrs={"adamw": (3e-4, 1e-3, 3e-3)},
            steps=40, batch_size=8, eval_every=20, curve_examples=60, test_examples=500, sweep_examples=190,
            overrides={"model.name": "smollm2-135m-instruct", "data.task": "siqa",
                       "data.options": {"answer_format": "text"}, "data.max_length": 192, **SMOLLM2_ADAPTER},
            zero_shot=True,
        ),
    )}


def quick_tasks() -> dict[str, TaskSpec]:
    """``--quick`` (under 15 minutes): the synthetic task with fewer learning-rate candidates, and the paper's
    comparison (baseline against its method, AdamW, 3 seeds) on Rotten Tomatoes with MiniLM."""
    full = full_tasks()
    synthetic = dataclasses.replace(
        full["synthetic"], lrs={"sgd": (0.03, 0.3, 3.0), "adamw": (3e-3, 3e-2, 3e-1)}, steps=200,
    )
    # Same settings as the full grid's MiniLM task (so its runs are shared through the cache): the paper's
    # baseline against its method under AdamW, at one learning rate from the full grid's candidates.
    minilm = dataclasses.replace(full["rt-minilm"], rows={"adamw": ("riem", "riem_p05")}, lrs={"adamw": (1e-3,)})
    return {"synthetic": synthetic, "rt-minilm": minilm}


@dataclass(frozen=True)
class Cell:
    """One run. ``lr is None`` only for a main cell whose sweep has not finished yet."""

    task: str
    optimizer: str
    method: str
    seed: int
    stage: str
    lr: float | None

    @property
    def name(self) -> str:
        lr = "lr-pending" if self.lr is None else f"lr{self.lr:g}"
        return f"{self.task}/{self.stage}/{self.optimizer}-{self.method}/{lr}-seed{self.seed}"


@dataclass
class Grid:
    tasks: dict[str, TaskSpec]
    seeds: tuple[int, ...]
    quick: bool = False

    def pairs(self, task: str) -> list[tuple[str, str]]:
        """The (optimizer, method) cells of ``task`` in run order (``OPTIMIZER_PRIORITY``, ``PRIORITY``)."""
        rows = self.tasks[task].rows
        return [(opt, m) for opt in OPTIMIZER_PRIORITY if opt in rows for m in PRIORITY if m in rows[opt]]

    def work_order(self) -> list[tuple[str, tuple[str, str]]]:
        """Every (task, (optimizer, method)) of the grid in the order the runner starts them: the paper's
        comparison (its baseline and its method under AdamW) on every task, then the other MoE-LoRA rows
        the issue keeps on the slow tasks (AdamW), then every other row, task by task. A sitting that ends
        early thus leaves whole cells of the most important rows."""
        tiers = (("riem", "riem_p05"), MOE_ROWS)
        order: list[tuple[str, tuple[str, str]]] = []
        for rows in tiers:
            order += [(task, pair) for task in self.tasks for pair in self.pairs(task)
                      if pair[0] == "adamw" and pair[1] in rows and (task, pair) not in order]
        order += [(task, pair) for task in self.tasks for pair in self.pairs(task) if (task, pair) not in order]
        return order

    def sweep_cells(self, task: str, pair: tuple[str, str] | None = None) -> list[Cell]:
        spec = self.tasks[task]
        pairs = [pair] if pair else self.pairs(task)
        return [Cell(task, opt, method, SWEEP_SEED + i, SWEEP, lr)
                for opt, method in pairs for lr in spec.lrs[opt] for i in range(spec.sweep_seeds)]

    def main_cells(self, task: str, chosen: dict[tuple[str, str], float] | None = None,
                   pair: tuple[str, str] | None = None) -> list[Cell]:
        chosen = chosen or {}
        pairs = [pair] if pair else self.pairs(task)
        return [Cell(task, opt, method, seed, MAIN, chosen.get((opt, method)))
                for opt, method in pairs for seed in self.seeds]


def build_grid(quick: bool = False, tasks: list[str] | None = None, seeds: int = 3) -> Grid:
    """The grid of ``--quick`` or the full run, restricted to ``tasks`` (all when ``None``)."""
    available = quick_tasks() if quick else full_tasks()
    if tasks:
        unknown = [t for t in tasks if t not in available]
        if unknown:
            raise ConfigError(f"unknown task(s) {unknown}; choose from {', '.join(available)}")
        available = {k: v for k, v in available.items() if k in tasks}
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    return Grid(tasks=available, seeds=tuple(range(seeds)), quick=quick)


def cell_overrides(spec: TaskSpec, cell: Cell) -> dict[str, Any]:
    """The ``RunConfig`` values (dotted keys) of a real-model cell, without ``output_dir``."""
    if cell.lr is None:
        raise ValueError(f"{cell.name}: the learning rate is not chosen yet")
    method = METHODS[cell.method]
    values: dict[str, Any] = dict(_LOOP)
    values.update(spec.overrides)
    values.update({
        "optim.name": cell.optimizer, "optim.preconditioner": method.preconditioner, "optim.lr": cell.lr,
        "optim.router_lr": cell.lr * ROUTER_LR_RATIO[cell.optimizer], "optim.weight_decay": 0.0,
        "adapter.gate_backward_power": method.gate_power,
        "train.steps": spec.steps, "train.batch_size": spec.batch_size, "train.seed": cell.seed,
        "data.subset_seed": cell.seed, "eval.zero_shot": False,
    })
    if cell.stage == SWEEP:
        # Only the final validation number matters; the test split is not looked at.
        values.update({"train.eval_every": spec.steps, "train.eval_examples": spec.sweep_examples,
                       "data.max_eval": max(spec.sweep_examples, 1)})
    else:
        values.update({"train.eval_every": spec.eval_every, "train.eval_examples": spec.curve_examples,
                       "data.max_eval": max(spec.test_examples, spec.curve_examples)})
    if method.single_lora:
        experts, rank, alpha = values["adapter.num_experts"], values["adapter.rank"], values["adapter.alpha"]
        values.update({"adapter.num_experts": 1, "adapter.top_k": 1, "adapter.rank": experts * rank,
                       "adapter.alpha": alpha * experts})
    return values


def config_hash(values: dict[str, Any]) -> str:
    """A short stable hash of a cell's settings: a changed setting gets a new cache folder."""
    text = json.dumps(values, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]
