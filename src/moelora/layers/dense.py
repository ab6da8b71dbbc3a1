"""The dense stacked form of the layer's training path as one autograd Function: every expert on every token.

For tokens ``x`` (T, d_in), the frozen base map (``W`` (d_out, d_in) with bias ``b``, or its output
``base`` (T, d_out) computed by the caller), the expert down-projections ``A`` (E, r, d_in), stacked as
``A_cat`` (E*r, d_in), the router ``R`` (E, d_in), the up-projections ``B`` (E, d_out, r), used as
``B_cat`` (d_out, E*r) with column block ``i`` equal to ``B_i``, an optional dropout keep-mask ``m``
(T, d_in) and the output scale ``s``:

    h      = (x * m) A_cat^T            (T, E*r)     x A_cat^T without a mask
    logits = x R^T                      (T, E)       the router sees x without dropout
    G      = top-k softmax gates        (T, E)       float32, renormalised over the kept experts
    out    = x W^T + b + s (h * G) B_cat^T           (T, d_out), G repeated over each expert's r columns

The ``1 / q`` dropout rescaling is in ``s`` (the caller folds it there). Given ``rows`` (n,) (the real
tokens of a padded batch, ``moelora.layers.token_rows``), the experts and the router compute on those rows
only: ``h``, ``G`` and the gradients below are ``(n, .)``, ``m`` is the full mask's rows, and the other rows
of ``out`` are the base output alone.

Backward (method.md section 3), with ``d = dL/dout`` (T, d_out), ``G^p`` the backward gate power of the
paper's engineering strategy (``routing.gate_power``) and ``s dz = s d B_cat`` (T, E*r):

    dh       = s dz * G^p                                   (T, E*r)
    dG       = s sum over each expert's r columns of dz * h (T, E)
    dlogits  = G * (dG - sum_e G dG)                        (T, E)    the exact router gradient
    dB_cat   = s d^T (h * G^p)                              (d_out, E*r)
    d[A; R]  = [dh, dlogits]^T x                            (E*r + E, d_in)    with x * m for A
    dx       = [dh, dlogits] [A_cat; R] + d W               (T, d_in)          dh A_cat * m with a mask

The router receives the exact gradient of the forward value; the experts' parameters and the layer input
receive it through ``G^p`` instead of ``G``.

Why one Function rather than autograd over the same ops (or one Function per part):

- ``h`` and ``logits`` come out of one GEMM with ``[A_cat; R]`` (without a mask), and so do their
  gradients: ``dh`` and ``dlogits`` are written side by side into one ``(T, E*r + E)`` buffer.
- The experts' output is accumulated into the base output inside its GEMM (``addmm_``), and the input
  gradient into one buffer by accumulating GEMMs, instead of autograd adding separate outputs and
  gradients with extra passes over (T, d_out) and (T, d_in).
- ``s`` rides in the GEMMs' ``alpha`` instead of costing passes of its own.
- Only ``x`` (which the model keeps anyway), the ``(T, E*r + E)`` projections and the ``(T, E)`` gates are
  saved, with the parameters themselves: the keep-mask is drawn again from its seed (``DropoutMask``),
  ``B_cat`` and the casts to the compute dtype under autocast are made again instead of kept.
- Each small kernel on a (T, E) tensor costs tens of microseconds on a CPU whatever its size, and one
  Function's Python runs once instead of three times: together that is a sizeable part of the layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from . import kernels, token_rows
from .dropout import DropoutMask, apply_mask
from .routing import gate_power, route_top_k, router_backward, routing_statistics


@dataclass(frozen=True)
class MixSpec:
    """The layer's constants for one forward pass: output scale ``s`` (``alpha / r``, divided by the
    dropout keep probability), backward gate power ``p`` and the number of kept experts per token."""

    scaling: float
    power: float
    top_k: int


def _as(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor.to(dtype)``, without the call when the dtype is already ``dtype`` (each call costs
    microseconds, and a layer's forward and backward passes make a dozen)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def stacked_a(lora_a: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``A`` (E, r, d_in) as ``A_cat`` (E*r, d_in) in ``dtype`` (a view when the dtype is A's own)."""
    return _as(lora_a.reshape(-1, lora_a.shape[-1]), dtype)


# Whole rows of the last dimension moved as one element each (see swap_leading): element sizes in bytes.
_WIDE_DTYPES = ((16, torch.complex128), (8, torch.int64), (4, torch.int32), (2, torch.int16))


def swap_leading(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor.transpose(0, 1).contiguous()`` of a contiguous 3-d tensor, bit for bit. The copy moves each
    row of the last dimension as one wide element (a ``(.., .., 4)`` float32 row as one 16-byte element):
    with short rows (``r`` floats) the element-wise strided copy costs about five times as much."""
    if tensor.is_contiguous() and not torch.compiler.is_compiling():
        row_bytes = tensor.shape[-1] * tensor.element_size()
        for size, wide in _WIDE_DTYPES:
            if row_bytes % size == 0 and (tensor.storage_offset() * tensor.element_size()) % size == 0:
                return tensor.view(wide).transpose(0, 1).contiguous().view(tensor.dtype)
    return tensor.transpose(0, 1).contiguous()


def stacked_b(lora_b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``B`` (E, d_out, r) as ``B_cat`` (d_out, E*r) in ``dtype``: column block ``i`` is ``B_i``."""
    return swap_leading(_as(lora_b, dtype)).view(lora_b.shape[1], -1)


def _mul_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out[...] = a * b`` without a temporary (``out`` may be a strided slice of a larger buffer).
    Dynamo cannot trace ``out=`` into a non-contiguous tensor; compiled, the copy is fused anyway."""
    if torch.compiler.is_compiling():
        out.copy_(a * b)
    else:
        torch.mul(a, b, out=out)


def _scaled_mm(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * (a @ b)`` in one GEMM: ``addmm`` with ``beta = 0`` ignores its (0-d) input."""
    return torch.addmm(a.new_zeros(()), a, b, beta=0, alpha=scale)


def route_and_gate(logits: torch.Tensor, h: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(gates, z, stats)``: the ``(T, E)`` float32 top-k gates of ``logits``, ``z = h * G`` (T, E*r) in
    ``h``'s dtype and the forward pass's ``routing_statistics``. In one compiled pass on a CPU where the
    kernels serve (``moelora.layers.kernels``); these PyTorch ops are the reference."""
    if kernels.applies(logits, h):
        return kernels.route(logits, h, top_k)
    tokens, num_experts = logits.shape
    gates, weights, index = route_top_k(logits, top_k)
    z = (h.view(tokens, num_experts, -1) * _as(gates, h.dtype).unsqueeze(-1)).view(tokens, -1)
    return gates, z, routing_statistics(weights, index, num_experts)


def gate_products(scaled_dz: torch.Tensor, h: torch.Tensor, gates: torch.Tensor, power: float,
                  grad_h: torch.Tensor, grad_logits: torch.Tensor) -> torch.Tensor:
    """The backward pass's gate products: writes ``grad_h = s dz * G^p`` (T, E*r) and
    ``grad_logits = router_backward(G, s sum_r dz * h)`` (T, E), returns ``h * G^p`` (T, E*r). In one
    compiled pass on a CPU where the kernels serve; these PyTorch ops are the reference."""
    if kernels.applies(gates, h) and kernels.applies(grad_logits, grad_h) and scaled_dz.dtype == torch.float32:
        return kernels.gate_backward(scaled_dz, h, gates, power, grad_h, grad_logits)
    tokens, num_experts = gates.shape
    dz3 = scaled_dz.view(tokens, num_experts, -1)
    h3 = h.view(tokens, num_experts, -1)
    gp = gate_power(gates, power).to(h.dtype).unsqueeze(-1)  # (T, E, 1)
    _mul_into(grad_h.view(tokens, num_experts, -1), dz3, gp)
    grad_logits.copy_(router_backward(gates, (dz3 * h3).sum(-1, dtype=torch.float32)))
    return (h3 * gp).view(tokens, -1)


class DenseMoELoRA(torch.autograd.Function):
    """``(x, W | None, b | None, A, R, B, router_input | None, base | None, mask | None, spec, rows | None)``
    -> ``(out, stats)``.

    ``x`` is in the compute dtype, to which ``W``, ``b``, ``A`` and ``B`` are cast here (their gradients
    come back in their own dtypes). ``W`` (with ``b``) is given when the base map is a plain linear map
    this Function computes itself; otherwise ``base`` is the caller's base output, of ``x``'s dtype, to
    which the experts' output is added (out of place), or both are None and ``out`` is the experts'
    output alone. ``router_input`` is ``x`` in the router's dtype when that differs from the compute
    dtype (under autocast the router stays in float32); None: the router reads ``x``. ``stats`` is the
    forward pass's ``routing_statistics``, not differentiable, for the layer's records. ``rows`` (n,)
    int64: the experts and the router compute those rows of ``x`` only (``mask`` then a ``DropoutMask`` or
    None); the other rows of ``out`` are the base output (zero without one) and get no expert gradient.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                lora_a: torch.Tensor, router: torch.Tensor, lora_b: torch.Tensor,
                router_input: torch.Tensor | None, base: torch.Tensor | None,
                mask: DropoutMask | torch.Tensor | None, spec: MixSpec, rows: torch.Tensor | None = None):
        # forward(ctx, ...) rather than setup_context: Function.apply then skips binding the arguments
        # through inspect.signature (about 70 us per call).
        dtype = x.dtype
        num_experts, rank, _ = lora_a.shape
        experts_cols = num_experts * rank
        a_cat = stacked_a(lora_a, dtype)
        joint = router_input is None and mask is None
        if rows is not None and not (mask is None or isinstance(mask, DropoutMask)):
            raise ValueError("DenseMoELoRA: rows need a DropoutMask (or no mask), not a mask tensor")
        row_mask = mask if isinstance(mask, DropoutMask) else None
        if joint:  # one GEMM for the experts and the router: [h, logits] = x [A_cat; R]^T
            experts_in = x if rows is None else token_rows.gather(x, rows)
            projected = experts_in @ torch.cat([a_cat, _as(router, dtype)]).t()
            h, logits = projected[:, :experts_cols], projected[:, experts_cols:]
        else:
            if rows is None:
                h = (x if mask is None else apply_mask(mask, x)) @ a_cat.t()
            else:
                h = token_rows.gather(x, rows, row_mask) @ a_cat.t()
            # The router reads x unmasked: computed on every row (no gathered copy of x), its rows kept.
            logits = x @ _as(router, dtype).t() if router_input is None else router_input @ router.t()
            if rows is not None:
                logits = logits.index_select(0, rows)
        gates, z, stats = route_and_gate(logits, h, spec.top_k)
        b_cat = stacked_b(lora_b, dtype)
        base_map = None
        if weight is not None:
            w = _as(weight, dtype)
            base_map = x @ w.t() if bias is None else torch.addmm(_as(bias, dtype), x, w.t())
        if rows is None:
            if base_map is not None:
                out = base_map.addmm_(z, b_cat.t(), alpha=spec.scaling)  # accumulated into the fresh base output
            elif base is not None:
                out = torch.addmm(base, z, b_cat.t(), alpha=spec.scaling)  # base + s z B^T in one kernel
            else:
                out = _scaled_mm(z, b_cat.t(), spec.scaling)
        else:  # the experts' rows added into the base output (zero without one)
            if base_map is not None:
                out = base_map
            elif base is not None:
                out = base.clone(memory_format=torch.contiguous_format)
            else:
                out = x.new_zeros(x.shape[0], b_cat.shape[0])
            token_rows.scatter_add_(out, rows, _scaled_mm(z, b_cat.t(), spec.scaling))

        stored_mask = mask if isinstance(mask, torch.Tensor) else None  # a boolean mask (torch.compile) is kept
        ctx.save_for_backward(x, weight, lora_a, router, lora_b, h, gates, router_input, stored_mask, rows)
        ctx.mask = mask if isinstance(mask, DropoutMask) else None
        ctx.spec, ctx.joint, ctx.has_base = spec, joint, base is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(stats)
        return out, stats

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor, _grad_stats: Any):
        x, weight, lora_a, router, lora_b, h, gates, router_input, stored, rows = ctx.saved_tensors
        spec: MixSpec = ctx.spec
        need_x, need_w, need_b, need_a, need_r, need_bmat, need_ri, need_base = ctx.needs_input_grad[:8]
        tokens, dtype = h.shape[0], x.dtype
        num_experts, rank, _ = lora_a.shape
        experts_cols = num_experts * rank
        grad_out = grad_out.contiguous()
        grad_rows = grad_out if rows is None else token_rows.gather(grad_out, rows)  # (n, d_out)
        b_cat = stacked_b(lora_b, dtype)
        a_cat = stacked_a(lora_a, dtype)

        grad_x = grad_w = grad_bias = grad_a = grad_r = grad_bmat = grad_ri = None
        need_h = need_x or need_a
        need_logits = need_x or need_r or need_ri
        if need_h or need_logits:
            scaled_dz = _scaled_mm(grad_rows, b_cat, spec.scaling)  # (n, E*r)
            # [dh, dlogits] side by side: one buffer, the operand of the GEMMs into A, R and x.
            if ctx.joint:
                grad_proj = x.new_empty(tokens, experts_cols + num_experts)
                grad_h, grad_logits = grad_proj[:, :experts_cols], grad_proj[:, experts_cols:]
            else:  # the router's gradients in the router's dtype when it reads router_input
                grad_h = x.new_empty(tokens, experts_cols)
                grad_logits = x.new_empty(tokens, num_experts, dtype=router.dtype if router_input is not None else dtype)
            h_gp = gate_products(scaled_dz, h, gates, spec.power, grad_h, grad_logits)
        else:
            h_gp = (h.view(tokens, num_experts, rank) * _as(gate_power(gates, spec.power), dtype).unsqueeze(-1))
            h_gp = h_gp.view(tokens, experts_cols)

        if need_bmat:
            grad_b_cat = _scaled_mm(grad_rows.t(), h_gp, spec.scaling)
            grad_bmat = _as(swap_leading(grad_b_cat.view(-1, num_experts, rank)), lora_b.dtype)

        mask = stored if ctx.mask is None else ctx.mask  # a DropoutMask draws the forward pass's mask again
        # The input gradient of the rows the experts computed, when they are not every row: added into grad_x.
        grad_x_rows: torch.Tensor | None = None
        if ctx.joint:
            if need_a or need_r:
                experts_in = x if rows is None else token_rows.gather(x, rows)
                grad_ar = grad_proj.t() @ experts_in  # (E*r + E, d_in)
                grad_a, grad_r = grad_ar[:experts_cols], _as(grad_ar[experts_cols:], router.dtype)
            if need_x:
                grad_x_rows = grad_proj @ torch.cat([a_cat, _as(router, dtype)])
        else:
            if rows is not None and need_logits:  # the router computed every row: its gradient too (0 at padding)
                grad_logits = grad_logits.new_zeros(x.shape[0], num_experts).index_copy_(0, rows, grad_logits)
            if need_a:
                if rows is None:
                    grad_a = grad_h.t() @ (x if mask is None else apply_mask(mask, x))
                else:
                    grad_a = grad_h.t() @ token_rows.gather(x, rows, ctx.mask)
            if need_r:
                grad_r = _as(grad_logits.t() @ (x if router_input is None else router_input), router.dtype)
            if need_x:
                grad_x_rows = grad_h @ a_cat
                if rows is None and mask is not None:
                    apply_mask(mask, grad_x_rows, inplace=True)
            if need_ri:
                grad_ri = grad_logits @ router
        if need_x:
            assert grad_x_rows is not None  # built above whenever need_x
            router_x = not ctx.joint and router_input is None  # the router's input gradient goes into grad_x
            if rows is None:
                grad_x = grad_x_rows
            elif weight is not None:
                grad_x = grad_out @ _as(weight, dtype)
            elif router_x:
                grad_x, router_x = grad_logits @ _as(router, dtype), False
            else:
                grad_x = x.new_zeros(x.shape)
            if router_x:
                grad_x.addmm_(grad_logits, _as(router, dtype))
            if rows is not None:
                token_rows.scatter_add_(grad_x, rows, grad_x_rows, None if ctx.joint else ctx.mask)
            elif weight is not None:
                grad_x.addmm_(grad_out, _as(weight, dtype))
        if weight is not None:
            if need_w:
                grad_w = _as(grad_out.t() @ x, weight.dtype)
            if need_b:
                grad_bias = grad_out.sum(dim=0).to(ctx.bias_dtype)
        if grad_a is not None:
            grad_a = _as(grad_a.reshape(lora_a.shape), lora_a.dtype)
        grad_base = grad_out if ctx.has_base and need_base else None
        return (grad_x, grad_w, grad_bias, grad_a, grad_r if need_r else None, grad_bmat, grad_ri, grad_base,
                None, None, None)
