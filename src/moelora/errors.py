"""The library's user errors: mistakes the caller can fix, each with a message saying what and how.

Every class derives from ``MoELoRAError`` (so an application can tell them from bugs) and from the
built-in exception a caller would expect (``ValueError``, ``FileNotFoundError``, ``RuntimeError``).
"""

from __future__ import annotations


class MoELoRAError(Exception):
    """Base class of every error that reports a user mistake rather than a bug."""


class ConfigError(MoELoRAError, ValueError):
    """A configuration mistake: unknown key, wrong type, value out of range, no module matched."""


class AdapterError(MoELoRAError, ValueError):
    """An adapter folder that is malformed or does not fit the model it is loaded onto."""


class AdapterNotFoundError(AdapterError, FileNotFoundError):
    """A file of an adapter folder is missing."""

    def __str__(self) -> str:  # FileNotFoundError would otherwise format its own (errno, strerror) message
        return str(self.args[0]) if self.args else ""
