"""FSDP2 (``fully_shard``) against one process: run by ``torchrun --nproc_per_node 2`` (gloo, CPU) from
``tests/test_fsdp.py``; rank 0 writes what it measured as JSON to the path given as the first argument.

Each rank trains a tiny Llama wrapped with MoE-LoRA experts, sharded by ``fully_shard`` on every decoder
layer and the root, on its half of a fixed batch; rank 0 also trains an unsharded copy (same seed) on the
whole batch in this same process. After ``STEPS`` steps the gathered adapters are compared.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import LlamaConfig, LlamaForCausalLM

import moelora
from moelora.optim import RiemannianAdamW, RiemannianSGD, param_groups, share_gate_statistics

STEPS = 5
EXPERTS = 5  # odd: the two ranks hold 3 and 2 experts of every stack


def build(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    moelora.wrap(model, moelora.MoELoRAConfig(num_experts=EXPERTS, top_k=2, rank=4, alpha=8.0, dropout=0.0,
                                              gate_backward_power=0.5))
    with torch.no_grad():  # B = 0 at init would leave the first steps' A gradient at zero
        for _, layer in moelora.moelora_layers(model):
            layer.lora_B.normal_(0.0, 0.1)
    return model


def optimizer(model: torch.nn.Module, name: str, preconditioner: str) -> torch.optim.Optimizer:
    groups = param_groups(model, lr=0.05 if name == "sgd" else 0.01, router_lr=0.01, router_max_grad_norm=0.05)
    if name == "sgd":
        return RiemannianSGD(groups, preconditioner=preconditioner, momentum=0.9)
    return RiemannianAdamW(groups, preconditioner=preconditioner, weight_decay=0.0)


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor) -> None:
    for step in range(STEPS):
        batch = ids[step]
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()


def adapter(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = {}
    for key, value in moelora.adapter_state_dict(model).items():
        full = value.full_tensor() if hasattr(value, "full_tensor") else value
        state[key] = full.detach().clone()
    return state


def relative(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12)) for k in b)


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    ids = torch.randint(0, 64, (STEPS, 4, 12), generator=torch.Generator().manual_seed(1))
    local_ids = ids[:, rank * 2 : rank * 2 + 2]  # each rank: half of every step's batch
    results = {}
    for name in ("sgd", "adamw"):
        finals = {}
        for preconditioner in ("riemannian", "gate_rescaled", "none"):
            sharded = build()
            for block in sharded.model.layers:
                fully_shard(block, mesh=mesh)
            fully_shard(sharded, mesh=mesh)
            opt = optimizer(sharded, name, preconditioner)
            train(sharded, opt, local_ids)
            finals[preconditioner] = adapter(sharded)
            if rank == 0:
                single = build()
                share_gate_statistics(single, False)  # trained by this process alone, inside the job
                train(single, optimizer(single, name, preconditioner), ids)
                results[f"{name}/{preconditioner}"] = relative(finals[preconditioner], adapter(single))
            local_shapes = {tuple(p.to_local().shape) for p in sharded.parameters() if p.requires_grad}
            if rank == 0:
                results.setdefault("local_expert_counts", sorted({s[0] for s in local_shapes if len(s) == 3}))
        if rank == 0:
            results[f"{name}/riemannian_vs_none"] = relative(finals["riemannian"], finals["none"])
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()  # tearing gloo down while the peer still works can abort this process at exit
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
