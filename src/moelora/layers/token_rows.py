"""Which token rows the adapters compute: padding positions skipped.

A padded batch of ``B`` sequences of ``S`` positions holds ``n <= B * S`` real tokens. In a decoder whose
layers are per-token maps and attention that masks padded keys, nothing at a padding position reaches a
real position or the loss: the loss, every real position's output and every gradient are the same
whatever is computed there. So while the decoder runs on a batch with a 2-d ``attention_mask``, its
MoE-LoRA layers compute the experts and the router on the ``n`` real rows only (``rows``, the flat indices
of the real positions among the ``B * S``) and add nothing at padding positions, which keep the base
map's output. The experts' GEMMs then have ``n`` rows instead of ``B * S`` (the router's too without
dropout), and the routing statistics (the gate-rescaled preconditioner's ``g^2`` means, the load and
entropy diagnostics) count real tokens only.

``install(model)`` (called by ``moelora.wrap`` unless ``skip_padding=False``) puts a forward pre-hook on
the model's decoder (``get_decoder()``) that reads the call's ``attention_mask`` and makes its rows
current for the decoder's forward (``computing_only``). It does so only for decoders whose padding
cannot reach real positions (``SKIPS_PADDING_MODEL_TYPES``: attention and per-token layers; a recurrent
or convolutional mixer would carry a padding position's value into the real ones), in training with
gradients, and not under activation checkpointing (a recomputed forward pass runs outside the hook and
must see the same shapes).

``gather`` and ``scatter_add_`` move rows between the full ``(B * S, d)`` arrays and the compact
``(n, d)`` ones, with the dropout keep-mask of the full array applied on the way (so a real row sees the
mask it would see without the skipping); a compiled kernel on a CPU, else PyTorch ops.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import kernels
from .dropout import DropoutMask, mask_values


@dataclass(frozen=True)
class TokenRows:
    """The real positions of a ``(B, S)`` batch: ``index`` (n,) int64, the sorted flat indices (``b * S + s``)
    of the positions whose ``attention_mask`` is nonzero, on the mask's device."""

    lead_shape: tuple[int, ...]
    index: torch.Tensor

    @classmethod
    def from_mask(cls, attention_mask: torch.Tensor) -> TokenRows | None:
        """The rows of a 2-d ``(B, S)`` 0/1 ``attention_mask``; None when every position is real (nothing to
        skip), when none is, or when the mask is not a 2-d padding mask (a 4-d or float mask says more than
        which positions are padding)."""
        if attention_mask.dim() != 2 or attention_mask.is_floating_point() or attention_mask.is_complex():
            return None
        index = attention_mask.reshape(-1).nonzero().squeeze(1)
        if index.numel() in (0, attention_mask.numel()):
            return None
        return cls(tuple(attention_mask.shape), index)


_CURRENT: contextvars.ContextVar[TokenRows | None] = contextvars.ContextVar("moelora_token_rows", default=None)


@contextlib.contextmanager
def computing_only(rows: TokenRows | None) -> Iterator[None]:
    """Within this context the MoE-LoRA layers whose input is ``(*rows.lead_shape, d)`` compute the adapters
    on ``rows`` only (None: on every row)."""
    token = _CURRENT.set(rows)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def current_rows(lead_shape: torch.Size | tuple[int, ...], device: torch.device) -> torch.Tensor | None:
    """The current rows' ``index`` for a layer input of leading shape ``lead_shape`` on ``device``, or None
    (no rows current, another shape, or under ``torch.compile``, whose graphs need static shapes)."""
    if torch.compiler.is_compiling():  # first: Dynamo cannot trace ContextVar.get
        return None
    rows = _CURRENT.get()
    if rows is None or tuple(lead_shape) != rows.lead_shape:
        return None
    return rows.index if rows.index.device == device else rows.index.to(device)


def _threshold(mask: DropoutMask | None) -> tuple[int, int]:
    """``(seed, threshold)`` of the row kernels for ``mask`` (``kernels.NO_MASK``: no mask)."""
    return (0, kernels.NO_MASK) if mask is None else (mask.seed, mask.threshold)


def _mask_rows(mask: DropoutMask, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The keep-mask's values at ``rows``, ``(n, d)`` in ``dtype``."""
    return mask_values(mask.materialize().index_select(0, rows.to(mask.device)), dtype)


def gather(x: torch.Tensor, rows: torch.Tensor, mask: DropoutMask | None = None) -> torch.Tensor:
    """``(x * m)[rows]`` (n, d) for ``x`` (T, d), ``m`` the keep-mask ``mask`` over ``x``'s shape (no mask
    when None): a new contiguous tensor."""
    if mask is None or mask.device.type == "cpu":
        seed, threshold = _threshold(mask)
        out = kernels.gather_rows(x, rows, seed, threshold)
        if out is not None:
            return out
    picked = x.index_select(0, rows)
    return picked if mask is None else picked.mul_(_mask_rows(mask, rows, x.dtype))


def scatter_add_(out: torch.Tensor, rows: torch.Tensor, src: torch.Tensor, mask: DropoutMask | None = None) -> None:
    """``out[rows] += src * m[rows]`` in place, for ``out`` (T, d), distinct ``rows`` (n,), ``src`` (n, d) and
    ``m`` the keep-mask ``mask`` over ``out``'s shape (no mask when None)."""
    if mask is None or mask.device.type == "cpu":
        seed, threshold = _threshold(mask)
        if kernels.scatter_add_rows(out, rows, src.contiguous(), seed, threshold):
            return
    out.index_add_(0, rows, src if mask is None else src * _mask_rows(mask, rows, src.dtype))


# transformers model types whose decoders are attention (masking padded keys) and per-token layers only, so a
# padding position's values reach no real position: their MoE-LoRA layers skip padding. Models with a
# recurrent or convolutional token mixer (Mamba, RWKV, Jamba, Qwen3-Next...) are not listed.
SKIPS_PADDING_MODEL_TYPES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2", "phi", "phi3",
    "olmo", "olmo2", "granite", "starcoder2", "gpt2", "gpt_neox", "opt", "stablelm", "cohere",
})


def skips_padding(decoder: nn.Module) -> bool:
    """Whether ``decoder``'s padding positions cannot reach its real ones (its model type is listed)."""
    return getattr(getattr(decoder, "config", None), "model_type", None) in SKIPS_PADDING_MODEL_TYPES


def _decoder(model: nn.Module) -> nn.Module | None:
    get_decoder = getattr(model, "get_decoder", None)
    if not callable(get_decoder):
        return None
    try:
        decoder = get_decoder()
    except (AttributeError, NotImplementedError, TypeError):
        return None
    return decoder if isinstance(decoder, nn.Module) else None


_TOKENS_ATTR = "_moelora_rows_tokens"  # the decoder's stack of context tokens, one per call in progress


def _checkpointed(module: nn.Module) -> bool:
    """Whether any part of ``module`` recomputes its forward pass in the backward pass: transformers'
    ``gradient_checkpointing`` flags, or torch's ``CheckpointWrapper`` modules."""
    return any(getattr(m, "gradient_checkpointing", False) is True or type(m).__name__ == "CheckpointWrapper"
               for m in module.modules())


def _enter_rows(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
    mask = kwargs.get("attention_mask")
    rows = None
    if (isinstance(mask, torch.Tensor) and module.training and torch.is_grad_enabled()
            and not torch.compiler.is_compiling() and not _checkpointed(module)):
        rows = TokenRows.from_mask(mask)
    module.__dict__.setdefault(_TOKENS_ATTR, []).append(_CURRENT.set(rows))


def _leave_rows(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
    tokens = module.__dict__.get(_TOKENS_ATTR)
    if tokens:
        _CURRENT.reset(tokens.pop())


def install(model: nn.Module) -> bool:
    """Hook ``model``'s decoder so that its MoE-LoRA layers skip padding positions in training; False (and
    nothing hooked) where the model has no decoder or its type is not in ``SKIPS_PADDING_MODEL_TYPES``."""
    decoder = _decoder(model)
    if decoder is None or not skips_padding(decoder) or installed(decoder):
        return False
    decoder.register_forward_pre_hook(_enter_rows, with_kwargs=True)
    decoder.register_forward_hook(_leave_rows, with_kwargs=True, always_call=True)
    return True


def installed(module: nn.Module) -> bool:
    """Whether ``module`` carries the hooks of ``install``."""
    return any(hook is _enter_rows for hook in module._forward_pre_hooks.values())


def uninstall(model: nn.Module) -> None:
    """Remove ``install``'s hooks from ``model``'s decoder (if any)."""
    decoder = _decoder(model)
    if decoder is None:
        return
    for hooks, hook in ((decoder._forward_pre_hooks, _enter_rows), (decoder._forward_hooks, _leave_rows)):
        for key in [key for key, value in hooks.items() if value is hook]:
            del hooks[key]
            for extra in ("_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs"):
                getattr(decoder, extra, {}).pop(key, None)
