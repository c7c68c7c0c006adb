"""Named model configurations: the released Kimi K2, Moonlight and DeepSeek-V3 configs, and two small ones.

The real configs copy the public ``config.json`` values (moonshotai/Kimi-K2-Instruct for Kimi K2; Moonlight-16B-A3B and
DeepSeek-V3 from their Hugging Face repos). ``Transformer(kimi_k2())`` is meant for the meta device.
``tiny`` (~1.5M parameters, vocab 512 for the built-in byte tokenizer) trains on a CPU in minutes; ``small``
(~0.23B total, ~52M activated) is the CPU benchmark and a quick-experiment size. Both keep the K2 shape:
one dense layer first, sigmoid routing with the aux-loss-free bias, a shared expert, query LoRA.
"""

from __future__ import annotations

from collections.abc import Callable

from k2.errors import ConfigError
from k2.model.config import ModelConfig


def kimi_k2() -> ModelConfig:
    """Kimi-K2-Base / -Instruct (July 2025): 61 layers, 64 heads, 384 experts (8 active + 1 shared)."""
    return ModelConfig(
        model_type="kimi_k2",
        vocab_size=163840,
        hidden_size=7168,
        intermediate_size=18432,
        moe_intermediate_size=2048,
        num_hidden_layers=61,
        num_attention_heads=64,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        n_routed_experts=384,
        num_experts_per_tok=8,
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=2.827,
        scoring_func="sigmoid",
        norm_topk_prob=True,
        aux_loss_alpha=0.001,
        rms_norm_eps=1e-6,
        rope_theta=50000.0,
        rope_scaling={
            "type": "yarn",
            "factor": 32.0,
            "original_max_position_embeddings": 4096,
            "beta_fast": 1.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        max_position_embeddings=131072,
        bos_token_id=163584,
        eos_token_id=163585,
    )


def deepseek_v3() -> ModelConfig:
    """DeepSeek-V3 / V3-0324: 61 layers (3 dense), 128 heads, 256 experts in 8 groups (top-4 groups, 8 active)."""
    return ModelConfig(
        model_type="deepseek_v3",
        vocab_size=129280,
        hidden_size=7168,
        intermediate_size=18432,
        moe_intermediate_size=2048,
        num_hidden_layers=61,
        num_attention_heads=128,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        n_routed_experts=256,
        num_experts_per_tok=8,
        n_shared_experts=1,
        first_k_dense_replace=3,
        n_group=8,
        topk_group=4,
        routed_scaling_factor=2.5,
        scoring_func="sigmoid",
        norm_topk_prob=True,
        aux_loss_alpha=0.001,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        rope_scaling={
            "type": "yarn",
            "factor": 40.0,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        max_position_embeddings=163840,
        bos_token_id=0,
        eos_token_id=1,
    )


def moonlight() -> ModelConfig:
    """Moonlight-16B-A3B: 27 layers, 16 heads, no query LoRA, 64 experts (6 active + 2 shared), Muon-trained."""
    return ModelConfig(
        model_type="deepseek_v3",
        vocab_size=163840,
        hidden_size=2048,
        intermediate_size=11264,
        moe_intermediate_size=1408,
        num_hidden_layers=27,
        num_attention_heads=16,
        q_lora_rank=None,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        n_routed_experts=64,
        num_experts_per_tok=6,
        n_shared_experts=2,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=2.446,
        scoring_func="sigmoid",
        norm_topk_prob=True,
        aux_loss_alpha=0.001,
        rms_norm_eps=1e-5,
        rope_theta=50000.0,
        rope_scaling=None,
        max_position_embeddings=8192,
        bos_token_id=163584,
        eos_token_id=163585,
    )


def tiny() -> ModelConfig:
    """~1.5M parameters, vocab 512 (the built-in byte tokenizer): 4 layers, 8 experts (2 active + 1 shared)."""
    return ModelConfig(
        model_type="kimi_k2",
        vocab_size=512,
        hidden_size=128,
        intermediate_size=384,
        moe_intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        q_lora_rank=64,
        kv_lora_rank=32,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        routed_scaling_factor=1.0,
        rope_theta=10000.0,
        max_position_embeddings=1024,
    )


def small() -> ModelConfig:
    """~0.23B total / ~52M activated: 8 layers, hidden 768, 32 experts (4 active + 1 shared), vocab 512."""
    return ModelConfig(
        model_type="kimi_k2",
        vocab_size=512,
        hidden_size=768,
        intermediate_size=2048,
        moe_intermediate_size=384,
        num_hidden_layers=8,
        num_attention_heads=12,
        q_lora_rank=384,
        kv_lora_rank=256,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        n_routed_experts=32,
        num_experts_per_tok=4,
        n_shared_experts=1,
        first_k_dense_replace=1,
        routed_scaling_factor=2.0,
        rope_theta=10000.0,
        max_position_embeddings=4096,
    )


_PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "tiny": tiny,
    "small": small,
    "moonlight": moonlight,
    "deepseek_v3": deepseek_v3,
    "kimi_k2": kimi_k2,
}


def names() -> list[str]:
    """Names accepted by :func:`get`, smallest first."""
    return list(_PRESETS)


def get(name: str) -> ModelConfig:
    """The preset called ``name``; raises ``ConfigError`` naming the known presets otherwise."""
    try:
        return _PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown model preset {name!r}; known presets: {', '.join(_PRESETS)}") from None
