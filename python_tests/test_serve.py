"""``k2 serve`` against the official ``openai`` client: a real server subprocess on a free loopback port serving a
random tiny model (save_hf + ByteTokenizer). Answers are compared with single-request greedy runs of the
in-process engine (non-streaming, streaming, 8 concurrent clients, stop strings, seeds); tool declarations are
rendered into the prompt, and the response builders turn tool-call sections into OpenAI ``tool_calls``; bad
requests get OpenAI-shaped 4xx errors and the server keeps serving."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from _serve import save_tiny_checkpoint, serve_process

from k2.data import chat
from k2.data.tokenizer import ByteTokenizer
from k2.infer import Engine, SamplingParams
from k2.infer.loading import load_checkpoint
from k2.infer.openai_protocol import ChatCompletionRequest, ChoiceStream, build_choice, build_prompt

MODEL = "k2-tiny"
MAX_SEQ_LEN = 1024
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    },
    {"name": "search", "description": "MCP-style tool", "inputSchema": {"type": "object", "properties": {}}},
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / "ckpt"
    save_tiny_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def server(checkpoint):
    with serve_process(checkpoint, MODEL, MAX_SEQ_LEN) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server, api_key="unused", timeout=120, max_retries=0)


@pytest.fixture(scope="module")
def reference(checkpoint):
    """Single-request greedy completions from the in-process engine, for the same rendered prompts."""
    model, tok = load_checkpoint(checkpoint)
    engine = Engine(model, tok, max_batch_size=1, max_seq_len=MAX_SEQ_LEN)
    stop_ids = tuple(tok.special_tokens[s] for s in chat.STOP_TOKENS)

    def run(messages, max_tokens=12, **params):
        ids, _ = chat.render(messages, tok, add_generation_prompt=True)
        sp = SamplingParams(max_new_tokens=max_tokens, temperature=0, stop_token_ids=stop_ids, **params)
        return ids, engine.generate([ids], sp)[0]

    return run


def _user(text):
    return [{"role": "user", "content": text}]


def test_models(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_completion_matches_engine(client, reference):
    ids, ref = reference(_user("What is MLA?"))
    r = client.chat.completions.create(
        model=MODEL, messages=_user("What is MLA?"), temperature=0, max_tokens=12, logprobs=True, top_logprobs=2
    )
    choice = r.choices[0]
    assert choice.message.content == ref.text and choice.finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(ref.token_ids)
    got = [e.logprob for e in choice.logprobs.content]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref.logprobs), atol=1e-4, rtol=0)
    assert all(
        len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.logprob - 1e-6 for e in choice.logprobs.content
    )


def test_streaming_matches_engine(client, reference):
    _, ref = reference(_user("Stream, please."))
    stream = client.chat.completions.create(
        model=MODEL,
        messages=_user("Stream, please."),
        temperature=0,
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == ref.text and finish == [ref.finish_reason]
    assert chunks[-1].usage.completion_tokens == len(ref.token_ids)


def test_eight_concurrent_clients_get_their_own_answers(client, reference):
    questions = [f"Question {i}: " + "tell me more " * i for i in range(8)]  # different prompt lengths
    expected = [reference(_user(q), max_tokens=10)[1].text for q in questions]

    def ask(q):
        r = client.chat.completions.create(model=MODEL, messages=_user(q), temperature=0, max_tokens=10)
        return r.choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, questions))
    assert answers == expected
    assert len(set(expected)) > 1  # the prompts really lead to different answers


def test_stop_seed_and_n(client, reference):
    _, ref = reference(_user("Stop somewhere."), max_tokens=16)
    stop = ref.text[5:7]
    r = client.chat.completions.create(
        model=MODEL, messages=_user("Stop somewhere."), temperature=0, max_tokens=16, stop=[stop]
    )
    assert r.choices[0].message.content == ref.text[: ref.text.find(stop)] and r.choices[0].finish_reason == "stop"

    def sampled():
        r = client.chat.completions.create(
            model=MODEL, messages=_user("Be random."), temperature=1.0, max_tokens=8, n=2, seed=7
        )
        return [c.message.content for c in r.choices]

    first = sampled()
    assert first == sampled() and len(first) == 2 and first[0] != first[1]


def test_tools_are_declared_in_the_prompt(client, checkpoint):
    tok = ByteTokenizer()
    messages = _user("Weather in Paris?")
    with_tools, _ = chat.render(messages, tok, tools=TOOLS, add_generation_prompt=True)
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, temperature=0, max_tokens=4)
    assert r.usage.prompt_tokens == len(with_tools)
    r = client.chat.completions.create(
        model=MODEL, messages=messages, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=4
    )
    assert r.usage.prompt_tokens == len(chat.render(messages, tok, add_generation_prompt=True)[0])
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(
        model=MODEL, messages=messages, tools=TOOLS, tool_choice=named, temperature=0, max_tokens=4
    )
    assert r.usage.prompt_tokens == len(with_tools)  # the grammar forces the call, not a prompt suffix


def test_build_prompt_renders_tools():
    tok = ByteTokenizer()
    history = [
        *_user("hi"),
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "search", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "[]"},
    ]
    req = ChatCompletionRequest(model=MODEL, messages=history, tools=TOOLS, tool_choice="required")
    p = build_prompt(req, tok)
    text = tok.decode(p.ids)
    assert chat.tools_json(TOOLS) in text and "get_weather" in text and "## Return of functions.search:0" in text
    assert text.endswith(chat.GENERATION_PROMPT) and p.parse_tools
    none = build_prompt(ChatCompletionRequest(model=MODEL, messages=history, tools=TOOLS, tool_choice="none"), tok)
    assert "tool_declare" not in tok.decode(none.ids) and not none.parse_tools


COMPLETION = (
    "Let me check."
    f"{chat.SECTION_BEGIN}{chat.CALL_BEGIN}functions.get_weather:0{chat.ARG_BEGIN}"
    '{"city": "Paris"}'
    f"{chat.CALL_END}{chat.CALL_BEGIN}functions.search:1{chat.ARG_BEGIN}{{}}{chat.CALL_END}{chat.SECTION_END}"
)
EXPECTED_CALLS = [
    {
        "id": "functions.get_weather:0",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    },
    {"id": "functions.search:1", "type": "function", "function": {"name": "search", "arguments": "{}"}},
]


def test_response_builder_parses_tool_calls():
    choice = build_choice(0, COMPLETION, "stop", parse_tools=True, logprobs=None)
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"] == {"role": "assistant", "content": "Let me check.", "tool_calls": EXPECTED_CALLS}
    plain = build_choice(0, COMPLETION, "stop", parse_tools=False, logprobs=None)
    assert plain["message"] == {"role": "assistant", "content": COMPLETION} and plain["finish_reason"] == "stop"
    broken = COMPLETION[: COMPLETION.find('"Paris"')]  # truncated inside the first call: nothing is dropped
    assert build_choice(0, broken, "length", True, None)["message"]["content"] == broken


def test_stream_builder_holds_back_tool_calls():
    s = ChoiceStream(0, parse_tools=True)
    sent = "".join(s.delta(piece) for piece in ["Let me ", "check.<|tool_", ""])  # a literal partial marker
    assert sent == "Let me check."
    sent += "".join(s.delta(ch) for ch in COMPLETION[len("Let me check.<|tool_") :])
    assert sent == "Let me check."  # nothing of the section is streamed as content
    delta, reason = s.finish("stop")
    assert reason == "tool_calls" and "content" not in delta
    assert delta["tool_calls"] == [{"index": i, **c} for i, c in enumerate(EXPECTED_CALLS)]


def _raw_post(server, body: str) -> tuple[int, dict]:
    req = urllib.request.Request(
        f"{server}/chat/completions", data=body.encode(), headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _assert_openai_error(resp, status):
    assert resp[0] == status
    err = resp[1]["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_bad_requests_get_4xx_and_the_server_keeps_serving(server, client):
    import openai

    _assert_openai_error(_raw_post(server, "{not json"), 400)
    _assert_openai_error(_raw_post(server, json.dumps({"model": MODEL})), 400)  # no messages
    err = _assert_openai_error(_raw_post(server, json.dumps({"model": MODEL, "messages": _user("x"), "n": 0})), 400)
    assert err["param"] == "n"
    bad_role = {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}
    assert "robot" in _assert_openai_error(_raw_post(server, json.dumps(bad_role)), 400)["message"]
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=_user("hi"), max_tokens=2)
    assert e.value.status_code == 404 and e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=_user("x" * MAX_SEQ_LEN), max_tokens=2)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=_user("hi"), temperature=5)
    r = client.chat.completions.create(model=MODEL, messages=_user("still there?"), max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")


def _function(name, **fields):
    return {"type": "function", "function": {"name": name, **fields}}


OBJECT = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
BAD_TOOLS = {
    "name not a string": _function(3),
    "name null": _function(None),
    "empty name": _function(""),
    "name with a space": _function("get weather"),
    "name with a dot": _function("db.query"),
    "name with a special token": _function("f<|im_end|>"),
    "name of 65 characters": _function("x" * 65),
    "no name": {"type": "function", "function": {"description": "d", "parameters": OBJECT}},
    "description not a string": _function("f", description=["d"]),
    "parameters a string": _function("f", parameters=json.dumps(OBJECT)),
    "parameters a list": _function("f", parameters=[OBJECT]),
    "parameters of type string": _function("f", parameters={"type": "string"}),
    "properties not schemas": _function("f", parameters={"type": "object", "properties": {"a": "string"}}),
    "required not a list of names": _function("f", parameters={"type": "object", "required": "a"}),
    "bare function with a bad name": {"name": "a b", "parameters": OBJECT},
    "MCP name not a string": {"name": 7, "inputSchema": OBJECT},
    "MCP name with a slash": {"name": "fs/read", "inputSchema": OBJECT},
    "MCP inputSchema not an object": {"name": "f", "inputSchema": "object"},
    "MCP inputSchema of type array": {"name": "f", "inputSchema": {"type": "array", "items": {}}},
    "not an object": "get_weather",
    "no function": {"type": "function"},
}


@pytest.mark.parametrize("bad", list(BAD_TOOLS))
def test_bad_tool_definitions_get_400(server, client, bad):
    """A tool with a bad name (not a string, empty, outside OpenAI's ^[a-zA-Z0-9_-]{1,64}$) or a schema that is
    not an object schema, OpenAI-style or MCP-style, is a 400 in OpenAI's error shape with param "tools"."""
    import openai

    tools = [TOOLS[0], BAD_TOOLS[bad]]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=_user("hi"), tools=tools, max_tokens=2)
    assert e.value.status_code == 400 and e.value.param == "tools" and e.value.type == "invalid_request_error"
    assert set(e.value.body) == {"message", "type", "param", "code"} and "tools[1]" in e.value.message
    status, body = _raw_post(server, json.dumps({"model": MODEL, "messages": _user("hi"), "tools": tools}))
    assert status == 400 and body["error"]["param"] == "tools"


def test_good_tool_definitions_are_served(client):
    """The edges of what is valid: OpenAI's whole name alphabet at the 64-character limit, MCP ``inputSchema``,
    a bare function, no or an empty ``parameters``, boolean property schemas."""
    tok = ByteTokenizer()
    tools = [
        _function("A-z_0-9" + "x" * 57, description="d", parameters=OBJECT),
        _function("-", parameters={}),
        _function("_"),
        _function("n", parameters=None),
        {"name": "search", "description": "MCP", "inputSchema": {"type": "object", "properties": {"q": True}}},
        {"name": "bare", "parameters": OBJECT},
    ]
    r = client.chat.completions.create(model=MODEL, messages=_user("hi"), tools=tools, max_tokens=2, temperature=0)
    assert r.usage.prompt_tokens == len(chat.render(_user("hi"), tok, tools=tools, add_generation_prompt=True)[0])


def test_async_engine_batches_concurrent_requests(checkpoint, reference):
    import asyncio

    from k2.infer.async_engine import AsyncEngine

    model, tok = load_checkpoint(checkpoint)
    engine = Engine(model, tok, max_batch_size=8, max_seq_len=MAX_SEQ_LEN)
    batch_sizes = []
    step = engine.step
    engine.step = lambda: (batch_sizes.append(engine.num_running), step())[1]
    front = AsyncEngine(engine)
    questions = [f"q{i} " * (i + 1) for i in range(8)]
    stop_ids = tuple(tok.special_tokens[s] for s in chat.STOP_TOKENS)

    async def ask(q):
        ids, _ = chat.render(_user(q), tok, add_generation_prompt=True)
        sp = SamplingParams(max_new_tokens=10, temperature=0, stop_token_ids=stop_ids)
        return "".join([ev.text async for ev in front.generate(ids, sp)])

    async def main():
        return await asyncio.gather(*(ask(q) for q in questions))

    try:
        answers = asyncio.run(main())
    finally:
        front.shutdown()
    assert answers == [reference(_user(q), max_tokens=10)[1].text for q in questions]
    assert max(batch_sizes) > 1  # requests shared forwards
