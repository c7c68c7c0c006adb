"""The OpenAI chat-completions protocol over the Kimi-K2 chat format: request schema, prompt building, output
constraints, and the response / streaming-chunk builders, independent of the HTTP server and of the engine; and the
legacy ``/v1/completions`` in vLLM's form for token ids (:class:`CompletionRequest`), which RL rollouts use.

Prompt: ``k2.data.chat.render(messages, tools=..., add_generation_prompt=True)``. Output constraints are grammars
(``k2.infer.grammar``, enforced by the engine token by token; see :func:`request_grammar`):
- ``response_format`` ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``: the content is one
  JSON value valid under ``schema`` (always enforced; ``strict`` is accepted and changes nothing);
  ``{"type": "json_object"}``: any JSON object; ``{"type": "text"}`` or none: free text.
- ``tool_choice`` (with ``tools``): ``"none"``: tools are not declared, nothing is parsed; ``"auto"`` (the default):
  content (free text without the section / call markers as strings, or the ``response_format`` JSON), a tool-call
  section, or content then a section; ``"required"``: only a section of one or more calls; ``{"type": "function",
  "function": {"name": N}}``: only a section with one call to N. Every call names a declared tool, its id is
  ``functions.NAME:IDX`` with IDX counting the dialog's calls, and its arguments are a JSON object valid under the
  tool's ``parameters`` schema. ``parallel_tool_calls: false``: at most one call.
  ``"auto"`` is constrained as well (not only on request): a served model then never writes a call that fails to
  parse or to validate, which is what a synthesis or RL loop reading its calls needs; the price is the grammar's
  per-token mask (see ``tools/bench_infer.py --schema``).

Tools are validated with the request (one layer; a bad one is a 400 with ``param: "tools"``): each has one of the
shapes the chat format declares (OpenAI ``{"type": "function", "function": {...}}``, a bare function, an MCP tool
with ``inputSchema``), a name matching OpenAI's ``^[a-zA-Z0-9_-]{1,64}$`` (which the ``functions.NAME:IDX`` call
ids carry and parse back), and a ``parameters`` / ``inputSchema`` that is an object schema the grammar compiler
can enforce (see ``tool_error``). A bad ``response_format`` schema is a 400 with ``param: "response_format"``.

The engine stops on the ids of ``<|im_end|>`` and ``[EOS]`` (``chat.stop_token_ids``), never on their text, or when
the grammar is complete: the completion text keeps special tokens as strings and ends before the stop token, so a
special token's string in it came from ordinary tokens and is kept. ``parse_completion(text, stop=())`` splits it
into content and ``tool_calls`` (finish reason ``"tool_calls"``); call arguments are read with a JSON decoder, so a
JSON string argument may hold any special-token string. If no call parses but the parser reports errors (a
completion cut by ``max_tokens``), the whole text is returned as content, so nothing the model wrote is dropped.

``/v1/completions`` (no chat template, no grammar): ``prompt`` is a string, a list of token ids, or a list of either
(a batch; choice ``p·n + i`` is sample ``i`` of prompt ``p``); the engine stops on the tokenizer's ``[EOS]`` and on
``stop_token_ids`` (the stop token is the last of the choice's tokens and left out of its ``text``), on ``stop``
strings, or after ``max_tokens`` (default 16, as OpenAI's). ``logprobs: N`` returns OpenAI's legacy
``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`` with the N most likely tokens and the sampled one
in each ``top_logprobs`` entry; with ``return_tokens_as_token_ids`` every token is written ``"token_id:ID"``, so a
client reads back the exact ids sampled. ``stream`` and ``echo`` are not implemented (400).

Log-probs are the model's (before the grammar mask, temperature and filters; see ``k2.infer.sampling``): a token the
grammar forces may have a low log-prob.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator
from pydantic_core import PydanticCustomError

from k2.data import chat
from k2.data.tokenizer import Tokenizer
from k2.errors import DataError
from k2.infer import grammar
from k2.infer.engine import SamplingParams, TokenEvent

log = logging.getLogger("k2.serve")

_MARKERS = (chat.SECTION_BEGIN, chat.CALL_BEGIN)


def _stops(v: str | list[str] | None) -> list[str]:
    stops = [v] if isinstance(v, str) else list(v or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise ValueError("stop must be a non-empty string or a list of at most 4 non-empty strings")
    return stops


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(BaseModel):
    include_usage: bool = False


class JSONSchemaFormat(BaseModel):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | StrictBool = Field(True, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema(self) -> ResponseFormat:
        if self.type == "json_schema":
            if self.json_schema is None:
                raise ValueError('type "json_schema" needs a "json_schema" object')
            try:
                grammar.check_schema(self.json_schema.schema_, "json_schema.schema")
            except grammar.GrammarError as e:
                raise PydanticCustomError("invalid_schema", "{error}", {"error": str(e)}) from None
        return self

    def content_schema(self) -> dict[str, Any] | bool | None:
        """The JSON Schema the content must match (None: free text)."""
        if self.type == "json_schema":
            return self.json_schema.schema_
        return {"type": "object"} if self.type == "json_object" else None


class ChatCompletionRequest(BaseModel):
    """The fields k2 implements; other OpenAI fields are accepted and ignored. ``top_k`` is an extension."""

    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    tools: list[Any] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
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
        return _stops(v)

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


class CompletionRequest(BaseModel):
    """``/v1/completions``: OpenAI's fields k2 implements and vLLM's ``stop_token_ids``,
    ``return_tokens_as_token_ids``; ``top_k`` is an extension. Other fields are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str
    prompt: list[list[int]] | list[int] | list[str] | str
    max_tokens: int = Field(16, ge=1)
    n: int = Field(1, ge=1, le=16)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    stop: str | list[str] | None = Field(None, validate_default=True)
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    logprobs: int | None = Field(None, ge=0, le=20)
    return_tokens_as_token_ids: bool = False
    stream: bool = False
    echo: bool = False

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        return _stops(v)

    @model_validator(mode="after")
    def _supported(self) -> CompletionRequest:
        batch = self.prompt if isinstance(self.prompt, list) else [self.prompt]
        if not batch or any(isinstance(p, (list, str)) and not p for p in batch):
            raise ValueError("prompt must not be empty (nor any prompt of a batch)")
        for flag in ("stream", "echo"):
            if getattr(self, flag):
                raise ValueError(f"{flag} is not implemented for /v1/completions")
        return self

    def prompts(self, tokenizer: Tokenizer) -> list[list[int]]:
        """The prompts as token ids (strings encoded without special tokens)."""
        batch = self.prompt if isinstance(self.prompt, list) and not isinstance(self.prompt[0], int) else [self.prompt]
        return [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in batch]


def completion_sampling_params(req: CompletionRequest, tokenizer: Tokenizer, room: int) -> list[SamplingParams]:
    """One ``SamplingParams`` per choice of one prompt (``room``: tokens left in the context); choice ``i`` of a
    seeded request uses seed ``seed + i``."""
    stop_ids = (tokenizer.eos_id, *(req.stop_token_ids or ()))
    return [
        SamplingParams(
            max_new_tokens=min(req.max_tokens, room),
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=req.top_k or 0,
            seed=None if req.seed is None else req.seed + i,
            stop=tuple(req.stop),
            stop_token_ids=stop_ids,
            top_logprobs=req.logprobs or 0,
        )
        for i in range(req.n)
    ]


def completion_logprobs(tokenizer: Tokenizer, events: Sequence[TokenEvent], as_ids: bool) -> dict[str, Any]:
    """OpenAI's legacy ``logprobs`` object of one choice; ``as_ids``: tokens written ``"token_id:ID"``."""

    def name(token_id: int) -> str:
        return f"token_id:{token_id}" if as_ids else tokenizer.decode_bytes([token_id]).decode("utf-8", "replace")

    tokens = [name(ev.token_id) for ev in events]
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    top = [{**{name(i): lp for i, lp in ev.top_logprobs}, name(ev.token_id): ev.logprob} for ev in events]
    return {
        "tokens": tokens,
        "token_logprobs": [ev.logprob for ev in events],
        "top_logprobs": top,
        "text_offset": offsets,
    }


def _tool_name(tool: Mapping[str, Any]) -> str | None:
    return chat.tool_function(tool, 0).get("name")


# OpenAI's rule for function names; the chat format's call ids ``functions.NAME:IDX`` carry any such name (no
# whitespace, ``<`` or ``>``; the parser splits the index off at the last ``:``).
TOOL_NAME_RE = re.compile(r"[a-zA-Z0-9_-]{1,64}")


def _schema_error(schema: Any) -> str | None:
    """Why ``schema`` is not a JSON Schema for a function's arguments (None if it is acceptable): it must be an
    object; its ``type``, if given, ``"object"``; ``properties`` an object of schemas; ``required`` a list of
    strings (the shape the chat format needs; :func:`grammar.check_schema` then checks the rest)."""
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
    schema that the grammar compiler can enforce (calls are generated under it)."""
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
        if fn.get(key) is None:
            continue
        if error := _schema_error(fn[key]):
            return f"{where}.{key} {error}"
        try:
            grammar.check_schema(fn[key], f"{where}.{key}")
        except grammar.GrammarError as e:
            return str(e)
    return None


@dataclass
class Prompt:
    ids: list[int]
    parse_tools: bool


def _uses_tools(req: ChatCompletionRequest) -> bool:
    return bool(req.tools) and req.tool_choice != "none"


def build_prompt(req: ChatCompletionRequest, tokenizer: Tokenizer) -> Prompt:
    """Render the request's conversation (raises ``k2.errors.DataError`` for malformed messages or tools)."""
    use_tools = _uses_tools(req)
    ids, _ = chat.render(req.messages, tokenizer, tools=req.tools if use_tools else None, add_generation_prompt=True)
    return Prompt(ids, use_tools)


def request_grammar(req: ChatCompletionRequest) -> grammar.Grammar | None:
    """The grammar the completion must follow (None: unconstrained): the tool-call grammar when tools are in use,
    else the ``response_format`` schema's. ``grammar.GrammarError`` if the combined grammar does not compile."""
    content = req.response_format.content_schema() if req.response_format is not None else None
    if not _uses_tools(req):
        return None if content is None else grammar.json_schema(content)
    choice = req.tool_choice.function.name if isinstance(req.tool_choice, NamedToolChoice) else req.tool_choice
    tools = []
    for i, tool in enumerate(req.tools):
        fn = chat.tool_function(tool, i)
        tools.append({"name": fn["name"], "parameters": fn.get("parameters", fn.get("inputSchema"))})
    earlier = sum(len(m.get("tool_calls") or []) for m in req.messages if m.get("role") == "assistant")
    return grammar.tool_calls(
        tools,
        choice=choice or "auto",
        first_index=earlier,
        parallel=req.parallel_tool_calls,
        content_schema=content,
    )


def sampling_params(req: ChatCompletionRequest, tokenizer: Tokenizer, max_new_tokens: int) -> list[SamplingParams]:
    """One ``SamplingParams`` per choice (with :func:`request_grammar`); choice ``i`` of a seeded request uses seed
    ``seed + i``. Raises ``grammar.GrammarError`` (a ``DataError``) if the output constraint does not compile."""
    stop_ids = chat.stop_token_ids(tokenizer)
    limit = req.max_completion_tokens or req.max_tokens or max_new_tokens
    constraint = request_grammar(req)
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
            grammar=constraint,
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
    """``(content, tool_calls)`` of a completion text."""
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
    """A non-streaming ``choices[index]`` from the completion text."""
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

    def __init__(self, index: int, parse_tools: bool) -> None:
        self.index = index
        self.text = ""
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
