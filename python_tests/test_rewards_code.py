"""``code_reward``: the completion's code plus the sample's tests in the sandbox, concurrently; statuses and the
failing test line come back per sample."""

from __future__ import annotations

import pytest
from _namespaces import namespaces_error

from k2.rl import sandbox
from k2.rl.rewards import CodeReward, extract_code

_NO_NAMESPACES = namespaces_error()  # the machine's ability, not k2's: a broken sandbox fails here, never skips
pytestmark = pytest.mark.skipif(_NO_NAMESPACES is not None, reason=f"no namespaces on this machine: {_NO_NAMESPACES}")

TESTS = "assert add(1, 2) == 3\nassert add(-1, 1) == 0\n"


def test_extract_code():
    text = "Here:\n```text\nnot code\n```\n```python\ndef f():\n    return 1\n```\nand ```py\nx = 2\n```"
    assert extract_code(text) == "x = 2\n"
    assert extract_code("```\nprint(1)\n```") == "print(1)\n"
    assert extract_code("def f(): pass") == "def f(): pass"


def test_code_reward_statuses():
    reward = CodeReward(timeout_s=2.0, memory_mb=256, max_workers=2)
    completions = [
        "```python\ndef add(a, b):\n    return a + b\n```",
        "```python\ndef add(a, b):\n    return a * b\n```",
        "def add(a, b):\n    while True:\n        pass\n",
        "def add(a, b):\n    return len(bytearray(10**10))\n",
        "no code at all",
        "def add(a, b): return a + b",
    ]
    tests = [TESTS] * 5 + [None]
    results = reward.results(["p"] * 6, completions, tests=tests)
    assert [r.status for r in results] == ["passed", "failed", "timeout", "memory", "failed", "skipped"]
    assert [r.score for r in results] == [1.0, 0.0, 0.0, 0.0, 0.0, None]
    assert results[1].reason == "AssertionError at `assert add(1, 2) == 3`"
    assert "SyntaxError" in results[4].reason
    assert reward.metrics["status/passed"] == 1 and reward.metrics["applicable"] == 5


def test_code_reward_refuses_without_isolation(monkeypatch):
    monkeypatch.setattr(sandbox, "isolation_error", lambda: "simulated")
    result = CodeReward().results(None, ["def add(a, b): return a + b"], tests=[TESTS])[0]
    assert result.status == "refused" and result.score == 0.0
