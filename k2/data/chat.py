"""Kimi-K2 conversation format: OpenAI-style messages + tools → text / token ids + SFT loss mask, and back.

Source: the released Kimi-K2 tokenizer and chat template (released token names, not the tech report's App. B spelling):

    <|im_system|>tool_declare<|im_middle|>{tools, compact JSON}<|im_end|>            (only when tools are given)
    <|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>
                                                                  (only when the first message is not a system one)
    <|im_user|>user<|im_middle|>{content}<|im_end|>
    <|im_assistant|>assistant<|im_middle|>{content}<|tool_calls_section_begin|>
        <|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>{json}<|tool_call_end|> ...
        <|tool_calls_section_end|><|im_end|>
    <|im_system|>{name or "tool"}<|im_middle|>## Return of {call id}\\n{content}<|im_end|>
    <|im_assistant|>assistant<|im_middle|>                                (the generation prompt)

(no newlines between the pieces; no BOS/EOS). Header names are the message's ``name`` or its role.

Choices where the sources are silent or disagree:
- Call ids: an id already of the form ``functions.NAME:IDX`` (NAME = the call's function name) is kept; any other
  id is rewritten to ``functions.NAME:IDX`` with IDX a counter over all tool calls of the dialog from 0 (the tech
  report's rule), and ``tool`` messages naming the old id follow the rewrite.
- Tool JSON has sorted keys (as Moonshot's ``apply_chat_template`` deep-sorts the tools) and compact separators.
- ``render`` tokenises message text with ``allow_special=False``: a special-token string typed by a user stays
  text and cannot forge a turn. ``render_text`` therefore equals ``decode(render(...)[0])`` but is not always
  equal to ``encode(render_text(...), allow_special=True)``.
- Loss mask: 1 on every token an assistant turn must produce (its body, the tool-call section and the closing
  ``<|im_end|>``), 0 on its header and on everything else.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from k2.data.tokenizer import Tokenizer
from k2.errors import DataError

IM_USER = "<|im_user|>"
IM_ASSISTANT = "<|im_assistant|>"
IM_SYSTEM = "<|im_system|>"
IM_MIDDLE = "<|im_middle|>"
IM_END = "<|im_end|>"
SECTION_BEGIN = "<|tool_calls_section_begin|>"
SECTION_END = "<|tool_calls_section_end|>"
CALL_BEGIN = "<|tool_call_begin|>"
ARG_BEGIN = "<|tool_call_argument_begin|>"
CALL_END = "<|tool_call_end|>"

DEFAULT_SYSTEM_PROMPT = "You are Kimi, an AI assistant created by Moonshot AI."
GENERATION_PROMPT = f"{IM_ASSISTANT}assistant{IM_MIDDLE}"
# Tokens that end an assistant turn; an inference engine stops on either one's id (``stop_token_ids``).
STOP_TOKENS = (IM_END, "[EOS]")

_SPECIALS = (
    IM_USER,
    IM_ASSISTANT,
    IM_SYSTEM,
    IM_MIDDLE,
    IM_END,
    SECTION_BEGIN,
    SECTION_END,
    CALL_BEGIN,
    ARG_BEGIN,
    CALL_END,
)
_CALL_ID_RE = re.compile(r"functions\.(?P<name>.+):(?P<idx>\d+)")
_PARSED_ID_RE = re.compile(r"[^\s<>]+:\d+")

# A rendered conversation is a list of (piece, is_special, loss_mask) segments.
_Segment = tuple[str, bool, int]


def _text_of(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, Mapping) and part.get("type", "text") == "text" and "text" in part):
                raise DataError(f"chat.render: {where}: only text content parts are supported, got {part!r:.80}")
            parts.append(str(part["text"]))
        return "".join(parts)
    raise DataError(f"chat.render: {where}: content must be a string, a list of text parts or None")


def tool_function(tool: Any, i: int) -> Mapping[str, Any]:
    """The object holding a tool's ``name`` / ``description`` / schema: ``tool["function"]`` of an OpenAI tool
    (``{"type": "function", "function": {...}}``), else the tool itself (a bare function with ``parameters``, or
    an MCP tool with ``inputSchema``); ``DataError`` for anything else."""
    if not isinstance(tool, Mapping):
        raise DataError(f"chat.render: tools[{i}] must be an object, got {type(tool).__name__}")
    if tool.get("type") == "function" and isinstance(tool.get("function"), Mapping):
        return tool["function"]
    if "name" in tool:
        return tool
    raise DataError(f"chat.render: tools[{i}] is neither an OpenAI function tool nor an MCP tool (no 'name')")


def _normalize_tool(tool: Any, i: int) -> dict[str, Any]:
    """OpenAI ``{"type": "function", "function": {...}}``, a bare function, or an MCP tool (``inputSchema``)."""
    fn = tool_function(tool, i)
    if fn is not tool:
        return dict(tool)
    out: dict[str, Any] = {"name": tool["name"]}
    if "description" in tool:
        out["description"] = tool["description"]
    schema = tool.get("parameters", tool.get("inputSchema"))
    if schema is not None:
        out["parameters"] = schema
    return {"type": "function", "function": out}


def tools_json(tools: Sequence[Any]) -> str:
    """The tool declaration body: OpenAI function tools as compact JSON with sorted keys."""
    normalized = [_normalize_tool(t, i) for i, t in enumerate(tools)]
    return json.dumps(normalized, separators=(",", ":"), sort_keys=True, ensure_ascii=False)


def _arguments_text(arguments: Any, where: str) -> str:
    if isinstance(arguments, str):
        return arguments
    if isinstance(arguments, Mapping):
        return json.dumps(arguments, ensure_ascii=False)
    raise DataError(f"chat.render: {where}: arguments must be a JSON string or an object")


def _segments(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Any] | None,
    add_generation_prompt: bool,
    default_system: str | None,
) -> list[_Segment]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise DataError("chat.render: messages must be a list of {'role': ..., 'content': ...} objects")
    segs: list[_Segment] = []

    def turn(start: str, header: str, body: list[_Segment], mask: int) -> None:
        segs.extend([(start, True, 0), (header, False, 0), (IM_MIDDLE, True, 0), *body, (IM_END, True, mask)])

    if tools:
        turn(IM_SYSTEM, "tool_declare", [(tools_json(tools), False, 0)], 0)
    first_role = messages[0].get("role") if messages and isinstance(messages[0], Mapping) else None
    if first_role != "system" and default_system is not None:
        turn(IM_SYSTEM, "system", [(default_system, False, 0)], 0)

    id_map: dict[str, str] = {}
    n_calls = 0
    for m_idx, msg in enumerate(messages):
        where = f"messages[{m_idx}]"
        if not isinstance(msg, Mapping) or "role" not in msg:
            raise DataError(f"chat.render: {where} must be an object with a 'role'")
        role = msg["role"]
        text = _text_of(msg.get("content"), where)
        if role in ("system", "user"):
            turn(IM_SYSTEM if role == "system" else IM_USER, str(msg.get("name") or role), [(text, False, 0)], 0)
        elif role == "assistant":
            body: list[_Segment] = [(text, False, 1)]
            calls = msg.get("tool_calls") or []
            if calls:
                body.append((SECTION_BEGIN, True, 1))
                for c_idx, call in enumerate(calls):
                    cw = f"{where}.tool_calls[{c_idx}]"
                    fn = call.get("function") if isinstance(call, Mapping) else None
                    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
                        raise DataError(f"chat.render: {cw} must have function.name")
                    call_id = str(call.get("id") or "")
                    m = _CALL_ID_RE.fullmatch(call_id)
                    k2_id = call_id if m and m["name"] == fn["name"] else f"functions.{fn['name']}:{n_calls}"
                    if call_id:
                        id_map[call_id] = k2_id
                    n_calls += 1
                    args = _arguments_text(fn.get("arguments", "{}"), cw)
                    body += [(CALL_BEGIN, True, 1), (k2_id, False, 1), (ARG_BEGIN, True, 1)]
                    body += [(args, False, 1), (CALL_END, True, 1)]
                body.append((SECTION_END, True, 1))
            turn(IM_ASSISTANT, str(msg.get("name") or "assistant"), body, 1)
        elif role == "tool":
            call_id = str(msg.get("tool_call_id") or "")
            call_id = id_map.get(call_id, call_id)
            turn(IM_SYSTEM, str(msg.get("name") or "tool"), [(f"## Return of {call_id}\n{text}", False, 0)], 0)
        else:
            raise DataError(f"chat.render: {where}: unknown role {role!r} (system, user, assistant or tool)")
    if add_generation_prompt:
        segs += [(IM_ASSISTANT, True, 0), ("assistant", False, 0), (IM_MIDDLE, True, 0)]
    return segs


def render_text(
    messages: Sequence[Mapping[str, Any]],
    *,
    tools: Sequence[Any] | None = None,
    add_generation_prompt: bool = False,
    default_system: str | None = DEFAULT_SYSTEM_PROMPT,
) -> str:
    """The conversation as Kimi-K2 text with special tokens as their strings.

    ``default_system=None`` leaves out the default system turn when the first message is not a system one.
    """
    return "".join(piece for piece, _, _ in _segments(messages, tools, add_generation_prompt, default_system))


def render(
    messages: Sequence[Mapping[str, Any]],
    tokenizer: Tokenizer,
    *,
    tools: Sequence[Any] | None = None,
    add_generation_prompt: bool = False,
    default_system: str | None = DEFAULT_SYSTEM_PROMPT,
) -> tuple[list[int], list[int]]:
    """Token ids and a same-length loss mask (1 on tokens of assistant turns the model must produce)."""
    ids: list[int] = []
    mask: list[int] = []
    specials = tokenizer.special_tokens
    for piece, is_special, m in _segments(messages, tools, add_generation_prompt, default_system):
        if is_special:
            if piece not in specials:
                raise DataError(f"chat.render: the tokenizer has no special token {piece}")
            toks = [specials[piece]]
        else:
            toks = tokenizer.encode(piece) if piece else []
        ids += toks
        mask += [m] * len(toks)
    return ids, mask


def stop_token_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
    """The ids of :data:`STOP_TOKENS` that ``tokenizer`` has: what an engine stops on (ids, not text)."""
    return tuple(tokenizer.special_tokens[s] for s in STOP_TOKENS if s in tokenizer.special_tokens)


def _next_marker(text: str, pos: int, markers: Sequence[str]) -> tuple[int, str | None]:
    """The first of ``markers`` at or after ``pos``: ``(index, marker)``, or ``(len(text), None)``."""
    best, found = len(text), None
    for m in markers:
        i = text.find(m, pos, best + len(m) - 1)  # only occurrences that start before the best so far
        if i >= 0:
            best, found = i, m
    return best, found


_JSON = json.JSONDecoder()
_WS = " \t\n\r"


def _json_object_at(text: str, pos: int) -> tuple[int, int] | None:
    """``(start, end)`` of the JSON value at ``pos`` (leading whitespace skipped) if it is an object followed, after
    optional whitespace, by ``<|tool_call_end|>``; else None. The JSON decoder decides where the value ends, so a
    special-token string inside a JSON string does not end it."""
    start = pos
    while start < len(text) and text[start] in _WS:
        start += 1
    if not text.startswith("{", start):
        return None
    try:
        value, end = _JSON.raw_decode(text, start)
    except (ValueError, RecursionError):
        return None
    after = end
    while after < len(text) and text[after] in _WS:
        after += 1
    if not isinstance(value, dict) or not text.startswith(CALL_END, after):
        return None
    return start, end


def parse_completion(text: str, *, stop: Sequence[str] = STOP_TOKENS) -> tuple[str, list[dict[str, Any]], list[str]]:
    """Split a generated assistant turn into ``(content, tool_calls, errors)``; never raises.

    ``text`` is the decoded completion with special tokens kept as strings. ``content`` is the text before the
    tool-call section, or before the first ``stop`` string (default ``<|im_end|>`` / ``[EOS]``, for a decoded turn
    that still holds its end token) when there is no section. Each complete call
    (``<|tool_call_begin|>ID<|tool_call_argument_begin|>JSON<|tool_call_end|>``, ID = ``[functions.]NAME:IDX``,
    JSON an object) becomes ``{"id", "type": "function", "function": {"name", "arguments"}}``; every other call
    (truncated, bad id, bad JSON) adds a message to ``errors``. A missing ``<|tool_calls_section_end|>`` is
    tolerated, and so are calls without ``<|tool_calls_section_begin|>``. The section ends at
    ``<|tool_calls_section_end|>`` or a ``stop`` string between calls.

    Arguments are read with a JSON decoder, not up to the next marker: a JSON string argument may contain any
    special-token string (as ordinary text tokens: message text is never tokenised as specials) and the call is
    still recovered whole, as SGLang's Kimi-K2 detector does. Elsewhere, in the content or in a call id, a special
    token's string cannot be told apart from the token in decoded text: an engine stops on the stop tokens' ids
    (:func:`stop_token_ids`), never on their text, and then parses its completion (which ends before the stop
    token) with ``stop=()``, so text the model wrote is never cut.
    """
    if not isinstance(text, str):
        return "", [], [f"parse_completion: expected str, got {type(text).__name__}"]
    stop = tuple(s for s in stop if s)
    start, marker = _next_marker(text, 0, (SECTION_BEGIN, CALL_BEGIN, *stop))
    content = text[:start]
    if marker not in (SECTION_BEGIN, CALL_BEGIN):
        return content, [], []
    pos = start + len(SECTION_BEGIN) if marker == SECTION_BEGIN else start
    section_stops = (CALL_BEGIN, SECTION_END, *stop)

    tool_calls: list[dict[str, Any]] = []
    errors: list[str] = []
    n = 0
    while True:
        begin, marker = _next_marker(text, pos, section_stops)
        if marker != CALL_BEGIN:
            break
        id_from = begin + len(CALL_BEGIN)
        arg_at, marker = _next_marker(text, id_from, (ARG_BEGIN, CALL_END, *section_stops))
        if marker != ARG_BEGIN:
            if marker == CALL_END:
                errors.append(f"tool call {n}: no {ARG_BEGIN}: {text[id_from:arg_at][:80]!r}")
                pos = arg_at + len(CALL_END)
            else:
                errors.append(f"tool call {n}: incomplete, no {CALL_END}: {text[id_from:arg_at][:80]!r}")
                pos = arg_at
            n += 1
            continue
        call_id = text[id_from:arg_at].strip()
        args_from = arg_at + len(ARG_BEGIN)
        span = _json_object_at(text, args_from)
        if span is not None:
            args = text[span[0] : span[1]]
            pos = text.index(CALL_END, span[1]) + len(CALL_END)
        else:  # not a JSON object: the call ends at the next marker
            close, marker = _next_marker(text, args_from, (CALL_END, *section_stops))
            args = text[args_from:close].strip()
            if marker != CALL_END:
                errors.append(f"tool call {n}: incomplete, no {CALL_END}: {text[id_from:close][:80]!r}")
                pos = close
                n += 1
                continue
            pos = close + len(CALL_END)
        error = _call_error(n, call_id, None if span is not None else args)
        if error:
            errors.append(error)
        else:
            name = call_id[: call_id.rfind(":")].removeprefix("functions.")
            tool_calls.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": args}})
        n += 1
    return content, tool_calls, errors


def _call_error(n: int, call_id: str, unparsed_args: str | None) -> str | None:
    """Why a complete call is rejected (None: it is good); ``unparsed_args`` is None when already decoded."""
    if not _PARSED_ID_RE.fullmatch(call_id):
        return f"tool call {n}: id {call_id[:80]!r} is not of the form functions.NAME:IDX"
    if not call_id[: call_id.rfind(":")].removeprefix("functions."):
        return f"tool call {n}: id {call_id!r} has an empty function name"
    if unparsed_args is None:
        return None
    try:
        parsed = json.loads(unparsed_args)
    except (ValueError, RecursionError) as e:
        return f"tool call {n} ({call_id}): arguments are not valid JSON ({e}): {unparsed_args[:80]!r}"
    if not isinstance(parsed, dict):
        return f"tool call {n} ({call_id}): arguments must be a JSON object, got {unparsed_args[:80]!r}"
    return None
