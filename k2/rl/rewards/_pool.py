"""A pool of killable worker processes with a per-item timeout, for graders that can hang (``math-verify`` on an
adversarial string can sit in sympy for ever, and its own ``signal.alarm`` timeouts work only in a main thread).

Each worker is a ``spawn``ed process that imports ``module:function`` once, says it is ready, then answers one item
at a time over a pipe. An item that runs past its deadline gets its worker killed (SIGKILL) and replaced; the item's
outcome is ``("timeout", None)``. A worker that dies gives ``("error", reason)``. The caller never blocks longer than
the deadlines plus the time to start replacements.
"""

from __future__ import annotations

import atexit
import importlib
import multiprocessing
import threading
import time
import weakref
from collections import deque
from multiprocessing.connection import Connection, wait
from typing import Any

_START_TIMEOUT_S = 120.0  # importing sympy in a fresh worker on a loaded machine


def _worker_main(target: str, conn: Connection) -> None:
    module, name = target.split(":")
    fn = getattr(importlib.import_module(module), name)
    conn.send(("ready", None))
    while True:
        try:
            item = conn.recv()
        except EOFError:
            return
        try:
            conn.send(("ok", fn(item)))
        except Exception as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class _Worker:
    def __init__(self, ctx: Any, target: str) -> None:
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(target, child), daemon=True)
        self.process.start()
        child.close()
        self.ready = False

    def kill(self) -> None:
        self.process.kill()
        self.process.join()
        self.conn.close()


class KillablePool:
    """``map(items, timeout_s)`` over ``num_workers`` processes running ``target`` (``"module:function"``)."""

    def __init__(self, target: str, num_workers: int) -> None:
        self.target, self.num_workers = target, max(1, num_workers)
        self._ctx = multiprocessing.get_context("spawn")
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self.restarts = 0
        _POOLS.add(self)

    def _spawn(self) -> _Worker:
        return _Worker(self._ctx, self.target)

    def map(self, items: list, timeout_s: float) -> list[tuple[str, Any]]:
        """Outcomes in item order: ``("ok", value)``, ``("timeout", None)`` or ``("error", reason)``."""
        with self._lock:
            while len(self._workers) < min(self.num_workers, max(1, len(items))):
                self._workers.append(self._spawn())
            return self._map(items, timeout_s)

    def _map(self, items: list, timeout_s: float) -> list[tuple[str, Any]]:
        results: list[tuple[str, Any] | None] = [None] * len(items)
        todo = deque(range(len(items)))
        busy: dict[_Worker, tuple[int, float]] = {}  # worker -> (item index, deadline)
        start_deadline = time.monotonic() + _START_TIMEOUT_S
        while todo or busy:
            for worker in [w for w in self._workers if w.ready and w not in busy]:
                if not todo:
                    break
                index = todo.popleft()
                worker.conn.send(items[index])
                busy[worker] = (index, time.monotonic() + timeout_s)
            waiting = [w for w in self._workers if w in busy or not w.ready]
            deadlines = [d for _, d in busy.values()] + [start_deadline]
            ready = wait([w.conn for w in waiting], timeout=max(0.0, min(deadlines) - time.monotonic()))
            for worker in [w for w in waiting if w.conn in ready]:
                try:
                    kind, value = worker.conn.recv()
                except (EOFError, OSError):
                    kind, value = "error", f"grading worker died (exit code {worker.process.exitcode})"
                    self._replace(worker)
                if kind == "ready":
                    worker.ready = True
                    continue
                if worker in busy:
                    index, _ = busy.pop(worker)
                    results[index] = (kind, value)
                elif kind == "error":  # died while starting
                    raise RuntimeError(f"KillablePool({self.target}): a worker failed to start: {value}")
            now = time.monotonic()
            for worker, (index, deadline) in list(busy.items()):
                if now >= deadline:
                    busy.pop(worker)
                    results[index] = ("timeout", None)
                    self._replace(worker)
            if not any(w.ready for w in self._workers) and now >= start_deadline:
                raise RuntimeError(f"KillablePool({self.target}): no worker started in {_START_TIMEOUT_S:g} s")
        return results  # type: ignore[return-value]

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self._workers[self._workers.index(worker)] = self._spawn()
        self.restarts += 1

    def close(self) -> None:
        for worker in self._workers:
            worker.kill()
        self._workers = []


_POOLS: weakref.WeakSet[KillablePool] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for pool in list(_POOLS):
        pool.close()
