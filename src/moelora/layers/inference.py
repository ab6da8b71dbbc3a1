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
    y  += s * h @ B_cat^T                          one GEMM accumulating into y (addmm_)

``W_cat = [router.weight; A_1; ...; A_E]`` ``(E + E*r, d_in)`` and ``B_cat^T`` ``(E*r, d_out)`` (row block ``i`` =
``B_i^T``) are derived buffers, kept per dtype and device and rebuilt when a parameter changes: the cache key
holds each parameter's version counter (bumped by every in-place op, an optimizer step, ``copy_``,
``load_state_dict``) and storage pointer (``.data = ...``). An edit through ``.data.<op>_()`` bypasses the
version counter; ``model.train()`` / ``model.eval()`` (or ``layer.clear_inference_cache()``) drop the cache.

Under autocast the router's logits stay in the adapter's dtype, as on the training path (the top-k choice of
near-tied experts must not depend on the precision), so the router is a GEMM of its own there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .linear import MoELoRALinear


def _key(layer: MoELoRALinear, dtype: torch.dtype, device: torch.device) -> tuple:
    params = (layer.lora_A, layer.lora_B, layer.router.weight)
    return (dtype, device, *(p._version for p in params), *(p.data_ptr() for p in params))


def fused_weights(layer: MoELoRALinear, dtype: torch.dtype, with_router: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W_cat, B_cat^T)`` in ``dtype`` (``W_cat`` without the router rows when ``with_router`` is False),
    from the cache when the parameters have not changed since they were built."""
    key = (*_key(layer, dtype, layer.lora_A.device), with_router)
    cached = layer._inference_cache
    if cached is not None and cached[0] == key:
        return cached[1], cached[2]
    E, r, d_in = layer.lora_A.shape
    with torch.no_grad():
        a_flat = layer.lora_A.detach().reshape(E * r, d_in)
        parts = [layer.router.weight.detach(), a_flat] if with_router else [a_flat]
        w_cat = torch.cat(parts).to(dtype).contiguous()
        b_cat_t = layer.lora_B.detach().transpose(1, 2).reshape(E * r, layer.out_features).to(dtype).contiguous()
    layer._inference_cache = (key, w_cat, b_cat_t)
    return w_cat, b_cat_t


# Up to this many tokens the sparse form gathers the selected experts' weights per token; beyond, its
# grouped GEMMs (the training path's, without the statistics) are cheaper than the gathered copies.
SPARSE_GATHER_TOKENS = 64


def _owns_output(layer: MoELoRALinear) -> bool:
    """Whether the base module's output is a fresh tensor that may be added into in place (a plain
    ``nn.Linear``, whose ``F.linear`` always allocates one)."""
    base = layer.base_layer
    return (type(base) is torch.nn.Linear and not base._forward_hooks and not base._forward_pre_hooks
            and "forward" not in base.__dict__)


def inference_forward(layer: MoELoRALinear, x: torch.Tensor, args: tuple, kwargs: dict,
                      compute: torch.dtype | None) -> torch.Tensor:
    """``base(x) + s * sum_i g_i(x) B_i A_i x`` for ``x`` ``(..., d_in)`` without autograd (see the module
    docstring); ``compute`` is the autocast dtype, if any."""
    lead = x.shape[:-1]
    result = layer.base_layer(x, *args, **kwargs).reshape(-1, layer.out_features)
    E, k = layer.num_experts, layer.top_k
    adapter_dtype = layer.lora_A.dtype
    dtype = compute or adapter_dtype
    tokens = x.reshape(-1, layer.in_features)
    with torch.autocast(x.device.type, enabled=False) if compute is not None else _nullcontext():
        w_cat, b_cat_t = fused_weights(layer, dtype, with_router=compute is None)
        adapter_in = tokens.to(dtype)
        z = adapter_in @ w_cat.t()
        if compute is None:
            logits, h = z[:, :E], z[:, E:]
        else:  # the router in the adapter's dtype (see the module docstring)
            logits, h = tokens.to(adapter_dtype) @ layer.router.weight.t(), z
        values, index = logits.float().topk(k, dim=-1)
        gates = torch.zeros(tokens.shape[0], E, dtype=h.dtype, device=h.device)
        gates.scatter_(1, index, values.softmax(dim=-1).to(h.dtype))
        h = h.view(-1, E, layer.rank).mul_(gates.unsqueeze(-1)).view(-1, E * layer.rank)
        if result.dtype == h.dtype and result.is_contiguous() and _owns_output(layer):
            result.addmm_(h, b_cat_t, alpha=layer.scaling)  # the base output is a fresh tensor of ours
        else:
            result = result + torch.mm(h, b_cat_t).mul_(layer.scaling).to(result.dtype)
    return result.view(*lead, layer.out_features)


def sparse_inference_forward(layer: MoELoRALinear, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    """The sparse form for few tokens (decoding): each token's ``top_k`` experts' ``A`` and ``B`` gathered,
    ``T * top_k`` small matrix products in two batched GEMMs, in the adapter's dtype (as the sparse training
    path computes)."""
    lead = x.shape[:-1]
    result = layer.base_layer(x, *args, **kwargs).reshape(-1, layer.out_features)
    with torch.autocast(x.device.type, enabled=False) if torch.is_autocast_enabled(x.device.type) else _nullcontext():
        tokens = x.reshape(-1, layer.in_features).to(layer.lora_A.dtype)
        values, index = (tokens @ layer.router.weight.t()).float().topk(layer.top_k, dim=-1)
        weights = values.softmax(dim=-1).to(tokens.dtype)                       # (T, k)
        a = layer.lora_A[index]                                                 # (T, k, r, d_in)
        b = layer.lora_B[index]                                                 # (T, k, d_out, r)
        h = torch.einsum("td,tkrd->tkr", tokens, a) * weights.unsqueeze(-1)     # (T, k, r)
        delta = torch.einsum("tkr,tkor->to", h, b).mul_(layer.scaling)          # (T, d_out)
    return (result + delta.to(result.dtype)).view(*lead, layer.out_features)


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
