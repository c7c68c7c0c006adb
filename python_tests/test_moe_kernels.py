"""The moe family's native CPU kernels (k2._C.moe_*) against k2.ops.reference, through the k2.ops front doors.

Covers empty input, one expert, many experts (most empty), int32 and int64 ids, fp32/bf16/fp16 data with fp32
or bf16 routing weights, a token count that spans several parallel chunks, gradients against autograd of the
reference composition, ``torch.library.opcheck`` on each custom op, and the native argument checks.
"""

from __future__ import annotations

import pytest
import torch

import k2.ops
from k2.ops import _native, moe_permute, moe_unpermute, reference

pytestmark = pytest.mark.skipif(
    not _native.has_kernel("moe", torch.device("cpu")), reason="k2._C has no moe CPU kernel (not built)"
)

# (T, K, D, E): empty, one expert, odd sizes, K2-like routing scaled down, E far above T*K, several chunks.
SHAPES = [(0, 2, 8, 4), (9, 1, 5, 1), (37, 3, 19, 8), (64, 8, 32, 384), (5, 2, 16, 1000), (3000, 4, 8, 16)]


def _routing(t: int, k: int, e: int, dtype=torch.int64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if t == 0:
        return torch.empty(0, k, dtype=dtype)
    return torch.rand(t, e, generator=g).topk(min(k, e), dim=-1).indices.to(dtype)  # distinct experts per token


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("ids_dtype", [torch.int64, torch.int32])
def test_permute_matches_reference(shape, ids_dtype):
    t, k, d, e = shape
    k = min(k, e)
    x = torch.randn(t, d)
    ids = _routing(t, k, e, ids_dtype)
    got = moe_permute(x, ids, e)
    want = reference.moe_permute(x, ids, e)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=0, rtol=0)


@pytest.mark.parametrize("data_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_unpermute_and_backward_match_reference(data_dtype, weight_dtype):
    t, k, d, e = 129, 4, 40, 16
    ids = _routing(t, k, e)
    _, row_map, _ = reference.moe_permute(torch.zeros(t, 1), ids, e)
    y_sorted = torch.randn(t * k, d).to(data_dtype)
    weights = torch.rand(t, k).to(weight_dtype)
    dy = torch.randn(t, d).to(data_dtype)
    # fp32 accumulation on both sides; the order of the K terms may differ, so allow one rounding step.
    tol = {"atol": 1e-5, "rtol": 1e-5} if data_dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(
        moe_unpermute(y_sorted, row_map, weights), reference.moe_unpermute(y_sorted, row_map, weights), **tol
    )
    got = torch.ops.k2.moe_unpermute_backward(dy, y_sorted, row_map, weights)
    want = reference.moe_unpermute_backward(dy, y_sorted, row_map, weights)
    torch.testing.assert_close(got[0], want[0], **tol)
    wtol = {"atol": 1e-4, "rtol": 1e-4} if weight_dtype == torch.float32 and data_dtype == torch.float32 else tol
    torch.testing.assert_close(got[1], want[1], **wtol)


@pytest.mark.parametrize("shape", [(0, 2, 8, 4), (50, 3, 24, 7), (20, 1, 8, 1)], ids=str)
def test_gradients_match_reference_autograd(shape):
    t, k, d, e = shape
    ids = _routing(t, k, e, seed=1)
    x = torch.randn(t, d, requires_grad=True)
    weights = torch.rand(t, k, requires_grad=True)
    scale = torch.randn(e, d)  # a per-expert elementwise "expert", so the gradient depends on the routing

    def run(permute, unpermute, x, weights):
        x_sorted, row_map, offsets = permute(x, ids, e)
        expert = torch.repeat_interleave(torch.arange(e), torch.diff(offsets.long(), prepend=offsets.new_zeros(1)))
        return unpermute(x_sorted * scale[expert], row_map, weights)

    y = run(moe_permute, moe_unpermute, x, weights)
    x_ref, w_ref = x.detach().clone().requires_grad_(), weights.detach().clone().requires_grad_()
    y_ref = run(reference.moe_permute, reference.moe_unpermute, x_ref, w_ref)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    dy = torch.randn_like(y)
    (y * dy).sum().backward()
    (y_ref * dy).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights.grad, w_ref.grad, atol=1e-5, rtol=1e-5)


def test_opcheck():
    t, k, d, e = 11, 2, 8, 5
    x, ids = torch.randn(t, d), _routing(t, k, e)
    torch.library.opcheck(torch.ops.k2.moe_permute, (x, ids, e))
    _, row_map, _ = reference.moe_permute(x, ids, e)
    y_sorted, weights = torch.randn(t * k, d, requires_grad=True), torch.rand(t, k, requires_grad=True)
    torch.library.opcheck(torch.ops.k2.moe_unpermute, (y_sorted, row_map, weights))
    torch.library.opcheck(
        torch.ops.k2.moe_unpermute_backward, (torch.randn(t, d), y_sorted.detach(), row_map, weights.detach())
    )


def test_native_rejects_bad_input():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"moe_permute: argument 'topk_ids'.*outside"):
        moe_permute(x, torch.tensor([[0], [1], [5], [2]]), 4)
    y_sorted, weights = torch.randn(4, 8), torch.rand(2, 2)
    with pytest.raises(ValueError, match="moe_unpermute: argument 'row_map'"):
        moe_unpermute(y_sorted, torch.tensor([0, 0, 1, 2], dtype=torch.int32), weights)
    with pytest.raises(ValueError, match="moe_unpermute: argument 'row_map'"):
        moe_unpermute(y_sorted, torch.tensor([0, 1, 2, 9], dtype=torch.int32), weights)


def test_available_reports_cpu_kernel():
    assert "cpu" in k2.ops.available()["moe"]


def test_fp64_combine_keeps_fp64_precision():
    """fp64 data is combined in fp64 (not fp32): equal to an explicit fp64 loop, forward and weight gradient."""
    gen = torch.Generator().manual_seed(0)
    t, k, d, e = 9, 3, 5, 4
    x = torch.randn(t, d, dtype=torch.float64, generator=gen)
    ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)])
    w = torch.rand(t, k, dtype=torch.float64, generator=gen, requires_grad=True)
    x_sorted, row_map, _ = moe_permute(x, ids, e)
    y = moe_unpermute(x_sorted * 1.1, row_map, w)
    expected = (w[..., None] * (x * 1.1)[:, None, :]).sum(1)  # every copy of token t is x[t]·1.1
    torch.testing.assert_close(y, expected, rtol=1e-14, atol=1e-14)
    (dw,) = torch.autograd.grad(y.sum(), w)
    torch.testing.assert_close(dw, (x * 1.1).sum(1, keepdim=True).expand(t, k), rtol=1e-14, atol=1e-14)
