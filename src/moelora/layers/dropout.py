"""Dropout of the experts' input, as a boolean keep-mask drawn again for the backward pass.

The layer applies dropout only to what its experts read (method.md section 1): ``drop(x) = x * m / q``
with ``m`` a Bernoulli(``q``) keep-mask, ``q = 1 - p``. Instead of ``nn.Dropout`` (which returns and, in
autograd, keeps a float copy of ``drop(x)``), the layer draws ``m`` from a seed drawn for this one forward
pass (``DropoutMask``), keeps only the seed for the backward pass, which draws the same mask again
(nothing of ``T x d_in`` is stored), and folds ``1 / q`` into the experts' output scale, where it costs
nothing.

On a CPU a mask is a function of its seed and each element's index: element ``e`` keeps when the 16-bit
lane ``e % 2`` of a counter-based hash of ``(seed, e // 2)`` is below ``q * 2**16`` (``hashed_lanes``),
which rounds ``q`` to a multiple of ``2**-16`` (``keep_probability``; at ``p = 0.05`` the dropout rate is
0.0500031). A compiled kernel (``moelora.layers.kernels``) draws and applies it in one pass, several times
cheaper than ``bernoulli_``; ``hashed_lanes`` is its PyTorch reference, bit for bit, so the mask of a seed
is the same with or without the compiled kernels. On other devices the mask is ``bernoulli_(q)`` from a
generator seeded with the seed, with ``q`` exact. Under ``torch.compile`` (where a seeded draw does not
trace) the mask is drawn from the default generator as four 16-bit lanes per 64-bit word (``keep_mask``)
and kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from . import kernels

LANE_BITS = 16
_LANES_PER_WORD = 4  # 16-bit lanes in an int64
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


def _keep_threshold(p: float) -> int:
    """``q * 2**16`` rounded, kept in ``[1, 2**16 - 1]``: some lane values keep, some drop, for any p > 0."""
    return min(max(1, round((1.0 - p) * (1 << LANE_BITS))), (1 << LANE_BITS) - 1)


def keep_probability(p: float, device: torch.device | str = "cpu") -> float:
    """The exact keep probability ``q`` of ``keep_mask(..., p, device)``: ``1 - p``, rounded on CPU to a
    multiple of ``2**-16`` within ``[2**-16, 1 - 2**-16]``."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"dropout must be in (0, 1) to draw a mask, got {p}")
    if torch.device(device).type != "cpu":
        return 1.0 - p
    return _keep_threshold(p) / (1 << LANE_BITS)


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str = "cpu",
              generator: torch.Generator | None = None) -> torch.Tensor:
    """A ``bool`` tensor of ``shape``: ``True`` (keep) with probability ``keep_probability(p, device)``,
    independently per element, drawn from ``generator`` (the default generator when ``None``)."""
    keep_probability(p, device)  # validates p
    device = torch.device(device)
    if device.type != "cpu":
        return torch.empty(shape, dtype=torch.bool, device=device).bernoulli_(1.0 - p, generator=generator)
    count = math.prod(shape)
    # The full int64 range: every bit of every word is uniform (``random_`` would leave the top bit 0).
    words = torch.randint(_INT64_MIN, _INT64_MAX, (-(-count // _LANES_PER_WORD),), dtype=torch.int64,
                          generator=generator)
    lanes = words.view(torch.int16)[:count].view(shape)  # uniform over [-2**15, 2**15)
    return lanes < _keep_threshold(p) - (1 << (LANE_BITS - 1))


_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """``x * constant mod 2**32`` for int64 ``x`` in ``[0, 2**32)`` without overflowing int64: the constant's
    two 16-bit halves separately (every product stays below ``2**49``)."""
    low, high = constant & 0xFFFF, constant >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & _M32


def _lowbias32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift / multiply rounds, full avalanche) of int64 ``x`` in ``[0, 2**32)``."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x21F0AAAD)
    x = x ^ (x >> 15)
    x = _mul32(x, 0xD35A2D97)
    return x ^ (x >> 15)


def hashed_lanes(seed: int, count: int) -> torch.Tensor:
    """The ``(count,)`` int64 16-bit lanes of the CPU mask of ``seed``: element ``e`` is lane ``e % 2`` of
    ``h(w) = lowbias32(lowbias32(lo32(w) ^ lo32(seed)) ^ hi32(seed) ^ hi32(w))`` with ``w = e // 2``
    (the PyTorch reference of ``moelora/layers/kernels/dropout.c``)."""
    words = torch.arange(-(-count // 2), dtype=torch.int64)
    hashed = _lowbias32(_lowbias32((words & _M32) ^ (seed & _M32)) ^ ((seed >> 32) & _M32) ^ (words >> 32))
    return torch.stack([hashed & 0xFFFF, hashed >> 16], dim=1).view(-1)[:count]


def hashed_keep_mask(shape: torch.Size | tuple[int, ...], p: float, seed: int) -> torch.Tensor:
    """The CPU ``bool`` keep-mask of ``seed`` over ``shape`` (compiled where the kernels are built, else
    from ``hashed_lanes``; the same mask either way)."""
    threshold = _keep_threshold(p)
    count = math.prod(shape)
    keep = kernels.keep_mask(count, seed, threshold)
    if keep is None:
        keep = hashed_lanes(seed, count) < threshold
    return keep.view(shape)


def mask_values(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The boolean mask as 0/1 values of ``dtype``. Through ``uint8`` because bool -> float conversion and
    float * bool products take a scalar path on CPU, several times slower than this vectorised cast."""
    return keep.view(torch.uint8).to(dtype)


def _multiply(x: torch.Tensor, keep: torch.Tensor, inplace: bool) -> torch.Tensor:
    """``x * keep`` for a boolean ``keep`` of ``x``'s shape, into ``x`` itself with ``inplace``."""
    values = mask_values(keep, x.dtype)
    return x.mul_(values) if inplace else x * values


@dataclass(frozen=True)
class DropoutMask:
    """A keep-mask of ``shape`` known by its generator seed: ``materialize()`` draws the same boolean mask
    each time it is called, so the backward pass draws it again rather than the forward pass storing it.

    The seed is drawn from the default CPU generator, so ``torch.manual_seed`` (and activation
    checkpointing, which restores the RNG state before recomputing a forward pass) reproduce the mask."""

    shape: tuple[int, ...]
    p: float
    device: torch.device
    seed: int

    @classmethod
    def draw(cls, shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str) -> DropoutMask:
        keep_probability(p, device)  # validates p
        seed = int(torch.randint(0, _INT64_MAX, (1,), dtype=torch.int64))
        return cls(tuple(shape), p, torch.device(device), seed)

    @property
    def threshold(self) -> int:
        """The CPU mask's keep threshold: an element keeps when its 16-bit hashed lane is below it."""
        return _keep_threshold(self.p)

    def materialize(self) -> torch.Tensor:
        """The ``bool`` keep-mask: ``hashed_keep_mask`` on a CPU, elsewhere ``keep_mask`` from a generator
        seeded with ``seed``."""
        if self.device.type == "cpu":
            return hashed_keep_mask(self.shape, self.p, self.seed)
        generator = torch.Generator(device=self.device)
        generator.manual_seed(self.seed)
        return keep_mask(self.shape, self.p, self.device, generator=generator)

    def apply(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """``x * m`` for ``x`` of the mask's shape (into ``x`` itself with ``inplace``), differentiable in
        ``x``: drawn and applied in one compiled pass for a float32 CPU ``x``, else through
        ``materialize()``."""
        if torch.is_grad_enabled() and x.requires_grad:
            if inplace:
                raise RuntimeError("DropoutMask.apply(inplace=True) on a tensor that requires grad")
            return _Dropped.apply(x, self)
        if self.device.type == "cpu":
            out = kernels.dropout(x, self.seed, self.threshold, out=x if inplace else None)
            if out is not None:
                return out
        return _multiply(x, self.materialize(), inplace)


class _Dropped(torch.autograd.Function):
    """``mask.apply(x)`` under autograd: the backward pass applies the same mask (drawn again) to the
    gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, mask: DropoutMask) -> torch.Tensor:
        ctx.mask = mask
        return mask.apply(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        return ctx.mask.apply(grad.contiguous()), None


def draw_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str) -> DropoutMask | torch.Tensor:
    """The layer's keep-mask for one forward pass: a ``DropoutMask`` (drawn again in the backward pass),
    or under ``torch.compile`` the boolean tensor itself (a seeded generator does not trace)."""
    if torch.compiler.is_compiling():
        return keep_mask(shape, p, device)
    return DropoutMask.draw(shape, p, device)


def apply_mask(mask: DropoutMask | torch.Tensor, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``x * m`` for a ``DropoutMask`` or a boolean mask tensor ``m`` of ``x``'s shape."""
    if isinstance(mask, DropoutMask):
        return mask.apply(x, inplace)
    return _multiply(x, mask, inplace)
