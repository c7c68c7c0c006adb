"""Tool-call accuracy of a model on held-out conversations: the yardstick of ``k2 sft`` beyond the loss.

For every assistant turn of a held-out conversation that calls tools, the model sees the conversation up to that
turn (tools declared, Kimi-K2 format, generation prompt) and generates the turn greedily with the k2 ``Engine``;
the completion is parsed with ``k2.data.chat.parse_completion`` and compared with the reference turn:

- **validity**: the turn parses with no error into at least one call, every call names a declared tool and its
  arguments validate against that tool's JSON Schema (``jsonschema``, the draft the schema declares, 2020-12 by
  default);
- **exact**: valid, and the calls are those of the reference as a multiset of (name, arguments), arguments
  compared as JSON values (key order, spacing and ``1`` vs ``1.0`` do not matter; call order and ids do not
  either: parallel calls are unordered).

``tool_call_validity`` and ``tool_call_exact`` are the fractions of scored turns; a turn that answers in text
instead of calling, calls an undeclared tool, breaks the JSON or the schema is invalid; an extra or a missing call
is valid but not exact.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from k2.data import chat
from k2.data.sft import Record, call_arguments, tool_schemas
from k2.data.tokenizer import Tokenizer
from k2.model import Transformer


@dataclass(frozen=True)
class ToolTurn:
    """An assistant turn to reproduce: the conversation before it, the declared tools, its reference calls."""

    messages: list[dict[str, Any]]
    tools: list[Any]
    reference: list[dict[str, Any]]  # OpenAI tool_calls


def tool_turns(records: Sequence[Record], limit: int) -> list[ToolTurn]:
    """The first ``limit`` assistant turns with tool calls, in record order."""
    out: list[ToolTurn] = []
    for r in records:
        for i, msg in enumerate(r.messages):
            if len(out) >= limit:
                return out
            if msg.get("role") == "assistant" and msg.get("tool_calls"):
                out.append(ToolTurn(r.messages[:i], r.tools, list(msg["tool_calls"])))
    return out


def _as_value(x: Any) -> Any:
    """JSON value equality: numbers as floats (``1`` equals ``1.0``; booleans stay booleans), keys unordered."""
    if isinstance(x, bool) or x is None or isinstance(x, str):
        return x
    if isinstance(x, int | float):
        return float(x)
    if isinstance(x, dict):
        return {k: _as_value(v) for k, v in x.items()}
    return [_as_value(v) for v in x]


def _canonical(name: str, args: Any) -> str:
    return json.dumps([name, _as_value(args)], sort_keys=True)


@dataclass(frozen=True)
class Score:
    valid: bool
    exact: bool
    reason: str  # why not valid / not exact; "" when exact


def score_turn(completion: str, turn: ToolTurn) -> Score:
    """Score one generated turn (its text with special tokens as strings, ending before the stop token)."""
    import jsonschema

    schemas = tool_schemas(turn.tools)
    _, calls, errors = chat.parse_completion(completion, stop=())  # the engine stopped on the ids
    if errors:
        return Score(False, False, errors[0])
    if not calls:
        return Score(False, False, "no tool call")
    got = []
    for call in calls:
        name = call["function"]["name"]
        if name not in schemas:
            return Score(False, False, f"call to undeclared tool {name!r}")
        args = json.loads(call["function"]["arguments"])
        error = jsonschema.exceptions.best_match(
            jsonschema.validators.validator_for(schemas[name])(schemas[name]).iter_errors(args)
        )
        if error is not None:
            return Score(False, False, f"{name}: arguments violate the schema: {error.message}")
        got.append(_canonical(name, args))
    want = sorted(_canonical(c["function"]["name"], call_arguments(c)) for c in turn.reference)
    if sorted(got) != want:
        return Score(True, False, f"calls {sorted(got)} differ from the reference {want}")
    return Score(True, True, "")


def generate_turns(
    model: Transformer,
    tokenizer: Tokenizer,
    turns: Sequence[ToolTurn],
    *,
    max_new_tokens: int,
    batch_size: int = 16,
) -> list[str]:
    """Greedy completions of ``turns`` with the k2 ``Engine`` (the model is put back in its training mode)."""
    from k2.infer import Engine, SamplingParams

    if not turns:
        return []
    was_training = model.training
    prompts = [chat.render(t.messages, tokenizer, tools=t.tools or None, add_generation_prompt=True)[0] for t in turns]
    max_seq_len = min(max(len(p) for p in prompts) + max_new_tokens, model.config.max_position_embeddings)
    try:
        engine = Engine(model, tokenizer, max_batch_size=min(batch_size, len(prompts)), max_seq_len=max_seq_len)
        params = SamplingParams(
            max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=chat.stop_token_ids(tokenizer)
        )
        fits = [p for p in prompts if len(p) < engine.max_seq_len]
        done = iter(engine.generate(fits, params))
        return [next(done).text if len(p) < engine.max_seq_len else "" for p in prompts]
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate_tool_calls(
    model: Transformer, tokenizer: Tokenizer, turns: Sequence[ToolTurn], *, max_new_tokens: int, batch_size: int = 16
) -> dict[str, Any]:
    """``{"tool_call_validity", "tool_call_exact", "tool_turns"}`` over ``turns`` (fractions in [0, 1])."""
    texts = generate_turns(model, tokenizer, turns, max_new_tokens=max_new_tokens, batch_size=batch_size)
    scores = [score_turn(text, turn) for text, turn in zip(texts, turns, strict=True)]
    n = max(len(scores), 1)
    return {
        "tool_call_validity": sum(s.valid for s in scores) / n,
        "tool_call_exact": sum(s.exact for s in scores) / n,
        "tool_turns": len(scores),
    }
