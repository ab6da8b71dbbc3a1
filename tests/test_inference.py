"""The inference path (eval mode, no gradients) against the training path: same outputs, same greedy text."""

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import moelora
from moelora import MoELoRALinear


def layer(d_in=48, d_out=40, experts=6, top_k=3, rank=4, bias=True, compute="auto", seed=0):
    torch.manual_seed(seed)
    lin = MoELoRALinear(nn.Linear(d_in, d_out, bias=bias), num_experts=experts, top_k=top_k, rank=rank, alpha=8,
                        expert_compute=compute)
    with torch.no_grad():
        lin.lora_B.normal_(0, 0.1)
        lin.router.weight.normal_(0, 0.5)
    return lin.eval()


def training_path(module, x):
    with torch.enable_grad():  # gradients on: the autograd path, whatever the mode
        return module(x).detach()


@pytest.mark.parametrize("tokens", [1, 4, 8, 33])  # 2 and 8 rows: on a CPU the decode kernel; more: the GEMMs
@pytest.mark.parametrize("bias", [True, False])
def test_dense_inference_equals_the_training_path(tokens, bias):
    lin = layer(bias=bias)
    x = torch.randn(2, tokens, 48)
    expected = training_path(lin, x)
    with torch.no_grad():
        got = lin(x)
    assert not got.requires_grad
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    with torch.inference_mode():
        torch.testing.assert_close(lin(x), expected, rtol=1e-6, atol=1e-6)


def test_inference_under_bf16_autocast_is_within_bf16_tolerance():
    lin = layer()
    x = torch.randn(4, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = training_path(lin, x)
        with torch.no_grad():
            got = lin(x)
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("tokens", [1, 8, 200])  # gathered experts for few tokens, grouped GEMMs for many
def test_sparse_inference_equals_the_training_path(tokens):
    lin = layer(d_in=64, d_out=64, experts=64, top_k=2, rank=4, compute="sparse")
    x = torch.randn(tokens, 64)
    expected = training_path(lin, x)
    with torch.no_grad():
        torch.testing.assert_close(lin(x), expected, rtol=1e-5, atol=1e-6)


def test_no_statistics_are_recorded_and_the_conv1d_base_works():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    lin = MoELoRALinear(Conv1D(40, 48), num_experts=6, top_k=3, rank=4, alpha=8).eval()
    with torch.no_grad():
        lin.lora_B.normal_(0, 0.1)
    x = torch.randn(5, 48)
    expected = training_path(lin, x)
    before = lin.gate_sq_sum.clone(), lin.gate_token_count.clone()
    with torch.no_grad():
        torch.testing.assert_close(lin(x), expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(lin.gate_sq_sum, before[0]) and torch.equal(lin.gate_token_count, before[1])


def test_a_changed_parameter_takes_effect_after_eval():
    lin = layer()
    x = torch.randn(3, 48)
    with torch.no_grad():
        first = lin(x)
        lin.lora_B.add_(0.5)            # in place, after .eval(): the version counter moves
        second = lin(x)
    assert not torch.allclose(first, second)
    torch.testing.assert_close(second, training_path(lin, x), rtol=1e-6, atol=1e-6)
    state = {k: v.clone() for k, v in lin.state_dict().items()}
    state["router.weight"].normal_()
    lin.load_state_dict(state)          # copy_ into the parameters
    with torch.no_grad():
        torch.testing.assert_close(lin(x), training_path(lin, x), rtol=1e-6, atol=1e-6)
    lin.lora_A.data.mul_(2)             # invisible to the version counter: a mode change drops the cache
    lin.eval()
    with torch.no_grad():
        torch.testing.assert_close(lin(x), training_path(lin, x), rtol=1e-6, atol=1e-6)
    lin.lora_A.data = lin.lora_A.data.clone() * 0.5  # a new storage
    with torch.no_grad():
        torch.testing.assert_close(lin(x), training_path(lin, x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("compute", ["dense", "sparse"])
def test_greedy_generations_are_identical(compute):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256)).eval()
    config = moelora.MoELoRAConfig(num_experts=64 if compute == "sparse" else 8, top_k=2, rank=4, dropout=0.0,
                                   expert_compute=compute)
    moelora.wrap(model, config)
    with torch.no_grad():
        for _, lin in moelora.moelora_layers(model):
            lin.lora_B.normal_(0, 0.2)
    prompt = torch.randint(0, 256, (3, 7))
    fast = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False)
    for _, lin in moelora.moelora_layers(model):
        lin.inference_path = False
    slow = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False)
    assert torch.equal(fast, slow)
