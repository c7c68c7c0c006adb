"""``k2 synth rollouts``: multi-turn episodes of the simulated user, the agent and the tool simulator (Kimi K2
report, arXiv 2507.20534 §3.1.1, "trajectory generation").

An episode (one per task and ``rollouts_per_task`` index, generator ``derived_seed(seed, rollout id)``):
- the user simulator gets a persona and a style drawn for the episode, and writes the first message from the task;
- the agent (the back end with the agent's system prompt and tools, ``tool_choice="auto"``) replies; while it calls
  tools, each call is answered by the tool simulator (validated, outcome drawn, result from the world model) and
  the agent replies again, at most ``max_steps`` replies per user turn;
- when the agent answers in text, the user simulator reads the dialogue and either writes the next message or says
  it is done.

Stop conditions (``metadata.stop_reason``): ``user_done``; ``turn_limit`` (``max_turns`` user messages answered);
``step_limit`` (the agent still calling tools after ``max_steps`` replies); ``empty_reply`` (neither text nor a
call). Only the first two end with an assistant answer; the judge drops the others. A back-end failure anywhere
fails the whole episode (counted, not written, retried by the next run).

The record is the OpenAI chat conversation (``messages`` with the agent's system prompt first, ``tools``) plus
``metadata``: agent and task ids, difficulty, persona and style, each tool call's injected outcome
(``success`` / ``partial_failure`` / ``edge_case`` / ``error``, or ``invalid`` with the reason), counts, the stop
reason and the final world state.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from k2.agentic.agents import AGENTS_FILE
from k2.agentic.backend import ChatBackend
from k2.agentic.config import SynthConfig
from k2.agentic.simulators import ToolSimulator, sample_profile, user_turn
from k2.agentic.stage import StageResult, make_missing, read_store, run_logged
from k2.agentic.store import JsonlStore, derived_seed, stable_id
from k2.agentic.tasks import TASKS_FILE

ROLLOUTS_FILE = "rollouts.jsonl"


def _assistant_message(content: str, calls: list[dict[str, Any]], used_ids: set[str]) -> dict[str, Any]:
    """The agent's reply as a chat message; call ids made unique within the episode (``call_N`` if needed)."""
    msg: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        msg["tool_calls"] = []
        for call in calls:
            call_id = call.get("id")
            if not isinstance(call_id, str) or not call_id or call_id in used_ids:
                call_id = f"call_{len(used_ids)}"
            used_ids.add(call_id)
            fn = call["function"]
            msg["tool_calls"].append(
                {"id": call_id, "type": "function", "function": {"name": fn["name"], "arguments": fn["arguments"]}}
            )
    return msg


def run_episode(
    backend: ChatBackend, agent: Mapping[str, Any], task: Mapping[str, Any], cfg: SynthConfig, rng: random.Random
) -> dict[str, Any]:
    """One episode (see the module docstring): ``messages``, ``tools`` and ``metadata``."""
    gen = {"temperature": cfg.temperature, "max_tokens": cfg.max_tokens}
    profile = sample_profile(rng)
    sim = ToolSimulator(backend, agent["tools"], cfg.outcome_rates, rng, cfg.max_text_chars, **gen)
    messages: list[dict[str, Any]] = [{"role": "system", "content": agent["system_prompt"]}]
    used_ids: set[str] = set()
    stop, user_turns = "turn_limit", 0
    while stop == "turn_limit" and user_turns < cfg.max_turns:
        text, done = user_turn(
            backend, task["task"], profile, messages[1:], max_chars=cfg.max_text_chars, seed=rng.randrange(2**31), **gen
        )
        if done:
            stop = "user_done"
            break
        messages.append({"role": "user", "content": text})
        user_turns += 1
        for _ in range(cfg.max_steps):
            reply = backend.chat(messages, tools=agent["tools"], tool_choice="auto", seed=rng.randrange(2**31), **gen)
            msg = _assistant_message(reply.content, reply.tool_calls, used_ids)
            messages.append(msg)
            if not msg.get("tool_calls"):
                if not reply.content.strip():
                    stop = "empty_reply"
                break
            for call in msg["tool_calls"]:
                messages.append({"role": "tool", "tool_call_id": call["id"], "content": sim.execute(call)})
        else:
            stop = "step_limit"
    events = sim.events
    metadata = {
        "agent_id": agent["id"],
        "task_id": task["id"],
        "difficulty": task["difficulty"],
        **profile,
        "outcomes": events,
        "tool_calls": len(events),
        "invalid_calls": sum(e["outcome"] == "invalid" for e in events),
        "user_turns": user_turns,
        "stop_reason": stop,
        "state": sim.state,
    }
    return {"messages": messages, "tools": agent["tools"], "metadata": metadata}


def synth_rollouts(run_dir: Path, backend: ChatBackend, cfg: SynthConfig) -> StageResult:
    """Write ``cfg.rollouts_per_task`` episodes per task into ``rollouts.jsonl`` (resumable)."""
    agents = {a["id"]: a for a in read_store(run_dir, AGENTS_FILE, "rollouts")}
    tasks = read_store(run_dir, TASKS_FILE, "rollouts")

    def make(record_id: str, where: tuple[dict[str, Any], int]) -> dict[str, Any]:
        task, r = where
        rng = random.Random(derived_seed(cfg.seed, record_id))
        return {"task_id": task["id"], "index": r, **run_episode(backend, agents[task["agent_id"]], task, cfg, rng)}

    def body(result: StageResult) -> None:
        items = [(stable_id("rollout", t["id"], r), (t, r)) for t in tasks for r in range(cfg.rollouts_per_task)]
        with JsonlStore(run_dir / ROLLOUTS_FILE) as rollouts:
            make_missing(result, rollouts, items, make, cfg.concurrency)

    return run_logged("rollouts", run_dir, backend, body)
