"""The native NCCL path of expert-parallel dispatch/combine (``k2.ops._nccl``, ``csrc/comm``).

Everywhere: importing k2 never needs NCCL; ``k2._C.nccl_available()`` and ``k2.ops._nccl.available()`` say why the
path cannot run; ``create_communicator`` fails with that reason; unknown handles are argument errors.

With 2 GPUs (``gpu`` + ``multiproc``): two processes build an NCCL communicator over an NCCL torch group, and the
native dispatch/combine equal an exchange computed in the test itself with ``torch.distributed.all_to_all_single``
on that group — exactly for the rows (they move as bytes), within fp32-accumulation rounding for the combine —
including the calls the gradients are made of (unit-weight combine, per-copy rows dispatched with top_k = 1, the
rows a combine brings back).
Routings include a rank that receives no rows and copies that are dropped (absent from ``send_copy``).

The choice of exchange in ``k2.ops.ep_dispatch`` / ``ep_combine`` (``k2.ops.comm._exchange_path``) is tested
everywhere with ``_nccl.available``, the group's back end and the cross-rank gather replaced by stand-ins (a
``torch.device("cuda", 0)`` is only a device name here; nothing runs on it). With 2 GPUs, ``ep_dispatch`` /
``ep_combine`` on an NCCL group take the native path and equal the ``all_to_all_single`` path (``K2_OPS=reference``)
in outputs and gradients.
"""

from __future__ import annotations

import os
import socket
import types
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import k2.ops
from k2.ops import _native, _nccl, comm, ep_combine, ep_dispatch, moe_permute

C = _native.native()
REAL_AVAILABLE = _nccl.available
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


# ---- choosing the exchange (everywhere) -----------------------------------------------------------------------

CUDA0 = torch.device("cuda", 0)  # a device name only: the choice never touches the device
NCCL_OK = (True, "NCCL 2.99.9 from /opt/libnccl.so.2")
NO_NCCL = (False, "libnccl.so.2: cannot open shared object file")


@pytest.fixture
def choice(monkeypatch):
    """A 2-rank stand-in group whose back end, availability and cross-rank answers the test sets; fresh caches."""
    state = types.SimpleNamespace(backend="nccl", mine=NCCL_OK, other=NCCL_OK, gathers=0)
    pg = types.SimpleNamespace(group_name="ep-test", size=lambda: 2, rank=lambda: 0)

    def gather(group, device, status):
        assert group is pg and device == CUDA0
        state.gathers += 1
        return [status, state.other]

    monkeypatch.setattr(comm, "_backend_name", lambda group: state.backend)
    monkeypatch.setattr(comm, "_gather_status", gather)
    monkeypatch.setattr(_nccl, "available", lambda: state.mine)
    monkeypatch.setattr(comm, "_NATIVE_STATUS", {})
    monkeypatch.setattr(comm, "_warned_fallback", False)
    monkeypatch.delenv("K2_OPS", raising=False)
    state.pg = pg
    return state


def _path(choice, device=CUDA0, dtypes=(torch.bfloat16,), top_k=8) -> tuple[str, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = comm._exchange_path(choice.pg, device, dtypes, top_k)
    return path, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def test_native_path_when_cuda_nccl_group_and_available(choice):
    assert _path(choice) == ("nccl", [])
    assert _path(choice, dtypes=(torch.float32, torch.float16)) == ("nccl", [])
    choice.backend = "cpu:gloo,cuda:nccl"  # a group with a back end per device type
    assert _path(choice) == ("nccl", [])
    assert choice.gathers == 1  # availability is agreed once per (group, device), then cached


def test_no_group_is_the_local_path(choice):
    assert comm._exchange_path(None, CUDA0, (torch.float32,), 8) == "local"


@pytest.mark.parametrize(
    "setting",
    ["cpu_tensors", "gloo_group", "k2_ops_reference", "float64", "top_k_0"],
)
def test_all_to_all_path_without_a_warning(choice, monkeypatch, setting):
    """Where the native path does not apply (or K2_OPS=reference asks for the reference), all_to_all_single runs
    silently and NCCL availability is not even asked."""
    kwargs = {}
    if setting == "cpu_tensors":
        kwargs["device"] = torch.device("cpu")
    elif setting == "gloo_group":
        choice.backend = "gloo"
    elif setting == "k2_ops_reference":
        monkeypatch.setenv("K2_OPS", "reference")
    elif setting == "float64":
        kwargs["dtypes"] = (torch.float32, torch.float64)  # e.g. fp64 routing weights in ep_combine
    else:
        kwargs["top_k"] = 0
    choice.mine = NO_NCCL  # would warn if it were asked
    assert _path(choice, **kwargs) == ("all_to_all", [])
    assert choice.gathers == 0


def test_unavailable_native_path_falls_back_and_warns_once(choice):
    choice.mine = choice.other = NO_NCCL
    path, caught = _path(choice)
    assert path == "all_to_all"
    assert len(caught) == 1 and NO_NCCL[1] in caught[0] and "all_to_all_single" in caught[0]
    assert _path(choice) == ("all_to_all", [])  # said once per process
    assert _path(choice, dtypes=(torch.float32, torch.float32)) == ("all_to_all", [])  # ep_combine's call too
    assert choice.gathers == 1  # every rank took part in the one agreement, even without NCCL


def test_a_rank_without_nccl_sends_every_rank_to_all_to_all(choice):
    choice.other = (False, "torch sees no CUDA device")  # group rank 1 cannot run the native path
    path, caught = _path(choice)
    assert path == "all_to_all"
    assert len(caught) == 1 and "group rank 1" in caught[0] and "no CUDA device" in caught[0]


def test_this_machines_reason_is_quoted(choice):
    """Where the native path cannot run here, the warning quotes _nccl.available()'s real reason."""
    status = REAL_AVAILABLE()
    if status[0]:
        pytest.skip("the native NCCL path is available here")
    choice.mine = choice.other = status
    _, caught = _path(choice)
    assert len(caught) == 1 and status[1] in caught[0]


@pytest.mark.parametrize("shape", [(13, 3), (1, 1), (0, 4), (40, 8)])
def test_route_equals_moe_permute(shape):
    """The native path sorts the routing without moving rows; it must give moe_permute's row_map and counts."""
    g = torch.Generator().manual_seed(shape[0])
    num_experts = 8
    ids = torch.rand(shape[0], num_experts, generator=g).argsort(1)[:, : shape[1]]
    row_map, counts = comm._route(ids, num_experts)
    _, expected_map, offsets = moe_permute(torch.zeros(shape[0], 2), ids, num_experts)
    assert row_map.dtype == torch.int32 and torch.equal(row_map, expected_map)
    assert counts.dtype == torch.int64 and torch.equal(counts.cumsum(0).to(torch.int32), offsets)


def test_route_does_not_count_ids_out_of_range():
    ids = torch.tensor([[0, 8], [-1, 3]])
    row_map, counts = comm._route(ids, 8)
    assert int(counts.sum()) == 2 and row_map[:2].tolist() == [0, 3]


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


# ---- ep_dispatch / ep_combine on 2 GPUs: the native path against the all_to_all_single path ------------------

EP_CASES = (  # (routing, E): E = 8 gives 4 local experts (rows regrouped), E = 2 one (arrival order)
    ("uniform", 8),
    ("rank1_receives_nothing", 8),
    ("rank1_has_no_tokens", 8),
    ("uniform", 2),
)


def _ep_inputs(rank: int, world: int, routing: str, num_experts: int, dtype: torch.dtype, device: torch.device):
    g = torch.Generator().manual_seed(100 + rank)
    tokens = 0 if routing == "rank1_has_no_tokens" and rank == 1 else T
    top_k = min(K, num_experts)
    scores = torch.rand(tokens, num_experts, generator=g)
    if routing == "rank1_receives_nothing":
        scores[:, num_experts // world :] = -1.0  # only rank 0's experts are chosen
    ids = scores.topk(top_k, dim=1).indices
    x = torch.randn(tokens, D, generator=g).to(dtype)
    w = torch.rand(tokens, top_k, generator=g)
    c = torch.randn(tokens, D, generator=g).to(dtype)
    return x.to(device), ids.to(device), w.to(device), c.to(device)


def _ep_run(x0, ids, w0, c, num_experts, group) -> dict:
    """Dispatch, experts that scale their rows by (1 + local expert index), combine, backward of <c, out>."""
    x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    recv_x, offsets, handle = ep_dispatch(x, ids, num_experts, group)
    counts = torch.diff(offsets, prepend=offsets.new_zeros(1)).long()
    scale = torch.repeat_interleave(
        1.0 + torch.arange(counts.numel(), device=x.device), counts, output_size=recv_x.shape[0]
    )
    y = (recv_x.float() * scale[:, None]).to(recv_x.dtype)
    out = ep_combine(y, handle, w)
    out.backward(c)
    return dict(path=handle.path, recv_x=recv_x.detach(), offsets=offsets, out=out.detach(), dx=x.grad, dw=w.grad)


def _ep_worker(rank: int, world: int, port: int) -> None:
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for dtype in (torch.bfloat16, torch.float32):
                tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
                for routing, num_experts in EP_CASES:
                    inputs = _ep_inputs(rank, world, routing, num_experts, dtype, device)
                    os.environ.pop("K2_OPS", None)
                    native = _ep_run(*inputs, num_experts, None)
                    os.environ["K2_OPS"] = "reference"  # all_to_all_single on the same NCCL group
                    try:
                        ref = _ep_run(*inputs, num_experts, None)
                    finally:
                        os.environ.pop("K2_OPS", None)
                    where = f"rank {rank}, {routing}, E={num_experts}, {dtype}"
                    assert (native["path"], ref["path"]) == ("nccl", "all_to_all"), where
                    assert torch.equal(native["recv_x"], ref["recv_x"]), where  # rows move as bytes
                    assert torch.equal(native["offsets"], ref["offsets"]), where
                    if routing == "rank1_receives_nothing" and rank == 1:
                        assert native["recv_x"].shape[0] == 0
                    torch.testing.assert_close(native["out"], ref["out"], **tol, msg=where)
                    torch.testing.assert_close(native["dx"], ref["dx"], **tol, msg=where)
                    torch.testing.assert_close(native["dw"], ref["dw"], rtol=1e-4, atol=1e-4, msg=where)
            torch.cuda.synchronize()
        fallbacks = [str(w.message) for w in caught if "native NCCL path is unavailable" in str(w.message)]
        assert not fallbacks, fallbacks
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.multiproc
def test_ep_dispatch_combine_native_path_equals_all_to_all_single():
    """ep_dispatch/ep_combine on an NCCL group of 2 GPUs choose the native path, and its outputs and gradients
    (x, routing weights) equal those of the all_to_all_single path (K2_OPS=reference) on the same inputs."""
    reason = _skip_reason(2)
    if reason is not None:
        pytest.skip(reason)
    mp.spawn(_ep_worker, args=(2, _free_port()), nprocs=2, join=True)
