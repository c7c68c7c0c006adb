"""``math_reward``: math-verify equivalence on a table of equal and unequal answers (fractions, decimals, LaTeX,
sets, intervals, units, percentages), run in killable worker processes; a pathological answer that hangs sympy
times out in its worker, scores 0 with status ``timeout``, and the pool keeps grading afterwards."""

from __future__ import annotations

import time

import pytest

from k2.rl.rewards import MathReward

CASES = [
    # (reference, completion, equivalent)
    ("\\frac{1}{2}", "The answer is $\\boxed{0.5}$.", True),
    ("0.5", "So we get $\\boxed{\\frac{2}{4}}$", True),
    ("1.5", "$\\boxed{\\frac{3}{2}}$", True),
    ("\\frac{1}{3}", "$\\boxed{0.3}$", False),
    ("\\frac{\\sqrt{2}}{2}", "$\\boxed{\\frac{1}{\\sqrt{2}}}$", True),
    ("(x+1)^2", "Expanding, $\\boxed{x^2 + 2x + 1}$", True),
    ("\\{1, 2, 3\\}", "$\\boxed{\\{3, 2, 1\\}}$", True),
    ("\\{1, 2, 3\\}", "$\\boxed{\\{1, 2\\}}$", False),
    ("[0, 1)", "The interval is $\\boxed{[0, 1)}$", True),
    ("[0, 1)", "The interval is $\\boxed{(0, 1]}$", False),
    ("5", "The rod is $\\boxed{5 \\text{ cm}}$ long.", True),
    ("10\\%", "$\\boxed{0.1}$", True),
    ("3", "$\\boxed{4}$", False),
    ("-2", "$\\boxed{-2}$", True),
    ("2\\pi", "$\\boxed{\\pi \\cdot 2}$", True),
    ("7", "I do not know.", False),
]


@pytest.fixture(scope="module")
def reward():
    r = MathReward(num_workers=2, timeout_s=5.0)
    yield r
    r.close()


def test_equivalence_table(reward):
    golds = [g for g, _, _ in CASES]
    results = reward.results([None] * len(CASES), [c for _, c, _ in CASES], answer=golds)
    for (gold, completion, expected), result in zip(CASES, results, strict=True):
        assert result.score == float(expected), (gold, completion, result)
        assert result.status == ("passed" if expected else "failed")
    assert reward.metrics["status/passed"] == sum(e for *_, e in CASES)


def test_trl_contract_and_missing_reference(reward):
    scores = reward(
        ["q1", "q2"], [[{"role": "assistant", "content": "$\\boxed{2}$"}], "$\\boxed{2}$"], answer=["2", None]
    )
    assert scores == [1.0, None]


def test_pathological_input_times_out_in_the_child(reward):
    reward.pool.map([("1", "$\\boxed{1}$")], timeout_s=60)  # workers started, so the deadline measures grading
    restarts = reward.pool.restarts
    slow = MathReward.__new__(MathReward)
    slow.__dict__.update(reward.__dict__, timeout_s=1.5)
    start = time.monotonic()
    results = slow.results(None, ["$\\boxed{9^{9^{9^{9}}}}$", "$\\boxed{7}$"], answer=["7", "7"])
    elapsed = time.monotonic() - start
    assert results[0].status == "timeout" and results[0].score == 0.0 and "scored 0" in results[0].reason
    assert results[1].status == "passed"
    assert elapsed < 10
    assert reward.pool.restarts == restarts + 1
    assert reward(None, ["$\\boxed{3}$"], answer=["3"]) == [1.0]  # the replacement worker grades
