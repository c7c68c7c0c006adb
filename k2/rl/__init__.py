"""Reinforcement learning for k2 (Kimi K2, arXiv 2507.20534 §3.2): ``k2.rl.rewards`` (the verifiable rewards gym
and the self-critique rubric reward) and ``k2.rl.sandbox`` (running untrusted code for the code rewards).

Submodules load on first use, so ``import k2.rl`` stays cheap."""

from __future__ import annotations

import importlib
from typing import Any

# The RL loop (``k2 rl``): the K1.5 loss, environments, rollouts, weight sync, the loop; names → their module.
_EXPORTS = {
    "k15_loss": "loss",
    "ptx_loss": "loss",
    "length_penalty": "loss",
    "ChatEnv": "env",
    "Problem": "env",
    "ArithmeticTask": "tasks",
    "exact_answer_reward": "tasks",
    "Trajectory": "rollout",
    "ReplayBuffer": "rollout",
    "ColocatedSync": "weight_sync",
    "BroadcastSender": "weight_sync",
    "BroadcastReceiver": "weight_sync",
    "sync_group": "weight_sync",
    "RolloutServers": "remote",
    "RemoteEngine": "remote",
    "RLConfig": "config",
    "train": "loop",
}
_SUBMODULES = (
    "rewards",
    "sandbox",
    "loss",
    "env",
    "tasks",
    "rollout",
    "weight_sync",
    "remote",
    "serve_sync",
    "config",
    "loop",
)
__all__ = [*_SUBMODULES, *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"k2.rl.{name}")
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"k2.rl.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'k2.rl' has no attribute {name!r}")
