"""Router diagnostics gathered over a model's MoE-LoRA layers."""

from __future__ import annotations

from typing import Any

from torch import nn

from .inject import moelora_layers


def router_stats(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per-layer router diagnostics of the last forward pass.

    Returns ``{layer name: {"expert_load": [E floats summing to 1], "gate_entropy": float}}``: the share of
    token-to-expert assignments that went to each expert, and the mean entropy (nats) of the tokens' gates.
    Layers built with ``track_router_stats=False`` are left out.
    """
    return {
        name: {"expert_load": layer.expert_load.tolist(), "gate_entropy": float(layer.gate_entropy)}
        for name, layer in moelora_layers(model)
        if layer.track_router_stats
    }
