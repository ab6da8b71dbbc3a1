"""One optimizer step over SmolLM2-135M-shaped MoE-LoRA adapters, against its baselines.

Adapters on q, k, v, o of 30 blocks (d = 576, k/v output 192), 20 experts of rank 4 each: 240 stacked
expert tensors, 9.2M parameters, random nonzero weights and gradients (no model forward). Candidates,
timed interleaved in one run:

- ``moelora``: ``RiemannianAdamW(preconditioner="riemannian")`` (fused moment update, the default);
- ``moelora_foreach``: the same with the foreach moment update (``fused=False``);
- ``moelora_none``: ``RiemannianAdamW(preconditioner="none")``, the update alone;
- ``torch_adamw_foreach``: ``torch.optim.AdamW(foreach=True)`` on the same parameters (the baseline);
- ``per_expert_loop``: the straightforward implementation, one ``torch.linalg.inv`` and one matmul per
  expert and factor in a Python loop, then ``torch.optim.AdamW(foreach=True)``;
- ``peft_r80``: PEFT's ``create_riemannian_optimizer`` (AdamW, ``foreach=True``, same ``reg``) on a PEFT
  LoRA of rank 20 x 4 = 80 on the same modules: one expert per module with the same total shapes,
  as PEFT has no mixture;
- ``moelora_r80``: ours on that same single rank-80 expert per module (apples to apples with PEFT);
- ``peft_r16_adamw``: ``torch.optim.AdamW(foreach=True)`` on PEFT LoRA r=16's tensors of the same modules:
  the optimizer of the training step's baseline (``moelora.bench.train_bench``), 5.8x fewer parameters.

Only expert tensors are stepped (no routers). Gradients stay fixed across repeats; the PEFT optimizer
overwrites ``.grad`` with its preconditioned gradient, so each of its steps gets a fresh copy made before
timing starts and swapped in by reference (one attribute assignment per tensor, inside its timing).

    python -m moelora.bench.optim_bench [--quick] [--threads N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..config import MoELoRAConfig
from ..inject import moelora_layers, wrap
from ..optim import RiemannianAdamW
from .timing import time_interleaved

logger = logging.getLogger(__name__)

HIDDEN = 576
KV_OUT = 192
BLOCKS = 30
NUM_EXPERTS = 20
RANK = 4
LR = 1e-5
REG = 1e-6


class _Attention(nn.Module):
    def __init__(self, device: str | torch.device) -> None:
        super().__init__()
        self.q_proj = nn.Linear(HIDDEN, HIDDEN, bias=False, device=device)
        self.k_proj = nn.Linear(HIDDEN, KV_OUT, bias=False, device=device)
        self.v_proj = nn.Linear(HIDDEN, KV_OUT, bias=False, device=device)
        self.o_proj = nn.Linear(HIDDEN, HIDDEN, bias=False, device=device)


class SmolLM2Attention(nn.Module):
    """The attention projections of SmolLM2-135M (no embeddings, MLPs or norms: only their shapes matter)."""

    def __init__(self, blocks: int = BLOCKS, device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"self_attn": _Attention(device)}) for _ in range(blocks))


def _fill_(params: Sequence[torch.Tensor], generator: torch.Generator) -> None:
    """Random nonzero weights ~N(0, 1/fan) and gradients ~N(0, 1e-6), like a mid-training adapter.

    Drawn on the CPU with ``generator`` and copied to each tensor's device: the same numbers on any device.
    """
    with torch.no_grad():
        for p in params:
            p.copy_(torch.empty(p.shape, device="cpu").normal_(0.0, p.shape[-1] ** -0.5, generator=generator))
            grad = torch.empty(p.shape, device="cpu").normal_(0.0, 1e-3, generator=generator)
            p.grad = grad.to(device=p.device, dtype=p.dtype)


def _grad(p: torch.Tensor) -> torch.Tensor:
    """``p.grad`` of a tensor that went through ``_fill_`` (so it is set)."""
    assert p.grad is not None, "gradients are set by _fill_"
    return p.grad


def moelora_adapters(num_experts: int, rank: int, blocks: int = BLOCKS) -> tuple[nn.Module, list[nn.Parameter]]:
    """A SmolLM2-shaped model wrapped with ``num_experts`` experts of rank ``rank``, and its ``[A, B, ...]``.

    Keep the model alive while stepping: the optimizer reaches each layer by weak reference.
    """
    # The base weights are never read: build them on the meta device (the adapters land on the CPU).
    model = SmolLM2Attention(blocks, device="meta")
    config = MoELoRAConfig(num_experts=num_experts, top_k=min(10, num_experts), rank=rank, alpha=16.0,
                           dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    wrap(model, config)
    params = [p for _, layer in moelora_layers(model) for p in (layer.lora_A, layer.lora_B)]
    _fill_(params, torch.Generator().manual_seed(0))
    return model, params


def _per_expert_loop(params: Sequence[torch.Tensor]) -> Callable[[], None]:
    """Precondition expert by expert with explicit inverses, then a foreach AdamW step."""
    raw = [_grad(p) for p in params]
    out = [torch.empty_like(g) for g in raw]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0, foreach=True)

    def step() -> None:
        for i in range(0, len(params), 2):
            a, b = params[i].detach(), params[i + 1].detach()
            eye = torch.eye(a.shape[1], device=a.device)
            for e in range(a.shape[0]):
                out[i][e] = torch.linalg.inv(b[e].T @ b[e] + REG * eye) @ raw[i][e]
                out[i + 1][e] = raw[i + 1][e] @ torch.linalg.inv(a[e] @ a[e].T + REG * eye)
        for p, g in zip(params, out):
            p.grad = g
        opt.step()
        for p, g in zip(params, raw):
            p.grad = g

    return step


def _peft(blocks: int, rank: int, rounds: int) -> Callable[[], None] | None:
    """PEFT's Riemannian AdamW on a rank-``rank`` PEFT LoRA of the same modules, or None without PEFT."""
    try:
        from peft import LoraConfig, get_peft_model
        from peft.optimizers import create_riemannian_optimizer
    except ImportError:
        logger.warning("peft is not installed: skipping the PEFT comparison")
        return None
    model = get_peft_model(
        SmolLM2Attention(blocks, device=torch.get_default_device()),
        LoraConfig(r=rank, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    )
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(0)
    _fill_(params, generator)
    # It overwrites .grad with the preconditioned gradient: give every step its own copy of the
    # original gradients (swapped in by reference, which costs a few microseconds).
    pool = [[_grad(p).clone() for p in params] for _ in range(rounds)]
    opt = create_riemannian_optimizer(model, torch.optim.AdamW, lr=LR, reg=REG, weight_decay=0.0, foreach=True)
    calls = iter(range(rounds))

    def step() -> None:
        grads = pool[next(calls) % rounds]
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()

    return step


def _lora_tensors(rank: int, blocks: int = BLOCKS) -> list[torch.Tensor]:
    """A plain LoRA's ``A`` (r, d_in) and ``B`` (d_out, r) of rank ``rank`` on q, k, v, o of ``blocks``
    SmolLM2 blocks, with random weights and gradients (``_fill_``): what PEFT's LoRA trains there."""
    params = [torch.empty(shape, requires_grad=True) for _ in range(blocks)
              for d_out in (HIDDEN, KV_OUT, KV_OUT, HIDDEN) for shape in ((rank, HIDDEN), (d_out, rank))]
    _fill_(params, torch.Generator().manual_seed(1))
    return params


def run(quick: bool = False) -> dict:
    """Median seconds per optimizer step of every candidate and the ratios that the targets are about."""
    torch.manual_seed(0)
    repeats, warmup = (5, 1) if quick else (11, 1)
    # Bound to names (not ``_``, which the second call would rebind) so both models outlive the timing:
    # the optimizer reaches each layer by weak reference.
    _model, experts = moelora_adapters(NUM_EXPERTS, RANK)
    _wide_model, wide = moelora_adapters(1, NUM_EXPERTS * RANK)
    plain = [p.detach().clone().requires_grad_(True) for p in experts]
    for copy, p in zip(plain, experts):
        copy.grad = _grad(p).clone()

    def adamw(params: Sequence[torch.Tensor], **kwargs: Any) -> Callable[[], None]:
        return RiemannianAdamW(params, lr=LR, weight_decay=0.0, reg=REG, **kwargs).step

    candidates = {
        "moelora": adamw(experts, preconditioner="riemannian"),
        "moelora_foreach": adamw(experts, preconditioner="riemannian", fused=False),
        "moelora_none": adamw(experts, preconditioner="none"),
        "torch_adamw_foreach": torch.optim.AdamW(plain, lr=LR, weight_decay=0.0, foreach=True).step,
        "per_expert_loop": _per_expert_loop(experts),
        "moelora_r80": adamw(wide, preconditioner="riemannian"),
        # the training step's baseline: torch's AdamW on PEFT LoRA r=16's 240 tensors
        "peft_r16_adamw": torch.optim.AdamW(_lora_tensors(16), lr=LR, weight_decay=0.0, foreach=True).step,
    }
    peft_step = _peft(BLOCKS, NUM_EXPERTS * RANK, rounds=repeats + warmup)
    if peft_step is not None:
        candidates["peft_r80"] = peft_step
    timing = time_interleaved(candidates, repeats=repeats, warmup=warmup)
    result = {
        "shape": {"blocks": BLOCKS, "modules": "q,k,v,o", "d": HIDDEN, "kv_out": KV_OUT,
                  "num_experts": NUM_EXPERTS, "rank": RANK,
                  "parameters": sum(p.numel() for p in experts)},
        "threads": torch.get_num_threads(),
        "timings": timing.as_dict(),
        "cost_vs_torch_adamw_foreach": timing.ratio("moelora", "torch_adamw_foreach"),
        "speedup_vs_per_expert_loop": timing.ratio("per_expert_loop", "moelora"),
        "cost_vs_peft_r16_adamw": timing.ratio("moelora", "peft_r16_adamw"),
    }
    if peft_step is not None:
        result["speedup_vs_peft_r80"] = timing.ratio("peft_r80", "moelora")
        result["speedup_r80_vs_peft_r80"] = timing.ratio("peft_r80", "moelora_r80")
    return result


def _table(result: dict) -> str:
    base = result["timings"]["torch_adamw_foreach"]["median_s"]
    lines = ["| candidate | median ms | min ms | vs torch AdamW foreach |", "|---|---:|---:|---:|"]
    for name, t in result["timings"].items():
        lines.append(f"| {name} | {t['median_s'] * 1e3:.1f} | {t['min_s'] * 1e3:.1f} | {t['median_s'] / base:.2f}x |")
    lines.append("")
    for key in ("cost_vs_torch_adamw_foreach", "speedup_vs_per_expert_loop", "speedup_vs_peft_r80",
                "speedup_r80_vs_peft_r80", "cost_vs_peft_r16_adamw"):
        if key in result:
            lines.append(f"{key}: {result[key]:.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads before timing (default: torch's)")
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(quick=args.quick)
    print(_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
