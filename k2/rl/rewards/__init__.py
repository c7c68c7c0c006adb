"""Rewards for RL: the verifiable rewards gym and the self-critique rubric reward of Kimi K2 (arXiv 2507.20534
§3.2). Every reward follows one contract (``k2.rl.rewards.base``): ``reward(prompts, completions, **columns) ->
list[float | None]``, with per-sample :class:`RewardResult` from ``reward.results(...)`` and metrics in
``reward.metrics``.

- :data:`math_reward` (column ``answer``): ``math-verify`` equivalence in killable worker processes;
- :data:`puzzle_reward` (column ``puzzle``): 24-game, Sudoku and cryptarithms with generators and exact checks;
- :data:`ifeval_reward` (column ``instructions``): IFEval-style verifiable constraints plus a hack check;
- :data:`code_reward` (column ``tests``): the completion's code and the tests run in ``k2.rl.sandbox``;
- :class:`RubricCritic`: pairwise self-critique against core, prescriptive and per-prompt rubrics.
"""

from k2.rl.rewards.base import Combined, Reward, RewardResult, SampleReward, call_reward, combine, summarize, text_of
from k2.rl.rewards.code import CodeReward, code_reward, extract_code
from k2.rl.rewards.critic import (
    CORE_RUBRICS,
    PRESCRIPTIVE_RUBRICS,
    CalibrationReport,
    CritiqueResult,
    RubricCritic,
    engine_chat,
    openai_chat,
)
from k2.rl.rewards.ifeval import CONSTRAINTS, IFEvalReward, compliance_claims, ifeval_reward
from k2.rl.rewards.math import MathReward, math_reward
from k2.rl.rewards.puzzles import PuzzleReward, cryptarithm, game24, puzzle_reward, sudoku

__all__ = [
    "CONSTRAINTS",
    "CORE_RUBRICS",
    "PRESCRIPTIVE_RUBRICS",
    "CalibrationReport",
    "CodeReward",
    "Combined",
    "CritiqueResult",
    "IFEvalReward",
    "MathReward",
    "PuzzleReward",
    "Reward",
    "RewardResult",
    "RubricCritic",
    "SampleReward",
    "call_reward",
    "code_reward",
    "combine",
    "compliance_claims",
    "cryptarithm",
    "engine_chat",
    "extract_code",
    "game24",
    "ifeval_reward",
    "math_reward",
    "openai_chat",
    "puzzle_reward",
    "sudoku",
    "summarize",
    "text_of",
]
