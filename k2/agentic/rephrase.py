"""Rephrasing of pre-training text: chunk-wise autoregressive rewriting with an LLM fidelity check.

Kimi K2 report (arXiv 2507.20534) §2.2: a document is rewritten with style- and perspective-diverse prompts; long
documents are split into segments, each rewritten conditioned on the rewrite so far so the whole stays coherent,
and every rewrite is checked for fidelity to its source by an LLM before it is kept. Here:

- chunks of about ``chunk_tokens`` tokens, cut at sentence or line ends (inside an over-long sentence, at
  spaces); the chunks concatenate back to the document exactly. Tokens are counted with a k2 tokenizer (the
  engine back end's, or ``--tokenizer``), else approximated as ``ceil(characters / 4)``, the usual English BPE
  ratio, for a remote model whose tokenizer is unknown;
- rephrasing ``k`` of a document (``k < max_rephrasings``) uses the ``k``-th of the styles drawn without
  replacement for that document by a generator seeded from ``(seed, document id)``; each chunk's prompt holds the
  tail (about ``chunk_tokens`` tokens) of the rewrite so far;
- fidelity per chunk: a judge reply constrained to ``{"faithful": bool, "reason": str}``
  (``k2.agentic.backend.chat_json``); the first unfaithful chunk drops the whole rephrasing.

Output: one JSON line per kept rephrasing, ``{"id", "text", "source_id", "style", "rephrasing", "chunks"}`` —
the ``.jsonl`` format ``k2 pretrain`` reads (``data.path``, ``data.text_field = "text"``). Dropped rephrasings
(with the judge's reason) go to ``OUTPUT.dropped`` (JSON lines, a suffix the corpus readers do not pick up), so a
rerun neither repeats nor reconsiders them; a rephrasing that failed on a back-end fault is written nowhere and is
tried again by the next run. Both files are :class:`~k2.agentic.store.JsonlStore`s: a run killed at any point
and run again produces the records of an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import random
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from k2.agentic.backend import BackendError, ChatBackend, chat_json, map_concurrent
from k2.agentic.store import JsonlStore, derived_seed, stable_id
from k2.data.readers import TxtSplit, read_documents
from k2.data.tokenizer import Tokenizer
from k2.errors import ConfigError

# name → instruction; the names are recorded in the output.
STYLES: dict[str, str] = {
    "plain": "plain, clear prose for a general reader",
    "encyclopedic": "a neutral, encyclopedic register, as in a reference article",
    "textbook": "an explanatory textbook voice for students, defining terms where they first appear",
    "conversational": "a conversational explanation, as if telling a curious friend",
    "concise": "concise, dense sentences without filler",
    "formal": "a formal, academic register",
    "third_person": 'a third-person account of what the text states ("The text explains that ...")',
    "question_answer": "questions and answers: pose each question the passage answers, then answer it",
}

REWRITE_SYSTEM = (
    "You rewrite one passage of a longer text in a given style. Keep every fact, number, name and claim of the "
    "passage; add nothing and leave nothing out. Continue naturally from the rewrite so far without repeating it. "
    "Reply with the rewritten passage only."
)
JUDGE_SYSTEM = (
    "You check a rewrite against its original. It is faithful if it states the same facts, numbers, names and "
    "claims: nothing added, nothing left out, nothing changed. Style and wording may differ freely."
)
REASON_CHARS = 200
# A character is at most 4 UTF-8 bytes and a token at least one byte, so a constrained verdict always fits.
VERDICT_MAX_TOKENS = 4 * REASON_CHARS + 64
VERDICT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"faithful": {"type": "boolean"}, "reason": {"type": "string", "maxLength": REASON_CHARS}},
    "required": ["faithful", "reason"],
    "additionalProperties": False,
}
CHARS_PER_TOKEN = 4  # approximation when no tokenizer is known
DROPPED_SUFFIX = ".dropped"

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


@dataclass(frozen=True)
class RephraseConfig:
    input: str  # a .txt/.jsonl/.parquet file or a directory of them (as ``k2 pretrain``'s data.path)
    output: Path  # the .jsonl of kept rephrasings
    text_field: str = "text"
    txt_split: TxtSplit = "file"
    max_rephrasings: int = 2  # per document
    chunk_tokens: int = 256
    seed: int = 0
    temperature: float = 0.7
    concurrency: int = 8
    max_documents: int = 0  # 0: all

    def __post_init__(self) -> None:
        if self.max_rephrasings < 1 or self.chunk_tokens < 16 or self.concurrency < 1 or self.max_documents < 0:
            raise ConfigError(
                "rephrase: need max_rephrasings >= 1, chunk_tokens >= 16, concurrency >= 1, max_documents >= 0"
            )
        if self.output.suffix != ".jsonl":
            raise ConfigError(f"rephrase: the output must be a .jsonl file (what k2 pretrain reads), got {self.output}")


@dataclass
class RephraseStats:
    documents: int = 0
    rephrasings: int = 0  # (document, k) pairs of the input
    existing: int = 0  # already kept or dropped by an earlier run
    chunks: int = 0  # chunks rewritten by this run
    kept: int = 0
    rejected: int = 0  # dropped by the fidelity judge
    failed: Counter = field(default_factory=Counter)  # back-end reason → rephrasings
    failure_examples: dict[str, str] = field(default_factory=dict)  # reason → its first error message
    usage: dict[str, int] = field(default_factory=dict)  # the back end's counters spent by this run

    def as_dict(self) -> dict[str, Any]:
        return {
            "documents": self.documents,
            "rephrasings": self.rephrasings,
            "existing": self.existing,
            "chunks": self.chunks,
            "kept": self.kept,
            "rejected_fidelity": self.rejected,
            "failed": dict(self.failed),
            "failure_examples": self.failure_examples,
            "usage": self.usage,
        }


def token_counter(tokenizer: Tokenizer | None) -> Callable[[str], int]:
    if tokenizer is not None:
        return lambda text: len(tokenizer.encode(text))
    return lambda text: math.ceil(len(text) / CHARS_PER_TOKEN)


def _pieces(text: str) -> list[str]:
    """Sentences and lines, each with its trailing whitespace; they concatenate back to ``text``."""
    out, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        out.append(text[start : m.end()])
        start = m.end()
    if start < len(text):
        out.append(text[start:])
    return out


def split_chunks(text: str, chunk_tokens: int, count: Callable[[str], int]) -> list[str]:
    """Consecutive chunks of ``text`` of at most about ``chunk_tokens`` tokens each; ``"".join`` gives ``text``.

    Sentences (or lines) are packed greedily; a sentence longer than a chunk is cut between words; a single word
    longer than a chunk stays whole.
    """
    units: list[str] = []
    for piece in _pieces(text):
        if count(piece) <= chunk_tokens:
            units.append(piece)
        else:
            units.extend(re.findall(r"\S+\s*|\s+", piece))
    chunks: list[str] = []
    current, size = "", 0
    for unit in units:
        n = count(unit)
        if current and size + n > chunk_tokens:
            chunks.append(current)
            current, size = "", 0
        current += unit
        size += n
    if current:
        chunks.append(current)
    return chunks


def rewrite_messages(style: str, context: str, chunk: str, index: int, total: int) -> list[dict[str, str]]:
    previous = context if context else "(none: this is the first passage)"
    user = (
        f"Style: {STYLES[style]}.\n\n"
        f"The rewrite so far (its end):\n<<<\n{previous}\n>>>\n\n"
        f"Passage {index + 1} of {total} to rewrite:\n<<<\n{chunk}\n>>>"
    )
    return [{"role": "system", "content": REWRITE_SYSTEM}, {"role": "user", "content": user}]


def judge_messages(original: str, rewrite: str) -> list[dict[str, str]]:
    user = (
        f"Original:\n<<<\n{original}\n>>>\n\nRewrite:\n<<<\n{rewrite}\n>>>\n\n"
        'Is the rewrite faithful? Answer as JSON: {"faithful": true or false, "reason": "..."}.'
    )
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


def _tail(text: str, max_tokens: int, count: Callable[[str], int]) -> str:
    """The longest run of whole words at the end of ``text`` that ``count`` puts at ``max_tokens`` or fewer
    (binary search over the first word kept: a suffix's count grows with its length)."""
    starts = [m.start() for m in re.finditer(r"\S+\s*", text)]
    lo, hi = 0, len(starts)  # the answer is starts[k] for the least k in [lo, hi) that fits; "" if none does
    while lo < hi:
        mid = (lo + hi) // 2
        if count(text[starts[mid] :]) <= max_tokens:
            hi = mid
        else:
            lo = mid + 1
    return text[starts[lo] :] if lo < len(starts) else ""


def styles_for(cfg: RephraseConfig, source_id: str) -> Sequence[str]:
    """The styles of a document's rephrasings ``0..max_rephrasings-1`` (as :func:`rephrase` draws them)."""
    names = sorted(STYLES)
    rng = random.Random(derived_seed(cfg.seed, source_id))
    styles: list[str] = []
    while len(styles) < cfg.max_rephrasings:  # every style once before any repeats
        styles += rng.sample(names, len(names))
    return styles[: cfg.max_rephrasings]


@dataclass(frozen=True)
class _Job:
    record_id: str
    source_id: str
    k: int
    style: str
    chunks: tuple[str, ...]


def _jobs(cfg: RephraseConfig, count: Callable[[str], int], stats: RephraseStats) -> Iterator[_Job]:
    """Every (document, rephrasing) of the input, in input order, read lazily."""
    docs = read_documents(cfg.input, text_field=cfg.text_field, txt_split=cfg.txt_split)
    for index, text in enumerate(docs):
        if cfg.max_documents and index >= cfg.max_documents:
            return
        if not text.strip():
            continue
        stats.documents += 1
        source_id = stable_id("document", index, text)
        styles = styles_for(cfg, source_id)
        chunks = tuple(split_chunks(text, cfg.chunk_tokens, count))
        for k in range(cfg.max_rephrasings):
            stats.rephrasings += 1
            yield _Job(stable_id("rephrase", source_id, k), source_id, k, styles[k], chunks)


def _rephrase_one(
    job: _Job, backend: ChatBackend, cfg: RephraseConfig, count: Callable[[str], int], on_chunk: Callable[[], None]
) -> dict[str, Any]:
    """The kept record, or a dropped one (``"dropped": reason``); raises ``BackendError`` on a back-end fault."""
    seed = derived_seed(cfg.seed, job.record_id) % 2**31  # for back ends that honour a sampling seed
    rewritten = ""
    record = {"id": job.record_id, "source_id": job.source_id, "style": job.style, "rephrasing": job.k}
    max_tokens = 2 * cfg.chunk_tokens + 64
    for i, chunk in enumerate(job.chunks):
        context = _tail(rewritten, cfg.chunk_tokens, count)
        messages = rewrite_messages(job.style, context, chunk, i, len(job.chunks))
        reply = backend.chat(messages, temperature=cfg.temperature, max_tokens=max_tokens, seed=seed + i)
        on_chunk()
        piece = reply.content.strip()
        if not piece:
            return {**record, "dropped": f"chunk {i}: empty rewrite", "chunk": i}
        verdict = chat_json(
            backend,
            judge_messages(chunk, piece),
            VERDICT_SCHEMA,
            name="verdict",
            temperature=0.0,
            max_tokens=VERDICT_MAX_TOKENS,
        )
        if not verdict["faithful"]:
            return {**record, "dropped": f"chunk {i}: {verdict['reason']}", "chunk": i}
        rewritten += (_separator(job.chunks[i - 1]) if i else "") + piece
    return {**record, "text": rewritten, "chunks": len(job.chunks)}


def _separator(previous_chunk: str) -> str:
    """What joins two rewritten pieces: the source's paragraph or line break after the earlier chunk, else a space."""
    if previous_chunk.endswith("\n\n"):
        return "\n\n"
    return "\n" if previous_chunk.endswith("\n") else " "


def rephrase(
    backend: ChatBackend | None,
    cfg: RephraseConfig,
    *,
    tokenizer: Tokenizer | None = None,
    dry_run: TextIO | None = None,
) -> RephraseStats:
    """Rephrase every document of ``cfg.input`` into ``cfg.output`` (resuming); see the module docstring.

    ``dry_run``: write the rewrite and judge prompts to this stream as JSON lines instead of sending them (the
    rewrite so far and the rewrite to judge are placeholders then); ``backend`` may be None.
    """
    count = token_counter(tokenizer)
    stats = RephraseStats()
    if dry_run is not None:
        for job in _jobs(cfg, count, stats):
            for i, chunk in enumerate(job.chunks):
                context = "" if i == 0 else f"<rewrite of passages 1..{i}>"
                for kind, messages in (
                    ("rewrite", rewrite_messages(job.style, context, chunk, i, len(job.chunks))),
                    ("judge", judge_messages(chunk, f"<rewrite of passage {i + 1}>")),
                ):
                    line = {"id": job.record_id, "chunk": i, "kind": kind, "messages": messages}
                    dry_run.write(json.dumps(line, ensure_ascii=False) + "\n")
        return stats
    if backend is None:
        raise ConfigError("rephrase: a back end is needed unless dry_run is given")
    before = backend.usage()
    with (
        JsonlStore(cfg.output) as kept,
        JsonlStore(cfg.output.with_name(cfg.output.name + DROPPED_SUFFIX)) as dropped,
        tqdm(desc="rephrase", unit="rephrasing", disable=None) as bar,
    ):
        done = kept.ids() | dropped.ids()

        def pending() -> Iterator[_Job]:
            for job in _jobs(cfg, count, stats):
                if job.record_id in done:
                    stats.existing += 1
                else:
                    yield job

        lock = threading.Lock()

        def on_chunk() -> None:
            with lock:
                stats.chunks += 1

        def work(job: _Job) -> dict[str, Any]:
            return _rephrase_one(job, backend, cfg, count, on_chunk)

        for _, out in map_concurrent(work, pending(), cfg.concurrency):
            bar.update(1)
            if isinstance(out, BaseException):
                reason = out.reason if isinstance(out, BackendError) else type(out).__name__
                stats.failed[reason] += 1
                stats.failure_examples.setdefault(reason, str(out)[:300])
            elif "dropped" in out:
                dropped.append(out)
                stats.rejected += 1
            else:
                kept.append(out)
                stats.kept += 1
    after = backend.usage()
    stats.usage = {key: after[key] - before.get(key, 0) for key in after}
    return stats


def format_stats(stats: RephraseStats) -> str:
    failed = ", ".join(f"{n} {reason}" for reason, n in sorted(stats.failed.items())) or "0"
    tokens = stats.usage.get("prompt_tokens", 0) + stats.usage.get("completion_tokens", 0)
    return (
        f"{stats.documents} documents, {stats.rephrasings} rephrasings ({stats.existing} done before), "
        f"{stats.chunks} chunks rewritten; kept {stats.kept}, rejected for fidelity {stats.rejected}, "
        f"failed {failed}; {tokens} tokens"
    )
