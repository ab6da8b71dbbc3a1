"""Evaluation of a generative task: held-out loss on the assistant tokens, and the generated last turn
scored against its references.

For each example the conversation before its last turn is rendered with the generation prompt, the model
answers greedily (stopping at eos or the template's end of turn), and the answer (read with the task's
``answer_pattern`` when it has one) is compared with the references: normalised exact match (the headline,
with a Wilson interval), "contains" (Wilson) and token F1 (percentile bootstrap); see ``text_metrics``.
The loss (mean cross-entropy per assistant token, teacher-forced, labelled as in training) and its
perplexity ``exp(loss)`` complete ``EvalResult.metrics``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..data.chat import ConversationTooLongError, TrainOn, end_of_turn, render
from ..data.chat_collate import ChatCollator
from ..data.chat_files import check_answer_pattern
from ..data.collate import IGNORE_INDEX
from ..data.example import Example, TaskData
from ..errors import EvaluationError
from .generation import generate_from_ids
from .intervals import bootstrap_interval, wilson_interval
from .text_metrics import contains, exact_match, extract_answer_text, token_f1

logger = logging.getLogger(__name__)


def generation_prompts(tokenizer: Any, examples: Sequence[Example], template: str, max_length: int | None
                       ) -> list[list[int]]:
    """Token ids of each example's context with the generation prompt, keeping the last ``max_length``."""
    prompts = []
    for example in examples:
        text = render(tokenizer, example.context, add_generation_prompt=True, template=template)
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        prompts.append(ids[-max_length:] if max_length else ids)
    return prompts


def heldout_loss(model: nn.Module, collator: ChatCollator, examples: Sequence[Example], *, batch_size: int,
                 progress: bool = False, desc: str | None = None) -> tuple[float, int]:
    """``(mean cross-entropy per labelled token, labelled tokens)`` of ``examples``, teacher-forced.

    A conversation whose last answer does not fit ``max_length`` is left out (and counted in the log).
    """
    from ..loss import answer_loss

    encoded, skipped = [], 0
    for example in examples:
        try:
            encoded.append(collator.encode(example))
        except ConversationTooLongError:
            skipped += 1
    if skipped:
        logger.warning("held-out loss: %d of %d conversations do not fit max_length=%s and are left out",
                       skipped, len(examples), collator.max_length)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for start in tqdm(range(0, len(encoded), batch_size), desc=desc or "held-out loss", disable=not progress,
                          leave=False):
            batch = {k: v.to(device) for k, v in collator.collate(encoded[start : start + batch_size]).items()}
            total += float(answer_loss(model, batch, reduction="sum"))
            count += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    return (total / count if count else math.nan), count


def evaluate_generative(
    model: nn.Module,
    tokenizer: Any,
    task: TaskData,
    examples: Sequence[Example],
    *,
    chat_template: str | None = None,
    train_on: TrainOn = "all",
    batch_size: int = 16,
    max_new_tokens: int = 32,
    max_length: int | None = None,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
    progress: bool = False,
    desc: str | None = None,
):
    """Evaluate ``model`` on generative ``examples`` (see the module docstring); returns an ``EvalResult``
    whose ``predictions`` are the extracted answers, ``labels`` the first references and ``correct`` the
    exact matches. The model is in eval mode during it; its training mode is restored afterwards."""
    from .evaluate import EvalResult

    pattern = check_answer_pattern(task.answer_pattern)
    collator = ChatCollator(tokenizer, max_length, chat_template=chat_template, train_on=train_on)
    stop_ids, stop_text = end_of_turn(tokenizer, collator.template)
    prompt_room = None if max_length is None else max(1, max_length - max_new_tokens)
    prompts = generation_prompts(tokenizer, examples, collator.template, prompt_room)
    was_training = model.training
    model.eval()
    try:
        generations = generate_from_ids(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                        batch_size=batch_size, stop_token_ids=stop_ids, stop_text=stop_text,
                                        progress=progress, desc=desc)
        loss, n_tokens = heldout_loss(model, collator, examples, batch_size=batch_size, progress=progress, desc=desc)
    finally:
        model.train(was_training)
    if n_tokens and not math.isfinite(loss):
        raise EvaluationError(f"{task.name}: the held-out loss is not finite ({loss}); the adapter or the model "
                              "diverged")
    answers = [extract_answer_text(g, pattern) for g in generations]
    exact = [exact_match(a, e.options) for a, e in zip(answers, examples)]
    found = [contains(g, e.options) for g, e in zip(generations, examples)]
    f1 = [token_f1(a, e.options) for a, e in zip(answers, examples)]
    n = len(examples)

    def mean(values: Any, _labels: Any = None) -> float:
        return float(np.mean(values))

    intervals = {
        "exact_match": wilson_interval(sum(exact), n, confidence),
        "contains": wilson_interval(sum(found), n, confidence),
        "token_f1": bootstrap_interval(mean, f1, f1, n_resamples=n_resamples, confidence=confidence, seed=seed),
    }
    metrics = {"exact_match": sum(exact) / n, "contains": sum(found) / n, "token_f1": mean(f1),
               "loss": loss, "perplexity": math.exp(loss) if math.isfinite(loss) else math.nan,
               "loss_tokens": float(n_tokens)}
    result = EvalResult(
        task.name, "generate", "exact_match", metrics["exact_match"], intervals["exact_match"], answers,
        [e.options[0] for e in examples], exact, metrics, None, list(generations), intervals,
        {"contains": [float(x) for x in found], "token_f1": f1},
    )
    logger.info("%s: %s; contains %.1f %%, token F1 %.3f, loss %.3f", task.name, result.summary(),
                100 * metrics["contains"], metrics["token_f1"], loss)
    return result
