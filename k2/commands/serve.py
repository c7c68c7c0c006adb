"""``k2 serve``: an OpenAI-compatible server for a checkpoint (see ``k2.infer.server``).

Listens on loopback by default; there is no authentication, so bind another address only on a trusted network.
Concurrent requests are batched into the engine by its background thread (``--max-batch-size`` at once).

As an RL rollout server (``k2 rl`` with ``rl.rollout = "servers"`` starts these itself): ``--sync-init URL
--sync-rank R --sync-world-size N`` joins the trainer's weight-sync group (the trainer is rank 0) and loads every
weight sync with the engine paused (``k2.rl.serve_sync``); ``--port-file PATH`` writes the base URL once the socket
listens.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from pathlib import Path

from k2.commands._inference_args import add_model_args, set_threads
from k2.errors import K2Error


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a checkpoint over an OpenAI-compatible HTTP API")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port; the URL is printed)")
    p.add_argument("--port-file", metavar="PATH", help="write the server's base URL to PATH once it listens")
    p.add_argument("--model-name", help="the model id clients send (default: the checkpoint directory's name)")
    p.add_argument("--max-batch-size", type=int, default=8, help="requests decoded together")
    p.add_argument("--log-level", default="warning", help="uvicorn log level")
    g = p.add_argument_group("weight sync (RL rollout server)")
    g.add_argument("--sync-init", metavar="URL", help="torch.distributed init method of the trainer's group")
    g.add_argument("--sync-rank", type=int, help="this server's rank in the group (1 .. N-1; the trainer is 0)")
    g.add_argument("--sync-world-size", type=int, help="processes in the group (trainer + servers)")
    p.set_defaults(func=run)


def _check_sync_args(args: argparse.Namespace) -> bool:
    given = [args.sync_init, args.sync_rank, args.sync_world_size]
    if all(v is None for v in given):
        return False
    if any(v is None for v in given):
        raise K2Error("--sync-init, --sync-rank and --sync-world-size go together")
    if not 1 <= args.sync_rank < args.sync_world_size:
        raise K2Error(f"--sync-rank must be in [1, {args.sync_world_size - 1}] (the trainer is rank 0)")
    return True


def _write_atomic(path: str, text: str) -> None:
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run(args: argparse.Namespace) -> int:
    from k2.infer import Engine
    from k2.infer.async_engine import AsyncEngine
    from k2.infer.loading import load_checkpoint
    from k2.infer.server import create_app, serve

    if args.max_batch_size < 1:
        raise ValueError(f"--max-batch-size must be >= 1, got {args.max_batch_size}")
    syncing = _check_sync_args(args)
    set_threads(args)
    model, tokenizer = load_checkpoint(args.checkpoint, tokenizer=args.tokenizer, dtype=args.dtype, device=args.device)
    engine = AsyncEngine(Engine(model, tokenizer, max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len))
    name = args.model_name or Path(args.checkpoint).resolve().name
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"k2 serve: warning: listening on {args.host} without authentication", file=sys.stderr)

    sync, stop = None, threading.Event()
    if syncing:
        from k2.rl.serve_sync import WeightSyncService

        sync = WeightSyncService(
            engine,
            args.sync_init,
            args.sync_rank,
            args.sync_world_size,
            on_ready=lambda: print(
                f"k2 serve: joined the weight-sync group as rank {args.sync_rank} of {args.sync_world_size}",
                flush=True,
            ),
            on_error=lambda _: stop.set(),  # the server stops; the error is reported below
        )
        sync.start()

    def ready(url: str) -> None:
        if args.port_file:
            _write_atomic(args.port_file, url + "\n")
        print(f"k2 serve: model {name!r} at {url}/v1 (OpenAI-compatible; Ctrl-C stops)", flush=True)

    try:
        serve(create_app(engine, name), args.host, args.port, on_ready=ready, log_level=args.log_level, stop=stop)
    finally:
        engine.shutdown()
    if sync is not None and sync.error is not None:
        raise K2Error(f"weight sync failed: {sync.error}")
    return 0
