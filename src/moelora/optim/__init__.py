"""Optimizers for MoE-LoRA experts: per-expert and gate-rescaled Riemannian preconditioning.

    from moelora.optim import RiemannianAdamW, param_groups
    opt = RiemannianAdamW(param_groups(model, lr=1e-5, router_lr=3e-8, router_max_grad_norm=1.0),
                          preconditioner="riemannian")

Modules: ``groups`` (parameter groups from the model's structure), ``precondition`` (batched r x r
solves), ``base`` (the shared step), ``sgd`` / ``adamw`` (the update rules), ``reference`` (a slow
per-expert loop, the yardstick of the tests).
"""

from ..config import PRECONDITIONERS
from .adamw import RiemannianAdamW
from .groups import GROUP_KINDS, param_groups
from .precondition import PreconditionerError, PreconditionerWarning, share_gate_statistics
from .sgd import RiemannianSGD

__all__ = [
    "GROUP_KINDS",
    "PRECONDITIONERS",
    "PreconditionerError",
    "PreconditionerWarning",
    "RiemannianAdamW",
    "RiemannianSGD",
    "param_groups",
    "share_gate_statistics",
]
