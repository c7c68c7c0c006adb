"""``k2 synth tools``: the tool repository, from imported MCP tools and tools evolved hierarchically (Kimi K2
report, arXiv 2507.20534 §3.1.1: key categories first, then application domains within each category, then
specialised tools for each domain).

Steps, each resumable (one JSONL file, stable ids):
1. categories: a seeded sample of ``cfg.num_categories`` seed categories (built-in list or ``--categories``);
2. ``domains.jsonl``: per category, one ``chat_json`` call for ``domains_per_category`` application domains;
3. ``tool_proposals.jsonl``: per domain, one ``chat_json`` call for ``tools_per_domain`` tools;
4. ``tools.jsonl`` / ``tools_rejected.jsonl``: imported MCP tools (``--mcp-json`` files, then ``--mcp-server``
   commands), then the proposals in hierarchy order, each validated (``k2.agentic.tools.tool_problem``) and
   deduplicated by name and signature (``k2.agentic.tools.dedup``); the first of a set of duplicates is kept, the
   others are written to ``tools_rejected.jsonl`` with the reason.

The reply schema for a proposed tool is a compact parameter list (name, JSON type, description, required flag,
string enum) that the code turns into the tool's JSON Schema: a constrained decoder then can only produce
well-formed tools, and every string has a maxLength so a reply always ends. The list still gets the full check
(a repeated parameter or enum value is rejected).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from k2.agentic import mcp_import
from k2.agentic.backend import ChatBackend, chat_json
from k2.agentic.config import SynthConfig
from k2.agentic.stage import StageResult, make_missing, run_logged
from k2.agentic.store import JsonlStore, derived_seed, stable_id
from k2.agentic.tools import dedup, mcp_extras, to_openai, tool_name, tool_problem
from k2.errors import DataError

DOMAINS_FILE = "domains.jsonl"
PROPOSALS_FILE = "tool_proposals.jsonl"
TOOLS_FILE = "tools.jsonl"
REJECTED_FILE = "tools_rejected.jsonl"

SYSTEM = "You design realistic software tools (API functions) for training AI assistants. Reply with JSON only."
_NAME = {"type": "string", "pattern": "^[a-z][a-z0-9_]{2,40}$"}
_PARAM_NAME = {"type": "string", "pattern": "^[a-z][a-z0-9_]{0,30}$"}
PARAM_TYPES = ("string", "number", "integer", "boolean")


def _text(max_chars: int) -> dict[str, Any]:
    return {"type": "string", "minLength": 1, "maxLength": max_chars}


def _object(properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


def _array(items: dict[str, Any], lo: int, hi: int) -> dict[str, Any]:
    return {"type": "array", "items": items, "minItems": lo, "maxItems": hi}


def domains_schema(n: int, max_chars: int) -> dict[str, Any]:
    domain = _object({"name": _text(min(60, max_chars)), "description": _text(max_chars)})
    return _object({"domains": _array(domain, n, n)})


def tools_schema(n: int, max_chars: int) -> dict[str, Any]:
    common = {"name": _PARAM_NAME, "description": _text(max_chars // 2), "required": {"type": "boolean"}}
    string_param = _object({**common, "type": {"const": "string"}, "enum": _array(_text(min(40, max_chars)), 0, 6)})
    other_param = _object({**common, "type": {"enum": list(PARAM_TYPES[1:])}})
    tool = _object(
        {
            "name": _NAME,
            "description": _text(max_chars),
            "parameters": _array({"anyOf": [string_param, other_param]}, 1, 4),
        }
    )
    return _object({"tools": _array(tool, n, n)})


def domains_prompt(category: str, n: int) -> list[dict[str, str]]:
    user = (
        f"Category: {category}\n"
        f"List {n} distinct application domains in this category: kinds of applications or services whose "
        "functions an AI assistant could call. Give each a short name and a one-sentence description."
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def tools_prompt(category: str, domain: Mapping[str, str], n: int) -> list[dict[str, str]]:
    user = (
        f"Category: {category}\nApplication domain: {domain['name']} ({domain['description']})\n"
        f"Design {n} distinct tools that an application in this domain would expose to an AI assistant. For each "
        "tool give a snake_case name, a one-sentence description and 1 to 4 parameters; for each parameter a "
        "snake_case name, its JSON type (string, number, integer or boolean), a short description, whether it is "
        "required, and for a string with a fixed set of values the allowed values in enum (else an empty list)."
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def proposal_tool(proposal: Mapping[str, Any]) -> dict[str, Any] | str:
    """The OpenAI function tool of a proposed tool, or why it cannot be one (a repeated parameter or enum value)."""
    properties: dict[str, Any] = {}
    required: list[str] = []
    for p in proposal["parameters"]:
        if p["name"] in properties:
            return f"parameter {p['name']!r} is declared twice"
        prop: dict[str, Any] = {"type": p["type"], "description": p["description"]}
        if p.get("enum"):
            if len(set(p["enum"])) != len(p["enum"]):
                return f"parameter {p['name']!r} repeats an enum value"
            prop["enum"] = list(p["enum"])
        properties[p["name"]] = prop
        if p["required"]:
            required.append(p["name"])
    schema = {"type": "object", "properties": properties, "required": required, "additionalProperties": False}
    fn = {"name": proposal["name"], "description": proposal["description"], "parameters": schema}
    return {"type": "function", "function": fn}


def seed_categories(cfg: SynthConfig) -> list[str]:
    """The categories this run evolves: a seeded sample, in the order of ``cfg.categories``."""
    chosen = set(random.Random(derived_seed(cfg.seed, "categories")).sample(cfg.categories, cfg.num_categories))
    return [c for c in cfg.categories if c in chosen]


def _make_domains(backend: ChatBackend, cfg: SynthConfig):
    def make(record_id: str, category: str) -> dict[str, Any]:
        rng = random.Random(derived_seed(cfg.seed, record_id))
        schema = domains_schema(cfg.domains_per_category, cfg.max_text_chars)
        reply = chat_json(
            backend,
            domains_prompt(category, cfg.domains_per_category),
            schema,
            name="domains",
            temperature=cfg.temperature,
            max_tokens=cfg.max_tokens,
            seed=rng.randrange(2**31),
        )
        return {"category": category, "domains": reply["domains"]}

    return make


def _make_proposals(backend: ChatBackend, cfg: SynthConfig):
    def make(record_id: str, where: tuple[str, dict[str, str]]) -> dict[str, Any]:
        category, domain = where
        rng = random.Random(derived_seed(cfg.seed, record_id))
        reply = chat_json(
            backend,
            tools_prompt(category, domain, cfg.tools_per_domain),
            tools_schema(cfg.tools_per_domain, cfg.max_text_chars),
            name="tools",
            temperature=cfg.temperature,
            max_tokens=cfg.max_tokens,
            seed=rng.randrange(2**31),
        )
        return {"category": category, "domain": domain["name"], "tools": reply["tools"]}

    return make


def _imported(cfg: SynthConfig) -> list[tuple[str, int, dict[str, Any]]]:
    """``(source, index, MCP tool)`` of every imported tool, files first, in the order given."""
    out = []
    for path in cfg.mcp_json:
        out += [(f"mcp:{path}", i, t) for i, t in enumerate(mcp_import.tools_from_json(path))]
    for command in cfg.mcp_server:
        tools = mcp_import.tools_from_server(command, timeout_s=cfg.timeout_s)
        out += [(f"mcp-server:{command}", i, t) for i, t in enumerate(tools)]
    return out


def _candidates(cfg: SynthConfig, proposals: list[dict[str, Any]]) -> list[tuple[dict[str, Any], Any, str | None]]:
    """``(record without its tool, tool or raw proposal, problem)`` of every tool in the canonical order."""
    out: list[tuple[dict[str, Any], Any, str | None]] = []
    for source, i, raw in _imported(cfg):
        base = {"source": source, "origin": [source, i], "category": None, "domain": None}
        try:
            tool = to_openai(raw, i)
        except DataError as e:  # a tools/list entry that is not a tool at all
            out.append((base, raw, str(e).removeprefix("chat.render: ")))
            continue
        out.append(({**base, "mcp": mcp_extras(raw)}, tool, tool_problem(tool)))
    for p in proposals:
        for i, raw in enumerate(p["tools"]):
            base = {"source": "synthetic", "origin": [p["id"], i], "category": p["category"], "domain": p["domain"]}
            tool = proposal_tool(raw)
            if isinstance(tool, str):
                out.append((base, raw, tool))
            else:
                out.append((base, tool, tool_problem(tool)))
    return out


def _reject(store: JsonlStore, base: dict[str, Any], tool: Any, reason: str, result: StageResult) -> None:
    result.dropped["invalid" if not reason.startswith("duplicate") else " ".join(reason.split()[:2])] += 1
    rid = stable_id("rejected", base["origin"])
    if rid not in store:
        name = tool.get("function", tool).get("name") if isinstance(tool, Mapping) else None
        store.append({"id": rid, **base, "name": name, "reason": reason, "tool": tool})


def _assemble(run_dir: Path, cfg: SynthConfig, proposals: list[dict[str, Any]], result: StageResult) -> None:
    with JsonlStore(run_dir / TOOLS_FILE) as tools, JsonlStore(run_dir / REJECTED_FILE) as rejected:
        valid: list[tuple[dict[str, Any], dict[str, Any]]] = []
        for base, tool, problem in _candidates(cfg, proposals):
            if problem is None:
                valid.append((base, tool))
            else:
                _reject(rejected, base, tool, problem, result)
        # Kept tools are appended in canonical order, so those of an earlier (killed) invocation are a prefix of
        # this one's: the first candidate equal to a stored tool is that tool, every other one is deduplicated.
        existing = {tool_name(r["tool"]): r["tool"] for r in tools.records()}
        matched: set[str] = set()
        fresh: list[tuple[dict[str, Any], dict[str, Any]]] = []
        for base, tool in valid:
            if tool_name(tool) not in matched and existing.get(tool_name(tool)) == tool:
                matched.add(tool_name(tool))
            else:
                fresh.append((base, tool))
        verdicts = dedup([t for _, t in fresh], seen=list(existing.values()))
        result.total += len(matched) + verdicts.count(None)
        result.existing += len(matched)
        for (base, tool), reason in zip(fresh, verdicts, strict=True):
            if reason is None:
                tools.append({"id": stable_id("tool", tool_name(tool)), **base, "tool": tool})
                result.new += 1
            else:
                _reject(rejected, base, tool, reason, result)


def synth_tools(run_dir: Path, backend: ChatBackend, cfg: SynthConfig) -> StageResult:
    """Import and evolve the run's tools (see the module docstring)."""

    def body(result: StageResult) -> None:
        with JsonlStore(run_dir / DOMAINS_FILE) as domains:
            per_category = cfg.domains_per_category
            items = [(stable_id("domains", c, per_category), c) for c in seed_categories(cfg)]
            make_missing(result, domains, items, _make_domains(backend, cfg), cfg.concurrency)
            by_id = {r["id"]: r for r in domains.records()}
            ordered = [by_id[rid] for rid, _ in items if rid in by_id]
        with JsonlStore(run_dir / PROPOSALS_FILE) as proposals:
            items = [
                (stable_id("tools", d["category"], j, dom["name"], cfg.tools_per_domain), (d["category"], dom))
                for d in ordered
                for j, dom in enumerate(d["domains"])
            ]
            make_missing(result, proposals, items, _make_proposals(backend, cfg), cfg.concurrency)
            by_id = {r["id"]: r for r in proposals.records()}
            done = [by_id[rid] for rid, _ in items if rid in by_id]
        _assemble(run_dir, cfg, done, result)

    return run_logged("tools", run_dir, backend, body)
