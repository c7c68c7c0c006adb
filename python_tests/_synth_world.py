"""Scripts for the scripted OpenAI server (``_fake_openai``) that play every LLM role of ``k2 synth``.

Each reply is a pure function of the request body (no state, no randomness), so two runs of a stage get the same
replies whatever the order, concurrency or interruptions, and a test can predict every record. The role is read
from ``response_format.json_schema.name`` (``domains``, ``tools``, ``agent``, ``task``, ``user_turn``,
``tool_result``, ``verdict``); a request with ``tools`` and no response format is the agent.

The world, by design:
- every category gets domains ``<slug>_a``, ``<slug>_b``, ...; every domain proposes ``<domain>_lookup`` (one
  string parameter ``query``) and ``<domain>_book`` (``item``: string, ``count``: integer); a ``_b`` domain then
  proposes ``lookup_category`` and ``category_lookup`` (the same signature: the second is a duplicate; the first
  is a duplicate name in every ``_b`` domain after the first) and ``<domain>_broken`` (a parameter declared
  twice: invalid); ``<domain>_extraN`` tools fill up to the number asked for;
- the user asks once and is done after the first answer;
- the agent calls its first tool with schema-valid arguments, then answers in text;
- the world model answers with the outcome named in its prompt and records one state entry;
- the judge passes an episode iff its task text has an even ``#N`` (tasks are numbered per agent).

``invalid_args`` is the same world except that the agent's first call has arguments that violate the schema.
"""

from __future__ import annotations

import json
import re
from typing import Any


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:20]


def _param(name: str, kind: str, required: bool = True) -> dict[str, Any]:
    p = {"name": name, "type": kind, "description": f"the {name}", "required": required}
    return {**p, "enum": []} if kind == "string" else p


def _tools(domain: str, n: int, second: bool) -> list[dict[str, Any]]:
    tools = [
        {"name": f"{domain}_lookup", "description": f"look up {domain}", "parameters": [_param("query", "string")]},
        {
            "name": f"{domain}_book",
            "description": f"book in {domain}",
            "parameters": [_param("item", "string"), _param("count", "integer", False)],
        },
    ]
    if second:
        twin = [_param("category", "string")]
        tools += [
            {"name": "lookup_category", "description": "one", "parameters": twin},
            {"name": "category_lookup", "description": "same signature, other wording", "parameters": twin},
            {"name": f"{domain}_broken", "description": "x", "parameters": [_param("a", "string")] * 2},
        ]
    tools += [
        {"name": f"{domain}_extra{i}", "description": "more", "parameters": [_param(f"x{i}", "number")]}
        for i in range(len(tools), n)
    ]
    return tools[:n]


def _arguments(tool: dict[str, Any], valid: bool) -> dict[str, Any]:
    params = tool["function"]["parameters"]
    if not valid:
        return {"unexpected": 1}  # additionalProperties is false and the required ones are missing
    values = {"string": "x", "integer": 1, "number": 1.5, "boolean": True}
    return {p: values[s["type"]] for p, s in params["properties"].items() if p in params.get("required", [])}


def world(request: dict[str, Any], *, valid_args: bool = True) -> Any:
    spec = (request.get("response_format") or {}).get("json_schema", {})
    kind, schema = spec.get("name"), spec.get("schema", {})
    messages = request["messages"]
    last = messages[-1]["content"] or ""
    if kind == "domains":
        category = re.search(r"Category: (.*)", last)[1]
        n = schema["properties"]["domains"]["minItems"]
        names = [f"{_slug(category)}_{chr(ord('a') + i)}" for i in range(n)]
        return {"domains": [{"name": d, "description": f"the {d} domain"} for d in names]}
    if kind == "tools":
        domain = re.search(r"Application domain: (\S+)", last)[1]
        n = schema["properties"]["tools"]["minItems"]
        return {"tools": _tools(domain, n, domain.endswith("_b"))}
    if kind == "agent":
        names = re.findall(r'"name": "([^"]+)"', last)
        return {"name": f"agent of {names[0]}", "system_prompt": f"You help with {', '.join(names)}."}
    if kind == "task":
        number = re.search(r"Write task #(\d+)", last)[1]
        names = schema["properties"]["rubric"]["properties"]["expected_tool_calls"]["items"]["properties"]["name"]
        lo = schema["properties"]["rubric"]["properties"]["expected_tool_calls"]["minItems"]
        calls = [{"name": names["enum"][0], "purpose": "do it"}] * lo
        rubric = {"success_criteria": ["answered"], "expected_tool_calls": calls, "checkpoints": ["a call was made"]}
        return {"task": f"task #{number} for {names['enum'][0]}", "rubric": rubric}
    if kind == "user_turn":
        said = sum(m["role"] == "assistant" for m in messages)
        return {"message": f"please help (turn {said})", "done": said >= 1}
    if kind == "tool_result":
        outcome = re.search(r"Outcome to produce: (\w+)", last)[1]
        tool = re.search(r'"name": "([^"]+)"', last)[1]
        return {"output": json.dumps({"outcome": outcome}), "state_updates": [{"key": tool, "value": outcome}]}
    if kind == "verdict":
        number = int(re.search(r"task #(\d+)", last)[1])
        verdict = "pass" if number % 2 == 0 else "fail"
        return {
            "verdict": verdict,
            "scores": {"success_criteria": 7, "tool_use": 7, "checkpoints": 7},
            "reasons": [f"{verdict}: n={number}"],
        }
    if request.get("tools"):
        if messages[-1]["role"] == "user":
            tool = request["tools"][0]
            return ("tool_calls", [{"name": tool["function"]["name"], "arguments": _arguments(tool, valid_args)}])
        return ("text", "Done: here is what I found.")
    raise ValueError(f"_synth_world: unexpected request {json.dumps(request)[:300]}")


def invalid_args(request: dict[str, Any]) -> Any:
    return world(request, valid_args=False)


def slow_world(request: dict[str, Any]) -> Any:
    """``world``, each reply 0.05 s late: a stage takes long enough to be killed in the middle."""
    return ("sleep", 0.05, world(request))
