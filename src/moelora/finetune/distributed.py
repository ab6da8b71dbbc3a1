"""Process-group set-up for ``torchrun`` (gloo on CPU, nccl on GPU; a no-op in a single process), and FSDP2
sharding of a wrapped model (``shard_model``)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..optim.sharding import local
from .errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # init_distributed created the process group (and shutdown_distributed ends it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def gather(self, value: object) -> list:
        """Every process's ``value`` (nested dicts / lists of tensors and Python values), in rank order, on
        every process (``[value]`` in a single process). Tensors travel as CPU NumPy arrays."""
        if not self.enabled:
            return [value]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, _map_tensors(value, lambda t: t.detach().cpu().numpy()))
        import numpy as np

        return [_map_tensors(v, torch.from_numpy, np.ndarray) for v in out]

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """All-reduced sum across processes (the value itself in a single process)."""
        if self.enabled:
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value


def _map_tensors(obj: object, fn, kind: type = torch.Tensor) -> object:
    if isinstance(obj, kind):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn, kind) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn, kind) for v in obj)
    return obj


def init_distributed() -> DistributedContext:
    """Join the process group ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        if any(key.startswith("ACCELERATE_") for key in os.environ):
            # accelerate launch --cpu starts one process whatever --num_processes says: never silently
            logger.warning(
                "started by accelerate launch as a single process (WORLD_SIZE is not set); for several "
                "processes run torchrun --nproc_per_node N -m moelora train ..., or accelerate launch "
                "--multi_gpu on GPUs"
            )
        return DistributedContext()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    owns = not dist.is_initialized()
    if owns:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, owns_group=owns)


def shutdown_distributed(ctx: DistributedContext, wait_for_peers: bool = False) -> None:
    """End the process group if ``init_distributed`` started it (one the caller started stays).

    ``wait_for_peers``: meet the other processes at a barrier first. A process that tears gloo down while
    a peer is still working can abort at exit, so a run that ended normally waits; one that is leaving on
    an error does not (its peers may never reach the barrier)."""
    if ctx.enabled and ctx.owns_group and dist.is_initialized():
        if wait_for_peers:
            dist.barrier()
        dist.destroy_process_group()


def shard_model(model: nn.Module, device: torch.device, world_size: int) -> dict[str, int]:
    """FSDP2: ``fully_shard`` every decoder layer (transformers' ``_no_split_modules``) and then the root,
    over a one-dimensional mesh of all processes. Every parameter, frozen base and experts alike, becomes
    a DTensor split on dimension 0; for an expert stack that is the expert index, so each process keeps
    whole experts (``moelora.optim.sharding``). Returns the frozen base's bytes: here and in all."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    block_names = set(getattr(model, "_no_split_modules", None) or ())
    if not block_names:
        raise ConfigError(
            f"train.distributed=fsdp: {type(model).__name__} does not name its decoder layers "
            f"(_no_split_modules); use train.distributed=ddp"
        )
    total = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    mesh = init_device_mesh(device.type, (world_size,))
    blocks = [m for m in model.modules() if type(m).__name__ in block_names]
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    here = sum(local(p).numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    return {"blocks": len(blocks), "base_bytes_per_process": here, "base_bytes": total}
