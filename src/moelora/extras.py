"""Optional parts of the package and the pip extras that install them.

The core (layers, wrapping, adapter files, optimizers) needs torch and safetensors only. The training
command, the benchmarks and the reproduction grid need more; importing one of them without its extra
raises ``MissingExtraError`` naming the extra to install.
"""

from __future__ import annotations

import importlib.util

from .errors import MoELoRAError

# extra -> the import names it provides (what ``pyproject.toml`` installs under that extra)
EXTRAS: dict[str, tuple[str, ...]] = {
    "train": ("transformers", "yaml", "tqdm", "matplotlib", "numpy"),
    "bench": ("transformers", "yaml", "tqdm", "matplotlib", "numpy", "peft"),
}


class MissingExtraError(MoELoRAError, ImportError):
    """A part of the package was used without the pip extra that installs its dependencies."""


def require_extra(extra: str, feature: str) -> None:
    """Raise ``MissingExtraError`` if a module of ``extra`` is not installed; ``feature`` names the user."""
    missing = [name for name in EXTRAS[extra] if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingExtraError(
            f"{feature} needs the '{extra}' extra (missing: {', '.join(missing)}); "
            f"install it with: pip install 'moelora[{extra}]'"
        )
