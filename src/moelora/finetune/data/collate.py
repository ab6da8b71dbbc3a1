"""Batches for causal LMs and encoders.

A causal-LM sequence is ``prefix + prompt + answer (+ eos)`` where ``prefix`` is whatever special tokens
the tokenizer puts in front of a text (a BOS for Llama-style tokenizers, nothing for SmolLM2). Prompt
and answer are tokenized separately and concatenated, so every option of an example shares exactly the
same prompt tokens and the answer tokens are exactly those of the answer text (with the prompt format of
``prompts.py`` this is also what tokenizing the joined text gives for byte-level BPE tokenizers).

Labels are ``-100`` on the prompt and on padding and the token ids on the answer. They are built from the
token counts, never by comparing ids with the pad id: the SmolLM2 tokenizer pads with ``<|im_end|>``,
which is also a real token.

Padding is dynamic (to the longest sequence of the batch) and on the left by default: the answers of a
batch then end at the same column, so the logits needed for the loss are the last few positions
(``moelora.finetune.loss.answer_logits_to_keep``), and the same batches serve scoring and generation. ``position_ids`` count
real tokens only, so a left-padded row computes exactly what it computes unpadded.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from .example import Example

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
PADDING_SIDES = ("left", "right")


def pad_token_id(tokenizer: Any) -> int:
    """An id to put in padded positions (never read: padding is masked): pad, else eos, else 0."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


def special_prefix(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer puts before a text (e.g. ``[bos]``), found by comparing the
    encodings of a probe text with and without special tokens."""
    probe = "Answer"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start])
    return []


def pad_batch(
    sequences: Sequence[Sequence[int]],
    pad_id: int,
    *,
    padding_side: str = "left",
    pad_to_multiple_of: int | None = None,
    value_sequences: Sequence[Sequence[int]] | None = None,
) -> dict[str, torch.Tensor]:
    """Pad token id lists into ``input_ids``, ``attention_mask``, ``position_ids`` (all ``(B, T)`` long).

    ``T`` is the longest length (rounded up to ``pad_to_multiple_of``). ``position_ids`` number the real
    tokens ``0, 1, ...`` and are 0 on padding. If ``value_sequences`` is given, its lists (same lengths
    as ``sequences``) are padded with ``-100`` into ``labels``.
    """
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
    lengths = [len(s) for s in sequences]
    width = max(lengths) if lengths else 0
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    batch = len(sequences)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    position_ids = torch.zeros((batch, width), dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long) if value_sequences is not None else None
    for row, (seq, n) in enumerate(zip(sequences, lengths)):
        cols = slice(width - n, width) if padding_side == "left" else slice(0, n)
        input_ids[row, cols] = torch.as_tensor(seq, dtype=torch.long)
        attention_mask[row, cols] = 1
        position_ids[row, cols] = torch.arange(n)
        if labels is not None:
            assert value_sequences is not None  # labels exist only when value_sequences was given
            labels[row, cols] = torch.as_tensor(value_sequences[row], dtype=torch.long)
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
    if labels is not None:
        out["labels"] = labels
    return out


class CausalLMCollator:
    """Turns ``Example`` objects into a causal-LM training batch.

    ``collator(examples)`` returns ``input_ids``, ``attention_mask``, ``position_ids`` and ``labels``,
    each ``(B, T)`` long with ``T`` the longest sequence of the batch; ``labels`` is ``-100`` except on
    the answer tokens (``example.answer``, plus eos when ``append_eos``). The batch works with
    ``model(**batch)`` (transformers' loss) and with ``moelora.finetune.loss.answer_loss``.

    Args:
        tokenizer: a ``transformers`` tokenizer.
        max_length: longest sequence; longer ones lose prompt tokens from the left (after the special
            prefix), never answer tokens. ``None``: no limit.
        padding_side: ``"left"`` (default; see the module docstring) or ``"right"``.
        append_eos: add the eos token after the answer (teaches the model to stop after answering).
        pad_to_multiple_of: round ``T`` up (helps some kernels; costs padding).
    """

    def __init__(
        self,
        tokenizer: Any,
        max_length: int | None = None,
        *,
        padding_side: str = "left",
        append_eos: bool = False,
        pad_to_multiple_of: int | None = None,
    ) -> None:
        if padding_side not in PADDING_SIDES:
            raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pad_id = pad_token_id(tokenizer)
        self.prefix = special_prefix(tokenizer)
        self.suffix: list[int] = []
        if append_eos:
            if getattr(tokenizer, "eos_token_id", None) is None:
                raise ValueError("append_eos=True but the tokenizer has no eos token")
            self.suffix = [tokenizer.eos_token_id]
        self.num_truncated = 0

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, without special tokens."""
        if not texts:
            return []
        return [list(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    def join(self, prompt_ids: Sequence[int], answer_ids: Sequence[int]) -> tuple[list[int], list[int]]:
        """``(prefix + prompt, answer + suffix)``, truncated to ``max_length`` by dropping the oldest
        prompt tokens (the special prefix and the answer are always kept)."""
        answer = list(answer_ids) + self.suffix
        if not answer:
            raise ValueError("an answer continuation tokenizes to no tokens")
        prompt = list(prompt_ids)
        if self.max_length is not None:
            room = self.max_length - len(self.prefix) - len(answer)
            if room < 0:
                raise ValueError(f"an answer of {len(answer)} tokens does not fit max_length={self.max_length}")
            if len(prompt) > room:
                self.num_truncated += 1
                prompt = prompt[len(prompt) - room :] if room else []
        return self.prefix + prompt, answer

    def encode(self, prompts: Sequence[str], answers: Sequence[str]) -> list[tuple[list[int], list[int]]]:
        """``join(tokenize(prompt), tokenize(answer))`` for each pair."""
        return [self.join(p, a) for p, a in zip(self.tokenize(prompts), self.tokenize(answers))]

    def token_lengths(self, examples: Sequence[Example]) -> list[int]:
        """Length in tokens of each example's training sequence (for ``LengthGroupedBatchSampler``)."""
        pairs = self.encode([e.prompt for e in examples], [e.answer for e in examples])
        return [len(p) + len(a) for p, a in pairs]

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        pairs = self.encode([e.prompt for e in examples], [e.answer for e in examples])
        sequences = [p + a for p, a in pairs]
        labels = [[IGNORE_INDEX] * len(p) + a for p, a in pairs]
        return pad_batch(
            sequences, self.pad_id, padding_side=self.padding_side,
            pad_to_multiple_of=self.pad_to_multiple_of, value_sequences=labels,
        )


class EncoderCollator:
    """Batches for a sequence-classification encoder (e.g. BERT / MiniLM).

    Returns the tokenizer's fields (``input_ids``, ``attention_mask``, ``token_type_ids`` when the model
    uses them), padded to the longest sequence of the batch, plus ``labels``: ``(B,)`` long class indices,
    or ``(B,)`` float targets for regression (``float`` example labels), as
    ``AutoModelForSequenceClassification`` expects.
    """

    def __init__(self, tokenizer: Any, max_length: int = 256) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        texts = [e.text for e in examples]
        pairs = [e.text_pair for e in examples]
        has_pairs = any(p is not None for p in pairs)
        batch = self.tokenizer(
            texts,
            [p or "" for p in pairs] if has_pairs else None,
            padding="longest",
            truncation="longest_first" if has_pairs else True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        regression = any(not e.options for e in examples)
        labels = [e.label for e in examples]
        batch["labels"] = torch.tensor(labels, dtype=torch.float32 if regression else torch.long)
        return dict(batch)
