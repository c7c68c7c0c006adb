"""Expert-parallel dispatch/combine (k2.ops.ep_dispatch / ep_combine) on 2 and 4 gloo processes, E = 8.

One ``mp.spawn`` per world size runs every check in the workers and saves what each rank computed; the tests
compare that with single-process oracles:

- :func:`reference_exchange`: given all ranks' inputs, the rows (and offsets) each rank must receive, built by
  plain loops in the documented order (local expert, then source rank, then token, then k). Compared exactly.
- the whole MoE in one process: ``moe_permute`` + ``grouped_gemm`` over all E experts + ``moe_unpermute`` on all
  ranks' tokens, in fp32 (outputs) and fp64 with autograd (gradients of x, routing weights and expert weights).
- fp64 central differences of the global loss (all-reduced) along a random direction in each input, against the
  all-reduced analytic directional derivative (``gradcheck`` itself cannot run across ranks: each rank's Jacobian
  columns would need every rank's backward in lock step).

Scenarios: ``random`` (uneven T per rank), and ``edge``: rank 1 has T = 0 (sends no rows) and no token picks the
last rank's experts (it receives none; with W = 2 rank 1 is idle both ways). W = 4 also runs an EP group that is
a sub-group of the world ({0, 1} and {2, 3}); W = 2 runs size-1 groups (the local path) and ``opcheck``.

Two variants of every scenario: the real CPU path (gloo, ``all_to_all_single``; ``EpHandle.path == "all_to_all"``)
and ``nccl:``, the op layer's native-path wiring (``_route``, ``k2::ep_nccl_dispatch`` / ``ep_nccl_combine`` /
``ep_nccl_dispatch_scaled`` and their autograd) run on CPU against :func:`_nccl_contract_double`, a model of
``csrc/comm``'s documented contract (``comm.h``) over gloo in place of ``k2.ops._nccl``'s dispatch/combine. The
double checks the wiring (which index, which side regroups, which counts) against the same oracles; the CUDA
kernels themselves are tested against ``all_to_all_single`` in ``test_nccl_comm.py`` where 2 GPUs exist.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_distributed_muon import free_port

from k2.ops import _nccl, comm, ep_combine, ep_dispatch, grouped_gemm, moe_permute, moe_unpermute

pytestmark = pytest.mark.multiproc

E, D, K = 8, 4, 3
CASES = ("random", "edge")
VARIANTS = ("", "nccl:")  # the all_to_all_single path; the native path's wiring against the contract double
TOKENS = {"random": (5, 6, 4, 7), "edge": (5, 0, 6, 4)}
FD_STEP = 0.5


def _scenario(world: int, case: str, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Per rank: ``x [T, D]`` fp64, ``ids [T, K]`` (distinct experts per token), ``weights [T, K]`` fp64 and the
    loss cotangent ``c [T, D]`` fp64."""
    g = torch.Generator().manual_seed(1000 * world + 10 * CASES.index(case) + seed)
    ranks = []
    for r in range(world):
        t = TOKENS[case][r]
        scores = torch.rand(t, E, generator=g)
        if case == "edge":
            scores[:, E - E // world :] = -1.0  # the last rank's experts: never chosen
        ranks.append(
            {
                "x": torch.randn(t, D, generator=g, dtype=torch.float64),
                "ids": scores.topk(K, dim=1).indices,
                "weights": torch.rand(t, K, generator=g, dtype=torch.float64),
                "c": torch.randn(t, D, generator=g, dtype=torch.float64),
            }
        )
    return ranks


def _experts(dtype: torch.dtype) -> torch.Tensor:
    """``[E, D, D]`` expert matrices (the same on every rank; rank r holds its slice)."""
    return (torch.randn(E, D, D, generator=torch.Generator().manual_seed(7), dtype=torch.float64) / D).to(dtype)


def reference_exchange(
    xs: list[torch.Tensor], ids: list[torch.Tensor], num_experts: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For every rank of a group of ``len(xs)``: ``(recv_x [R, D], recv_offsets [E/W] int32)``."""
    world = len(xs)
    local = num_experts // world
    out = []
    for dst in range(world):
        rows, ends = [], []
        for e in range(dst * local, (dst + 1) * local):
            for x, topk in zip(xs, ids, strict=True):
                for t in range(topk.shape[0]):
                    rows += [x[t] for k in range(topk.shape[1]) if topk[t, k] == e]
            ends.append(len(rows))
        recv = torch.stack(rows) if rows else xs[0].new_empty(0, xs[0].shape[1])
        out.append((recv, torch.tensor(ends, dtype=torch.int32)))
    return out


def _ep_moe(x, ids, weights, w_local, group) -> torch.Tensor:
    recv_x, recv_offsets, handle = ep_dispatch(x, ids, E, group)
    return ep_combine(grouped_gemm(recv_x, w_local, recv_offsets), handle, weights)


def _moe_one_process(xs, ids, weights, experts) -> torch.Tensor:
    x_sorted, row_map, offsets = moe_permute(torch.cat(xs), torch.cat(ids), E)
    return moe_unpermute(grouped_gemm(x_sorted, experts, offsets), row_map, torch.cat(weights))


def _global_sum(value: torch.Tensor) -> float:
    value = value.detach().reshape(1).clone()
    dist.all_reduce(value)
    return value.item()


def _run_case(rank: int, world: int, case: str, group) -> dict[str, object]:
    inp = _scenario(world, case)[rank]
    local = E // world
    res: dict[str, object] = {}

    # Exchange (fp32 and bf16), identity experts, and the MoE with linear experts in fp32.
    x32, w32 = inp["x"].float(), inp["weights"].float()
    recv_x, recv_offsets, handle = ep_dispatch(x32, inp["ids"], E, group)
    res["recv_x"], res["recv_offsets"], res["path"] = recv_x, recv_offsets, handle.path
    res["identity"] = ep_combine(recv_x, handle, w32)
    res["recv_x_bf16"] = ep_dispatch(x32.bfloat16(), inp["ids"], E, group)[0]
    res["moe"] = _ep_moe(x32, inp["ids"], w32, _experts(torch.float32)[rank * local : (rank + 1) * local], group)

    # fp64 gradients of the global loss sum_r <c_r, out_r>.
    params = {
        "x": inp["x"].clone().requires_grad_(),
        "weights": inp["weights"].clone().requires_grad_(),
        "w_local": _experts(torch.float64)[rank * local : (rank + 1) * local].clone().requires_grad_(),
    }

    def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return (_ep_moe(p["x"], inp["ids"], p["weights"], p["w_local"], group) * inp["c"]).sum()

    loss(params).backward()
    res["grads"] = {name: p.grad for name, p in params.items()}

    # Central differences of the all-reduced loss along a random direction in one tensor at a time (seeded per
    # rank). The loss is linear in each tensor alone, so the difference quotient is exact for any step; the step is
    # large because moe_unpermute accumulates in fp32 even for fp64 inputs (its rounding / step is the error).
    g = torch.Generator().manual_seed(rank)
    fd, analytic = [], []
    with torch.no_grad():
        for name, p in params.items():
            v = torch.randn(p.shape, generator=g, dtype=torch.float64)
            plus = loss({**params, name: p + FD_STEP * v})
            minus = loss({**params, name: p - FD_STEP * v})
            fd.append(_global_sum((plus - minus) / (2 * FD_STEP)))
            analytic.append(_global_sum((p.grad * v).sum()))
    res["fd"], res["fd_analytic"] = fd, analytic
    return res


# ---- a CPU model of the native path's contract (csrc/comm/comm.h), for the op layer's wiring -----------------


class _FakeCommunicator:
    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group


def _exchange(t: torch.Tensor, output_splits, input_splits, group) -> torch.Tensor:
    out = t.new_empty(sum(output_splits), *t.shape[1:])
    dist.all_to_all_single(out, t.contiguous(), list(output_splits), list(input_splits), group=group)
    return out


def _double_dispatch(comm_, x, send_copy, top_k, send_counts, recv_counts, recv_index=None, extras=()):
    """comm.h dispatch: send_buf[i] = x[send_copy[i] / K]; all-to-all; recv_x[j] = recv_buf[recv_index[j]]."""
    assert send_copy.dtype == torch.int32 and send_copy.shape == (sum(send_counts),)
    assert recv_index is None or (recv_index.dtype == torch.int32 and recv_index.shape == (sum(recv_counts),))

    def move(t: torch.Tensor) -> torch.Tensor:
        arrived = _exchange(t, recv_counts, send_counts, comm_.group)
        return arrived if recv_index is None else arrived[recv_index.long()]

    return move(x[send_copy.long() // top_k]), [move(e) for e in extras]


def _double_combine(
    comm_, y, send_copy, top_k, num_tokens, send_counts, recv_counts, recv_index=None, weights=None, return_rows=False
):
    """comm.h combine: send_buf[recv_index[j]] = y[j]; all-to-all back; out[t] = sum_k w[t, k] * rows[pos(t*K + k)]
    accumulated in fp32 (fp64 for fp64 here, which the kernels do not take), in y's dtype."""
    assert send_copy.dtype == torch.int32 and (recv_index is None or recv_index.dtype == torch.int32)
    assert y.shape[0] == sum(recv_counts)
    send = y if recv_index is None else torch.empty_like(y).index_copy_(0, recv_index.long(), y)
    rows = _exchange(send, send_counts, recv_counts, comm_.group)  # [S, D], rows[i] answers send_copy[i]
    acc = torch.promote_types(y.dtype, torch.float32)
    full = torch.zeros(num_tokens * top_k, y.shape[1], dtype=acc).index_copy_(0, send_copy.long(), rows.to(acc))
    w = torch.ones(num_tokens, top_k, dtype=acc) if weights is None else weights.to(acc)
    out = (w[..., None] * full.view(num_tokens, top_k, y.shape[1])).sum(1).to(y.dtype)
    return (out, rows) if return_rows else out


def _nccl_contract_double():
    """Every multi-rank exchange takes the native path, whose k2.ops._nccl calls run the double; returns undo."""
    saved = (comm._exchange_path, _nccl.communicator_for, _nccl.dispatch, _nccl.combine)
    comm._exchange_path = lambda pg, device, dtypes, top_k: "local" if pg is None else "nccl"
    _nccl.communicator_for = lambda group, device: _FakeCommunicator(group)
    _nccl.dispatch, _nccl.combine = _double_dispatch, _double_combine

    def undo() -> None:
        comm._exchange_path, _nccl.communicator_for, _nccl.dispatch, _nccl.combine = saved

    return undo


def _opcheck_native_ops(rank: int) -> None:
    """opcheck of the native path's custom ops (2 ranks, under the double)."""
    name = dist.group.WORLD.group_name
    send_copy = torch.tensor([[4, 0, 2, 1, 5], [1, 3, 5, 0, 2]][rank], dtype=torch.int32)  # T = 3, K = 2
    splits, recv = [[3, 2], [1, 4]][rank], [[3, 1], [2, 4]][rank]
    recv_index = torch.randperm(sum(recv), generator=torch.Generator().manual_seed(rank)).to(torch.int32)
    x = torch.randn(3, D, dtype=torch.float64, requires_grad=True)
    y = torch.randn(sum(recv), D, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, 2, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.k2.ep_nccl_dispatch.default, (x, send_copy, 2, splits, recv, recv_index, name))
    torch.library.opcheck(torch.ops.k2.ep_nccl_dispatch.default, (x, send_copy, 2, splits, recv, None, name))
    torch.library.opcheck(torch.ops.k2.ep_nccl_combine.default, (y, send_copy, 2, 3, splits, recv, recv_index, w, name))
    torch.library.opcheck(torch.ops.k2.ep_nccl_combine.default, (y, send_copy, 2, 3, splits, recv, None, None, name))
    torch.library.opcheck(
        torch.ops.k2.ep_nccl_dispatch_scaled.default, (x.detach(), w.detach(), send_copy, 2, splits, recv, None, name)
    )


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = {case: _run_case(rank, world, case, None) for case in CASES}
        undo = _nccl_contract_double()
        try:
            results.update({f"nccl:{case}": _run_case(rank, world, case, None) for case in CASES})
            if world == 2:
                _opcheck_native_ops(rank)
                results["nccl:opcheck"] = True
        finally:
            undo()
        if world == 4:  # EP over sub-groups {0, 1} and {2, 3}: the group rank, not the world rank, owns experts
            groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
            inp = _scenario(2, "random", seed=1 + rank // 2)[rank % 2]
            recv_x, recv_offsets, _ = ep_dispatch(inp["x"].float(), inp["ids"], E, groups[rank // 2])
            results["subgroup"] = {"recv_x": recv_x, "recv_offsets": recv_offsets}
        if world == 2:
            groups = [dist.new_group([0]), dist.new_group([1])]
            inp = _scenario(2, "random")[rank]
            recv_x, recv_offsets, handle = ep_dispatch(inp["x"], inp["ids"], E, groups[rank])
            results["size1"] = {
                "recv_x": recv_x,
                "recv_offsets": recv_offsets,
                "combined": ep_combine(recv_x, handle, inp["weights"]),
            }
            splits = [[3, 2], [4, 1]][rank]  # rows sent to ranks 0, 1
            recv = [[3, 4], [2, 1]][rank]  # rows received from ranks 0, 1
            x = torch.randn(sum(splits), D, dtype=torch.float64, requires_grad=True)
            name = dist.group.WORLD.group_name
            torch.library.opcheck(torch.ops.k2.ep_all_to_all.default, (x, recv, splits, name))
            torch.library.opcheck(torch.ops.k2.ep_exchange_counts.default, (torch.arange(E) + rank, name))
            perm = torch.randperm(5, generator=torch.Generator().manual_seed(rank))
            torch.library.opcheck(torch.ops.k2.ep_permute_rows.default, (x, perm, torch.argsort(perm)))
            results["opcheck"] = True
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 4], ids=["W2", "W4"])
def ep_run(request, tmp_path_factory) -> tuple[int, list[dict]]:
    world = request.param
    out = tmp_path_factory.mktemp(f"ep{world}")
    mp.spawn(_worker, args=(world, free_port(), str(out)), nprocs=world, join=True)
    return world, [torch.load(out / f"rank{r}.pt") for r in range(world)]


@pytest.mark.parametrize("variant", VARIANTS, ids=["all_to_all", "nccl_wiring"])
@pytest.mark.parametrize("case", CASES)
def test_exchange_equals_reference(ep_run, case, variant):
    world, results = ep_run
    inputs = _scenario(world, case)
    xs, ids = [i["x"].float() for i in inputs], [i["ids"] for i in inputs]
    expected = reference_exchange(xs, ids, E)
    expected_bf16 = reference_exchange([x.bfloat16() for x in xs], ids, E)
    for r in range(world):
        got = results[r][variant + case]
        assert got["path"] == ("nccl" if variant else "all_to_all"), r
        assert torch.equal(got["recv_x"], expected[r][0]), r
        assert torch.equal(got["recv_offsets"], expected[r][1]), r
        assert torch.equal(got["recv_x_bf16"], expected_bf16[r][0]), r
    if case == "edge":
        assert results[1][variant + case]["recv_x"].shape[0] > 0 or world == 2  # rank 1 sends nothing but may receive
        assert results[world - 1][variant + case]["recv_x"].shape == (0, D)  # the last rank receives nothing
        assert int(results[world - 1][variant + case]["recv_offsets"][-1]) == 0


@pytest.mark.parametrize("variant", VARIANTS, ids=["all_to_all", "nccl_wiring"])
@pytest.mark.parametrize("case", CASES)
def test_identity_experts_give_weighted_sum(ep_run, case, variant):
    world, results = ep_run
    for r, inp in enumerate(_scenario(world, case)):
        x, w = inp["x"].float(), inp["weights"].float()
        torch.testing.assert_close(results[r][variant + case]["identity"], (w[:, :, None] * x[:, None]).sum(1))


@pytest.mark.parametrize("variant", VARIANTS, ids=["all_to_all", "nccl_wiring"])
@pytest.mark.parametrize("case", CASES)
def test_moe_equals_one_process(ep_run, case, variant):
    world, results = ep_run
    inputs = _scenario(world, case)
    out = _moe_one_process(
        [i["x"].float() for i in inputs],
        [i["ids"] for i in inputs],
        [i["weights"].float() for i in inputs],
        _experts(torch.float32),
    )
    for r, part in enumerate(out.split([i["x"].shape[0] for i in inputs])):
        torch.testing.assert_close(results[r][variant + case]["moe"], part, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS, ids=["all_to_all", "nccl_wiring"])
@pytest.mark.parametrize("case", CASES)
def test_gradients_equal_one_process_fp64(ep_run, case, variant):
    world, results = ep_run
    inputs = _scenario(world, case)
    xs = [i["x"].clone().requires_grad_() for i in inputs]
    ws = [i["weights"].clone().requires_grad_() for i in inputs]
    experts = _experts(torch.float64).requires_grad_()
    out = _moe_one_process(xs, [i["ids"] for i in inputs], ws, experts)
    (out * torch.cat([i["c"] for i in inputs])).sum().backward()
    local = E // world
    for r in range(world):
        grads = results[r][variant + case]["grads"]
        torch.testing.assert_close(grads["x"], xs[r].grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grads["weights"], ws[r].grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grads["w_local"], experts.grad[r * local : (r + 1) * local], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variant", VARIANTS, ids=["all_to_all", "nccl_wiring"])
@pytest.mark.parametrize("case", CASES)
def test_finite_differences_fp64(ep_run, case, variant):
    world, results = ep_run
    runs = [results[r][variant + case] for r in range(world)]
    for run in runs:
        torch.testing.assert_close(torch.tensor(run["fd"]), torch.tensor(run["fd_analytic"]), rtol=1e-5, atol=1e-5)
    assert runs[0]["fd"] == runs[-1]["fd"]  # all-reduced: every rank agrees


def test_subgroup_and_size1_groups(ep_run):
    world, results = ep_run
    if world == 4:
        for sub in range(2):
            inputs = _scenario(2, "random", seed=1 + sub)
            expected = reference_exchange([i["x"].float() for i in inputs], [i["ids"] for i in inputs], E)
            for group_rank in range(2):
                got = results[2 * sub + group_rank]["subgroup"]
                assert torch.equal(got["recv_x"], expected[group_rank][0])
                assert torch.equal(got["recv_offsets"], expected[group_rank][1])
    else:
        for r, inp in enumerate(_scenario(2, "random")):
            x_sorted, row_map, offsets = moe_permute(inp["x"], inp["ids"], E)
            got = results[r]["size1"]
            assert torch.equal(got["recv_x"], x_sorted) and torch.equal(got["recv_offsets"], offsets)
            torch.testing.assert_close(got["combined"], moe_unpermute(x_sorted, row_map, inp["weights"]))
            assert results[r]["opcheck"] and results[r]["nccl:opcheck"]


def test_local_path_without_process_group(one_thread):
    assert not dist.is_initialized()
    inp = _scenario(2, "random")[0]
    recv_x, recv_offsets, handle = ep_dispatch(inp["x"], inp["ids"], E)
    x_sorted, row_map, offsets = moe_permute(inp["x"], inp["ids"], E)
    assert torch.equal(recv_x, x_sorted) and torch.equal(recv_offsets, offsets)
    assert handle.group_name is None and handle.recv_order is None
    torch.testing.assert_close(
        ep_combine(recv_x, handle, inp["weights"]), moe_unpermute(x_sorted, row_map, inp["weights"])
    )

    # Linear in each single entry, so gradcheck's central difference is exact for any eps; eps is large because
    # moe_unpermute accumulates fp64 inputs in fp32 (its rounding / eps is the error).
    experts = _experts(torch.float64)
    torch.autograd.gradcheck(
        lambda x, w, we: _ep_moe(x, inp["ids"], w, we, None),
        (inp["x"].requires_grad_(), inp["weights"].requires_grad_(), experts.requires_grad_()),
        eps=FD_STEP,
        atol=1e-5,
        rtol=1e-5,
    )


def test_bad_arguments():
    x, ids = torch.randn(3, D), torch.zeros(3, K, dtype=torch.long)
    with pytest.raises(ValueError, match="topk_ids must be an integer"):
        ep_dispatch(x, ids.float(), E)
    with pytest.raises(ValueError, match=r"expected x \[T, D\]"):
        ep_dispatch(x, ids[:2], E)
    _, _, handle = ep_dispatch(x, ids, E)
    with pytest.raises(ValueError, match="rows"):
        ep_combine(torch.randn(5, D), handle, torch.rand(3, K))
