"""``k2 synth agents``: agents, each a system prompt over a seeded subset of the tool repository (Kimi K2 report,
arXiv 2507.20534 §3.1.1: many agents, made by pairing synthesised system prompts with different tool combinations).

Agent ``i`` draws its tools from its own generator (``derived_seed(seed, agent id)``): a size in ``[min_tools,
max_tools]`` (capped by the repository), an anchor tool, then tools of the anchor's domain, then of its category,
then any other, each group shuffled; so an agent's tools mostly belong together, as the tools of one application
do, with some mixing. The LLM writes the agent's name and system prompt for those tools (``chat_json``).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from k2.agentic.backend import ChatBackend, chat_json
from k2.agentic.config import SynthConfig
from k2.agentic.evolve import TOOLS_FILE
from k2.agentic.stage import StageResult, make_missing, read_store, run_logged
from k2.agentic.store import JsonlStore, derived_seed, stable_id

AGENTS_FILE = "agents.jsonl"
SYSTEM = "You write system prompts for AI assistants that call tools. Reply with JSON only."


def agent_schema(max_chars: int) -> dict[str, Any]:
    text = {"type": "string", "minLength": 1}
    props = {"name": {**text, "maxLength": min(60, max_chars)}, "system_prompt": {**text, "maxLength": max_chars}}
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def pick_tools(tools: list[dict[str, Any]], rng: random.Random, lo: int, hi: int) -> list[dict[str, Any]]:
    """A subset of the tool records ``tools`` (see the module docstring), in the repository's order."""
    k = min(rng.randint(lo, hi), len(tools))
    anchor = rng.choice(tools)
    groups: list[list[int]] = [[], [], []]
    for i, t in enumerate(tools):
        if t is anchor:
            continue
        same_domain = t["domain"] is not None and t["domain"] == anchor["domain"]
        same_category = t["category"] is not None and t["category"] == anchor["category"]
        groups[0 if same_domain else 1 if same_category else 2].append(i)
    order = [tools.index(anchor)]
    for g in groups:
        rng.shuffle(g)
        order += g
    return [tools[i] for i in sorted(order[:k])]


def agent_prompt(tools: list[dict[str, Any]]) -> list[dict[str, str]]:
    listing = "\n".join(json.dumps(t["tool"]["function"], ensure_ascii=False) for t in tools)
    user = (
        f"An AI assistant is deployed with these tools (OpenAI function specs):\n{listing}\n\n"
        "Give the assistant a short name and write its system prompt: who it serves, what it helps with using these "
        "tools, and how it should behave (ask for missing details, confirm before actions with side effects, report "
        "tool failures honestly). Do not list the tools' JSON again."
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def synth_agents(run_dir: Path, backend: ChatBackend, cfg: SynthConfig) -> StageResult:
    """Write ``cfg.num_agents`` agents into ``agents.jsonl`` (resumable)."""
    tools = read_store(run_dir, TOOLS_FILE, "agents")

    def make(record_id: str, index: int) -> dict[str, Any]:
        rng = random.Random(derived_seed(cfg.seed, record_id))
        chosen = pick_tools(tools, rng, cfg.min_tools, cfg.max_tools)
        reply = chat_json(
            backend,
            agent_prompt(chosen),
            agent_schema(cfg.max_text_chars),
            name="agent",
            temperature=cfg.temperature,
            max_tokens=cfg.max_tokens,
            seed=rng.randrange(2**31),
        )
        return {
            "index": index,
            "name": reply["name"],
            "system_prompt": reply["system_prompt"],
            "tool_ids": [t["id"] for t in chosen],
            "tools": [t["tool"] for t in chosen],
        }

    def body(result: StageResult) -> None:
        with JsonlStore(run_dir / AGENTS_FILE) as agents:
            items = [(stable_id("agent", i), i) for i in range(cfg.num_agents)]
            make_missing(result, agents, items, make, cfg.concurrency)

    return run_logged("agents", run_dir, backend, body)
