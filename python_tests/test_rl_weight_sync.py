"""Weight sync: the colocated bucketed copy and the 2-process (gloo) double-buffered broadcast leave the engine's
tensors bit-identical to the trainer's."""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os

import pytest
import torch

from k2.model import Transformer, presets
from k2.rl.weight_sync import BroadcastReceiver, BroadcastSender, ColocatedSync, plan_buckets, sync_group

TINY = presets.get("tiny").replace(num_hidden_layers=2, vocab_size=128)


def _model(seed: int, dtype=torch.float32) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(TINY).to(dtype)


def _assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_plan_buckets_respects_size_and_order():
    sizes = {"a": 10, "b": 15, "c": 30, "d": 5, "e": 12, "f": 100, "g": 19, "h": 19, "i": 3}
    buckets = plan_buckets({k: torch.zeros(n) for k, n in sizes.items()}, bucket_bytes=160)  # 40 fp32 values
    # c and f (at least half a bucket) travel alone; g + h + i would overflow the bucket.
    assert [[e.name for e in b] for b in buckets] == [["a", "b"], ["c"], ["d", "e"], ["f"], ["g", "h"], ["i"]]
    assert [e.offset for e in buckets[0]] == [0, 10]
    assert all(sum(e.numel for e in b) <= 40 for b in buckets if len(b) > 1)


@pytest.mark.parametrize("staged", [False, True])
def test_colocated_sync_is_exact(staged):
    trainer, engine = _model(0), _model(1)
    with torch.no_grad():  # expert biases are buffers; they must travel too
        for moe in trainer.moe_layers():
            moe.gate.e_score_correction_bias.uniform_()
    sync = ColocatedSync(trainer, engine, bucket_bytes=50_000, staged=staged)
    assert len(sync.buckets) > 3
    sync.sync()
    _assert_bit_identical(trainer.state_dict(), engine.state_dict())


def test_colocated_sync_casts_to_the_engine_dtype():
    trainer, engine = _model(0), _model(1, torch.bfloat16)
    ColocatedSync(trainer, engine, bucket_bytes=50_000, staged=True).sync()
    dtypes = {k: v.dtype for k, v in engine.state_dict().items()}  # the router bias stays fp32
    assert torch.bfloat16 in dtypes.values()
    ref = {k: v.to(dtypes[k]) for k, v in trainer.state_dict().items()}
    _assert_bit_identical(ref, engine.state_dict())


def _worker(rank: int, init_file: str, out_dir: str, rounds: int, receiver_dtype: torch.dtype) -> None:
    import torch.distributed as dist

    torch.set_num_threads(2)  # the threaded copies
    group = None  # fp32: the default group; bf16: a group of its own
    if receiver_dtype == torch.float32:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    else:
        group = sync_group(f"file://{init_file}", rank, 2, datetime.timedelta(seconds=60))
    try:
        model = _model(rank, torch.float32 if rank == 0 else receiver_dtype)
        side = (
            BroadcastSender(model, bucket_bytes=30_000, group=group)
            if rank == 0
            else BroadcastReceiver(model, group=group)
        )
        packed = [item.copies is not None for item in side.items]
        assert any(packed) and (not all(packed) or receiver_dtype != torch.float32)  # in place and packed buckets
        for r in range(rounds):
            if rank == 0:
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(torch.randn_like(p))  # a training step
                side.sync(10 + r)
            else:
                assert side.sync() == 10 + r  # the sender's sync id
            torch.save(model.state_dict(), os.path.join(out_dir, f"rank{rank}_round{r}.pt"))
        if rank == 0:
            side.close()
        else:
            assert side.wait() is None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.multiproc
@pytest.mark.parametrize("receiver_dtype", [torch.float32, torch.bfloat16])
def test_broadcast_sync_two_processes_bit_identical(tmp_path, receiver_dtype):
    """fp32 → fp32 (the default group) sends the large tensors in place and packs the small ones; fp32 → bf16 (a
    ``sync_group`` of its own) unpacks every bucket with a cast. Sync ids arrive with each sync, and a closed sender
    ends the receiver's wait."""
    ctx = mp.get_context("spawn")
    args = (str(tmp_path / "init"), str(tmp_path), 2, receiver_dtype)
    procs = [ctx.Process(target=_worker, args=(r, *args)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    for r in range(2):
        received = torch.load(tmp_path / f"rank1_round{r}.pt")
        sent = {k: v.to(received[k].dtype) for k, v in torch.load(tmp_path / f"rank0_round{r}.pt").items()}
        _assert_bit_identical(sent, received)
    assert not torch.equal(torch.load(tmp_path / "rank0_round0.pt")["lm_head.weight"], _model(1).lm_head.weight)
