"""The two simulators of a synthetic episode (Kimi K2 report, arXiv 2507.20534 §3.1.1): an LLM user with a persona
and a communication style, and a tool simulator that stands in for executing the tools: it keeps the episode's
state and injects controlled randomness, so calls succeed, partly fail or hit edge cases.

Tool simulator, per call:
1. the call is checked against its tool's JSON Schema (``k2.agentic.tools.check_call``): an unknown tool,
   arguments that are not a JSON object or that violate the schema give an error result the agent sees, and the
   call is never "executed" (no outcome drawn, no LLM request);
2. a valid call's outcome is drawn from the configured rates with the episode's seeded generator
   (:func:`draw_outcome`: one uniform draw against the cumulative rates of ``OUTCOMES``);
3. the LLM, as a world model, writes the tool's output for that outcome from the tool spec, the arguments and the
   episode state (a ``dict`` of facts), and returns updates to the state (:func:`simulate_tool` takes the state and
   returns the new one; it never mutates its input).
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from k2.agentic.backend import ChatBackend, chat_json
from k2.agentic.config import OUTCOMES
from k2.agentic.tools import check_call, schemas_by_name

PERSONAS = (
    "a busy small-business owner",
    "a retired teacher who is new to technology",
    "a software engineer who wants precise answers",
    "a university student on a tight budget",
    "a parent organising things for a family",
    "a non-native English speaker",
    "a project manager juggling deadlines",
    "a cautious person who double-checks everything",
    "a travel enthusiast planning ahead",
    "a customer who has had a bad experience before",
)
STYLES = (
    "terse: short messages, no pleasantries",
    "chatty: friendly, adds context and small talk",
    "vague at first: leaves out details until asked",
    "formal and polite",
    "impatient: wants results quickly",
    "step by step: gives one piece of information at a time",
)
OUTCOME_GUIDE = {
    "success": "The call succeeds: return a complete, realistic result.",
    "partial_failure": "The call partly fails: return an incomplete result (some items or fields missing, part of "
    "an action not done) that says what is missing.",
    "edge_case": "Return an edge case: an empty result, no match, several ambiguous matches, a boundary value, or "
    "data that needs clarification from the user.",
    "error": "The call fails: return an error object (a code and a message) such as a timeout, permission denied, "
    "a rate limit or an invalid state.",
}


def _obj(props: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def _text(n: int, lo: int = 1) -> dict[str, Any]:
    return {"type": "string", "minLength": lo, "maxLength": n}


def user_schema(max_chars: int) -> dict[str, Any]:
    return _obj({"message": _text(max_chars), "done": {"type": "boolean"}})


def tool_result_schema(max_chars: int) -> dict[str, Any]:
    update = _obj({"key": _text(min(40, max_chars)), "value": _text(min(100, max_chars), lo=0)})
    return _obj({"output": _text(max_chars), "state_updates": {"type": "array", "items": update, "maxItems": 4}})


def sample_profile(rng: random.Random) -> dict[str, str]:
    return {"persona": rng.choice(PERSONAS), "style": rng.choice(STYLES)}


def draw_outcome(rng: random.Random, rates: Mapping[str, float]) -> str:
    """One of ``OUTCOMES`` with probability ``rates[outcome]`` (rates sum to 1): one ``rng.random()`` draw."""
    u, acc = rng.random(), 0.0
    for outcome in OUTCOMES:
        acc += rates[outcome]
        if u < acc:
            return outcome
    return next(o for o in reversed(OUTCOMES) if rates[o] > 0)  # u beyond a sum rounded below 1


def user_turn(
    backend: ChatBackend,
    task: str,
    profile: Mapping[str, str],
    dialog: Sequence[Mapping[str, Any]],
    *,
    max_chars: int,
    temperature: float,
    max_tokens: int,
    seed: int,
) -> tuple[str, bool]:
    """The simulated user's next message and whether they are done. ``dialog`` is the episode so far (user and
    assistant messages; tool traffic is invisible to the user); the simulator sees it with roles swapped."""
    system = (
        f"You play a user talking to an AI assistant. You are {profile['persona']}; your style is "
        f"{profile['style']}. Your goal: {task}\nYou know the details in the goal and reveal them when they are "
        "needed. Write only your next message to the assistant. Set done to true once the goal is met or the "
        "assistant clearly cannot help further."
    )
    messages: list[dict[str, str]] = [{"role": "system", "content": system}]
    for m in dialog:
        if m["role"] == "user":
            messages.append({"role": "assistant", "content": m["content"]})
        elif m["role"] == "assistant" and m.get("content"):
            messages.append({"role": "user", "content": m["content"]})
    if len(messages) == 1:
        messages.append({"role": "user", "content": "(Start the conversation with your first message.)"})
    reply = chat_json(
        backend,
        messages,
        user_schema(max_chars),
        name="user_turn",
        temperature=temperature,
        max_tokens=max_tokens,
        seed=seed,
    )
    return reply["message"], bool(reply["done"]) and len(dialog) > 0


def simulate_tool(
    backend: ChatBackend,
    function: Mapping[str, Any],
    arguments: Mapping[str, Any],
    state: Mapping[str, str],
    outcome: str,
    *,
    max_chars: int,
    temperature: float,
    max_tokens: int,
    seed: int,
) -> tuple[str, dict[str, str]]:
    """``(output, new state)`` of a valid call with the given outcome, written by the LLM world model."""
    system = (
        "You simulate the back end of a software tool so that an AI assistant can be trained on realistic tool "
        "results. Keep the world consistent: your output must agree with the episode state (facts created or "
        "changed by earlier calls). Reply with JSON: output is the tool's return value as the real API would send "
        "it (JSON text); state_updates are the facts this call creates or changes (an empty value removes a key)."
    )
    user = (
        f"Tool: {json.dumps(function, ensure_ascii=False)}\nArguments: {json.dumps(arguments, ensure_ascii=False)}\n"
        f"Episode state: {json.dumps(state, ensure_ascii=False, sort_keys=True)}\n"
        f"Outcome to produce: {outcome}. {OUTCOME_GUIDE[outcome]}"
    )
    reply = chat_json(
        backend,
        [{"role": "system", "content": system}, {"role": "user", "content": user}],
        tool_result_schema(max_chars),
        name="tool_result",
        temperature=temperature,
        max_tokens=max_tokens,
        seed=seed,
    )
    new_state = dict(state)
    for u in reply["state_updates"]:
        if u["value"]:
            new_state[u["key"]] = u["value"]
        else:
            new_state.pop(u["key"], None)
    return reply["output"], new_state


@dataclass
class ToolSimulator:
    """The tools of one episode: validates each call, draws its outcome, asks the world model, keeps the state."""

    backend: ChatBackend
    tools: Sequence[Mapping[str, Any]]  # OpenAI function tools
    rates: Mapping[str, float]
    rng: random.Random
    max_chars: int
    temperature: float
    max_tokens: int
    state: dict[str, str] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)  # per call: tool, call id, outcome (and why invalid)

    def __post_init__(self) -> None:
        self._schemas = schemas_by_name(self.tools)
        self._functions = {t["function"]["name"]: t["function"] for t in self.tools}

    def execute(self, call: Mapping[str, Any]) -> str:
        """The content of the ``tool`` message answering ``call``."""
        checked = check_call(self._schemas, call)
        name = call.get("function", {}).get("name") if isinstance(call, Mapping) else None
        if isinstance(checked, str):
            self.events.append({"tool": name, "call_id": call.get("id"), "outcome": "invalid", "reason": checked})
            return json.dumps({"error": "invalid_arguments", "message": checked}, ensure_ascii=False)
        name, args = checked
        outcome = draw_outcome(self.rng, self.rates)
        output, self.state = simulate_tool(
            self.backend,
            self._functions[name],
            args,
            self.state,
            outcome,
            max_chars=self.max_chars,
            temperature=self.temperature,
            max_tokens=self.max_tokens,
            seed=self.rng.randrange(2**31),
        )
        self.events.append({"tool": name, "call_id": call.get("id"), "outcome": outcome})
        return output
