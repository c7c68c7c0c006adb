"""``k2 rl`` end to end on a tiny random checkpoint: run directory, metrics, summary keys, and SIGKILL + ``--resume``
reproducing the uninterrupted run's records and final weights exactly (partial rollouts and the replay buffer
included)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from k2.data.tokenizer import ByteTokenizer
from k2.errors import ConfigError
from k2.model import Transformer, presets, save_hf
from k2.rl.config import build_rl_config
from k2.rl.loop import latest_export, temperature

ARGS = [
    "--set", "rl.iterations=4",
    "--set", "rl.prompts_per_iteration=2",
    "--set", "rl.samples_per_prompt=2",
    "--set", "rl.max_response_tokens=8",
    "--set", "rl.rollout_budget=20",
    "--set", "rl.envs=arith",
    "--set", "rl.heldout_problems=2",
    "--set", "rl.ptx_batch_size=1",
    "--set", "train.checkpoint_every=1",
    "--set", "checkpoint.keep_last=4",
]  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "hf"
    torch.manual_seed(0)
    model = Transformer(presets.get("tiny").replace(num_hidden_layers=1, max_position_embeddings=512))
    save_hf(model, path, dtype=torch.float32)
    ByteTokenizer().save(path)
    return path


def _k2(*args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.Popen(
        [sys.executable, "-m", "k2.cli", "rl", *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def _records(run: Path) -> list[dict]:
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out.append({k: v for k, v in r.items() if not (k.endswith("_s") or k.endswith("per_s"))})
    return out


def test_config_and_schedule():
    c = build_rl_config(overrides=["rl.iterations=5", "rl.temperature_start=1.5", "rl.temperature_end=0.5"])
    assert [round(temperature(c, i), 6) for i in (0, 4)] == [1.5, 0.5]
    assert temperature(c, 2) == pytest.approx(1.0)
    with pytest.raises(ConfigError, match=r"rl\.envs"):
        build_rl_config(overrides=["rl.envs=nope"])
    with pytest.raises(ConfigError, match=r"unknown key rl\.k"):
        build_rl_config(overrides=["rl.k=3"])


def test_latest_export_prefers_sft(tmp_path):
    for name, cfg in (("a", 'preset = "tiny"'), ("b", 'path = "x"'), ("c", "[rl]\n")):
        (tmp_path / name / "hf").mkdir(parents=True)
        (tmp_path / name / "hf" / "config.json").write_text("{}")
        (tmp_path / name / "config.toml").write_text(f"[model]\n{cfg}\n")
    assert latest_export(tmp_path) == tmp_path / "b" / "hf"


def test_k2_rl_sigkill_and_resume_is_exact(checkpoint, tmp_path):
    full = _k2("--from", str(checkpoint), "--run-dir", "full", *ARGS, cwd=tmp_path)
    out, err = full.communicate(timeout=600)
    assert full.returncode == 0, err.decode()[-2000:]
    assert b"reward: first fifth" in out
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    for key in ("reward_first_fifth", "reward_last_fifth", "heldout_accuracy_before", "heldout_accuracy_after"):
        assert key in summary
    records = _records(tmp_path / "full")
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == 4 and any(r["paused"] for r in train)  # the budget pauses episodes
    trained = [r for r in train if r["groups_trained"]]
    assert trained and all(r["mismatch_max"] < 1e-3 for r in trained)  # engine vs trainer log-probs
    assert (tmp_path / "full" / "plots" / "reward.png").is_file()

    killed = _k2("--from", str(checkpoint), "--run-dir", "killed", *ARGS, cwd=tmp_path)
    second = tmp_path / "killed" / "checkpoints" / "step_00000002"
    deadline = time.monotonic() + 300
    while not second.is_dir() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    resumed = _k2("--resume", "killed", cwd=tmp_path)
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err.decode()[-2000:]
    assert _records(tmp_path / "killed") == records
    a = load_file(tmp_path / "full" / "hf" / "model-00001-of-00001.safetensors")
    b = load_file(tmp_path / "killed" / "hf" / "model-00001-of-00001.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
