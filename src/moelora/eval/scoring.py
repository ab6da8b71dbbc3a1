"""Option log-likelihood scoring with a causal LM.

The score of option ``o`` of an example is the log-probability the model gives to the option's tokens
after the prompt, ``sum_j log p(o_j | prompt, o_<j)``, divided by the number of option tokens when
``normalize="mean"`` (the default: options of different lengths compare fairly; for options of equal
length, such as ``" The answer is X."``, both give the same ranking). The predicted option is the
argmax.

How it is made fast:

- When every option of an example is a single token (e.g. ``" positive"`` / ``" negative"``), the prompt
  is run once and all options are read from the next-token distribution at its last position.
- Otherwise each (prompt, option) pair is a row. Rows are sorted by length and batched with dynamic left
  padding, so the option tokens of a batch end at the same column; the LM head is applied only to the
  last ``longest option + 1`` positions (``logits_to_keep``) instead of the whole sequence.

``position_ids`` count real tokens only, so a left-padded row scores exactly as it would alone.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data.collate import CausalLMCollator, pad_batch
from ..data.example import Example

logger = logging.getLogger(__name__)

NORMALIZATIONS = ("mean", "sum")


@dataclass
class _Row:
    """One forward row: ``ids`` (prefix + prompt + scored continuation) and what to read from it."""

    example: int
    ids: list[int]
    # number of trailing tokens scored as one option (continuation row); 0 for a next-token row
    num_scored: int
    option: int  # option index of a continuation row
    candidates: list[int]  # next-token row: candidate token id of each option


def _forward_kwargs(model: nn.Module) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _last_logits(model: nn.Module, batch: dict[str, torch.Tensor], keep: int, accepted: set[str]) -> torch.Tensor:
    """Log-probabilities ``(B, keep, V)`` (float32) at the last ``keep`` positions."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if "position_ids" in accepted:
        inputs["position_ids"] = batch["position_ids"]
    if "use_cache" in accepted:
        inputs["use_cache"] = False
    if "logits_to_keep" in accepted:
        logits = model(**inputs, logits_to_keep=keep).logits
    else:
        logits = model(**inputs).logits[:, -keep:]
    return torch.log_softmax(logits.float(), dim=-1)


def _build_rows(collator: CausalLMCollator, examples: Sequence[Example]) -> list[_Row]:
    prompts = collator.tokenize([e.prompt for e in examples])
    flat_options = [o for e in examples for o in e.options]
    option_ids = iter(collator.tokenize(flat_options))
    rows: list[_Row] = []
    for i, (example, prompt) in enumerate(zip(examples, prompts)):
        if not example.options:
            raise ValueError("log-likelihood scoring needs options; this is a regression example")
        joined = [collator.join(prompt, next(option_ids)) for _ in example.options]
        if all(len(answer) == 1 for _, answer in joined):
            prefix = joined[0][0]  # the prompts are identical; truncation kept room for one token
            rows.append(_Row(i, prefix, 0, -1, [answer[0] for _, answer in joined]))
        else:
            for j, (prefix, answer) in enumerate(joined):
                rows.append(_Row(i, prefix + answer, len(answer), j, []))
    return rows


def score_options(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    batch_size: int = 16,
    normalize: str = "mean",
    max_length: int | None = None,
    progress: bool = False,
    desc: str | None = None,
) -> list[list[float]]:
    """Log-likelihood score of every option of every example (see the module docstring).

    Runs under ``torch.no_grad()``; the caller puts the model in eval mode (``evaluate`` does).

    Args:
        batch_size: rows (prompt + option sequences) per forward pass.
        normalize: ``"mean"`` (per option token, the default) or ``"sum"``.
        max_length: truncate prompts from the left so that prompt + option fits.

    Returns:
        ``scores[i][j]``: the score of option ``j`` of example ``i``.
    """
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    collator = CausalLMCollator(tokenizer, max_length, padding_side="left")
    rows = _build_rows(collator, examples)
    # Longest first: similar lengths share a batch (little padding), and memory peaks at once.
    rows.sort(key=lambda r: -len(r.ids))
    scores = [[float("nan")] * len(e.options) for e in examples]
    accepted = _forward_kwargs(model)
    device = next(model.parameters()).device
    with torch.no_grad():
        for start in tqdm(range(0, len(rows), batch_size), desc=desc or "scoring", disable=not progress, leave=False):
            chunk = rows[start : start + batch_size]
            batch = pad_batch([r.ids for r in chunk], collator.pad_id, padding_side="left")
            batch = {k: v.to(device) for k, v in batch.items()}
            keep = max(r.num_scored for r in chunk) + 1
            logprobs = _last_logits(model, batch, keep, accepted)  # (B, keep, V)
            for b, row in enumerate(chunk):
                if row.num_scored == 0:
                    values = logprobs[b, -1, row.candidates].tolist()
                    for j, value in enumerate(values):
                        scores[row.example][j] = value
                    continue
                n = row.num_scored
                # tokens at the last n positions are predicted by the n positions before them
                targets = torch.as_tensor(row.ids[-n:], device=device)
                picked = logprobs[b, keep - n - 1 : keep - 1].gather(-1, targets[:, None]).squeeze(-1)
                total = float(picked.sum())
                scores[row.example][row.option] = total / n if normalize == "mean" else total
    return scores
