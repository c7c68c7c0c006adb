"""The CUDA kernels of the gemm, moe and optim families against k2.ops.reference (gpu-marked).

Each back end is reached on purpose: bf16 with aligned sizes takes the CUTLASS tensor-core path (sm_90a WGMMA
on H100, sm_80 mma.sync elsewhere), misaligned bf16 and fp32 take the SIMT kernel; every layout (forward,
trans_w forward, both dgrads, wgrad) appears with empty groups, T not a multiple of any tile, E = 1 and large E.
"""

from __future__ import annotations

import pytest
import torch

import k2.ops
from k2.ops import grouped_gemm, grouped_gemm_fp8, moe_permute, moe_unpermute, newton_schulz, reference

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


COUNTS = {
    "E1": [333],
    "empty_edges": [0, 129, 0, 70, 1, 0],
    "E128": [0, 0, 3, 0] * 24 + [257] + [5] * 31,
    "all_empty": [0, 0, 0],
}
SHAPES = {"aligned": (256, 192), "misaligned": (100, 72 + 3)}  # (K, N)


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


def test_grouped_gemm_fp8_matches_reference():
    if not k2._C.grouped_gemm_fp8_supported(0):
        pytest.skip("FP8 grouped GEMM needs an sm_90 GPU")
    torch.manual_seed(0)
    counts = [0, 200, 3, 0, 129]
    t, k, n, e = sum(counts), 512, 384, len(counts)
    xq, xs = k2.ops.quantize_1x128(torch.randn(t, k, device=CUDA))
    wq, ws = k2.ops.quantize_128x128(torch.randn(e, n, k, device=CUDA) / k**0.5)
    offsets = _offsets(counts)
    got = grouped_gemm_fp8(xq, xs, wq, ws, offsets)
    want = reference.grouped_gemm_fp8(xq, xs, wq, ws, offsets)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


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
