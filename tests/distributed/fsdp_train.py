"""The training command's FSDP2 path, run by ``torchrun --nproc_per_node 2`` from ``tests/test_fsdp.py``:
an uninterrupted run, a run killed after its step-2 checkpoint then resumed (both with dropout: every
process draws its own masks), and a run without dropout to compare with one process.

    fsdp_train.py OUT_DIR SMOKE_CONFIG
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch.distributed as dist

from moelora.finetune import batching
from moelora.finetune.run_config import load_config
from moelora.finetune.trainer import Trainer

OVERRIDES = ["train.distributed=fsdp", "eval.zero_shot=false", "train.eval_every=0", "train.save_every=2",
             "train.steps=4", "train.log_every=1", "train.batch_size=8", "train.grad_accum=2",
             "adapter.dropout=0.1", "data.max_eval=16"]


def config(out: Path, name: str, *extra: str):
    return load_config(sys.argv[2], [f"output_dir={out / name}", *OVERRIDES, *extra])


def main() -> None:
    dist.init_process_group("gloo")  # one group for the three runs (each Trainer leaves it as it found it)
    out = Path(sys.argv[1])
    Trainer(config(out, "no-dropout", "adapter.dropout=0.0"), progress=False).run()
    Trainer(config(out, "full"), progress=False).run()
    original = batching.StepBatches.micro_batches

    def killed_at_step_3(self, step, *args):
        if step == 2:
            raise KeyboardInterrupt  # after the step-2 checkpoint
        return original(self, step, *args)

    batching.StepBatches.micro_batches = killed_at_step_3  # type: ignore[method-assign]
    try:
        Trainer(config(out, "resumed"), progress=False).run()
    except KeyboardInterrupt:
        pass
    batching.StepBatches.micro_batches = original  # type: ignore[method-assign]
    Trainer(config(out, "resumed"), progress=False).run(resume=True)
    dist.barrier()  # tearing gloo down while the peer still works can abort this process at exit
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
