"""Where a run computes (``train.device``) and in which precision (``train.precision``).

- ``resolve_device``: ``auto`` (CUDA, then MPS, then the CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``,
  checked against what this machine has before anything is loaded; under ``torchrun`` every process takes
  ``cuda:LOCAL_RANK``.
- ``Precision``: ``fp32``; ``bf16`` and ``fp16`` are ``torch.autocast`` around the forward pass, with the
  adapters, routers and optimizer state kept in float32 (the master weights) and the base model in its own
  storage dtype (``model.dtype``); ``fp16`` adds a gradient scaler.
"""

from __future__ import annotations

import contextlib
import re
from typing import Literal

import torch

from ..errors import ConfigError

Precision = Literal["fp32", "bf16", "fp16"]
AUTOCAST_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}

_DEVICE = re.compile(r"^(auto|cpu|mps|cuda)(?::(\d+))?$")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def available_devices() -> list[str]:
    """The devices of this machine, as ``train.device`` values."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if _mps_available():
        devices.append("mps")
    return devices


def check_device_name(name: str) -> None:
    """The syntax of a ``train.device`` value (its availability is checked by ``resolve_device``)."""
    match = _DEVICE.match(name)
    if match is None or (match.group(2) is not None and match.group(1) != "cuda"):
        raise ConfigError(f"train.device must be auto, cpu, cuda, cuda:N or mps, got {name!r}")


def resolve_device(name: str, local_rank: int = 0, distributed: bool = False) -> torch.device:
    """The ``torch.device`` of ``train.device`` = ``name`` on this machine.

    Raises ``ConfigError`` listing the available devices when ``name`` asks for one this machine lacks.
    """
    check_device_name(name)
    kind, _, index = name.partition(":")
    available = ", ".join(available_devices())
    if kind == "auto":
        if torch.cuda.is_available():
            return _this_process_cuda(local_rank, distributed)
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "mps":
        if not _mps_available():
            raise ConfigError(f"train.device=mps, but this machine has no MPS device; available: {available}")
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise ConfigError(f"train.device={name}, but this machine has no CUDA device; available: {available} "
                          f"(train.device=auto picks the best one)")
    if index:
        if distributed:
            raise ConfigError(f"train.device={name} under torchrun: use train.device=cuda (each process takes "
                              f"cuda:LOCAL_RANK)")
        if int(index) >= torch.cuda.device_count():
            raise ConfigError(f"train.device={name}, but this machine has {torch.cuda.device_count()} CUDA "
                              f"device(s); available: {available}")
        return torch.device("cuda", int(index))
    return _this_process_cuda(local_rank, distributed)


def _this_process_cuda(local_rank: int, distributed: bool) -> torch.device:
    """``cuda:LOCAL_RANK`` under torchrun, else the current CUDA device."""
    return torch.device("cuda", local_rank if distributed else torch.cuda.current_device())


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse a precision the device cannot run, before anything is loaded."""
    if precision == "fp16" and device.type == "cpu":
        raise ConfigError("train.precision=fp16 needs a GPU (the CPU has no fast float16 GEMMs); "
                          "use train.precision=bf16 or fp32 on the CPU")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"train.precision=bf16: {torch.cuda.get_device_name(device)} does not support "
                          f"bfloat16; use train.precision=fp16")


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``bf16`` / ``fp16``, nothing for ``fp32``."""
    dtype = AUTOCAST_DTYPES.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """A gradient scaler for ``fp16`` (whose small gradients underflow without one), else None."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None
