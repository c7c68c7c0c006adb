"""``k2 serve`` with output constraints, through the official ``openai`` client against a real server subprocess on
loopback serving a random tiny model: ``response_format`` (``json_schema``, ``json_object``, ``text``) and
``tool_choice`` (``required``, a named function, ``auto``, ``parallel_tool_calls``), streaming and not. Every choice of
every request must parse and validate (``jsonschema``); bad schemas are 400s naming the parameter."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from _serve import serve_process

from k2.data.tokenizer import ByteTokenizer
from k2.model import Transformer, presets, save_hf

MODEL = "k2-tiny-constrained"
MAX_SEQ_LEN = 2048  # prompts with three tools are ~800 byte tokens; calls need room after them
N = 16  # choices per request: 16 samples of one grammar in one batched request
ORDER = {
    "type": "object",
    "properties": {
        "item": {"type": "string", "maxLength": 6},
        "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
        "price": {"type": "number"},
        "options": {"type": "array", "items": {"enum": ["large", 'with "foam"', "to\\go"]}, "maxItems": 2},
        "rush": {"type": "boolean"},
        "note": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 4}]},
    },
    "required": ["item", "quantity", "options"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 6}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"],
    "additionalProperties": False,
}
ADD = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
    "required": ["a", "b"],
    "additionalProperties": False,
}
NO_ARGS = {"type": "object", "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Forecast", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "add", "description": "a + b", "parameters": ADD}},
    {"name": "clock", "description": "MCP-style tool", "inputSchema": NO_ARGS},
]
SCHEMAS = {"get_weather": WEATHER, "add": ADD, "clock": NO_ARGS}


def _user(text):
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    import openai

    path = tmp_path_factory.mktemp("serve_constrained") / "ckpt"
    torch.manual_seed(0)
    save_hf(Transformer(presets.tiny().replace(max_position_embeddings=MAX_SEQ_LEN)), path, dtype=torch.float32)
    ByteTokenizer().save(path)
    with serve_process(path, MODEL, MAX_SEQ_LEN) as url:
        yield openai.OpenAI(base_url=url, api_key="unused", timeout=300, max_retries=0)


def _json_schema(schema, name="order"):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def _check_calls(calls, first_index: int, names=tuple(SCHEMAS)) -> None:
    assert calls
    for k, call in enumerate(calls):
        name = call.function.name
        assert name in names and call.id == f"functions.{name}:{first_index + k}" and call.type == "function"
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[name])


def test_json_schema_every_choice_validates(client):
    r = client.chat.completions.create(
        model=MODEL, messages=_user("One coffee order, as JSON."), response_format=_json_schema(ORDER),
        n=N, seed=1, temperature=1.0, max_tokens=400,
    )  # fmt: skip
    assert len(r.choices) == N
    for choice in r.choices:
        assert choice.finish_reason == "stop" and not choice.message.tool_calls
        jsonschema.validate(json.loads(choice.message.content), ORDER)
    assert len({c.message.content for c in r.choices}) == N


def test_json_object_and_text(client):
    r = client.chat.completions.create(
        model=MODEL, messages=_user("Any JSON object."), response_format={"type": "json_object"},
        n=8, seed=2, temperature=0.7, extra_body={"top_k": 8}, max_tokens=500,
    )  # fmt: skip
    done = [c for c in r.choices if c.finish_reason == "stop"]
    assert len(done) >= 4 and all(isinstance(json.loads(c.message.content), dict) for c in done)
    text = client.chat.completions.create(
        model=MODEL, messages=_user("hi"), response_format={"type": "text"}, seed=3, max_tokens=8
    )  # unconstrained: the random model's bytes, which no grammar keeps to valid UTF-8
    assert text.choices[0].finish_reason in ("stop", "length")


def test_tool_choice_required_named_and_single(client):
    history = [
        *_user("What is 2 + 3, and the weather?"),
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": "c0", "type": "function", "function": {"name": "add", "arguments": '{"a":2,"b":3}'}}],
        },
        {"role": "tool", "tool_call_id": "c0", "content": "5"},
    ]
    common = dict(model=MODEL, messages=history, tools=TOOLS, n=N, temperature=1.0, max_tokens=400)
    required = client.chat.completions.create(**common, tool_choice="required", seed=4)
    for choice in required.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        _check_calls(choice.message.tool_calls, first_index=1)  # one earlier call in the dialog
    assert max(len(c.message.tool_calls) for c in required.choices) > 1  # parallel calls are allowed

    named = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(**common, tool_choice=named, seed=5)
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
        _check_calls(choice.message.tool_calls, first_index=1, names=("get_weather",))

    r = client.chat.completions.create(**common, tool_choice="required", parallel_tool_calls=False, seed=6)
    for choice in r.choices:
        assert len(choice.message.tool_calls) == 1
        _check_calls(choice.message.tool_calls, first_index=1)


def test_tool_choice_auto_calls_are_valid(client):
    r = client.chat.completions.create(
        model=MODEL, messages=_user("Weather in Oslo?"), tools=TOOLS, n=N, seed=7, temperature=1.0, max_tokens=300
    )
    done = [c for c in r.choices if c.finish_reason != "length"]
    calls = [c for c in done if c.message.tool_calls]
    assert calls and len(calls) < len(done)  # some call tools, some answer
    for choice in calls:
        assert choice.finish_reason == "tool_calls"
        _check_calls(choice.message.tool_calls, first_index=0)


def test_streaming_with_constraints(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=_user("Order, streamed."), response_format=_json_schema(ORDER),
        n=4, seed=8, temperature=1.0, max_tokens=400, stream=True,
    )  # fmt: skip
    texts, finish = [""] * 4, [None] * 4
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            finish[c.index] = c.finish_reason or finish[c.index]
    assert finish == ["stop"] * 4
    for text in texts:
        jsonschema.validate(json.loads(text), ORDER)

    stream = client.chat.completions.create(
        model=MODEL, messages=_user("Add 1 and 2."), tools=TOOLS, tool_choice="required", seed=9,
        temperature=1.0, max_tokens=400, stream=True,
    )  # fmt: skip
    chunks = list(stream)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == ""
    calls = [tc for d in deltas for tc in d.tool_calls or []]
    _check_calls(calls, first_index=0)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


@pytest.mark.parametrize(
    ("kwargs", "param", "words"),
    [
        ({"response_format": _json_schema({"type": "strin"})}, "response_format", "not a valid JSON Schema"),
        ({"response_format": _json_schema({"type": "array", "uniqueItems": True})}, "response_format", "uniqueItems"),
        ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
        ({"response_format": {"type": "yaml"}}, "response_format.type", "json_schema"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "not": {}}}}]},
            "tools",
            "tools[0].function.parameters",
        ),
    ],
    ids=["invalid", "unimplemented", "no-schema", "unknown-type", "tool-schema"],
)
def test_bad_schemas_are_400s_naming_the_param(client, kwargs, param, words):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=_user("hi"), max_tokens=2, **kwargs)
    assert e.value.status_code == 400 and e.value.param == param and words in e.value.message
    r = client.chat.completions.create(model=MODEL, messages=_user("still serving?"), max_tokens=2)
    assert r.choices[0].finish_reason in ("length", "stop")  # sampled: a random model may end within 2 tokens
