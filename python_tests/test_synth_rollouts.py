"""Rollouts of ``k2 synth``: seeded failure-injection rates (binomial tolerance), schema-invalid tool calls that never
reach the world model, the per-episode state, and whole episodes against the scripted server."""

from __future__ import annotations

import json
import math
import random
from collections import Counter

import pytest
from _fake_openai import fake_openai
from _synth_world import invalid_args, world

from k2.agentic.backend import OpenAIBackend
from k2.agentic.config import OUTCOMES, SynthConfig
from k2.agentic.rollouts import run_episode
from k2.agentic.simulators import ToolSimulator, draw_outcome, simulate_tool

RATES = {"success": 0.55, "partial_failure": 0.2, "edge_case": 0.15, "error": 0.1}
BOOK = {
    "type": "function",
    "function": {
        "name": "book_room",
        "description": "Book a room.",
        "parameters": {
            "type": "object",
            "properties": {"room": {"type": "string"}, "nights": {"type": "integer", "minimum": 1}},
            "required": ["room", "nights"],
            "additionalProperties": False,
        },
    },
}


def _within_binomial(counts: Counter, n: int, rates: dict[str, float], sigmas: float = 4.5) -> None:
    for outcome, p in rates.items():
        sd = math.sqrt(n * p * (1 - p))
        assert abs(counts[outcome] - n * p) <= sigmas * sd + 1, (outcome, counts[outcome], n * p, sd)


def test_outcome_draws_match_the_configured_rates():
    n = 20_000
    rng = random.Random(7)
    counts = Counter(draw_outcome(rng, RATES) for _ in range(n))
    assert set(counts) == set(OUTCOMES)
    _within_binomial(counts, n, RATES)
    # Seeded: the same generator state gives the same draws; another seed gives others.
    a, b, c = random.Random(11), random.Random(11), random.Random(12)
    draws = [draw_outcome(a, RATES) for _ in range(200)]
    assert draws == [draw_outcome(b, RATES) for _ in range(200)]
    assert draws != [draw_outcome(c, RATES) for _ in range(200)]


def test_outcome_draw_is_one_uniform_against_cumulative_rates():
    class Fixed(random.Random):
        def __init__(self, u: float) -> None:
            super().__init__(0)
            self.u = u

        def random(self) -> float:
            return self.u

    # cumulative: success < 0.55 <= partial < 0.75 <= edge < 0.9 <= error
    expected = {0.0: "success", 0.5499: "success", 0.55: "partial_failure", 0.75: "edge_case", 0.9: "error"}
    for u, outcome in expected.items():
        assert draw_outcome(Fixed(u), RATES) == outcome
    only_errors = dict.fromkeys(OUTCOMES, 0.0) | {"error": 1.0}
    assert draw_outcome(Fixed(0.999999), only_errors) == "error"
    assert SynthConfig(partial_rate=0.2, edge_rate=0.15, error_rate=0.1).outcome_rates == pytest.approx(RATES)


def _call(i: int, args) -> dict:
    text = args if isinstance(args, str) else json.dumps(args)
    return {"id": f"c{i}", "type": "function", "function": {"name": "book_room", "arguments": text}}


def test_tool_simulator_injects_outcomes_at_the_rates_and_keeps_state():
    n = 400
    with fake_openai(world) as srv:
        sim = ToolSimulator(OpenAIBackend(srv.url, timeout_s=10), [BOOK], RATES, random.Random(3), 200, 0.7, 256)
        contents = [sim.execute(_call(i, {"room": f"r{i}", "nights": 1})) for i in range(n)]
        requests = srv.requests
    outcomes = [e["outcome"] for e in sim.events]
    _within_binomial(Counter(outcomes), n, RATES)
    # The same seed draws the same outcomes (the draw happens before the request, from the episode's generator).
    rng = random.Random(3)
    replay = []
    for _ in range(n):
        replay.append(draw_outcome(rng, RATES))
        rng.randrange(2**31)  # the request's seed
    assert outcomes == replay
    # Each world-model request asked for the drawn outcome with the state so far, and its output is the content.
    for i, (req, outcome, content) in enumerate(zip(requests, outcomes, contents, strict=True)):
        prompt = req["messages"][-1]["content"]
        assert f"Outcome to produce: {outcome}." in prompt
        assert f'"room": "r{i}"' in prompt
        assert json.loads(content) == {"outcome": outcome}
    assert sim.state == {"book_room": outcomes[-1]}  # the world model's last update


def test_simulate_tool_takes_the_state_and_returns_the_new_one():
    state = {"booked": "r1", "book_room": "old"}
    with fake_openai(world) as srv:
        backend = OpenAIBackend(srv.url, timeout_s=10)
        output, new = simulate_tool(
            backend, BOOK["function"], {"room": "r2", "nights": 2}, state, "edge_case",
            max_chars=200, temperature=0.0, max_tokens=128, seed=1,
        )  # fmt: skip
        sent = srv.requests[0]["messages"][-1]["content"]
    assert json.loads(output) == {"outcome": "edge_case"}
    assert new == {"booked": "r1", "book_room": "edge_case"}
    assert state == {"booked": "r1", "book_room": "old"}  # the input is not mutated
    assert 'Episode state: {"book_room": "old", "booked": "r1"}' in sent


@pytest.mark.parametrize(
    ("args", "why"),
    [
        ({"room": "r1"}, "'nights' is a required property"),
        ({"room": "r1", "nights": 0}, "0 is less than the minimum of 1"),
        ({"room": "r1", "nights": 1, "view": "sea"}, "Additional properties are not allowed"),
        ('{"room": "r1", ', "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
    ],
)
def test_schema_invalid_call_never_reaches_execution(args, why):
    with fake_openai(world) as srv:
        sim = ToolSimulator(OpenAIBackend(srv.url, timeout_s=10), [BOOK], RATES, random.Random(0), 200, 0.7, 256)
        state_rng = sim.rng.getstate()
        content = sim.execute(_call(0, args))
        assert srv.requests == []  # no world-model request
    assert sim.rng.getstate() == state_rng  # no outcome drawn
    error = json.loads(content)
    assert error["error"] == "invalid_arguments" and why in error["message"]
    assert sim.events == [{"tool": "book_room", "call_id": "c0", "outcome": "invalid", "reason": error["message"]}]
    assert sim.state == {}


def _agent_and_task() -> tuple[dict, dict]:
    agent = {"id": "a1", "system_prompt": "You book rooms.", "tools": [BOOK]}
    task = {"id": "t1", "difficulty": "simple", "task": "task #2 for book_room", "rubric": {}}
    return agent, task


def test_episode_with_an_invalid_call_counts_it_and_the_agent_sees_the_error():
    agent, task = _agent_and_task()
    with fake_openai(invalid_args) as srv:
        ep = run_episode(OpenAIBackend(srv.url, timeout_s=10), agent, task, SynthConfig(), random.Random(1))
        kinds = [(r.get("response_format") or {}).get("json_schema", {}).get("name", "agent") for r in srv.requests]
    assert "tool_result" not in kinds  # the invalid call was never executed
    meta = ep["metadata"]
    assert meta["invalid_calls"] == 1 and meta["tool_calls"] == 1 and meta["outcomes"][0]["outcome"] == "invalid"
    tool_msg = next(m for m in ep["messages"] if m["role"] == "tool")
    assert json.loads(tool_msg["content"])["error"] == "invalid_arguments"
    assert meta["state"] == {}


def test_episode_structure_and_determinism():
    agent, task = _agent_and_task()
    cfg = SynthConfig(max_turns=3)
    with fake_openai(world) as srv:
        backend = OpenAIBackend(srv.url, timeout_s=10)
        ep = run_episode(backend, agent, task, cfg, random.Random(5))
        again = run_episode(backend, agent, task, cfg, random.Random(5))
        agent_requests = [r for r in srv.requests if "tools" in r]
    assert ep == again
    roles = [m["role"] for m in ep["messages"]]
    # user asks, agent calls, tool answers, agent answers; the user is then done (the scripted world)
    assert roles == ["system", "user", "assistant", "tool", "assistant"]
    assert ep["messages"][0]["content"] == agent["system_prompt"]
    call = ep["messages"][2]["tool_calls"][0]
    assert ep["messages"][3]["tool_call_id"] == call["id"]
    meta = ep["metadata"]
    assert meta["stop_reason"] == "user_done" and meta["user_turns"] == 1 and meta["invalid_calls"] == 0
    assert meta["outcomes"][0]["outcome"] in OUTCOMES and meta["state"] == {"book_room": meta["outcomes"][0]["outcome"]}
    assert all(r["tool_choice"] == "auto" and r["tools"] == [BOOK] for r in agent_requests)
    assert ep["tools"] == [BOOK]


def test_episode_stops_at_the_step_limit():
    agent, task = _agent_and_task()

    def always_calls(request):
        if "tools" in request and "response_format" not in request:
            return ("tool_calls", [{"name": "book_room", "arguments": {"room": "r", "nights": 1}}])
        return world(request)

    with fake_openai(always_calls) as srv:
        ep = run_episode(OpenAIBackend(srv.url, timeout_s=10), agent, task, SynthConfig(max_steps=3), random.Random(0))
    meta = ep["metadata"]
    assert meta["stop_reason"] == "step_limit" and meta["tool_calls"] == 3
    ids = [c["id"] for m in ep["messages"] if m["role"] == "assistant" for c in m["tool_calls"]]
    assert len(set(ids)) == 3  # the server's repeated call_0 ids are made unique within the episode
    assert ep["messages"][-1]["role"] == "tool"
