"""Resumable JSONL output of a pipeline stage: stable record ids, per-record seeds, whole-line atomic appends.

Every stage of ``k2 synth`` / ``k2 rephrase`` writes one JSONL file in its run directory. A record's ``id`` is a
hash of what it was made from (:func:`stable_id`) and its randomness comes from a generator seeded by
:func:`derived_seed`, so a record does not depend on which other records were made before it, on thread
scheduling, or on whether the stage was killed and rerun: rerunning a stage skips the ids already in its store and
appends the rest, which yields the same set of records as an uninterrupted run.

Crash safety: each record is one ``os.write`` of its whole line on an ``O_APPEND`` descriptor followed by
``fsync``. A process killed mid-write can leave at most one torn last line (no trailing newline); opening the
store truncates it away, so a record is either all there or not there.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from k2.errors import DataError


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def stable_id(*parts: Any) -> str:
    """16 hex characters of SHA-256 over the canonical JSON of ``parts`` (sorted keys, no spaces)."""
    return hashlib.sha256(_canonical(list(parts)).encode("utf-8")).hexdigest()[:16]


def derived_seed(base_seed: int, record_id: str) -> int:
    """The seed of ``record_id``'s own ``random.Random``: a 63-bit hash of ``(base_seed, record_id)``."""
    digest = hashlib.sha256(_canonical([int(base_seed), str(record_id)]).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") >> 1


class JsonlStore:
    """One stage's JSONL file: ``{"id": ..., ...}`` per line, ids unique. Thread-safe appends.

    The file's records are read once on open (kept in memory, in file order); :meth:`append` adds to both.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._records: list[dict[str, Any]] = []
        self._ids: set[str] = set()
        self._load()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        complete = data.rfind(b"\n") + 1  # bytes up to and including the last newline
        if complete < len(data):  # a torn last line from a killed writer
            os.truncate(self.path, complete)
            data = data[:complete]
        for lineno, line in enumerate(data.split(b"\n")[:-1], 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, UnicodeDecodeError) as e:
                raise DataError(f"{self.path}:{lineno}: invalid JSON ({e})") from None
            if not isinstance(record, dict) or not isinstance(record.get("id"), str):
                raise DataError(f"{self.path}:{lineno}: a record must be a JSON object with a string 'id'")
            if record["id"] in self._ids:
                raise DataError(f"{self.path}:{lineno}: duplicate record id {record['id']!r}")
            self._ids.add(record["id"])
            self._records.append(record)

    def ids(self) -> set[str]:
        with self._lock:
            return set(self._ids)

    def records(self) -> list[dict[str, Any]]:
        """The records in file order (copies of the list, not of the records)."""
        with self._lock:
            return list(self._records)

    def __contains__(self, record_id: object) -> bool:
        with self._lock:
            return record_id in self._ids

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)

    def append(self, record: Mapping[str, Any]) -> None:
        """Write ``record`` as one line and fsync it; ``DataError`` if its ``id`` is missing or already stored."""
        record_id = record.get("id")
        if not isinstance(record_id, str) or not record_id:
            raise DataError(f"{self.path}: a record needs a non-empty string 'id', got {record_id!r}")
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"
        stored = json.loads(line)  # what a reopened store would read back (tuples become lists, ...)
        data = line.encode("utf-8")
        with self._lock:
            if record_id in self._ids:
                raise DataError(f"{self.path}: duplicate record id {record_id!r}")
            written = os.write(self._fd, data)
            if written != len(data):  # disk full or a signal: keep the file parseable, report the failure
                os.ftruncate(self._fd, os.fstat(self._fd).st_size - written)
                raise OSError(f"{self.path}: short write ({written} of {len(data)} bytes)")
            os.fsync(self._fd)
            self._ids.add(record_id)
            self._records.append(stored)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> JsonlStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)
