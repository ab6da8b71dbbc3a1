"""The input side of the layer in one autograd Function: everything that reads ``x``.

For tokens ``x`` (T, d_in), an optional frozen base linear map ``W`` (d_out, d_in) with bias ``b``, the
expert down-projections ``A`` (E, r, d_in), stacked as ``A_cat`` (E*r, d_in), the router ``R`` (E, d_in)
and an optional dropout keep-mask ``m`` (T, d_in, bool):

    base   = x W^T + b                  (T, d_out)   only when W is given
    h      = (x * m) A_cat^T            (T, E*r)     x A_cat^T without a mask
    logits = x R^T                      (T, E)       the router sees x without dropout

The ``1 / q`` dropout rescaling is left to the caller (the layer folds it into its output scale).

Why one Function rather than autograd over the same ops:

- The input gradient is built in one buffer, ``dx = d_base W + (dh A_cat) * m + d_logits R``, by
  accumulating GEMMs (``addmm_``), instead of autograd summing the separate gradients of the base map,
  the experts and the router with extra passes over (T, d_in).
- Without a mask, ``h`` and ``logits`` come out of one GEMM with ``[A_cat; R]``, and so do their
  gradients (``d[A_cat; R] = [dh, d_logits]^T x`` and its product into ``dx``).
- Only ``x`` (which the model keeps anyway) is saved, with the parameters themselves: the keep-mask is
  drawn again from its seed (``DropoutMask``), where autograd over ``nn.Dropout`` would keep a float copy
  of ``x * m`` per layer, and the casts of ``W`` and ``A`` to the compute dtype under autocast are made
  again instead of kept.
"""

from __future__ import annotations

from typing import Any

import torch

from .dropout import DropoutMask, keep_values, mask_values


def _stacked(lora_a: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``A`` (E, r, d_in) as ``A_cat`` (E*r, d_in) in ``dtype`` (a view when the dtype is A's own)."""
    return lora_a.reshape(-1, lora_a.shape[-1]).to(dtype)


class InputProjection(torch.autograd.Function):
    """``(x, W | None, b | None, A, R, mask | None) -> (base, h, logits)``, or ``(h, logits)`` when ``W``
    is None (the caller computes the base output itself). Everything computes in ``x``'s dtype: ``W`` and
    ``A`` are cast to it here (``b`` and ``R`` come in it); the gradients of ``W`` and ``A`` come back in
    their own dtypes."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                lora_a: torch.Tensor, router: torch.Tensor, mask: DropoutMask | torch.Tensor | None):
        # forward(ctx, ...) rather than setup_context: Function.apply then skips binding the arguments
        # through inspect.signature (about 70 us per call).
        stored = mask if isinstance(mask, torch.Tensor) else None  # a boolean mask (torch.compile) is kept
        ctx.save_for_backward(x, weight, lora_a, router, stored)
        ctx.mask = mask if isinstance(mask, DropoutMask) else None
        ctx.has_base = weight is not None
        a_cat = _stacked(lora_a, x.dtype)
        experts_rows = a_cat.shape[0]
        keep = keep_values(mask)
        if keep is None:
            projected = x @ torch.cat([a_cat, router]).t()
            h, logits = projected.split([experts_rows, router.shape[0]], dim=-1)
        else:
            h = (x * mask_values(keep, x.dtype)) @ a_cat.t()
            logits = x @ router.t()
        if weight is None:
            return h, logits
        w = weight.to(x.dtype)
        base = x @ w.t() if bias is None else torch.addmm(bias, x, w.t())
        return base, h, logits

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None):
        x, weight, lora_a, router, stored = ctx.saved_tensors
        a_cat = _stacked(lora_a, x.dtype)
        keep = stored if ctx.mask is None else ctx.mask.materialize()  # the forward pass's mask, drawn again
        grad_base, grad_h, grad_logits = grads if ctx.has_base else (None, *grads)
        need_x, need_w, need_b, need_a, need_r = ctx.needs_input_grad[:5]
        experts_rows = a_cat.shape[0]
        if grad_h is None:
            grad_h = x.new_zeros(x.shape[0], experts_rows)
        if grad_logits is None:
            grad_logits = x.new_zeros(x.shape[0], router.shape[0])
        grad_x = grad_w = grad_b = grad_a = grad_r = None

        if keep is None:
            grad_projected = torch.cat([grad_h, grad_logits], dim=-1)  # (T, E*r + E)
            if need_a or need_r:
                grad_ar = grad_projected.t() @ x
                grad_a, grad_r = grad_ar.split([experts_rows, router.shape[0]])
            if need_x:
                grad_x = grad_projected @ torch.cat([a_cat, router])
        else:
            mask = mask_values(keep, x.dtype)
            if need_a:
                grad_a = grad_h.t() @ (x * mask)
            if need_r:
                grad_r = grad_logits.t() @ x
            if need_x:
                grad_x = (grad_h @ a_cat).mul_(mask).addmm_(grad_logits, router)
        if ctx.has_base and grad_base is not None:
            if need_x:
                assert grad_x is not None  # built above whenever need_x
                grad_x = grad_x.addmm_(grad_base, weight.to(x.dtype))
            if need_w:
                grad_w = (grad_base.t() @ x).to(weight.dtype)
            if need_b:
                grad_b = grad_base.sum(dim=0)
        if need_a:
            assert grad_a is not None  # built above whenever need_a
            grad_a = grad_a.view(lora_a.shape).to(lora_a.dtype)
        return (grad_x, grad_w, grad_b, grad_a, grad_r if need_r else None, None)
