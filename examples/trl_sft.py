"""Supervised fine-tuning with TRL's ``SFTTrainer`` and MoE-LoRA experts.

    python examples/trl_sft.py              # tiny random Llama, in-memory chats, seconds on a CPU
    python examples/trl_sft.py --bf16       # bf16 autocast (float32 adapters and optimizer state)
    python examples/trl_sft.py --model models/SmolLM2-1.7B-Instruct --steps 500 --bf16

The model is wrapped by ``moelora.wrap`` before it reaches TRL (no ``peft_config``). ``MoELoRATrainerMixin``
gives ``SFTTrainer`` what a moelora model needs: adapter-only checkpoints that resume exactly, the method's
optimizer (``RiemannianAdamW`` with the routers at their own rate, clipped alone) and Trainer's joint
gradient clipping off. The data are TRL's conversational prompt-completion rows, so the loss is on the
assistant's answer only.
"""

from __future__ import annotations

import argparse
import random

import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

import moelora
from moelora.finetune.base_models import load_model_and_tokenizer
from moelora.finetune.data.chat import CHATML_TEMPLATE
from moelora.integrations.transformers import MoELoRATrainerMixin


class MoELoRASFTTrainer(MoELoRATrainerMixin, SFTTrainer):
    """TRL's SFTTrainer with moelora's checkpoints, optimizer and clipping."""


def tiny_rows(n: int = 64, seed: int = 0) -> list[dict]:
    words = ["cat", "dog", "sun", "tree", "book", "fish"]
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        word = rng.choice(words)
        rows.append({"prompt": [{"role": "user", "content": f"Say {word} in capitals."}],
                     "completion": [{"role": "assistant", "content": word.upper()}]})
    return rows


def main(model_path: str | None = None, out_dir: str = "runs/examples/trl_sft", steps: int = 20,
         batch_size: int = 8, lr: float | None = None, bf16: bool = False, seed: int = 0) -> dict:
    tiny = model_path is None
    if tiny:
        model, tokenizer = load_model_and_tokenizer("random-llama", random_config={"initializer_range": 0.1}, seed=seed)
        tokenizer.chat_template = CHATML_TEMPLATE  # the random model's tokenizer has none
    else:
        model, tokenizer = load_model_and_tokenizer(model_path, dtype="bfloat16")
    moelora.wrap(model, moelora.MoELoRAConfig(num_experts=8, top_k=2, rank=4, alpha=16, dropout=0.0,
                                              gate_backward_power=0.5))
    config = SFTConfig(
        output_dir=out_dir, max_steps=steps, per_device_train_batch_size=batch_size,
        learning_rate=lr or (1e-2 if tiny else 2e-4), logging_steps=1, save_strategy="steps",
        save_steps=max(1, steps // 2), report_to="none", bf16=bf16, use_cpu=tiny, seed=seed,
        dataloader_num_workers=0, disable_tqdm=tiny, max_length=128,
    )
    trainer = MoELoRASFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(tiny_rows(seed=seed)),
                                processing_class=tokenizer, router_lr=(lr or 1e-2) / 10)
    result = trainer.train()
    moelora.save_adapter(model, out_dir + "/adapter")
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"losses": losses, "train_loss": result.training_loss, "adapter_dir": out_dir + "/adapter"}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", dest="model_path", help="local Hugging Face chat model folder")
    parser.add_argument("--out-dir", default="runs/examples/trl_sft")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    torch.manual_seed(0)
    print(main(**vars(parser.parse_args())))
