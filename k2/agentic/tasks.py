"""``k2 synth tasks``: per agent, tasks from simple to complex, each with a rubric (Kimi K2 report, arXiv
2507.20534 §3.1.1: every task comes with a rubric of success criteria, expected tool-use patterns and checkpoints).

Task ``k`` of an agent's ``n`` gets level ``k · len(LEVELS) // n`` (so the first is simple and, with three or more,
the last is complex). The reply schema ties the rubric to the agent: ``expected_tool_calls`` names only the agent's
tools (an ``enum``) and has as many entries as the level asks for.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from k2.agentic.agents import AGENTS_FILE
from k2.agentic.backend import ChatBackend, chat_json
from k2.agentic.config import SynthConfig
from k2.agentic.stage import StageResult, make_missing, read_store, run_logged
from k2.agentic.store import JsonlStore, derived_seed, stable_id

TASKS_FILE = "tasks.jsonl"
SYSTEM = "You write realistic user tasks and grading rubrics for evaluating tool-using AI assistants. Reply with JSON."

# (level, what such a task asks for, fewest and most expected tool calls)
LEVELS: tuple[tuple[str, str, int, int], ...] = (
    ("simple", "one clear request that one tool call answers", 1, 1),
    ("multi-step", "a request that needs two or three tool calls, where a later call uses an earlier result", 2, 3),
    ("complex", "a goal that needs several calls across the tools, with dependencies between them", 3, 5),
)


def level_of(k: int, n: int) -> tuple[str, str, int, int]:
    return LEVELS[k * len(LEVELS) // n]


def task_schema(tool_names: list[str], lo: int, hi: int, max_chars: int) -> dict[str, Any]:
    def text(n: int) -> dict[str, Any]:
        return {"type": "string", "minLength": 1, "maxLength": n}

    def obj(props: dict[str, Any]) -> dict[str, Any]:
        return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}

    def array(items: dict[str, Any], a: int, b: int) -> dict[str, Any]:
        return {"type": "array", "items": items, "minItems": a, "maxItems": b}

    call = obj({"name": {"enum": tool_names}, "purpose": text(max_chars // 2)})
    short = text(max_chars // 2)
    rubric = obj(
        {
            "success_criteria": array(short, 1, 3),
            "expected_tool_calls": array(call, lo, hi),
            "checkpoints": array(short, 1, 3),
        }
    )
    return obj({"task": text(max_chars), "rubric": rubric})


def task_prompt(agent: dict[str, Any], level: tuple[str, str, int, int], index: int) -> list[dict[str, str]]:
    name, what, lo, hi = level
    tools = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in agent["tools"])
    calls = f"{lo}" if lo == hi else f"{lo} to {hi}"
    user = (
        f"Assistant: {agent['name']}\nSystem prompt: {agent['system_prompt']}\nTools:\n{tools}\n\n"
        f"Write task #{index + 1} for this assistant, of difficulty '{name}': {what}. State it as what a user wants, "
        "with the concrete details (names, dates, amounts) the user knows. Then its rubric: success criteria, the "
        f"{calls} tool calls a good assistant makes (tool name and purpose, in order), and checkpoints a grader "
        "can verify in the conversation."
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def synth_tasks(run_dir: Path, backend: ChatBackend, cfg: SynthConfig) -> StageResult:
    """Write ``cfg.tasks_per_agent`` tasks per agent into ``tasks.jsonl`` (resumable)."""
    agents = read_store(run_dir, AGENTS_FILE, "tasks")

    def make(record_id: str, where: tuple[dict[str, Any], int]) -> dict[str, Any]:
        agent, k = where
        rng = random.Random(derived_seed(cfg.seed, record_id))
        level = level_of(k, cfg.tasks_per_agent)
        names = [t["function"]["name"] for t in agent["tools"]]
        reply = chat_json(
            backend,
            task_prompt(agent, level, k),
            task_schema(names, level[2], level[3], cfg.max_text_chars),
            name="task",
            temperature=cfg.temperature,
            max_tokens=cfg.max_tokens,
            seed=rng.randrange(2**31),
        )
        return {"agent_id": agent["id"], "index": k, "difficulty": level[0], **reply}

    def body(result: StageResult) -> None:
        n = cfg.tasks_per_agent
        items = [(stable_id("task", a["id"], k, n), (a, k)) for a in agents for k in range(n)]
        with JsonlStore(run_dir / TASKS_FILE) as tasks:
            make_missing(result, tasks, items, make, cfg.concurrency)

    return run_logged("tasks", run_dir, backend, body)
