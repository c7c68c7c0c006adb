"""k2.model: MLA paths agree, max logits equal a brute-force oracle, MoE equals a per-expert loop, the chunked loss
equals plain cross-entropy (value and gradients), every parameter gets a gradient, balancing and presets behave.
(Equality with transformers' DeepseekV3 is in test_hf.py.)"""

from __future__ import annotations

import json
import time

import pytest
import torch
import torch.nn.functional as F

from k2.errors import ConfigError
from k2.model import ModelConfig, Transformer, count_parameters, document_layout, presets
from k2.model.loss import linear_cross_entropy
from k2.model.moe import Experts, MoE
from k2.model.rope import apply_rope

YARN = {
    "type": "yarn",
    "factor": 8.0,
    "original_max_position_embeddings": 32,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}
VARIANTS = {
    "tiny": {},
    "no_q_lora+yarn": {"q_lora_rank": None, "rope_scaling": YARN},
    "groups+softmax": {"n_group": 4, "topk_group": 2, "scoring_func": "softmax"},
}


def _model(seed: int = 0, **changes) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(presets.tiny().replace(**changes))
    with torch.no_grad():  # a non-zero bias so selection differs from plain top-k of the scores
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.05)
    return model


class DenseCache:
    """The latent-cache protocol over one preallocated ``[B, T_max, r + dr]`` buffer per layer, every row at the same
    length (test oracle)."""

    def __init__(self, model: Transformer, batch: int, max_len: int) -> None:
        c = model.config
        width = c.kv_lora_rank + c.qk_rope_head_dim
        self.kv = [torch.zeros(batch, max_len, width) for _ in range(c.num_hidden_layers)]
        self.length = [0] * c.num_hidden_layers

    def update(self, layer_idx, c_kv, k_rope):
        start = self.length[layer_idx]
        end = start + c_kv.shape[1]
        self.kv[layer_idx][:, start:end] = torch.cat((c_kv, k_rope), -1)
        self.length[layer_idx] = end
        return self.kv[layer_idx][:, :end], torch.full((c_kv.shape[0],), end, dtype=torch.int32)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cache_prefill_then_decode_equals_full_forward(variant):
    """Prefill (expanded path, ``mla_attention``) then one token at a time (absorbed path, ``mla_decode``) give the
    logits of one full forward: the two attention paths are the same function."""
    model = _model(**VARIANTS[variant]).eval()
    x = torch.randint(0, 512, (2, 20))
    with torch.no_grad():
        full = model(x)
        cache = DenseCache(model, 2, 20)
        steps = [model(x[:, :12], positions=torch.arange(12).expand(2, -1), cache=cache)]  # expanded path
        for s in range(12, 20):  # S == 1: absorbed path
            steps.append(model(x[:, s : s + 1], positions=torch.full((2, 1), s), cache=cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=2e-5, rtol=2e-5)


def test_a_cached_forward_of_several_tokens_must_start_at_zero():
    model = _model().eval()
    x = torch.randint(0, 512, (1, 8))
    cache = DenseCache(model, 1, 16)
    with torch.no_grad():
        model(x[:, :4], positions=torch.arange(4)[None], cache=cache)
        with pytest.raises(ValueError, match="must start at position 0"):
            model(x[:, 4:], positions=torch.arange(4, 8)[None], cache=cache)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_packed_documents_equal_separate_rows(variant):
    """Three documents packed in one row with ``cu_seqlens`` (positions restarting per document) give each
    document's logits, loss and max logits alone: no token attends across a boundary."""
    model = _model(**VARIANTS[variant])
    docs = [torch.randint(0, 512, (n,)) for n in (5, 1, 9)]
    positions, cu = document_layout([[5, 1, 9]], 15)
    assert cu.tolist() == [0, 5, 6, 15] and positions[0].tolist() == [*range(5), 0, *range(9)]
    packed = torch.cat(docs)[None]  # [1, 15]
    model.train()
    with torch.no_grad():
        got = model(packed, cu_seqlens=cu)  # positions derived from cu_seqlens
        got_max = model.max_attention_logits().clone()
        model.reset_max_attention_logits()
        alone = torch.cat([model(d[None])[0] for d in docs])
        want_max = model.max_attention_logits()
        torch.testing.assert_close(model(packed, positions, cu_seqlens=cu), got)
    torch.testing.assert_close(got[0], alone, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(got_max, want_max, atol=1e-5, rtol=1e-5)
    labels = torch.randint(0, 512, (1, 15))
    labels[0, 4] = labels[0, 5] = -100  # the last token of a document has no target inside it
    model.eval()
    with torch.no_grad():
        packed_loss = model.loss(packed, labels, cu_seqlens=cu)
        targets = labels[0].split([5, 1, 9])
        sums = [F.cross_entropy(model(d[None])[0], t, reduction="sum") for d, t in zip(docs, targets, strict=True)]
    torch.testing.assert_close(packed_loss, torch.stack(sums).sum() / (labels != -100).sum(), atol=1e-5, rtol=1e-5)


def test_document_layout_pads_rows_and_rejects_overflow():
    positions, cu = document_layout([[3], [2, 2]], 5)
    assert cu.tolist() == [0, 3, 5, 7, 9, 10] and positions.tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 0]]
    with pytest.raises(ValueError, match="row 0"):
        document_layout([[4, 2]], 5)


def _brute_force_max_logits(model: Transformer, x: torch.Tensor, amp: torch.dtype | None = None) -> torch.Tensor:
    """Recompute every layer's q·k from the weights with an explicit causal mask, via forward pre-hooks (q and k
    under the same autocast as the model's forward and rounded to its dtype, their products in fp32)."""
    rows = []

    def hook(attn, args):
        h, cos, sin = args[:3]
        b, s, _ = h.shape
        q = attn.q_proj(h) if attn.q_lora_rank is None else attn.q_b_proj(attn.q_a_layernorm(attn.q_a_proj(h)))
        q = q.view(b, s, attn.num_heads, -1)
        q_nope, q_rope = q[..., : attn.qk_nope_head_dim], apply_rope(q[..., attn.qk_nope_head_dim :], cos, sin)
        kv = attn.kv_a_proj_with_mqa(h)
        c_kv, k_rope = (
            attn.kv_a_layernorm(kv[..., : attn.kv_lora_rank]),
            apply_rope(kv[..., attn.kv_lora_rank :], cos, sin),
        )
        k_nope = attn.kv_b_proj(c_kv).view(b, s, attn.num_heads, -1)[..., : attn.qk_nope_head_dim]
        # The attention's inputs are q and k in the autocast dtype (as SDPA's), their products fp32.
        q_nope, q_rope, k_nope, k_rope = (t.to(amp or torch.float32) for t in (q_nope, q_rope, k_nope, k_rope))
        with torch.autocast("cpu", enabled=False):
            q_nope, q_rope, k_nope, k_rope = q_nope.float(), q_rope.float(), k_nope.float(), k_rope.float()
            logits = torch.einsum("bshd,bthd->bhst", q_nope, k_nope) + torch.einsum("bshd,btd->bhst", q_rope, k_rope)
        logits = logits * attn.softmax_scale
        causal = torch.ones(s, s, dtype=torch.bool).tril()
        rows.append(logits.masked_fill(~causal, float("-inf")).amax(dim=(0, 2, 3)))

    handles = [attn.register_forward_pre_hook(hook) for attn in model.attention_layers()]
    with torch.no_grad(), torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
        model(x)
    for h in handles:
        h.remove()
    return torch.stack(rows)


def test_max_attention_logits_match_brute_force():
    model = _model(rope_scaling=YARN)
    with torch.no_grad():  # make some heads produce large logits, at different positions
        model.layers[1].self_attn.q_b_proj.weight.mul_(8.0)
    x = torch.randint(0, 512, (3, 17))
    model.train()
    model(x)
    got = model.max_attention_logits()
    assert got.shape == (4, 4) and got.dtype == torch.float32
    torch.testing.assert_close(got, _brute_force_max_logits(model, x), atol=1e-4, rtol=1e-4)


def test_max_logits_are_fp32_under_bf16_autocast():
    """Under bf16 autocast the logits QK-Clip judges are the fp32 products of the bf16 q and k, not bf16-rounded
    (rounding moves a logit near τ by up to 2^-9 of itself: a head just above τ could escape the clip)."""
    model = _model()
    with torch.no_grad():
        model.layers[1].self_attn.q_b_proj.weight.mul_(8.0)
    x = torch.randint(0, 512, (2, 17))
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
    got = model.max_attention_logits()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, _brute_force_max_logits(model, x, torch.bfloat16), atol=1e-5, rtol=1e-5)


def test_router_scores_are_fp32_under_bf16_autocast():
    """The router's GEMM stays fp32 under autocast: same scores, expert choice and weights as without it."""
    moe = _model().layers[1].mlp
    x = torch.randn(64, moe.gate.weight.shape[1])
    ids, weights, scores = moe.gate(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ids_amp, weights_amp, scores_amp = moe.gate(x)
    assert scores_amp.dtype == weights_amp.dtype == torch.float32
    assert torch.equal(ids_amp, ids) and torch.equal(scores_amp, scores) and torch.equal(weights_amp, weights)


def test_max_logits_respect_causal_mask_and_switches():
    model = _model()
    x = torch.randint(0, 512, (1, 16))
    model.train()
    model(x)
    causal = model.max_attention_logits().clone()
    model.reset_max_attention_logits()
    model(x[:, :8])  # the prefix sees a subset of the same (query, key) pairs
    assert torch.all(model.max_attention_logits() <= causal + 1e-5)
    # Only the last key differs: queries before it cannot see it, so the recorded max of the prefix is stable.
    y = x.clone()
    y[0, -1] = (x[0, -1] + 1) % 512
    model.reset_max_attention_logits()
    model(x[:, :15])
    before = model.max_attention_logits().clone()
    model.reset_max_attention_logits()
    model(y[:, :15])
    torch.testing.assert_close(model.max_attention_logits(), before)
    model.eval()
    model(y)  # eval: nothing recorded
    torch.testing.assert_close(model.max_attention_logits(), before)
    model.train()
    model.record_max_logits(False)
    model(y)
    torch.testing.assert_close(model.max_attention_logits(), before)


def _per_expert_loop(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The MoE layer as a plain loop over experts (transformers' eager layout)."""
    x_td = x.reshape(-1, x.shape[-1])
    ids, weights, _ = moe.gate(x_td)
    out = torch.zeros_like(x_td)
    for e in range(moe.num_experts):
        tok, slot = torch.where(ids == e)
        if tok.numel() == 0:
            continue
        h = x_td[tok]
        y = F.linear(
            F.silu(F.linear(h, moe.experts.w_gate[e])) * F.linear(h, moe.experts.w_up[e]), moe.experts.w_down[e]
        )
        out.index_add_(0, tok, y * weights[tok, slot, None])
    return (out + moe.shared_experts(x_td)).view_as(x)


@pytest.mark.parametrize("few_rows", [0, 1 << 30], ids=["grouped_gemm", "few_tokens"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_moe_equals_per_expert_loop(variant, few_rows, monkeypatch):
    """Both expert paths (permute + grouped GEMMs; the small-token-count loop of a decode step) equal the oracle."""
    monkeypatch.setattr(Experts, "FEW_ROWS", few_rows)
    model = _model(**VARIANTS[variant])
    moe = model.layers[1].mlp
    with torch.no_grad():  # starve two experts so that some receive no tokens
        moe.gate.e_score_correction_bias[:2] = -10.0
    x = torch.randn(2, 7, 128, requires_grad=True)
    y = moe(x)
    assert moe.tokens_per_expert[:2].sum() == 0 and moe.tokens_per_expert.sum() == 14 * 2
    x_ref = x.detach().clone().requires_grad_()
    y_ref = _per_expert_loop(moe, x_ref)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(y.square().sum(), [x, moe.experts.w_gate, moe.gate.weight])
    grads_ref = torch.autograd.grad(y_ref.square().sum(), [x_ref, moe.experts.w_gate, moe.gate.weight])
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)
    assert torch.count_nonzero(grads[1][:2]) == 0


def test_every_parameter_gets_a_gradient():
    model = _model(aux_loss_alpha=0.01)
    model.train()
    x = torch.randint(0, 512, (2, 33))
    model.loss(x[:, :-1], x[:, 1:]).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    # Every routed expert that received tokens has a non-zero gradient.
    for moe in model.moe_layers():
        used = moe.tokens_per_expert > 0
        assert torch.all(moe.experts.w_up.grad[used].abs().sum(dim=(1, 2)) > 0)


def test_loss_equals_cross_entropy_of_logits():
    model = _model().train()
    x = torch.randint(0, 512, (2, 30))
    labels = x[:, 1:].clone()
    labels[0, :5] = -100
    loss = model.loss(x[:, :-1], labels, chunk_elements=512 * 7)  # several chunks, a partial last one
    grads = torch.autograd.grad(loss, list(model.parameters()))
    ref = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), labels.flatten(), ignore_index=-100)
    grads_ref = torch.autograd.grad(ref, list(model.parameters()))
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, atol=1e-6, rtol=1e-5)


def test_linear_cross_entropy_bf16_and_all_ignored():
    torch.manual_seed(0)
    h, w = torch.randn(10, 16, dtype=torch.bfloat16), torch.randn(300, 16, dtype=torch.bfloat16)
    labels = torch.randint(0, 300, (10,))
    ref = F.cross_entropy((h @ w.t()).float(), labels)
    torch.testing.assert_close(linear_cross_entropy(h, w, labels, chunk_elements=900), ref, atol=1e-4, rtol=1e-4)
    assert linear_cross_entropy(h, w, torch.full((10,), -100)).item() == 0.0


def test_linear_cross_entropy_without_grad_does_only_the_forward_gemm():
    """Evaluation under no_grad: the LM head costs one [N, D]x[D, V] GEMM (2·N·D·V flops), not the three of a
    training forward that also forms dh and dW."""
    from torch.utils.flop_counter import FlopCounterMode

    n, d, v = 40, 16, 96
    h, w = torch.randn(n, d, requires_grad=True), torch.randn(v, d, requires_grad=True)
    labels = torch.randint(0, v, (n,))
    for grad, gemms in ((False, 1), (True, 3)):
        with torch.set_grad_enabled(grad), FlopCounterMode(display=False) as counter:
            loss = linear_cross_entropy(h, w, labels, chunk_elements=v * 16)
        assert counter.get_total_flops() == gemms * 2 * n * d * v
        torch.testing.assert_close(loss, F.cross_entropy(h.detach() @ w.detach().t(), labels))


def test_aux_loss_and_expert_bias_update():
    model = _model(aux_loss_alpha=0.1).train()
    x = torch.randint(0, 512, (2, 16))
    model(x)
    aux = model.aux_loss()
    moe = model.layers[1].mlp
    assert aux is not None and aux.item() > 0 and moe.aux_loss is not None
    load = model.expert_load()
    assert load.shape == (3, 8) and torch.all(load.sum(1) == 2 * 16 * 2)
    bias_before = torch.stack([m.gate.e_score_correction_bias.clone() for m in model.moe_layers()])
    model.update_expert_bias(0.01)
    delta = torch.stack([m.gate.e_score_correction_bias for m in model.moe_layers()]) - bias_before
    expected = 0.01 * torch.sign(load.float().mean(1, keepdim=True) - load.float())
    torch.testing.assert_close(delta, expected)
    model.eval()
    model.update_expert_bias(0.01)  # no-op in eval
    torch.testing.assert_close(
        torch.stack([m.gate.e_score_correction_bias for m in model.moe_layers()]) - bias_before, expected
    )
    model.eval()
    model(x)
    assert model.aux_loss() is None


def test_sequence_aux_loss_formula():
    model = _model(aux_loss_alpha=0.5)
    moe = model.layers[1].mlp
    scores = torch.rand(2, 5, 8)
    ids = scores.topk(2, dim=-1).indices
    expected = 0.0
    for b in range(2):
        p = (scores[b] / scores[b].sum(-1, keepdim=True)).mean(0)
        f = torch.stack([(ids[b] == e).sum() for e in range(8)]).float() * 8 / (2 * 5)
        expected += (f * p).sum() / 2
    torch.testing.assert_close(moe.sequence_aux_loss(scores, ids), 0.5 * expected)


def test_bf16_forward_backward_keeps_fp32_buffers():
    model = _model().to(torch.bfloat16).train()
    x = torch.randint(0, 512, (2, 16))
    loss = model.loss(x[:, :-1], x[:, 1:])
    loss.backward()
    assert torch.isfinite(loss)
    assert model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    assert model.max_attention_logits().dtype == torch.float32


@pytest.mark.parametrize("name", ["kimi_k2", "deepseek_v3", "moonlight"])
def test_real_presets_build_on_meta_with_expected_counts(name):
    config = presets.get(name)
    start = time.perf_counter()
    with torch.device("meta"):
        model = Transformer(config)
    assert time.perf_counter() - start < 30
    assert model.config is config
    assert sum(p.numel() for p in model.parameters()) == count_parameters(config).total
    attn = model.layers[0].self_attn
    q_weight = attn.q_proj.weight if config.q_lora_rank is None else attn.q_b_proj.weight
    assert q_weight.view(attn.num_heads, 192, -1).shape[2] == (config.q_lora_rank or config.hidden_size)
    assert attn.kv_b_proj.weight.view(attn.num_heads, 256, attn.kv_lora_rank).shape[0] == config.num_attention_heads


def test_parameter_counts_of_kimi_k2():
    count = count_parameters(presets.kimi_k2())
    assert abs(count.total / 1e12 - 1.026) < 0.001
    assert abs(count.activated / 1e9 - 32.86) < 0.01
    tiny = presets.tiny()
    assert count_parameters(tiny).total == sum(p.numel() for p in Transformer(tiny).parameters())


def test_kimi_k2_softmax_scale_and_yarn_frequencies():
    from k2.model.rope import rope_frequencies

    config = presets.kimi_k2()
    assert config.softmax_scale == pytest.approx(0.13086, abs=1e-5)  # 192^-0.5 · (0.1·ln 32 + 1)^2
    inv_freq, multiplier = rope_frequencies(config)
    base = [50000.0 ** (-2 * i / 64) for i in range(32)]
    assert multiplier == 1.0
    # Kimi-K2's YaRN (factor 32, beta_fast 32): pairs 0–19 keep the base frequency
    assert inv_freq[:20] == pytest.approx(base[:20])
    assert inv_freq[20:] == pytest.approx([f / 32 for f in base[20:]])  # pairs 20–31 are divided by 32


def test_presets_and_config_round_trip():
    assert presets.names()[:2] == ["tiny", "small"]
    with pytest.raises(ConfigError, match="known presets: tiny, small"):
        presets.get("nope")
    for name in presets.names():
        config = presets.get(name)
        assert ModelConfig.from_dict(config.to_dict()) == config
    total = count_parameters(presets.small()).total
    assert 100e6 <= total <= 300e6
    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        presets.tiny().replace(num_experts_per_tok=9)


def test_config_accepts_rope_parameters_key():
    d = presets.kimi_k2().to_dict()
    rope = d.pop("rope_scaling")
    d["rope_parameters"] = {
        "rope_type": "yarn",
        "rope_theta": d.pop("rope_theta"),
        **{k: v for k, v in rope.items() if k != "type"},
    }
    assert ModelConfig.from_dict(d) == presets.kimi_k2()


def test_requires_positions_with_cache():
    model = _model().eval()
    with pytest.raises(ValueError, match="positions"):
        model(torch.zeros(1, 1, dtype=torch.long), cache=DenseCache(model, 1, 4))


def test_cli_info_preset_prints_counts(capsys):
    from k2.cli import main

    assert main(["info", "--preset", "kimi_k2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    expected = count_parameters(presets.kimi_k2())
    assert out["total"] == expected.total and out["activated"] == expected.activated
    assert main(["info", "--preset", "nope"]) == 2
    assert "known presets" in capsys.readouterr().err
