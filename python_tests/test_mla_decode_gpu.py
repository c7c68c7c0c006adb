"""k2.ops.mla_decode's CUDA kernel against k2.ops.reference.mla_decode on the same GPU (gpu-marked).

The CPU test's shapes (ragged lengths with 0, 1 and T_max, H = 1, K2's r = 512 / dr = 64, no rope dims, T = 5000, the
cache a strided slice of a [L, N, T_max, r + dr] buffer) plus CUDA's own edges: head counts that fill several
16-head groups or leave a partial one, a batch large enough that every sequence runs unsplit (one CTA per sequence
and head group writes the outputs directly) and one long sequence split over many CTAs (merged by lse); bf16 and fp32;
the absorbed == expanded identity on the GPU; opcheck; the result on a side stream.
"""

from __future__ import annotations

import pytest
import torch
from test_mla_decode import CASES, check_against_reference, expanded_attention, make_inputs

from k2.ops import _native, mla_decode

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")

GPU_CASES = {
    **CASES,
    "K2-64-heads": ([1, 777, 4096, 0, 2048], 4096, 64, 512, 64),
    "partial-head-group": ([5, 300, 129], 300, 20, 512, 64),
    "wide-batch-unsplit": ([i * 7 % 64 for i in range(300)], 64, 16, 32, 16),
    "long-one-sequence": ([20000], 20000, 16, 512, 64),
}


@pytest.fixture(autouse=True)
def _needs_kernel():
    if not _native.has_kernel("attention_decode", CUDA):
        pytest.skip("k2._C has no attention_decode CUDA kernel")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_matches_reference(case, dtype):
    check_against_reference(*make_inputs(GPU_CASES[case], dtype, device=CUDA))


def test_absorbed_equals_expanded_attention():
    heads, dn, dr, r, dv = 16, 128, 64, 512, 128
    gen = torch.Generator().manual_seed(7)
    lengths = torch.tensor([1, 57, 3000], dtype=torch.int32)
    c_kv, k_rope = torch.randn(3, 3000, r, generator=gen), torch.randn(3, 3000, dr, generator=gen)
    w_uk, w_uv = torch.randn(heads, dn, r, generator=gen) / r**0.5, torch.randn(heads, dv, r, generator=gen) / r**0.5
    q_nope, q_rope = torch.randn(3, heads, dn, generator=gen), torch.randn(3, heads, dr, generator=gen)
    scale = (dn + dr) ** -0.5
    want = expanded_attention(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, lengths, scale)  # on the CPU, fp32
    q_latent = torch.cat((torch.einsum("bhd,hdr->bhr", q_nope, w_uk), q_rope), dim=-1)
    cache = torch.cat((c_kv, k_rope), dim=-1)
    o_latent, _ = mla_decode(q_latent.to(CUDA), cache.to(CUDA), lengths.to(CUDA), softmax_scale=scale, kv_lora_rank=r)
    o = torch.einsum("bhr,hvr->bhv", o_latent.cpu(), w_uv)
    torch.testing.assert_close(o, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_opcheck(dtype):
    q, cache, lengths, scale, r = make_inputs("ragged-0-1-Tmax", dtype, device=CUDA)
    torch.library.opcheck(torch.ops.k2.mla_decode, (q, cache, lengths, scale, r))


def test_side_stream_sees_pending_inputs():
    """Inputs still being written on a side stream when the op is called there: the op runs on that stream."""
    q, cache, lengths, scale, r = make_inputs(GPU_CASES["K2-64-heads"], torch.bfloat16, device=CUDA)
    want = mla_decode(q, cache, lengths, softmax_scale=scale, kv_lora_rank=r)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)
        q2 = q * 1  # written after the sleep, on the side stream
        got = mla_decode(q2, cache, lengths, softmax_scale=scale, kv_lora_rank=r)
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
