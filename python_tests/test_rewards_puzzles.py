"""Puzzle generators and verifiers: every generated puzzle's own solution is accepted (and other valid answers
too), perturbed solutions are rejected, and generation is deterministic in (seed, difficulty)."""

from __future__ import annotations

import re
from fractions import Fraction

import pytest

from k2.rl.rewards import cryptarithm, game24, puzzle_reward, sudoku
from k2.rl.rewards.puzzles import verify


@pytest.mark.parametrize("difficulty", [1, 2, 3])
@pytest.mark.parametrize("seed", range(4))
def test_game24(seed, difficulty):
    puzzle = game24(seed, difficulty)
    assert puzzle == game24(seed, difficulty)
    assert verify(puzzle, f"So: \\boxed{{{puzzle['solution']}}}")[0]
    assert verify(puzzle, f"Answer: {puzzle['solution']} = 24")[0]
    expr = puzzle["solution"]
    if difficulty == 3:
        assert "/" in expr
    numbers = puzzle["numbers"]
    wrong_number = expr.replace(str(numbers[0]), str(numbers[0] + 1), 1)
    assert not verify(puzzle, f"\\boxed{{{wrong_number}}}")[0]
    op = next(o for o in "+*/-" if o in expr)
    flipped = expr.replace(op, {"+": "-", "*": "+", "/": "*", "-": "+"}[op], 1)
    value = eval(re.sub(r"\d+", lambda m: f"Fraction({m.group()})", flipped), {"Fraction": Fraction})
    assert verify(puzzle, f"\\boxed{{{flipped}}}")[0] == (value == 24)
    assert not verify(puzzle, "\\boxed{24}")[0]  # must use the numbers
    assert not verify(puzzle, "\\boxed{__import__('os')}")[0]


def test_game24_other_valid_answers_and_parameters():
    puzzle = {"kind": "24", "numbers": [1, 2, 3, 4], "target": 24}
    assert verify(puzzle, "\\boxed{1 * 2 * 3 * 4}")[0]
    assert verify(puzzle, "\\boxed{(1 + 2 + 3) \\times 4}")[0]
    assert not verify(puzzle, "\\boxed{(1 + 2 + 3) * 4 * 1}")[0]  # a number used twice
    five = game24(0, 2, num_numbers=5, target=30)
    assert len(five["numbers"]) == 5 and verify(five, f"\\boxed{{{five['solution']}}}")[0]


@pytest.mark.parametrize("size,difficulty", [(4, 1), (4, 3), (9, 1), (9, 2)])
def test_sudoku(size, difficulty):
    puzzle = sudoku(7, difficulty, size=size)
    grid, solution = puzzle["grid"], puzzle["solution"]
    assert puzzle == sudoku(7, difficulty, size=size)
    assert 0 in grid
    assert verify(puzzle, f"Let me think.\n{solution}")[0]
    digits = re.findall(r"\d", solution)
    cells = list(digits)
    i, j = 0, 1  # swap two cells of the first row: a row stays valid, columns break
    cells[i], cells[j] = cells[j], cells[i]
    rows = "\n".join("".join(cells[r * size : (r + 1) * size]) for r in range(size))
    assert not verify(puzzle, f"Answer:\n{rows}")[0]
    given = next(p for p, v in enumerate(grid) if v)
    changed = list(digits)
    changed[given] = str(int(changed[given]) % size + 1)
    rows = "\n".join("".join(changed[r * size : (r + 1) * size]) for r in range(size))
    assert not verify(puzzle, f"Answer:\n{rows}")[0]
    assert not verify(puzzle, "Answer: 1234")[0]


def test_sudoku_difficulty_removes_more_cells():
    easy, hard = sudoku(3, 1), sudoku(3, 3)
    assert sum(v == 0 for v in hard["grid"]) > sum(v == 0 for v in easy["grid"])


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4])
@pytest.mark.parametrize("seed", range(3))
def test_cryptarithm(seed, difficulty):
    puzzle = cryptarithm(seed, difficulty)
    assert puzzle == cryptarithm(seed, difficulty)
    assert len(puzzle["words"][0]) == difficulty + 1
    assert verify(puzzle, puzzle["solution"])[0]
    pairs = dict(re.findall(r"([A-Z])=(\d)", puzzle["solution"]))
    letters = sorted(pairs)
    a, b = letters[0], letters[1]
    swapped = {**pairs, a: pairs[b], b: pairs[a]}
    assert not verify(puzzle, ", ".join(f"{k}={v}" for k, v in swapped.items()))[0]
    missing = {k: v for k, v in pairs.items() if k != letters[-1]}
    assert not verify(puzzle, ", ".join(f"{k}={v}" for k, v in missing.items()))[0]
    duplicated = {**pairs, a: pairs[b]}
    assert not verify(puzzle, ", ".join(f"{k}={v}" for k, v in duplicated.items()))[0]


def test_puzzle_reward_contract():
    puzzles = [game24(1, 1), sudoku(1, 1, size=4), cryptarithm(1, 2), None]
    completions = [f"\\boxed{{{puzzles[0]['solution']}}}", puzzles[1]["solution"], "A=1", "anything"]
    assert puzzle_reward(None, completions, puzzle=puzzles) == [1.0, 1.0, 0.0, None]
    assert puzzle_reward.metrics["status/passed"] == 2 and puzzle_reward.metrics["status/skipped"] == 1
