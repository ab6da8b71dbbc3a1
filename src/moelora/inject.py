"""Putting MoE-LoRA layers into a model (``wrap``), taking them out (``unwrap``), and target matching."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .config import MoELoRAConfig
from .errors import ConfigError
from .kbit import keep_4bit_layers_differentiable
from .layers import token_rows
from .layers.linear import MoELoRALinear, _is_conv1d

logger = logging.getLogger(__name__)

# The wrapped model's attribute holding its ``MoELoRAConfig`` (read by ``save_adapter``).
CONFIG_ATTR = "moelora_config"
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
    """``nn.Linear`` and anything that declares integer ``in_features`` / ``out_features`` (bitsandbytes,
    torchao, quanto and HQQ linears, whatever their weight looks like), and transformers' ``Conv1D``."""
    if isinstance(module, MoELoRALinear):
        return False
    if isinstance(module, nn.Linear) or _is_conv1d(module):
        return True
    return isinstance(getattr(module, "in_features", None), int) and isinstance(
        getattr(module, "out_features", None), int
    )


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def find_targets(model: nn.Module, config: MoELoRAConfig) -> list[str]:
    """The names of the modules ``wrap`` would adapt; ``ConfigError`` (listing what exists) when none."""
    targets = [
        name for name, module in model.named_modules() if name and _is_linear_like(module) and config.matches(name)
    ]
    if not targets:
        linear_names = [n for n, m in model.named_modules() if n and _is_linear_like(m)]
        suffixes = sorted({n.rsplit(".", 1)[-1] for n in linear_names})
        hint = ""
        if isinstance(config.target_modules, str):
            hint = (" (a string is a regular expression that must match a module's full name, e.g. "
                    "'.*self_attn\\.q_proj'; to match by name, give a list such as ['q_proj'])")
        raise ConfigError(
            f"no module matched target_modules={config.target_modules!r}{hint}. Linear modules in this model "
            f"include (by last name): {suffixes[:20]}; e.g. {linear_names[:5]}"
        )
    return targets


def find_modules_to_save(model: nn.Module, config: MoELoRAConfig) -> list[str]:
    """The names of the modules ``config.modules_to_save`` selects (the outermost match of each);
    ``ConfigError`` for an entry that matches nothing or a module that is also a target."""
    names: list[str] = []
    for name, _ in model.named_modules():
        if name and config.saves(name) and not any(name.startswith(n + ".") for n in names):
            names.append(name)
    for entry in config.modules_to_save:
        if not any(n == entry or n.endswith("." + entry) for n in names):
            children = [n for n, _ in model.named_children()]
            raise ConfigError(f"modules_to_save entry {entry!r} matches no module; the model's top-level modules "
                              f"are {children}")
    clash = [n for n in names if config.matches(n)]
    if clash:
        raise ConfigError(f"{clash[0]!r} is both a target module and in modules_to_save: choose one")
    return names


class _SaveGuard:
    """Stands in for a wrapped transformers model's ``save_pretrained``: the checkpoint it would write
    reloads with the adapted projections silently re-initialised, so it refuses and says what to use.
    (A module-level class, so that a guarded model still pickles and deep-copies.)"""

    def __call__(self, *args, **kwargs):
        from .errors import AdapterError

        raise AdapterError(
            "save_pretrained on a model wrapped by moelora writes a checkpoint that transformers reloads with "
            "the adapted modules re-initialised: save the adapter with moelora.save_adapter(model, folder) "
            "(in transformers.Trainer: moelora.integrations.transformers.MoELoRATrainer, which checkpoints "
            "adapters only), or moelora.unwrap(model) first to save the base model"
        )


def wrap(model: nn.Module, config: MoELoRAConfig, adapter_dtype: torch.dtype | None = None) -> nn.Module:
    """Replace the target linear modules of ``model`` by ``MoELoRALinear`` layers, in place.

    Every other parameter is frozen, except those of ``config.modules_to_save``; bitsandbytes 4-bit layers
    are kept differentiable in their input (``moelora.kbit``). Adapters are created
    in float32 (float64 beside a float64 base) unless ``adapter_dtype`` is given. With
    ``config.skip_padding`` the model's decoder is hooked so that, in training, the adapters compute a
    padded batch's real tokens only (``moelora.layers.token_rows``). A transformers model's
    ``save_pretrained`` refuses while it is wrapped (use ``moelora.save_adapter``). Returns ``model``.

    Raises:
        ConfigError: nothing matched ``config.target_modules`` (the message lists linear modules that
            exist), or a ``modules_to_save`` entry matched nothing.
        ValueError: the model is already wrapped.
    """
    if not isinstance(config, MoELoRAConfig):
        raise TypeError(f"config must be a MoELoRAConfig, got {type(config).__name__}")
    if any(True for _ in moelora_layers(model)):
        raise ValueError("model already has MoE-LoRA layers; call moelora.unwrap(model) first")
    targets = find_targets(model, config)
    saved = find_modules_to_save(model, config)
    for param in model.parameters():
        param.requires_grad_(False)
    keep_4bit_layers_differentiable(model)  # the adapters' gradients pass back through 4-bit base layers
    for name in saved:
        model.get_submodule(name).requires_grad_(True)
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
    setattr(model, CONFIG_ATTR, config)
    if config.skip_padding:
        token_rows.install(model)
    if callable(getattr(model, "save_pretrained", None)):
        object.__setattr__(model, "save_pretrained", _SaveGuard())  # an instance attribute: unwrap removes it
    setattr(model, _DDP_IGNORE_ATTR, [f"{n}.{b}" for n, _ in moelora_layers(model) for b in _STAT_BUFFERS])
    logger.info("wrapped %d modules: %s", len(targets), summary(model))
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """Put back the original modules of every ``MoELoRALinear`` (the adapters are dropped), in place.

    The base modules' ``requires_grad`` flags stay as ``wrap`` left them (frozen); ``modules_to_save``
    keep their trained values. ``save_pretrained`` works again.
    """
    for name, layer in list(moelora_layers(model)):
        _set_submodule(model, name, layer.base_layer)
    token_rows.uninstall(model)
    for attr in (CONFIG_ATTR, _DDP_IGNORE_ATTR):
        if hasattr(model, attr):
            delattr(model, attr)
    if isinstance(model.__dict__.get("save_pretrained"), _SaveGuard):
        del model.save_pretrained
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
