"""An asyncio front for :class:`k2.infer.Engine`: one background thread steps the engine for all callers.

Coroutines call :meth:`AsyncEngine.generate`, which queues the request and yields its ``TokenEvent``s as the worker
thread produces them; concurrent callers therefore share every prefill and decode forward (continuous batching).
The worker blocks on an event while idle. A caller that stops iterating (a client that disconnects) aborts its
request, freeing its cache slot. If a forward raises, every request in flight receives the exception and the
worker goes on serving new requests.

:meth:`AsyncEngine.pause` (used while new weights load, see ``k2.rl.serve_sync``) returns once the worker is
between two steps and keeps it there until :meth:`AsyncEngine.resume`: no request is admitted and no forward runs.
New requests queue meanwhile; running ones keep their cache slot and, after the resume, continue on the new
weights (their cached latents of earlier tokens stay those of the old ones).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from collections.abc import AsyncIterator, Iterator, Sequence

from k2.infer.engine import Engine, SamplingParams, TokenEvent


class AsyncEngine:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._inbox: list[tuple[str, list[int], SamplingParams]] = []
        self._aborts: list[str] = []
        self._sinks: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._stopped = False
        self._paused = False
        self._parked = threading.Event()  # set by the worker while it honours a pause
        self._thread = threading.Thread(target=self._run, name="k2-engine", daemon=True)
        self._thread.start()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_seq_len(self) -> int:
        return self.engine.max_seq_len

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> AsyncIterator[TokenEvent]:
        """Yield the request's events until (and including) the one with a ``finish_reason``. Raises
        ``ValueError`` for a request the engine rejects."""
        request_id = f"async-{next(self._ids)}"
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if self._stopped:
                raise RuntimeError("AsyncEngine.generate: the engine has been shut down")
            self._sinks[request_id] = (asyncio.get_running_loop(), queue)
            self._inbox.append((request_id, list(prompt_ids), params))
        self._wake.set()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                with self._lock:
                    self._aborts.append(request_id)
                self._wake.set()

    def pause(self) -> None:
        """Stop admitting and stepping; returns once the worker is parked between two steps."""
        with self._lock:
            if self._stopped:
                raise RuntimeError("AsyncEngine.pause: the engine has been shut down")
            self._paused = True
        self._wake.set()
        self._parked.wait()

    def resume(self) -> None:
        with self._lock:
            self._paused = False
            self._parked.clear()
        self._wake.set()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """:meth:`pause` for the duration of the block."""
        self.pause()
        try:
            yield
        finally:
            self.resume()

    def shutdown(self) -> None:
        with self._lock:
            self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)

    # ---- worker thread -------------------------------------------------------------------------------------------

    def _deliver(self, request_id: str, item: TokenEvent | BaseException, final: bool) -> None:
        with self._lock:
            sink = self._sinks.pop(request_id, None) if final else self._sinks.get(request_id)
        if sink is not None:
            loop, queue = sink
            with contextlib.suppress(RuntimeError):  # the caller's loop has closed
                loop.call_soon_threadsafe(queue.put_nowait, item)

    def _run(self) -> None:
        engine = self.engine
        while True:
            with self._lock:
                if self._stopped:
                    return
                if self._paused:
                    self._parked.set()
                    inbox = None
                else:
                    inbox, self._inbox = self._inbox, []
                    aborts, self._aborts = self._aborts, []
                    for request_id in aborts:
                        self._sinks.pop(request_id, None)
            if inbox is None:
                self._wake.wait()
                self._wake.clear()
                continue
            for request_id in aborts:
                engine.abort(request_id)
            for request_id, prompt, params in inbox:
                try:
                    engine.add_request(prompt, params, request_id)
                except ValueError as e:
                    self._deliver(request_id, e, final=True)
            if not engine.has_unfinished():
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                events = engine.step()
            except Exception as e:  # a failed forward: fail the requests in flight, keep serving
                for request_id in list(self._sinks):
                    engine.abort(request_id)
                    self._deliver(request_id, RuntimeError(f"generation failed: {e!r}"), final=True)
                continue
            for ev in events:
                self._deliver(ev.request_id, ev, final=ev.finished)
