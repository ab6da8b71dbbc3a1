"""Top-k softmax routing and router diagnostics.

A router is a bias-free linear map ``R`` (``E x d_in``). For tokens ``x`` (``T x d_in``):

    p = softmax(x R^T)                      (T, E)
    mask = the top_k largest entries of p per token
    g = p * mask / sum(p * mask)            (T, E), each row sums to 1, zero off the top-k

``g`` is differentiable in ``R`` and ``x`` through the kept probabilities.
"""

from __future__ import annotations

import math

import torch

from . import kernels


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
    return route_top_k(logits, top_k)[0]


def route_top_k(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(gates, weights, index)``: the dense ``(T, E)`` float32 gates of ``top_k_gates`` and the kept
    ``(T, top_k)`` float32 gates and expert ids they are scattered from (``top_k_routing``), for statistics."""
    logits = logits.float()
    tokens, num_experts = logits.shape
    if top_k >= num_experts:
        gates = softmax_rows(logits)
        return gates, gates, torch.arange(num_experts, device=logits.device).expand(tokens, num_experts)
    weights, index = top_k_routing(logits, top_k)
    return logits.new_zeros(tokens, num_experts).scatter_(-1, index, weights), weights, index


def router_backward(gates: torch.Tensor, grad_gates: torch.Tensor) -> torch.Tensor:
    """``dL/dlogits`` (T, E) float32 of ``top_k_gates`` from its output ``gates`` and ``dL/dgates`` alone.

    With ``S`` the kept experts of a token, ``g_j = exp(l_j) / sum_{i in S} exp(l_i)`` on ``S`` and 0
    elsewhere, so ``dL/dl_j = g_j (dL/dg_j - sum_i g_i dL/dg_i)``: the softmax Jacobian over ``S``, which
    the zero gates off ``S`` extend to every expert (the choice of ``S`` is piecewise constant in ``l``).
    Autograd through ``topk``, the softmax and ``scatter`` would also keep the ``(T, k)`` int64 expert
    ids and the kept probabilities.
    """
    grad_gates = grad_gates.float()
    inner = (gates * grad_gates).sum(dim=-1, keepdim=True)
    return gates * (grad_gates - inner)


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


def routing_statistics(weights: torch.Tensor, index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """What the layer records of a forward pass, from the kept gates ``weights`` and experts ``index``
    (both ``(T, top_k)``, ``top_k_routing``), as one ``(2E + 1,)`` float32 tensor:

    - ``[:E]``: ``sum_t g_te^2`` (the gate-rescaled preconditioner's statistic);
    - ``[E:2E]``: each expert's share of the ``T * top_k`` token-to-expert assignments (the expert load;
      ``1 / E`` everywhere under perfectly balanced routing);
    - ``[2E]``: the mean over tokens of the entropy (nats) of each token's gates.

    On a CPU the squares are added into their experts' slots (``index_add_``, in order); elsewhere, where
    that runs on atomics in no fixed order, through the dense gates, so that the sum is reproducible.
    """
    weights = weights.float()
    tokens = weights.shape[0]
    squares = weights.square()
    # Fixed-size results (unlike bincount's), so that torch.compile traces them.
    if index.device.type == "cpu":
        flat = index.reshape(-1)
        sq_sum = squares.new_zeros(num_experts).index_add_(0, flat, squares.reshape(-1))
        counts = squares.new_zeros(num_experts).index_add_(0, flat, squares.new_ones(flat.shape))
    else:
        sq_sum = squares.new_zeros(tokens, num_experts).scatter_(-1, index, squares).sum(dim=0)
        counts = squares.new_zeros(tokens, num_experts).scatter_(-1, index, 1.0).sum(dim=0)
    load = counts / max(index.numel(), 1)
    entropy = torch.special.entr(weights).sum() / max(tokens, 1)  # entr(g) = -g log g, 0 at g = 0
    return torch.cat([sq_sum, load, entropy.view(1)])


def record_statistics_(stats: torch.Tensor, tokens: int, sq_sum: torch.Tensor | None, count: torch.Tensor | None,
                       load: torch.Tensor | None, entropy: torch.Tensor | None) -> None:
    """A layer's record of one forward pass's ``routing_statistics`` ``stats`` (2E + 1,), in place:
    ``sq_sum += stats[:E]`` and ``count += tokens`` when they are given (the gate-rescaled
    preconditioner's sums, over the passes of a step), ``load = stats[E:2E]`` and ``entropy = stats[2E]``
    when they are given (the last pass's diagnostics). One compiled call on a CPU where the kernels
    serve (four small torch ops cost about 15 us each inside a layer); these torch ops are the reference."""
    if kernels.record_routing(stats, sq_sum, count, load, entropy, tokens):
        return
    experts = (stats.numel() - 1) // 2
    with torch.no_grad():
        if sq_sum is not None and count is not None:
            sq_sum.add_(stats[:experts])
            count.add_(tokens)
        if load is not None and entropy is not None:
            load.copy_(stats[experts : 2 * experts])
            entropy.copy_(stats[2 * experts])


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
