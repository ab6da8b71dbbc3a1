"""The trainer: from a ``RunConfig`` to a finished run folder, in three steps.

    trainer = Trainer(config, callbacks=[...])
    result = trainer.run()            # = setup(), fit(), evaluate()

- ``setup(resume)``: the run folder, the task, the base model (and its zero-shot evaluation), the
  adapter, the optimizer and schedule, and, when resuming, the last checkpoint;
- ``fit()``: the optimizer steps, with logging, periodic validation and checkpoints;
- ``evaluate(test=True)``: the final checkpoint and adapter, the final validation and held-out test
  evaluations, the summary; returns a ``TrainResult``.

Callbacks (``TrainerCallback``) see every log record, evaluation and checkpoint on the main process.

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
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..adapter import load_adapter_weights, record_training, save_adapter
from ..atomic import atomic_dir, replace_dir, write_text_atomic
from ..diagnostics import router_stats
from ..errors import MoELoRAError
from ..extras import require_extra
from ..inject import find_targets, wrap
from ..optim import share_gate_statistics
from . import checkpoint as ckpt
from .base_models import load_base_for_run
from .batching import StepBatches
from .devices import autocast, check_precision, grad_scaler, resolve_device
from .distributed import DistributedContext, init_distributed, shard_model, shutdown_distributed
from .errors import ConfigError, TrainingError
from .eval import EvalResult
from .identity import differences, run_identity
from .loss import CausalLMAnswerLoss, SequenceClassificationLoss
from .optimizers import build_optimizer
from .quantization import prepare_for_kbit_training
from .run_config import RunConfig, dump_config
from .schedule import build_scheduler
from .tasks import TaskRuntime
from .trackers import Trackers

__all__ = ["TrainResult", "Trainer", "TrainerCallback", "TrainingError"]

logger = logging.getLogger(__name__)


class TrainerCallback:
    """Hooks into a ``Trainer``; override the ones you need. Called on the main process only."""

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """A record was appended to ``metrics.jsonl`` (training, validation or test event)."""

    def on_eval(self, trainer: Trainer, split: str, step: int, result: EvalResult) -> None:
        """An evaluation finished: ``split`` is ``"zero-shot"``, ``"validation"`` or ``"test"``."""

    def on_checkpoint(self, trainer: Trainer, step: int, path: Path) -> None:
        """A checkpoint was written to ``path``."""


@dataclass
class TrainResult:
    """What a finished run produced (on processes other than the main one, ``summary`` is empty and the
    evaluations are ``None``).

    Attributes:
        run_dir: the run folder.
        steps: optimizer steps of the finished run.
        resumed_from: the step the last sitting started from (``None`` for an uninterrupted run).
        train_time_s: seconds spent in ``fit``, over every sitting of the run.
        final_train_loss: the training loss of the last step.
        zero_shot: the base model's held-out evaluation, when configured.
        validation: the final validation evaluation, when ``train.eval_every`` is set.
        test: the fine-tuned model's held-out evaluation (``None`` after ``evaluate(test=False)``).
        summary: the contents of ``summary.json``.
    """

    run_dir: Path
    steps: int
    resumed_from: int | None
    train_time_s: float
    final_train_loss: float
    zero_shot: EvalResult | None
    validation: EvalResult | None
    test: EvalResult | None
    summary: dict[str, Any]


class RunAlreadyComplete(MoELoRAError):
    """``--resume`` of a run that has already finished: nothing to do."""


def _check_overwritable(folder: Path) -> None:
    """Refuse to clear the working directory, one of its parents or the home folder with ``--overwrite``."""
    resolved, cwd = folder.resolve(), Path.cwd().resolve()
    if resolved == Path(resolved.anchor) or resolved == Path.home().resolve() or cwd.is_relative_to(resolved):
        raise ConfigError(f"--overwrite would delete {resolved}, which holds the working directory or is the "
                          f"home or root folder: choose an output_dir of its own")


def _check_writable(folder: Path) -> None:
    """Create ``folder`` and write a probe into it, so that a read-only or full disk shows before training."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(folder / ".write-probe", "ok\n")
        (folder / ".write-probe").unlink()
    except OSError as err:
        raise ConfigError(f"cannot write to output_dir {folder}: {err.strerror or err}") from None


def _count_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, lines: int) -> None:
    """Keep the first ``lines`` events, those logged before the checkpoint we resume from: the events after
    it (and a line a kill cut short) will be produced again, once."""
    if not path.is_file():
        return
    text = path.read_text()
    if text and not text.endswith("\n"):
        logger.warning("%s ends with a partial line (the run was killed while writing it): dropped", path)
    kept = text.splitlines()[:lines]
    write_text_atomic(path, "".join(line + "\n" for line in kept))


def _metric_fields(result: EvalResult) -> dict[str, Any]:
    fields = ("metric", "value", "interval", "n") + (("metrics",) if result.per_example else ())
    return {k: v for k, v in result.to_dict(per_example=False).items() if k in fields}


class _LossWindow:
    """The logged loss: the token-weighted mean over the steps since the previous log line (kept in
    checkpoints, so that a resumed run logs what an uninterrupted one would)."""

    def __init__(self) -> None:
        self.reset(time.perf_counter())

    def state(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "loss_sum": self.loss_sum, "targets": self.targets}

    def load(self, state: dict[str, Any]) -> None:
        self.tokens, self.loss_sum, self.targets = int(state["tokens"]), float(state["loss_sum"]), int(state["targets"])

    def reset(self, now: float) -> None:
        self.tokens, self.loss_sum, self.targets, self.start = 0, 0.0, 0, now

    def add(self, loss: float, targets: int, tokens: int) -> None:
        self.loss_sum += loss * targets
        self.targets += targets
        self.tokens += tokens

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / self.targets


class Trainer:
    """Fine-tunes ``config.model`` on ``config.data`` with a MoE-LoRA adapter; see the module docstring."""

    def __init__(self, config: RunConfig, progress: bool = True,
                 callbacks: Sequence[TrainerCallback] = ()) -> None:
        self.config = config
        self.progress = progress
        self.callbacks = list(callbacks)
        self.run_dir = Path(config.output_dir)
        self.ctx: DistributedContext = DistributedContext()
        self._distributed = False
        # set by setup()
        self.runtime: TaskRuntime | None = None
        self.model: Any = None  # the transformers model being fine-tuned
        self.tokenizer: Any = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self.start_step = 0
        self.zero_shot: EvalResult | None = None
        self.device = torch.device("cpu")
        self.sharded = False  # FSDP2 over several processes (train.distributed=fsdp)
        self.sharding: dict[str, int] | None = None
        self.scaler: torch.amp.GradScaler | None = None
        self._loss_module: nn.Module | None = None
        self._plan: StepBatches | None = None
        self._train_time = 0.0  # seconds in fit, every sitting of the run
        self._train_time_before = 0.0  # ... before this sitting (from the checkpoint resumed)
        self._fit_start: float | None = None
        self._window = _LossWindow()
        self._identity: dict[str, Any] = {}
        self._last_loss = float("nan")
        self._trackers: Trackers | None = None  # train.report_to, on the main process

    # ------------------------------------------------------------------------------------- the whole run
    def run(self, resume: bool = False, overwrite: bool = False) -> TrainResult:
        """Train (or continue training) and evaluate: ``setup``, ``fit``, ``evaluate``."""
        try:
            self.setup(resume, overwrite)
            self.fit()
            result = self.evaluate()
        except BaseException:
            self.close()
            raise
        self.close(wait_for_peers=True)
        return result

    def close(self, wait_for_peers: bool = False) -> None:
        """Close the trackers; leave the process group that ``setup`` joined (a no-op for a single process).
        ``wait_for_peers``: meet the other processes first (a run that ended normally)."""
        if self._trackers is not None:
            self._trackers.close()
            self._trackers = None
        if self._distributed:
            shutdown_distributed(self.ctx, wait_for_peers=wait_for_peers)
            self._distributed = False

    # ----------------------------------------------------------------------------------------- setup
    def setup(self, resume: bool = False, overwrite: bool = False) -> None:
        """Everything before the first step; under ``torchrun`` this joins the process group.

        A new run needs an empty (or absent) ``output_dir``, or ``overwrite`` to clear it; ``resume``
        continues from the newest valid checkpoint, refusing any difference in what the result depends on.
        """
        cfg = self.config
        require_extra("train", "a training run's plots", ("matplotlib",))  # before hours of training, not after
        if not self._distributed:
            self.ctx, self._distributed = init_distributed(), True
        ctx, tcfg = self.ctx, cfg.train
        self.device = resolve_device(tcfg.device, ctx.local_rank, ctx.enabled)
        self.sharded = ctx.enabled and tcfg.distributed == "fsdp"
        check_precision(tcfg.precision, self.device)
        micro_size = tcfg.batch_size // tcfg.grad_accum
        if micro_size < ctx.world_size:
            raise TrainingError(
                f"each micro-batch ({micro_size} = batch_size / grad_accum) must have at least one example per "
                f"process ({ctx.world_size} processes)"
            )
        self.start_step, resume_from, saved = self._prepare_run_dir(resume, overwrite)
        runtime = self.runtime = TaskRuntime.load(cfg)
        self._identity = run_identity(cfg, runtime.task)
        if resume_from is not None:
            self._check_resume(saved, self.start_step)
        if ctx.is_main:
            _check_writable(self.run_dir)
            if resume_from is not None:
                _truncate_metrics(self.run_dir / "metrics.jsonl", int(saved["metrics_lines"]))
            self._write("config.yaml", dump_config(cfg))
            if tcfg.report_to:
                self._trackers = Trackers(tcfg.report_to, self.run_dir, tcfg.tracker_project, cfg.to_dict())
        torch.manual_seed(tcfg.seed)

        model: Any
        model, self.tokenizer = load_base_for_run(cfg, num_labels=runtime.task.num_labels, device=self.device,
                                                  processor=runtime.images)
        self.model = model
        runtime.attach(model, self.tokenizer)
        find_targets(model, cfg.adapter)  # a target list that matches nothing fails before the evaluation
        if cfg.model.quantization != "none":
            prepare_for_kbit_training(model, cfg.model.gradient_checkpointing)
        self.zero_shot = self._zero_shot()

        # The adapters are created on the base's device; an encoder's new head trains and is saved with them.
        extra = [m for m in runtime.modules_to_save(model) if m not in cfg.adapter.modules_to_save]
        wrap(model, dataclasses.replace(cfg.adapter, modules_to_save=[*cfg.adapter.modules_to_save, *extra]))
        if cfg.model.gradient_checkpointing:
            # Non-reentrant checkpointing needs no input that requires grad (the base model is frozen).
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
                model.activation_checkpointing_enable({"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.sharded:  # before the optimizer, which must see the sharded (DTensor) parameters
            if runtime.encoder or cfg.model.quantization != "none":
                raise ConfigError("train.distributed=fsdp shards causal language models with a floating-point "
                                  "base; use train.distributed=ddp for encoders and quantised bases")
            self.sharding = shard_model(model, self.device, ctx.world_size)
            logger.info("FSDP2: %s", self.sharding)
        self.optimizer = build_optimizer(model, cfg.optim)
        self.scaler = grad_scaler(tcfg.precision, self.device)
        self.scheduler = build_scheduler(self.optimizer, tcfg.warmup_steps, tcfg.steps, tcfg.final_lr_ratio)
        if resume_from is not None:
            self._load_checkpoint(resume_from)
            logger.info("resumed from %s (step %d)", resume_from, self.start_step)

        loss_module: nn.Module = (SequenceClassificationLoss if runtime.encoder else CausalLMAnswerLoss)(model)
        if ctx.enabled and not self.sharded:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            loss_module = DistributedDataParallel(loss_module, device_ids=device_ids, find_unused_parameters=False)
            share_gate_statistics(model)  # every replica preconditions with the same gate statistics
        self._loss_module = loss_module
        self._plan = StepBatches(runtime.train_lengths(), tcfg.batch_size, tcfg.grad_accum, seed=tcfg.seed)

    def _prepare_run_dir(self, resume: bool, overwrite: bool) -> tuple[int, Path | None, dict[str, Any]]:
        """Check the folder against ``resume`` / ``overwrite``; returns the step to start from, its checkpoint
        and that checkpoint's trainer state (empty for a new run)."""
        folder = self.run_dir
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"output_dir {folder} is a file, not a folder: choose another output_dir")
        if resume and overwrite:
            raise ConfigError("--resume continues the run in output_dir and --overwrite replaces it: pass one")
        if not resume:
            contents = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
            if contents and not overwrite:
                raise TrainingError(
                    f"{folder} is not empty (it holds {', '.join(contents[:5])}{', ...' if len(contents) > 5 else ''}); "
                    f"pass --resume to continue the run in it, --overwrite to replace it, or choose another "
                    f"output_dir (--set output_dir=...)"
                )
            if contents and self.ctx.is_main:
                _check_overwritable(folder)
                shutil.rmtree(folder)
            self.ctx.barrier()
            return 0, None, {}
        found = ckpt.recover_checkpoints(folder / "checkpoints") if self.ctx.is_main else None
        found = self.ctx.gather(found)[0]  # every process resumes from what process 0 chose
        if not found:
            raise TrainingError(f"--resume: no valid checkpoint in {folder / 'checkpoints'}")
        step, path, state = found
        return step, Path(path), state

    def _check_resume(self, saved: dict[str, Any], step: int) -> None:
        """Refuse a resume whose configuration or data differ from the run's, listing each difference."""
        cfg = self.config
        changed = differences(saved["identity"], self._identity)
        if changed:
            raise ConfigError(
                f"--resume: the run in {self.run_dir} was trained with different settings; resume with the "
                f"same ones or start a new run:\n  " + "\n  ".join(changed)
            )
        if saved["sharded"] != self.sharded:
            raise TrainingError(
                f"--resume: the run in {self.run_dir} was checkpointed {'with' if saved['sharded'] else 'without'} "
                f"FSDP2 sharding (train.distributed=fsdp over several processes); resume it the same way"
            )
        planned = int(saved["steps"])
        if cfg.train.steps < step:
            raise ConfigError(f"--resume: the run is at step {step}; train.steps={cfg.train.steps} is fewer")
        if cfg.train.steps != planned and cfg.train.final_lr_ratio != 1.0:
            raise ConfigError(
                f"--resume: the run was planned for train.steps={planned} and its learning rate decays to "
                f"final_lr_ratio={cfg.train.final_lr_ratio:g} at that step: continuing to {cfg.train.steps} would "
                f"follow a schedule its first steps did not. Resume with train.steps={planned}, or start a new run "
                f"(only a constant schedule, final_lr_ratio=1.0, lets train.steps change)"
            )
        if step == cfg.train.steps and (self.run_dir / "summary.json").is_file():
            raise RunAlreadyComplete(f"{self.run_dir} is already complete ({step} steps): nothing to resume")

    def _zero_shot(self) -> EvalResult | None:
        """The base model's held-out evaluation: computed once, then kept in the run folder across resumes."""
        assert self.runtime is not None
        if not self.config.eval.zero_shot or self.runtime.encoder:
            return None
        path = self.run_dir / "eval_zero_shot.json"
        result = None
        if path.is_file():
            result = EvalResult.from_dict(json.loads(path.read_text()))
        elif self.ctx.is_main:
            with self._autocast():
                result = self.runtime.evaluate_test(progress=self.progress, label="zero-shot")
            self._write("eval_zero_shot.json", json.dumps(result.to_dict()))
            self._notify_eval("zero-shot", 0, result)
        self.ctx.barrier()
        return result

    # ------------------------------------------------------------------------------------------- fit
    def fit(self) -> None:
        """The optimizer steps from ``start_step`` to ``train.steps``."""
        if self.model is None:
            raise TrainingError("Trainer.fit() needs Trainer.setup() first")
        tcfg, ctx = self.config.train, self.ctx
        self.model.train()
        bar = None
        if self.progress and ctx.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=tcfg.steps, initial=self.start_step, desc="train", dynamic_ncols=True)
        self._fit_start = time.perf_counter()
        window = self._window
        window.start = self._fit_start
        for step in range(self.start_step, tcfg.steps):
            loss, targets, tokens = self._train_step(step)
            window.add(loss, targets, tokens)
            done = step + 1
            if done % tcfg.log_every == 0 or done == tcfg.steps:
                self._log_training(done, loss, window, bar)
            if bar is not None:
                bar.update(1)
            if tcfg.eval_every and done % tcfg.eval_every == 0 and done != tcfg.steps:
                if self._evaluates:
                    self._validate(done)
                    self.model.train()
                ctx.barrier()
            if tcfg.save_every and done % tcfg.save_every == 0 and done != tcfg.steps:
                self._save_checkpoint(done)
        if bar is not None:
            bar.close()
        self._train_time = self._elapsed()
        self._fit_start = None

    def _train_step(self, step: int) -> tuple[float, int, int]:
        """One optimizer step; returns (mean loss over the global batch, target count, token count)."""
        assert self.runtime is not None and self._plan is not None and self._loss_module is not None
        assert self.optimizer is not None
        ctx, loss_module = self.ctx, self._loss_module
        micro_batches = [self.runtime.collate_train(ids)
                         for ids in self._plan.micro_batches(step, ctx.rank, ctx.world_size)]
        local_targets = sum(int(b["n_targets"]) for b in micro_batches)
        total_targets = int(ctx.sum(torch.tensor(float(local_targets), device=self.device)).item())
        loss_total = torch.zeros((), device=self.device)
        tokens = 0
        for i, batch in enumerate(micro_batches):
            sync = i == len(micro_batches) - 1
            # DDP: all-reduce once, after the last micro-batch. FSDP2 reduce-scatters every backward pass into
            # the sharded gradients, which accumulate.
            context = (cast(DistributedDataParallel, loss_module).no_sync()
                       if ctx.enabled and not self.sharded and not sync else contextlib.nullcontext())
            with context:
                inputs = {k: v.to(self.device, non_blocking=True) for k, v in batch["inputs"].items()}
                with self._autocast():
                    loss_sum, _ = loss_module(**inputs)
                # DDP averages gradients over processes, hence the world-size factor: the result is the
                # mean over every target token of the global batch.
                loss = loss_sum * (ctx.world_size / total_targets)
                (loss if self.scaler is None else self.scaler.scale(loss)).backward()
            loss_total += loss_sum.detach()
            tokens += int(batch["n_tokens"])
        loss_value = float(ctx.sum(loss_total)) / total_targets
        if not math.isfinite(loss_value):
            last = ckpt.list_checkpoints(self.run_dir / "checkpoints")
            where = f"the last good checkpoint is {last[-1][1]}" if last else "no checkpoint was written yet"
            raise TrainingError(
                f"non-finite training loss ({loss_value}) at step {step + 1}; stopping ({where}). "
                f"Try a lower optim.lr or optim.router_lr."
            )
        if self.scaler is None:
            self.optimizer.step()
        else:  # unscales the gradients first (the optimizer clips the routers on true values); skips inf steps
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._last_loss = loss_value
        return loss_value, total_targets, tokens

    def _log_training(self, done: int, loss: float, window: _LossWindow, bar: Any) -> None:
        assert self.optimizer is not None and self.model is not None
        now = time.perf_counter()
        tokens = self.ctx.sum(torch.tensor(float(window.tokens), device=self.device))
        tokens_per_s = float(tokens) / max(now - window.start, 1e-9)
        lr = self.optimizer.param_groups[0]["lr"]
        record: dict[str, Any] = {"step": done, "loss": window.mean_loss, "last_step_loss": loss, "lr": lr,
                                  "tokens_per_s": tokens_per_s}
        window.reset(now)
        entropies = [s["gate_entropy"] for s in router_stats(self.model).values()]
        if entropies:
            record["gate_entropy"] = sum(entropies) / len(entropies)
        self._log(record)
        if bar is not None:
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}")

    def _validate(self, step: int) -> EvalResult:
        assert self.runtime is not None
        with self._autocast():
            result = self.runtime.evaluate_validation(progress=False)
        self._log({"step": step, "split": "validation", **_metric_fields(result)})
        self._notify_eval("validation", step, result)
        return result

    # -------------------------------------------------------------------------------------- evaluate
    def evaluate(self, test: bool = True) -> TrainResult:
        """Final checkpoint and adapter, final validation (when ``train.eval_every`` is set) and, with
        ``test``, the held-out test evaluation; then the summary files. Returns the ``TrainResult``."""
        if self.model is None or self.runtime is None:
            raise TrainingError("Trainer.evaluate() needs Trainer.setup() and Trainer.fit() first")
        steps = self.config.train.steps
        validation = final = None
        summary: dict[str, Any] = {}
        self._save_checkpoint(steps)
        if self.ctx.is_main or self.sharded:  # sharded experts are gathered by every process, written by one
            save_adapter(self.model, self.run_dir / "adapter", training=self._training_record())
        if self._evaluates:
            validation = self._validate(steps) if self.config.train.eval_every else None
            if test:
                with self._autocast():
                    final = self.runtime.evaluate_test(progress=self.progress and self.ctx.is_main,
                                                       label="fine-tuned")
                self._log({"step": steps, "split": "test", **_metric_fields(final)})
                self._notify_eval("test", steps, final)
        if self.ctx.is_main:
            reported = final or validation
            if reported is not None:
                record_training(self.run_dir / "adapter", self._training_record(reported))
                from .run_summary import write_report

                summary = write_report(
                    self.run_dir, self.config, self.runtime, zero_shot=self.zero_shot, final=reported,
                    train_time_s=self._train_time, last_loss=self._last_loss, router=router_stats(self.model),
                    resumed_from=self.start_step or None, sharding=self.sharding,
                )
        self.ctx.barrier()
        return TrainResult(
            run_dir=self.run_dir, steps=steps, resumed_from=self.start_step or None, train_time_s=self._train_time,
            final_train_loss=self._last_loss, zero_shot=self.zero_shot, validation=validation, test=final,
            summary=summary,
        )

    def _training_record(self, result: EvalResult | None = None) -> dict[str, Any]:
        """What the adapter's model card says about its training (and its held-out result, when known)."""
        cfg, task = self.config, self.runtime.task if self.runtime else None
        record: dict[str, Any] = {
            "data": f"{cfg.data.task}" + (f" ({task.description})" if task and task.description else ""),
            "steps": cfg.train.steps, "batch_size": cfg.train.batch_size,
            "optimizer": f"{cfg.optim.name}, preconditioner {cfg.optim.preconditioner}, lr {cfg.optim.lr:g}",
            "precision": cfg.train.precision,
        }
        if result is not None:
            record["metrics"] = {f"{result.metric} (held-out, n={result.n})": result.value,
                                 **{k: v for k, v in result.metrics.items() if k != result.metric}}
            if self.zero_shot is not None:
                record["metrics"][f"{self.zero_shot.metric} zero-shot"] = self.zero_shot.value
        return record

    # ------------------------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, step: int) -> None:
        """``checkpoints/step-N/``: written whole or not at all. Every process's random state is kept
        (their dropout masks differ); under FSDP2 the optimizer and adapter state are written shard by
        shard (``torch.distributed.checkpoint``, the ``sharded/`` subfolder), the adapter gathered."""
        model, optimizer, scheduler = self.model, self.optimizer, self.scheduler
        assert model is not None and optimizer is not None
        rng = self.ctx.gather(ckpt.rng_state())  # a collective in a multi-process job
        folder = self.run_dir / "checkpoints"
        final = folder / f"step-{step:06d}"
        partial = folder / f".step-{step:06d}.sharded-partial"
        if self.sharded:
            if self.ctx.is_main:
                shutil.rmtree(partial, ignore_errors=True)
                partial.mkdir(parents=True)
            self.ctx.barrier()
            ckpt.save_sharded(model, optimizer, partial / "sharded")
            save_adapter(model, partial / "adapter")  # gathers on every process, process 0 writes
        if not self.ctx.is_main:
            self.ctx.barrier()
            return

        def fill(target: Path) -> None:
            if not self.sharded:
                save_adapter(model, target / "adapter")
                ckpt.save_other_trainable(model, target)
                ckpt.save_state(optimizer.state_dict(), target, "optimizer")
            loop_state: dict[str, Any] = {"scheduler": scheduler.state_dict(), "rng_per_process": rng,
                                          "loss_window": self._window.state(), "train_time_s": self._elapsed()}
            if self.scaler is not None:
                loop_state["grad_scaler"] = self.scaler.state_dict()
            ckpt.save_state(loop_state, target, "loop_state")
            (target / "trainer_state.json").write_text(
                json.dumps({"step": step, "steps": self.config.train.steps, "identity": self._identity,
                            "sharded": self.sharded, "metrics_lines": _count_lines(self.run_dir / "metrics.jsonl")},
                           indent=2)
            )

        try:
            if self.sharded:  # the other processes wrote their shards into ``partial``
                fill(partial)
                path = replace_dir(partial, final)
            else:
                path = atomic_dir(final, fill)
        except OSError as err:  # a full disk, a lost mount: the previous checkpoint is still whole
            raise TrainingError(f"could not write the step-{step} checkpoint in {folder}: {err.strerror or err}; "
                                f"the previous checkpoints are intact (free space, then --resume)") from None
        ckpt.prune_checkpoints(folder, self.config.train.keep_checkpoints)
        if self.ctx.enabled:
            self.ctx.barrier()
        for callback in self.callbacks:
            callback.on_checkpoint(self, step, path)

    def _load_checkpoint(self, path: Path) -> None:
        assert self.model is not None and self.optimizer is not None
        if self.sharded:
            ckpt.load_sharded(self.model, self.optimizer, path / "sharded")
        else:
            load_adapter_weights(self.model, path / "adapter")
            ckpt.load_other_trainable(self.model, path)
            self.optimizer.load_state_dict(ckpt.load_state(path, "optimizer"))
        loop_state = ckpt.load_state(path, "loop_state")
        self.scheduler.load_state_dict(loop_state["scheduler"])
        if self.scaler is not None and "grad_scaler" in loop_state:
            self.scaler.load_state_dict(loop_state["grad_scaler"])
        per_process = loop_state["rng_per_process"]
        if len(per_process) != self.ctx.world_size:
            raise TrainingError(
                f"--resume: {path} was written by {len(per_process)} process(es), this job has "
                f"{self.ctx.world_size}: resume with as many processes, or the data order and dropout differ"
            )
        ckpt.set_rng_state(per_process[self.ctx.rank])
        self._window.load(loop_state["loss_window"])
        self._train_time_before = self._train_time = float(loop_state["train_time_s"])

    def _elapsed(self) -> float:
        """Seconds of training over every sitting, up to now."""
        if self._fit_start is None:
            return self._train_time
        return self._train_time_before + time.perf_counter() - self._fit_start

    def _autocast(self):
        return autocast(self.config.train.precision, self.device)

    # --------------------------------------------------------------------------------------- output
    def _write(self, name: str, text: str) -> None:
        if self.ctx.is_main:
            write_text_atomic(self.run_dir / name, text)

    def _log(self, record: dict[str, Any]) -> None:
        if self.ctx.is_main:
            _append_jsonl(self.run_dir / "metrics.jsonl", record)
            if self._trackers is not None:
                self._trackers.log(record, self.model)
            for callback in self.callbacks:
                callback.on_log(self, record)

    def _notify_eval(self, split: str, step: int, result: EvalResult) -> None:
        if not self.ctx.is_main:
            return
        for callback in self.callbacks:
            callback.on_eval(self, split, step, result)

    @property
    def _evaluates(self) -> bool:
        """Whether this process evaluates: the main one, or every one when the model is sharded (each
        forward pass of a sharded model is a collective); only the main one logs and writes."""
        return self.ctx.is_main or self.sharded
