"""The MoE-LoRA linear layer and its parts.

- ``linear``: ``MoELoRALinear`` (the layer) and ``GatedExpertMix`` (the dense gated mix of the experts);
- ``projection``: ``InputProjection``, one autograd Function for everything that reads the input;
- ``sparse``: the grouped form that computes only the selected (token, expert) pairs;
- ``routing``: top-k softmax gates, the backward gate power, router statistics;
- ``dropout``: the experts' input dropout as a saved Boolean mask.
"""

from .linear import GatedExpertMix, MoELoRALinear, layer_of

__all__ = ["GatedExpertMix", "MoELoRALinear", "layer_of"]
