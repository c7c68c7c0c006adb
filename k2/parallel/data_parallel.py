"""Data parallelism for a replicated model: each rank's rows of a global batch, the gradient average, reductions of
the step's statistics, and agreement between ranks before work starts.

``train.batch_size`` is the global batch: rank ``r`` of ``dp`` takes rows ``[r·B/dp, (r+1)·B/dp)`` of every global
micro-batch, so the set of sequences in a step, and hence the math, does not depend on dp. Each rank's loss is the
mean over its rows; the mean of those means over dp is the global mean (equal row counts), and so is the average
of the gradients.

The gradients are averaged here, before the optimizer, so that the gradient norm (and its clipping) is the global
batch's and the optimizer sees the one-process gradient up to summation order; ZeRO-1 MuonClip then runs with
``reduce_gradients=False`` and keeps only its chunk. (Averaging inside the optimizer with a reduce-scatter would move
half the bytes on NCCL, but the norm for clipping would then need the optimizer to expose its sharded gradients;
gloo has no reduce-scatter, so on the CPU both cost one all-reduce.)
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from k2.errors import K2Error
from k2.parallel.mesh import ParallelState

BUCKET_BYTES = 64 << 20  # gradients are all-reduced in flat buckets of about this size


def batch_rows(batch_size: int, par: ParallelState) -> slice:
    """This rank's rows of a global batch of ``batch_size`` (a multiple of dp)."""
    per_rank = batch_size // par.dp
    return slice(par.dp_rank * per_rank, (par.dp_rank + 1) * per_rank)


@torch.no_grad()
def average_gradients(params: Sequence[torch.Tensor], group: Any, divisor: int | None = None) -> None:
    """Replace each ``p.grad`` by its sum over ``group`` divided by ``divisor`` (default: the group's size, the
    mean; no-op when both are None; ``group=None`` with a divisor only divides). A missing gradient counts as zeros,
    so every rank holds a gradient for every parameter afterwards and the optimizer's collectives line up.

    Expert parallelism: an expert gradient already sums its EP group's slices, so it is summed over the
    expert-replica group and divided by dp (``k2.parallel.expert``)."""
    if group is None and divisor is None:
        return
    world = divisor or dist.get_world_size(group)
    by_dtype: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        by_dtype[(p.grad.dtype, p.grad.device)].append(p.grad)
    if group is None:
        for grads in by_dtype.values():
            torch._foreach_div_(grads, world)
        return
    for grads in by_dtype.values():
        bucket: list[torch.Tensor] = []
        size = 0
        for i, g in enumerate(grads):
            bucket.append(g)
            size += g.numel() * g.element_size()
            if size >= BUCKET_BYTES or i == len(grads) - 1:
                flat = torch.cat([b.reshape(-1) for b in bucket])
                dist.all_reduce(flat, group=group)
                flat /= world
                for b, piece in zip(bucket, flat.split([b.numel() for b in bucket]), strict=True):
                    b.copy_(piece.view_as(b))
                bucket, size = [], 0


def global_grad_norm(
    dense: Sequence[torch.Tensor], expert: Sequence[torch.Tensor], ep_group: Any = None
) -> torch.Tensor:
    """The 2-norm of the whole model's gradient: ``dense`` (replicated, counted once) and ``expert`` (this rank's
    slice of the expert stacks; the squares are summed over the EP group, whose ranks hold disjoint experts)."""
    if ep_group is None:
        return torch.nn.utils.get_total_norm([*dense, *expert], foreach=True)
    dense_sq = torch.nn.utils.get_total_norm(dense, foreach=True).double().square()
    expert_sq = torch.nn.utils.get_total_norm(expert, foreach=True).double().square()
    dist.all_reduce(expert_sq, group=ep_group)
    return (dense_sq + expert_sq).sqrt().float()


def all_reduce(t: torch.Tensor, group: Any, op: str = "sum") -> torch.Tensor:
    """``t`` reduced over ``group`` in place (``"sum"`` or ``"max"``); ``t`` itself when ``group`` is None."""
    if group is not None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=group)
    return t


def from_main(par: ParallelState, value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    if not par.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agree(par: ParallelState, error: BaseException | None) -> None:
    """Collective: every rank reports whether its setup failed; a failure anywhere raises on every rank (the failing
    rank re-raises its own error, the others a ``K2Error`` naming it), so no rank goes on to wait for a dead one."""
    if not par.distributed:
        if error is not None:
            raise error
        return
    reports: list[Any] = [None] * par.world_size
    dist.all_gather_object(reports, None if error is None else f"{error}")
    if error is not None:
        raise error
    failed = [(r, msg) for r, msg in enumerate(reports) if msg is not None]
    if failed:
        rank, msg = failed[0]
        raise K2Error(f"rank {rank}: {msg}")
