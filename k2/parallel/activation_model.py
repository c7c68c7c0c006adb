"""The bytes a ``k2.model.Block`` saves for backward, per token, from its ``ModelConfig`` and the activation-memory
options of ``k2.parallel.activations`` — the model a planner reads to fit micro-batches into device memory.

It lists the tensors each operation of the block saves (as autograd saves them in ``k2.model``: a Linear keeps
its input, RMSNorm its fp32 input, ``rsqrt`` and normalised value, SwiGLU its gate, up and ``silu(gate)``, the
attention op q, k, v, o and the log-sum-exp, the router its fp32 scores and routing weights, the MoE permutation
its row map), each storage once, and applies the options exactly as ``apply_activation_memory`` does. Per-batch
tensors (expert offsets, ``cu_seqlens``: a few bytes per sequence) and the final norm / LM head are left out.
``act_bytes`` is the activations' element size: 4 for an fp32 model, 2 for a bf16 one (weights in bf16; RMSNorm
and the router still compute in fp32). Routing assumes ``norm_topk_prob`` (every released config); the routed
experts' tensors count ``num_experts_per_tok`` copies per token whatever the balance.

``tools/bench_memory.py`` and the tests compare it with the bytes measured through the saved-tensor hooks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from k2.model.config import ModelConfig
from k2.parallel.activations import FP8, RECOMPUTE


@dataclass(frozen=True)
class LayerBytes:
    """Saved bytes per token of one layer: kept on the device (FP8 tiles and scales included) and offloaded."""

    device: float
    offloaded: float

    @property
    def total(self) -> float:
        return self.device + self.offloaded


def _fp8_bytes(n: int) -> int:
    """An ``n``-wide row as E4M3 plus one fp32 scale per 128 values."""
    return n + 4 * math.ceil(n / 128)


def layer_saved_bytes(
    config: ModelConfig,
    layer_idx: int,
    *,
    act_bytes: int = 4,
    recompute: Iterable[str] = (),
    fp8_activations: Iterable[str] = (),
    offload: bool = False,
    routed_copies: float | None = None,
) -> LayerBytes:
    """Bytes per token that layer ``layer_idx``'s forward saves for backward, with the given options.
    ``routed_copies``: the token copies per token the layer's routed experts hold (default ``num_experts_per_tok``;
    more on the busiest rank of an expert-parallel group with uneven load, as a planner asks)."""
    recompute, fp8 = frozenset(recompute), frozenset(fp8_activations)
    if recompute - set(RECOMPUTE) or fp8 - set(FP8):
        raise ValueError(
            f"layer_saved_bytes: unknown options {sorted(recompute - set(RECOMPUTE))} {sorted(fp8 - set(FP8))}"
        )
    c, e = config, act_bytes
    d, h, dn, dr, dv, r = (
        c.hidden_size,
        c.num_attention_heads,
        c.qk_nope_head_dim,
        c.qk_rope_head_dim,
        c.v_head_dim,
        c.kv_lora_rank,
    )
    kept: dict[str, float] = {}  # storage → bytes (full precision)
    small: dict[str, float] = {}  # storage → bytes (FP8 kept on the device)
    if "layer" in recompute:  # the block's inputs only: the hidden state and RoPE's cos/sin
        kept = {"x": e * d, "cos_sin": e * dr}
        return _place(kept, small, offload)
    norm = "norm" in recompute

    def rms_norm(name: str, n: int, source: str, source_bytes: float) -> None:
        """An RMSNorm over ``n`` values of storage ``source``: its fp32 input, rsqrt and normalised value, or (when
        recomputed) its input storage only. Its output is counted by whoever saves it."""
        if norm:
            kept[source] = source_bytes
            return
        if e == 4:
            kept[source] = source_bytes  # x.float() is x itself
        else:
            kept[f"{name}.fp32"] = 4 * n
        kept[f"{name}.rsqrt"] = 4
        kept[f"{name}.normed"] = e * n

    def output(name: str, nbytes: float) -> None:
        if not norm:  # a recomputed norm's output is recomputed for its savers
            kept[name] = nbytes

    # ---- attention half
    rms_norm("input_layernorm", d, "x", e * d)
    output("input_layernorm.out", e * d)  # q_a_proj / q_proj and kv_a_proj inputs
    if c.q_lora_rank is not None:
        qr = c.q_lora_rank
        rms_norm("q_a_layernorm", qr, "q_a.out", e * qr)
        output("q_a_layernorm.out", e * qr)  # q_b_proj input
    kept["cos_sin"] = e * dr
    rms_norm("kv_a_layernorm", r, "kv_a.out", e * (r + dr))  # c_kv is a view of kv_a's [r + dr] output
    output("kv_a_layernorm.out", e * r)  # kv_b_proj input (mla_up_proj: the region's input)
    if "mla_up_proj" in recompute:
        if c.q_lora_rank is not None:
            kept["q_rope"] = e * h * dr  # the region's inputs besides the recomputed q_b_proj output
        else:
            kept["q_proj.out"] = e * h * (dn + dr)  # q_nope is a view of q_proj's output
            kept["q_rope"] = e * h * dr
        kept["k_rope"] = e * dr
    else:
        kept["q"] = e * h * (dn + dr)
        kept["k"] = e * h * (dn + dr)
        kept["kv_b.out"] = e * h * (dn + dv)  # v is a view of it
    if "attention" not in recompute:
        kept["o"] = e * h * dv
        kept["lse"] = 4 * h

    # ---- feed-forward half
    rms_norm("post_attention_layernorm", d, "h", e * d)
    moe = c.is_moe_layer(layer_idx)
    ffn_width = c.moe_intermediate_size * c.n_shared_experts if moe else c.intermediate_size
    if e == 4 or ffn_width > 0:
        output("post_attention_layernorm.out", e * d)  # router (fp32: its x.float() is x), shared / dense MLP
    if moe:
        k, n_exp = c.num_experts_per_tok, c.n_routed_experts
        if e != 4:
            kept["router.fp32_in"] = 4 * d
        kept["router"] = 4 * n_exp + 8 * k + 4 + 4 * k + 4 * k + 4 * k  # scores, ids, norm, weights ×2, row map
        if c.aux_loss_alpha > 0:
            kept["aux_loss"] = 4  # the scores' per-token sum (the sequence-wise balance loss)
        copies = k if routed_copies is None else routed_copies  # the routed experts' token copies
        if "moe_up_proj_input" in fp8:
            small["x_sorted"] = copies * _fp8_bytes(d)
        else:
            kept["x_sorted"] = copies * e * d
        _swiglu("experts", copies, c.moe_intermediate_size, e, recompute, fp8, kept, small)
        if "moe_down_proj" not in recompute:
            kept["y_sorted"] = copies * e * d
    if ffn_width > 0:
        _swiglu("mlp", 1, ffn_width, e, recompute, fp8, kept, small)
    return _place(kept, small, offload)


def _swiglu(
    name: str,
    copies: float,
    f: int,
    e: int,
    recompute: frozenset[str],
    fp8: frozenset[str],
    kept: dict[str, float],
    small: dict[str, float],
) -> None:
    """gate and up (SwiGLU's inputs), silu(gate) and the product (the down projection's input)."""
    for part in ("gate", "up"):
        if "swiglu_input" in fp8:
            small[f"{name}.{part}"] = copies * _fp8_bytes(f)
        else:
            kept[f"{name}.{part}"] = copies * e * f
    if "swiglu" not in recompute:
        kept[f"{name}.silu"] = copies * e * f
        kept[f"{name}.act"] = copies * e * f


def _place(kept: dict[str, float], small: dict[str, float], offload: bool) -> LayerBytes:
    full, fp8 = sum(kept.values()), sum(small.values())
    return LayerBytes(device=fp8, offloaded=full) if offload else LayerBytes(device=full + fp8, offloaded=0.0)


def model_saved_bytes(
    config: ModelConfig,
    tokens: int,
    *,
    act_bytes: int = 4,
    recompute: Iterable[str] = (),
    fp8_activations: Iterable[str] = (),
    offload: bool = False,
) -> LayerBytes:
    """Bytes all layers save for a micro-batch of ``tokens`` tokens (the blocks only; see the module docstring)."""
    layers = [
        layer_saved_bytes(
            config, i, act_bytes=act_bytes, recompute=recompute, fp8_activations=fp8_activations, offload=offload
        )
        for i in range(config.num_hidden_layers)
    ]
    return LayerBytes(
        device=tokens * sum(b.device for b in layers), offloaded=tokens * sum(b.offloaded for b in layers)
    )
