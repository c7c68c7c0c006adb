"""Self-critique rubric reward (Kimi K2, arXiv 2507.20534 §3.2 and its appendix F): for the K responses sampled
for one prompt, a critic model compares pairs against rubrics, and the pairwise verdicts aggregate to one score per
response.

- Rubrics: the core ones (clarity and relevance; conversational fluency and engagement; objective and grounded
  interaction), the prescriptive ones (no initial praise; no self-justification) and per-prompt rubrics from the
  data (column ``rubrics``: a list of strings per sample).
- Pairs: every unordered pair is judged in both orders (A/B, then B/A), so a critic that prefers a position gives
  each side one win and cancels out. A verdict the parser cannot read is counted (``malformed``) and dropped.
- Aggregation: the win rate (wins + ties/2 over valid judgments) or Bradley–Terry strengths fitted by the MM
  algorithm (Hunter 2004) with a light prior, reported as each response's expected win rate against the others.
- Back ends: any chat function ``messages -> str`` (sync or async); :func:`openai_chat` for an OpenAI-compatible
  server (``k2 serve``, vLLM, SGLang; stdlib HTTP, no extra dependency); :func:`engine_chat` for the in-process
  :class:`k2.infer.Engine`.
- Calibration (the closed loop of the report): on prompts with verifiable rewards, :meth:`RubricCritic.calibrate`
  scores the critic's pairwise preferences against the verifier's (agreement rate) and exports every verifier-
  decided judgment as training data for the critic (``CalibrationReport.records``, JSONL-ready).
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import json
import math
import re
import time
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from k2.rl.rewards.base import Reward, RewardResult, _run_sync, column, skipped, text_of

ChatFn = Callable[[list[dict]], "str | Awaitable[str]"]

CORE_RUBRICS = (
    "Clarity and relevance: the response addresses the user's request directly, stays on topic, and is as long as "
    "the task needs and no longer.",
    "Conversational fluency and engagement: the response reads naturally, follows the conversation's context and "
    "tone, and engages with what the user actually asked.",
    "Objective and grounded interaction: the response stays factual and grounded; no flattery, no sycophancy, no "
    "meta-commentary about itself or the conversation.",
)
PRESCRIPTIVE_RUBRICS = (
    "No initial praise: the response does not open by complimenting the user or the question "
    '("Great question!", "What a fascinating idea").',
    "No self-justification: the response does not explain why it is good, how carefully it was written, or that "
    "it followed the instructions; it lets the content speak.",
)

SYSTEM_PROMPT = (
    "You are a strict critic comparing two responses to the same prompt. Judge them against the rubrics below, in "
    "order of importance, and ignore which response comes first and how long each is.\n\nRubrics:\n{rubrics}\n\n"
    "Reason briefly, then end with exactly one line: 'Verdict: A', 'Verdict: B' or 'Verdict: tie'."
)
_VERDICT = re.compile(r"verdict\s*[:：]?\s*[\[*\"']*\s*(A|B|tie)\b", re.IGNORECASE)
_BRACKETED = re.compile(r"\[\[\s*(A|B|tie)\s*\]\]", re.IGNORECASE)


def parse_verdict(text: str) -> str | None:
    """``"A"``, ``"B"`` or ``"tie"`` from the critic's answer (its last verdict), or ``None`` if there is none."""
    matches = list(_VERDICT.finditer(text)) or list(_BRACKETED.finditer(text))
    if not matches:
        return None
    verdict = matches[-1].group(1)
    return "tie" if verdict.lower() == "tie" else verdict.upper()


@dataclass(frozen=True)
class Judgment:
    """One critic call: response ``first`` shown as A and ``second`` as B."""

    first: int
    second: int
    verdict: str | None  # "A", "B", "tie" or None (malformed / failed)
    raw: str
    messages: list[dict] = field(repr=False, default_factory=list)

    def points(self) -> tuple[float, float] | None:
        """(points of ``first``, points of ``second``), or None for no verdict."""
        return {"A": (1.0, 0.0), "B": (0.0, 1.0), "tie": (0.5, 0.5)}.get(self.verdict or "")


@dataclass
class CritiqueResult:
    scores: list[float | None]  # one per response; None when none of its judgments was readable
    judgments: list[Judgment]
    malformed: int
    errors: int


def win_rates(k: int, judgments: Sequence[Judgment]) -> list[float | None]:
    points, games = [0.0] * k, [0] * k
    for j in judgments:
        p = j.points()
        if p is None:
            continue
        points[j.first] += p[0]
        points[j.second] += p[1]
        games[j.first] += 1
        games[j.second] += 1
    return [points[i] / games[i] if games[i] else None for i in range(k)]


def bradley_terry(k: int, judgments: Sequence[Judgment], prior: float = 0.5, iters: int = 200) -> list[float | None]:
    """Bradley–Terry strengths by MM iterations; each response also plays ``prior`` wins and ``prior`` losses
    against a virtual opponent of strength 1 (keeps unbeaten responses finite). Returns each response's expected
    win rate against the other K - 1 under the fitted model."""
    wins = [[0.0] * k for _ in range(k)]
    played = [0] * k
    for j in judgments:
        p = j.points()
        if p is None:
            continue
        wins[j.first][j.second] += p[0]
        wins[j.second][j.first] += p[1]
        played[j.first] += 1
        played[j.second] += 1
    strength = [1.0] * k
    for _ in range(iters):
        new = []
        for i in range(k):
            num = sum(wins[i]) + prior
            den = sum((wins[i][j] + wins[j][i]) / (strength[i] + strength[j]) for j in range(k) if j != i)
            den += 2 * prior / (strength[i] + 1.0)
            new.append(num / den)
        scale = math.exp(sum(math.log(s) for s in new) / k)
        strength = [s / scale for s in new]
    if k < 2:
        return [None] * k
    return [
        sum(strength[i] / (strength[i] + strength[j]) for j in range(k) if j != i) / (k - 1) if played[i] else None
        for i in range(k)
    ]


@dataclass
class CalibrationReport:
    """Critic vs verifier on pairs whose verifiable rewards differ."""

    agreement: float  # fraction of decided pairs where the critic preferred the verifier's winner (nan if none)
    pairs: int  # verifier-decided pairs
    agreed: int
    malformed: int
    records: list[dict]  # one per judgment on a decided pair: the critic's messages, its answer, the target verdict

    def write_jsonl(self, path: str | Path) -> None:
        with open(path, "w") as f:
            for record in self.records:
                f.write(json.dumps(record) + "\n")


class RubricCritic(Reward):
    """Pairwise rubric critic over groups of responses to the same prompt (see the module docstring). As a reward
    (``await critic(prompts, completions, rubrics=...)``), completions are grouped by identical prompt and each gets
    its aggregated score; a prompt with a single completion is skipped."""

    name = "rubric_critic"

    def __init__(
        self,
        chat: ChatFn,
        *,
        rubrics: Sequence[str] = CORE_RUBRICS + PRESCRIPTIVE_RUBRICS,
        aggregation: str = "bradley_terry",
        max_concurrency: int = 16,
        both_orders: bool = True,
    ) -> None:
        super().__init__()
        if aggregation not in ("bradley_terry", "win_rate"):
            raise ValueError(f"aggregation must be 'bradley_terry' or 'win_rate', got {aggregation!r}")
        self.chat, self.rubrics, self.aggregation = chat, tuple(rubrics), aggregation
        self.both_orders = both_orders
        self.max_concurrency = max_concurrency
        self.totals = {"judgments": 0, "malformed": 0, "errors": 0}

    def judge_messages(self, prompt: Any, a: str, b: str, rubrics: Sequence[str] = ()) -> list[dict]:
        listed = "\n".join(f"{i}. {r}" for i, r in enumerate((*self.rubrics, *rubrics), 1))
        user = f"[Prompt]\n{text_of(prompt)}\n\n[Response A]\n{a}\n\n[Response B]\n{b}\n\nWhich response is better?"
        return [{"role": "system", "content": SYSTEM_PROMPT.format(rubrics=listed)}, {"role": "user", "content": user}]

    async def _ask(self, messages: list[dict], limit: asyncio.Semaphore) -> tuple[str, bool]:
        async with limit:
            try:
                if inspect.iscoroutinefunction(self.chat) or inspect.iscoroutinefunction(type(self.chat).__call__):
                    answer = await self.chat(messages)
                else:  # a sync back end runs in a thread, keeping the loop free for the other judgments
                    answer = await asyncio.to_thread(self.chat, messages)
                    if inspect.isawaitable(answer):
                        answer = await answer
                return str(answer), False
            except Exception as exc:  # a failed call counts like a malformed answer, and never ends the batch
                return f"<error {type(exc).__name__}: {exc}>", True

    async def judge(
        self, prompt: Any, responses: Sequence[str], rubrics: Sequence[str] = (), limit: asyncio.Semaphore | None = None
    ) -> list[Judgment]:
        limit = limit or asyncio.Semaphore(self.max_concurrency)
        orders = []
        for i, j in itertools.combinations(range(len(responses)), 2):
            orders.append((i, j))
            if self.both_orders:
                orders.append((j, i))
        messages = [self.judge_messages(prompt, responses[i], responses[j], rubrics) for i, j in orders]
        answers = await asyncio.gather(*(self._ask(m, limit) for m in messages))
        judgments = []
        for (i, j), m, (raw, failed) in zip(orders, messages, answers, strict=True):
            judgments.append(Judgment(i, j, None if failed else parse_verdict(raw), raw, m))
        return judgments

    def aggregate(self, k: int, judgments: Sequence[Judgment]) -> list[float | None]:
        return win_rates(k, judgments) if self.aggregation == "win_rate" else bradley_terry(k, judgments)

    async def rank(self, prompt: Any, responses: Sequence[Any], rubrics: Sequence[str] = ()) -> CritiqueResult:
        texts = [text_of(r) for r in responses]
        judgments = await self.judge(prompt, texts, rubrics)
        return self._result(len(texts), judgments)

    def _result(self, k: int, judgments: list[Judgment]) -> CritiqueResult:
        errors = sum(1 for j in judgments if j.raw.startswith("<error "))
        malformed = sum(1 for j in judgments if j.verdict is None) - errors
        self.totals["judgments"] += len(judgments)
        self.totals["malformed"] += malformed
        self.totals["errors"] += errors
        return CritiqueResult(self.aggregate(k, judgments), judgments, malformed, errors)

    @staticmethod
    def _groups(prompts: Sequence[Any]) -> dict[str, list[int]]:
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(json.dumps(p, sort_keys=True, default=str), []).append(i)
        return groups

    async def aresults(self, prompts: Sequence, completions: Sequence, **columns: Any) -> list[RewardResult]:
        start = time.perf_counter()
        rubrics = column(columns, "rubrics", len(completions))
        limit = asyncio.Semaphore(self.max_concurrency)
        groups = [g for g in self._groups(prompts).values()]
        out: list[RewardResult] = [skipped("one response for its prompt: nothing to compare")] * len(completions)

        async def one(group: list[int]) -> None:
            if len(group) < 2:
                return
            texts = [text_of(completions[i]) for i in group]
            judgments = await self.judge(prompts[group[0]], texts, rubrics[group[0]] or (), limit)
            result = self._result(len(group), judgments)
            for i, score in zip(group, result.scores, strict=True):
                if score is None:
                    out[i] = RewardResult(None, "malformed", "no readable verdict for this response")
                else:
                    note = f"{result.malformed} malformed, {result.errors} failed of {len(judgments)} judgments"
                    out[i] = RewardResult(score, "passed", note)

        await asyncio.gather(*(one(g) for g in groups))
        self._record(out, start)
        self.metrics.update({f"critic/{k}": float(v) for k, v in self.totals.items()})
        return out

    def results(self, prompts: Sequence, completions: Sequence, **columns: Any) -> list[RewardResult]:
        return _run_sync(self.aresults(prompts, completions, **columns))

    async def __call__(self, prompts: Sequence, completions: Sequence, **columns: Any) -> list[float | None]:
        return [r.score for r in await self.aresults(prompts, completions, **columns)]

    async def calibrate(
        self, prompts: Sequence, completions: Sequence, verifier_scores: Sequence[float | None], **columns: Any
    ) -> CalibrationReport:
        """Judge every group like :meth:`aresults`, then compare the critic with the verifier on each pair whose
        verifier scores differ: the critic agrees when its two-order points favour the verifier's winner."""
        rubrics = column(columns, "rubrics", len(completions))
        limit = asyncio.Semaphore(self.max_concurrency)
        groups = [g for g in self._groups(prompts).values() if len(g) >= 2]
        texts = [text_of(c) for c in completions]
        judged = await asyncio.gather(
            *(self.judge(prompts[g[0]], [texts[i] for i in g], rubrics[g[0]] or (), limit) for g in groups)
        )
        pairs = agreed = malformed = 0
        records: list[dict] = []
        for group, judgments in zip(groups, judged, strict=True):
            self._result(len(group), judgments)
            by_pair: dict[tuple[int, int], float] = {}
            for j in judgments:
                si, sj = verifier_scores[group[j.first]], verifier_scores[group[j.second]]
                if si is None or sj is None or si == sj:
                    continue
                target = "A" if si > sj else "B"
                records.append(
                    {
                        "messages": j.messages,
                        "critic_answer": j.raw,
                        "critic_verdict": j.verdict,
                        "target_verdict": target,
                        "agrees": j.verdict == target,
                        "verifier_scores": [si, sj],
                    }
                )
                p = j.points()
                if p is None:
                    malformed += 1
                    continue
                key = (min(j.first, j.second), max(j.first, j.second))
                lead = p[0] - p[1] if j.first == key[0] else p[1] - p[0]  # points of the lower index minus the other
                by_pair[key] = by_pair.get(key, 0.0) + lead
            for (i, j), lead in by_pair.items():
                pairs += 1
                verifier_lead = verifier_scores[group[i]] - verifier_scores[group[j]]
                agreed += int(lead * verifier_lead > 0)
        report = CalibrationReport(agreed / pairs if pairs else math.nan, pairs, agreed, malformed, records)
        self.metrics = {"critic/agreement": report.agreement, "critic/pairs": pairs, "critic/malformed": malformed}
        return report


# ---- back ends -------------------------------------------------------------------------------------------------


def openai_chat(
    base_url: str,
    model: str,
    *,
    api_key: str = "none",
    temperature: float = 0.0,
    max_tokens: int = 512,
    timeout_s: float = 120.0,
    **extra: Any,
) -> Callable[[list[dict]], Awaitable[str]]:
    """An async chat function for an OpenAI-compatible ``/v1/chat/completions`` endpoint (``base_url`` ends in
    ``/v1``). Standard library HTTP in worker threads; concurrency is bounded by the critic's semaphore."""
    url = base_url.rstrip("/") + "/chat/completions"

    def post(messages: list[dict]) -> str:
        body = {"model": model, "messages": messages, "temperature": temperature, "max_tokens": max_tokens, **extra}
        request = urllib.request.Request(
            url,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"},
        )
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            payload = json.loads(response.read())
        return payload["choices"][0]["message"].get("content") or ""

    async def chat(messages: list[dict]) -> str:
        return await asyncio.to_thread(post, messages)

    return chat


def engine_chat(
    engine: Any, *, max_new_tokens: int = 512, temperature: float = 0.0, seed: int | None = 0
) -> Callable[[list[dict]], Awaitable[str]]:
    """An async chat function over an in-process :class:`k2.infer.Engine` (or ``AsyncEngine``); concurrent
    judgments share the engine's batches. The engine needs a tokenizer."""
    from k2.data import chat as chat_format
    from k2.infer.async_engine import AsyncEngine
    from k2.infer.engine import SamplingParams

    runner = engine if isinstance(engine, AsyncEngine) else AsyncEngine(engine)
    tokenizer = runner.tokenizer
    if tokenizer is None:
        raise ValueError("engine_chat: the Engine needs a tokenizer")
    params = SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
        stop_token_ids=chat_format.stop_token_ids(tokenizer),
    )

    async def chat(messages: list[dict]) -> str:
        ids, _ = chat_format.render(messages, tokenizer, add_generation_prompt=True)
        return "".join([ev.text async for ev in runner.generate(ids, params)])

    chat.engine = runner  # type: ignore[attr-defined]
    return chat
