"""The reward contract shared by every reward in ``k2.rl.rewards``, and how rewards combine.

A reward is what TRL users already write: ``reward(prompts, completions, **columns) -> list[float | None]``, sync or
async, one score per completion, ``None`` where the reward does not apply (a math reward on a coding prompt). Dataset
columns arrive as keyword lists aligned with ``completions``. Prompts and completions are plain strings or chat
message lists (the last assistant message is graded).

The rewards here also return a richer :class:`RewardResult` per sample (score, status, reason) through
``reward.results(...)`` for logging, and keep the metrics of their last call in ``reward.metrics`` (mean score,
counts per status, samples per second). :class:`Combined` sums rewards with weights, skipping the ones that do
not apply to a sample (TRL's ``nansum`` rule), and reports each part's metrics under its name.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

RewardFn = Callable[..., "list[float | None] | Awaitable[list[float | None]]"]


@dataclass(frozen=True)
class RewardResult:
    """One sample's grade. ``status`` says what happened: ``passed``/``failed`` for a verdict, ``timeout``,
    ``memory``, ``crashed``, ``refused`` or ``error`` when grading itself did not finish (score 0, never silent),
    ``hack`` for a false compliance claim, ``skipped`` when the reward does not apply (score ``None``)."""

    score: float | None
    status: str
    reason: str = ""


def skipped(reason: str = "not applicable") -> RewardResult:
    return RewardResult(None, "skipped", reason)


def text_of(item: Any) -> str:
    """The text to grade: a string as is, a message dict's content, or the last assistant message of a list."""
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        return str(item.get("content") or "")
    if isinstance(item, Sequence):
        for message in reversed(item):
            if isinstance(message, dict) and message.get("role", "assistant") == "assistant":
                return str(message.get("content") or "")
        return text_of(item[-1]) if item else ""
    return str(item)


def column(columns: dict, name: str, n: int, *aliases: str) -> list:
    """The dataset column ``name`` (or its first present alias) as a list of ``n`` values (``None`` when absent)."""
    for key in (name, *aliases):
        if key in columns and columns[key] is not None:
            values = list(columns[key])
            if len(values) != n:
                raise ValueError(f"column {key!r} has {len(values)} values for {n} completions")
            return values
    return [None] * n


def summarize(results: Sequence[RewardResult], elapsed_s: float) -> dict[str, float]:
    """Metrics of one call: mean/std over applicable samples, their count, counts per status, samples/s."""
    scores = [r.score for r in results if r.score is not None]
    mean = sum(scores) / len(scores) if scores else math.nan
    std = math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores)) if scores else math.nan
    metrics = {"mean": mean, "std": std, "applicable": float(len(scores))}
    metrics.update({f"status/{k}": float(v) for k, v in sorted(Counter(r.status for r in results).items())})
    metrics["samples_per_s"] = len(results) / elapsed_s if elapsed_s > 0 else math.inf
    return metrics


class Reward:
    """A reward with per-sample results: subclasses implement :meth:`results` (sync) or :meth:`aresults` (async).
    Calling the object follows the TRL contract."""

    name = "reward"

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}
        self._lock = threading.Lock()

    @property
    def __name__(self) -> str:  # TRL logs reward functions by __name__
        return self.name

    def results(self, prompts: Sequence, completions: Sequence, **columns: Any) -> list[RewardResult]:
        return _run_sync(self.aresults(prompts, completions, **columns))

    async def aresults(self, prompts: Sequence, completions: Sequence, **columns: Any) -> list[RewardResult]:
        return await asyncio.to_thread(self.results, prompts, completions, **columns)

    def _record(self, results: list[RewardResult], start: float) -> list[RewardResult]:
        with self._lock:
            self.metrics = summarize(results, time.perf_counter() - start)
        return results

    def __call__(self, prompts: Sequence, completions: Sequence, **columns: Any) -> list[float | None]:
        return [r.score for r in self.results(prompts, completions, **columns)]


class SampleReward(Reward):
    """A reward graded one sample at a time by ``grade(prompt, completion, **row) -> RewardResult`` (cheap,
    in-process checks: puzzles, instruction following)."""

    def grade(self, prompt: Any, completion: Any, **row: Any) -> RewardResult:
        raise NotImplementedError

    def results(self, prompts: Sequence, completions: Sequence, **columns: Any) -> list[RewardResult]:
        start = time.perf_counter()
        n = len(completions)
        rows = [{key: column(columns, key, n)[i] for key in columns} for i in range(n)]
        prompts = list(prompts) if prompts is not None else [None] * n
        out = []
        for prompt, completion, row in zip(prompts, completions, rows, strict=True):
            try:
                out.append(self.grade(prompt, completion, **row))
            except Exception as exc:  # a malformed row or completion scores 0 and says why
                out.append(RewardResult(0.0, "error", f"{type(exc).__name__}: {exc}"))
        return self._record(out, start)


def _run_sync(awaitable: Awaitable) -> Any:
    """Run a coroutine from sync code, also when the caller is already inside an event loop (in a worker thread)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(awaitable)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(awaitable)
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


async def call_reward(fn: RewardFn, prompts: Sequence, completions: Sequence, **columns: Any) -> list[float | None]:
    """Call any reward function (sync or async, k2 or plain TRL-style) and return its scores."""
    if isinstance(fn, Reward):
        return [r.score for r in await fn.aresults(prompts, completions, **columns)]
    if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__):
        return list(await fn(prompts, completions, **columns))
    value = await asyncio.to_thread(fn, prompts, completions, **columns)
    return list(await value) if inspect.isawaitable(value) else list(value)


class Combined(Reward):
    """``sum_k w_k * r_k`` per sample over the rewards that apply to it (``None`` where none does). The parts run
    concurrently (each in a thread or as a coroutine); ``metrics`` holds each part's metrics as ``name/key`` plus
    the combined ``mean``/``std``."""

    name = "combined"

    def __init__(self, parts: Sequence[tuple[RewardFn, float]] | dict[str, tuple[RewardFn, float]]) -> None:
        super().__init__()
        if isinstance(parts, dict):
            self.parts = [(name, fn, float(w)) for name, (fn, w) in parts.items()]
        else:
            self.parts = [(_name_of(fn), fn, float(w)) for fn, w in parts]
        names = [name for name, _, _ in self.parts]
        if len(set(names)) != len(names):
            raise ValueError(f"Combined: reward names must be unique, got {names}")

    async def aresults(self, prompts: Sequence, completions: Sequence, **columns: Any) -> list[RewardResult]:
        start = time.perf_counter()
        scores = await asyncio.gather(*(call_reward(fn, prompts, completions, **columns) for _, fn, _ in self.parts))
        out = []
        for i in range(len(completions)):
            terms = [(w, s[i]) for (_, _, w), s in zip(self.parts, scores, strict=True) if s[i] is not None]
            if not terms:
                out.append(skipped("no reward applies"))
                continue
            value = sum(w * float(s) for w, s in terms)
            out.append(RewardResult(value, "passed", ""))
        self._record(out, start)
        for (name, fn, _), s in zip(self.parts, scores, strict=True):
            part = getattr(fn, "metrics", None) or summarize(
                [RewardResult(v, "passed" if v is not None else "skipped") for v in s], 0.0
            )
            self.metrics.update({f"{name}/{k}": v for k, v in part.items()})
        return out

    def results(self, prompts: Sequence, completions: Sequence, **columns: Any) -> list[RewardResult]:
        return _run_sync(self.aresults(prompts, completions, **columns))


def combine(*parts: tuple[RewardFn, float], **named: tuple[RewardFn, float]) -> Combined:
    """``combine((math_reward, 1.0), (ifeval_reward, 0.5))`` or ``combine(math=(math_reward, 1.0), ...)``."""
    if parts and named:
        raise ValueError("combine: pass the parts either positionally or by name, not both")
    return Combined(named if named else list(parts))


def _name_of(fn: Any) -> str:
    return getattr(fn, "name", None) or getattr(fn, "__name__", None) or type(fn).__name__
