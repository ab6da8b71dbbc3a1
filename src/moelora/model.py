"""Putting MoE-LoRA layers into a model, taking them out, and adapter files.

An adapter folder holds two files, both safe to load from an untrusted source:

- ``adapter_config.json``: the ``MoELoRAConfig``, the base model's class name and the ``(d_in, d_out)``
  shape of every wrapped module;
- ``adapter_model.safetensors``: each wrapped module's ``lora_A``, ``lora_B`` and ``router.weight``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from .atomic import atomic_write, write_text_atomic
from .config import MoELoRAConfig
from .layer import MoELoRALinear, _is_conv1d

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 1
ADAPTER_KEYS = ("lora_A", "lora_B", "router.weight")
# Buffers DDP must not broadcast from rank 0: each replica keeps its own gate statistics, and the
# optimizer all-reduces them (a broadcast would overwrite them before every forward).
_DDP_IGNORE_ATTR = "_ddp_params_and_buffers_to_ignore"
_STAT_BUFFERS = ("gate_sq_sum", "gate_token_count", "expert_load", "gate_entropy")


def moelora_layers(model: nn.Module) -> Iterator[tuple[str, MoELoRALinear]]:
    """``(name, layer)`` for every MoE-LoRA layer in ``model``, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, MoELoRALinear):
            yield name, module


def _is_linear_like(module: nn.Module) -> bool:
    if isinstance(module, MoELoRALinear):
        return False
    if isinstance(module, nn.Linear) or _is_conv1d(module):
        return True
    return isinstance(getattr(module, "in_features", None), int) and isinstance(
        getattr(module, "out_features", None), int
    ) and hasattr(module, "weight")


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def wrap(model: nn.Module, config: MoELoRAConfig, adapter_dtype: torch.dtype | None = None) -> nn.Module:
    """Replace the target linear modules of ``model`` by ``MoELoRALinear`` layers, in place.

    Every other parameter is frozen. Adapters are created in float32 (float64 beside a float64 base)
    unless ``adapter_dtype`` is given. Returns ``model``.

    Raises:
        ValueError: nothing matched ``config.target_modules`` (the message lists linear modules that
            exist), or the model is already wrapped.
    """
    if not isinstance(config, MoELoRAConfig):
        raise TypeError(f"config must be a MoELoRAConfig, got {type(config).__name__}")
    if any(True for _ in moelora_layers(model)):
        raise ValueError("model already has MoE-LoRA layers; call moelora.unwrap(model) first")
    targets = [
        name for name, module in model.named_modules() if name and _is_linear_like(module) and config.matches(name)
    ]
    if not targets:
        linear_names = [n for n, m in model.named_modules() if n and _is_linear_like(m)]
        suffixes = sorted({n.rsplit(".", 1)[-1] for n in linear_names})
        raise ValueError(
            f"no module matched target_modules={config.target_modules!r}. Linear modules in this model "
            f"include (by last name): {suffixes[:20]}; e.g. {linear_names[:5]}"
        )
    for param in model.parameters():
        param.requires_grad_(False)
    for name in targets:
        base = model.get_submodule(name)
        layer = MoELoRALinear(
            base,
            num_experts=config.num_experts,
            top_k=config.top_k,
            rank=config.rank,
            alpha=config.alpha,
            dropout=config.dropout,
            gate_backward_power=config.gate_backward_power,
            router_init=config.router_init,
            router_init_std=config.router_init_std,
            track_router_stats=config.track_router_stats,
            expert_compute=config.expert_compute,
            dtype=adapter_dtype,
        )
        layer.train(base.training)  # follow the replaced module: an eval-mode model stays in eval mode
        _set_submodule(model, name, layer)
    model.moelora_config = config
    setattr(model, _DDP_IGNORE_ATTR, [f"{n}.{b}" for n, _ in moelora_layers(model) for b in _STAT_BUFFERS])
    logger.info("wrapped %d modules: %s", len(targets), summary(model))
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """Put back the original modules of every ``MoELoRALinear`` (the adapters are dropped), in place.

    The base modules' ``requires_grad`` flags stay as ``wrap`` left them (frozen).
    """
    for name, layer in list(moelora_layers(model)):
        _set_submodule(model, name, layer.base_layer)
    for attr in ("moelora_config", _DDP_IGNORE_ATTR):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


@dataclass(frozen=True)
class ParameterSummary:
    trainable: int
    total: int
    layers: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return (
            f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
            f"trainable%: {self.percent:.4f} || MoE-LoRA layers: {self.layers}"
        )


def summary(model: nn.Module) -> ParameterSummary:
    """Trainable and total parameter counts, and the number of MoE-LoRA layers."""
    params = {id(p): p for p in model.parameters()}.values()
    return ParameterSummary(
        trainable=sum(p.numel() for p in params if p.requires_grad),
        total=sum(p.numel() for p in params),
        layers=sum(1 for _ in moelora_layers(model)),
    )


def print_trainable_parameters(model: nn.Module) -> None:
    """PEFT-style one-line summary on stdout."""
    print(summary(model))


# ------------------------------------------------------------------------------------- adapter files
def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"<module>.lora_A": ..., "<module>.lora_B": ..., "<module>.router.weight": ...}``."""
    state = {}
    for name, layer in moelora_layers(model):
        state[f"{name}.lora_A"] = layer.lora_A.detach()
        state[f"{name}.lora_B"] = layer.lora_B.detach()
        state[f"{name}.router.weight"] = layer.router.weight.detach()
    return state


def _base_model_identity(model: nn.Module) -> dict:
    return {
        "class_name": type(model).__name__,
        "name_or_path": getattr(getattr(model, "config", None), "name_or_path", None) or None,
        "modules": {name: [layer.in_features, layer.out_features] for name, layer in moelora_layers(model)},
    }


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``directory`` atomically.

    Each file is written to a temporary name and renamed, so a crash never leaves a half-written file.
    """
    from safetensors.torch import save_file

    config = getattr(model, "moelora_config", None)
    if config is None:
        raise ValueError("model has no MoE-LoRA adapter: call moelora.wrap(model, config) first")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    meta = {
        "format": "moelora",
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "base_model": _base_model_identity(model),
        "dtype": str(next(iter(tensors.values())).dtype).removeprefix("torch."),
    }
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    write_text_atomic(directory / CONFIG_NAME, json.dumps(meta, indent=2) + "\n")
    return directory


def read_adapter_config(directory: str | os.PathLike) -> tuple[MoELoRAConfig, dict]:
    """The ``MoELoRAConfig`` and the full metadata of an adapter folder."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}: is this a folder written by save_adapter?")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if meta.get("format") != "moelora" or "config" not in meta:
        raise ValueError(f"{path} is not a moelora adapter config (missing 'format': 'moelora' or 'config')")
    return MoELoRAConfig.from_dict(meta["config"]), meta


def load_adapter(
    model: nn.Module, directory: str | os.PathLike, adapter_dtype: torch.dtype | None = None
) -> nn.Module:
    """Wrap a fresh base ``model`` as the adapter in ``directory`` describes, then load its weights.

    Raises:
        ValueError: the base model's wrapped modules differ from the adapter's (the message names the
            first mismatching module and both shapes), or the weights file does not match its config.
            The model is left unwrapped.
    """
    config, meta = read_adapter_config(directory)
    if adapter_dtype is None and isinstance(getattr(torch, str(meta.get("dtype")), None), torch.dtype):
        adapter_dtype = getattr(torch, meta["dtype"])  # bit-exact round trip: keep the saved precision
    wrap(model, config, adapter_dtype=adapter_dtype)
    try:
        load_adapter_weights(model, directory)
    except BaseException:
        unwrap(model)
        raise
    return model


def load_adapter_weights(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Copy the weights of the adapter in ``directory`` into the already wrapped ``model``.

    Checks, in model order, that every wrapped module exists in the adapter with the same shape.
    """
    from safetensors import safe_open

    _, meta = read_adapter_config(directory)
    expected: dict[str, list[int]] = meta.get("base_model", {}).get("modules", {})
    base_class = meta.get("base_model", {}).get("class_name")
    found = {name: [layer.in_features, layer.out_features] for name, layer in moelora_layers(model)}
    for name, shape in found.items():  # model order, so the first mismatch is the first in the model
        if name not in expected:
            raise ValueError(
                f"the base model has target module {name!r} (d_in, d_out) = {tuple(shape)} that the adapter "
                f"does not cover; load the adapter into the base model it was trained on ({base_class})"
            )
        if list(expected[name]) != shape:
            raise ValueError(
                f"module {name!r}: the adapter expects (d_in, d_out) = {tuple(expected[name])}, the base model "
                f"has {tuple(shape)}; load the adapter into the base model it was trained on ({base_class})"
            )
    missing = [name for name in expected if name not in found]
    if missing:
        raise ValueError(
            f"the adapter has module {missing[0]!r} ({len(missing)} in all) that the base model lacks; "
            f"load the adapter into the base model it was trained on ({base_class})"
        )
    weights_path = Path(directory) / WEIGHTS_NAME
    if not weights_path.is_file():
        raise FileNotFoundError(f"missing {weights_path}")
    params = {}
    for name, layer in moelora_layers(model):
        params[f"{name}.lora_A"] = layer.lora_A
        params[f"{name}.lora_B"] = layer.lora_B
        params[f"{name}.router.weight"] = layer.router.weight
    with safe_open(str(weights_path), framework="pt") as f:
        keys = set(f.keys())
        if keys != set(params):
            missing_keys, unexpected = sorted(set(params) - keys), sorted(keys - set(params))
            raise ValueError(
                f"{weights_path} does not match its config: missing {missing_keys[:3]}, unexpected {unexpected[:3]}"
            )
        with torch.no_grad():
            for key, param in params.items():
                tensor = f.get_tensor(key)
                if tensor.shape != param.shape:
                    raise ValueError(
                        f"{weights_path}: tensor {key!r} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}"
                    )
                param.copy_(tensor)
    return model
