"""What every ``k2 synth`` stage shares: its result counters, the resumable "make each missing record" loop, and
the run's log of stage invocations.

A stage knows the full list of record ids it should produce (from its input files and the config). The loop skips
the ids already in the stage's :class:`~k2.agentic.store.JsonlStore`, makes the rest on ``concurrency`` threads
(each from its own seeded generator, so order and threads do not matter), appends each finished record, and
counts a record that failed with a ``K2Error`` (a ``BackendError`` after its retries, a reply it cannot use)
under its reason instead of stopping: the record stays missing and the next run of the stage tries it again.

Each invocation appends one line to ``log.jsonl`` (stage, counts, failure reasons, tokens spent, wall time);
``k2 synth export`` sums them into ``stats.json``.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

from k2.agentic.backend import BackendError, ChatBackend, map_concurrent
from k2.agentic.store import JsonlStore, stable_id
from k2.errors import K2Error

LOG_FILE = "log.jsonl"

T = TypeVar("T")


@dataclass
class StageResult:
    stage: str
    total: int = 0  # records the stage should have (over all its files)
    existing: int = 0  # already in its store when it started
    new: int = 0  # written by this invocation
    failures: Counter = field(default_factory=Counter)  # reason → records that failed
    dropped: Counter = field(default_factory=Counter)  # reason → items filtered out on purpose (dedup, verdicts)
    usage: dict[str, int] = field(default_factory=dict)  # tokens and requests this invocation spent
    wall_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "total": self.total,
            "existing": self.existing,
            "new": self.new,
            "failures": dict(self.failures),
            "dropped": dict(self.dropped),
            "usage": self.usage,
            "wall_s": round(self.wall_s, 3),
        }


def failure_reason(error: BaseException) -> str:
    """A short, countable reason: the back end's classification, else the error's class."""
    return error.reason if isinstance(error, BackendError) else type(error).__name__


def make_missing(
    result: StageResult,
    store: JsonlStore,
    items: Sequence[tuple[str, T]],
    make: Callable[[str, T], Mapping[str, Any]],
    concurrency: int,
) -> None:
    """Make the record of every ``(record_id, item)`` whose id is not in ``store`` yet; count into ``result``."""
    result.total += len(items)
    pending = [(rid, item) for rid, item in items if rid not in store]
    result.existing += len(items) - len(pending)
    with tqdm(total=len(pending), desc=result.stage, unit="rec", leave=False, disable=None) as bar:
        for (rid, _), out in map_concurrent(lambda p: make(*p), pending, concurrency):
            bar.update(1)
            if isinstance(out, BaseException):
                result.failures[failure_reason(out)] += 1
                continue
            store.append({"id": rid, **out})
            result.new += 1


def run_logged(
    name: str, run_dir: Path, backend: ChatBackend | None, body: Callable[[StageResult], None]
) -> StageResult:
    """Run a stage's ``body`` and append its result to the run's log (tokens from the back end's usage delta)."""
    result = StageResult(name)
    before = backend.usage() if backend is not None else {}
    start = time.monotonic()
    try:
        body(result)
    finally:
        result.wall_s = time.monotonic() - start
        after = backend.usage() if backend is not None else {}
        result.usage = {k: after[k] - before.get(k, 0) for k in after}
        with JsonlStore(run_dir / LOG_FILE) as log:
            log.append({"id": stable_id(name, time.time_ns(), os.getpid()), "time": time.time(), **result.as_dict()})
    return result


def read_store(run_dir: Path, filename: str, needed_by: str) -> list[dict[str, Any]]:
    """The records of an earlier stage's file (``K2Error`` naming the stage to run first when there are none)."""
    path = run_dir / filename
    records = []
    if path.exists():
        with JsonlStore(path) as store:
            records = store.records()
    if not records:
        raise K2Error(f"{needed_by}: no records in {path}; run the stage that writes it first")
    return records
