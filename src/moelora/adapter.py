"""Adapter files: save a wrapped model's experts and routers, read them back onto a base model.

An adapter folder holds three files, all safe to load from an untrusted source:

- ``adapter_config.json``: the ``MoELoRAConfig``; the base model's class, name, revision or content
  fingerprint (when known), quantisation and the ``(d_in, d_out)`` shape of every wrapped module; the
  ``modules_to_save`` tensors' shapes and dtypes; the library version;
- ``adapter_model.safetensors``: each wrapped module's ``lora_A``, ``lora_B`` and ``router.weight``, and
  the parameters of ``modules_to_save`` under their own paths in the model (``score.weight``);
- ``README.md``: the model card.

The file names are PEFT's, so PEFT-aware tools find the folder; the config sets ``peft_type`` and
``base_model_name_or_path`` to a sentence that says how to load it (``NOT_PEFT``), so that PEFT and
transformers loaders fail with it rather than load something wrong.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from .atomic import atomic_write, write_text_atomic
from .config import MoELoRAConfig
from .errors import AdapterError, AdapterNotFoundError
from .inject import CONFIG_ATTR, moelora_layers, unwrap, wrap

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
CARD_NAME = "README.md"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
# What PEFT and transformers read as the adapter type and the base model: never a valid name or repo id.
NOT_PEFT = ("moelora MoE-LoRA adapter, not a PEFT adapter: load it with moelora.load_adapter(model, folder) "
            "after pip install moelora")
# The tensors of one wrapped module, by attribute path below the module.
ADAPTER_KEYS = ("lora_A", "lora_B", "router.weight")


def _adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """``{"<module>.<key>": parameter}`` for every wrapped module and every key of ``ADAPTER_KEYS``."""
    return {
        f"{name}.{key}": layer.get_parameter(key) for name, layer in moelora_layers(model) for key in ADAPTER_KEYS
    }


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"<module>.lora_A": ..., "<module>.lora_B": ..., "<module>.router.weight": ...}``."""
    return {key: param.detach() for key, param in _adapter_parameters(model).items()}


def _quantization_of(module: nn.Module) -> str | None:
    """How a wrapped base module is quantised (``None``: a plain floating-point weight), from its class and
    weight alone, so that no quantisation library is imported."""
    cls = type(module)
    weight = getattr(module, "weight", None)
    if cls.__module__.startswith("bitsandbytes"):
        if cls.__name__ == "Linear8bitLt":
            return "bitsandbytes-int8"
        return f"bitsandbytes-{getattr(weight, 'quant_type', None) or '4bit'}"
    if cls.__name__ == "HQQLinear":
        return "hqq"
    if cls.__module__.startswith("optimum.quanto"):
        return "quanto"
    if isinstance(weight, torch.Tensor) and type(weight) not in (torch.Tensor, nn.Parameter):
        return f"{type(weight).__module__.split('.')[0]}-{type(weight).__name__}"  # e.g. torchao's subclasses
    return None


def base_quantization(model: nn.Module) -> str | None:
    """The quantisation of the wrapped modules' bases (``"bitsandbytes-nf4"`` ...), None when unquantised."""
    kinds = sorted({kind for _, layer in moelora_layers(model) if (kind := _quantization_of(layer.base_layer))})
    return ", ".join(kinds) or None


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def folder_fingerprint(folder: str | os.PathLike) -> str | None:
    """For a local model folder: SHA-256 of its ``config.json`` and of its weight files' names and sizes
    (cheap, and any re-download or conversion shows); None when ``folder`` is not one."""
    import hashlib

    folder = Path(folder).expanduser()
    if not (folder / "config.json").is_file():
        return None
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for path in sorted(folder.iterdir()):
        if path.suffix in _WEIGHT_SUFFIXES:
            digest.update(f"{path.name}:{path.stat().st_size}".encode())
    return digest.hexdigest()


def _base_model_identity(model: nn.Module) -> dict:
    config = getattr(model, "config", None)
    name = getattr(config, "name_or_path", None) or None
    return {
        "class_name": type(model).__name__,
        "name_or_path": name,
        "revision": getattr(config, "_commit_hash", None),  # a hub snapshot's commit, when loaded from the hub
        "fingerprint": folder_fingerprint(name) if name else None,
        "modules": {name: [layer.in_features, layer.out_features] for name, layer in moelora_layers(model)},
        "quantization": base_quantization(model),
    }


def _saved_parameters(model: nn.Module, config: MoELoRAConfig) -> dict[str, nn.Parameter]:
    """``{"<module>.<param>": parameter}`` of ``config.modules_to_save``, by their paths in the model."""
    from .inject import find_modules_to_save

    return {f"{module}.{key}": param for module in find_modules_to_save(model, config)
            for key, param in model.get_submodule(module).named_parameters()} if config.modules_to_save else {}


def save_adapter(model: nn.Module, directory: str | os.PathLike, training: dict | None = None) -> Path:
    """Write ``adapter_config.json``, ``adapter_model.safetensors`` and ``README.md`` into ``directory``.

    Each file is written to a temporary name and renamed, so a crash never leaves a half-written file.
    Experts sharded by FSDP2 are gathered first, a collective: every process calls ``save_adapter`` and
    process 0 writes the files (the same as one process would). ``training`` (e.g. ``{"data": ...,
    "steps": ..., "metrics": {...}}``) goes into the model card and the config's ``training`` entry.
    """
    from safetensors.torch import save_file

    from . import __version__

    config = getattr(model, CONFIG_ATTR, None)
    if config is None:
        raise AdapterError("model has no MoE-LoRA adapter: call moelora.wrap(model, config) first")
    if not str(directory):
        raise AdapterError("save_adapter needs a folder to write into, got an empty path")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise AdapterError(f"save_adapter writes a folder, but {directory} is a file: choose a folder")
    state = adapter_state_dict(model)
    others = {k: p.detach() for k, p in _saved_parameters(model, config).items()}
    sharded = any(hasattr(v, "full_tensor") for v in [*state.values(), *others.values()])

    def gathered(v: torch.Tensor) -> torch.Tensor:
        return (v.full_tensor() if hasattr(v, "full_tensor") else v).contiguous().cpu()

    tensors = {k: gathered(v) for k, v in state.items()}
    saved = {k: gathered(v) for k, v in others.items()}
    if sharded and torch.distributed.get_rank() != 0:
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": "moelora",
        "format_version": FORMAT_VERSION,
        "peft_type": NOT_PEFT,
        "base_model_name_or_path": NOT_PEFT,
        "library": {"name": "moelora", "version": __version__},
        "config": config.to_dict(),
        "base_model": _base_model_identity(model),
        "dtype": str(next(iter(tensors.values())).dtype).removeprefix("torch."),
        "modules_to_save": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                            for k, v in saved.items()},
        "training": training,
    }
    tensors.update(saved)
    from .model_card import model_card

    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    write_text_atomic(directory / CONFIG_NAME, json.dumps(meta, indent=2, default=str) + "\n")
    write_text_atomic(directory / CARD_NAME, model_card(meta, training))
    return directory


def record_training(directory: str | os.PathLike, training: dict) -> None:
    """Set the ``training`` entry of a saved adapter (what it was trained on, its metrics) in its config and
    model card; the weights are untouched."""
    from .model_card import model_card

    _, meta = read_adapter_config(directory)
    meta["training"] = training
    write_text_atomic(Path(directory) / CONFIG_NAME, json.dumps(meta, indent=2, default=str) + "\n")
    write_text_atomic(Path(directory) / CARD_NAME, model_card(meta, training))


def read_adapter_config(directory: str | os.PathLike) -> tuple[MoELoRAConfig, dict]:
    """The ``MoELoRAConfig`` and the full metadata of an adapter folder."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise AdapterNotFoundError(f"no {CONFIG_NAME} in {directory}: is this a folder written by save_adapter?")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterError(f"{path} is not valid JSON: {err}") from None
    if isinstance(meta, dict) and meta.get("format") != "moelora" and isinstance(meta.get("peft_type"), str):
        raise AdapterError(
            f"{directory} holds a PEFT adapter (peft_type {meta['peft_type']!r}), not a moelora one: load it with "
            f"peft.PeftModel.from_pretrained(model, folder), or train a MoE-LoRA adapter with moelora"
        )
    if not isinstance(meta, dict) or meta.get("format") != "moelora" or not isinstance(meta.get("config"), dict):
        raise AdapterError(f"{path} is not a moelora adapter config (an object with 'format': 'moelora' and 'config')")
    if meta.get("format_version", 1) not in READABLE_VERSIONS:
        raise AdapterError(f"{path} has format_version {meta.get('format_version')!r}, which this moelora "
                           f"({'/'.join(map(str, READABLE_VERSIONS))}) cannot read: upgrade moelora")
    if not isinstance(meta.get("base_model", {}), dict) or not isinstance(meta.get("dtype", "float32"), str):
        raise AdapterError(f"{path}: 'base_model' must be an object and 'dtype' a string")
    return MoELoRAConfig.from_dict(meta["config"]), meta


def load_adapter(
    model: nn.Module, directory: str | os.PathLike, adapter_dtype: torch.dtype | None = None
) -> nn.Module:
    """Wrap a fresh base ``model`` as the adapter in ``directory`` describes, then load its weights.

    Raises:
        AdapterError: the base model's wrapped modules differ from the adapter's (the message names the
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
            raise AdapterError(
                f"the base model has target module {name!r} (d_in, d_out) = {tuple(shape)} that the adapter "
                f"does not cover; load the adapter into the base model it was trained on ({base_class})"
            )
        if list(expected[name]) != shape:
            raise AdapterError(
                f"module {name!r}: the adapter expects (d_in, d_out) = {tuple(expected[name])}, the base model "
                f"has {tuple(shape)}; load the adapter into the base model it was trained on ({base_class})"
            )
    missing = [name for name in expected if name not in found]
    if missing:
        raise AdapterError(
            f"the adapter has module {missing[0]!r} ({len(missing)} in all) that the base model lacks; "
            f"load the adapter into the base model it was trained on ({base_class})"
        )
    saved_quantization, current = meta.get("base_model", {}).get("quantization"), base_quantization(model)
    if saved_quantization != current:  # same shapes: the adapter applies, on a differently stored base
        logger.info("the adapter in %s was trained on a base quantised as %s; this base is %s", directory,
                    saved_quantization or "none (floating point)", current or "none (floating point)")
    _warn_if_other_base(meta.get("base_model", {}), _base_model_identity(model), directory)
    weights_path = Path(directory) / WEIGHTS_NAME
    if not weights_path.is_file():
        raise AdapterNotFoundError(f"missing {weights_path}")
    params = _adapter_parameters(model)
    config = getattr(model, CONFIG_ATTR)
    others = _saved_parameters(model, config)
    recorded_others = meta.get("modules_to_save") or {}
    if set(others) != set(recorded_others):
        raise AdapterError(f"{directory}: the adapter saved modules {sorted(recorded_others)[:3]} but this model's "
                           f"modules_to_save are {sorted(others)[:3]}")
    recorded_dtype = meta.get("dtype")
    try:
        handle = safe_open(str(weights_path), framework="pt")
    except Exception as err:  # safetensors raises its own error type for a truncated or corrupt file
        raise AdapterError(f"{weights_path} cannot be read ({err}): the file is truncated or not safetensors") from None
    with handle as f:
        keys = set(f.keys())
        if keys != set(params) | set(others):
            missing_keys, unexpected = sorted(set(params) - keys), sorted(keys - set(params) - set(others))
            raise AdapterError(
                f"{weights_path} does not match its config: missing {missing_keys[:3]}, unexpected {unexpected[:3]}"
            )
        with torch.no_grad():
            for key, param in params.items():
                tensor = f.get_tensor(key)
                if tensor.shape != param.shape:
                    raise AdapterError(
                        f"{weights_path}: tensor {key!r} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}"
                    )
                stored = str(tensor.dtype).removeprefix("torch.")
                if not tensor.dtype.is_floating_point or (recorded_dtype is not None and stored != recorded_dtype):
                    raise AdapterError(
                        f"{weights_path}: tensor {key!r} is {stored}, but {CONFIG_NAME} says {recorded_dtype}: the "
                        f"files do not belong together (an adapter's tensors are floating point, all of one dtype)"
                    )
                if not torch.isfinite(tensor).all():
                    raise AdapterError(
                        f"{weights_path}: tensor {key!r} holds non-finite values (NaN or inf): the run that wrote it "
                        f"diverged; use an earlier checkpoint"
                    )
                param.copy_(tensor)
            for key, param in others.items():
                tensor = f.get_tensor(key)
                if tensor.shape != param.shape:
                    raise AdapterError(f"{weights_path}: saved module tensor {key!r} has shape {tuple(tensor.shape)}, "
                                       f"this model's is {tuple(param.shape)}")
                if not torch.isfinite(tensor).all():
                    raise AdapterError(f"{weights_path}: tensor {key!r} holds non-finite values (NaN or inf)")
                param.copy_(tensor.to(param.dtype))
    return model


def _warn_if_other_base(saved: dict, current: dict, directory: str | os.PathLike) -> None:
    """A warning when the base's recorded revision or content fingerprint differs from this one's (the
    shapes matched, so the adapter applies, but to other weights than it was trained on)."""
    for key, what in (("revision", "revision"), ("fingerprint", "files (config.json, weight file sizes)")):
        if saved.get(key) and current.get(key) and saved[key] != current[key]:
            logger.warning("the adapter in %s was trained on %s with %s %s; this base has %s: its outputs may "
                           "differ from the trained model's", directory, saved.get("name_or_path") or "a base",
                           what, saved[key][:12], current[key][:12])
