"""Scaled gradient descent: SGD on the preconditioned expert gradients (method.md section 6)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .base import RiemannianOptimizer


class RiemannianSGD(RiemannianOptimizer):
    """SGD (optionally with momentum) on per-expert Riemannian-preconditioned gradients.

    For each expert factor ``theta`` with preconditioned gradient ``u = precond(dL/dtheta)``
    (``moelora.optim.precondition``; ``u = dL/dtheta`` for routers, other parameters and ``"none"``):

        d     <- u + wd theta                          weight decay, added after preconditioning
        buf   <- momentum buf + (1 - dampening) d      (buf = d at the first step; skipped if momentum = 0)
        d     <- d + momentum buf if nesterov else buf
        theta <- theta - lr d

    which is exactly ``torch.optim.SGD`` when ``preconditioner="none"``. Without momentum the decay is the
    decoupled ``theta <- theta (1 - lr wd) - lr u``: it is never preconditioned. The paper's scaled GD is
    ``momentum=0, weight_decay=0``.

    Args:
        params: parameters or parameter groups, normally ``moelora.optim.param_groups(model, lr, ...)``.
        lr, momentum, dampening, weight_decay, nesterov: as ``torch.optim.SGD``.
        preconditioner: ``"riemannian"`` (per-expert classic), ``"gate_rescaled"`` (Gram matrices scaled by
            ``c^2``, method.md section 4) or ``"none"`` (plain SGD).
        reg: damping of every ``r x r`` system, > 0 (the papers use 1e-6).
        gate_floor: lower bound of ``c^2 = mean_t g_t^2`` for ``"gate_rescaled"``.
        max_grad_norm: clip each group's gradients by their joint norm (``param_groups`` sets it on the
            router group only, from ``router_max_grad_norm``).

    State per parameter (``self.state[p]``, as ``torch.optim.SGD``): ``momentum_buffer`` when momentum is on.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        preconditioner: str = "riemannian",
        reg: float = 1e-6,
        gate_floor: float = 1e-4,
        max_grad_norm: float | None = None,
    ) -> None:
        if not momentum >= 0.0:
            raise ValueError(f"momentum must be >= 0, got {momentum!r}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov momentum needs momentum > 0 and dampening = 0")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            preconditioner=preconditioner,
            reg=reg,
            gate_floor=gate_floor,
            max_grad_norm=max_grad_norm,
        )
        super().__init__(params, defaults)

    def _update(self, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
        if weight_decay != 0:
            grads = list(torch._foreach_add(grads, params, alpha=weight_decay))  # out of place: grads may be .grad
        if momentum != 0:
            bufs, fresh = [], []
            for param, grad in zip(params, grads):
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = grad.detach().clone()
                    fresh.append(True)
                else:
                    fresh.append(False)
                bufs.append(state["momentum_buffer"])
            old = [b for b, new in zip(bufs, fresh) if not new]
            if old:
                torch._foreach_mul_(old, momentum)
                torch._foreach_add_(old, [g for g, new in zip(grads, fresh) if not new], alpha=1 - group["dampening"])
            grads = list(torch._foreach_add(grads, bufs, alpha=momentum)) if group["nesterov"] else bufs
        torch._foreach_add_(params, grads, alpha=-lr)
