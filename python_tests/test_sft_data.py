"""SFT data (k2.data.sft, k2.data.toolgen): the loss mask against a hand-written expectation, reading JSONL and
parquet records, every bad input as one ``DataError`` naming the file and line, the too-long rule, rows, and the
built-in dialogue generator (deterministic, schema-valid, executable calls)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from k2.data import ByteTokenizer, chat, toolgen
from k2.data.sft import IGNORE_INDEX, Record, SFTRows, check_record, encode, first_fit, read_records, tool_schemas
from k2.errors import DataError
from k2.model import document_layout

TOK = ByteTokenizer()
CALC = toolgen.TOOLS["calculator"]
WEATHER = toolgen.TOOLS["get_weather"]

CONVERSATION = {
    "tools": [CALC, WEATHER],
    "messages": [
        {"role": "user", "content": "2+3 and the weather in Oslo?"},
        {
            "role": "assistant",
            "content": "Sure.",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "calculator", "arguments": '{"expression": "2+3"}'},
                },
                {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "5"},
        {"role": "tool", "tool_call_id": "c2", "name": "get_weather", "content": '{"temp": 3}'},
        {"role": "assistant", "content": "5, and 3 degrees in Oslo."},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You're welcome."},
    ],
}

# The conversation as Kimi-K2 text, piece by piece, with 1 where the assistant produces the tokens (written out by
# hand; only the tool declaration's JSON is computed).
EXPECTED = [
    (f"<|im_system|>tool_declare<|im_middle|>{chat.tools_json([CALC, WEATHER])}<|im_end|>", 0),
    ("<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>", 0),
    ("<|im_user|>user<|im_middle|>2+3 and the weather in Oslo?<|im_end|>", 0),
    ("<|im_assistant|>assistant<|im_middle|>", 0),
    (
        "Sure.<|tool_calls_section_begin|>"
        '<|tool_call_begin|>functions.calculator:0<|tool_call_argument_begin|>{"expression": "2+3"}<|tool_call_end|>'
        '<|tool_call_begin|>functions.get_weather:1<|tool_call_argument_begin|>{"city": "Oslo"}<|tool_call_end|>'
        "<|tool_calls_section_end|><|im_end|>",
        1,
    ),
    ("<|im_system|>tool<|im_middle|>## Return of functions.calculator:0\n5<|im_end|>", 0),
    ('<|im_system|>get_weather<|im_middle|>## Return of functions.get_weather:1\n{"temp": 3}<|im_end|>', 0),
    ("<|im_assistant|>assistant<|im_middle|>", 0),
    ("5, and 3 degrees in Oslo.<|im_end|>", 1),
    ("<|im_user|>user<|im_middle|>Thanks<|im_end|>", 0),
    ("<|im_assistant|>assistant<|im_middle|>", 0),
    ("You're welcome.<|im_end|>", 1),
]


def _record(d: dict, where: str = "test:1") -> Record:
    return Record(where, d["messages"], d.get("tools", []))


def test_loss_mask_is_exactly_the_assistant_tokens() -> None:
    ids, mask = [], []
    for piece, supervised in EXPECTED:
        toks = TOK.encode(piece, allow_special=True)
        ids += toks
        mask += [supervised] * len(toks)
    (conv,), skipped = encode([_record(CONVERSATION)], TOK, 2048)
    assert skipped == 0
    assert conv.ids.tolist() == ids and conv.mask.astype(int).tolist() == mask
    x, y = SFTRows([conv], 2048, pack=False, pad_id=TOK.pad_id).batch([0])
    assert x[0].tolist() == ids[:-1]
    assert y[0].tolist() == [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:], strict=True)]


def test_rows_pad_to_the_longest_and_pack_first_fit() -> None:
    convs, _ = encode([_record(d) for d in toolgen.generate(6, seed=1)], TOK, 1024)
    rows = SFTRows(convs, 1024, pack=False, pad_id=TOK.pad_id)
    x, y = rows.batch([0, 1, 2])
    longest = max(len(convs[i]) for i in range(3))
    assert x.shape == (3, longest) and rows.num_tokens([0, 1, 2]) == sum(len(convs[i]) for i in range(3))
    for b in range(3):
        n = len(convs[b])
        assert (x[b, n:] == TOK.pad_id).all() and (y[b, n:] == IGNORE_INDEX).all()
    assert first_fit([5, 3, 4, 2, 1], 6) == [[0, 4], [2, 3], [1]]


def test_jsonl_and_parquet_records(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    mcp = {"name": "calculator", "description": "Evaluate arithmetic.", "inputSchema": CALC["function"]["parameters"]}
    record = {**CONVERSATION, "tools": [mcp, WEATHER]}  # an MCP tool is accepted as in k2 serve
    (tmp_path / "a.jsonl").write_text(json.dumps(record) + "\n\n" + json.dumps(CONVERSATION) + "\n")
    table = pa.table({"messages": [json.dumps(CONVERSATION["messages"])], "tools": [json.dumps([CALC, WEATHER])]})
    pq.write_table(table, tmp_path / "b.parquet")
    records = list(read_records(tmp_path))
    assert [r.where for r in records] == [
        f"{tmp_path}/a.jsonl:1",
        f"{tmp_path}/a.jsonl:3",
        f"{tmp_path}/b.parquet:row 0",
    ]
    convs, _ = encode(records, TOK, 2048)
    assert convs[0].ids.tolist() == convs[1].ids.tolist() == convs[2].ids.tolist()  # same rendering for all three


def _bad(message: dict | str) -> str:
    line = message if isinstance(message, str) else json.dumps(message)
    return line


CALL = {"id": "x", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "1+1"}'}}


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('{"messages": [{"role": "user", "content": "hi"}', "data.jsonl:2: invalid JSON"),
        ('["not", "an", "object"]', "data.jsonl:2: expected a JSON object with 'messages'"),
        ('{"text": "hi"}', "data.jsonl:2: no 'messages'"),
        (
            {"messages": [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "x"}]},
            "data.jsonl:2: messages[0]: unknown role 'robot'",
        ),
        (
            {"tools": [WEATHER], "messages": [{"role": "assistant", "content": "", "tool_calls": [CALL]}]},
            "data.jsonl:2: messages[0].tool_calls[0] calls 'calculator', which is not a declared tool "
            "(declared: get_weather)",
        ),
        ({"messages": [{"role": "user", "content": "hi"}]}, "data.jsonl:2: the conversation has no assistant turn"),
        (
            {
                "tools": [CALC],
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [{**CALL, "function": {"name": "calculator", "arguments": "{oops"}}],
                    }
                ],
            },
            "data.jsonl:2: messages[0].tool_calls[0] (calculator): arguments are not valid JSON",
        ),
        (
            {"tools": [{"name": "f", "inputSchema": {"type": "objekt"}}], "messages": [{"role": "assistant"}]},
            "data.jsonl:2: tools[0] (f): not a valid JSON Schema",
        ),
    ],
    ids=[
        "malformed-json",
        "not-an-object",
        "no-messages",
        "unknown-role",
        "undeclared-tool",
        "no-assistant",
        "bad-arguments",
        "bad-schema",
    ],
)
def test_bad_records_name_the_file_and_line(tmp_path: Path, line: dict | str, expected: str) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(CONVERSATION) + "\n" + _bad(line) + "\n")
    with pytest.raises(DataError) as e:
        encode(list(read_records(path)), TOK, 2048)
    message = str(e.value)
    assert "\n" not in message and message.startswith(str(tmp_path)) and expected in message, message


def test_too_long_is_skipped_and_counted_or_an_error() -> None:
    short = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    records = [_record(CONVERSATION, "f:1"), _record(short, "f:2")]
    convs, skipped = encode(records, TOK, 200)
    assert skipped == 1 and [c.record for c in convs] == [1]
    with pytest.raises(DataError, match=r"^f:1: the conversation has \d+ tokens, more than data.context_len=200"):
        encode(records, TOK, 200, too_long="error")


def test_generator_is_deterministic_valid_and_executable() -> None:
    import jsonschema

    dialogues = toolgen.generate(300, seed=7)
    assert dialogues == toolgen.generate(300, seed=7) and dialogues != toolgen.generate(300, seed=8)
    kinds = {"parallel": 0, "multi_turn": 0, "plain": 0}
    for d in dialogues:
        check_record(_record(d))
        schemas = tool_schemas(d["tools"])
        tool_turns = [m for m in d["messages"] if m.get("tool_calls")]
        kinds["parallel"] += any(len(m["tool_calls"]) > 1 for m in tool_turns)
        kinds["multi_turn"] += len(tool_turns) > 1
        kinds["plain"] += not tool_turns
        for m in tool_turns:
            for c in m["tool_calls"]:
                args = json.loads(c["function"]["arguments"])
                jsonschema.validate(args, schemas[c["function"]["name"]])
        results = [m["content"] for m in d["messages"] if m["role"] == "tool"]
        assert (results and not any(r.startswith("error") for r in results)) or not tool_turns
        assert d["messages"][-1]["role"] == "assistant" and not d["messages"][-1].get("tool_calls")
        assert len(chat.render(d["messages"], TOK, tools=d["tools"])[0]) <= 1024
    assert all(n > 0 for n in kinds.values()), kinds


def test_builtin_tool_simulators() -> None:
    store: dict[str, str] = {}
    assert toolgen.execute("calculator", {"expression": "(2 + 3) * 4 - 6 / 4"}, store) == "18.5"
    assert toolgen.execute("calculator", {"expression": "__import__('os')"}, store).startswith("error")
    assert toolgen.execute("convert_units", {"value": 100, "from": "C", "to": "F"}, store) == "212"
    assert toolgen.execute("convert_units", {"value": 1, "from": "mi", "to": "km"}, store) == "1.61"
    assert toolgen.execute("convert_units", {"value": 1, "from": "kg", "to": "km"}, store).startswith("error")
    assert toolgen.execute("kv_set", {"key": "pin", "value": "42"}, store) == "ok"
    assert toolgen.execute("kv_get", {"key": "pin"}, store) == "42"
    w = json.loads(toolgen.execute("get_weather", {"city": "Oslo"}, store))
    assert w == json.loads(toolgen.execute("get_weather", {"city": "oslo"}, {})) and set(w) == {"temp", "sky"}


def test_packed_batch_carries_the_document_layout() -> None:
    convs, _ = encode([_record(d) for d in toolgen.generate(8, seed=2)], TOK, 1024)
    rows = SFTRows(convs, 2048, pack=True, pad_id=TOK.pad_id)
    assert len(rows) < len(convs)
    x, y, layout = rows.batch(range(len(rows)))
    lengths = [[len(convs[c]) for c in row] for row in rows.rows]
    positions, cu = document_layout(lengths, x.shape[1])
    assert torch.equal(layout["positions"], positions) and torch.equal(layout["cu_seqlens"], cu)
    assert int((y != IGNORE_INDEX).sum()) == sum(int(c.mask[1:].sum()) for c in convs)
