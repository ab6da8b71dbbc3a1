"""Training losses as modules (so ``DistributedDataParallel`` can wrap them), returning sums and counts.

Returning ``(sum of per-token losses, number of tokens)`` rather than a mean lets the loop normalise by
the token count of the whole global batch (all micro-batches, all processes), so one process and N
processes with the same global batch compute the same loss and gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


class CausalLMAnswerLoss(nn.Module):
    """Cross-entropy on the answer tokens only, with the LM head applied only where there are labels.

    ``labels`` (B, T) hold the token to predict at each position, ``-100`` elsewhere, aligned with
    ``input_ids`` as in ``transformers`` (position ``t`` predicts ``labels[t]`` from ``input_ids[:t]``).
    The full-vocabulary logits of every position (B x T x V) are never formed: the hidden states of the
    N positions that predict an answer token are gathered (N x H) and only they go through the head.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor):
        body = self.model.base_model
        hidden = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX  # (B, T-1): position t predicts token t+1
        logits = self.model.get_output_embeddings()(hidden[:, :-1][keep])  # (N, V)
        loss_sum = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
        return loss_sum, keep.sum()


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
