"""CUDA kernels of the FP8 casting family vs the PyTorch reference run on the same GPU, bit for bit (fp8 codes
exactly, fp32 scales exactly up to NaN payloads); the fp32 -> fp8 primitive vs torch's CUDA cast on millions of
bit patterns; strided inputs; the caller's stream. Skips without a GPU or a CUDA build (conftest)."""

from __future__ import annotations

import pytest
import torch

import k2.ops
from k2.ops import _native

pytestmark = pytest.mark.gpu

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def reference(fn, *args, **kwargs):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("K2_OPS", "reference")
        return fn(*args, **kwargs)


def same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype
    if a.dtype in FP8:
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), (a.view(torch.uint8) != b.view(torch.uint8)).sum()
    else:
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def adversarial(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-20, 12, shape, generator=g).float())
    flat = x.view(-1)
    if flat.numel() > 1000:
        idx = torch.randint(0, flat.numel(), (8,), generator=g)
        flat[idx[:2]] = float("nan")
        flat[idx[2:4]] = float("inf")
        flat[idx[4]] = float("-inf")
        flat[idx[5:]] = 0.0
    return x.to(dtype).cuda()


def test_cast_matches_torch_cuda_cast_on_dense_grid():
    top = torch.arange(1 << 20, dtype=torch.int64) << 12
    lows = torch.tensor([0, 1, 0x7FF, 0x800, 0x801, 0xFFF, 0x123, 0xABC], dtype=torch.int64)
    patterns = (top[:, None] | lows[None, :]).view(-1)
    x = ((patterns + (1 << 31)) % (1 << 32) - (1 << 31)).to(torch.int32).view(torch.float32).cuda()
    for dtype in FP8:
        out = torch.empty(x.shape, dtype=dtype, device="cuda")
        _native.native().cast_to_fp8(_native.view(x), _native.view(out), _native.stream(x.device))
        same(out, x.to(dtype))


@pytest.mark.parametrize("in_dtype", FLOATS)
@pytest.mark.parametrize("dtype", FP8)
@pytest.mark.parametrize("pow2", [False, True])
def test_quantize_1x128(in_dtype, dtype, pow2):
    for i, shape in enumerate([(0, 128), (1, 128), (7,), (3, 130), (5, 1), (2, 3, 300), (257, 1000), (64, 7168)]):
        x = adversarial(shape, in_dtype, i)
        q, s = k2.ops.quantize_1x128(x, dtype=dtype, pow2_scale=pow2)
        q_ref, s_ref = reference(k2.ops.quantize_1x128, x, dtype=dtype, pow2_scale=pow2)
        same(q, q_ref)
        same(s, s_ref)


@pytest.mark.parametrize("in_dtype", FLOATS)
@pytest.mark.parametrize("dtype", FP8)
def test_quantize_1x128_transposed(in_dtype, dtype):
    for i, shape in enumerate([(1, 1), (130, 3), (200, 70), (2, 300, 129), (512, 1024), (3, 1, 128, 64)]):
        x = adversarial(shape, in_dtype, 10 + i)
        q, s = k2.ops.quantize_1x128_transposed(x, dtype=dtype, pow2_scale=i % 2 == 1)
        q_ref, s_ref = reference(k2.ops.quantize_1x128, x.mT.contiguous(), dtype=dtype, pow2_scale=i % 2 == 1)
        same(q, q_ref)
        same(s, s_ref)


@pytest.mark.parametrize("in_dtype", FLOATS)
@pytest.mark.parametrize("dtype", FP8)
def test_quantize_dequantize_128x128(in_dtype, dtype):
    for i, shape in enumerate([(1, 1), (128, 128), (300, 200), (2, 129, 257), (1024, 2048)]):
        w = adversarial(shape, in_dtype, 20 + i)
        q, s = k2.ops.quantize_128x128(w, dtype=dtype)
        q_ref, s_ref = reference(k2.ops.quantize_128x128, w, dtype=dtype)
        same(q, q_ref)
        same(s, s_ref)
        for out_dtype in FLOATS:
            same(k2.ops.dequantize_128x128(q, s, out_dtype), reference(k2.ops.dequantize_128x128, q, s, out_dtype))


def test_strided_inputs_and_cpu_agreement():
    base = adversarial((6, 40, 400), torch.bfloat16, 30)
    for x in (base[:, :, :300], base[:, ::2, :], base.permute(1, 0, 2), base[1:5, 3:30, 101:357]):
        for op in (k2.ops.quantize_1x128, k2.ops.quantize_1x128_transposed, k2.ops.quantize_128x128):
            q, s = op(x)
            q_ref, s_ref = op(x.contiguous())
            same(q, q_ref)
            same(s, s_ref)
    x = torch.randn(64, 1000, dtype=torch.bfloat16)  # finite values: CPU and GPU kernels agree exactly
    q_gpu, s_gpu = k2.ops.quantize_1x128(x.cuda())
    q_cpu, s_cpu = k2.ops.quantize_1x128(x)
    same(q_gpu.cpu(), q_cpu)
    same(s_gpu.cpu(), s_cpu)


def test_runs_on_the_callers_stream():
    x = torch.randn(4096, 7168, dtype=torch.bfloat16, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        q, s = k2.ops.quantize_1x128(x)
    torch.cuda.current_stream().wait_stream(stream)
    q_ref, s_ref = reference(k2.ops.quantize_1x128, x)
    same(q, q_ref)
    same(s, s_ref)


def test_opcheck_cuda():
    x = torch.randn(3, 2, 300, dtype=torch.bfloat16, device="cuda")
    torch.library.opcheck(torch.ops.k2.quantize_1x128, (x, torch.float8_e4m3fn, False))
    torch.library.opcheck(torch.ops.k2.quantize_1x128_transposed, (x, torch.float8_e5m2, True))
    torch.library.opcheck(torch.ops.k2.quantize_128x128, (x, torch.float8_e4m3fn))


def test_past_2_31_elements():
    """x [299595, 7168] bf16 has more than 2^31 elements: index arithmetic in int32 would wrap on the last rows
    (quantize_1x128, dequantize_128x128), the last columns (quantize_1x128_transposed: q [7168, 299595]) and the
    last tile rows (quantize_128x128). Checked against the reference on the slices the overflow would hit."""
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    if total < 32 * 2**30:
        pytest.skip("needs a GPU with 32 GiB")
    m, k = 2**31 // 7168 + 2, 7168
    assert m * k > 2**31
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    head, tail = slice(0, 3), slice(m - 300, m)  # tail: the rows past element 2^31 and the partial last tile

    q, s = k2.ops.quantize_1x128(x)
    for rows in (head, tail):
        q_ref, s_ref = reference(k2.ops.quantize_1x128, x[rows])
        same(q[rows], q_ref)
        same(s[rows], s_ref)
    del q, s

    q, s = k2.ops.quantize_1x128_transposed(x)  # [k, m]: the last of x's columns become q's last rows
    assert q.shape == (k, m)
    for cols in (slice(0, 2), slice(k - 2, k)):
        q_ref, s_ref = reference(k2.ops.quantize_1x128, x[:, cols].mT.contiguous())
        same(q[cols], q_ref)
        same(s[cols], s_ref)
    del q, s

    q, s = k2.ops.quantize_128x128(x)
    first_tile = (m - 300) // 128 * 128  # tile-aligned, so the reference sees the same tiles
    q_ref, s_ref = reference(k2.ops.quantize_128x128, x[first_tile:])
    same(q[first_tile:], q_ref)
    same(s[first_tile // 128 :], s_ref)
    out = k2.ops.dequantize_128x128(q, s, torch.bfloat16)
    same(out[first_tile:], reference(k2.ops.dequantize_128x128, q[first_tile:], s[first_tile // 128 :], torch.bfloat16))
    same(out[head], reference(k2.ops.dequantize_128x128, q[:128], s[:1], torch.bfloat16)[head])
