"""k2.ops.mla_decode (C++ CPU kernel where built) against k2.ops.reference.mla_decode, and the reference against
explicit attention over the expanded keys and values.

Covers ragged lengths with 0, 1 and T_max, H = 1, Kimi-K2's r = 512 / dr = 64 and small dims, a cache that is a strided
slice of a [L, N, T_max, r + dr] buffer (LatentCache's layout), long sequences that the kernel splits over threads and
merges by lse (T = 5000 at 1, 2 and 4 threads), bf16 with stated tolerances, every instruction-set variant, fp16/fp64
through the reference, the absorbed == expanded identity (DeepSeek-V2 §2.1: W_uk folded into the query, W_uv into the
output, compared with scaled_dot_product_attention over the explicit per-head keys), opcheck, and one-line argument
errors.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import k2.ops
from k2.ops import _native, mla_decode, reference

NATIVE = _native.has_kernel("attention_decode", torch.device("cpu"))

# lengths, T_max, H, r, dr
CASES = {
    "ragged-0-1-Tmax": ([0, 1, 37, 70, 70], 70, 5, 32, 16),
    "H1": ([3, 33, 1], 40, 1, 24, 8),
    "one-sequence": ([129], 129, 4, 32, 16),
    "no-rope-dims": ([29, 7], 29, 3, 20, 0),
    "K2-dims": ([1, 300, 129, 0], 300, 8, 512, 64),
    "long": ([5000, 1, 2600], 5000, 2, 32, 16),
}


def make_inputs(
    case: str | tuple, dtype: torch.dtype, device: str | torch.device = "cpu", seed: int = 0, layers: int = 3
):
    """(q_latent, cache, lengths, scale, r) for a CASES name or tuple. The cache is a strided view like one layer of
    LatentCache.kv [L, N, T_max, D] taken at every other slot, in a buffer whose rows are 8 elements wider than D (batch
    stride 2·T_max·(D + 8), row stride D + 8); rows past each length hold large values the kernel must not read."""
    lengths, t_max, heads, r, dr = CASES[case] if isinstance(case, str) else case
    batch, dim = len(lengths), r + dr
    gen = torch.Generator().manual_seed(seed)
    buffer = torch.randn(layers, 2 * batch + 1, t_max, dim + 8, generator=gen)
    for b, n in enumerate(lengths):
        buffer[1, 1 + 2 * b, n:] = 1e4  # never visible
    q = torch.randn(batch, heads, dim, generator=gen)
    cache = buffer.to(device=device, dtype=dtype)[1, 1::2, :, :dim]  # [B, T_max, D]
    return (
        q.to(device=device, dtype=dtype),
        cache,
        torch.tensor(lengths, dtype=torch.int32, device=device),
        dim**-0.5,
        r,
    )


# fp32: the same math in fp32 in another summation order. bf16: o is one bf16 rounding of fp32 values computed from the
# same bf16 inputs (2 bf16 ulps allowed); lse stays fp32.
TOLERANCES = {
    torch.float32: ({"atol": 1e-5, "rtol": 1e-5}, {"atol": 1e-5, "rtol": 1e-5}),
    torch.bfloat16: ({"atol": 1.6e-2, "rtol": 1.6e-2}, {"atol": 1e-5, "rtol": 1e-5}),
}


def check_against_reference(q, cache, lengths, scale, r):
    o, lse = mla_decode(q, cache, lengths, softmax_scale=scale, kv_lora_rank=r)
    o_ref, lse_ref = reference.mla_decode(q, cache, lengths, scale, r)
    tol_o, tol_lse = TOLERANCES[q.dtype]
    assert o.shape == (q.shape[0], q.shape[1], r) and o.dtype == q.dtype and lse.dtype == torch.float32
    torch.testing.assert_close(o, o_ref, **tol_o)
    torch.testing.assert_close(lse, lse_ref, **tol_lse)
    empty = lengths == 0
    assert bool((o[empty] == 0).all()) and bool(torch.isneginf(lse[empty]).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, dtype):
    q, cache, lengths, scale, r = make_inputs(case, dtype)
    assert not cache.is_contiguous()
    check_against_reference(q, cache, lengths, scale, r)


@pytest.fixture
def threads():
    """Sets k2's CPU thread count for one test, restoring it afterwards."""
    native = _native.native()
    saved = native.num_threads() if native else None
    yield (lambda n: native.set_num_threads(n)) if native else (lambda n: None)
    if native:
        native.set_num_threads(saved)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_thread_counts_split_long_sequences(n, threads):
    """T = 5000 gets ceil(T / max(256, T / threads)) key splits, merged by lse; every thread count agrees."""
    threads(n)
    for dtype in (torch.float32, torch.bfloat16):
        check_against_reference(*make_inputs("long", dtype, seed=n))


def test_query_and_output_strides():
    """A q_latent that is a strided view (heads interleaved with another tensor) is read in place."""
    q, cache, lengths, scale, r = make_inputs("ragged-0-1-Tmax", torch.float32)
    wide = torch.randn(q.shape[0], q.shape[1], 2, q.shape[2])
    wide[:, :, 1] = q
    check_against_reference(wide[:, :, 1], cache, lengths, scale, r)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=["fp16", "fp64"])
def test_other_dtypes_run_the_reference(dtype):
    q, cache, lengths, scale, r = make_inputs("ragged-0-1-Tmax", dtype)
    o, lse = mla_decode(q, cache, lengths, softmax_scale=scale, kv_lora_rank=r)
    o_ref, lse_ref = reference.mla_decode(q, cache, lengths, scale, r)
    assert o.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(o, o_ref, rtol=0, atol=0)
    torch.testing.assert_close(lse, lse_ref, rtol=0, atol=0)


def expanded_attention(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, lengths, scale):
    """MLA decode without absorption: per-head keys [W_uk c_kv | k_rope] and values W_uv c_kv, attended by SDPA."""
    outs = []
    for b, n in enumerate(lengths.tolist()):
        k_nope = torch.einsum("hdr,tr->htd", w_uk, c_kv[b, :n])  # [H, n, dn]
        k = torch.cat((k_nope, k_rope[b, :n][None].expand(w_uk.shape[0], -1, -1)), dim=-1)  # [H, n, dn + dr]
        v = torch.einsum("hvr,tr->htv", w_uv, c_kv[b, :n])  # [H, n, dv]
        q = torch.cat((q_nope[b], q_rope[b]), dim=-1)[:, None]  # [H, 1, dn + dr]
        outs.append(F.scaled_dot_product_attention(q, k, v, scale=scale)[:, 0])  # [H, dv]
    return torch.stack(outs)


@pytest.mark.parametrize("dims", [(4, 16, 8, 32, 12), (2, 128, 64, 512, 128)], ids=["small", "K2"])
def test_absorbed_equals_expanded_attention(dims):
    """DeepSeek-V2 §2.1: with q_latent = [q_nope W_uk | q_rope] and o = o_latent W_uvᵀ, decode over the latent cache
    is exactly softmax attention over the expanded keys [W_uk c_kv | k_rope] and values W_uv c_kv."""
    heads, dn, dr, r, dv = dims
    gen = torch.Generator().manual_seed(7)
    lengths = torch.tensor([1, 57, 300], dtype=torch.int32)
    batch, t_max = 3, 300
    c_kv = torch.randn(batch, t_max, r, generator=gen)
    k_rope = torch.randn(batch, t_max, dr, generator=gen)
    w_uk = torch.randn(heads, dn, r, generator=gen) / r**0.5  # kv_b_proj's key half, [H, dn, r]
    w_uv = torch.randn(heads, dv, r, generator=gen) / r**0.5  # and its value half, [H, dv, r]
    q_nope = torch.randn(batch, heads, dn, generator=gen)
    q_rope = torch.randn(batch, heads, dr, generator=gen)
    scale = (dn + dr) ** -0.5

    cache = torch.cat((c_kv, k_rope), dim=-1)  # [B, T_max, r + dr]
    q_latent = torch.cat((torch.einsum("bhd,hdr->bhr", q_nope, w_uk), q_rope), dim=-1)  # [B, H, r + dr]
    o_latent, _ = mla_decode(q_latent, cache, lengths, softmax_scale=scale, kv_lora_rank=r)
    o = torch.einsum("bhr,hvr->bhv", o_latent, w_uv)  # [B, H, dv]

    want = expanded_attention(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, lengths, scale)
    torch.testing.assert_close(o, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_opcheck(dtype):
    q, cache, lengths, scale, r = make_inputs("ragged-0-1-Tmax", dtype)
    torch.library.opcheck(torch.ops.k2.mla_decode, (q, cache, lengths, scale, r))
    q, cache, lengths, scale, r = make_inputs("H1", dtype)
    torch.library.opcheck(torch.ops.k2.mla_decode, (q, cache.contiguous(), lengths, scale, r))


def test_forced_reference(monkeypatch):
    monkeypatch.setenv("K2_OPS", "reference")
    q, cache, lengths, scale, r = make_inputs("ragged-0-1-Tmax", torch.float32)
    o, lse = mla_decode(q, cache, lengths, softmax_scale=scale, kv_lora_rank=r)
    o_ref, lse_ref = reference.mla_decode(q, cache, lengths, scale, r)
    torch.testing.assert_close(o, o_ref, rtol=0, atol=0)
    torch.testing.assert_close(lse, lse_ref, rtol=0, atol=0)


def test_bad_arguments_name_the_argument():
    q, cache, lengths, scale, r = make_inputs("ragged-0-1-Tmax", torch.float32)
    bad = [
        ({"q_latent": q[0]}, "argument 'q_latent'.*3-D"),
        ({"q_latent": q[:, :0]}, "argument 'q_latent'.*H >= 1"),
        ({"cache": cache[:, :, :-1]}, "argument 'cache'.*r \\+ dr"),
        ({"cache": cache[:2]}, "argument 'cache'"),
        ({"cache": cache.double()}, "argument 'cache'.*dtype"),
        ({"lengths": lengths.long()}, "argument 'lengths'.*int32"),
        ({"lengths": lengths[:2]}, "argument 'lengths'"),
        ({"lengths": torch.tensor([0, 1, 2, 71, 3], dtype=torch.int32)}, "argument 'lengths'.*lengths\\[3\\] = 71"),
        ({"lengths": torch.tensor([0, -1, 2, 7, 3], dtype=torch.int32)}, "argument 'lengths'"),
        ({"kv_lora_rank": 0}, "argument 'kv_lora_rank'"),
        ({"kv_lora_rank": q.shape[2] + 1}, "argument 'kv_lora_rank'"),
        ({"kv_lora_rank": 32.0}, "argument 'kv_lora_rank'"),
        ({"softmax_scale": float("inf")}, "argument 'softmax_scale'"),
    ]
    for change, pattern in bad:
        args = {"q_latent": q, "cache": cache, "lengths": lengths, "softmax_scale": scale, "kv_lora_rank": r, **change}
        with pytest.raises(ValueError, match=f"^k2.ops.mla_decode: {pattern}") as info:
            mla_decode(args.pop("q_latent"), args.pop("cache"), args.pop("lengths"), **args)
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["kernel", "reference"])
def test_lengths_past_the_cache_are_refused(dtype):
    """Checked on CPU by the kernel and, for the dtypes that run the reference, before it (which would clamp them)."""
    q, cache, _, scale, r = make_inputs("ragged-0-1-Tmax", dtype)
    with pytest.raises(ValueError, match=r"^k2\.ops\.mla_decode: argument 'lengths'.* got lengths\[2\] = 71$"):
        mla_decode(q, cache, torch.tensor([0, 1, 71, 3, 3], dtype=torch.int32), softmax_scale=scale, kv_lora_rank=r)


@pytest.mark.skipif(not NATIVE, reason="k2._C has no attention_decode CPU kernel")
def test_kernel_checks_lengths_itself():
    """The custom op, called directly (as a compiled graph would), still refuses lengths past T_max on CPU."""
    q, cache, lengths, scale, r = make_inputs("ragged-0-1-Tmax", torch.float32)
    with pytest.raises(ValueError, match=r"^k2\.ops\.mla_decode: argument 'lengths'"):
        torch.ops.k2.mla_decode(q, cache, lengths + 1, scale, r)


@pytest.mark.skipif(not NATIVE, reason="k2._C has no attention_decode CPU kernel")
def test_available_reports_cpu_kernel():
    assert "cpu" in k2.ops.available()["attention_decode"]


@pytest.mark.skipif(not NATIVE, reason="k2._C has no attention_decode CPU kernel")
@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_every_instruction_set_variant(isa, monkeypatch, threads):
    """K2_ATTENTION_ISA caps the kernel's instruction set (read at each call): the AVX2 and baseline builds agree with
    the reference on a machine that would pick AVX-512."""
    monkeypatch.setenv("K2_ATTENTION_ISA", isa)
    threads(2)
    for case in ("ragged-0-1-Tmax", "K2-dims", "long"):
        for dtype in (torch.float32, torch.bfloat16):
            check_against_reference(*make_inputs(case, dtype, seed=3))
