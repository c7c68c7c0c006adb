"""FP8 casting ops (k2.ops.quantize_1x128 and friends) on CPU: native kernels vs the PyTorch reference, bit for
bit; the reference vs the DeepSeek-V3 formulas written out per group; the fp32 -> fp8 primitive vs torch's own
casts over millions of bit patterns (every boundary included); custom-op registration (opcheck); errors."""

from __future__ import annotations

import os

import pytest
import torch

import k2.ops
from k2.ops import _native, reference

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
FLOATS = (torch.float32, torch.bfloat16, torch.float16)
NATIVE = _native.has_kernel("quant", torch.device("cpu"))
needs_native = pytest.mark.skipif(not NATIVE, reason="k2._C has no quant CPU kernels")


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def assert_same_fp8(q: torch.Tensor, q_ref: torch.Tensor) -> None:
    assert q.dtype == q_ref.dtype and q.shape == q_ref.shape
    diff = (bits(q) != bits(q_ref)).nonzero()
    assert diff.numel() == 0, f"{diff.shape[0]} fp8 codes differ, first at {diff[0].tolist()}"


def assert_same_scale(s: torch.Tensor, s_ref: torch.Tensor) -> None:
    # Bit-exact except NaN payloads (both are NaN where the group held a NaN).
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0, equal_nan=True)


def adversarial(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Normal values over many magnitudes plus zeros, -0, subnormals of the input dtype, tiny groups, huge values,
    NaN and inf in some groups."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-20, 12, shape, generator=g).float())
    flat = x.view(-1)
    n = flat.numel()
    if n:
        idx = lambda k: torch.randint(0, n, (k,), generator=g)  # noqa: E731
        flat[idx(max(1, n // 50))] = 0.0
        flat[idx(max(1, n // 100))] = -0.0
        flat[idx(max(1, n // 100))] = torch.finfo(dtype).tiny / 4  # subnormal in the input dtype
        if n > 1000:
            flat[idx(2)] = float("nan")
            flat[idx(2)] = float("inf")
            flat[idx(1)] = float("-inf")
            flat[idx(3)] = torch.finfo(dtype).max / 2
    x = x.to(dtype)
    if x.dim() >= 2 and x.shape[-2] > 2 and x.shape[-1]:
        x[..., 1, :] = x[..., 1, :] * 1e-7  # a whole row of tiny values: amax below the 1e-4 clamp
        x[..., 2, :] = 0
    return x


SHAPES_1x128 = [(0, 128), (4, 0), (1, 128), (7,), (3, 130), (5, 1), (2, 3, 300), (17, 1000), (64, 512)]


@pytest.fixture
def reference_only(monkeypatch):
    monkeypatch.setenv("K2_OPS", "reference")


def run_reference(fn, *args, **kwargs):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("K2_OPS", "reference")
        return fn(*args, **kwargs)


# ---- the fp32 -> fp8 primitive vs torch's cast -------------------------------------------------------------


def _cast_native(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=dtype)
    _native.native().cast_to_fp8(_native.view(x), _native.view(out), 0)
    return out


def _dense_bit_patterns() -> torch.Tensor:
    """Every fp32 with the top 20 bits enumerated (all signs, exponents and the top 11 mantissa bits) times low
    12-bit patterns at the rounding boundaries, plus every midpoint between adjacent fp8 values +- 1 ulp."""
    top = torch.arange(1 << 20, dtype=torch.int64) << 12
    lows = torch.tensor([0, 1, 0x7FF, 0x800, 0x801, 0xFFF, 0x123, 0xABC], dtype=torch.int64)
    patterns = (top[:, None] | lows[None, :]).view(-1)
    mids = []
    for dtype in FP8:
        codes = torch.arange(256, dtype=torch.uint8).view(dtype).float()
        finite = codes[torch.isfinite(codes)].unique()
        mid = ((finite[1:].double() + finite[:-1].double()) / 2).float()
        mid_bits = mid.view(torch.int32).to(torch.int64)
        mids += [mid_bits + d for d in (-1, 0, 1)]
    patterns = torch.cat([patterns, *mids, *(m | (1 << 31) for m in mids)])
    return _as_float(patterns)


def _as_float(patterns: torch.Tensor) -> torch.Tensor:
    """fp32 values with the given bit patterns (int64 in [0, 2^32))."""
    return ((patterns + (1 << 31)) % (1 << 32) - (1 << 31)).to(torch.int32).view(torch.float32)


@needs_native
@pytest.mark.parametrize("dtype", FP8)
def test_cast_matches_torch_on_dense_grid(dtype):
    x = _dense_bit_patterns()
    assert x.numel() > 8_000_000
    assert_same_fp8(_cast_native(x, dtype), x.to(dtype))


@needs_native
@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("K2_EXHAUSTIVE") != "1", reason="K2_EXHAUSTIVE=1 casts all 2^32 fp32 (~3 min each)")
@pytest.mark.parametrize("dtype", FP8)
def test_cast_matches_torch_on_every_fp32(dtype):
    chunk = 1 << 24
    for start in range(0, 1 << 32, chunk):
        x = _as_float(torch.arange(start, start + chunk, dtype=torch.int64))
        assert_same_fp8(_cast_native(x, dtype), x.to(dtype))


# ---- the reference vs the formulas written out -------------------------------------------------------------


@pytest.mark.parametrize("dtype", FP8)
def test_reference_1x128_is_act_quant_per_group(dtype):
    x = adversarial((3, 300), torch.bfloat16, seed=0)
    q, scale = reference.quantize_1x128(x, dtype, False)
    fp8_max = torch.finfo(dtype).max
    for r in range(3):
        for g in range(3):
            group = x[r, g * 128 : (g + 1) * 128].float()
            s = torch.clamp(group.abs().max(), min=1e-4) / torch.tensor(fp8_max)
            assert_same_scale(scale[r, g], s)
            assert_same_fp8(q[r, g * 128 : (g + 1) * 128], (group / s).to(dtype))


def test_reference_128x128_is_per_tile_and_dequantize_inverts_it():
    w = torch.randn(300, 200)
    q, scale_inv = reference.quantize_128x128(w, torch.float8_e4m3fn)
    assert scale_inv.shape == (3, 2)
    for a in range(3):
        for b in range(2):
            tile = w[a * 128 : (a + 1) * 128, b * 128 : (b + 1) * 128]
            s = torch.clamp(tile.abs().max(), min=1e-4) / torch.tensor(448.0)
            assert_same_scale(scale_inv[a, b], s)
            assert_same_fp8(q[a * 128 : (a + 1) * 128, b * 128 : (b + 1) * 128], (tile / s).to(torch.float8_e4m3fn))
    w_back = reference.dequantize_128x128(q, scale_inv, torch.float32)
    torch.testing.assert_close(w_back, w, rtol=2**-4, atol=1e-3)  # e4m3 keeps 3 mantissa bits


def test_pow2_scale_rounds_up_exactly():
    # 2^k * (1 + 2^-23) must round up to 2^(k+1); exp2(ceil(log2(s))) in fp32 gets this wrong.
    amax = torch.tensor([448.0 * 2**-10 * (1 + 2**-23), 448.0 * 2**-10, 448.0 * 3, 0.0, float("inf"), float("nan")])
    s = reference._fp8_scale(amax, torch.float8_e4m3fn, True)
    assert s[:3].tolist() == [2.0**-9, 2.0**-10, 4.0]
    assert s[3].item() == 2.0**-22  # 1e-4 / 448 = 2.23e-7 -> 2^-22
    assert s[4].item() == float("inf") and s[5].isnan()


# ---- native vs reference -------------------------------------------------------------------------------------


@needs_native
@pytest.mark.parametrize("in_dtype", FLOATS)
@pytest.mark.parametrize("dtype", FP8)
@pytest.mark.parametrize("pow2", [False, True])
def test_quantize_1x128_bit_exact(in_dtype, dtype, pow2):
    for i, shape in enumerate(SHAPES_1x128):
        x = adversarial(shape, in_dtype, seed=i)
        q, scale = k2.ops.quantize_1x128(x, dtype=dtype, pow2_scale=pow2)
        q_ref, s_ref = run_reference(k2.ops.quantize_1x128, x, dtype=dtype, pow2_scale=pow2)
        assert scale.shape == (*shape[:-1], -(-shape[-1] // 128))
        assert_same_fp8(q, q_ref)
        assert_same_scale(scale, s_ref)


@needs_native
@pytest.mark.parametrize("in_dtype", FLOATS)
@pytest.mark.parametrize("dtype", FP8)
def test_quantize_1x128_transposed_is_quantize_of_the_transpose(in_dtype, dtype):
    for i, shape in enumerate([(0, 5), (5, 0), (1, 1), (130, 3), (200, 70), (2, 300, 129), (3, 1, 128, 64)]):
        x = adversarial(shape, in_dtype, seed=10 + i)
        q, scale = k2.ops.quantize_1x128_transposed(x, dtype=dtype, pow2_scale=i % 2 == 1)
        q_ref, s_ref = k2.ops.quantize_1x128(x.mT.contiguous(), dtype=dtype, pow2_scale=i % 2 == 1)
        assert_same_fp8(q, q_ref)
        assert_same_scale(scale, s_ref)
        q_r, s_r = run_reference(k2.ops.quantize_1x128_transposed, x, dtype=dtype, pow2_scale=i % 2 == 1)
        assert_same_fp8(q, q_r)
        assert_same_scale(scale, s_r)


@needs_native
@pytest.mark.parametrize("in_dtype", FLOATS)
@pytest.mark.parametrize("dtype", FP8)
def test_quantize_dequantize_128x128_bit_exact(in_dtype, dtype):
    for i, shape in enumerate([(0, 128), (128, 0), (1, 1), (128, 128), (300, 200), (2, 129, 257), (4, 256, 384)]):
        w = adversarial(shape, in_dtype, seed=20 + i)
        q, scale_inv = k2.ops.quantize_128x128(w, dtype=dtype)
        q_ref, s_ref = run_reference(k2.ops.quantize_128x128, w, dtype=dtype)
        assert scale_inv.shape == (*shape[:-2], -(-shape[-2] // 128), -(-shape[-1] // 128))
        assert_same_fp8(q, q_ref)
        assert_same_scale(scale_inv, s_ref)
        for out_dtype in FLOATS:
            out = k2.ops.dequantize_128x128(q, scale_inv, out_dtype)
            out_ref = run_reference(k2.ops.dequantize_128x128, q, scale_inv, out_dtype)
            assert out.dtype == out_dtype
            # Bit-exact; NaN encodings of 16-bit outputs are not part of the contract (NaN must stay NaN).
            torch.testing.assert_close(out, out_ref, rtol=0, atol=0, equal_nan=True)


@needs_native
def test_dequantize_random_codes_and_scales():
    g = torch.Generator().manual_seed(5)
    for dtype in FP8:
        q = torch.randint(0, 256, (3, 200, 300), dtype=torch.uint8, generator=g).view(dtype)
        s = torch.rand(3, 2, 3, generator=g) * 10
        for out_dtype in FLOATS:
            out = k2.ops.dequantize_128x128(q, s, out_dtype)
            torch.testing.assert_close(
                out, reference.dequantize_128x128(q, s, out_dtype), rtol=0, atol=0, equal_nan=True
            )


@needs_native
def test_round_trip_error_is_within_fp8_precision():
    x = torch.randn(64, 1024, dtype=torch.bfloat16)
    q, s = k2.ops.quantize_1x128(x)
    x_back = q.float() * s.repeat_interleave(128, -1)
    torch.testing.assert_close(x_back, x.float(), rtol=2**-4, atol=s.max().item() * 2**-9)
    w = torch.randn(384, 256)
    q, s = k2.ops.quantize_128x128(w, dtype=torch.float8_e5m2)
    torch.testing.assert_close(
        k2.ops.dequantize_128x128(q, s, torch.float32), w, rtol=2**-3, atol=s.max().item() * 2**-16
    )


# ---- layouts -------------------------------------------------------------------------------------------------


@needs_native
def test_strided_views_are_read_in_place_and_match():
    base = adversarial((6, 40, 400), torch.bfloat16, seed=30)
    views = {
        "row slice": base[:, :, :300],  # rows not contiguous with each other
        "every other row": base[:, ::2, :],
        "permuted leading dims": base.permute(1, 0, 2),
        "sliced batch": base[1:5, 3:30, 100:356],
    }
    for name, x in views.items():
        assert not x.is_contiguous() and x.stride(-1) == 1, name
        q, s = k2.ops.quantize_1x128(x)
        q_ref, s_ref = k2.ops.quantize_1x128(x.contiguous())
        assert_same_fp8(q, q_ref)
        assert_same_scale(s, s_ref)
        for op in (k2.ops.quantize_1x128_transposed, k2.ops.quantize_128x128):
            q, s = op(x)
            q_ref, s_ref = op(x.contiguous())
            assert_same_fp8(q, q_ref)
            assert_same_scale(s, s_ref)


@needs_native
def test_last_dim_strided_input_is_copied_and_matches():
    x = adversarial((300, 256), torch.float32, seed=31).mT  # [256, 300], last-dim stride 256
    assert x.stride(-1) != 1
    for op in (k2.ops.quantize_1x128, k2.ops.quantize_1x128_transposed, k2.ops.quantize_128x128):
        q, s = op(x)
        q_ref, s_ref = run_reference(op, x.contiguous())
        assert_same_fp8(q, q_ref)
        assert_same_scale(s, s_ref)
    q, s = k2.ops.quantize_128x128(x)
    out = k2.ops.dequantize_128x128(q.mT, s.mT.contiguous(), torch.float32)  # strided q
    torch.testing.assert_close(
        out,
        run_reference(k2.ops.dequantize_128x128, q.mT.contiguous(), s.mT.contiguous(), torch.float32),
        rtol=0,
        atol=0,
        equal_nan=True,
    )


# ---- custom ops ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("native", [True, False])
def test_opcheck(native, monkeypatch):
    if not native:
        monkeypatch.setenv("K2_OPS", "reference")
    elif not NATIVE:
        pytest.skip("no native quant kernels")
    x = torch.randn(3, 2, 300, dtype=torch.bfloat16)
    ops = torch.ops.k2
    torch.library.opcheck(ops.quantize_1x128, (x, torch.float8_e4m3fn, False))
    torch.library.opcheck(ops.quantize_1x128, (x, torch.float8_e5m2, True))
    torch.library.opcheck(ops.quantize_1x128_transposed, (x, torch.float8_e4m3fn, True))
    torch.library.opcheck(ops.quantize_128x128, (x, torch.float8_e4m3fn))
    q, s = k2.ops.quantize_128x128(x)
    # torch's schema check compares inputs before/after with allclose, which has no float8 kernel on CPU: run the
    # other checks, and check the schema's promise (no input mutated, output not aliased) directly.
    utils = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(ops.dequantize_128x128, (q, s, torch.bfloat16), test_utils=utils)
    q_before, s_before = bits(q).clone(), s.clone()
    out = ops.dequantize_128x128(q, s, torch.bfloat16)
    assert torch.equal(bits(q), q_before) and torch.equal(s, s_before)
    assert out.untyped_storage().data_ptr() not in (q.untyped_storage().data_ptr(), s.untyped_storage().data_ptr())


def test_compiles_with_fake_tensors():
    def f(x):
        q, s = k2.ops.quantize_1x128(x)
        return q.float() * s.repeat_interleave(128, -1)[..., : x.shape[-1]]

    x = torch.randn(4, 256)
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="eager")(x), f(x))


# ---- errors --------------------------------------------------------------------------------------------------


def test_bad_input_names_op_argument_and_expectation():
    x = torch.randn(4, 256)
    with pytest.raises(ValueError, match=r"k2\.ops\.quantize_1x128: argument 'x': expected dtype .*got torch\.int32"):
        k2.ops.quantize_1x128(x.int())
    with pytest.raises(ValueError, match=r"k2\.ops\.quantize_1x128: argument 'dtype': expected torch\.float8_e4m3fn"):
        k2.ops.quantize_1x128(x, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"k2\.ops\.quantize_1x128: argument 'x': expected at least 1 dims"):
        k2.ops.quantize_1x128(torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"k2\.ops\.quantize_1x128_transposed: argument 'x': expected at least 2"):
        k2.ops.quantize_1x128_transposed(torch.randn(256))
    with pytest.raises(ValueError, match=r"k2\.ops\.quantize_128x128: argument 'w'"):
        k2.ops.quantize_128x128(torch.randn(256))
    q, s = k2.ops.quantize_128x128(torch.randn(256, 300))
    with pytest.raises(ValueError, match=r"k2\.ops\.dequantize_128x128: argument 'scale_inv': expected shape \(2, 3\)"):
        k2.ops.dequantize_128x128(q, s[:, :2])
    with pytest.raises(ValueError, match=r"argument 'scale_inv': expected dtype float32"):
        k2.ops.dequantize_128x128(q, s.double())
    with pytest.raises(ValueError, match=r"argument 'q': expected dtype float8_e4m3fn, float8_e5m2"):
        k2.ops.dequantize_128x128(q.float(), s)
    with pytest.raises(ValueError, match=r"argument 'out_dtype'"):
        k2.ops.dequantize_128x128(q, s, torch.int8)
