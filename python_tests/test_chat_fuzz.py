"""Fuzzing ``parse_completion``: thousands of random, spliced and truncated completions. It must never raise,
must return well-formed OpenAI tool calls only, and must recover every call that is complete in the text, also
when the call's JSON arguments hold special-token strings."""

from __future__ import annotations

import json
import random
import re
from typing import Any

from k2.data.chat import (
    ARG_BEGIN,
    CALL_BEGIN,
    CALL_END,
    IM_END,
    SECTION_BEGIN,
    SECTION_END,
    STOP_TOKENS,
    parse_completion,
    render_text,
)
from k2.data.tokenizer import ByteTokenizer

MARKERS = [SECTION_BEGIN, SECTION_END, CALL_BEGIN, ARG_BEGIN, CALL_END, IM_END, "[EOS]", "<|im_middle|>"]
PIECES = ["functions.", "f", "get_weather", ":", "0", "12", "{", "}", '"a"', ":", "1", ",", "[", "]", " ", "\n", "<|"]


def _check_shape(result: Any) -> None:
    content, calls, errors = result
    assert isinstance(content, str)
    assert isinstance(errors, list) and all(isinstance(e, str) for e in errors)
    for c in calls:
        assert set(c) == {"id", "type", "function"} and c["type"] == "function"
        assert set(c["function"]) == {"name", "arguments"}
        assert c["function"]["name"] and re.fullmatch(r"[^\s<>]+:\d+", c["id"])
        assert isinstance(json.loads(c["function"]["arguments"]), dict)


SPECIALS = sorted(ByteTokenizer().special_tokens)  # all 256 special-token strings of Kimi-K2


def _valid_turn(rng: random.Random, values: list[str] | None = None) -> tuple[str, str, list[dict[str, Any]]]:
    """A rendered assistant turn (as generated: body + section + <|im_end|>), its content and its calls."""
    content = rng.choice(["", "Sure.", "Let me check 数据 {x}.", "a\nb"])
    calls = []
    for i in range(rng.randint(1, 4)):
        name = rng.choice(["search", "get_weather", "db.query"])
        q = rng.choice(values or ["a", "é", "}{", "<x>"])
        args = json.dumps({"q": q, "k": list(range(rng.randint(0, 3)))})
        calls.append({"id": f"functions.{name}:{i}", "type": "function", "function": {"name": name, "arguments": args}})
    text = render_text([{"role": "assistant", "content": content, "tool_calls": calls}], default_system=None)
    body = text.removeprefix("<|im_assistant|>assistant<|im_middle|>")
    return body, content, calls


def test_random_garbage_never_raises() -> None:
    rng = random.Random(0)
    for _ in range(3000):
        parts = rng.choices(
            MARKERS + PIECES + [chr(rng.randint(0, 0x10FFFF - 1)) for _ in range(3)], k=rng.randint(0, 40)
        )
        _check_shape(parse_completion("".join(parts)))
    for _ in range(500):  # pure noise, including lone surrogates
        noise = "".join(chr(rng.randint(0, 0xFFFF)) for _ in range(rng.randint(0, 200)))
        _check_shape(parse_completion(noise))
    _check_shape(parse_completion("[" * 100_000))  # deeply nested JSON must not blow the stack
    _check_shape(parse_completion(SECTION_BEGIN + CALL_BEGIN + "functions.f:0" + ARG_BEGIN + "[" * 100_000 + CALL_END))


def test_every_truncation_of_a_valid_turn() -> None:
    """At every cut, the calls whose <|tool_call_end|> is inside the prefix are recovered exactly."""
    rng = random.Random(1)
    n_checked = 0
    for _ in range(40):
        body, content, calls = _valid_turn(rng)
        for cut in range(len(body) + 1):
            prefix = body[:cut]
            got_content, got_calls, errors = parse_completion(prefix)
            _check_shape((got_content, got_calls, errors))
            n_complete = prefix.count(CALL_END)
            assert got_calls == calls[:n_complete], prefix
            if SECTION_BEGIN in prefix:
                assert got_content == content
                started = prefix.count(CALL_BEGIN)
                assert len(errors) == started - n_complete  # the one cut-off call, if any, is reported
            else:
                assert content.startswith(got_content) or got_content.startswith(content)
            n_checked += 1
    assert n_checked > 3000


def test_damaged_calls_do_not_hide_complete_ones() -> None:
    """Garbage between calls, a broken call among good ones, missing section end, trailing text after <|im_end|>."""
    rng = random.Random(2)
    for _ in range(1500):
        body, content, calls = _valid_turn(rng)
        pieces = body.split(CALL_BEGIN)
        bad_at = rng.randrange(len(pieces))  # 0 means: no broken call
        out = [pieces[0]]
        expected = []
        for i, piece in enumerate(pieces[1:], 1):
            if i == bad_at:
                piece = rng.choice(
                    [
                        piece.replace(ARG_BEGIN, ""),  # no argument marker
                        piece.replace(ARG_BEGIN, ARG_BEGIN + "{", 1),  # arguments not JSON
                        piece.replace(":", ";", 1),  # id without :IDX
                    ]
                )
            else:
                expected.append(calls[i - 1])
            noise = "".join(rng.choices(PIECES, k=rng.randint(0, 4))).replace("<|", "")
            out.append(piece + noise)
        text = CALL_BEGIN.join(out)
        if rng.random() < 0.5:
            text = text.replace(SECTION_END, "")
        text += rng.choice(["", "<|im_user|>user<|im_middle|>next", "garbage" + CALL_BEGIN])
        got_content, got_calls, errors = parse_completion(text)
        _check_shape((got_content, got_calls, errors))
        assert got_content == content
        assert got_calls == expected
        assert len(errors) == (1 if bad_at else 0)


def _call_spans(body: str, calls: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """Where each call's real ``<|tool_call_begin|>`` starts and its real ``<|tool_call_end|>`` ends in ``body``
    (found from the rendered pieces, not by searching for marker text that the arguments may also hold)."""
    spans, pos = [], 0
    for c in calls:
        head = f"{CALL_BEGIN}{c['id']}{ARG_BEGIN}{c['function']['arguments']}{CALL_END}"
        start = body.index(head, pos)
        pos = start + len(head)
        spans.append((start, pos))
    return spans


def test_special_token_strings_inside_arguments() -> None:
    """Arguments holding any mix of special-token strings: whole turns parse back exactly (with the turn's own
    <|im_end|> and trailing text, or ending before it); at every cut, exactly the calls complete in the prefix are
    recovered and a cut-off call is reported."""
    rng = random.Random(3)
    for _ in range(300):
        mix = ["".join(rng.choices([*SPECIALS, '"', "}", "{", "\\", " "], k=rng.randint(1, 6))) for _ in range(8)]
        body, content, calls = _valid_turn(rng, mix)
        tail = rng.choice(["", "<|im_user|>user<|im_middle|>next", "garbage" + CALL_BEGIN])
        assert parse_completion(body + tail) == (content, calls, [])
        assert parse_completion(body.removesuffix(IM_END), stop=()) == (content, calls, [])
    n_checked = 0
    for _ in range(30):  # one special-token string per call: a cut-off call cannot contain a whole fake call
        body, content, calls = _valid_turn(rng, SPECIALS)
        spans = _call_spans(body, calls)
        for cut in range(len(body) + 1):
            got_content, got_calls, errors = parse_completion(body[:cut])
            _check_shape((got_content, got_calls, errors))
            n_complete = sum(end <= cut for _, end in spans)
            started = sum(start + len(CALL_BEGIN) <= cut for start, _ in spans)
            assert got_calls == calls[:n_complete], body[:cut]
            assert bool(errors) == (started > n_complete), body[:cut]
            if SECTION_BEGIN in body[:cut]:
                assert got_content == content
            n_checked += 1
    assert n_checked > 3000


def test_stop_strings_inside_arguments_do_not_end_the_turn() -> None:
    for stop in STOP_TOKENS:
        args = json.dumps({"q": f"before {stop} after"})
        turn = f"{SECTION_BEGIN}{CALL_BEGIN}functions.f:0{ARG_BEGIN}{args}{CALL_END}{SECTION_END}{IM_END}"
        call = {"id": "functions.f:0", "type": "function", "function": {"name": "f", "arguments": args}}
        assert parse_completion(turn) == ("", [call], [])
