"""K2's activation reductions in a dp=2 / ep=2 ``k2 pretrain`` with gradient accumulation (torchrun, gloo on the CPU),
against the same layout without them: recompute + offload give bit-identical losses (the math is unchanged); with
FP8 storage as well the first step's loss is identical (storage only: the forward is unchanged) and the next
steps' within 2 % (gradients within ~3 %, ``test_activation_memory``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from _k2_cli import losses
from test_parallel_dp import RUN, sets, torchrun

pytestmark = pytest.mark.multiproc

LAYOUT = [
    *RUN,
    "model.n_routed_experts=8",
    "parallel.dp=2",
    "parallel.ep=2",
    "train.batch_size=8",
    "train.grad_accum=2",
]
RECOMPUTE_OFFLOAD = [
    'train.recompute=["norm","swiglu","mla_up_proj","moe_down_proj"]',
    "train.offload_activations=true",
]
FP8 = ['train.fp8_activations=["moe_up_proj_input","swiglu_input"]']


def _run(tmp_path: Path, name: str, *extra: str) -> list[float]:
    run = tmp_path / name
    r = torchrun(2, "pretrain", "--run-dir", run, *sets(*LAYOUT, "checkpoint.export_hf=false", *extra))
    assert r.returncode == 0, r.stderr[-3000:]
    return [loss for _, loss in losses(run)]


def test_dp_ep_grad_accum_with_all_three(tmp_path: Path) -> None:
    plain = _run(tmp_path, "plain")
    assert len(plain) == 10
    assert _run(tmp_path, "recompute-offload", *RECOMPUTE_OFFLOAD) == plain
    with_fp8 = _run(tmp_path, "all-three", *RECOMPUTE_OFFLOAD, *FP8)
    assert with_fp8[0] == plain[0]
    assert with_fp8 == pytest.approx(plain, rel=2e-2)
