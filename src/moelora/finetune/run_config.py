"""Typed run configuration: nested dataclasses loaded from YAML, with ``--set dotted.key=value`` overrides.

Every section is a dataclass; an unknown key anywhere is a ``ConfigError`` naming the key and the valid
ones. The defaults are the embedded default job: SmolLM2-135M-Instruct on Rotten Tomatoes with the
paper's method (per-expert Riemannian AdamW, backward gate power 0.5).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration mistake the user can fix (unknown key, wrong type, bad value)."""


@dataclass
class ModelConfig:
    """Which base model to fine-tune.

    ``name``: ``"smollm2-135m-instruct"`` (bundled, converted once into the cache), ``"minilm"`` (the bundled
    all-MiniLM-L6-v2 encoder, trained with a classification head), ``"random-llama"`` (a tiny randomly
    initialised Llama built from ``random_config``, with a byte-level tokenizer; for smoke tests), or a path
    to a local Hugging Face model folder.
    """

    name: str = "smollm2-135m-instruct"
    dtype: str = "float32"
    random_config: dict = field(default_factory=dict)
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    """Which task, and how much of it.

    ``path`` is the folder (or file) of a task read from local files; ``options`` are passed to the task's
    loader (e.g. ``answer_format``).
    """

    task: str = "rotten_tomatoes"
    path: str | None = None
    max_train: int | None = None
    max_eval: int | None = 1000
    max_length: int = 256
    subset_seed: int = 0
    options: dict = field(default_factory=dict)


@dataclass
class AdapterConfig:
    """The adapter: ``moelora`` (MoE-LoRA; ``num_experts=1, top_k=1`` is a plain LoRA)."""

    num_experts: int = 20
    top_k: int = 10
    rank: int = 4
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    gate_backward_power: float = 0.5
    router_init: str = "kaiming"


@dataclass
class OptimConfig:
    """Optimizer of the adapters. ``preconditioner``: ``none``, ``riemannian`` or ``gate_rescaled``."""

    name: str = "adamw"
    preconditioner: str = "riemannian"
    lr: float = 2e-3
    router_lr: float | None = 3e-8
    weight_decay: float = 0.0
    router_max_grad_norm: float | None = 1.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    momentum: float = 0.0
    reg: float = 1e-6
    gate_floor: float = 1e-4
    bias_correction: bool = True
    b_from_updated_a: bool = False


@dataclass
class TrainConfig:
    """The loop. ``batch_size`` is the global number of sequences per optimizer step."""

    steps: int = 80
    batch_size: int = 8
    grad_accum: int = 1
    warmup_steps: int = 5
    final_lr_ratio: float = 0.1
    eval_every: int = 0
    eval_examples: int = 200
    save_every: int = 40
    keep_checkpoints: int = 2
    log_every: int = 5
    seed: int = 0


@dataclass
class EvalConfig:
    """Held-out evaluation: before training (zero-shot) and after."""

    method: str = "loglik"
    batch_size: int = 32
    zero_shot: bool = True
    max_new_tokens: int = 10


@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------- building
def _valid_keys(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check ``value`` against a (simple) type annotation, converting ints to floats where a float is due."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping of {_valid_keys(annotation)}, got {value!r}")
        return build(annotation, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[-1] if errors else f"{where}: bad value {value!r}")
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if annotation is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    return value


def build(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Instantiate dataclass ``cls`` from ``data``; unknown keys raise ``ConfigError`` listing the valid ones."""
    hints = typing.get_type_hints(cls)
    valid = _valid_keys(cls)
    kwargs = {}
    for key, value in data.items():
        name = f"{where}.{key}" if where else key
        if key not in valid:
            raise ConfigError(f"unknown config key '{name}'; valid keys{' in ' + where if where else ''}: {', '.join(valid)}")
        kwargs[key] = _coerce(value, hints[key], name)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.steps=10"`` -> ``(["train", "steps"], 10)``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set expects dotted.key=value, got {text!r}")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set expects dotted.key=value, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {err}") from None
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text}: '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """The run configuration: defaults, then the YAML file (if any), then ``--set`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping at the top level")
        data = loaded or {}
    apply_overrides(data, overrides or [])
    config = build(RunConfig, data)
    validate(config)
    return config


def validate(config: RunConfig) -> None:
    """Cross-field checks that the dataclass types cannot express."""
    from ..config import MoELoRAConfig

    try:
        MoELoRAConfig(**dataclasses.asdict(config.adapter))
    except ValueError as err:
        raise ConfigError(f"adapter: {err}") from None
    if config.optim.name not in ("adamw", "sgd"):
        raise ConfigError(f"optim.name must be 'adamw' or 'sgd', got {config.optim.name!r}")
    if config.optim.preconditioner not in ("none", "riemannian", "gate_rescaled"):
        raise ConfigError(
            f"optim.preconditioner must be 'none', 'riemannian' or 'gate_rescaled', got {config.optim.preconditioner!r}"
        )
    if config.eval.method not in ("loglik", "generate"):
        raise ConfigError(f"eval.method must be 'loglik' or 'generate', got {config.eval.method!r}")
    for name in ("steps", "batch_size", "grad_accum"):
        if getattr(config.train, name) < 1:
            raise ConfigError(f"train.{name} must be >= 1, got {getattr(config.train, name)}")
    if config.train.batch_size % config.train.grad_accum:
        raise ConfigError(
            f"train.batch_size ({config.train.batch_size}) must be divisible by train.grad_accum ({config.train.grad_accum})"
        )
    if config.optim.lr <= 0:
        raise ConfigError(f"optim.lr must be > 0, got {config.optim.lr}")
    if not 0 <= config.train.final_lr_ratio <= 1:
        raise ConfigError(f"train.final_lr_ratio must be in [0, 1], got {config.train.final_lr_ratio}")


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
