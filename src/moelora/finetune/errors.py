"""The application's user errors (the data errors are in ``moelora.finetune.data.errors``).

All derive from ``moelora.MoELoRAError``: the command line reports them as one line, and anything else
as a bug with its traceback.
"""

from __future__ import annotations

from ..errors import ConfigError, MoELoRAError

__all__ = ["ConfigError", "EvaluationError", "ModelNotFoundError", "RunFolderError", "TrainingError"]


class TrainingError(MoELoRAError, RuntimeError):
    """The run cannot go on (non-finite loss, incompatible resume, ...); the message says why."""


class EvaluationError(MoELoRAError, RuntimeError):
    """An evaluation cannot give a meaningful number (non-finite scores); the message says why."""


class RunFolderError(MoELoRAError, FileNotFoundError):
    """A folder given as a run folder is not one (or lacks what the command needs)."""

    def __str__(self) -> str:  # FileNotFoundError would otherwise format its own (errno, strerror) message
        return str(self.args[0]) if self.args else ""


class ModelNotFoundError(MoELoRAError, FileNotFoundError):
    """The base model named by ``model.name`` is neither bundled nor a local model folder."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""
