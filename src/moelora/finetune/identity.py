"""What a run's result depends on, recorded in every checkpoint so that ``--resume`` cannot silently differ.

The identity is the resolved configuration without the keys that only say where and how often to save
(``output_dir``, ``train.save_every``, ``train.keep_checkpoints``, ``train.steps``, which has its own
rule), without where the events are reported (``train.report_to``, ``train.tracker_project``) and
without ``model.trust_remote_code`` (a permission, not a setting), plus fingerprints of the
data as loaded (every example of every split: any change of a data file or a data option shows) and of a
local model folder (its ``config.json`` and the names and sizes of its weight files).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from ..adapter import folder_fingerprint
from .data import TaskData
from .run_config import RunConfig

NOT_IDENTITY = ("output_dir", "train.save_every", "train.keep_checkpoints", "train.steps", "model.trust_remote_code",
                "train.report_to", "train.tracker_project")


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and all(isinstance(k, str) for k in value) and name != "data.options" \
                and name != "model.random_config":
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def data_fingerprint(task: TaskData) -> str:
    """SHA-256 over every example of every split, as loaded."""
    digest = hashlib.sha256()
    for split in ("train", "validation", "test"):
        for example in getattr(task, split):
            digest.update(json.dumps([split, dataclasses.asdict(example)], sort_keys=True, default=str).encode())
    return digest.hexdigest()


def model_fingerprint(name: str) -> str | None:
    """``moelora.adapter.folder_fingerprint`` of a local model folder; None for a bundled model (its name
    says it all)."""
    return folder_fingerprint(name)


def run_identity(config: RunConfig, task: TaskData) -> dict[str, Any]:
    """``{dotted key: value}`` of everything a resumed run must share with the run it continues."""
    identity = {k: v for k, v in _flatten(config.to_dict()).items() if k not in NOT_IDENTITY}
    identity["data.fingerprint"] = data_fingerprint(task)
    identity["model.fingerprint"] = model_fingerprint(config.model.name)
    return identity


def differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"key: old -> new"`` for every key whose value differs (a key only one side has counts too)."""
    lines = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key, "(absent)"), current.get(key, "(absent)")
        if old != new:
            lines.append(f"{key}: {json.dumps(old, default=str)} -> {json.dumps(new, default=str)}")
    return lines
