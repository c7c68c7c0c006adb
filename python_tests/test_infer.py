"""k2.infer engine: cached generation equals recomputing the full forward at every step (greedy, prompts of
different lengths batched, more prompts than slots: the model's prefill and its mla_decode steps over the cache);
the cache holds exactly kv_lora_rank + qk_rope_head_dim values per token per layer and they are the
model's latents; log-probs, seeded sampling independent of batching, stops, limits, abort."""

from __future__ import annotations

import pytest
import torch

from k2.data.tokenizer import ByteTokenizer
from k2.infer import Engine, LatentCache, SamplingParams
from k2.model import Transformer, presets

YARN = {
    "type": "yarn",
    "factor": 8.0,
    "original_max_position_embeddings": 32,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}
VARIANTS = {"tiny": {}, "no_q_lora+yarn": {"q_lora_rank": None, "rope_scaling": YARN}}


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed: int = 0, **changes) -> Transformer:
    """A random tiny model with a non-zero router bias and a sharpened LM head (clear argmax margins)."""
    torch.manual_seed(seed)
    model = Transformer(presets.tiny().replace(**changes)).eval()
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.05)
        model.lm_head.weight.mul_(20)
    return model


def _prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


def _full_forward_greedy(model, prompt, steps):
    """Oracle: recompute the whole sequence every step (no cache), greedy; tokens and their log-probs."""
    ids, lps = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids]))[0, -1].float()
            tok = int(logits.argmax())
            lps.append(float(torch.log_softmax(logits, -1)[tok]))
            ids.append(tok)
    return ids[len(prompt) :], lps


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_greedy_equals_full_forward(variant):
    model = _model(**VARIANTS[variant])
    prompts = _prompts([7, 1, 23, 12, 3])
    engine = Engine(model, max_batch_size=3, max_seq_len=64)  # 5 prompts, 3 slots
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=10, temperature=0))
    for prompt, out in zip(prompts, outs, strict=True):
        tokens, lps = _full_forward_greedy(model, prompt, 10)
        assert out.token_ids == tokens
        torch.testing.assert_close(torch.tensor(out.logprobs), torch.tensor(lps), atol=1e-4, rtol=0)
        assert out.finish_reason == "length"
    assert not engine.has_unfinished() and engine.cache.lengths == [0, 0, 0]


def test_cache_holds_only_the_latent_and_it_is_the_models():
    model = _model()
    c = model.config
    engine = Engine(model, max_batch_size=2, max_seq_len=32)
    assert engine.cache.kv.shape == (c.num_hidden_layers, 2, 32, c.kv_lora_rank + c.qk_rope_head_dim)
    assert engine.cache.values_per_token == c.num_hidden_layers * (c.kv_lora_rank + c.qk_rope_head_dim)
    assert engine.cache.bytes_per_token == engine.cache.values_per_token * 4
    assert engine.cache.kv.numel() == 2 * 32 * engine.cache.values_per_token  # nothing else is cached

    prompt = _prompts([9])[0]
    engine.add_request(prompt, SamplingParams(max_new_tokens=4, temperature=0))
    tokens = []
    for _ in range(3):  # prefill + 2 decode steps: 9 + 2 tokens cached, the 3rd sampled token not yet
        tokens += [ev.token_id for ev in engine.step()]
    seq = torch.tensor([prompt + tokens[:2]])
    latents = {}  # layer -> [S, r] after kv_a_layernorm, captured from a plain forward

    def hook(i):
        return lambda mod, args, out: latents.__setitem__(i, out[0])

    handles = [a.kv_a_layernorm.register_forward_hook(hook(i)) for i, a in enumerate(model.attention_layers())]
    with torch.no_grad():
        model(seq)
    for h in handles:
        h.remove()
    assert engine.cache.lengths[0] == 11
    for i in range(c.num_hidden_layers):
        cached = engine.cache.kv[i, 0, :11, : c.kv_lora_rank]
        torch.testing.assert_close(cached, latents[i], atol=1e-5, rtol=1e-5)


def test_cache_bind_gives_each_row_its_visible_length():
    cache = LatentCache(presets.tiny(), num_slots=3, max_len=8)
    cache.bind(1, starts=[0, 0], num_new=4, valid=[4, 2])  # prefill: row 1's prompt is 2 tokens + 2 padding
    r, dr = cache.kv_lora_rank, cache.qk_rope_head_dim
    kv, lengths = cache.update(0, torch.ones(2, 4, r), torch.full((2, 4, dr), 2.0))
    assert kv.shape == (2, 4, r + dr) and lengths.dtype == torch.int32 and lengths.tolist() == [4, 2]
    assert cache.lengths == [0, 4, 2]
    assert torch.equal(cache.kv[0, 1:3, :4, :r], torch.ones(2, 4, r)) and cache.kv[0, 0].abs().sum() == 0
    cache.bind(1, starts=[4, 2], num_new=1)  # decode: row 1's new token at position 2 overwrites the padding
    kv, lengths = cache.update(0, torch.full((2, 1, r), 3.0), torch.zeros(2, 1, dr))
    assert kv.shape == (2, 5, r + dr) and lengths.tolist() == [5, 3]
    assert cache.kv[0, 2, 2, 0] == 3.0 and cache.kv[0, 2, 3, 0] == 1.0 and cache.kv[0, 1, 4, 0] == 3.0
    with pytest.raises(ValueError, match="max_len"):
        cache.bind(0, starts=[8], num_new=1)


def test_seeded_sampling_is_independent_of_batching():
    model = _model()
    prompts = _prompts([5, 11, 3])
    params = [SamplingParams(max_new_tokens=8, temperature=0.8, top_p=0.9, top_k=50, seed=s) for s in (1, 2, 3)]
    together = Engine(model, max_batch_size=3, max_seq_len=32).generate(prompts, params)
    single = Engine(model, max_batch_size=1, max_seq_len=32)
    alone = [single.generate([p], sp)[0] for p, sp in zip(prompts, params, strict=True)]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    again = Engine(model, max_batch_size=3, max_seq_len=32).generate(prompts, params)
    assert [o.token_ids for o in again] == [o.token_ids for o in together]
    other_seed = Engine(model, max_batch_size=1, max_seq_len=32).generate([prompts[1]], params[0])[0]
    assert other_seed.token_ids != together[1].token_ids  # a different seed gives a different sample


def test_stop_token_stop_string_and_limits():
    model = _model()
    tok = ByteTokenizer()
    engine = Engine(model, tok, max_batch_size=2, max_seq_len=24)
    prompt = _prompts([6])[0]
    free = engine.generate([prompt], SamplingParams(max_new_tokens=12, temperature=0))[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 12
    assert free.text == tok.decode(free.token_ids)

    stop_tok = free.token_ids[4]
    first = free.token_ids.index(stop_tok)
    out = engine.generate([prompt], SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=(stop_tok,)))[0]
    assert out.finish_reason == "stop" and out.token_ids == free.token_ids[: first + 1]
    assert out.text == tok.decode(free.token_ids[:first])  # the stop token is not in the text

    text = free.text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = text.find(stop)
    out = engine.generate([prompt], SamplingParams(max_new_tokens=12, temperature=0, stop=(stop,)))[0]
    assert out.finish_reason == "stop" and out.text == text[:cut]
    assert free.token_ids[: len(out.token_ids)] == out.token_ids

    long_prompt = _prompts([20])[0]  # 20 + 4 = max_seq_len: the slot fills before max_new_tokens
    out = engine.generate([long_prompt], SamplingParams(max_new_tokens=10, temperature=0))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 4
    with pytest.raises(ValueError, match="no room"):
        engine.add_request(_prompts([24])[0])
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([])
    with pytest.raises(ValueError, match="vocabulary"):
        engine.add_request([512])
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)


def test_abort_frees_the_slot_and_others_continue():
    model = _model()
    engine = Engine(model, max_batch_size=2, max_seq_len=32)
    prompts = _prompts([4, 9])
    a = engine.add_request(prompts[0], SamplingParams(max_new_tokens=6, temperature=0))
    b = engine.add_request(prompts[1], SamplingParams(max_new_tokens=6, temperature=0))
    got = {a: [], b: []}
    for ev in engine.step() + engine.step():
        got[ev.request_id].append(ev.token_id)
    assert engine.abort(a) and engine.num_running == 1 and engine.cache.lengths[1] == 0
    while engine.has_unfinished():
        for ev in engine.step():
            got[ev.request_id].append(ev.token_id)
    assert got[b] == _full_forward_greedy(model, prompts[1], 6)[0]  # b moved to slot 0 and kept its cache
    assert not engine.abort(a)


def test_top_logprobs_are_the_model_distribution():
    model = _model()
    prompt = _prompts([5])[0]
    out = Engine(model, max_seq_len=16).generate([prompt], SamplingParams(max_new_tokens=1, top_logprobs=3))[0]
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([prompt]))[0, -1].float(), -1)
    top = ref.topk(3)
    assert [t for t, _ in out.top_logprobs[0]] == top.indices.tolist()
    torch.testing.assert_close(torch.tensor([lp for _, lp in out.top_logprobs[0]]), top.values, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.logprobs[0], float(ref[out.token_ids[0]]), atol=1e-4, rtol=0)
