"""``k2 synth judge``: an LLM judge grades each episode against its task's rubric and keeps only the successes
(Kimi K2 report, arXiv 2507.20534 §3.1.1: trajectories are filtered by an LLM judge against the task rubrics).

An episode that did not end with the agent's answer (stop reason ``step_limit`` or ``empty_reply``, or no final
assistant text) fails by rule, without a request. Every other one gets one ``chat_json`` call at temperature 0
with the task, the rubric and the transcript (tool results labelled with their injected outcome, so the judge can
credit an agent that handles a failure well); the structured verdict is ``{"verdict": "pass" | "fail", "scores":
{"success_criteria", "tool_use", "checkpoints"} (integers 0-10), "reasons": [...]}``. ``kept`` is ``verdict ==
"pass"``; the reasons are stored with every verdict, kept or dropped.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from k2.agentic.backend import ChatBackend, chat_json
from k2.agentic.config import SynthConfig
from k2.agentic.rollouts import ROLLOUTS_FILE
from k2.agentic.stage import StageResult, make_missing, read_store, run_logged
from k2.agentic.store import JsonlStore, derived_seed, stable_id
from k2.agentic.tasks import TASKS_FILE

JUDGEMENTS_FILE = "judgements.jsonl"
SCORES = ("success_criteria", "tool_use", "checkpoints")
SYSTEM = (
    "You are a strict grader of AI assistants that use tools. Judge the conversation against the rubric: pass only "
    "if every success criterion is met, the tool use is sound (right tools, valid arguments, results used "
    "correctly, failures handled honestly) and the checkpoints can be verified. Reply with JSON."
)


def verdict_schema(max_chars: int) -> dict[str, Any]:
    score = {"type": "integer", "minimum": 0, "maximum": 10}
    scores = {"type": "object", "properties": dict.fromkeys(SCORES, score), "required": list(SCORES)}
    scores["additionalProperties"] = False
    reason = {"type": "string", "minLength": 1, "maxLength": max_chars // 2}
    reasons = {"type": "array", "items": reason, "minItems": 1, "maxItems": 4}
    props = {"verdict": {"enum": ["pass", "fail"]}, "scores": scores, "reasons": reasons}
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def transcript(rollout: Mapping[str, Any]) -> str:
    """The episode as numbered lines: who spoke, what was called, what each tool returned (and its outcome)."""
    outcomes = {e["call_id"]: e["outcome"] for e in rollout["metadata"]["outcomes"]}
    lines = []
    for m in rollout["messages"][1:]:
        if m["role"] == "user":
            lines.append(f"USER: {m['content']}")
        elif m["role"] == "assistant":
            if m.get("content"):
                lines.append(f"ASSISTANT: {m['content']}")
            for c in m.get("tool_calls", []):
                lines.append(f"ASSISTANT CALLS {c['function']['name']}({c['function']['arguments']}) [id {c['id']}]")
        elif m["role"] == "tool":
            outcome = outcomes.get(m["tool_call_id"], "?")
            lines.append(f"TOOL RESULT [id {m['tool_call_id']}, injected outcome: {outcome}]: {m['content']}")
    return "\n".join(f"{i + 1}. {line}" for i, line in enumerate(lines))


def judge_prompt(task: Mapping[str, Any], rollout: Mapping[str, Any]) -> list[dict[str, str]]:
    user = (
        f"Task ({task['difficulty']}): {task['task']}\nRubric: {json.dumps(task['rubric'], ensure_ascii=False)}\n\n"
        f"Conversation:\n{transcript(rollout)}\n\nGive your verdict, a 0-10 score per rubric part and your reasons."
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def rule_failure(rollout: Mapping[str, Any]) -> str | None:
    """Why an episode fails without asking the judge (it did not end with the agent's answer), or None."""
    stop = rollout["metadata"]["stop_reason"]
    last = rollout["messages"][-1]
    if stop not in ("user_done", "turn_limit"):
        return f"incomplete episode: {stop}"
    if last["role"] != "assistant" or last.get("tool_calls") or not str(last.get("content") or "").strip():
        return "incomplete episode: no final answer from the assistant"
    return None


def synth_judge(run_dir: Path, backend: ChatBackend, cfg: SynthConfig) -> StageResult:
    """Write a verdict per episode into ``judgements.jsonl`` (resumable)."""
    tasks = {t["id"]: t for t in read_store(run_dir, TASKS_FILE, "judge")}
    rollouts = read_store(run_dir, ROLLOUTS_FILE, "judge")

    def make(record_id: str, rollout: dict[str, Any]) -> dict[str, Any]:
        base = {"rollout_id": rollout["id"]}
        problem = rule_failure(rollout)
        if problem is not None:
            return {**base, "judge": "rules", "verdict": "fail", "scores": None, "reasons": [problem], "kept": False}
        rng = random.Random(derived_seed(cfg.seed, record_id))
        reply = chat_json(
            backend,
            judge_prompt(tasks[rollout["task_id"]], rollout),
            verdict_schema(cfg.max_text_chars),
            name="verdict",
            temperature=0.0,
            max_tokens=cfg.max_tokens,
            seed=rng.randrange(2**31),
        )
        return {**base, "judge": "llm", **reply, "kept": reply["verdict"] == "pass"}

    def body(result: StageResult) -> None:
        with JsonlStore(run_dir / JUDGEMENTS_FILE) as judgements:
            make_missing(
                result, judgements, [(stable_id("judge", r["id"]), r) for r in rollouts], make, cfg.concurrency
            )
            mine = {stable_id("judge", r["id"]) for r in rollouts}
            for j in judgements.records():
                if j["id"] in mine and not j["kept"]:
                    result.dropped[j["reasons"][0] if j["judge"] == "rules" else "judge: fail"] += 1

    return run_logged("judge", run_dir, backend, body)
