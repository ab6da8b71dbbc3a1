"""Experiment trackers: ``train.report_to: [tensorboard, wandb, mlflow, trackio]``.

Each tracker receives the events of ``metrics.jsonl`` (training lines, validation and test results; the
numbers of each record, under ``train/``, ``validation/`` or ``test/``) and, with every training line,
the router of each MoE-LoRA layer: its gate entropy (``router/<layer>/entropy``, nats) and the share of
token assignments of its most loaded expert (``router/<layer>/max_load``; ``1 / num_experts`` is a
perfect balance). Files go under the run folder:

- ``tensorboard``: event files in ``<run>/tensorboard/`` (``tensorboard --logdir <run>``);
- ``wandb``: ``<run>/wandb/`` (set ``WANDB_MODE=offline`` to log without an account; ``wandb sync`` later);
  a resumed run continues the same wandb run (its id is kept in ``<run>/trackers.json``);
- ``mlflow``: a file store in ``<run>/mlruns/`` unless ``MLFLOW_TRACKING_URI`` names another;
- ``trackio``: trackio's local store (``TRACKIO_DIR``), project ``train.tracker_project``.

A tracker whose package is not installed is a ``ConfigError`` naming the package, raised when the
configuration is checked (before anything loads). Trackers run on the main process only.
"""

from __future__ import annotations

import importlib.util
import json
import math
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from ..atomic import write_text_atomic
from ..diagnostics import router_stats
from ..errors import ConfigError

# tracker name -> (module to import, pip package that installs it)
TRACKERS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow-skinny"),
    "trackio": ("trackio", "trackio"),
}


def check_trackers(names: list[str]) -> None:
    """``ConfigError`` for an unknown tracker or one whose package is not installed."""
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"train.report_to: unknown tracker {name!r}; choose from {sorted(TRACKERS)}")
        module, package = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"train.report_to includes {name!r}, but the {package} package is not installed: "
                              f"pip install {package}")
    if len(set(names)) != len(names):
        raise ConfigError(f"train.report_to names a tracker twice: {names}")


def scalars(record: dict[str, Any]) -> tuple[int, dict[str, float]]:
    """``(step, {tag: value})`` of a ``metrics.jsonl`` record: its finite numbers under ``train/`` (a
    training line), or ``<split>/`` (an evaluation, with its further metrics)."""
    step = int(record["step"])
    split = record.get("split")
    prefix = f"{split}/" if split else "train/"
    values: dict[str, Any] = {k: v for k, v in record.items() if k not in ("step", "split", "metric", "interval",
                                                                           "metrics", "value", "n")}
    if split:
        values[record.get("metric", "value")] = record.get("value")
        values.update(record.get("metrics") or {})
    out = {prefix + k: float(v) for k, v in values.items()
           if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    return step, out


def router_scalars(model: Any) -> dict[str, float]:
    """``router/<layer>/entropy`` and ``router/<layer>/max_load`` of every layer's last forward pass."""
    out = {}
    for name, stats in router_stats(model).items():
        out[f"router/{name}/entropy"] = float(stats["gate_entropy"])
        out[f"router/{name}/max_load"] = float(max(stats["expert_load"]))
    return out


class _TensorBoard:
    def __init__(self, run_dir: Path, project: str, config: dict, run_id: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```", 0)

    def log(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class _Wandb:
    def __init__(self, run_dir: Path, project: str, config: dict, run_id: str) -> None:
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=project, name=run_dir.name, id=run_id, resume="allow", dir=str(run_dir),
                              config=config)

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    def __init__(self, run_dir: Path, project: str, config: dict, run_id: str) -> None:
        import os

        import mlflow

        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            # A file store needs no database package (mlflow-skinny has none); MLflow 3 asks for an opt-in.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri((run_dir / "mlruns").resolve().as_uri())
        mlflow.set_experiment(project)
        existing = mlflow.search_runs(filter_string=f"tags.moelora_run_id = '{run_id}'", output_format="list")
        if existing:
            self.run = mlflow.start_run(run_id=existing[0].info.run_id)
        else:
            self.run = mlflow.start_run(run_name=run_dir.name, tags={"moelora_run_id": run_id})
            flat = {k: json.dumps(v, default=str)[:250] for k, v in _flatten(config).items()}
            mlflow.log_params(flat)

    def log(self, step: int, values: dict[str, float]) -> None:
        # MLflow keys allow letters, digits and _-./ and spaces only
        self.mlflow.log_metrics({k.replace(":", "_"): v for k, v in values.items()}, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


class _Trackio:
    def __init__(self, run_dir: Path, project: str, config: dict, run_id: str) -> None:
        import trackio

        self.trackio = trackio
        self.run = trackio.init(project=project, name=f"{run_dir.name}-{run_id[:8]}", config=config, resume="allow")

    def log(self, step: int, values: dict[str, float]) -> None:
        self.trackio.log(values, step=step)

    def close(self) -> None:
        self.trackio.finish()


class _Tracker(Protocol):
    def log(self, step: int, values: dict[str, float]) -> None: ...

    def close(self) -> None: ...


_OPEN: dict[str, Callable[[Path, str, dict, str], _Tracker]] = {
    "tensorboard": _TensorBoard, "wandb": _Wandb, "mlflow": _MLflow, "trackio": _Trackio,
}


def _flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class Trackers:
    """The run's trackers, opened on the main process; ``log(record, model)`` sends one ``metrics.jsonl``
    record (and, for a training line, the router scalars), ``close()`` flushes them."""

    def __init__(self, names: list[str], run_dir: Path, project: str, config: dict) -> None:
        check_trackers(names)
        ids_path = run_dir / "trackers.json"
        ids = json.loads(ids_path.read_text()) if ids_path.is_file() else {}
        run_id = ids.get("run_id") or uuid.uuid4().hex
        if not ids:
            write_text_atomic(ids_path, json.dumps({"run_id": run_id}) + "\n")
        self.trackers: list[_Tracker] = [_OPEN[name](run_dir, project, config, run_id) for name in names]

    def log(self, record: dict[str, Any], model: Any = None) -> None:
        step, values = scalars(record)
        if "loss" in record and "split" not in record and model is not None:
            values.update(router_scalars(model))
        for tracker in self.trackers:
            tracker.log(step, values)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []
