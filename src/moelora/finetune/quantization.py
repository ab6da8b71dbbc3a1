"""Quantised bases (``model.quantization``): QLoRA's 4-bit NF4, 4-bit FP4 and 8-bit, through bitsandbytes.

- A model loaded from a folder is quantised by transformers while it loads (``BitsAndBytesConfig``);
- a model built in memory (``random-llama``) has its linear layers swapped for bitsandbytes ones
  (``quantize_linears``), which quantise their weights when they are moved to their device.

``nf4`` is the paper's setting: NF4 with double quantisation (the quantisation constants quantised too).
The compute dtype of the quantised layers follows ``train.precision``. The output head (``lm_head``) and a
classification head stay in floating point, as in transformers. ``prepare_for_kbit_training`` then keeps
the norms in float32 and, under gradient checkpointing, lets gradients reach the checkpointed inputs.
bitsandbytes 0.50 runs nf4 / fp4 / int8 on the CPU as well as on CUDA.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any, Literal

import torch
from torch import nn

from ..errors import ConfigError

logger = logging.getLogger(__name__)

Quantization = Literal["none", "nf4", "fp4", "int8"]
# Linear layers that stay in floating point (the output and classification heads).
SKIPPED_MODULES = ("lm_head", "score", "classifier")


def require_bitsandbytes(scheme: str) -> None:
    """A clear error, before anything is loaded, when ``model.quantization`` needs bitsandbytes and it is absent."""
    if scheme != "none" and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            f"model.quantization={scheme} needs the package bitsandbytes, which is not installed: "
            f"pip install 'moelora[quant]' (or pip install bitsandbytes), or set model.quantization=none"
        )


def bitsandbytes_config(scheme: str, compute_dtype: torch.dtype) -> Any:
    """transformers' ``BitsAndBytesConfig`` of ``scheme`` (``nf4``, ``fp4`` or ``int8``)."""
    from transformers import BitsAndBytesConfig

    if scheme == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(SKIPPED_MODULES))
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=scheme, bnb_4bit_use_double_quant=scheme == "nf4",
        bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=list(SKIPPED_MODULES),
    )


def _quantized_copy(linear: nn.Linear, scheme: str, compute_dtype: torch.dtype) -> nn.Module:
    import bitsandbytes as bnb

    weight = linear.weight.detach().cpu()
    if scheme == "int8":
        module: nn.Module = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                                has_fp16_weights=False)
        module.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        module = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                   compute_dtype=compute_dtype, quant_type=scheme,
                                   compress_statistics=scheme == "nf4")
        module.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=scheme,
                                          compress_statistics=scheme == "nf4")
    if linear.bias is not None:
        module.bias = nn.Parameter(linear.bias.detach().cpu().to(compute_dtype), requires_grad=False)
    return module


def quantize_linears(model: nn.Module, scheme: str, compute_dtype: torch.dtype, device: torch.device) -> int:
    """Swap every ``nn.Linear`` of ``model`` but the heads for a bitsandbytes layer of ``scheme``, quantised
    on ``device`` (in place); returns how many were swapped."""
    require_bitsandbytes(scheme)
    names = [name for name, module in model.named_modules()
             if type(module) is nn.Linear and name.rsplit(".", 1)[-1] not in SKIPPED_MODULES]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        setattr(parent, child, _quantized_copy(linear, scheme, compute_dtype).to(device))  # .to quantises
    logger.info("quantised %d linear layers to %s", len(names), scheme)
    return len(names)


def prepare_for_kbit_training(model: nn.Module, gradient_checkpointing: bool) -> None:
    """Norms in float32 (their statistics are sensitive to rounding); under gradient checkpointing the
    embeddings' output requires grad, so that checkpointed segments of a frozen quantised base still pass
    gradients to the adapters inside them."""
    for module in model.modules():
        if "norm" in type(module).__name__.lower():
            for param in module.parameters(recurse=False):
                if param.dtype in (torch.float16, torch.bfloat16):
                    param.data = param.data.float()
    enable = getattr(model, "enable_input_require_grads", None)
    if gradient_checkpointing and callable(enable):
        enable()
