"""Wall-clock timing shared by the kernel benchmarks: the fastest of several runs, synchronising CUDA around each."""

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
