"""MuonClip: the Muon/AdamW split, AdamW against torch.optim.AdamW, state round-trip, and QK-Clip on k2's MLA
(with and without query LoRA) and on a Llama-style MHA/GQA module implementing the documented protocol."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from k2.model import Transformer, presets
from k2.optim import MuonClip, qk_clip_

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(**overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(dataclasses.replace(presets.tiny(), **overrides))


def _batch(vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, vocab, (2, 33), generator=torch.Generator().manual_seed(seed))
    return ids[:, :-1], ids[:, 1:]


def _forward_backward(model: nn.Module, batch) -> None:
    model.zero_grad()
    model.loss(*batch).backward()


def test_from_model_splits_parameters():
    model = _tiny()
    opt = MuonClip.from_model(model, lr=1e-3)
    muon = {n for g in opt.param_groups if g["use_muon"] for n in g["param_names"]}
    adamw = {n for g in opt.param_groups if not g["use_muon"] for n in g["param_names"]}
    params = dict(model.named_parameters())
    assert muon | adamw == set(params) and not muon & adamw
    assert {"embed_tokens.weight", "lm_head.weight", "norm.weight"} <= adamw
    assert all(params[n].dim() >= 2 for n in muon)
    assert "layers.1.mlp.experts.w_gate" in muon and params["layers.1.mlp.experts.w_gate"].dim() == 3
    assert "layers.0.self_attn.kv_b_proj.weight" in muon and "layers.1.mlp.gate.weight" in muon
    assert all("layernorm" in n or n == "norm.weight" for n in adamw - {"embed_tokens.weight", "lm_head.weight"})
    assert len(opt.attention) == model.config.num_hidden_layers


def test_router_bias_is_not_trained():
    model = _tiny()
    opt = MuonClip.from_model(model, lr=1e-2)
    before = {n: b.clone() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")}
    assert before
    _forward_backward(model, _batch(512))
    opt.step()
    for n, b in model.named_buffers():
        if n in before:
            assert torch.equal(b, before[n])
    # a port that made it a parameter: dropped from the groups
    bias = nn.Parameter(torch.zeros(8))
    opt = MuonClip([("mlp.gate.e_score_correction_bias", bias), ("w", nn.Parameter(torch.zeros(4, 4)))])
    assert all(p is not bias for g in opt.param_groups for p in g["params"])


def test_group_override_and_unnamed_params():
    emb, vec = nn.Parameter(torch.randn(16, 8)), nn.Parameter(torch.randn(8))
    opt = MuonClip([{"params": [emb], "use_muon": False}, {"params": [vec]}])
    assert [(g["use_muon"], len(g["params"])) for g in opt.param_groups] == [(False, 1), (False, 1)]
    opt = MuonClip([emb, vec])  # unnamed: by shape only
    assert [(g["use_muon"], g["params"][0] is emb) for g in opt.param_groups] == [(True, True), (False, False)]


def test_adamw_half_equals_torch_adamw():
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(32, 16, generator=gen), torch.randn(16, generator=gen)]
    ours = [nn.Parameter(t.clone()) for t in init]
    theirs = [nn.Parameter(t.clone()) for t in init]
    opt = MuonClip([("embed_tokens.weight", ours[0]), ("norm.weight", ours[1])], lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW(theirs, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for _ in range(4):
        grads = [torch.randn(t.shape, generator=gen) for t in init]
        for p, q, g in zip(ours, theirs, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    for p, q in zip(ours, theirs, strict=True):
        torch.testing.assert_close(p, q, rtol=1.3e-6, atol=1e-5)


def test_state_dict_round_trip():
    batches = [_batch(512, seed) for seed in range(4)]

    def train(split: bool) -> Transformer:
        model = _tiny()
        opt = MuonClip.from_model(model, lr=3e-3, qk_clip_tau=0.1)
        for step, batch in enumerate(batches):
            if split and step == 2:
                state = opt.state_dict()
                opt = MuonClip.from_model(model, lr=1.0, qk_clip_tau=0.1)
                opt.load_state_dict(state)
            _forward_backward(model, batch)
            opt.step()
        return model

    straight, resumed = train(False), train(True)
    for (n, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), n


def _tau_between(logits: torch.Tensor) -> float:
    """A τ that some heads of every layer exceed and others do not."""
    return float(logits.median())


def _layer_inputs(model: Transformer) -> list[tuple]:
    """Forward pre-hooks that keep each attention layer's inputs of the next forward."""
    captured = []
    for attn in model.attention_layers():
        attn.register_forward_pre_hook(lambda mod, args, kw: captured.append((mod, args, kw)), with_kwargs=True)
    return captured


@pytest.mark.parametrize("q_lora_rank", [64, None])
def test_mla_clip_brings_clipped_heads_to_tau(q_lora_rank):
    # Each layer is re-run on the very inputs it saw before the step (clipping layer l changes layer l+1's input,
    # so a whole-model forward would not isolate QK-Clip's effect on a layer).
    model = _tiny(q_lora_rank=q_lora_rank)
    inputs = _layer_inputs(model)
    _forward_backward(model, _batch(512))
    before = model.max_attention_logits().clone()  # [L, H]
    tau = _tau_between(before)
    opt = MuonClip.from_model(model, lr=0.0, qk_clip_tau=tau)  # lr 0: the update is the identity
    opt.step()
    clipped = before > tau
    assert clipped.any() and (~clipped).any()
    assert torch.equal(opt.last_qk_clip["clipped_heads"], clipped.sum(1))
    torch.testing.assert_close(opt.last_qk_clip["max_logit"], before.amax(1))
    with torch.no_grad():
        for attn, args, kw in list(inputs):
            attn(*args, **kw)
    after = model.max_attention_logits()
    torch.testing.assert_close(after[clipped], torch.full_like(after[clipped], tau), rtol=1e-3, atol=0)
    torch.testing.assert_close(after[~clipped], before[~clipped], rtol=1e-6, atol=0)


@pytest.mark.parametrize("q_lora_rank", [64, None])
def test_mla_clip_touches_only_clipped_heads(q_lora_rank):
    batch = _batch(512, seed=1)
    models, opts = [], []
    for tau in (None, 1.0):
        model = _tiny(q_lora_rank=q_lora_rank)
        _forward_backward(model, batch)
        models.append(model)
        opts.append(MuonClip.from_model(model, lr=3e-3, qk_clip_tau=tau))
    logits = models[0].max_attention_logits().clone()
    opts[1].qk_clip_tau = _tau_between(logits)
    for opt in opts:
        opt.step()
    plain, clipped_model = (dict(m.named_parameters()) for m in models)
    cfg = models[0].config
    h, dn, dr, dv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    q_name = "q_b_proj" if q_lora_rank else "q_proj"
    touched = set()
    for layer in range(cfg.num_hidden_layers):
        gamma = torch.where(logits[layer] > opts[1].qk_clip_tau, opts[1].qk_clip_tau / logits[layer], 1.0)
        root = gamma.sqrt()[:, None, None]
        for name, rows, scale in (
            (q_name, slice(0, dn), root),
            (q_name, slice(dn, dn + dr), gamma[:, None, None]),
            ("kv_b_proj", slice(0, dn), root),
            ("kv_b_proj", slice(dn, dn + dv), torch.ones(h, 1, 1)),
        ):
            key = f"layers.{layer}.self_attn.{name}.weight"
            touched.add(key)
            a = plain[key].detach().view(h, -1, plain[key].shape[-1])[:, rows]
            b = clipped_model[key].detach().view(h, -1, plain[key].shape[-1])[:, rows]
            keep = gamma == 1
            assert torch.equal(a[keep], b[keep]), key  # unclipped heads and value rows: bit-identical
            torch.testing.assert_close(b[~keep], (a * scale)[~keep], rtol=1e-6, atol=0)
    for key in plain.keys() - touched:  # q_a_proj, kv_a_proj_with_mqa (shared rope key), norms, MLPs...
        assert torch.equal(plain[key], clipped_model[key]), key


# ---- MHA / GQA through the documented protocol ---------------------------------------------------------------


class LlamaAttention(nn.Module):
    """A Llama-style attention implementing the QK-Clip protocol: ``max_logits [H]``, ``q_proj``/``k_proj``
    (head-major rows, with biases), ``num_heads``, ``num_key_value_heads``, ``head_dim``; RoPE on the full head."""

    def __init__(self, dim: int, num_heads: int, num_key_value_heads: int) -> None:
        super().__init__()
        self.num_heads, self.num_key_value_heads, self.head_dim = num_heads, num_key_value_heads, dim // num_heads
        self.q_proj = nn.Linear(dim, num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(dim, num_key_value_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(dim, num_key_value_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * self.head_dim, dim, bias=False)
        self.register_buffer("max_logits", torch.full((num_heads,), float("-inf")), persistent=False)

    def _rope(self, x: torch.Tensor) -> torch.Tensor:  # x [B, H, S, d]
        s, d = x.shape[2], self.head_dim
        angle = torch.arange(s)[:, None] / 100.0 ** (torch.arange(0, d, 2) / d)  # [S, d/2]
        x1, x2 = x[..., ::2], x[..., 1::2]
        return torch.stack((x1 * angle.cos() - x2 * angle.sin(), x1 * angle.sin() + x2 * angle.cos()), -1).flatten(-2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, S, D]
        b, s, _ = x.shape
        q = self._rope(self.q_proj(x).view(b, s, self.num_heads, -1).transpose(1, 2))  # [B, H, S, d]
        k = self._rope(self.k_proj(x).view(b, s, self.num_key_value_heads, -1).transpose(1, 2))
        v = self.v_proj(x).view(b, s, self.num_key_value_heads, -1).transpose(1, 2)
        group = self.num_heads // self.num_key_value_heads
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        logits = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)  # [B, H, S, S]
        logits = logits.masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf"))
        if self.training:
            self.max_logits = logits.detach().amax(dim=(0, 2, 3))
        return self.o_proj((logits.softmax(-1) @ v).transpose(1, 2).flatten(2))


@pytest.mark.parametrize("num_key_value_heads", [4, 2], ids=["mha", "gqa"])
def test_mha_protocol_clip(num_key_value_heads):
    torch.manual_seed(0)
    attn = LlamaAttention(32, 4, num_key_value_heads)
    with torch.no_grad():
        attn.q_proj.weight.mul_(torch.tensor([4.0, 1.0, 3.0, 0.5]).repeat_interleave(8)[:, None])
    x = torch.randn(2, 12, 32)
    attn(x).square().mean().backward()
    before = attn.max_logits.clone()
    tau = float(before.median())
    q0, k0, qb0, kb0 = (
        t.detach().clone() for t in (attn.q_proj.weight, attn.k_proj.weight, attn.q_proj.bias, attn.k_proj.bias)
    )
    opt = MuonClip(list(attn.named_parameters()), lr=0.0, qk_clip_tau=tau, attention=[attn])
    opt.step()
    clipped = before > tau
    assert clipped.any() and (~clipped).any()
    attn(x)
    torch.testing.assert_close(attn.max_logits[clipped], torch.full((int(clipped.sum()),), tau), rtol=1e-3, atol=0)
    torch.testing.assert_close(attn.max_logits[~clipped], before[~clipped], rtol=1e-6, atol=0)
    gamma = torch.where(clipped, tau / before, 1.0)
    q_scale = gamma.sqrt() if num_key_value_heads == 4 else gamma  # GQA: the whole factor on the query
    rows = q_scale.repeat_interleave(8)
    torch.testing.assert_close(attn.q_proj.weight.detach(), q0 * rows[:, None], rtol=1e-6, atol=0)
    torch.testing.assert_close(attn.q_proj.bias.detach(), qb0 * rows, rtol=1e-6, atol=0)
    k_rows = gamma.sqrt().repeat_interleave(8) if num_key_value_heads == 4 else torch.ones(16)
    torch.testing.assert_close(attn.k_proj.weight.detach(), k0 * k_rows[:, None], rtol=1e-6, atol=0)
    torch.testing.assert_close(attn.k_proj.bias.detach(), kb0 * k_rows, rtol=1e-6, atol=0)


def test_report_without_attention_is_empty():
    opt = MuonClip([nn.Parameter(torch.randn(4, 4))], qk_clip_tau=1.0)
    opt.param_groups[0]["params"][0].grad = torch.randn(4, 4)
    opt.step()
    assert opt.last_qk_clip["max_logit"].numel() == 0 and opt.last_qk_clip["clipped_heads"].numel() == 0
    assert qk_clip_([], 1.0)["clipped_heads"].numel() == 0


def test_unrecorded_heads_are_not_clipped():
    attn = LlamaAttention(16, 2, 2)  # never ran forward: max_logits is −inf
    w = attn.q_proj.weight.detach().clone()
    report = qk_clip_([attn], 1.0)
    assert torch.equal(attn.q_proj.weight.detach(), w) and report["clipped_heads"].tolist() == [0]
    with pytest.raises(ValueError, match="tau must be > 0"):
        qk_clip_([attn], 0.0)


def _qk_weights(model: Transformer) -> list[torch.Tensor]:
    return [w.detach().clone() for n, w in model.named_parameters() if "q_b_proj" in n or "kv_b_proj" in n]


def test_a_step_without_a_forward_does_not_clip_again():
    """The recorded logits are consumed by the step that clips from them: a second step with no training forward
    in between (recording off, DCP's dummy step) leaves q/k untouched instead of shrinking the same heads again."""
    model = _tiny()
    _forward_backward(model, _batch(512))
    tau = _tau_between(model.max_attention_logits())
    opt = MuonClip.from_model(model, lr=0.0, qk_clip_tau=tau)  # lr 0: only QK-Clip changes weights
    before = _qk_weights(model)
    opt.step()
    once = _qk_weights(model)
    assert any(not torch.equal(a, b) for a, b in zip(before, once, strict=True))
    assert torch.isneginf(model.max_attention_logits()).all()  # consumed
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(once, _qk_weights(model), strict=True))
    assert opt.last_qk_clip["clipped_heads"].sum() == 0


def test_max_logits_are_a_running_max_over_the_forwards_of_a_step():
    """Gradient accumulation: the step sees the max over every micro-batch, not only the last one's."""
    model = _tiny()
    per_batch = []
    for seed in (0, 1):
        model.loss(*_batch(512, seed))
        per_batch.append(model.max_attention_logits().clone())
        model.reset_max_attention_logits()
    assert not torch.equal(per_batch[0], per_batch[1])
    for seed in (0, 1):
        model.loss(*_batch(512, seed))
    torch.testing.assert_close(model.max_attention_logits(), torch.maximum(*per_batch), rtol=0, atol=0)


def test_add_param_group_applies_the_split():
    mat, vec, mat2 = (nn.Parameter(torch.randn(*s)) for s in ((8, 4), (4,), (6, 4)))
    opt = MuonClip([("w", mat)], lr=1e-2)
    opt.add_param_group({"params": [("norm.weight", vec), ("w2", mat2)], "lr": 5e-3})
    added = [(g["use_muon"], g["params"], g["lr"]) for g in opt.param_groups[1:]]
    assert added == [(True, [mat2], 5e-3), (False, [vec], 5e-3)]
    ref_vec = nn.Parameter(vec.detach().clone())
    ref = torch.optim.AdamW([ref_vec], lr=5e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for p in (mat, vec, mat2):
        p.grad = torch.randn(p.shape)
    ref_vec.grad = vec.grad.clone()
    opt.step()  # the vector takes the AdamW path (it used to hit Muon and fail with an IndexError)
    ref.step()
    torch.testing.assert_close(vec, ref_vec, rtol=1.3e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"Muon parameters must be matrices .* shape \(4,\)"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(4))], "use_muon": True})
    assert len(opt.param_groups) == 3  # the rejected group was not added
