"""Build the run's optimizer from its ``OptimConfig``."""

from __future__ import annotations

from torch import nn

from ..optim import RiemannianAdamW, RiemannianSGD, param_groups
from .run_config import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig):
    """``RiemannianAdamW`` or ``RiemannianSGD`` over the structural parameter groups of ``model``."""
    groups = param_groups(
        model, lr=cfg.lr, router_lr=cfg.router_lr, weight_decay=cfg.weight_decay,
        router_max_grad_norm=cfg.router_max_grad_norm,
    )
    if cfg.name == "adamw":
        beta1, beta2 = cfg.betas
        return RiemannianAdamW(groups, lr=cfg.lr, betas=(beta1, beta2), eps=cfg.eps, weight_decay=cfg.weight_decay,
                               preconditioner=cfg.preconditioner, reg=cfg.reg, gate_floor=cfg.gate_floor,
                               bias_correction=cfg.bias_correction, b_from_updated_a=cfg.b_from_updated_a)
    return RiemannianSGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                         preconditioner=cfg.preconditioner, reg=cfg.reg, gate_floor=cfg.gate_floor)
