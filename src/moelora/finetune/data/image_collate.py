"""Batches of image examples for a vision-language model, through the model's own processor.

``ImageCollator(processor, max_length)(examples)`` returns ``input_ids``, ``attention_mask``, ``labels``
(each ``(B, T)``, padded on the right) and ``pixel_values`` (the processor's image tensor). Each sequence is
the prompt (through the processor's chat template when it has one, ``image_prompt``), whose image
placeholder the processor expands into the image's tokens, then the answer
(``example.answer``); labels are ``-100`` except on the answer tokens. Prompt and answer are tokenized
apart, as ``CausalLMCollator`` does, so the labelled tokens are exactly the answer's. Image tokens are
never truncated: an example longer than ``max_length`` is an error that names it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .collate import IGNORE_INDEX, pad_batch, pad_token_id
from .errors import DataError
from .example import Example


def image_prompt(processor: Any, example: Example) -> str:
    """The text of an image example's prompt for ``processor``: through its chat template when it has one
    (one user turn holding the image and the question, then the generation prompt), else the example's own
    prompt with its ``<image>`` placeholder line."""
    template = getattr(processor, "chat_template", None)
    if not template:
        return example.prompt
    from .images import IMAGE_PLACEHOLDER

    question = example.prompt.removeprefix(f"{IMAGE_PLACEHOLDER}\n")
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)


def image_processor_of(processor: Any, model_name: str = "the model") -> Any:
    """The processor's image processor; ``DataError`` when it has none (a text-only tokenizer)."""
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None:
        raise DataError(f"{model_name} has no image processor (its processor is {type(processor).__name__}): an "
                        f"image task needs a vision-language model with one (AutoProcessor)")
    return image_processor


class ImageCollator:
    """See the module docstring. ``processor`` is e.g. a ``LlavaProcessor``; ``max_length`` counts image
    tokens too."""

    def __init__(self, processor: Any, max_length: int | None = None) -> None:
        image_processor_of(processor)
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.max_length = max_length
        self.pad_id = pad_token_id(self.tokenizer)

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        from ..vision import load_image

        if not examples:
            raise ValueError("cannot collate an empty batch")
        missing = [e.uid or e.prompt[:40] for e in examples if e.image is None]
        if missing:
            raise DataError(f"an image batch holds examples without an image: {missing[:3]}")
        # Option scoring repeats an example once per option: each distinct image is read once per batch.
        loaded = {path: load_image(path) for path in dict.fromkeys(e.image for e in examples if e.image is not None)}
        images = [loaded[e.image] for e in examples if e.image is not None]
        prompts = self.processor(text=[image_prompt(self.processor, e) for e in examples], images=images,
                                 padding=True, return_tensors="pt", add_special_tokens=False)
        prompt_ids = [ids[mask.bool()].tolist() for ids, mask in zip(prompts["input_ids"], prompts["attention_mask"])]
        answers = self.tokenizer([e.answer for e in examples], add_special_tokens=False)["input_ids"]
        sequences, labels = [], []
        for example, prompt, answer in zip(examples, prompt_ids, answers):
            if not answer:
                raise DataError(f"the answer {example.answer!r} tokenizes to no tokens")
            if self.max_length is not None and len(prompt) + len(answer) > self.max_length:
                raise DataError(
                    f"image example {example.uid or example.prompt[:40]!r} takes {len(prompt) + len(answer)} tokens "
                    f"with its image tokens, more than data.max_length={self.max_length} (image tokens are never "
                    f"truncated): raise data.max_length"
                )
            sequences.append(list(prompt) + list(answer))
            labels.append([IGNORE_INDEX] * len(prompt) + list(answer))
        batch = pad_batch(sequences, self.pad_id, padding_side="right", value_sequences=labels)
        batch.pop("position_ids")  # the model derives them; its image tokens sit inside the sequence
        batch["pixel_values"] = prompts["pixel_values"]
        return batch
