"""A scripted OpenAI-compatible chat server on loopback, for tests that need exact replies or faults.

It answers ``POST /v1/chat/completions`` with whatever a *script* returns for the request's JSON body, and
``GET /v1/models`` with one model (``fake``). A script is a callable ``request_json -> reply``; a reply is
- a ``str``: the assistant's text;
- any other JSON value (dict, list, number, bool, None): sent as the content, JSON-encoded;
- ``("tool_calls", [{"name": N, "arguments": {...} or "json text"}, ...])``: tool calls (ids ``call_0``, ...);
- ``("text", s)``: text, for a string that must not be mistaken for another form;
- a fault: ``("sleep", seconds)`` or ``("sleep", seconds, reply)`` (answer late: a client timeout),
  ``("status", code)`` (an OpenAI-shaped error body with that HTTP status), ``("malformed",)`` (a 200 body that is
  not JSON), ``("malformed", value)`` (a 200 JSON body ``value``, e.g. one without ``choices``), ``("close",)``
  (headers and half a body, then the connection is dropped).

Usage counts characters, not tokens: ``prompt_tokens`` = the summed length of the messages' string contents,
``completion_tokens`` = the length of the content plus the tool calls' argument strings (a formula tests can check).
Every request body is recorded (``requests``, in arrival order) and so is the most requests in flight at once.

In process: ``with fake_openai(script) as srv: srv.url``. As a process (for tests that SIGKILL a client):
``python python_tests/_fake_openai.py --script MODULE:FN|FILE.py:FN|FILE.json --port-file F [--requests-log L]``;
it writes its port to F once listening and appends each request body to L as a JSON line. A JSON script is a list
of replies answered in turn, cycling; a JSON list inside it stands for a tuple (``["status", 500]``). See
:func:`fake_openai_process`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

Script = Callable[[dict[str, Any]], Any]
MODEL = "fake"


def _message(reply: Any) -> tuple[dict[str, Any], str]:
    """The assistant message and finish reason for a non-fault reply."""
    if isinstance(reply, tuple) and reply and reply[0] == "text":
        return {"role": "assistant", "content": reply[1]}, "stop"
    if isinstance(reply, tuple) and reply and reply[0] == "tool_calls":
        calls = []
        for i, call in enumerate(reply[1]):
            args = call.get("arguments", {})
            args = args if isinstance(args, str) else json.dumps(args)
            calls.append({"id": f"call_{i}", "type": "function", "function": {"name": call["name"], "arguments": args}})
        return {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"
    if isinstance(reply, tuple):
        raise ValueError(f"fake_openai: unknown reply {reply!r}")
    content = reply if isinstance(reply, str) else json.dumps(reply)
    return {"role": "assistant", "content": content}, "stop"


def completion_body(request: dict[str, Any], reply: Any, n: int) -> dict[str, Any]:
    message, finish = _message(reply)
    prompt = sum(len(m["content"]) for m in request.get("messages", []) if isinstance(m.get("content"), str))
    completion = len(message.get("content") or "")
    completion += sum(len(c["function"]["arguments"]) for c in message.get("tool_calls", []))
    return {
        "id": f"chatcmpl-fake-{n}",
        "object": "chat.completion",
        "created": 0,
        "model": request.get("model", MODEL),
        "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
    }


class FakeServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, script: Script, requests_log: Path | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.script = script
        self.requests_log = requests_log
        self.requests: list[dict[str, Any]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FakeServer

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/v1/models":
            self._send(200, json.dumps({"object": "list", "data": [{"id": MODEL, "object": "model"}]}).encode())
        else:
            self._send(404, b'{"error": {"message": "not found"}}')

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._send(404, b'{"error": {"message": "not found"}}')
            return
        request = json.loads(body)
        srv = self.server
        with srv.lock:
            n = len(srv.requests)
            srv.requests.append(request)
            srv.in_flight += 1
            srv.max_in_flight = max(srv.max_in_flight, srv.in_flight)
            if srv.requests_log is not None:
                with open(srv.requests_log, "a", encoding="utf-8") as f:
                    f.write(json.dumps(request) + "\n")
        try:
            self._answer(request, srv.script(request), n)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout)
            self.close_connection = True
        finally:
            with srv.lock:
                srv.in_flight -= 1

    def _answer(self, request: dict[str, Any], reply: Any, n: int) -> None:
        kind = reply[0] if isinstance(reply, tuple) and reply else None
        if kind == "sleep":
            time.sleep(reply[1])
            reply = reply[2] if len(reply) > 2 else "slept"
            kind = reply[0] if isinstance(reply, tuple) and reply else None
        if kind == "status":
            error = {"error": {"message": f"scripted HTTP {reply[1]}", "type": "fake_error", "code": reply[1]}}
            self._send(reply[1], json.dumps(error).encode())
        elif kind == "malformed":
            self._send(200, b"<html>not json" if len(reply) == 1 else json.dumps(reply[1]).encode())
        elif kind == "close":
            data = json.dumps(completion_body(request, "cut off", n)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
        else:
            self._send(200, json.dumps(completion_body(request, reply, n)).encode())


@contextlib.contextmanager
def fake_openai(script: Script, requests_log: Path | None = None) -> Iterator[FakeServer]:
    """A :class:`FakeServer` on a free loopback port, served from a thread; ``.url`` is its ``/v1`` base URL."""
    server = FakeServer(script, requests_log)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def _tuples(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def load_script(spec: str) -> Script:
    """``MODULE:FN`` or ``FILE.py:FN`` (a callable), or ``FILE.json`` (a list of replies answered in turn)."""
    if spec.endswith(".json"):
        replies = [_tuples(r) for r in json.loads(Path(spec).read_text())]
        counter = iter(range(1 << 62))
        lock = threading.Lock()

        def scripted(_: dict[str, Any]) -> Any:
            with lock:
                return replies[next(counter) % len(replies)]

        return scripted
    module_name, _, fn = spec.rpartition(":")
    if module_name.endswith(".py"):
        spec_obj = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
        module = importlib.util.module_from_spec(spec_obj)
        spec_obj.loader.exec_module(module)
    else:
        sys.path.insert(0, str(Path(__file__).parent))
        module = importlib.import_module(module_name)
    return getattr(module, fn)


@dataclass
class FakeProcess:
    url: str
    requests_log: Path
    proc: subprocess.Popen

    def requests(self) -> list[dict[str, Any]]:
        if not self.requests_log.exists():
            return []
        return [json.loads(line) for line in self.requests_log.read_text().splitlines() if line]


@contextlib.contextmanager
def fake_openai_process(script: str, workdir: Path) -> Iterator[FakeProcess]:
    """The fake server as a subprocess (``script`` as for ``--script``); killed on exit."""
    workdir.mkdir(parents=True, exist_ok=True)
    port_file, log = workdir / "fake_openai.port", workdir / "fake_openai.requests.jsonl"
    port_file.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--script", script, "--port-file", str(port_file), "--requests-log", str(log)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read() if proc.poll() is not None else "(still starting after 60 s)"
                raise RuntimeError(f"fake_openai did not start: {err}")
            time.sleep(0.05)
        yield FakeProcess(f"http://127.0.0.1:{port_file.read_text().strip()}/v1", log, proc)
    finally:
        proc.kill()
        proc.wait(timeout=30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--script", required=True, help="MODULE:FN, FILE.py:FN or FILE.json")
    p.add_argument("--port-file", required=True, type=Path, help="written with the port once listening")
    p.add_argument("--requests-log", type=Path, help="append each request body here as a JSON line")
    args = p.parse_args()
    server = FakeServer(load_script(args.script), args.requests_log)
    tmp = args.port_file.with_name(args.port_file.name + ".tmp")
    tmp.write_text(str(server.server_address[1]))
    os.replace(tmp, args.port_file)
    server.serve_forever(poll_interval=0.05)


if __name__ == "__main__":
    main()
