"""Datasets, prompts and batching.

``load_task(name, ...)`` returns a ``TaskData`` with train / validation / held-out test lists of
``Example``; ``CausalLMCollator``, ``ChatCollator`` (conversations) and ``EncoderCollator`` turn examples
into model batches;
``IGNORE_INDEX`` marks positions without a label. (The loss on answer tokens is ``moelora.finetune.loss``.)
"""

from ..cache import default_cache_dir
from . import bigbench, chat_files, generic, glue, hub, images, qa, rotten_tomatoes  # noqa: F401  (register the loaders)
from .chat import CHATML_TEMPLATE, ConversationTooLongError, encode_conversation, parse_conversation, render
from .chat_collate import ChatCollator
from .chat_files import chat_example
from .collate import IGNORE_INDEX, CausalLMCollator, EncoderCollator
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

__all__ = [
    "CHATML_TEMPLATE",
    "IGNORE_INDEX",
    "CausalLMCollator",
    "ChatCollator",
    "ConversationTooLongError",
    "DataError",
    "DataFileNotFoundError",
    "EmptySplitError",
    "EncoderCollator",
    "Example",
    "LabelOutOfRangeError",
    "MalformedRowError",
    "TaskData",
    "UnknownOptionError",
    "UnknownTaskError",
    "available_tasks",
    "chat_example",
    "default_cache_dir",
    "encode_conversation",
    "load_task",
    "mc_example",
    "mc_prompt",
    "parse_conversation",
    "register_task",
    "render",
]
