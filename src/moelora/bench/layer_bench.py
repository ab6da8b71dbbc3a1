"""Layer forward+backward: the stacked MoE-LoRA layer against a per-expert loop and a dense LoRA.

Shape of SmolLM2-135M's q_proj: d_in = d_out = 576, 2048 tokens; E = 20 experts of rank 4, top_k = 10.
Every candidate includes the frozen base GEMM and the gradient into the layer input (as inside a model).

    python -m moelora.bench.layer_bench [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import math

import torch
from torch import nn

from ..layers.linear import MoELoRALinear
from ..layers.routing import top_k_gates
from .timing import time_interleaved


class PerExpertLoop(nn.Module):
    """The straightforward MoE-LoRA: one small LoRA module per expert, looped in Python (2E GEMMs).

    With ``dropout > 0`` each expert draws its own mask, as the paper's reference code does.
    """

    def __init__(self, base: nn.Linear, num_experts: int, top_k: int, rank: int, alpha: float,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.base, self.top_k, self.scaling = base, top_k, alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.router = nn.Linear(base.in_features, num_experts, bias=False)
        self.lora_A = nn.ModuleList(nn.Linear(base.in_features, rank, bias=False) for _ in range(num_experts))
        # Initialised as a typed list before wrapping: a ModuleList's items are plain Modules to the type checker.
        lora_B = [nn.Linear(rank, base.out_features, bias=False) for _ in range(num_experts)]
        for b in lora_B:
            nn.init.normal_(b.weight, std=0.01)
        self.lora_B = nn.ModuleList(lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates = top_k_gates(self.router(x), self.top_k)
        out = self.base(x)
        for i, (a, b) in enumerate(zip(self.lora_A, self.lora_B)):
            out = out + gates[:, i : i + 1] * self.scaling * b(a(self.dropout(x)))
        return out


class DenseLoRA(nn.Module):
    """A single LoRA of rank ``rank`` (the same trainable size as E experts of rank r)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base, self.scaling = base, alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.randn(rank, base.in_features) / math.sqrt(base.in_features))
        self.lora_B = nn.Parameter(torch.randn(base.out_features, rank) * 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scaling * (self.dropout(x) @ self.lora_A.t()) @ self.lora_B.t()


def _step(module: nn.Module, x: torch.Tensor, upstream: torch.Tensor):
    def run() -> None:
        x.grad = None
        for p in module.parameters():
            p.grad = None
        (module(x) * upstream).sum().backward()

    return run


def run(quick: bool = False, d: int = 576, tokens: int = 2048, num_experts: int = 20, top_k: int = 10,
        rank: int = 4, alpha: float = 16.0, dropout: float = 0.0) -> dict:
    """Median seconds per forward+backward and the ratios against the stacked layer.

    ``dropout`` applies to every candidate (one mask for the stacked layer and the dense LoRA, one per
    expert for the loop, as in the paper's reference code).
    """
    torch.manual_seed(0)
    base = nn.Linear(d, d).requires_grad_(False)
    x = torch.randn(tokens, d, requires_grad=True)
    upstream = torch.randn(tokens, d)
    stacked = MoELoRALinear(base, num_experts, top_k, rank, alpha, dropout=dropout, gate_backward_power=0.5)
    with torch.no_grad():
        stacked.lora_B.normal_(0.0, 0.01)
    candidates = {
        "moelora": _step(stacked, x, upstream),
        "per_expert_loop": _step(PerExpertLoop(base, num_experts, top_k, rank, alpha, dropout), x, upstream),
        f"dense_lora_r{num_experts * rank}": _step(DenseLoRA(base, num_experts * rank, alpha, dropout), x, upstream),
    }
    timing = time_interleaved(candidates, repeats=10 if quick else 30)
    dense = f"dense_lora_r{num_experts * rank}"
    return {
        "shape": {"d": d, "tokens": tokens, "num_experts": num_experts, "top_k": top_k, "rank": rank,
                  "dropout": dropout},
        "timings": timing.as_dict(),
        "speedup_vs_per_expert_loop": timing.ratio("per_expert_loop", "moelora"),
        "cost_vs_dense_lora": timing.ratio("moelora", dense),
        "cost_vs_dense_lora_by_round": timing.ratio_spread("moelora", dense),
    }


def run_sparse(quick: bool = False, d: int = 576, tokens: int = 2048, num_experts: int = 64, top_k: int = 2,
               rank: int = 4, alpha: float = 16.0) -> dict:
    """Few active experts (E=64, top_k=2): the layer's dense form against its sparse (grouped) form,
    which ``expert_compute="auto"`` picks at this shape."""
    torch.manual_seed(0)
    base = nn.Linear(d, d).requires_grad_(False)
    x = torch.randn(tokens, d, requires_grad=True)
    upstream = torch.randn(tokens, d)
    dense = MoELoRALinear(base, num_experts, top_k, rank, alpha, expert_compute="dense")
    with torch.no_grad():
        dense.lora_B.normal_(0.0, 0.01)
    sparse = copy.deepcopy(dense)
    sparse.expert_compute = "auto"
    if not sparse.uses_sparse(x):
        raise RuntimeError("expert_compute='auto' did not pick the sparse form at the benchmark's shape")
    with torch.no_grad():  # same function (tests/test_sparse.py checks the gradients too)
        torch.testing.assert_close(sparse(x), dense(x), rtol=1e-4, atol=1e-5)
    timing = time_interleaved({"dense": _step(dense, x, upstream), "sparse": _step(sparse, x, upstream)},
                              repeats=10 if quick else 30)
    return {
        "shape": {"d": d, "tokens": tokens, "num_experts": num_experts, "top_k": top_k, "rank": rank},
        "timings": timing.as_dict(),
        "sparse_speedup_vs_dense": timing.ratio("dense", "sparse"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(json.dumps({"layer": run(quick=args.quick), "layer_dropout": run(quick=args.quick, dropout=0.05),
                      "layer_sparse": run_sparse(quick=args.quick)}, indent=2))


if __name__ == "__main__":
    main()
