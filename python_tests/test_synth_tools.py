"""``k2 synth tools``: MCP → OpenAI conversion, schema validation, signature dedup, MCP import (JSON files and a
real stdio MCP server written with the ``mcp`` SDK), and hierarchical evolution against the scripted server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
from _fake_openai import fake_openai
from _synth_world import world

from k2.agentic import mcp_import
from k2.agentic.backend import OpenAIBackend
from k2.agentic.config import SynthConfig
from k2.agentic.evolve import (
    DOMAINS_FILE,
    PROPOSALS_FILE,
    REJECTED_FILE,
    TOOLS_FILE,
    seed_categories,
    synth_tools,
    tools_schema,
)
from k2.agentic.store import JsonlStore
from k2.agentic.tools import check_call, dedup, signature, to_openai, tool_problem
from k2.data.chat import tool_function
from k2.errors import DataError

SERVER = Path(__file__).parent / "_mcp_server.py"


def _tool(name: str, props: dict, required: list[str] | None = None, **extra) -> dict:
    params = {"type": "object", "properties": props, **({"required": required} if required else {}), **extra}
    return {"type": "function", "function": {"name": name, "description": "d", "parameters": params}}


def test_mcp_tool_maps_losslessly_onto_an_openai_function():
    mcp = {
        "name": "set_thermostat",
        "title": "Thermostat",
        "description": "Set a room's temperature.",
        "inputSchema": {"type": "object", "properties": {"room": {"type": "string"}}, "required": ["room"]},
        "annotations": {"destructiveHint": False},
    }
    tool = to_openai(mcp)
    assert tool == {
        "type": "function",
        "function": {"name": mcp["name"], "description": mcp["description"], "parameters": mcp["inputSchema"]},
    }
    assert tool_function(tool, 0)["parameters"] is mcp["inputSchema"]  # the schema object itself, unchanged
    assert to_openai(tool) == tool  # OpenAI tools pass through


@pytest.mark.parametrize(
    ("tool", "problem"),
    [
        (_tool("bad name!", {}), "invalid name"),
        (_tool("x" * 65, {}), "invalid name"),
        (_tool("t", {"a": {"type": "bogus"}}), "not a valid JSON Schema"),
        (_tool("t", {"a": {"type": "string"}}, ["b"]), "undeclared parameters ['b']"),
        ({"type": "function", "function": {"name": "t", "parameters": {"type": "array"}}}, "object schema"),
        ({"type": "function", "function": {"name": "t", "parameters": []}}, "not an object"),
        ({"type": "function", "function": {"name": "t", "description": 3, "parameters": {}}}, "description"),
    ],
)
def test_invalid_tools_are_named(tool, problem):
    assert problem in tool_problem(tool)


def test_valid_tool_passes_the_meta_schema_check():
    tool = _tool("get-weather_2", {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}}, ["city"])
    assert tool_problem(tool) is None
    jsonschema.Draft202012Validator.check_schema(tool["function"]["parameters"])


def test_dedup_by_name_and_meaning_insensitive_signature():
    city = {"city": {"type": "string"}}
    tools = [
        _tool("get_weather", city),
        _tool("getWeather", {"City": {"type": "string"}}),  # same tokens and parameters: duplicate signature
        _tool("weather-get", city),  # token order does not matter
        _tool("get_weather", {"x": {"type": "number"}}),  # same name
        _tool("get_weather_v2", city),  # another token: a different tool
        _tool("getWeather2", {"city": {"type": "string"}, "unit": {"type": "string"}}),  # more parameters
        _tool("get_weather_num", {"city": {"type": "number"}}),
    ]
    assert signature(tools[0]) == signature(tools[1]) == signature(tools[2])
    assert dedup(tools) == [
        None,
        "duplicate signature of 'get_weather'",
        "duplicate signature of 'get_weather'",
        "duplicate name 'get_weather'",
        None,
        None,
        None,
    ]
    assert dedup([tools[4]], seen=[tools[4]]) == ["duplicate name 'get_weather_v2'"]


def test_check_call_validates_arguments_against_the_schema():
    schemas = {"book": _tool("book", {"n": {"type": "integer"}}, ["n"])["function"]["parameters"]}

    def call(name, args):
        return {"id": "c", "type": "function", "function": {"name": name, "arguments": args}}

    assert check_call(schemas, call("book", '{"n": 2}')) == ("book", {"n": 2})
    assert "unknown tool 'nope'" in check_call(schemas, call("nope", "{}"))
    assert "not valid JSON" in check_call(schemas, call("book", '{"n": '))
    assert "must be a JSON object" in check_call(schemas, call("book", "[1]"))
    assert "at n: 'two' is not of type 'integer'" in check_call(schemas, call("book", '{"n": "two"}'))
    assert "'n' is a required property" in check_call(schemas, call("book", "{}"))


def _server_listing() -> list[dict]:
    out = subprocess.run([sys.executable, str(SERVER), "--dump"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_mcp_import_from_a_real_stdio_server_equals_its_tools_list():
    expected = _server_listing()  # the server's own listing, in process (no transport)
    imported = mcp_import.tools_from_server(f"{sys.executable} {SERVER}", timeout_s=60)
    assert imported == expected
    assert [t["name"] for t in imported] == ["lookup_order", "convert_currency", "set_thermostat"]
    for t in imported:
        tool = to_openai(t)
        assert tool_problem(tool) is None
        assert tool["function"]["parameters"] == t["inputSchema"]
    thermostat = imported[2]["inputSchema"]
    assert thermostat["required"] == ["room", "celsius"]
    assert thermostat["properties"]["mode"]["enum"] == ["heat", "cool", "auto"]


def test_mcp_import_from_json_files(tmp_path):
    tools = _server_listing()
    shapes = {
        "result.json": {"tools": tools},
        "response.json": {"jsonrpc": "2.0", "id": 1, "result": {"tools": tools, "nextCursor": None}},
        "list.json": tools,
    }
    for name, data in shapes.items():
        (tmp_path / name).write_text(json.dumps(data))
        assert mcp_import.tools_from_json(tmp_path / name) == tools
    (tmp_path / "bad.json").write_text('{"tools": 3}')
    with pytest.raises(DataError, match=r"bad.json: expected a tools/list result"):
        mcp_import.tools_from_json(tmp_path / "bad.json")
    with pytest.raises(DataError, match="cannot read MCP tools"):
        mcp_import.tools_from_json(tmp_path / "missing.json")


def test_mcp_server_that_does_not_start_is_one_clear_error():
    with pytest.raises(DataError, match="MCP server"):
        mcp_import.tools_from_server(f"{sys.executable} -c 'import sys; sys.exit(3)'", timeout_s=10)


def _records(path: Path) -> list[dict]:
    with JsonlStore(path) as store:
        return store.records()


def test_tools_stage_evolves_hierarchically_validates_and_dedups(tmp_path):
    mcp_file = tmp_path / "mcp.json"
    bad = {"name": "bad tool", "inputSchema": {"type": "object"}}
    mcp_file.write_text(json.dumps({"tools": [*_server_listing(), bad]}))
    cfg = SynthConfig(num_categories=3, domains_per_category=2, tools_per_domain=5, mcp_json=(str(mcp_file),))
    run = tmp_path / "run"
    with fake_openai(world) as srv:
        result = synth_tools(run, OpenAIBackend(srv.url, timeout_s=10), cfg)
        requests = srv.requests
    assert not result.failures
    # Hierarchy: one domains request per sampled category, one tools request per domain, all schema-constrained.
    categories = seed_categories(cfg)
    assert len(categories) == 3 and set(categories) <= set(cfg.categories)
    assert seed_categories(cfg) == categories and seed_categories(cfg.replace(seed=1)) != categories
    kinds = [r["response_format"]["json_schema"]["name"] for r in requests]
    assert sorted(kinds) == ["domains"] * 3 + ["tools"] * 6
    assert all(r["response_format"]["json_schema"]["strict"] for r in requests)
    domains = _records(run / DOMAINS_FILE)
    assert sorted(d["category"] for d in domains) == sorted(categories)
    proposals = _records(run / PROPOSALS_FILE)
    assert {(p["category"], p["domain"]) for p in proposals} == {
        (d["category"], x["name"]) for d in domains for x in d["domains"]
    }
    for p in proposals:
        jsonschema.validate({"tools": p["tools"]}, tools_schema(5, cfg.max_text_chars))

    tools, rejected = _records(run / TOOLS_FILE), _records(run / REJECTED_FILE)
    for t in tools:
        assert tool_problem(t["tool"]) is None
        if t["source"] == "synthetic":
            assert t["domain"].startswith(t["category"].split()[0].lower())
    names = [t["tool"]["function"]["name"] for t in tools]
    assert len(set(names)) == len(names)
    assert len({signature(t["tool"]) for t in tools}) == len(tools)
    # Imported tools first, in listing order, unchanged; the invalid one is rejected with its reason.
    assert [t["tool"] for t in tools[:3]] == [to_openai(t) for t in _server_listing()]
    assert tools[0]["mcp"]["outputSchema"]["title"] == "lookup_orderArguments".replace("Arguments", "Output")
    reasons = {(r["name"], r["reason"]) for r in rejected}
    assert ("bad tool", "invalid name 'bad tool' (must match ^[a-zA-Z0-9_-]{1,64}$)") in reasons
    # Per _b domain (one per category): one broken tool and one duplicate signature; lookup_category is kept once.
    broken = [r for r in rejected if r["name"].endswith("_broken")]
    assert len(broken) == 3 and all("declared twice" in r["reason"] for r in broken)
    assert names.count("lookup_category") == 1
    assert sum(r["reason"] == "duplicate signature of 'lookup_category'" for r in rejected) == 3
    assert sum(r["reason"] == "duplicate name 'lookup_category'" for r in rejected) == 2
    assert len(tools) == 3 + 3 * (5 + 2) + 1  # imported + per category (_a: 5, _b: lookup and book) + the twin
    assert result.dropped == {"invalid": 4, "duplicate signature": 3, "duplicate name": 2}

    # A rerun sends nothing and changes nothing.
    before = {p.name: p.read_bytes() for p in run.glob("*.jsonl") if p.name != "log.jsonl"}
    with fake_openai(world) as srv:
        again = synth_tools(run, OpenAIBackend(srv.url, timeout_s=10), cfg)
        assert srv.requests == []
    assert again.new == 0
    assert {p.name: p.read_bytes() for p in run.glob("*.jsonl") if p.name != "log.jsonl"} == before
