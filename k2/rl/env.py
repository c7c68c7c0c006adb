"""Environments for RL: a Gymnasium-style interface over token ids (and text), single-turn and multi-turn with
tool calls in the Kimi-K2 chat format (``k2.data.chat``).

Kimi K2's RL runs every task behind one Gym-like interface (arXiv 2507.20534 §3.2); this is its single-process
form. The interface is Gymnasium's (``reset(seed) -> (obs, info)``, ``step(action) -> (obs, reward, terminated,
truncated, info)``) with token ids as observations and actions, because the trainer must learn from exactly the
ids the engine sampled (no re-tokenisation):

- ``reset(seed)`` draws a problem and returns the rendered prompt, generation prompt included, as token ids;
- ``step(action)`` takes the ids of one assistant turn (the engine's tokens, ending with a stop id such as
  ``<|im_end|>``; a ``str`` is encoded first). A turn that calls tools, in an environment that declares tools and
  has turns left, is executed: the observation is the tool messages and the next generation prompt as ids (not the
  policy's actions: masked out of the loss) and the reward 0. Otherwise the episode ends (``terminated``) and the
  reward is the environment's reward function of the prompt and the episode's messages. A turn without a stop id
  (cut by a token budget) ends the episode as ``truncated``; it is graded too, and the trainer applies its
  truncation penalty.

``info`` carries ``messages`` (the prompt's), ``completion`` (the episode's assistant and tool messages so far),
``columns`` (the problem's dataset columns, e.g. ``answer``) and ``text`` (the observation decoded).

Rewards follow the contract of ``k2.rl.rewards``: ``reward(prompts, completions, **columns) -> list[float | None]``
(sync or async); ``None`` (not applicable) counts as 0.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from k2.data import chat
from k2.data.tokenizer import Tokenizer

RewardFn = Callable[..., Any]
ToolFn = Callable[[str, dict[str, Any]], str]  # (tool name, arguments) -> result text


@dataclass
class Problem:
    """One prompt: chat messages, optional tools to declare, and dataset columns for the reward."""

    messages: list[dict[str, Any]]
    columns: dict[str, Any] = field(default_factory=dict)
    tools: list[dict[str, Any]] | None = None


class Task(Protocol):
    """A source of problems: the same ``seed`` gives the same problem."""

    name: str

    def sample(self, rng: random.Random) -> Problem: ...


class Env(Protocol):
    def reset(self, seed: int | None = None) -> tuple[list[int], dict[str, Any]]: ...

    def step(self, action: Sequence[int] | str) -> tuple[list[int], float, bool, bool, dict[str, Any]]: ...


def call_reward(reward: RewardFn, prompts: list[Any], completions: list[Any], **columns: list[Any]) -> list[float]:
    """Run a reward of the ``k2.rl.rewards`` contract (sync or async); ``None`` scores become 0.0."""
    out = reward(prompts, completions, **columns)
    if inspect.isawaitable(out):
        out = asyncio.run(_await(out))
    scores = list(out)
    if len(scores) != len(completions):
        raise ValueError(f"reward returned {len(scores)} scores for {len(completions)} completions")
    return [0.0 if s is None else float(s) for s in scores]


async def _await(x: Any) -> Any:
    return await x


class ChatEnv:
    """A chat task as an environment: single-turn (``max_turns=1`` or no tools) or multi-turn with tools.

    ``tool_fn(name, arguments) -> str`` executes a call (its text is the tool message's content; an exception
    becomes ``error: ...``). The episode ends at the first turn without tool calls, at ``max_turns`` assistant
    turns, or when a turn is cut (truncated)."""

    def __init__(
        self,
        task: Task,
        tokenizer: Tokenizer,
        reward: RewardFn,
        *,
        tool_fn: ToolFn | None = None,
        max_turns: int = 1,
    ) -> None:
        if max_turns < 1:
            raise ValueError(f"ChatEnv: max_turns must be >= 1, got {max_turns}")
        self.task, self.tokenizer, self.reward = task, tokenizer, reward
        self.tool_fn, self.max_turns = tool_fn, max_turns
        self.name = getattr(task, "name", type(task).__name__)
        self.stop_ids = set(chat.stop_token_ids(tokenizer))
        self._problem: Problem | None = None
        self._completion: list[dict[str, Any]] = []
        self._turns = 0

    def reset(self, seed: int | None = None) -> tuple[list[int], dict[str, Any]]:
        self._problem = self.task.sample(random.Random(seed))
        self._completion, self._turns = [], 0
        ids, _ = chat.render(
            self._problem.messages, self.tokenizer, tools=self._problem.tools, add_generation_prompt=True
        )
        return ids, self._info(ids)

    def step(self, action: Sequence[int] | str) -> tuple[list[int], float, bool, bool, dict[str, Any]]:
        if self._problem is None:
            raise RuntimeError("ChatEnv.step before reset")
        ids = self.tokenizer.encode(action, allow_special=True) if isinstance(action, str) else [int(t) for t in action]
        stopped = bool(ids) and ids[-1] in self.stop_ids
        text = self.tokenizer.decode(ids[:-1] if stopped else ids)
        content, calls, _ = chat.parse_completion(text, stop=())
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = calls
        self._completion.append(message)
        self._turns += 1
        can_call = bool(self._problem.tools) and self.tool_fn is not None and self._turns < self.max_turns
        if stopped and calls and can_call:
            results = [self._run_tool(c) for c in calls]
            obs, _ = chat.render(results, self.tokenizer, add_generation_prompt=True, default_system=None)
            self._completion.extend(results)
            return obs, 0.0, False, False, self._info(obs)
        reward = self.score([self._problem], [self._completion])[0]
        return [], reward, stopped, not stopped, self._info([])

    def score(self, problems: Sequence[Problem], completions: Sequence[list[dict[str, Any]]]) -> list[float]:
        """The reward of finished episodes (batched, as the reward contract allows)."""
        names = sorted({k for p in problems for k in p.columns})
        columns = {k: [p.columns.get(k) for p in problems] for k in names}
        return call_reward(self.reward, [p.messages for p in problems], [list(c) for c in completions], **columns)

    def _run_tool(self, call: Mapping[str, Any]) -> dict[str, Any]:
        fn = call["function"]
        try:
            args = json.loads(fn["arguments"])
            result = self.tool_fn(fn["name"], args)  # type: ignore[misc]
        except Exception as e:  # a tool's failure is the model's observation, not the trainer's
            result = f"error: {e}"
        return {"role": "tool", "tool_call_id": call["id"], "name": fn["name"], "content": str(result)}

    def _info(self, obs: list[int]) -> dict[str, Any]:
        assert self._problem is not None
        return {
            "messages": self._problem.messages,
            "completion": list(self._completion),
            "columns": dict(self._problem.columns),
            "text": self.tokenizer.decode(obs),
            "env": self.name,
        }
