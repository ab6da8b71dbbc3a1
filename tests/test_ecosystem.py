"""Trackers and lm-evaluation-harness that bring many packages: wandb (offline), MLflow (a local file store),
trackio (its local store) and lm-eval (a local task on fixture data).

These tests are marked ``ecosystem`` and left out of ``make test``; ``make test-ecosystem`` runs them in a
virtual environment of their own that has every package, where a missing package is a failure (they
import them directly), never a skip.
"""

import json
import os
from pathlib import Path

import pytest

from moelora.finetune.cli import main

pytestmark = pytest.mark.ecosystem

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
FAST = ["train.steps=4", "train.save_every=2", "train.eval_every=2", "train.log_every=1", "data.max_eval=8",
        "train.eval_examples=4"]


def train(run: Path, tracker: str) -> list[dict]:
    args = ["train", str(SMOKE), "--no-progress", "--set", f"output_dir={run}", "--set", f"train.report_to=[{tracker}]"]
    assert main([*args, *sum((["--set", o] for o in FAST), [])]) == 0
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def test_wandb_offline_run_holds_the_events(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    metrics = train(tmp_path / "run", "wandb")
    # The offline run file is a log of protobuf records (read by `wandb sync`); its history items hold each
    # key and the JSON text of each value as they were logged.
    [path] = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    data = path.read_bytes()
    for m in metrics:
        if "loss" in m:
            assert json.dumps(m["loss"]).encode() in data, m
    assert b"train/loss" in data and b"test/accuracy" in data
    assert b"router/model.layers.0.self_attn.q_proj/entropy" in data


def test_mlflow_file_store_holds_the_events(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    metrics = train(tmp_path / "run", "mlflow")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(tmp_path / "run" / "mlruns").resolve().as_uri())
    [experiment] = [e for e in client.search_experiments() if e.name == "moelora"]
    [run] = client.search_runs([experiment.experiment_id])
    history = client.get_metric_history(run.info.run_id, "train/loss")
    expected = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    assert [h.step for h in history] == [s for s, _ in expected]
    assert [h.value for h in history] == pytest.approx([v for _, v in expected], rel=1e-6)
    assert client.get_metric_history(run.info.run_id, "test/accuracy")
    assert run.data.params["optim.preconditioner"] == '"riemannian"'


def test_trackio_local_store_holds_the_events(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    metrics = train(tmp_path / "run", "trackio")
    from trackio.sqlite_storage import SQLiteStorage

    [name] = SQLiteStorage.get_runs("moelora")
    logs = SQLiteStorage.get_logs("moelora", name)
    logged = [(entry["step"], entry["train/loss"]) for entry in logs if "train/loss" in entry]
    expected = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    assert [s for s, _ in logged] == [s for s, _ in expected]
    assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6)


def test_lm_eval_harness_scores_a_run_on_a_local_task(tmp_path, capsys):
    assert train(tmp_path / "run", "tensorboard")
    capsys.readouterr()  # the training command's summary
    data = tmp_path / "tiny_mc.jsonl"
    rows = [{"question": f"Is {w} a happy word?", "choices": ["yes", "no"], "answer": i % 2}
            for i, w in enumerate(["joy", "grief", "delight", "gloom", "cheer", "sorrow"])]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_mc.yaml").write_text(f"""task: moelora_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
""")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    code = main(["eval", str(tmp_path / "run"), "--harness", "moelora_tiny_mc", "--harness-include", str(tasks),
                 "--device", "cpu"])
    assert code == 0
    results = json.loads(capsys.readouterr().out)
    assert 0 <= results["moelora_tiny_mc"]["acc,none"] <= 1
    assert main(["eval", str(tmp_path / "run"), "--harness", "no_such_task", "--harness-include", str(tasks)]) == 2
    assert "unknown lm-eval task" in capsys.readouterr().err
