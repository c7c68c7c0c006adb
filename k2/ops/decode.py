"""Absorbed-MLA decode: one query token per sequence attends over its latent cache (the job of FlashMLA).

``mla_decode(q_latent [B, H, r + dr], cache [B, T_max, r + dr], lengths [B] int32, *, softmax_scale, kv_lora_rank)
-> (o_latent [B, H, r], lse [B, H])``.

MLA caches one latent row per token, ``[c_kv | k_rope]`` (r = ``kv_lora_rank`` = 512 and dr = 64 for Kimi-K2), shared by
all heads. With ``W_uk`` folded into the query and ``W_uv`` into the output (DeepSeek-V2 §2.1), decode attention is
MQA over those rows: the caller passes ``q_latent = [q_nope · W_uk | rope(q_rope)]`` per head, and multiplies
``o_latent`` by ``W_uv`` afterwards.

- ``logits[b, h, j] = softmax_scale · q_latent[b, h] · cache[b, j]`` over all r + dr dims, for ``j < lengths[b]`` (all
  cached rows are visible; the query is the last of them). Values are the first r dims of the rows (``c_kv``).
- ``o_latent`` in the input dtype; ``lse [B, H]`` fp32, the natural log-sum-exp of the logits. ``lengths[b] = 0`` gives
  ``o = 0`` and ``lse = -inf``. ``lengths[b] <= T_max`` is checked on CPU and is a precondition on CUDA (checking it
  there would cost a device sync per step).
- ``cache`` may be any view with a contiguous last dim, e.g. one layer of ``LatentCache.kv [L, N, T_max, r + dr]``
  sliced to a batch of slots: it is read in place, never copied.
- Inference only: no autograd. fp32 and bf16 (``q_latent`` and ``cache`` of one dtype) with fp32 accumulation run the
  native kernels; fp16 and fp64 run ``k2.ops.reference.mla_decode``.

Kernels (FlashDecoding's split-K): the keys of each sequence are cut into splits, each of which scores all H heads
against every cache row it loads (the row is read from memory once, not once per head), keeps a partial (o, lse),
and the partials are merged by their lse. C++ CPU kernel on k2's thread pool (splits sized so long contexts use every
thread) and a CUDA kernel (one CTA per sequence x split x group of 16 heads); ``k2._C.mla_decode(q_latent, cache,
lengths, o, lse, softmax_scale, kv_lora_rank, workspace, stream)`` with a workspace sized by
``k2._C.mla_decode_workspace_size(B, H, kv_lora_rank, T_max, device_type, device)``. ``K2_OPS=reference`` forces the
reference. The native family is ``attention_decode`` in :func:`k2.ops.available`.
"""

from __future__ import annotations

import math

import torch

from k2.ops import _native, reference

_FAMILY = "attention_decode"
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)
# The CUDA kernel keeps the query tile [16 heads, r + dr] in shared memory and at most 4 value columns per thread
# (csrc/attention/decode.h: kDecodeCudaMaxDim, kDecodeCudaMaxRank); larger problems run the reference there.
_CUDA_MAX_DIM, _CUDA_MAX_RANK, _CUDA_MAX_BATCH = 1152, 1024, 65535


def _kernel(q: torch.Tensor, cache: torch.Tensor, kv_lora_rank: int, device: torch.device) -> bool:
    if q.dtype not in _KERNEL_DTYPES or cache.dtype != q.dtype:
        return False
    if device.type == "cuda" and (
        q.shape[2] > _CUDA_MAX_DIM or kv_lora_rank > _CUDA_MAX_RANK or q.shape[0] > _CUDA_MAX_BATCH
    ):
        return False
    return _native.kernel_module(_FAMILY, device) is not None  # the dtype is one the kernels take (checked above)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.numel() == 0 else t.contiguous()


def _fail(arg: str, what: str) -> None:
    raise ValueError(f"k2.ops.mla_decode: argument '{arg}': {what}")


def _check_lengths(lengths: torch.Tensor, max_len: int) -> None:
    bad = ((lengths < 0) | (lengths > max_len)).nonzero()
    if bad.numel():
        b = int(bad[0, 0])
        _fail("lengths", f"expected 0 <= lengths[b] <= T_max = {max_len}, got lengths[{b}] = {int(lengths[b])}")


@torch.library.custom_op("k2::mla_decode", mutates_args=())
def _mla_decode(
    q_latent: torch.Tensor, cache: torch.Tensor, lengths: torch.Tensor, softmax_scale: float, kv_lora_rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, heads, _ = q_latent.shape
    device = q_latent.device
    if not _kernel(q_latent, cache, kv_lora_rank, device):
        if device.type == "cpu":  # the CPU kernel checks lengths itself; the reference would clamp them
            _check_lengths(lengths, cache.shape[1])
        return reference.mla_decode(q_latent, cache, lengths, softmax_scale, kv_lora_rank)
    q_latent, cache = _last_dim_contiguous(q_latent), _last_dim_contiguous(cache)
    o = q_latent.new_empty(batch, heads, kv_lora_rank)
    lse = q_latent.new_empty(batch, heads, dtype=torch.float32)
    _native.call(
        "mla_decode",
        device,
        q_latent,
        cache,
        lengths if lengths.is_contiguous() else lengths.contiguous(),
        o,
        lse,
        softmax_scale,
        kv_lora_rank,
        workspace=("mla_decode_workspace_size", (batch, heads, kv_lora_rank, cache.shape[1])),
    )
    return o, lse


@_mla_decode.register_fake
def _(q_latent, cache, lengths, softmax_scale, kv_lora_rank):
    batch, heads, _ = q_latent.shape
    return (
        q_latent.new_empty(batch, heads, kv_lora_rank),
        torch.empty(batch, heads, dtype=torch.float32, device=q_latent.device),
    )


def mla_decode(
    q_latent: torch.Tensor,
    cache: torch.Tensor,
    lengths: torch.Tensor,
    *,
    softmax_scale: float,
    kv_lora_rank: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbed-MLA decode attention over the latent cache (see the module docstring for the exact contract).

    Args:
        q_latent: ``[B, H, r + dr]`` absorbed queries ``[q_nope · W_uk | rope(q_rope)]``, one token per sequence.
        cache: ``[B, T_max, r + dr]`` cached rows ``[c_kv | k_rope]`` (any strides, contiguous last dim).
        lengths: ``[B]`` int32, rows visible to each sequence (``0 <= lengths[b] <= T_max``).
        softmax_scale: the logit scale (MLA's ``(dn + dr) ** -0.5``, YaRN-adjusted where used).
        kv_lora_rank: r, the width of ``c_kv``: the value part of each row.

    Returns:
        ``(o_latent [B, H, r]`` in the input dtype, ``lse [B, H]`` fp32).
    """
    # NOTE: every decode step runs this once per layer, so each property is read once (a tensor's .device builds a
    # new object per read).
    q_shape, c_shape, l_shape = q_latent.shape, cache.shape, lengths.shape
    dtype, device = q_latent.dtype, q_latent.device
    for name, shape, t in (("q_latent", q_shape, q_latent), ("cache", c_shape, cache)):
        if len(shape) != 3:
            _fail(name, f"expected a 3-D tensor, got shape {tuple(shape)}")
        if not t.is_floating_point():
            _fail(name, f"expected a floating-point tensor, got {t.dtype}")
    batch, heads, dim = q_shape
    if heads < 1:
        _fail("q_latent", f"expected H >= 1, got shape {tuple(q_shape)}")
    if isinstance(kv_lora_rank, bool) or not isinstance(kv_lora_rank, int) or not 1 <= kv_lora_rank <= dim:
        _fail("kv_lora_rank", f"expected an int in [1, r + dr = {dim}], got {kv_lora_rank!r}")
    if c_shape[0] != batch or c_shape[2] != dim:
        _fail("cache", f"expected [B, T_max, r + dr] = [{batch}, T_max, {dim}], got {tuple(c_shape)}")
    if cache.dtype != dtype:
        _fail("cache", f"expected q_latent's dtype {dtype}, got {cache.dtype}")
    if cache.device != device:
        _fail("cache", f"expected q_latent's device {device}, got {cache.device}")
    if len(l_shape) != 1 or lengths.dtype != torch.int32 or l_shape[0] != batch:
        _fail("lengths", f"expected an int32 tensor [B] = [{batch}], got {lengths.dtype}{list(l_shape)}")
    if lengths.device != device:
        _fail("lengths", f"expected q_latent's device {device}, got {lengths.device}")
    if not math.isfinite(float(softmax_scale)):
        _fail("softmax_scale", f"expected a finite number, got {softmax_scale}")
    op = _mla_decode._init_fn if _plain_eager(q_latent, cache, lengths) else _mla_decode
    return op(q_latent, cache, lengths, float(softmax_scale), int(kv_lora_rank))


def _plain_eager(q_latent: torch.Tensor, cache: torch.Tensor, lengths: torch.Tensor) -> bool:
    """Plain tensors, no tracing and no dispatch mode: the op's body may run without the dispatcher, which has nothing
    to add here (no autograd, no autocast rule) but costs tens of microseconds per call — per layer of every decode
    step, comparable to the attention itself for a small model on a CPU."""
    plain = torch.Tensor
    return (
        not torch.compiler.is_compiling()
        and torch._C._len_torch_dispatch_stack() == 0
        and type(q_latent) is plain
        and type(cache) is plain
        and type(lengths) is plain
    )
