"""Vision-language models: a tiny random LLaVA for tests and smoke runs, the paper's target list, images.

- ``random_llava()``: a LLaVA built from a config — a tiny CLIP vision tower, a projector and a tiny Llama —
  with its processor (a CLIP image processor and a byte-level tokenizer that knows ``<image>``); no download.
- ``PAPER_VLM_TARGETS``: the attention projections of both towers that the paper's LLaVA runs adapt
  (``q_proj``, ``k_proj``, ``v_proj`` in both, ``out_proj`` in CLIP, ``o_proj`` in Llama).
- ``load_image(path)``: an RGB image read with Pillow, or a ``MalformedRowError`` naming the image path
  (missing, or not an image), which the data loaders locate at the data file and line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .base_models import RANDOM_LLAVA
from .data.errors import MalformedRowError

PAPER_VLM_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "out_proj"]
IMAGE_TOKEN = "<image>"


def random_llava(seed: int = 0, image_size: int = 28, patch_size: int = 14, hidden_size: int = 32,
                 layers: int = 2, initializer_range: float = 0.02) -> tuple[Any, Any]:
    """``(LlavaForConditionalGeneration, LlavaProcessor)``, tiny and random (see the module docstring).

    Each image becomes ``(image_size / patch_size) ** 2`` image tokens (4 by default) in the prompt. A larger
    ``initializer_range`` (0.1) gives a random LM head that can become confident within a few steps.
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from .base_models import byte_level_tokenizer

    tokenizer = byte_level_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_token = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    vision = CLIPVisionConfig(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=layers,
                              num_attention_heads=2, image_size=image_size, patch_size=patch_size,
                              projection_dim=hidden_size)
    text = LlamaConfig(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=layers,
                       num_attention_heads=2, num_key_value_heads=1, vocab_size=len(tokenizer),
                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                       max_position_embeddings=512, initializer_range=initializer_range)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token,
                         vision_feature_layer=-1, vision_feature_select_strategy="default")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config).eval()
    model.config.name_or_path = RANDOM_LLAVA
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                              crop_size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer, patch_size=patch_size, vision_feature_select_strategy="default", image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,  # the CLS token, which "default" drops again (as LLaVA-1.5)
    )
    return model, processor


def load_image(path: str | Path) -> Any:
    """The image at ``path`` as an RGB ``PIL.Image``; ``MalformedRowError`` when it is missing or unreadable."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise MalformedRowError(f"image {path} does not exist")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise MalformedRowError(f"image {path} cannot be read as an image ({err})") from None
