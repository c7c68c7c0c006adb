"""An OpenAI-compatible HTTP server (FastAPI + uvicorn) over a pluggable generation engine.

Endpoints: ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/chat/completions`` (``tools``,
``tool_choice``, ``parallel_tool_calls``, ``response_format``, ``n``, ``temperature``, ``top_p``, ``top_k``,
``max_tokens`` / ``max_completion_tokens``, ``stop``, ``seed``, ``logprobs`` / ``top_logprobs``, ``stream`` with
``stream_options.include_usage``), ``POST /v1/completions`` (vLLM's form for token ids: ``prompt`` as ids,
``stop_token_ids``, ``logprobs``, ``return_tokens_as_token_ids``; see ``k2.infer.openai_protocol``), and
``GET /health``. Protocol details (prompt rendering, tool choice, output
grammars, parsing) are in ``k2.infer.openai_protocol``.

The engine is anything with ``tokenizer``, ``max_seq_len`` and ``async generate(prompt_ids, SamplingParams) ->
AsyncIterator[TokenEvent]`` — :class:`k2.infer.AsyncEngine` over a k2 ``Engine``, whose background thread batches
the concurrent requests of all handlers into shared forwards.

Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: a malformed body or invalid field
400 (a bad ``tools`` or ``response_format`` schema names that ``param``), an unknown model 404
(``model_not_found``), a prompt that leaves no room to generate 400
(``context_length_exceeded``); ``max_tokens`` beyond the remaining context is clipped (finish reason
``"length"``). Serving continues after any of them.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from k2.data.tokenizer import Tokenizer
from k2.errors import DataError
from k2.infer.engine import SamplingParams, TokenEvent
from k2.infer.openai_protocol import (
    ChatCompletionRequest,
    ChoiceStream,
    CompletionRequest,
    build_choice,
    build_prompt,
    completion_logprobs,
    completion_sampling_params,
    logprobs_content,
    sampling_params,
    sse,
)


class GenerationEngine(Protocol):
    tokenizer: Tokenizer
    max_seq_len: int

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[TokenEvent]: ...


class APIError(Exception):
    def __init__(
        self, status: int, message: str, *, type: str = "invalid_request_error", param=None, code=None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def _error(status: int, message: str, type: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def create_app(engine: GenerationEngine, model_name: str) -> FastAPI:
    app = FastAPI(title="k2", docs_url=None, redoc_url=None)
    created = int(time.time())
    model_card = {"id": model_name, "object": "model", "created": created, "owned_by": "k2"}

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return _error(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        if first.get("type") == "json_invalid":
            return _error(
                400,
                f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}",
                "invalid_request_error",
            )
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        message = first.get("msg", "invalid request")
        return _error(400, f"{param}: {message}" if param else message, "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return _error(e.status_code, str(e.detail), kind)

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception) -> JSONResponse:
        return _error(500, f"internal error: {e!r}", "server_error")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str) -> dict[str, Any]:
        if model_id != model_name:
            raise APIError(404, f"The model `{model_id}` does not exist", param="model", code="model_not_found")
        return model_card

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest):
        if req.model != model_name:
            raise APIError(404, f"The model `{req.model}` does not exist", param="model", code="model_not_found")
        tokenizer = engine.tokenizer
        try:
            prompt = build_prompt(req, tokenizer)
        except DataError as e:
            raise APIError(400, str(e), param="messages") from None
        room = engine.max_seq_len - len(prompt.ids)
        if room < 1:
            raise APIError(
                400,
                f"This model's maximum context length is {engine.max_seq_len} tokens; the messages have "
                f"{len(prompt.ids)} tokens, which leaves no room to generate",
                param="messages",
                code="context_length_exceeded",
            )
        try:
            params = sampling_params(req, tokenizer, room)
        except DataError as e:
            raise APIError(400, str(e), param="tools" if req.tools else "response_format") from None
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            body = _stream(engine, prompt, params, head, req.logprobs, include_usage)
            return StreamingResponse(body, media_type="text/event-stream")
        results = await asyncio.gather(*(_collect(engine, prompt.ids, p) for p in params))
        choices = [
            build_choice(
                i,
                "".join(ev.text for ev in events),
                events[-1].finish_reason,
                prompt.parse_tools,
                logprobs_content(tokenizer, events) if req.logprobs else None,
            )
            for i, events in enumerate(results)
        ]
        completion_tokens = sum(len(events) for events in results)
        return {
            **head,
            "object": "chat.completion",
            "choices": choices,
            "usage": _usage(len(prompt.ids), completion_tokens),
        }

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        if req.model != model_name:
            raise APIError(404, f"The model `{req.model}` does not exist", param="model", code="model_not_found")
        tokenizer = engine.tokenizer
        prompts = req.prompts(tokenizer)
        jobs = []
        for ids in prompts:
            room = engine.max_seq_len - len(ids)
            if room < 1:
                raise APIError(
                    400,
                    f"This model's maximum context length is {engine.max_seq_len} tokens; the prompt has {len(ids)} "
                    "tokens, which leaves no room to generate",
                    param="prompt",
                    code="context_length_exceeded",
                )
            jobs += [_collect(engine, ids, p) for p in completion_sampling_params(req, tokenizer, room)]
        results = await asyncio.gather(*jobs)
        as_ids = req.return_tokens_as_token_ids
        choices = [
            {
                "index": i,
                "text": "".join(ev.text for ev in events),
                "logprobs": None if req.logprobs is None else completion_logprobs(tokenizer, events, as_ids),
                "finish_reason": events[-1].finish_reason,
            }
            for i, events in enumerate(results)
        ]
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": choices,
            "usage": _usage(sum(map(len, prompts)), sum(len(events) for events in results)),
        }

    return app


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


async def _collect(engine: GenerationEngine, prompt_ids: list[int], params: SamplingParams) -> list[TokenEvent]:
    try:
        return [ev async for ev in engine.generate(prompt_ids, params)]
    except ValueError as e:
        raise APIError(400, str(e)) from None


async def _stream(engine, prompt, params, head, with_logprobs: bool, include_usage: bool) -> AsyncIterator[str]:
    """SSE chunks of all choices, interleaved as their tokens arrive, then ``[DONE]``."""
    chunk_head = {**head, "object": "chat.completion.chunk"}
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, p: SamplingParams) -> None:
        try:
            async for ev in engine.generate(prompt.ids, p):
                await queue.put((i, ev))
        except Exception as e:
            await queue.put((i, e))

    tasks = [asyncio.create_task(pump(i, p)) for i, p in enumerate(params)]
    streams = [ChoiceStream(i, prompt.parse_tools) for i in range(len(params))]
    completion_tokens, open_choices = 0, len(params)
    try:
        for i in range(len(params)):
            choice = {
                "index": i,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
            yield sse({**chunk_head, "choices": [choice]})
        while open_choices:
            i, ev = await queue.get()
            if isinstance(ev, Exception):
                yield sse({"error": {"message": str(ev), "type": "server_error", "param": None, "code": None}})
                return
            completion_tokens += 1
            choice = {"index": i, "delta": {}, "logprobs": None, "finish_reason": None}
            text = streams[i].delta(ev.text)
            if text:
                choice["delta"]["content"] = text
            if with_logprobs:
                choice["logprobs"] = {"content": logprobs_content(engine.tokenizer, [ev])}
            if text or with_logprobs:
                yield sse({**chunk_head, "choices": [choice]})
            if ev.finished:
                open_choices -= 1
                delta, reason = streams[i].finish(ev.finish_reason)
                choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}
                yield sse({**chunk_head, "choices": [choice]})
        if include_usage:
            yield sse({**chunk_head, "choices": [], "usage": _usage(len(prompt.ids), completion_tokens)})
        yield sse("[DONE]")
    finally:
        for task in tasks:
            task.cancel()


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free port chosen by the OS)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


def serve(
    app: FastAPI,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    on_ready: Callable[[str], None] | None = None,
    log_level: str = "warning",
    stop: threading.Event | None = None,
) -> None:
    """Run ``app`` with uvicorn until interrupted or ``stop`` is set; ``on_ready(url)`` is called once the socket
    listens."""
    import uvicorn

    sock = bind_socket(host, port)
    bound = sock.getsockname()[1]
    url = f"http://[{host}]:{bound}" if ":" in host else f"http://{host}:{bound}"
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=2))
    if stop is not None:
        threading.Thread(target=lambda: stop.wait() and setattr(server, "should_exit", True), daemon=True).start()
    if on_ready is not None:
        on_ready(url)
    server.run(sockets=[sock])
