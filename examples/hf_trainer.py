"""Fine-tune a causal language model with MoE-LoRA experts inside ``transformers.Trainer``.

    python examples/hf_trainer.py                     # tiny random Llama, in-memory data, a few seconds on a CPU
    python examples/hf_trainer.py --model models/Llama-3.2-3B --task scienceqa --data-dir data/scienceqa \
        --steps 2000 --batch-size 8 --grad-accum 10 --optimizer adamw --lr 1e-5 --bf16

``Trainer`` runs the loop (devices, gradient accumulation, logging, mixed precision, launchers);
``moelora`` supplies the adapter (``moelora.wrap``), the optimizer (``RiemannianAdamW`` or
``RiemannianSGD`` over ``moelora.optim.param_groups``, handed to ``Trainer`` through ``optimizers=``)
and the adapter files (``moelora.save_adapter`` / ``moelora.load_adapter``).
"""

from __future__ import annotations

import argparse
import random

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

import moelora
from moelora.finetune.base_models import load_model_and_tokenizer
from moelora.finetune.data import CausalLMCollator, Example, load_task
from moelora.optim import RiemannianAdamW, RiemannianSGD, param_groups


def load_base(model_path: str | None, seed: int = 0):
    """``(model, tokenizer)``: a local Hugging Face folder (bf16), or a tiny random Llama when ``model_path`` is None."""
    if model_path is None:
        # 5x the usual init: at 0.02 a random LM head is too weak to ever make confident predictions, and
        # the loss of a tiny run would hardly move.
        return load_model_and_tokenizer("random-llama", random_config={"initializer_range": 0.1}, seed=seed)
    model, tokenizer = load_model_and_tokenizer(model_path, dtype="bfloat16")
    return model, tokenizer


def tiny_examples(n: int = 64, seed: int = 0) -> list[Example]:
    """A small sentiment task held in memory: the answer is " positive" or " negative"."""
    good, bad = ["great", "moving", "superb", "charming", "clever"], ["dull", "clumsy", "tedious", "awful", "flat"]
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        label = rng.randrange(2)
        word = rng.choice(bad if label else good)
        text = f"A {word} film."
        examples.append(Example(prompt=f"Review: {text}\nSentiment:", options=(" positive", " negative"),
                                label=label, text=text))
    return examples


class LossHistory(TrainerCallback):
    """Keeps the training losses ``Trainer`` logs (every ``logging_steps`` steps)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


def main(model_path: str | None = None, task: str | None = None, data_dir: str | None = None,
         out_dir: str = "runs/examples/hf_trainer", steps: int = 30, batch_size: int = 8, grad_accum: int = 1,
         optimizer: str = "adamw", lr: float | None = None, router_lr: float | None = None,
         preconditioner: str = "riemannian", gate_power: float = 0.5, seed: int = 0, bf16: bool = False) -> dict:
    """Train with ``Trainer``, save the adapter, load it back into the base model and compare logits.

    ``batch_size`` is per device and per micro-batch (``Trainer``'s convention); one optimizer step sees
    ``batch_size * grad_accum * devices`` sequences. ``bf16`` runs the forward pass under bf16 autocast
    (``TrainingArguments(bf16=True)``); the adapters and the optimizer state stay in float32. Learning
    rates default to the paper's for a real model (experts 1e-5 AdamW / 3e-5 SGD, routers 3e-8) and to larger ones for the tiny random model.
    """
    tiny = model_path is None
    lr = lr or (1e-2 if tiny else {"adamw": 1e-5, "sgd": 3e-5}[optimizer])
    router_lr = router_lr or (1e-3 if tiny else 3e-8)
    model, tokenizer = load_base(model_path, seed)
    train = tiny_examples(seed=seed) if task is None else load_task(task, data_dir=data_dir).train

    moelora.wrap(model, moelora.MoELoRAConfig(num_experts=20, top_k=10, rank=4, alpha=16, dropout=0.05,
                                              target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                              gate_backward_power=gate_power))  # 0.5: the paper's method
    # The routers are clipped (joint norm over all routers, 1.0 as in the paper) inside the optimizer.
    groups = param_groups(model, lr=lr, router_lr=router_lr, router_max_grad_norm=1.0)
    if optimizer == "adamw":  # the paper's code also used bias_correction=False, eps=1e-6, b_from_updated_a=True
        opt = RiemannianAdamW(groups, lr=lr, weight_decay=0.0, preconditioner=preconditioner)
    else:
        opt = RiemannianSGD(groups, lr=lr, preconditioner=preconditioner)
    # The paper's schedule: no warm-up, linear decay to 0.1x of the peak. Trainer steps it once per
    # optimizer step.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 - 0.9 * step / steps)

    args = TrainingArguments(
        output_dir=out_dir,
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        # Trainer would clip the joint norm of every trainable tensor (experts and routers together) to
        # 1.0 by default. The method clips the routers alone, which the optimizer above already does,
        # and expert gradients must reach the preconditioner unclipped: turn Trainer's clipping off.
        max_grad_norm=0,
        bf16=bf16,
        # Our collator turns Example objects into batches; Trainer must not drop their "unused" fields.
        remove_unused_columns=False,
        logging_steps=1,
        save_strategy="no",  # the adapter is saved with moelora.save_adapter below
        report_to="none",
        seed=seed,
        use_cpu=tiny,
        dataloader_num_workers=0,
        disable_tqdm=tiny,
    )
    history = LossHistory()
    trainer = Trainer(model=model, args=args, train_dataset=train,
                      data_collator=CausalLMCollator(tokenizer, max_length=512),
                      optimizers=(opt, sched), callbacks=[history])
    trainer.train()

    moelora.save_adapter(model, out_dir)  # adapter_config.json + adapter_model.safetensors
    model.eval()
    device = next(model.parameters()).device
    probe = {k: v.to(device) for k, v in CausalLMCollator(tokenizer)(train[:4]).items() if k != "labels"}
    with torch.no_grad():
        trained = model(**probe).logits.float()
        moelora.unwrap(model)  # back to the plain base model
        moelora.load_adapter(model, out_dir)  # raises a clear error if the base model does not match
        model.eval()
        same = torch.allclose(model(**probe).logits.float(), trained, atol=1e-4)
    print(f"adapter saved to {out_dir}; reloaded into the base model: {'same' if same else 'DIFFERENT'} logits")
    return {"losses": history.losses, "adapter_dir": out_dir, "reload_matches": same}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", dest="model_path",
                        help="local Hugging Face model folder (default: a tiny random Llama)")
    parser.add_argument("--task", help="a moelora.finetune.data task name, e.g. scienceqa (default: tiny in-memory data)")
    parser.add_argument("--data-dir", help="folder of the task's files")
    parser.add_argument("--out-dir", default="runs/examples/hf_trainer")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per device and micro-batch")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--router-lr", type=float)
    parser.add_argument("--preconditioner", choices=["riemannian", "gate_rescaled", "none"], default="riemannian")
    parser.add_argument("--gate-power", type=float, default=0.5, help="1.0: per-expert baseline, 0.5: the paper")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (float32 adapters and optimizer state)")
    main(**vars(parser.parse_args()))
