"""The policy-optimisation objective of Kimi K1.5 (arXiv 2501.12599 §2.3.2), used by Kimi K2's RL (arXiv
2507.20534 §3.2), its PTX term, K1.5's length penalty, and per-token log-probs of given token ids.

Dimension legend: N sampled responses (P prompts × K samples, each prompt's samples contiguous), B rows, S tokens.

For a prompt x with K responses y_1..y_K from π_old and rewards r_i, the loss is

    L(θ) = mean_x (1/K) Σ_i ( r_i − r̄(x) − τ · log(π_θ(y_i|x) / π_old(y_i|x)) )²,    r̄(x) = (1/K) Σ_i r_i

with sequence-level log-probabilities (the sum over the response's own tokens; prompt, tool and environment tokens
are not the policy's actions and are left out). At the on-policy point (π_θ = π_old) its gradient is
``−(2τ/N) Σ_i (r_i − r̄) ∇ log π_θ(y_i|x)``: REINFORCE with the group mean as baseline, scaled by 2τ (tested). Away
from it the squared log-ratio pulls the policy back towards π_old, which is what the K1.5 report calls the relative
entropy regulariser. τ is not given in either report.

The PTX loss (K2 report §3.2) is the ordinary next-token cross-entropy on a curated dataset, added with a weight,
so RL does not erase what pre-/post-training taught.
"""

from __future__ import annotations

import torch
from torch import nn


def k15_loss(
    logp: torch.Tensor, logp_old: torch.Tensor, rewards: torch.Tensor, group_size: int, tau: float
) -> torch.Tensor:
    """The K1.5 objective: ``logp``, ``logp_old``, ``rewards`` are ``[N]`` (sequence log-probabilities under the
    current and the sampling policy, and rewards; ``N = prompts × group_size``, each prompt's samples contiguous).
    Returns the mean over prompts of each prompt's mean squared residual (a scalar; gradients flow into ``logp``
    only). ``tau > 0``."""
    if logp.dim() != 1 or logp.shape != logp_old.shape or logp.shape != rewards.shape:
        raise ValueError(
            f"k15_loss: logp, logp_old and rewards must be [N] of one shape, got "
            f"{tuple(logp.shape)}, {tuple(logp_old.shape)}, {tuple(rewards.shape)}"
        )
    if group_size < 1 or logp.numel() % group_size:
        raise ValueError(f"k15_loss: N = {logp.numel()} is not a multiple of group_size = {group_size}")
    if not tau > 0:
        raise ValueError(f"k15_loss: tau must be > 0, got {tau}")
    r = rewards.to(logp.dtype).view(-1, group_size)  # [P, K]
    advantage = r - r.mean(dim=1, keepdim=True)  # [P, K]
    log_ratio = (logp - logp_old.detach().to(logp.dtype)).view(-1, group_size)  # [P, K]
    return ((advantage - tau * log_ratio) ** 2).mean(dim=1).mean()


def length_penalty(lengths: torch.Tensor, correct: torch.Tensor, group_size: int) -> torch.Tensor:
    """K1.5's length reward (§2.3.3) per response, ``[N]``: within each prompt's group,
    ``λ = 0.5 − (len − min_len) / (max_len − min_len)``; a correct response gets λ, an incorrect one
    ``min(0, λ)``; 0 for the whole group when all lengths are equal. Added to the rewards with a weight."""
    length = lengths.double().view(-1, group_size)  # [P, K]
    lo, hi = length.amin(dim=1, keepdim=True), length.amax(dim=1, keepdim=True)
    lam = 0.5 - (length - lo) / (hi - lo).clamp_min(1.0)
    lam = torch.where(hi > lo, lam, torch.zeros_like(lam))
    out = torch.where(correct.view(-1, group_size).bool(), lam, lam.clamp_max(0.0))
    return out.view(-1).to(torch.float32)


def token_logprobs(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """``input_ids [B, S]`` → ``[B, S]`` fp32: entry ``s`` is ``log p(input_ids[:, s] | input_ids[:, :s])`` for
    ``s >= 1``, and 0 at ``s = 0`` (nothing predicts the first token). Right padding does not change the earlier
    entries (causal attention)."""
    logits = model(input_ids).float()  # [B, S, V]
    out = torch.zeros(input_ids.shape, dtype=torch.float32, device=logits.device)
    out[:, 1:] = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None])[..., 0]
    return out


def sequence_logprobs(token_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, S]`` token log-probs and ``[B, S]`` 0/1 action mask → ``[B]`` sequence log-probabilities."""
    return (token_logp * mask.to(token_logp.dtype)).sum(dim=1)


def ptx_loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """The PTX term: mean next-token cross-entropy of ``model`` on curated data (``labels [B, S]`` already shifted,
    ``ignore_index`` where no loss is taken); the trainer adds ``ptx_weight ×`` this to :func:`k15_loss`."""
    return model.loss(input_ids, labels, ignore_index=ignore_index)
