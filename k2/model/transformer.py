"""The decoder: ``Block`` (pre-norm MLA + MLP/MoE) and ``Transformer`` (embedding, blocks, norm, untied LM head).

Dimension legend: B batch, S sequence, D model dim, V vocabulary, L layers, H heads, E routed experts.

Module names are the Hugging Face checkpoint names (``embed_tokens``, ``layers.N.self_attn.q_a_proj``, ...), so
the checkpoint adapter and QK-Clip address tensors directly. ``Transformer`` also exposes what the optimizer and
trainer need from a forward: per-head max attention logits (QK-Clip), per-expert token counts and the
aux-loss-free bias update, and the sequence-wise auxiliary loss.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from k2.model.config import ModelConfig
from k2.model.loss import DEFAULT_CHUNK_ELEMENTS, linear_cross_entropy
from k2.model.mla import MLA, LatentCache
from k2.model.moe import MLP, MoE
from k2.model.rope import RMSNorm, RotaryEmbedding


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MLA(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoE(config) if config.is_moe_layer(layer_idx) else MLP(config.hidden_size, config.intermediate_size)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LatentCache | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, cu_seqlens)
        return h + self.mlp(self.post_attention_layernorm(h))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary_emb = RotaryEmbedding(config)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, initializer_range) for every matrix (DeepSeek-V3 / transformers init), ones for norm gains,
        zeros for the router bias."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, nn.Linear | nn.Embedding):
                module.weight.normal_(0.0, std)
        for moe in self.moe_layers():
            moe.gate.weight.normal_(0.0, std)
            moe.gate.e_score_correction_bias.zero_()
            for w in (moe.experts.w_gate, moe.experts.w_up, moe.experts.w_down):
                w.normal_(0.0, std)

    # ---- forward -------------------------------------------------------------------------------------------

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: LatentCache | None = None,
        *,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states ``[B, S, D]`` (what the LM head reads); arguments as :meth:`forward`."""
        if input_ids.dim() != 2:
            raise ValueError(f"Transformer: input_ids must be [B, S], got shape {tuple(input_ids.shape)}")
        if cu_seqlens is not None and (cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32):
            raise ValueError(
                f"Transformer: cu_seqlens must be 1-D int32, got {cu_seqlens.dtype}{list(cu_seqlens.shape)}"
            )
        if positions is None:
            if cache is not None:
                raise ValueError("Transformer: positions [B, S] are required with a cache")
            positions = _document_positions(input_ids, cu_seqlens)
        x = self.embed_tokens(input_ids)  # [B, S, D]
        cos, sin = self.rotary_emb(positions, x.dtype)  # [B, S, dr/2]
        for layer in self.layers:
            x = layer(x, cos, sin, cache, cu_seqlens)
        return self.norm(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: LatentCache | None = None,
        *,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``input_ids [B, S]`` → logits ``[B, S, V]``.

        Without a cache attention is causal within each row, or within each packed document when ``cu_seqlens
        [N+1]`` (int32 cumulative document lengths over the flattened ``B·S`` tokens, every row boundary among them;
        ``k2.model.document_layout`` builds it) is given; ``positions`` default to ``0..S-1`` per row, or per
        document, and only move RoPE. With a cache, ``positions [B, S]`` are required and each layer decodes one
        token per row over the cache, or prefills from position 0 (see ``k2.model.mla``).
        """
        return self.lm_head(self.hidden_states(input_ids, positions, cache, cu_seqlens=cu_seqlens))

    def loss(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        ignore_index: int = -100,
        *,
        positions: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    ) -> torch.Tensor:
        """Mean next-token cross-entropy, ``labels [B, S]`` being the target of each position (already shifted),
        computed in vocabulary-sized chunks (no full fp32 logits); ``positions``/``cu_seqlens`` as :meth:`forward`
        (packed documents). In training with ``aux_loss_alpha > 0`` the MoE layers' sequence-wise balance losses
        are added (see :meth:`aux_loss`)."""
        h = self.hidden_states(input_ids, positions, cu_seqlens=cu_seqlens)
        ce = linear_cross_entropy(
            h.flatten(0, 1),
            self.lm_head.weight,
            labels.flatten(),
            ignore_index=ignore_index,
            chunk_elements=chunk_elements,
        )
        aux = self.aux_loss()
        return ce if aux is None else ce + aux

    # ---- what training reads from the last forward ---------------------------------------------------------

    def attention_layers(self) -> Iterator[MLA]:
        for layer in self.layers:
            yield layer.self_attn

    def moe_layers(self) -> Iterator[MoE]:
        for layer in self.layers:
            if isinstance(layer.mlp, MoE):
                yield layer.mlp

    def record_max_logits(self, enabled: bool = True) -> None:
        """Switch max-logit recording (training-mode forwards only) on or off."""
        for attn in self.attention_layers():
            attn.record_max_logits = enabled

    def max_attention_logits(self) -> torch.Tensor:
        """``[L, H]`` fp32: each head's max pre-softmax logit (softmax scale included, causal mask respected)
        over the training-mode forwards since the records were last consumed (by QK-Clip or
        :meth:`reset_max_attention_logits`); ``-inf`` where nothing was recorded."""
        return torch.stack([attn.max_logits.float() for attn in self.attention_layers()])

    def reset_max_attention_logits(self) -> None:
        """Forget the recorded max logits (a step without QK-Clip consumes them this way)."""
        for attn in self.attention_layers():
            attn.max_logits.fill_(float("-inf"))

    def expert_load(self) -> torch.Tensor:
        """``[n_moe_layers, E]`` int64 tokens routed to each expert in the last training-mode forward."""
        loads = [moe.tokens_per_expert for moe in self.moe_layers()]
        if not loads:
            return torch.zeros(0, self.config.n_routed_experts, dtype=torch.long)
        return torch.stack(loads)

    @torch.no_grad()
    def update_expert_bias(self, rate: float, load: torch.Tensor | None = None) -> None:
        """Aux-loss-free balancing: ``b_e += rate · sign(mean_load − load_e)`` per MoE layer.

        ``load [n_moe_layers, E]`` defaults to :meth:`expert_load` (pass a sum over micro-batches or an
        all-reduced load to balance over a whole step). A no-op in eval mode.
        """
        if not self.training or rate == 0:
            return
        load = self.expert_load() if load is None else load
        for moe, layer_load in zip(self.moe_layers(), load, strict=True):
            layer_load = layer_load.float().to(moe.gate.e_score_correction_bias.device)
            moe.gate.e_score_correction_bias += rate * torch.sign(layer_load.mean() - layer_load)

    def aux_loss(self) -> torch.Tensor | None:
        """Sum of the MoE layers' sequence-wise balance losses of the last forward (None when disabled)."""
        losses = [moe.aux_loss for moe in self.moe_layers() if moe.aux_loss is not None]
        return torch.stack(losses).sum() if losses else None


def _document_positions(input_ids: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """``[B, S]`` positions counting from 0 in each row, or in each document of ``cu_seqlens``."""
    b, s = input_ids.shape
    if cu_seqlens is None:
        return torch.arange(s, device=input_ids.device).expand(b, s)
    t = torch.arange(b * s, device=input_ids.device, dtype=torch.int32)
    doc = torch.searchsorted(cu_seqlens, t, right=True) - 1  # the (non-empty) document holding token t
    return (t - cu_seqlens[doc]).long().view(b, s)
