"""The sparse (grouped) expert computation, for few active experts per token.

The dense form (``moelora.layers.dense``) computes every expert on every token, ``T * E * r`` columns, and
zeroes the unselected ones through their gates. With ``top_k << E`` most of that work is thrown away.
The sparse form computes only the ``P = T * top_k`` selected (token, expert) pairs: the pairs are sorted
by expert, so each expert's tokens are one contiguous block of rows, and each expert's two GEMMs run as
one grouped GEMM (``torch._grouped_mm``, one call for all experts) over those blocks:

    pairs sorted by expert:  token_of (P,), expert blocks given by offsets (E,)
    x_p   = drop(x)[token_of]                         (P, d_in)    gather
    h_p   = x_p A_e^T          (grouped by expert)    (P, r)
    y_p   = s g_p h_p B_e^T    (grouped by expert)    (P, d_out)
    y     = W x + b + sum of y_p over each token's pairs                scatter-add

``SparseGatedMix`` is the second grouped GEMM with the backward gate power ``p`` of the paper's
engineering strategy (method.md): the expert weights and inputs receive ``g^p`` in place of ``g``, the
router the exact gradient, as in the dense form:

    dz    = dy_p B_e                   (P, r)        grouped
    dB_e  = s dy_p^T (h_p g_p^p)       (E, d_out, r) grouped over the rows (K) of each block
    dh_p  = s dz g_p^p
    dg_p  = s sum_r dz h_p

``torch._grouped_mm`` takes float32 on CPU with rows of a multiple of 16 bytes; where it is missing or
the shapes do not fit, the layer uses the dense form (``sparse_supported``).
"""

from __future__ import annotations

from typing import Any

import torch

from .routing import gate_power

# Pick the sparse form when the dense form computes at least this many expert columns (E * r) per
# selected expert: the sparse form's gathers and scatters cost a few passes over (T * top_k, d) each,
# the dense form's extra GEMM columns cost T * d multiply-adds each. Layer forward + backward at d = 576,
# T = 2048, r = 4 on a 2-core CPU (one thread), sparse against dense: E = 20, top_k = 10 (8 columns per
# selected expert) 4x slower; E = 64, top_k = 4 (64) even; E = 32, top_k = 2 (64) 1.15x faster;
# E = 64, top_k = 2 (128) 1.3x faster.
SPARSE_MIN_COLUMNS_PER_SELECTED = 64


def sparse_is_cheaper(num_experts: int, top_k: int, rank: int) -> bool:
    """The ``expert_compute="auto"`` rule: ``E * r >= 64 * top_k``."""
    return num_experts * rank >= SPARSE_MIN_COLUMNS_PER_SELECTED * top_k


# torch._grouped_mm on CPU takes float32 rows of a multiple of 16 bytes.
ROW_MULTIPLE = 4


def sparse_shape_problem(rank: int, d_in: int | None = None, d_out: int | None = None) -> str | None:
    """None when the sparse form can run at these shapes (on some device and dtype), else the reason."""
    if not hasattr(torch, "_grouped_mm"):
        return f"this torch ({torch.__version__}) has no torch._grouped_mm"
    sizes = {"rank": rank, "d_in": d_in, "d_out": d_out}
    bad = {name: size for name, size in sizes.items() if size is not None and size % ROW_MULTIPLE}
    if bad:
        return (f"{', '.join(bad)} must be multiples of {ROW_MULTIPLE} (16-byte rows), "
                f"got {', '.join(f'{k}={v}' for k, v in bad.items())}")
    return None


def sparse_supported(dtype: torch.dtype, device: torch.device, rank: int, d_in: int, d_out: int) -> str | None:
    """None when the sparse form can run, else the reason it cannot (for an error message)."""
    shape_problem = sparse_shape_problem(rank, d_in, d_out)
    if shape_problem is not None:
        return shape_problem
    if device.type != "cpu":
        return f"the sparse form is implemented for CPU tensors, got {device.type}"
    if dtype != torch.float32:
        return f"torch._grouped_mm on CPU takes float32 here, the adapter is {dtype}"
    return None


def sort_pairs(index: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (token, expert) pairs of ``index`` (T, k) sorted by expert.

    Returns ``order`` (P,) positions into ``index.reshape(-1)``, ``token_of`` (P,) each pair's token and
    ``offsets`` (E,) int32 cumulative block ends, as ``torch._grouped_mm`` takes them.
    """
    flat = index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    token_of = torch.div(order, index.shape[1], rounding_mode="floor")
    offsets = torch.bincount(flat, minlength=num_experts).cumsum(0).to(torch.int32)
    return order, token_of, offsets


class SparseGatedMix(torch.autograd.Function):
    """``y_p = s * (h_p * g_p) @ B_e^T`` over expert blocks, with ``g^p`` in the experts' backward.

    Shapes: ``h`` (P, r) sorted pair projections, ``gates`` (P,) their gates, ``lora_B`` (E, d_out, r),
    ``offsets`` (E,) int32 block ends. Returns (P, d_out).
    """

    @staticmethod
    def forward(h: torch.Tensor, gates: torch.Tensor, lora_b: torch.Tensor, offsets: torch.Tensor,
                scaling: float, power: float) -> torch.Tensor:
        z = h * (gates * scaling).unsqueeze(-1)
        return torch._grouped_mm(z, lora_b.transpose(1, 2), offs=offsets)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        h, gates, lora_b, offsets, scaling, power = inputs
        ctx.save_for_backward(h, gates, lora_b, offsets)
        ctx.scaling, ctx.power = scaling, power

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        h, gates, lora_b, offsets = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        scaled_gp = (gate_power(gates, ctx.power) * ctx.scaling).unsqueeze(-1)  # (P, 1)
        grad_h = grad_gates = grad_b = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            dz = torch._grouped_mm(grad_out, lora_b, offs=offsets)  # (P, r)
            if ctx.needs_input_grad[0]:
                grad_h = dz * scaled_gp
            if ctx.needs_input_grad[1]:
                grad_gates = (dz * h).sum(-1) * ctx.scaling
        if ctx.needs_input_grad[2]:
            # (r, P) x (P, d_out) grouped along P: one (r, d_out) block per expert, zero for an empty one.
            weighted = (h * scaled_gp).t()  # a transposed view: its rows of P would break 16-byte strides
            grad_b = torch._grouped_mm(weighted, grad_out, offs=offsets).transpose(1, 2)
        return grad_h, grad_gates, grad_b, None, None, None


def sparse_expert_output(expert_input: torch.Tensor, weights: torch.Tensor, index: torch.Tensor,
                         lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, power: float
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The experts' outputs of every selected pair, and each pair's token.

    Args:
        expert_input: ``(T, d_in)`` what the experts read (the dropped-out input).
        weights / index: ``(T, k)`` gates and expert ids of the kept experts of each token.
        lora_a: ``(E, r, d_in)``; lora_b: ``(E, d_out, r)``.

    Returns:
        ``(P, d_out)`` outputs and ``(P,)`` tokens; ``out.index_add(0, token_of, outputs)`` adds them in.
    """
    order, token_of, offsets = sort_pairs(index, lora_a.shape[0])
    pair_inputs = expert_input.index_select(0, token_of)                              # (P, d_in)
    h = torch._grouped_mm(pair_inputs, lora_a.transpose(1, 2), offs=offsets)          # (P, r)
    gates = weights.to(h.dtype).reshape(-1).index_select(0, order)                    # (P,)
    return SparseGatedMix.apply(h, gates, lora_b, offsets, scaling, power), token_of
