"""Sharded training keeps the method: FSDP2 against one process (2 gloo processes on the CPU), and every
way a parameter swap used to turn the preconditioner silently off."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import moelora
from moelora.optim import RiemannianAdamW, RiemannianSGD, param_groups

ROOT = Path(__file__).resolve().parents[1]


def tiny(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    moelora.wrap(model, moelora.MoELoRAConfig(num_experts=4, top_k=2, rank=4, alpha=8.0, dropout=0.0))
    with torch.no_grad():
        for _, layer in moelora.moelora_layers(model):
            layer.lora_B.normal_(0.0, 0.1)
    return model


IDS = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(1))


def step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    model(input_ids=IDS, labels=IDS).loss.backward()
    opt.step()
    opt.zero_grad()


def adapter(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in moelora.adapter_state_dict(model).items()}


def max_difference(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def test_fsdp2_preconditions_like_one_process(tmp_path):
    out = tmp_path / "fsdp.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
         str(ROOT / "tests" / "distributed" / "fsdp_parity.py"), str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for name in ("sgd", "adamw"):
        for preconditioner in ("riemannian", "gate_rescaled", "none"):
            assert result[f"{name}/{preconditioner}"] < 1e-5, (name, preconditioner, result)
        assert result[f"{name}/riemannian_vs_none"] > 1e-2  # the method is on under sharding
    assert result["local_expert_counts"] == [3]  # 5 experts over 2 ranks: rank 0 holds 3 whole experts


@pytest.mark.parametrize("make", [RiemannianSGD, RiemannianAdamW])
def test_load_state_dict_assign_before_building_the_optimizer_keeps_the_method(make):
    reference, swapped, plain = tiny(), tiny(), tiny()
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    swapped.load_state_dict(state, assign=True)  # new Parameter objects everywhere
    assert swapped.model.layers[0].self_attn.q_proj.lora_A is not reference.model.layers[0].self_attn.q_proj.lora_A
    for model, preconditioner in ((reference, "riemannian"), (swapped, "riemannian"), (plain, "none")):
        step(model, make(param_groups(model, lr=0.05), preconditioner=preconditioner))
    assert max_difference(adapter(swapped), adapter(reference)) == 0.0
    assert max_difference(adapter(swapped), adapter(plain)) > 1e-4  # not silently "none"


def test_a_parameter_swap_after_building_the_optimizer_is_an_error():
    model = tiny()
    opt = RiemannianAdamW(param_groups(model, lr=0.01), preconditioner="riemannian")
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    model(input_ids=IDS, labels=IDS).loss.backward()
    with pytest.raises(RuntimeError, match=r"no longer the parameter of any live MoE-LoRA layer.*param_groups"):
        opt.step()
    # with preconditioning off too: the update would silently miss the model
    plain = RiemannianSGD(param_groups(tiny(), lr=0.01), preconditioner="none")
    for group in plain.param_groups:
        group["params"] = [p.detach().clone().requires_grad_(True) for p in group["params"]]
        for p in group["params"]:
            p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="no longer the parameter"):
        plain.step()


def test_a_deep_copy_and_a_dtype_change_keep_the_method():
    original = tiny()
    twin = copy.deepcopy(original)
    assert twin.model.layers[0].self_attn.q_proj.lora_A is not original.model.layers[0].self_attn.q_proj.lora_A
    step(original, RiemannianSGD(param_groups(original, lr=0.05), preconditioner="riemannian"))
    step(twin, RiemannianSGD(param_groups(twin, lr=0.05), preconditioner="riemannian"))
    assert max_difference(adapter(twin), adapter(original)) == 0.0
    double = tiny().to(torch.float64)
    reference = tiny().to(torch.float64)
    plain = tiny().to(torch.float64)
    step(double, RiemannianSGD(param_groups(double, lr=0.05), preconditioner="riemannian"))
    step(reference, RiemannianSGD(param_groups(reference, lr=0.05), preconditioner="riemannian"))
    step(plain, RiemannianSGD(param_groups(plain, lr=0.05), preconditioner="none"))
    assert max_difference(adapter(double), adapter(reference)) == 0.0
    assert max_difference(adapter(double), adapter(plain)) > 1e-4


def test_a_flat_partition_is_refused_with_a_pointer_to_fsdp():
    """What DeepSpeed ZeRO hands an optimizer: one flat tensor per group, no expert stacks."""
    model = tiny()
    groups = param_groups(model, lr=0.01)
    experts = groups[0]["params"]
    flat = torch.cat([p.detach().reshape(-1) for p in experts]).requires_grad_(True)
    flat.grad = torch.zeros_like(flat)
    groups[0]["params"] = [flat]
    opt = RiemannianAdamW(groups, preconditioner="riemannian")
    with pytest.raises(RuntimeError, match=r"flat partition \(DeepSpeed ZeRO.*use FSDP2 \(fully_shard\) or DDP"):
        opt.step()


def test_groups_without_any_expert_stack_are_an_error_not_a_plain_update():
    model = tiny()
    stale = [p.detach().clone().requires_grad_(True) for p in model.parameters() if p.requires_grad]
    for p in stale:
        p.grad = torch.ones_like(p)
    opt = RiemannianAdamW(stale, preconditioner="riemannian")  # plain groups, no "kind": nothing to bind
    with pytest.raises(RuntimeError, match="preconditioning would silently be off"):
        opt.step()
    ok = RiemannianAdamW([p for p in model.parameters() if p.requires_grad], preconditioner="riemannian")
    model(input_ids=IDS, labels=IDS).loss.backward()
    ok.step()  # the model's own parameters are bound by structure, whatever the groups look like


def test_an_expert_stack_of_the_wrong_shape_is_refused():
    model = tiny()
    layer = model.model.layers[0].self_attn.q_proj
    opt = RiemannianAdamW(param_groups(model, lr=0.01), preconditioner="riemannian")
    model(input_ids=IDS, labels=IDS).loss.backward()
    layer.num_experts = 8  # the layer no longer describes its stacks
    with pytest.raises(RuntimeError, match="expected"):
        opt.step()


def _losses(run: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {e["step"]: e["last_step_loss"] for e in lines if "loss" in e}


def test_training_command_with_fsdp_matches_one_process_and_resumes_exactly(tmp_path, monkeypatch):
    from moelora.finetune.base_models import load_model_and_tokenizer
    from moelora.finetune.run_config import load_config
    from moelora.finetune.trainer import Trainer

    smoke = ROOT / "configs" / "smoke.yaml"
    monkeypatch.chdir(ROOT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29543",
         str(ROOT / "tests" / "distributed" / "fsdp_train.py"), str(tmp_path), str(smoke)],
        capture_output=True, text=True, cwd=ROOT, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    # killed after the step-2 checkpoint and resumed: the same losses (per-process dropout masks included)
    assert _losses(resumed) == _losses(full)
    summary = json.loads((full / "summary.json").read_text())
    sharding = summary["sharding"]
    assert abs(sharding["base_bytes_per_process"] / sharding["base_bytes"] - 0.5) < 0.05  # the base is sharded

    # one process, no dropout: the same losses as the sharded job without dropout, and the same adapter
    sys.path.insert(0, str(ROOT / "tests" / "distributed"))
    from fsdp_train import OVERRIDES

    single = [o for o in OVERRIDES if not o.startswith("train.distributed")] + ["adapter.dropout=0.0"]
    Trainer(load_config(smoke, [f"output_dir={tmp_path / 'single'}", *single]), progress=False).run()
    one, two = _losses(tmp_path / "single"), _losses(tmp_path / "no-dropout")
    assert one.keys() == two.keys()
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5, abs=1e-6), step
    # the adapter the sharded job wrote (gathered on process 0) loads in one process: the same logits
    config = load_config(smoke)
    logits = []
    for run in ("single", "no-dropout"):
        base, _ = load_model_and_tokenizer(config.model.name, random_config=config.model.random_config)
        model = moelora.load_adapter(base, tmp_path / run / "adapter").eval()
        with torch.no_grad():
            logits.append(model(input_ids=IDS % 256).logits)
    # Two reduction orders (one process, or two summed by the sharded all-reduce) after 4 AdamW steps, which
    # divide by sqrt(v) and so carry float32 rounding of small gradients into the update: compare at the
    # logits' scale (measured: 2e-5 of 0.65), not element by element (meaningless for logits near 0).
    scale = float(logits[0].abs().max())
    torch.testing.assert_close(logits[0], logits[1], rtol=0.0, atol=1e-4 * scale)


def test_a_single_process_started_by_accelerate_launch_says_so(monkeypatch, caplog):
    import logging

    from moelora.finetune.distributed import init_distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    with caplog.at_level(logging.WARNING, logger="moelora.finetune.distributed"):
        ctx = init_distributed()
    assert ctx.world_size == 1 and "single process" in caplog.text and "torchrun --nproc_per_node" in caplog.text
