"""Decode throughput and cache size of k2's engine against transformers' ``generate`` with identical weights.

For each preset: a random k2 model (non-zero router bias) is saved with ``save_hf`` (fp32), then loaded by
``k2.model.load_hf`` and by ``DeepseekV3ForCausalLM.from_pretrained``. Both decode greedily from the same
``--batch`` random prompts of ``--prompt-len`` tokens for ``--new-tokens`` tokens:

- k2: ``k2.infer.Engine`` (latent cache, prefill through the expanded path, absorbed-attention decode steps);
  decode time = all steps after the prefill step;
- transformers: ``model.generate(do_sample=False, min_new_tokens=N)`` (its default dynamic KV cache);
  decode time = time(N new tokens) − time(1 new token).

Decode tokens/s = batch · (N − 1) / decode time; the best of ``--repeats`` alternating runs of each (the CPU may be
shared). Cache bytes per token: k2's ``LatentCache.bytes_per_token`` (L · (kv_lora_rank + qk_rope_head_dim)
values) and the bytes of transformers' returned ``past_key_values`` divided by batch · cached length. The greedy
tokens of both are compared.

``--schema``: instead, the cost of constrained decoding (``k2.infer.grammar``, llguidance). For each preset and each
``--schema-batches`` size, the same random model decodes the same prompt (a chat turn, ``ByteTokenizer``) for
``--new-tokens`` tokens at temperature 1 with per-request seeds, free and under a JSON schema (an array of at least
10^6 records with a string, an integer, a number, an enum and a boolean each, so the grammar never completes and every
step is masked). Decode tokens/s as above and the ratio constrained / free; the grammar's own cost per decode step
(the batch's masks, ``GrammarCompiler.allowed``, plus advancing every matcher) is also timed alone, since on a shared
CPU it is smaller than the noise of the forwards.
Usage:

    python tools/bench_infer.py --presets tiny small --batch 1 --new-tokens 64 --json out.json
    python tools/bench_infer.py --presets tiny --schema --schema-batches 1 8 --new-tokens 128 --json schema.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from k2.data import chat
from k2.data.tokenizer import ByteTokenizer
from k2.infer import Engine, SamplingParams
from k2.infer.grammar import Grammar, GrammarCompiler, json_schema
from k2.model import Transformer, load_hf, presets, save_hf

RECORDS = {
    "type": "array",
    "minItems": 1_000_000,
    "items": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "count": {"type": "integer", "minimum": 0, "maximum": 10_000},
            "score": {"type": "number"},
            "kind": {"enum": ["alpha", "beta", "gamma"]},
            "ok": {"type": "boolean"},
        },
        "required": ["name", "count", "score", "kind", "ok"],
        "additionalProperties": False,
    },
}


def _k2_decode(engine: Engine, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
    ids = [engine.add_request(p, SamplingParams(max_new_tokens=new_tokens, temperature=0)) for p in prompts]
    out: dict[str, list[int]] = {i: [] for i in ids}
    for ev in engine.step():  # prefill (all prompts fit one step)
        out[ev.request_id].append(ev.token_id)
    start = time.perf_counter()
    while engine.has_unfinished():
        for ev in engine.step():
            out[ev.request_id].append(ev.token_id)
    return time.perf_counter() - start, [out[i] for i in ids]


def _hf_generate(hf, x: torch.Tensor, new_tokens: int):
    start = time.perf_counter()
    out = hf.generate(
        x,
        attention_mask=torch.ones_like(x),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    return time.perf_counter() - start, out


def _cache_bytes(past) -> int:
    layers = getattr(past, "layers", None)
    if layers is not None:
        tensors = [t for layer in layers for t in (layer.keys, layer.values) if t is not None]
    else:
        tensors = [t for layer in past for t in layer]
    return sum(t.numel() * t.element_size() for t in tensors)


def bench_preset(name: str, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(0)
    model = Transformer(presets.get(name))
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.05)
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(model, Path(tmp) / "ckpt", dtype=torch.float32)
        k2_model = load_hf(Path(tmp) / "ckpt", dtype=torch.float32)
        hf = DeepseekV3ForCausalLM.from_pretrained(Path(tmp) / "ckpt", dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=gen)
    engine = Engine(k2_model, max_batch_size=batch, max_seq_len=prompt_len + new_tokens + 1)

    k2_times, hf_times = [], []
    with torch.inference_mode():
        for _ in range(repeats):
            t, k2_tokens = _k2_decode(engine, x.tolist(), new_tokens)
            k2_times.append(t)
            t1, _ = _hf_generate(hf, x, 1)
            tn, hf_out = _hf_generate(hf, x, new_tokens)
            hf_times.append(tn - t1)
    hf_tokens = hf_out.sequences[:, prompt_len:].tolist()
    hf_cached = hf_out.sequences.shape[1] - 1  # the last token is never fed back
    decoded = batch * (new_tokens - 1)
    k2_tps, hf_tps = decoded / min(k2_times), decoded / max(min(hf_times), 1e-9)
    return {
        "preset": name,
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "k2_decode_tok_s": k2_tps,
        "hf_decode_tok_s": hf_tps,
        "speedup": k2_tps / hf_tps,
        "k2_cache_bytes_per_token": engine.cache.bytes_per_token,
        "hf_cache_bytes_per_token": _cache_bytes(hf_out.past_key_values) / (batch * hf_cached),
        "greedy_tokens_equal": k2_tokens == hf_tokens,
    }


def _timed_decode(engine: Engine, prompt: list[int], params: list[SamplingParams]) -> tuple[float, int]:
    """Decode seconds (all steps after the prefill step) and the number of decoded tokens."""
    for p in params:
        engine.add_request(prompt, p)
    engine.step()  # prefill: all prompts fit one step
    start, decoded = time.perf_counter(), 0
    while engine.has_unfinished():
        decoded += len(engine.step())
    return time.perf_counter() - start, decoded


def _grammar_seconds_per_step(compiler: GrammarCompiler, grammar: Grammar, batch: int, steps: int) -> float:
    """Seconds per step of computing ``batch`` masks and advancing each matcher by a random allowed token."""
    matchers = [compiler.matcher(grammar) for _ in range(batch)]
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(steps):
        allowed = compiler.allowed(matchers, compiler.vocab_size, torch.device("cpu"))  # [B, V]
        tokens = torch.multinomial(allowed.float(), 1, generator=gen)[:, 0].tolist()
        for m, t in zip(matchers, tokens, strict=True):
            m.advance(t)
    return (time.perf_counter() - start) / steps


def bench_schema(name: str, batch: int, new_tokens: int, repeats: int) -> dict:
    torch.manual_seed(0)
    tok = ByteTokenizer()
    model = Transformer(presets.get(name))
    prompt = chat.render([{"role": "user", "content": "List records as JSON."}], tok, add_generation_prompt=True)[0]
    engine = Engine(model, tok, max_batch_size=batch, max_seq_len=len(prompt) + new_tokens + 1)
    grammar = json_schema(RECORDS)

    def params(constrained: bool) -> list[SamplingParams]:
        g = grammar if constrained else None
        return [SamplingParams(max_new_tokens=new_tokens, temperature=1.0, seed=i, grammar=g) for i in range(batch)]

    free, constrained = [], []
    with torch.inference_mode():
        _timed_decode(engine, prompt, params(True))  # compiles the grammar (cached afterwards)
        for _ in range(repeats):
            t, n_free = _timed_decode(engine, prompt, params(False))
            free.append(t)
            t, n_constrained = _timed_decode(engine, prompt, params(True))
            constrained.append(t)
    assert n_free == n_constrained == batch * (new_tokens - 1), "every request decodes all its tokens"
    steps = new_tokens - 1
    compiler = GrammarCompiler(tok)
    _grammar_seconds_per_step(compiler, grammar, batch, steps)  # warm-up: llguidance builds lexer states lazily
    grammar_s = [_grammar_seconds_per_step(compiler, grammar, batch, steps) for _ in range(repeats)]
    return {
        "preset": name,
        "batch": batch,
        "prompt_len": len(prompt),
        "new_tokens": new_tokens,
        "free_decode_tok_s": n_free / min(free),
        "schema_decode_tok_s": n_constrained / min(constrained),
        "ratio": min(free) / min(constrained),
        "grammar_us_per_step": min(grammar_s) * 1e6,
    }


def _write_json(args: argparse.Namespace, rows: list[dict]) -> None:
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))


def main_schema(args: argparse.Namespace) -> None:
    rows = [bench_schema(p, b, args.new_tokens, args.repeats) for p in args.presets for b in args.schema_batches]
    print(
        f"decode free vs JSON-schema constrained, CPU ({torch.get_num_threads()} threads), {args.new_tokens} new "
        f"tokens, temperature 1, best of {args.repeats}"
    )
    print(f"{'preset':8} {'batch':>5} {'free tok/s':>11} {'schema tok/s':>13} {'ratio':>6} {'grammar us/step':>16}")
    for r in rows:
        print(
            f"{r['preset']:8} {r['batch']:5d} {r['free_decode_tok_s']:11.1f} {r['schema_decode_tok_s']:13.1f} "
            f"{r['ratio']:6.2f} {r['grammar_us_per_step']:16.1f}"
        )
    _write_json(args, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--schema", action="store_true", help="free vs JSON-schema constrained decode instead")
    parser.add_argument("--schema-batches", type=int, nargs="+", default=[1, 8], help="batch sizes for --schema")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.schema:
        main_schema(args)
        return

    rows = [bench_preset(p, args.batch, args.prompt_len, args.new_tokens, args.repeats) for p in args.presets]
    print(
        f"decode, CPU ({torch.get_num_threads()} threads), batch {args.batch}, prompt {args.prompt_len}, "
        f"{args.new_tokens} new tokens, best of {args.repeats}"
    )
    cols = ("k2 tok/s", "hf tok/s", "speed-up", "k2 B/tok", "hf B/tok")
    print(f"{'preset':8} " + " ".join(f"{c:>9}" for c in cols) + "  same")
    for r in rows:
        print(
            f"{r['preset']:8} {r['k2_decode_tok_s']:9.1f} {r['hf_decode_tok_s']:9.1f} {r['speedup']:8.2f}x "
            f"{r['k2_cache_bytes_per_token']:9d} {r['hf_cache_bytes_per_token']:9.0f}  {r['greedy_tokens_equal']}"
        )
    _write_json(args, rows)


if __name__ == "__main__":
    main()
