"""Faults in a distributed ``k2 pretrain`` launched as a user does (``torchrun --nproc-per-node=2 --no-python k2
pretrain --set parallel.dp=2``, gloo on the CPU): a rank that dies or hangs ends the whole job non-zero, promptly,
with a report that names the failure — never a hang — and the last checkpoint stays intact and resumable.

What ends the job (observed with torch 2.13, and what these tests pin down):
- a worker that dies (SIGKILL): torchrun's agent sees the exit within its monitor interval (0.1 s), sends SIGTERM to
  the other workers and exits 1; its "Root Cause" report names the rank and the signal. Well under a second, long
  before ``parallel.timeout_s``.
- a worker that hangs (here SIGSTOP: alive, its sockets open, nothing for the agent to see): the other ranks' gloo
  collectives give up after ``parallel.timeout_s`` (the process-group timeout, ``k2.parallel.mesh``) with
  "Timed out waiting ...ms"; that rank exits 1, torchrun SIGTERMs the rest and exits 1, its report naming the rank
  that gave up (the timeout message is in that rank's output). A hung but running process dies on the SIGTERM at
  once; a stopped one cannot act on it, and torchrun SIGKILLs it after a fixed 30 s grace.
- a worker that dies during a checkpoint save, after writing its shard but before the save commits: the save never
  completes, the job ends as above, the temporary directory is never listed as a checkpoint, and the next save
  removes it.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _k2_cli import ENV, k2, losses
from test_pretrain_cli import MICRO

from k2.train.checkpoint import list_checkpoints

pytestmark = [
    pytest.mark.multiproc,
    pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the workers through /proc"),
]

TIMEOUT_S = 20  # parallel.timeout_s of these jobs
STEPS = 30
RUN = [
    *[item for item in MICRO if not item.startswith(("train.batch_size", "train.steps", "train.checkpoint_every"))],
    f"train.steps={STEPS}",
    "train.checkpoint_every=5",
    "eval.every=1000",  # no eval: it would only make the steps uneven
    "parallel.dp=2",
    "train.batch_size=8",
    f"parallel.timeout_s={TIMEOUT_S}",
]
KILLER = Path(__file__).with_name("_die_in_checkpoint_save.py")


def sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


class Job:
    """A ``torchrun`` job in its own session (so a failed test can kill all of it), output in files."""

    def __init__(self, run: Path, worker: list[str], *args: str, env: dict[str, str] | None = None) -> None:
        self.run = run
        self.log = run.with_suffix(".log")
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--no-python"]
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                [*torchrun, *worker, "pretrain", "--run-dir", str(run), *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**ENV, **(env or {})},
                start_new_session=True,
            )

    def workers(self) -> dict[int, int]:
        """``{rank: pid}`` of the agent's worker processes (its children, with torchrun's ``RANK``)."""
        found = {}
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                stat = (proc / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) != self.proc.pid:
                    continue
                env = dict(e.split("=", 1) for e in (proc / "environ").read_text().split("\0") if "=" in e)
            except (OSError, ValueError):
                continue  # gone meanwhile
            if "RANK" in env:
                found[int(env["RANK"])] = int(proc.name)
        return found

    def wait_for_step(self, step: int, deadline_s: float = 120) -> None:
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"the job ended (rc {self.proc.returncode}) before step {step}:\n{self.output()[-3000:]}")
            if (self.run / "metrics.jsonl").exists() and any(s >= step for s, _ in losses(self.run)):
                return
            time.sleep(0.02)
        pytest.fail(f"no step {step} within {deadline_s} s")

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def jobs():
    started: list[Job] = []
    yield started
    for job in started:  # whatever the test did, no process outlives it
        with contextlib.suppress(ProcessLookupError):  # the session may be gone already
            os.killpg(job.proc.pid, signal.SIGKILL)
        job.proc.wait()


def k2_worker() -> list[str]:
    script = Path(sys.executable).with_name("k2")
    return [str(script)] if script.exists() else [sys.executable, "-m", "k2.cli"]


def root_cause(output: str) -> str:
    """torchrun's "Root Cause (first observed failure)" block."""
    assert "Root Cause (first observed failure)" in output, output[-3000:]
    return output.split("Root Cause (first observed failure)", 1)[1]


def assert_checkpoints_intact(run: Path) -> int:
    """Every listed checkpoint is complete (DCP metadata, both ranks' shards, meta.json); returns the latest step."""
    listed = list_checkpoints(run)
    assert listed, "no checkpoint"
    for _, path in listed:
        assert {p.name for p in path.iterdir()} >= {".metadata", "meta.json", "__0_0.distcp", "__1_0.distcp"}, path
    return listed[-1][0]


def resume_in_one_process(run: Path, from_step: int) -> None:
    r = k2("pretrain", "--resume", run, *sets("parallel.dp=1"))
    assert r.returncode == 0, r.stderr[-3000:]
    steps = [s for s, _ in losses(run)]
    assert steps[-1] == STEPS and (run / "summary.json").exists()
    # The records after the checkpoint are the resumed ones: from_step + 1 .. STEPS, once each.
    assert steps[steps.index(from_step + 1) :] == list(range(from_step + 1, STEPS + 1))
    assert not list((run / "checkpoints").glob(".step_*tmp-*"))  # a crashed save's leftovers are gone


def test_a_killed_worker_ends_the_job_within_the_timeout_and_the_run_resumes(tmp_path: Path, jobs: list) -> None:
    run = tmp_path / "run"
    jobs.append(job := Job(run, k2_worker(), *sets(*RUN)))
    job.wait_for_step(12)  # checkpoints at 5 and 10 exist; training runs
    workers = job.workers()
    assert sorted(workers) == [0, 1], workers
    killed = time.monotonic()
    os.kill(workers[1], signal.SIGKILL)
    rc = job.wait(timeout=TIMEOUT_S + 10)
    elapsed = time.monotonic() - killed
    out = job.output()
    assert rc is not None, f"the job still runs {elapsed:.0f} s after a worker died:\n{out[-3000:]}"
    assert rc != 0 and elapsed < TIMEOUT_S, (rc, elapsed)
    cause = root_cause(out)  # torchrun names the rank that died and how
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)", cause) and "SIGKILL" in cause, cause
    assert not (run / "summary.json").exists()
    last = assert_checkpoints_intact(run)
    assert 10 <= last < STEPS
    resume_in_one_process(run, last)


def _gone(pid: int) -> bool:
    """Exited (a zombie not yet reaped by the agent counts)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except OSError:
        return True


def test_a_hung_worker_ends_the_job_through_the_collective_timeout(tmp_path: Path, jobs: list) -> None:
    timeout_s = 5
    run = tmp_path / "run"
    jobs.append(job := Job(run, k2_worker(), *sets(*RUN, f"parallel.timeout_s={timeout_s}")))
    job.wait_for_step(7)
    workers = job.workers()
    stopped = time.monotonic()
    os.kill(workers[1], signal.SIGSTOP)  # alive, connected, silent: only the collective timeout can notice
    while not _gone(workers[0]) and time.monotonic() - stopped < timeout_s + 15:
        time.sleep(0.05)
    gave_up = time.monotonic() - stopped
    assert timeout_s - 1 < gave_up < timeout_s + 5, gave_up  # rank 0's collective gave up after parallel.timeout_s
    # torchrun has now sent rank 1 SIGTERM, which a stopped process cannot act on (torchrun would SIGKILL it after a
    # fixed 30 s grace). Let it run, as a hung but running process would: the SIGTERM ends it at once.
    os.kill(workers[1], signal.SIGCONT)
    rc = job.wait(timeout=10)
    out = job.output()
    assert rc is not None, f"the job still runs after rank 0 gave up:\n{out[-3000:]}"
    assert rc != 0
    assert f"Timed out waiting {timeout_s * 1000}ms" in out, out[-3000:]  # rank 0's collective names the failure
    assert re.search(r"rank\s*: 0 \(local_rank: 0\)\s+exitcode\s*: 1", root_cause(out)), out[-3000:]
    assert_checkpoints_intact(run)


def test_a_worker_killed_during_a_checkpoint_save_leaves_the_previous_checkpoint(tmp_path: Path, jobs: list) -> None:
    # Rank 1 SIGKILLs itself right after DCP wrote its shard of the second save (step 10), before the save commits:
    # rank 0 waits in the save's barrier and never renames the temporary directory.
    run = tmp_path / "run"
    jobs.append(job := Job(run, [sys.executable, str(KILLER)], *sets(*RUN), env={"K2_TEST_DIE_IN_SAVE": "1:2"}))
    rc = job.wait(timeout=120)
    out = job.output()
    assert rc is not None and rc != 0, out[-3000:]
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)", root_cause(out)) and "SIGKILL" in root_cause(out), out[-3000:]
    (partial,) = (run / "checkpoints").glob(".step_00000010.tmp-*")
    assert (partial / "__1_0.distcp").exists()  # rank 1's data was written: only the commit is missing
    assert assert_checkpoints_intact(run) == 5  # the interrupted save is not listed
    resume_in_one_process(run, 5)
