"""Reinforcement learning for k2 (Kimi K2, arXiv 2507.20534 §3.2): ``k2.rl.rewards`` (the verifiable rewards gym
and the self-critique rubric reward) and ``k2.rl.sandbox`` (running untrusted code for the code rewards).

Submodules load on first use, so ``import k2.rl`` stays cheap."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["rewards", "sandbox"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return importlib.import_module(f"k2.rl.{name}")
    raise AttributeError(f"module 'k2.rl' has no attribute {name!r}")
