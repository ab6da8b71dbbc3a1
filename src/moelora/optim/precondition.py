"""Per-expert Riemannian preconditioners, as batched damped Cholesky solves (method.md section 4).

For expert ``i`` of a layer, with ``A_i`` ``(r, d_in)``, ``B_i`` ``(d_out, r)`` and damping ``reg``:

    "riemannian"     grad_A_i <- (B_i^T B_i + reg I)^-1 dL/dA_i          grad_B_i <- dL/dB_i (A_i A_i^T + reg I)^-1
    "gate_rescaled"  grad_A_i <- (c_i^2 B_i^T B_i + reg I)^-1 dL/dA_i    grad_B_i <- dL/dB_i (c_i^2 A_i A_i^T + reg I)^-1

with ``c_i^2 = max(sum_t g_it^2 / n_tokens, gate_floor)`` from the layer's gate statistics.

Every ``r x r`` system of every expert of every layer that shares a rank, a device and a damping is solved
in one batch: Gram matrices ``(N, r, r)`` -> ``cholesky_ex`` -> ``cholesky_inverse`` -> one batched matmul
per factor (on a CPU, for float32 and ``r <= 16``, compiled passes over all layers at once:
``moelora.layers.kernels.grams`` and ``damped_inverse``, the same arithmetic). Solves run in float32 at
least (float64 stays float64). A factorisation that fails (not positive definite, or non-finite) is
counted and reported, never silently replaced: a warning gives the counts and the affected experts'
preconditioned gradients are zero for that step; if every factorisation of a solve fails it raises
``PreconditionerError`` before that solve's parameters change (with ``b_from_updated_a`` the B side is
solved after the A update).

This module maps gradients to preconditioned gradients (``precondition``), or hands the preconditioners to an
update that applies them itself (``preconditioners``); the update rule (SGD, AdamW) is separate.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from ..config import Preconditioner
from ..layers import kernels
from ..layers.linear import MoELoRALinear
from .groups import SIDE_A, ExpertFactor
from .sharding import is_sharded, mesh_group

NONE: Preconditioner = "none"
RIEMANNIAN: Preconditioner = "riemannian"
GATE_RESCALED: Preconditioner = "gate_rescaled"


class PreconditionerWarning(RuntimeWarning):
    """Some ``r x r`` factorisations failed; the affected experts got a zero preconditioned gradient."""


class PreconditionerError(RuntimeError):
    """Every ``r x r`` factorisation of a step failed; no parameter was updated by that solve."""


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Solves run in float32 at least: bfloat16 / float16 -> float32, float32 -> float32, float64 -> float64."""
    return torch.promote_types(dtype, torch.float32)


_DEFAULT_GROUP = "default process group"  # a key: all_reduce over torch.distributed's default group


def _reduction_group(layer: MoELoRALinear) -> Any:
    """Over which processes a layer's gate statistics are summed: the mesh of its sharded (FSDP2) experts,
    the default group for a layer marked by ``share_gate_statistics`` (DDP), else none (``None``)."""
    if is_sharded(layer.lora_A):
        return mesh_group(layer.lora_A)
    if layer.share_gate_stats:
        return _DEFAULT_GROUP
    if layer.share_gate_stats is None and torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        raise RuntimeError(
            f"gate_rescaled in a job of {torch.distributed.get_world_size()} processes, with unsharded experts: "
            f"every replica must precondition with the same gate statistics. After wrapping the model in "
            f"DistributedDataParallel call moelora.optim.share_gate_statistics(model); for a model that only "
            f"this process trains, call moelora.optim.share_gate_statistics(model, False)"
        )
    return None


def share_gate_statistics(model: nn.Module, share: bool = True) -> None:
    """Sum the gate statistics of ``model``'s layers over the default process group before each
    ``gate_rescaled`` step (``share=True``: the model is replicated by DDP), or keep them local
    (``share=False``: a model trained by this process alone). Experts sharded by FSDP2 need no call."""
    from ..inject import moelora_layers

    for _, layer in moelora_layers(model):
        layer.share_gate_stats = share


def gate_sq_means(layers: Sequence[MoELoRALinear]) -> dict[int, torch.Tensor]:
    """``{id(layer): (E,) sum_t g_t^2 / n_tokens}``, summed over the processes that share each layer.

    Layers whose experts FSDP2 sharded sum over their mesh; layers marked by ``share_gate_statistics``
    (DDP) over the default group; others are not reduced (a collective is issued only for those two).
    The (sum, count) pairs of all layers on one device and group travel in a single all-reduce, so every
    replica preconditions with the same ``c^2``. Layers that recorded no token since the last step (the
    forward ran in eval mode or under ``no_grad``) give 0, which ``gate_floor`` then lifts; a warning says
    how many.
    """
    by_device: dict[tuple[torch.device, Any], list[MoELoRALinear]] = defaultdict(list)
    for layer in layers:
        by_device[(layer.gate_sq_sum.device, _reduction_group(layer))].append(layer)
    means: dict[int, torch.Tensor] = {}
    empty = []
    for (_, group), device_layers in by_device.items():
        # [sum g^2 per expert..., token count] per layer, packed flat (layers may differ in E).
        packed = torch.cat([torch.cat([layer.gate_sq_sum, layer.gate_token_count.reshape(1)]) for layer in device_layers])
        if group is _DEFAULT_GROUP:
            torch.distributed.all_reduce(packed)
        elif group is not None:
            torch.distributed.all_reduce(packed, group=group)
        offset = 0
        counts = []
        for layer in device_layers:
            stats = packed[offset : offset + layer.num_experts + 1]
            offset += layer.num_experts + 1
            means[id(layer)] = stats[:-1] / stats[-1].clamp_min(1.0)
            counts.append(stats[-1])
        empty.append((torch.stack(counts) == 0).sum())
    num_empty = sum(int(e) for e in empty)
    if num_empty:
        warnings.warn(
            f"gate_rescaled: {num_empty} of {len(layers)} MoE-LoRA layers recorded no token since the last "
            f"optimizer step (was the forward run in eval mode or under torch.no_grad()?); their c^2 is "
            f"gate_floor",
            PreconditionerWarning,
            stacklevel=3,
        )
    return means


@torch.no_grad()
def precondition(
    factors: Sequence[ExpertFactor],
    grads: Sequence[torch.Tensor],
    regs: Sequence[float],
    gate_scales: Sequence[tuple[torch.Tensor, float] | None],
) -> list[torch.Tensor]:
    """Preconditioned gradients of stacked expert factors, solved in batches.

    Args:
        factors: the expert factors; ``factor.side == "A"``: ``grad`` is ``(E, r, d_in)`` and is multiplied on
            the left by ``(c^2 B^T B + reg I)^-1`` of the same layer's ``B``; ``"B"``: ``grad`` is
            ``(E, d_out, r)``, multiplied on the right by ``(c^2 A A^T + reg I)^-1``.
        grads: ``dL/dfactor``, one per factor (not modified).
        regs: damping ``reg > 0`` per factor.
        gate_scales: per factor, ``None`` for the classic preconditioner (``c = 1``), or ``(mean, floor)``
            with ``mean`` the layer's ``(E,)`` mean of ``g^2``: ``c^2 = max(mean, floor)``.

    Returns:
        One tensor per factor, shaped and typed like its ``grad``, freshly allocated and contiguous.

    Raises:
        PreconditionerError: every factorisation failed.
    """
    return apply_preconditioners(factors, grads, preconditioners(factors, regs, gate_scales))


@torch.no_grad()
def preconditioners(
    factors: Sequence[ExpertFactor],
    regs: Sequence[float],
    gate_scales: Sequence[tuple[torch.Tensor, float] | None],
) -> list[torch.Tensor]:
    """The ``(E, r, r)`` preconditioner ``P`` of each factor, as ``precondition`` applies them: ``P @ grad``
    for an A-factor, ``grad @ P`` for a B-factor (arguments and failures as there; contiguous, in
    ``compute_dtype`` of the factor's dtype). For an update that applies them itself
    (``moelora.layers.kernels.precondition_adamw``)."""
    out: list[torch.Tensor | None] = [None] * len(factors)
    for batch in _solve_batches(factors, regs, gate_scales):
        for index, inverse in zip(batch.indices, batch.per_factor()):
            out[index] = inverse
    return out  # type: ignore[return-value]


@torch.no_grad()
def apply_preconditioners(
    factors: Sequence[ExpertFactor], grads: Sequence[torch.Tensor], inverses: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """``P @ grad`` for each A-factor's ``(E, r, d_in)`` gradient, ``grad @ P`` for each B-factor's
    ``(E, d_out, r)``, with ``P`` its ``(E, r, r)`` ``inverses[i]`` (from ``preconditioners``); each result
    shaped and typed like its ``grad``, freshly allocated and contiguous."""
    # kron(I_k, P) of the B-side systems that take the 16-wide reading, built in one go per rank and dtype.
    blocked: dict[tuple, list[int]] = defaultdict(list)
    for index, (factor, grad) in enumerate(zip(factors, grads)):
        k = _block_factor(inverses[index].shape[-1])
        if factor.side != SIDE_A and _blocked(grad, k):
            blocked[(k, inverses[index].dtype, inverses[index].device)].append(index)
    krons: dict[int, torch.Tensor] = {}
    for (k, _, _), indices in blocked.items():
        stacked = _kron_eye(torch.cat([inverses[i] for i in indices]), k)
        krons.update(zip(indices, stacked.split([inverses[i].shape[0] for i in indices])))
    out = []
    for index, (factor, grad) in enumerate(zip(factors, grads)):
        if factor.side == SIDE_A:
            out.append(_apply_a(grad, inverses[index]))
        else:
            k = _block_factor(inverses[index].shape[-1])
            out.append(_apply_b(grad, inverses[index], krons.get(index), k))
    return out


class _Batch(NamedTuple):
    """The solved ``(N, r, r)`` systems of the factors ``indices``, stacked in that order."""

    indices: list[int]
    sizes: list[int]  # each factor's number of experts, in the order of indices
    inverses: torch.Tensor  # (N, r, r), contiguous

    def per_factor(self) -> tuple[torch.Tensor, ...]:
        return self.inverses.split(self.sizes)


def _solve_batches(
    factors: Sequence[ExpertFactor],
    regs: Sequence[float],
    gate_scales: Sequence[tuple[torch.Tensor, float] | None],
) -> list[_Batch]:
    """Every factor's systems, solved in batches; failures counted and reported (raising when all failed)."""
    # Batch key: everything that must be equal for the (N, r, r) systems to be solved together.
    batches: dict[tuple, list[int]] = defaultdict(list)
    for index, factor in enumerate(factors):
        scale = gate_scales[index]
        dtype = compute_dtype(factor.param.dtype)
        rank = factor.param.shape[1] if factor.side == SIDE_A else factor.param.shape[2]
        batches[(factor.param.device, dtype, rank, float(regs[index]), None if scale is None else scale[1])].append(index)

    solved = []
    failures = []  # per batch: [not positive definite, non-finite, failed on the A side] as 0-d tensors
    total = 0
    for (_, dtype, rank, reg, floor), indices in batches.items():
        k = _block_factor(rank)
        partners = [factors[i].partner for i in indices]  # order irrelevant to the check
        compiled = (rank <= kernels.MAX_SMALL_RANK and all(p.dtype == dtype for p in partners)
                    and kernels.batched_applies(*partners))
        # A-factors first (failures are counted per side); on the torch path those whose B reads as 16-wide
        # rows leading.
        indices.sort(key=lambda i: (factors[i].side != SIDE_A, not compiled and not _blocked(factors[i].partner, k)))
        count_a = sum(1 for i in indices if factors[i].side == SIDE_A)
        sizes = [factors[i].param.shape[0] for i in indices]
        if compiled:  # every layer's Gram matrices in one call
            systems = kernels.grams([factors[i].partner for i in indices],
                                    [factors[i].side == SIDE_A for i in indices], rank)
        else:
            systems = _grams([factors[i] for i in indices], dtype, rank, k)  # (N, r, r), N = sum of the layers' E
        if floor is not None:
            # a batch with a floor holds only gate-rescaled systems, each with its scale
            scales = [gate_scales[i] for i in indices]
            c2 = torch.cat([s[0] for s in scales if s is not None]).to(dtype).clamp_min_(floor)
            systems.mul_(c2[:, None, None])
        systems.diagonal(dim1=-2, dim2=-1).add_(reg)
        inverses, not_pd, non_finite = damped_inverse(systems)
        inverses = inverses.contiguous()  # cholesky_inverse writes column-major; one small copy for all
        rows_a = sum(sizes[:count_a])
        failed = not_pd | non_finite
        failures.append(torch.stack([not_pd.sum(), non_finite.sum(), failed[:rows_a].sum()]))
        total += systems.shape[0]
        solved.append(_Batch(indices, sizes, inverses))
    if failures:
        _report(torch.stack(failures).sum(0).tolist(), total, regs)
    return solved


def _grams(factors: list[ExpertFactor], dtype: torch.dtype, rank: int, k: int) -> torch.Tensor:
    """``(N, r, r)``: the Gram matrix of each factor's partner (``_gram``), stacked in order; a factor whose
    B reads as 16-wide rows (``_blocked``) must come before the others."""
    parts = [_gram(f, dtype, k) for f in factors]
    count_blocked = sum(1 for f in factors if f.side == SIDE_A and _blocked(f.partner, k))
    if count_blocked:
        # B^T B = the sum of the k diagonal (r, r) blocks of W^T W, for all such layers in one go.
        wide = torch.cat(parts[:count_blocked]).view(-1, k, rank, k, rank)
        parts[:count_blocked] = [wide.diagonal(dim1=1, dim2=3).sum(-1)]
    return torch.cat(parts)


def damped_inverse(systems: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverses of symmetric positive definite ``(N, r, r)`` systems through one batched Cholesky.

    Returns ``(inverses, not_pd, non_finite)``: ``(N, r, r)`` inverses with the failed ones set to zero, and
    two disjoint ``(N,)`` masks: the factorisation failed (``info > 0``), or it succeeded but its inverse is
    not finite.
    """
    if systems.shape[-1] <= kernels.MAX_SMALL_RANK and kernels.batched_applies(systems):
        inverses, status = kernels.damped_inverse(systems)  # the same, in one compiled pass
        return inverses, status == 1, status == 2
    chol, info = torch.linalg.cholesky_ex(systems)
    not_pd = info != 0
    # A failed factor is only partly computed and cholesky_inverse may raise on it: invert the identity in
    # its place (the result is masked to zero below), so the failure is counted rather than raised.
    identity = torch.eye(systems.shape[-1], dtype=chol.dtype, device=chol.device)
    chol = torch.where(not_pd[:, None, None], identity, chol)
    # cholesky_inverse reads only the lower triangle, and is several times faster than cholesky_solve
    # against wide right-hand sides; the inverse is then applied with one batched matmul per factor.
    inverses = torch.cholesky_inverse(chol)
    non_finite = ~torch.isfinite(inverses).flatten(1).all(dim=1) & ~not_pd
    return inverses.masked_fill_((not_pd | non_finite)[:, None, None], 0.0), not_pd, non_finite


# CPU BLAS runs batched GEMMs whose inner dimension is r (4 here) far below memory speed, and a
# B-factor's rows are only r wide. Read k consecutive rows of B (E, d_out, r) as one row of a
# (E, d_out / k, k r) matrix W, with k r = 16: both B-side products then become GEMMs of a shape BLAS
# handles well, for k times the flops (about 10 % off the whole step on a 2-core CPU):
#     B^T B      = sum of the k diagonal (r, r) blocks of W^T W
#     grad_B P   = (grad_B read as W) @ kron(I_k, P), read back as (E, d_out, r)
# Layers whose d_out is not a multiple of k take the plain products.
_BLOCK_WIDTH = 16


def _block_factor(rank: int) -> int:
    """``k`` with ``k * rank == 16``, or 1 when there is none."""
    return _BLOCK_WIDTH // rank if rank < _BLOCK_WIDTH and _BLOCK_WIDTH % rank == 0 else 1


def _kron_eye(inverses: torch.Tensor, k: int) -> torch.Tensor:
    """``(N, r, r) -> (N, k r, k r)`` block-diagonal ``kron(I_k, P)``."""
    n, rank, _ = inverses.shape
    kron = inverses.new_zeros(n, k, rank, k, rank)
    kron.diagonal(dim1=1, dim2=3).copy_(inverses.unsqueeze(-1).expand(-1, -1, -1, k))
    return kron.view(n, k * rank, k * rank)


def _blocked(tensor: torch.Tensor, k: int) -> bool:
    """Whether a B-shaped ``(E, d_out, r)`` tensor takes the 16-wide reading (``d_out`` a multiple of ``k``,
    and not served by the compiled CPU kernels, which take the plain products)."""
    return (k > 1 and tensor.shape[-1] * k == _BLOCK_WIDTH and tensor.shape[1] % k == 0
            and not kernels.batched_applies(tensor))


def _gram(factor: ExpertFactor, dtype: torch.dtype, k: int) -> torch.Tensor:
    """Gram matrix of the partner factor: ``(E, r, r)`` ``A A^T`` for a B-factor; for an A-factor
    ``B^T B``, or ``(E, k r, k r)`` ``W^T W`` when ``B`` reads as ``W`` (see ``_BLOCK_WIDTH``)."""
    other = factor.partner if factor.partner.dtype == dtype else factor.partner.to(dtype)
    if kernels.batched_applies(other) and other.shape[-1 if factor.side == SIDE_A else 1] <= kernels.MAX_SMALL_RANK:
        return kernels.gram_cols(other) if factor.side == SIDE_A else kernels.gram_rows(other)
    if factor.side != SIDE_A:
        return torch.bmm(other, other.mT)  # (E, r, d_in) -> (E, r, r)
    if _blocked(other, k):
        experts, rows, rank = other.shape
        other = other.view(experts, rows // k, k * rank)
    return torch.bmm(other.mT, other)


def _apply_a(grad: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """``P @ grad`` for an ``(E, r, d_in)`` A-gradient, in ``grad``'s dtype."""
    g = grad if grad.dtype == inverse.dtype else grad.to(inverse.dtype)
    out = kernels.left_mul(inverse, g) if kernels.batched_applies(inverse, g) else torch.bmm(inverse, g)
    return out if out.dtype == grad.dtype else out.to(grad.dtype)


def _apply_b(grad: torch.Tensor, inverse: torch.Tensor, kron: torch.Tensor | None, k: int) -> torch.Tensor:
    """``grad @ P`` for an ``(E, d_out, r)`` B-gradient, through ``kron = kron(I_k, P)`` when it fits."""
    g = grad if grad.dtype == inverse.dtype else grad.to(inverse.dtype)
    if kernels.batched_applies(g, inverse):
        out = kernels.right_mul(g, inverse)
    elif kron is None or not _blocked(g, k):
        out = torch.bmm(g, inverse)
    else:
        experts, rows, rank = g.shape
        out = torch.bmm(g.reshape(experts, rows // k, k * rank), kron).view(experts, rows, rank)
    return out if out.dtype == grad.dtype else out.to(grad.dtype)


def _report(counts: list[int], total: int, regs: Sequence[float]) -> None:
    not_pd, non_finite, failed_a = (int(c) for c in counts)
    failed = not_pd + non_finite
    if not failed:
        return
    detail = (
        f"{not_pd} not positive definite, {non_finite} non-finite; {failed_a} on the A side "
        f"((c^2 B^T B + reg I)), {failed - failed_a} on the B side ((c^2 A A^T + reg I))"
    )
    hint = (
        f"check the adapter weights and gradients for inf/NaN, or increase reg (now {sorted(set(regs))})"
    )
    if failed == total:
        raise PreconditionerError(
            f"every one of the {total} r x r preconditioner factorisations failed ({detail}); {hint}"
        )
    warnings.warn(
        f"{failed} of {total} r x r preconditioner factorisations failed ({detail}); those experts' "
        f"preconditioned gradients are zero for this step; {hint}",
        PreconditionerWarning,
        stacklevel=3,
    )
