"""``RubricCritic``: with scripted critics, the aggregation ranks responses as the critic prefers them (win rate
and Bradley–Terry), a critic that always picks position A is cancelled by judging both orders, malformed and
failing answers are counted rather than raised; calibration measures agreement with a verifier and exports the
judgments as critic training data; end to end against a real ``k2 serve`` process (a random tiny model, whose
answers are malformed verdicts) and the in-process Engine."""

from __future__ import annotations

import asyncio
import json
import re

import pytest
import torch
from _serve import serve_process

from k2.rl.rewards import CORE_RUBRICS, PRESCRIPTIVE_RUBRICS, RubricCritic, engine_chat, openai_chat
from k2.rl.rewards.critic import bradley_terry, parse_verdict, win_rates


def _quality(text: str) -> int:
    return int(re.search(r"quality (\d+)", text).group(1))


def _responses(messages: list[dict]) -> tuple[str, str]:
    user = messages[-1]["content"]
    a = user.split("[Response A]\n")[1].split("\n\n[Response B]")[0]
    b = user.split("[Response B]\n")[1].split("\n\nWhich response")[0]
    return a, b


def honest_critic(messages: list[dict]) -> str:
    a, b = _responses(messages)
    qa, qb = _quality(a), _quality(b)
    return "Reasoning...\nVerdict: " + ("A" if qa > qb else "B" if qb > qa else "tie")


async def position_biased_critic(messages: list[dict]) -> str:
    await asyncio.sleep(0)
    return "Both fine, the first reads better. Verdict: A"


PROMPT = "Explain photosynthesis."
RESPONSES = [f"answer with quality {q}" for q in (2, 5, 1, 4)]


@pytest.mark.parametrize("aggregation", ["win_rate", "bradley_terry"])
def test_scripted_critic_ranking(aggregation):
    critic = RubricCritic(honest_critic, aggregation=aggregation)
    result = asyncio.run(critic.rank(PROMPT, RESPONSES))
    assert len(result.judgments) == 4 * 3  # 6 pairs, both orders
    order = sorted(range(4), key=lambda i: -result.scores[i])
    assert order == [1, 3, 0, 2]
    if aggregation == "win_rate":
        assert result.scores == [pytest.approx(x) for x in (1 / 3, 1.0, 0.0, 2 / 3)]
    assert result.malformed == 0 and result.errors == 0


def test_rubrics_reach_the_critic():
    seen = []

    def critic(messages):
        seen.append(messages[0]["content"])
        return "Verdict: tie"

    rc = RubricCritic(critic)
    scores = asyncio.run(rc(["p", "p"], ["x", "y"], rubrics=[["Mention the Calvin cycle."], None]))
    assert scores == [0.5, 0.5]
    for rubric in (*CORE_RUBRICS, *PRESCRIPTIVE_RUBRICS, "Mention the Calvin cycle."):
        assert all(rubric in s for s in seen)


@pytest.mark.parametrize("aggregation", ["win_rate", "bradley_terry"])
def test_position_bias_cancels(aggregation):
    critic = RubricCritic(position_biased_critic, aggregation=aggregation)
    result = asyncio.run(critic.rank(PROMPT, RESPONSES))
    assert result.scores == [pytest.approx(0.5)] * 4
    one_order = RubricCritic(position_biased_critic, aggregation=aggregation, both_orders=False)
    biased = asyncio.run(one_order.rank(PROMPT, RESPONSES)).scores
    assert biased[0] > biased[3]  # judged once per pair, the first-listed response always "wins"


def test_malformed_and_failing_answers_are_counted():
    calls = []

    def flaky(messages):
        calls.append(1)
        n = len(calls)
        if n % 3 == 0:
            return "I cannot decide."
        if n % 3 == 1:
            raise ConnectionError("server went away")
        return honest_critic(messages)

    critic = RubricCritic(flaky, max_concurrency=1)
    prompts = [PROMPT] * 4 + ["solo"]
    results = critic.results(prompts, [*RESPONSES, "lonely"])
    assert critic.totals["judgments"] == 12
    assert critic.totals["malformed"] == 4 and critic.totals["errors"] == 4
    assert results[4].status == "skipped" and results[4].score is None
    assert all(r.status in ("passed", "malformed") for r in results[:4])
    assert "4 malformed, 4 failed of 12" in next(r.reason for r in results if r.status == "passed")


def test_aggregators_on_hand_counts():
    from k2.rl.rewards.critic import Judgment

    js = [Judgment(0, 1, "A", ""), Judgment(1, 0, "B", ""), Judgment(0, 1, None, "")]
    assert win_rates(2, js) == [1.0, 0.0]
    bt = bradley_terry(2, js)
    assert bt[0] > 0.5 > bt[1] and bt[0] + bt[1] == pytest.approx(1.0)
    assert win_rates(3, js)[2] is None and bradley_terry(3, js)[2] is None
    assert parse_verdict("... **Verdict:** [[B]]") == "B"
    assert parse_verdict("verdict: Tie") == "tie"
    assert parse_verdict("Verdict: A ... on reflection Verdict: B") == "B"
    assert parse_verdict("A is better") is None


def test_calibration_agreement_and_export(tmp_path):
    def half_right(messages):  # right about every pair except the two involving quality 1
        a, b = _responses(messages)
        qa, qb = _quality(a), _quality(b)
        if 1 in (qa, qb):
            return "Verdict: " + ("A" if qa == 1 else "B")
        return honest_critic(messages)

    critic = RubricCritic(half_right)
    verifier = [1.0, 1.0, 0.0, 0.0]  # responses 0, 1 correct; 2, 3 wrong
    report = asyncio.run(critic.calibrate([PROMPT] * 4, RESPONSES, verifier))
    # decided pairs: (0,2) (0,3) (1,2) (1,3); the critic prefers 2 (quality 1) over 0 and 1, and 0 (q2) < 3 (q4)
    assert report.pairs == 4 and report.agreed == 1 and report.agreement == pytest.approx(0.25)
    assert len(report.records) == 8
    assert {r["target_verdict"] for r in report.records} == {"A", "B"}
    path = tmp_path / "critic.jsonl"
    report.write_jsonl(path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[0]["messages"][0]["role"] == "system" and isinstance(rows[0]["agrees"], bool)
    assert sum(r["agrees"] for r in rows) == 2


# ---- real back ends: a random tiny model, so verdicts are malformed and must be counted --------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from k2.data.tokenizer import ByteTokenizer
    from k2.model import Transformer, presets, save_hf

    path = tmp_path_factory.mktemp("critic") / "ckpt"
    torch.manual_seed(0)
    save_hf(Transformer(presets.tiny()), path, dtype=torch.float32)
    ByteTokenizer().save(path)
    return path


@pytest.fixture(scope="module")
def server(checkpoint):
    with serve_process(checkpoint, "tiny", 1024) as url:
        yield url


SHORT_RUBRICS = ("Prefer the correct answer.",)  # the tiny model's context is 1024 byte tokens


def test_end_to_end_against_k2_serve(server):
    critic = RubricCritic(openai_chat(server, "tiny", max_tokens=8), rubrics=SHORT_RUBRICS)
    prompts = ["What is 2+2?"] * 3 + ["Name a colour."] * 2
    completions = ["4", "five", "22", "red", "blue"]
    results = critic.results(prompts, completions)
    assert critic.totals["judgments"] == 6 + 2
    assert critic.totals["errors"] == 0  # every call reached the server and came back
    # 8 random byte tokens cannot spell a verdict: every answer is malformed, counted, and no response is scored
    assert critic.totals["malformed"] == 8
    assert [r.status for r in results] == ["malformed"] * 5 and all(r.score is None for r in results)
    # A context overflow is a failed call (HTTP 400), counted and not raised.
    overflow = RubricCritic(openai_chat(server, "tiny", max_tokens=8))
    results = overflow.results(["p", "p"], ["x" * 2000, "y"])
    assert overflow.totals["errors"] == 2 and all(r.status == "malformed" for r in results)


def test_engine_back_end(checkpoint):
    from k2.infer import Engine
    from k2.infer.loading import load_checkpoint

    model, tok = load_checkpoint(checkpoint)
    chat = engine_chat(Engine(model, tok, max_batch_size=4, max_seq_len=1024), max_new_tokens=6)
    critic = RubricCritic(chat, rubrics=SHORT_RUBRICS)
    result = asyncio.run(critic.rank("What is 2+2?", ["4", "5", "22"]))
    assert len(result.judgments) == 6 and result.errors == 0
    assert all(j.raw for j in result.judgments)  # the model generated text for every judgment
    chat.engine.shutdown()
