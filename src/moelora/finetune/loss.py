"""Training losses: the answer-token loss of a causal LM, and the loss modules of the trainer.

``answer_loss`` is cross-entropy on the answer tokens with the LM head applied only where it is needed.
The loss modules wrap a model (so ``DistributedDataParallel`` can wrap them) and return sums and counts.

Returning ``(sum of per-token losses, number of tokens)`` rather than a mean lets the loop normalise by
the token count of the whole global batch (all micro-batches, all processes), so one process and N
processes with the same global batch compute the same loss and gradients.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .data.collate import IGNORE_INDEX


def answer_logits_to_keep(labels: torch.Tensor) -> int:
    """How many trailing positions' logits the loss needs (``logits_to_keep`` of transformers' models).

    ``labels`` is ``(B, T)``. The logits at position ``t`` predict token ``t + 1``, so with the first
    labelled column ``c`` the loss needs positions ``c - 1 .. T - 2``; this returns ``T - c + 1`` (the last
    position is kept too, since ``logits_to_keep`` counts from the end). With left padding it is one more
    than the longest answer.
    """
    labelled = (labels != IGNORE_INDEX).any(dim=0).nonzero()
    if labelled.numel() == 0:
        raise ValueError("the batch has no answer tokens (all labels are -100)")
    first = int(labelled[0])
    if first == 0:
        raise ValueError("the first token of a sequence cannot be a label (nothing predicts it)")
    return labels.shape[1] - first + 1


def answer_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, cols)`` of the positions whose next token is an answer token: ``labels[rows, cols + 1]``
    are the targets of the logits at ``(rows, cols)``. Both are ``(N,)`` long, ``N`` answer tokens."""
    rows, cols = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
    return rows, cols


def _unwrap(model: nn.Module) -> tuple[nn.Module, bool]:
    """``(inner model, wrapped)`` through DDP / FSDP-style ``.module`` wrappers."""
    wrapped = False
    while not hasattr(model, "get_output_embeddings"):
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            break
        model, wrapped = inner, True
    return model, wrapped


_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier")
# A vision-language model's image inputs, passed through to its forward.
IMAGE_INPUTS = ("pixel_values", "image_sizes")


def _gather_supported(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    inner: Any  # a transformers model (get_decoder, get_output_embeddings)
    inner, wrapped = _unwrap(model)
    # FSDP2 gathers the root's parameters in the root's forward, which "gather" would bypass.
    if wrapped or isinstance(inner, FSDPModule) or not hasattr(inner, "get_decoder"):
        return False
    config = getattr(inner, "config", None)
    if any(getattr(config, attr, None) not in (None, 1, 1.0) for attr in _LOGIT_TRANSFORMS):
        return False  # the model post-processes logits in its forward: go through it
    decoder = inner.get_decoder()
    return decoder is not inner and inner.get_output_embeddings() is not None


def answer_loss(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    strategy: str = "auto",
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy on the answer tokens, computing LM-head logits only where they are needed.

    Equals transformers' own causal-LM loss on ``model(**batch)`` (which computes ``(B, T, V)`` logits)
    up to float rounding, at a fraction of the LM-head cost.

    Strategies:
        ``"gather"``: run the decoder body (``model.get_decoder()``), gather the ``(N, H)`` hidden states
            at the ``N`` positions that predict answer tokens and apply the LM head there only
            (``N x V`` logits). Bypasses ``model.forward``, so it is not used for DDP / FSDP wrappers
            (their forward sets up gradient synchronisation) or for models that transform their logits
            in ``forward`` (soft-capping, logit scales).
        ``"logits_to_keep"``: ``model(..., logits_to_keep=k)`` with ``k = answer_logits_to_keep(labels)``:
            ``B x k x V`` logits, through the model's own forward (works under any wrapper). With left
            padding ``k`` is the longest answer plus one.
        ``"auto"``: ``"gather"`` when supported, else ``"logits_to_keep"``.

    Args:
        batch: ``input_ids``, ``labels``, and ``attention_mask`` and ``position_ids`` when given, ``(B, T)``
            (a packed batch has ``position_ids`` and no ``attention_mask``).
        reduction: ``"mean"`` over answer tokens, or ``"sum"`` (divide by the total answer-token count
            yourself when accumulating gradients over micro-batches of different sizes).

    Returns:
        A scalar float32 tensor.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if strategy not in ("auto", "gather", "logits_to_keep"):
        raise ValueError(f"strategy must be 'auto', 'gather' or 'logits_to_keep', got {strategy!r}")
    labels = batch["labels"]
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", *IMAGE_INPUTS) if k in batch}
    images = any(k in batch for k in IMAGE_INPUTS)
    if images and strategy == "gather":
        raise ValueError("strategy='gather' runs the language model alone and would drop the images: use 'auto'")
    if strategy == "auto":
        # Image inputs go through the model's own forward, which runs the vision tower and places its output.
        strategy = "gather" if _gather_supported(model) and not images else "logits_to_keep"
    if strategy == "gather":
        inner: Any  # a transformers model (get_decoder, get_output_embeddings)
        inner, _ = _unwrap(model)
        hidden = inner.get_decoder()(**inputs, use_cache=False).last_hidden_state  # (B, T, H)
        rows, cols = answer_positions(labels)
        if rows.numel() == 0:
            raise ValueError("the batch has no answer tokens (all labels are -100)")
        logits = inner.get_output_embeddings()(hidden[rows, cols])  # (N, V)
        targets = labels[rows, cols + 1]
    else:
        keep = answer_logits_to_keep(labels)
        logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits  # (B, keep, V)
        logits = logits[:, :-1].flatten(0, 1)
        targets = labels[:, labels.shape[1] - keep + 1 :].flatten()
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction=reduction)


class CausalLMAnswerLoss(nn.Module):
    """Cross-entropy summed over the answer tokens, the LM head applied only where there are labels.

    ``labels`` (B, T) hold the token to predict at each position, ``-100`` elsewhere, aligned with
    ``input_ids`` as in ``transformers``. See ``answer_loss`` (strategy ``"gather"``): the
    full-vocabulary logits of every position (B x T x V) are never formed.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                **images: torch.Tensor):
        # No attention_mask: a packed batch, whose sequences the model separates by where position_ids restart.
        # ``images``: a vision-language model's pixel_values (and image_sizes).
        if labels is None:
            raise ValueError("CausalLMAnswerLoss needs labels")
        unknown = sorted(set(images) - set(IMAGE_INPUTS))
        if unknown:
            raise TypeError(f"CausalLMAnswerLoss got unexpected inputs {unknown}")
        batch = {"input_ids": input_ids, "labels": labels, **images}
        if attention_mask is not None:
            batch["attention_mask"] = attention_mask
        if position_ids is not None:
            batch["position_ids"] = position_ids
        # "gather" calls the body directly; that is safe under DDP, which wraps this module, not the model,
        # and "auto" leaves it for a model sharded by FSDP2 (whose root forward gathers the embeddings).
        loss_sum = answer_loss(self.model, batch, strategy="auto", reduction="sum")
        return loss_sum, (labels[:, 1:] != IGNORE_INDEX).sum()


class SequenceClassificationLoss(nn.Module):
    """Cross-entropy (or squared error for one output) of a sequence-classification model's head."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, **extra):
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits.float()
        if logits.shape[-1] == 1:
            loss_sum = F.mse_loss(logits.squeeze(-1), labels.float(), reduction="sum")
        else:
            loss_sum = F.cross_entropy(logits, labels, reduction="sum")
        return loss_sum, torch.tensor(labels.shape[0], device=labels.device)
