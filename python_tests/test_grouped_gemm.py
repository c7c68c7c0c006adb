"""k2.ops.grouped_gemm (and its weight-gradient op) at MoE scale, and k2.ops.grouped_gemm_fp8, on CPU.

On CPU both dispatch to k2.ops.reference (torch._grouped_mm, which a C++ loop does not beat; see
tools/bench_moe.py); these tests pin the contract the CUDA kernels are checked against in
test_kernels_gpu.py: many experts with most of them empty, row counts that are no multiple of any tile, one
expert, gradients against autograd of a per-expert loop, opcheck, and the FP8 block-scale semantics.
"""

from __future__ import annotations

import pytest
import torch

from k2.ops import grouped_gemm, grouped_gemm_fp8, quantize_1x128, quantize_128x128, reference


def _counts(t: int, e: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, max(1, e // 4), (t,), generator=g) * 4 % e  # skewed: 3 of 4 experts stay empty
    return torch.bincount(ids, minlength=e).tolist()


def _offsets(counts: list[int]) -> torch.Tensor:
    return torch.tensor(counts, dtype=torch.int64).cumsum(0).to(torch.int32)


def _loop(x: torch.Tensor, w: torch.Tensor, counts: list[int], trans_w: bool) -> torch.Tensor:
    outs, start = [x.new_zeros(0, w.shape[1] if trans_w else w.shape[2])], 0
    for e, c in enumerate(counts):
        outs.append(x[start : start + c] @ (w[e].t() if trans_w else w[e]))
        start += c
    return torch.cat(outs)


@pytest.mark.parametrize(("t", "e"), [(500, 128), (77, 1), (130, 9)], ids=["E128", "E1", "E9"])
@pytest.mark.parametrize("trans_w", [True, False])
def test_forward_and_gradients_match_per_expert_loop(t, e, trans_w):
    torch.manual_seed(0)
    k, n = 48, 40
    counts = _counts(t, e, seed=e)
    x = torch.randn(t, k, requires_grad=True)
    w = (torch.randn(e, n, k) if trans_w else torch.randn(e, k, n)).requires_grad_()
    y = grouped_gemm(x, w, _offsets(counts), trans_w=trans_w)
    x_ref, w_ref = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y_ref = _loop(x_ref, w_ref, counts, trans_w)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    dy = torch.randn_like(y)
    (y * dy).sum().backward()
    (y_ref * dy).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(w.grad, w_ref.grad, atol=1e-4, rtol=1e-4)
    empty = torch.tensor(counts) == 0
    assert torch.count_nonzero(w.grad[empty]) == 0


@pytest.mark.parametrize("trans_w", [True, False])
def test_out_writes_the_product_into_the_callers_buffer(trans_w):
    torch.manual_seed(0)
    counts = _counts(90, 8, seed=3)
    x = torch.randn(90, 32)
    w = torch.randn(8, 24, 32) if trans_w else torch.randn(8, 32, 24)
    dense = torch.full((90, 24), float("nan"))
    assert grouped_gemm(x, w, _offsets(counts), trans_w=trans_w, out=dense) is dense
    strided = torch.full((24, 90), float("nan")).t()  # [90, 24] with column-major strides
    grouped_gemm(x, w, _offsets(counts), trans_w=trans_w, out=strided)
    expected = _loop(x, w, counts, trans_w)
    torch.testing.assert_close(dense, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(strided, expected, atol=1e-4, rtol=1e-4)


def test_out_argument_errors():
    x, w, offsets = torch.randn(8, 16), torch.randn(3, 24, 16), _offsets([3, 0, 5])
    with pytest.raises(ValueError, match=r"out must be torch.float32 \(8, 24\)"):
        grouped_gemm(x, w, offsets, trans_w=True, out=torch.empty(8, 16))
    with pytest.raises(ValueError, match=r"out must be torch\.float32 \(8, 24\) on cpu, got torch\.bfloat16"):
        grouped_gemm(x, w, offsets, trans_w=True, out=torch.empty(8, 24, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="out= does not support autograd"):
        grouped_gemm(x, w.requires_grad_(), offsets, trans_w=True, out=torch.empty(8, 24))
    with torch.no_grad():
        grouped_gemm(x, w, offsets, trans_w=True, out=torch.empty(8, 24))


def test_opcheck_grouped_gemm_ops():
    counts = [3, 0, 5]
    x, w = torch.randn(8, 16, requires_grad=True), torch.randn(3, 24, 16, requires_grad=True)
    torch.library.opcheck(torch.ops.k2.grouped_gemm, (x, w, _offsets(counts), True))
    torch.library.opcheck(torch.ops.k2.grouped_gemm_wgrad, (x.detach(), torch.randn(8, 24), _offsets(counts), True))
    out = torch.empty(8, 24)
    torch.library.opcheck(torch.ops.k2.grouped_gemm_out, (x.detach(), w.detach(), _offsets(counts), True, out))


def _quantized(t: int, k: int, e: int, n: int):
    torch.manual_seed(1)
    x, w = torch.randn(t, k), torch.randn(e, n, k) / k**0.5
    xq, xs = quantize_1x128(x)
    wq, ws = quantize_128x128(w)
    return x, w, xq, xs, wq, ws


@pytest.mark.parametrize(("t", "k", "e", "n"), [(40, 256, 4, 256), (33, 200, 3, 72), (0, 128, 2, 128)], ids=str)
def test_fp8_matches_dequantised_gemm(t, k, e, n):
    x, w, xq, xs, wq, ws = _quantized(t, k, e, n)
    counts = [0] * e  # first and last groups get rows, the ones between stay empty
    counts[0], counts[-1] = t // 2, t - t // 2
    offsets = _offsets(counts)
    out = grouped_gemm_fp8(xq, xs, wq, ws, offsets)
    assert out.dtype == torch.bfloat16 and out.shape == (t, n)
    # Exact semantics: dequantise block by block, then a per-expert loop in fp32, one bf16 rounding.
    x_deq = xq.float() * xs.repeat_interleave(128, dim=1)[:, :k]
    w_deq = wq.float() * ws.repeat_interleave(128, dim=1)[:, :n].repeat_interleave(128, dim=2)[..., :k]
    torch.testing.assert_close(out, _loop(x_deq, w_deq, counts, True).bfloat16(), atol=1e-2, rtol=1e-2)
    # And close to the unquantised product (e4m3 keeps ~3 significant bits per element).
    if t:
        rel = (out.float() - _loop(x, w, counts, True)).norm() / _loop(x, w, counts, True).norm()
        assert rel < 0.06


def test_fp8_opcheck_and_argument_checks():
    _, _, xq, xs, wq, ws = _quantized(16, 128, 2, 128)
    offsets = _offsets([10, 6])
    # test_schema compares fp8 tensors with ops CPU torch lacks for float8; the other checks apply.
    checks = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.k2.grouped_gemm_fp8, (xq, xs, wq, ws, offsets), test_utils=checks)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        grouped_gemm_fp8(xq.float(), xs, wq, ws, offsets)
    with pytest.raises(ValueError, match="w_scale must be float32"):
        grouped_gemm_fp8(xq, xs, wq, ws[:, :, :0], offsets)
    with pytest.raises(ValueError, match="offsets must be int32"):
        grouped_gemm_fp8(xq, xs, wq, ws, offsets.long())


def test_reference_fp8_is_the_dequantised_reference_gemm():
    _, _, xq, xs, wq, ws = _quantized(24, 128, 3, 128)
    offsets = _offsets([8, 8, 8])
    deq_w = torch.stack([reference.dequantize_128x128(wq[i], ws[i], torch.float32) for i in range(3)])
    x_deq = xq.float() * xs.repeat_interleave(128, dim=1)
    want = reference.grouped_gemm(x_deq, deq_w, offsets, trans_w=True).bfloat16()
    torch.testing.assert_close(grouped_gemm_fp8(xq, xs, wq, ws, offsets), want, atol=0, rtol=0)
