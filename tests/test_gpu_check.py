"""The GPU check's parts, run on the CPU here (the same code compares a CUDA device with the CPU there),
and the precision benchmark on a shallow SmolLM2-shaped model."""

import pytest
import torch

from moelora import ConfigError
from moelora.bench import gpu_check, precision_bench

CPU = torch.device("cpu")


def test_layer_parity_holds_at_the_papers_shape_in_bf16():
    # E=20, top_k=10 at d=576: bf16 router logits would flip near-tied experts (4 % off); the router stays fp32
    result = gpu_check.layer_parity(CPU)
    assert result["ok"], result
    assert result["float32"]["relative_errors"]["dA"] == 0.0  # same device, same kernels: identical
    assert max(result["bf16"]["relative_errors"].values()) < gpu_check.BF16_TOLERANCE


def test_optimizer_and_sparse_checks_run():
    assert gpu_check.optimizer_parity(CPU)["ok"]
    sparse = gpu_check.sparse_on_cuda(CPU)
    assert sparse["ok"] and sparse["relative_error_vs_dense"] < 1e-5


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of a machine without CUDA")
def test_the_gpu_check_refuses_to_time_the_cpu(capsys):
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        gpu_check.run(quick=True)
    from moelora.finetune import cli

    assert cli.main(["bench", "--device", "cuda", "--quick"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


def test_precision_bench_compares_bf16_and_nf4_steps_with_peft():
    pytest.importorskip("bitsandbytes")
    result = precision_bench.run(quick=True, layers=1)
    for setting in ("bf16", "nf4"):
        losses = result[setting]["first_loss"]
        assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
        assert result[setting]["cost_vs_peft_lora"] > 0
        assert set(result[setting]["timings"]) == {"moelora", "peft_lora_r16"}


@pytest.mark.gpu
def test_the_gpu_check_passes_on_cuda(tmp_path):
    results = gpu_check.run(quick=True, json_out=str(tmp_path / "gpu.json"))
    assert gpu_check.passed(results), gpu_check.format_report(results)
