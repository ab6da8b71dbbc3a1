"""End-to-end tests of ``moelora train`` on the smoke configuration (tiny random Llama, fixture data)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moelora import ConfigError
from moelora.finetune.cli import main
from moelora.finetune.run_config import load_config
from moelora.finetune.trainer import Trainer, TrainingError

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
FAST = ["train.steps=6", "train.save_every=3", "train.eval_every=3", "train.log_every=1", "data.max_eval=16",
        "train.eval_examples=8"]


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the smoke config names its data file relative to the repository


def smoke(tmp_path, *overrides, name="run"):
    return load_config(SMOKE, [f"output_dir={tmp_path / name}", *FAST, *overrides])


def losses(run_dir):
    return {m["step"]: m["loss"] for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in m}


def test_smoke_run_writes_a_complete_run_folder(tmp_path, capsys):
    code = main(["train", str(SMOKE), "--no-progress", "--set", f"output_dir={tmp_path / 'run'}",
                 *sum((["--set", o] for o in FAST), [])])
    assert code == 0
    run = tmp_path / "run"
    names = {p.name for p in run.iterdir()}
    assert {"config.yaml", "metrics.jsonl", "summary.json", "summary.md", "loss.png", "accuracy.png",
            "expert_load.png", "adapter", "checkpoints", "eval_zero_shot.json"} <= names
    assert not [n for n in names if n.startswith(".")]  # no temporary leftovers
    assert sorted(p.name for p in (run / "adapter").iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("step" in e for e in events)
    assert [e["step"] for e in events if "loss" in e] == [1, 2, 3, 4, 5, 6]
    assert any(e.get("split") == "validation" for e in events) and any(e.get("split") == "test" for e in events)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["fine_tuned"]["n"] == 16 and summary["zero_shot"]["n"] == 16
    assert len(summary["difference"]["interval"]) == 2
    assert "held-out accuracy" in capsys.readouterr().out
    # the saved run is usable: eval and generate
    assert main(["eval", str(run), "--no-progress", "--max-examples", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 4
    assert main(["generate", str(run), "the film is great", "--max-new-tokens", "3"]) == 0


def test_same_seed_gives_the_same_loss_curve(tmp_path):
    a = smoke(tmp_path, "eval.zero_shot=false", "adapter.dropout=0.1", name="a")
    b = smoke(tmp_path, "eval.zero_shot=false", "adapter.dropout=0.1", name="b")
    Trainer(a, progress=False).run()
    Trainer(b, progress=False).run()
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gradient_checkpointing_gives_the_same_losses(tmp_path, dropout):
    """With dropout too: the recomputed forward pass draws the same keep-mask seed (checkpointing restores
    the RNG state), so the backward pass draws the same mask again."""
    common = ["eval.zero_shot=false", "train.eval_every=0", "train.steps=3", "train.save_every=0",
              f"adapter.dropout={dropout}"]
    Trainer(smoke(tmp_path, *common, name="plain"), progress=False).run()
    Trainer(smoke(tmp_path, *common, "model.gradient_checkpointing=true", name="ckpt"), progress=False).run()
    plain, ckpt = losses(tmp_path / "plain"), losses(tmp_path / "ckpt")
    assert plain.keys() == ckpt.keys()
    for step in plain:
        assert ckpt[step] == pytest.approx(plain[step], rel=1e-5)


def test_resume_continues_exactly(tmp_path, monkeypatch):
    common = ["eval.zero_shot=false", "adapter.dropout=0.1", "train.eval_every=0", "train.steps=8",
              "train.save_every=4"]
    Trainer(smoke(tmp_path, *common, name="full"), progress=False).run()

    from moelora.finetune import batching

    original = batching.StepBatches.micro_batches

    def crash_at_step_6(self, step, *args):
        if step == 5:
            raise KeyboardInterrupt  # the process is killed after step 5's checkpointless progress
        return original(self, step, *args)

    monkeypatch.setattr(batching.StepBatches, "micro_batches", crash_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        Trainer(smoke(tmp_path, *common, name="resumed"), progress=False).run()
    monkeypatch.setattr(batching.StepBatches, "micro_batches", original)
    assert max(losses(tmp_path / "resumed")) == 5
    Trainer(smoke(tmp_path, *common, name="resumed"), progress=False).run(resume=True)

    assert losses(tmp_path / "resumed") == losses(tmp_path / "full")
    from safetensors.torch import load_file

    full = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    resumed = load_file(str(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_existing_run_needs_resume_and_the_same_model(tmp_path):
    config = smoke(tmp_path, "eval.zero_shot=false", "train.eval_every=0")
    Trainer(config, progress=False).run()
    with pytest.raises(TrainingError, match="is not empty .*pass --resume"):
        Trainer(config, progress=False).run()
    other = smoke(tmp_path, "eval.zero_shot=false", "model.random_config.hidden_size=32")
    with pytest.raises(ConfigError, match=r"different settings.*\n  model.random_config: .*hidden_size"):
        Trainer(other, progress=False).run(resume=True)


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    from moelora.finetune import loss as loss_module

    original = loss_module.CausalLMAnswerLoss.forward
    calls = {"n": 0}

    def nan_at_fifth_call(self, *args, **kwargs):
        calls["n"] += 1
        loss_sum, count = original(self, *args, **kwargs)
        return (loss_sum * float("nan") if calls["n"] >= 9 else loss_sum), count  # step 5, micro-batch 1

    monkeypatch.setattr(loss_module.CausalLMAnswerLoss, "forward", nan_at_fifth_call)
    config = smoke(tmp_path, "eval.zero_shot=false", "train.eval_every=0")
    with pytest.raises(TrainingError, match=r"non-finite training loss \(nan\) at step 5.*step-000003"):
        Trainer(config, progress=False).run()
    run = tmp_path / "run"
    assert not (run / "summary.json").exists()
    import moelora
    from moelora.finetune.base_models import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer("random-llama", random_config=config.model.random_config)
    moelora.load_adapter(model, run / "checkpoints" / "step-000003" / "adapter")  # still loadable


@pytest.mark.parametrize("args,message", [
    (["--set", "train.stepz=3"], "unknown config key 'train.stepz'; valid keys in train: steps"),
    (["--set", "adapter.top_k=9"], "top_k must satisfy 1 <= top_k <= num_experts (= 4), got 9"),
])
def test_cli_config_errors_exit_2_without_traceback(tmp_path, args, message):
    proc = subprocess.run(
        [sys.executable, "-m", "moelora", "train", str(SMOKE), "--set", f"output_dir={tmp_path}/x", *args],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_missing_dataset_file_names_the_path(tmp_path, capsys):
    code = main(["train", str(SMOKE), "--no-progress", "--set", f"output_dir={tmp_path}/x",
                 "--set", "data.options.train_file=nowhere/data.jsonl"])
    assert code == 2
    assert "nowhere/data.jsonl" in capsys.readouterr().err
    assert not (tmp_path / "x" / "checkpoints").exists()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_two_process_ddp_matches_one_process(tmp_path):
    overrides = [*FAST, "eval.zero_shot=false", "train.eval_every=0", "train.save_every=0", "train.steps=4",
                 "train.batch_size=8", "train.grad_accum=2", "adapter.dropout=0.0"]
    single = tmp_path / "single"
    Trainer(load_config(SMOKE, [f"output_dir={single}", *overrides]), progress=False).run()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
         "-m", "moelora", "train", str(SMOKE), "--no-progress", "--set", f"output_dir={tmp_path / 'ddp'}",
         *sum((["--set", o] for o in overrides), [])],
        capture_output=True, text=True, cwd=ROOT, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = losses(single), losses(tmp_path / "ddp")
    assert one.keys() == two.keys()
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5, abs=1e-6), step


def test_every_subcommand_is_wired(capsys):
    for command in ("train", "eval", "generate", "bench", "reproduce"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert f"moelora {command}" in capsys.readouterr().out
