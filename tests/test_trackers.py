"""train.report_to: the events of metrics.jsonl and the routers' statistics reach the trackers."""

import json
from pathlib import Path

import pytest

from moelora import ConfigError
from moelora.finetune.cli import main
from moelora.finetune.run_config import load_config
from moelora.finetune.trackers import check_trackers, scalars

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
FAST = ["train.steps=4", "train.save_every=2", "train.eval_every=2", "train.log_every=1", "data.max_eval=8",
        "train.eval_examples=4"]


def read_events(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def test_tensorboard_event_files_hold_the_runs_events(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    run = tmp_path / "run"
    args = ["train", str(SMOKE), "--no-progress", "--set", f"output_dir={run}", "--set", "train.report_to=[tensorboard]"]
    assert main([*args, *sum((["--set", o] for o in FAST), [])]) == 0
    events = read_events(run / "tensorboard")
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if "loss" in m]
    assert [step for step, _ in events["train/loss"]] == [m["step"] for m in train]
    assert [value for _, value in events["train/loss"]] == pytest.approx([m["loss"] for m in train], rel=1e-6)
    assert [step for step, _ in events["validation/accuracy"]] == [2, 4]
    assert events["test/accuracy"][0][1] == pytest.approx(json.loads((run / "summary.json").read_text())
                                                          ["fine_tuned"]["value"])
    layers = [t for t in events if t.startswith("router/") and t.endswith("/entropy")]
    assert len(layers) == 8 and all(len(events[t]) == len(train) for t in layers)  # 2 blocks x q, k, v, o
    loads = [v for t in events if t.endswith("/max_load") for _, v in events[t]]
    assert all(1 / 4 - 1e-6 <= v <= 1 for v in loads)  # 4 experts: at least an even share


def test_an_unknown_or_missing_tracker_is_a_config_error_naming_it(tmp_path, monkeypatch, capsys):
    with pytest.raises(ConfigError, match="unknown tracker 'comet'"):
        load_config(SMOKE, [f"output_dir={tmp_path}", "train.report_to=[comet]"])
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError, match="the mlflow-skinny package is not installed: pip install mlflow-skinny"):
        check_trackers(["mlflow"])
    code = main(["train", str(SMOKE), "--set", f"output_dir={tmp_path}/x", "--set", "train.report_to=[mlflow]"])
    assert code == 2 and "pip install mlflow-skinny" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_scalars_of_each_kind_of_record():
    assert scalars({"step": 3, "loss": 1.5, "lr": 0.1, "tokens_per_s": 9.0}) == (
        3, {"train/loss": 1.5, "train/lr": 0.1, "train/tokens_per_s": 9.0})
    step, values = scalars({"step": 5, "split": "test", "metric": "exact_match", "value": 0.5, "interval": [0.4, 0.6],
                            "n": 10, "metrics": {"contains": 0.7, "loss": float("nan")}})
    assert step == 5 and values == {"test/exact_match": 0.5, "test/contains": 0.7}  # NaN left out


def test_where_events_are_reported_is_not_part_of_the_resume_identity():
    from moelora.finetune.identity import NOT_IDENTITY

    assert {"train.report_to", "train.tracker_project"} <= set(NOT_IDENTITY)
