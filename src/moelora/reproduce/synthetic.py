"""Synthetic teacher-student regression: a MoE-LoRA layer learns a known mixture of low-rank maps.

Teacher (fixed by ``TEACHER_SEED``, the same for every run)::

    x = [z, 1],  z ~ N(0, I_{d-1})                                    (the constant feature biases routing)
    g(x) = renormalised top-k softmax(R x)                            R: (E, d)
    y = sum_i g_i(x) M*_i x,   M*_i = B*_i A*_i  (d_out x d, rank r)

The router's column on the constant feature is spread over ``[+bias_spread, -bias_spread]``, so experts
are routed with very different gate sizes: that is what makes the gate weights of method.md section 5
(``g^2`` for per-expert Riemannian, ``g^1.5`` with the engineering strategy, ``1`` gate-rescaled) show up as
different learning speeds of the experts.

Student: ``MoELoRALinear`` on a frozen zero linear map, with the teacher's router copied and frozen
(routing is known; only the experts learn), LoRA init of the experts (``A`` random per run seed, ``B = 0``),
and the same ``E, top_k, r`` as the teacher. The single-LoRA row is one expert of rank ``E * r``: it cannot
represent the input-dependent mixture and plateaus.

Metric: relative mean squared error ``sum ||y_hat - y||^2 / sum ||y||^2`` on fixed held-out inputs
(validation for the curves and the learning-rate sweep, test for the final number). Per expert, the
relative error ``||M_i - M*_i||_F / ||M*_i||_F`` of its map ``M_i = s B_i A_i`` is logged with the gate
moments ``E_x[g_i^q]`` (q = 1, 1.5, 2): ``gate_weights.py`` turns them into per-expert learning speeds.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..layers.linear import MoELoRALinear
from ..optim import RiemannianAdamW, RiemannianSGD, param_groups

TEACHER_SEED = 12345
VALIDATION_SEED = 777
TEST_SEED = 778


class Diverged(RuntimeError):
    """The training loss became non-finite."""


@dataclass(frozen=True)
class SyntheticSetup:
    """Sizes of the teacher and student. Defaults: a run takes a few seconds on one CPU thread."""

    d_in: int = 32  # including the constant feature
    d_out: int = 32
    num_experts: int = 8
    top_k: int = 4
    rank: int = 2
    alpha: float = 2.0
    bias_spread: float = 2.0
    router_std: float = 1.0
    n_validation: int = 2048
    n_test: int = 4096


def sample_inputs(n: int, d_in: int, generator: torch.Generator) -> torch.Tensor:
    """``(n, d_in)``: standard normal features and a last constant feature equal to 1."""
    z = torch.randn(n, d_in - 1, generator=generator, dtype=torch.float64)
    return torch.cat([z, torch.ones(n, 1, dtype=torch.float64)], dim=1).float()


class Teacher:
    """The known mixture: router ``R`` (E, d_in) and expert maps ``M*`` (E, d_out, d_in) of rank ``r``."""

    def __init__(self, setup: SyntheticSetup, seed: int = TEACHER_SEED) -> None:
        self.setup = setup
        gen = torch.Generator().manual_seed(seed)
        e, d, k, r = setup.num_experts, setup.d_in, setup.d_out, setup.rank
        router = torch.randn(e, d, generator=gen, dtype=torch.float64) * setup.router_std / math.sqrt(d - 1)
        router[:, -1] = torch.linspace(setup.bias_spread, -setup.bias_spread, e, dtype=torch.float64)
        self.router = router.float()
        a = torch.randn(e, r, d, generator=gen, dtype=torch.float64) / math.sqrt(d)
        b = torch.randn(e, k, r, generator=gen, dtype=torch.float64) / math.sqrt(r)
        self.factors_a, self.factors_b = a.float(), b.float()  # (E, r, d_in), (E, d_out, r)
        self.maps = (b @ a).float()  # (E, d_out, d_in)

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """``(n, E)`` renormalised top-k gates (the student's router computes the same)."""
        from ..layers.routing import top_k_gates

        return top_k_gates(x @ self.router.t(), self.setup.top_k).float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        per_expert = torch.einsum("eod,nd->neo", self.maps, x)  # (n, E, d_out)
        return (self.gates(x).unsqueeze(-1) * per_expert).sum(1)

    def gate_moments(self, x: torch.Tensor, powers: tuple[float, ...] = (1.0, 1.5, 2.0)) -> dict[str, list[float]]:
        """Per expert, ``E_x[g_i^q]`` (unselected experts count as 0) and the selection frequency."""
        g = self.gates(x)
        out = {f"g^{q:g}": [float(v) for v in torch.where(g > 0, g.pow(q), torch.zeros_like(g)).mean(0)]
               for q in powers}
        out["selected"] = [float(v) for v in (g > 0).float().mean(0)]
        return out


def build_student(setup: SyntheticSetup, teacher: Teacher, gate_power: float, single_lora: bool,
                  seed: int) -> MoELoRALinear:
    """The student layer (frozen zero base map, frozen teacher router); ``A`` drawn from ``seed``."""
    base = nn.Linear(setup.d_in, setup.d_out, bias=False)
    nn.init.zeros_(base.weight)
    base.requires_grad_(False)
    if single_lora:
        experts, top_k, rank, alpha = 1, 1, setup.num_experts * setup.rank, setup.alpha * setup.num_experts
    else:
        experts, top_k, rank, alpha = setup.num_experts, setup.top_k, setup.rank, setup.alpha
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        layer = MoELoRALinear(base, experts, top_k, rank, alpha, dropout=0.0, gate_backward_power=gate_power)
    with torch.no_grad():
        if not single_lora:
            layer.router.weight.copy_(teacher.router)
    layer.router.weight.requires_grad_(False)
    return layer


def relative_mse(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(((layer(x) - y).square().sum() / y.square().sum()).item())


def expert_errors(layer: MoELoRALinear, teacher: Teacher) -> list[float]:
    """Per expert, ``||s B_i A_i - M*_i||_F / ||M*_i||_F`` (empty for the single LoRA)."""
    if layer.num_experts != teacher.setup.num_experts:
        return []
    with torch.no_grad():
        maps = layer.scaling * (layer.lora_B @ layer.lora_A)
        err = (maps - teacher.maps).flatten(1).norm(dim=1) / teacher.maps.flatten(1).norm(dim=1)
    return [float(v) for v in err]


def train_synthetic(*, optimizer: str, preconditioner: str, gate_power: float, single_lora: bool, lr: float,
                    seed: int, steps: int, batch_size: int, eval_every: int,
                    setup: SyntheticSetup | None = None, evaluate_test: bool = True) -> dict[str, Any]:
    """Train one student; returns the curves and final numbers (raises ``Diverged`` on a non-finite loss).

    Constant learning rate, no weight decay, plain SGD (no momentum) or AdamW (betas 0.9 / 0.999).
    Training inputs are fresh at every step (drawn from ``seed``): the training loss is itself a
    held-out estimate.
    """
    setup = setup or SyntheticSetup()
    teacher = Teacher(setup)
    layer = build_student(setup, teacher, gate_power, single_lora, seed)
    layer.train()
    groups = param_groups(layer, lr=lr)
    # Any: the options are shared by two constructors whose other parameters have different types.
    common: dict[str, Any] = dict(lr=lr, weight_decay=0.0, preconditioner=preconditioner)
    opt = RiemannianSGD(groups, **common) if optimizer == "sgd" else RiemannianAdamW(groups, **common)

    val_x = sample_inputs(setup.n_validation, setup.d_in, torch.Generator().manual_seed(VALIDATION_SEED))
    val_y = teacher(val_x)
    data_gen = torch.Generator().manual_seed(seed)
    events: list[dict[str, Any]] = []

    def log_eval(step: int) -> None:
        events.append({"step": step, "split": "validation", "value": relative_mse(layer, val_x, val_y),
                       "expert_errors": expert_errors(layer, teacher)})

    start = time.perf_counter()
    log_eval(0)
    for step in range(1, steps + 1):
        x = sample_inputs(batch_size, setup.d_in, data_gen)
        y = teacher(x)
        loss = (layer(x) - y).square().sum(-1).mean() / 2
        value = float(loss.item())
        if not math.isfinite(value):
            raise Diverged(f"non-finite training loss at step {step} (lr {lr:g})")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        # Relative training MSE of this (fresh) batch before the step.
        events.append({"step": step, "loss": value * 2 / float(y.square().sum(-1).mean())})
        if step % eval_every == 0 or step == steps:
            log_eval(step)
            if not math.isfinite(events[-1]["value"]):
                raise Diverged(f"non-finite validation error at step {step} (lr {lr:g})")
    result: dict[str, Any] = {
        "events": events,
        "validation": events[-1]["value"],
        "train_time_s": time.perf_counter() - start,
        "setup": asdict(setup),
        "gate_moments": teacher.gate_moments(val_x),
    }
    if evaluate_test:
        test_x = sample_inputs(setup.n_test, setup.d_in, torch.Generator().manual_seed(TEST_SEED))
        result["test"] = relative_mse(layer, test_x, teacher(test_x))
    return result


def write_jsonl(path: Path, events: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
