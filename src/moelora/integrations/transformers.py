"""``transformers.Trainer`` for a moelora-wrapped model.

``MoELoRATrainer`` is ``transformers.Trainer`` with three changes (``MoELoRATrainerMixin`` brings them to
any Trainer subclass, e.g. ``class SFT(MoELoRATrainerMixin, trl.SFTTrainer): pass``):

- **Checkpoints hold the adapter only** (``adapter_config.json``, ``adapter_model.safetensors``, the model
  card; with ``modules_to_save``), next to Trainer's own optimizer, scheduler, RNG and trainer state, and
  ``resume_from_checkpoint`` loads the adapter back: a resumed run continues exactly where it stopped.
  (Trainer's whole-model ``save_pretrained`` would write a checkpoint that reloads with the adapted
  projections re-initialised; a wrapped model refuses it.) ``load_best_model_at_end`` works the same way.
- **The optimizer is the method's** when none is given: ``RiemannianAdamW`` over
  ``moelora.optim.param_groups`` with Trainer's learning rate, weight decay, betas and epsilon, the
  routers at ``router_lr`` and clipped alone to ``router_max_grad_norm``.
- **Trainer's gradient clipping is off.** ``TrainingArguments.max_grad_norm`` (1.0 by default) clips the
  joint norm of every trainable tensor, experts and routers together; the method clips the routers alone
  (inside the optimizer) and lets the expert gradients reach the preconditioner unclipped. A non-zero
  ``max_grad_norm`` is set to 0 with a warning that says so.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..adapter import load_adapter_weights, save_adapter
from ..config import Preconditioner
from ..errors import ConfigError
from ..extras import require_extra
from ..inject import CONFIG_ATTR

require_extra("train", "moelora.integrations.transformers", ("transformers",))

from transformers import Trainer  # noqa: E402  (after the check that it is installed)

logger = logging.getLogger(__name__)


def _wrapped(model: nn.Module | None) -> nn.Module:
    """The moelora-wrapped model inside Trainer's wrappers (DDP, accelerate, torch.compile)."""
    while getattr(model, CONFIG_ATTR, None) is None:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            raise ConfigError("MoELoRATrainer needs a model wrapped by moelora.wrap(model, config)")
        model = inner
    assert model is not None  # the loop only ends at a wrapped module
    return model


# The mixin is type-checked as the Trainer it is mixed into; at run time it sits before one in the MRO.
if TYPE_CHECKING:
    _TrainerBase = Trainer
else:
    _TrainerBase = object


class MoELoRATrainerMixin(_TrainerBase):
    """The changes of ``MoELoRATrainer`` (see the module docstring), for any ``transformers.Trainer``
    subclass: list it first, ``class MyTrainer(MoELoRATrainerMixin, SomeTrainer)``.

    Args:
        *args, **kwargs: the Trainer's.
        router_lr: the routers' learning rate (default: Trainer's ``learning_rate``); the paper keeps it
            hundreds of times lower than the experts'.
        router_max_grad_norm: clip the routers' joint gradient norm to this (``None``: no clipping).
        preconditioner: ``"riemannian"`` (the paper's, default), ``"gate_rescaled"`` or ``"none"``.
    """

    def __init__(self, *args: Any, router_lr: float | None = None, router_max_grad_norm: float | None = 1.0,
                 preconditioner: Preconditioner = "riemannian", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _wrapped(self.model)  # a clear error before any step
        self.router_lr, self.router_max_grad_norm, self.preconditioner = router_lr, router_max_grad_norm, preconditioner
        if self.args.max_grad_norm:
            logger.warning(
                "MoELoRATrainer: TrainingArguments.max_grad_norm=%g would clip the experts and the routers "
                "together; the method clips the routers alone (router_max_grad_norm=%s, in the optimizer) and "
                "leaves the expert gradients to the preconditioner, so Trainer's clipping is turned off",
                self.args.max_grad_norm, router_max_grad_norm,
            )
            self.args.max_grad_norm = 0.0

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            from ..optim import RiemannianAdamW, param_groups

            args = self.args
            groups = param_groups(_wrapped(model or self.model), lr=args.learning_rate, router_lr=self.router_lr,
                                  weight_decay=args.weight_decay, router_max_grad_norm=self.router_max_grad_norm)
            self.optimizer = RiemannianAdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                             eps=args.adam_epsilon, weight_decay=args.weight_decay,
                                             preconditioner=self.preconditioner)
        return self.optimizer

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The adapter (and the tokenizer or processor) instead of the whole model."""
        output_dir = output_dir if output_dir is not None else str(self.args.output_dir)
        save_adapter(_wrapped(self.model), output_dir)  # a collective for sharded experts; process 0 writes
        if not self.args.should_save:
            return
        tokenizer = self.processing_class or getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        logger.info("loading the adapter of checkpoint %s", resume_from_checkpoint)
        load_adapter_weights(_wrapped(model or self.model), resume_from_checkpoint)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best is None or not os.path.isdir(best):
            raise ConfigError(f"no best checkpoint to load ({best!r})")
        logger.info("loading the best adapter from %s (score %s)", best, self.state.best_metric)
        load_adapter_weights(_wrapped(self.model), best)


class MoELoRATrainer(MoELoRATrainerMixin, Trainer):
    """``transformers.Trainer`` for a moelora-wrapped model (see the module docstring and
    ``MoELoRATrainerMixin`` for the extra arguments ``router_lr``, ``router_max_grad_norm``,
    ``preconditioner``)."""
