"""lm-evaluation-harness on a fine-tuned model: ``moelora eval RUN_DIR --harness TASK[,TASK]``.

The wrapped model (base + adapter, in eval mode) goes to lm-eval's Hugging Face wrapper (``HFLM``) as an
already built model, so every harness task that works with a transformers model works here. Tasks come
from lm-eval's registry or, with ``include_path``, from a folder of your own task YAML files (e.g. a
``dataset_path: json`` task over local files; nothing is fetched when the data are local).

In Python::

    from moelora.finetune.harness import evaluate_harness
    results = evaluate_harness(model, tokenizer, ["my_task"], include_path="tasks/", limit=100)
    results["my_task"]["acc,none"]
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import ConfigError


def check_harness() -> None:
    """``ConfigError`` when lm-evaluation-harness is not installed (checked before a model loads)."""
    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError("--harness needs lm-evaluation-harness: pip install lm-eval")


def evaluate_harness(model: nn.Module, tokenizer: Any, tasks: list[str], *, include_path: str | Path | None = None,
                     batch_size: int = 8, limit: int | None = None, num_fewshot: int | None = None,
                     seed: int = 0) -> dict[str, dict[str, Any]]:
    """``{task: {metric: value}}`` of lm-eval's ``simple_evaluate`` on ``model``.

    Raises ``ConfigError`` when lm-eval is not installed, when no task is given, or when a task is unknown
    (the message lists what ``include_path`` adds).
    """
    check_harness()
    if not tasks:
        raise ConfigError("--harness needs at least one task name")
    if include_path is not None and not Path(include_path).is_dir():
        raise ConfigError(f"--harness-include {include_path}: not a folder of task YAML files")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path)) if include_path else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        extra = f"; tasks under {include_path}: {sorted(set(manager.all_tasks) - set(TaskManager().all_tasks))}" \
            if include_path else " (add --harness-include FOLDER for your own task files)"
        raise ConfigError(f"unknown lm-eval task(s) {unknown}{extra}")
    device = next(model.parameters()).device
    lm = HFLM(pretrained=model.eval(), tokenizer=tokenizer, batch_size=batch_size, device=str(device))
    output = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                             random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                             fewshot_random_seed=seed)
    if output is None:  # simple_evaluate returns None on processes other than the first
        return {}
    return {task: dict(metrics) for task, metrics in output["results"].items()}
