"""Dropout of the experts' input, as a boolean keep-mask drawn again for the backward pass.

The layer applies dropout only to what its experts read (method.md section 1): ``drop(x) = x * m / q``
with ``m`` a Bernoulli(``q``) keep-mask, ``q = 1 - p``. Instead of ``nn.Dropout`` (which returns and, in
autograd, keeps a float copy of ``drop(x)``), the layer draws ``m`` from a generator seeded for this one
forward pass (``DropoutMask``), keeps only the seed for the backward pass, which draws the same mask again
(nothing of ``T x d_in`` is stored), and folds ``1 / q`` into the experts' output scale, where it costs
nothing.

On CPU, ``bernoulli_`` draws one random number per element; here each uniform 64-bit word of the
generator gives four 16-bit lanes, each compared with a threshold, which is 3-4x cheaper at the price of
rounding ``q`` to a multiple of ``2**-16`` (``keep_probability``; at ``p = 0.05`` the dropout rate is
0.0500031). On other devices the mask is ``bernoulli_(q)`` with ``q`` exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

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


def mask_values(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The boolean mask as 0/1 values of ``dtype``. Through ``uint8`` because bool -> float conversion and
    float * bool products take a scalar path on CPU, several times slower than this vectorised cast."""
    return keep.view(torch.uint8).to(dtype)


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

    def materialize(self) -> torch.Tensor:
        """The ``bool`` keep-mask (``keep_mask`` from a generator seeded with ``seed``)."""
        generator = torch.Generator(device=self.device)
        generator.manual_seed(self.seed)
        return keep_mask(self.shape, self.p, self.device, generator=generator)


def draw_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str) -> DropoutMask | torch.Tensor:
    """The layer's keep-mask for one forward pass: a ``DropoutMask`` (drawn again in the backward pass),
    or under ``torch.compile`` the boolean tensor itself (a seeded generator does not trace)."""
    if torch.compiler.is_compiling():
        return keep_mask(shape, p, device)
    return DropoutMask.draw(shape, p, device)


def keep_values(mask: DropoutMask | torch.Tensor | None) -> torch.Tensor | None:
    """The boolean keep-mask of ``mask`` (drawn from its seed for a ``DropoutMask``), or None."""
    return mask.materialize() if isinstance(mask, DropoutMask) else mask
