"""The k2.ops behaviours an audit of never-run CUDA code asked for (issue 19), tested on their host side on CPU and
on a GPU where there is one: autocast rules for the matmul-like ops, the device guard around every native call,
caller-allocated workspaces sized by native queries, empty launches handled on the host, and float64 inputs
falling back to the reference instead of failing in the native checks."""

from __future__ import annotations

import contextlib
import types

import pytest
import torch

from k2.model.moe import Experts
from k2.ops import _native, grouped_gemm, moe_permute, moe_unpermute, newton_schulz, reference

C = _native.native()
needs_native = pytest.mark.skipif(C is None, reason="k2._C is not built")
needs_cuda_build = pytest.mark.skipif(C is None or not C.build_info()["cuda"], reason="k2._C has no CUDA kernels")


def _offsets(counts: list[int], device: str | torch.device = "cpu") -> torch.Tensor:
    return torch.tensor(counts, dtype=torch.int64).cumsum(0).to(torch.int32).to(device)


@pytest.fixture
def spy_reference_gemm(monkeypatch):
    """Records the dtypes each reference grouped GEMM (the CPU path) is called with."""
    seen: list[tuple[torch.dtype, torch.dtype]] = []
    original = reference.grouped_gemm

    def spy(x, w, offsets, trans_w=False):
        seen.append((x.dtype, w.dtype))
        return original(x, w, offsets, trans_w)

    monkeypatch.setattr(reference, "grouped_gemm", spy)
    return seen


# ---- autocast ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_grouped_gemm_under_autocast_runs_in_the_autocast_dtype(dtype, spy_reference_gemm):
    torch.manual_seed(0)
    counts = [3, 0, 5, 2]
    x = torch.randn(10, 16, requires_grad=True)
    w = torch.randn(4, 8, 16, requires_grad=True)  # fp32 parameters, nn.Linear layout
    with torch.autocast("cpu", dtype=dtype):
        y = grouped_gemm(x, w, _offsets(counts), trans_w=True)
    assert y.dtype == dtype
    assert spy_reference_gemm == [(dtype, dtype)]
    # Exactly the op on the cast inputs, and gradients in the parameters' dtype through the casts.
    x_low, w_low = x.detach().to(dtype).requires_grad_(), w.detach().to(dtype).requires_grad_()
    y_low = grouped_gemm(x_low, w_low, _offsets(counts), trans_w=True)
    torch.testing.assert_close(y, y_low, atol=0, rtol=0)
    dy = torch.randn(10, 8).to(dtype)
    (y * dy).sum().backward()
    (y_low * dy).sum().backward()
    assert x.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad, x_low.grad.float(), atol=0, rtol=0)
    torch.testing.assert_close(w.grad, w_low.grad.float(), atol=0, rtol=0)


def test_grouped_gemm_accepts_mixed_dtypes_only_under_autocast():
    x, w, offsets = torch.randn(6, 8).bfloat16(), torch.randn(2, 8, 4), _offsets([2, 4])
    with pytest.raises(ValueError, match="must have the same dtype"):
        grouped_gemm(x, w, offsets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert grouped_gemm(x, w, offsets).dtype == torch.bfloat16
        # out= is not autocast (as torch's out= ops): the caller's buffer fixes the dtype.
        out = torch.empty(6, 4)
        with torch.no_grad():
            assert grouped_gemm(x.float(), w, offsets, out=out) is out
    torch.testing.assert_close(out, reference.grouped_gemm(x.float(), w, offsets))


def test_experts_under_bf16_autocast_run_bf16_gemms_with_fp32_grads(spy_reference_gemm):
    torch.manual_seed(0)
    experts = Experts(num_experts=4, hidden_size=16, intermediate_size=8)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x_sorted = torch.randn(12, 16, requires_grad=True)
    offsets = _offsets([5, 0, 4, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = experts.swiglu(x_sorted, offsets)
    assert y.dtype == torch.bfloat16
    assert spy_reference_gemm == [(torch.bfloat16, torch.bfloat16)] * 3
    y.float().square().sum().backward()
    for name, p in experts.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, name
    assert x_sorted.grad.dtype == torch.float32


def test_moe_permute_casts_under_autocast_and_unpermute_keeps_fp32_weights():
    torch.manual_seed(0)
    x = torch.randn(6, 8, requires_grad=True)
    ids = torch.randint(0, 3, (6, 2))
    weights = torch.rand(6, 2, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_sorted, row_map, _ = moe_permute(x, ids, 3)
        assert x_sorted.dtype == torch.bfloat16
        y = moe_unpermute(x_sorted, row_map, weights)
    assert y.dtype == torch.bfloat16  # the expert outputs' dtype; the routing weights were not cast
    torch.testing.assert_close(y, reference.moe_unpermute(x_sorted, row_map, weights), atol=0, rtol=0)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and weights.grad.dtype == torch.float32


# ---- device guard --------------------------------------------------------------------------------------------


def test_call_runs_cuda_work_with_the_tensors_device_current(monkeypatch):
    # Host-side logic only (no GPU needed): _native.call enters torch.cuda.device(<the tensor's index>) around
    # the native call and passes that device's current stream.
    current: list[int | None] = [None]
    entered: list[int] = []

    @contextlib.contextmanager
    def fake_device(index):
        entered.append(index)
        previous, current[0] = current[0], index
        yield
        current[0] = previous

    calls = []
    fake = types.SimpleNamespace(op=lambda *args: calls.append((current[0], args)))
    monkeypatch.setattr(_native, "_native_module", fake)
    monkeypatch.setattr(torch.cuda, "device", fake_device)
    monkeypatch.setattr(_native, "stream", lambda device: 1000 + device.index if device.type == "cuda" else 0)
    _native.call("op", torch.device("cuda", 1), 7, "x")
    assert entered == [1] and calls == [(1, (7, "x", 1001))]
    assert current[0] is None  # restored afterwards
    # CPU work: no device switch, stream 0.
    _native.call("op", torch.device("cpu"), 8)
    assert entered == [1] and calls[-1] == (None, (8, 0))


def test_call_allocates_the_queried_workspace_through_torch(monkeypatch):
    queries, calls = [], []

    def query(*args):
        queries.append(args)
        return 96

    fake = types.SimpleNamespace(op_workspace_size=query, op=lambda *args: calls.append(args))
    monkeypatch.setattr(_native, "_native_module", fake)
    x = torch.randn(3)
    _native.call("op", x.device, x, True, workspace=("op_workspace_size", (5, 6)))
    assert queries == [(5, 6, "cpu", 0)]
    (x_view, flag, ws_view, stream) = calls[0]
    assert x_view == _native.view(x) and flag is True and stream == 0
    assert ws_view[1:5] == ((96,), (1,), "uint8", "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_ops_on_the_second_gpu_run_there():
    torch.manual_seed(0)
    dev = torch.device("cuda", 1)
    torch.cuda.set_device(0)
    counts = [40, 0, 88]
    x = torch.randn(128, 64, device=dev, dtype=torch.bfloat16)
    w = torch.randn(3, 32, 64, device=dev, dtype=torch.bfloat16)
    y = grouped_gemm(x, w, _offsets(counts, dev), trans_w=True)
    want = reference.grouped_gemm(x.float().cpu(), w.float().cpu(), _offsets(counts), True)
    torch.testing.assert_close(y.float().cpu(), want, atol=2e-2, rtol=2e-2)
    ids = torch.randint(0, 3, (128, 2), device=dev)
    got = moe_permute(x, ids, 3)
    ref = reference.moe_permute(x.cpu(), ids.cpu(), 3)
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g.cpu(), r, atol=0, rtol=0)
    m = torch.randn(4, 32, 48, device=dev)
    got, want = newton_schulz(m).cpu(), newton_schulz(m.cpu())
    assert ((got - want).norm(dim=(-2, -1)) / want.norm(dim=(-2, -1))).max() < 2e-2
    torch.cuda.synchronize(dev)
    assert torch.cuda.current_device() == 0


# ---- workspaces ----------------------------------------------------------------------------------------------


@needs_native
def test_workspace_queries_are_zero_on_cpu_and_cpu_kernels_take_an_empty_workspace():
    assert C.moe_permute_workspace_size(10, 2, 4, "cpu", 0) == 0
    assert C.moe_unpermute_workspace_size(10, 2, "cpu", 0) == 0
    torch.manual_seed(0)
    x, ids = torch.randn(10, 8), torch.randint(0, 4, (10, 2))
    x_sorted, row_map, offsets = (
        torch.empty(20, 8),
        torch.empty(20, dtype=torch.int32),
        torch.empty(4, dtype=torch.int32),
    )
    empty = torch.empty(0, dtype=torch.uint8)
    v = _native.view
    C.moe_permute(v(x), v(ids), v(x_sorted), v(row_map), v(offsets), v(empty), 0)
    want = reference.moe_permute(x, ids, 4)
    for got, ref in zip((x_sorted, row_map, offsets), want, strict=True):
        torch.testing.assert_close(got, ref, atol=0, rtol=0)
    weights, y = torch.rand(10, 2), torch.empty(10, 8)
    C.moe_unpermute(v(x_sorted), v(row_map), v(weights), v(y), v(empty), 0)
    torch.testing.assert_close(y, reference.moe_unpermute(x_sorted, row_map, weights))


@needs_native
def test_workspace_argument_is_checked_and_named():
    x, ids = torch.randn(4, 8), torch.randint(0, 2, (4, 1))
    outs = (torch.empty(4, 8), torch.empty(4, dtype=torch.int32), torch.empty(2, dtype=torch.int32))
    v = _native.view
    with pytest.raises(ValueError, match=r"k2\.ops\.moe_permute: argument 'workspace': expected dtype uint8"):
        C.moe_permute(v(x), v(ids), *map(v, outs), v(torch.empty(4)), 0)
    with pytest.raises(ValueError, match=r"k2\.ops\.moe_permute: argument 'workspace': expected a 1-D tensor"):
        C.moe_permute(v(x), v(ids), *map(v, outs), v(torch.empty(2, 2, dtype=torch.uint8)), 0)


@needs_cuda_build
def test_cuda_workspace_sizes_on_the_host():
    # Sizes that need no device: the int32 inverse permutation, and zero for fp32/fp16 grouped GEMMs (CUDA-core
    # kernel, no argument arrays) and empty problems.
    assert C.moe_unpermute_workspace_size(1000, 6, "cuda", 0) == -(-1000 * 6 * 4 // 256) * 256
    assert C.moe_unpermute_workspace_size(1000, 0, "cuda", 0) == 0
    assert C.moe_permute_workspace_size(1000, 0, 8, "cuda", 0) == 0
    for dtype in ("float32", "float16"):
        assert C.grouped_gemm_workspace_size(dtype, 128, "cuda", 0) == 0
    assert C.grouped_gemm_workspace_size("bfloat16", 0, "cuda", 0) == 0
    assert C.grouped_gemm_workspace_size("bfloat16", 128, "cpu", 0) == 0
    assert C.newton_schulz_workspace_size(0, 64, 64, "cuda", 0) == 0
    with pytest.raises(ValueError, match="grouped_gemm_workspace_size: argument 'dtype'"):
        C.grouped_gemm_workspace_size("float64", 4, "cuda", 0)


@needs_cuda_build
def test_too_small_cuda_workspace_is_rejected_before_any_launch():
    # CUDA views of host memory: the check runs on the host before the first launch, so nothing is dereferenced.
    def cuda(t: torch.Tensor) -> tuple:
        return (*_native.view(t)[:4], "cuda", 0)

    y_sorted, row_map, weights, y = (
        torch.randn(8, 4),
        torch.arange(8, dtype=torch.int32),
        torch.rand(4, 2),
        torch.empty(4, 4),
    )
    short = torch.empty(16, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"moe_unpermute: argument 'workspace': expected at least 256 bytes"):
        C.moe_unpermute(cuda(y_sorted), cuda(row_map), cuda(weights), cuda(y), cuda(short), 0)


@pytest.mark.gpu
def test_cuda_workspaces_are_queried_and_checked():
    dev = torch.device("cuda", torch.cuda.current_device())
    idx = dev.index
    cc = torch.cuda.get_device_capability(dev)
    bf16 = C.grouped_gemm_workspace_size("bfloat16", 64, "cuda", idx)
    assert (bf16 > 0) == (cc[0] >= 8)  # CUTLASS's per-group arrays on tensor-core GPUs
    assert C.moe_permute_workspace_size(4096, 8, 64, "cuda", idx) >= 3 * 4096 * 8 * 4
    m, n, batch = 96, 40, 7
    assert C.newton_schulz_workspace_size(batch, m, n, "cuda", idx) >= batch * (4 + 2 * 2 * m * n + 2 * 2 * n * n)
    if bf16 > 0:
        # A workspace too small is an argument error, not a CUDA fault.
        x = torch.randn(256, 64, device=dev, dtype=torch.bfloat16)
        w = torch.randn(64, 32, 64, device=dev, dtype=torch.bfloat16)
        offsets = _offsets([4] * 64, dev)
        out = torch.empty(256, 32, device=dev, dtype=torch.bfloat16)
        short = torch.empty(16, dtype=torch.uint8, device=dev)
        v = _native.view
        with pytest.raises(ValueError, match="argument 'workspace'"):
            C.grouped_gemm(v(x), v(w), v(offsets), v(out), True, v(short), _native.stream(dev))


# ---- launch limits -------------------------------------------------------------------------------------------


def _devices() -> list[str]:
    return ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_gemm_without_groups_is_zero(device, dtype):
    # E = 0 with T > 0: no row belongs to a group, the product is zero (no zero-sized launch, no garbage rows).
    x = torch.randn(5, 16, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(0, 8, 16, device=device, dtype=dtype, requires_grad=True)
    offsets = torch.zeros(0, dtype=torch.int32, device=device)
    y = grouped_gemm(x, w, offsets, trans_w=True)
    assert torch.equal(y, torch.zeros(5, 8, device=device, dtype=dtype))
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x)) and w.grad.shape == (0, 8, 16)
    assert torch.equal(reference.grouped_gemm(x.detach(), w.detach(), offsets, True), y)


@pytest.mark.parametrize("device", _devices())
def test_top_k_zero_routes_nothing(device):
    x = torch.randn(5, 8, device=device, requires_grad=True)
    ids = torch.zeros(5, 0, dtype=torch.int64, device=device)
    weights = torch.zeros(5, 0, device=device, requires_grad=True)
    x_sorted, row_map, offsets = moe_permute(x, ids, 3)
    want = reference.moe_permute(x.detach(), ids, 3)
    assert x_sorted.shape == (0, 8) and row_map.shape == (0,)
    assert torch.equal(offsets, want[2]) and torch.equal(offsets.cpu(), torch.zeros(3, dtype=torch.int32))
    y = moe_unpermute(x_sorted, row_map, weights)
    assert torch.equal(y, reference.moe_unpermute(x_sorted.detach(), row_map, weights.detach()))
    assert torch.equal(y, torch.zeros(5, 8, device=device))
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.gpu
def test_newton_schulz_batch_beyond_grid_y():
    # 70,000 matrices: more than grid.y's 65,535 blocks.
    torch.manual_seed(0)
    x = torch.randn(70_000, 2, 8)
    got = newton_schulz(x.cuda()).cpu()
    want = reference.newton_schulz(x, [(3.4445, -4.7750, 2.0315)] * 5, 1e-7).float()
    err = (got.float() - want).norm(dim=(-2, -1)) / want.norm(dim=(-2, -1))
    assert err.max() < 2e-2


@pytest.mark.gpu
def test_bf16_grouped_gemm_with_more_groups_than_clusters():
    # The persistent CUTLASS grid is sized from the cluster occupancy; many groups and tiles exercise it.
    torch.manual_seed(0)
    counts = [(e * 37) % 300 for e in range(160)]
    x = torch.randn(sum(counts), 256, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(160, 128, 256, device="cuda", dtype=torch.bfloat16)
    y = grouped_gemm(x, w, _offsets(counts, "cuda"), trans_w=True)
    want = reference.grouped_gemm(x.float().cpu(), w.float().cpu(), _offsets(counts), True)
    torch.testing.assert_close(y.float().cpu(), want, atol=5e-2, rtol=2e-2)


# ---- float64 -------------------------------------------------------------------------------------------------


def test_float64_has_no_native_kernel_on_any_device(monkeypatch):
    # Host-side dispatch: a float64 operand (or result) sends the call to the reference, CUDA included.
    monkeypatch.setattr(_native, "_KERNELS", {"gemm": frozenset({"cuda"}), "moe": frozenset({"cpu", "cuda"})})
    monkeypatch.setattr(_native, "_native_module", types.SimpleNamespace())
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert _native.kernel_module("gemm", cuda, torch.bfloat16, torch.int32) is not None
    assert _native.kernel_module("gemm", cuda, torch.float64) is None
    assert _native.kernel_module("moe", cpu, torch.randn(2).double()) is None
    assert _native.kernel_module("moe", cpu, torch.randn(2), torch.int64) is not None


@pytest.mark.parametrize("device", _devices())
def test_float64_ops_match_the_reference(device):
    torch.manual_seed(0)
    x = torch.randn(12, 16, dtype=torch.float64, device=device)
    ids = torch.randint(0, 4, (12, 2), device=device)
    got = moe_permute(x, ids, 4)
    for g, r in zip(got, reference.moe_permute(x, ids, 4), strict=True):
        assert torch.equal(g, r)
    weights = torch.rand(12, 2, dtype=torch.float64, device=device)
    torch.testing.assert_close(moe_unpermute(got[0], got[1], weights), reference.moe_unpermute(got[0], got[1], weights))
    w = torch.randn(4, 8, 16, dtype=torch.float64, device=device)
    torch.testing.assert_close(
        grouped_gemm(got[0], w, got[2], trans_w=True), reference.grouped_gemm(got[0], w, got[2], True)
    )
    m = torch.randn(3, 16, 24, dtype=torch.float64, device=device)
    assert newton_schulz(m).dtype == torch.float64
