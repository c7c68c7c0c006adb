"""``k2.agentic``: the OpenAI back end through the real ``openai`` client against a scripted server on loopback
(replies, usage, every fault retried or classified, timeouts that never hang, the concurrency limit, JSON replies
validated), the in-process engine back end against the engine itself, and the resumable JSONL store."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import jsonschema
import pytest
from _fake_openai import fake_openai, fake_openai_process
from _serve import save_tiny_checkpoint

from k2.agentic import (
    BackendError,
    EngineBackend,
    JsonlStore,
    OpenAIBackend,
    chat_json,
    derived_seed,
    make_backend,
    map_concurrent,
    stable_id,
)
from k2.data import chat
from k2.errors import ConfigError, DataError
from k2.infer import Engine, SamplingParams
from k2.infer.loading import load_checkpoint

USER = [{"role": "user", "content": "hello there"}]


def _backend(url: str, **kw) -> OpenAIBackend:
    kw = {"timeout_s": 2.0, "max_retries": 2, "backoff_s": 0.01, **kw}
    return OpenAIBackend(url, **kw)


def _faults_then(faults, final):
    """A script answering ``faults`` in turn, then ``final`` forever."""
    queue, lock = list(faults), threading.Lock()

    def script(_req):
        with lock:
            return queue.pop(0) if queue else final

    return script


# ---- OpenAI back end ----------------------------------------------------------------------------------------------


def test_reply_usage_and_request_fields():
    with fake_openai(lambda req: f"echo:{req['messages'][-1]['content']}") as srv:
        backend = _backend(srv.url)
        questions = [f"question number {i}" for i in range(6)]
        replies = dict(map_concurrent(lambda q: backend.chat([{"role": "user", "content": q}], seed=7), questions, 3))
        assert {q: r.content for q, r in replies.items()} == {q: f"echo:{q}" for q in questions}
        assert all(r.finish_reason == "stop" and r.tool_calls == [] for r in replies.values())
        usage = backend.usage()
        assert usage == {
            "requests": 6,
            "retries": 0,
            "failures": 0,
            "prompt_tokens": sum(len(q) for q in questions),  # the fixture counts characters
            "completion_tokens": sum(len(f"echo:{q}") for q in questions),
        }
        assert backend.name == f"openai:{srv.url} model=fake"  # the model id asked from GET /v1/models
        assert all(r["model"] == "fake" and r["seed"] == 7 and r["max_tokens"] == 512 for r in srv.requests)


def test_tool_calls_and_request_passthrough():
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    with fake_openai(lambda req: ("tool_calls", [{"name": "add", "arguments": {"a": 1, "b": 2}}])) as srv:
        reply = _backend(srv.url, model="m").chat(USER, tools=tools, tool_choice="required", temperature=0.0)
        assert reply.content == "" and reply.finish_reason == "tool_calls"
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in reply.tool_calls] == [
            ("add", {"a": 1, "b": 2})
        ]
        (sent,) = srv.requests
        assert sent["tools"] == tools and sent["tool_choice"] == "required" and sent["temperature"] == 0.0
        assert sent["model"] == "m" and "seed" not in sent and "response_format" not in sent


TRANSIENT = {
    "http_5xx": [("status", 500), ("status", 502), ("status", 503)],
    "http_4xx": [("status", 429), ("status", 408)],
    "malformed_response": [("malformed",), ("malformed", {"object": "chat.completion"}), ("malformed", [1, 2])],
    "connection": [("close",)],
    "timeout": [("sleep", 3.0)],
}
CASES = [(reason, fault) for reason, faults in TRANSIENT.items() for fault in faults]


@pytest.mark.parametrize(("reason", "fault"), CASES, ids=[str(f) for _, f in CASES])
def test_transient_fault_is_retried(reason, fault):
    with fake_openai(_faults_then([fault, fault], "fine")) as srv:
        backend = _backend(srv.url, model="m", timeout_s=0.5, max_retries=2)
        assert backend.chat(USER).content == "fine"
        assert len(srv.requests) == 3
        assert backend.usage()["retries"] == 2 and backend.usage()["failures"] == 0


@pytest.mark.parametrize(("reason", "fault"), CASES, ids=[str(f) for _, f in CASES])
def test_persistent_fault_becomes_backend_error(reason, fault):
    with fake_openai(lambda req: fault) as srv:
        backend = _backend(srv.url, model="m", timeout_s=0.5, max_retries=1)
        with pytest.raises(BackendError) as info:
            backend.chat(USER)
        assert info.value.reason == reason
        assert len(srv.requests) == 2
        assert backend.usage() == {
            "requests": 1,
            "retries": 1,
            "failures": 1,
            "prompt_tokens": 0,
            "completion_tokens": 0,
        }


@pytest.mark.parametrize("status", [400, 401, 404, 422])
def test_client_errors_are_not_retried(status):
    with fake_openai(lambda req: ("status", status)) as srv:
        backend = _backend(srv.url, model="m", max_retries=3)
        with pytest.raises(BackendError, match=f"HTTP {status}") as info:
            backend.chat(USER)
        assert info.value.reason == "http_4xx" and len(srv.requests) == 1
        assert backend.usage()["retries"] == 0 and backend.usage()["failures"] == 1


def test_connection_refused_is_a_connection_error():
    with fake_openai(lambda req: "x") as srv:
        url = srv.url
    with pytest.raises(BackendError) as info:
        _backend(url, model="m", max_retries=1).chat(USER)
    assert info.value.reason == "connection"


def test_a_sleeping_server_never_hangs_the_client():
    timeout_s, tries = 0.4, 3
    with fake_openai(lambda req: ("sleep", 30.0)) as srv:
        backend = _backend(srv.url, model="m", timeout_s=timeout_s, max_retries=tries - 1, backoff_s=0.05)
        start = time.monotonic()
        with pytest.raises(BackendError) as info:
            backend.chat(USER)
        elapsed = time.monotonic() - start
    assert info.value.reason == "timeout"
    assert timeout_s * tries <= elapsed < timeout_s * tries + 0.05 * 3 + 2.0  # tries × timeout + back-offs + slack


def test_backoff_is_exponential_and_capped():
    with fake_openai(lambda req: ("status", 500)) as srv:
        backend = _backend(srv.url, model="m", max_retries=4, backoff_s=0.1, max_backoff_s=0.2)
        start = time.monotonic()
        with pytest.raises(BackendError):
            backend.chat(USER)
        elapsed = time.monotonic() - start
    # sleeps 0.1, 0.2, 0.2 (capped), 0.2, each times a jitter factor in [0.5, 1)
    assert 0.5 * 0.7 <= elapsed < 0.7 + 1.5


def test_concurrency_limit_is_respected():
    with fake_openai(lambda req: ("sleep", 0.3, "done")) as srv:
        backend = _backend(srv.url, model="m", concurrency=3)
        results = list(map_concurrent(lambda i: backend.chat(USER).content, range(12), 8))
        assert sorted(r for _, r in results) == ["done"] * 12
        assert srv.max_in_flight == 3


SCHEMA = {
    "type": "object",
    "properties": {"faithful": {"type": "boolean"}, "reason": {"type": "string"}},
    "required": ["faithful", "reason"],
    "additionalProperties": False,
}


def test_chat_json_validates_and_rejects():
    replies = [{"faithful": True, "reason": "same facts"}, {"faithful": "yes"}, ("text", "{not json")]
    with fake_openai(_faults_then(replies, "unused")) as srv:
        backend = _backend(srv.url, model="m")
        assert chat_json(backend, USER, SCHEMA, name="verdict", temperature=0.0) == replies[0]
        assert srv.requests[0]["response_format"] == {
            "type": "json_schema",
            "json_schema": {"name": "verdict", "schema": SCHEMA, "strict": True},
        }
        assert srv.requests[0]["temperature"] == 0.0
        with pytest.raises(BackendError) as info:
            chat_json(backend, USER, SCHEMA)
        assert info.value.reason == "schema_mismatch"
        with pytest.raises(BackendError) as info:
            chat_json(backend, USER, SCHEMA)
        assert info.value.reason == "invalid_json"


def test_map_concurrent_returns_k2_errors_and_raises_bugs():
    def fn(i):
        if i % 3 == 0:
            raise BackendError("timeout", f"item {i}")
        return i * i

    got = dict(map_concurrent(fn, range(10), 4))
    assert set(got) == set(range(10))
    assert all(isinstance(got[i], BackendError) if i % 3 == 0 else got[i] == i * i for i in range(10))

    def bug(i):
        raise ZeroDivisionError(i)

    with pytest.raises(ZeroDivisionError):
        list(map_concurrent(bug, range(3), 2))


def test_make_backend_dispatch(tmp_path):
    assert isinstance(make_backend("http://127.0.0.1:1/v1", model="m"), OpenAIBackend)
    with pytest.raises(ConfigError, match="neither an http"):
        make_backend(str(tmp_path / "missing"))


def test_fixture_as_a_subprocess(tmp_path):
    script = tmp_path / "script.json"
    script.write_text(json.dumps([["status", 503], "first", {"n": 2}]))
    with fake_openai_process(str(script), tmp_path / "srv") as srv:
        backend = _backend(srv.url)
        assert backend.chat(USER).content == "first"  # after one retry of the 503
        assert json.loads(backend.chat(USER).content) == {"n": 2}
        assert [r["messages"] for r in srv.requests()] == [USER] * 3


# ---- engine back end ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("agentic") / "ckpt"
    save_tiny_checkpoint(path)
    return path


def test_engine_backend_answers_like_the_engine(checkpoint, one_thread):
    model, tok = load_checkpoint(checkpoint)
    engine = Engine(model, tok, max_batch_size=1, max_seq_len=512)
    questions = ["What is MLA?", "Name a colour.", "Count to three."]
    expected = {}
    for q in questions:
        ids, _ = chat.render([{"role": "user", "content": q}], tok, add_generation_prompt=True)
        params = SamplingParams(max_new_tokens=8, temperature=0, stop_token_ids=chat.stop_token_ids(tok))
        expected[q] = (engine.generate([ids], params)[0], len(ids))

    backend = EngineBackend(checkpoint, max_seq_len=512, max_batch_size=3)
    try:
        ask = lambda q: backend.chat([{"role": "user", "content": q}], temperature=0.0, max_tokens=8)  # noqa: E731
        replies = dict(map_concurrent(ask, questions, 3))  # batched together in the engine
    finally:
        backend.close()
    for q in questions:
        ref, n_prompt = expected[q]
        assert replies[q].content == ref.text and replies[q].finish_reason == ref.finish_reason
        assert (replies[q].prompt_tokens, replies[q].completion_tokens) == (n_prompt, len(ref.token_ids))
    assert backend.usage()["requests"] == 3 and backend.name == f"engine:{checkpoint}"


NESTED = {
    "type": "object",
    "properties": {
        "verdict": {"enum": ["keep", "drop"]},
        "score": {"type": "integer", "minimum": 0, "maximum": 9},
        "notes": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 2},
    },
    "required": ["verdict", "score", "notes"],
    "additionalProperties": False,
}


def test_engine_backend_constrained_json_and_tool_calls(checkpoint, one_thread):
    """A random tiny model answers valid JSON and valid tool calls only because decoding is constrained."""
    tools = [{"type": "function", "function": {"name": "add", "parameters": NESTED}}]
    backend = EngineBackend(checkpoint, max_seq_len=1024, max_batch_size=4)
    try:
        values = dict(
            map_concurrent(
                lambda s: chat_json(backend, USER, NESTED, temperature=1.0, max_tokens=200, seed=s), range(4), 4
            )
        )
        reply = backend.chat(USER, tools=tools, tool_choice="required", temperature=1.0, max_tokens=200, seed=1)
    finally:
        backend.close()
    assert all(not isinstance(v, BaseException) for v in values.values()), values  # parsed and validated
    # a random model may start more parallel calls than max_tokens holds ("length"); every complete one is valid
    assert reply.finish_reason in ("tool_calls", "length") and len(reply.tool_calls) >= 1
    for call in reply.tool_calls:
        assert call["function"]["name"] == "add"
        jsonschema.validate(json.loads(call["function"]["arguments"]), NESTED)


def test_engine_backend_from_a_run_directory(checkpoint, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "hf").symlink_to(checkpoint, target_is_directory=True)  # k2 pretrain's export
    backend = make_backend(str(tmp_path / "run"), concurrency=1)
    backend.close()
    assert isinstance(backend, EngineBackend) and backend.name == f"engine:{tmp_path / 'run' / 'hf'}"


def test_engine_backend_rejects_an_overlong_prompt(checkpoint):
    backend = EngineBackend(checkpoint, max_seq_len=64)
    try:
        with pytest.raises(BackendError) as info:
            backend.chat([{"role": "user", "content": "x" * 200}])
    finally:
        backend.close()
    assert info.value.reason == "http_4xx" and backend.usage()["failures"] == 1


# ---- JSONL store ----------------------------------------------------------------------------------------------


def test_stable_id_and_derived_seed_formulas():
    assert stable_id("a", {"y": 1, "x": [2]}) == hashlib.sha256(b'["a",{"x":[2],"y":1}]').hexdigest()[:16]
    assert stable_id({"x": 1, "y": 2}) == stable_id({"y": 2, "x": 1}) != stable_id({"x": 2, "y": 1})
    assert derived_seed(3, "abc") == int.from_bytes(hashlib.sha256(b'[3,"abc"]').digest()[:8], "big") >> 1
    assert derived_seed(3, "abc") != derived_seed(4, "abc") and 0 <= derived_seed(0, "") < 2**63


def test_store_append_and_reopen(tmp_path):
    path = tmp_path / "deep" / "dir" / "stage.jsonl"
    with JsonlStore(path) as store:
        store.append({"id": "a", "v": (1, 2), "text": "é"})
        store.append({"id": "b", "v": None})
        assert "a" in store and "c" not in store and len(store) == 2
        assert store.records()[0] == {"id": "a", "v": [1, 2], "text": "é"}  # as read back from the file
    reopened = JsonlStore(path)
    assert reopened.records() == [{"id": "a", "v": [1, 2], "text": "é"}, {"id": "b", "v": None}]
    assert reopened.ids() == {"a", "b"}
    assert path.read_text(encoding="utf-8").count("\n") == 2


def test_store_truncates_a_torn_last_line(tmp_path):
    path = tmp_path / "s.jsonl"
    with JsonlStore(path) as store:
        store.append({"id": "a"})
    good = path.read_bytes()
    with open(path, "ab") as f:
        f.write(b'{"id": "b", "text": "half a rec')  # a writer killed mid-line
    with JsonlStore(path) as store:
        assert store.ids() == {"a"} and path.read_bytes() == good
        store.append({"id": "b"})
    assert [r["id"] for r in JsonlStore(path).records()] == ["a", "b"]


def test_store_rejects_duplicates_and_bad_lines(tmp_path):
    path = tmp_path / "s.jsonl"
    with JsonlStore(path) as store:
        store.append({"id": "a"})
        with pytest.raises(DataError, match="duplicate record id 'a'"):
            store.append({"id": "a", "other": 1})
        with pytest.raises(DataError, match="'id'"):
            store.append({"text": "no id"})
    assert len(JsonlStore(path)) == 1
    path.write_text('{"id": "a"}\n{"id": "a"}\n')
    with pytest.raises(DataError, match=r"s.jsonl:2: duplicate record id"):
        JsonlStore(path)
    path.write_text('{"id": "a"}\nnot json\n')
    with pytest.raises(DataError, match=r"s.jsonl:2: invalid JSON"):
        JsonlStore(path)


def test_store_concurrent_appends(tmp_path):
    path = tmp_path / "s.jsonl"
    store = JsonlStore(path)
    payload = "x" * 5000  # long lines: interleaved writes would tear them

    def worker(t: int) -> None:
        for i in range(40):
            store.append({"id": f"{t}-{i}", "payload": payload})

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    store.close()
    records = JsonlStore(path).records()
    assert len(records) == 240 and {r["id"] for r in records} == {f"{t}-{i}" for t in range(6) for i in range(40)}
    assert all(r["payload"] == payload for r in records)
    assert [r["id"] for r in records] == [r["id"] for r in store.records()]  # memory and file agree on the order


def test_store_files_are_utf8_jsonl(tmp_path: Path):
    with JsonlStore(tmp_path / "s.jsonl") as store:
        store.append({"id": "ü", "text": "line\nbreak"})
    lines = (tmp_path / "s.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [{"id": "ü", "text": "line\nbreak"}]
