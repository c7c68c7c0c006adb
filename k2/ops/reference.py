"""Pure-PyTorch references of every k2 op: the oracle the tests compare against and the fallback when no
native kernel exists for a device. Written for clarity, not speed; each function states its exact semantics.
"""

from __future__ import annotations

import itertools

import torch

# ---- quant: FP8 casting ----------------------------------------------------------------------------------

_FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


def _fp8_scale(amax: torch.Tensor, dtype: torch.dtype, pow2_scale: bool) -> torch.Tensor:
    """``max(amax, 1e-4) / fp8_max`` in fp32 (NaN stays NaN); with ``pow2_scale`` rounded up to a power of two by
    carrying the mantissa bits into the exponent (exact, unlike ``exp2(ceil(log2(s)))`` in fp32).

    The division is tensor / tensor on purpose: torch computes a tensor / Python-scalar division on CUDA as a
    multiplication by the reciprocal, which is not what the kernels (or the CPU) compute."""
    scale = amax.clamp(min=1e-4) / torch.full_like(amax, _FP8_MAX[dtype])
    if pow2_scale:
        bits = scale.view(torch.int32).to(torch.int64)
        up = ((bits + 0x7FFFFF) & ~0x7FFFFF).to(torch.int32).view(torch.float32)
        scale = torch.where(torch.isfinite(scale), up, scale)
    return scale


def quantize_1x128(x: torch.Tensor, dtype: torch.dtype, pow2_scale: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 quantization per 1x128 group along the last dim (DeepSeek-V3 ``act_quant``).

    ``x [..., K] -> q [..., K], scale [..., ceil(K/128)]``: ``amax = max |fp32(x)|`` over the group (the last
    group may be partial), ``scale = max(amax, 1e-4) / fp8_max``, ``q = (fp32(x) / scale).to(dtype)`` with
    torch's cast (e4m3fn saturates to +-448, e5m2 overflows to +-inf, NaN stays NaN).
    """
    k = x.shape[-1]
    groups = -(-k // 128)
    xf = torch.nn.functional.pad(x.float(), (0, groups * 128 - k)).unflatten(-1, (groups, 128))
    scale = _fp8_scale(xf.abs().amax(-1), dtype, pow2_scale)
    q = (xf / scale.unsqueeze(-1)).flatten(-2)[..., :k].to(dtype)
    return q, scale


def quantize_1x128_transposed(
    x: torch.Tensor, dtype: torch.dtype, pow2_scale: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_1x128`` of ``x.mT``: ``x [..., M, K] -> q [..., K, M], scale [..., K, ceil(M/128)]``."""
    return quantize_1x128(x.mT.contiguous(), dtype, pow2_scale)


def _tiles(t: torch.Tensor) -> torch.Tensor:
    """``[..., M, K] -> [..., ceil(M/128), 128, ceil(K/128), 128]`` fp32, zero-padded (zeros never raise amax)."""
    m, k = t.shape[-2:]
    tm, tk = -(-m // 128), -(-k // 128)
    padded = torch.nn.functional.pad(t.float(), (0, tk * 128 - k, 0, tm * 128 - m))
    return padded.unflatten(-1, (tk, 128)).unflatten(-3, (tm, 128))


def quantize_128x128(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 quantization per 128x128 tile of the last two dims (the Kimi-K2 / DeepSeek-V3 checkpoint layout).

    ``w [..., M, K] -> q [..., M, K], scale_inv [..., ceil(M/128), ceil(K/128)]``: per tile (edge tiles may be
    partial) ``scale_inv = max(amax, 1e-4) / fp8_max`` and ``q = (fp32(w) / scale_inv).to(dtype)``, so that
    ``dequantize_128x128(q, scale_inv) ~ w``. (DeepSeek-V3 ships only the dequantizer; this is its inverse with
    the same clamp as ``act_quant``.)
    """
    m, k = w.shape[-2:]
    tiles = _tiles(w)
    scale_inv = _fp8_scale(tiles.abs().amax(dim=(-3, -1)), dtype, False)
    q = (tiles / scale_inv[..., :, None, :, None]).flatten(-2).flatten(-3, -2)[..., :m, :k].to(dtype)
    return q, scale_inv


def dequantize_128x128(q: torch.Tensor, scale_inv: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """DeepSeek-V3 ``weight_dequant``: ``out = (fp32(q) * scale_inv[tile]).to(out_dtype)``, 128x128 tiles."""
    m, k = q.shape[-2:]
    s = scale_inv.repeat_interleave(128, dim=-2)[..., :m, :].repeat_interleave(128, dim=-1)[..., :k]
    return (q.float() * s).to(out_dtype)


# ---- gemm: grouped GEMM ------------------------------------------------------------------------------------


def _group_bounds(offsets: torch.Tensor) -> list[tuple[int, int]]:
    ends = offsets.tolist()
    return list(zip([0, *ends[:-1]], ends, strict=True))


def _grouped_mm_runs(*tensors: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` accepts these operands: one dtype among fp32/bf16/fp16 and every non-unit
    stride a multiple of 16 bytes (its TMA-style alignment rule, enforced on CPU too)."""
    dtype = tensors[0].dtype
    if dtype not in (torch.float32, torch.bfloat16, torch.float16) or any(t.dtype != dtype for t in tensors):
        return False
    for t in tensors:
        if any(t.stride(i) % (16 // t.element_size()) for i in range(t.dim()) if t.stride(i) != 1):
            return False
    return True


def grouped_gemm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, trans_w: bool = False) -> torch.Tensor:
    """Row-grouped GEMM: ``out[rows of group e] = x[rows of group e] @ W_e``.

    ``x [T, K]``; ``w [E, K, N]`` (``W_e = w[e]``) or, with ``trans_w``, ``[E, N, K]`` (``W_e = w[e].T``, the
    ``nn.Linear`` layout); ``offsets [E]`` int32 cumulative row ends: group e owns rows
    ``offsets[e-1]:offsets[e]``, empty groups are allowed and ``offsets[-1]`` must equal ``T``. With no groups
    (``E = 0``) no row belongs to any group and the result is zero.
    One ``torch._grouped_mm`` call where it runs (offsets stay on the device), else a per-group loop.
    """
    w_kn = w.transpose(1, 2) if trans_w else w  # [E, K, N]
    if w.shape[0] == 0:
        return x.new_zeros(x.shape[0], w_kn.shape[2])
    if _grouped_mm_runs(x, w_kn):
        return torch._grouped_mm(x, w_kn, offs=offsets)
    out = x.new_zeros(x.shape[0], w_kn.shape[2])
    for e, (start, end) in enumerate(_group_bounds(offsets)):
        if end > start:
            out[start:end] = x[start:end] @ w_kn[e]
    return out


def grouped_gemm_wgrad(x: torch.Tensor, dy: torch.Tensor, offsets: torch.Tensor, trans_w: bool = False) -> torch.Tensor:
    """Weight gradient of :func:`grouped_gemm`: ``dW_e = x_e^T @ dy_e`` over each group's rows.

    ``x [T, K]``, ``dy [T, N]`` → ``[E, K, N]``, or ``[E, N, K]`` with ``trans_w``; an empty group gets zeros.
    """
    a, b = (dy, x) if trans_w else (x, dy)  # dW_e = a_e^T b_e, directly in the requested layout
    if offsets.shape[0] == 0:
        return x.new_zeros(0, a.shape[1], b.shape[1])
    if _grouped_mm_runs(a, b):
        return torch._grouped_mm(a.t(), b, offs=offsets)
    dw = x.new_zeros(offsets.shape[0], a.shape[1], b.shape[1])
    for e, (start, end) in enumerate(_group_bounds(offsets)):
        if end > start:
            dw[e] = a[start:end].t() @ b[start:end]
    return dw


def grouped_gemm_fp8(
    x: torch.Tensor, x_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    """FP8 grouped GEMM with DeepSeek-V3 block scales, by dequantising: ``out_e = deq(x_e) @ deq(w_e)^T`` (bf16).

    ``x [T, K]`` float8 with ``x_scale [T, ceil(K/128)]`` (one scale per 1x128 block), ``w [E, N, K]`` float8
    with ``w_scale [E, ceil(N/128), ceil(K/128)]`` (one per 128x128 block); products and sums in fp32.
    """
    k, n = x.shape[1], w.shape[1]
    x_deq = x.float() * x_scale.repeat_interleave(128, dim=-1)[:, :k]  # [T, K]
    w_deq = w.float() * w_scale.repeat_interleave(128, dim=-2)[:, :n].repeat_interleave(128, dim=-1)[..., :k]
    return grouped_gemm(x_deq, w_deq, offsets, trans_w=True).to(torch.bfloat16)


# ---- moe: token permutation --------------------------------------------------------------------------------


def moe_permute(
    x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort token copies by expert for a grouped GEMM.

    ``x [T, D]``, ``topk_ids [T, K]`` (expert of each token's k-th choice) → ``x_sorted [T*K, D]``,
    ``row_map [T*K]`` int32 and ``offsets [E]`` int32 cumulative row ends per expert. ``row_map[i]`` is the flat
    index ``t*K + k`` of the copy at sorted row ``i``; the sort is stable, so within an expert rows keep token
    order. ``x_sorted[i] = x[row_map[i] // K]``.
    """
    top_k = topk_ids.shape[1]
    flat = topk_ids.reshape(-1)
    row_map = torch.argsort(flat, stable=True)
    x_sorted = x[row_map // top_k]
    counts = torch.bincount(flat, minlength=num_experts)
    return x_sorted, row_map.to(torch.int32), counts.cumsum(0).to(torch.int32)


def _inverse_permutation(row_map: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(row_map, dtype=torch.long)
    inverse[row_map.long()] = torch.arange(row_map.shape[0], device=row_map.device)
    return inverse


def moe_unpermute(y_sorted: torch.Tensor, row_map: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """Combine expert outputs: ``y[t] = sum_k topk_weights[t, k] * y_sorted[pos(t, k)]``.

    ``y_sorted [T*K, D]`` in the order of :func:`moe_permute`, ``row_map [T*K]``, ``topk_weights [T, K]`` (any
    float dtype) → ``y [T, D]`` in ``y_sorted``'s dtype; the weighted sum is accumulated in fp32 (fp64 for fp64).
    """
    num_tokens, top_k = topk_weights.shape
    acc = _accumulation_dtype(y_sorted.dtype)
    y_flat = y_sorted[_inverse_permutation(row_map)].view(num_tokens, top_k, y_sorted.shape[1])  # [T, K, D]
    y = torch.bmm(topk_weights.to(acc).unsqueeze(1), y_flat.to(acc)).squeeze(1)  # [T, 1, K] @ [T, K, D]
    return y.to(y_sorted.dtype)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for 16-bit and fp32 data, fp64 for fp64 (never less precise than the data)."""
    return torch.promote_types(dtype, torch.float32)


def moe_unpermute_backward(
    dy: torch.Tensor, y_sorted: torch.Tensor, row_map: torch.Tensor, topk_weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`moe_unpermute`: ``dy_sorted [T*K, D]`` (``w[t,k] * dy[t]`` at row ``pos(t, k)``) and
    ``dweights [T, K]`` (``<y_sorted[pos(t, k)], dy[t]>``, in ``topk_weights``' dtype)."""
    num_tokens, top_k = topk_weights.shape
    row = row_map.long()
    acc = _accumulation_dtype(y_sorted.dtype)
    dy_f = dy.to(acc)
    dy_sorted = (dy_f[row // top_k] * topk_weights.reshape(-1)[row].to(acc)[:, None]).to(y_sorted.dtype)
    y_flat = y_sorted[_inverse_permutation(row_map)].view(num_tokens, top_k, y_sorted.shape[1])
    dweights = torch.bmm(y_flat.to(acc), dy_f.unsqueeze(-1)).squeeze(-1).to(topk_weights.dtype)  # [T, K]
    return dy_sorted, dweights


# ---- optim: Newton-Schulz ----------------------------------------------------------------------------------


def newton_schulz(x: torch.Tensor, coefficients: list[tuple[float, float, float]], eps: float) -> torch.Tensor:
    """Quintic Newton-Schulz orthogonalisation of every matrix in ``x [..., m, n]``, in bf16.

    Exactly ``torch.optim.Muon``'s iteration, batched: ``X = bf16(x)``, transposed to ``[..., n, m]`` when
    m > n (so the Gram matrix is the small side), ``X /= max(‖X‖_F, eps)`` per matrix, then for each
    ``(a, b, c)`` in ``coefficients``: ``A = X Xᵀ``, ``B = b·A + c·A·A``, ``X = a·X + B·X`` (each product a bf16
    GEMM, fp32 accumulation, one bf16 rounding), transposed back. Returns bf16 ``[..., m, n]``; on a single 2-D
    matrix the result is bit-identical to ``torch.optim._muon._zeropower_via_newtonschulz``.
    """
    shape = x.shape
    X = x.reshape(-1, shape[-2], shape[-1]).bfloat16()  # [N, m, n]
    transpose = shape[-2] > shape[-1]
    if transpose:
        X = X.mT
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for a, b, c in coefficients:
        A = X @ X.mT  # [N, k, k], k = min(m, n)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a)
    if transpose:
        X = X.mT
    return X.reshape(shape)


# ---- attention: MLA attention over packed documents -------------------------------------------------------


def _document_bounds(tokens: int, cu_seqlens: torch.Tensor | None) -> list[tuple[int, int]]:
    """``[(start, end)]`` of each document: one document of all ``tokens`` when ``cu_seqlens`` is None. Raises
    ValueError unless ``cu_seqlens`` starts at 0, never decreases and ends at ``tokens``."""
    if cu_seqlens is None:
        return [(0, tokens)]
    cuts = cu_seqlens.tolist()
    if not cuts or cuts[0] != 0 or cuts[-1] != tokens or any(b < a for a, b in itertools.pairwise(cuts)):
        raise ValueError(
            f"k2.ops.mla_attention: argument 'cu_seqlens': expected 0 = c[0] <= c[1] <= ... <= c[N] = T = {tokens}, "
            f"got {cuts if len(cuts) <= 8 else [*cuts[:4], '...', *cuts[-2:]]}"
        )
    return list(itertools.pairwise(cuts))


def _document_logits(
    q: torch.Tensor, k: torch.Tensor, softmax_scale: float, causal: bool, acc: torch.dtype
) -> torch.Tensor:
    """``scale · q·kᵀ`` of one document, ``q, k [n, H, dqk] -> [H, n, n]`` in ``acc``, −inf where masked."""
    logits = torch.bmm(q.transpose(0, 1).to(acc), k.permute(1, 2, 0).to(acc)) * softmax_scale  # [H, n, n]
    if causal:
        n = q.shape[0]
        future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)  # key after query
        logits = logits.masked_fill(future, float("-inf"))
    return logits


def mla_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float,
    causal: bool = True,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax attention per head over packed documents, with explicit logits (one ``[H, n, n]`` per document).

    ``q, k [T, H, dqk]``, ``v [T, H, dv]``; ``cu_seqlens [N+1]`` int32 cuts the T tokens into documents
    ``[c[i], c[i+1])`` (None: one document). A query sees the keys of its own document only, and with ``causal``
    only those at or before its position. Computed in fp32 (fp64 for fp64 inputs) from the inputs as given:

        logits = softmax_scale · q·kᵀ (masked: −inf)      o = softmax(logits) · v  (in q's dtype)
        lse[h, t] = logsumexp_j logits[h, t, j] (fp32)   max_logits[h] = max over t, j of logits[h, t, j] (fp32)

    Returns ``(o [T, H, dv], lse [H, T], max_logits [H])``; a head with no visible pair has max −inf. Differentiable
    through autograd (the oracle for the kernels' gradients).
    """
    tokens, heads, _ = q.shape
    acc = torch.promote_types(q.dtype, torch.float32)
    outs, lses = [], []
    max_logits = torch.full((heads,), float("-inf"), dtype=torch.float32, device=q.device)
    for start, end in _document_bounds(tokens, cu_seqlens):
        if end == start:
            continue
        logits = _document_logits(q[start:end], k[start:end], softmax_scale, causal, acc)  # [H, n, n]
        max_logits = torch.maximum(max_logits, logits.detach().amax(dim=(1, 2)).float())
        lses.append(torch.logsumexp(logits, dim=-1).detach().float())  # [H, n]
        o = torch.bmm(torch.softmax(logits, dim=-1), v[start:end].transpose(0, 1).to(acc))  # [H, n, dv]
        outs.append(o.transpose(0, 1).to(q.dtype))
    if not outs:
        return q.new_empty(0, heads, v.shape[2]), torch.empty(heads, 0, device=q.device), max_logits
    return torch.cat(outs), torch.cat(lses, dim=1), max_logits


def mla_attention_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    softmax_scale: float,
    causal: bool = True,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`mla_attention`'s ``o`` from the saved ``lse`` (FlashAttention-2's recompute), per document:

        P = exp(logits − lse)   dV = Pᵀ·dO   dP = dO·Vᵀ   D = rowsum(dO ∘ O)   dS = P ∘ (dP − D)
        dQ = scale · dS·K       dK = scale · dSᵀ·Q

    in fp32 (fp64 for fp64), returned in the inputs' dtypes as ``(dq, dk, dv)``."""
    tokens = q.shape[0]
    acc = torch.promote_types(q.dtype, torch.float32)
    dq, dk, dv = torch.zeros_like(q, dtype=acc), torch.zeros_like(k, dtype=acc), torch.zeros_like(v, dtype=acc)
    for start, end in _document_bounds(tokens, cu_seqlens):
        if end == start:
            continue
        doc = slice(start, end)
        logits = _document_logits(q[doc], k[doc], softmax_scale, causal, acc)  # [H, n, n]
        p = torch.exp(logits - lse[:, doc, None].to(acc))
        do_d, v_d = do[doc].transpose(0, 1).to(acc), v[doc].transpose(0, 1).to(acc)  # [H, n, dv]
        d = (do_d * o[doc].transpose(0, 1).to(acc)).sum(-1, keepdim=True)  # [H, n, 1]
        ds = p * (do_d @ v_d.mT - d) * softmax_scale  # [H, n, n]
        dv[doc] = (p.mT @ do_d).transpose(0, 1)
        dq[doc] = (ds @ k[doc].transpose(0, 1).to(acc)).transpose(0, 1)
        dk[doc] = (ds.mT @ q[doc].transpose(0, 1).to(acc)).transpose(0, 1)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# ---- attention: absorbed-MLA decode over the latent cache ---------------------------------------------------------


def mla_decode(
    q_latent: torch.Tensor, cache: torch.Tensor, lengths: torch.Tensor, softmax_scale: float, kv_lora_rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query per sequence against its cached latent rows (DeepSeek-V2 §2.1 with ``W_uk``/``W_uv`` absorbed).

    ``q_latent [B, H, r + dr]``, ``cache [B, T_max, r + dr]`` (rows ``[c_kv | k_rope]``), ``lengths [B]`` int32:
    sequence b sees rows ``0 .. lengths[b] - 1``. Computed in fp32 (fp64 for fp64 inputs):

        logits[b, h, j] = softmax_scale · q_latent[b, h]·cache[b, j]      (all r + dr dims; −inf for j >= lengths[b])
        o[b, h] = softmax_j(logits[b, h]) · cache[b, :, :r]  (in q's dtype)   lse[b, h] = logsumexp_j logits (fp32)

    Returns ``(o [B, H, r], lse [B, H])``; a sequence with no row gets ``o = 0`` and ``lse = −inf``.
    """
    acc = torch.promote_types(q_latent.dtype, torch.float32)
    t_max = cache.shape[1]
    visible = torch.arange(t_max, device=cache.device)[None, :] < lengths.to(cache.device, torch.int64)[:, None]
    logits = torch.bmm(q_latent.to(acc), cache.to(acc).transpose(1, 2)) * softmax_scale  # [B, H, T_max]
    logits = logits.masked_fill(~visible[:, None, :], float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # [B, H]; -inf where nothing is visible
    probs = torch.exp(logits - lse[..., None].clamp_min(torch.finfo(acc).min))  # rows with nothing visible: 0
    o = torch.bmm(probs, cache[..., :kv_lora_rank].to(acc))  # [B, H, r]
    return o.to(q_latent.dtype), lse.float()
