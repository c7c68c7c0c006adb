"""``ModelConfig``: the MLA + MoE architecture, with the field names and meanings of the DeepSeek-V3 / Kimi-K2
``config.json`` (the released Kimi-K2 / DeepSeek-V3 configs), so a checkpoint's config maps onto it key by key.

``rope_scaling`` uses the DeepSeek dict (``{"type": "yarn", "factor", "original_max_position_embeddings",
"beta_fast", "beta_slow", "mscale", "mscale_all_dim"}``) or None for plain RoPE. ``from_dict`` also accepts the
``rope_parameters`` dict that current transformers writes. Fields that k2 adds (not in the HF config):
``aux_loss_alpha`` is DeepSeek's name for the sequence-wise balance loss coefficient (0 disables it) and
``initializer_range`` the init std.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from k2.errors import ConfigError

_SCORING = ("sigmoid", "softmax")
_ROPE_SCALING_KEYS = (
    "type",
    "factor",
    "original_max_position_embeddings",
    "beta_fast",
    "beta_slow",
    "mscale",
    "mscale_all_dim",
)


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """An MLA + MoE decoder (DeepSeek-V3 family; Kimi K2, Moonlight and DeepSeek-V3 are instances)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense MLP width (first_k_dense_replace layers)
    moe_intermediate_size: int  # per-expert FFN width F
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int | None  # None: direct q_proj (Moonlight)
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    num_experts_per_tok: int
    n_shared_experts: int = 1
    first_k_dense_replace: int = 1
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    scoring_func: str = "sigmoid"
    norm_topk_prob: bool = True
    aux_loss_alpha: float = 0.0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    initializer_range: float = 0.02
    model_type: str = field(default="deepseek_v3", compare=False)  # a family label; save_hf writes deepseek_v3
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # other config.json keys, kept for save

    def __post_init__(self) -> None:
        positive = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "moe_intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "kv_lora_rank",
            "qk_rope_head_dim",
            "v_head_dim",
            "n_routed_experts",
            "num_experts_per_tok",
            "n_group",
            "topk_group",
        )
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"ModelConfig.{name} must be a positive int, got {getattr(self, name)!r}")
        if self.q_lora_rank is not None and self.q_lora_rank < 1:
            raise ConfigError(f"ModelConfig.q_lora_rank must be None or >= 1, got {self.q_lora_rank}")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"ModelConfig.qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ConfigError(
                f"ModelConfig.num_experts_per_tok ({self.num_experts_per_tok}) exceeds n_routed_experts "
                f"({self.n_routed_experts})"
            )
        if self.n_routed_experts % self.n_group or self.topk_group > self.n_group:
            raise ConfigError(
                f"ModelConfig: n_group ({self.n_group}) must divide n_routed_experts ({self.n_routed_experts}) and "
                f"topk_group ({self.topk_group}) must be <= n_group"
            )
        if self.n_group > 1 and self.topk_group * (self.n_routed_experts // self.n_group) < self.num_experts_per_tok:
            raise ConfigError("ModelConfig: topk_group groups hold fewer experts than num_experts_per_tok")
        if self.scoring_func not in _SCORING:
            raise ConfigError(f"ModelConfig.scoring_func must be one of {_SCORING}, got {self.scoring_func!r}")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise ConfigError(f"ModelConfig.first_k_dense_replace out of range: {self.first_k_dense_replace}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if kind != "yarn":
                raise ConfigError(f"ModelConfig.rope_scaling: only YaRN is supported, got type {kind!r}")
            for key in ("factor", "original_max_position_embeddings"):
                if key not in self.rope_scaling:
                    raise ConfigError(f"ModelConfig.rope_scaling needs {key!r}, got {self.rope_scaling}")

    # ---- derived sizes ---------------------------------------------------------------------------------------

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace

    @property
    def softmax_scale(self) -> float:
        """``qk_head_dim^-0.5``, times ``mscale(factor, mscale_all_dim)^2`` under YaRN (DeepSeek-V3 code)."""
        scale = self.qk_head_dim**-0.5
        if self.rope_scaling is not None:
            mscale_all_dim = self.rope_scaling.get("mscale_all_dim") or 0.0
            factor = float(self.rope_scaling["factor"])
            if mscale_all_dim and factor > 1:
                m = 0.1 * mscale_all_dim * math.log(factor) + 1.0
                scale *= m * m
        return scale

    # ---- (de)serialisation ------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field (``extra`` included as a nested dict)."""
        out = dataclasses.asdict(self)
        if out["rope_scaling"] is not None:
            out["rope_scaling"] = dict(out["rope_scaling"])
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from ``to_dict()`` output or a DeepSeek-V3 / Kimi-K2 / Moonlight ``config.json`` dict.

        Accepts ``rope_theta`` + ``rope_scaling`` (older checkpoints) or ``rope_parameters`` (transformers 5).
        Keys that are not fields go to ``extra`` (so ``save_hf`` can write them back); unknown k2 keys inside
        ``extra`` are kept as-is.
        """
        d = dict(d)
        names = {f.name for f in dataclasses.fields(cls)}
        rope_params = d.pop("rope_parameters", None)
        if rope_params:
            rope_params = dict(rope_params)
            d.setdefault("rope_theta", rope_params.pop("rope_theta", 10000.0))
            kind = rope_params.pop("rope_type", rope_params.pop("type", "default"))
            if kind not in ("default", None) and not d.get("rope_scaling"):
                d["rope_scaling"] = {"type": kind, **rope_params}
        rope_scaling = d.get("rope_scaling")
        if rope_scaling:
            rs = dict(rope_scaling)
            rs["type"] = rs.pop("rope_type", rs.get("type"))
            if rs["type"] == "default":
                d["rope_scaling"] = None
            else:
                d["rope_scaling"] = {k: v for k, v in rs.items() if k in _ROPE_SCALING_KEYS or v is not None}
        else:
            d["rope_scaling"] = None
        if isinstance(d.get("eos_token_id"), list):
            d["eos_token_id"] = d["eos_token_id"][0] if d["eos_token_id"] else None
        extra = dict(d.pop("extra", None) or {})
        extra.update({k: v for k, v in d.items() if k not in names})
        kwargs = {k: v for k, v in d.items() if k in names and k != "extra" and v is not None}
        if d.get("q_lora_rank", 0) is None:
            kwargs["q_lora_rank"] = None
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in kwargs
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
            and f.name != "q_lora_rank"
        ]
        if "q_lora_rank" not in kwargs and "q_lora_rank" not in d:
            missing.append("q_lora_rank")
        if missing:
            raise ConfigError(f"ModelConfig.from_dict: missing required keys {missing}")
        kwargs.setdefault("q_lora_rank", None)
        try:
            return cls(**kwargs, extra=extra)
        except TypeError as e:
            raise ConfigError(f"ModelConfig.from_dict: {e}") from e

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)
