"""Slow, obviously-correct references written straight from method.md (no stacking, no custom autograd)."""

from __future__ import annotations

import torch


def reference_gates(x: torch.Tensor, router_weight: torch.Tensor, top_k: int) -> torch.Tensor:
    """method.md section 1: p = softmax(R x); keep the top_k; renormalise. ``(T, d_in) -> (T, E)``."""
    probs = torch.softmax(x @ router_weight.t(), dim=-1)
    kept = torch.zeros_like(probs)
    for t in range(probs.shape[0]):
        order = sorted(range(probs.shape[1]), key=lambda e: -float(probs[t, e].detach()))[:top_k]
        for e in order:
            kept[t, e] = 1.0
    masked = probs * kept
    return masked / masked.sum(dim=-1, keepdim=True)


def reference_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    router_weight: torch.Tensor,
    top_k: int,
    scaling: float,
    power: float,
    expert_input: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-expert loop of method.md section 3 (dropout 0):

        w_i = sg(g_i^p) E_i(x) + (g_i - sg(g_i^p)) sg(E_i(x)),     E_i(x) = s B_i A_i x

    with ``g^p := 0`` where ``g = 0``. ``x`` may have any leading shape. ``expert_input`` is ``drop(x)``
    when dropout is on (the router always sees ``x``).
    """
    lead = x.shape[:-1]
    tokens = x.reshape(-1, x.shape[-1])
    y = tokens @ weight.t()
    if bias is not None:
        y = y + bias
    gates = reference_gates(tokens, router_weight, top_k)
    expert_tokens = tokens if expert_input is None else expert_input.reshape(tokens.shape)
    for i in range(lora_A.shape[0]):
        g = gates[:, i : i + 1]
        g_pow = torch.where(g > 0, g.detach() ** power, torch.zeros_like(g)).detach()
        expert_out = scaling * (expert_tokens @ lora_A[i].t()) @ lora_B[i].t()
        y = y + g_pow * expert_out + (g - g_pow) * expert_out.detach()
    return y.reshape(*lead, -1)
