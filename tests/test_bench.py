"""The benchmark harness runs and its fast paths agree with their references (timings are not checked)."""

import pytest
import torch
from torch import nn

from moelora import MoELoRALinear
from moelora.bench import layer_bench
from moelora.bench.runner import TARGETS, format_table
from moelora.bench.timing import Timing, time_interleaved

SMALL = dict(d=32, tokens=64, num_experts=4, top_k=2, rank=2)


def test_interleaved_timing_records_every_candidate():
    calls = []
    timing = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1)
    assert sorted(calls) == ["a"] * 4 + ["b"] * 4
    assert {k: len(v) for k, v in timing.samples.items()} == {"a": 3, "b": 3}
    assert timing.ratio("a", "b") > 0


def test_interleaved_timing_shuffles_each_round_so_no_candidate_always_follows_the_same_one():
    calls: list[str] = []
    candidates = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    time_interleaved(candidates, repeats=30, warmup=0)
    rounds = [tuple(calls[i : i + 3]) for i in range(0, 90, 3)]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)  # every round runs each candidate once
    followers = {(calls[i], calls[i + 1]) for i in range(89) if calls[i] != calls[i + 1]}
    assert len(followers) == 6  # every candidate ran right after each of the others
    calls.clear()
    time_interleaved(candidates, repeats=30, warmup=0)
    assert [tuple(calls[i : i + 3]) for i in range(0, 90, 3)] == rounds  # the same seed, the same orders


def test_round_ratios_pair_each_rounds_samples():
    timing = Timing({"a": [2.0, 3.0, 8.0, 1.0, 4.0], "b": [1.0, 2.0, 4.0, 2.0, 2.0]})
    assert timing.round_ratios("a", "b") == [2.0, 1.5, 2.0, 0.5, 2.0]
    assert timing.ratio_spread("a", "b") == {"q1": 1.5, "median": 2.0, "q3": 2.0}
    assert timing.ratio("a", "b") == 1.5  # the ratio of the medians, 3 / 2, is another statistic
    assert Timing({"a": [3.0], "b": [2.0]}).ratio_spread("a", "b") == {"q1": 1.5, "median": 1.5, "q3": 1.5}


@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_layer_benchmark_runs_at_a_small_shape(dropout):
    result = layer_bench.run(quick=True, dropout=dropout, **SMALL)
    assert set(result["timings"]) == {"moelora", "per_expert_loop", "dense_lora_r8"}
    assert result["speedup_vs_per_expert_loop"] > 0 and result["cost_vs_dense_lora"] > 0


def test_sparse_comparison_runs_the_layers_auto_choice():
    result = layer_bench.run_sparse(quick=True, d=16, tokens=32, num_experts=64, top_k=2, rank=4)
    assert set(result["timings"]) == {"dense", "sparse"} and result["sparse_speedup_vs_dense"] > 0


def test_per_expert_loop_computes_the_same_function():
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    loop = layer_bench.PerExpertLoop(base, num_experts=4, top_k=2, rank=3, alpha=6.0)
    layer = MoELoRALinear(base, 4, 2, 3, 6.0)
    with torch.no_grad():
        layer.router.weight.copy_(loop.router.weight)
        for i in range(4):
            layer.lora_A[i].copy_(loop.lora_A[i].weight)
            layer.lora_B[i].copy_(loop.lora_B[i].weight)
    x = torch.randn(10, 16)
    torch.testing.assert_close(loop(x), layer(x), rtol=1e-5, atol=1e-6)


def test_table_lists_targets_that_were_measured():
    results = {"machine": {"cores": 2, "torch": "x", "torch_threads": 2, "date": "d"},
               "layer": {"speedup_vs_per_expert_loop": 6.0, "cost_vs_dense_lora": 1.3,
                         "cost_vs_dense_lora_by_round": {"q1": 1.21, "median": 1.28, "q3": 1.346}}}
    table = format_table(results)
    assert "| layer.speedup_vs_per_expert_loop | 6.00 |  | >= 5 | yes |" in table
    assert "| layer.cost_vs_dense_lora | 1.30 | 1.21–1.35 | <= 1.05 | no |" in table
    assert "optimizer" not in table and len(TARGETS) >= 9


def test_generation_ratios_are_moeloras_time_over_each_baseline():
    from moelora.bench.generate_bench import _ratios

    timing = Timing({"moelora": [1.1, 1.3, 1.2], "peft_lora_r16": [1.0], "base": [0.8], "moelora_training_path": [2.4]})
    ratios = _ratios(timing, tokens=32)
    assert ratios["cost_vs_peft_lora"] == pytest.approx(1.2) and ratios["cost_vs_base"] == pytest.approx(1.5)
    assert ratios["speedup_vs_training_path"] == pytest.approx(2.0)
    assert ratios["tokens_per_s"]["moelora"] == pytest.approx(32 / 1.2)
    assert {"generate.decode_b1.cost_vs_peft_lora", "generate.decode_b8.cost_vs_peft_lora"} <= set(TARGETS)
