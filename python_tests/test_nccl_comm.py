"""The native NCCL path of expert-parallel dispatch/combine (``k2.ops._nccl``, ``csrc/comm``).

Everywhere: importing k2 never needs NCCL; ``k2._C.nccl_available()`` and ``k2.ops._nccl.available()`` say why the
path cannot run; ``create_communicator`` fails with that reason; unknown handles are argument errors.

With 2 GPUs (``gpu`` + ``multiproc``): two processes build an NCCL communicator over an NCCL torch group, and the
native dispatch/combine equal an exchange computed in the test itself with ``torch.distributed.all_to_all_single``
on that group — exactly for the rows (they move as bytes), within fp32-accumulation rounding for the combine —
including the calls the gradients are made of (unit-weight combine, per-copy rows dispatched with top_k = 1, the
rows a combine brings back).
Routings include a rank that receives no rows and copies that are dropped (absent from ``send_copy``).
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import k2.ops
from k2.ops import _native, _nccl

C = _native.native()
needs_native = pytest.mark.skipif(C is None, reason="k2._C is not built")


# ---- without a GPU ------------------------------------------------------------------------------------------


@needs_native
def test_comm_family_has_only_cuda_kernels():
    expected = {"cuda"} if C.build_info()["cuda"] else None
    assert (set(k2.ops.available()["comm"]) if "comm" in k2.ops.available() else None) == expected


@needs_native
def test_nccl_available_gives_a_reason():
    ok, reason = C.nccl_available()
    assert isinstance(ok, bool) and isinstance(reason, str) and reason
    if ok:  # the library loaded: the reason names it
        assert reason.startswith("NCCL ") and " from " in reason
    elif C.build_info()["cuda"]:
        assert "libnccl.so.2" in reason
    else:
        assert "no CUDA kernels" in reason


def test_python_availability_needs_a_cuda_device_too():
    ok, reason = _nccl.available()
    if not torch.cuda.is_available():
        assert not ok
        assert reason
    if C is not None and C.nccl_available()[0] and not torch.cuda.is_available():
        assert "no CUDA device" in reason


def test_library_candidates_are_existing_files(monkeypatch, tmp_path):
    for path in _nccl.library_candidates():
        assert path.endswith("libnccl.so.2")
    fake = tmp_path / "libnccl.so.2"
    monkeypatch.setenv("K2_NCCL_LIBRARY", str(fake))
    assert _nccl.library_candidates()[0] == str(fake)


@needs_native
@pytest.mark.skipif(torch.cuda.is_available() and C is not None and C.nccl_available()[0], reason="NCCL can run")
def test_create_communicator_says_why_it_cannot():
    with pytest.raises(RuntimeError, match=r"the native NCCL path is unavailable: .+"):
        _nccl.create_communicator()


@needs_native
@pytest.mark.skipif(C is not None and C.nccl_available()[0], reason="NCCL loads here")
def test_nccl_calls_without_nccl_raise_a_clear_error():
    with pytest.raises(RuntimeError, match=r"k2\.ops\.nccl_unique_id: (NCCL is not available|this build)"):
        C.nccl_unique_id()
    with pytest.raises(RuntimeError, match=r"k2\.ops\.nccl_comm_init: "):
        C.nccl_comm_init(bytes(128), 2, 0, 0)
    assert C.nccl_comm_destroy(7) is False
    assert C.nccl_comm_destroy_all() == 0


@needs_native
def test_unknown_communicator_handle_is_an_argument_error():
    with pytest.raises(ValueError, match="argument 'comm': no live NCCL communicator has handle 12345"):
        C.nccl_comm_info(12345)
    assert 12345 not in C.nccl_live_communicators()


# ---- two GPUs ----------------------------------------------------------------------------------------------

T, K, E, D = 37, 3, 4, 160  # two local experts per rank of 2; D*2 bytes not a multiple of 16 for bf16 rows
ROUTINGS = ("uniform", "rank1_receives_nothing", "dropped_copies")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _routing(rank: int, world: int, routing: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``topk_ids [T, K]`` int64 and a keep mask ``[T*K]`` (False: the copy is dropped, never sent)."""
    g = torch.Generator().manual_seed(10 + rank)
    ids = torch.randint(0, E, (T, K), generator=g)
    if routing == "rank1_receives_nothing":
        ids = torch.randint(0, E // world, (T, K), generator=g)  # only rank 0's experts
    keep = torch.ones(T * K, dtype=torch.bool)
    if routing == "dropped_copies":
        keep = torch.rand(T * K, generator=g) > 0.3
    return ids.to(device), keep.to(device)


def _reference_plan(ids: torch.Tensor, keep: torch.Tensor, world: int, group) -> dict:
    """Send order (stable by expert), counts exchanged with all_to_all_single, and the expert-major receive order."""
    flat = ids.flatten()
    order = torch.sort(torch.where(keep, flat, E), stable=True).indices  # dropped copies sort last
    send_copy = order[: int(keep.sum())].to(torch.int32)
    per_expert = torch.bincount(flat[send_copy.long()], minlength=E)  # [E]
    recv_WL = torch.empty_like(per_expert)
    dist.all_to_all_single(recv_WL, per_expert, group=group)
    recv_WL = recv_WL.view(world, E // world)  # rows from source s for local expert l
    send_counts = per_expert.view(world, -1).sum(1).tolist()
    recv_counts = recv_WL.sum(1).tolist()
    # Arrival is source-major (s, l); the final order is expert-major (l, s).
    start_SL = (recv_WL.flatten().cumsum(0) - recv_WL.flatten()).view(recv_WL.shape)
    recv_index = torch.cat(
        [
            torch.arange(int(start_SL[s, e]), int(start_SL[s, e] + recv_WL[s, e]), device=ids.device)
            for e in range(E // world)
            for s in range(world)
        ]
        + [torch.zeros(0, dtype=torch.long, device=ids.device)]
    ).to(torch.int32)
    return dict(send_copy=send_copy, send_counts=send_counts, recv_counts=recv_counts, recv_index=recv_index)


def _worker(rank: int, world: int, port: int, routing: str, dtype: torch.dtype) -> None:
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        group = dist.group.WORLD
        comm = _nccl.create_communicator(group, device)
        assert (comm.rank, comm.world_size, comm.device) == (rank, world, device)
        assert C.nccl_comm_info(comm.handle) == {"rank": rank, "world_size": world, "device": rank}

        ids, keep = _routing(rank, world, routing, device)
        x = torch.randn(T, D, generator=torch.Generator().manual_seed(rank)).to(device, dtype)
        w = torch.rand(T, K, generator=torch.Generator().manual_seed(50 + rank)).to(device)
        p = _reference_plan(ids, keep, world, group)
        send_copy, recv_index = p["send_copy"], p["recv_index"]
        send_counts, recv_counts = p["send_counts"], p["recv_counts"]
        if routing == "rank1_receives_nothing" and rank == 1:  # world 2
            assert sum(recv_counts) == 0

        # Dispatch: reference = gather, all_to_all_single, reorder.
        arrived = x.new_empty(sum(recv_counts), D)
        dist.all_to_all_single(arrived, x[send_copy.long() // K], recv_counts, send_counts, group=group)
        expected_x = arrived[recv_index.long()]
        expert_ids = ids.flatten()[send_copy.long()].to(torch.int32)
        recv_x, (recv_ids,) = _nccl.dispatch(
            comm, x, send_copy, K, send_counts, recv_counts, recv_index, extras=(expert_ids,)
        )
        torch.testing.assert_close(recv_x, expected_x, rtol=0, atol=0)
        local = recv_ids - rank * (E // world)
        assert bool(((local >= 0) & (local < E // world)).all()) and bool((local.diff() >= 0).all())  # expert-major
        raw, _ = _nccl.dispatch(comm, x, send_copy, K, send_counts, recv_counts)  # arrival order
        torch.testing.assert_close(raw, arrived, rtol=0, atol=0)

        # Combine: expert outputs depend on the expert; reference = scatter back, all_to_all_single, weighted sum.
        y = (recv_x.float() * (1.0 + local[:, None].float())).to(dtype)
        back_src = torch.empty_like(y).index_copy_(0, recv_index.long(), y)
        back = y.new_empty(send_copy.numel(), D)
        dist.all_to_all_single(back, back_src, send_counts, recv_counts, group=group)
        full = torch.zeros(T * K, D, device=device)
        full[send_copy.long()] = back.float()
        expected = (full.view(T, K, D) * w[..., None]).sum(1).to(dtype)
        out = _nccl.combine(comm, y, send_copy, K, T, send_counts, recv_counts, recv_index, w)
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
        torch.testing.assert_close(out, expected, **tol)
        unweighted = _nccl.combine(comm, y, send_copy, K, T, send_counts, recv_counts, recv_index)
        torch.testing.assert_close(unweighted, full.view(T, K, D).sum(1).to(dtype), **tol)
        _, rows = _nccl.combine(comm, y, send_copy, K, T, send_counts, recv_counts, recv_index, w, return_rows=True)
        torch.testing.assert_close(rows, back, rtol=0, atol=0)

        # The backward of combine dispatches per-copy rows w[t, k] * g[t]: top_k = 1 over [T*K, D].
        copies = (w[..., None] * x.float()[:, None, :]).reshape(T * K, D).to(dtype)
        grad_y, _ = _nccl.dispatch(comm, copies, send_copy, 1, send_counts, recv_counts, recv_index)
        arrived_copies = copies.new_empty(sum(recv_counts), D)
        dist.all_to_all_single(arrived_copies, copies[send_copy.long()], recv_counts, send_counts, group=group)
        torch.testing.assert_close(grad_y, arrived_copies[recv_index.long()], rtol=0, atol=0)

        torch.cuda.synchronize()
        handle = comm.handle
        comm.destroy()
        assert handle not in C.nccl_live_communicators()
        comm.destroy()  # idempotent
    finally:
        dist.destroy_process_group()


def _skip_reason(world: int) -> str | None:
    if torch.cuda.device_count() < world:
        return f"needs {world} CUDA devices"
    if not dist.is_nccl_available():
        return "torch has no NCCL back end"
    ok, reason = _nccl.available()
    return None if ok else reason


@pytest.mark.gpu
@pytest.mark.multiproc
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("routing", ROUTINGS)
def test_native_dispatch_combine_equal_all_to_all_single(routing, dtype):
    reason = _skip_reason(2)
    if reason is not None:
        pytest.skip(reason)
    mp.spawn(_worker, args=(2, _free_port(), routing, dtype), nprocs=2, join=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_native_dispatch_combine_on_one_gpu(dtype):
    """A group of one: every row goes to the rank itself through ncclSend/ncclRecv (one GPU suffices)."""
    reason = _skip_reason(1)
    if reason is not None:
        pytest.skip(reason)
    mp.spawn(_worker, args=(1, _free_port(), "dropped_copies", dtype), nprocs=1, join=True)
