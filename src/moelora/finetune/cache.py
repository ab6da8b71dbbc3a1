"""The cache folder: converted models, downloaded archives and extracted files."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "MOELORA_CACHE"


def default_cache_dir() -> Path:
    """``$MOELORA_CACHE`` if set, else ``~/.cache/moelora``."""
    value = os.environ.get(CACHE_ENV)
    return Path(value).expanduser() if value else Path.home() / ".cache" / "moelora"


def resolve_cache_dir(cache_dir: str | Path | None) -> Path:
    """``cache_dir`` (expanded) or the default; created if missing."""
    path = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    return path
