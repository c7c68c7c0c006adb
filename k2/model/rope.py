"""RMSNorm and rotary position embedding with the DeepSeek YaRN variant, in the checkpoints' layout.

RMSNorm normalises in fp32 and multiplies the gain after casting back (DeepSeek-V3 / transformers order).

RoPE acts on the last ``qk_rope_head_dim`` dims of each query head and on the shared key. The checkpoints store
those dims as interleaved pairs ``(x0, x1), (x2, x3), ...``, pair ``i`` rotating at ``inv_freq[i]`` (the
DeepSeek code permutes them with ``view(d/2, 2).transpose`` before ``rotate_half``). :func:`apply_rope` rotates
the pairs in place of that permutation and returns the result de-interleaved (all first elements, then all
second elements), exactly as transformers' ``apply_rotary_pos_emb_interleave``; queries and keys get the same
order, so ``q·k`` is unchanged. Rotated keys in the latent cache are in this de-interleaved order.

YaRN (DeepSeek variant, Peng et al. 2023 as in DeepSeek-V3's code): pairs whose wavelength is short keep the base
frequency, long ones are divided by ``factor``, with a linear ramp between the correction dims of ``beta_fast``
and ``beta_slow`` (floored/ceiled). cos/sin are multiplied by ``mscale(factor, mscale) / mscale(factor,
mscale_all_dim)`` (1 for the released configs); the softmax-scale correction lives in ``ModelConfig``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from k2.model.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 math; the casts are skipped for fp32 inputs (a decode step runs several norms per layer)
        x32 = x if x.dtype == torch.float32 else x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * (y if y.dtype == x.dtype else y.to(x.dtype))


def _yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_frequencies(config: ModelConfig) -> tuple[list[float], float]:
    """Per-pair inverse frequencies (length ``qk_rope_head_dim // 2``) and the cos/sin multiplier."""
    dim, base = config.qk_rope_head_dim, config.rope_theta
    freq_extra = [1.0 / base ** (2 * i / dim) for i in range(dim // 2)]
    rs = config.rope_scaling
    if rs is None:
        return freq_extra, 1.0
    factor = float(rs["factor"])
    original = rs["original_max_position_embeddings"]
    beta_fast = rs.get("beta_fast") or 32
    beta_slow = rs.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return dim * math.log(original / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # the DeepSeek code's guard against a zero-width ramp
    inv_freq = []
    for i, f in enumerate(freq_extra):
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)  # 0: keep base frequency, 1: interpolate
        inv_freq.append(f / factor * ramp + f * (1 - ramp))
    # DeepSeek defaults: mscale 1, mscale_all_dim 0 (then the multiplier is the plain YaRN mscale).
    mscale, mscale_all_dim = rs.get("mscale", 1.0), rs.get("mscale_all_dim", 0.0) or 0.0
    return inv_freq, _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)


class RotaryEmbedding(nn.Module):
    """Computes ``(cos, sin) [B, S, dr/2]`` for positions. The frequencies are a Python list turned into a tensor on
    first use on each device, so the module holds no buffer and works unchanged after meta-device construction."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.inv_freq, self.multiplier = rope_frequencies(config)
        self._inv_freq_on: dict[torch.device, torch.Tensor] = {}

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.float()[..., None] * self._inv_freq(positions.device)  # [B, S, dr/2]
        cos, sin = angles.cos(), angles.sin()
        if self.multiplier != 1.0:
            cos, sin = cos * self.multiplier, sin * self.multiplier
        if dtype != torch.float32:
            cos, sin = cos.to(dtype), sin.to(dtype)
        return cos, sin

    def _inv_freq(self, device: torch.device) -> torch.Tensor:
        """``[dr/2]`` fp32 on ``device``, built once per device (a decode step would otherwise copy it every token)."""
        cached = self._inv_freq_on.get(device)
        if cached is None:
            cached = self._inv_freq_on[device] = torch.tensor(self.inv_freq, dtype=torch.float32, device=device)
        return cached


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of ``x [B, S, ..., dr]`` by ``cos/sin [B, S, dr/2]``; de-interleaved output."""
    while cos.dim() < x.dim():  # broadcast over head dims between S and dr
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
