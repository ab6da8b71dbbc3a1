"""Learning-rate schedule: linear warm-up, then linear decay to ``final_ratio`` of the peak."""

from __future__ import annotations

import torch


def linear_warmup_decay(step: int, warmup_steps: int, total_steps: int, final_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based).

    ``(step + 1) / warmup_steps`` during warm-up, then a straight line from 1 at the end of warm-up to
    ``final_ratio`` at ``total_steps``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    return 1.0 - (1.0 - final_ratio) * progress


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                    final_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` (state_dict-able) applying ``linear_warmup_decay`` to every parameter group."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: linear_warmup_decay(step, warmup_steps, total_steps, final_ratio)
    )
