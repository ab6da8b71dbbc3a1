"""The task side of a run: data, tokenised once; training batches; held-out evaluation."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

from .base_models import is_encoder
from .data import IGNORE_INDEX, CausalLMCollator, EncoderCollator, Example, TaskData, load_task
from .data.chat import ConversationTooLongError, EncodedConversation
from .data.chat_collate import ChatCollator
from .data.image_collate import ImageCollator
from .errors import ConfigError
from .run_config import RunConfig

if TYPE_CHECKING:
    from .eval import EvalResult

logger = logging.getLogger(__name__)


@dataclass
class TaskRuntime:
    """Holds the task, the tokenizer and the pre-tokenised training set of one run."""

    config: RunConfig
    task: TaskData
    encoder: bool
    model: nn.Module | None = None
    tokenizer: Any = None
    _collator: Any = None
    _encoded: list[EncodedConversation] | None = None  # a generative task's training conversations
    skipped: int = 0  # training conversations left out: their last answer does not fit data.max_length

    @property
    def generative(self) -> bool:
        return self.task.kind == "generative"

    @property
    def images(self) -> bool:
        """An image task (``image_mc_file``): batches through the model's processor."""
        return self.task.info.get("modality") == "image"

    @classmethod
    def load(cls, config: RunConfig) -> TaskRuntime:
        data = config.data
        task = load_task(
            data.task, data_dir=data.path, seed=data.subset_seed, max_train=data.max_train,
            max_eval=data.max_eval, **data.options,
        )
        encoder = is_encoder(config.model.name)
        if task.kind == "generative" and encoder:
            raise ConfigError(f"task {task.name!r} is generative (conversations): train it with a causal language "
                              "model, not an encoder")
        if task.kind != "generative" and (data.packing or data.train_on != "all" or data.chat_template):
            raise ConfigError(f"data.packing, data.train_on and data.chat_template apply to generative tasks "
                              f"(chat_file, instruction_file, completion_file); {task.name!r} is {task.kind}")
        if task.kind == "regression" and not encoder:
            raise ConfigError(
                f"task {task.name!r} is a regression task; train it with an encoder (model.name: minilm)"
            )
        return cls(config=config, task=task, encoder=encoder)

    def attach(self, model: nn.Module, tokenizer: Any) -> None:
        self.model, self.tokenizer = model, tokenizer
        data = self.config.data
        if self.encoder:
            self._collator = EncoderCollator(tokenizer, data.max_length)
        elif self.images:  # ``tokenizer`` is the vision-language model's processor
            self._collator = ImageCollator(tokenizer, data.max_length)
        elif self.generative:
            self._collator = ChatCollator(tokenizer, data.max_length, chat_template=data.chat_template,
                                          train_on=data.train_on, packing=data.packing)
        else:
            # Right padding: position ids stay 0..n-1 for every row and the answer follows its prompt.
            self._collator = CausalLMCollator(tokenizer, self.config.data.max_length, padding_side="right")

    def modules_to_save(self, model: nn.Module) -> list[str]:
        """What trains beside the experts: an encoder's new classification head (saved in the adapter)."""
        if not self.encoder:
            return []
        for name in ("classifier", "score"):
            if isinstance(getattr(model, name, None), nn.Module):
                return [name]
        raise ConfigError(f"{type(model).__name__} has no 'classifier' or 'score' head to train")

    def _training_conversations(self) -> list[EncodedConversation]:
        """The training conversations, rendered and labelled on first use; those whose last answer cannot
        fit are left out of ``task.train`` and counted (an error when none is left)."""
        if self._encoded is not None:
            return self._encoded
        assert self._collator is not None, "TaskRuntime.attach(model, tokenizer) first"
        kept, encoded = [], []
        for example in self.task.train:
            try:
                encoded.append(self._collator.encode(example))
                kept.append(example)
            except ConversationTooLongError:
                self.skipped += 1
        if self.skipped:
            logger.warning("%s: %d of %d training conversations are left out: their last answer does not fit "
                           "data.max_length=%d", self.task.name, self.skipped, len(self.task.train),
                           self.config.data.max_length)
        if not kept:
            raise ConfigError(f"no training conversation of {self.task.name!r} fits data.max_length="
                              f"{self.config.data.max_length}: raise it")
        self.task.train, self._encoded = kept, encoded
        return encoded

    # ------------------------------------------------------------------------------------ training data
    def train_lengths(self) -> list[int]:
        """Token lengths of the training sequences (characters for encoders), for length grouping."""
        if self.generative:
            return [len(e.input_ids) for e in self._training_conversations()]
        if self.encoder or self.images:  # characters: a size proxy that needs no tokenizer pass
            return [len(ex.text) + len(ex.text_pair or "") for ex in self.task.train]
        return self._collator.token_lengths(self.task.train)

    def collate_train(self, indices: list[int]) -> dict[str, Any]:
        """``{"inputs": loss-module kwargs, "n_targets": loss terms, "n_tokens": real tokens}``."""
        if self.generative:
            conversations = self._training_conversations()
            encoded = [conversations[i] for i in indices]
            inputs = self._collator.collate(encoded)
            n_targets = int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum())
            return {"inputs": inputs, "n_targets": n_targets, "n_tokens": sum(len(e.input_ids) for e in encoded)}
        inputs = self._collator([self.task.train[i] for i in indices])
        if self.encoder:
            n_targets = inputs["labels"].shape[0]
        else:
            n_targets = int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum())
        return {"inputs": inputs, "n_targets": n_targets, "n_tokens": int(inputs["attention_mask"].sum())}

    # ------------------------------------------------------------------------------------- evaluation
    def evaluate(self, examples: list[Example], progress: bool = False, label: str = "eval") -> EvalResult:
        """``moelora.finetune.eval.evaluate`` on ``examples`` with the run's settings."""
        from .eval import evaluate

        assert self.model is not None, "TaskRuntime.attach(model, tokenizer) first"
        method = "classifier" if self.encoder else "generate" if self.generative else self.config.eval.method
        data = self.config.data
        return evaluate(
            self.model, self.tokenizer, self.task, examples, method=method,
            batch_size=self.config.eval.batch_size, max_new_tokens=self.config.eval.max_new_tokens,
            max_length=data.max_length, progress=progress, desc=label, chat_template=data.chat_template,
            train_on=data.train_on,
        )

    def evaluate_test(self, progress: bool = True, label: str = "test") -> EvalResult:
        return self.evaluate(self.task.test, progress, label)

    def evaluate_validation(self, progress: bool = False) -> EvalResult:
        return self.evaluate(self.task.validation[: self.config.train.eval_examples], progress, "validation")
