"""Writing files so that a crash never leaves a half-written one: write a temporary sibling, then rename."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then rename it onto ``path``.

    The file gets the usual permissions (``0o666`` less the umask), not ``mkstemp``'s private ``0o600``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        _fsync(Path(tmp))  # the data reach the disk before the name does
        os.chmod(tmp, 0o666 & ~_current_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_dir(target: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Create folder ``target`` by filling a temporary sibling and renaming it (replaces an old one)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        fill(tmp)
        replace_dir(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target


def replace_dir(filled: Path, target: Path) -> Path:
    """Rename the complete folder ``filled`` onto ``target``, replacing an older one, after its files reach
    the disk: ``target`` is always whole or absent. Between the two renames of a swap the old folder is
    ``.<target>.old`` (a reader that finds it and no ``target`` may put it back)."""
    for file in filled.rglob("*"):
        if file.is_file():
            _fsync(file)
    os.chmod(filled, 0o777 & ~_current_umask())
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)  # a leftover of an earlier, interrupted swap
        os.replace(target, old)
        os.replace(filled, target)
        shutil.rmtree(old)
    else:
        os.replace(filled, target)
    return target
