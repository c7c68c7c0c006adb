"""``k2 synth run`` end to end against a real ``k2 serve`` process with a random tiny model and constrained decoding:
a complete small corpus in under a minute, every generated JSON value parses and validates, and the exported file
trains with ``k2 sft``."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from _k2_cli import k2
from _serve import serve_process

from k2.agentic.agents import agent_schema
from k2.agentic.evolve import domains_schema, tools_schema
from k2.agentic.judge import verdict_schema
from k2.agentic.store import JsonlStore
from k2.agentic.tasks import level_of, task_schema
from k2.agentic.tools import tool_problem
from k2.data.sft import check_record, read_records
from k2.data.tokenizer import ByteTokenizer
from k2.model import Transformer, presets, save_hf

MAX_SEQ_LEN = 16384  # byte tokens: the judge's prompt holds the whole episode
TEXT = 12  # --max-text-chars: short strings keep a random model's replies short
SIZES = ["--num-categories", "1", "--domains-per-category", "1", "--tools-per-domain", "2", "--agents", "2"]
SIZES += ["--tasks-per-agent", "3", "--max-turns", "1", "--max-steps", "3", "--max-text-chars", str(TEXT)]
SIZES += ["--max-tokens", "4096", "--concurrency", "1"]


def _records(path) -> list[dict]:
    with JsonlStore(path) as store:
        return store.records()


@pytest.mark.slow
def test_synth_run_against_k2_serve_yields_valid_json_and_trainable_sft_data(tmp_path):
    ckpt, run, sft_run = tmp_path / "tiny", tmp_path / "synth", tmp_path / "sft"
    torch.manual_seed(0)
    save_hf(Transformer(presets.tiny().replace(max_position_embeddings=MAX_SEQ_LEN)), ckpt, dtype=torch.float32)
    ByteTokenizer().save(ckpt)
    with serve_process(ckpt, "tiny", MAX_SEQ_LEN) as url:
        out = k2("synth", "run", "--run-dir", run, "--backend", url, *SIZES)
    assert out.returncode == 0, out.stderr
    log = _records(run / "log.jsonl")
    assert [e["stage"] for e in log] == ["tools", "agents", "tasks", "rollouts", "judge", "export"]
    for entry in log:  # no request failed and no reply was invalid JSON or off-schema
        assert entry["failures"] == {} and entry["usage"]["failures"] == 0 and entry["usage"]["retries"] == 0, entry
    assert sum(e["usage"]["requests"] for e in log) > 20

    # Every stored reply validates against the schema it was asked for (checked again here, independently).
    for d in _records(run / "domains.jsonl"):
        jsonschema.validate({"domains": d["domains"]}, domains_schema(1, TEXT))
    for p in _records(run / "tool_proposals.jsonl"):
        jsonschema.validate({"tools": p["tools"]}, tools_schema(2, TEXT))
    tools = _records(run / "tools.jsonl")
    assert tools and all(tool_problem(t["tool"]) is None for t in tools)
    for a in _records(run / "agents.jsonl"):
        jsonschema.validate({"name": a["name"], "system_prompt": a["system_prompt"]}, agent_schema(TEXT))
    agents = {a["id"]: a for a in _records(run / "agents.jsonl")}
    tasks = _records(run / "tasks.jsonl")
    assert len(tasks) == 6
    for t in tasks:
        _, _, lo, hi = level_of(t["index"], 3)
        names = [x["function"]["name"] for x in agents[t["agent_id"]]["tools"]]
        jsonschema.validate({"task": t["task"], "rubric": t["rubric"]}, task_schema(names, lo, hi, TEXT))
    rollouts = _records(run / "rollouts.jsonl")
    assert len(rollouts) == 6
    assert all(r["metadata"]["invalid_calls"] == 0 for r in rollouts)  # constrained tool-call arguments
    for j in _records(run / "judgements.jsonl"):
        if j["judge"] == "llm":
            jsonschema.validate({k: j[k] for k in ("verdict", "scores", "reasons")}, verdict_schema(TEXT))

    # The export is complete, read by k2's SFT loader, and trains.
    stats = json.loads((run / "stats.json").read_text())
    records = list(read_records(run / "sft.jsonl"))
    assert len(records) == stats["counts"]["exported"] == stats["counts"]["kept"] >= 2
    for r in records:
        check_record(r)
    sets = ["train.steps=2", "optim.warmup_steps=0", f"data.context_len={MAX_SEQ_LEN // 2}"]
    sets += ["data.heldout_fraction=0.34", "eval.at_start=false", "checkpoint.export_hf=false", "train.batch_size=1"]
    sft = k2("sft", "--from", ckpt, "--data", run / "sft.jsonl", "--run-dir", sft_run, *[f"--set={s}" for s in sets])
    assert sft.returncode == 0, sft.stderr
    summary = json.loads((sft_run / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["skipped_too_long"] == 0
