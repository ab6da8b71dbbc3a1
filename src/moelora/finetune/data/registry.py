"""The task registry and ``load_task``.

A loader is a function ``loader(name, **options) -> TaskData`` registered under a name
(``register_task("siqa")``) or a prefix (``register_task("bigbench:", prefix=True)`` receives
``"bigbench:<task>"``). ``load_task`` passes each loader only the keyword arguments it declares and
rejects the others with a message that lists the valid ones.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import UnknownOptionError, UnknownTaskError
from .example import TaskData

logger = logging.getLogger(__name__)

Loader = Callable[..., TaskData]

_TASKS: dict[str, Loader] = {}
_PREFIXES: dict[str, Loader] = {}

# Arguments every load_task call accepts; a loader receives the ones it declares.
COMMON_ARGS = ("cache_dir", "data_dir", "seed")


def register_task(name: str, *, prefix: bool = False) -> Callable[[Loader], Loader]:
    """Decorator registering ``loader`` under ``name`` (or every name starting with ``name``)."""
    def decorator(loader: Loader) -> Loader:
        table = _PREFIXES if prefix else _TASKS
        if name in table:
            raise ValueError(f"a loader is already registered for {name!r}")
        table[name] = loader
        return loader

    return decorator


def available_tasks() -> list[str]:
    """Registered task names; prefixes end with ``":"`` (e.g. ``"bigbench:"``)."""
    return sorted(_TASKS) + sorted(f"{p}<name>" for p in _PREFIXES)


def get_loader(name: str) -> Loader:
    """The loader registered for ``name`` (exact names win over prefixes)."""
    if name in _TASKS:
        return _TASKS[name]
    for prefix, loader in sorted(_PREFIXES.items(), key=lambda kv: -len(kv[0])):
        if name.startswith(prefix) and len(name) > len(prefix):
            return loader
    raise UnknownTaskError(f"unknown task {name!r}; available: {', '.join(available_tasks())}")


def load_task(
    name: str,
    *,
    cache_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    seed: int = 0,
    max_train: int | None = None,
    max_eval: int | None = None,
    **kwargs: Any,
) -> TaskData:
    """Load the task registered as ``name`` with its train / validation / held-out test splits.

    Args:
        name: e.g. ``"rotten_tomatoes"``, ``"siqa"``, ``"bigbench:<task>"``, ``"glue:cola"``,
            ``"commonsense_qa"``, ``"mc_file"``, ``"hf:<dataset>"`` (see ``available_tasks()``).
        cache_dir: where archives are downloaded and extracted (default ``$MOELORA_CACHE`` or
            ``~/.cache/moelora``).
        data_dir: the folder holding a local dataset's files in their public layout.
        seed: chooses the ``max_train`` subset; the splits themselves are fixed (``split_seed``).
        max_train: keep a seeded random subset of this many training examples.
        max_eval: keep the first ``max_eval`` validation and test examples (a fixed subset).
        **kwargs: loader-specific options (e.g. ``answer_format``, ``split_seed``, file paths); an option
            the loader does not take raises ``UnknownOptionError`` (a ``DataError`` and ``TypeError``)
            listing the valid ones.
    """
    loader = get_loader(name)
    params = inspect.signature(loader).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    valid = [p for p in params if p != "name" and params[p].kind is not inspect.Parameter.VAR_KEYWORD]
    unknown = [k for k in kwargs if k not in valid]
    if unknown and not accepts_any:
        raise UnknownOptionError(
            f"task {name!r} does not take {', '.join(map(repr, unknown))}; it takes: {', '.join(valid)}"
        )
    common = {"cache_dir": cache_dir, "data_dir": data_dir, "seed": seed}
    for key, value in common.items():
        if key in valid or accepts_any:
            kwargs[key] = value
        elif key == "data_dir" and value is not None:
            raise UnknownOptionError(f"task {name!r} does not read local files (data_dir was given)")
    task = loader(name, **kwargs)
    if max_train is not None or max_eval is not None:
        task = task.limit(max_train=max_train, max_eval=max_eval, seed=seed)
    logger.info("loaded task %s: %s", task.name, task.sizes())
    return task
