"""A back end that sends nothing: it prints each request ``k2 synth --dry-run`` would send and answers with a
placeholder, so the following stages can build (and print) their requests too.

A JSON-schema request is answered with the smallest instance of the schema that this pipeline's schemas allow
(first ``enum`` value, first ``anyOf`` branch, ``minItems`` items (at least one when allowed), strings
``dry_run_N`` cut to ``maxLength``, numbers at their ``minimum``, ``false``); any other request with the text
``(dry run)`` and no tool calls. Later stages' prompts are therefore built from these placeholders, not from real
replies.
"""

from __future__ import annotations

import itertools
import json
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from k2.agentic.backend import ChatReply


def placeholder(schema: Mapping[str, Any], counter: itertools.count) -> Any:
    """A value valid against ``schema`` (the subset of JSON Schema the ``k2 synth`` reply schemas use)."""
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][0]
    if "anyOf" in schema:
        return placeholder(schema["anyOf"][0], counter)
    kind = schema.get("type")
    if kind == "object":
        props = schema.get("properties", {})
        return {k: placeholder(props[k], counter) for k in schema.get("required", [])}
    if kind == "array":
        n = max(schema.get("minItems", 0), min(1, schema.get("maxItems", 1)))
        return [placeholder(schema.get("items", {}), counter) for _ in range(n)]
    if kind in ("integer", "number"):
        return schema.get("minimum", 0)
    if kind == "boolean":
        return False
    text = f"dry_run_{next(counter)}"
    return text[: schema.get("maxLength", len(text))]


class DryRunBackend:
    """Prints requests to ``out`` and answers with placeholders (see the module docstring)."""

    name = "dry-run"

    def __init__(self, out: TextIO = sys.stdout) -> None:
        self._out = out
        self._lock = threading.Lock()
        self._counter = itertools.count()
        self._requests = 0

    def usage(self) -> dict[str, int]:
        with self._lock:
            return {"requests": self._requests, "retries": 0, "failures": 0, "prompt_tokens": 0, "completion_tokens": 0}

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
        response_format: Mapping[str, Any] | None = None,
        temperature: float = 0.7,
        max_tokens: int = 512,
        seed: int | None = None,
    ) -> ChatReply:
        spec = (response_format or {}).get("json_schema", {})
        with self._lock:
            self._requests += 1
            kind = spec.get("name", "chat")
            head = f"--- request {self._requests}: {kind} (temperature {temperature}, max_tokens {max_tokens}) ---"
            lines = [head] + [f"[{m['role']}] {m.get('content') or ''}" for m in messages]
            if tools:
                names = ", ".join(t["function"]["name"] for t in tools)
                lines.append(f"[tools] {names} (tool_choice {tool_choice})")
            if spec:
                lines.append(f"[response schema] {json.dumps(spec['schema'], separators=(',', ':'))}")
            print("\n".join(lines) + "\n", file=self._out, flush=True)
            content = json.dumps(placeholder(spec["schema"], self._counter)) if spec else "(dry run)"
        return ChatReply(content, [], "stop", 0, 0)
