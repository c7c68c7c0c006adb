"""The native NCCL path of expert-parallel dispatch/combine: NCCL loading, communicators, and the fused calls.

``k2._C`` loads NCCL at run time with ``dlopen`` (architecture §3): the ``libnccl.so.2`` of an installed
``nvidia-nccl-cu*`` package (the one a CUDA build of torch brings), else whatever the default loader finds;
``K2_NCCL_LIBRARY=/path/to/libnccl.so.2`` is tried first. Importing k2 never loads it; :func:`available` does, once.

Communicators: :func:`create_communicator` makes one NCCL communicator for a torch process group (collective over
the group): group rank 0 creates the unique id (``ncclGetUniqueId``), the group broadcasts it
(``broadcast_object_list``), and every rank calls ``ncclCommInitRank`` on its CUDA device in C++. Python holds an
integer handle in a :class:`NcclCommunicator`; :meth:`NcclCommunicator.destroy` frees it, and any still alive are
aborted at interpreter exit. :func:`communicator_for` keeps one per (group, device).

Dispatch and combine (dimension legend: W group ranks, T local tokens, K top-k, D hidden, S rows sent = copies
routed anywhere, R rows received). The caller has already exchanged the per-peer row counts (host lists; the one
host synchronisation) and computed two int32 index tensors:

- ``send_copy [S]``: the flat copy index ``t*K + k`` of each send row, grouped by destination rank (e.g. the
  ``row_map`` of ``k2.ops.moe_permute``, sorted by expert, hence by owner rank);
- ``recv_index [R]`` (optional): ``recv_x[j] = arrived[recv_index[j]]``, a permutation that regroups the rows,
  which arrive source-rank-major, by local expert.

:func:`dispatch` runs pack (``send_buf[i] = x[send_copy[i] // K]``), ``ncclSend``/``ncclRecv`` per peer inside one
``ncclGroupStart/End``, and unpack, all on torch's current stream; :func:`combine` runs the reverse exchange and
sums each token's rows with its routing weights in fp32 (``out[t] = sum_k w[t, k] * y_copy(t, k)``; a copy not in
``send_copy`` adds nothing). Buffers are allocated here by torch; the kernels allocate nothing. Neither function is
differentiable by itself; the op layer composes the gradients from the same two calls: the backward of dispatch is
combine with unit weights (each token sums its K copies' gradients); the backward of combine is a dispatch of the
``[T*K, D]`` rows ``w[t, k] * grad_out[t]`` (``top_k=1``, the same ``send_copy``) — or, as ``k2.ops.comm`` does it
without that copy, a dispatch of ``grad_out`` itself with each send row's weight as an extra lane, multiplied on the
receiving rank — plus, for the weights, a local dot product with the rows that came back
(``combine(..., return_rows=True)``).

Users: ``k2.ops.ep_dispatch`` / ``ep_combine`` (``k2/ops/comm.py``) choose this path for CUDA tensors on an NCCL
process group when :func:`available` holds on every rank (else ``all_to_all_single``, with a one-time warning that
quotes :func:`available`'s reason), and call it through the custom ops ``k2::ep_nccl_dispatch``,
``k2::ep_nccl_combine`` and ``k2::ep_nccl_dispatch_scaled``: ``send_copy`` is ``EpHandle.row_map`` (int32, sorted by
expert, hence by owner rank), ``recv_index`` is ``EpHandle.recv_order`` (int32; None with one local expert), the
counts are ``EpHandle.send_splits`` / ``recv_splits``, and the communicator is :func:`communicator_for` of the EP
group on the tensors' device.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from k2.ops import _native

_OP = "k2.ops._nccl"


def library_candidates() -> list[str]:
    """Files to try for NCCL, in order: ``$K2_NCCL_LIBRARY``, then ``lib/libnccl.so.2`` of every installed
    ``nvidia.nccl`` package (``nvidia-nccl-cu12``, ``-cu13``; a namespace package may have several roots). The default
    loader search for ``libnccl.so.2`` comes after these, in ``k2._C.nccl_load``."""
    paths = []
    override = os.environ.get("K2_NCCL_LIBRARY", "").strip()
    if override:
        paths.append(override)
    try:
        spec = importlib.util.find_spec("nvidia.nccl")
    except (ImportError, ValueError):
        spec = None
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        lib = Path(root) / "lib" / "libnccl.so.2"
        if lib.is_file():
            paths.append(str(lib))
    return paths


@functools.cache
def _load() -> tuple[bool, str]:
    mod = _native.native()
    if mod is None:
        return False, "k2._C is not built"
    if "cuda" not in _native.available().get("comm", []):
        return False, "k2._C was built without CUDA kernels (rebuild with nvcc available and K2_CUDA=ON)"
    ok, reason = mod.nccl_load(library_candidates())
    if not ok:
        reason += (
            " (install the nvidia-nccl-cu12 or -cu13 package that a CUDA build of torch brings, or set "
            "K2_NCCL_LIBRARY to a libnccl.so.2)"
        )
    return ok, reason


def available() -> tuple[bool, str]:
    """``(ok, reason)``: whether the native NCCL path can run in this process — a CUDA build of ``k2._C``, an NCCL
    library that loads (``reason`` then names its version and file), and a CUDA device. ``reason`` says what is
    missing otherwise. NCCL is loaded on the first call only."""
    ok, reason = _load()
    if not ok:
        return False, reason
    if not torch.cuda.is_available():
        return False, f"{reason} loaded, but torch sees no CUDA device"
    return True, reason


@dataclasses.dataclass(eq=False)
class NcclCommunicator:
    """An NCCL communicator over a torch process group, on one CUDA device. ``handle`` is ``k2._C``'s integer
    handle (0 once destroyed)."""

    handle: int
    rank: int
    world_size: int
    device: torch.device

    @property
    def alive(self) -> bool:
        return self.handle != 0

    def destroy(self, abort: bool = False) -> None:
        """``ncclCommDestroy`` (``abort=True``: ``ncclCommAbort``, which does not wait for pending work, e.g. after
        a peer died). Idempotent."""
        if self.handle:
            handle, self.handle = self.handle, 0
            _native.native().nccl_comm_destroy(handle, abort)

    def __enter__(self) -> NcclCommunicator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def _check(self, device: torch.device, op: str) -> None:
        if not self.alive:
            raise RuntimeError(f"{_OP}.{op}: the NCCL communicator was destroyed")
        if device != self.device:
            raise ValueError(f"{_OP}.{op}: tensors are on {device}, the communicator on {self.device}")


@functools.cache
def _register_exit_hook() -> None:
    # NOTE: atexit runs before the CUDA runtime is torn down, which ncclCommDestroy needs.
    # Abort, not destroy: at exit no peer may be waited for (a dead peer must not hang the exit).
    atexit.register(lambda: _native.native().nccl_comm_destroy_all(True))


def _cuda_device(device: torch.device | int | str | None) -> torch.device:
    if device is None:
        return torch.device("cuda", torch.cuda.current_device())
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"{_OP}.create_communicator: expected a CUDA device, got {device}")
    return torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)


def create_communicator(
    group: dist.ProcessGroup | None = None, device: torch.device | int | str | None = None
) -> NcclCommunicator:
    """A new NCCL communicator over ``group`` (default: the world group) on ``device`` (default: the current CUDA
    device). Collective: every rank of the group must call it. Raises RuntimeError when the native path is
    unavailable (no CUDA build, no NCCL library, no CUDA device) or torch.distributed is not initialised."""
    ok, reason = available()
    if not ok:
        raise RuntimeError(f"{_OP}.create_communicator: the native NCCL path is unavailable: {reason}")
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{_OP}.create_communicator: torch.distributed is not initialised")
    group = dist.group.WORLD if group is None else group
    device = _cuda_device(device)
    mod = _native.native()
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    unique_id = [mod.nccl_unique_id() if rank == 0 else None]
    # The id travels as a pickled object: on a CPU tensor for gloo, on the device for an NCCL group.
    carrier = device if dist.get_backend(group) == "nccl" else None
    with torch.cuda.device(device):
        dist.broadcast_object_list(unique_id, src=dist.get_global_rank(group, 0), group=group, device=carrier)
        handle = mod.nccl_comm_init(unique_id[0], world, rank, device.index)
    _register_exit_hook()
    return NcclCommunicator(handle, rank, world, device)


_COMMUNICATORS: dict[tuple[str, int], NcclCommunicator] = {}


def communicator_for(
    group: dist.ProcessGroup | None = None, device: torch.device | int | str | None = None
) -> NcclCommunicator:
    """The communicator of ``(group, device)``, created (collectively) on first use and kept until destroyed."""
    group = dist.group.WORLD if group is None else group
    key = (group.group_name, _cuda_device(device).index)
    comm = _COMMUNICATORS.get(key)
    if comm is None or not comm.alive:
        comm = _COMMUNICATORS[key] = create_communicator(group, device)
    return comm


def _counts(counts: Sequence[int]) -> list[int]:
    return [int(c) for c in counts]


def dispatch(
    comm: NcclCommunicator,
    x: torch.Tensor,
    send_copy: torch.Tensor,
    top_k: int,
    send_counts: Sequence[int],
    recv_counts: Sequence[int],
    recv_index: torch.Tensor | None = None,
    extras: Sequence[torch.Tensor] = (),
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Send rows of ``x`` to their experts' ranks over NCCL. Collective over ``comm``'s group.

    Args:
        x: ``[T, D]`` on ``comm.device``, any dtype (rows move as bytes).
        send_copy: ``[S]`` int32, flat copy index ``t*K + k`` of each send row, grouped by destination rank.
        top_k: ``K``.
        send_counts, recv_counts: ``W`` ints each, rows to / from each group rank (sums ``S`` and ``R``).
        recv_index: ``[R]`` int32 or None: ``recv_x[j] = arrived[recv_index[j]]``; None keeps arrival order
            (source-rank-major).
        extras: per-send-row tensors ``[S, ...]`` (e.g. expert ids, weights) sent in the same NCCL group.

    Returns:
        ``recv_x [R, D]`` and the extras' received ``[R, ...]`` tensors, both in ``recv_index`` order.
    """
    comm._check(x.device, "dispatch")
    send_counts, recv_counts = _counts(send_counts), _counts(recv_counts)
    x = x.contiguous()
    rows_out, rows_in = send_copy.numel(), sum(recv_counts)
    send_buf = x.new_empty(rows_out, *x.shape[1:])
    recv_buf = x.new_empty(rows_in, *x.shape[1:])
    recv_x = None if recv_index is None else x.new_empty(rows_in, *x.shape[1:])
    extras = [e.contiguous() for e in extras]
    extras_in = [e.new_empty(rows_in, *e.shape[1:]) for e in extras]
    _native.call(
        "nccl_dispatch",
        x.device,
        comm.handle,
        x,
        send_copy,
        top_k,
        send_buf,
        recv_buf,
        recv_index,
        recv_x,
        send_counts,
        recv_counts,
        [_native.view(e) for e in extras],
        [_native.view(e) for e in extras_in],
    )
    if recv_index is not None:
        extras_in = [e.index_select(0, recv_index) for e in extras_in]
    return (recv_buf if recv_x is None else recv_x), extras_in


def combine(
    comm: NcclCommunicator,
    y: torch.Tensor,
    send_copy: torch.Tensor,
    top_k: int,
    num_tokens: int,
    send_counts: Sequence[int],
    recv_counts: Sequence[int],
    recv_index: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    return_rows: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Return expert outputs to their tokens over NCCL and sum them. Collective over ``comm``'s group.

    Args:
        y: ``[R, D]`` fp32/bf16/fp16 expert outputs in :func:`dispatch`'s ``recv_x`` order.
        send_copy, top_k, send_counts, recv_counts, recv_index: exactly as passed to that :func:`dispatch` (the
            counts are swapped here).
        num_tokens: ``T``.
        weights: ``[T, K]`` fp32/bf16/fp16 routing weights, or None for 1.
        return_rows: also return the rows that came back, ``[S, D]`` (row ``i`` answers ``send_copy[i]``), which
            the gradient of ``weights`` needs: ``d weights[t, k] = <grad_out[t], y_copy(t, k)>``.

    Returns:
        ``[T, D]`` in ``y``'s dtype: ``out[t] = sum_k weights[t, k] * y_copy(t, k)`` accumulated in fp32 in k order;
        a copy absent from ``send_copy`` adds nothing. With ``return_rows``, ``(out, rows)``.
    """
    comm._check(y.device, "combine")
    y = y.contiguous()
    send_buf = None if recv_index is None else torch.empty_like(y)
    recv_buf = y.new_empty(send_copy.numel(), *y.shape[1:])
    out = y.new_empty(num_tokens, *y.shape[1:])
    _native.call(
        "nccl_combine",
        y.device,
        comm.handle,
        y,
        recv_index,
        send_buf,
        recv_buf,
        send_copy,
        top_k,
        None if weights is None else weights.contiguous(),
        out,
        _counts(send_counts),
        _counts(recv_counts),
        workspace=("nccl_combine_workspace_size", (num_tokens, top_k)),
    )
    return (out, recv_buf) if return_rows else out
