"""Dropout of the experts' input, as a boolean keep-mask.

The layer applies dropout only to what its experts read (method.md section 1): ``drop(x) = x * m / q``
with ``m`` a Bernoulli(``q``) keep-mask, ``q = 1 - p``. Instead of ``nn.Dropout`` (which returns and, in
autograd, keeps a float copy of ``drop(x)``), the layer draws ``m`` here, keeps only the boolean mask for
the backward pass (1 byte per element instead of 4), and folds ``1 / q`` into the experts' output scale,
where it costs nothing.

On CPU, ``bernoulli_`` draws one random number per element; here each uniform 64-bit word of the
generator gives four 16-bit lanes, each compared with a threshold, which is 3-4x cheaper at the price of
rounding ``q`` to a multiple of ``2**-16`` (``keep_probability``; at ``p = 0.05`` the dropout rate is
0.0500031). On other devices the mask is ``bernoulli_(q)`` with ``q`` exact.
"""

from __future__ import annotations

import math

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
