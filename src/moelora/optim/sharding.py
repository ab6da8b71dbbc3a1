"""Parameters sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``): DTensors split on the expert dimension.

``fully_shard`` replaces each parameter by a DTensor placed ``Shard(0)`` over the data-parallel mesh. For
an expert stack ``A (E, r, d_in)`` / ``B (E, d_out, r)`` dimension 0 is the expert index, so each process
holds whole experts of both factors (the same ones, since both split ``E`` alike) and preconditions its
local shard with no communication. An expert count that does not split evenly is fine: the shards are
uneven (``torch.chunk``), and ``expert_offset`` says where this process's experts start.

Collectives happen only for DTensors (the router-norm and the gate-statistics reductions over their
mesh), never merely because a process group exists.
"""

from __future__ import annotations

from typing import Any

import torch


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (in practice: a parameter or gradient that FSDP2 sharded)."""
    return hasattr(tensor, "device_mesh") and hasattr(tensor, "to_local")


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (a view sharing its storage), the tensor itself otherwise."""
    return tensor.to_local() if is_sharded(tensor) else tensor  # type: ignore[attr-defined]


def like(local_tensor: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``local_tensor`` as a DTensor laid out as ``reference`` (itself when ``reference`` is not sharded)."""
    if not is_sharded(reference):
        return local_tensor
    from torch.distributed.tensor import DTensor

    ref: Any = reference
    return DTensor.from_local(local_tensor, ref.device_mesh, ref.placements, run_check=False,
                              shape=ref.shape, stride=ref.stride())


def expert_offset(tensor: torch.Tensor) -> int:
    """The global index of this process's first expert in a stack sharded on dimension 0 (0 if not sharded)."""
    if not is_sharded(tensor):
        return 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    ref: Any = tensor
    _, offset = compute_local_shape_and_global_offset(ref.shape, ref.device_mesh, ref.placements)
    return int(offset[0])


def mesh_group(tensor: torch.Tensor) -> Any:
    """The process group of a DTensor's (one-dimensional) mesh, over which its shards are spread."""
    mesh: Any = tensor.device_mesh  # type: ignore[attr-defined]
    if mesh.ndim != 1:
        raise RuntimeError(
            f"MoE-LoRA parameters sharded over a {mesh.ndim}-dimensional device mesh are not supported; "
            f"shard them over a one-dimensional mesh (fully_shard's default)"
        )
    return mesh.get_group()


def global_grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm over all of ``grads``, sharded ones included (their shards' squares summed over the mesh)."""
    plain = [g for g in grads if not is_sharded(g)]
    sharded = [local(g) for g in grads if is_sharded(g)]
    device = (plain or sharded)[0].device
    total = torch.zeros((), dtype=torch.float32, device=device)
    for g in plain:
        total += g.detach().float().square().sum().to(device)
    if sharded:
        squares = torch.zeros((), dtype=torch.float32, device=device)
        for g in sharded:
            squares += g.detach().float().square().sum().to(device)
        group = mesh_group(next(g for g in grads if is_sharded(g)))
        torch.distributed.all_reduce(squares, group=group)
        total += squares
    return total.sqrt()
