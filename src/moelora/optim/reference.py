"""Slow, obviously-correct references of the optimizers: one expert at a time, explicit inverses.

Written straight from method.md sections 4 and 6, with none of the batching of the fast optimizers:
a Python loop over parameters and over experts, ``torch.linalg.inv`` of each damped ``r x r`` matrix in
float64, and the textbook update formulas. Tests compare the fast optimizers against these; the
optimizer benchmark uses ``ReferenceRiemannianAdamW`` as its per-expert-loop baseline.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from ..layers.linear import layer_of
from .groups import SIDE_A, expert_factor


class _Reference(Optimizer):
    def __init__(self, params: Iterable, defaults: dict[str, Any], b_from_updated_a: bool = False) -> None:
        defaults = {"preconditioner": "riemannian", "reg": 1e-6, "gate_floor": 1e-4, "max_grad_norm": None, **defaults}
        self.b_from_updated_a = b_from_updated_a
        super().__init__(params, defaults)

    def preconditioned(self, param: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        """``param.grad`` preconditioned expert by expert (a copy; unchanged if not an expert factor)."""
        assert param.grad is not None  # only parameters with a gradient are preconditioned
        grad = param.grad.detach().clone()
        factor = expert_factor(param, layer_of(param))
        if factor is None or group["preconditioner"] == "none":
            return grad
        layer = factor.layer
        out = torch.empty_like(grad)
        mean = layer.gate_sq_mean()  # (E,) sum_t g_t^2 / n_tokens
        for e in range(layer.num_experts):
            c2 = max(float(mean[e]), group["gate_floor"]) if group["preconditioner"] == "gate_rescaled" else 1.0
            eye = torch.eye(layer.rank, dtype=torch.float64)
            if factor.side == SIDE_A:
                b = layer.lora_B[e].detach().double()
                inverse = torch.linalg.inv(c2 * b.T @ b + group["reg"] * eye)
                out[e] = (inverse @ grad[e].double()).to(grad.dtype)
            else:
                a = layer.lora_A[e].detach().double()
                inverse = torch.linalg.inv(c2 * a @ a.T + group["reg"] * eye)
                out[e] = (grad[e].double() @ inverse).to(grad.dtype)
        return out

    def update(self, param: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]) -> None:
        """Apply the base update rule (SGD or AdamW) with the preconditioned ``grad``."""
        raise NotImplementedError

    def clip_scale(self, group: dict[str, Any]) -> float:
        if group["max_grad_norm"] is None:
            return 1.0
        norm = math.sqrt(sum(float(p.grad.double().square().sum()) for p in group["params"] if p.grad is not None))
        return min(1.0, group["max_grad_norm"] / (norm + 1e-6))

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("the reference optimizers take no closure")
        todo = []
        for group in self.param_groups:
            scale = self.clip_scale(group)
            for param in group["params"]:
                if param.grad is not None:
                    todo.append((param, group, scale))
        is_b = lambda p: (f := expert_factor(p, layer_of(p))) is not None and f.side != SIDE_A  # noqa: E731
        if self.b_from_updated_a:
            # A and every plain parameter first; then each B, preconditioned with its updated A.
            first = [(p, g, s, self.preconditioned(p, g) * s) for p, g, s in todo if not is_b(p)]
            for param, group, _, grad in first:
                self.update(param, grad, group)
            for param, group, scale in todo:
                if is_b(param):
                    self.update(param, self.preconditioned(param, group) * scale, group)
        else:
            directions = [(p, g, self.preconditioned(p, g) * s) for p, g, s in todo]
            for param, group, grad in directions:
                self.update(param, grad, group)
        for group in self.param_groups:
            for param in group["params"]:
                factor = expert_factor(param, layer_of(param))
                if factor is not None:
                    factor.layer.reset_gate_stats()


class ReferenceRiemannianSGD(_Reference):
    """``RiemannianSGD``, one parameter and one expert at a time."""

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, **options):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov)
        super().__init__(params, {**defaults, **options})

    def update(self, param: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]) -> None:
        d = grad + group["weight_decay"] * param
        if group["momentum"]:
            state = self.state[param]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = d.clone()
            else:
                state["momentum_buffer"] = group["momentum"] * state["momentum_buffer"] + (1 - group["dampening"]) * d
            buf = state["momentum_buffer"]
            d = d + group["momentum"] * buf if group["nesterov"] else buf
        param.sub_(group["lr"] * d)


class ReferenceRiemannianAdamW(_Reference):
    """``RiemannianAdamW``, one parameter and one expert at a time."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, bias_correction=True,
                 b_from_updated_a=False, **options):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, bias_correction=bias_correction)
        super().__init__(params, {**defaults, **options}, b_from_updated_a=b_from_updated_a)

    def update(self, param: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        state = self.state[param]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(param)
            state["exp_avg_sq"] = torch.zeros_like(param)
        state["step"] += 1
        t = state["step"]
        param.mul_(1 - group["lr"] * group["weight_decay"])
        state["exp_avg"] = beta1 * state["exp_avg"] + (1 - beta1) * grad
        state["exp_avg_sq"] = beta2 * state["exp_avg_sq"] + (1 - beta2) * grad * grad
        bc1, bc2 = (1 - beta1**t, 1 - beta2**t) if group["bias_correction"] else (1.0, 1.0)
        denom = state["exp_avg_sq"].sqrt() / math.sqrt(bc2) + group["eps"]
        param.sub_(group["lr"] / bc1 * state["exp_avg"] / denom)
