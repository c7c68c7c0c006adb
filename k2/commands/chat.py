"""``k2 chat``: an interactive terminal chat with a checkpoint, keeping the conversation history.

Each line read from stdin is a user message; the reply streams to stdout. ``/reset`` clears the history,
``/exit`` (or end of input) quits. When the conversation no longer fits ``--max-seq-len``, the oldest turns are
dropped (the system prompt is kept).
"""

from __future__ import annotations

import argparse
import sys

from k2.commands._inference_args import add_model_args, add_sampling_args, build_engine, sampling_params


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="chat with a checkpoint in the terminal")
    add_model_args(p)
    p.add_argument("--system", help="system prompt (default: Kimi-K2's)")
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


def run(args: argparse.Namespace) -> int:
    from k2.data import chat

    engine, tokenizer = build_engine(args)
    stops = chat.stop_token_ids(tokenizer)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"k2 chat: {args.checkpoint} — /reset clears the history, /exit or Ctrl-D quits", file=sys.stderr)
    turn = 0
    while (line := _read(interactive)) is not None:
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history.clear()
            print("(history cleared)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": text})
        ids, _ = chat.render(system + history, tokenizer, add_generation_prompt=True)
        while len(ids) >= engine.max_seq_len and len(history) > 1:
            del history[: 2 if len(history) > 2 else 1]  # drop the oldest exchange
            ids, _ = chat.render(system + history, tokenizer, add_generation_prompt=True)
            print("(dropped the oldest turn to fit the context)", file=sys.stderr)
        if len(ids) >= engine.max_seq_len:
            history.pop()
            print(f"(message too long for --max-seq-len {engine.max_seq_len})", file=sys.stderr)
            continue
        reply = []
        for ev in engine.stream(ids, sampling_params(args, stops, seed_offset=turn)):
            reply.append(ev.text)
            sys.stdout.write(ev.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": "".join(reply)})
        turn += 1
    return 0
