"""moelora: mixture of LoRA experts trained with per-expert and gate-rescaled Riemannian preconditioners.

The core (this package without ``finetune``, ``bench`` and ``reproduce``) needs only torch and
safetensors:

    import moelora
    model = moelora.wrap(model, moelora.MoELoRAConfig(num_experts=20, top_k=10, rank=4))
    moelora.save_adapter(model, "out/")
"""

from .adapter import adapter_state_dict, load_adapter, load_adapter_weights, read_adapter_config, save_adapter
from .config import MoELoRAConfig
from .diagnostics import router_stats
from .errors import AdapterError, ConfigError, MoELoRAError
from .hub import disable_adapter, from_pretrained, push_to_hub
from .inject import moelora_layers, print_trainable_parameters, summary, unwrap, wrap
from .layers import MoELoRALinear

__version__ = "0.1.0"

__all__ = [
    "AdapterError",
    "ConfigError",
    "MoELoRAConfig",
    "MoELoRAError",
    "MoELoRALinear",
    "adapter_state_dict",
    "disable_adapter",
    "from_pretrained",
    "load_adapter",
    "load_adapter_weights",
    "moelora_layers",
    "print_trainable_parameters",
    "push_to_hub",
    "read_adapter_config",
    "router_stats",
    "save_adapter",
    "summary",
    "unwrap",
    "wrap",
]
