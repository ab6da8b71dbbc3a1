"""The task side of a run: data, tokenised once; training batches; held-out evaluation."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..data import Example, TaskData, load_task
from .config import RunConfig
from .loss import IGNORE_INDEX
from .models import is_encoder

logger = logging.getLogger(__name__)


@dataclass
class TaskRuntime:
    """Holds the task, the tokenizer and the pre-tokenised training set of one run."""

    config: RunConfig
    task: TaskData
    encoder: bool
    model: nn.Module | None = None
    tokenizer: Any = None
    _train_ids: list[tuple[list[int], list[int]]] = field(default_factory=list)

    @classmethod
    def load(cls, config: RunConfig) -> "TaskRuntime":
        data = config.data
        task = load_task(
            data.task, data_dir=data.path, seed=data.split_seed, max_train=data.max_train,
            max_eval=data.max_eval, **data.options,
        )
        encoder = is_encoder(config.model.name)
        if task.kind == "regression" and not encoder:
            raise ValueError(
                f"task {task.name!r} is a regression task; train it with an encoder (model.name: minilm)"
            )
        return cls(config=config, task=task, encoder=encoder)

    def attach(self, model: nn.Module, tokenizer: Any) -> None:
        self.model, self.tokenizer = model, tokenizer
        if not self.encoder:
            self._train_ids = [self._encode(ex) for ex in self.task.train]

    def after_wrap(self, model: nn.Module) -> None:
        """An encoder's new classification head trains with the adapters."""
        if self.encoder:
            head = getattr(model, "classifier", None) or getattr(model, "score", None)
            if head is None:
                raise ValueError(f"{type(model).__name__} has no 'classifier' or 'score' head to train")
            head.requires_grad_(True)

    # ------------------------------------------------------------------------------------ training data
    def _encode(self, example: Example) -> tuple[list[int], list[int]]:
        """Prompt and answer token ids, truncated from the left of the prompt to ``max_length``."""
        prompt = self.tokenizer(example.prompt, add_special_tokens=True)["input_ids"]
        answer = self.tokenizer(example.answer, add_special_tokens=False)["input_ids"]
        budget = self.config.data.max_length - len(answer)
        if budget < 1:
            raise ValueError(f"data.max_length ({self.config.data.max_length}) leaves no room for the prompt")
        return prompt[-budget:], answer

    def train_lengths(self) -> list[int]:
        if self.encoder:
            return [len(ex.text) + len(ex.text_pair or "") for ex in self.task.train]
        return [len(p) + len(a) for p, a in self._train_ids]

    def collate_train(self, indices: list[int]) -> dict[str, Any]:
        """``{"inputs": model kwargs, "n_targets": loss terms, "n_tokens": real tokens}`` for examples."""
        if self.encoder:
            examples = [self.task.train[i] for i in indices]
            pairs = [ex.text_pair for ex in examples]
            enc = self.tokenizer(
                [ex.text for ex in examples], pairs if any(p is not None for p in pairs) else None,
                truncation=True, max_length=self.config.data.max_length, padding=True, return_tensors="pt",
            )
            dtype = torch.float32 if self.task.kind == "regression" else torch.long
            labels = torch.tensor([ex.label for ex in examples], dtype=dtype)
            inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}
            if "token_type_ids" in enc:
                inputs["token_type_ids"] = enc["token_type_ids"]
            return {"inputs": inputs, "n_targets": len(examples), "n_tokens": int(enc["attention_mask"].sum())}
        rows = [self._train_ids[i] for i in indices]
        width = max(len(p) + len(a) for p, a in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for row, (prompt, answer) in enumerate(rows):
            n = len(prompt) + len(answer)
            input_ids[row, :n] = torch.tensor(prompt + answer)
            labels[row, len(prompt) : n] = torch.tensor(answer)  # by position, never by pad id
            attention[row, :n] = 1
        n_targets = sum(len(a) for _, a in rows)
        return {"inputs": {"input_ids": input_ids, "attention_mask": attention, "labels": labels},
                "n_targets": n_targets, "n_tokens": int(attention.sum())}

    # ------------------------------------------------------------------------------------- evaluation
    def _evaluate(self, examples: list[Example], progress: bool, label: str) -> dict[str, Any]:
        from ..eval import evaluate

        result = evaluate(
            self.model, self.tokenizer, self.task, examples, method="classifier" if self.encoder else self.config.eval.method,
            batch_size=self.config.eval.batch_size, max_new_tokens=self.config.eval.max_new_tokens,
            max_length=self.config.data.max_length, progress=progress, desc=label,
        )
        return result.to_dict()

    def evaluate_test(self, progress: bool = True, label: str = "test") -> dict[str, Any]:
        return self._evaluate(self.task.test, progress, label)

    def evaluate_validation(self, progress: bool = False) -> dict[str, Any]:
        return self._evaluate(self.task.validation[: self.config.train.eval_examples], progress, "validation")
