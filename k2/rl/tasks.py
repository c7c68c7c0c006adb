"""The built-in verifiable task of ``k2 rl``'s embedded default: arithmetic questions in the chat format, with an
exact-answer reward.

The questions are phrased as the built-in SFT dialogues ask them (``k2.data.toolgen.arith_question``: "What is 4
plus 7?", "Compute 4 + 7.", ...). Two environments:

- ``arith`` (the default): single turn, no tools declared; the model writes the answer itself. The built-in SFT
  data teaches it to restate the expression as the pre-training corpus writes it (``4+7=11``), so the result comes
  from the corpus's arithmetic;
- ``arith_tools``: the ``calculator`` tool is declared and executed (``k2.data.toolgen.execute``); the model calls
  it, reads the result (tool tokens are masked out of the loss) and answers, up to ``max_turns`` turns. The default
  ``tiny`` model does not copy the operands into the call, so it scores at chance here.

The reward, :func:`exact_answer_reward`, is 1 when the last number in the final assistant message equals the
``answer`` column, else 0. Problems are split by a hash of their expression (``k2.data.toolgen.is_heldout``): one
in ten is held out (never sampled for training, absent from the built-in SFT data), and the held-out accuracy is
measured on those.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import Any

from k2.data import toolgen
from k2.rl.env import ChatEnv, Problem, RewardFn

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def final_text(completion: Any) -> str:
    """The graded text: a string as is, else the content of the last assistant message of a message list."""
    if isinstance(completion, str):
        return completion
    for message in reversed(list(completion)):
        if message.get("role") == "assistant":
            return str(message.get("content") or "")
    return ""


def last_number(text: str) -> str | None:
    found = _NUMBER.findall(text)
    return found[-1] if found else None


def exact_answer_reward(prompts: Sequence[Any], completions: Sequence[Any], answer: Sequence[Any], **_: Any) -> list:
    """1.0 where the last number of the completion's final assistant message equals ``answer`` (numerically), else
    0.0; ``None`` where a sample has no answer. The ``k2.rl.rewards`` contract."""
    out: list[float | None] = []
    for completion, want in zip(completions, answer, strict=True):
        if want is None:
            out.append(None)
            continue
        got = last_number(final_text(completion))
        out.append(float(got is not None and float(got) == float(want)))
    return out


class ArithmeticTask:
    """``a OP b`` with ``a`` in [0, max_a], ``b`` in [0, max_b], OP in + - *; ``heldout`` picks the held-out
    tenth (``k2.data.toolgen.is_heldout``) instead of the training nine tenths."""

    def __init__(
        self, *, max_a: int = 9, max_b: int = 9, tools: bool = False, heldout: bool = False, name: str | None = None
    ) -> None:
        self.max_a, self.max_b, self.tools, self.heldout = max_a, max_b, tools, heldout
        self.name = name or ("arith_tools" if tools else "arith")

    def sample(self, rng: random.Random) -> Problem:
        while True:
            op = rng.choice(toolgen.MENTAL_OPS)
            a, b = rng.randint(0, self.max_a), rng.randint(0, self.max_b)
            expr = f"{a} {op[0]} {b}"
            if toolgen.is_heldout(expr) == self.heldout:
                break
        question = toolgen.arith_question(rng, a, op, b)
        tools = [toolgen.TOOLS["calculator"]] if self.tools else None
        return Problem([{"role": "user", "content": question}], {"answer": toolgen.calculate(expr)}, tools)


def calculator(name: str, arguments: dict[str, Any]) -> str:
    """The built-in tools' simulators (``k2.data.toolgen.execute``) with a fresh key-value store."""
    return toolgen.execute(name, arguments, {})


BUILTIN_ENVS = ("arith", "arith_tools")


def builtin_env(
    name: str, tokenizer, *, reward: RewardFn | None = None, heldout: bool = False, max_turns: int = 3
) -> ChatEnv:
    """A built-in environment by name (:data:`BUILTIN_ENVS`), graded by ``reward`` (default
    :func:`exact_answer_reward`)."""
    if name not in BUILTIN_ENVS:
        raise ValueError(f"unknown built-in environment {name!r}; choose from {', '.join(BUILTIN_ENVS)}")
    tools = name == "arith_tools"
    task = ArithmeticTask(tools=tools, heldout=heldout, name=name)
    return ChatEnv(
        task,
        tokenizer,
        reward or exact_answer_reward,
        tool_fn=calculator if tools else None,
        max_turns=max_turns if tools else 1,
    )
