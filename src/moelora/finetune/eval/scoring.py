"""Option log-likelihood scoring with a causal LM.

The score of option ``o`` of an example is the log-probability the model gives to the option's tokens
after the prompt, ``sum_j log p(o_j | prompt, o_<j)``, divided by the number of option tokens when
``normalize="mean"`` (the default: options of different lengths compare fairly; for options of equal
length, such as ``" The answer is X."``, both give the same ranking). The predicted option is the
argmax.

How it is made fast:

- When every option of an example is a single token (e.g. ``" positive"`` / ``" negative"``), the prompt
  is run once and all options are read from the next-token distribution at its last position.
- Otherwise the prompt is run once per example (left-padded batches, keeping its key/value cache and
  the next-token distribution at its last position), and every option continues from that cache in
  one more forward pass (options right-padded, the cache repeated per option): the prompt's tokens go
  through the model once instead of once per option (``share_prompts=True``, the default, for models
  that accept ``past_key_values``).
- The reference path (``share_prompts=False``) runs each (prompt, option) pair as a row. Rows are
  sorted by length and batched with dynamic left padding, so the option tokens of a batch end at the
  same column; the LM head is applied only to the last ``longest option + 1`` positions
  (``logits_to_keep``) instead of the whole sequence.

``position_ids`` count real tokens only, so a left-padded row scores exactly as it would alone.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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


def _model_inputs(batch: dict[str, torch.Tensor], accepted: set[str]) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and, when the model takes them, ``position_ids`` of a padded batch."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if "position_ids" in accepted:
        inputs["position_ids"] = batch["position_ids"]
    return inputs


def _last_logits(model: nn.Module, batch: dict[str, torch.Tensor], keep: int, accepted: set[str]) -> torch.Tensor:
    """Log-probabilities ``(B, keep, V)`` (float32) at the last ``keep`` positions."""
    inputs: dict[str, Any] = _model_inputs(batch, accepted)  # tensors plus the use_cache flag
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
    share_prompts: bool = True,
) -> list[list[float]]:
    """Log-likelihood score of every option of every example (see the module docstring).

    Runs under ``torch.no_grad()``; the caller puts the model in eval mode (``evaluate`` does).

    Args:
        batch_size: rows (prompt + option sequences) per forward pass.
        normalize: ``"mean"`` (per option token, the default) or ``"sum"``.
        max_length: truncate prompts from the left so that prompt + option fits.
        share_prompts: run each prompt once and continue every option from its cache (see the module
            docstring); ``False`` runs one full row per option (the reference).

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
    if share_prompts and "past_key_values" in accepted:
        continuations = [r for r in rows if r.num_scored > 0]
        rows = [r for r in rows if r.num_scored == 0]
        with torch.no_grad():
            for row, total in _score_from_shared_prompts(model, continuations, batch_size, collator.pad_id,
                                                          accepted, device, progress, desc):
                scores[row.example][row.option] = total / row.num_scored if normalize == "mean" else total
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


def _prompt_groups(rows: list[_Row], batch_size: int) -> list[list[tuple[list[int], list[_Row]]]]:
    """Continuation rows grouped by (example, prompt), longest prompt first, in batches of at most
    ``batch_size`` option rows (a group larger than that is a batch of its own)."""
    groups: dict[tuple[int, tuple[int, ...]], list[_Row]] = {}
    for row in rows:
        groups.setdefault((row.example, tuple(row.ids[: -row.num_scored])), []).append(row)
    ordered = sorted(groups.items(), key=lambda item: -len(item[0][1]))
    batches: list[list[tuple[list[int], list[_Row]]]] = []
    size = 0
    for (_, prompt), members in ordered:
        if not batches or size + len(members) > batch_size:
            batches.append([])
            size = 0
        batches[-1].append((list(prompt), members))
        size += len(members)
    return batches


def _score_from_shared_prompts(model: nn.Module, rows: list[_Row], batch_size: int, pad_id: int,
                               accepted: set[str], device: torch.device, progress: bool, desc: str | None):
    """Yield ``(row, summed log-probability of its option)`` for continuation rows, each prompt run once.

    Per batch: the left-padded prompts ``(G, Lp)`` give the cache and the log-probabilities of every
    option's first token; the options, right-padded ``(R, Lo)``, run on the cache repeated per option with
    positions continuing each prompt, and give the log-probabilities of their later tokens.
    """
    batches = _prompt_groups(rows, batch_size)
    for batch in tqdm(batches, desc=desc or "scoring", disable=not progress, leave=False):
        prompts = pad_batch([prompt for prompt, _ in batch], pad_id, padding_side="left")
        prompts = {k: v.to(device) for k, v in prompts.items()}
        inputs = {**_model_inputs(prompts, accepted), "use_cache": True}
        if "logits_to_keep" in accepted:
            inputs["logits_to_keep"] = 1
        out = model(**inputs)
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (G, V): each option's first token
        members = [row for _, rows_of_prompt in batch for row in rows_of_prompt]
        owner = torch.tensor([g for g, (_, rows_of_prompt) in enumerate(batch) for _ in rows_of_prompt],
                             device=device)
        cache = out.past_key_values
        cache.batch_select_indices(owner)  # one copy of its prompt's cache per option row
        answers = pad_batch([row.ids[-row.num_scored:] for row in members], pad_id, padding_side="right")
        answer_ids = answers["input_ids"].to(device)
        answer_mask = answers["attention_mask"].to(device)
        prompt_lengths = prompts["attention_mask"].sum(dim=1)[owner]
        width = answer_ids.shape[1]
        cont = {"input_ids": answer_ids,
                "attention_mask": torch.cat([prompts["attention_mask"][owner], answer_mask], dim=1),
                "past_key_values": cache, "use_cache": True}
        if "position_ids" in accepted:
            cont["position_ids"] = prompt_lengths[:, None] + torch.arange(width, device=device)
        later = torch.log_softmax(model(**cont).logits.float(), dim=-1)  # (R, Lo, V): token j+1 at j
        first_picked = first[owner].gather(-1, answer_ids[:, :1]).squeeze(-1)  # (R,)
        later_picked = later[:, :-1].gather(-1, answer_ids[:, 1:, None]).squeeze(-1) * answer_mask[:, 1:]
        totals = (first_picked + later_picked.sum(dim=-1)).tolist()
        yield from zip(members, totals)


def score_image_options(model: nn.Module, processor: Any, examples: Sequence[Example], *, batch_size: int = 16,
                        normalize: str = "mean", max_length: int | None = None, progress: bool = False,
                        desc: str | None = None) -> list[list[float]]:
    """``score_options`` for image examples: one row per option (the prompt with its image, then the option),
    collated by ``ImageCollator`` and scored by the model's own forward (which runs the vision tower)."""
    from dataclasses import replace

    import torch.nn.functional as F

    from ..data.collate import IGNORE_INDEX
    from ..data.image_collate import ImageCollator

    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    collator = ImageCollator(processor, max_length)
    rows = [(i, j, replace(e, label=j)) for i, e in enumerate(examples) for j in range(len(e.options))]
    scores: list[list[float]] = [[0.0] * len(e.options) for e in examples]
    device = next(model.parameters()).device
    with torch.no_grad():
        for start in tqdm(range(0, len(rows), batch_size), desc=desc or "scoring", disable=not progress, leave=False):
            chunk = rows[start : start + batch_size]
            batch = {k: v.to(device) for k, v in collator([row for _, _, row in chunk]).items()}
            labels = batch.pop("labels")
            logits = model(**batch).logits[:, :-1].float()
            targets = labels[:, 1:]
            mask = targets != IGNORE_INDEX
            token_logprobs = -F.cross_entropy(logits.transpose(1, 2), targets.clamp_min(0), reduction="none")
            totals = (token_logprobs * mask).sum(dim=1)
            values = totals / mask.sum(dim=1) if normalize == "mean" else totals
            for (i, j, _), value in zip(chunk, values.tolist()):
                scores[i][j] = value
    return scores
