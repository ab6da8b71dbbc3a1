"""The step shared by ``RiemannianSGD`` and ``RiemannianAdamW``: precondition, then hand over to the update.

One ``step()``:

1. clip each group's gradients by their joint norm if the group has ``max_grad_norm`` (the router group);
2. solve the preconditioners of every expert factor in a group whose ``preconditioner`` is not ``"none"``
   (``moelora.optim.precondition``; all r x r systems of all groups in batches, before any update);
3. run the base update (``_update``, SGD or AdamW with foreach / fused kernels) on the preconditioned
   gradients of the experts and the plain gradients of everything else; an update may instead apply
   the preconditioners in its own pass (``_update_preconditioned``: ``RiemannianAdamW`` on float32 CPU
   tensors, the same floats without the preconditioned gradients in memory);
4. reset the gate statistics of every ``MoELoRALinear`` the optimizer trains, whatever the preconditioner,
   so that they cover exactly the forwards since the last step and never grow without bound.

``.grad`` is never modified. Parameters whose ``.grad`` is ``None`` are skipped; a zero gradient (an
expert no token was routed to) is a gradient like any other. Which layer owns each parameter is read at
every step from the live layers' attributes (``moelora.layers.linear.parameter_owners``): a binding by
structure, so parameter groups stay plain dictionaries, ``state_dict`` / ``load_state_dict`` are torch's
own, and a parameter replaced behind the optimizer's back is an error rather than a silent plain update.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.optim import Optimizer

from ..config import PRECONDITIONERS
from ..layers.linear import MoELoRALinear, parameter_owners
from .groups import EXPERTS, GROUP_KINDS, ROUTER, SIDE_A, SIDE_B, ExpertFactor, check_intact, expert_factor
from .precondition import GATE_RESCALED, NONE, apply_preconditioners, gate_sq_means, preconditioners
from .sharding import expert_offset, global_grad_norm, is_sharded, like, local


@dataclass
class _GroupWork:
    """What one step does with one parameter group (rebuilt at every step, never stored)."""

    group: dict[str, Any]
    plain: list[torch.Tensor] = field(default_factory=list)
    plain_grads: list[torch.Tensor] = field(default_factory=list)
    factors: list[ExpertFactor] = field(default_factory=list)
    factor_grads: list[torch.Tensor] = field(default_factory=list)
    clip: torch.Tensor | None = None  # gradient multiplier from max_grad_norm, (), or None


@dataclass
class SolvedFactors:
    """One group's expert factors with their solved preconditioners, for one step.

    ``local`` and ``inverses`` are per process (this process's shard of experts under FSDP2, with its
    ``(E_local, r, r)`` preconditioners); ``grads`` are the factors' gradients as autograd left them (never
    written), ``clip`` the group's gradient multiplier from ``max_grad_norm`` or None.
    """

    factors: list[ExpertFactor]
    local: list[ExpertFactor]
    grads: list[torch.Tensor]
    inverses: list[torch.Tensor]
    clip: torch.Tensor | None

    @property
    def params(self) -> list[torch.Tensor]:
        return [f.param for f in self.factors]

    def local_grads(self) -> list[torch.Tensor]:
        return [local(g) for g in self.grads]

    def gradients(self) -> list[torch.Tensor]:
        """The preconditioned gradients, laid out as the gradients (DTensors where those are), clipped."""
        out = [like(result, layout) for result, layout in
               zip(apply_preconditioners(self.local, self.local_grads(), self.inverses), self.grads)]
        if self.clip is not None and out:
            torch._foreach_mul_(out, self.clip)  # preconditioning is linear: clip before == clip after
        return out


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
            # Every solve before any update: a step whose factorisations all fail changes nothing.
            for w, solved in zip(preconditioned, self._solve(preconditioned, means)):
                if not self._update_preconditioned(w.group, solved):
                    w.plain, w.plain_grads = w.plain + solved.params, w.plain_grads + solved.gradients()
            for w in work:
                self._update_group(w, w.plain, w.plain_grads)
        else:
            # The reference code's order (method.md section 6): update every A first, then precondition
            # each B with the Gram matrix of its already-updated A.
            a_side = [_select(w, SIDE_A) for w in preconditioned]
            b_side = [_select(w, SIDE_B) for w in preconditioned]
            for w, solved in zip(a_side, self._solve(a_side, means)):
                self._update_factors(w, solved)
            for w in work:
                self._update_group(w, w.plain, w.plain_grads)
            for w, solved in zip(b_side, self._solve(b_side, means)):
                self._update_factors(w, solved)
        for layer in layers:
            layer.reset_gate_stats()
        return loss

    def _update(self, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        """Apply the base update to ``params`` given their (possibly preconditioned) ``grads``.

        ``grads`` may alias ``.grad`` tensors: implementations must not write to them.
        """
        raise NotImplementedError

    def _update_preconditioned(self, group: dict[str, Any], solved: SolvedFactors) -> bool:
        """Apply the base update to expert factors from their gradients and preconditioners, without the
        preconditioned gradients being formed first; False (nothing done) where the subclass has no such
        path for these tensors, and the step then calls ``_update`` on ``solved.gradients()``."""
        return False

    # ---------------------------------------------------------------------------------------- helpers
    def _plan(self) -> tuple[list[_GroupWork], list[MoELoRALinear]]:
        """Sort each group's parameters with a gradient into plain ones and expert factors to precondition.

        Which layer owns a parameter, and whether it is that layer's A or B, is read from the live layers'
        attributes (``parameter_owners``). A parameter of an ``"experts"`` or ``"router"`` group (as
        ``param_groups`` builds them) that is no live layer's current parameter was replaced after the
        optimizer was built (``load_state_dict(assign=True)``, a re-sharding, a flat partition): updating it
        would leave the model untouched, so it is an error; so is a preconditioned experts group holding
        something that is not an intact expert stack.
        """
        owners = parameter_owners()
        work = []
        layers: dict[int, MoELoRALinear] = {}
        preconditioned_grads = 0
        for group in self.param_groups:
            w = _GroupWork(group)
            precondition_group = group["preconditioner"] != NONE
            kind = group.get("kind")
            for param in group["params"]:
                owner = owners.get(id(param))
                if owner is None and kind in (EXPERTS, ROUTER):
                    raise _not_a_stack(param, kind, group["preconditioner"])
                if owner is not None:
                    layers[id(owner[0])] = owner[0]
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                self._check_state(param)
                factor = None
                if precondition_group and owner is not None and owner[1] in (SIDE_A, SIDE_B):
                    factor = expert_factor(param, owner[0])
                    assert factor is not None
                    check_intact(factor)
                elif precondition_group and kind == EXPERTS:
                    raise _not_a_stack(param, kind, group["preconditioner"])
                if factor is None:
                    w.plain.append(param)
                    w.plain_grads.append(param.grad)
                else:
                    w.factors.append(factor)
                    w.factor_grads.append(param.grad)
                preconditioned_grads += precondition_group
            if group["max_grad_norm"] is not None and (w.plain or w.factors):
                w.clip = _clip_coefficient(w.plain_grads + w.factor_grads, group["max_grad_norm"])
                if w.plain_grads:
                    w.plain_grads = list(torch._foreach_mul(w.plain_grads, w.clip))  # out of place: keep .grad
            work.append(w)
        if preconditioned_grads and not any(w.factors for w in work):
            raise RuntimeError(
                f"{type(self).__name__}: a group asks for a preconditioner, but none of its parameters is the "
                f"lora_A or lora_B of a live MoE-LoRA layer, so preconditioning would silently be off. Build the "
                f"groups with moelora.optim.param_groups(model) after the model's final set-up (wrap, sharding, "
                f"load_state_dict), or pass preconditioner='none' for a plain update"
            )
        return work, list(layers.values())

    def _check_state(self, param: torch.Tensor) -> None:
        """A parameter cast or moved after this optimizer's first step no longer matches its state."""
        for key, value in self.state.get(param, {}).items():
            if isinstance(value, torch.Tensor) and (value.dtype != param.dtype or value.device != param.device):
                raise RuntimeError(
                    f"a parameter of shape {tuple(param.shape)} is {param.dtype} on {param.device}, but this "
                    f"optimizer's state {key!r} for it is {value.dtype} on {value.device}: the model was cast or "
                    f"moved after the optimizer's first step. Cast or move it before building the optimizer, or "
                    f"build a new one (load_state_dict of the old state casts it to the new parameters)"
                )

    def _gate_means(self, work: list[_GroupWork]) -> dict[int, torch.Tensor]:
        needed = {id(f.layer): f.layer for w in work if w.group["preconditioner"] == GATE_RESCALED for f in w.factors}
        return gate_sq_means(list(needed.values())) if needed else {}

    def _solve(self, work: list[_GroupWork], means: dict[int, torch.Tensor]) -> list[SolvedFactors]:
        """The preconditioners of every group's factors, all groups' systems solved together.

        A factor sharded by FSDP2 is preconditioned on this process's shard (whole experts, ``sharding``),
        with the matching slice of its layer's gate statistics.
        """
        factors, regs, scales, sizes = [], [], [], []
        for w in work:
            rescale = w.group["preconditioner"] == GATE_RESCALED
            for factor in w.factors:
                shard = ExpertFactor(local(factor.param), factor.layer, factor.side, local(factor.partner))
                factors.append(shard)
                regs.append(w.group["reg"])
                scale = None
                if rescale:
                    start = expert_offset(factor.param)
                    scale = (means[id(factor.layer)][start : start + shard.param.shape[0]], w.group["gate_floor"])
                scales.append(scale)
            sizes.append(len(w.factors))
        inverses = preconditioners(factors, regs, scales) if factors else []
        out, start = [], 0
        for w, size in zip(work, sizes):
            out.append(SolvedFactors(w.factors, factors[start : start + size], w.factor_grads,
                                     inverses[start : start + size], w.clip))
            start += size
        return out

    def _update_factors(self, w: _GroupWork, solved: SolvedFactors) -> None:
        if solved.params and not self._update_preconditioned(w.group, solved):
            self._update(w.group, solved.params, solved.gradients())

    def _update_group(self, w: _GroupWork, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        if params:
            self._update(w.group, params, grads)


def _not_a_stack(param: torch.Tensor, kind: str, preconditioner: str) -> RuntimeError:
    """The error for a parameter of an experts / router group that is no live layer's current parameter."""
    shape = tuple(param.shape)
    what = "a flat partition (DeepSpeed ZeRO hands optimizers those)" if param.dim() == 1 and kind == EXPERTS else (
        "no longer the parameter of any live MoE-LoRA layer")
    return RuntimeError(
        f"a parameter of shape {shape} in the {kind!r} group (preconditioner={preconditioner!r}) is {what}: it "
        f"was replaced after the optimizer was built (load_state_dict(assign=True), FSDP's fully_shard, a "
        f"copy of the model), or was never a MoE-LoRA layer's. Build the optimizer from "
        f"moelora.optim.param_groups(model) after the model's final set-up. DeepSpeed ZeRO cannot keep "
        f"whole expert stacks: use FSDP2 (fully_shard) or DDP with a preconditioner"
    )


def _select(w: _GroupWork, side: str) -> _GroupWork:
    """The part of ``w`` that preconditions the factors of one side (``"A"`` or ``"B"``)."""
    keep = [i for i, f in enumerate(w.factors) if f.side == side]
    return _GroupWork(
        w.group, factors=[w.factors[i] for i in keep], factor_grads=[w.factor_grads[i] for i in keep], clip=w.clip
    )


def _clip_coefficient(grads: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``min(1, max_norm / (||grads||_2 + 1e-6))`` as a 0-d tensor, as ``torch.nn.utils.clip_grad_norm_``;
    the norm is the global one over every shard when the gradients are sharded."""
    if any(is_sharded(g) for g in grads):
        return (max_norm / (global_grad_norm(grads) + 1e-6)).clamp_max(1.0)
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
