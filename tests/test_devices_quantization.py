"""Devices (``train.device``), precision (``train.precision``) and quantised bases (``model.quantization``)."""

import importlib.util
import json
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

import moelora
from moelora import ConfigError, MoELoRALinear
from moelora.finetune import cli
from moelora.finetune.devices import available_devices, check_precision, resolve_device
from moelora.finetune.run_config import load_config
from moelora.finetune.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
needs_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors of a machine without CUDA")
bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the smoke config names its data file relative to the repository


def smoke(tmp_path, *overrides, name="run"):
    return load_config(SMOKE, [f"output_dir={tmp_path / name}", "train.steps=3", "train.save_every=0",
                               "train.eval_every=0", "train.log_every=1", "data.max_eval=8",
                               "eval.zero_shot=false", *overrides])


# --- devices ----------------------------------------------------------------------------------------------

@needs_cuda
def test_auto_picks_the_cpu_without_cuda():
    assert resolve_device("auto") == torch.device("cpu") and "cpu" in available_devices()


@needs_cuda
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_a_missing_cuda_device_is_refused_listing_what_exists(name):
    with pytest.raises(ConfigError, match=rf"train.device={name}, but this machine has no CUDA device; available: cpu"):
        resolve_device(name)


@pytest.mark.parametrize("name", ["tpu", "cpu:1", "cuda:x", "gpu"])
def test_a_malformed_device_is_refused_when_the_config_loads(name):
    with pytest.raises(ConfigError, match="train.device must be auto, cpu, cuda, cuda:N or mps"):
        load_config(SMOKE, [f"train.device={name}"])


@needs_cuda
def test_cli_exits_2_for_a_device_this_machine_lacks(tmp_path, capsys):
    assert cli.main(["train", str(SMOKE), "--set", f"output_dir={tmp_path}/x", "--set", "train.device=cuda:1"]) == 2
    assert "available: cpu" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # refused before anything was written


def test_fp16_on_the_cpu_is_refused_before_loading(tmp_path, capsys):
    with pytest.raises(ConfigError, match="train.precision=fp16 needs a GPU"):
        check_precision("fp16", torch.device("cpu"))
    assert cli.main(["train", str(SMOKE), "--set", f"output_dir={tmp_path}/x", "--set", "train.precision=fp16",
                     "--set", "train.device=cpu"]) == 2
    assert not (tmp_path / "x").exists()


# --- precision ---------------------------------------------------------------------------------------------

def test_bf16_is_autocast_with_float32_master_weights(tmp_path):
    trainer = Trainer(smoke(tmp_path, "train.precision=bf16"), progress=False)
    seen = set()
    try:
        trainer.setup()
        hook = lambda module, args, out: seen.add((torch.is_autocast_enabled("cpu"), out.dtype))  # noqa: E731
        for _, layer in moelora.moelora_layers(trainer.model):
            layer.register_forward_hook(hook)
        trainer.fit()
        result = trainer.evaluate()
    finally:
        trainer.close()
    assert (True, torch.bfloat16) in seen and (False, torch.float32) not in seen  # training and evaluation
    # the model is not cast: the base keeps model.dtype, adapters and optimizer state are float32
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    state_dtypes = {t.dtype for s in trainer.optimizer.state.values() for t in s.values()
                    if isinstance(t, torch.Tensor) and t.is_floating_point()}
    assert state_dtypes == {torch.float32}
    assert result.test is not None and 0 <= result.test.value <= 1


# --- quantised bases -------------------------------------------------------------------------------------

def _dequantized_linear(module: nn.Module) -> nn.Linear:
    """The float ``nn.Linear`` a bitsandbytes layer computes with (the reference of the parity test)."""
    weight = module.weight
    if isinstance(module, bnb.nn.Linear4bit):
        dense = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    else:
        dense = weight.data.float() * (weight.SCB.float()[:, None] / 127.0)
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
    with torch.no_grad():
        linear.weight.copy_(dense.float())
        if module.bias is not None:
            linear.bias.copy_(module.bias.float())
    return linear


@pytest.mark.parametrize("scheme", ["nf4", "fp4", "int8"])
def test_the_layer_over_a_bitsandbytes_base_equals_the_layer_over_its_dequantised_weight(scheme):
    from moelora.finetune.quantization import quantize_linears

    torch.manual_seed(0)
    holder = nn.Sequential(nn.Linear(64, 32))
    quantize_linears(holder, scheme, torch.float32, torch.device("cpu"))
    quantised = holder[0]
    reference_base = _dequantized_linear(quantised)
    layers = []
    for base in (quantised, reference_base):
        torch.manual_seed(1)
        layer = MoELoRALinear(base, 8, 2, 4, 8.0, gate_backward_power=0.5)
        with torch.no_grad():
            layer.lora_B.normal_()
        layers.append(layer)
    assert not layers[0]._base_is_fusable(torch.zeros(1, 64)) and layers[1]._base_is_fusable(torch.zeros(1, 64))
    x = torch.randn(6, 64)
    outs = []
    for layer in layers:
        xi = x.clone().requires_grad_(True)
        out = layer(xi)
        out.pow(2).sum().backward()
        outs.append((out, xi.grad, layer.lora_A.grad, layer.lora_B.grad, layer.router.weight.grad))
    # int8 rounds the input to 8 bits in the base GEMM (LLM.int8), hence its looser output tolerance
    tolerance = 2e-2 if scheme == "int8" else 1e-4
    for a, b in zip(*outs):
        assert torch.allclose(a, b, rtol=tolerance, atol=tolerance * float(b.detach().abs().max()))


def _input_gradient(model, x):
    xi = x.clone().requires_grad_(True)
    model(xi).pow(2).sum().backward()
    return xi.grad


@pytest.mark.parametrize("evaluate_before_wrapping", [False, True])
def test_4bit_base_layers_pass_the_input_gradient_after_an_evaluation(evaluate_before_wrapping):
    """An eval-mode, no-grad pass (a zero-shot score) must not leave a 4-bit base layer on bitsandbytes' CPU
    inference kernel, which has no backward: the adapters before it would lose their gradient through it."""
    from bitsandbytes.functional import has_avx512bf16

    from moelora.finetune.quantization import quantize_linears

    if evaluate_before_wrapping and not has_avx512bf16():
        pytest.skip("bitsandbytes repacks 4-bit weights for inference only on CPUs with AVX512-BF16")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    quantize_linears(model, "nf4", torch.float32, torch.device("cpu"))
    x = torch.randn(5, 64)
    if evaluate_before_wrapping:
        with torch.no_grad():
            model.eval()(x)
        assert getattr(model[1].weight.quant_state, "packing_format_for_cpu", False)  # repacked, no backward
        model.train()
    moelora.wrap(model, moelora.MoELoRAConfig(num_experts=4, top_k=2, rank=4, target_modules=["0"]))
    before = _input_gradient(model, x)
    with torch.no_grad():
        model.eval()(x)
    model.train()
    after = _input_gradient(model, x)
    assert after is not None and before is not None and before.abs().max() > 0
    torch.testing.assert_close(after, before)
    assert model[0].base_layer.weight.grad is None  # still frozen


@pytest.mark.parametrize("scheme,base_class", [("nf4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_train_on_a_quantised_base_and_load_the_adapter_back(scheme, base_class, tmp_path, capsys, caplog):
    result = Trainer(smoke(tmp_path, f"model.quantization={scheme}"), progress=False).run()
    run = result.run_dir
    assert result.test is not None
    meta = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert meta["base_model"]["quantization"] == f"bitsandbytes-{scheme}"
    # the run loads back (config.yaml says how to quantise the base) and evaluates
    assert cli.main(["eval", str(run), "--max-examples", "4", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 4
    _, _, model, _ = cli._load_run(str(run))
    bases = {type(layer.base_layer).__name__ for _, layer in moelora.moelora_layers(model)}
    assert bases == {base_class}
    # ... and onto an unquantised base of the same shapes, with a note
    from moelora.finetune.base_models import load_model_and_tokenizer

    config = load_config(run / "config.yaml")
    plain, _ = load_model_and_tokenizer(config.model.name, random_config=config.model.random_config)
    with caplog.at_level(logging.INFO, logger="moelora.adapter"):
        moelora.load_adapter(plain, run / "adapter")
    assert f"trained on a base quantised as bitsandbytes-{scheme}" in caplog.text


def test_quantisation_without_bitsandbytes_names_the_package(monkeypatch, tmp_path, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ConfigError, match="model.quantization=nf4 needs the package bitsandbytes"):
        load_config(SMOKE, ["model.quantization=nf4"])
    assert cli.main(["train", str(SMOKE), "--set", f"output_dir={tmp_path}/x", "--set", "model.quantization=int8"]) == 2
    assert "pip install 'moelora[quant]'" in capsys.readouterr().err


# --- on a GPU ------------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_train_on_cuda_in_bf16_and_resume_exactly_with_the_cuda_random_state(tmp_path, monkeypatch):
    common = ["train.device=cuda", "train.precision=bf16", "adapter.dropout=0.1", "train.steps=6",
              "train.save_every=3"]
    full = Trainer(smoke(tmp_path, *common, name="full"), progress=False).run()
    assert full.test is not None
    from moelora.finetune import batching

    original = batching.StepBatches.micro_batches

    def crash_at_step_5(self, step, *args):
        if step == 4:
            raise KeyboardInterrupt
        return original(self, step, *args)

    monkeypatch.setattr(batching.StepBatches, "micro_batches", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        Trainer(smoke(tmp_path, *common, name="resumed"), progress=False).run()
    monkeypatch.setattr(batching.StepBatches, "micro_batches", original)
    Trainer(smoke(tmp_path, *common, name="resumed"), progress=False).run(resume=True)

    def losses(run):
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["last_step_loss"] for line in lines if "loss" in json.loads(line)]

    # the dropout masks are drawn on the GPU: equal losses need its random state restored
    assert losses(tmp_path / "resumed")[-3:] == losses(tmp_path / "full")[-3:]


@pytest.mark.parametrize("setting", ["train.precision=bf16", "model.quantization=nf4", "model.quantization=int8"])
def test_the_smoke_job_trains_in_each_setting_and_its_adapter_loads_back(setting, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", str(SMOKE), "--no-progress", "--set", f"output_dir={run}", "--set", setting,
                     "--set", "train.steps=3", "--set", "train.save_every=0", "--set", "train.eval_every=0",
                     "--set", "data.max_eval=8", "--set", "eval.zero_shot=false"]) == 0
    assert "held-out accuracy" in capsys.readouterr().out
    assert cli.main(["eval", str(run), "--max-examples", "4", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 4
    assert cli.main(["generate", str(run), "the film was", "--max-new-tokens", "2"]) == 0
