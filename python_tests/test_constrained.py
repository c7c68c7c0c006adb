"""Constrained decoding (``k2.infer.grammar`` in ``k2.infer.Engine``): a random tiny model sampling at temperature 1
under a grammar must produce output that parses and validates (``jsonschema``) for every seed; tool-call sections
must parse with ``k2.data.chat.parse_completion`` into calls of the declared tools with valid arguments. Also: the
reported log-probs are the model's (a full forward over the completion is the oracle), unconstrained rows of a mixed
batch are unchanged, and schemas that cannot be enforced are rejected with the place named."""

from __future__ import annotations

import json

import jsonschema
import pytest
import tiktoken._educational as edu
import torch

from k2.data import chat
from k2.data.tokenizer import KIMI_PAT_STR, ByteTokenizer, TiktokenTokenizer
from k2.infer import Engine, SamplingParams
from k2.infer import grammar as G
from k2.model import Transformer, presets

pytestmark = pytest.mark.usefixtures("one_thread")

SEEDS = range(16)
ESCAPES = ["a", 'say "hi"', "back\\slash", "new\nline", "é✓"]  # enum values JSON must escape or encode
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "score": {"type": "number"},
        "tags": {"type": "array", "items": {"enum": ESCAPES}, "maxItems": 2},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 6},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                "geo": {
                    "type": "object",
                    "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
                    "required": ["lat", "lon"],
                    "additionalProperties": False,
                },
            },
            "required": ["city", "zip", "geo"],
            "additionalProperties": False,
        },
        "active": {"type": "boolean"},
        "nickname": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 4}]},
        "kind": {"const": 'quoted "const"\t'},
    },
    "required": ["name", "age", "tags", "address", "kind"],
    "additionalProperties": False,
}
MATRIX = {
    "type": "object",
    "properties": {
        "rows": {
            "type": "array",
            "items": {"type": "array", "items": {"type": "integer", "minimum": -9, "maximum": 9}, "maxItems": 3},
            "minItems": 1,
            "maxItems": 3,
        },
        "op": {"enum": ["sum", "max", "min"]},
    },
    "required": ["rows", "op"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 6}, "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
    {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
    {"name": "ping", "parameters": {"type": "object", "properties": {}, "additionalProperties": False}},
]


def _model(vocab_size: int = 512) -> Transformer:
    torch.manual_seed(0)
    return Transformer(presets.tiny().replace(num_hidden_layers=1, vocab_size=vocab_size))


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(_model(), ByteTokenizer(), max_batch_size=8, max_seq_len=1024)


def _prompt(tok, text: str = "Reply in JSON.") -> list[int]:
    return chat.render([{"role": "user", "content": text}], tok, add_generation_prompt=True)[0]


def _run(engine: Engine, grammar: G.Grammar, seeds=SEEDS, max_new_tokens: int = 400, **kw):
    tok = engine.tokenizer
    params = [
        SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=1.0,
            seed=s,
            grammar=grammar,
            stop_token_ids=chat.stop_token_ids(tok),
            **kw,
        )
        for s in seeds
    ]
    return engine.generate([_prompt(tok)] * len(params), params)


@pytest.mark.parametrize("schema", [PERSON, MATRIX], ids=["nested", "arrays"])
def test_every_sample_validates_against_its_schema(engine, schema):
    outs = _run(engine, G.json_schema(schema))
    for out in outs:
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), schema)
        assert out.token_ids[-1] not in chat.stop_token_ids(engine.tokenizer)  # the grammar ended it
    assert len({out.text for out in outs}) == len(outs)  # the model really samples


def test_json_object_and_top_k_top_p(engine):
    """Any JSON object (free keys and values: long strings from a random model, so some runs hit the length)."""
    outs = _run(engine, G.json_object(), seeds=range(8), max_new_tokens=900, top_k=50, top_p=0.9)
    done = [out for out in outs if out.finish_reason == "stop"]
    assert len(done) >= 4
    assert all(isinstance(json.loads(out.text), dict) for out in done)
    assert any(len(json.loads(out.text)) > 0 for out in done)


def _check_calls(text: str, tools, first_index: int) -> list[dict]:
    _, calls, errors = chat.parse_completion(text, stop=())
    assert not errors, errors
    by_name = {t["name"]: t["parameters"] or {"type": "object"} for t in tools}
    for k, call in enumerate(calls):
        name = call["function"]["name"]
        assert call["id"] == f"functions.{name}:{first_index + k}"
        jsonschema.validate(json.loads(call["function"]["arguments"]), by_name[name])
    return calls


def test_tool_call_grammar_required_named_and_single(engine):
    required = _run(engine, G.tool_calls(TOOLS, choice="required", first_index=3))
    counts = [len(_check_calls(out.text, TOOLS, 3)) for out in required]
    assert all(out.text.startswith(chat.SECTION_BEGIN) for out in required)  # no content before the section
    assert min(counts) >= 1 and max(counts) > 1  # parallel calls happen
    assert len({c["function"]["name"] for out in required for c in chat.parse_completion(out.text, stop=())[1]}) > 2

    for out in _run(engine, G.tool_calls(TOOLS, choice="add", first_index=0), seeds=range(8)):
        (call,) = _check_calls(out.text, TOOLS, 0)
        assert call["function"]["name"] == "add" and out.finish_reason == "stop"
        assert out.text.endswith(chat.SECTION_END)

    single = G.tool_calls(TOOLS, choice="required", parallel=False)
    assert all(len(_check_calls(o.text, TOOLS, 0)) == 1 for o in _run(engine, single, seeds=range(8)))


def test_tool_call_grammar_auto(engine):
    outs = _run(engine, G.tool_calls(TOOLS, choice="auto", first_index=1), seeds=range(32), max_new_tokens=300)
    done = [out for out in outs if out.finish_reason == "stop"]  # free text may run on to the length
    with_calls = [out for out in done if _check_calls(out.text, TOOLS, 1)]
    assert with_calls and len(with_calls) < len(done)  # calls, and answers without one
    assert any(not out.text.startswith(chat.SECTION_BEGIN) for out in with_calls)  # content, then a section

    structured = G.tool_calls(TOOLS[:1], choice="auto", content_schema=MATRIX)
    for out in _run(engine, structured, seeds=range(8)):
        content, calls, _ = chat.parse_completion(out.text, stop=())
        assert out.finish_reason == "stop"
        if not calls:
            jsonschema.validate(json.loads(content), MATRIX)
        else:
            assert content == "" and _check_calls(out.text, TOOLS[:1], 0)


def test_logprobs_are_the_models_and_free_rows_are_unchanged(engine):
    """Greedy under a grammar: each reported log-prob equals log_softmax of the unmasked logits of a full forward
    over prompt + completion. A free request batched with constrained ones gets the tokens it gets alone."""
    tok = engine.tokenizer
    stop = chat.stop_token_ids(tok)
    prompt = _prompt(tok)
    free = SamplingParams(max_new_tokens=24, temperature=1.0, seed=5, stop_token_ids=stop)
    alone = engine.generate([prompt], free)[0]
    constrained = SamplingParams(max_new_tokens=200, temperature=0, grammar=G.json_schema(MATRIX), stop_token_ids=stop)
    outs = engine.generate([prompt] * 3, [constrained, free, constrained])
    assert outs[1].token_ids == alone.token_ids
    out = outs[0]
    jsonschema.validate(json.loads(out.text), MATRIX)
    ids = torch.tensor([prompt + out.token_ids])
    with torch.inference_mode():
        logits = engine.model(ids, torch.arange(ids.shape[1])[None])[0].float()  # [S, V]
    positions = torch.arange(len(prompt) - 1, ids.shape[1] - 1)
    want = torch.log_softmax(logits[positions], -1).gather(1, torch.tensor(out.token_ids)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(out.logprobs), want, atol=1e-4, rtol=0)
    assert min(out.logprobs) < -2  # forced tokens the model itself would not pick: pre-mask log-probs


def test_a_tool_without_parameters_takes_any_object():
    compiler = G.GrammarCompiler(ByteTokenizer())
    grammar = G.tool_calls([{"name": "free", "parameters": None}], choice="free")
    tok = ByteTokenizer()
    text = f'{chat.SECTION_BEGIN}{chat.CALL_BEGIN}functions.free:0{chat.ARG_BEGIN}{{"k": [1, {{}}]}}'
    matcher = compiler.matcher(grammar)
    for token in tok.encode(text, allow_special=True):
        assert compiler.allowed([matcher], 512, torch.device("cpu"))[0, token]
        matcher.advance(token)
    assert compiler.allowed([matcher], 512, torch.device("cpu"))[0].nonzero()[:, 0].tolist() == [
        tok.special_tokens[chat.CALL_END]
    ]
    matcher = compiler.matcher(grammar)
    for token in tok.encode(text[: text.index("{")], allow_special=True):
        matcher.advance(token)
    allowed = compiler.allowed([matcher], 512, torch.device("cpu"))[0]
    assert allowed[ord("{")] and not allowed[ord("[")] and not allowed[ord("1")]  # arguments are an object


def test_matchers_from_the_cache_are_independent():
    compiler = G.GrammarCompiler(ByteTokenizer())
    grammar = G.json_schema(MATRIX)
    first, second = compiler.matcher(grammar), compiler.matcher(grammar)
    for token in b'{"rows": [[1]], "op": "sum"}':
        first.advance(token)
    assert first.done and first.accepting and not second.done and not second.accepting
    allowed = compiler.allowed([first, second], 512, torch.device("cpu"))  # [2, V]
    assert allowed[1].nonzero()[:, 0].tolist() == [ord("{")]
    assert set(allowed[0].nonzero()[:, 0].tolist()) <= set(chat.stop_token_ids(ByteTokenizer()))


def test_tiktoken_tokenizer():
    """A BPE tokenizer (multi-byte tokens, Kimi-K2 special slots after them) and a model vocabulary larger than the
    tokenizer's: ids beyond the tokenizer are never sampled."""
    text = "The quick brown fox jumps over the lazy dog. " * 8 + '{"rows": [[1, 2]], "op": "max"} ' * 8
    ranks = edu.bpe_train(text, 256 + 40, "(?V1)" + KIMI_PAT_STR, visualise=None)
    tok = TiktokenTokenizer(ranks)
    engine = Engine(_model(vocab_size=tok.vocab_size + 8), tok, max_batch_size=8, max_seq_len=1024)
    assert any(len(tok.decode_bytes([i])) > 1 for i in range(256, len(ranks)))
    for out in _run(engine, G.json_schema(MATRIX), seeds=range(8)):
        jsonschema.validate(json.loads(out.text), MATRIX)
        assert max(out.token_ids) < tok.vocab_size


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ({"type": "strin"}, "is not a valid JSON Schema"),
        ({"type": "object", "properties": {"a": {"type": "string", "pattern": "(["}}}, "is not a 'regex'"),
        ({"type": "object", "properties": {"a": {"type": "string", "format": "colour"}}}, "cannot be enforced"),
        ({"type": "array", "uniqueItems": True}, "uniqueItems"),
        (False, "no value"),
        ("object", "must be a JSON Schema object"),
    ],
)
def test_schemas_that_cannot_be_enforced_are_rejected(schema, message):
    with pytest.raises(G.GrammarError, match=r"^response_format") as e:
        G.json_schema(schema, where="response_format")
    assert message in str(e.value)


def test_engine_rejects_a_grammar_its_tokenizer_cannot_follow():
    """The tool grammar names the chat format's special tokens; a tokenizer without them cannot compile it."""
    ranks = {bytes([b]): b for b in range(256)}
    tok = TiktokenTokenizer(ranks, special_tokens={"[BOS]": 256, "[EOS]": 257, "[PAD]": 258})
    engine = Engine(_model(), tok, max_batch_size=1, max_seq_len=64)
    sp = SamplingParams(grammar=G.tool_calls(TOOLS, choice="required"))
    with pytest.raises(G.GrammarError, match="grammar does not compile"):
        engine.add_request([1, 2, 3], sp)
    assert not engine.has_unfinished()
