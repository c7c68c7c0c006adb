"""Built-in tools and a deterministic generator of tool-use dialogues: the data of ``k2 sft``'s embedded default.

Kimi K2's SFT corpus is built from tool specs, agents, tasks and simulated trajectories (K2 report, arXiv
2507.20534 §3.1). This module is the smallest stand-in that exercises the same format end to end: five small
tools with JSON schemas, each backed by a deterministic simulator (``execute``), and dialogues in the OpenAI chat
format (``{"messages": [...], "tools": [...]}``) with single and parallel calls, tool results and a final answer,
multi-turn state (the key-value store) and a few turns that need no tool. Most dialogues (a third of the tokens)
are tool-free single-digit arithmetic answered by restating the expression (``4+7=11``): what ``k2 rl``'s default
task asks.

Tools: ``calculator`` (arithmetic on + - * / and parentheses, evaluated over a Python AST, never ``eval``),
``convert_units`` (length, mass, temperature), ``kv_set`` / ``kv_get`` (a key-value store kept per dialogue),
``get_weather`` (a simulated lookup: the same city always has the same weather).

Each dialogue declares the tools it needs, sometimes plus a distractor, in a random order, so the model must
read the declaration to choose; rendered with the byte tokenizer a dialogue fits the ``tiny`` model's 1024
positions. ``generate(n, seed)`` returns the same ``n`` dialogues for the same seed on every
machine (``random.Random``; no hash randomisation, no floating-point formatting that depends on the platform).
"""

from __future__ import annotations

import ast
import json
import operator
import random
import zlib
from collections.abc import Callable
from typing import Any

UNITS = ("km", "mi", "m", "ft", "kg", "lb", "C", "F")
# unit → (dimension, factor to the dimension's base unit); temperature is affine and handled apart.
_LINEAR = {"km": ("length", 1000.0), "mi": ("length", 1609.344), "m": ("length", 1.0), "ft": ("length", 0.3048)}
_LINEAR |= {"kg": ("mass", 1.0), "lb": ("mass", 0.45359237)}
_UNIT_WORDS = {
    "km": "kilometers",
    "mi": "miles",
    "m": "meters",
    "ft": "feet",
    "kg": "kilograms",
    "lb": "pounds",
    "C": "degrees Celsius",
    "F": "degrees Fahrenheit",
}
_PAIRS = (("km", "mi"), ("mi", "km"), ("m", "ft"), ("ft", "m"), ("kg", "lb"), ("lb", "kg"), ("C", "F"), ("F", "C"))


def _tool(name: str, description: str, properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    params = {"type": "object", "properties": properties, "required": required}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": params}}


TOOLS: dict[str, dict[str, Any]] = {
    "calculator": _tool("calculator", "Evaluate arithmetic.", {"expression": {"type": "string"}}, ["expression"]),
    "convert_units": _tool(
        "convert_units",
        "Convert a quantity.",
        {
            "value": {"type": "number"},
            "from": {"type": "string", "enum": list(UNITS)},
            "to": {"type": "string", "enum": list(UNITS)},
        },
        ["value", "from", "to"],
    ),
    "kv_set": _tool(
        "kv_set", "Store a value.", {"key": {"type": "string"}, "value": {"type": "string"}}, ["key", "value"]
    ),
    "kv_get": _tool("kv_get", "Read a stored value.", {"key": {"type": "string"}}, ["key"]),
    "get_weather": _tool(
        "get_weather",
        "Current weather in a city.",
        {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        ["city"],
    ),
}


def builtin_tools() -> list[dict[str, Any]]:
    """All built-in tools as OpenAI function tools (fresh copies)."""
    return json.loads(json.dumps(list(TOOLS.values())))


# ---- simulators --------------------------------------------------------------------------------------------------

_BINOPS: dict[type, Callable[[float, float], float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}


def _arith(node: ast.AST) -> float:
    if isinstance(node, ast.Expression):
        return _arith(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        v = _arith(node.operand)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        return _BINOPS[type(node.op)](_arith(node.left), _arith(node.right))
    raise ValueError("only numbers, + - * / and parentheses are allowed")


def _number(x: float) -> str:
    """A result as people write it: integers without a point, others to at most 2 decimals."""
    r = round(float(x), 2)
    return str(int(r)) if r == int(r) else f"{r:.2f}".rstrip("0")


def calculate(expression: str) -> str:
    if len(expression) > 200:
        raise ValueError("expression too long")
    try:
        return _number(_arith(ast.parse(expression, mode="eval")))
    except ZeroDivisionError:
        raise ValueError("division by zero") from None
    except SyntaxError:
        raise ValueError(f"cannot parse {expression!r}") from None


def convert(value: float, from_unit: str, to_unit: str) -> str:
    if from_unit not in UNITS or to_unit not in UNITS:
        raise ValueError(f"units must be among {', '.join(UNITS)}")
    if {from_unit, to_unit} <= {"C", "F"}:
        c = value if from_unit == "C" else (value - 32) * 5 / 9
        return _number(c if to_unit == "C" else c * 9 / 5 + 32)
    (dim_a, fa), (dim_b, fb) = _LINEAR.get(from_unit, ("temp", 0)), _LINEAR.get(to_unit, ("temp", 0))
    if dim_a != dim_b:
        raise ValueError(f"cannot convert {from_unit} to {to_unit}")
    return _number(value * fa / fb)


_SKIES = ("sunny", "cloudy", "rainy", "windy", "foggy", "snowy")


def weather(city: str, unit: str = "celsius") -> str:
    """Simulated: a city's weather is a fixed function of its name (CRC-32, the same on every machine)."""
    h = zlib.crc32(city.strip().lower().encode("utf-8"))
    c = h % 35 - 5
    temp = c if unit == "celsius" else round(c * 9 / 5 + 32)
    return json.dumps({"temp": temp, "sky": _SKIES[(h >> 8) % len(_SKIES)]})


def execute(name: str, arguments: dict[str, Any], store: dict[str, str]) -> str:
    """Run a built-in tool; ``store`` is the dialogue's key-value state. Errors come back as ``error: ...`` text
    (what a tool would return to the model), never as exceptions."""
    try:
        if name == "calculator":
            return calculate(str(arguments["expression"]))
        if name == "convert_units":
            return convert(float(arguments["value"]), str(arguments["from"]), str(arguments["to"]))
        if name == "kv_set":
            store[str(arguments["key"])] = str(arguments["value"])
            return "ok"
        if name == "kv_get":
            key = str(arguments["key"])
            return store.get(key, f"error: no value stored under {key!r}")
        if name == "get_weather":
            return weather(str(arguments["city"]), str(arguments.get("unit", "celsius")))
    except (KeyError, TypeError, ValueError) as e:
        return f"error: {e}"
    return f"error: unknown tool {name!r}"


# ---- dialogues ---------------------------------------------------------------------------------------------------

_CITIES = ("Paris", "Tokyo", "Oslo", "Lima", "Cairo", "Rome", "Berlin", "Madrid", "Seoul", "Sydney", "Toronto")
_CITIES += ("Nairobi", "Lisbon", "Dublin", "Vienna", "Prague", "Austin", "Denver", "Mumbai", "Quito", "Hanoi")
_KEYS = ("locker code", "wifi password", "parking spot", "favorite color", "dentist", "gate number", "pin")
_KEYS += ("room", "flight", "order id", "pet name", "book", "team")
_WORDS = ("blue", "green", "C12", "B7", "dr kim", "tuesday", "luna", "rex", "dune", "red team", "x9z", "4821")
_OPS = (("+", "plus"), ("-", "minus"), ("*", "times"), ("/", "divided by"))
MENTAL_OPS = _OPS[:3]  # single-digit questions answered without the calculator (integer results)


def _call(name: str, args: dict[str, Any], idx: int) -> dict[str, Any]:
    return {
        "id": f"functions.{name}:{idx}",
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(args)},
    }


class _Dialogue:
    """Builds one conversation: user turns, tool-calling turns executed by the simulators, final answers."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.used: set[str] = set()
        self.store: dict[str, str] = {}
        self.n_calls = 0

    def user(self, text: str) -> None:
        self.messages.append({"role": "user", "content": text})

    def calls(self, calls: list[tuple[str, dict[str, Any]]]) -> list[str]:
        """An assistant turn with these calls, then one tool message per call; returns the results."""
        made = [_call(name, args, self.n_calls + i) for i, (name, args) in enumerate(calls)]
        self.n_calls += len(calls)
        self.messages.append({"role": "assistant", "content": "", "tool_calls": made})
        results = []
        for (name, args), c in zip(calls, made, strict=True):
            self.used.add(name)
            results.append(execute(name, args, self.store))
            self.messages.append({"role": "tool", "tool_call_id": c["id"], "name": name, "content": results[-1]})
        return results

    def answer(self, text: str) -> None:
        self.messages.append({"role": "assistant", "content": text})


HELDOUT_BUCKETS = 10  # one single-digit expression in HELDOUT_BUCKETS is kept out of the SFT data (k2 rl's held-out)


def is_heldout(expression: str) -> bool:
    """Whether ``expression`` (``"a OP b"``) belongs to the held-out tenth, by a CRC-32 of its text: ``k2 rl``
    scores held-out accuracy on these and the built-in SFT data never shows them."""
    return zlib.crc32(expression.encode()) % HELDOUT_BUCKETS == 0


def arith_question(rng: random.Random, a: int, op: tuple[str, str], b: int) -> str:
    """How the built-in data asks for ``a OP b`` (``op`` = (symbol, word)), one of four phrasings."""
    sym, word = op
    expr = f"{a} {sym} {b}"
    return rng.choice((f"What is {a} {word} {b}?", f"Compute {expr}.", f"calculate {a}{sym}{b}", f"{expr} = ?"))


def _arith_case(rng: random.Random) -> tuple[str, str]:
    op = rng.choice(_OPS)
    a, b = rng.randint(2, 999), rng.randint(2, 99)
    return f"{a} {op[0]} {b}", arith_question(rng, a, op, b)


def _calc(d: _Dialogue, rng: random.Random) -> None:
    expr, question = _arith_case(rng)
    d.user(question)
    (result,) = d.calls([("calculator", {"expression": expr})])
    d.answer(rng.choice((f"{expr} = {result}.", f"The answer is {result}.", f"It is {result}.")))


def _calc_parallel(d: _Dialogue, rng: random.Random) -> None:
    (e1, _), (e2, _) = _arith_case(rng), _arith_case(rng)
    d.user(rng.choice((f"What are {e1} and {e2}?", f"Compute {e1} and also {e2}.", f"{e1} = ? and {e2} = ?")))
    r1, r2 = d.calls([("calculator", {"expression": e1}), ("calculator", {"expression": e2})])
    d.answer(f"{e1} = {r1} and {e2} = {r2}.")


def _convert_case(rng: random.Random) -> tuple[dict[str, Any], str]:
    src, dst = rng.choice(_PAIRS)
    value = rng.randint(1, 500) if rng.random() < 0.8 else rng.randint(1, 999) / 10
    args = {"value": value, "from": src, "to": dst}
    question = rng.choice(
        (
            f"Convert {value} {src} to {dst}.",
            f"How many {_UNIT_WORDS[dst]} is {value} {_UNIT_WORDS[src]}?",
            f"{value} {src} in {dst}?",
        )
    )
    return args, question


def _convert(d: _Dialogue, rng: random.Random) -> None:
    args, question = _convert_case(rng)
    d.user(question)
    (result,) = d.calls([("convert_units", args)])
    d.answer(f"{args['value']} {args['from']} is {result} {args['to']}.")


def _weather_args(rng: random.Random) -> tuple[dict[str, Any], str]:
    city = rng.choice(_CITIES)
    if rng.random() < 0.3:
        return {"city": city, "unit": "fahrenheit"}, f"{city} in fahrenheit"
    return {"city": city}, city


def _weather(d: _Dialogue, rng: random.Random) -> None:
    args, where = _weather_args(rng)
    d.user(rng.choice((f"What's the weather in {where}?", f"Weather for {where}, please.", f"Is it warm in {where}?")))
    (result,) = d.calls([("get_weather", args)])
    w = json.loads(result)
    d.answer(f"It is {w['temp']} degrees and {w['sky']} in {args['city']}.")


def _weather_parallel(d: _Dialogue, rng: random.Random) -> None:
    c1, c2 = rng.sample(_CITIES, 2)
    d.user(rng.choice((f"Weather in {c1} and {c2}?", f"Compare the weather in {c1} and {c2}.")))
    r1, r2 = (json.loads(r) for r in d.calls([("get_weather", {"city": c1}), ("get_weather", {"city": c2})]))
    d.answer(f"{c1}: {r1['temp']} degrees, {r1['sky']}. {c2}: {r2['temp']} degrees, {r2['sky']}.")


def _mixed_parallel(d: _Dialogue, rng: random.Random) -> None:
    expr, question = _arith_case(rng)
    w_args, where = _weather_args(rng)
    d.user(f"{question} Also, the weather in {where}?")
    r1, r2 = d.calls([("calculator", {"expression": expr}), ("get_weather", w_args)])
    d.answer(f"{expr} = {r1}; {w_args['city']} is {json.loads(r2)['sky']}.")


def _memory(d: _Dialogue, rng: random.Random) -> None:
    key, value = rng.choice(_KEYS), rng.choice(_WORDS)
    d.user(rng.choice((f"Remember that my {key} is {value}.", f"Please save my {key}: {value}")))
    d.calls([("kv_set", {"key": key, "value": value})])
    d.answer(rng.choice(("Saved.", f"Done, I stored your {key}.")))
    d.user(rng.choice((f"What is my {key}?", f"Remind me of my {key}.")))
    (result,) = d.calls([("kv_get", {"key": key})])
    d.answer(f"Your {key} is {result}.")


def _mental(d: _Dialogue, rng: random.Random) -> None:
    """Single-digit arithmetic answered without a tool, restating the expression as the pre-training corpus writes
    it (``3+4=7``): the model copies the operands, then the corpus's arithmetic gives the result."""
    while True:
        op = rng.choice(MENTAL_OPS)
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        if not is_heldout(f"{a} {op[0]} {b}"):
            break
    d.user(arith_question(rng, a, op, b))
    d.answer(f"{a}{op[0]}{b}={calculate(f'{a} {op[0]} {b}')}")


def _smalltalk(d: _Dialogue, rng: random.Random) -> None:
    d.user(rng.choice(("Hi!", "Hello there.", "Thanks!", "Who are you?")))
    d.answer("Hello! I can calculate, convert units, remember things and look up the weather.")


# (builder, the tools it needs, weight, whether a distractor tool may be declared too: not where the dialogue is
# already long)
_KINDS: tuple[tuple[Callable[[_Dialogue, random.Random], None], tuple[str, ...], int, bool], ...] = (
    (_calc, ("calculator",), 5, True),
    (_calc_parallel, ("calculator",), 2, True),
    (_convert, ("convert_units",), 4, True),
    (_weather, ("get_weather",), 4, True),
    (_weather_parallel, ("get_weather",), 2, False),
    (_mixed_parallel, ("calculator", "get_weather"), 2, False),
    (_memory, ("kv_set", "kv_get"), 3, False),
    (_smalltalk, (), 1, True),
    # Short (~30 tokens, no tool declared): ~87 % of the dialogues, a third of the tokens.
    (_mental, (), 150, False),
)


def dialogue(rng: random.Random) -> dict[str, Any]:
    """One random dialogue ``{"messages", "tools"}``: the tools it needs, plus another one (a distractor) for
    40 % of the short kinds and for small talk (mental arithmetic declares none); at most 1024 byte tokens."""
    builder, needed, _, distractor = rng.choices(_KINDS, weights=[k[2] for k in _KINDS])[0]
    d = _Dialogue()
    builder(d, rng)
    names = list(needed)
    if distractor and (not names or rng.random() < 0.4):
        names.append(rng.choice([n for n in TOOLS if n not in names]))
    rng.shuffle(names)
    return {"messages": d.messages, "tools": [TOOLS[n] for n in names]}


def generate(n: int, *, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` dialogues, the same for the same ``seed``."""
    rng = random.Random(seed)
    return [dialogue(rng) for _ in range(n)]
