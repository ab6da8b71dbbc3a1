"""Batches of conversations, padded or packed.

``ChatCollator(tokenizer, max_length)(examples)`` renders each generative ``Example``'s conversation with
the chat template, labels its assistant tokens (``chat.encode_conversation``) and pads the batch on the
right: ``input_ids``, ``attention_mask``, ``position_ids`` and ``labels``, each ``(B, T)``. It works as a
``transformers.Trainer`` ``data_collator`` and with ``moelora.finetune.loss.answer_loss``.

With ``packing=True`` the sequences of a batch are packed into as few rows of at most ``max_length``
tokens as first-fit-decreasing finds. Each packed sequence keeps its own ``position_ids`` (``0, 1, ...``)
and the batch has no ``attention_mask``: transformers' models then read the sequence boundaries from where
the position ids restart and let no token attend across a boundary, so a packed batch computes what the
padded one computes (``tests/test_chat_training.py`` checks the losses and gradients), on fewer padded
positions. A row's trailing padding restarts the positions too, so it forms a segment of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .chat import EncodedConversation, TrainOn, encode_conversation, resolve_chat_template
from .collate import IGNORE_INDEX, pad_batch, pad_token_id
from .errors import DataError
from .example import Example


def pack_sequences(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into bins whose lengths sum to at most ``capacity`` (first fit,
    longest first); each bin keeps its indices in decreasing length."""
    if any(n > capacity for n in lengths):
        raise ValueError(f"a sequence of {max(lengths)} tokens does not fit a row of {capacity}")
    bins: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b, free in enumerate(room):
            if lengths[index] <= free:
                bins[b].append(index)
                room[b] -= lengths[index]
                break
        else:
            bins.append([index])
            room.append(capacity - lengths[index])
    return bins


def packed_batch(encoded: Sequence[EncodedConversation], capacity: int, pad_id: int) -> dict[str, torch.Tensor]:
    """``input_ids``, ``position_ids`` and ``labels`` ``(R, T)`` of the sequences packed into rows (see the
    module docstring); ``T`` is the longest row, at most ``capacity``."""
    rows = pack_sequences([len(e.input_ids) for e in encoded], capacity)
    ids = [[t for i in row for t in encoded[i].input_ids] for row in rows]
    labels = [[t for i in row for t in encoded[i].labels] for row in rows]
    positions = [[p for i in row for p in range(len(encoded[i].input_ids))] for row in rows]
    width = max(len(r) for r in ids)
    out = {
        "input_ids": torch.full((len(rows), width), pad_id, dtype=torch.long),
        "position_ids": torch.arange(width).repeat(len(rows), 1),
        "labels": torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long),
    }
    for r, (row_ids, row_labels, row_positions) in enumerate(zip(ids, labels, positions)):
        n = len(row_ids)
        out["input_ids"][r, :n] = torch.as_tensor(row_ids)
        out["labels"][r, :n] = torch.as_tensor(row_labels)
        out["position_ids"][r, :n] = torch.as_tensor(row_positions)
        out["position_ids"][r, n:] = torch.arange(width - n)  # the padding is a segment of its own
    return out


class ChatCollator:
    """Turns generative ``Example`` objects (conversations) into a causal-LM batch; see the module docstring.

    Args:
        tokenizer: a fast ``transformers`` tokenizer.
        max_length: the longest sequence (and, packed, the longest row). Conversations lose their oldest
            context to fit; one whose last answer does not fit raises ``ConversationTooLongError``.
        chat_template: ``None`` (the tokenizer's), ``"chatml"`` or Jinja text (``resolve_chat_template``).
        train_on: ``"all"`` assistant turns carry labels, or only the ``"last"``.
        packing: pack the batch's sequences into rows of ``max_length`` tokens.
    """

    def __init__(self, tokenizer: Any, max_length: int | None = None, *, chat_template: str | None = None,
                 train_on: TrainOn = "all", packing: bool = False) -> None:
        if packing and max_length is None:
            raise DataError("packing needs max_length (the length of a packed row)")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.template = resolve_chat_template(tokenizer, chat_template)
        self.train_on: TrainOn = train_on
        self.packing = packing
        self.pad_id = pad_token_id(tokenizer)

    def encode(self, example: Example) -> EncodedConversation:
        if not example.messages:
            raise DataError("ChatCollator needs generative examples (with messages); this one has none")
        return encode_conversation(self.tokenizer, list(example.messages), max_length=self.max_length,
                                   train_on=self.train_on, template=self.template)

    def collate(self, encoded: Sequence[EncodedConversation]) -> dict[str, torch.Tensor]:
        """The batch of already encoded conversations."""
        if not encoded:
            raise ValueError("cannot collate an empty batch")
        if self.packing:
            assert self.max_length is not None  # checked in __init__
            return packed_batch(encoded, self.max_length, self.pad_id)
        return pad_batch([e.input_ids for e in encoded], self.pad_id, padding_side="right",
                         value_sequences=[e.labels for e in encoded])

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        return self.collate([self.encode(e) for e in examples])
