"""Bases quantised by other libraries (torchao, HQQ, quanto) wrap and train through their own forward.

These libraries live outside the main test environment (HQQ changes what ``import transformers`` does):
``make test-quant-libs`` runs this file in a virtual environment of its own. Where a library is not
installed its tests are skipped, naming the package.
"""

import pytest
import torch
from torch import nn

import moelora
from moelora.optim import RiemannianAdamW, param_groups


def torchao_int8(linear: nn.Linear) -> tuple[nn.Module, torch.Tensor]:
    torchao = pytest.importorskip("torchao", reason="torchao is not installed")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    holder = nn.Sequential(linear)
    quantize_(holder, Int8WeightOnlyConfig())
    assert torchao and type(holder[0].weight) not in (torch.Tensor, nn.Parameter)  # a tensor subclass
    return holder[0], holder[0].weight.dequantize()


def hqq_4bit(linear: nn.Linear) -> tuple[nn.Module, torch.Tensor]:
    pytest.importorskip("hqq", reason="hqq is not installed")
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    module = HQQLinear(linear, BaseQuantizeConfig(nbits=4, group_size=32), compute_dtype=torch.float32,
                       device="cpu")
    assert getattr(module, "weight", None) is None  # no .weight at all
    return module, module.dequantize()


def quanto_int8(linear: nn.Linear) -> tuple[nn.Module, torch.Tensor]:
    pytest.importorskip("optimum.quanto", reason="optimum-quanto is not installed")
    from optimum.quanto import freeze, qint8, quantize

    holder = nn.Sequential(linear)
    quantize(holder, weights=qint8)
    freeze(holder)
    return holder[0], holder[0].weight.dequantize()


QUANTISERS = {"torchao-int8-weight-only": torchao_int8, "hqq-4bit": hqq_4bit, "quanto-int8": quanto_int8}


@pytest.mark.parametrize("name", QUANTISERS)
def test_the_layer_over_a_quantised_base_equals_the_layer_over_its_dequantised_weight(name):
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    bias = linear.bias.detach().clone()
    quantised, dense_weight = QUANTISERS[name](linear)
    reference = nn.Linear(64, 32)
    with torch.no_grad():
        reference.weight.copy_(dense_weight.float().reshape(32, 64))
        reference.bias.copy_(bias)
    outs = []
    for base in (quantised, reference):
        torch.manual_seed(1)
        layer = moelora.MoELoRALinear(base, 8, 2, 4, 8.0, gate_backward_power=0.5)
        with torch.no_grad():
            layer.lora_B.normal_()
        x = torch.randn(6, 64, generator=torch.Generator().manual_seed(2), requires_grad=True)
        out = layer(x)
        out.pow(2).sum().backward()
        outs.append((out, x.grad, layer.lora_A.grad, layer.lora_B.grad, layer.router.weight.grad))
        if base is quantised:
            assert not layer._base_is_fusable(x.detach())  # its own forward, never weight.t()
    for a, b in zip(*outs):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-3 * float(b.detach().abs().max()))


@pytest.mark.parametrize("name", QUANTISERS)
def test_a_model_with_quantised_projections_trains(name):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    for layer in model.model.layers:
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            quantised, _ = QUANTISERS[name](getattr(layer.self_attn, proj))
            setattr(layer.self_attn, proj, quantised)
    moelora.wrap(model, moelora.MoELoRAConfig(num_experts=4, top_k=2, rank=4, dropout=0.0, gate_backward_power=0.5))
    assert len(list(moelora.moelora_layers(model))) == 8
    from moelora.adapter import base_quantization

    recorded = base_quantization(model)  # what the adapter file records about the base
    assert recorded is not None and recorded.startswith(name.split("-")[0])
    opt = RiemannianAdamW(param_groups(model, lr=1e-2, router_lr=1e-3), preconditioner="riemannian")
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(3))
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
