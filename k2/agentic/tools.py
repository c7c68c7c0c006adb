"""Tool specs: MCP / OpenAI tool conversion, schema validation and deduplication.

Every tool of ``k2 synth`` is kept as an OpenAI function tool ``{"type": "function", "function": {"name",
"description", "parameters"}}``. An MCP tool ``{"name", "description", "inputSchema"}`` (a ``tools/list`` entry)
maps onto it losslessly: ``inputSchema`` becomes ``parameters`` unchanged; MCP's extra fields (``title``,
``annotations``, ``outputSchema``) have no place in the OpenAI function and stay in the tool record's ``mcp``
field.

A tool is valid when (:func:`tool_problem` says which rule it breaks):
- its name matches OpenAI's ``^[a-zA-Z0-9_-]{1,64}$`` (what ``functions.NAME:IDX`` call ids carry);
- its description, if any, is a string;
- its parameters are a JSON Schema (``jsonschema`` meta-schema check for the schema's own draft) of an object
  (``"type": "object"``), whose ``properties`` is an object and whose ``required`` names only declared properties.

Deduplication (:func:`dedup`) keeps the first tool of each name and of each *signature*. The signature is
insensitive to how a tool is worded: the sorted set of its lowercased name tokens (split at ``_``, ``-``, spaces
and camelCase humps) plus the sorted ``(parameter name, type)`` pairs, parameter names lowercased with ``_`` and
``-`` removed. So ``get_weather(city: string)``, ``getWeather(City: string)`` and ``weather-get(city: string)`` are
one tool, while ``get_weather(city, unit)`` is another; descriptions never count.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jsonschema

from k2.data import chat
from k2.errors import DataError

TOOL_NAME_RE = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_TOKEN_RE = re.compile(r"[A-Z]+(?=[A-Z][a-z]|[0-9]|$)|[A-Z]?[a-z]+|[A-Z]+|[0-9]+")


def to_openai(tool: Any, i: int = 0) -> dict[str, Any]:
    """An OpenAI function tool from an OpenAI tool, a bare function or an MCP tool (``DataError`` for neither)."""
    fn = chat.tool_function(tool, i)
    out: dict[str, Any] = {"name": fn.get("name")}
    if fn.get("description") is not None:
        out["description"] = fn["description"]
    schema = fn.get("parameters", fn.get("inputSchema"))
    out["parameters"] = {"type": "object", "properties": {}} if schema is None else schema
    return {"type": "function", "function": out}


def mcp_extras(tool: Mapping[str, Any]) -> dict[str, Any]:
    """The MCP fields an OpenAI function has no place for (kept beside it in the tool record)."""
    return {k: v for k, v in tool.items() if k not in ("name", "description", "inputSchema")}


def tool_name(tool: Mapping[str, Any]) -> str:
    return str(tool["function"]["name"])


def tool_problem(tool: Mapping[str, Any]) -> str | None:
    """Why the OpenAI function tool ``tool`` is invalid (one line), or None when it is valid."""
    fn = tool.get("function")
    if tool.get("type") != "function" or not isinstance(fn, Mapping):
        return "not an OpenAI function tool"
    name = fn.get("name")
    if not isinstance(name, str) or not TOOL_NAME_RE.fullmatch(name):
        return f"invalid name {name!r} (must match ^[a-zA-Z0-9_-]{{1,64}}$)"
    if not isinstance(fn.get("description", ""), str):
        return "description is not a string"
    schema = fn.get("parameters")
    if not isinstance(schema, Mapping):
        return "parameters is not an object"
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        return f"parameters is not a valid JSON Schema: {e.message}"
    if schema.get("type") != "object":
        return f"parameters must be an object schema, got type {schema.get('type')!r}"
    properties = schema.get("properties", {})
    if not isinstance(properties, Mapping):
        return "parameters.properties is not an object"
    missing = [r for r in schema.get("required", []) if r not in properties]
    if missing:
        return f"required names undeclared parameters {missing}"
    return None


def _name_tokens(name: str) -> list[str]:
    return sorted({t.lower() for part in re.split(r"[\s_\-.]+", name) for t in _TOKEN_RE.findall(part)})


def _type_of(prop: Any) -> str:
    t = prop.get("type", "any") if isinstance(prop, Mapping) else "any"
    return "|".join(sorted(t)) if isinstance(t, list) else str(t)


def signature(tool: Mapping[str, Any]) -> str:
    """The meaning-insensitive signature of a valid tool (see the module docstring)."""
    fn = tool["function"]
    properties = fn["parameters"].get("properties", {})
    params = sorted((re.sub(r"[_\-]", "", p.lower()), _type_of(s)) for p, s in properties.items())
    return json.dumps([_name_tokens(fn["name"]), params], separators=(",", ":"))


def dedup(tools: Sequence[Mapping[str, Any]], seen: Sequence[Mapping[str, Any]] = ()) -> list[str | None]:
    """Per tool of ``tools`` (valid ones), None to keep it, or why it is dropped: its name or signature is that of
    a tool in ``seen`` or of a kept one earlier in ``tools`` ("duplicate name 'x'" / "duplicate signature of 'x'")."""
    names: set[str] = set()
    signatures: dict[str, str] = {}
    for t in seen:
        names.add(tool_name(t))
        signatures.setdefault(signature(t), tool_name(t))
    out: list[str | None] = []
    for t in tools:
        name, sig = tool_name(t), signature(t)
        if name in names:
            out.append(f"duplicate name {name!r}")
        elif sig in signatures:
            out.append(f"duplicate signature of {signatures[sig]!r}")
        else:
            names.add(name)
            signatures[sig] = name
            out.append(None)
    return out


def check_call(tool_schemas: Mapping[str, Mapping[str, Any]], call: Mapping[str, Any]) -> tuple[str, dict] | str:
    """``(name, arguments)`` of an OpenAI tool call whose arguments validate against its tool's schema, else the
    reason it cannot be executed (an unknown tool, arguments that are not a JSON object, a schema violation)."""
    fn = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
        return "the call has no function name"
    name = fn["name"]
    if name not in tool_schemas:
        return f"unknown tool {name!r} (available: {', '.join(sorted(tool_schemas))})"
    raw = fn.get("arguments", "{}")
    try:
        args = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError as e:
        return f"arguments of {name} are not valid JSON ({e})"
    if not isinstance(args, dict):
        return f"arguments of {name} must be a JSON object"
    error = jsonschema.exceptions.best_match(
        jsonschema.validators.validator_for(tool_schemas[name])(tool_schemas[name]).iter_errors(args)
    )
    if error is not None:
        where = "/".join(map(str, error.absolute_path)) or "(root)"
        return f"arguments of {name} do not match its schema at {where}: {error.message}"
    return name, args


def schemas_by_name(tools: Sequence[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """Tool name → its parameters schema, for :func:`check_call`; ``DataError`` for a tool that is not valid."""
    out: dict[str, Mapping[str, Any]] = {}
    for t in tools:
        problem = tool_problem(t)
        if problem:
            raise DataError(f"tool {t.get('function', {}).get('name')!r}: {problem}")
        out[tool_name(t)] = t["function"]["parameters"]
    return out
