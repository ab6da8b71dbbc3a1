"""Typed run configuration: nested dataclasses loaded from YAML, with ``--set dotted.key=value`` overrides.

Every section is a dataclass; an unknown key anywhere is a ``ConfigError`` naming the key and the valid
ones. The ``adapter`` section is the core ``MoELoRAConfig`` itself, so every adapter option is a key here.
The defaults are the embedded default job: SmolLM2-135M-Instruct on Rotten Tomatoes with the paper's
method (per-expert Riemannian AdamW, backward gate power 0.5).

Each section documents its keys in an ``Attributes:`` docstring block; ``describe_keys`` reads it for
``moelora train --help``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..config import MoELoRAConfig, OptimizerName, Preconditioner
from ..errors import ConfigError
from .data.chat import TrainOn
from .devices import Precision, check_device_name
from .eval.evaluate import LMEvalMethod
from .quantization import Quantization, require_bitsandbytes

__all__ = [
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "TrainConfig",
    "describe_keys",
    "dump_config",
    "load_config",
    "replace_values",
]

ModelDType = Literal["float32", "bfloat16", "float16", "float64"]

# The training command runs the paper's method by default: the engineering strategy's gate power 0.5
# (the layer's own default, 1.0, is the plain gradient).
TRAIN_GATE_BACKWARD_POWER = 0.5


@dataclass
class ModelConfig:
    """Which base model to fine-tune.

    Attributes:
        name: ``smollm2-135m-instruct`` (bundled), ``minilm`` (the bundled all-MiniLM-L6-v2 encoder, with a
            classification head), ``random-llama`` (a tiny random Llama for smoke tests) or a local
            Hugging Face model folder.
        dtype: storage dtype of the base model's weights (of its non-quantised ones with ``quantization``).
        quantization: ``nf4`` (QLoRA, the paper's: NF4 with double quantisation), ``fp4`` or ``int8``
            quantise the base's linear layers with bitsandbytes, computing in ``train.precision``.
        random_config: ``LlamaConfig`` values of ``random-llama`` (e.g. ``hidden_size``).
        gradient_checkpointing: recompute activations in the backward pass (less memory, more time).
        trust_remote_code: never read from a file: pass ``--trust-remote-code`` to the command that should run
            a local model folder's own Python code (only for folders you trust).
    """

    name: str = "smollm2-135m-instruct"
    dtype: ModelDType = "float32"
    quantization: Quantization = "none"
    random_config: dict = field(default_factory=dict)
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    """Which task, and how much of it.

    Attributes:
        task: a task name such as ``rotten_tomatoes``, ``siqa``, ``bigbench:<task>``, ``glue:cola``,
            ``mc_file``, ``classification_file``, or a generative one: ``chat_file``, ``instruction_file``,
            ``completion_file``.
        path: folder (or file) of a task read from local files.
        max_train: keep at most this many training examples (all when empty).
        max_eval: keep at most this many validation and test examples (all when empty).
        max_length: longest tokenised sequence; longer prompts are cut from the left.
        subset_seed: seed of the ``max_train`` / ``max_eval`` subsets and of derived splits.
        options: keyword options of the task's loader (e.g. ``answer_format``).
        chat_template: generative tasks: empty for the tokenizer's own template, ``chatml`` for the fallback,
            a ``.jinja`` file, or Jinja template text.
        train_on: generative tasks: the loss is on ``all`` assistant turns or only the ``last``.
        packing: generative tasks: pack each micro-batch's conversations into rows of max_length tokens.
    """

    task: str = "rotten_tomatoes"
    path: str | None = None
    max_train: int | None = None
    max_eval: int | None = 1000
    max_length: int = 256
    subset_seed: int = 0
    options: dict = field(default_factory=dict)
    chat_template: str | None = None
    train_on: TrainOn = "all"
    packing: bool = False


def default_adapter() -> MoELoRAConfig:
    """The training command's adapter: the core defaults with the paper's backward gate power."""
    return MoELoRAConfig(gate_backward_power=TRAIN_GATE_BACKWARD_POWER)


@dataclass
class OptimConfig:
    """Optimizer of the adapters.

    Attributes:
        name: the base update the preconditioned gradient feeds.
        preconditioner: ``riemannian`` (per expert), ``gate_rescaled`` (derived) or ``none`` (plain).
        lr: the experts' peak learning rate.
        router_lr: the routers' learning rate (empty: the experts' rate).
        weight_decay: decoupled weight decay (AdamW) or L2 penalty (SGD) of the experts.
        router_max_grad_norm: clip the gradient norm over all routers to this (empty: no clipping).
        betas: AdamW's moment decay rates.
        eps: AdamW's denominator term.
        momentum: SGD's momentum.
        reg: damping of the r x r preconditioner solves.
        gate_floor: lower bound of an expert's mean squared gate (``gate_rescaled``).
        bias_correction: AdamW's bias correction (the reference code runs without it).
        b_from_updated_a: precondition ``B`` with the already updated ``A``, as the reference code does (AdamW).
    """

    name: OptimizerName = "adamw"
    preconditioner: Preconditioner = "riemannian"
    lr: float = 2e-3
    router_lr: float | None = 3e-8
    weight_decay: float = 0.0
    router_max_grad_norm: float | None = 1.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999], metadata={"only": "adamw"})
    eps: float = field(default=1e-8, metadata={"only": "adamw"})
    momentum: float = field(default=0.0, metadata={"only": "sgd"})
    reg: float = 1e-6
    gate_floor: float = 1e-4
    bias_correction: bool = field(default=True, metadata={"only": "adamw"})
    b_from_updated_a: bool = field(default=False, metadata={"only": "adamw"})


@dataclass
class TrainConfig:
    """The loop.

    Attributes:
        steps: optimizer steps.
        batch_size: sequences per optimizer step, over all processes and micro-batches.
        grad_accum: micro-batches per step (``batch_size`` must be divisible by it).
        warmup_steps: linear warm-up steps.
        final_lr_ratio: the learning rate decays linearly to this fraction of the peak.
        eval_every: validation every this many steps (0: none during training).
        eval_examples: validation examples per evaluation.
        save_every: checkpoint every this many steps (0: only at the end).
        keep_checkpoints: keep this many newest checkpoints.
        log_every: a ``metrics.jsonl`` line every this many steps.
        seed: seed of the adapter's initialisation and of the data order.
        device: ``auto`` (CUDA, then MPS, then the CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; under
            torchrun each process takes ``cuda:LOCAL_RANK``.
        precision: ``bf16`` / ``fp16`` run the forward pass under autocast with float32 adapters and optimizer
            state (``fp16`` with a gradient scaler, GPU only); the base keeps ``model.dtype``.
        distributed: under torchrun, ``ddp`` replicates the model on every process; ``fsdp`` shards it
            (FSDP2: the frozen base and the experts, whole experts per process), for bases too big for one GPU.
        report_to: experiment trackers that receive the run's events: any of ``tensorboard``, ``wandb``,
            ``mlflow``, ``trackio`` (none by default; files under the run folder).
        tracker_project: the trackers' project (wandb, trackio) or experiment (mlflow).
    """

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
    device: str = "auto"
    precision: Precision = "fp32"
    distributed: Literal["ddp", "fsdp"] = "ddp"
    report_to: list[str] = field(default_factory=list)
    tracker_project: str = "moelora"


@dataclass
class EvalConfig:
    """Held-out evaluation: before training (zero-shot) and after.

    Attributes:
        method: ``loglik`` scores each option's log-likelihood; ``generate`` extracts the answer from
            greedy output (encoders always use their classification head; generative tasks always generate).
        batch_size: sequences per evaluation batch.
        zero_shot: evaluate the base model before training.
        max_new_tokens: generated tokens per answer (``generate`` and generative tasks).
    """

    method: LMEvalMethod = "loglik"
    batch_size: int = 32
    zero_shot: bool = True
    max_new_tokens: int = 10


@dataclass
class RunConfig:
    """A training run.

    Attributes:
        output_dir: the run folder.
    """

    output_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    adapter: MoELoRAConfig = field(default_factory=default_adapter)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------- building
def _valid_keys(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _coerce(value: Any, annotation: Any, where: str, base: Any = None) -> Any:
    """Check ``value`` against a (simple) type annotation, converting ints to floats where a float is due.

    A nested dataclass is built on top of ``base``, its current value, so keys not given keep it.
    """
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping of {_valid_keys(annotation)}, got {value!r}")
        return build(annotation, value, where, base)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
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
            with contextlib.suppress(ValueError):
                value = float(value)
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


def build(cls: type, data: dict[str, Any], where: str = "", base: Any = None) -> Any:
    """Dataclass ``cls`` from ``data`` on top of ``base`` (default: ``cls()``); unknown keys raise
    ``ConfigError`` listing the valid ones, and so does a value the dataclass itself refuses."""
    hints = typing.get_type_hints(cls)
    valid = _valid_keys(cls)
    base = cls() if base is None else base
    kwargs = {}
    for key, value in data.items():
        name = f"{where}.{key}" if where else key
        if key not in valid:
            raise ConfigError(f"unknown config key '{name}'; valid keys{' in ' + where if where else ''}: {', '.join(valid)}")
        kwargs[key] = _coerce(value, hints[key], name, getattr(base, key))
    try:
        return dataclasses.replace(base, **kwargs)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}" if where else str(err)) from None


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


def _nest(values: dict[str, Any], data: dict[str, Any] | None = None, what: str = "--set") -> dict[str, Any]:
    """``{"optim.lr": 1e-3}`` -> ``{"optim": {"lr": 1e-3}}``, merged into ``data``."""
    data = {} if data is None else data
    for dotted, value in values.items():
        path = dotted.split(".")
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{what} {dotted}: '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        _nest({".".join(path): value}, data)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """The run configuration: defaults, then the YAML file (if any), then ``--set`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            line = err.object[: err.start].count(b"\n") + 1
            raise ConfigError(f"{path}, line {line}: not UTF-8 text (byte {err.start}): save it as UTF-8") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from None
        if loaded is None:
            raise ConfigError(f"{path} is empty: give a configuration (or run without a file for the default job)")
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping at the top level")
        data = loaded
    apply_overrides(data, overrides or [])
    config = build(RunConfig, data)
    validate(config)
    return config


def replace_values(config: RunConfig, values: dict[str, Any]) -> RunConfig:
    """A copy of ``config`` with dotted-key ``values`` (``{"optim.lr": 1e-3}``) replaced, typed and
    validated as ``load_config`` does; ``config`` itself is not modified."""
    replaced = build(RunConfig, _nest(values, what="value"), base=config)
    validate(replaced)
    return replaced


def _check(where: str, value: float | None, low: float, *, strict: bool = False, high: float | None = None,
           allow_none: bool = False, meaning: str = "") -> None:
    """A finite number in ``[low, high]`` (``(low, ...`` when ``strict``), or None when ``allow_none``."""
    if value is None and allow_none:
        return
    ok = value is not None and math.isfinite(value) and (value > low if strict else value >= low)
    if ok and high is not None:
        ok = value <= high  # type: ignore[operator]
    if not ok:
        bound = f"{'>' if strict else '>='} {low:g}" + (f" and <= {high:g}" if high is not None else "")
        raise ConfigError(f"{where} must be a finite number {bound}{meaning}, got {value!r}")


def validate(config: RunConfig) -> None:
    """Ranges and cross-field checks that the dataclass types cannot express, before any expensive work."""
    t, o, d, e = config.train, config.optim, config.data, config.eval
    _check("train.log_every", t.log_every, 1)
    _check("train.save_every", t.save_every, 0, meaning=" (0: only at the end)")
    _check("train.eval_every", t.eval_every, 0, meaning=" (0: no validation during training)")
    _check("train.warmup_steps", t.warmup_steps, 0)
    _check("train.keep_checkpoints", t.keep_checkpoints, 1)
    _check("train.eval_examples", t.eval_examples, 1)
    _check("optim.lr", o.lr, 0, strict=True)
    _check("optim.router_lr", o.router_lr, 0, allow_none=True, meaning=" (empty: the experts' rate)")
    _check("optim.weight_decay", o.weight_decay, 0)
    _check("optim.router_max_grad_norm", o.router_max_grad_norm, 0, strict=True, allow_none=True,
           meaning=" (empty: no clipping)")
    _check("optim.eps", o.eps, 0)
    _check("optim.momentum", o.momentum, 0, high=1)
    _check("optim.reg", o.reg, 0, strict=True)
    _check("optim.gate_floor", o.gate_floor, 0, strict=True)
    if len(o.betas) != 2 or not all(math.isfinite(b) and 0 <= b < 1 for b in o.betas):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), e.g. [0.9, 0.999], got {o.betas!r}")
    _check("data.max_length", d.max_length, 2)
    for name in ("max_train", "max_eval"):
        _check(f"data.{name}", getattr(d, name), 1, allow_none=True, meaning=" (empty: all)")
    _check("eval.batch_size", e.batch_size, 1)
    _check("eval.max_new_tokens", e.max_new_tokens, 1)
    if config.model.trust_remote_code:
        raise ConfigError(
            "model.trust_remote_code is not read from configuration files (a run folder's config.yaml could "
            "plant code): pass --trust-remote-code to the command that should run a model folder's code"
        )
    optim = config.optim
    defaults = OptimConfig()
    for f in dataclasses.fields(OptimConfig):
        only = f.metadata.get("only")
        if only and only != optim.name and getattr(optim, f.name) != getattr(defaults, f.name):
            raise ConfigError(
                f"optim.{f.name} applies only to optim.name={only}, but this run uses optim.name={optim.name}: "
                f"remove optim.{f.name} (or set optim.name={only})"
            )
    check_device_name(config.train.device)
    from .trackers import check_trackers

    check_trackers(config.train.report_to)
    require_bitsandbytes(config.model.quantization)
    for name in ("steps", "batch_size", "grad_accum"):
        if getattr(config.train, name) < 1:
            raise ConfigError(f"train.{name} must be >= 1, got {getattr(config.train, name)}")
    if config.train.batch_size % config.train.grad_accum:
        raise ConfigError(
            f"train.batch_size ({config.train.batch_size}) must be divisible by train.grad_accum ({config.train.grad_accum})"
        )
    if not 0 <= config.train.final_lr_ratio <= 1:
        raise ConfigError(f"train.final_lr_ratio must be in [0, 1], got {config.train.final_lr_ratio}")


def dump_config(config: RunConfig) -> str:
    """The resolved configuration as YAML; ``model.trust_remote_code`` is never written as true (a
    permission of the command that ran, not part of the run)."""
    data = config.to_dict()
    data["model"]["trust_remote_code"] = False
    return yaml.safe_dump(data, sort_keys=False)


# ---------------------------------------------------------------------------------------- documentation
def _attribute_docs(cls: type) -> dict[str, str]:
    """``{attribute: first sentence}`` from the ``Attributes:`` block of ``cls``'s docstring."""
    doc = inspect.getdoc(cls) or ""
    if "Attributes:" not in doc:
        return {}
    block = doc.split("Attributes:", 1)[1]
    docs: dict[str, str] = {}
    current = None
    for line in block.splitlines():
        match = re.match(r"^    (\w+): (.*)$", line)
        if match:
            current = match.group(1)
            docs[current] = match.group(2)
        elif current and line.startswith("        "):
            docs[current] += " " + line.strip()
        elif line.strip() and not line.startswith(" "):
            break
    def plain(text: str) -> str:  # reST literals to plain quotes
        return text.replace('``"', '"').replace('"``', '"').replace("``", "'")

    return {key: re.split(r"(?<!e\.g)(?<!i\.e)(?<=[.;])\s", plain(text), maxsplit=1)[0].rstrip(".;") for key, text in docs.items()}


def _type_name(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is list:
        return f"list[{_type_name(args[0])}]" if args else "list"
    if origin is dict or annotation is dict:
        return "mapping"
    return getattr(annotation, "__name__", str(annotation))


def describe_keys(cls: type = RunConfig, prefix: str = "", base: Any = None) -> list[tuple[str, str, str, str]]:
    """``(dotted key, type, default, doc)`` of every key of the run configuration, in section order."""
    base = cls() if base is None else base
    hints = typing.get_type_hints(cls)
    docs = _attribute_docs(cls)
    rows = []
    for f in dataclasses.fields(cls):
        key, value = prefix + f.name, getattr(base, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            rows += describe_keys(hints[f.name], key + ".", value)
            continue
        doc = docs.get(f.name, "")
        if f.metadata.get("only"):
            doc += f" (optim.name={f.metadata['only']} only)"
        rows.append((key, _type_name(hints[f.name]), yaml.safe_dump(value, default_flow_style=True).strip()
                     .removesuffix("...").strip(), doc))
    return rows


def format_keys() -> str:
    """The ``--help`` table of every configuration key."""
    lines = []
    for key, type_name, default, doc in describe_keys():
        lines.append(f"  {key} ({type_name}; default {default})")
        if doc:
            lines.append(f"      {doc}")
    return "\n".join(lines)
