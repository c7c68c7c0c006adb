"""Distributed training checkpoints (k2.train.checkpoint) with 2 gloo processes and ZeRO-1 MuonClip.

Two processes train the micro model of ``test_train_checkpoint`` data-parallel (each rank takes half of every
batch; MuonClip with ``process_group`` keeps a 1/2 chunk of every momentum and Adam moment) and save twice with
``keep_last=1``. The checkpoint is then resumed by 2 processes and by 1 process (DCP resharding), and everything
is compared with what the saving ranks held: model tensors, every optimizer state tensor (the single process's
full tensor is the saving ranks' chunks concatenated), hyperparameters, trainer state (data position) and each
rank's RNG stream. The saving ranks also record which directory each wrote into and what each deleted: one
temporary directory agreed by both, with both ranks' shards in the result, and only rank 0 deleting (a stale
temporary directory of a crashed earlier save, and the checkpoint pruned by keep-last).
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_distributed_muon import free_port
from test_train_checkpoint import MICRO

from k2.data import ByteTokenizer, corpus, packing
from k2.model import Transformer
from k2.optim import MuonClip
from k2.train import checkpoint as ckpt
from k2.train.config import build_config

pytestmark = pytest.mark.multiproc

WORLD = 2
STALE = ".step_00000001.tmp-crashed"


def _setup(process_group, seed: int):
    config = build_config(overrides=[*MICRO, "optim.name=muonclip", "optim.qk_clip_tau=0.5"])
    torch.manual_seed(seed)
    model = Transformer(config.model.build())
    o = config.optim
    opt = MuonClip.from_model(
        model, lr=o.lr, weight_decay=o.weight_decay, qk_clip_tau=o.qk_clip_tau, momentum=o.momentum,
        betas=o.betas, adamw_eps=o.eps, process_group=process_group,
    )  # fmt: skip
    data = packing.pack_documents(corpus.generate(100, seed=3), ByteTokenizer(), config.data.context_len)
    return model, opt, packing.BatchIterator(data, config.train.batch_size, seed=0)


def _step(model, opt, batches, rank: int, world: int) -> None:
    x, y = next(batches)  # the global batch; this rank's rows of it
    rows = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
    model.loss(x[rows], y[rows]).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _trainer_state(batches, step: int) -> dict:
    return {"step": step, "data": batches.state_dict()}


def _snapshot(model, opt) -> dict:
    names = {p: n for n, p in model.named_parameters()}
    return {
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "optim": {names[p]: {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()},
        "lr": [g["lr"] for g in opt.param_groups],
    }


def _draws() -> dict:
    return {"torch": torch.rand(4), "numpy": np.random.rand(3), "python": random.random()}


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _save_worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        run = Path(out) / "run"
        deleted, written = [], []
        real_rmtree, real_save = shutil.rmtree, ckpt.dcp.save

        def rmtree(path, *args, **kw):
            deleted.append(Path(path).name)
            real_rmtree(path, *args, **kw)

        def save(state, *, storage_writer, **kw):  # which directory this rank writes, and what temporaries exist
            temporaries = sorted(p.name for p in (run / ckpt.CHECKPOINT_DIR).glob(".step_*tmp-*"))
            written.append((Path(storage_writer.path).name, temporaries))
            return real_save(state, storage_writer=storage_writer, **kw)

        ckpt.shutil.rmtree, ckpt.dcp.save = rmtree, save
        if rank == 0:  # a crashed earlier save left its temporary directory
            (run / ckpt.CHECKPOINT_DIR / STALE).mkdir(parents=True)
            (run / ckpt.CHECKPOINT_DIR / STALE / "__0_0.distcp").write_bytes(b"partial")
        dist.barrier()

        model, opt, batches = _setup(dist.group.WORLD, seed=0)
        _step(model, opt, batches, rank, world)
        ckpt.save_checkpoint(run, 1, model, opt, _trainer_state(batches, 1), keep_last=1)
        _step(model, opt, batches, rank, world)
        _seed(1000 + rank)  # a different RNG stream per rank
        path = ckpt.save_checkpoint(run, 2, model, opt, _trainer_state(batches, 2), keep_last=1)
        saved = {**_snapshot(model, opt), "trainer": _trainer_state(batches, 2), "draws": _draws()}
        _step(model, opt, batches, rank, world)
        saved["next"] = _snapshot(model, opt)["model"]
        saved.update(path=str(path), deleted=deleted, written=written, files=sorted(p.name for p in path.iterdir()))
        torch.save(saved, f"{out}/saved{rank}.pt")
    finally:
        dist.destroy_process_group()


def _resume_worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model, opt, batches = _setup(dist.group.WORLD, seed=123)  # a different init: all must come from the file
        _seed(7)
        state = ckpt.load_checkpoint(ckpt.latest_checkpoint(Path(out) / "run"), model, opt, _trainer_state(batches, 0))
        resumed = {**_snapshot(model, opt), "trainer": state, "draws": _draws()}
        batches.load_state_dict(state["data"])
        _step(model, opt, batches, rank, world)
        resumed["next"] = _snapshot(model, opt)["model"]
        torch.save(resumed, f"{out}/resumed{rank}.pt")
    finally:
        dist.destroy_process_group()


def _assert_equal(a, b, where: str = "") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("ckpt")
    mp.spawn(_save_worker, args=(WORLD, free_port(), str(out)), nprocs=WORLD, join=True)
    return out, [torch.load(out / f"saved{r}.pt", weights_only=False) for r in range(WORLD)]


def test_ranks_write_one_agreed_directory_and_only_rank0_deletes(saved) -> None:
    out, ranks = saved
    for save in range(2):
        directories = {r["written"][save][0] for r in ranks}
        assert len(directories) == 1, directories  # both ranks wrote into the same temporary directory
        (directory,) = directories
        for r in ranks:  # ... which is the only temporary directory while they write: nothing else is in progress
            assert r["written"][save][1] == [directory]
    assert ranks[1]["deleted"] == []  # a rank other than 0 never deletes anything
    assert STALE in ranks[0]["deleted"] and "step_00000001" in ranks[0]["deleted"]  # stale temporary, keep-last
    assert all(r["path"] == str(out / "run" / ckpt.CHECKPOINT_DIR / "step_00000002") for r in ranks)
    assert "__0_0.distcp" in ranks[0]["files"] and "__1_0.distcp" in ranks[0]["files"]  # both ranks' shards
    assert [s for s, _ in ckpt.list_checkpoints(out / "run")] == [2]
    assert not list((out / "run" / ckpt.CHECKPOINT_DIR).glob(".*"))
    assert ckpt.read_meta(out / "run" / ckpt.CHECKPOINT_DIR / "step_00000002")["world_size"] == WORLD


def test_resume_on_two_processes_is_identical(saved) -> None:
    out, ranks = saved
    mp.spawn(_resume_worker, args=(WORLD, free_port(), str(out)), nprocs=WORLD, join=True)
    for rank, save in enumerate(ranks):
        resumed = torch.load(out / f"resumed{rank}.pt", weights_only=False)
        chunks = [v for entry in resumed["optim"].values() for v in entry.values() if v.dim()]
        assert chunks and all(v.dim() == 1 for v in chunks)  # ZeRO-1: each rank holds flat chunks
        for key in ("model", "optim", "lr", "trainer", "draws", "next"):  # "next": one more step, bit for bit
            _assert_equal(resumed[key], save[key], f"rank{rank}.{key}")


def test_resume_on_one_process_reshards(saved) -> None:
    out, ranks = saved
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, opt, batches = _setup(None, seed=123)
        _seed(7)
        state = ckpt.load_checkpoint(ckpt.latest_checkpoint(out / "run"), model, opt, _trainer_state(batches, 0))
        resumed = {**_snapshot(model, opt), "trainer": state, "draws": _draws()}
    finally:
        torch.set_num_threads(threads)
    params = dict(model.named_parameters())
    full = {  # the saving ranks' chunks of each flattened state tensor, concatenated and reshaped
        name: {
            k: v if v.dim() == 0 else torch.cat([r["optim"][name][k] for r in ranks]).view(params[name].shape)
            for k, v in entry.items()
        }
        for name, entry in ranks[0]["optim"].items()
    }
    assert set(full) == set(params) - {n for n, p in params.items() if not p.requires_grad}
    for key, expected in (("model", ranks[0]["model"]), ("optim", full), ("lr", ranks[0]["lr"])):
        _assert_equal(resumed[key], expected, key)
    _assert_equal(resumed["trainer"], ranks[0]["trainer"], "trainer")
    _assert_equal(resumed["draws"], ranks[0]["draws"], "draws")  # rank 0's RNG streams
