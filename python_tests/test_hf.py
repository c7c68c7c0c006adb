"""Hugging Face interop: k2 → save_hf → transformers' DeepseekV3ForCausalLM and transformers → save_pretrained →
load_hf give the same logits (fp32, 1e-4), across query LoRA on/off, YaRN on/off, grouped routing, both config
spellings of RoPE; sharding, atomic replacement, FP8 checkpoints and the one-error report."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import k2.ops
from k2.errors import CheckpointError
from k2.model import Transformer, load_hf, presets, save_hf

YARN = {
    "type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 256,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}
VARIANTS = {
    "q_lora": {},
    "no_q_lora+yarn": {"q_lora_rank": None, "rope_scaling": YARN},
    "q_lora+yarn+groups": {"rope_scaling": YARN, "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5},
}


def _k2_model(seed=0, **changes) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(presets.tiny().replace(max_position_embeddings=1024, **changes)).eval()
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.05)
        for attn in model.attention_layers():  # non-unit norm gains, so a swapped norm would show
            attn.kv_a_layernorm.weight.uniform_(0.5, 1.5)
    return model


def _ids(seed=1, shape=(2, 48)):
    return torch.randint(0, 512, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_k2_checkpoint_loads_in_transformers(tmp_path, variant):
    from transformers import DeepseekV3ForCausalLM

    model = _k2_model(**VARIANTS[variant])
    save_hf(model, tmp_path / "ckpt", dtype=torch.float32)
    hf = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).eval()
    x = _ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, atol=1e-4, rtol=1e-4)
        assert torch.equal(load_hf(tmp_path / "ckpt")(x), model(x))


def _hf_config(q_lora_rank, rope, n_group=1, topk_group=1, num_mtp_layers=0):
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=160,
        moe_intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=q_lora_rank,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=n_group,
        topk_group=topk_group,
        routed_scaling_factor=2.0,
        max_position_embeddings=1024,
        rope_parameters=rope,
        num_mtp_layers=num_mtp_layers,
    )


HF_VARIANTS = {
    "q_lora": dict(q_lora_rank=24, rope={"rope_type": "default", "rope_theta": 10000.0}),
    "no_q_lora+yarn": dict(
        q_lora_rank=None,
        rope={"rope_type": "yarn", "rope_theta": 50000.0, **{k: v for k, v in YARN.items() if k != "type"}},
    ),
    "groups": dict(q_lora_rank=24, rope={"rope_type": "default", "rope_theta": 10000.0}, n_group=4, topk_group=2),
}


@pytest.mark.parametrize("variant", list(HF_VARIANTS))
def test_transformers_checkpoint_loads_in_k2(tmp_path, variant):
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(0)
    hf = DeepseekV3ForCausalLM(_hf_config(**HF_VARIANTS[variant])).eval()
    with torch.no_grad():
        for layer in hf.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    hf.save_pretrained(tmp_path / "hf")
    model = load_hf(tmp_path / "hf")
    x = _ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, atol=1e-4, rtol=1e-4)


def test_legacy_rope_scaling_keys(tmp_path):
    """Older checkpoints (Kimi-K2, DeepSeek-V3 on the Hub) spell RoPE as rope_theta + rope_scaling."""
    model = _k2_model(rope_scaling=YARN, rope_theta=50000.0)
    save_hf(model, tmp_path / "ckpt", dtype=torch.float32)
    config_file = tmp_path / "ckpt" / "config.json"
    config = json.loads(config_file.read_text())
    rope = config.pop("rope_parameters")
    assert config["rope_theta"] == 50000.0 and config["rope_scaling"]["type"] == "yarn" and rope["rope_type"] == "yarn"
    config_file.write_text(json.dumps(config))
    loaded = load_hf(tmp_path / "ckpt")
    assert loaded.config == model.config
    x = _ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)


def test_sharded_save_replaces_atomically(tmp_path):
    model = _k2_model()
    target = tmp_path / "ckpt"
    save_hf(model, target, max_shard_size="400KB", dtype=torch.bfloat16)
    index = json.loads((target / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    shard = load_file(target / files[-1])
    assert all(t.dtype in (torch.bfloat16, torch.float32) for t in shard.values())
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in index["weight_map"]
    assert (
        load_file(target / index["weight_map"]["model.layers.1.mlp.gate.e_score_correction_bias"])[
            "model.layers.1.mlp.gate.e_score_correction_bias"
        ].dtype
        == torch.float32
    )
    loaded = load_hf(target)
    assert loaded.embed_tokens.weight.dtype == torch.bfloat16
    torch.testing.assert_close(
        loaded.layers[1].mlp.experts.w_down.float(), model.layers[1].mlp.experts.w_down.bfloat16().float()
    )
    # Replace the existing checkpoint with a different model; nothing of the old one or of temp dirs remains.
    other = _k2_model(seed=5)
    save_hf(other, target, dtype=torch.float32)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    assert sorted(os.listdir(target)) == [
        "config.json",
        "model-00001-of-00001.safetensors",
        "model.safetensors.index.json",
    ]
    torch.testing.assert_close(load_hf(target).lm_head.weight, other.lm_head.weight, atol=0, rtol=0)


def test_mtp_layer_is_skipped(tmp_path):
    model = _k2_model()
    save_hf(model, tmp_path / "ckpt", dtype=torch.float32)
    file = tmp_path / "ckpt" / "model-00001-of-00001.safetensors"
    tensors = load_file(file)
    tensors["model.layers.4.eh_proj.weight"] = torch.zeros(4, 4)  # DeepSeek-V3's MTP layer (index = n_layers)
    save_file(tensors, file, metadata={"format": "pt"})
    index_file = tmp_path / "ckpt" / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"]["model.layers.4.eh_proj.weight"] = file.name
    index_file.write_text(json.dumps(index))
    load_hf(tmp_path / "ckpt")


def test_mismatches_are_reported_in_one_error(tmp_path):
    model = _k2_model()
    save_hf(model, tmp_path / "ckpt", dtype=torch.float32)
    file = tmp_path / "ckpt" / "model-00001-of-00001.safetensors"
    tensors = load_file(file)
    del tensors["model.layers.2.mlp.experts.3.up_proj.weight"]
    tensors["model.layers.0.self_attn.q_a_proj.weight"] = torch.zeros(3, 3)
    tensors["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    save_file(tensors, file, metadata={"format": "pt"})
    (tmp_path / "ckpt" / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError) as info:
        load_hf(tmp_path / "ckpt")
    message = str(info.value)
    assert "missing (1): model.layers.2.mlp.experts.3.up_proj.weight" in message
    assert "unexpected (1): model.layers.0.self_attn.extra.weight" in message
    assert "mis-shaped (1): model.layers.0.self_attn.q_a_proj.weight: checkpoint (3, 3), model (64, 128)" in message


def test_missing_config_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match=r"config\.json not found"):
        load_hf(tmp_path)


def _quantize_reference(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 128×128 block quantisation written out: scale = amax / 448 per block."""
    rows, cols = w.shape
    pad = torch.zeros(-(-rows // 128) * 128, -(-cols // 128) * 128)
    pad[:rows, :cols] = w
    blocks = pad.view(pad.shape[0] // 128, 128, pad.shape[1] // 128, 128)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
    q = (blocks / scale[:, None, :, None]).view_as(pad)[:rows, :cols].to(torch.float8_e4m3fn)
    return q, scale


def test_fp8_checkpoint_written_by_hand_dequantizes(tmp_path):
    model = _k2_model(hidden_size=256, intermediate_size=320, moe_intermediate_size=160)
    save_hf(model, tmp_path / "ckpt", dtype=torch.float32)
    file = tmp_path / "ckpt" / "model-00001-of-00001.safetensors"
    tensors = load_file(file)
    name = "model.layers.1.mlp.experts.2.down_proj.weight"  # [256, 160]: a partial block on each axis
    q, scale = _quantize_reference(tensors[name])
    tensors[name], tensors[f"{name}_scale_inv"] = q, scale
    save_file(tensors, file, metadata={"format": "pt"})
    (tmp_path / "ckpt" / "model.safetensors.index.json").unlink()
    loaded = load_hf(tmp_path / "ckpt")
    expected = q.float() * scale.repeat_interleave(128, 0)[:256].repeat_interleave(128, 1)[:, :160]
    torch.testing.assert_close(loaded.layers[1].mlp.experts.w_down[2], expected, atol=0, rtol=0)


def test_fp8_save_load_round_trip(tmp_path):
    model = _k2_model(hidden_size=256, intermediate_size=320, moe_intermediate_size=160)
    save_hf(model, tmp_path / "ckpt", fp8=True, dtype=torch.bfloat16)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    tensors = load_file(tmp_path / "ckpt" / "model-00001-of-00001.safetensors")
    assert tensors["model.layers.1.mlp.experts.0.gate_proj.weight"].dtype == torch.float8_e4m3fn
    assert tensors["model.layers.1.mlp.experts.0.gate_proj.weight_scale_inv"].shape == (2, 2)
    assert (
        tensors["lm_head.weight"].dtype == torch.bfloat16
        and tensors["model.layers.1.mlp.gate.weight"].dtype == torch.bfloat16
    )
    loaded = load_hf(tmp_path / "ckpt", dtype=torch.float32)
    # Oracle: quantised tensors come back as dequantize(quantize(w)) exactly, the others as bf16(w).
    expected = {}
    for name, p_ref in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("w_gate", "w_up", "w_down") or (name.endswith("_proj.weight") and "lm_head" not in name):
            q, scale_inv = k2.ops.quantize_128x128(p_ref.detach())
            expected[name] = k2.ops.dequantize_128x128(q, scale_inv, out_dtype=torch.float32)
        else:
            expected[name] = p_ref.detach().bfloat16().float()
    for name, p in loaded.named_parameters():
        torch.testing.assert_close(p, expected[name], atol=0, rtol=0, msg=name)
        assert (p - dict(model.named_parameters())[name]).norm() < 0.05 * p.norm(), name  # E4M3: 3 mantissa bits


def test_default_save_keeps_the_model_dtype(tmp_path):
    """save_hf with no dtype stores the model's own dtype (as save_pretrained): an fp32 model comes back with the
    same logits through transformers and through load_hf (a bf16 default would move them by ~1e-2)."""
    from transformers import DeepseekV3ForCausalLM

    model = _k2_model()
    save_hf(model, tmp_path / "fp32")
    assert json.loads((tmp_path / "fp32" / "config.json").read_text())["torch_dtype"] == "float32"
    x = _ids()
    with torch.no_grad():
        expected = model(x)
        hf = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "fp32").eval()
        assert hf.dtype == torch.float32
        torch.testing.assert_close(hf(x).logits, expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(load_hf(tmp_path / "fp32")(x), expected)
    save_hf(model.to(torch.bfloat16), tmp_path / "bf16")  # a bf16 model stays bf16
    assert load_hf(tmp_path / "bf16").embed_tokens.weight.dtype == torch.bfloat16
