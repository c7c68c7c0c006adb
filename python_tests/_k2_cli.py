"""The `k2` command as the CLI tests drive it: a subprocess per command, its run's metrics, a run killed mid-way."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from k2.train.metrics import read_metrics

ENV = {**os.environ, "K2_DEBUG": ""}


def k2(*args: str | Path, **kw) -> subprocess.CompletedProcess:
    """``python -m k2.cli ARGS`` to completion (one-line errors, no tracebacks), output captured."""
    return subprocess.run(
        [sys.executable, "-m", "k2.cli", *map(str, args)], capture_output=True, text=True, env=ENV, timeout=300, **kw
    )


def losses(run: Path, kind: str = "train", key: str = "loss") -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in read_metrics(run) if r["kind"] == kind]


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file's bytes under ``directory``: to show a failed command changed nothing."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def kill_at_step(args: list[str | Path], run: Path, step: int) -> None:
    """Start ``k2 ARGS`` writing into ``run`` and SIGKILL it once its metrics reach ``step`` (fails the test if the
    run ends first)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "k2.cli", *map(str, args)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").exists() and any(s >= step for s, _ in losses(run)):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.returncode != -signal.SIGKILL:
        pytest.fail(f"the run ended (rc {proc.returncode}) before it could be killed at step {step}")
