"""The GPU check: correctness and speed on one CUDA device, in a few minutes.

    moelora bench --device cuda --quick [--json gpu.json]
    python -m moelora.bench.gpu_check [--quick] [--json gpu.json]

Needs only torch, transformers, peft and safetensors (and moelora); uses no model files or data sets.
It refuses to run without CUDA rather than time the CPU. In order:

1. layer parity: ``MoELoRALinear`` forward and backward on CUDA, in float32 and under bf16 autocast,
   against the same layer on the CPU in float32 (dense experts, dropout 0, gate power 0.5);
2. optimizer parity: three ``RiemannianAdamW`` steps (``riemannian`` and ``gate_rescaled``) on CUDA
   against the CPU;
3. the sparse (grouped-GEMM) expert form on CUDA: run where the layer supports it, else the reason;
4. training steps of a SmolLM2-135M-shaped model with random weights against PEFT LoRA r=16: float32,
   bf16 autocast and, when bitsandbytes is importable, an NF4 base (``moelora.bench.precision_bench``);
5. every layer and optimizer speed ratio of ``moelora bench`` on the GPU.

A failed parity check makes the command exit 1; every other item reports ``ok``, ``skipped`` with the
reason, or the error it met.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError

FLOAT32_TOLERANCE = 1e-4  # relative Frobenius error, float32 on two devices (different GEMM kernels)
BF16_TOLERANCE = 2e-2  # bf16 autocast against float32 (measured on the CPU: at most 6e-3)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _layer_pass(layer: Any, x: torch.Tensor, upstream: torch.Tensor, autocast: bool) -> list[torch.Tensor]:
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = layer(x)
    (out.float() * upstream).sum().backward()
    return [out, x.grad, layer.lora_A.grad, layer.lora_B.grad, layer.router.weight.grad]


def layer_parity(device: torch.device) -> dict[str, Any]:
    from .. import MoELoRALinear

    torch.manual_seed(0)
    cpu = MoELoRALinear(nn.Linear(576, 576), 20, 10, 4, 16.0, gate_backward_power=0.5)
    with torch.no_grad():
        cpu.lora_B.normal_(0.0, 0.02)
    gpu = copy.deepcopy(cpu).to(device)
    x, upstream = torch.randn(512, 576), torch.randn(512, 576)
    reference = _layer_pass(cpu, x, upstream, autocast=False)
    names = ["output", "dx", "dA", "dB", "dR"]
    result: dict[str, Any] = {}
    for label, autocast, tolerance in (("float32", False, FLOAT32_TOLERANCE), ("bf16", True, BF16_TOLERANCE)):
        ours = _layer_pass(gpu, x.to(device), upstream.to(device), autocast)
        errors = {n: _relative(a, b) for n, a, b in zip(names, ours, reference)}
        result[label] = {"relative_errors": errors, "tolerance": tolerance,
                         "ok": all(e < tolerance for e in errors.values())}
    result["ok"] = all(r["ok"] for r in result.values() if isinstance(r, dict))
    return result


def optimizer_parity(device: torch.device) -> dict[str, Any]:
    from .. import MoELoRAConfig, moelora_layers, wrap
    from ..optim import RiemannianAdamW, param_groups
    from .optim_bench import SmolLM2Attention, _fill_

    result: dict[str, Any] = {}
    for preconditioner in ("riemannian", "gate_rescaled"):
        models = []
        for target in ("cpu", device):
            model = SmolLM2Attention(blocks=2, device=target)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                wrap(model, MoELoRAConfig(num_experts=20, top_k=10, rank=4, dropout=0.0))
            models.append(model)
        params_per_model = [[p for _, layer in moelora_layers(m) for p in (layer.lora_A, layer.lora_B)]
                            for m in models]
        for model, params in zip(models, params_per_model):
            for _, layer in moelora_layers(model):  # the same gate statistics on both devices
                layer.gate_sq_sum.fill_(2.0)
                layer.gate_token_count.fill_(64.0)
            opt = RiemannianAdamW(param_groups(model, lr=1e-3), preconditioner=preconditioner, reg=1e-6)
            _fill_(params, torch.Generator().manual_seed(0))  # the same weights and first gradients
            generator = torch.Generator().manual_seed(1)
            for step in range(3):
                if step:  # the same later gradients, drawn on the CPU
                    for p in params:
                        p.grad = torch.empty(p.shape).normal_(0.0, 1e-3, generator=generator).to(p.device)
                opt.step()
        errors = [_relative(a, b) for a, b in zip(params_per_model[1], params_per_model[0])]
        result[preconditioner] = {"max_relative_error": max(errors), "tolerance": FLOAT32_TOLERANCE,
                                  "ok": max(errors) < FLOAT32_TOLERANCE}
    result["ok"] = all(r["ok"] for r in result.values() if isinstance(r, dict))
    return result


def sparse_on_cuda(device: torch.device) -> dict[str, Any]:
    from .. import ConfigError as LayerConfigError
    from .. import MoELoRALinear

    torch.manual_seed(0)
    layer = MoELoRALinear(nn.Linear(576, 576), 64, 2, 4, 16.0, expert_compute="sparse").to(device)
    dense = copy.deepcopy(layer)
    dense.expert_compute = "dense"
    with torch.no_grad():
        layer.lora_B.normal_(0.0, 0.02)
        dense.lora_B.copy_(layer.lora_B)
    x = torch.randn(256, 576, device=device)
    try:
        out = layer(x)
    except LayerConfigError as err:
        return {"skipped": str(err)}
    return {"relative_error_vs_dense": _relative(out, dense(x)), "ok": _relative(out, dense(x)) < FLOAT32_TOLERANCE}


def training_steps(device: torch.device, quick: bool) -> dict[str, Any]:
    from . import precision_bench

    result = precision_bench.run(quick=quick, device=device)
    result["fp32"] = precision_bench.compare(device, "none", quick, autocast_dtype=None)
    return result


def speed(device: torch.device, quick: bool) -> dict[str, Any]:
    from . import layer_bench, optim_bench

    suites: dict[str, Callable[[], dict]] = {
        "layer": lambda: layer_bench.run(quick=quick),
        "layer_dropout": lambda: layer_bench.run(quick=quick, dropout=0.05),
        "layer_sparse": lambda: layer_bench.run_sparse(quick=quick),
        "optimizer": lambda: optim_bench.run(quick=quick),
    }
    out: dict[str, Any] = {}
    for name, suite in suites.items():
        with torch.device(device):  # every tensor and module the suite creates lands on the GPU
            out[name] = _guarded(suite)
    return out


def _guarded(fn: Callable[[], dict]) -> dict:
    try:
        return fn()
    except Exception as err:
        return {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(limit=6)}


def run(quick: bool = False, json_out: str | None = None) -> dict[str, Any]:
    """Every check on ``cuda``; raises ``ConfigError`` on a machine without CUDA."""
    if not torch.cuda.is_available():
        raise ConfigError("the GPU check needs a CUDA device and this machine has none; "
                          "run `moelora bench --quick` for the CPU benchmarks")
    device = torch.device("cuda", torch.cuda.current_device())
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
                               "quick": quick}
    for name, check in (("layer_parity", layer_parity), ("optimizer_parity", optimizer_parity),
                        ("sparse_on_cuda", sparse_on_cuda)):
        print(f"running {name} ...", flush=True)
        results[name] = _guarded(functools.partial(check, device))
    print("running training_steps ...", flush=True)
    results["training_steps"] = _guarded(lambda: training_steps(device, quick))
    print("running speed ...", flush=True)
    results["speed"] = speed(device, quick)
    print(format_report(results))
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(results, indent=2, default=str) + "\n")
    return results


def passed(results: dict[str, Any]) -> bool:
    """Whether both parity checks ran and held."""
    return all(results.get(name, {}).get("ok") is True for name in ("layer_parity", "optimizer_parity"))


def format_report(results: dict[str, Any]) -> str:
    lines = [f"GPU check on {results['device']} (torch {results['torch']})", ""]
    for name in ("layer_parity", "optimizer_parity", "sparse_on_cuda"):
        r = results[name]
        status = r.get("error") or r.get("skipped") or ("ok" if r.get("ok") else "FAILED")
        lines.append(f"- {name}: {status}")
    steps = results["training_steps"]
    for setting in ("fp32", "bf16", "nf4"):
        r = steps.get(setting, {}) if "error" not in steps else steps
        value = r.get("cost_vs_peft_lora")
        text = f"{value:.2f}x PEFT LoRA r=16" if value is not None else (r.get("skipped") or r.get("error"))
        lines.append(f"- training step, {setting}: {text}")
    for name, r in results["speed"].items():
        ratios = {k: v for k, v in r.items() if isinstance(v, float)}
        text = ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()) or r.get("error", "")
        lines.append(f"- {name}: {text}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", dest="json_out")
    args = parser.parse_args()
    try:
        results = run(args.quick, args.json_out)
    except ConfigError as err:
        print(f"moelora: error: {err}", file=sys.stderr)
        sys.exit(2)
    sys.exit(0 if passed(results) else 1)


if __name__ == "__main__":
    main()
