"""Optional parts of the package and the pip extras that install them.

The core (layers, wrapping, adapter files, optimizers) needs torch and safetensors only. The training
command, the benchmarks and the reproduction grid need more; importing one of them without its extra
raises ``MissingExtraError`` naming the extra to install.
"""

from __future__ import annotations

import importlib.util

from .errors import MoELoRAError

# extra -> the import names its package needs to import (``pyproject.toml`` installs them under that extra;
# matplotlib, which only draws a finished run's plots, is checked by the trainer when a run starts).
EXTRAS: dict[str, tuple[str, ...]] = {
    "train": ("transformers", "yaml", "tqdm", "numpy"),
    "bench": ("transformers", "yaml", "tqdm", "numpy", "peft"),
}


class MissingExtraError(MoELoRAError, ImportError):
    """A part of the package was used without the pip extra that installs its dependencies."""


def require_extra(extra: str, feature: str, modules: tuple[str, ...] | None = None) -> None:
    """Raise ``MissingExtraError`` if a module of ``extra`` (or of ``modules``, which ``extra`` installs) is
    not installed; ``feature`` names what needs it."""
    missing = [name for name in modules or EXTRAS[extra] if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingExtraError(
            f"{feature} needs the '{extra}' extra (missing: {', '.join(missing)}); "
            f"install it with: pip install 'moelora[{extra}]'"
        )
