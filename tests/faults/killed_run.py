"""A training run that kills itself with SIGKILL at a chosen point, for ``tests/test_reliability.py``.

    killed_run.py OUT_DIR POINT [--resume]

POINT: ``none`` (run to the end), ``step`` (before step 4's batch), ``checkpoint`` (halfway through writing
the step-4 checkpoint: its adapter written, the rest not), ``final-eval`` (during the final test
evaluation).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from moelora.finetune import batching, checkpoint, tasks
from moelora.finetune.run_config import load_config
from moelora.finetune.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
OVERRIDES = ["train.steps=6", "train.save_every=2", "train.eval_every=2", "train.eval_examples=8",
             "train.log_every=1", "data.max_eval=16", "adapter.dropout=0.1", "eval.zero_shot=true"]


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    out, point = Path(sys.argv[1]), sys.argv[2]
    resume = "--resume" in sys.argv
    if point == "step":
        original = batching.StepBatches.micro_batches

        def micro_batches(self, step, *args):
            if step == 3:
                die()
            return original(self, step, *args)

        batching.StepBatches.micro_batches = micro_batches  # type: ignore[method-assign]
    elif point == "checkpoint":
        original_save = checkpoint.save_state

        def save_state(obj, directory, name):
            if name == "optimizer" and "step-000004" in str(directory.name):
                die()
            return original_save(obj, directory, name)

        checkpoint.save_state = save_state  # type: ignore[assignment]
    elif point == "final-eval":
        original_eval = tasks.TaskRuntime.evaluate

        def evaluate(self, examples, progress=False, label="eval"):
            if label == "fine-tuned":
                die()
            return original_eval(self, examples, progress, label)

        tasks.TaskRuntime.evaluate = evaluate  # type: ignore[method-assign]
    os.chdir(ROOT)
    config = load_config(ROOT / "configs" / "smoke.yaml", [f"output_dir={out}", *OVERRIDES])
    Trainer(config, progress=False).run(resume=resume)


if __name__ == "__main__":
    main()
