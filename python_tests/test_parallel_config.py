"""``[parallel]``: every bad layout is a one-line ``ConfigError`` (from ``build_config``, from ``k2 pretrain`` in one
process, and on every rank of a torchrun job before any work); ``k2.parallel.init_parallel`` builds the K2 layout
(EP groups of consecutive dp ranks, expert-replica groups of equal EP rank) over 4 gloo processes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _k2_cli import k2
from test_distributed_muon import free_port
from test_parallel_dp import RUN, sets, torchrun
from test_pretrain_cli import _one_line_error

from k2.errors import ConfigError
from k2.parallel import ParallelState, init_parallel
from k2.train.config import build_config, validate_parallel


def test_default_is_one_process() -> None:
    p = build_config().parallel
    assert (p.dp, p.ep, p.pp) == (1, 1, 1)
    validate_parallel(build_config(), world_size=1)
    assert init_parallel(dp=1, ep=1, pp=1, timeout_s=1, device=torch.device("cpu")) == ParallelState()


@pytest.mark.parametrize(
    ("items", "world", "message"),
    [
        (["parallel.pp=4"], None, "parallel.pp=4 x parallel.pp_virtual_stages=2 = 8 stages but the model has 4"),
        (["parallel.pp=2"], 1, "parallel: pp·dp = 2 but WORLD_SIZE = 1; run 2 processes"),
        (["parallel.dp=4", "parallel.ep=3"], None, "parallel.ep=3 must divide parallel.dp=4"),
        (
            ["parallel.dp=6", "parallel.ep=3", "train.batch_size=6"],
            None,
            "parallel.ep=3 must divide model.n_routed_experts=8",
        ),
        (
            ["parallel.dp=2", "train.batch_size=5"],
            None,
            "train.batch_size=5 is the global batch and must be a multiple",
        ),
        (["parallel.dp=0"], None, "parallel.dp must be >= 1, got 0"),
        (["parallel.timeout_s=0"], None, "parallel.timeout_s must be > 0"),
        (["parallel.dp=2"], 1, "parallel: pp·dp = 2 but WORLD_SIZE = 1; run 2 processes"),
        ([], 4, "parallel: pp·dp = 1 but WORLD_SIZE = 4; run 1 process (torchrun"),
    ],
)
def test_bad_layout_is_a_config_error(items: list[str], world: int | None, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        validate_parallel(build_config(overrides=items), world_size=world)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_cli_without_torchrun_is_a_one_line_error(tmp_path: Path) -> None:
    r = k2("pretrain", "--run-dir", tmp_path / "run", "--set", "parallel.dp=2")
    _one_line_error(r, "parallel: pp·dp = 2 but WORLD_SIZE = 1; run 2 processes (torchrun --nproc-per-node=2")
    assert not (tmp_path / "run").exists()


@pytest.mark.multiproc
def test_torchrun_mismatch_fails_on_every_rank_before_any_work(tmp_path: Path) -> None:
    r = torchrun(2, "pretrain", "--run-dir", tmp_path / "run", *sets(*RUN))  # 2 processes, parallel.dp=1
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("k2 pretrain: error: ")]
    assert errors == ["k2 pretrain: error: parallel: pp·dp = 1 but WORLD_SIZE = 2; run 1 process "
                      "(torchrun --nproc-per-node=1 --no-python k2 pretrain ...) or set parallel.dp=2"] * 2  # fmt: skip
    assert not (tmp_path / "run").exists()


def _mesh_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    par = init_parallel(dp=4, ep=2, pp=1, timeout_s=60, device=torch.device("cpu"))
    try:
        assert par.owns_process_group and par.is_main == (rank == 0)
        ranks = dist.get_process_group_ranks
        torch.save(
            {
                "dp_rank": par.dp_rank,
                "ep_rank": par.ep_rank,
                "mesh": par.device_mesh.mesh.tolist(),
                "dp": ranks(par.dp_group),
                "ep": ranks(par.ep_group),
                "replica": ranks(par.expert_replica_group),
            },
            f"{out}/{rank}.pt",
        )
    finally:
        par.close()


@pytest.mark.multiproc
def test_mesh_draws_expert_parallel_groups_from_dp(tmp_path: Path) -> None:
    mp.spawn(_mesh_worker, args=(4, free_port(), str(tmp_path)), nprocs=4, join=True)
    got = [torch.load(tmp_path / f"{r}.pt") for r in range(4)]
    for r, g in enumerate(got):
        assert g["mesh"] == [[0, 1, 2, 3]] and g["dp"] == [0, 1, 2, 3]
        assert (g["dp_rank"], g["ep_rank"]) == (r, r % 2)
        assert g["ep"] == ([0, 1] if r < 2 else [2, 3])  # consecutive dp ranks hold all experts together
        assert g["replica"] == ([0, 2] if r % 2 == 0 else [1, 3])  # same EP rank = same experts
