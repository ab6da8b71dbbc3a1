"""Reliability: a resume that cannot silently differ, kills that leave nothing wrong behind, bad input
refused up front, and no silent wrong results (numbered as in the issue that listed the defects)."""

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import moelora
from moelora import AdapterError, ConfigError
from moelora.finetune import cli
from moelora.finetune.errors import EvaluationError, TrainingError
from moelora.finetune.run_config import load_config
from moelora.finetune.trainer import RunAlreadyComplete, Trainer

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
FAST = ["train.steps=4", "train.save_every=2", "train.eval_every=0", "train.log_every=1", "data.max_eval=8",
        "eval.zero_shot=false"]
TIMING = ("tokens_per_s",)


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def smoke(tmp_path, *overrides, name="run"):
    return load_config(SMOKE, [f"output_dir={tmp_path / name}", *FAST, *overrides])


def events(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished 4-step run (checkpoints at steps 2 and 4), copied by the tests that alter it."""
    folder = tmp_path_factory.mktemp("finished")
    config = load_config(SMOKE, [f"output_dir={folder / 'run'}", *FAST])
    import os

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        Trainer(config, progress=False).run()
    finally:
        os.chdir(cwd)
    return folder / "run"


def copy_run(finished: Path, tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / "run"
    shutil.copytree(finished, target)
    return target


# --- 1. a resume with other settings or data -----------------------------------------------------------

@pytest.mark.parametrize("override,key", [
    ("optim.lr=0.02", "optim.lr"),
    ("optim.preconditioner=none", "optim.preconditioner"),
    ("train.seed=3", "train.seed"),
    ("train.batch_size=4", "train.batch_size"),
    ("data.options.question=Is it good?", "data.options"),
    ("adapter.dropout=0.2", "adapter.dropout"),
    ("train.precision=bf16", "train.precision"),
])
def test_a_resume_with_changed_settings_exits_2_listing_them(finished, tmp_path, override, key):
    run = copy_run(finished, tmp_path)
    (run / "summary.json").unlink()  # an unfinished run, to resume
    config = load_config(SMOKE, [f"output_dir={run}", *FAST, override])
    with pytest.raises(ConfigError, match=rf"different settings(.|\n)*\n  {key}"):
        Trainer(config, progress=False).run(resume=True)


def test_a_resume_with_changed_data_is_refused(finished, tmp_path):
    run = copy_run(finished, tmp_path)
    (run / "summary.json").unlink()
    rows = (ROOT / "configs/data/smoke_sentiment.jsonl").read_text().splitlines()
    changed = tmp_path / "data.jsonl"
    changed.write_text("\n".join(rows[:-1]) + "\n")
    config = load_config(SMOKE, [f"output_dir={run}", *FAST, f"data.options.train_file={changed}"])
    with pytest.raises(ConfigError, match="data.fingerprint"):
        Trainer(config, progress=False).run(resume=True)


# --- 2. train.steps on resume ------------------------------------------------------------------------

def test_fewer_steps_than_the_checkpoint_and_a_changed_schedule_are_refused(finished, tmp_path):
    run = copy_run(finished, tmp_path)
    (run / "summary.json").unlink()
    with pytest.raises(ConfigError, match="at step 4; train.steps=3 is fewer"):
        Trainer(load_config(SMOKE, [f"output_dir={run}", *FAST, "train.steps=3"]), progress=False).run(resume=True)
    with pytest.raises(ConfigError, match="planned for train.steps=4 .* final_lr_ratio=1.0"):
        Trainer(load_config(SMOKE, [f"output_dir={run}", *FAST, "train.steps=6"]), progress=False).run(resume=True)


def test_steps_may_grow_under_a_constant_schedule(tmp_path):
    constant = ["train.final_lr_ratio=1.0", "train.warmup_steps=0"]
    Trainer(smoke(tmp_path, *constant, name="grown"), progress=False).run()
    result = Trainer(smoke(tmp_path, *constant, "train.steps=6", name="grown"), progress=False).run(resume=True)
    assert result.steps == 6 and max(e["step"] for e in events(tmp_path / "grown")) == 6
    assert (tmp_path / "grown" / "checkpoints" / "step-000006").is_dir()


def test_resuming_a_finished_run_says_it_is_complete(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    with pytest.raises(RunAlreadyComplete):
        Trainer(load_config(SMOKE, [f"output_dir={run}", *FAST]), progress=False).run(resume=True)
    overrides = sum((["--set", o] for o in [f"output_dir={run}", *FAST]), [])
    assert cli.main(["train", str(SMOKE), "--resume", "--no-progress", *overrides]) == 0
    assert "already complete (4 steps)" in capsys.readouterr().out


# --- 3. a non-empty output_dir -------------------------------------------------------------------------

def test_a_non_empty_output_dir_needs_resume_or_overwrite(finished, tmp_path):
    run = copy_run(finished, tmp_path)
    stale = {"task": "x", "method": "loglik", "metric": "accuracy", "value": 0.99, "interval": [0.9, 1.0],
             "n": 1, "metrics": {}}
    (run / "eval_zero_shot.json").write_text(json.dumps(stale))
    config = load_config(SMOKE, [f"output_dir={run}", *FAST, "eval.zero_shot=true"])
    with pytest.raises(TrainingError, match="is not empty .*--overwrite"):
        Trainer(config, progress=False).run()
    result = Trainer(config, progress=False).run(overwrite=True)
    assert result.zero_shot is not None and result.zero_shot.value != 0.99  # evaluated afresh
    assert [e["step"] for e in events(run) if "loss" in e] == [1, 2, 3, 4]  # not appended to


# --- 4 and the fault injection: kills leave the same run behind ------------------------------------------

def _killed(out: Path, point: str, resume: bool) -> int:
    args = [sys.executable, str(ROOT / "tests" / "faults" / "killed_run.py"), str(out), point]
    return subprocess.run(args + (["--resume"] if resume else []), cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"}).returncode


def test_sigkill_during_a_step_a_checkpoint_and_the_final_evaluation_then_resume(tmp_path):
    assert _killed(tmp_path / "full", "none", False) == 0
    run = tmp_path / "killed"
    assert _killed(run, "step", False) == -9  # before step 4: checkpoint 2 is the newest
    assert _killed(run, "checkpoint", True) == -9  # halfway through checkpoint 4
    assert any(p.name.startswith(".step-000004.tmp-") for p in (run / "checkpoints").iterdir())
    assert _killed(run, "final-eval", True) == -9  # after checkpoint 6, during the test evaluation
    assert _killed(run, "none", True) == 0
    full = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    resumed = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)
    assert events(run) == events(tmp_path / "full")  # each event once, same values
    assert not [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train_time_s"] > 0


# --- 5. leftovers, a broken newest checkpoint, a partial metrics line --------------------------------------

def test_leftovers_are_cleaned_and_a_broken_newest_checkpoint_falls_back(finished, tmp_path, caplog):
    run = copy_run(finished, tmp_path)
    (run / "summary.json").unlink()
    checkpoints = run / "checkpoints"
    (checkpoints / ".step-000006.tmp-abc").mkdir()  # a kill while writing
    newest = checkpoints / "step-000004"
    newest.rename(checkpoints / ".step-000004.old")  # a kill between the two renames of a swap
    (run / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text() + '{"step": 5, "lo')
    import logging

    with caplog.at_level(logging.WARNING):
        result = Trainer(load_config(SMOKE, [f"output_dir={run}", *FAST]), progress=False).run(resume=True)
    assert result.resumed_from == 4 and "restoring" in caplog.text and "partial line" in caplog.text
    assert not [p.name for p in checkpoints.iterdir() if p.name.startswith(".")]
    # a truncated newest file: fall back to the one before, with a warning
    (run / "summary.json").unlink()
    weights = checkpoints / "step-000004" / "optimizer.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        result = Trainer(load_config(SMOKE, [f"output_dir={run}", *FAST]), progress=False).run(resume=True)
    assert result.resumed_from == 2 and "cannot be resumed from" in caplog.text


def test_a_trainer_state_without_a_key_is_not_a_traceback(finished, tmp_path):
    run = copy_run(finished, tmp_path)
    (run / "summary.json").unlink()
    for step in ("000002", "000004"):
        path = run / "checkpoints" / f"step-{step}" / "trainer_state.json"
        state = json.loads(path.read_text())
        del state["identity"]
        path.write_text(json.dumps(state))
    with pytest.raises(TrainingError, match="no valid checkpoint"):
        Trainer(load_config(SMOKE, [f"output_dir={run}", *FAST]), progress=False).run(resume=True)


# --- 6. adapters that would load silently wrong ----------------------------------------------------------

def _base():
    from moelora.finetune.base_models import load_model_and_tokenizer

    config = load_config(SMOKE)
    return load_model_and_tokenizer(config.model.name, random_config=config.model.random_config)[0]


@pytest.mark.parametrize("damage,message", [
    (lambda t: {k: v.clone().fill_(float("nan")) for k, v in t.items()}, "non-finite"),
    (lambda t: {k: v.to(torch.int64) for k, v in t.items()}, "is int64"),
    (lambda t: {k: v.to(torch.float16) for k, v in t.items()}, "is float16, but adapter_config.json says float32"),
])
def test_damaged_adapter_weights_are_refused(finished, tmp_path, damage, message):
    run = copy_run(finished, tmp_path)
    path = run / "adapter" / "adapter_model.safetensors"
    save_file(damage(load_file(str(path))), str(path))
    with pytest.raises(AdapterError, match=message):
        moelora.load_adapter(_base(), run / "adapter")


def test_an_edited_dtype_a_json_list_and_a_truncated_file_are_refused(finished, tmp_path):
    run = copy_run(finished, tmp_path)
    config_path = run / "adapter" / "adapter_config.json"
    meta = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**meta, "dtype": "bfloat16"}))
    with pytest.raises(AdapterError, match="says bfloat16"):
        moelora.load_adapter(_base(), run / "adapter")
    config_path.write_text("[1, 2]")
    with pytest.raises(AdapterError, match="not a moelora adapter config"):
        moelora.read_adapter_config(run / "adapter")
    config_path.write_text(json.dumps(meta))
    weights = run / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:64])
    with pytest.raises(AdapterError, match="truncated"):
        moelora.load_adapter(_base(), run / "adapter")


def test_evaluation_refuses_non_finite_scores(finished):
    _, runtime, model, _ = cli._load_run(str(finished))
    with torch.no_grad():
        for _, layer in moelora.moelora_layers(model):
            layer.lora_B.fill_(float("nan"))
    with pytest.raises(EvaluationError, match="not finite"):
        runtime.evaluate(runtime.task.test[:4])


# --- 7. values checked at load time --------------------------------------------------------------------

@pytest.mark.parametrize("override,message", [
    ("train.log_every=0", "train.log_every must be a finite number >= 1"),
    ("train.save_every=-1", "train.save_every must be a finite number >= 0"),
    ("train.eval_every=-2", "train.eval_every must be a finite number >= 0"),
    ("train.warmup_steps=-1", "train.warmup_steps must be a finite number >= 0"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints must be a finite number >= 1"),
    ("optim.lr=.inf", "optim.lr must be a finite number > 0"),
    ("adapter.alpha=.nan", "alpha must be a number > 0"),
    ("optim.betas=[0.9]", "optim.betas must be two numbers"),
    ("model.random_config.hidden_sise=32", None),
    ("data.options.labels=negative", None),
])
def test_bad_values_are_refused_before_any_work(tmp_path, override, message):
    if message is not None:
        with pytest.raises(ConfigError, match=message):
            load_config(SMOKE, [f"output_dir={tmp_path}/x", override])
        return
    # checked when the model or the data load, before any evaluation or training
    config = load_config(SMOKE, [f"output_dir={tmp_path}/x", override])
    with pytest.raises(moelora.MoELoRAError, match="hidden_sise|labels must be a list"):
        Trainer(config, progress=False).run()
    assert not (tmp_path / "x" / "eval_zero_shot.json").exists()


def test_targets_that_match_nothing_fail_before_the_zero_shot_evaluation(tmp_path):
    config = load_config(SMOKE, [f"output_dir={tmp_path}/x", "eval.zero_shot=true", "adapter.target_modules=q_proj"])
    with pytest.raises(ConfigError, match="a string is a regular expression that must match"):
        Trainer(config, progress=False).run()
    assert not (tmp_path / "x" / "eval_zero_shot.json").exists()


# --- 8. files and folders --------------------------------------------------------------------------------

def test_output_dir_that_is_a_file_and_bad_save_adapter_paths(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        Trainer(load_config(SMOKE, [f"output_dir={tmp_path / 'file'}", *FAST]), progress=False).run()
    model = moelora.wrap(_base(), moelora.MoELoRAConfig(num_experts=2, top_k=1))
    with pytest.raises(AdapterError, match="is a file"):
        moelora.save_adapter(model, tmp_path / "file")
    with pytest.raises(AdapterError, match="empty path"):
        moelora.save_adapter(model, "")


def test_non_utf8_and_empty_config_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"train:\n  steps: 3 \xff\n")
    with pytest.raises(ConfigError, match=r"bad.yaml, line 2: not UTF-8 text \(byte 18\)"):
        load_config(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here\n")
    with pytest.raises(ConfigError, match="is empty"):
        load_config(empty)


# --- 9. trust_remote_code ----------------------------------------------------------------------------------

def test_trust_remote_code_is_never_read_from_a_file(finished, tmp_path):
    with pytest.raises(ConfigError, match="--trust-remote-code"):
        load_config(SMOKE, ["model.trust_remote_code=true"])
    run = copy_run(finished, tmp_path)
    text = (run / "config.yaml").read_text()
    assert "trust_remote_code: false" in text
    (run / "config.yaml").write_text(text.replace("trust_remote_code: false", "trust_remote_code: true"))
    with pytest.raises(ConfigError, match="not read from configuration files"):
        cli._load_run(str(run))


# --- 10. pickling, saving and moving a wrapped model --------------------------------------------------------

def test_a_wrapped_model_pickles_and_saves_whole(tmp_path):
    model = moelora.wrap(_base(), moelora.MoELoRAConfig(num_experts=2, top_k=1))
    clone = pickle.loads(pickle.dumps(model))
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(clone(input_ids=ids).logits, model(input_ids=ids).logits)
    torch.save(model, tmp_path / "model.pt")
    from moelora.layers.linear import layer_of

    assert layer_of(clone.model.layers[0].self_attn.q_proj.lora_A) is clone.model.layers[0].self_attn.q_proj


def test_casting_after_the_first_step_is_a_clear_error():
    from moelora.optim import RiemannianAdamW, param_groups

    model = moelora.wrap(_base(), moelora.MoELoRAConfig(num_experts=2, top_k=1))
    opt = RiemannianAdamW(param_groups(model, lr=1e-3))
    ids = torch.tensor([[1, 2, 3, 4]])
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    model.to(torch.float64)
    model(input_ids=ids, labels=ids).loss.backward()
    with pytest.raises(RuntimeError, match="cast or moved after the optimizer's first step"):
        opt.step()


@pytest.mark.parametrize("suffix,content,line", [
    (".jsonl", b'{"text": "fine", "label": "positive"}\n{"text": "caf\xe9", "label": "negative"}\n', 2),
    (".csv", b"text,label\nfine,positive\ncaf\xe9,negative\n", 3),
])
def test_non_utf8_data_names_the_file_and_line(tmp_path, suffix, content, line):
    from moelora.finetune.data import MalformedRowError, load_task

    path = tmp_path / f"train{suffix}"
    path.write_bytes(content)
    with pytest.raises(MalformedRowError, match=rf"train{suffix}, line {line}: not UTF-8 text"):
        load_task("classification_file", train_file=str(path))


def test_a_read_only_output_dir_and_a_full_disk_are_clear_errors(tmp_path, monkeypatch):
    import os

    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o500)
    try:
        if os.access(locked, os.W_OK):  # running as a user who ignores permissions
            pytest.skip("this user can write to read-only folders")
        with pytest.raises(ConfigError, match="cannot write to output_dir"):
            Trainer(load_config(SMOKE, [f"output_dir={locked / 'run'}", *FAST]), progress=False).run()
    finally:
        os.chmod(locked, 0o700)


def test_a_full_disk_while_checkpointing_is_a_clear_error(tmp_path, monkeypatch):
    import errno

    from moelora.finetune import checkpoint

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_state", full)
    with pytest.raises(TrainingError, match="could not write the step-2 checkpoint.*No space left"):
        Trainer(smoke(tmp_path), progress=False).run()


def test_an_unwritable_output_dir_is_refused_before_loading(tmp_path, monkeypatch):
    import errno

    from moelora.finetune import trainer as trainer_module

    def refuse(path, text):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(trainer_module, "write_text_atomic", refuse)
    loaded = []
    monkeypatch.setattr(trainer_module, "load_base_for_run", lambda *a, **k: loaded.append(1))
    with pytest.raises(ConfigError, match="cannot write to output_dir .*Permission denied"):
        Trainer(smoke(tmp_path), progress=False).run()
    assert not loaded
