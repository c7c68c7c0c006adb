"""Code reward: the completion's program followed by the sample's unit tests, run in ``k2.rl.sandbox`` (Kimi K2,
arXiv 2507.20534 §3.2: competitive-programming problems graded by unit tests in sandboxes).

Column ``tests``: Python source (assertions, or anything that exits non-zero on failure) appended to the code. The
code is the last fenced ```python block of the completion (or the last fenced block of any language tag, or the
whole completion when there is none). Score 1.0 when the program exits 0, else 0.0; the status is the sandbox's
(``failed`` names the failing test line, ``timeout``, ``memory``, ``crashed``, ``refused``). Runs go through a
thread pool: each run is its own sandboxed process tree, so ``max_workers`` runs execute at once.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from k2.rl import sandbox
from k2.rl.rewards.base import Reward, RewardResult, column, skipped, text_of

_FENCE = re.compile(r"```([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)


def extract_code(completion: str) -> str:
    blocks = _FENCE.findall(completion)
    python = [body for tag, body in blocks if tag.lower() in ("python", "py", "python3")]
    if python:
        return python[-1]
    if blocks:
        return blocks[-1][1]
    return completion


def _failing_line(stderr: str, source: str) -> str:
    lines = re.findall(r'File "/?(?:sandbox/)?main\.py", line (\d+)', stderr)
    if not lines:
        return ""
    number = int(lines[-1])
    src = source.splitlines()
    return src[number - 1].strip() if 0 < number <= len(src) else ""


class CodeReward(Reward):
    name = "code"

    def __init__(
        self,
        *,
        timeout_s: float = 10.0,
        memory_mb: int = 1024,
        max_workers: int | None = None,
        limits: sandbox.Limits | None = None,
        allow_unisolated: bool = False,
    ) -> None:
        super().__init__()
        self.timeout_s, self.memory_mb, self.limits = timeout_s, memory_mb, limits
        self.max_workers = max_workers or max(1, os.cpu_count() or 1)
        self.allow_unisolated = allow_unisolated

    def _grade(self, code: str, tests: str) -> RewardResult:
        source = f"{code.rstrip()}\n\n\n{tests.strip()}\n"
        result = sandbox.run(
            source,
            timeout_s=self.timeout_s,
            memory_mb=self.memory_mb,
            limits=self.limits,
            allow_unisolated=self.allow_unisolated,
        )
        if result.status == "passed":
            return RewardResult(1.0, "passed", "")
        reason = result.reason
        if result.status == "failed":
            line = _failing_line(result.stderr, source)
            reason = f"{reason} at `{line}`" if line else reason
        return RewardResult(0.0, result.status, reason)

    def results(self, prompts: Sequence, completions: Sequence, **columns: Any) -> list[RewardResult]:
        start = time.perf_counter()
        tests = column(columns, "tests", len(completions))
        out: list[RewardResult] = [skipped("no tests column")] * len(completions)
        todo = [i for i, t in enumerate(tests) if t]
        with ThreadPoolExecutor(max_workers=self.max_workers) as pool:
            graded = pool.map(lambda i: self._grade(extract_code(text_of(completions[i])), tests[i]), todo)
            for i, result in zip(todo, graded, strict=True):
                out[i] = result
        return self._record(out, start)


code_reward = CodeReward()
