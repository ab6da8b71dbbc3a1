"""moelora: mixture of LoRA experts trained with per-expert and gate-rescaled Riemannian preconditioners."""

from .config import MoELoRAConfig
from .layer import GatedExpertMix, MoELoRALinear
from .model import (
    adapter_state_dict,
    load_adapter,
    moelora_layers,
    print_trainable_parameters,
    read_adapter_config,
    save_adapter,
    summary,
    unwrap,
    wrap,
)
from .diagnostics import router_stats

__version__ = "0.1.0"

__all__ = [
    "GatedExpertMix",
    "MoELoRAConfig",
    "MoELoRALinear",
    "adapter_state_dict",
    "load_adapter",
    "moelora_layers",
    "print_trainable_parameters",
    "read_adapter_config",
    "router_stats",
    "save_adapter",
    "summary",
    "unwrap",
    "wrap",
]
