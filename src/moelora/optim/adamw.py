"""Scaled AdamW: AdamW run on the preconditioned expert gradients (method.md section 6)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch

from ..layers import kernels
from .base import RiemannianOptimizer, SolvedFactors
from .groups import SIDE_A
from .sharding import is_sharded

# Passed to the fused kernel as the step count when bias correction is off: it computes
# 1 - beta ** step, and beta ** inf == 0 exactly for 0 <= beta < 1 (IEEE 754 pow), so both corrections are 1.
_NO_BIAS_CORRECTION_STEP = float("inf")


class RiemannianAdamW(RiemannianOptimizer):
    """AdamW on per-expert Riemannian-preconditioned gradients.

    For each expert factor ``theta`` with preconditioned gradient ``u = precond(dL/dtheta)``
    (``moelora.optim.precondition``; ``u = dL/dtheta`` for routers, other parameters and ``"none"``):

        theta <- theta (1 - lr wd)                                  decoupled weight decay
        m     <- beta1 m + (1 - beta1) u
        v     <- beta2 v + (1 - beta2) u^2
        theta <- theta - lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)  bc_k = 1 - beta_k^t (or 1 without
                                                                    bias correction)

    which is exactly ``torch.optim.AdamW`` when ``preconditioner="none"``.

    Args:
        params: parameters or parameter groups, normally ``moelora.optim.param_groups(model, lr, ...)``.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (weight decay 1e-2 by default there and
            here: ``param_groups`` sets each group's own value).
        preconditioner: ``"riemannian"`` (per-expert classic), ``"gate_rescaled"`` (Gram matrices scaled by
            ``c^2``, method.md section 4) or ``"none"`` (plain AdamW).
        reg: damping of every ``r x r`` system, > 0 (the papers use 1e-6).
        gate_floor: lower bound of ``c^2 = mean_t g_t^2`` for ``"gate_rescaled"``.
        max_grad_norm: clip each group's gradients by their joint norm (``param_groups`` sets it on the
            router group only, from ``router_max_grad_norm``).
        bias_correction: divide by ``1 - beta^t``. The paper's code runs without it, with ``eps=1e-6``.
        b_from_updated_a: precondition each ``B`` with ``A A^T`` of the already-updated ``A``, as the
            paper's code does; by default both Gram matrices come from the weights before the step.
        fused: ``True``: torch's fused AdamW kernel for the moment updates (CPU and CUDA); ``False``: the
            foreach kernels; ``None`` (default): on a CPU, lists of small float32 tensors take the compiled
            single-threaded loop (``moelora.layers.kernels.adamw``, the same arithmetic without one
            thread-pool wake-up per tensor), and preconditioned expert factors the same loop fused with the
            preconditioner (``kernels.precondition_adamw``: the preconditioned gradient is never stored),
            other tensors on a CPU or CUDA device torch's fused kernel, everything else the foreach kernels.

    To reproduce the paper's runs exactly: ``bias_correction=False, eps=1e-6, weight_decay=0,
    b_from_updated_a=True``.

    State per parameter (``self.state[p]``, as ``torch.optim.AdamW`` but with ``step`` a Python float):
    ``step``, ``exp_avg``, ``exp_avg_sq`` (like ``p``).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        preconditioner: str = "riemannian",
        reg: float = 1e-6,
        gate_floor: float = 1e-4,
        max_grad_norm: float | None = None,
        bias_correction: bool = True,
        b_from_updated_a: bool = False,
        fused: bool | None = None,
    ) -> None:
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"betas must be in [0, 1), got {betas!r}")
        if not eps >= 0.0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            preconditioner=preconditioner,
            reg=reg,
            gate_floor=gate_floor,
            max_grad_norm=max_grad_norm,
            bias_correction=bias_correction,
            b_from_updated_a=bool(b_from_updated_a),
            fused=fused,
        )
        super().__init__(params, defaults)

    def _moments(self, params: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor], list[float]]:
        """Each parameter's ``exp_avg`` and ``exp_avg_sq`` (created as zeros on its first step) and its step
        count, advanced by one."""
        exp_avgs, exp_avg_sqs, steps = [], [], []
        for param in params:
            state = self.state[param]
            if not state:
                state["step"] = 0.0
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            # A Python number, not torch's 0-d tensor: incrementing hundreds of those costs a kernel each.
            state["step"] = float(state["step"]) + 1.0
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        return exp_avgs, exp_avg_sqs, steps

    def _update_preconditioned(self, group: dict[str, Any], solved: SolvedFactors) -> bool:
        # On a CPU, float32 factors take one compiled pass per rank that forms each block of the
        # preconditioned gradient on the stack and updates it at once (the floats of preconditioning, then
        # _update); anything else, or a group with fused set, takes the plain route.
        if group["fused"] is not None:
            return False
        params, grads, inverses = solved.params, solved.grads, solved.inverses
        of_a = [f.side == SIDE_A for f in solved.factors]
        by_rank: dict[int, list[int]] = defaultdict(list)
        for i, inverse in enumerate(inverses):
            by_rank[inverse.shape[-1]].append(i)
        buckets = [([params[i] for i in index], [of_a[i] for i in index], [inverses[i] for i in index],
                    [grads[i] for i in index]) for index in by_rank.values()]
        moments = [state[key] for p in params if (state := self.state.get(p)) for key in ("exp_avg", "exp_avg_sq")]
        if not all(kernels.precondition_adamw_applies(*bucket, moments) for bucket in buckets):
            return False
        scale = 1.0 if solved.clip is None else float(solved.clip)
        beta1, beta2 = group["betas"]
        for bucket_params, bucket_of_a, bucket_inverses, bucket_grads in buckets:
            exp_avgs, exp_avg_sqs, steps = self._moments(bucket_params)
            step_sizes, bias_correction2_sqrts = _step_sizes(steps, group)
            kernels.precondition_adamw(bucket_params, bucket_of_a, bucket_inverses, [scale] * len(bucket_params),
                                       bucket_grads, exp_avgs, exp_avg_sqs, step_sizes, bias_correction2_sqrts,
                                       float(group["lr"]), group["weight_decay"], beta1, beta2, group["eps"])
        return True

    def _update(self, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        exp_avgs, exp_avg_sqs, steps = self._moments(params)
        # The kernels take lists of one device and dtype.
        buckets: dict[tuple, list[int]] = defaultdict(list)
        for i, param in enumerate(params):
            buckets[(param.device, param.dtype, grads[i].dtype)].append(i)
        for (device, dtype, grad_dtype), index in buckets.items():
            tensors = [[xs[i] for i in index] for xs in (params, grads, exp_avgs, exp_avg_sqs)]
            args = (*tensors, [steps[i] for i in index], group)
            # DTensors (FSDP2) take the foreach kernels, which they implement shard by shard.
            if group["fused"] is None and kernels.adamw_applies(*tensors):
                _compiled_adamw(*args)
            elif not is_sharded(params[index[0]]) and _use_fused(group["fused"], device, dtype, grad_dtype):
                _fused_adamw(*args)
            else:
                _foreach_adamw(*args)


def _use_fused(fused: bool | None, device: torch.device, dtype: torch.dtype, grad_dtype: torch.dtype) -> bool:
    supported = device.type in ("cpu", "cuda") and dtype == grad_dtype and dtype.is_floating_point
    if fused and not supported:
        raise RuntimeError(
            f"fused=True needs float parameters on CPU or CUDA with gradients of the same dtype, got "
            f"{dtype} parameters on {device.type} with {grad_dtype} gradients; use fused=None or False"
        )
    return supported if fused is None else bool(fused)


def _fused_adamw(params, grads, exp_avgs, exp_avg_sqs, steps, group) -> None:
    beta1, beta2 = group["betas"]
    device = params[0].device
    if not group["bias_correction"]:
        steps = [_NO_BIAS_CORRECTION_STEP] * len(steps)
    # The kernel reads (never writes) one step tensor per parameter; parameters that share a step
    # count (normally all of them) share one tensor.
    tensors = {t: torch.tensor(t, dtype=torch.float32, device=device) for t in set(steps)}
    # It also walks raw memory and assumes every tensor is contiguous.
    grads = [g if g.is_contiguous() else g.contiguous() for g in grads]
    torch._fused_adamw_(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        [],
        [tensors[t] for t in steps],
        amsgrad=False,
        lr=float(group["lr"]),
        beta1=beta1,
        beta2=beta2,
        weight_decay=group["weight_decay"],
        eps=group["eps"],
        maximize=False,
    )


def _step_sizes(steps: list[float], group: dict[str, Any]) -> tuple[list[float], list[float]]:
    """``lr / (1 - beta1^t)`` and ``sqrt(1 - beta2^t)`` per step count ``t`` (``lr`` and 1 without bias
    correction), as the compiled kernels take them."""
    beta1, beta2 = group["betas"]
    lr = float(group["lr"])
    if not group["bias_correction"]:
        return [lr] * len(steps), [1.0] * len(steps)
    return [lr / (1 - beta1**t) for t in steps], [math.sqrt(1 - beta2**t) for t in steps]


def _compiled_adamw(params, grads, exp_avgs, exp_avg_sqs, steps, group) -> None:
    # The same update as _fused_adamw, through the compiled CPU loop (one call for every tensor).
    step_sizes, bias_correction2_sqrts = _step_sizes(steps, group)
    beta1, beta2 = group["betas"]
    kernels.adamw(params, grads, exp_avgs, exp_avg_sqs, step_sizes, bias_correction2_sqrts, float(group["lr"]),
                  group["weight_decay"], beta1, beta2, group["eps"])


def _foreach_adamw(params, grads, exp_avgs, exp_avg_sqs, steps, group) -> None:
    # The same sequence of kernels as torch.optim.AdamW(foreach=True), so "none" reproduces it.
    beta1, beta2 = group["betas"]
    lr, weight_decay, eps = group["lr"], group["weight_decay"], group["eps"]
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    if group["bias_correction"]:
        step_sizes = [-lr / (1 - beta1**t) for t in steps]
        torch._foreach_div_(denom, [math.sqrt(1 - beta2**t) for t in steps])
    else:
        step_sizes = [-lr] * len(params)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, step_sizes)
