"""Checkpoints without pickle: nested state as JSON, its tensors in one safetensors file, folders atomic.

A nested structure of dicts (string or int keys), lists, tuples, tensors and JSON scalars — such as an
optimizer's ``state_dict()`` — is split into ``NAME.json`` (the structure, tensors replaced by
``{"__tensor__": key}``) and ``NAME.safetensors`` (the tensors). A checkpoint folder is written under a
temporary name and renamed into place (``moelora.atomic.atomic_dir``), so a crash leaves either the whole
checkpoint or none.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from .errors import TrainingError

logger = logging.getLogger(__name__)

_TENSOR = "__tensor__"
_TUPLE = "__tuple__"
_INT_KEYS = "__int_keys__"
CHECKPOINT_RE = re.compile(r"^step-(\d+)$")


def _flatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = obj.detach().contiguous().cpu()
        return {_TENSOR: key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _flatten(v, tensors) for k, v in obj.items()}
        if all(isinstance(k, int) and not isinstance(k, bool) for k in obj):
            return {_INT_KEYS: [[k, _flatten(v, tensors)] for k, v in obj.items()]}
        raise TypeError(f"cannot store a dict with mixed or non-string keys: {list(obj)[:5]}")
    if isinstance(obj, tuple):
        return {_TUPLE: [_flatten(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_flatten(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store object of type {type(obj).__name__} in a checkpoint")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR}:
            return tensors[obj[_TENSOR]]
        if set(obj) == {_TUPLE}:
            return tuple(_unflatten(v, tensors) for v in obj[_TUPLE])
        if set(obj) == {_INT_KEYS}:
            return {int(k): _unflatten(v, tensors) for k, v in obj[_INT_KEYS]}
        return {k: _unflatten(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def save_state(obj: Any, directory: Path, name: str) -> None:
    """Write ``directory/name.json`` and ``directory/name.safetensors`` (no pickle)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    structure = _flatten(obj, tensors)
    (directory / f"{name}.json").write_text(json.dumps(structure))
    save_file(tensors, str(directory / f"{name}.safetensors"))


def load_state(directory: Path, name: str) -> Any:
    from safetensors.torch import load_file

    structure = json.loads((directory / f"{name}.json").read_text())
    tensors = load_file(str(directory / f"{name}.safetensors"))
    return _unflatten(structure, tensors)


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints ``(step, path)`` in ``folder``, oldest first (temporary folders are ignored)."""
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = CHECKPOINT_RE.match(path.name)
        if match and (path / "trainer_state.json").is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


TRAINER_STATE_KEYS = ("step", "steps", "identity", "sharded", "metrics_lines")


def checkpoint_state(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """``(trainer state, None)`` of a checkpoint folder that reads back whole, else ``(None, why not)``
    (a missing key, a truncated file)."""
    from safetensors import safe_open

    try:
        state = json.loads((path / "trainer_state.json").read_text())
        missing = [key for key in TRAINER_STATE_KEYS if key not in state]
        if missing:
            return None, f"trainer_state.json has no {', '.join(map(repr, missing))}"
        load_state(path, "loop_state")
        if state["sharded"]:
            if not (path / "sharded" / ".metadata").is_file():
                return None, "sharded/.metadata is missing"
        else:
            load_state(path, "optimizer")
            json.loads((path / "adapter" / "adapter_config.json").read_text())
            with safe_open(str(path / "adapter" / "adapter_model.safetensors"), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118  (a safetensors handle, not a dict)
                    f.get_tensor(key)
    except Exception as err:
        return None, f"{type(err).__name__}: {err}"
    return state, None


def recover_checkpoints(folder: Path) -> tuple[int, str, dict[str, Any]] | None:
    """The newest checkpoint of ``folder`` that can be resumed from, as ``(step, path, trainer state)``.

    First the leftovers of a kill: temporary folders are removed, and a ``.step-N.old`` (a kill between
    the two renames of a folder swap) is put back as ``step-N`` when that is missing. A checkpoint that
    cannot be read is skipped with a warning, for the one before it.
    """
    if not folder.is_dir():
        return None
    for path in list(folder.iterdir()):
        name = path.name
        if name.startswith(".step-") and (".tmp-" in name or name.endswith(".sharded-partial")):
            logger.warning("removing %s, left by a run killed while writing a checkpoint", path)
            shutil.rmtree(path, ignore_errors=True)
        elif name.startswith(".step-") and name.endswith(".old"):
            final = folder / name[1 : -len(".old")]
            if final.exists():
                shutil.rmtree(path, ignore_errors=True)
            else:
                logger.warning("restoring %s from %s (a run was killed while replacing it)", final, path)
                os.replace(path, final)
    for step, path in reversed(list_checkpoints(folder)):
        state, problem = checkpoint_state(path)
        if state is not None:
            return step, str(path), state
        logger.warning("checkpoint %s cannot be resumed from (%s): trying the one before", path, problem)
    return None


def prune_checkpoints(folder: Path, keep: int) -> None:
    for _, path in list_checkpoints(folder)[:-keep] if keep > 0 else []:
        shutil.rmtree(path)


def rng_state() -> dict[str, Any]:
    import random

    import numpy as np

    np_state = cast(tuple, np.random.get_state(legacy=True))  # legacy=True returns the tuple form
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()  # one state per visible GPU (dropout masks draw there)
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = list(state["cuda"])
        if len(cuda_states) != torch.cuda.device_count():
            raise TrainingError(
                f"the checkpoint holds the random state of {len(cuda_states)} GPU(s), this machine has "
                f"{torch.cuda.device_count()}: resume with as many visible GPUs (CUDA_VISIBLE_DEVICES)"
            )
        torch.cuda.set_rng_state_all(cuda_states)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))


TRAINABLE_NAME = "trainable.safetensors"


def other_trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters that the adapter file does not hold (neither experts, routers nor
    ``modules_to_save``): whatever else a caller unfroze."""
    from ..adapter import _adapter_parameters, _saved_parameters
    from ..inject import CONFIG_ATTR

    saved = {*_adapter_parameters(model).values(), *_saved_parameters(model, getattr(model, CONFIG_ATTR)).values()}
    adapter_ids = {id(p) for p in saved}
    return {n: p for n, p in model.named_parameters() if p.requires_grad and id(p) not in adapter_ids}


def save_other_trainable(model: nn.Module, folder: Path) -> None:
    """Write ``folder/trainable.safetensors`` when the model trains anything besides its adapters."""
    from safetensors.torch import save_file

    extra = {n: p.detach().contiguous().cpu() for n, p in other_trainable(model).items()}
    if extra:
        save_file(extra, str(folder / TRAINABLE_NAME))


def load_other_trainable(model: nn.Module, folder: Path) -> bool:
    """Copy ``folder/trainable.safetensors`` into the model's parameters of the same names, if present."""
    from safetensors.torch import load_file

    path = folder / TRAINABLE_NAME
    if not path.is_file():
        return False
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in load_file(str(path)).items():
            if name not in params:
                raise TrainingError(f"{path}: the model has no parameter {name!r}")
            params[name].copy_(tensor)
    return True


# ---------------------------------------------------------------------------------- sharded (FSDP2) state
def _sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    # Only what trains: the frozen base is loaded from the model's own files.
    return get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """The trainable weights and optimizer state of an FSDP2-sharded model, each process writing its shards
    (``torch.distributed.checkpoint``; a collective). Its ``.metadata`` file is a pickle: resume state only,
    read back by ``load_sharded`` from a run folder this program wrote, never a file for sharing (the
    adapter is in ``adapter/``, safetensors and JSON)."""
    import torch.distributed.checkpoint as dcp

    model_state, optimizer_state = _sharded_state(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(folder))


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """The inverse of ``save_sharded`` (a collective), onto the same sharding."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    model_state, optimizer_state = _sharded_state(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(folder))
    # strict=False: the state holds the trainable weights only; the frozen base is the model's own
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))
