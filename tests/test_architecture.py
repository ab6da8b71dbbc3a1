"""The package's layout contract: the core imports alone, extras are named when missing, one adapter config,
the run config's documented keys and per-optimizer checks, the CLI's error handling, the trainer's steps."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import moelora
from moelora import ConfigError, MoELoRAConfig, MoELoRAError
from moelora.extras import MissingExtraError, require_extra
from moelora.finetune import cli
from moelora.finetune.run_config import (
    TRAIN_GATE_BACKWARD_POWER,
    OptimConfig,
    RunConfig,
    describe_keys,
    dump_config,
    load_config,
    replace_values,
)
from moelora.finetune.trainer import Trainer, TrainerCallback

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
APPLICATION = {"matplotlib", "yaml", "tqdm", "transformers", "numpy", "peft"}


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)


# --- the core alone --------------------------------------------------------------------------------------

def test_the_core_imports_no_application_dependency():
    proc = run_python(
        "import sys, torch\n"
        "before = set(sys.modules)\n"
        "import moelora, moelora.optim\n"
        f"print(sorted(set({sorted(APPLICATION)!r}) & (set(sys.modules) - before)))\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_the_public_names_stay_importable():
    for name in ("MoELoRAConfig", "wrap", "unwrap", "MoELoRALinear", "save_adapter", "load_adapter",
                 "read_adapter_config", "load_adapter_weights"):
        assert name in moelora.__all__ and hasattr(moelora, name)
    from moelora.optim import RiemannianAdamW, RiemannianSGD, param_groups  # noqa: F401


def test_a_missing_extra_is_named(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "yaml" else real(name, *a))
    with pytest.raises(MissingExtraError, match=r"'train' extra \(missing: yaml\).*pip install 'moelora\[train\]'"):
        require_extra("train", "the training command")


def test_the_command_line_names_the_missing_extra():
    # sys.modules[name] = None makes an installed package look absent to the import system
    proc = run_python("import sys; sys.modules['yaml'] = None\n"
                      "from moelora.__main__ import main; sys.exit(main(['train', '--help']))")
    assert proc.returncode == 2
    assert "pip install 'moelora[train]'" in proc.stderr and "Traceback" not in proc.stderr


# --- one adapter config ------------------------------------------------------------------------------------

def test_the_run_config_embeds_the_core_adapter_config():
    config = RunConfig()
    assert isinstance(config.adapter, MoELoRAConfig)
    # the training command's default gate power differs from the layer's, and only that
    core = dataclasses.asdict(MoELoRAConfig())
    assert dataclasses.asdict(config.adapter) == {**core, "gate_backward_power": TRAIN_GATE_BACKWARD_POWER}
    # a YAML adapter section that omits the gate power keeps the command's default
    assert load_config(None, ["adapter.rank=8"]).adapter.gate_backward_power == TRAIN_GATE_BACKWARD_POWER


def test_every_core_option_is_a_documented_key():
    rows = {key: (type_name, default, doc) for key, type_name, default, doc in describe_keys()}
    for f in dataclasses.fields(MoELoRAConfig):
        type_name, _, doc = rows[f"adapter.{f.name}"]
        assert doc, f"adapter.{f.name} has no documentation line"
    for key, (type_name, _, doc) in rows.items():
        assert type_name and doc, key
    assert rows["adapter.expert_compute"][0] == "'auto' | 'dense' | 'sparse'"
    assert rows["optim.betas"][2].endswith("(optim.name=adamw only)")


@pytest.mark.parametrize("override,value", [
    ("adapter.expert_compute=sparse", "sparse"),
    ("adapter.exclude_modules=[o_proj]", ["o_proj"]),
    ("adapter.track_router_stats=false", False),
    ("adapter.router_init_std=0.1", 0.1),
])
def test_every_core_option_is_reachable_with_set(override, value):
    key, _ = override.split("=", 1)
    config = load_config(SMOKE, [override])
    assert getattr(config.adapter, key.split(".")[1]) == value


def test_choices_are_checked_against_their_literal_type():
    with pytest.raises(ConfigError, match="adapter.expert_compute must be one of 'auto', 'dense', 'sparse', got 'fast'"):
        load_config(None, ["adapter.expert_compute=fast"])
    with pytest.raises(ConfigError, match="optim.preconditioner must be one of"):
        load_config(None, ["optim.preconditioner=shampoo"])


def test_keys_of_the_other_optimizer_are_refused_unless_left_at_their_default(tmp_path):
    with pytest.raises(ConfigError, match=r"optim\.betas applies only to optim\.name=adamw"):
        load_config(None, ["optim.name=sgd", "optim.betas=[0.9,0.99]"])
    with pytest.raises(ConfigError, match=r"optim\.b_from_updated_a applies only to optim\.name=adamw"):
        load_config(None, ["optim.name=sgd", "optim.b_from_updated_a=true"])
    with pytest.raises(ConfigError, match=r"optim\.momentum applies only to optim\.name=sgd"):
        load_config(None, ["optim.momentum=0.9"])
    # a resolved config.yaml of an SGD run lists the AdamW keys at their defaults: it loads again
    sgd = load_config(None, ["optim.name=sgd", "optim.momentum=0.9"])
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(sgd))
    assert load_config(path) == sgd
    assert yaml.safe_load(path.read_text())["optim"]["betas"] == OptimConfig().betas


def test_replace_values_types_and_validates_without_touching_the_original():
    base = RunConfig()
    changed = replace_values(base, {"optim.lr": 1, "adapter.rank": 8, "output_dir": "runs/x"})
    assert changed.optim.lr == 1.0 and isinstance(changed.optim.lr, float) and changed.adapter.rank == 8
    assert base.optim.lr == OptimConfig().lr and base.adapter.rank == 4
    with pytest.raises(ConfigError, match="unknown config key 'optim.learning_rate'"):
        replace_values(base, {"optim.learning_rate": 1e-3})
    with pytest.raises(ConfigError, match="adapter: top_k must satisfy"):
        replace_values(base, {"adapter.top_k": 50})


# --- the command line ---------------------------------------------------------------------------------------

def test_train_help_lists_every_key(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    for key, _, _, _ in describe_keys():
        assert f"  {key} (" in out
    assert "adapter.expert_compute ('auto' | 'dense' | 'sparse'; default auto)" in out


def test_print_config_prints_the_resolved_yaml(tmp_path, capsys):
    assert cli.main(["train", str(SMOKE), "--print-config", "--set", "adapter.expert_compute=sparse"]) == 0
    printed = capsys.readouterr().out
    (tmp_path / "c.yaml").write_text(printed)
    assert load_config(tmp_path / "c.yaml") == load_config(SMOKE, ["adapter.expert_compute=sparse"])


def test_cli_exits_2_naming_an_adamw_key_under_sgd(capsys):
    code = cli.main(["train", str(SMOKE), "--set", "optim.name=sgd", "--set", "optim.betas=[0.9,0.99]"])
    assert code == 2
    assert "optim.betas" in capsys.readouterr().err


def test_cli_reports_library_errors_in_one_line_and_lets_bugs_through(monkeypatch, capsys):
    def user_mistake(args):
        raise moelora.AdapterError("the adapter does not fit")

    monkeypatch.setitem(cli.COMMANDS, "train", user_mistake)
    assert cli.main(["train"]) == 1
    assert capsys.readouterr().err.strip() == "moelora: error: the adapter does not fit"

    def bug(args):
        raise ValueError("an internal invariant broke")

    monkeypatch.setitem(cli.COMMANDS, "train", bug)
    with pytest.raises(ValueError, match="internal invariant"):
        cli.main(["train"])


def test_library_errors_share_one_base_class():
    from moelora.finetune.data import DataError
    from moelora.finetune.errors import RunFolderError, TrainingError

    for cls in (ConfigError, moelora.AdapterError, DataError, TrainingError, RunFolderError, MissingExtraError):
        assert issubclass(cls, MoELoRAError)


# --- the trainer's steps ---------------------------------------------------------------------------------

class Recorder(TrainerCallback):
    def __init__(self):
        self.logs, self.evals, self.checkpoints = [], [], []

    def on_log(self, trainer, record):
        self.logs.append(record)

    def on_eval(self, trainer, split, step, result):
        self.evals.append((split, step, result.n))

    def on_checkpoint(self, trainer, step, path):
        self.checkpoints.append((step, path.name))


def _smoke(tmp_path, *overrides):
    return load_config(SMOKE, [f"output_dir={tmp_path / 'run'}", "train.steps=4", "train.save_every=2",
                               "train.eval_every=2", "train.log_every=1", "data.max_eval=8",
                               "train.eval_examples=4", *overrides])


def test_trainer_steps_callbacks_and_result(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    recorder = Recorder()
    result = Trainer(_smoke(tmp_path), progress=False, callbacks=[recorder]).run()
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert recorder.logs == lines  # every metrics.jsonl record, in order
    assert recorder.evals == [("zero-shot", 0, 8), ("validation", 2, 4), ("validation", 4, 4), ("test", 4, 8)]
    assert recorder.checkpoints == [(2, "step-000002"), (4, "step-000004")]
    assert result.steps == 4 and result.resumed_from is None and result.test is not None
    assert result.test.n == 8 and result.zero_shot is not None and result.zero_shot.n == 8
    assert result.validation is not None and result.validation.n == 4
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert result.summary == summary and summary["fine_tuned"]["value"] == result.test.value
    assert result.final_train_loss == [line for line in lines if "loss" in line][-1]["last_step_loss"]


def test_trainer_evaluate_without_the_test_split(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    recorder = Recorder()
    trainer = Trainer(_smoke(tmp_path, "eval.zero_shot=false", "adapter.expert_compute=sparse"), progress=False,
                      callbacks=[recorder])
    try:
        trainer.setup()
        assert all(layer.uses_sparse() for _, layer in moelora.moelora_layers(trainer.model))
        trainer.fit()
        result = trainer.evaluate(test=False)
    finally:
        trainer.close()
    assert result.test is None and [split for split, _, _ in recorder.evals] == ["validation", "validation"]
    assert not any(record.get("split") == "test" for record in recorder.logs)
    assert result.summary["fine_tuned"]["value"] == result.validation.value
