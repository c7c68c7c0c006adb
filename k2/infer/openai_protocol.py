"""The OpenAI chat-completions protocol over the Kimi-K2 chat format: request schema, prompt building, and the
response / streaming-chunk builders, independent of the HTTP server and of the engine.

Prompt: ``k2.data.chat.render(messages, tools=..., add_generation_prompt=True)``. ``tool_choice``:
- ``"auto"`` (the default with tools): tools are declared, the completion is parsed for tool calls;
- ``"none"``: tools are not declared and nothing is parsed;
- ``"required"``: the prompt is extended with ``<|tool_calls_section_begin|><|tool_call_begin|>functions.``;
- ``{"type": "function", "function": {"name": N}}``: the prompt is extended up to N's argument JSON
  (``...functions.N:IDX<|tool_call_argument_begin|>``, IDX counting the dialog's earlier calls).
The forced text is prepended to the completion before parsing (a prefix constraint, not a grammar: the arguments
are still free text, and a call that does not parse is reported as content).

Tools are validated with the request (one layer; a bad one is a 400 with ``param: "tools"``): each has one of the
shapes the chat format declares (OpenAI ``{"type": "function", "function": {...}}``, a bare function, an MCP tool
with ``inputSchema``), a name matching OpenAI's ``^[a-zA-Z0-9_-]{1,64}$`` (which the ``functions.NAME:IDX`` call
ids carry and parse back), and a ``parameters`` / ``inputSchema`` that is an object schema (see ``tool_error``).

The engine stops on the ids of ``<|im_end|>`` and ``[EOS]`` (``chat.stop_token_ids``), never on their text: the
completion text keeps special tokens as strings and ends before the stop token, so a special token's string in it
came from ordinary tokens and is kept. ``parse_completion(text, stop=())`` splits it into content and ``tool_calls``
(finish reason ``"tool_calls"``); call arguments are read with a JSON decoder, so a JSON string argument may hold
any special-token string. If no call parses but the parser reports errors, the whole text is returned as content,
so nothing the model wrote is dropped.

Log-probs are the model's (before temperature and filters; see ``k2.infer.sampling``).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from k2.data import chat
from k2.data.tokenizer import Tokenizer
from k2.errors import DataError
from k2.infer.engine import SamplingParams, TokenEvent

log = logging.getLogger("k2.serve")

_MARKERS = (chat.SECTION_BEGIN, chat.CALL_BEGIN)


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The fields k2 implements; other OpenAI fields are accepted and ignored. ``top_k`` is an extension."""

    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    tools: list[Any] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    n: int = Field(1, ge=1, le=16)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = Field(None, validate_default=True)
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("tools")
    @classmethod
    def _tools(cls, v: list[Any] | None) -> list[Any] | None:
        for i, tool in enumerate(v or []):
            if error := tool_error(tool, i):
                raise PydanticCustomError("invalid_tool", "{error}", {"error": error})
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop must be a non-empty string or a list of at most 4 non-empty strings")
        return stops

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs: true")
        if isinstance(self.tool_choice, NamedToolChoice) or self.tool_choice == "required":
            names = {_tool_name(t) for t in self.tools or []}
            if not names:
                raise ValueError("tool_choice requires tools")
            if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
                raise ValueError(f"tool_choice names {self.tool_choice.function.name!r}, which is not in tools")
        return self


def _tool_name(tool: Mapping[str, Any]) -> str | None:
    return chat.tool_function(tool, 0).get("name")


# OpenAI's rule for function names; the chat format's call ids ``functions.NAME:IDX`` carry any such name (no
# whitespace, ``<`` or ``>``; the parser splits the index off at the last ``:``).
TOOL_NAME_RE = re.compile(r"[a-zA-Z0-9_-]{1,64}")


def _schema_error(schema: Any) -> str | None:
    """Why ``schema`` is not a JSON Schema for a function's arguments (None if it is acceptable): it must be an
    object; its ``type``, if given, ``"object"``; ``properties`` an object of schemas; ``required`` a list of
    strings (a structural check: arguments are free text generated by the model, not validated against it)."""
    if not isinstance(schema, Mapping):
        return f"must be a JSON Schema object, got {type(schema).__name__}"
    if "type" in schema and schema["type"] != "object":
        return f'must be a JSON Schema of "type": "object", got "type": {json.dumps(schema["type"])[:80]}'
    props = schema.get("properties")
    if "properties" in schema and not (
        isinstance(props, Mapping) and all(isinstance(p, (Mapping, bool)) for p in props.values())
    ):
        return '"properties" must be an object mapping each argument name to a JSON Schema'
    req = schema.get("required")
    if "required" in schema and not (isinstance(req, list) and all(isinstance(r, str) for r in req)):
        return '"required" must be a list of argument names'
    return None


def tool_error(tool: Any, i: int) -> str | None:
    """Why ``tools[i]`` of a request is invalid, or None. Accepted shapes are those of the chat format (OpenAI
    ``{"type": "function", "function": {...}}``, a bare function, an MCP tool); the name must match OpenAI's
    ``^[a-zA-Z0-9_-]{1,64}$``, ``description`` be a string, and ``parameters`` / MCP ``inputSchema`` an object
    schema."""
    try:
        fn = chat.tool_function(tool, i)
    except DataError as e:
        return str(e).removeprefix("chat.render: ")
    where = f"tools[{i}].function" if fn is not tool else f"tools[{i}]"
    name = fn.get("name")
    if not (isinstance(name, str) and TOOL_NAME_RE.fullmatch(name)):
        return f"{where}.name must be 1 to 64 letters, digits, '_' or '-', got {json.dumps(name)[:80]}"
    if fn.get("description") is not None and not isinstance(fn["description"], str):
        return f"{where}.description must be a string"
    for key in ("parameters", "inputSchema"):
        if fn.get(key) is not None and (error := _schema_error(fn[key])):
            return f"{where}.{key} {error}"
    return None


@dataclass
class Prompt:
    ids: list[int]
    forced_text: str  # text appended after the generation prompt, prepended to the completion before parsing
    parse_tools: bool


def build_prompt(req: ChatCompletionRequest, tokenizer: Tokenizer) -> Prompt:
    """Render the request's conversation (raises ``k2.errors.DataError`` for malformed messages or tools)."""
    use_tools = bool(req.tools) and req.tool_choice != "none"
    ids, _ = chat.render(req.messages, tokenizer, tools=req.tools if use_tools else None, add_generation_prompt=True)
    forced = ""
    if use_tools and req.tool_choice == "required":
        forced = f"{chat.SECTION_BEGIN}{chat.CALL_BEGIN}functions."
    elif use_tools and isinstance(req.tool_choice, NamedToolChoice):
        idx = sum(len(m.get("tool_calls") or []) for m in req.messages if m.get("role") == "assistant")
        name = req.tool_choice.function.name
        forced = f"{chat.SECTION_BEGIN}{chat.CALL_BEGIN}functions.{name}:{idx}{chat.ARG_BEGIN}"
    if forced:
        ids = ids + tokenizer.encode(forced, allow_special=True)
    return Prompt(ids, forced, use_tools)


def sampling_params(req: ChatCompletionRequest, tokenizer: Tokenizer, max_new_tokens: int) -> list[SamplingParams]:
    """One ``SamplingParams`` per choice; choice ``i`` of a seeded request uses seed ``seed + i``."""
    stop_ids = chat.stop_token_ids(tokenizer)
    limit = req.max_completion_tokens or req.max_tokens or max_new_tokens
    return [
        SamplingParams(
            max_new_tokens=min(limit, max_new_tokens),
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=req.top_k or 0,
            seed=None if req.seed is None else req.seed + i,
            stop=tuple(req.stop),
            stop_token_ids=stop_ids,
            top_logprobs=(req.top_logprobs or 0) if req.logprobs else 0,
        )
        for i in range(req.n)
    ]


# ---- responses -----------------------------------------------------------------------------------------------


def _token_entry(tokenizer: Tokenizer, token_id: int, logprob: float) -> dict[str, Any]:
    raw = tokenizer.decode_bytes([token_id])
    return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}


def logprobs_content(tokenizer: Tokenizer, events: Sequence[TokenEvent]) -> list[dict[str, Any]]:
    """OpenAI ``logprobs.content`` entries for ``events`` (one per generated token)."""
    out = []
    for ev in events:
        entry = _token_entry(tokenizer, ev.token_id, ev.logprob)
        entry["top_logprobs"] = [_token_entry(tokenizer, t, lp) for t, lp in ev.top_logprobs]
        out.append(entry)
    return out


def split_completion(text: str, parse_tools: bool) -> tuple[str, list[dict[str, Any]]]:
    """``(content, tool_calls)`` of a completion text (forced prefix included)."""
    if not parse_tools:
        return text, []
    content, calls, errors = chat.parse_completion(text, stop=())  # the engine stopped on the token ids
    if errors:
        log.warning("tool-call parse errors: %s", "; ".join(errors))
        if not calls:
            return text, []
    return content, calls


def build_choice(
    index: int, text: str, finish_reason: str, parse_tools: bool, logprobs: list[dict[str, Any]] | None
) -> dict[str, Any]:
    """A non-streaming ``choices[index]`` from the completion text (forced prefix included)."""
    content, calls = split_completion(text, parse_tools)
    message: dict[str, Any] = {"role": "assistant", "content": content if content or not calls else None}
    if calls:
        message["tool_calls"] = calls
        finish_reason = "tool_calls" if finish_reason == "stop" else finish_reason
    return {
        "index": index,
        "message": message,
        "logprobs": None if logprobs is None else {"content": logprobs},
        "finish_reason": finish_reason,
    }


class ChoiceStream:
    """Turns one choice's events into streaming deltas. Content is released up to the first tool-call marker
    (text that may be the start of a marker is held back); tool calls are sent whole when the choice ends."""

    def __init__(self, index: int, forced_text: str, parse_tools: bool) -> None:
        self.index = index
        self.text = forced_text
        self.parse_tools = parse_tools
        self._sent = 0  # characters of content already sent

    def _visible(self) -> int:
        if not self.parse_tools:
            return len(self.text)
        cuts = [i for m in _MARKERS if (i := self.text.find(m)) >= 0]
        if cuts:
            return min(cuts)
        hold = max((n for m in _MARKERS for n in range(1, len(m)) if self.text.endswith(m[:n])), default=0)
        return len(self.text) - hold

    def delta(self, ev_text: str) -> str:
        """Content to send after ``ev_text`` arrives."""
        self.text += ev_text
        upto = max(self._visible(), self._sent)
        out, self._sent = self.text[self._sent : upto], upto
        return out

    def finish(self, finish_reason: str) -> tuple[dict[str, Any], str]:
        """The closing delta (remaining content, tool calls) and the finish reason."""
        content, calls = split_completion(self.text, self.parse_tools)
        delta: dict[str, Any] = {}
        rest = content[self._sent :] if content.startswith(self.text[: self._sent]) else ""
        if rest:
            delta["content"] = rest
        if calls:
            delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(calls)]
            finish_reason = "tool_calls" if finish_reason == "stop" else finish_reason
        return delta, finish_reason


def sse(data: Mapping[str, Any] | str) -> str:
    """One server-sent event."""
    body = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {body}\n\n"
