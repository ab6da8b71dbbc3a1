"""The layer's inference path: the same function as the training path, with as little work per call as
possible (key/value-cache decoding calls every layer with ``T = batch size`` tokens, where the per-call
overhead, not the arithmetic, is what costs).

Taken when the layer is in eval mode and gradients are off (``model.eval()`` under ``torch.no_grad()`` or
``torch.inference_mode()``, as Hugging Face ``generate`` runs): no autograd Function, no gate statistics,
no diagnostics. Per call, for ``x`` ``(T, d_in)``:

    y   = base(x)                                  the base module's own forward (one GEMM for a Linear)
    z   = x @ W_cat^T                              (T, E + E*r): router logits and expert projections, one GEMM
    g   = softmax(top_k(z[:, :E]))                 (T, k) weights of the selected experts
    h   = z[:, E:] * G                             (T, E*r) in place; G holds g at the selected experts, 0 elsewhere
                                                   (on a CPU in float32 these two lines are one compiled pass,
                                                   ``moelora.layers.kernels.gate_in_place``)
    y  += s * h @ B_cat^T                          one GEMM accumulating into y (addmm_)

On a CPU in float32 with a plain ``nn.Linear`` base, up to ``kernels.DECODE_MAX_TOKENS`` tokens (decoding)
take one compiled pass after ``base(x)`` instead (``moelora.layers.kernels.decode``): per token the router
row dot products, the top-k softmax, and only the kept experts' rows of ``W_cat`` and ``B_cat^T`` (at
E = 20, top_k = 10 a little over half of what the two GEMMs read), accumulated into ``y`` in place.

``W_cat = [router.weight; A_1; ...; A_E]`` ``(E + E*r, d_in)`` and ``B_cat^T`` ``(E*r, d_out)`` (row block ``i`` =
``B_i^T``) are derived buffers, kept per dtype and device and rebuilt when a parameter changes: the cache key
holds each parameter's version counter (bumped by every in-place op, an optimizer step, ``copy_``,
``load_state_dict``) and storage pointer (``.data = ...``). An edit through ``.data.<op>_()`` bypasses the
version counter; ``model.train()`` / ``model.eval()`` (or ``layer.clear_inference_cache()``) drop the cache.

Under autocast the router's logits stay in the adapter's dtype, as on the training path (the top-k choice of
near-tied experts must not depend on the precision), so the router is a GEMM of its own there.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F

from . import kernels
from .routing import softmax_rows

if TYPE_CHECKING:
    from .linear import MoELoRALinear


def fused_weights(layer: MoELoRALinear, dtype: torch.dtype, with_router: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W_cat, B_cat^T)`` in ``dtype`` (``W_cat`` without the router rows when ``with_router`` is False),
    from the cache when the parameters have not changed since they were built."""
    # Direct dictionary reads: this runs once per layer and decoded token, where nn.Module's attribute
    # lookup is a measurable share of the time.
    a, b = layer._parameters["lora_A"], layer._parameters["lora_B"]
    router = layer._modules["router"]._parameters["weight"]  # type: ignore[union-attr]
    assert a is not None and b is not None and router is not None
    key = (dtype, with_router, a._version, b._version, router._version, a.data_ptr(), b.data_ptr(),
           router.data_ptr(), a.device)
    cached = layer._inference_cache
    if cached is not None and cached[0] == key:
        return cached[1], cached[2]
    E, r, d_in = a.shape
    with torch.no_grad():
        a_flat = a.detach().reshape(E * r, d_in)
        parts = [router.detach(), a_flat] if with_router else [a_flat]
        w_cat = torch.cat(parts).to(dtype).contiguous()
        b_cat_t = b.detach().transpose(1, 2).reshape(E * r, b.shape[1]).to(dtype).contiguous()
    layer._inference_cache = (key, w_cat, b_cat_t)
    return w_cat, b_cat_t


# Up to this many tokens the sparse form gathers the selected experts' weights per token; beyond, its
# grouped GEMMs (the training path's, without the statistics) are cheaper than the gathered copies.
SPARSE_GATHER_TOKENS = 64


def is_plain_linear(base: torch.nn.Module) -> bool:
    """A plain ``nn.Linear`` (no subclass, hook or patched ``forward``, which could change what it computes):
    ``F.linear`` computes exactly its forward, into a fresh tensor that may be added into in place."""
    return (type(base) is torch.nn.Linear and not base._forward_hooks and not base._forward_pre_hooks
            and "forward" not in base.__dict__)


def inference_forward(layer: MoELoRALinear, x: torch.Tensor, args: tuple, kwargs: dict,
                      compute: torch.dtype | None) -> torch.Tensor:
    """``base(x) + s * sum_i g_i(x) B_i A_i x`` for ``x`` ``(..., d_in)`` without autograd (see the module
    docstring); ``compute`` is the autocast dtype, if any."""
    d_in, d_out, E = layer.in_features, layer.out_features, layer.num_experts
    tokens = x.reshape(-1, d_in)
    base = layer._modules["base_layer"]
    assert base is not None
    plain = not args and not kwargs and is_plain_linear(base)
    if plain and compute is None:  # the base's forward itself, without a module call
        linear = cast(torch.nn.Linear, base)
        result = F.linear(tokens, linear.weight, linear.bias)
    else:
        result = base(x, *args, **kwargs).reshape(-1, d_out)
    adapter_dtype = layer._parameters["lora_A"].dtype  # type: ignore[union-attr]
    if compute is None:
        w_cat, b_cat_t = fused_weights(layer, adapter_dtype, with_router=True)
        if plain and kernels.decode_applies(tokens, result, w_cat, b_cat_t, E):  # decoding on a CPU: one pass
            kernels.decode(tokens, result, w_cat, b_cat_t, E, layer.top_k, layer.scaling)
            return result.view(*x.shape[:-1], d_out)
        z = torch.mm(tokens if tokens.dtype == adapter_dtype else tokens.to(adapter_dtype), w_cat.t())
        logits, h = z[:, :E], z[:, E:]
    else:
        with torch.autocast(x.device.type, enabled=False):
            w_cat, b_cat_t = fused_weights(layer, compute, with_router=False)
            h = torch.mm(tokens.to(compute), w_cat.t())
            # the router in the adapter's dtype (see the module docstring)
            logits = torch.mm(tokens.to(adapter_dtype), layer.router.weight.t())
    if compute is None and kernels.applies(logits, h):  # one compiled pass over z, in place (a CPU)
        kernels.gate_in_place(z, E, layer.top_k)
    else:
        values, index = logits.float().topk(layer.top_k, dim=-1, sorted=False)  # the order does not matter
        gates = torch.zeros(h.shape[0], E, dtype=h.dtype, device=h.device)
        gates.scatter_(1, index, softmax_rows(values).to(h.dtype))
        h = h.view(-1, E, layer.rank).mul_(gates.unsqueeze(-1)).view(h.shape[0], -1)
    if plain and result.dtype == h.dtype:
        result.addmm_(h, b_cat_t, alpha=layer.scaling)  # the base output is a fresh tensor of ours
    else:
        result = result + torch.mm(h, b_cat_t).mul_(layer.scaling).to(result.dtype)
    return result.view(*x.shape[:-1], d_out)


def sparse_inference_forward(layer: MoELoRALinear, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    """The sparse form for few tokens (decoding): each token's ``top_k`` experts' ``A`` and ``B`` gathered,
    ``T * top_k`` small matrix products in two batched GEMMs, in the adapter's dtype (as the sparse training
    path computes)."""
    lead = x.shape[:-1]
    result = layer.base_layer(x, *args, **kwargs).reshape(-1, layer.out_features)
    with torch.autocast(x.device.type, enabled=False) if torch.is_autocast_enabled(x.device.type) else contextlib.nullcontext():
        tokens = x.reshape(-1, layer.in_features).to(layer.lora_A.dtype)
        values, index = (tokens @ layer.router.weight.t()).float().topk(layer.top_k, dim=-1)
        weights = softmax_rows(values).to(tokens.dtype)                       # (T, k)
        a = layer.lora_A[index]                                                 # (T, k, r, d_in)
        b = layer.lora_B[index]                                                 # (T, k, d_out, r)
        h = torch.einsum("td,tkrd->tkr", tokens, a) * weights.unsqueeze(-1)     # (T, k, r)
        delta = torch.einsum("tkr,tkor->to", h, b).mul_(layer.scaling)          # (T, d_out)
    return (result + delta.to(result.dtype)).view(*lead, layer.out_features)
