"""Quantised (bitsandbytes 4-bit) base layers that must stay differentiable in their input.

The adapters of every layer get their gradient through the frozen base layers after them, so a 4-bit base
layer must pass ``dL/dx`` back. On a CPU with AVX512-BF16, bitsandbytes' ``Linear4bit`` repacks its
weight for a faster kernel the first time it runs in eval mode without gradients (an evaluation, a
zero-shot score), and keeps that layout: from then on its training forward runs that inference kernel,
which has no backward, and the input gradient through the layer is silently lost (bitsandbytes 0.50;
autograd only warns). ``keep_4bit_layers_differentiable`` turns the repacking off and undoes it where it
already happened; ``moelora.wrap`` calls it, so a wrapped model trains correctly whatever ran before.
The price is bitsandbytes' faster CPU inference kernel for the wrapped model's 4-bit layers (GPUs do
not use it).
"""

from __future__ import annotations

from typing import Any

from torch import nn


def keep_4bit_layers_differentiable(model: nn.Module) -> int:
    """Stop every bitsandbytes ``Linear4bit`` of ``model`` from repacking its weight for CPU inference,
    and restore the trainable layout of any that already did; returns how many were restored."""
    restored = 0
    for module in model.modules():
        if not hasattr(module, "support_avx512bf16_for_cpu"):  # only bitsandbytes' Linear4bit has it
            continue
        object.__setattr__(module, "support_avx512bf16_for_cpu", False)  # a plain attribute of Linear4bit
        weight: Any = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if weight is not None and state is not None and getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
            restored += 1
    return restored
