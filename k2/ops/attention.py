"""MLA attention: softmax attention over packed variable-length documents that also returns each head's max logit.

``mla_attention(q [T, H, dqk], k [T, H, dqk], v [T, H, dv], *, softmax_scale, causal=True, cu_seqlens=None,
return_max_logits=False) -> (o [T, H, dv], lse [H, T])`` or ``(o, lse, max_logits [H])``.

- Documents: ``cu_seqlens [N+1]`` int32 (``0 = c[0] <= ... <= c[N] = T``) packs N documents into the T tokens,
  document i being tokens ``[c[i], c[i+1])``; empty documents are allowed. A query attends only to keys of its own
  document (no token attends across a boundary), and with ``causal`` only to those at or before its own position.
  ``None`` is one document of all T tokens. Queries and keys are the same tokens (self-attention).
- ``dqk`` may differ from ``dv`` (Kimi-K2: 192 = 128 nope + 64 rope, and 128).
- ``lse [H, T]`` fp32, head-major like FlashAttention's variable-length layout: ``lse[h, t] = log Σ_j
  exp(softmax_scale · q[t,h]·k[j,h])`` over the keys j that token t sees. Not differentiable.
- ``max_logits [H]`` fp32: per head, the max over all rows of the scaled, masked pre-softmax logits
  ``softmax_scale · q·k`` (the quantity QK-Clip watches); −inf for a head with no visible pair (T = 0). Not
  differentiable. When the kernel runs, it comes from the online softmax's row maxima (no second ``q·kᵀ``).
- Precision: logits, softmax and products accumulate in fp32 whatever the input dtype (bf16 inputs are read and
  widened); ``o`` and the gradients are returned in the inputs' dtype.

Autograd: the backward recomputes the probabilities from ``lse`` (FlashAttention-2): ``D = rowsum(dO ∘ O)``,
``dS = P ∘ (dP − D)``; it is the custom op ``k2::mla_attention_backward``.

Dispatch (architecture §4): CUDA kernel (fp32, bf16; head dims multiples of 8 up to 256) → C++ CPU kernel (fp32,
bf16) → ``k2.ops.reference`` (fp16, fp64, other head dims on CUDA, or ``K2_OPS=reference``). The CUDA kernel
(``csrc/attention/cuda.cu``) is FlashAttention-2's tiled online softmax: bf16 on tensor cores (``mma.sync``, fp32
accumulation; P and dS enter their second GEMMs in bf16, as in FlashAttention-2), fp32 on CUDA cores in exact fp32 (no
tf32); max logits come from the forward's online-softmax row maxima (float atomic max, no second ``q·kᵀ``); the
backward accumulates dq in fp32 with atomics (so dq's last bits may vary run to run; o, lse, dk, dv do not). Native
calls, through ``k2.ops._native.call`` with torch-allocated outputs and a
workspace sized by ``k2._C.mla_attention_*_workspace_size``: ``k2._C.mla_attention_forward(q, k, v, cu_seqlens, o,
lse, max_logits, softmax_scale, causal, workspace, stream)`` (an empty ``max_logits`` asks for none) and
``k2._C.mla_attention_backward(do, q, k, v, o, lse, cu_seqlens, dq, dk, dv, softmax_scale, causal, workspace,
stream)``.

Autocast: like ``torch.nn.functional.scaled_dot_product_attention``, ``q``, ``k``, ``v`` are cast to the autocast
dtype; the logits still accumulate in fp32.
"""

from __future__ import annotations

import math

import torch

from k2.ops import _native, reference

_FAMILY = "attention"
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def _kernel(q: torch.Tensor, v: torch.Tensor) -> bool:
    if q.dtype not in _KERNEL_DTYPES or _native.kernel_module(_FAMILY, q.device, q) is None:
        return False
    # The CUDA kernel's register tiles take head dims that are multiples of 8 up to 256 (k2._C refuses others).
    return q.device.type != "cuda" or all(d % 8 == 0 and d <= 256 for d in (q.shape[2], v.shape[2]))


def _sizes(q: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None) -> tuple[int, ...]:
    """(T, H, dqk, dv, N): what the workspace size queries take."""
    return (*q.shape, v.shape[2], 1 if cu_seqlens is None else cu_seqlens.numel() - 1)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.numel() == 0 else t.contiguous()


@torch.library.custom_op("k2::mla_attention", mutates_args=())
def _mla_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    softmax_scale: float,
    causal: bool,
    return_max_logits: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    tokens, heads, _ = q.shape
    if not _kernel(q, v):
        o, lse, max_logits = reference.mla_attention(q, k, v, softmax_scale, causal, cu_seqlens)
        return o, lse, max_logits if return_max_logits else max_logits.new_empty(0)
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    o = q.new_empty(tokens, heads, v.shape[2])
    lse = torch.empty(heads, tokens, dtype=torch.float32, device=q.device)
    max_logits = torch.empty(heads if return_max_logits else 0, dtype=torch.float32, device=q.device)
    _native.call(
        "mla_attention_forward",
        q.device,
        q,
        k,
        v,
        cu_seqlens,
        o,
        lse,
        max_logits,
        softmax_scale,
        causal,
        workspace=("mla_attention_forward_workspace_size", (*_sizes(q, v, cu_seqlens), return_max_logits)),
    )
    return o, lse, max_logits


@_mla_attention.register_fake
def _(q, k, v, cu_seqlens, softmax_scale, causal, return_max_logits):
    tokens, heads, _ = q.shape
    return (
        q.new_empty(tokens, heads, v.shape[2]),
        torch.empty(heads, tokens, dtype=torch.float32, device=q.device),
        torch.empty(heads if return_max_logits else 0, dtype=torch.float32, device=q.device),
    )


@torch.library.custom_op("k2::mla_attention_backward", mutates_args=())
def _mla_attention_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    softmax_scale: float,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not _kernel(q, v) or do.dtype != q.dtype:
        return reference.mla_attention_backward(do, q, k, v, o, lse, softmax_scale, causal, cu_seqlens)
    do, q, k, v, o = (_last_dim_contiguous(t) for t in (do, q, k, v, o))
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    _native.call(
        "mla_attention_backward",
        q.device,
        do,
        q,
        k,
        v,
        o,
        lse.contiguous(),
        cu_seqlens,
        dq,
        dk,
        dv,
        softmax_scale,
        causal,
        workspace=("mla_attention_backward_workspace_size", _sizes(q, v, cu_seqlens)),
    )
    return dq, dk, dv


@_mla_attention_backward.register_fake
def _(do, q, k, v, o, lse, cu_seqlens, softmax_scale, causal):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output) -> None:
    q, k, v, cu_seqlens, softmax_scale, causal, _ = inputs
    o, lse, max_logits = output
    ctx.save_for_backward(q, k, v, o, lse, cu_seqlens)
    ctx.softmax_scale, ctx.causal = softmax_scale, causal
    ctx.mark_non_differentiable(lse, max_logits)


def _backward(ctx, do: torch.Tensor, _dlse, _dmax_logits):
    q, k, v, o, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _mla_attention_backward(do, q, k, v, o, lse, cu_seqlens, ctx.softmax_scale, ctx.causal)
    return dq, dk, dv, None, None, None, None


_mla_attention.register_autograd(_backward, setup_context=_setup)
_native.register_autocast("mla_attention", cast=(0, 1, 2))


def _fail(arg: str, what: str) -> None:
    raise ValueError(f"k2.ops.mla_attention: argument '{arg}': {what}")


def mla_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    softmax_scale: float,
    causal: bool = True,
    cu_seqlens: torch.Tensor | None = None,
    return_max_logits: bool = False,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention of packed documents with per-head max logits (see the module docstring for the exact contract).

    Args:
        q, k: ``[T, H, dqk]`` queries and keys (the same T tokens).
        v: ``[T, H, dv]`` values.
        softmax_scale: the logit scale (``dqk ** -0.5``, or MLA's YaRN-adjusted scale).
        causal: each query sees keys at or before its position only.
        cu_seqlens: ``[N+1]`` int32 cumulative document lengths, ``0 .. T``; None for one document.
        return_max_logits: also return ``max_logits [H]`` fp32.

    Returns:
        ``(o [T, H, dv], lse [H, T])`` or ``(o, lse, max_logits)``; ``o`` is differentiable in q, k and v.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            _fail(name, f"expected a 3-D tensor [T, H, d], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            _fail(name, f"expected a floating-point tensor, got {t.dtype}")
    if k.shape != q.shape:
        _fail("k", f"expected the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:2] != q.shape[:2]:
        _fail("v", f"expected [T, H] = {tuple(q.shape[:2])} leading dims, got {tuple(v.shape)}")
    if q.shape[1] < 1 or q.shape[2] < 1 or v.shape[2] < 1:
        _fail("q", f"expected H, dqk, dv >= 1, got q {tuple(q.shape)} and v {tuple(v.shape)}")
    autocast = torch.is_autocast_enabled(q.device.type)  # the autocast rule casts q, k, v to one dtype
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype and not autocast:
            _fail(name, f"expected q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            _fail(name, f"expected q's device {q.device}, got {t.device}")
    if cu_seqlens is not None:
        if cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32 or cu_seqlens.numel() < 1:
            _fail("cu_seqlens", f"expected a 1-D int32 tensor [N+1], got {cu_seqlens.dtype}{list(cu_seqlens.shape)}")
        if cu_seqlens.device != q.device:
            _fail("cu_seqlens", f"expected q's device {q.device}, got {cu_seqlens.device}")
    if not math.isfinite(float(softmax_scale)):
        _fail("softmax_scale", f"expected a finite number, got {softmax_scale}")
    scale, causal, return_max_logits = float(softmax_scale), bool(causal), bool(return_max_logits)
    o, lse, max_logits = _mla_attention(q, k, v, cu_seqlens, scale, causal, return_max_logits)
    return (o, lse, max_logits) if return_max_logits else (o, lse)
