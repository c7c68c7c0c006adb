"""k2.ops.mla_attention's CUDA kernel (forward and backward) against k2.ops.reference (gpu-marked).

The oracle is the reference computed in fp64 on the GPU from the very inputs the kernel gets (bf16 inputs widened), so
each tolerance is the kernel's own error. fp32 runs on CUDA cores in fp32 and must match to 1e-5 (tf32 would miss by
~1e-3). bf16 runs on the tensor cores with P and dS rounded to bf16 before their second GEMMs (as FlashAttention-2):
o and the gradients are allowed 4e-2 per element and 1e-2 relative error in norm (a wrong tile or mask is off by
O(1)); lse and max_logits are fp32 from fp32 logits, 1e-5. Cases: causal and not, cu_seqlens with length-1 and empty
documents (also first and last), dqk != dv (K2's 192/128, the small presets' 48/32, 24/16 and 96/64, dv > dqk),
head dims 8 and 256, T not a multiple of any tile, H = 1, a 1000-token document (many key blocks per query block).
Also: the kernels (not the reference) ran, strided inputs, the masked maximum, empty input, a deterministic forward,
and head dims the kernel refuses.
"""

from __future__ import annotations

import pytest
import torch

import k2.ops
from k2.ops import _native, mla_attention, reference

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")

# (document lengths or None for one document, T, H, dqk, dv)
CASES = {
    "one-token": (None, 1, 2, 16, 8),
    "T70-H1-24/16": (None, 70, 1, 24, 16),
    "docs-with-empty-and-length-1-48/32": ([0, 1, 1, 65, 100, 100, 170], 170, 3, 48, 32),
    "K2-192/128": ([0, 97, 200, 331], 331, 2, 192, 128),
    "many-short-docs-96/64": ([0, 3, 4, 9, 9, 40, 41, 64, 129], 129, 4, 96, 64),
    "empty-first-and-last-8/8": ([0, 0, 50, 50], 50, 2, 8, 8),
    "dv>dqk-40/136": ([0, 33, 90], 90, 2, 40, 136),
    "max-dims-256/256": ([0, 77, 150], 150, 1, 256, 256),
    "long-doc-64/64": (None, 1000, 2, 64, 64),
}

TOL_FP32 = {"atol": 1e-5, "rtol": 1e-5}
TOL_BF16 = {"atol": 4e-2, "rtol": 4e-2}
NORM_BF16 = 1e-2


def _inputs(case: str, dtype: torch.dtype, seed: int = 0):
    cuts, tokens, heads, dqk, dv = CASES[case]
    gen = torch.Generator(device=CUDA).manual_seed(seed)
    q, k = (torch.randn(tokens, heads, dqk, device=CUDA, generator=gen).to(dtype) for _ in range(2))
    v, do = (torch.randn(tokens, heads, dv, device=CUDA, generator=gen).to(dtype) for _ in range(2))
    cu = None if cuts is None else torch.tensor(cuts, dtype=torch.int32, device=CUDA)
    return q, k, v, do, cu, dqk**-0.5


def _k2(q, k, v, do, **kw):
    """(o, lse, max_logits, dq, dk, dv) from k2.ops.mla_attention and its autograd."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o, lse, max_logits = mla_attention(q, k, v, return_max_logits=True, **kw)
    o.backward(do)
    return o.detach(), lse, max_logits, q.grad, k.grad, v.grad


def _oracle(q, k, v, do, *, softmax_scale, causal, cu_seqlens):
    """The same six from the fp64 reference of the same (widened) inputs."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    o, lse, max_logits = reference.mla_attention(q, k, v, softmax_scale, causal, cu_seqlens)
    o.backward(do.double())
    return o.detach(), lse, max_logits, q.grad, k.grad, v.grad


def _compare(got, want, dtype) -> None:
    for name, g, w in zip(("o", "lse", "max_logits", "dq", "dk", "dv"), got, want, strict=True):
        assert g.shape == w.shape, (name, g.shape, w.shape)
        g, w = g.double(), w.double()
        if dtype == torch.float32 or name in ("lse", "max_logits"):
            torch.testing.assert_close(g, w, **TOL_FP32, msg=lambda m, name=name: f"{name}: {m}")
            continue
        torch.testing.assert_close(g, w, **TOL_BF16, msg=lambda m, name=name: f"{name}: {m}")
        if w.numel():
            err = (torch.linalg.vector_norm(g - w) / torch.linalg.vector_norm(w).clamp_min(1e-30)).item()
            assert err < NORM_BF16, f"{name}: relative error in norm {err:.3g} >= {NORM_BF16}"


def test_attention_reports_cuda_kernel():
    assert "cuda" in k2.ops.available()["attention"], k2.ops.available()
    assert _native.has_kernel("attention", CUDA)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_reference(case, causal, dtype):
    q, k, v, do, cu, scale = _inputs(case, dtype)
    kw = {"softmax_scale": scale, "causal": causal, "cu_seqlens": cu}
    got = _k2(q, k, v, do, **kw)
    assert got[0].dtype == dtype and got[3].dtype == dtype and got[1].dtype == torch.float32
    _compare(got, _oracle(q, k, v, do, **kw), dtype)


def _cuda_kernels(fn) -> list[str]:
    """Names of the CUDA kernels ``fn`` launches (after one warm-up call), from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [evt.name for evt in prof.events() if evt.device_type == torch.autograd.DeviceType.CUDA]
    assert names, f"the profiler saw no CUDA kernel (CUPTI missing?); events: {[e.name for e in prof.events()][:20]}"
    return names


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_profiler_sees_the_attention_kernels(dtype):
    q, k, v, do, cu, scale = _inputs("K2-192/128", dtype)
    names = _cuda_kernels(lambda: _k2(q, k, v, do, softmax_scale=scale, causal=True, cu_seqlens=cu))
    for kernel in ("forward_kernel", "backward_delta", "backward_kernel", "backward_dq"):
        assert any("attention" in n and kernel in n for n in names), (kernel, names)


def test_strided_inputs():
    """q, k, v as slices of one packed projection (row stride > H·d), as MLA produces them."""
    gen = torch.Generator(device=CUDA).manual_seed(3)
    qkv = torch.randn(90, 2, 48 + 48 + 32, device=CUDA, generator=gen)
    q, k, v = qkv.split([48, 48, 32], dim=-1)
    do = torch.randn(90, 2, 32, device=CUDA, generator=gen)
    kw = {"softmax_scale": 0.3, "causal": True, "cu_seqlens": torch.tensor([0, 50, 90], dtype=torch.int32, device=CUDA)}
    _compare(_k2(q, k, v, do, **kw), _oracle(q, k, v, do, **kw), torch.float32)


def test_max_logits_is_the_masked_scaled_maximum():
    """Per head: the max of scale·q·k over visible pairs only — a large logit across a boundary does not count, and
    negative maxima (the float atomic max's other branch) come out exactly."""
    q = torch.zeros(4, 2, 8, device=CUDA)
    k = torch.zeros(4, 2, 8, device=CUDA)
    q[0, 0, 0] = 10.0  # document 0 = tokens 0, 1; token 0 sees only key 0
    k[1, 0, 0] = 10.0  # key 1: visible to query 0 only without the causal mask
    k[2, 0, 0] = 5.0  # document 1 = tokens 2, 3
    q[3, 0, 0] = 1.0
    q[:, 1, 0], k[:, 1, 0] = -1.0, torch.tensor([1.0, 2.0, 3.0, 4.0], device=CUDA)  # head 1: every logit < 0
    cu = torch.tensor([0, 2, 4], dtype=torch.int32, device=CUDA)
    v = k[..., :8].contiguous()
    _, _, causal_max = mla_attention(q, k, v, softmax_scale=0.5, cu_seqlens=cu, return_max_logits=True)
    _, _, full_max = mla_attention(q, k, v, softmax_scale=0.5, causal=False, cu_seqlens=cu, return_max_logits=True)
    torch.testing.assert_close(causal_max, torch.tensor([2.5, -0.5], device=CUDA), atol=0, rtol=0)
    torch.testing.assert_close(full_max, torch.tensor([50.0, -0.5], device=CUDA), atol=0, rtol=0)


def test_empty_input():
    q, k, v, _, _, scale = _inputs("T70-H1-24/16", torch.bfloat16)
    o, lse, m = mla_attention(q[:0], k[:0], v[:0], softmax_scale=scale, return_max_logits=True)
    assert o.shape == (0, 1, 16) and lse.shape == (1, 0) and torch.isneginf(m).all()
    cu = torch.zeros(3, dtype=torch.int32, device=CUDA)
    o, lse, m = mla_attention(q[:0], k[:0], v[:0], softmax_scale=scale, cu_seqlens=cu, return_max_logits=True)
    assert o.shape == (0, 1, 16) and torch.isneginf(m).all()


def test_forward_is_deterministic():
    q, k, v, _, cu, scale = _inputs("K2-192/128", torch.bfloat16)
    first = mla_attention(q, k, v, softmax_scale=scale, cu_seqlens=cu, return_max_logits=True)
    second = mla_attention(q, k, v, softmax_scale=scale, cu_seqlens=cu, return_max_logits=True)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_unsupported_head_dims_run_the_reference_and_the_kernel_refuses_them():
    gen = torch.Generator(device=CUDA).manual_seed(4)
    q, k = (torch.randn(40, 2, 20, device=CUDA, generator=gen) for _ in range(2))
    v = torch.randn(40, 2, 12, device=CUDA, generator=gen)
    o, lse = mla_attention(q, k, v, softmax_scale=0.2)
    want_o, want_lse, _ = reference.mla_attention(q, k, v, 0.2, True, None)
    torch.testing.assert_close(o, want_o, **TOL_FP32)
    torch.testing.assert_close(lse, want_lse, **TOL_FP32)
    out = (torch.empty_like(v), torch.empty(2, 40, device=CUDA), torch.empty(0, device=CUDA))
    with pytest.raises(RuntimeError, match=r"multiples of 8 up to 256, got dqk=20, dv=12"):
        _native.call(
            "mla_attention_forward",
            CUDA,
            q,
            k,
            v,
            None,
            *out,
            0.2,
            True,
            workspace=("mla_attention_forward_workspace_size", (40, 2, 20, 12, 1, False)),
        )
