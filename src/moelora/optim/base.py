"""The step shared by ``RiemannianSGD`` and ``RiemannianAdamW``: precondition, then hand over to the update.

One ``step()``:

1. clip each group's gradients by their joint norm if the group has ``max_grad_norm`` (the router group);
2. precondition the gradients of every expert factor in a group whose ``preconditioner`` is not ``"none"``
   (``moelora.optim.precondition``; all r x r systems of all groups solved in batches);
3. run the base update (``_update``, SGD or AdamW with foreach / fused kernels) on the preconditioned
   gradients of the experts and the plain gradients of everything else;
4. reset the gate statistics of every ``MoELoRALinear`` the optimizer trains, whatever the preconditioner,
   so that they cover exactly the forwards since the last step and never grow without bound.

``.grad`` is never modified. Parameters whose ``.grad`` is ``None`` are skipped; a zero gradient (an
expert no token was routed to) is a gradient like any other. Runtime references to layers are rebuilt at
every step from the parameters themselves (``moelora.layers.linear.layer_of``), so parameter groups stay plain
dictionaries and ``state_dict`` / ``load_state_dict`` are torch's own.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.optim import Optimizer

from ..config import PRECONDITIONERS
from ..layers.linear import MoELoRALinear, layer_of
from .groups import GROUP_KINDS, SIDE_A, SIDE_B, ExpertFactor, expert_factor
from .precondition import GATE_RESCALED, NONE, gate_sq_means, precondition


@dataclass
class _GroupWork:
    """What one step does with one parameter group (rebuilt at every step, never stored)."""

    group: dict[str, Any]
    plain: list[torch.Tensor] = field(default_factory=list)
    plain_grads: list[torch.Tensor] = field(default_factory=list)
    factors: list[ExpertFactor] = field(default_factory=list)
    factor_grads: list[torch.Tensor] = field(default_factory=list)
    clip: torch.Tensor | None = None  # gradient multiplier from max_grad_norm, (), or None


class RiemannianOptimizer(Optimizer):
    """Base class: preconditioning and the step skeleton. Subclasses define ``_update``.

    Group options common to all subclasses (defaults from the constructor):

    - ``preconditioner``: ``"none"``, ``"riemannian"`` or ``"gate_rescaled"``;
    - ``reg``: damping added to the diagonal of every ``r x r`` system (> 0);
    - ``gate_floor``: lower bound of ``c^2`` for ``"gate_rescaled"`` (> 0);
    - ``max_grad_norm``: clip the group's gradients by their joint 2-norm first (``None``: no clipping);
    - ``kind``: ``"experts"``, ``"router"`` or ``"other"`` (as ``param_groups`` sets it); informational,
      since only expert factors are ever preconditioned.

    ``b_from_updated_a`` (the update order of method.md section 6) is a whole-step option, read from the
    constructor's defaults.
    """

    def __init__(self, params: Iterable, defaults: dict[str, Any]) -> None:
        # Every option lives in ``defaults`` (and so in each group), none in instance attributes: torch's
        # Optimizer pickles and deep-copies only defaults, state and param_groups.
        defaults = {
            "preconditioner": "riemannian",
            "reg": 1e-6,
            "gate_floor": 1e-4,
            "max_grad_norm": None,
            "b_from_updated_a": False,
            **defaults,
        }
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        _validate_group(self.param_groups[-1])

    # ------------------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimizer step; ``closure`` (optional) re-evaluates the loss with gradients enabled."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work, layers = self._plan()
        means = self._gate_means(work)
        preconditioned = [w for w in work if w.factors]
        if not self.defaults["b_from_updated_a"]:
            for w, grads in zip(preconditioned, self._precondition(preconditioned, means)):
                w.plain, w.plain_grads = w.plain + [f.param for f in w.factors], w.plain_grads + grads
            for w in work:
                self._update_group(w, w.plain, w.plain_grads)
        else:
            # The reference code's order (method.md section 6): update every A first, then precondition
            # each B with the Gram matrix of its already-updated A.
            a_side = [_select(w, SIDE_A) for w in preconditioned]
            b_side = [_select(w, SIDE_B) for w in preconditioned]
            for w, grads in zip(a_side, self._precondition(a_side, means)):
                self._update_group(w, [f.param for f in w.factors], grads)
            for w in work:
                self._update_group(w, w.plain, w.plain_grads)
            for w, grads in zip(b_side, self._precondition(b_side, means)):
                self._update_group(w, [f.param for f in w.factors], grads)
        for layer in layers:
            layer.reset_gate_stats()
        return loss

    def _update(self, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        """Apply the base update to ``params`` given their (possibly preconditioned) ``grads``.

        ``grads`` may alias ``.grad`` tensors: implementations must not write to them.
        """
        raise NotImplementedError

    # ---------------------------------------------------------------------------------------- helpers
    def _plan(self) -> tuple[list[_GroupWork], list[MoELoRALinear]]:
        """Sort each group's parameters with a gradient into plain ones and expert factors to precondition."""
        work = []
        layers: dict[int, MoELoRALinear] = {}
        for group in self.param_groups:
            w = _GroupWork(group)
            precondition_group = group["preconditioner"] != NONE
            for param in group["params"]:
                layer = layer_of(param)
                if layer is not None:
                    layers[id(layer)] = layer
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                factor = expert_factor(param, layer) if precondition_group else None
                if factor is None:
                    w.plain.append(param)
                    w.plain_grads.append(param.grad)
                else:
                    w.factors.append(factor)
                    w.factor_grads.append(param.grad)
            if group["max_grad_norm"] is not None and (w.plain or w.factors):
                w.clip = _clip_coefficient(w.plain_grads + w.factor_grads, group["max_grad_norm"])
                if w.plain_grads:
                    w.plain_grads = list(torch._foreach_mul(w.plain_grads, w.clip))  # out of place: keep .grad
            work.append(w)
        return work, list(layers.values())

    def _gate_means(self, work: list[_GroupWork]) -> dict[int, torch.Tensor]:
        needed = {id(f.layer): f.layer for w in work if w.group["preconditioner"] == GATE_RESCALED for f in w.factors}
        return gate_sq_means(list(needed.values())) if needed else {}

    def _precondition(self, work: list[_GroupWork], means: dict[int, torch.Tensor]) -> list[list[torch.Tensor]]:
        """Preconditioned gradients of every group's factors, all groups solved together."""
        factors, grads, regs, scales, sizes = [], [], [], [], []
        for w in work:
            rescale = w.group["preconditioner"] == GATE_RESCALED
            for factor, grad in zip(w.factors, w.factor_grads):
                factors.append(factor)
                grads.append(grad)
                regs.append(w.group["reg"])
                scales.append((means[id(factor.layer)], w.group["gate_floor"]) if rescale else None)
            sizes.append(len(w.factors))
        flat = precondition(factors, grads, regs, scales) if factors else []
        out, start = [], 0
        for w, size in zip(work, sizes):
            chunk = flat[start : start + size]
            start += size
            if w.clip is not None and chunk:
                torch._foreach_mul_(chunk, w.clip)  # preconditioning is linear: clip before == clip after
            out.append(chunk)
        return out

    def _update_group(self, w: _GroupWork, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        if params:
            self._update(w.group, params, grads)


def _select(w: _GroupWork, side: str) -> _GroupWork:
    """The part of ``w`` that preconditions the factors of one side (``"A"`` or ``"B"``)."""
    keep = [i for i, f in enumerate(w.factors) if f.side == side]
    return _GroupWork(
        w.group, factors=[w.factors[i] for i in keep], factor_grads=[w.factor_grads[i] for i in keep], clip=w.clip
    )


def _clip_coefficient(grads: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``min(1, max_norm / (||grads||_2 + 1e-6))`` as a 0-d tensor, as ``torch.nn.utils.clip_grad_norm_``."""
    norms = torch._foreach_norm(grads)
    dtype = functools.reduce(torch.promote_types, (n.dtype for n in norms))
    total = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device, dtype) for n in norms]))
    return (max_norm / (total + 1e-6)).clamp_max(1.0)


def _validate_group(group: dict[str, Any]) -> None:
    if group["preconditioner"] not in PRECONDITIONERS:
        raise ValueError(f"preconditioner must be one of {PRECONDITIONERS}, got {group['preconditioner']!r}")
    kind = group.get("kind")
    if kind is not None and kind not in GROUP_KINDS:
        raise ValueError(f"a parameter group's 'kind' must be one of {GROUP_KINDS} (or absent), got {kind!r}")
    for name in ("lr", "weight_decay"):
        if name in group and not float(group[name]) >= 0:
            raise ValueError(f"{name} must be >= 0, got {group[name]!r}")
    if not float(group["reg"]) > 0:
        raise ValueError(f"reg (damping of the r x r systems) must be > 0, got {group['reg']!r}")
    if not float(group["gate_floor"]) > 0:
        raise ValueError(f"gate_floor must be > 0, got {group['gate_floor']!r}")
    if group["max_grad_norm"] is not None and not float(group["max_grad_norm"]) > 0:
        raise ValueError(f"max_grad_norm must be > 0 or None, got {group['max_grad_norm']!r}")
