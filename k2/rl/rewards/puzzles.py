"""Logic puzzles with seeded generators and exact verifiers, for the verifiable rewards gym (Kimi K2, arXiv
2507.20534 §3.2 lists 24-game, Sudoku and cryptarithms among its logic tasks).

Each generator ``game24(seed, difficulty)``, ``sudoku(seed, difficulty)``, ``cryptarithm(seed, difficulty)``
returns a JSON-able dict: ``kind``, the puzzle fields, ``prompt`` (what to ask a model) and ``solution`` (one
answer in the format the verifier reads). :func:`verify` checks any completion exactly: every valid answer is
accepted, not only the generator's. :data:`puzzle_reward` reads the column ``puzzle`` (one such dict per sample).

Difficulty (an int >= 1, the same seed and difficulty give the same puzzle):
- 24-game: 1 = solvable with + - × only and whole intermediates; 2 = any solution, numbers up to 13; 3 = every
  solution needs a fractional intermediate (``3 3 8 8``). ``num_numbers`` (default 4) and ``target`` are parameters.
- Sudoku: ``size`` 4 or 9; holes grow with difficulty (9×9: 30 + 8·difficulty, capped at 60) while the solution
  stays unique.
- Cryptarithm: ``A + B = C`` in letters with ``difficulty + 1``-digit addends (distinct letters for distinct
  digits, no leading zeros).
"""

from __future__ import annotations

import ast
import functools
import itertools
import random
import re
from fractions import Fraction
from typing import Any

from k2.rl.rewards.base import RewardResult, SampleReward, skipped, text_of

# ---- answer extraction ------------------------------------------------------------------------------------------


def _final_answer(text: str) -> str:
    """The ``\\boxed{...}`` content, else what follows the last ``Answer:``, else the last non-empty line."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    match = list(re.finditer(r"(?i)answer\s*[:：]\s*(.+)", text))
    if match:
        return match[-1].group(1).strip()
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


# ---- 24-game ---------------------------------------------------------------------------------------------------

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}


def _solve24(numbers: list[int], target: int, ops: str = "+-*/", whole: bool = False, limit: int = 1) -> list[str]:
    """Up to ``limit`` expressions (as strings) combining every number once that reach ``target`` exactly."""
    found: list[str] = []

    def search(items: list[tuple[Fraction, str]]) -> None:
        if len(found) >= limit:
            return
        if len(items) == 1:
            if items[0][0] == target:
                found.append(items[0][1])
            return
        for i, j in itertools.permutations(range(len(items)), 2):
            rest = [items[k] for k in range(len(items)) if k not in (i, j)]
            (a, ea), (b, eb) = items[i], items[j]
            for op in ops:
                if op == "/" and b == 0:
                    continue
                value = _OPS[op](a, b)
                if whole and value.denominator != 1:
                    continue
                search([*rest, (value, f"({ea} {op} {eb})")])

    search([(Fraction(n), str(n)) for n in numbers])
    return found


@functools.lru_cache(maxsize=4096)
def _solve24_cached(numbers: tuple[int, ...], target: int, ops: str, whole: bool) -> tuple[str, ...]:
    return tuple(_solve24(list(numbers), target, ops, whole))


def game24(seed: int, difficulty: int = 1, *, num_numbers: int = 4, target: int = 24) -> dict[str, Any]:
    rng = random.Random(f"game24:{seed}:{difficulty}:{num_numbers}:{target}")
    high = 9 if difficulty <= 1 else 13
    for _ in range(100_000):
        numbers = sorted(rng.randint(1, high) for _ in range(num_numbers))
        if difficulty <= 1:
            solutions = _solve24_cached(tuple(numbers), target, "+-*", True)
        else:
            solutions = _solve24_cached(tuple(numbers), target, "+-*/", False)
            if difficulty >= 3 and (not solutions or _solve24_cached(tuple(numbers), target, "+-*/", True)):
                continue
        if solutions:
            expr = solutions[0][1:-1] if solutions[0].startswith("(") else solutions[0]
            prompt = (
                f"Use each of the numbers {', '.join(map(str, numbers))} exactly once with +, -, *, / and "
                f"parentheses to make {target}. Give the expression as \\boxed{{...}}."
            )
            return {"kind": "24", "numbers": numbers, "target": target, "prompt": prompt, "solution": expr}
    raise RuntimeError(f"game24: no puzzle found for difficulty {difficulty}")


def _eval_arith(node: ast.AST, used: list[int]) -> Fraction:
    if isinstance(node, ast.Expression):
        return _eval_arith(node.body, used)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        used.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in (ast.Add, ast.Sub, ast.Mult, ast.Div):
        a, b = _eval_arith(node.left, used), _eval_arith(node.right, used)
        op = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}[type(node.op)]
        if op == "/" and b == 0:
            raise ZeroDivisionError("division by zero")
        return _OPS[op](a, b)
    raise ValueError(f"not allowed in a 24-game expression: {ast.dump(node)[:40]}")


def check_24(puzzle: dict, text: str) -> tuple[bool, str]:
    expr = _final_answer(text).replace("×", "*").replace("÷", "/").replace("\\times", "*").replace("\\div", "/")
    expr = expr.split("=")[0].strip()
    try:
        used: list[int] = []
        value = _eval_arith(ast.parse(expr, mode="eval"), used)
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError) as exc:
        return False, f"unreadable expression {expr!r}: {exc}"
    if sorted(used) != sorted(puzzle["numbers"]):
        return False, f"uses {sorted(used)}, the puzzle has {sorted(puzzle['numbers'])}"
    if value != puzzle["target"]:
        return False, f"evaluates to {value}, not {puzzle['target']}"
    return True, expr


# ---- Sudoku ----------------------------------------------------------------------------------------------------


def _box(size: int) -> int:
    return {4: 2, 9: 3}[size]


def _candidates(grid: list[int], size: int, pos: int) -> list[int]:
    r, c, b = pos // size, pos % size, _box(size)
    seen = {grid[r * size + k] for k in range(size)} | {grid[k * size + c] for k in range(size)}
    br, bc = r - r % b, c - c % b
    seen |= {grid[(br + i) * size + bc + j] for i in range(b) for j in range(b)}
    return [v for v in range(1, size + 1) if v not in seen]


def _count_solutions(grid: list[int], size: int, limit: int = 2, rng: random.Random | None = None) -> list[list[int]]:
    """Up to ``limit`` solutions by backtracking on the most constrained empty cell."""
    found: list[list[int]] = []
    grid = list(grid)

    def search() -> None:
        empty = [p for p, v in enumerate(grid) if v == 0]
        if not empty:
            found.append(list(grid))
            return
        pos, options = min(((p, _candidates(grid, size, p)) for p in empty), key=lambda t: len(t[1]))
        if rng is not None:
            rng.shuffle(options)
        for value in options:
            grid[pos] = value
            search()
            if len(found) >= limit:
                return
        grid[pos] = 0

    search()
    return found


def sudoku(seed: int, difficulty: int = 1, *, size: int = 9) -> dict[str, Any]:
    rng = random.Random(f"sudoku:{seed}:{difficulty}:{size}")
    solution = _count_solutions([0] * size * size, size, limit=1, rng=rng)[0]
    holes = min(30 + 8 * difficulty, 60) if size == 9 else min(4 + 2 * difficulty, 10)
    grid = list(solution)
    for pos in rng.sample(range(size * size), size * size):
        if sum(v == 0 for v in grid) >= holes:
            break
        keep, grid[pos] = grid[pos], 0
        if len(_count_solutions(grid, size)) != 1:
            grid[pos] = keep
    rows = "\n".join("".join(str(v) if v else "." for v in grid[r * size : (r + 1) * size]) for r in range(size))
    prompt = (
        f"Solve this {size}x{size} Sudoku ('.' marks an empty cell). Answer with the {size} completed rows, "
        f"one per line, digits only, after 'Answer:'.\n{rows}"
    )
    answer = "\n".join("".join(map(str, solution[r * size : (r + 1) * size])) for r in range(size))
    return {"kind": "sudoku", "size": size, "grid": grid, "prompt": prompt, "solution": f"Answer:\n{answer}"}


def check_sudoku(puzzle: dict, text: str) -> tuple[bool, str]:
    size, grid = puzzle["size"], puzzle["grid"]
    tail = re.split(r"(?i)answer\s*[:：]", text)[-1]
    digits = [int(d) for d in re.findall(r"[1-9]", tail)]
    if len(digits) < size * size:
        return False, f"found {len(digits)} digits, need {size * size}"
    cells = digits[-size * size :]
    if any(g and g != v for g, v in zip(grid, cells, strict=True)):
        return False, "changes a given cell"
    b = _box(size)
    groups = [cells[r * size : (r + 1) * size] for r in range(size)]
    groups += [cells[c::size] for c in range(size)]
    corners = [(br, bc) for br in range(0, size, b) for bc in range(0, size, b)]
    groups += [[cells[(br + i) * size + bc + j] for i in range(b) for j in range(b)] for br, bc in corners]
    if any(sorted(g) != list(range(1, size + 1)) for g in groups):
        return False, "a row, column or box repeats a digit"
    return True, "valid grid"


# ---- cryptarithm -----------------------------------------------------------------------------------------------


def cryptarithm(seed: int, difficulty: int = 1) -> dict[str, Any]:
    rng = random.Random(f"cryptarithm:{seed}:{difficulty}")
    width = difficulty + 1
    while True:
        a = rng.randrange(10 ** (width - 1), 10**width)
        b = rng.randrange(10 ** (width - 1), 10**width)
        digits = sorted(set(str(a) + str(b) + str(a + b)))
        if len(digits) <= 10:
            break
    letters = rng.sample("ABCDEFGHIJKLMNOPQRSTUVWXYZ", len(digits))
    code = dict(zip(digits, letters, strict=True))
    words = ["".join(code[d] for d in str(n)) for n in (a, b, a + b)]
    prompt = (
        f"Solve the cryptarithm {words[0]} + {words[1]} = {words[2]}: each letter stands for a different digit and no "
        "number starts with 0. Answer with the assignment as LETTER=digit pairs separated by commas."
    )
    solution = ", ".join(f"{code[d]}={d}" for d in digits)
    return {"kind": "cryptarithm", "words": words, "prompt": prompt, "solution": solution}


def check_cryptarithm(puzzle: dict, text: str) -> tuple[bool, str]:
    words = puzzle["words"]
    letters = sorted(set("".join(words)))
    assignment: dict[str, int] = {}
    for letter, digit in re.findall(r"\b([A-Z])\s*[=:]\s*(\d)\b", text):
        assignment[letter] = int(digit)  # the last value given for a letter counts
    missing = [x for x in letters if x not in assignment]
    if missing:
        return False, f"no digit for {', '.join(missing)}"
    used = [assignment[x] for x in letters]
    if len(set(used)) != len(used):
        return False, "two letters share a digit"
    if any(assignment[w[0]] == 0 for w in words):
        return False, "a number starts with 0"
    a, b, c = (int("".join(str(assignment[x]) for x in w)) for w in words)
    if a + b != c:
        return False, f"{a} + {b} != {c}"
    return True, f"{a} + {b} = {c}"


# ---- the reward ------------------------------------------------------------------------------------------------

CHECKERS = {"24": check_24, "sudoku": check_sudoku, "cryptarithm": check_cryptarithm}
GENERATORS = {"24": game24, "sudoku": sudoku, "cryptarithm": cryptarithm}


def verify(puzzle: dict, completion: Any) -> tuple[bool, str]:
    """Exact check of a completion against a puzzle dict from one of the generators."""
    return CHECKERS[puzzle["kind"]](puzzle, text_of(completion))


class PuzzleReward(SampleReward):
    """1.0 for a correct answer to the sample's ``puzzle`` (a generator's dict), else 0.0."""

    name = "puzzle"

    def grade(self, prompt: Any, completion: Any, puzzle: dict | None = None, **row: Any) -> RewardResult:
        if puzzle is None:
            return skipped("no puzzle column")
        ok, reason = verify(puzzle, completion)
        return RewardResult(1.0 if ok else 0.0, "passed" if ok else "failed", reason)


puzzle_reward = PuzzleReward()
