"""Multi-head Latent Attention (DeepSeek-V2 §2.1, DeepSeek-V3), with QK-Clip's max logits (K2 report §2.1).

Dimension legend: B batch, S query length, T key length (the cache length when decoding), D model dim, H heads,
dn/dr/dv the nope/rope/value head dims, r kv_lora_rank, N documents.

    q            = q_proj(x)  or  q_b_proj(RMSNorm(q_a_proj(x)))        [B, S, H, dn + dr]
    c_kv, k_rope = kv_a_proj_with_mqa(x)                                [B, S, r], [B, S, dr] (one shared key)
    c_kv         = kv_a_layernorm(c_kv)                                 the latent that a cache stores
    k_nope, v    = kv_b_proj(c_kv)                                      [B, S, H, dn], [B, S, H, dv]
    o            = softmax(scale · [q_nope, rope(q_rope)]·[k_nope, rope(k_rope)]ᵀ) v  → o_proj

Two equal ways to attend, each one kernel family op (``k2.ops``, dispatched by device and dtype there):
- expanded (training, prefill): up-project the latent to per-head keys/values and call ``k2.ops.mla_attention``
  on the ``B·S`` tokens packed as documents (``cu_seqlens``: one per row by default, or the caller's documents, so
  packed rows can keep documents apart);
- absorbed (decode, one new token per row): fold ``W_uk`` into the query and ``W_uv`` into the output and attend
  in the r-dim latent space with ``k2.ops.mla_decode``, which reads only the cached ``[T, r + dr]`` rows per
  sequence instead of ``[T, H, dn + dv]``.

Max logits: in training mode (and unless switched off) each forward folds into ``max_logits [H]`` (fp32) the
per-head max of the pre-softmax logit ``scale · q·k`` over the visible pairs, which ``mla_attention`` returns from
its online softmax (fp32 products, also of bf16 inputs under autocast). It is a running max over every training
forward since it was last consumed: QK-Clip (``k2.optim.qk_clip_``) reads it and resets it to −inf, so
gradient-accumulation micro-batches all count and a step never clips twice from the same forward. Decoding (a
cache) records nothing: QK-Clip watches training forwards.

Latent cache protocol: ``cache.update(layer_idx, c_kv [B, S, r], k_rope [B, S, dr]) -> (kv [B, T, r + dr],
lengths [B] int32)``: the rows' cached ``[c_kv | k_rope]`` (``k_rope`` already rotated) including the new entries,
and the number of keys each row's last new token sees. A forward of S > 1 tokens with a cache is a prefill from
position 0 (T == S): row b's first ``lengths[b]`` tokens are its prompt, the rest padding (a separate document).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from k2.model.config import ModelConfig
from k2.model.documents import row_documents
from k2.model.rope import RMSNorm, apply_rope
from k2.ops import mla_attention, mla_decode


class LatentCache(Protocol):
    def update(self, layer_idx: int, c_kv: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


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
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x [B, S, D]``, ``cos/sin [B, S, dr/2]`` → ``[B, S, D]``. Without a cache: causal attention within each
        row, or within each document of ``cu_seqlens [N+1]`` (int32, over the flattened ``B·S`` tokens). With a
        cache: a decode step (S == 1) or a prefill from position 0 (see the module docstring)."""
        b, s, _ = x.shape
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_rope = q.view(b, s, self.num_heads, -1).split([self.qk_nope_head_dim, self.qk_rope_head_dim], -1)
        q_rope = apply_rope(q_rope, cos, sin)  # [B, S, H, dr]
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], -1)
        c_kv = self.kv_a_layernorm(c_kv)  # [B, S, r]
        k_rope = apply_rope(k_rope, cos, sin)  # [B, S, dr]
        if cache is None:
            documents = row_documents(b, s, x.device) if cu_seqlens is None else cu_seqlens
            o = self._attend_expanded(q_nope, q_rope, c_kv, k_rope, documents)
        else:
            if cu_seqlens is not None:
                raise ValueError("MLA: cu_seqlens (packed documents) cannot be combined with a cache")
            kv, lengths = cache.update(self.layer_idx, c_kv, k_rope)  # [B, T, r + dr], [B]
            if s == 1:
                o = self._attend_latent(q_nope, q_rope, kv, lengths)
            elif kv.shape[1] == s:
                o = self._attend_expanded(q_nope, q_rope, c_kv, k_rope, _prompt_documents(lengths, s))
            else:
                raise ValueError(f"MLA: a forward of S = {s} > 1 tokens with a cache must start at position 0")
        return self.o_proj(o.flatten(2))  # o [B, S, H, dv]

    def _recording(self) -> bool:
        return self.training and self.record_max_logits

    def _attend_expanded(self, q_nope, q_rope, c_kv, k_rope, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """Up-projected keys/values, ``mla_attention`` over the ``B·S`` tokens as documents → ``[B, S, H, dv]``."""
        b, s, h = c_kv.shape[0], c_kv.shape[1], self.num_heads
        k_nope, v = self.kv_b_proj(c_kv).view(b, s, h, -1).split([self.qk_nope_head_dim, self.v_head_dim], -1)
        q = torch.cat((q_nope, q_rope), -1).flatten(0, 1)  # [B*S, H, dn + dr]
        k = torch.cat((k_nope, k_rope[:, :, None].expand(-1, -1, h, -1)), -1).flatten(0, 1)  # [B*S, H, dn + dr]
        recording = self._recording()
        o, _, *max_logits = mla_attention(
            q,
            k,
            v.flatten(0, 1),  # [B*S, H, dv]
            softmax_scale=self.softmax_scale,
            causal=True,
            cu_seqlens=cu_seqlens,
            return_max_logits=recording,
        )
        if recording:  # fold this forward's [H] maxima into the running max (see the module docstring)
            self.max_logits = torch.maximum(self.max_logits, max_logits[0])
        return o.view(b, s, h, -1)

    def _attend_latent(self, q_nope, q_rope, kv: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Absorbed decode of one token per row over the cached ``kv [B, T, r + dr]`` → ``[B, 1, H, dv]``."""
        r = self.kv_lora_rank
        w = self.kv_b_proj.weight.view(self.num_heads, self.qk_nope_head_dim + self.v_head_dim, r)
        w_uk, w_uv = w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim :]  # [H, dn, r], [H, dv, r]
        q_lat = torch.bmm(q_nope[:, 0].transpose(0, 1), w_uk)  # [H, B, dn] @ [H, dn, r] → [H, B, r]
        q_cat = torch.cat((q_lat.transpose(0, 1), q_rope[:, 0]), -1)  # [B, H, r + dr]
        if q_cat.dtype != kv.dtype:  # a cache kept in another precision than the weights
            q_cat = q_cat.to(kv.dtype)
        o_lat, _ = mla_decode(q_cat, kv, lengths, softmax_scale=self.softmax_scale, kv_lora_rank=r)  # [B, H, r]
        if o_lat.dtype != w_uv.dtype:
            o_lat = o_lat.to(w_uv.dtype)
        o = torch.bmm(o_lat.transpose(0, 1), w_uv.transpose(1, 2))  # [H, B, r] @ [H, r, dv]
        return o.transpose(0, 1)[:, None]  # [B, 1, H, dv]


def _prompt_documents(lengths: torch.Tensor, s: int) -> torch.Tensor:
    """Documents of a right-padded prefill: row b's prompt ``[0, lengths[b])`` and its padding → ``cu_seqlens
    [2B+1]`` int32 (built on the device: no host sync)."""
    starts = torch.arange(lengths.shape[0], device=lengths.device, dtype=torch.int32) * s
    bounds = torch.stack((starts + lengths.int(), starts + s), dim=1).flatten()
    return torch.cat((bounds.new_zeros(1), bounds))
