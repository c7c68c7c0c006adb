"""``k2 pretrain`` as a user runs it (real subprocesses): SIGKILL at a random step + ``--resume`` reproduces the
uninterrupted run's per-step losses exactly, and every bad input is a one-line error that leaves runs untouched."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pytest
from _k2_cli import k2, kill_at_step, losses, snapshot
from test_train_checkpoint import MICRO_MODEL

MICRO = [
    *MICRO_MODEL,
    "data.context_len=32",
    "data.corpus_documents=300",
    "data.heldout_fraction=0.1",
    "train.batch_size=4",
    "train.steps=16",
    "train.checkpoint_every=4",
    "optim.warmup_steps=2",
    "eval.every=8",
    "eval.max_sequences=8",
    "checkpoint.export_hf=false",
]
SETS = [arg for item in MICRO for arg in ("--set", item)]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("cli") / "full"
    r = k2("pretrain", "--run-dir", run, *SETS)
    assert r.returncode == 0, r.stderr
    assert f"run directory  {run}" in r.stdout and "below baseline" in r.stdout
    return run


def test_sigkill_then_resume_reproduces_the_losses(finished_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "killed"
    kill_at = random.Random().randint(5, 10)  # after the first checkpoint, well before the end
    kill_at_step(["pretrain", "--run-dir", run, *SETS], run, kill_at)
    killed_at = max(s for s, _ in losses(run))
    assert killed_at < 16 and not (run / "summary.json").exists()

    r = k2("pretrain", "--resume", run)
    assert r.returncode == 0, r.stderr
    assert losses(run) == losses(finished_run), f"killed at step {killed_at}"  # every step, bit for bit
    assert losses(run, "eval", "eval_loss") == losses(finished_run, "eval", "eval_loss")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from"] is not None and summary["steps"] == 16


def _one_line_error(r: subprocess.CompletedProcess, expected: str) -> None:
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("k2 pretrain: error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in r.stderr + r.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--set", "data.path=/no/such/data"], "data path does not exist: /no/such/data"),
        (["--set", "data.path={empty}"], "empty file: "),
        (["--set", "train.bogus=1"], "unknown key train.bogus"),
        (["--set", "model.num_hidden_layers=3"], "is of a different model: it has no tensor layers.2."),
        (["--set", "model.hidden_size=48", "--set", "train.steps=20"], "different model shape: embed_tokens.weight"),
    ],
    ids=["missing-data", "empty-file", "unknown-key", "more-layers", "wider"],
)
def test_bad_input_on_resume_leaves_the_run_untouched(
    finished_run: Path, tmp_path: Path, args: list[str], expected: str
) -> None:
    empty = tmp_path / "empty.txt"
    empty.touch()
    before = snapshot(finished_run)
    r = k2("pretrain", "--resume", finished_run, *[a.format(empty=empty) for a in args])
    _one_line_error(r, expected)
    assert snapshot(finished_run) == before


def test_bad_input_on_a_new_run_writes_nothing(finished_run: Path, tmp_path: Path) -> None:
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("[train]\nsteps = 10\nbatch_size = [\n")
    new = tmp_path / "new"
    cases = [
        (["--preset", "gigantic"], "unknown model preset 'gigantic'; known presets: tiny, small"),
        (["--config", bad_toml], "bad.toml: TOML syntax error"),
        (["--set", "data.path=/no/such/data"], "data path does not exist"),
    ]
    for args, expected in cases:
        _one_line_error(k2("pretrain", "--run-dir", new, *args), expected)
        assert not new.exists()
    before = snapshot(finished_run)
    _one_line_error(k2("pretrain", "--run-dir", finished_run, *SETS), "already holds a run")
    assert snapshot(finished_run) == before


def test_plot_command(finished_run: Path, tmp_path: Path) -> None:
    r = k2("plot", finished_run, "--out", tmp_path / "png")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == [
        "load_imbalance.png",
        "loss.png",
        "lr.png",
        "max_logit.png",
    ]
    _one_line_error_plot = k2("plot", tmp_path)
    assert _one_line_error_plot.returncode != 0 and "no metrics.jsonl" in _one_line_error_plot.stderr
