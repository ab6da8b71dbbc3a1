"""Parameter groups built from the structure of a wrapped model, and the runtime view of a parameter.

``param_groups(model, lr, ...)`` returns plain dictionaries (serialisable with the optimizer's
``state_dict``): one group of expert factors (every layer's ``lora_A`` and ``lora_B``), one of routers,
one of any other trainable parameter. The expert pairs are never inferred from names or order: at each
step the optimizer reads which live layer's ``lora_A`` / ``lora_B`` every parameter is
(``moelora.layers.linear.parameter_owners``), and ``check_intact`` verifies the pair's shapes.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from ..inject import moelora_layers
from ..layers.linear import SIDE_A, SIDE_B, MoELoRALinear

# Values of a group's "kind" key. Preconditioning only ever touches expert factors; routers and other
# parameters always get the plain update of the base optimizer.
EXPERTS = "experts"
ROUTER = "router"
OTHER = "other"
GROUP_KINDS = (EXPERTS, ROUTER, OTHER)

__all__ = ["EXPERTS", "GROUP_KINDS", "OTHER", "ROUTER", "SIDE_A", "SIDE_B", "ExpertFactor", "check_intact",
           "expert_factor", "param_groups"]


class ExpertFactor(NamedTuple):
    """Runtime view of a stacked expert factor: the parameter, its layer, which factor it is, its partner.

    ``side == "A"``: ``param`` is ``layer.lora_A`` ``(E, r, d_in)`` and ``partner`` is ``layer.lora_B``
    ``(E, d_out, r)``; ``side == "B"``: the other way round. Rebuilt at every step, never stored in
    parameter groups or optimizer state.
    """

    param: torch.Tensor
    layer: MoELoRALinear
    side: str
    partner: torch.Tensor


def expert_factor(param: torch.Tensor, layer: MoELoRALinear | None) -> ExpertFactor | None:
    """The ``ExpertFactor`` of ``param`` if it is ``layer``'s ``lora_A`` or ``lora_B``, else ``None``.

    ``layer`` is the layer that owns ``param`` (``moelora.layers.linear.layer_of``), or None.
    """
    if layer is None:
        return None
    lora_a, lora_b = layer.lora_A, layer.lora_B
    if param is lora_a:
        return ExpertFactor(param, layer, SIDE_A, lora_b)
    if param is lora_b:
        return ExpertFactor(param, layer, SIDE_B, lora_a)
    return None  # the router weight


def check_intact(factor: ExpertFactor) -> None:
    """Refuse a factor that is not a whole expert stack of its layer: ``A`` must be ``(E, r, d_in)`` and
    ``B`` ``(E, d_out, r)`` (their global shapes when sharded), and a sharded pair must be split alike on
    the expert dimension (``Shard(0)``), so that each process holds whole experts of both."""
    layer = factor.layer
    a, b = (factor.param, factor.partner) if factor.side == SIDE_A else (factor.partner, factor.param)
    expected = ((layer.num_experts, layer.rank, layer.in_features), (layer.num_experts, layer.out_features, layer.rank))
    if (tuple(a.shape), tuple(b.shape)) != expected:
        raise RuntimeError(
            f"the expert stacks of a MoE-LoRA layer have shapes {tuple(a.shape)} (A) and {tuple(b.shape)} (B), "
            f"expected {expected[0]} and {expected[1]}: the parameters were reshaped or flattened, which the "
            f"preconditioner cannot undo (use FSDP2's fully_shard or DDP, or preconditioner='none')"
        )
    placements = [tuple(getattr(t, "placements", ())) for t in (a, b)]
    if placements[0] != placements[1] or not all(_whole_experts(p) for p in placements[0]):
        raise RuntimeError(
            f"a MoE-LoRA layer's A and B are sharded as {placements[0]} and {placements[1]}; the preconditioner "
            f"needs both split alike on the expert dimension (Shard(0), as fully_shard does by default) or "
            f"replicated, so that each process holds whole experts"
        )


def _whole_experts(placement: Any) -> bool:
    return placement.is_replicate() or (placement.is_shard() and placement.dim == 0)


def param_groups(
    model: nn.Module,
    lr: float,
    router_lr: float | None = None,
    weight_decay: float = 0.0,
    router_weight_decay: float | None = None,
    router_max_grad_norm: float | None = None,
) -> list[dict[str, Any]]:
    """Parameter groups for ``RiemannianSGD`` / ``RiemannianAdamW``, built from the ``MoELoRALinear`` layers.

    Args:
        model: a model wrapped by ``moelora.wrap`` (any number of layers, shapes and ranks).
        lr: learning rate of the experts (and of any other trainable parameter).
        router_lr: learning rate of the routers; defaults to ``lr``. The paper uses about ``lr / 330``
            (AdamW) to ``lr / 1000`` (SGD), keeping the routers near their random init.
        weight_decay: weight decay of every group, unless ``router_weight_decay`` is given.
        router_weight_decay: weight decay of the routers; defaults to ``weight_decay``.
        router_max_grad_norm: if given, the routers' gradients are clipped by their joint 2-norm over all
            routers before each update (the paper uses 1.0). ``.grad`` itself is left untouched.

    Returns:
        Up to three groups, in this order, each a plain dictionary with a ``"kind"`` key:

        - ``"experts"``: ``[A_0, B_0, A_1, B_1, ...]`` in module order; preconditioned;
        - ``"router"``: every layer's router weight; plain update, optional clipping (``"max_grad_norm"``);
        - ``"other"``: every other parameter with ``requires_grad`` (omitted when there is none).

        Frozen parameters are left out; a group with no parameter is omitted. As always in
        ``torch.optim``, a group's own ``lr`` and ``weight_decay`` take precedence over the optimizer's
        constructor arguments of the same name.

    Raises:
        ValueError: ``model`` has no ``MoELoRALinear`` layer, or a learning rate / weight decay / norm is
            negative.
    """
    _check_non_negative("lr", lr)
    router_lr = lr if router_lr is None else router_lr
    router_weight_decay = weight_decay if router_weight_decay is None else router_weight_decay
    _check_non_negative("router_lr", router_lr)
    _check_non_negative("weight_decay", weight_decay)
    _check_non_negative("router_weight_decay", router_weight_decay)
    if router_max_grad_norm is not None and not router_max_grad_norm > 0:
        raise ValueError(f"router_max_grad_norm must be > 0 or None (no clipping), got {router_max_grad_norm!r}")

    layers = [layer for _, layer in moelora_layers(model)]
    if not layers:
        raise ValueError(
            "param_groups found no MoELoRALinear layer in the model: wrap it first with "
            "moelora.wrap(model, moelora.MoELoRAConfig(...))"
        )
    experts: list[torch.Tensor] = []
    routers: list[torch.Tensor] = []
    for layer in layers:
        experts.extend(p for p in (layer.lora_A, layer.lora_B) if p.requires_grad)
        if layer.router.weight.requires_grad:
            routers.append(layer.router.weight)
    # A module may be reachable under two names (tied weights): compare by identity, keep each once.
    seen = {id(p) for p in experts + routers}
    other = []
    for param in model.parameters():
        if param.requires_grad and id(param) not in seen:
            seen.add(id(param))
            other.append(param)

    groups = [
        {"params": experts, "kind": EXPERTS, "lr": lr, "weight_decay": weight_decay},
        {
            "params": routers,
            "kind": ROUTER,
            "lr": router_lr,
            "weight_decay": router_weight_decay,
            "max_grad_norm": router_max_grad_norm,
            "preconditioner": "none",
        },
        {"params": other, "kind": OTHER, "lr": lr, "weight_decay": weight_decay, "preconditioner": "none"},
    ]
    return [group for group in groups if group["params"]]


def _check_non_negative(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")
