"""Throughput of the rewards in ``k2.rl.rewards`` on this machine: samples/s per reward type, and the sandbox's
start-up overhead (one trivial program, end to end).

    python tools/bench_rewards.py [--samples 64] [--workers N] [--json out.json]

Rows: ``sandbox_startup`` (seconds per ``sandbox.run("pass")``, sequential), ``code`` (completions + asserts in the
sandbox, ``--workers`` at once), ``math`` (math-verify in ``--workers`` killable processes, warm pool), ``ifeval``,
``puzzle`` (24-game, Sudoku and cryptarithm verification) and ``critic`` (a scripted async critic: the
aggregation and concurrency overhead without model time, K=4 responses per prompt, 12 judgments each).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from _timing import best_time, print_rows

from k2.rl import sandbox
from k2.rl.rewards import (
    CodeReward,
    MathReward,
    RubricCritic,
    cryptarithm,
    game24,
    ifeval_reward,
    puzzle_reward,
    sudoku,
)

CPU = torch.device("cpu")


def _row(op: str, shape: str, n: int, seconds: float, **extra) -> dict:
    return {"op": op, "shape": shape, "samples": n, "seconds": seconds, "samples_per_s": n / seconds, **extra}


def bench_sandbox(repeat: int) -> dict:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = sandbox.run("pass", timeout_s=5)
        times.append(time.perf_counter() - start)
        if result.status != "passed":
            raise SystemExit(f"sandbox: {result.status}: {result.reason}")
    return {
        "op": "sandbox_startup",
        "shape": f"run('pass') x{repeat}",
        "median_ms": 1e3 * statistics.median(times),
        "min_ms": 1e3 * min(times),
    }


def bench_code(n: int, workers: int) -> dict:
    reward = CodeReward(timeout_s=5, memory_mb=512, max_workers=workers)
    good = "```python\ndef fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n```"
    bad = "```python\ndef fib(n):\n    return n\n```"
    completions = [good if i % 2 else bad for i in range(n)]
    tests = ["assert fib(10) == 55\nassert fib(1) == 1\n"] * n
    seconds = best_time(lambda: reward(None, completions, tests=tests), CPU, repeat=2, warmup=0)
    return _row("code", f"{workers} workers", n, seconds)


def bench_math(n: int, workers: int) -> dict:
    reward = MathReward(num_workers=workers, timeout_s=10)
    pairs = [("\\frac{1}{2}", "so $\\boxed{0.5}$"), ("[0, 1)", "$\\boxed{[0,1)}$"), ("x^2+2x+1", "$\\boxed{(x+1)^2}$")]
    golds = [pairs[i % 3][0] for i in range(n)]
    completions = [pairs[i % 3][1] for i in range(n)]
    reward(None, completions[:workers], answer=golds[:workers])  # start the pool
    seconds = best_time(lambda: reward(None, completions, answer=golds), CPU, repeat=3, warmup=1)
    reward.close()
    return _row("math", f"{workers} workers", n, seconds)


def bench_ifeval(n: int) -> dict:
    instructions = [
        {"id": "length_constraints:number_words", "num_words": 20, "relation": "at least"},
        {"id": "keywords:existence", "keywords": ["river"]},
        {"id": "punctuation:no_comma"},
        {"id": "detectable_format:number_bullet_lists", "num_bullets": 3},
        {"id": "startend:end_checker", "end_phrase": "Any questions?"},
    ]
    text = "The river bends slowly here\n* one point\n* two points\n* three points\n" * 3 + "Any questions?"
    seconds = best_time(
        lambda: ifeval_reward(None, [text] * n, instructions=[instructions] * n), CPU, repeat=5, warmup=1
    )
    return _row("ifeval", "5 constraints", n, seconds)


def bench_puzzles(n: int) -> dict:
    puzzles = [[game24, sudoku, cryptarithm][i % 3](i, 2) for i in range(n)]
    completions = [f"\\boxed{{{p['solution']}}}" if p["kind"] == "24" else p["solution"] for p in puzzles]
    seconds = best_time(lambda: puzzle_reward(None, completions, puzzle=puzzles), CPU, repeat=5, warmup=1)
    return _row("puzzle", "24/sudoku/crypt", n, seconds)


def bench_critic(n: int) -> dict:
    async def scripted(messages):
        await asyncio.sleep(0)
        return "Verdict: A"

    critic = RubricCritic(scripted)
    prompts = [f"prompt {i // 4}" for i in range(n)]
    completions = [f"response {i}" for i in range(n)]
    seconds = best_time(lambda: critic.results(prompts, completions), CPU, repeat=3, warmup=1)
    return _row("critic", "K=4, scripted", n, seconds, judgments_per_s=3 * n / seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", help="write the rows to this JSON file")
    args = parser.parse_args()
    if sandbox.isolation_error() is not None:
        print(f"sandbox isolation unavailable: {sandbox.isolation_error()}; skipping sandbox rows", file=sys.stderr)
    rows = []
    if sandbox.isolation_error() is None:
        rows.append(bench_sandbox(repeat=10))
        print_rows(rows[-1:], op_width=16)
        rows.append(bench_code(args.samples, args.workers))
        print_rows(rows[-1:], op_width=16)
    for fn in (
        lambda: bench_math(args.samples, args.workers),
        lambda: bench_ifeval(args.samples * 16),
        lambda: bench_puzzles(args.samples),
        lambda: bench_critic(args.samples),
    ):
        rows.append(fn())
        print_rows(rows[-1:], op_width=16)
    if args.json:
        Path(args.json).write_text(json.dumps({"cpus": os.cpu_count(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
