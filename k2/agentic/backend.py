"""Chat back ends for the data-synthesis pipelines: any OpenAI-compatible server, or a k2 checkpoint in process.

The LLMs of agentic data synthesis and rephrasing (Kimi K2 report, arXiv 2507.20534 §3.1.1 and §2.2) are plain chat
models behind the OpenAI chat-completions API, the field's common interface (vLLM, SGLang, ``k2 serve``). Every
stage talks to one :class:`ChatBackend`:

- :class:`OpenAIBackend`: the official ``openai`` client with its own retries off (``max_retries=0``); the retry
  loop is here so every fault is classified and counted. Retried: timeouts, connection errors (refused, reset,
  closed mid-response), HTTP 5xx, 408 and 429, and bodies that are not a chat completion. Not retried: other 4xx
  (the request itself is wrong). Back-off between tries: ``backoff_s · 2^try`` capped at ``max_backoff_s``, times
  a jitter factor in [0.5, 1) from a seeded generator. Every try has a timeout, so a call never hangs: it
  returns or raises :class:`BackendError` within about ``(max_retries + 1) · timeout_s`` plus the back-offs.
- :class:`EngineBackend`: a ``k2.infer.Engine`` over a Hugging Face-format checkpoint, driven exactly as ``k2 serve``
  drives it (the same request model, prompt rendering, sampling parameters and reply builder from
  ``k2.infer.openai_protocol``), so replies match what the server would send, and ``response_format`` /
  ``tool_choice`` are enforced by its constrained decoding (``k2.infer.grammar``); concurrent callers share the
  engine's batches through ``k2.infer.async_engine.AsyncEngine``.

``usage()`` counts ``requests`` (calls of ``chat``), ``retries`` (extra tries), ``failures`` (calls that raised
:class:`BackendError`) and the ``prompt_tokens`` / ``completion_tokens`` of successful replies as the server's
``usage`` reports them.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import jsonschema

from k2.errors import ConfigError, K2Error

REASONS = (
    "timeout",
    "http_5xx",
    "http_4xx",
    "connection",
    "malformed_response",
    "invalid_json",
    "schema_mismatch",
)


class BackendError(K2Error):
    """A chat request that failed after all its tries; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"BackendError: unknown reason {reason!r}")
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclass(frozen=True)
class ChatReply:
    content: str  # assistant text ("" when it only called tools)
    tool_calls: list[dict[str, Any]]  # OpenAI shape {"id", "type": "function", "function": {"name", "arguments"}}
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class ChatBackend(Protocol):
    name: str

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
        response_format: Mapping[str, Any] | None = None,
        temperature: float = 0.7,
        max_tokens: int = 512,
        seed: int | None = None,
    ) -> ChatReply: ...

    def usage(self) -> dict[str, int]: ...


class _Usage:
    """Thread-safe counters behind ``usage()``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(("requests", "retries", "failures", "prompt_tokens", "completion_tokens"), 0)

    def add(self, **counts: int) -> None:
        with self._lock:
            for key, n in counts.items():
                self._counts[key] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


def parse_reply(body: Any) -> ChatReply:
    """A ``ChatReply`` from a chat-completion JSON body; ``BackendError("malformed_response")`` if it is not one."""
    try:
        choice = body["choices"][0]
        message = choice["message"]
        content = message.get("content") or ""
        calls = message.get("tool_calls") or []
        if not isinstance(content, str) or not isinstance(calls, list):
            raise TypeError("content must be a string and tool_calls a list")
        for call in calls:
            if not (isinstance(call["function"]["name"], str) and isinstance(call["function"]["arguments"], str)):
                raise TypeError("a tool call needs function.name and function.arguments strings")
        usage = body.get("usage") or {}
        return ChatReply(
            content=content,
            tool_calls=[dict(c) for c in calls],
            finish_reason=str(choice.get("finish_reason") or ""),
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
        )
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
        raise BackendError("malformed_response", f"not a chat completion ({e!r}): {str(body)[:200]}") from None


class OpenAIBackend:
    """An OpenAI-compatible ``/v1/chat/completions`` endpoint (see the module docstring for retries)."""

    def __init__(
        self,
        base_url: str,
        *,
        model: str | None = None,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        concurrency: int = 8,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
        seed: int = 0,
    ) -> None:
        import openai

        if timeout_s <= 0 or max_retries < 0 or concurrency < 1 or backoff_s < 0:
            raise ConfigError(
                f"backend: need timeout_s > 0, max_retries >= 0, concurrency >= 1, backoff_s >= 0; got "
                f"{timeout_s}, {max_retries}, {concurrency}, {backoff_s}"
            )
        self.base_url = base_url.rstrip("/")
        self.timeout_s = float(timeout_s)
        self.max_retries = int(max_retries)
        self.backoff_s, self.max_backoff_s = float(backoff_s), float(max_backoff_s)
        key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY", "EMPTY")
        self._client = openai.OpenAI(base_url=self.base_url, api_key=key, timeout=self.timeout_s, max_retries=0)
        self._model = model
        self._model_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(concurrency)
        self._jitter = random.Random(seed)
        self._jitter_lock = threading.Lock()
        self._usage = _Usage()

    @property
    def name(self) -> str:
        return f"openai:{self.base_url} model={self._model or '?'}"

    def usage(self) -> dict[str, int]:
        return self._usage.snapshot()

    def model(self) -> str:
        """The model id: the one given, else the first that ``GET /models`` lists (vLLM / SGLang / ``k2 serve``
        serve one), asked once."""
        with self._model_lock:
            if self._model is None:
                models = self._call(lambda: self._client.models.list().data)
                if not models:
                    raise BackendError("malformed_response", f"{self.base_url}/models lists no model; pass --model")
                self._model = models[0].id
            return self._model

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
        response_format: Mapping[str, Any] | None = None,
        temperature: float = 0.7,
        max_tokens: int = 512,
        seed: int | None = None,
    ) -> ChatReply:
        self._usage.add(requests=1)
        try:
            body: dict[str, Any] = {
                "model": self.model(),
                "messages": [dict(m) for m in messages],
                "temperature": temperature,
                "max_tokens": max_tokens,
            }
            if tools:
                body["tools"] = [dict(t) for t in tools]
            if tool_choice is not None:
                body["tool_choice"] = tool_choice
            if response_format is not None:
                body["response_format"] = dict(response_format)
            if seed is not None:
                body["seed"] = seed
            reply = self._call(lambda: parse_reply(self._post(body)))
        except BackendError:
            self._usage.add(failures=1)
            raise
        self._usage.add(prompt_tokens=reply.prompt_tokens, completion_tokens=reply.completion_tokens)
        return reply

    def _post(self, body: dict[str, Any]) -> Any:
        """One try: the raw JSON body of the response (the reply is checked by ``parse_reply``, not by the client,
        so a malformed body is classified like any other fault)."""
        raw = self._client.chat.completions.with_raw_response.create(**body)
        try:
            return json.loads(raw.http_response.content)
        except (ValueError, UnicodeDecodeError):
            raise BackendError("malformed_response", f"body is not JSON: {raw.http_response.text[:200]!r}") from None

    def _call(self, attempt: Callable[[], Any]) -> Any:
        for i in range(self.max_retries + 1):
            with self._slots:
                try:
                    return attempt()
                except Exception as e:  # classified by _classify, which re-raises anything that is not a fault
                    error, retry = _classify(e)
            if not retry or i == self.max_retries:
                raise error
            self._usage.add(retries=1)
            with self._jitter_lock:
                jitter = 0.5 + 0.5 * self._jitter.random()
            time.sleep(min(self.max_backoff_s, self.backoff_s * 2**i) * jitter)
        raise AssertionError("unreachable")


def _classify(e: Exception) -> tuple[BackendError, bool]:
    """``(the error to raise, whether to try again)``; re-raises exceptions that are not back-end faults."""
    import openai

    if isinstance(e, BackendError):
        return e, e.reason == "malformed_response"
    if isinstance(e, openai.APITimeoutError):
        return BackendError("timeout", str(e) or "request timed out"), True
    if isinstance(e, openai.APIConnectionError):
        cause = e.__cause__ or e
        return BackendError("connection", f"{type(cause).__name__}: {cause}"), True
    if isinstance(e, openai.APIStatusError):
        status = e.status_code
        message = f"HTTP {status}: {str(e)[:300]}"
        if status >= 500:
            return BackendError("http_5xx", message), True
        return BackendError("http_4xx", message), status in (408, 429)
    raise e


class EngineBackend:
    """A k2 checkpoint served in process (see the module docstring). ``timeout_s`` bounds each call; a timed-out
    request is aborted in the engine. Faults a server would answer with 400 (a prompt longer than
    ``max_seq_len``, malformed messages or tools) raise ``BackendError("http_4xx")``."""

    def __init__(
        self,
        checkpoint: str | os.PathLike[str],
        *,
        timeout_s: float = 600.0,
        max_batch_size: int = 8,
        max_seq_len: int = 4096,
        device: str = "cpu",
        dtype: str | None = None,
        tokenizer: str | None = None,
    ) -> None:
        from k2.infer import Engine
        from k2.infer.async_engine import AsyncEngine
        from k2.infer.loading import load_checkpoint

        path = checkpoint_dir(Path(checkpoint))
        model, tok = load_checkpoint(path, tokenizer=tokenizer, dtype=dtype, device=device)
        self.name = f"engine:{path}"
        self.timeout_s = float(timeout_s)
        self.tokenizer = tok
        self._engine = AsyncEngine(Engine(model, tok, max_batch_size=max_batch_size, max_seq_len=max_seq_len))
        self._usage = _Usage()

    def usage(self) -> dict[str, int]:
        return self._usage.snapshot()

    def close(self) -> None:
        self._engine.shutdown()

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
        response_format: Mapping[str, Any] | None = None,
        temperature: float = 0.7,
        max_tokens: int = 512,
        seed: int | None = None,
    ) -> ChatReply:
        self._usage.add(requests=1)
        try:
            reply = asyncio.run(
                asyncio.wait_for(
                    self._generate(messages, tools, tool_choice, response_format, temperature, max_tokens, seed),
                    self.timeout_s,
                )
            )
        except TimeoutError:
            self._usage.add(failures=1)
            raise BackendError("timeout", f"no reply within {self.timeout_s} s") from None
        except BackendError:
            self._usage.add(failures=1)
            raise
        self._usage.add(prompt_tokens=reply.prompt_tokens, completion_tokens=reply.completion_tokens)
        return reply

    async def _generate(self, messages, tools, tool_choice, response_format, temperature, max_tokens, seed):
        import pydantic

        from k2.errors import DataError
        from k2.infer.openai_protocol import ChatCompletionRequest, build_choice, build_prompt, sampling_params

        fields: dict[str, Any] = {"model": self.name, "messages": [dict(m) for m in messages]}
        fields.update(temperature=temperature, max_tokens=max_tokens, seed=seed)
        if tools:
            fields["tools"] = [dict(t) for t in tools]
        if tool_choice is not None:
            fields["tool_choice"] = tool_choice
        if response_format is not None:
            fields["response_format"] = dict(response_format)
        try:
            req = ChatCompletionRequest.model_validate(fields)
            prompt = build_prompt(req, self.tokenizer)
            room = self._engine.max_seq_len - len(prompt.ids)
            if room < 1:
                raise DataError(f"the prompt has {len(prompt.ids)} tokens, max_seq_len is {self._engine.max_seq_len}")
            (params,) = sampling_params(req, self.tokenizer, room)  # compiles the output grammar, if any
        except (pydantic.ValidationError, DataError) as e:
            raise BackendError("http_4xx", f"bad request: {e}") from None
        try:
            events = [ev async for ev in self._engine.generate(prompt.ids, params)]
        except ValueError as e:
            raise BackendError("http_4xx", str(e)) from None
        text = "".join(ev.text for ev in events)
        choice = build_choice(0, text, events[-1].finish_reason, prompt.parse_tools, None)
        usage = {"prompt_tokens": len(prompt.ids), "completion_tokens": len(events)}
        return parse_reply({"choices": [choice], "usage": usage})


def checkpoint_dir(path: Path) -> Path:
    """``path`` if it holds ``config.json``, else its ``hf/`` export (a ``k2 pretrain`` / ``k2 sft`` run)."""
    from k2.train.loop import HF_DIR

    if not (path / "config.json").is_file() and (path / HF_DIR / "config.json").is_file():
        return path / HF_DIR
    return path


def make_backend(
    spec: str,
    *,
    model: str | None = None,
    concurrency: int = 8,
    timeout_s: float = 60.0,
    max_retries: int = 3,
    device: str = "cpu",
) -> ChatBackend:
    """``http(s)://host:port/v1`` → :class:`OpenAIBackend`; a checkpoint or run directory → :class:`EngineBackend`
    on ``device`` (``concurrency`` is then its batch size)."""
    if spec.startswith(("http://", "https://")):
        return OpenAIBackend(spec, model=model, timeout_s=timeout_s, max_retries=max_retries, concurrency=concurrency)
    path = Path(spec)
    if not path.is_dir():
        raise ConfigError(f"--backend {spec!r} is neither an http(s):// URL nor a checkpoint or run directory")
    return EngineBackend(path, timeout_s=timeout_s, max_batch_size=concurrency, device=device)


def chat_json(
    backend: ChatBackend,
    messages: Sequence[Mapping[str, Any]],
    schema: Mapping[str, Any],
    *,
    name: str = "reply",
    **kw: Any,
) -> Any:
    """Ask for a JSON reply constrained to ``schema`` (``response_format`` ``json_schema``, strict) and return the
    parsed value; ``BackendError("invalid_json")`` / ``("schema_mismatch")`` if the content is not such a value."""
    response_format = {"type": "json_schema", "json_schema": {"name": name, "schema": dict(schema), "strict": True}}
    reply = backend.chat(messages, response_format=response_format, **kw)
    try:
        value = json.loads(reply.content)
    except ValueError as e:
        raise BackendError("invalid_json", f"{e}: {reply.content[:200]!r}") from None
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as e:
        raise BackendError("schema_mismatch", f"{e.message} (at {list(e.absolute_path)})") from None
    return value


T = TypeVar("T")
R = TypeVar("R")


def map_concurrent(fn: Callable[[T], R], items: Iterable[T], concurrency: int) -> Iterator[tuple[T, R | BaseException]]:
    """Run ``fn`` over ``items`` on ``concurrency`` threads, yielding ``(item, result)`` as each completes.

    A ``K2Error`` (``BackendError`` included) raised by ``fn`` is yielded in place of the result, so the caller can
    count it and go on; any other exception (a bug) is raised. At most ``2 · concurrency`` items are taken from
    ``items`` ahead of the results, so a long generator is not drained into memory.
    """
    if concurrency < 1:
        raise ConfigError(f"concurrency must be >= 1, got {concurrency}")
    it = iter(items)
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="k2-agentic") as pool:
        pending: dict[Future, T] = {}

        def fill() -> None:
            while len(pending) < 2 * concurrency:
                try:
                    item = next(it)
                except StopIteration:
                    return
                pending[pool.submit(fn, item)] = item

        fill()
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    item = pending.pop(fut)
                    error = fut.exception()
                    if error is not None and not isinstance(error, K2Error):
                        raise error
                    yield item, (error if error is not None else fut.result())
                fill()
        finally:
            for fut in pending:
                fut.cancel()
