"""Datasets, prompts and batching.

``load_task(name, ...)`` returns a ``TaskData`` with train / validation / held-out test lists of
``Example``; ``CausalLMCollator`` and ``EncoderCollator`` turn examples into model batches;
``LengthGroupedBatchSampler`` groups similar lengths; ``answer_loss`` computes the loss on answer tokens
with the LM head applied only where it is needed.
"""

from . import bigbench, generic, glue, hub, qa, rotten_tomatoes  # noqa: F401  (register the loaders)
from .cache import default_cache_dir
from .collate import CausalLMCollator, EncoderCollator, answer_loss, answer_logits_to_keep
from .errors import (
    DataError,
    DataFileNotFoundError,
    EmptySplitError,
    LabelOutOfRangeError,
    MalformedRowError,
    UnknownOptionError,
    UnknownTaskError,
)
from .example import Example, TaskData
from .prompts import mc_example, mc_prompt
from .registry import available_tasks, load_task, register_task
from .sampler import LengthGroupedBatchSampler

__all__ = [
    "CausalLMCollator",
    "DataError",
    "DataFileNotFoundError",
    "EmptySplitError",
    "EncoderCollator",
    "Example",
    "LabelOutOfRangeError",
    "LengthGroupedBatchSampler",
    "MalformedRowError",
    "TaskData",
    "UnknownOptionError",
    "UnknownTaskError",
    "answer_logits_to_keep",
    "answer_loss",
    "available_tasks",
    "default_cache_dir",
    "load_task",
    "mc_example",
    "mc_prompt",
    "register_task",
]
