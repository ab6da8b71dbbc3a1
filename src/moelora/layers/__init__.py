"""The MoE-LoRA linear layer and its parts.

- ``linear``: ``MoELoRALinear`` (the layer);
- ``dense``: ``DenseMoELoRA``, the dense stacked form of the training path as one autograd Function;
- ``sparse``: the grouped form that computes only the selected (token, expert) pairs;
- ``inference``: the eval-mode, no-grad path (generation);
- ``routing``: top-k softmax gates, their backward, the backward gate power, router statistics;
- ``dropout``: the experts' input dropout as a keep-mask drawn again for the backward pass.
"""

from .dense import DenseMoELoRA
from .linear import MoELoRALinear, layer_of

__all__ = ["DenseMoELoRA", "MoELoRALinear", "layer_of"]
