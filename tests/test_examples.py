"""The scripts in examples/ run end to end on their tiny default (random Llama, in-memory data)."""

import importlib.util
from pathlib import Path

import pytest
import torch

import moelora

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["plain_pytorch", "hf_trainer"])
def test_example_trains_saves_and_reloads(name, tmp_path):
    out = tmp_path / "adapter"
    result = _load(name).main(out_dir=str(out), steps=20)

    losses = result["losses"]
    assert len(losses) == 20 and all(map(torch.isfinite, torch.tensor(losses)))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, f"loss did not go down: {losses}"

    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    config, meta = moelora.read_adapter_config(out)
    assert (config.num_experts, config.top_k, config.rank, config.gate_backward_power) == (20, 10, 4, 0.5)
    assert meta["base_model"]["class_name"] == "LlamaForCausalLM"
    assert result["reload_matches"], "the reloaded adapter does not reproduce the trained model's logits"


def test_example_other_variants_run(tmp_path):
    """SGD with the gate-rescaled preconditioner and the plain backward (the derived variant)."""
    result = _load("plain_pytorch").main(out_dir=str(tmp_path / "a"), steps=4, optimizer="sgd",
                                         preconditioner="gate_rescaled", gate_power=1.0)
    assert len(result["losses"]) == 4 and all(map(torch.isfinite, torch.tensor(result["losses"])))
    assert result["reload_matches"]
    assert moelora.read_adapter_config(tmp_path / "a")[0].gate_backward_power == 1.0


def test_hf_trainer_with_bf16_autocast(tmp_path):
    """transformers.Trainer(bf16=True) with RiemannianAdamW: bf16 autocast, float32 adapters."""
    result = _load("hf_trainer").main(out_dir=str(tmp_path / "bf16"), steps=12, bf16=True)
    losses = result["losses"]
    assert len(losses) == 12 and all(map(torch.isfinite, torch.tensor(losses)))
    assert sum(losses[-4:]) / 4 < 0.9 * sum(losses[:4]) / 4, f"loss did not go down: {losses}"
    config, _ = moelora.read_adapter_config(tmp_path / "bf16")
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(str(tmp_path / "bf16" / "adapter_model.safetensors")).values()} == {torch.float32}
    assert result["reload_matches"]


@pytest.mark.parametrize("packing", [False, True])
def test_chat_example_trains_with_transformers_trainer(tmp_path, packing):
    """ChatCollator as Trainer's data_collator (padded and packed); Generator answers through the template."""
    result = _load("chat_hf_trainer").main(out_dir=str(tmp_path / "chat"), steps=20, packing=packing)
    losses = result["losses"]
    assert len(losses) == 20 and all(map(torch.isfinite, torch.tensor(losses)))
    assert sum(losses[-4:]) / 4 < 0.6 * sum(losses[:4]) / 4, f"loss did not go down: {losses}"
    assert isinstance(result["reply"], str) and "<|im_end|>" not in result["reply"]
    assert moelora.read_adapter_config(tmp_path / "chat")[0].num_experts == 8


@pytest.mark.parametrize("bf16", [False, True])
def test_trl_sft_example(tmp_path, bf16):
    """TRL's SFTTrainer with MoELoRATrainerMixin, fp32 and bf16 autocast: adapter-only checkpoints."""
    result = _load("trl_sft").main(out_dir=str(tmp_path / "sft"), steps=12, bf16=bf16)
    losses = result["losses"]
    assert len(losses) == 12 and all(map(torch.isfinite, torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, f"loss did not go down: {losses}"
    checkpoint = tmp_path / "sft" / "checkpoint-6"
    assert (checkpoint / "adapter_model.safetensors").is_file() and not (checkpoint / "model.safetensors").exists()
    assert moelora.read_adapter_config(result["adapter_dir"])[0].num_experts == 8
