"""``k2 generate``: complete one prompt with a checkpoint, streaming the tokens to stdout as they are sampled.

The prompt is plain text by default (a base model continues it; generation stops at EOS), or with ``--chat`` a
single user message in the Kimi-K2 chat format (stops at ``<|im_end|>``).
"""

from __future__ import annotations

import argparse
import sys
import time

from k2.commands._inference_args import add_model_args, add_sampling_args, build_engine, sampling_params


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="complete one prompt with a checkpoint, streaming the tokens")
    add_model_args(p)
    p.add_argument("--prompt", required=True, help="the prompt text ('-' reads it from stdin)")
    p.add_argument("--chat", action="store_true", help="send the prompt as a user message in the chat format")
    p.add_argument("--system", help="system prompt with --chat (default: Kimi-K2's)")
    p.add_argument("--stats", action="store_true", help="print token counts and speed to stderr at the end")
    add_sampling_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from k2.data import chat

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    engine, tokenizer = build_engine(args)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": prompt}
        ]
        ids, _ = chat.render(messages, tokenizer, add_generation_prompt=True)
        stops = chat.stop_token_ids(tokenizer)
    else:
        ids = tokenizer.encode(prompt)
        stops = (tokenizer.eos_id,)
    if not ids:
        raise ValueError("the prompt is empty")
    start = time.perf_counter()
    first = None
    n = 0
    reason = None
    for ev in engine.stream(ids, sampling_params(args, stops)):
        first = first or time.perf_counter()
        n += 1
        reason = ev.finish_reason
        sys.stdout.write(ev.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.stats:
        end = time.perf_counter()
        rate = (n - 1) / (end - first) if n > 1 else 0.0
        print(
            f"k2 generate: {len(ids)} prompt tokens, {n} new tokens ({reason}); first token {first - start:.3f} s, "
            f"then {rate:.1f} tokens/s",
            file=sys.stderr,
        )
    return 0
