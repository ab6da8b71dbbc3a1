"""Training steps in mixed precision and on a 4-bit base, against PEFT LoRA r=16 on the same base and batch.

A SmolLM2-135M-shaped Llama (30 layers, hidden 576, 9 heads / 3 KV heads, vocabulary 49,152) with random
weights, so that no model files are needed; a fixed batch of random token ids with the loss on the last
tokens of each row. Each setting times one optimizer step (forward, backward, update) of

- ``moelora``: the default adapter (E=20, top_k=10, r=4 on q/k/v/o, gate power 0.5) and ``RiemannianAdamW``;
- ``peft_lora_r16``: PEFT LoRA r=16 on q/k/v/o and ``torch.optim.AdamW``,

interleaved, in one run:

- ``bf16``: ``torch.autocast(bfloat16)`` around the forward pass, float32 adapters and optimizer state;
- ``nf4``: the base's linear layers quantised to NF4 with bitsandbytes (computing in bf16 under autocast),
  when bitsandbytes is installed (else reported as skipped).

    python -m moelora.bench.precision_bench [--quick] [--device cuda]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .timing import time_interleaved

# SmolLM2-135M's shape.
SMOLLM2_SHAPE: dict[str, Any] = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True)
BATCH, LENGTH, ANSWER = 8, 96, 4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def smollm2_shaped(seed: int = 0, device: torch.device | str = "cpu", layers: int | None = None) -> nn.Module:
    """A randomly initialised Llama of SmolLM2-135M's shape (``layers`` overrides the depth)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(SMOLLM2_SHAPE, **({"num_hidden_layers": layers} if layers else {}))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model: Any = LlamaForCausalLM(LlamaConfig(**shape))
    return model.to(device).requires_grad_(False)


def random_batch(device: torch.device | str, vocab: int = SMOLLM2_SHAPE["vocab_size"], seed: int = 1,
                 batch: int = BATCH, length: int = LENGTH) -> dict[str, torch.Tensor]:
    """Token ids and labels (the last ``ANSWER`` tokens of every row), drawn on the CPU."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, -ANSWER:] = ids[:, -ANSWER:]
    return {"input_ids": ids.to(device), "labels": labels.to(device)}


def candidate(kind: str, device: torch.device, quantization: str = "none", layers: int | None = None
              ) -> tuple[nn.Module, torch.optim.Optimizer]:
    """``(model, optimizer)`` of ``kind`` (``"moelora"`` or ``"peft_lora_r16"``) on the same random base."""
    import moelora
    from moelora.optim import RiemannianAdamW, param_groups

    model = smollm2_shaped(device=device, layers=layers)
    if quantization != "none":
        from ..finetune.quantization import quantize_linears

        quantize_linears(model, quantization, torch.bfloat16, device)
    if kind == "moelora":
        moelora.wrap(model, moelora.MoELoRAConfig(num_experts=20, top_k=10, rank=4, alpha=16.0, dropout=0.05,
                                                  target_modules=TARGETS, gate_backward_power=0.5))
        optimizer: torch.optim.Optimizer = RiemannianAdamW(
            param_groups(model, lr=1e-4, router_lr=3e-8, router_max_grad_norm=1.0), preconditioner="riemannian")
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model.train(), optimizer


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
                  autocast_dtype: torch.dtype | None) -> Callable[[], float]:
    """One step (forward under autocast when ``autocast_dtype`` is set, backward, update); returns the loss."""
    device_type = batch["input_ids"].device.type

    def step() -> float:
        context = (torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype is not None
                   else contextlib.nullcontext())
        with context:
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def compare(device: torch.device, quantization: str, quick: bool, layers: int | None = None,
            autocast_dtype: torch.dtype | None = torch.bfloat16) -> dict[str, Any]:
    """Interleaved steps of both candidates on the same base (quantised or not), under autocast to
    ``autocast_dtype`` (None: float32 throughout)."""
    batch = random_batch(device)
    steps = {kind: training_step(*candidate(kind, device, quantization, layers), batch, autocast_dtype)
             for kind in ("moelora", "peft_lora_r16")}
    losses = {kind: step() for kind, step in steps.items()}  # a first step, also checks the loss is finite
    timing = time_interleaved(steps, repeats=4 if quick else 10, warmup=1)
    return {"first_loss": losses, "timings": timing.as_dict(),
            "cost_vs_peft_lora": timing.ratio("moelora", "peft_lora_r16")}


def run(quick: bool = False, device: str | torch.device = "cpu", layers: int | None = None) -> dict[str, Any]:
    device = torch.device(device)
    result: dict[str, Any] = {"device": str(device), "batch": [BATCH, LENGTH], "bf16": compare(device, "none", quick, layers)}
    if importlib.util.find_spec("bitsandbytes") is None:
        result["nf4"] = {"skipped": "bitsandbytes is not installed"}
    else:
        result["nf4"] = compare(device, "nf4", quick, layers)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(json.dumps(run(args.quick, args.device), indent=2))


if __name__ == "__main__":
    main()
