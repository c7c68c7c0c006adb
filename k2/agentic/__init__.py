"""Agentic data synthesis and pre-training text rephrasing (Kimi K2 report, arXiv 2507.20534 §3.1.1 and §2.2).

``k2.agentic.backend``: chat back ends (any OpenAI-compatible server, or a k2 checkpoint in process) with retries,
timeouts and token accounting; ``k2.agentic.store``: resumable per-stage JSONL files with stable record ids;
``k2.agentic.pipeline``: the ``k2 synth`` stages (``STAGES``: tools, agents, tasks, rollouts, judge, export), each a
function ``(run_dir, backend, SynthConfig)``; ``k2.agentic.rephrase``: ``k2 rephrase``.
"""

from k2.agentic.backend import (
    BackendError,
    ChatBackend,
    ChatReply,
    EngineBackend,
    OpenAIBackend,
    chat_json,
    make_backend,
    map_concurrent,
)
from k2.agentic.config import SynthConfig
from k2.agentic.pipeline import STAGES, run_stages
from k2.agentic.store import JsonlStore, derived_seed, stable_id

__all__ = [
    "STAGES",
    "BackendError",
    "ChatBackend",
    "ChatReply",
    "EngineBackend",
    "JsonlStore",
    "OpenAIBackend",
    "SynthConfig",
    "chat_json",
    "derived_seed",
    "make_backend",
    "map_concurrent",
    "run_stages",
    "stable_id",
]
