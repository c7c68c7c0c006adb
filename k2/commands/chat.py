"""``k2 chat``: an interactive terminal chat with a checkpoint, keeping the conversation history.

Each line read from stdin is a user message; the reply streams to stdout. ``/reset`` clears the history,
``/exit`` (or end of input) quits. When the conversation no longer fits ``--max-seq-len``, the oldest turns are
dropped (the system prompt is kept).

``--tools builtin`` declares the built-in tools of ``k2 sft``'s default data (``k2.data.toolgen``: calculator,
convert_units, kv_set / kv_get on a key-value store kept for the session, get_weather, simulated), and
``--tools calculator,get_weather`` some of them (the ``tiny`` model's 1024 positions hold two or three tool
declarations and a short conversation, as in its training data); the calls the model makes are run: each call and
its result are shown (``-> name {arguments}`` / ``<- result``), the results go back to the model as ``tool``
messages, and it answers (up to ``--max-tool-rounds`` rounds of calls per user message). ``--tools FILE.json``
declares the tools of a JSON file (a list of OpenAI function tools or MCP tools); their calls are shown, not run.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable
from typing import Any

from k2.commands._inference_args import add_model_args, add_sampling_args, build_engine, sampling_params

# Runs a tool call: (name, arguments) -> result text.
Executor = Callable[[str, dict[str, Any]], str]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="chat with a checkpoint in the terminal")
    add_model_args(p)
    p.add_argument("--system", help="system prompt (default: Kimi-K2's)")
    p.add_argument(
        "--tools",
        metavar="builtin|FILE",
        help="declare tools: 'builtin' (calculator, convert_units, kv_set, kv_get, get_weather; calls are run), a "
        "comma-separated list of them, or a JSON file with a list of OpenAI / MCP tools (calls shown, not run)",
    )
    p.add_argument("--max-tool-rounds", type=int, default=4, help="rounds of tool calls per user message")
    add_sampling_args(p, max_new_tokens=512)
    p.set_defaults(func=run)


def _read(interactive: bool) -> str | None:
    if interactive:
        try:
            return input("> ")
        except EOFError:
            return None
    line = sys.stdin.readline()
    return line.rstrip("\n") if line else None


def load_tools(spec: str | None) -> tuple[list[Any] | None, Executor | None]:
    """``(tools, executor)`` of ``--tools``: the built-in tools with their simulators (one key-value store per
    session), a JSON file's tools without an executor, or ``(None, None)``."""
    from k2.data import toolgen
    from k2.data.sft import tool_schemas
    from k2.errors import DataError

    if not spec:
        return None, None
    names = list(toolgen.TOOLS) if spec == "builtin" else [n.strip() for n in spec.split(",")]
    if all(n in toolgen.TOOLS for n in names):
        store: dict[str, str] = {}
        tools = [t for t in toolgen.builtin_tools() if t["function"]["name"] in names]
        return tools, lambda name, args: toolgen.execute(name, args, store)
    if not spec.endswith(".json"):
        raise DataError(
            f"--tools {spec}: expected 'builtin', built-in tool names ({', '.join(toolgen.TOOLS)}) or a .json file"
        )
    try:
        with open(spec, encoding="utf-8") as f:
            tools = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"--tools {spec}: invalid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(tools, list) or not tools:
        raise DataError(f"--tools {spec}: expected a non-empty JSON list of tools")
    tool_schemas(tools, f"--tools {spec}")
    return tools, None


def _stream_turn(events: Iterable[Any], out, tools: bool) -> str:
    """Write a streamed turn to ``out`` (with tools: the text before the tool-call section only); returns the full
    completion text (special tokens as their strings)."""
    from k2.data import chat

    text, shown = "", 0
    for ev in events:
        text += ev.text
        visible = text
        if tools:
            cut = min((i for m in (chat.SECTION_BEGIN, chat.CALL_BEGIN) if (i := text.find(m)) >= 0), default=-1)
            visible = text if cut < 0 else text[:cut]
        if len(visible) > shown:
            out.write(visible[shown:])
            out.flush()
            shown = len(visible)
    return text


def reply(
    engine,
    history: list[dict[str, Any]],
    prefix: list[dict[str, Any]],
    make_params: Callable[[], Any],
    *,
    tools: list[Any] | None,
    executor: Executor | None,
    max_rounds: int,
    out,
    note,
) -> None:
    """Generate the assistant's answer to the last user message of ``history`` (appending its turns): stream the
    text, and with tools, show the calls, run them with ``executor`` and continue until a turn calls nothing."""
    from k2.data import chat

    for _ in range(max(1, max_rounds + 1)):
        ids, _ = chat.render(prefix + history, engine.tokenizer, tools=tools, add_generation_prompt=True)
        if len(ids) >= engine.max_seq_len:
            note(f"(the conversation no longer fits --max-seq-len {engine.max_seq_len})")
            return
        text = _stream_turn(engine.stream(ids, make_params()), out, bool(tools))
        content, calls, errors = chat.parse_completion(text, stop=()) if tools else (text, [], [])
        out.write("\n")
        out.flush()
        for error in errors:
            note(f"(tool-call parse error: {error})")
        history.append({"role": "assistant", "content": content, **({"tool_calls": calls} if calls else {})})
        if not calls:
            return
        for call in calls:
            name, raw = call["function"]["name"], call["function"]["arguments"]
            out.write(f"-> {name} {raw}\n")
            if executor is not None:
                result = executor(name, json.loads(raw))
                out.write(f"<- {result}\n")
                history.append({"role": "tool", "tool_call_id": call["id"], "name": name, "content": result})
        out.flush()
        if executor is None:
            return
    note(f"(stopped after {max_rounds} rounds of tool calls)")


def run(args: argparse.Namespace) -> int:
    from k2.data import chat

    tools, executor = load_tools(args.tools)
    engine, tokenizer = build_engine(args)
    stops = chat.stop_token_ids(tokenizer)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, Any]] = []
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"k2 chat: {args.checkpoint} — /reset clears the history, /exit or Ctrl-D quits", file=sys.stderr)
    calls = 0

    def params():
        nonlocal calls
        calls += 1
        return sampling_params(args, stops, seed_offset=calls - 1)

    def note(message: str) -> None:
        print(message, file=sys.stderr)

    while (line := _read(interactive)) is not None:
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history.clear()
            note("(history cleared)")
            continue
        history.append({"role": "user", "content": text})
        ids, _ = chat.render(system + history, tokenizer, tools=tools, add_generation_prompt=True)
        while len(ids) >= engine.max_seq_len and len(history) > 1:
            del history[: _oldest_exchange(history)]
            ids, _ = chat.render(system + history, tokenizer, tools=tools, add_generation_prompt=True)
            note("(dropped the oldest turn to fit the context)")
        if len(ids) >= engine.max_seq_len:
            history.pop()
            if tools and len(chat.render([], tokenizer, tools=tools)[0]) >= engine.max_seq_len // 2:
                note(
                    f"(the declared tools fill most of --max-seq-len {engine.max_seq_len}: declare fewer, e.g. "
                    "--tools calculator,get_weather)"
                )
            else:
                note(f"(message too long for --max-seq-len {engine.max_seq_len})")
            continue
        reply(
            engine,
            history,
            system,
            params,
            tools=tools,
            executor=executor,
            max_rounds=args.max_tool_rounds,
            out=sys.stdout,
            note=note,
        )
    return 0


def _oldest_exchange(history: list[dict[str, Any]]) -> int:
    """How many messages the oldest exchange holds: the first user message and everything up to the next one."""
    nxt = next((i for i, m in enumerate(history) if i > 0 and m["role"] == "user"), len(history))
    return nxt if nxt < len(history) else 1
