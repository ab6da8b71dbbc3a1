"""Errors raised while loading data.

Every error is a ``moelora.MoELoRAError`` and ``ValueError`` subclass (``DataFileNotFoundError`` is also a ``FileNotFoundError``) whose
message says what was wrong, where (file and line when there is one) and what to do about it.
"""

from __future__ import annotations

from pathlib import Path

from ...errors import MoELoRAError


class DataError(MoELoRAError, ValueError):
    """Base class of all data errors."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A dataset file that a loader needs does not exist."""

    def __init__(self, path: str | Path, what: str = "dataset file", hint: str = "") -> None:
        self.path = Path(path)
        message = f"{what} not found: {self.path}"
        if hint:
            message += f" ({hint})"
        super().__init__(message)

    def __str__(self) -> str:  # FileNotFoundError would otherwise format its own (errno, strerror) message
        return self.args[0]


class MalformedRowError(DataError):
    """A row (record) of a dataset file cannot be parsed.

    ``path`` and ``line`` locate the row (``line`` is 1-based; for JSON documents that are not line
    oriented it is ``None`` and ``record`` names the record instead). Row parsers raise it without a
    location and the file reader adds one with :meth:`at`.
    """

    def __init__(
        self, reason: str, path: str | Path | None = None, line: int | None = None, record: str | None = None
    ) -> None:
        self.reason = reason
        self.path = None if path is None else Path(path)
        self.line = line
        self.record = record
        where = ""
        if self.path is not None:
            where = str(self.path)
            if line is not None:
                where += f", line {line}"
            elif record is not None:
                where += f", record {record}"
            where += ": "
        super().__init__(f"{where}{reason}")

    def at(self, path: str | Path, line: int | None = None, record: str | None = None) -> MalformedRowError:
        """The same error, located at ``path`` / ``line`` (or ``record``)."""
        return type(self)(self.reason, path, line, record)


class LabelOutOfRangeError(MalformedRowError):
    """A row's label is not one of its options (or not one of the task's label names)."""


class EmptySplitError(DataError):
    """A split of a task has no examples."""


class UnknownTaskError(DataError):
    """``load_task`` was given a name that no loader is registered for."""


class UnknownOptionError(DataError, TypeError):
    """``load_task`` was given an option that the task's loader does not take."""
