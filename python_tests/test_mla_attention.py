"""k2.ops.mla_attention (C++ CPU kernel where built) against k2.ops.reference.mla_attention and its autograd.

Covers causal and not, packed documents through cu_seqlens (length-1 and empty ones, lengths that are not a multiple
of the kernel's 64-row tile), dqk != dv (K2's 192/128 and small dims), H = 1, bf16 with stated tolerances, strided
inputs, thread counts that change the backward's split, the reference backward (FlashAttention-2's recompute from
lse) against autograd, fp64 gradcheck, opcheck on both custom ops, and one-line argument errors.
"""

from __future__ import annotations

import pytest
import torch

import k2.ops
from k2.ops import _native, mla_attention, reference

NATIVE = _native.has_kernel("attention", torch.device("cpu"))

# (document lengths or None for one document, T when None, H, dqk, dv)
CASES = {
    "one-token": (None, 1, 2, 16, 8),
    "T70-H1": (None, 70, 1, 24, 16),
    "docs-with-empty-and-length-1": ([0, 1, 1, 65, 100, 100, 170], 170, 3, 20, 12),
    "T130-dqk=dv": (None, 130, 2, 32, 32),
    "K2-dims": ([0, 97, 200], 200, 2, 192, 128),
    "many-short-docs": ([0, 3, 4, 9, 9, 40, 41, 64, 129], 129, 4, 48, 32),
}


def _inputs(case: str, dtype: torch.dtype, seed: int = 0):
    cuts, tokens, heads, dqk, dv = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(tokens, heads, dqk, generator=gen).to(dtype)
    k = torch.randn(tokens, heads, dqk, generator=gen).to(dtype)
    v = torch.randn(tokens, heads, dv, generator=gen).to(dtype)
    do = torch.randn(tokens, heads, dv, generator=gen).to(dtype)
    cu = None if cuts is None else torch.tensor(cuts, dtype=torch.int32)
    return q, k, v, do, cu, dqk**-0.5


def _run(fn, q, k, v, do, **kw):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o, lse, max_logits = fn(q, k, v, **kw)
    o.backward(do)
    return o.detach(), lse, max_logits, q.grad, k.grad, v.grad


def _reference(q, k, v, *, softmax_scale, causal, cu_seqlens):
    return reference.mla_attention(q, k, v, softmax_scale, causal, cu_seqlens)


def _k2(q, k, v, **kw):
    return mla_attention(q, k, v, return_max_logits=True, **kw)


# fp32: same math in fp32, other summation order. bf16: o and the gradients are one bf16 rounding of fp32 values
# computed from the same bf16 inputs (2 bf16 ulps allowed); lse and max_logits stay fp32.
TOLERANCES = {
    torch.float32: ({"atol": 1e-5, "rtol": 1e-5}, {"atol": 1e-5, "rtol": 1e-5}),
    torch.bfloat16: ({"atol": 1.6e-2, "rtol": 1.6e-2}, {"atol": 1e-5, "rtol": 1e-5}),
}


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_reference(case, causal, dtype):
    q, k, v, do, cu, scale = _inputs(case, dtype)
    kw = {"softmax_scale": scale, "causal": causal, "cu_seqlens": cu}
    got = _run(_k2, q, k, v, do, **kw)
    want = _run(_reference, q, k, v, do, **kw)
    tol, tol_fp32 = TOLERANCES[dtype]
    names = ("o", "lse", "max_logits", "dq", "dk", "dv")
    for name, g, w in zip(names, got, want, strict=True):
        t = tol_fp32 if name in ("lse", "max_logits") else tol
        torch.testing.assert_close(g, w, **t, msg=lambda m, name=name: f"{name}: {m}")
    assert got[1].shape == (q.shape[1], q.shape[0]) and got[1].dtype == torch.float32  # lse [H, T]
    assert got[0].dtype == dtype and got[3].dtype == dtype


def test_max_logits_is_the_masked_scaled_maximum():
    """Per head: the max of scale·q·k over visible pairs only — a large logit across a boundary does not count."""
    q = torch.zeros(4, 1, 2)
    k = torch.zeros(4, 1, 2)
    q[0, 0, 0] = 10.0  # document 0 = tokens 0, 1; token 0 sees only key 0
    k[1, 0, 0] = 10.0  # key 1: visible to query 0 only without the causal mask
    k[2, 0, 0] = 5.0  # document 1 = tokens 2, 3
    q[3, 0, 0] = 1.0
    cu = torch.tensor([0, 2, 4], dtype=torch.int32)
    _, _, causal_max = mla_attention(q, k, k[..., :1], softmax_scale=0.5, cu_seqlens=cu, return_max_logits=True)
    _, _, full_max = mla_attention(
        q, k, k[..., :1], softmax_scale=0.5, causal=False, cu_seqlens=cu, return_max_logits=True
    )
    torch.testing.assert_close(causal_max, torch.tensor([2.5]))  # q3·k2 = 5 → 2.5; q0·k1 is masked
    torch.testing.assert_close(full_max, torch.tensor([50.0]))


def test_returns_two_outputs_without_max_logits_and_handles_empty_input():
    q, k, v, _, _, scale = _inputs("T70-H1", torch.float32)
    out = mla_attention(q, k, v, softmax_scale=scale)
    assert len(out) == 2
    o, lse, m = mla_attention(q[:0], k[:0], v[:0], softmax_scale=scale, return_max_logits=True)
    assert o.shape == (0, 1, 16) and lse.shape == (1, 0) and torch.isneginf(m).all()
    o, lse, m = mla_attention(
        q[:0], k[:0], v[:0], softmax_scale=scale, cu_seqlens=torch.zeros(3, dtype=torch.int32), return_max_logits=True
    )
    assert o.shape == (0, 1, 16) and torch.isneginf(m).all()


def test_strided_inputs():
    """q, k, v as slices of one packed projection (row stride > H·d), as MLA produces them."""
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(90, 2, 24 + 24 + 16, generator=gen)
    q, k, v = qkv.split([24, 24, 16], dim=-1)
    do = torch.randn(90, 2, 16, generator=gen)
    kw = {"softmax_scale": 0.3, "causal": True, "cu_seqlens": torch.tensor([0, 50, 90], dtype=torch.int32)}
    for g, w in zip(_run(_k2, q, k, v, do, **kw), _run(_reference, q, k, v, do, **kw), strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not NATIVE, reason="k2._C has no attention CPU kernel")
@pytest.mark.parametrize("threads", [1, 3])
def test_thread_counts_agree(threads):
    """The backward splits a head's key blocks over threads when H < threads (per-split dQ partials)."""
    q, k, v, do, cu, scale = _inputs("K2-dims", torch.float32, seed=5)
    kw = {"softmax_scale": scale, "causal": True, "cu_seqlens": cu}
    want = _run(_reference, q, k, v, do, **kw)
    saved = _native.native().num_threads()
    _native.native().set_num_threads(threads)
    try:
        got = _run(_k2, q, k, v, do, **kw)
    finally:
        _native.native().set_num_threads(saved)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_reference_backward_matches_autograd(causal):
    q, k, v, do, cu, scale = _inputs("docs-with-empty-and-length-1", torch.float64)
    o, lse, _, *want = _run(_reference, q, k, v, do, softmax_scale=scale, causal=causal, cu_seqlens=cu)
    got = reference.mla_attention_backward(do, q, k, v, o, lse, scale, causal, cu)
    for g, w in zip(got, want, strict=True):  # lse is fp32 (also for fp64 inputs): P is recomputed to ~1e-7
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)


def test_fp64_gradcheck():
    gen = torch.Generator().manual_seed(1)
    q, k = (torch.randn(7, 2, 5, dtype=torch.float64, generator=gen, requires_grad=True) for _ in range(2))
    v = torch.randn(7, 2, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    cu = torch.tensor([0, 1, 5, 5, 7], dtype=torch.int32)
    assert torch.autograd.gradcheck(
        lambda q, k, v: mla_attention(q, k, v, softmax_scale=0.4, cu_seqlens=cu)[0], (q, k, v)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_opcheck(dtype):
    q, k, v, do, cu, scale = _inputs("docs-with-empty-and-length-1", dtype)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.k2.mla_attention, (q, k, v, cu, scale, True, True))
    torch.library.opcheck(torch.ops.k2.mla_attention, (q, k, v, None, scale, False, False))
    o, lse, _ = torch.ops.k2.mla_attention(q.detach(), k.detach(), v.detach(), cu, scale, True, False)
    torch.library.opcheck(
        torch.ops.k2.mla_attention_backward, (do, q.detach(), k.detach(), v.detach(), o, lse, cu, scale, True)
    )


def test_bf16_autocast_casts_inputs():
    q, k, v, _, cu, scale = _inputs("T70-H1", torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o, lse = mla_attention(q, k, v, softmax_scale=scale, cu_seqlens=cu)
    assert o.dtype == torch.bfloat16 and lse.dtype == torch.float32


def test_bad_arguments_name_the_argument():
    q, k, v, _, _, scale = _inputs("T70-H1", torch.float32)
    bad = [
        ({"q": q[0]}, "argument 'q'.*3-D"),
        ({"k": k[:, :, :3]}, "argument 'k'.*shape of q"),
        ({"v": v[:5]}, "argument 'v'"),
        ({"k": k.double()}, "argument 'k'.*dtype"),
        ({"cu_seqlens": torch.tensor([0, 70])}, "argument 'cu_seqlens'.*int32"),
        ({"cu_seqlens": torch.tensor([0, 30, 69], dtype=torch.int32)}, "argument 'cu_seqlens'"),
        ({"cu_seqlens": torch.tensor([0, 40, 30, 70], dtype=torch.int32)}, "argument 'cu_seqlens'"),
        ({"cu_seqlens": torch.tensor([5, 70], dtype=torch.int32)}, "argument 'cu_seqlens'"),
        ({"softmax_scale": float("nan")}, "argument 'softmax_scale'"),
    ]
    for change, pattern in bad:
        args = {"q": q, "k": k, "v": v, "softmax_scale": scale, "cu_seqlens": None, **change}
        with pytest.raises(ValueError, match=f"^k2.ops.mla_attention: {pattern}") as info:
            mla_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)
        assert "\n" not in str(info.value)


@pytest.mark.skipif(not NATIVE, reason="k2._C has no attention CPU kernel")
def test_available_reports_cpu_kernel():
    assert "cpu" in k2.ops.available()["attention"]


@pytest.mark.skipif(not NATIVE, reason="k2._C has no attention CPU kernel")
@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_every_instruction_set_variant(isa, monkeypatch):
    """K2_ATTENTION_ISA caps the kernel's instruction set (read at each call): the AVX2 and baseline builds of the
    tiles give the same results as the reference on a machine that would pick AVX-512."""
    monkeypatch.setenv("K2_ATTENTION_ISA", isa)
    q, k, v, do, cu, scale = _inputs("many-short-docs", torch.bfloat16, seed=2)
    kw = {"softmax_scale": scale, "causal": True, "cu_seqlens": cu}
    tol, tol_fp32 = TOLERANCES[torch.bfloat16]
    got, want = _run(_k2, q, k, v, do, **kw), _run(_reference, q, k, v, do, **kw)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(g, w, **(tol_fp32 if i in (1, 2) else tol))
