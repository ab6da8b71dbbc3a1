"""Training on SmolLM2-135M (real weights) against what a user would otherwise write.

Three comparisons, on Rotten Tomatoes training reviews:

- ``step``: one optimizer step (forward, backward, update) of the default method — MoE-LoRA E=20,
  top_k=10, r=4 on q/k/v/o, gate power 0.5, ``RiemannianAdamW`` — against PEFT LoRA r=16 with
  ``torch.optim.AdamW``, on the same batch and the same answer-only loss;
- ``throughput``: tokens per second of the default job's loop (length-grouped batches, answer-only loss)
  against the plain alternative (PEFT LoRA r=16, ``torch.optim.AdamW``, ``transformers``' own loss over
  full-vocabulary logits, random batches padded to their longest sequence), on the same examples;
- ``memory``: the memory a training step holds beyond the frozen model (saved activations, gradients,
  optimizer state), counted exactly.

    python -m moelora.bench.train_bench [--quick]
    python -c "from moelora.bench import train_bench; print(train_bench.bench_step(False, repeats=30))"
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from .timing import time_interleaved

BATCH = 8


def _setup(candidate: str, seed: int = 0):
    """``(model, optimizer, runtime)`` for ``candidate`` in {"moelora", "peft_lora"}."""
    import moelora
    from moelora.finetune.base_models import load_model_and_tokenizer
    from moelora.finetune.run_config import load_config
    from moelora.finetune.tasks import TaskRuntime
    from moelora.optim import RiemannianAdamW, param_groups

    torch.manual_seed(seed)
    config = load_config(None, ["data.max_train=512", "data.max_eval=8"])
    runtime = TaskRuntime.load(config)
    model, tokenizer = load_model_and_tokenizer(config.model.name)
    runtime.attach(model, tokenizer)
    optimizer: torch.optim.Optimizer  # ours or torch's AdamW, depending on the candidate
    if candidate == "moelora":
        import dataclasses

        moelora.wrap(model, moelora.MoELoRAConfig(**dataclasses.asdict(config.adapter)))
        optimizer = RiemannianAdamW(param_groups(model, lr=1e-4, router_max_grad_norm=1.0), preconditioner="riemannian")
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=True)
    model.train()
    return model, optimizer, runtime


def _answer_loss_step(model, optimizer, batch):
    from moelora.finetune.loss import CausalLMAnswerLoss

    loss_module = CausalLMAnswerLoss(model.get_base_model() if hasattr(model, "get_base_model") else model)

    def step() -> None:
        loss_sum, count = loss_module(**batch["inputs"])
        (loss_sum / count).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def bench_step(quick: bool, repeats: int | None = None) -> dict:
    """Interleaved optimizer steps of both candidates on one fixed batch (``repeats`` rounds: 8 quick, else
    10 unless given), wall time and the process's CPU time of each step."""
    moe, moe_opt, runtime = _setup("moelora")
    peft_model, peft_opt, _ = _setup("peft_lora")
    batch = runtime.collate_train(list(range(BATCH)))
    steps = {"moelora_default": _answer_loss_step(moe, moe_opt, batch),
             "peft_lora_r16_adamw": _answer_loss_step(peft_model, peft_opt, batch)}
    cpu: dict[str, list[float]] = {name: [] for name in steps}

    def with_cpu_time(name: str) -> Callable[[], None]:
        def step() -> None:
            start = time.process_time()
            steps[name]()
            cpu[name].append(time.process_time() - start)
        return step

    rounds = repeats or (8 if quick else 10)
    timing = time_interleaved({name: with_cpu_time(name) for name in steps}, repeats=rounds, warmup=1)
    cpu_median = {name: statistics.median(samples[-rounds:]) for name, samples in cpu.items()}  # warm-up dropped
    return {"batch_tokens": int(batch["n_tokens"]), "timings": timing.as_dict(),
            "cost_vs_peft_lora": timing.ratio("moelora_default", "peft_lora_r16_adamw"),
            "cost_vs_peft_lora_by_round": timing.ratio_spread("moelora_default", "peft_lora_r16_adamw"),
            "cpu_time_s": cpu_median,
            "cpu_time_cost_vs_peft_lora": cpu_median["moelora_default"] / cpu_median["peft_lora_r16_adamw"]}


def bench_throughput(quick: bool) -> dict:
    """Tokens/s over the same training examples: our loop's batching and loss vs the plain loop."""
    from moelora.finetune.batching import StepBatches

    steps = 4 if quick else 12
    moe, moe_opt, runtime = _setup("moelora")
    plain, plain_opt, _ = _setup("peft_lora")
    plan = StepBatches(runtime.train_lengths(), BATCH, 1, seed=1)
    used = [i for s in range(steps) for i in plan.global_batch(s)]
    ours_batches = [runtime.collate_train(plan.global_batch(s)) for s in range(steps)]
    # the plain loop sees the same examples in random batches, labels -100 on the prompt
    g = torch.Generator().manual_seed(2)
    shuffled = [used[i] for i in torch.randperm(len(used), generator=g).tolist()]
    plain_batches = [runtime.collate_train(shuffled[s * BATCH : (s + 1) * BATCH]) for s in range(steps)]
    from moelora.finetune.loss import CausalLMAnswerLoss

    loss_module = CausalLMAnswerLoss(moe)

    def run_ours() -> float:
        start = time.perf_counter()
        for batch in ours_batches:
            loss_sum, count = loss_module(**batch["inputs"])
            (loss_sum / count).backward()
            moe_opt.step()
            moe_opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    def run_plain() -> float:
        start = time.perf_counter()
        for batch in plain_batches:
            plain(**batch["inputs"]).loss.backward()  # full-vocabulary logits at every position
            plain_opt.step()
            plain_opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    real_tokens = sum(int(b["n_tokens"]) for b in ours_batches)
    padded_ours = sum(b["inputs"]["input_ids"].numel() for b in ours_batches)
    padded_plain = sum(b["inputs"]["input_ids"].numel() for b in plain_batches)
    rounds = 1 if quick else 3
    times: dict[str, list[float]] = {"moelora_default_loop": [], "plain_peft_loop": []}
    run_ours(), run_plain()  # warm-up
    for _ in range(rounds):
        times["moelora_default_loop"].append(run_ours())
        times["plain_peft_loop"].append(run_plain())
    median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    tps = {k: real_tokens / v for k, v in median.items()}
    return {"steps": steps, "real_tokens": real_tokens, "padded_tokens": {"ours": padded_ours, "plain": padded_plain},
            "tokens_per_s": tps, "speedup_vs_plain": tps["moelora_default_loop"] / tps["plain_peft_loop"]}


def step_memory(candidate: str) -> dict[str, int]:
    """Bytes a training step holds beyond the frozen model, counted exactly (not sampled from the OS).

    - ``activations``: distinct storages autograd saves for the backward pass (captured with
      ``torch.autograd.graph.saved_tensors_hooks``), excluding parameters;
    - ``gradients``: the trainable parameters' gradients;
    - ``optimizer_state``: every tensor in the optimizer's state after the step.
    The peak of a step is about their sum (activations are freed as the backward pass consumes them,
    while gradients appear).
    """
    model, optimizer, runtime = _setup(candidate)
    batch = runtime.collate_train(list(range(BATCH)))
    from moelora.finetune.loss import CausalLMAnswerLoss

    loss_module = CausalLMAnswerLoss(model.get_base_model() if hasattr(model, "get_base_model") else model)
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in param_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_sum, count = loss_module(**batch["inputs"])
    (loss_sum / count).backward()
    gradients = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)
    optimizer.step()
    state = sum(v.nbytes for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    return {"activations": sum(saved.values()), "gradients": gradients, "optimizer_state": state,
            "total": sum(saved.values()) + gradients + state}


def bench_memory(quick: bool) -> dict:
    """Step memory of both candidates on the same batch."""
    result = {candidate: step_memory(candidate) for candidate in ("moelora", "peft_lora")}
    return {"step_bytes": result,
            "ratio_vs_peft_lora": result["moelora"]["total"] / result["peft_lora"]["total"],
            "activation_ratio_vs_peft_lora": result["moelora"]["activations"] / result["peft_lora"]["activations"]}


def run(quick: bool = False) -> dict:
    return {"step": bench_step(quick), "throughput": bench_throughput(quick), "memory": bench_memory(quick)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=["step", "throughput", "memory"])
    args = parser.parse_args()
    if args.only:
        result = {args.only: globals()[f"bench_{args.only}"](args.quick)}
    else:
        result = run(args.quick)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
