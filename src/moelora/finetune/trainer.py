"""The training loop: one readable function from a ``RunConfig`` to a finished run folder.

Run folder (only process 0 writes):

    config.yaml            resolved configuration
    metrics.jsonl          one JSON object per event, each with "step" (training events have "loss")
    eval_zero_shot.json    held-out evaluation before training (kept across resumes)
    checkpoints/step-N/    adapter, other trainable weights, optimizer, scheduler, RNG and data position
    adapter/               adapter_config.json + adapter_model.safetensors of the final model
    summary.json, summary.md, *.png
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import atomic_dir, write_text_atomic
from ..config import MoELoRAConfig
from ..diagnostics import router_stats
from ..adapter import load_adapter_weights, save_adapter
from ..inject import wrap
from . import checkpoint as ckpt
from .batching import StepBatches
from .run_config import RunConfig, dump_config
from .distributed import DistributedContext, init_distributed, shutdown_distributed
from .loss import CausalLMAnswerLoss, SequenceClassificationLoss
from .base_models import load_base_for_run
from .optimizers import build_optimizer
from .schedule import build_scheduler
from .tasks import TaskRuntime

logger = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss, incompatible resume, ...); the message says why."""


def _identity(config: RunConfig) -> dict[str, Any]:
    """What a resumed run must share with the one that wrote the checkpoint."""
    return {"model": dataclasses.asdict(config.model), "adapter": dataclasses.asdict(config.adapter),
            "task": config.data.task}


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop events logged after the checkpoint we resume from (they will be produced again)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= last_step]
    write_text_atomic(path, "".join(line + "\n" for line in kept))


class Trainer:
    """Fine-tunes ``config.model`` on ``config.data`` with a MoE-LoRA adapter; see ``run``."""

    def __init__(self, config: RunConfig, progress: bool = True) -> None:
        self.config = config
        self.progress = progress
        self.run_dir = Path(config.output_dir)
        self.ctx: DistributedContext = DistributedContext()

    # ------------------------------------------------------------------------------------------ setup
    def _prepare_run_dir(self, resume: bool) -> tuple[int, Path | None]:
        """Check the folder against ``resume``; returns the step to start from and its checkpoint."""
        checkpoints = ckpt.list_checkpoints(self.run_dir / "checkpoints")
        if not resume:
            if checkpoints or (self.run_dir / "summary.json").exists():
                raise TrainingError(
                    f"{self.run_dir} already holds a run; pass --resume to continue it, or choose another "
                    f"output_dir (--set output_dir=...)"
                )
            return 0, None
        if not checkpoints:
            raise TrainingError(f"--resume: no checkpoint in {self.run_dir / 'checkpoints'}")
        step, path = checkpoints[-1]
        saved = json.loads((path / "trainer_state.json").read_text())["identity"]
        current = _identity(self.config)
        for key in ("model", "adapter", "task"):
            if saved[key] != current[key]:
                raise TrainingError(
                    f"--resume: the run in {self.run_dir} was trained with {key} = {saved[key]!r}, the "
                    f"configuration now says {current[key]!r}; resume with the same {key} or start a new run"
                )
        return step, path

    def _write(self, name: str, text: str) -> None:
        if self.ctx.is_main:
            write_text_atomic(self.run_dir / name, text)

    def _log(self, record: dict) -> None:
        if self.ctx.is_main:
            _append_jsonl(self.run_dir / "metrics.jsonl", record)

    # ------------------------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, step: int, model, optimizer, scheduler) -> None:
        if not self.ctx.is_main:
            return
        def fill(folder: Path) -> None:
            save_adapter(model, folder / "adapter")
            ckpt.save_other_trainable(model, folder)
            ckpt.save_state(optimizer.state_dict(), folder, "optimizer")
            ckpt.save_state({"scheduler": scheduler.state_dict(), "rng": ckpt.rng_state()}, folder, "loop_state")
            (folder / "trainer_state.json").write_text(
                json.dumps({"step": step, "identity": _identity(self.config)}, indent=2)
            )

        folder = self.run_dir / "checkpoints"
        atomic_dir(folder / f"step-{step:06d}", fill)
        ckpt.prune_checkpoints(folder, self.config.train.keep_checkpoints)

    def _load_checkpoint(self, path: Path, model, optimizer, scheduler) -> None:
        load_adapter_weights(model, path / "adapter")
        ckpt.load_other_trainable(model, path)
        optimizer.load_state_dict(ckpt.load_state(path, "optimizer"))
        loop_state = ckpt.load_state(path, "loop_state")
        scheduler.load_state_dict(loop_state["scheduler"])
        ckpt.set_rng_state(loop_state["rng"])

    # ------------------------------------------------------------------------------------------- run
    def run(self, resume: bool = False) -> dict[str, Any]:
        """Train (or continue training) and evaluate; returns the summary (on every process)."""
        self.ctx = init_distributed()
        try:
            return self._run(resume)
        finally:
            shutdown_distributed(self.ctx)

    def _run(self, resume: bool) -> dict[str, Any]:
        cfg, ctx = self.config, self.ctx
        tcfg = cfg.train
        micro_size = tcfg.batch_size // tcfg.grad_accum
        if micro_size < ctx.world_size:
            raise TrainingError(
                f"each micro-batch ({micro_size} = batch_size / grad_accum) must have at least one example per "
                f"process ({ctx.world_size} processes)"
            )
        start_step, resume_from = self._prepare_run_dir(resume)
        if ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if resume_from is not None:
                _truncate_metrics(self.run_dir / "metrics.jsonl", start_step)
            self._write("config.yaml", dump_config(cfg))
        torch.manual_seed(tcfg.seed)

        runtime = TaskRuntime.load(cfg)
        model, tokenizer = load_base_for_run(cfg, num_labels=runtime.task.num_labels)
        runtime.attach(model, tokenizer)

        zero_shot = None
        zero_shot_path = self.run_dir / "eval_zero_shot.json"
        if cfg.eval.zero_shot and not runtime.encoder:
            if zero_shot_path.is_file():
                zero_shot = json.loads(zero_shot_path.read_text())
            elif ctx.is_main:
                zero_shot = runtime.evaluate_test(progress=self.progress, label="zero-shot")
                self._write("eval_zero_shot.json", json.dumps(zero_shot))
            ctx.barrier()

        wrap(model, MoELoRAConfig(**dataclasses.asdict(cfg.adapter)))
        runtime.after_wrap(model)
        if cfg.model.gradient_checkpointing:
            # Non-reentrant checkpointing needs no input that requires grad (the base model is frozen).
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
                model.activation_checkpointing_enable({"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        optimizer = build_optimizer(model, cfg.optim)
        scheduler = build_scheduler(optimizer, tcfg.warmup_steps, tcfg.steps, tcfg.final_lr_ratio)
        if resume_from is not None:
            self._load_checkpoint(resume_from, model, optimizer, scheduler)
            logger.info("resumed from %s (step %d)", resume_from, start_step)

        loss_module: nn.Module = (SequenceClassificationLoss if runtime.encoder else CausalLMAnswerLoss)(model)
        if ctx.enabled:
            loss_module = torch.nn.parallel.DistributedDataParallel(loss_module, find_unused_parameters=False)
        plan = StepBatches(runtime.train_lengths(), tcfg.batch_size, tcfg.grad_accum, seed=tcfg.seed)

        model.train()
        bar = None
        if self.progress and ctx.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=tcfg.steps, initial=start_step, desc="train", dynamic_ncols=True)
        train_start = time.perf_counter()
        # Logged loss: the token-weighted mean over the steps since the previous log line.
        window_tokens, window_loss, window_targets, window_start = 0, 0.0, 0, time.perf_counter()
        last_loss = float("nan")
        for step in range(start_step, tcfg.steps):
            micro_batches = [runtime.collate_train(ids) for ids in plan.micro_batches(step, ctx.rank, ctx.world_size)]
            local_targets = sum(int(b["n_targets"]) for b in micro_batches)
            total_targets = int(ctx.sum(torch.tensor(float(local_targets))).item())
            loss_total = torch.zeros(())
            for i, batch in enumerate(micro_batches):
                sync = i == len(micro_batches) - 1
                context = loss_module.no_sync() if ctx.enabled and not sync else contextlib.nullcontext()
                with context:
                    loss_sum, _ = loss_module(**batch["inputs"])
                    # DDP averages gradients over processes, hence the world-size factor: the result is
                    # the mean over every target token of the global batch.
                    (loss_sum * (ctx.world_size / total_targets)).backward()
                loss_total += loss_sum.detach()
                window_tokens += int(batch["n_tokens"])
            loss_value = float(ctx.sum(loss_total)) / total_targets
            if not math.isfinite(loss_value):
                last = ckpt.list_checkpoints(self.run_dir / "checkpoints")
                where = f"the last good checkpoint is {last[-1][1]}" if last else "no checkpoint was written yet"
                raise TrainingError(
                    f"non-finite training loss ({loss_value}) at step {step + 1}; stopping ({where}). "
                    f"Try a lower optim.lr or optim.router_lr."
                )
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            last_loss = loss_value
            window_loss += loss_value * total_targets
            window_targets += total_targets
            done = step + 1

            if done % tcfg.log_every == 0 or done == tcfg.steps:
                now = time.perf_counter()
                tokens_per_s = float(ctx.sum(torch.tensor(float(window_tokens)))) / max(now - window_start, 1e-9)
                lr = optimizer.param_groups[0]["lr"]
                mean_loss = window_loss / window_targets
                record = {"step": done, "loss": mean_loss, "last_step_loss": loss_value, "lr": lr,
                          "tokens_per_s": tokens_per_s}
                window_tokens, window_loss, window_targets, window_start = 0, 0.0, 0, now
                entropies = [s["gate_entropy"] for s in router_stats(model).values()]
                if entropies:
                    record["gate_entropy"] = sum(entropies) / len(entropies)
                self._log(record)
                if bar is not None:
                    bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}")
            if bar is not None:
                bar.update(1)
            if tcfg.eval_every and done % tcfg.eval_every == 0 and done != tcfg.steps:
                if ctx.is_main:
                    result = runtime.evaluate_validation(progress=False)
                    self._log({"step": done, "split": "validation", **_metric_fields(result)})
                    model.train()
                ctx.barrier()
            if tcfg.save_every and done % tcfg.save_every == 0 and done != tcfg.steps:
                self._save_checkpoint(done, model, optimizer, scheduler)
        if bar is not None:
            bar.close()
        train_time = time.perf_counter() - train_start

        summary: dict[str, Any] = {}
        if ctx.is_main:
            self._save_checkpoint(tcfg.steps, model, optimizer, scheduler)
            save_adapter(model, self.run_dir / "adapter")
            validation = runtime.evaluate_validation(progress=False) if tcfg.eval_every else None
            if validation is not None:
                self._log({"step": tcfg.steps, "split": "validation", **_metric_fields(validation)})
            final = runtime.evaluate_test(progress=self.progress, label="fine-tuned")
            self._log({"step": tcfg.steps, "split": "test", **_metric_fields(final)})
            from .run_summary import write_report

            summary = write_report(
                self.run_dir, cfg, runtime, zero_shot=zero_shot, final=final, train_time_s=train_time,
                last_loss=last_loss, router=router_stats(model), resumed_from=start_step or None,
            )
        ctx.barrier()
        return summary


def _metric_fields(result: dict) -> dict:
    return {k: result[k] for k in ("metric", "value", "interval", "n") if k in result}


