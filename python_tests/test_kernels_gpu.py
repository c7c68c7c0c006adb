"""The CUDA kernels of the gemm, moe and optim families against k2.ops.reference (gpu-marked).

Each back end is reached on purpose: bf16 with aligned sizes takes the CUTLASS tensor-core path (sm_90a WGMMA
on H100, sm_80 mma.sync elsewhere), misaligned bf16 and fp32 take the SIMT kernel; every layout (forward,
trans_w forward, both dgrads, wgrad) appears with empty groups, T not a multiple of any tile, E = 1, large E,
a partial K tile (K = 200) and E = 384 with skewed, mostly empty experts. The profiler confirms which kernels
ran (CUTLASS tensor-core kernels, not the SIMT one, for aligned bf16 and FP8); every op gives the same result on
a side stream whose inputs are still being written when the op is called; permutation past 2^31 elements.
"""

from __future__ import annotations

import pytest
import torch

import k2.ops
from k2.ops import _native, grouped_gemm, grouped_gemm_fp8, moe_permute, moe_unpermute, newton_schulz, reference

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")


def _offsets(counts: list[int]) -> torch.Tensor:
    return torch.tensor(counts, dtype=torch.int64).cumsum(0).to(torch.int32).to(CUDA)


def _loop(x: torch.Tensor, w: torch.Tensor, counts: list[int], trans_w: bool) -> torch.Tensor:
    """fp32 per-expert loop: the oracle for every dtype."""
    outs, start = [x.new_zeros(0, w.shape[1] if trans_w else w.shape[2], dtype=torch.float32)], 0
    for e, c in enumerate(counts):
        outs.append(x[start : start + c].float() @ (w[e].float().t() if trans_w else w[e].float()))
        start += c
    return torch.cat(outs)


def _skewed_384() -> list[int]:
    """Kimi-K2's 384 experts, routed unevenly: most get nothing, one gets most rows, some a single row."""
    counts = [0] * 384
    counts[0], counts[7], counts[200], counts[383] = 1, 1500, 129, 255
    counts[100:140] = [3] * 40
    counts[301:305] = [1, 0, 64, 1]
    return counts


COUNTS = {
    "E1": [333],
    "empty_edges": [0, 129, 0, 70, 1, 0],
    "E128": [0, 0, 3, 0] * 24 + [257] + [5] * 31,
    "all_empty": [0, 0, 0],
    "E384_skewed": _skewed_384(),
}
# (K, N): aligned takes the tensor cores for bf16; partial_k too, with K = 200 ending in a partial K tile.
SHAPES = {"aligned": (256, 192), "partial_k": (200, 264), "misaligned": (100, 72 + 3)}


def test_families_report_cuda():
    avail = k2.ops.available()
    for family in ("gemm", "moe", "optim"):
        assert "cuda" in avail.get(family, []), (family, avail)


@pytest.mark.parametrize("counts", list(COUNTS.values()), ids=list(COUNTS))
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("trans_w", [True, False])
def test_grouped_gemm_forward_and_gradients(counts, shape, dtype, trans_w):
    torch.manual_seed(0)
    k, n = shape
    t, e = sum(counts), len(counts)
    x = torch.randn(t, k, device=CUDA).to(dtype).requires_grad_()
    w = (torch.randn(e, n, k, device=CUDA) if trans_w else torch.randn(e, k, n, device=CUDA)) / k**0.5
    w = w.to(dtype).requires_grad_()
    offsets = _offsets(counts)
    y = grouped_gemm(x, w, offsets, trans_w=trans_w)
    tol = {"atol": 2e-2, "rtol": 2e-2} if dtype == torch.bfloat16 else {"atol": 1e-4, "rtol": 1e-4}
    torch.testing.assert_close(y.float(), _loop(x, w, counts, trans_w), **tol)
    dy = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    x_ref, w_ref = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    dx_ref, dw_ref = torch.autograd.grad(_loop(x_ref, w_ref, counts, trans_w), (x_ref, w_ref), dy.float())
    torch.testing.assert_close(dx.float(), dx_ref, **tol)
    # dW sums over a whole group's rows: scale the tolerance with the largest group.
    big = max([1, *counts]) ** 0.5
    torch.testing.assert_close(dw.float(), dw_ref, atol=tol["atol"] * big, rtol=tol["rtol"])
    for g, c in enumerate(counts):
        if c == 0:
            assert torch.count_nonzero(dw[g]) == 0
    out = torch.full_like(y, float("nan"))
    with torch.no_grad():
        grouped_gemm(x, w, offsets, trans_w=trans_w, out=out)  # the kernel writes the caller's buffer
    torch.testing.assert_close(out.float(), y.detach().float(), **tol)


def test_grouped_gemm_is_graph_capturable_and_syncs_nothing():
    counts = [64, 0, 192]
    x = torch.randn(256, 128, device=CUDA, dtype=torch.bfloat16)
    w = torch.randn(3, 256, 128, device=CUDA, dtype=torch.bfloat16)
    offsets = _offsets(counts)
    grouped_gemm(x, w, offsets, trans_w=True)  # warm-up (allocator pools, CUTLASS smem attributes)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = grouped_gemm(x, w, offsets, trans_w=True)
    graph.replay()
    torch.testing.assert_close(y.float(), _loop(x, w, counts, True), atol=2e-2, rtol=2e-2)


def _require_fp8_kernel() -> None:
    """Skips where the FP8 GEMM kernel cannot exist; on a compute capability 9.x GPU its absence is a failure
    (a build that lost CUTLASS or the 90a architecture would otherwise pass by skipping)."""
    supported = bool(_native.native().grouped_gemm_fp8_supported(torch.cuda.current_device()))
    if torch.cuda.get_device_capability()[0] == 9:
        assert supported, f"sm_90 GPU but k2._C has no FP8 grouped GEMM for it: {_native.native().build_info()}"
    elif not supported:
        pytest.skip("FP8 grouped GEMM needs an sm_90 GPU")


def test_grouped_gemm_fp8_matches_reference():
    _require_fp8_kernel()
    torch.manual_seed(0)
    counts = [0, 200, 3, 0, 129]
    t, k, n, e = sum(counts), 512, 384, len(counts)
    xq, xs = k2.ops.quantize_1x128(torch.randn(t, k, device=CUDA))
    wq, ws = k2.ops.quantize_128x128(torch.randn(e, n, k, device=CUDA) / k**0.5)
    offsets = _offsets(counts)
    got = grouped_gemm_fp8(xq, xs, wq, ws, offsets)
    want = reference.grouped_gemm_fp8(xq, xs, wq, ws, offsets)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize(("k", "n"), [(400, 200), (144, 1032), (2064, 520)], ids=str)
def test_grouped_gemm_fp8_partial_blocks_and_spread_scales(k, n):
    """K and N not multiples of 128 (partial last scale blocks along both), block scales spread over 2^-8..2^8:
    a scale read from the wrong block, or a partial block's scale skipped, moves outputs by large factors."""
    _require_fp8_kernel()
    gen = torch.Generator(device=CUDA).manual_seed(k + n)
    counts = [0, 200, 3, 0, 129, 1, 300]
    t, e, kb, nb = sum(counts), len(counts), -(-k // 128), -(-n // 128)
    xq = (torch.randn(t, k, device=CUDA, generator=gen) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
    wq = (torch.randn(e, n, k, device=CUDA, generator=gen) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
    xs = torch.exp2(torch.rand(t, kb, device=CUDA, generator=gen) * 16 - 8)
    ws = torch.exp2(torch.rand(e, nb, kb, device=CUDA, generator=gen) * 16 - 8)
    offsets = _offsets(counts)
    got = grouped_gemm_fp8(xq, xs, wq, ws, offsets).float().cpu()
    # The reference on the CPU (fp32 products and sums there; no dependence on torch's CUDA grouped GEMM).
    xq, xs, wq, ws, offsets = (t.cpu() for t in (xq, xs, wq, ws, offsets))
    want = reference.grouped_gemm_fp8(xq, xs, wq, ws, offsets).float()
    # Error bound per output: bf16 rounding of both results against the sum of |terms| (no cancellation credit).
    bound = reference.grouped_gemm_fp8(xq.float().abs(), xs, wq.float().abs(), ws, offsets).float()
    err = (got - want).abs()
    worst = (err / (bound + 1e-30)).max().item()
    assert bool((err <= 1e-2 * bound).all()), f"max |got - want| / sum|terms| = {worst:.3g}"
    assert ((got - want).norm() / want.norm()).item() < 1e-2


@pytest.mark.parametrize(("t", "k", "d", "e"), [(0, 2, 64, 4), (1000, 8, 256, 384), (77, 1, 40, 1), (33, 4, 7, 1000)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_moe_kernels_match_reference(t, k, d, e, dtype):
    torch.manual_seed(0)
    x = torch.randn(t, d, device=CUDA).to(dtype)
    ids = torch.rand(t, e, device=CUDA).topk(min(k, e), dim=-1).indices if t else torch.empty(0, k, device=CUDA)
    ids = ids.long()
    got, want = moe_permute(x, ids, e), reference.moe_permute(x, ids, e)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=0, rtol=0)
    row_map = got[1]
    weights = torch.rand(t, ids.shape[1], device=CUDA)
    y_sorted, dy = torch.randn(t * ids.shape[1], d, device=CUDA).to(dtype), torch.randn(t, d, device=CUDA).to(dtype)
    tol = {"atol": 2e-2, "rtol": 2e-2} if dtype == torch.bfloat16 else {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(
        moe_unpermute(y_sorted, row_map, weights), reference.moe_unpermute(y_sorted, row_map, weights), **tol
    )
    got_b = torch.ops.k2.moe_unpermute_backward(dy, y_sorted, row_map, weights)
    want_b = reference.moe_unpermute_backward(dy, y_sorted, row_map, weights)
    torch.testing.assert_close(got_b[0], want_b[0], **tol)
    torch.testing.assert_close(got_b[1], want_b[1], atol=tol["atol"] * d**0.5, rtol=tol["rtol"])


@pytest.mark.parametrize("shape", [(4, 256, 512), (3, 768, 128), (2, 100, 60), (1, 64, 64)], ids=str)
def test_newton_schulz_matches_reference(shape):
    torch.manual_seed(0)
    g = torch.randn(*shape, device=CUDA)
    got = newton_schulz(g, steps=5)
    want = reference.newton_schulz(g, [(3.4445, -4.7750, 2.0315)] * 5, 1e-7).float()
    # bf16 throughout: compare as matrices, and check the property Muon needs (singular values near 1).
    assert ((got - want).norm(dim=(-2, -1)) / want.norm(dim=(-2, -1))).max() < 2e-2
    s = torch.linalg.svdvals(got.float())
    assert s.max() < 1.3 and s.median() > 0.6


# ---- the caller's stream ---------------------------------------------------------------------------------------


def _stream_cases() -> dict:
    """name -> (inputs, op): each op on the public k2.ops API, on inputs built on the default stream."""
    torch.manual_seed(0)
    counts = [0, 200, 3, 0, 129, 60]
    t, e = sum(counts), len(counts)
    offsets = _offsets(counts)
    x = torch.randn(t, 256, device=CUDA)
    w = torch.randn(e, 192, 256, device=CUDA) / 16
    ids = torch.rand(1000, 64, device=CUDA).topk(8, dim=-1).indices
    tokens = torch.randn(1000, 256, device=CUDA).to(torch.bfloat16)
    y_sorted, row_map = moe_permute(tokens, ids, 64)[:2]
    cases = {
        "grouped_gemm_bf16": (
            (x.bfloat16(), w.bfloat16(), offsets),
            lambda a, b, o: grouped_gemm(a, b, o, trans_w=True),
        ),
        "grouped_gemm_fp32": ((x, w, offsets), lambda a, b, o: grouped_gemm(a, b, o, trans_w=True)),
        "moe_permute": ((tokens, ids), lambda a, i: moe_permute(a, i, 64)),
        "moe_unpermute": ((y_sorted, row_map, torch.rand(1000, 8, device=CUDA)), moe_unpermute),
        "newton_schulz": ((torch.randn(4, 256, 512, device=CUDA),), lambda g: newton_schulz(g, steps=5)),
        "quantize_1x128": ((torch.randn(512, 7168, device=CUDA).bfloat16(),), k2.ops.quantize_1x128),
        "quantize_128x128": ((torch.randn(3, 384, 1000, device=CUDA),), k2.ops.quantize_128x128),
    }
    fp8 = _native.native().grouped_gemm_fp8_supported(torch.cuda.current_device())
    if fp8:
        xq, xs = k2.ops.quantize_1x128(x)
        wq, ws = k2.ops.quantize_128x128(w)
        cases["grouped_gemm_fp8"] = ((xq, xs, wq, ws, offsets), grouped_gemm_fp8)
    return cases


STREAM_CASES = [
    "grouped_gemm_bf16",
    "grouped_gemm_fp32",
    "grouped_gemm_fp8",
    "moe_permute",
    "moe_unpermute",
    "newton_schulz",
    "quantize_1x128",
    "quantize_128x128",
]


def _zeros_like(t: torch.Tensor) -> torch.Tensor:
    z = torch.empty_like(t)
    (z.view(torch.uint8) if z.element_size() == 1 else z).zero_()  # fp8: zero the bytes
    return z


def _as_tuple(out) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


@pytest.mark.parametrize("name", STREAM_CASES)
def test_ops_run_on_the_callers_side_stream(name):
    """Each op called under ``torch.cuda.stream(side)`` equals its default-stream result. The inputs are copied
    on the side stream behind a ~20 ms sleep kernel, so an op that launched on another stream (the legacy default
    stream, a stream of its own) or allocated scratch in stream order elsewhere would read zeros or garbage."""
    cases = _stream_cases()
    if name not in cases:
        _require_fp8_kernel()
        pytest.skip(f"{name}: no kernel on this GPU")
    inputs, op = cases[name]
    want = _as_tuple(op(*inputs))
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fresh = [_zeros_like(t) for t in inputs]  # side-stream buffers, zeroed before the sleep
        torch.cuda._sleep(40_000_000)
        for f, t in zip(fresh, inputs, strict=True):
            f.copy_(t)
        got = _as_tuple(op(*fresh))
    torch.cuda.current_stream().wait_stream(side)
    for g in got:
        g.record_stream(torch.cuda.current_stream())
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        if g.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            g, w = g.view(torch.uint8), w.view(torch.uint8)
        if g.dtype.is_floating_point:
            torch.testing.assert_close(g, w, atol=1e-3, rtol=1e-3, equal_nan=True)
        else:
            assert torch.equal(g, w)


# ---- which kernels ran ------------------------------------------------------------------------------------------


def _cuda_kernels(fn) -> list[str]:
    """Names of the CUDA kernels ``fn`` launches (one warm-up call first), from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [evt.name for evt in prof.events() if evt.device_type == torch.autograd.DeviceType.CUDA]
    assert names, f"the profiler saw no CUDA kernel (CUPTI missing?); events: {[e.name for e in prof.events()][:20]}"
    return names


def _tensor_core_gemms(names: list[str]) -> list[str]:
    """The CUTLASS GEMM kernels among ``names`` for this GPU: the sm_90a ptr-array kernel (cutlass::device_kernel
    of a GemmUniversal with an Sm90 mainloop) on compute capability 9.0, the sm_80 grouped kernel (cutlass::Kernel
    of a GemmGrouped) on other sm_8x+ GPUs."""
    if torch.cuda.get_device_capability() == (9, 0):
        return [n for n in names if "GemmUniversal" in n and "Sm90" in n]
    return [n for n in names if "GemmGrouped" in n]


def _require_tensor_cores() -> None:
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("the CUTLASS tensor-core kernels need sm_80 or newer")
    assert _native.native().build_info()["cutlass"], "k2._C was built without the CUTLASS kernels"


def _no_simt(names: list[str]) -> None:
    simt = [n for n in names if "grouped_gemm_simt" in n]
    assert not simt, f"the SIMT kernel ran: {simt[:2]}"


def test_profiler_aligned_bf16_grouped_gemm_runs_on_tensor_cores():
    """Forward (trans_w: row x col), dgrad (row x row) and wgrad (col x row) of aligned bf16 all take CUTLASS."""
    _require_tensor_cores()
    counts = [256, 0, 128, 384]
    x = torch.randn(sum(counts), 512, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(len(counts), 256, 512, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    offsets = _offsets(counts)

    def step():
        y = grouped_gemm(x, w, offsets, trans_w=True)
        torch.autograd.grad(y, (x, w), torch.ones_like(y))

    names = _cuda_kernels(step)
    _no_simt(names)
    gemms = _tensor_core_gemms(names)
    assert len(gemms) >= 3, f"expected 3 CUTLASS GEMMs (fwd, dgrad, wgrad), saw kernels: {names}"


def test_profiler_newton_schulz_runs_on_tensor_cores():
    _require_tensor_cores()
    g = torch.randn(4, 256, 512, device=CUDA)
    names = _cuda_kernels(lambda: newton_schulz(g, steps=5))
    _no_simt(names)
    assert _tensor_core_gemms(names), f"no CUTLASS GEMM among the kernels: {names}"


def test_profiler_fp8_grouped_gemm_runs_the_blockwise_kernel():
    _require_fp8_kernel()
    counts = [0, 300, 129]
    xq, xs = k2.ops.quantize_1x128(torch.randn(sum(counts), 1024, device=CUDA))
    wq, ws = k2.ops.quantize_128x128(torch.randn(len(counts), 512, 1024, device=CUDA))
    offsets = _offsets(counts)
    names = _cuda_kernels(lambda: grouped_gemm_fp8(xq, xs, wq, ws, offsets))
    fp8 = [n for n in _tensor_core_gemms(names) if "float_e4m3" in n]
    assert fp8, f"no CUTLASS sm_90 FP8 GEMM among the kernels: {names}"


# ---- past 2^31 elements ------------------------------------------------------------------------------------------


def _require_memory(gib: float) -> None:
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    if total < gib * 2**30:
        pytest.skip(f"needs a GPU with {gib} GiB")


def test_moe_permute_and_unpermute_past_2_31_elements():
    """x_sorted [T*K, D] with T*K*D > 2^31: element offsets overflow int32 on the last ~40 rows."""
    _require_memory(24)
    t, k, d, e = 131_077, 8, 2048, 384
    assert t * k * d > 2**31
    torch.manual_seed(0)
    x = torch.randn(t, d, device=CUDA).to(torch.bfloat16)
    ids = torch.rand(t, e, device=CUDA).topk(k, dim=-1).indices
    x_sorted, row_map, offsets = moe_permute(x, ids, e)
    _, row_map_ref, offsets_ref = reference.moe_permute(x[:, :8], ids, e)  # the order does not depend on D
    assert torch.equal(row_map, row_map_ref) and torch.equal(offsets, offsets_ref)
    rows = torch.cat([torch.arange(100), torch.randint(0, t * k, (10_000,)), torch.arange(t * k - 100, t * k)])
    rows = rows.to(CUDA)
    assert torch.equal(x_sorted[rows], x[row_map[rows].long() // k])
    # Unit weights: y[t] = K * x[t] exactly (fp32 sum of K equal bf16 values, K a power of two).
    y = moe_unpermute(x_sorted, row_map, torch.ones(t, k, device=CUDA))
    assert torch.equal(y, x * k)
