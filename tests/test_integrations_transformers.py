"""MoELoRATrainer: adapter-only checkpoints that resume exactly, the method's optimizer, Trainer's clipping off."""

import logging

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

import moelora
from moelora.finetune.base_models import load_model_and_tokenizer
from moelora.finetune.data import CausalLMCollator, Example
from moelora.integrations.transformers import MoELoRATrainer
from moelora.optim import RiemannianAdamW

RANDOM = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "initializer_range": 0.1}


def examples(n=48):
    words = ["great", "dull", "superb", "flat", "clever", "tedious"]
    return [Example(prompt=f"Review: a {words[i % 6]} film.\nSentiment:", options=(" positive", " negative"),
                    label=(i % 6) % 2, text=words[i % 6]) for i in range(n)]


def wrapped_model():
    model, tokenizer = load_model_and_tokenizer("random-llama", random_config=RANDOM, seed=0)
    torch.manual_seed(1)
    moelora.wrap(model, moelora.MoELoRAConfig(num_experts=4, top_k=2, rank=4, dropout=0.0, gate_backward_power=0.5))
    return model, tokenizer


def arguments(out, steps=6, **extra):
    return TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2,
                             logging_steps=1, save_strategy="steps", save_steps=3, report_to="none", use_cpu=True,
                             seed=0, dataloader_num_workers=0, disable_tqdm=True, remove_unused_columns=False, **extra)


def trainer(out, steps=6, **extra):
    model, tokenizer = wrapped_model()
    return MoELoRATrainer(model=model, args=arguments(out, steps, **extra), train_dataset=examples(),
                          data_collator=CausalLMCollator(tokenizer, max_length=64), router_lr=1e-3)


def test_checkpoints_hold_the_adapter_and_resume_exactly(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="moelora.integrations.transformers"):
        full = trainer(tmp_path / "full")
    assert "Trainer's clipping is turned off" in caplog.text and full.args.max_grad_norm == 0
    full.train()
    assert isinstance(full.optimizer.optimizer, RiemannianAdamW)  # inside accelerate's wrapper
    checkpoint = tmp_path / "full" / "checkpoint-3"
    names = {p.name for p in checkpoint.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "optimizer.pt", "trainer_state.json"} <= names
    assert not names & {"model.safetensors", "pytorch_model.bin"}

    resumed = trainer(tmp_path / "resumed")
    import shutil

    shutil.copytree(checkpoint, tmp_path / "resumed" / "checkpoint-3")
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-3"))
    a = load_file(str(tmp_path / "full" / "checkpoint-6" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "checkpoint-6" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0)
    # the saved adapter loads into a fresh base and reproduces the trained model
    base, tokenizer = load_model_and_tokenizer("random-llama", random_config=RANDOM, seed=0)
    moelora.load_adapter(base, tmp_path / "full" / "checkpoint-6")
    batch = CausalLMCollator(tokenizer)(examples(4))
    batch.pop("labels")
    with torch.no_grad():
        torch.testing.assert_close(base.eval()(**batch).logits, full.model.eval()(**batch).logits)


def test_plain_trainer_checkpointing_refuses_and_names_the_way_out(tmp_path):
    model, tokenizer = wrapped_model()
    plain = Trainer(model=model, args=arguments(tmp_path, steps=3), train_dataset=examples(),
                    data_collator=CausalLMCollator(tokenizer, max_length=64))
    with pytest.raises(moelora.AdapterError, match=r"moelora\.save_adapter.*MoELoRATrainer"):
        plain.train()


def test_an_unwrapped_model_is_refused(tmp_path):
    model, tokenizer = load_model_and_tokenizer("random-llama", random_config=RANDOM)
    with pytest.raises(moelora.ConfigError, match="moelora.wrap"):
        MoELoRATrainer(model=model, args=arguments(tmp_path), train_dataset=examples(),
                       data_collator=CausalLMCollator(tokenizer))
