"""``k2 synth`` end to end against the scripted OpenAI server: rubric-based filtering, the SFT export as ``k2 sft``
reads it, stats, back-end faults counted with a reason, a stage killed with SIGKILL and rerun (real ``k2 synth``
and fake-server subprocesses), ``--dry-run`` and the CLI's one-line errors."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _fake_openai import fake_openai, fake_openai_process
from _k2_cli import ENV, k2
from _synth_world import world

from k2.agentic.backend import OpenAIBackend
from k2.agentic.config import SynthConfig, save_config
from k2.agentic.pipeline import run_stages
from k2.agentic.store import JsonlStore
from k2.agentic.tasks import TASKS_FILE, synth_tasks
from k2.data.sft import check_record, encode, read_records
from k2.data.tokenizer import ByteTokenizer

SMALL = SynthConfig(num_categories=2, domains_per_category=2, tools_per_domain=3, num_agents=3, tasks_per_agent=3)


def _records(path: Path) -> list[dict]:
    with JsonlStore(path) as store:
        return store.records()


def _by_id(path: Path) -> dict[str, dict]:
    return {r["id"]: r for r in _records(path)}


def _kind(request: dict) -> str | None:
    return request.get("response_format", {}).get("json_schema", {}).get("name")


def _stage_files(run: Path) -> dict[str, dict[str, dict]]:
    return {p.name: _by_id(p) for p in sorted(run.glob("*.jsonl")) if p.name not in ("log.jsonl", "sft.jsonl")}


def test_judge_keeps_only_passing_episodes_and_export_is_what_k2_sft_reads(tmp_path):
    run = tmp_path / "run"
    with fake_openai(world) as srv:
        results = run_stages(run, OpenAIBackend(srv.url, timeout_s=10), SMALL)
        verdict_requests = [r for r in srv.requests if r.get("response_format", {}).get("json_schema", {}).get("name")
                            == "verdict"]  # fmt: skip
    assert all(not r.failures for r in results)
    tasks, rollouts = _by_id(run / TASKS_FILE), _by_id(run / "rollouts.jsonl")
    judgements = _records(run / "judgements.jsonl")
    assert len(tasks) == 9 and len(rollouts) == 9 and len(judgements) == 9
    assert all(t["difficulty"] == ("simple", "multi-step", "complex")[t["index"]] for t in tasks.values())
    assert all(r["temperature"] == 0.0 for r in verdict_requests) and len(verdict_requests) == 9
    # The scripted judge passes even task numbers: kept iff pass, with the judge's reasons stored either way.
    for j in judgements:
        number = tasks[rollouts[j["rollout_id"]]["task_id"]]["index"] + 1
        assert j["judge"] == "llm" and j["kept"] == (number % 2 == 0) == (j["verdict"] == "pass")
        assert j["reasons"] == [f"{j['verdict']}: n={number}"]
    kept = sorted(j["rollout_id"] for j in judgements if j["kept"])
    assert len(kept) == 3

    # Export: exactly the kept episodes, in rollout-id order, as {"messages", "tools"} lines k2 sft accepts.
    lines = [json.loads(line) for line in (run / "sft.jsonl").read_text().splitlines()]
    assert lines == [{"messages": rollouts[i]["messages"], "tools": rollouts[i]["tools"]} for i in kept]
    records = list(read_records(run / "sft.jsonl"))
    for r in records:
        check_record(r)
    conversations, skipped = encode(records, ByteTokenizer(), 4096)
    assert len(conversations) == 3 and skipped == 0
    assert all(c.mask.any() for c in conversations)  # every conversation has assistant tokens to learn

    stats = json.loads((run / "stats.json").read_text())
    assert stats["counts"] == {
        "categories": 2,
        "domains": 4,
        "tools_proposed": 12,
        "tools_imported": 0,
        "tools": len(_records(run / "tools.jsonl")),
        "tools_rejected": len(_records(run / "tools_rejected.jsonl")),
        "agents": 3,
        "tasks": 9,
        "rollouts": 9,
        "judged": 9,
        "kept": 3,
        "exported": 3,
    }
    assert stats["acceptance"]["judge"] == pytest.approx(3 / 9, abs=1e-4) and stats["acceptance"]["export"] == 1.0
    assert stats["rejections"]["judge"] == {"judge: fail": 6}
    assert sum(stats["tool_outcomes"].values()) == 9  # one call per episode in the scripted world
    assert stats["stop_reasons"] == {"user_done": 9}
    total = {k: sum(s[k] for s in stats["usage"].values()) for k in ("requests", "prompt_tokens")}
    assert total["requests"] == len(srv.requests)
    # The fake server counts prompt characters of string contents: the stages' sums add up to its own count.
    assert total["prompt_tokens"] == sum(
        len(m["content"]) for r in srv.requests for m in r["messages"] if isinstance(m.get("content"), str)
    )


def test_incomplete_episodes_fail_by_rule_without_a_judge_request(tmp_path):
    def agent_never_answers(request):
        if "tools" in request and "response_format" not in request:
            tool = request["tools"][0]["function"]
            args = {p: "x" for p in tool["parameters"].get("required", [])}
            args = {
                p: (1 if tool["parameters"]["properties"][p]["type"] in ("integer", "number") else "x") for p in args
            }
            return ("tool_calls", [{"name": tool["name"], "arguments": args}])
        return world(request)

    run = tmp_path / "run"
    cfg = SMALL.replace(num_agents=1, tasks_per_agent=2, max_steps=2)
    with fake_openai(agent_never_answers) as srv:
        run_stages(run, OpenAIBackend(srv.url, timeout_s=10), cfg)
        verdicts = [
            r for r in srv.requests if r.get("response_format", {}).get("json_schema", {}).get("name") == "verdict"
        ]
    assert verdicts == []
    judgements = _records(run / "judgements.jsonl")
    assert [(j["judge"], j["kept"], j["reasons"]) for j in judgements] == [
        ("rules", False, ["incomplete episode: step_limit"])
    ] * 2
    assert (run / "sft.jsonl").read_text() == ""
    assert json.loads((run / "stats.json").read_text())["rejections"]["judge"] == {"incomplete episode: step_limit": 2}


def test_backend_faults_are_counted_with_a_reason_and_a_rerun_fills_the_gaps(tmp_path):
    faults = {
        "1": ("status", 500),
        "2": ("malformed",),
        "3": ("close",),
        "4": ("sleep", 3.0),
        "5": ("text", "this is not JSON"),
        "6": {"task": 1},
    }

    def faulty(request):
        if _kind(request) == "task":
            number = request["messages"][-1]["content"].split("Write task #")[1].split()[0]
            return faults.get(number) or world(request)
        return world(request)

    cfg = SMALL.replace(num_agents=1, tasks_per_agent=7, max_retries=1)
    run, clean = tmp_path / "run", tmp_path / "clean"
    with fake_openai(world) as srv:
        run_stages(run, OpenAIBackend(srv.url, timeout_s=10), cfg, ["tools", "agents"])
    shutil.copytree(run, clean)
    with fake_openai(faulty) as srv:
        start = time.monotonic()
        result = synth_tasks(run, OpenAIBackend(srv.url, timeout_s=1.0, max_retries=1, backoff_s=0.05), cfg)
        elapsed = time.monotonic() - start
    assert elapsed < 30  # never hangs: every try has a timeout
    assert dict(result.failures) == {
        "http_5xx": 1,
        "malformed_response": 1,
        "connection": 1,
        "timeout": 1,
        "invalid_json": 1,
        "schema_mismatch": 1,
    }
    assert result.new == 1  # task #7 is fine
    log = _records(run / "log.jsonl")[-1]
    assert log["stage"] == "tasks" and log["failures"] == dict(result.failures)
    # The back end saw 4 failed requests (each retried once); the 2 bad replies were answers, rejected by chat_json.
    assert log["usage"]["failures"] == 4 and log["usage"]["retries"] == 4
    # A rerun against a healthy server makes the missing records, equal to those of a run without faults.
    with fake_openai(world) as srv:
        again = synth_tasks(run, OpenAIBackend(srv.url, timeout_s=10), cfg)
        assert len(srv.requests) == 6
        synth_tasks(clean, OpenAIBackend(srv.url, timeout_s=10), cfg)
    assert again.new == 6 and again.existing == 1 and not again.failures
    assert _by_id(run / TASKS_FILE) == _by_id(clean / TASKS_FILE)


def _wait_for_lines(path: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists() and path.read_bytes().count(b"\n") >= n:
            return
        time.sleep(0.01)


def test_stage_killed_with_sigkill_and_rerun_equals_an_uninterrupted_run(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    cfg = SMALL.replace(num_agents=4, concurrency=2, max_retries=0)
    with fake_openai_process("_synth_world:world", tmp_path / "fake") as srv:
        backend = OpenAIBackend(srv.url, timeout_s=10)
        save_config(whole, cfg)
        run_stages(whole, backend, cfg, ["tools", "agents", "tasks"])
        shutil.copytree(whole, killed)
        run_stages(whole, backend, cfg, ["rollouts", "judge", "export"])  # the uninterrupted run
    with fake_openai_process("_synth_world:slow_world", tmp_path / "slow") as slow:
        cmd = [sys.executable, "-m", "k2.cli", "synth", "rollouts", "--run-dir", str(killed), "--backend", slow.url]
        proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for_lines(killed / "rollouts.jsonl", 2, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, "the stage ended before it could be killed"
    partial = len(_records(killed / "rollouts.jsonl"))
    assert 2 <= partial < 12
    with fake_openai_process("_synth_world:world", tmp_path / "fake2") as srv:
        out = k2("synth", "run", "--run-dir", killed, "--backend", srv.url)  # sizes come from the saved config
        assert out.returncode == 0, out.stderr
        assert f"rollouts  {12 - partial} new, {partial} existing of 12" in out.stdout
        assert len(srv.requests()) == (12 - partial) * 5 + 12  # 5 per episode (scripted world), 12 verdicts
    assert _stage_files(killed) == _stage_files(whole)
    assert (killed / "sft.jsonl").read_bytes() == (whole / "sft.jsonl").read_bytes()
    assert len(_records(whole / "rollouts.jsonl")) == 12
    assert "judge" in out.stdout and "SFT lines" in out.stdout


def test_dry_run_prints_requests_and_writes_nothing(tmp_path):
    run = tmp_path / "run"
    out = k2("synth", "run", "--dry-run", "--run-dir", run, "--num-categories", "1", "--domains-per-category", "1",
             "--agents", "1", "--tasks-per-agent", "1", "--max-turns", "1")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert not run.exists()
    for kind in ("domains", "tools", "agent", "task", "user_turn", "chat", "verdict"):
        assert f": {kind} (temperature" in out.stdout
    assert "Category: " in out.stdout and "[response schema]" in out.stdout and "nothing sent" in out.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["synth", "tools"], "--backend is required"),
        (["synth", "agents", "--backend", "http://127.0.0.1:9/v1"], "tools.jsonl; run the stage that writes it"),
        (["synth", "tools", "--partial-rate", "0.9", "--error-rate", "0.5"], "must be at most 1"),
        (["synth", "tools", "--num-categories", "13"], "num_categories=13 but only 12 categories"),
        (["synth", "tools", "--backend", "/no/such/dir"], "neither an http(s):// URL nor a checkpoint"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, args, message):
    out = k2(*args, "--run-dir", tmp_path / "run")
    assert out.returncode == 2
    assert out.stderr.startswith("k2 synth: error: ") and message in out.stderr and out.stderr.count("\n") == 1


def test_stage_config_is_saved_and_reused(tmp_path):
    run = tmp_path / "run"
    out = k2("synth", "export", "--run-dir", run, "--seed", "5")
    assert out.returncode == 2 and "rollouts.jsonl" in out.stderr
    saved = json.loads((run / "config.json").read_text())
    assert saved["seed"] == 5 and saved["backend"] is None
    assert SynthConfig().replace(**saved) == SynthConfig(seed=5)
