"""Instruction-tune a chat model with MoE-LoRA experts inside ``transformers.Trainer``, then talk to it.

    python examples/chat_hf_trainer.py                  # tiny random Llama, in-memory chats, seconds on a CPU
    python examples/chat_hf_trainer.py --model models/SmolLM2-1.7B-Instruct --data chats.jsonl --steps 500 --bf16

The library's public pieces do the chat part: ``parse_conversation`` / ``chat_example`` turn rows into
conversations, ``ChatCollator`` renders them with the tokenizer's chat template (or the ChatML fallback),
labels the assistant tokens only and pads or packs the batch, and ``Generator`` answers through the same
template. ``Trainer`` runs the loop; ``moelora`` supplies the adapter and its optimizer.
"""

from __future__ import annotations

import argparse
import random
import sys

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

import moelora
from moelora.finetune.base_models import load_model_and_tokenizer
from moelora.finetune.data import ChatCollator, Example, chat_example
from moelora.finetune.data.chat import read_conversations
from moelora.finetune.generate import Generator, SamplingOptions
from moelora.optim import RiemannianAdamW, param_groups


def tiny_chats(n: int = 64, seed: int = 0) -> list[Example]:
    """Small conversations held in memory: the assistant repeats a word, then says it in capitals."""
    words = ["cat", "dog", "sun", "tree", "book", "fish"]
    rng = random.Random(seed)
    chats = []
    for _ in range(n):
        word = rng.choice(words)
        chats.append(chat_example([
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": f"Repeat: {word}"}, {"role": "assistant", "content": word},
            {"role": "user", "content": "Louder."}, {"role": "assistant", "content": word.upper()},
        ]))
    return chats


class LossHistory(TrainerCallback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


def main(model_path: str | None = None, data: str | None = None, out_dir: str = "runs/examples/chat_hf_trainer",
         steps: int = 30, batch_size: int = 8, lr: float | None = None, packing: bool = False,
         train_on: str = "all", seed: int = 0, bf16: bool = False) -> dict:
    """Train, save the adapter, and answer one question with the trained model; returns the losses and
    the reply."""
    tiny = model_path is None
    if tiny:  # 5x the usual init, so that a random LM head can become confident within a few steps
        model, tokenizer = load_model_and_tokenizer("random-llama", random_config={"initializer_range": 0.1}, seed=seed)
    else:
        model, tokenizer = load_model_and_tokenizer(model_path, dtype="bfloat16")
    chats = tiny_chats(seed=seed) if data is None else [chat_example(m) for m in read_conversations(data)]
    # The random model's tokenizer has no chat template: choose the documented ChatML fallback for it.
    collator = ChatCollator(tokenizer, max_length=256, chat_template="chatml" if tiny else None,
                            train_on=train_on, packing=packing)  # type: ignore[arg-type]

    moelora.wrap(model, moelora.MoELoRAConfig(num_experts=8, top_k=2, rank=4, alpha=16, dropout=0.0,
                                              target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                              gate_backward_power=0.5))
    lr = lr or (1e-2 if tiny else 2e-4)
    opt = RiemannianAdamW(param_groups(model, lr=lr, router_lr=lr / 10, router_max_grad_norm=1.0), lr=lr)
    args = TrainingArguments(
        output_dir=out_dir, max_steps=steps, per_device_train_batch_size=batch_size,
        max_grad_norm=0,  # the routers are clipped inside the optimizer; experts must reach it unclipped
        bf16=bf16, remove_unused_columns=False, logging_steps=1, save_strategy="no", report_to="none",
        seed=seed, use_cpu=tiny, dataloader_num_workers=0, disable_tqdm=tiny,
    )
    history = LossHistory()
    Trainer(model=model, args=args, train_dataset=chats, data_collator=collator, optimizers=(opt, None),
            callbacks=[history]).train()
    moelora.save_adapter(model, out_dir)

    model.eval()
    question = [*chats[0].messages[:2]]  # system + first user turn
    print(f"user> {question[-1]['content']}\nassistant> ", end="")
    reply = Generator(model, tokenizer, collator.template).reply(question, SamplingOptions(max_new_tokens=8),
                                                                 stream=sys.stdout)
    return {"losses": history.losses, "reply": reply, "expected": chats[0].messages[2]["content"]}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", dest="model_path", help="local Hugging Face chat model folder")
    parser.add_argument("--data", help="a JSONL / JSON file of conversations (messages, ShareGPT, Alpaca rows)")
    parser.add_argument("--out-dir", default="runs/examples/chat_hf_trainer")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--packing", action="store_true", help="pack each batch's conversations into rows")
    parser.add_argument("--train-on", choices=["all", "last"], default="all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", action="store_true")
    torch.manual_seed(0)
    main(**vars(parser.parse_args()))
