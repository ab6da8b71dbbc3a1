"""Generation speed: key/value-cache decoding and prompt prefill, base vs moelora vs PEFT LoRA r=16.

SmolLM2-135M-Instruct (bundled), the adapters on ``q/k/v/o_proj``: moelora's default (E=20, top_k=10,
r=4; non-zero experts, so that they take part) on its inference path, the same layers forced onto the
training path (``inference_path=False``, for reference), and PEFT LoRA r=16. Decoding is greedy, a fixed
``new_tokens`` per call (no early stop), after a short prompt; prefill is one forward pass over
``prompt_tokens`` tokens per row under ``torch.no_grad()``. Batch 1 and 8, interleaved, medians.

    python -m moelora.bench.generate_bench [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
from typing import Any

import torch

from .timing import time_interleaved


def _models(seed: int = 0) -> tuple[dict[str, Any], Any]:
    from peft import LoraConfig, get_peft_model

    import moelora
    from moelora.finetune.base_models import load_model_and_tokenizer

    base, tokenizer = load_model_and_tokenizer("smollm2-135m-instruct")
    base.eval()
    torch.manual_seed(seed)
    ours = moelora.wrap(copy.deepcopy(base), moelora.MoELoRAConfig(num_experts=20, top_k=10, rank=4, dropout=0.0))
    with torch.no_grad():
        for _, layer in moelora.moelora_layers(ours):
            layer.lora_B.normal_(0, 0.01)
    slow = copy.deepcopy(ours)
    for _, layer in moelora.moelora_layers(slow):
        layer.inference_path = False
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    models = {"base": base, "moelora": ours, "moelora_training_path": slow, "peft_lora_r16": peft.eval()}
    return models, tokenizer


def run(quick: bool = False, new_tokens: int = 32, prompt_tokens: int = 128, threads: int = 2) -> dict:
    torch.set_num_threads(threads)
    models, tokenizer = _models()
    vocab = tokenizer.vocab_size
    results: dict[str, Any] = {"new_tokens": new_tokens, "prompt_tokens": prompt_tokens, "threads": threads}
    generator = torch.Generator().manual_seed(0)
    for batch in (1, 8):
        prompt = torch.randint(0, vocab, (batch, 16), generator=generator)
        texts: dict[str, torch.Tensor] = {}

        def decode(name: str, prompt: torch.Tensor = prompt, texts: dict = texts):
            model = models[name]

            def call() -> None:
                with torch.no_grad():
                    texts[name] = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                                 do_sample=False, pad_token_id=0)
            return call

        timing = time_interleaved({name: decode(name) for name in models}, repeats=3 if quick else 7, warmup=1)
        results[f"decode_b{batch}"] = {
            **_ratios(timing, batch * new_tokens),
            "same_text_as_training_path": bool(torch.equal(texts["moelora"], texts["moelora_training_path"])),
        }
        long_prompt = torch.randint(0, vocab, (batch, prompt_tokens), generator=generator)

        def prefill(name: str, ids: torch.Tensor = long_prompt):
            model = models[name]

            def call() -> None:
                with torch.no_grad():
                    model(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=1)
            return call

        timing = time_interleaved({name: prefill(name) for name in models}, repeats=3 if quick else 7, warmup=1)
        results[f"prefill_b{batch}"] = _ratios(timing, batch * prompt_tokens)
    return results


def _ratios(timing: Any, tokens: int) -> dict[str, Any]:
    """Medians, tokens per second and moelora's ratios to the base, PEFT and its own training path."""
    return {
        "timings": timing.as_dict(),
        "tokens_per_s": {n: tokens / timing.median(n) for n in timing.samples},
        "cost_vs_peft_lora": timing.ratio("moelora", "peft_lora_r16"),
        "cost_vs_base": timing.ratio("moelora", "base"),
        "speedup_vs_training_path": timing.ratio("moelora_training_path", "moelora"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(json.dumps(run(quick=args.quick), indent=2))


if __name__ == "__main__":
    main()
