"""The reward contract: plain TRL-style functions (sync and async) and k2 rewards combine with weights; ``None``
(not applicable) is skipped, not counted as 0; metrics are reported per part."""

from __future__ import annotations

import asyncio
import math

from k2.rl.rewards import RewardResult, combine, ifeval_reward, puzzle_reward, text_of
from k2.rl.rewards.base import call_reward, summarize


def length_reward(prompts, completions, **kwargs):
    return [len(text_of(c)) / 10 for c in completions]


async def async_reward(prompts, completions, flag=None, **kwargs):
    await asyncio.sleep(0)
    return [1.0 if f else None for f in flag]


def test_weighted_combination_skips_not_applicable():
    combined = combine((length_reward, 0.5), (async_reward, 2.0))
    scores = combined(["p"] * 3, ["abcde", "0123456789", ""], flag=[True, False, None])
    assert scores == [0.25 + 2.0, 0.5, 0.0]
    assert combined.metrics["length_reward/mean"] == 0.5
    assert combined.metrics["async_reward/applicable"] == 1
    assert combined.metrics["mean"] == (2.25 + 0.5 + 0.0) / 3


def test_named_parts_with_k2_rewards_and_chat_completions():
    instructions = [[{"id": "punctuation:no_comma"}], None]
    completions = [[{"role": "assistant", "content": "No commas"}], [{"role": "assistant", "content": "x"}]]
    combined = combine(ifeval=(ifeval_reward, 1.0), puzzle=(puzzle_reward, 1.0))
    assert combined(None, completions, instructions=instructions, puzzle=[None, None]) == [1.0, None]
    assert combined.metrics["ifeval/status/passed"] == 1 and combined.metrics["puzzle/status/skipped"] == 2


def test_call_reward_and_summary():
    assert asyncio.run(call_reward(async_reward, None, ["a"], flag=[1])) == [1.0]
    assert asyncio.run(call_reward(ifeval_reward, None, ["a"], instructions=[None])) == [None]
    metrics = summarize([RewardResult(1.0, "passed"), RewardResult(0.0, "timeout"), RewardResult(None, "skipped")], 1.0)
    assert metrics["mean"] == 0.5 and metrics["status/timeout"] == 1 and metrics["samples_per_s"] == 3
    assert math.isnan(summarize([], 1.0)["mean"])
    assert ifeval_reward.__name__ == "ifeval"


def test_sync_call_inside_a_running_loop():
    async def main():
        return combine((async_reward, 1.0))(None, ["a"], flag=[True])

    assert asyncio.run(main()) == [1.0]
