"""Math / STEM answer reward: answer extraction and equivalence by ``math-verify`` (Hugging Face; LaTeX and plain
expressions, fractions, decimals, percentages, sets, intervals, matrices, units stripped), as in the verifiable
rewards gym of Kimi K2 (arXiv 2507.20534 §3.2) and Kimi K1.5.

``math-verify`` guards itself with ``signal.alarm`` (main thread only) and can still hang in sympy on adversarial
strings (``9^{9^{9^{9}}}``), so grading runs in a :class:`~k2.rl.rewards._pool.KillablePool` with math-verify's own
timeouts off and a per-sample deadline enforced from outside: a sample past it scores 0 with status ``timeout``
and its worker is replaced.

Column: ``answer`` (or ``solution``): the reference answer, LaTeX or plain (``"\\frac{1}{2}"``, ``"[0, 1)"``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import Any

from k2.rl.rewards._pool import KillablePool
from k2.rl.rewards.base import Reward, RewardResult, column, skipped, text_of


def grade_one(item: tuple[str, str]) -> tuple[bool, str]:
    """Runs in a worker: ``(gold, completion) -> (equivalent, extracted answer)``."""
    from math_verify import parse, verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    gold_text, completion = item
    gold = parse(gold_text if "$" in gold_text else f"${gold_text}$", parsing_timeout=None)
    if not gold:
        gold = parse(gold_text, parsing_timeout=None)
    if not gold:
        raise ValueError(f"could not parse the reference answer {gold_text!r}")
    pred = parse(completion, parsing_timeout=None)
    if not pred:
        return False, ""
    return bool(verify(gold, pred, timeout_seconds=None)), str(pred[-1])


class MathReward(Reward):
    """1.0 when the completion's final answer is equivalent to the reference, else 0.0."""

    name = "math"

    def __init__(self, *, num_workers: int | None = None, timeout_s: float = 5.0) -> None:
        super().__init__()
        self.timeout_s = timeout_s
        self.num_workers = num_workers or max(1, min(8, os.cpu_count() or 1))
        self._pool: KillablePool | None = None

    @property
    def pool(self) -> KillablePool:
        if self._pool is None:
            self._pool = KillablePool("k2.rl.rewards.math:grade_one", self.num_workers)
        return self._pool

    def results(self, prompts: Sequence, completions: Sequence, **columns: Any) -> list[RewardResult]:
        start = time.perf_counter()
        golds = column(columns, "answer", len(completions), "solution")
        todo = [i for i, g in enumerate(golds) if g is not None]
        outcomes = self.pool.map([(str(golds[i]), text_of(completions[i])) for i in todo], self.timeout_s)
        out = [skipped("no reference answer")] * len(completions)
        for i, (kind, value) in zip(todo, outcomes, strict=True):
            if kind == "timeout":
                out[i] = RewardResult(0.0, "timeout", f"grading took over {self.timeout_s:g} s; scored 0")
            elif kind == "error":
                out[i] = RewardResult(0.0, "error", value)
            else:
                same, answer = value
                reason = f"answer {answer}" if answer else "no answer found"
                out[i] = RewardResult(1.0 if same else 0.0, "passed" if same else "failed", reason)
        return self._record(out, start)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None


math_reward = MathReward()
