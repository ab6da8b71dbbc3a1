"""Deterministic splits.

Order is decided by hashing: an item with key ``k`` sorts by ``sha256(f"{split_seed}:{k}")``. Unlike a
seeded shuffle this does not depend on any random number generator's implementation (it is the same on
every Python / NumPy version), and an item's split does not move when other items are added, removed or
reordered in the source file.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from .example import Example

T = TypeVar("T")

DEFAULT_SPLIT_SEED = 0


def hash_order(items: Sequence[T], key: Callable[[T], str], split_seed: int = DEFAULT_SPLIT_SEED) -> list[T]:
    """``items`` sorted by the hash of ``f"{split_seed}:{key(item)}"`` (ties keep their input order)."""
    def digest(item: T) -> bytes:
        return hashlib.sha256(f"{split_seed}:{key(item)}".encode()).digest()

    return sorted(items, key=digest)


def example_key(example: Example) -> str:
    """A hash key of an example that does not depend on its prompt format (inputs, id and label)."""
    return f"{example.text}\x1f{example.text_pair}\x1f{example.uid}\x1f{example.label}"


def split_sizes(n: int, fraction: float, *, maximum: int | None = None, minimum: int = 1) -> int:
    """``round(fraction * n)`` clipped to ``[minimum, maximum]`` and to ``n - 1`` (something must remain)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"a split fraction must be in [0, 1), got {fraction!r}")
    size = round(fraction * n)
    if maximum is not None:
        size = min(size, maximum)
    size = max(size, minimum if fraction > 0 else 0)
    return max(0, min(size, n - 1))


def carve(
    items: Sequence[T],
    size: int,
    key: Callable[[T], str],
    split_seed: int = DEFAULT_SPLIT_SEED,
) -> tuple[list[T], list[T]]:
    """Split ``items`` into ``(rest, carved)`` with ``len(carved) == size``.

    ``carved`` holds the first ``size`` items in hash order (and is itself in hash order, so a prefix of
    it is a fixed random subset); ``rest`` keeps the input order.
    """
    ordered = hash_order(list(range(len(items))), lambda i: key(items[i]), split_seed)
    chosen = ordered[:size]
    chosen_set = set(chosen)
    return [items[i] for i in range(len(items)) if i not in chosen_set], [items[i] for i in chosen]


def validation_from_train(
    train: Sequence[T],
    key: Callable[[T], str],
    *,
    fraction: float = 0.05,
    maximum: int = 1000,
    split_seed: int = DEFAULT_SPLIT_SEED,
) -> tuple[list[T], list[T]]:
    """``(train, validation)``: a fixed hash-chosen ``fraction`` of ``train`` (at most ``maximum``, at least
    one example) becomes the validation split.

    Used for public datasets whose labelled test set is not public: their official dev set is the
    held-out test split, and validation comes out of train.
    """
    return carve(train, split_sizes(len(train), fraction, maximum=maximum), key, split_seed)
