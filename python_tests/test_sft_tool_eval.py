"""Tool-call validity and exact-call accuracy (k2.train.tool_eval) against hand-made completions."""

from __future__ import annotations

import json

import pytest

from k2.data import toolgen
from k2.data.sft import Record
from k2.train.tool_eval import ToolTurn, score_turn, tool_turns

SB, SE = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CB, AB, CE = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"


def _call_text(name: str, idx: int, args: str) -> str:
    return f"{CB}functions.{name}:{idx}{AB}{args}{CE}"


def _ref(name: str, args: dict) -> dict:
    return {"id": "r", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


TOOLS = [toolgen.TOOLS["convert_units"], toolgen.TOOLS["get_weather"]]
TURN = ToolTurn(
    [{"role": "user", "content": "5 km in mi, and the weather in Oslo?"}],
    TOOLS,
    [_ref("convert_units", {"value": 5, "from": "km", "to": "mi"}), _ref("get_weather", {"city": "Oslo"})],
)
CONVERT = _call_text("convert_units", 0, '{"value": 5, "from": "km", "to": "mi"}')
WEATHER = _call_text("get_weather", 1, '{"city": "Oslo"}')


def _section(*calls: str) -> str:
    return SB + "".join(calls) + SE


def _convert(args: str) -> str:
    return _call_text("convert_units", 0, args)


@pytest.mark.parametrize(
    ("completion", "valid", "exact", "reason"),
    [
        (_section(CONVERT, WEATHER), True, True, ""),
        # parallel calls are unordered; key order, spacing and 5 vs 5.0 do not matter
        (_section(WEATHER, _call_text("convert_units", 1, '{ "to":"mi","from":"km","value":5.0}')), True, True, ""),
        ("Let me check." + SB + CONVERT + WEATHER, True, True, ""),  # text before the calls; no section end
        (_section(CONVERT, _call_text("get_forecast", 1, '{"city": "Oslo"}')), False, False, "undeclared"),
        (_section(_convert('{"value": "5", "from": "km", "to": "mi"}'), WEATHER), False, False, "not of type"),
        (_section(_convert('{"value": 5, "from": "km", "to": "AU"}'), WEATHER), False, False, "is not one of"),
        (_section(_convert('{"value": 5, "from": "km"}'), WEATHER), False, False, "'to' is a required property"),
        (_section(_convert('{"value": 6, "from": "km", "to": "mi"}'), WEATHER), True, False, "differ"),
        (_section(CONVERT, WEATHER, _call_text("get_weather", 2, '{"city": "Rome"}')), True, False, "differ"),
        (_section(CONVERT), True, False, "differ"),  # a missing call
        (SB + CONVERT + CB + "functions.get_weather:1" + AB + '{"city": "Os', False, False, "incomplete"),
        (_section(_call_text("get_weather", 0, "{city: Oslo}")), False, False, "not valid JSON"),
        ("Sure, 5 km is 3.1 mi.", False, False, "no tool call"),
        ("", False, False, "no tool call"),
    ],
    ids=[
        "valid",
        "reordered",
        "content-first",
        "wrong-name",
        "wrong-type",
        "not-in-enum",
        "missing-key",
        "wrong-arguments",
        "extra-call",
        "missing-call",
        "truncated",
        "broken-json",
        "text-only",
        "empty",
    ],
)
def test_score_turn(completion: str, valid: bool, exact: bool, reason: str) -> None:
    s = score_turn(completion, TURN)
    assert (s.valid, s.exact) == (valid, exact), s
    assert reason in s.reason


def test_tool_turns_are_the_calling_assistant_turns_in_order() -> None:
    dialogues = toolgen.generate(40, seed=3)
    records = [Record(str(i), d["messages"], d["tools"]) for i, d in enumerate(dialogues)]
    turns = tool_turns(records, 1000)
    expected = [
        (i, j)
        for i, d in enumerate(dialogues)
        for j, m in enumerate(d["messages"])
        if m["role"] == "assistant" and m.get("tool_calls")
    ]
    assert len(turns) == len(expected)
    for turn, (i, j) in zip(turns, expected, strict=True):
        assert (
            turn.messages == dialogues[i]["messages"][:j]
            and turn.reference == dialogues[i]["messages"][j]["tool_calls"]
        )
    assert tool_turns(records, 5) == turns[:5]
    # The reference turns themselves, rendered as the model should write them, score as exact.
    for turn in turns:
        text = (
            SB
            + "".join(
                _call_text(c["function"]["name"], k, c["function"]["arguments"]) for k, c in enumerate(turn.reference)
            )
            + SE
        )
        assert score_turn(text, turn).exact
