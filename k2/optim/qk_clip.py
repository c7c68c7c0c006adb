"""QK-Clip (Kimi K2 report, arXiv 2507.20534 §2.1, Algorithm 1): rescale the query/key weights of every attention
head whose largest pre-softmax logit in the last training forward exceeded τ, right after the optimizer update.

For head h with recorded ``S_h`` (softmax scale included) and ``S_h > τ``: ``γ_h = τ / S_h``, and the weights
are scaled so that every logit of head h on the same input is multiplied by exactly γ_h; heads with ``S_h ≤ τ``
(or never recorded: −inf) are not touched at all (bit-identical). What is scaled depends on the attention kind:

MLA (k2's ``k2.model.mla.MLA``, DeepSeek-V3 layout; detected by ``kv_b_proj``). Logit = q_nope·k_nope +
q_rope·k_rope, with k_rope one key shared by all heads:
  - ``q_b_proj.weight`` (query LoRA) or ``q_proj.weight``, viewed ``[H, dn + dr, in]``: rows ``[:dn]`` (q_nope)
    × √γ_h, rows ``[dn:]`` (q_rope) × γ_h;
  - ``kv_b_proj.weight`` viewed ``[H, dn + dv, r]``: rows ``[:dn]`` (k_nope) × √γ_h; the value rows, the shared
    rope key (in ``kv_a_proj_with_mqa``), ``q_a_proj`` and the norms are untouched. Exact, because the latent
    RMSNorm comes before the up-projections.

MHA / GQA (a Llama-style module in any model). A module takes part by implementing this protocol:
  - ``max_logits``: fp32 ``[H]``, each head's max pre-softmax logit (scale included) over the training forwards
    since the last clip (k2's MLA keeps a running max), −inf when nothing was recorded;
  - ``q_proj`` / ``k_proj``: ``nn.Linear``-like, ``weight [H·d, in]`` / ``[H_kv·d, in]`` with head-major rows and
    optional biases (scaled with their rows);
  - ``num_heads``, ``head_dim`` and optionally ``num_key_value_heads`` (default ``num_heads``).
  RoPE is a rotation, so scaling the projections scales the rotated q and k alike. MHA (H_kv = H): query and key
  rows of head h × √γ_h (the report's rule). GQA (H_kv < H): a key head is shared by H / H_kv query heads, so
  scaling it would change the logits of its unclipped siblings; the whole factor goes on the query instead
  (query rows of head h × γ_h, keys untouched), the same choice the MLA rule makes for its shared rope key.

The maxima are consumed: ``qk_clip_`` resets every module's ``max_logits`` to −inf after reading it, so a step
with no training forward since the previous one (recording off, DCP's dummy step, a loop that steps twice)
clips nothing instead of shrinking the same heads again.

Distributed: the recorded maxima are all-reduced with MAX over the data-parallel group first, so every rank
clips identically.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def is_mla(module: nn.Module) -> bool:
    """Whether ``module`` is an MLA attention with the DeepSeek-V3 projection names."""
    return hasattr(module, "max_logits") and hasattr(module, "kv_b_proj")


def is_mha(module: nn.Module) -> bool:
    """Whether ``module`` implements the MHA/GQA QK-Clip protocol of this module's docstring."""
    return all(hasattr(module, a) for a in ("max_logits", "q_proj", "k_proj", "num_heads", "head_dim"))


def find_attention(model: nn.Module) -> list[nn.Module]:
    """The attention modules of ``model`` that QK-Clip can clip, in ``model.modules()`` order (= layer order)."""
    return [m for m in model.modules() if is_mla(m) or is_mha(m)]


def _scale_rows_(weight: torch.Tensor, scale: torch.Tensor) -> None:
    """``weight [H, R, ...] *= scale [H, R]`` in fp32, written back in the weight's dtype."""
    shape = (*scale.shape, *([1] * (weight.dim() - scale.dim())))
    scale = scale.to(weight.device).view(shape)
    if weight.dtype == torch.float32:
        weight.mul_(scale)
    else:
        weight.copy_(weight.float() * scale)


def _clip_mla_(attn: nn.Module, gamma: torch.Tensor) -> None:
    h, dn, dr = attn.num_heads, attn.qk_nope_head_dim, attn.qk_rope_head_dim
    q = attn.q_b_proj if hasattr(attn, "q_b_proj") else attn.q_proj  # with / without query LoRA
    root = gamma.sqrt()
    q_scale = torch.cat([root[:, None].expand(h, dn), gamma[:, None].expand(h, dr)], dim=1)  # [H, dn + dr]
    _scale_rows_(q.weight.view(h, dn + dr, -1), q_scale)
    kv_w = attn.kv_b_proj.weight.view(h, dn + attn.v_head_dim, -1)
    _scale_rows_(kv_w[:, :dn], root[:, None].expand(h, dn))


def _clip_mha_(attn: nn.Module, gamma: torch.Tensor) -> None:
    h, d = attn.num_heads, attn.head_dim
    h_kv = getattr(attn, "num_key_value_heads", None) or h
    if h % h_kv:
        raise ValueError(f"k2.optim.qk_clip: num_heads={h} is not a multiple of num_key_value_heads={h_kv}")
    q_scale, k_scale = (gamma.sqrt(), gamma.sqrt()) if h_kv == h else (gamma, None)
    for proj, scale, heads in ((attn.q_proj, q_scale, h), (attn.k_proj, k_scale, h_kv)):
        if scale is None:
            continue
        _scale_rows_(proj.weight.view(heads, d, -1), scale[:, None].expand(heads, d))
        if getattr(proj, "bias", None) is not None:
            _scale_rows_(proj.bias.view(heads, d), scale[:, None].expand(heads, d))


@torch.no_grad()
def qk_clip_(modules: list[nn.Module], tau: float, *, process_group: Any = None) -> dict[str, torch.Tensor]:
    """Clip every head of ``modules`` whose recorded max logit exceeds ``tau``, then reset the records to −inf
    (consumed); returns the step's report.

    Returns ``{"max_logit": [L] fp32, "clipped_heads": [L] int64}``: per module, the max over heads of the
    (all-reduced) recorded logits before clipping, and how many heads were clipped. Both empty without modules.
    """
    if not tau > 0:
        raise ValueError(f"k2.optim.qk_clip_: tau must be > 0, got {tau!r}")
    if not modules:
        return {"max_logit": torch.empty(0), "clipped_heads": torch.empty(0, dtype=torch.long)}
    logits = [m.max_logits.detach().float().clone() for m in modules]
    for m in modules:
        m.max_logits.fill_(float("-inf"))
    width = max(x.numel() for x in logits)
    table = torch.full((len(modules), width), float("-inf"), device=logits[0].device)  # [L, H]
    for i, x in enumerate(logits):
        table[i, : x.numel()] = x.to(table.device)
    if process_group is not None and dist.is_initialized() and dist.get_world_size(process_group) > 1:
        dist.all_reduce(table, op=dist.ReduceOp.MAX, group=process_group)
    clipped = table > tau  # NaN and −inf compare False: never clipped
    for i, module in enumerate(modules):
        heads = logits[i].numel()
        if not clipped[i, :heads].any():
            continue
        gamma = torch.where(clipped[i, :heads], tau / table[i, :heads], torch.ones(heads, device=table.device))
        (_clip_mla_ if is_mla(module) else _clip_mha_)(module, gamma)
    return {"max_logit": table.amax(dim=1).cpu(), "clipped_heads": clipped.sum(dim=1).cpu()}
