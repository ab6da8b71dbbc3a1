import json
import os

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import moelora
from moelora import MoELoRAConfig, MoELoRALinear


def tiny_llama(seed=0, hidden=32, layers=2):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=96, hidden_size=hidden, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()


def config(**overrides):
    values = dict(num_experts=4, top_k=2, rank=2, alpha=4.0, dropout=0.0)
    values.update(overrides)
    return MoELoRAConfig(**values)


def randomise_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in moelora.moelora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
            layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=g))


IDS = torch.tensor([[1, 5, 9, 13, 17, 21], [2, 4, 6, 8, 10, 12]])


@pytest.mark.parametrize("factory,targets,expected", [
    (tiny_llama, ["q_proj", "k_proj", "v_proj", "o_proj"], 8),
    (tiny_gpt2, ["c_attn", "attn.c_proj"], 4),
])
def test_wrap_is_identity_at_init_and_unwrap_restores(factory, targets, expected):
    model = factory()
    originals = {n: m for n, m in model.named_modules()}
    before = model(IDS).logits
    moelora.wrap(model, config(target_modules=targets))
    layers = dict(moelora.moelora_layers(model))
    assert len(layers) == expected
    assert torch.equal(model(IDS).logits, before)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.split(".")[-1] in ("lora_A", "lora_B", "weight") for n in trainable)
    assert all(".router." in n or n.endswith(("lora_A", "lora_B")) for n in trainable)
    moelora.unwrap(model)
    assert not list(moelora.moelora_layers(model))
    for name, module in model.named_modules():
        assert module is originals[name]
    assert torch.equal(model(IDS).logits, before)


def test_regex_targets_and_exclusions():
    model = tiny_llama()
    moelora.wrap(model, config(target_modules=r".*layers\.0\.self_attn\.(q|v)_proj"))
    assert [n for n, _ in moelora.moelora_layers(model)] == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    model = tiny_llama()
    moelora.wrap(model, config(exclude_modules=["layers.1.self_attn.q_proj"]))
    names = [n for n, _ in moelora.moelora_layers(model)]
    assert len(names) == 7 and "model.layers.1.self_attn.q_proj" not in names


def test_wrap_without_match_lists_available_modules():
    with pytest.raises(ValueError, match=r"no module matched.*q_proj"):
        moelora.wrap(tiny_gpt2(), config(target_modules=["q_proj"]))
    model = tiny_llama()
    moelora.wrap(model, config())
    with pytest.raises(ValueError, match="already"):
        moelora.wrap(model, config())


def test_new_layers_follow_the_models_mode():
    model = tiny_llama().eval()
    moelora.wrap(model, config(dropout=0.1))
    assert not any(layer.training for _, layer in moelora.moelora_layers(model))
    model.train()
    assert all(layer.training for _, layer in moelora.moelora_layers(model))


def test_wrap_any_module():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    moelora.wrap(model, config(target_modules=["0", "2"]))
    assert isinstance(model[0], MoELoRALinear) and isinstance(model[2], MoELoRALinear)
    summary = moelora.summary(model)
    assert summary.trainable == 2 * (4 * 2 * 8) + 4 * 8 * 2 + 4 * 3 * 2 + 4 * 8 * 2
    assert summary.total == summary.trainable + 8 * 8 + 8 + 8 * 3 + 3
    assert "trainable params" in str(summary)


def test_training_step_reaches_adapters_only():
    model = tiny_llama()
    moelora.wrap(model, config(gate_backward_power=0.5))
    model.train()
    out = model(IDS, labels=IDS)
    out.loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name
    layer = next(layer for _, layer in moelora.moelora_layers(model))
    assert layer.gate_token_count.item() == IDS.numel()


@pytest.mark.parametrize("factory,targets", [(tiny_llama, ["q_proj", "v_proj"]), (tiny_gpt2, ["c_attn"])])
def test_generate_on_wrapped_model(factory, targets):
    model = factory()
    moelora.wrap(model, config(target_modules=targets))
    randomise_adapters(model)
    model.eval()
    out = model.generate(IDS[:1], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, IDS.shape[1] + 5)
    layer = next(layer for _, layer in moelora.moelora_layers(model))
    assert layer.gate_token_count.item() == 0  # generation leaves the statistics alone
    assert moelora.router_stats(model)  # but the diagnostics are readable


def test_save_load_round_trip_is_bit_exact(tmp_path):
    model = tiny_llama()
    moelora.wrap(model, config(gate_backward_power=0.5))
    randomise_adapters(model)
    expected = model(IDS).logits
    moelora.save_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["README.md", "adapter_config.json",
                                                                          "adapter_model.safetensors"]
    meta = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert meta["config"]["gate_backward_power"] == 0.5
    assert meta["base_model"]["class_name"] == "LlamaForCausalLM"
    assert meta["base_model"]["modules"]["model.layers.0.self_attn.k_proj"] == [32, 16]

    fresh = moelora.load_adapter(tiny_llama(), tmp_path / "adapter")
    for (name, a), (_, b) in zip(moelora.moelora_layers(model), moelora.moelora_layers(fresh)):
        for key in ("lora_A", "lora_B"):
            assert torch.equal(getattr(a, key), getattr(b, key)), name
        assert torch.equal(a.router.weight, b.router.weight)
    assert torch.equal(fresh(IDS).logits, expected)
    assert fresh.moelora_config == model.moelora_config


def test_load_into_mismatched_base_names_module_and_shapes(tmp_path):
    model = tiny_llama()
    moelora.wrap(model, config())
    moelora.save_adapter(model, tmp_path)
    other = tiny_llama(hidden=48)
    with pytest.raises(ValueError, match=r"module .model\.layers\.0\.self_attn\.q_proj.: the adapter expects \(d_in, d_out\) = \(32, 32\), the base model has \(48, 48\)"):
        moelora.load_adapter(other, tmp_path)
    assert not list(moelora.moelora_layers(other))  # a failed load leaves the model as it was
    with pytest.raises(ValueError, match="model.layers.2.self_attn.q_proj.*does not cover"):
        moelora.load_adapter(tiny_llama(layers=3), tmp_path)


def test_load_errors_on_missing_or_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        moelora.load_adapter(tiny_llama(), tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    with pytest.raises(ValueError, match="holds a PEFT adapter .* not a moelora one"):
        moelora.load_adapter(tiny_llama(), tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="not a moelora adapter"):
        moelora.load_adapter(tiny_llama(), tmp_path)


def test_save_leaves_no_temporary_files(tmp_path):
    model = tiny_llama()
    moelora.wrap(model, config())
    moelora.save_adapter(model, tmp_path)
    moelora.save_adapter(model, tmp_path)  # overwriting is atomic too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    umask = os.umask(0)
    os.umask(umask)
    for path in tmp_path.iterdir():  # ordinary permissions, not the temporary file's private ones
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    with pytest.raises(ValueError, match="wrap"):
        moelora.save_adapter(tiny_llama(), tmp_path / "x")


@pytest.mark.parametrize("field,value,message", [
    ("top_k", 5, r"top_k must satisfy 1 <= top_k <= num_experts \(= 4\)"),
    ("top_k", 0, "top_k"),
    ("num_experts", 0, "num_experts"),
    ("rank", 0, "rank"),
    ("rank", 2.5, "rank must be an integer"),
    ("dropout", 1.0, r"dropout must be in \[0, 1\)"),
    ("dropout", -0.1, "dropout"),
    ("gate_backward_power", 1.5, r"gate_backward_power must be in \[0, 1\]"),
    ("gate_backward_power", -0.5, "gate_backward_power"),
    ("target_modules", [], "target_modules must not be empty"),
    ("target_modules", "", "target_modules must not be empty"),
    ("target_modules", "(unclosed", "regular expression"),
    ("alpha", 0, "alpha"),
    ("router_init", "xavier", "router_init"),
])
def test_config_validation(field, value, message):
    with pytest.raises(ValueError, match=message):
        config(**{field: value})


def test_config_round_trip_and_unknown_keys():
    c = config(target_modules=["q_proj"], gate_backward_power=0.5)
    assert MoELoRAConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match=r"unknown MoELoRAConfig key\(s\) \['experts'\]; valid keys"):
        MoELoRAConfig.from_dict({"experts": 3})
