"""Unit tests of the training command's parts: config, schedule, batching, checkpoint files, loss."""

import json
import random

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from moelora.atomic import atomic_dir
from moelora.finetune import checkpoint as ckpt
from moelora.finetune.batching import StepBatches
from moelora.finetune.loss import CausalLMAnswerLoss
from moelora.finetune.run_config import ConfigError, dump_config, load_config
from moelora.finetune.schedule import linear_warmup_decay


def test_defaults_are_the_papers_method():
    config = load_config()
    assert config.adapter.num_experts == 20 and config.adapter.top_k == 10 and config.adapter.rank == 4
    assert config.adapter.alpha == 16 and config.adapter.gate_backward_power == 0.5
    assert config.optim.name == "adamw" and config.optim.preconditioner == "riemannian"
    assert config.adapter.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("output_dir: out\ntrain:\n  steps: 7\noptim:\n  lr: 1\n")
    config = load_config(path, ["train.batch_size=4", "adapter.target_modules=[q_proj]", "optim.router_lr=1e-5"])
    assert config.output_dir == "out" and config.train.steps == 7 and config.train.batch_size == 4
    assert config.optim.lr == 1.0 and isinstance(config.optim.lr, float) and config.optim.router_lr == 1e-5
    assert config.adapter.target_modules == ["q_proj"]
    again = tmp_path / "again.yaml"
    again.write_text(dump_config(config))
    assert load_config(again) == config


@pytest.mark.parametrize("overrides,message", [
    (["train.stepz=3"], r"unknown config key 'train.stepz'; valid keys in train: steps, batch_size"),
    (["foo=1"], r"unknown config key 'foo'; valid keys: output_dir, model"),
    (["train.steps=many"], r"train.steps must be an integer"),
    (["adapter.top_k=30"], r"adapter: top_k must satisfy 1 <= top_k <= num_experts \(= 20\)"),
    (["optim.preconditioner=shampoo"], r"optim.preconditioner must be"),
    (["train.grad_accum=3"], r"divisible"),
    (["train"], r"dotted.key=value"),
])
def test_config_errors_name_the_problem(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_missing_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_schedule_warmup_then_linear_decay():
    values = [linear_warmup_decay(s, warmup_steps=2, total_steps=10, final_ratio=0.1) for s in range(12)]
    assert values[:2] == [0.5, 1.0]
    assert values[2] == 1.0 and values[10] == pytest.approx(0.1) and values[11] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[1:], values[2:]))


def test_step_batches_are_a_pure_function_of_step_and_cover_each_epoch():
    lengths = [random.Random(i).randint(5, 50) for i in range(37)]
    plan = StepBatches(lengths, batch_size=6, grad_accum=2, seed=3)
    again = StepBatches(lengths, batch_size=6, grad_accum=2, seed=3)
    assert plan.batches_per_epoch == 6
    epoch = [i for s in range(6) for i in plan.global_batch(s)]
    assert len(epoch) == len(set(epoch)) == 36
    assert [again.global_batch(s) for s in (7, 2, 13)] == [plan.global_batch(s) for s in (7, 2, 13)]
    assert plan.global_batch(0) != plan.global_batch(6)  # a new permutation each epoch
    # the two processes of a 2-process run see disjoint halves of each micro-batch
    micro0, micro1 = plan.micro_batches(4, 0, 2), plan.micro_batches(4, 1, 2)
    assert len(micro0) == 2 and sorted(sum(micro0 + micro1, [])) == sorted(plan.global_batch(4))
    with pytest.raises(ValueError, match="fewer than one batch"):
        StepBatches([3, 4], batch_size=4)


def test_step_batches_group_lengths():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 200, (104,), generator=gen).tolist()
    plan = StepBatches(lengths, batch_size=8, seed=3, window_batches=4)
    batches = [plan.global_batch(s) for s in range(plan.batches_per_epoch)]

    def padding(bs):
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in bs)

    shuffled = torch.randperm(104, generator=gen).tolist()
    random_batches = [shuffled[i : i + 8] for i in range(0, 104, 8)]
    assert padding(batches) < padding(random_batches) / 2
    assert all(lengths[b[0]] == max(lengths[i] for i in b) for b in batches)  # longest first
    ungrouped = StepBatches(lengths, batch_size=8, seed=3, window_batches=1)
    assert padding([ungrouped.global_batch(s) for s in range(13)]) > padding(batches)


def test_state_tree_round_trip_without_pickle(tmp_path):
    state = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}},
             "param_groups": [{"params": [0, 1], "betas": (0.9, 0.999), "kind": "experts", "max": None}]}
    ckpt.save_state(state, tmp_path, "opt")
    assert json.loads((tmp_path / "opt.json").read_text())  # plain JSON
    loaded = ckpt.load_state(tmp_path, "opt")
    assert loaded["param_groups"][0]["betas"] == (0.9, 0.999) and loaded["param_groups"][0]["max"] is None
    assert torch.equal(loaded["state"][0]["exp_avg"], state["state"][0]["exp_avg"])
    with pytest.raises(TypeError, match="cannot store"):
        ckpt.save_state({"x": object()}, tmp_path, "bad")


def test_rng_state_round_trip():
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    state = ckpt.rng_state()
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    ckpt.set_rng_state(state)
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]


def test_atomic_checkpoint_folder(tmp_path):
    def fill(folder):
        (folder / "trainer_state.json").write_text("{}")

    atomic_dir(tmp_path / "step-000002", fill)

    def broken(folder):
        (folder / "trainer_state.json").write_text("{}")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_dir(tmp_path / "step-000004", broken)
    assert [p.name for p in tmp_path.iterdir()] == ["step-000002"]
    atomic_dir(tmp_path / "step-000006", fill)
    ckpt.prune_checkpoints(tmp_path, keep=1)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [6]


def test_answer_loss_equals_transformers_loss_over_full_logits():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    ids = torch.randint(0, 50, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    labels = torch.full_like(ids, -100)
    labels[0, 5:9] = ids[0, 5:9]
    labels[1, 4:7] = ids[1, 4:7]
    labels[2, 8] = ids[2, 8]
    loss_sum, count = CausalLMAnswerLoss(model)(ids, mask, labels)
    expected = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert count.item() == 8
    torch.testing.assert_close(loss_sum / count, expected, rtol=1e-5, atol=1e-6)
