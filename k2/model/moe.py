"""Router, routed experts and the MoE layer (DeepSeek-V3 §2.1.2; Kimi K2 report §2.3), plus the dense MLP.

Dimension legend: B batch, S sequence, T tokens (B·S), D model dim, E routed experts, K experts per token,
F expert FFN width.

Router (``noaux_tc``): scores ``s = sigmoid(x W_gᵀ)`` in fp32 (``softmax`` for DeepSeek-V2-style configs); experts
are chosen by top-K of ``s + e_score_correction_bias`` (with ``n_group > 1``: only inside the ``topk_group`` groups
whose top-2 biased scores sum highest); weights are the unbiased ``s`` of the chosen experts, normalised to sum
1 when ``norm_topk_prob``, times ``routed_scaling_factor``.

Experts are stacked ``w_gate/w_up [E, F, D]``, ``w_down [E, D, F]`` (nn.Linear layout) and run as three grouped
GEMMs over expert-sorted token copies (``k2.ops.moe_permute`` → ``grouped_gemm`` → ``moe_unpermute``): no
per-expert Python loop, experts with no tokens cost nothing. ``Experts`` owns the whole routed computation
(sort, GEMMs, weighted combine), so expert parallelism replaces that one submodule from outside.

Load balancing, both outside the gradient of the main loss:
- aux-loss-free (DeepSeek-V3, Moonlight): the layer records ``tokens_per_expert [E]`` each training forward; the trainer
  calls ``Transformer.update_expert_bias(rate)`` which applies ``b_e += rate · sign(mean_load − load_e)``.
- sequence-wise auxiliary loss (DeepSeek-V3 eq. 17–20) when ``aux_loss_alpha > 0`` in training:
  ``alpha · mean_b Σ_e f_e P_e`` with ``f_e = E/(K·S) · #tokens of the sequence routed to e`` and ``P_e`` the
  sequence mean of the scores normalised over experts. (DeepSeek's released code uses unnormalised sigmoid
  scores here; k2 follows the paper.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from k2.model.config import ModelConfig
from k2.model.mla import KeepFP32Buffers
from k2.ops import grouped_gemm, moe_permute, moe_unpermute


class MLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))`` (dense layers and shared experts)."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(KeepFP32Buffers):
    _fp32_buffers = ("e_score_correction_bias",)

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.scoring_func = config.scoring_func
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(config.n_routed_experts))

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [T, D]`` → ``topk_ids [T, K]`` (int64), ``topk_weights [T, K]`` fp32, ``scores [T, E]`` fp32."""
        logits = _fp32_linear(x_TD, self.weight)  # [T, E] fp32
        scores = logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores.detach() + self.e_score_correction_bias  # [T, E], selection only (no gradient)
        if self.n_group > 1:
            grouped = choice.view(-1, self.n_group, self.num_experts // self.n_group)  # [T, G, E/G]
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # [T, G]
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(self.topk_group, dim=-1).indices, True)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).view(-1, self.num_experts)
        topk_ids = choice.topk(self.top_k, dim=-1).indices  # [T, K]
        weights = scores.gather(1, topk_ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return topk_ids, weights * self.routed_scaling_factor, scores


def _fp32_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x·wᵀ`` in fp32, also under autocast (which would recast the GEMM to bf16). The context is entered only when
    autocast is on: entering it costs more than the router's GEMM in a decode step."""
    if torch.is_autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), w.float())
    return F.linear(x.float(), w.float())


class Experts(nn.Module):
    """E SwiGLU experts as stacked weights: each token's K copies are sorted by expert (``k2.ops.moe_permute``), run
    through three grouped GEMMs (:meth:`swiglu`) and combined with the routing weights (``k2.ops.moe_unpermute``).

    A forward of at most ``FEW_ROWS`` token copies (a decode step) takes :meth:`_forward_few` instead: each selected
    expert's SwiGLU as plain GEMMs on views of the stacked weights, where the permute / grouped-GEMM / unpermute
    pipeline would cost more in fixed overhead than the few rows do in FLOPs (``tools/bench_infer.py``).

    This is the seam expert parallelism replaces from outside (``k2.parallel``): a module with the same
    ``forward`` contract that keeps only its rank's experts and exchanges the token copies between ranks."""

    FEW_ROWS = 64  # token copies (T·K) up to which a forward loops over the selected experts

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.w_gate = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))  # [E, F, D]
        self.w_up = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))  # [E, F, D]
        self.w_down = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))  # [E, D, F]

    def forward(
        self, x_TD: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [T, D]``, ``topk_ids [T, K]``, ``topk_weights [T, K]`` → ``y [T, D]`` (``Σ_k w_k · expert_k(x)``) and
        ``tokens_per_expert [E]`` int64 (copies routed to each expert)."""
        if topk_ids.numel() <= self.FEW_ROWS:
            return self._forward_few(x_TD, topk_ids, topk_weights)
        x_sorted, row_map, offsets = moe_permute(x_TD, topk_ids, self.num_experts)  # [T*K, D], [T*K], [E]
        y = moe_unpermute(self.swiglu(x_sorted, offsets), row_map, topk_weights)  # [T, D]
        return y, torch.diff(offsets, prepend=offsets.new_zeros(1)).long()

    def _forward_few(
        self, x_TD: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` for a few token copies: one SwiGLU per selected expert on its (expert-sorted) rows."""
        flat = topk_ids.flatten()  # [T*K]
        order = flat.argsort(stable=True)
        token = order // topk_ids.shape[1]  # [T*K], the token of each expert-sorted row
        x_sorted = x_TD[token]  # [T*K, D]
        counts = torch.bincount(flat, minlength=self.num_experts)  # [E]
        outs, start = [], 0
        for e, n in enumerate(counts.tolist()):  # one host read; the selected experts are the few with n > 0
            if n == 0:
                continue
            xe = x_sorted[start : start + n]
            act = F.silu(F.linear(xe, self.w_gate[e])) * F.linear(xe, self.w_up[e])  # [n, F]
            outs.append(F.linear(act, self.w_down[e]))  # [n, D]
            start += n
        if not outs:  # no tokens
            return torch.zeros_like(x_TD), counts
        y_sorted = torch.cat(outs)  # [T*K, D]
        y_sorted = y_sorted * topk_weights.flatten()[order, None].to(y_sorted.dtype)
        return x_TD.new_zeros(x_TD.shape, dtype=y_sorted.dtype).index_add_(0, token, y_sorted), counts

    def swiglu(self, x_sorted: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """``x_sorted [N, D]`` grouped by expert, ``offsets [E]`` int32 cumulative row ends → ``[N, D]``."""
        gate = grouped_gemm(x_sorted, self.w_gate, offsets, trans_w=True)  # [N, F]
        up = grouped_gemm(x_sorted, self.w_up, offsets, trans_w=True)  # [N, F]
        return grouped_gemm(F.silu(gate) * up, self.w_down, offsets, trans_w=True)  # [N, D]


class MoE(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.aux_loss_alpha = config.aux_loss_alpha
        self.gate = Router(config)
        self.experts = Experts(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size)
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts > 0
            else None
        )
        self.register_buffer("tokens_per_expert", torch.zeros(config.n_routed_experts, dtype=torch.long), False)
        self.aux_loss: torch.Tensor | None = None  # sequence-wise balance loss of the last training forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, S, D]`` → ``[B, S, D]``."""
        b, s, d = x.shape
        x_TD = x.reshape(-1, d)
        topk_ids, topk_weights, scores = self.gate(x_TD)  # [T, K], [T, K], [T, E]
        y, tokens_per_expert = self.experts(x_TD, topk_ids, topk_weights)  # [T, D], [E]
        if self.training:  # what the trainer reads; inference records nothing (as MLA's max logits)
            self.tokens_per_expert = tokens_per_expert.detach()
            self.aux_loss = None
            if self.aux_loss_alpha > 0:
                self.aux_loss = self.sequence_aux_loss(scores.view(b, s, -1), topk_ids.view(b, s, -1))
        elif self.aux_loss is not None:  # a training forward's loss must not outlive it
            self.aux_loss = None
        if self.shared_experts is not None:
            y = y + self.shared_experts(x_TD)
        return y.view(b, s, d)

    def sequence_aux_loss(self, scores: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """``alpha · mean_b Σ_e f_e P_e`` for ``scores [B, S, E]`` and ``topk_ids [B, S, K]``."""
        b, s, e = scores.shape
        counts = torch.zeros(b, e, device=scores.device).scatter_add_(
            1, topk_ids.reshape(b, -1), torch.ones(b, s * self.top_k, device=scores.device)
        )
        f = counts * (e / (self.top_k * s))  # [B, E]
        p = (scores / scores.sum(-1, keepdim=True)).mean(dim=1)  # [B, E]
        return self.aux_loss_alpha * (f * p).sum(-1).mean()
