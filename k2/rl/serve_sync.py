"""The rollout server's side of the separate-process weight sync (Kimi K2 report, arXiv 2507.20534 §3.3:
checkpoint-engine style broadcast into the inference engines).

``k2 serve --sync-init URL --sync-rank R --sync-world-size N`` joins a gloo group (``k2.rl.weight_sync.sync_group``)
in which the RL trainer is rank 0 and, in a background thread, receives the metadata once (``k2.rl.weight_sync``)
and then every sync into its engine's model: on the trainer's header the engine is paused (``AsyncEngine.pause``:
no request admitted, no forward), the buckets are received into the model, and the engine resumes. Requests that
arrive while the weights load wait; requests already running keep their cache and continue on the new weights (the
RL trainer syncs only between rollouts, so none of its requests spans a sync).

A failure in the group (the trainer gone, a model that does not fit the trainer's) is kept in ``error`` and handed
to ``on_error``; ``k2 serve`` then stops and reports it.
"""

from __future__ import annotations

import datetime
import threading
from collections.abc import Callable

from k2.infer.async_engine import AsyncEngine
from k2.rl.weight_sync import BroadcastReceiver, sync_group

# A server waits for the trainer's next sync for as long as an RL iteration takes; a dead trainer closes the
# connection (or its child's parent-death signal stops the server) well before this.
GROUP_TIMEOUT = datetime.timedelta(days=7)


class WeightSyncService:
    """Receives the trainer's weights into ``engine``'s model, in a daemon thread started by :meth:`start`."""

    def __init__(
        self,
        engine: AsyncEngine,
        init_method: str,
        rank: int,
        world_size: int,
        *,
        on_ready: Callable[[], None] | None = None,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.engine, self.init_method, self.rank, self.world_size = engine, init_method, rank, world_size
        self.on_ready, self.on_error = on_ready, on_error
        self.version: int | None = None  # the id of the last sync received
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="k2-weight-sync", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            group = sync_group(self.init_method, self.rank, self.world_size, GROUP_TIMEOUT)
            receiver = BroadcastReceiver(self.engine.engine.model, group=group)
            if self.on_ready is not None:
                self.on_ready()
            while (sync_id := receiver.wait()) is not None:
                with self.engine.paused():
                    receiver.load()
                self.version = sync_id
        except Exception as e:  # reported through on_error / error
            self.error = e
            if self.on_error is not None:
                self.on_error(e)
