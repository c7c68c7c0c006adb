"""Expert-parallel token dispatch and combine over a ``torch.distributed`` process group (Kimi K2's 16-way EP).

Dimension legend: W ranks in the EP group, E experts (global), L = E / W local experts per rank, T tokens on this
rank, K top-k, D hidden size, R rows this rank receives (copies routed to its experts by all ranks).

Rank ``r`` of the group owns experts ``[r*L, (r+1)*L)``. ``ep_dispatch(x [T, D], topk_ids [T, K], E, group) ->
(recv_x [R, D], recv_offsets [L] int32, handle)`` sends every (token, k) copy to the owner of ``topk_ids[t, k]``;
``ep_combine(y [R, D], handle, topk_weights [T, K]) -> [T, D]`` sends each expert output row back to its token's
rank and returns ``sum_k topk_weights[t, k] * y_copy(t, k)`` (fp32 accumulation, as ``k2.ops.moe_unpermute``).
Routing weights never travel: they are applied where the token lives.

Received row order (deterministic): by local expert, then by source rank (group rank), then by the source's send
order, which is ``k2.ops.moe_permute``'s stable sort by expert (token index, then k). ``recv_offsets`` are the
cumulative row ends per local expert, ready for ``k2.ops.grouped_gemm``.

The exchange, step by step:
1. ``moe_permute`` sorts this rank's copies by expert, hence by destination rank (``handle.row_map``).
2. One ``all_to_all_single`` of the per-expert counts ``[E]`` (``L`` per destination); then the send and received
   counts come to the host in one copy — the only host synchronisation, needed for the split sizes.
3. ``all_to_all_single`` of the rows with those split sizes; the rows arrive source-rank-major.
4. A gather by ``handle.recv_order`` regroups them by local expert (skipped when L = 1: already in order).
``ep_combine`` runs 4 → 3 backwards (gather by the inverse permutation, all-to-all with the splits swapped) and
then ``moe_unpermute`` with this rank's routing weights.

Autograd falls out of the composition: the row all-to-all is the custom op ``k2::ep_all_to_all`` whose backward is
the same exchange with the splits swapped; the regroup is ``k2::ep_permute_rows``, a gather whose backward is the
gather by the inverse permutation (a scatter costs 3-5x more on CPU); ``moe_permute`` / ``moe_unpermute`` bring
their own.
So the backward of dispatch sends row gradients back and sums each token's K copies, and the backward of combine
dispatches ``weight * grad_out`` rows to the expert ranks and computes ``d topk_weights[t, k] = <grad_out[t],
y_copy(t, k)>`` locally (``moe_unpermute``'s backward, on the rows that came back in the forward).

Why custom ops (not ``torch.autograd.Function``): a process group is not a type a ``torch.library`` schema takes,
but its name is. The ops take ``group_name: str`` and resolve it with
``torch.distributed.distributed_c10d._resolve_process_group``, as torch's functional collectives (``_c10d_functional``)
do; ``register_fake`` gives the output shapes (``sum(output_splits)`` rows), so the ops trace under
``torch.compile``. The split sizes are ``list[int]`` arguments, known on the host after the count exchange.

Back end: ``torch.distributed.all_to_all_single`` (gloo on CPU, NCCL on GPU). A group of size 1, or ``group=None``
without an initialised default group, runs locally with no collective: ``ep_dispatch`` is then ``moe_permute`` and
``ep_combine`` is ``moe_unpermute``.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from k2.ops.moe import moe_permute, moe_unpermute


def _process_group(group_name: str) -> dist.ProcessGroup:
    return dist.distributed_c10d._resolve_process_group(group_name)


# ---- collectives as custom ops -----------------------------------------------------------------------------


@torch.library.custom_op("k2::ep_exchange_counts", mutates_args=())
def _ep_exchange_counts(counts: torch.Tensor, group_name: str) -> torch.Tensor:
    """``counts [E]`` int64 rows per expert this rank sends → ``[E]`` = ``[W, L]`` rows each source rank sends to
    this rank's local experts (source-rank-major)."""
    out = torch.empty_like(counts)
    dist.all_to_all_single(out, counts.contiguous(), group=_process_group(group_name))
    return out


@_ep_exchange_counts.register_fake
def _(counts: torch.Tensor, group_name: str) -> torch.Tensor:
    return torch.empty_like(counts)


@torch.library.custom_op("k2::ep_all_to_all", mutates_args=())
def _ep_all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group_name: str) -> torch.Tensor:
    """Rows ``x[sum(input_splits[:j]) : ...]`` go to group rank ``j``; returns ``[sum(output_splits), D]`` with the
    rows from rank ``j`` at block ``j``."""
    out = x.new_empty(sum(output_splits), x.shape[1])
    dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=_process_group(group_name))
    return out


@_ep_all_to_all.register_fake
def _(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group_name: str) -> torch.Tensor:
    return x.new_empty(sum(output_splits), x.shape[1])


def _all_to_all_setup(ctx, inputs, output) -> None:
    _, output_splits, input_splits, group_name = inputs
    ctx.splits = (list(output_splits), list(input_splits))
    ctx.group_name = group_name


def _all_to_all_backward(ctx, grad: torch.Tensor):
    output_splits, input_splits = ctx.splits
    return _ep_all_to_all(grad.contiguous(), input_splits, output_splits, ctx.group_name), None, None, None


_ep_all_to_all.register_autograd(_all_to_all_backward, setup_context=_all_to_all_setup)


@torch.library.custom_op("k2::ep_permute_rows", mutates_args=())
def _ep_permute_rows(x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """``x[index]`` for a permutation ``index [R]`` whose inverse is ``inverse``; the backward is ``grad[inverse]``,
    a gather again (a scatter or ``index_add`` costs several times more on CPU)."""
    return x.index_select(0, index)


@_ep_permute_rows.register_fake
def _(x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    return x.new_empty(index.shape[0], x.shape[1])


def _permute_setup(ctx, inputs, output) -> None:
    _, index, inverse = inputs
    ctx.save_for_backward(index, inverse)


def _permute_backward(ctx, grad: torch.Tensor):
    index, inverse = ctx.saved_tensors
    return _ep_permute_rows(grad, inverse, index), None, None


_ep_permute_rows.register_autograd(_permute_backward, setup_context=_permute_setup)


# ---- front doors -------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EpHandle:
    """What :func:`ep_combine` needs to undo one :func:`ep_dispatch`.

    Attributes:
        group_name: the EP process group's name, or None for the local (size-1) path.
        num_experts: ``E``.
        row_map: ``[T*K]`` int32 from ``moe_permute``: send row ``i`` is the copy with flat index ``row_map[i]``
            (``t*K + k``); send rows are sorted by expert, hence by destination rank.
        send_splits: ``W`` ints, rows sent to each group rank (sum ``T*K``).
        recv_splits: ``W`` ints, rows received from each group rank (sum ``R``).
        recv_counts: ``[W, L]`` int64 on the input's device, rows from source rank ``s`` for local expert ``l``.
        recv_order: ``[R]`` int64 or None: ``recv_x[i] = buffer[recv_order[i]]``, where ``buffer`` holds the rows
            source-rank-major as ``all_to_all_single`` delivers them; None when that is already the final order
            (one local expert, or the local path).
        recv_order_inv: ``[R]`` int64 or None, the inverse permutation: ``buffer[j] = recv_x[recv_order_inv[j]]``.
    """

    group_name: str | None
    num_experts: int
    row_map: torch.Tensor
    send_splits: tuple[int, ...]
    recv_splits: tuple[int, ...]
    recv_counts: torch.Tensor
    recv_order: torch.Tensor | None
    recv_order_inv: torch.Tensor | None

    @property
    def num_recv_rows(self) -> int:
        """``R``, the rows :func:`ep_dispatch` returned."""
        return sum(self.recv_splits)


def _group(group: dist.ProcessGroup | None) -> dist.ProcessGroup | None:
    """The group to exchange over, or None for the local path (no group, or one of size 1)."""
    if group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = dist.group.WORLD
    return None if group.size() == 1 else group


def _block_transpose(counts: torch.Tensor, num_rows: int) -> torch.Tensor:
    """``counts [A, B]`` block sizes. Rows laid out block-major in (a, b) order are to be read in (b, a) order:
    returns ``[num_rows]`` int64, for each row in (b, a) order its position in the (a, b) layout.

    With ``counts = recv_counts [W, L]`` this is ``recv_order`` (source-rank-major buffer → by local expert);
    with ``recv_counts.t()`` it is the inverse."""
    a, b = counts.shape
    src_start = (counts.flatten().cumsum(0) - counts.flatten()).view(a, b)  # start of block (a, b)
    sizes_ba = counts.t().flatten()  # block sizes in (b, a) order
    dst_start = sizes_ba.cumsum(0) - sizes_ba
    block = torch.repeat_interleave(
        torch.arange(a * b, device=counts.device), sizes_ba, output_size=num_rows
    )  # [num_rows] (b, a) block of each row
    within = torch.arange(num_rows, device=counts.device) - dst_start[block]
    return src_start.t().flatten()[block] + within


def ep_dispatch(
    x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, group: dist.ProcessGroup | None = None
) -> tuple[torch.Tensor, torch.Tensor, EpHandle]:
    """Send each token's K copies to the ranks that own their experts.

    Args:
        x: ``[T, D]`` token activations (``T = 0`` allowed).
        topk_ids: ``[T, K]`` integer global expert ids in ``[0, num_experts)``.
        num_experts: ``E``, divisible by the group size ``W``; rank ``r`` owns experts ``[r*E/W, (r+1)*E/W)``.
        group: the EP process group; None means the default group if one is initialised, else the local path.

    Returns:
        ``recv_x [R, D]`` (differentiable), grouped by local expert, then source rank, then source order;
        ``recv_offsets [E/W]`` int32 cumulative row ends per local expert (for ``k2.ops.grouped_gemm``);
        the :class:`EpHandle` for :func:`ep_combine`. Every rank of the group must call this collectively.
    """
    if x.dim() != 2 or topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0]:
        raise ValueError(
            f"k2.ops.ep_dispatch: expected x [T, D] and topk_ids [T, K], got {tuple(x.shape)} and "
            f"{tuple(topk_ids.shape)}"
        )
    if topk_ids.dtype.is_floating_point or topk_ids.dtype == torch.bool:
        raise ValueError(f"k2.ops.ep_dispatch: topk_ids must be an integer tensor, got {topk_ids.dtype}")
    pg = _group(group)
    world = 1 if pg is None else pg.size()
    if num_experts < 1 or num_experts % world != 0:
        raise ValueError(
            f"k2.ops.ep_dispatch: num_experts ({num_experts}) must be a positive multiple of the group size ({world})"
        )
    x_sorted, row_map, offsets = moe_permute(x, topk_ids, num_experts)  # [T*K, D], [T*K], [E]
    num_rows = topk_ids.numel()
    if pg is None:
        counts = torch.diff(offsets, prepend=offsets.new_zeros(1)).long().view(1, num_experts)
        handle = EpHandle(None, num_experts, row_map, (num_rows,), (num_rows,), counts, None, None)
        return x_sorted, offsets, handle

    local = num_experts // world
    send_counts = torch.diff(offsets, prepend=offsets.new_zeros(1)).long()  # [E]
    recv_counts = _ep_exchange_counts(send_counts, pg.group_name).view(world, local)  # [W, L]
    host = torch.cat([send_counts, recv_counts.flatten()]).tolist()  # the one host sync
    send_splits = tuple(sum(host[j * local : (j + 1) * local]) for j in range(world))
    recv_splits = tuple(sum(host[num_experts + s * local : num_experts + (s + 1) * local]) for s in range(world))
    if sum(send_splits) != num_rows:
        raise ValueError(f"k2.ops.ep_dispatch: topk_ids must lie in [0, {num_experts})")
    buffer = _ep_all_to_all(x_sorted, list(recv_splits), list(send_splits), pg.group_name)  # [R, D] source-major
    num_recv = sum(recv_splits)
    recv_order = recv_order_inv = None
    recv_x = buffer
    if local > 1:
        recv_order = _block_transpose(recv_counts, num_recv)
        recv_order_inv = _block_transpose(recv_counts.t(), num_recv)
        recv_x = _ep_permute_rows(buffer, recv_order, recv_order_inv)  # [R, D] by local expert
    recv_offsets = recv_counts.sum(0).cumsum(0).to(torch.int32)  # [L]
    handle = EpHandle(
        pg.group_name, num_experts, row_map, send_splits, recv_splits, recv_counts, recv_order, recv_order_inv
    )
    return recv_x, recv_offsets, handle


def ep_combine(y: torch.Tensor, handle: EpHandle, topk_weights: torch.Tensor) -> torch.Tensor:
    """Return expert outputs to their tokens and sum them with the routing weights.

    Args:
        y: ``[R, D]`` expert outputs in :func:`ep_dispatch`'s ``recv_x`` order.
        handle: the :class:`EpHandle` from that dispatch.
        topk_weights: ``[T, K]`` this rank's routing weights (fp32 is typical); they stay on this rank.

    Returns:
        ``[T, D]`` in ``y``'s dtype: ``out[t] = sum_k topk_weights[t, k] * y_copy(t, k)``, accumulated in fp32.
        Differentiable in ``y`` and ``topk_weights``. Every rank of the group must call this collectively.
    """
    if y.dim() != 2 or topk_weights.dim() != 2:
        raise ValueError(
            f"k2.ops.ep_combine: expected y [R, D] and topk_weights [T, K], got {tuple(y.shape)} and "
            f"{tuple(topk_weights.shape)}"
        )
    if y.shape[0] != handle.num_recv_rows or topk_weights.numel() != handle.row_map.numel():
        raise ValueError(
            f"k2.ops.ep_combine: y has {y.shape[0]} rows and topk_weights {topk_weights.numel()} entries; the "
            f"dispatch received {handle.num_recv_rows} rows and sent {handle.row_map.numel()}"
        )
    if handle.group_name is None:
        return moe_unpermute(y, handle.row_map, topk_weights)
    if handle.recv_order is not None:
        y = _ep_permute_rows(y, handle.recv_order_inv, handle.recv_order)  # back to source-rank-major
    back = _ep_all_to_all(y, list(handle.send_splits), list(handle.recv_splits), handle.group_name)  # [T*K, D]
    return moe_unpermute(back, handle.row_map, topk_weights)
