"""Shared by the kernel benchmarks: wall-clock timing (the fastest of several runs, synchronising CUDA around each)
and the one-line-per-row table they print."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one run of ``fn``, with the device synchronised before and after (CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def best_time(fn: Callable[[], object], device: torch.device, repeat: int, warmup: int = 2) -> float:
    """Fastest of ``repeat`` runs of ``fn`` after ``warmup`` untimed ones, in seconds (the run least disturbed by
    other work on a shared machine)."""
    for _ in range(warmup):
        fn()
    return min(time_once(fn, device) for _ in range(repeat))


def print_rows(rows: list[dict], *, op_width: int, digits: int = 3) -> None:
    """One line per row: ``op`` and ``shape`` in fixed-width columns, then ``key=value`` for the other fields."""
    for row in rows:
        cells = [f"{row['op']:<{op_width}}", f"{row['shape']:<36}"]
        for key, value in row.items():
            if key not in ("op", "shape"):
                cells.append(f"{key}={value:.{digits}f}" if isinstance(value, float) else f"{key}={value}")
        print("  ".join(cells), flush=True)
