"""Training losses as modules (so ``DistributedDataParallel`` can wrap them), returning sums and counts.

Returning ``(sum of per-token losses, number of tokens)`` rather than a mean lets the loop normalise by
the token count of the whole global batch (all micro-batches, all processes), so one process and N
processes with the same global batch compute the same loss and gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .data import answer_loss

IGNORE_INDEX = -100


class CausalLMAnswerLoss(nn.Module):
    """Cross-entropy summed over the answer tokens, the LM head applied only where there are labels.

    ``labels`` (B, T) hold the token to predict at each position, ``-100`` elsewhere, aligned with
    ``input_ids`` as in ``transformers``. See ``moelora.finetune.data.answer_loss`` (strategy ``"gather"``): the
    full-vocabulary logits of every position (B x T x V) are never formed.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                position_ids: torch.Tensor | None = None):
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if position_ids is not None:
            batch["position_ids"] = position_ids
        # "gather" calls the body directly; that is safe here because DDP wraps this module, not the model.
        loss_sum = answer_loss(self.model, batch, strategy="gather", reduction="sum")
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
