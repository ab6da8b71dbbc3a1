"""Top-k softmax routing and router diagnostics.

A router is a bias-free linear map ``R`` (``E x d_in``). For tokens ``x`` (``T x d_in``):

    p = softmax(x R^T)                      (T, E)
    mask = the top_k largest entries of p per token
    g = p * mask / sum(p * mask)            (T, E), each row sums to 1, zero off the top-k

``g`` is differentiable in ``R`` and ``x`` through the kept probabilities.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def softmax_rows(scores: torch.Tensor) -> torch.Tensor:
    """``softmax(scores, dim=-1)`` for the few columns of routing (``k`` or ``E``) as exp / sum: on CPU
    PyTorch's softmax over a short last dimension is about 3x slower than these three kernels.
    Differentiable (out of place) when autograd records ``scores``, with the same values either way."""
    shifted = scores - scores.amax(dim=-1, keepdim=True)
    if scores.requires_grad and torch.is_grad_enabled():
        e = shifted.exp()
        return e / e.sum(dim=-1, keepdim=True)
    e = shifted.exp_()
    return e.div_(e.sum(dim=-1, keepdim=True))


def top_k_routing(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept experts of each token and their renormalised gates.

    Args:
        logits: ``(T, E)`` router logits (any float dtype; the softmax runs in float32).
        top_k: number of experts kept per token, ``1 <= top_k <= E``.

    Returns:
        ``(weights, index)``, both ``(T, top_k)``: float32 gates summing to 1 per token, and expert ids.
    """
    # The softmax is monotonic, so the top-k probabilities are those of the top-k logits, and renormalising
    # them is a softmax over the kept logits alone (the full softmax's denominator cancels): one (T, k)
    # softmax instead of a (T, E) softmax and a division, in the forward and the backward pass.
    # Unsorted: the gates do not depend on the order of the kept experts, and sorting them costs ~2.5x.
    kept, index = logits.float().topk(top_k, dim=-1, sorted=False)
    return softmax_rows(kept), index


def top_k_gates(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Renormalised top-k softmax gates as a dense ``(T, E)`` float32 tensor: non-negative, rows summing
    to 1, exactly zero for unselected experts (see ``top_k_routing``)."""
    logits = logits.float()
    if top_k >= logits.shape[-1]:
        return softmax_rows(logits)
    weights, index = top_k_routing(logits, top_k)
    return torch.zeros_like(logits).scatter(-1, index, weights)


class _RoutedGates(torch.autograd.Function):
    """``top_k_gates`` with a backward that needs the gates alone (see ``routed_gates``)."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, top_k: int) -> torch.Tensor:
        # forward(ctx, ...): Function.apply then skips binding the arguments through inspect.signature.
        gates = top_k_gates(logits, top_k)
        ctx.save_for_backward(gates)
        ctx.logits_dtype = logits.dtype
        return gates

    @staticmethod
    def backward(ctx: Any, grad_gates: torch.Tensor):
        (gates,) = ctx.saved_tensors
        grad_gates = grad_gates.float()
        inner = (gates * grad_gates).sum(dim=-1, keepdim=True)
        return (gates * (grad_gates - inner)).to(ctx.logits_dtype), None


def routed_gates(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """``top_k_gates(logits, top_k)``, differentiable in ``logits`` with a backward that keeps only the
    ``(T, E)`` gates, which the layer keeps anyway (autograd over ``topk``, ``softmax`` and ``scatter``
    would also keep the ``(T, k)`` int64 expert ids and the kept probabilities).

    With ``S`` the kept experts of a token, ``g_j = exp(l_j) / sum_{i in S} exp(l_i)`` on ``S`` and 0
    elsewhere, so ``dL/dl_j = g_j (dL/dg_j - sum_i g_i dL/dg_i)``: the softmax Jacobian over ``S``, which
    the zero gates off ``S`` extend to every expert (the choice of ``S`` is piecewise constant in ``l``).
    """
    return _RoutedGates.apply(logits, top_k)


def gate_power(gates: torch.Tensor, power: float) -> torch.Tensor:
    """``G^p := where(G > 0, G**p, 0)``: unselected experts stay at zero for every ``p``, including 0.

    Gates are never negative, and ``0**p = 0`` for ``p > 0``, so only ``p = 0`` (where ``0**0 = 1``) needs
    the mask.
    """
    if power == 1.0:
        return gates
    if power == 0.0:
        return (gates > 0).to(gates.dtype)
    if power == 0.5:
        return gates.sqrt()  # the paper's setting; a little cheaper than pow
    return gates.pow(power)


def expert_load(gates: torch.Tensor) -> torch.Tensor:
    """Fraction of token-to-expert assignments that go to each expert.

    Args:
        gates: ``(T, E)`` gates, zero for unselected experts.

    Returns:
        ``(E,)`` float32, summing to 1; ``1 / E`` everywhere under perfectly balanced routing.
    """
    selected = torch.count_nonzero(gates, dim=0)
    return selected / selected.sum().clamp_min(1)


def gate_entropy(gates: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the entropy (nats) of each token's gate distribution.

    ``0`` when every token uses one expert; ``log(top_k)`` when each spreads evenly over its ``top_k``.
    """
    return torch.special.entr(gates.float()).sum() / gates.shape[0]  # entr(g) = -g log g, 0 at g = 0


def init_router_(weight: torch.Tensor, scheme: str, std: float = 0.02) -> None:
    """Initialise a router weight ``(E, d_in)`` in place.

    ``"kaiming"`` is PyTorch's ``nn.Linear`` default (uniform in ``+-1/sqrt(d_in)``), ``"zeros"`` gives
    uniform routing at the start (ties broken by index), ``"normal"`` draws from ``N(0, std^2)``.
    """
    with torch.no_grad():
        if scheme == "kaiming":
            bound = 1.0 / math.sqrt(weight.shape[1])
            weight.uniform_(-bound, bound)
        elif scheme == "zeros":
            weight.zero_()
        elif scheme == "normal":
            weight.normal_(0.0, std)
        else:
            raise ValueError(f"unknown router_init {scheme!r}; use 'kaiming', 'zeros' or 'normal'")
