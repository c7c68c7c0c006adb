"""Stop tokens are ids, not text: a completion whose content and tool-call arguments spell every special token of
the chat format as ordinary text goes through the engine, the asyncio front, the HTTP server and the openai client
whole; generation ends only on the id of ``<|im_end|>`` / ``[EOS]``. The model's choices are scripted (the engine's
sampler is replaced; prefill, decode, detokenisation and stop logic are the real ones)."""

from __future__ import annotations

import contextlib
import json
import threading
import time

import pytest
import torch

from k2.data import chat
from k2.data.tokenizer import KIMI_SPECIAL_TOKENS, ByteTokenizer
from k2.infer import Engine, SamplingParams
from k2.infer.async_engine import AsyncEngine
from k2.infer.sampling import SampleOutput
from k2.infer.server import bind_socket, create_app
from k2.model import Transformer, presets

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = "k2-scripted"
# Content may spell any special token but the tool-call markers (those start the section, as in any parser).
CONTENT = "Literal <|im_end|>, [EOS], <|im_user|> and <|im_middle|> stay text."
NAMED = sorted(KIMI_SPECIAL_TOKENS)  # every named special token, tool-call markers and stop tokens included
TOOLS = [
    {"type": "function", "function": {"name": f"f{i}", "parameters": {"type": "object", "properties": {}}}}
    for i in range(2)
]
ARGUMENTS = [json.dumps({"s": NAMED}), json.dumps({"}<|tool_call_end|>": "<|im_end|>{", "q": '"[EOS]"'})]
USER = [{"role": "user", "content": "go"}]


def _completion(tok) -> tuple[list[int], list[dict]]:
    """The ids of the scripted assistant turn (ending with the <|im_end|> id) and the calls it holds."""
    calls = [{"type": "function", "function": {"name": f"f{i}", "arguments": a}} for i, a in enumerate(ARGUMENTS)]
    ids, mask = chat.render([*USER, {"role": "assistant", "content": CONTENT, "tool_calls": calls}], tok)
    start = mask.index(1)
    assert all(mask[start:]) and ids[-1] == tok.special_tokens[chat.IM_END]
    want = [
        {"id": f"functions.f{i}:{i}", "type": "function", "function": {"name": f"f{i}", "arguments": a}}
        for i, a in enumerate(ARGUMENTS)
    ]
    return ids[start:], want


@pytest.fixture
def scripted(monkeypatch):
    """``set_script(ids)``: every request then generates ``ids`` in order (then repeats the last one). A row under a
    grammar must be allowed its scripted token by the grammar's mask."""
    script: list[int] = []
    progress: dict[int, tuple[torch.Generator, int]] = {}  # per request (its generator): tokens drawn so far

    def sample(logits, temperature, top_p, top_k, generators, num_top_logprobs=0, mask_rows=(), mask=None):
        tokens = []
        for g in generators:
            n = progress.get(id(g), (g, 0))[1]
            progress[id(g)] = (g, n + 1)
            tokens.append(script[min(n, len(script) - 1)])
        for i, row in enumerate(mask_rows):
            assert mask[i, tokens[row]], f"the grammar forbids scripted token {tokens[row]}"
        return SampleOutput(torch.tensor(tokens), torch.zeros(len(tokens)), None, None)

    monkeypatch.setattr("k2.infer.engine.sample", sample)
    return lambda ids: script.__setitem__(slice(None), ids)


def _engine(tok) -> Engine:
    torch.manual_seed(0)
    model = Transformer(presets.tiny().replace(num_hidden_layers=1))  # its logits are not used: one layer is enough
    return Engine(model, tok, max_batch_size=2)


def test_engine_stops_on_the_stop_token_ids_not_their_text(scripted):
    tok = ByteTokenizer()
    completion, want = _completion(tok)
    stop_ids = chat.stop_token_ids(tok)
    assert stop_ids == (tok.special_tokens[chat.IM_END], tok.special_tokens["[EOS]"])
    engine = _engine(tok)
    prompt, _ = chat.render(USER, tok, add_generation_prompt=True)
    short = tok.encode(f"a {chat.IM_END} b [EOS] c")
    for body, stop_id in [(completion[:-1], stop_ids[0]), (short, stop_ids[1])]:
        script = [*body, stop_id, *tok.encode("after the end")]
        scripted(script)
        sp = SamplingParams(max_new_tokens=len(script), temperature=0, stop_token_ids=stop_ids)
        events = list(engine.stream(prompt, sp))
        # Exactly the turn: ordinary tokens spelling <|im_end|> / [EOS] did not stop it, the id did.
        assert [ev.token_id for ev in events] == [*body, stop_id]
        assert [ev.finished for ev in events] == [False] * (len(events) - 1) + [True]
        assert [ev.finish_reason for ev in events] == [None] * (len(events) - 1) + ["stop"]
        text = "".join(ev.text for ev in events)
        assert text == tok.decode(body)  # the stop token is not in the text; its strings are
        assert chat.IM_END in text and "[EOS]" in text
    assert chat.parse_completion(tok.decode(completion[:-1]), stop=()) == (CONTENT, want, [])
    assert not engine.has_unfinished()


@contextlib.contextmanager
def _serve(app):
    """``app`` on a free loopback port in a thread; yields the OpenAI base URL."""
    import uvicorn

    sock = bind_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def test_server_returns_tool_calls_whose_arguments_spell_special_tokens(scripted):
    """Non-streaming and streaming: the content keeps its literal stop-token strings and both calls come back
    with their arguments exactly (the old server cut the completion at the first ``<|im_end|>`` text). The turn is
    one the tool-call grammar of ``tool_choice="auto"`` allows, and it ends with the grammar, at
    ``<|tool_calls_section_end|>``."""
    import openai

    tok = ByteTokenizer()
    completion, want = _completion(tok)
    scripted(completion + tok.encode("never generated"))
    front = AsyncEngine(_engine(tok))
    try:
        with _serve(create_app(front, MODEL)) as url:
            client = openai.OpenAI(base_url=url, api_key="unused", timeout=120, max_retries=0)
            kwargs = dict(model=MODEL, messages=USER, tools=TOOLS, temperature=0, max_tokens=len(completion) + 10)
            r = client.chat.completions.create(**kwargs)
            choice = r.choices[0]
            assert choice.finish_reason == "tool_calls" and choice.message.content == CONTENT
            assert [c.model_dump() for c in choice.message.tool_calls] == want
            assert r.usage.completion_tokens == len(completion) - 1  # up to the section's end, where the grammar ends

            chunks = list(client.chat.completions.create(**kwargs, stream=True))
            deltas = [c.choices[0].delta for c in chunks if c.choices]
            assert "".join(d.content or "" for d in deltas) == CONTENT
            calls = [tc.model_dump(exclude_none=True) for d in deltas for tc in d.tool_calls or []]
            assert calls == [{"index": i, **c} for i, c in enumerate(want)]
            assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    finally:
        front.shutdown()
