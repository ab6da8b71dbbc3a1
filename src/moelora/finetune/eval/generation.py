"""Greedy generation and answer extraction (the paper's protocol: max 10 new tokens, then read the
answer letter from the text)."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data.collate import CausalLMCollator, pad_batch, pad_token_id
from ..data.prompts import LETTERS, normalize_space

logger = logging.getLogger(__name__)

_ANSWER_IS = re.compile(r"answer\s+is\s*:?\s*\(?([A-Z])(?![A-Za-z])", re.IGNORECASE)
_PARENTHESISED = re.compile(r"\(([A-Z])\)")
_LEADING = re.compile(r"^\W*([A-Z])(?![A-Za-z])")


def generate_texts(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 10,
    batch_size: int = 16,
    max_length: int | None = None,
    progress: bool = False,
    desc: str | None = None,
) -> list[str]:
    """Greedy continuations of ``prompts`` (special tokens removed), batched with left padding.

    Prompts are tokenized like a training prompt (the tokenizer's special prefix, then the text) and
    truncated like a training sequence with a one-token answer would be. See ``generate_from_ids``.
    """
    collator = CausalLMCollator(tokenizer, max_length, padding_side="left")
    encoded = [collator.join(ids, [0])[0] for ids in collator.tokenize(prompts)]
    return generate_from_ids(model, tokenizer, encoded, max_new_tokens=max_new_tokens, batch_size=batch_size,
                             progress=progress, desc=desc)


def stop_tokens(model: nn.Module, tokenizer: Any, extra: Sequence[int] = ()) -> list[int]:
    """The ids generation stops at: the model's eos (its generation config's, else the tokenizer's), then
    ``extra`` (e.g. a chat template's end-of-turn token)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    stops = [eos] if isinstance(eos, int) else list(eos or [])
    return stops + [t for t in extra if t not in stops]


def generate_from_ids(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 10,
    batch_size: int = 16,
    stop_token_ids: Sequence[int] = (),
    stop_text: str | None = None,
    progress: bool = False,
    desc: str | None = None,
) -> list[str]:
    """Greedy continuations of token-id prompts, decoded without special tokens.

    Left padding puts every prompt's last token in the last column, which is where generation
    continues; ``generate`` derives the position ids from the attention mask. Prompts are sorted by
    length so a batch pads little; the outputs come back in the input order. Generation stops at the
    model's eos and at ``stop_token_ids`` (e.g. a chat template's end of turn); a text is cut at
    ``stop_text`` (an end-of-turn marker that is not a single token). Runs under ``torch.no_grad()``; the
    caller puts the model in eval mode.
    """
    from transformers import GenerationConfig

    pad_id = pad_token_id(tokenizer)
    stops = stop_tokens(model, tokenizer, stop_token_ids)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad_id, eos_token_id=stops or None
    )
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    device = next(model.parameters()).device
    texts: list[str] = [""] * len(prompts)
    with torch.no_grad():
        for start in tqdm(range(0, len(order), batch_size), desc=desc or "generating", disable=not progress, leave=False):
            indices = order[start : start + batch_size]
            batch = pad_batch([prompts[i] for i in indices], pad_id, padding_side="left")
            input_ids = batch["input_ids"].to(device)
            # nn.Module's stubs type attributes as Tensor | Module; generate is transformers' GenerationMixin method.
            generate = cast(Callable[..., torch.Tensor], model.generate)
            out = generate(
                input_ids=input_ids, attention_mask=batch["attention_mask"].to(device), generation_config=config
            )
            new = out[:, input_ids.shape[1] :]
            for i, text in zip(indices, tokenizer.batch_decode(new, skip_special_tokens=True)):
                texts[i] = text.split(stop_text)[0] if stop_text else text
    return texts


def extract_letter(text: str, num_options: int) -> int:
    """The option index named by a generated answer, or -1.

    Tried in order: ``"... answer is X"`` (the trained format), ``"(X)"``, then a text that starts with
    ``X`` followed by a non-letter. Only ``A`` .. the ``num_options``-th letter count.
    """
    valid = LETTERS[:num_options]
    for pattern in (_ANSWER_IS, _PARENTHESISED):
        for match in pattern.finditer(text):
            letter = match.group(1).upper() if pattern is _ANSWER_IS else match.group(1)
            if letter in valid:
                return valid.index(letter)
    leading = _LEADING.match(text)
    if leading and leading.group(1) in valid:
        return valid.index(leading.group(1))
    return -1


def _words(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9']+", normalize_space(text).lower()))


def extract_text_option(text: str, options: Sequence[str]) -> int:
    """The option whose words a generated answer starts with (the longest such option), else the
    option mentioned first anywhere in it, else -1. Case and punctuation are ignored."""
    generated = _words(text)
    words = [_words(o) for o in options]
    starting = [j for j, w in enumerate(words) if w and (generated == w or generated.startswith(w + " "))]
    if starting:
        return max(starting, key=lambda j: len(words[j]))
    first, best = -1, len(generated) + 1
    for j, w in enumerate(words):
        match = re.search(rf"(?<![a-z0-9']){re.escape(w)}(?![a-z0-9'])", generated) if w else None
        if match and match.start() < best:
            first, best = j, match.start()
    return first


def extract_answer(text: str, options: Sequence[str], answer_format: str) -> int:
    """The option index a generated ``text`` names (``-1`` when it names none), by answer format."""
    if answer_format == "letter":
        return extract_letter(text, len(options))
    if answer_format == "text":
        return extract_text_option(text, options)
    raise ValueError(f"cannot extract answers of format {answer_format!r}")


def generate_image_texts(model: nn.Module, processor: Any, examples: Sequence[Any], *, max_new_tokens: int = 10,
                         batch_size: int = 16, progress: bool = False, desc: str | None = None) -> list[str]:
    """Greedy continuations of image examples' prompts (each with its image), through the model's processor,
    batched with left padding; special tokens removed. Runs under ``torch.no_grad()``."""
    from ..data.image_collate import image_prompt
    from ..vision import load_image

    tokenizer = processor.tokenizer
    side = tokenizer.padding_side
    device = next(model.parameters()).device
    generate = cast(Callable[..., torch.Tensor], model.generate)
    texts: list[str] = []
    try:
        tokenizer.padding_side = "left"  # every prompt's last token in the last column, where generation goes on
        with torch.no_grad():
            for start in tqdm(range(0, len(examples), batch_size), desc=desc or "generating", disable=not progress,
                              leave=False):
                chunk = examples[start : start + batch_size]
                inputs = processor(text=[image_prompt(processor, e) for e in chunk],
                                   images=[load_image(e.image) for e in chunk],
                                   padding=True, return_tensors="pt", add_special_tokens=False).to(device)
                out = generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                               pad_token_id=pad_token_id(tokenizer))
                texts.extend(tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
    return texts
