"""Rollouts on separate ``k2 serve`` processes (``rl.rollout = "servers"``): the separate-process engines of the Kimi
K2 report (arXiv 2507.20534 §3.3), on loopback.

- :class:`RolloutServers` launches ``rl.rollout_servers`` ``k2 serve`` processes of the starting checkpoint (port 0,
  the URL read from a port file, logs in ``RUN_DIR/servers/``), forms a gloo group with them (``sync_group``, not
  the default group; the trainer is rank 0, ``file://`` rendezvous in a fresh directory), sends the metadata once
  (``k2.rl.weight_sync.BroadcastSender``) and then the trainer's weights on every :meth:`RolloutServers.sync` (the
  servers load them with their engine paused, ``k2.rl.serve_sync``). :meth:`RolloutServers.close` ends the group and
  stops the processes (killed if they do not stop within seconds); on Linux each server also gets a parent-death
  signal, so it goes when the trainer is killed.
- :class:`RemoteEngine` is the engine interface of ``k2.rl.rollout`` (``add_request`` / ``step`` / ``abort``) over
  the servers' ``/v1/completions``: the prompt goes as token ids, the answer comes back as token ids
  (``return_tokens_as_token_ids``) with the model's log-prob of each, so the trainer learns from the exact ids the
  server sampled. Requests go to the server with the fewest in flight; :meth:`RemoteEngine.step` waits for at least
  one to finish and reports all its tokens at once.

Partial rollouts (``rl.rollout_budget > 0``) need each paused request's sampling-generator state, which the HTTP
protocol does not carry, so ``rl.rollout = "servers"`` refuses them (``k2.rl.config``).
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from datetime import timedelta
from pathlib import Path
from typing import Any

from torch import nn

from k2.errors import K2Error
from k2.infer.engine import SamplingParams, TokenEvent
from k2.rl.weight_sync import DEFAULT_BUCKET_BYTES, BroadcastSender, sync_group

MODEL_NAME = "policy"
START_TIMEOUT_S = 600.0  # a server loads its checkpoint and listens within this
STOP_GRACE_S = 10.0  # then SIGKILL
REQUEST_TIMEOUT_S = 3600.0


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent (the trainer) dies (Linux ``PR_SET_PDEATHSIG``)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG


class RolloutServers:
    """``num_servers`` ``k2 serve`` processes of ``checkpoint`` in a weight-sync group with this process's
    ``model``; ``engine`` sends rollouts to them. Use as a context manager (or call :meth:`close`)."""

    def __init__(
        self,
        checkpoint: str | Path,
        model: nn.Module,
        num_servers: int,
        log_dir: Path,
        *,
        device: str = "cpu",
        threads: int = 1,
        max_batch_size: int = 8,
        max_seq_len: int = 4096,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    ) -> None:
        self.procs: list[subprocess.Popen] = []
        self.engine: RemoteEngine | None = None
        self.syncs = 0
        self._sender: BroadcastSender | None = None
        self._rendezvous = tempfile.mkdtemp(prefix="k2-sync-")
        init = f"file://{self._rendezvous}/init"
        log_dir.mkdir(parents=True, exist_ok=True)
        port_files = [log_dir / f"server{r}.url" for r in range(1, num_servers + 1)]
        try:
            for rank, port_file in enumerate(port_files, start=1):
                port_file.unlink(missing_ok=True)
                cmd = [sys.executable, "-m", "k2.cli", "serve", str(checkpoint), "--port", "0"]
                cmd += ["--port-file", str(port_file), "--model-name", MODEL_NAME, "--device", device]
                cmd += ["--threads", str(threads), "--max-batch-size", str(max_batch_size)]
                cmd += ["--max-seq-len", str(max_seq_len), "--sync-init", init, "--sync-rank", str(rank)]
                cmd += ["--sync-world-size", str(num_servers + 1)]
                with open(log_dir / f"server{rank}.log", "w") as log:
                    self.procs.append(
                        subprocess.Popen(
                            cmd,
                            stdout=log,
                            stderr=subprocess.STDOUT,
                            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
                        )
                    )
            urls = self._wait_for_urls(port_files, log_dir)
            group = sync_group(init, 0, num_servers + 1, timedelta(seconds=START_TIMEOUT_S))
            self._sender = BroadcastSender(model, group=group, bucket_bytes=bucket_bytes)
        except BaseException:
            self.close(graceful=False)
            raise
        self.engine = RemoteEngine(urls, max_batch_size=max_batch_size, max_seq_len=max_seq_len)

    def _wait_for_urls(self, port_files: list[Path], log_dir: Path) -> list[str]:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not all(f.is_file() for f in port_files):
            for rank, proc in enumerate(self.procs, start=1):
                if proc.poll() is not None:
                    tail = (log_dir / f"server{rank}.log").read_text(errors="replace").strip().splitlines()[-1:]
                    raise K2Error(
                        f"rollout server {rank} exited with code {proc.returncode} before listening"
                        f"{': ' + tail[0] if tail else ''} (log: {log_dir / f'server{rank}.log'})"
                    )
            if time.monotonic() > deadline:
                raise K2Error(f"rollout servers did not start within {START_TIMEOUT_S:.0f} s (logs: {log_dir})")
            time.sleep(0.1)
        return [f.read_text().strip() + "/v1" for f in port_files]

    def sync(self) -> None:
        """Broadcast the trainer's current weights; returns once every server computes with them."""
        self._sender.sync(self.syncs)
        self.syncs += 1

    def close(self, *, graceful: bool = True) -> None:
        """End the group (``graceful``: tell the servers first) and stop the processes."""
        try:
            if self._sender is not None and graceful:
                self._sender.close()
        finally:
            self._sender = None  # its group goes with it
            if self.engine is not None:
                self.engine.close()
            for proc in self.procs:
                if proc.poll() is None:
                    proc.terminate()
            deadline = time.monotonic() + STOP_GRACE_S
            for proc in self.procs:
                try:
                    proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            shutil.rmtree(self._rendezvous, ignore_errors=True)

    def __enter__(self) -> RolloutServers:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(graceful=exc_type is None)


class RemoteEngine:
    """``add_request`` / ``step`` / ``abort`` (``k2.rl.rollout``'s engine interface) over ``/v1/completions`` of the
    servers at ``urls`` (base URLs ending in ``/v1``)."""

    def __init__(self, urls: Sequence[str], *, max_batch_size: int = 8, max_seq_len: int = 4096) -> None:
        self.urls = list(urls)
        self.max_seq_len = max_seq_len
        self._pool = ThreadPoolExecutor(len(self.urls) * max_batch_size, thread_name_prefix="k2-rollout")
        self._ids = itertools.count()
        self._load = [0] * len(self.urls)  # requests in flight per server
        self._running: dict[str, tuple[Future, int]] = {}

    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams) -> str:
        if params.grammar is not None:
            raise K2Error("RemoteEngine: grammars are not sent to rollout servers")
        body = {
            "model": MODEL_NAME,
            "prompt": [int(t) for t in prompt_ids],
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": params.top_k,
            "seed": params.seed,
            "stop": list(params.stop),
            "stop_token_ids": list(params.stop_token_ids),
            "logprobs": 0,
            "return_tokens_as_token_ids": True,
        }
        server = min(range(len(self.urls)), key=self._load.__getitem__)
        self._load[server] += 1
        request_id = f"remote-{next(self._ids)}"
        self._running[request_id] = (self._pool.submit(_post, f"{self.urls[server]}/completions", body), server)
        return request_id

    def abort(self, request_id: str) -> bool:
        """Forget a request (its answer, if it comes, is dropped)."""
        found = self._running.pop(request_id, None)
        if found is not None:
            found[0].cancel()
            self._load[found[1]] -= 1
        return found is not None

    def has_unfinished(self) -> bool:
        return bool(self._running)

    def step(self) -> list[TokenEvent]:
        """Wait for at least one request to finish; all tokens of every finished request, in order."""
        if not self._running:
            return []
        futures = {future: rid for rid, (future, _) in self._running.items()}
        done, _ = wait(futures, return_when=FIRST_COMPLETED)
        events = []
        for future in done:
            request_id = futures[future]
            self._load[self._running.pop(request_id)[1]] -= 1
            choice = future.result()["choices"][0]
            lp = choice["logprobs"]
            ids = [int(t.removeprefix("token_id:")) for t in lp["tokens"]]
            for i, (token, logprob) in enumerate(zip(ids, lp["token_logprobs"], strict=True)):
                reason = choice["finish_reason"] if i == len(ids) - 1 else None
                events.append(TokenEvent(request_id, token, float(logprob), [], "", reason))
        return events

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")
        with contextlib.suppress(ValueError, KeyError, TypeError):  # not an OpenAI-shaped error: keep the body
            detail = json.loads(detail)["error"]["message"]
        raise K2Error(f"rollout server {url}: HTTP {e.code}: {detail}") from None
    except OSError as e:
        raise K2Error(f"rollout server {url}: {e}") from None
