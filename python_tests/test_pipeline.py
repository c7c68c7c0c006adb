"""Pipeline parallelism (``k2.parallel.pipeline`` over ``torch.distributed.pipelining``, gloo on the CPU) against one
process.

Oracle: the one-process run of the same batches with gradient accumulation over the same micro-batches (loss /
micro-batches, backward each, global clip, optimizer, expert-bias update from the summed loads; ``tiny`` with the
sequence-wise balance loss on). The pipeline does the same arithmetic on the same rows, the gradients summed in
the same order and scaled by 1/micro-batches after instead of before (equal to rounding), so losses agree to 1e-5
relative and AdamW parameters to 5e-5 — for 10 AdamW steps and 3 MuonClip steps with QK-Clip active (τ = 5; its
bf16 Newton-Schulz turns a last-bit gradient difference into a bf16 one, so a parameter may differ by a fraction of
one lr-sized update: 1e-3), for a step of every named schedule,
and for 2 steps composed with dp=2 × ep=2 (whose gradient average adds one more summation order).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _pipeline_worker import reference

from k2.errors import ConfigError
from k2.parallel.plan import check_pipeline

pytestmark = pytest.mark.multiproc

WORKER = Path(__file__).with_name("_pipeline_worker.py")
BASE = {"pp": 2, "dp": 1, "seq": 16}
PP2 = [
    {**BASE, "v": 2, "schedule": "interleaved_1f1b", "microbatches": 2, "rows": 4, "steps": 10, "optim": "adamw"},
    {**BASE, "v": 2, "schedule": "interleaved_1f1b", "microbatches": 2, "rows": 4, "steps": 3, "optim": "muonclip"},
    *(
        {**BASE, "v": v, "schedule": name, "microbatches": 2, "rows": 4, "steps": 1, "optim": "adamw"}
        for name, v in (("gpipe", 1), ("1f1b", 1), ("interleaved_zero_bubble", 2), ("looped_bfs", 2))
    ),
]
PP2_DP2_EP2 = [
    {"pp": 2, "dp": 2, "ep": 2, "seq": 16, "v": 2, "schedule": "interleaved_1f1b", "microbatches": 2, "rows": 8}
    | {"steps": 2, "optim": "adamw"}
]


def launch(nproc: int, specs: list[dict], out: Path) -> list[list[dict]]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", str(WORKER)]
    r = subprocess.run([*cmd, str(out), json.dumps(specs)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    return [torch.load(out / f"rank{rank}.pt") for rank in range(nproc)]


def gathered_params(ranks: list[list[dict]], run: int) -> dict[str, torch.Tensor]:
    """Every rank's parameters of ``run``; expert slices held by several ranks are concatenated in rank order (the
    EP ranks of one stage are consecutive)."""
    parts: dict[str, list[torch.Tensor]] = {}
    for rank in ranks:
        for key, value in rank[run]["params"].items():
            parts.setdefault(key, []).append(value)
    out = {}
    for key, values in parts.items():
        same = all(torch.equal(v, values[0]) for v in values)
        out[key] = values[0] if same else torch.cat(values)
    return out


def assert_reproduces(ranks: list[list[dict]], specs: list[dict]) -> None:
    for i, spec in enumerate(specs):
        ref = reference(spec)
        for rank in ranks:  # every rank reports the global loss
            torch.testing.assert_close(
                torch.tensor(rank[i]["losses"]), torch.tensor(ref["losses"]).float(), rtol=1e-5, atol=0
            )
        params = gathered_params(ranks, i)
        assert params.keys() == ref["params"].keys()
        atol = 5e-5 if spec["optim"] == "adamw" else 1e-3  # MuonClip: at most one bf16-flipped lr-sized update
        for key, value in params.items():
            torch.testing.assert_close(value, ref["params"][key], rtol=0, atol=atol, msg=f"{spec['schedule']} {key}")


def test_pp2_every_schedule_reproduces_one_process(tmp_path: Path) -> None:
    ranks = launch(2, PP2, tmp_path)
    assert [r[0]["stages"] for r in ranks] == [[0, 2], [1, 3]]  # loop placement of 2 x 2 virtual stages
    assert_reproduces(ranks, PP2)


def test_pp2_dp2_ep2_reproduces_one_process(tmp_path: Path) -> None:
    ranks = launch(4, PP2_DP2_EP2, tmp_path)
    assert_reproduces(ranks, PP2_DP2_EP2)


@pytest.mark.parametrize(
    "args,message",
    [
        ((4, 3, 2, "interleaved_1f1b", 6), "6 stages but the model has 4 layers"),
        ((4, 2, 2, "interleaved_1f1b", 1), "needs a multiple of parallel.pp=2"),
        ((4, 2, 2, "interleaved_1f1b", 3), "needs a multiple of parallel.pp=2"),
        ((4, 2, 2, "1f1b", 4), "runs one stage per rank"),
        ((4, 2, 1, "zigzag", 4), "known schedules"),
        ((4, 2, 2, "interleaved_1f1b", 4, [1, 1, 1, 2]), "parallel.pp_layers"),
    ],
)
def test_bad_pipeline_layouts_are_one_line_errors(args: tuple, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        check_pipeline(*args)
    assert "\n" not in str(info.value)
