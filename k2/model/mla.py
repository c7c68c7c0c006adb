"""Multi-head Latent Attention (DeepSeek-V2 §2.1, DeepSeek-V3; k2-reference §2.3), with QK-Clip's max logits.

Dimension legend: B batch, S query length, T key length (S, or the cache length), D model dim, H heads,
dn/dr/dv the nope/rope/value head dims, r kv_lora_rank.

    q            = q_proj(x)  or  q_b_proj(RMSNorm(q_a_proj(x)))        [B, S, H, dn + dr]
    c_kv, k_rope = kv_a_proj_with_mqa(x)                                [B, S, r], [B, S, dr] (one shared key)
    c_kv         = kv_a_layernorm(c_kv)                                 the latent that a cache stores
    k_nope, v    = kv_b_proj(c_kv)                                      [B, T, H, dn], [B, T, H, dv]
    o            = softmax(scale · [q_nope, rope(q_rope)]·[k_nope, rope(k_rope)]ᵀ) v  → o_proj

Two equal ways to attend:
- expanded (training, prefill): up-project the latent to per-head keys/values and call SDPA;
- absorbed (decode): fold ``W_uk`` into the query and ``W_uv`` into the output, and attend in the r-dim latent
  space, so a step reads only ``[T, r + dr]`` per sequence instead of ``[T, H, dn + dv]``.

Max logits: in training mode (and unless switched off) each forward folds into ``max_logits [H]`` (fp32) the
per-head max over the batch of the pre-softmax logit ``scale · q·k`` over causally visible pairs, for QK-Clip (K2
report §2.1). It is a running max over every training forward since it was last consumed: QK-Clip
(``k2.optim.qk_clip_``) reads it and resets it to −inf, so gradient-accumulation micro-batches all count and a step
never clips twice from the same forward. The logits behind it are fp32 products of the (possibly bf16) q and k,
also under autocast, so a head near τ is judged on its unrounded logit. On CPU the expanded path computes
attention with explicit fp32 logits (SDPA's CPU flash kernel needs ``dv == dn + dr``, so SDPA would run the same
math anyway) and reads the max from them. On other devices SDPA does not return it, so ``q·kᵀ`` is computed once
more under ``no_grad``, in row chunks (bounded memory, keys cut at the chunk's causal frontier) until a fused MLA
kernel returns it; ``tools/bench_model.py`` measures the cost.

Latent cache protocol: ``cache.update(layer_idx, c_kv [B, S, r], k_rope [B, S, dr]) -> (c_kv_all [B, T, r],
k_rope_all [B, T, dr], mask [B, S, T] bool, True = may attend)``; ``k_rope`` is already rotated.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from k2.model.config import ModelConfig
from k2.model.rope import RMSNorm, apply_rope

# Upper bound on the elements of one chunk of logits recomputed for max-logit recording (64 MiB of fp32).
_MAX_LOGIT_CHUNK_ELEMENTS = 1 << 24


class LatentCache(Protocol):
    def update(
        self, layer_idx: int, c_kv: torch.Tensor, k_rope: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


class KeepFP32Buffers(nn.Module):
    """Keeps the buffers named in ``_fp32_buffers`` in fp32 through ``model.to(dtype)`` (devices still move)."""

    _fp32_buffers: tuple[str, ...] = ()

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        for name in self._fp32_buffers:
            buf = getattr(self, name)
            if buf is not None and buf.is_floating_point() and buf.dtype != torch.float32:
                setattr(self, name, buf.float())
        return self


class MLA(KeepFP32Buffers):
    _fp32_buffers = ("max_logits",)

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.softmax_scale = config.softmax_scale
        self.record_max_logits = True
        d, h, dqk = config.hidden_size, self.num_heads, config.qk_head_dim
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(d, h * dqk, bias=False)
        else:
            self.q_a_proj = nn.Linear(d, self.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = nn.Linear(self.q_lora_rank, h * dqk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, self.kv_lora_rank + self.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, config.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, h * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.o_proj = nn.Linear(h * self.v_head_dim, d, bias=False)
        self.register_buffer("max_logits", torch.full((h,), float("-inf")), persistent=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LatentCache | None = None,
        absorb: bool | None = None,
    ) -> torch.Tensor:
        """``x [B, S, D]``, ``cos/sin [B, S, dr/2]`` → ``[B, S, D]``. ``absorb=None``: absorbed iff decoding
        (a cache and S == 1)."""
        b, s, _ = x.shape
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_rope = q.view(b, s, self.num_heads, -1).split([self.qk_nope_head_dim, self.qk_rope_head_dim], -1)
        q_rope = apply_rope(q_rope, cos, sin)  # [B, S, H, dr]
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], -1)
        c_kv = self.kv_a_layernorm(c_kv)  # [B, S, r]
        k_rope = apply_rope(k_rope, cos, sin)  # [B, S, dr]
        mask = None  # None: plain causal attention over these S positions
        if cache is not None:
            c_kv, k_rope, mask = cache.update(self.layer_idx, c_kv, k_rope)  # [B, T, r], [B, T, dr], [B, S, T]
        if absorb if absorb is not None else (cache is not None and s == 1):
            o = self._attend_latent(q_nope, q_rope, c_kv, k_rope, mask)
        else:
            o = self._attend_expanded(q_nope, q_rope, c_kv, k_rope, mask)
        return self.o_proj(o.flatten(2))  # o [B, S, H, dv]

    def _recording(self) -> bool:
        return self.training and self.record_max_logits

    def _record(self, head_max: torch.Tensor) -> None:
        """Fold one forward's ``head_max [H]`` into the running max (see the module docstring)."""
        self.max_logits = torch.maximum(self.max_logits, head_max.detach().float())

    def _attend_expanded(self, q_nope, q_rope, c_kv, k_rope, mask) -> torch.Tensor:
        b, t, h = c_kv.shape[0], c_kv.shape[1], self.num_heads
        k_nope, v = self.kv_b_proj(c_kv).view(b, t, h, -1).split([self.qk_nope_head_dim, self.v_head_dim], -1)
        q = torch.cat((q_nope, q_rope), -1).transpose(1, 2)  # [B, H, S, dn + dr]
        k = torch.cat((k_nope, k_rope[:, :, None].expand(-1, -1, h, -1)), -1).transpose(1, 2)  # [B, H, T, dn + dr]
        v = v.transpose(1, 2)  # [B, H, T, dv]
        if q.device.type == "cpu":
            o = self._eager_attention(q, k, v, mask)
        else:
            attn_mask = None if mask is None else mask[:, None]
            o = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, is_causal=mask is None, scale=self.softmax_scale
            )  # [B, H, S, dv]
            if self._recording():
                self._record_expanded(q.detach(), k.detach(), mask)
        return o.transpose(1, 2)

    def _eager_attention(self, q, k, v, mask) -> torch.Tensor:
        """Attention with explicit logits: on CPU, SDPA has no fused kernel for ``dv != dn + dr`` and falls back to
        the same math, so the max logits come for free here instead of from a second ``q·kᵀ``. The scale and the
        additive mask are fused into one ``baddbmm``, in fp32 whatever the autocast state: the softmax runs in fp32
        anyway, and the recorded maxima must not be bf16-rounded."""
        b, h, s, _ = q.shape
        t = k.shape[2]
        if mask is None:
            allowed = torch.ones(s, t, dtype=torch.bool, device=q.device).tril(t - s)  # [S, T]
        else:
            allowed = mask[:, None].expand(b, h, s, t).reshape(b * h, s, t)  # [B*H, S, T]
        bias = torch.zeros(allowed.shape, device=q.device).masked_fill_(~allowed, float("-inf"))
        with torch.autocast(q.device.type, enabled=False):
            logits = torch.baddbmm(
                bias,
                q.reshape(b * h, s, -1).float(),
                k.reshape(b * h, t, -1).transpose(1, 2).float(),
                alpha=self.softmax_scale,
            )  # [B*H, S, T] fp32
        if self._recording():
            self._record(logits.detach().view(b, h, s, t).amax(dim=(0, 2, 3)))
        probs = torch.softmax(logits, dim=-1).to(v.dtype)
        return (probs @ v.reshape(b * h, t, -1)).view(b, h, s, -1)  # [B, H, S, dv]

    @torch.no_grad()
    def _record_expanded(self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> None:
        b, h, s, _ = q.shape
        t = k.shape[2]
        rows = max(1, _MAX_LOGIT_CHUNK_ELEMENTS // max(1, b * h * t))
        best = torch.full((h,), float("-inf"), device=q.device)
        q, k = q.float(), k.float()  # fp32 logits also under autocast (no bf16 rounding of the maxima)
        for start in range(0, s, rows):
            end = min(s, start + rows)
            keys = end + (t - s) if mask is None else t  # causal: chunk rows see keys < end (+ any prefix)
            with torch.autocast(q.device.type, enabled=False):
                logits = (q[:, :, start:end] @ k[:, :, :keys].transpose(-1, -2)) * self.softmax_scale
            if mask is None:
                i = torch.arange(start, end, device=q.device)[:, None] + (t - s)
                visible = torch.arange(keys, device=q.device)[None, :] <= i  # [rows, keys]
            else:
                visible = mask[:, None, start:end]  # [B, 1, rows, T]
            logits = logits.masked_fill(~visible, float("-inf"))
            best = torch.maximum(best, logits.amax(dim=(0, 2, 3)))
        self._record(best)

    def _attend_latent(self, q_nope, q_rope, c_kv, k_rope, mask) -> torch.Tensor:
        s, t = q_nope.shape[1], c_kv.shape[1]
        w = self.kv_b_proj.weight.view(self.num_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        w_uk, w_uv = w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim :]  # [H, dn, r], [H, dv, r]
        recording = self._recording()
        if recording:  # recorded maxima come from fp32 logits, also under autocast
            with torch.autocast(c_kv.device.type, enabled=False):
                logits = _latent_logits(*(t.float() for t in (q_nope, w_uk, q_rope, c_kv, k_rope)))
        else:
            logits = _latent_logits(q_nope, w_uk, q_rope, c_kv, k_rope)
        logits = logits.float() * self.softmax_scale  # [B, H, S, T]
        if mask is None:
            mask = torch.ones(s, t, dtype=torch.bool, device=c_kv.device).tril(t - s)[None]  # [1, S, T]
        logits = logits.masked_fill(~mask[:, None], float("-inf"))
        if recording:
            self._record(logits.detach().amax(dim=(0, 2, 3)))
        p = torch.softmax(logits, dim=-1).to(c_kv.dtype)
        o_lat = torch.einsum("bhst,btr->bshr", p, c_kv)  # [B, S, H, r]
        return torch.einsum("bshr,hvr->bshv", o_lat, w_uv)  # [B, S, H, dv]


def _latent_logits(q_nope, w_uk, q_rope, c_kv, k_rope) -> torch.Tensor:
    """Unscaled absorbed logits ``(q_nope W_uk)·c_kv + q_rope·k_rope`` → ``[B, H, S, T]``."""
    q_lat = torch.einsum("bshd,hdr->bshr", q_nope, w_uk)  # [B, S, H, r]
    return torch.einsum("bshr,btr->bhst", q_lat, c_kv) + torch.einsum("bshd,btd->bhst", q_rope, k_rope)
