"""Expert-parallel token dispatch and combine over a ``torch.distributed`` process group (Kimi K2's 16-way EP).

Dimension legend: W ranks in the EP group, E experts (global), L = E / W local experts per rank, T tokens on this
rank, K top-k, D hidden size, R rows this rank receives (copies routed to its experts by all ranks).

Rank ``r`` of the group owns experts ``[r*L, (r+1)*L)``. ``ep_dispatch(x [T, D], topk_ids [T, K], E, group) ->
(recv_x [R, D], recv_offsets [L] int32, handle)`` sends every (token, k) copy to the owner of ``topk_ids[t, k]``;
``ep_combine(y [R, D], handle, topk_weights [T, K]) -> [T, D]`` sends each expert output row back to its token's
rank and returns ``sum_k topk_weights[t, k] * y_copy(t, k)`` (fp32 accumulation, as ``k2.ops.moe_unpermute``).
Routing weights are applied where the token lives; they travel only in the native path's backward of
``ep_combine``, one scalar beside each gradient row.

Received row order (deterministic): by local expert, then by source rank (group rank), then by the source's send
order, which is ``k2.ops.moe_permute``'s stable sort by expert (token index, then k). ``recv_offsets`` are the
cumulative row ends per local expert, ready for ``k2.ops.grouped_gemm``.

The exchange, step by step (the ``all_to_all`` path; the ``nccl`` path below fuses 1, 3 and 4):
1. ``moe_permute`` sorts this rank's copies by expert, hence by destination rank (``handle.row_map``).
2. One ``all_to_all_single`` of the per-expert counts ``[E]`` (``L`` per destination); then the send and received
   counts come to the host in one copy — the only host synchronisation, needed for the split sizes.
3. ``all_to_all_single`` of the rows with those split sizes; the rows arrive source-rank-major.
4. A gather by ``handle.recv_order`` regroups them by local expert (skipped when L = 1: already in order).
``ep_combine`` runs 4 → 3 backwards (gather by the inverse permutation, all-to-all with the splits swapped) and
then ``moe_unpermute`` with this rank's routing weights.

Autograd falls out of the composition (``all_to_all`` path): the row all-to-all is the custom op
``k2::ep_all_to_all`` whose backward is the same exchange with the splits swapped; the regroup is
``k2::ep_permute_rows``, a gather whose backward is the gather by the inverse permutation (a scatter costs 3-5x more
on CPU); ``moe_permute`` / ``moe_unpermute`` bring their own.
So the backward of dispatch sends row gradients back and sums each token's K copies, and the backward of combine
dispatches ``weight * grad_out`` rows to the expert ranks and computes ``d topk_weights[t, k] = <grad_out[t],
y_copy(t, k)>`` locally (``moe_unpermute``'s backward, on the rows that came back in the forward).

Why custom ops (not ``torch.autograd.Function``): a process group is not a type a ``torch.library`` schema takes,
but its name is. The ops take ``group_name: str`` and resolve it with
``torch.distributed.distributed_c10d._resolve_process_group``, as torch's functional collectives (``_c10d_functional``)
do; ``register_fake`` gives the output shapes (``sum(output_splits)`` rows), so the ops trace under
``torch.compile``. The split sizes are ``list[int]`` arguments, known on the host after the count exchange.

Back ends, chosen per call in one place (``_exchange_path``), identically on every rank of the group:

- ``local``: a group of size 1, or ``group=None`` without an initialised default group: no collective;
  ``ep_dispatch`` is ``moe_permute`` and ``ep_combine`` is ``moe_unpermute``.
- ``nccl``, the native path of ``csrc/comm`` (``k2.ops._nccl``): when the tensors are on CUDA, the group's torch
  back end is NCCL, ``K2_OPS`` is not ``reference``, the rows are fp32/bf16/fp16 (and the routing weights too, for
  ``ep_combine``), ``K >= 1``, and ``k2.ops._nccl.available()`` holds on every rank of the group (asked once per
  (group, device) with one ``all_gather_object``, so the ranks cannot disagree and deadlock). The routing is sorted
  without moving rows (``_route``: the ``row_map`` and counts ``moe_permute`` would give); the counts are exchanged
  as above (step 2, the same host sync); then ``k2::ep_nccl_dispatch`` packs ``x[row_map[i] // K]``, sends and
  receives with ``ncclSend``/``ncclRecv`` in one NCCL group and regroups by ``recv_order`` — fused kernels on
  torch's current stream, no ``[T*K, D]`` copy in torch. ``k2::ep_nccl_combine`` scatters ``y`` back to arrival
  order, exchanges and sums each token's K rows with its weights in fp32. Their gradients are the same calls:
  the backward of dispatch is a combine with unit weights; the backward of combine sends ``grad_out`` rows with
  the routing weights as an extra lane and scales them on the expert rank (``k2::ep_nccl_dispatch_scaled``:
  ``grad_y = w * grad_out`` in fp32, as ``moe_unpermute``'s backward), and ``d topk_weights[t, k] =
  <grad_out[t], y_copy(t, k)>`` locally from the rows the forward brought back.
- ``all_to_all``: ``torch.distributed.all_to_all_single`` (gloo on CPU, NCCL on GPU) in every other case. When the
  tensors are on CUDA and the group is NCCL but the native path is unavailable (no CUDA build of ``k2._C``, no
  ``libnccl.so.2``), this is the fallback, and a ``RuntimeWarning`` naming the reason is given once per process.
  ``K2_OPS=reference`` chooses it silently.

Both multi-rank paths receive the same rows in the same order (rows move as bytes) and combine with fp32
accumulation; ``EpHandle.path`` records which one the dispatch took. ``ep_combine`` decides afresh by the same rule
(the same answer unless ``y`` or the weights have a dtype the native path does not take); the handle serves both.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence

import torch
import torch.distributed as dist

from k2.ops import _native, _nccl
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


# ---- the native NCCL path as custom ops (k2.ops._nccl; csrc/comm) -------------------------------------------
# Shared arguments: send_copy [S] int32 (EpHandle.row_map), top_k, the host split lists of the count exchange,
# recv_index [R] int32 or None (EpHandle.recv_order) and the group's name; the communicator is looked up (created
# collectively on first use) per (group, device) by k2.ops._nccl.communicator_for.


def _communicator(group_name: str, device: torch.device) -> _nccl.NcclCommunicator:
    return _nccl.communicator_for(_process_group(group_name), device)


@torch.library.custom_op("k2::ep_nccl_dispatch", mutates_args=())
def _ep_nccl_dispatch(
    x: torch.Tensor,
    send_copy: torch.Tensor,
    top_k: int,
    send_splits: list[int],
    recv_splits: list[int],
    recv_index: torch.Tensor | None,
    group_name: str,
) -> torch.Tensor:
    """``x [T, D]`` → ``recv_x [R, D]``: pack ``x[send_copy[i] // top_k]``, NCCL all-to-all, regroup by
    ``recv_index`` (arrival order when None)."""
    comm = _communicator(group_name, x.device)
    recv_x, _ = _nccl.dispatch(comm, x, send_copy, top_k, send_splits, recv_splits, recv_index)
    return recv_x


@_ep_nccl_dispatch.register_fake
def _(x, send_copy, top_k, send_splits, recv_splits, recv_index, group_name):
    return x.new_empty(sum(recv_splits), x.shape[1])


def _nccl_dispatch_setup(ctx, inputs, output) -> None:
    x, send_copy, top_k, send_splits, recv_splits, recv_index, group_name = inputs
    ctx.save_for_backward(send_copy, recv_index)
    ctx.args = (top_k, x.shape[0], list(send_splits), list(recv_splits), group_name)


def _nccl_dispatch_backward(ctx, grad: torch.Tensor):
    send_copy, recv_index = ctx.saved_tensors
    top_k, num_tokens, send_splits, recv_splits, group_name = ctx.args
    grad_x, _ = _ep_nccl_combine(
        grad.contiguous(), send_copy, top_k, num_tokens, send_splits, recv_splits, recv_index, None, group_name
    )  # unit weights: each token sums its K copies' gradients
    return grad_x, None, None, None, None, None, None


_ep_nccl_dispatch.register_autograd(_nccl_dispatch_backward, setup_context=_nccl_dispatch_setup)
# As moe_permute (the all_to_all path's first step): under autocast the rows travel in the autocast dtype.
_native.register_autocast("ep_nccl_dispatch", cast=(0,))


@torch.library.custom_op("k2::ep_nccl_combine", mutates_args=())
def _ep_nccl_combine(
    y: torch.Tensor,
    send_copy: torch.Tensor,
    top_k: int,
    num_tokens: int,
    send_splits: list[int],
    recv_splits: list[int],
    recv_index: torch.Tensor | None,
    weights: torch.Tensor | None,
    group_name: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``y [R, D]`` → ``(out [T, D], rows [S, D])``: ``out[t] = sum_k w[t, k] * y_copy(t, k)`` (fp32 accumulation;
    ``w = 1`` when ``weights`` is None) and the rows that came back (``rows[i]`` answers ``send_copy[i]``; not
    differentiable, kept for the weights' gradient)."""
    comm = _communicator(group_name, y.device)
    return _nccl.combine(
        comm, y, send_copy, top_k, num_tokens, send_splits, recv_splits, recv_index, weights, return_rows=True
    )


@_ep_nccl_combine.register_fake
def _(y, send_copy, top_k, num_tokens, send_splits, recv_splits, recv_index, weights, group_name):
    return y.new_empty(num_tokens, y.shape[1]), y.new_empty(send_copy.shape[0], y.shape[1])


def _nccl_combine_setup(ctx, inputs, output) -> None:
    _, send_copy, top_k, num_tokens, send_splits, recv_splits, recv_index, weights, group_name = inputs
    rows = output[1]
    ctx.mark_non_differentiable(rows)
    ctx.save_for_backward(send_copy, recv_index, weights, rows)
    ctx.args = (top_k, num_tokens, list(send_splits), list(recv_splits), group_name)


def _nccl_combine_backward(ctx, grad_out: torch.Tensor, _grad_rows):
    send_copy, recv_index, weights, rows = ctx.saved_tensors
    top_k, num_tokens, send_splits, recv_splits, group_name = ctx.args
    grad_out = grad_out.contiguous()
    grad_y = grad_weights = None
    if ctx.needs_input_grad[0]:
        if weights is None:
            grad_y = _ep_nccl_dispatch(grad_out, send_copy, top_k, send_splits, recv_splits, recv_index, group_name)
        else:
            grad_y = _ep_nccl_dispatch_scaled(
                grad_out, weights, send_copy, top_k, send_splits, recv_splits, recv_index, group_name
            )
    if weights is not None and ctx.needs_input_grad[7]:
        # d w[t, k] = <grad_out[t], y_copy(t, k)> in fp32, as moe_unpermute's backward; copies not sent get 0.
        acc = torch.promote_types(rows.dtype, torch.float32)
        copies = rows.new_zeros(num_tokens * top_k, rows.shape[1]).index_copy_(0, send_copy.long(), rows)
        copies = copies.view(num_tokens, top_k, rows.shape[1]).to(acc)  # [T, K, D]
        grad_weights = torch.bmm(copies, grad_out.to(acc).unsqueeze(-1)).squeeze(-1).to(weights.dtype)  # [T, K]
    return grad_y, None, None, None, None, None, None, grad_weights, None


_ep_nccl_combine.register_autograd(_nccl_combine_backward, setup_context=_nccl_combine_setup)


@torch.library.custom_op("k2::ep_nccl_dispatch_scaled", mutates_args=())
def _ep_nccl_dispatch_scaled(
    g: torch.Tensor,
    weights: torch.Tensor,
    send_copy: torch.Tensor,
    top_k: int,
    send_splits: list[int],
    recv_splits: list[int],
    recv_index: torch.Tensor | None,
    group_name: str,
) -> torch.Tensor:
    """The backward of :func:`_ep_nccl_combine` in ``y``: ``grad_y[j] = w(copy j) * g[token of copy j]`` in fp32,
    in ``g``'s dtype. The rows ``g[t]`` travel as in a dispatch (no ``[T*K, D]`` copy) and each copy's weight
    travels beside its row as an extra lane of the same NCCL group; the product is formed on the expert rank."""
    comm = _communicator(group_name, g.device)
    sent_weights = weights.reshape(-1).index_select(0, send_copy)  # [S], the weight of each send row
    recv_g, (recv_w,) = _nccl.dispatch(
        comm, g, send_copy, top_k, send_splits, recv_splits, recv_index, extras=(sent_weights,)
    )
    acc = torch.promote_types(g.dtype, torch.float32)
    return (recv_g.to(acc) * recv_w.to(acc)[:, None]).to(g.dtype)


@_ep_nccl_dispatch_scaled.register_fake
def _(g, weights, send_copy, top_k, send_splits, recv_splits, recv_index, group_name):
    return g.new_empty(sum(recv_splits), g.shape[1])


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
        recv_order: ``[R]`` int32 or None: ``recv_x[i] = buffer[recv_order[i]]``, where ``buffer`` holds the rows
            source-rank-major as the all-to-all delivers them; None when that is already the final order
            (one local expert, or the local path). The native path's ``recv_index``.
        recv_order_inv: ``[R]`` int32 or None, the inverse permutation: ``buffer[j] = recv_x[recv_order_inv[j]]``.
        path: the exchange the dispatch ran: ``"local"``, ``"all_to_all"`` (``all_to_all_single``) or ``"nccl"``
            (the native path).
    """

    group_name: str | None
    num_experts: int
    row_map: torch.Tensor
    send_splits: tuple[int, ...]
    recv_splits: tuple[int, ...]
    recv_counts: torch.Tensor
    recv_order: torch.Tensor | None
    recv_order_inv: torch.Tensor | None
    path: str = "all_to_all"

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
    return (src_start.t().flatten()[block] + within).to(torch.int32)


def _route(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The send order of the native path without moving rows: ``row_map [T*K]`` int32 and ``send_counts [E]``
    int64, exactly ``moe_permute``'s ``row_map`` and per-expert counts (a stable sort by expert). Ids outside
    ``[0, E)`` sort last and are not counted (the caller's count check rejects them). No host sync."""
    flat = topk_ids.reshape(-1).long()
    key = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts)
    sorted_key, row_map = torch.sort(key, stable=True)
    ends = torch.searchsorted(sorted_key, torch.arange(1, num_experts + 1, device=flat.device))  # [E]
    return row_map.to(torch.int32), torch.diff(ends, prepend=ends.new_zeros(1))


# ---- choosing the exchange ---------------------------------------------------------------------------------

_NCCL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the native combine (and its backward) takes
_NATIVE_STATUS: dict[tuple[str, int | None], tuple[bool, str]] = {}
_warned_fallback = False


def _backend_name(pg: dist.ProcessGroup) -> str:
    return str(dist.get_backend(pg))


def _is_nccl_group(pg: dist.ProcessGroup) -> bool:
    name = _backend_name(pg)  # "nccl", or e.g. "cpu:gloo,cuda:nccl" for a group with a back end per device
    return name == "nccl" or "cuda:nccl" in name.split(",")


def _gather_status(pg: dist.ProcessGroup, device: torch.device, status: tuple[bool, str]) -> list:
    statuses: list = [None] * pg.size()
    with torch.cuda.device(device):  # an NCCL group sends the pickled objects from the current device
        dist.all_gather_object(statuses, status, group=pg)
    return statuses


def _native_status(pg: dist.ProcessGroup, device: torch.device) -> tuple[bool, str]:
    """``k2.ops._nccl.available()`` agreed over the group: ``(True, reason)`` only when every rank can run the
    native path; else ``(False, why)``, this rank's reason first. Collective on the first call per (group, device),
    cached after."""
    key = (pg.group_name, device.index)
    status = _NATIVE_STATUS.get(key)
    if status is None:
        mine = _nccl.available()
        status = mine
        if mine[0]:
            for rank, (ok, reason) in enumerate(_gather_status(pg, device, mine)):
                if not ok:
                    status = (False, f"group rank {rank} cannot use it: {reason}")
                    break
        else:
            _gather_status(pg, device, mine)  # every rank takes part in the one gather
        _NATIVE_STATUS[key] = status = (bool(status[0]), str(status[1]))
    return status


def _warn_fallback(reason: str) -> None:
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(
            f"k2.ops.ep_dispatch/ep_combine: the native NCCL path is unavailable ({reason}); exchanging rows with "
            "torch.distributed.all_to_all_single over the NCCL process group instead",
            RuntimeWarning,
            stacklevel=4,
        )


def _exchange_path(
    pg: dist.ProcessGroup | None, device: torch.device, dtypes: Sequence[torch.dtype], top_k: int
) -> str:
    """The one place the exchange is chosen: ``"local"``, ``"nccl"`` or ``"all_to_all"`` (module docstring). Every
    input is the same on every rank of the group (device type, back end, dtypes, K, the agreed availability), so
    the ranks choose alike."""
    if pg is None:
        return "local"
    if device.type != "cuda" or not _is_nccl_group(pg) or _native.forced_reference():
        return "all_to_all"
    if top_k < 1 or any(d not in _NCCL_DTYPES for d in dtypes):
        return "all_to_all"  # float64 etc.: the native combine takes fp32/bf16/fp16 only
    ok, reason = _native_status(pg, device)
    if not ok:
        _warn_fallback(reason)
        return "all_to_all"
    return "nccl"


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

    CUDA tensors on an NCCL group take the native NCCL path when it is available, else ``all_to_all_single`` with a
    one-time warning saying why (module docstring); the results are the same.
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
    num_rows = topk_ids.numel()
    path = _exchange_path(pg, x.device, (x.dtype,), topk_ids.shape[1])
    if path == "nccl":
        row_map, send_counts = _route(topk_ids, num_experts)  # [T*K] int32, [E] int64; no rows moved yet
    else:
        x_sorted, row_map, offsets = moe_permute(x, topk_ids, num_experts)  # [T*K, D], [T*K], [E]
        send_counts = torch.diff(offsets, prepend=offsets.new_zeros(1)).long()  # [E]
    if pg is None:
        handle = EpHandle(
            None, num_experts, row_map, (num_rows,), (num_rows,), send_counts.view(1, num_experts), None, None, path
        )
        return x_sorted, offsets, handle

    local = num_experts // world
    recv_counts = _ep_exchange_counts(send_counts, pg.group_name).view(world, local)  # [W, L]
    host = torch.cat([send_counts, recv_counts.flatten()]).tolist()  # the one host sync
    send_splits = tuple(sum(host[j * local : (j + 1) * local]) for j in range(world))
    recv_splits = tuple(sum(host[num_experts + s * local : num_experts + (s + 1) * local]) for s in range(world))
    if sum(send_splits) != num_rows:
        raise ValueError(f"k2.ops.ep_dispatch: topk_ids must lie in [0, {num_experts})")
    num_recv = sum(recv_splits)
    recv_order = recv_order_inv = None
    if local > 1:
        recv_order = _block_transpose(recv_counts, num_recv)  # [R] int32: source-rank-major -> by local expert
        recv_order_inv = _block_transpose(recv_counts.t(), num_recv)
    if path == "nccl":  # pack, NCCL exchange and regroup in one call
        recv_x = _ep_nccl_dispatch(
            x, row_map, topk_ids.shape[1], list(send_splits), list(recv_splits), recv_order, pg.group_name
        )
    else:
        recv_x = _ep_all_to_all(x_sorted, list(recv_splits), list(send_splits), pg.group_name)  # source-major
        if recv_order is not None:
            recv_x = _ep_permute_rows(recv_x, recv_order, recv_order_inv)  # [R, D] by local expert
    recv_offsets = recv_counts.sum(0).cumsum(0).to(torch.int32)  # [L]
    handle = EpHandle(
        pg.group_name, num_experts, row_map, send_splits, recv_splits, recv_counts, recv_order, recv_order_inv, path
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
    num_tokens, top_k = topk_weights.shape
    path = _exchange_path(_process_group(handle.group_name), y.device, (y.dtype, topk_weights.dtype), top_k)
    if path == "nccl":  # regroup back, NCCL exchange and weighted sum in one call
        out, _ = _ep_nccl_combine(
            y,
            handle.row_map,
            top_k,
            num_tokens,
            list(handle.send_splits),
            list(handle.recv_splits),
            handle.recv_order,
            topk_weights,
            handle.group_name,
        )
        return out
    if handle.recv_order is not None:
        y = _ep_permute_rows(y, handle.recv_order_inv, handle.recv_order)  # back to source-rank-major
    back = _ep_all_to_all(y, list(handle.send_splits), list(handle.recv_splits), handle.group_name)  # [T*K, D]
    return moe_unpermute(back, handle.row_map, topk_weights)
