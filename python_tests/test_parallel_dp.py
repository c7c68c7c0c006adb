"""Data-parallel ``k2 pretrain`` launched as a user does (``torchrun --nproc-per-node=2 --no-python k2 pretrain``,
gloo on the CPU) against one process.

Oracles:
- exact: a dp=2 step with global batch 8 is, operation for operation, one process accumulating the ranks' two
  slices of 4 (``train.batch_size=4, train.grad_accum=2``): the same forwards on the same rows, the gradient
  ``(g0 + g1) / 2`` against ``g0 / 2 + g1 / 2`` (equal: halving is exact in floating point, and every backward is
  linear in its incoming gradient), summed loads, max logits, and ZeRO-1 MuonClip equal to the local one on the same
  gradient. So losses and final weights must be bit-identical — for 10 steps and across a resume at another world
  size.
- the same global batch in one forward (``batch_size=8``): the gradient differs only in summation order. With AdamW
  (fp32 update) per-step losses agree to 1e-5 relative and weights to ~1e-5. MuonClip's update comes out of a bf16
  Newton-Schulz, which turns an fp32 rounding difference into a bf16 one (``test_train_loop``'s
  ``test_grad_accumulation_equals_the_larger_batch``); the exact oracle above covers it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _k2_cli import ENV, k2, losses
from safetensors.torch import load_file
from test_pretrain_cli import MICRO

pytestmark = pytest.mark.multiproc

RUN = [
    *[item for item in MICRO if not item.startswith(("train.batch_size", "train.steps", "train.checkpoint_every"))],
    "train.steps=10",
    "train.checkpoint_every=5",
    "eval.every=5",
    "checkpoint.export_hf=true",
    "checkpoint.hf_dtype=float32",
]
DP2 = ["parallel.dp=2", "train.batch_size=8"]
ACCUM = ["train.batch_size=4", "train.grad_accum=2"]  # one process doing what the two ranks do


def sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def torchrun(nproc: int, *args: str | Path) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node=N --no-python k2 ARGS`` (the installed ``k2`` script next to this Python)."""
    script = Path(sys.executable).with_name("k2")
    k2_cmd = [str(script)] if script.exists() else [sys.executable, "-m", "k2.cli"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "--no-python"]
    return subprocess.run([*cmd, *k2_cmd, *map(str, args)], capture_output=True, text=True, env=ENV, timeout=300)


def weights(run: Path) -> dict[str, torch.Tensor]:
    (file,) = (run / "hf").glob("*.safetensors")
    return load_file(file)


@pytest.fixture(scope="module")
def dp2_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("dp") / "dp2"
    r = torchrun(2, "pretrain", "--run-dir", run, *sets(*RUN, *DP2))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("trained 10 steps") == 1  # rank 0 alone reports
    return run


@pytest.fixture(scope="module")
def accum_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("dp") / "accum"
    r = k2("pretrain", "--run-dir", run, *sets(*RUN, *ACCUM))
    assert r.returncode == 0, r.stderr
    return run


def test_rank0_alone_writes_the_run(dp2_run: Path) -> None:
    records = losses(dp2_run)
    assert [s for s, _ in records] == list(range(1, 11))  # one record per step: no second writer
    assert sorted(p.name for p in (dp2_run / "checkpoints").iterdir()) == ["step_00000005", "step_00000010"]
    assert {p.name for p in (dp2_run / "checkpoints" / "step_00000010").glob("*.distcp")} == {
        "__0_0.distcp",
        "__1_0.distcp",
    }  # both ranks wrote their ZeRO-1 shards
    assert "dp = 2" in (dp2_run / "config.toml").read_text()


def test_dp2_equals_one_process_accumulating_the_ranks_slices(dp2_run: Path, accum_run: Path) -> None:
    assert losses(dp2_run) == losses(accum_run)  # bit for bit, 10 steps
    one, two = weights(accum_run), weights(dp2_run)
    for name, t in one.items():
        assert torch.equal(t, two[name]), name


def test_dp2_reproduces_one_process_with_the_same_global_batch(tmp_path: Path) -> None:
    adamw = [*RUN, "optim.name=adamw"]
    r = torchrun(2, "pretrain", "--run-dir", tmp_path / "dp2", *sets(*adamw, *DP2))
    assert r.returncode == 0, r.stderr[-3000:]
    r = k2("pretrain", "--run-dir", tmp_path / "one", *sets(*adamw, "train.batch_size=8"))
    assert r.returncode == 0, r.stderr
    (steps, two), (_, one) = zip(*losses(tmp_path / "dp2"), strict=True), zip(*losses(tmp_path / "one"), strict=True)
    assert len(steps) == 10
    assert two == pytest.approx(one, rel=1e-5)
    # fp32 AdamW on gradients that differ in summation order (~1e-7 relative): after 10 steps of lr 1e-2 the weights
    # agree to a few 1e-5, mostly where Adam divides a near-zero gradient by its near-zero second moment.
    w1, w2 = weights(tmp_path / "one"), weights(tmp_path / "dp2")
    for name, t in w1.items():
        torch.testing.assert_close(w2[name], t, rtol=1e-4, atol=1e-4, msg=name)


def test_dp2_checkpoint_resumes_in_one_process(dp2_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "resumed"
    shutil.copytree(dp2_run, run)
    shutil.rmtree(run / "checkpoints" / "step_00000010")  # as if dp=2 had died after step 5's checkpoint
    r = k2("pretrain", "--resume", run)  # the saved config says dp=2: one process must be told
    assert r.returncode != 0 and "parallel: pp·dp = 2 but WORLD_SIZE = 1" in r.stderr
    r = k2("pretrain", "--resume", run, *sets("parallel.dp=1", *ACCUM))
    assert r.returncode == 0, r.stderr
    assert losses(run) == losses(dp2_run)  # steps 6..10 from the resharded ZeRO-1 state, bit for bit
    for name, t in weights(dp2_run).items():
        assert torch.equal(weights(run)[name], t), name


def test_one_process_checkpoint_resumes_with_dp2(accum_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "resumed"
    shutil.copytree(accum_run, run)
    shutil.rmtree(run / "checkpoints" / "step_00000010")
    r = torchrun(2, "pretrain", "--resume", run, *sets(*DP2, "train.grad_accum=1"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert losses(run) == losses(accum_run)  # the 1-process optimizer state resharded into ZeRO-1 halves
    for name, t in weights(accum_run).items():
        assert torch.equal(weights(run)[name], t), name
