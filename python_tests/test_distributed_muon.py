"""ZeRO-1 distributed MuonClip on 2 and 4 gloo processes ends exactly where one process ends, after 5 steps.

Each rank trains the tiny k2 model with ``process_group`` set: sharded momentum and AdamW state, Newton-Schulz of
each matrix on its owner rank (gather/scatter), parameter all-gather, QK-Clip with MAX-all-reduced logits (τ is
low so heads are clipped). Two set-ups make the single-process oracle exact, so the tolerance is zero:

- ``full``: every rank computes the gradient of the whole batch and ``reduce_gradients=False`` (gradients
  already averaged, as under DDP); the oracle is one process on the whole batch.
- ``split`` (2 ranks): each rank takes half the batch and ``step()`` averages the gradients; the oracle sums the
  two halves' gradients in one process, ``(a + b) / 2`` being exactly what a 2-rank all-reduce computes, and takes
  the max of the two halves' logits. (With 4 ranks the all-reduce's summation order is gloo's own, so the fp32
  gradients differ in the last bit; Muon's bf16 Newton-Schulz amplifies such bits in the near-null space of a
  low-rank gradient — e.g. an expert that saw few tokens — to ~1e-4, which is why the exact oracles are used.)
"""

from __future__ import annotations

import dataclasses
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from k2.model import Transformer, presets
from k2.optim import MuonClip

pytestmark = pytest.mark.multiproc

STEPS, BATCH, SEQ, LR, TAU = 5, 4, 24, 3e-3, 0.08


def _config():
    return dataclasses.replace(presets.tiny(), num_hidden_layers=2)


def _global_batch(step: int) -> torch.Tensor:
    return torch.randint(0, 512, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(100 + step))


def _train(rank: int, world: int, mode: str, process_group) -> tuple[dict[str, torch.Tensor], list[int]]:
    """``mode`` "full": this rank's gradient is the whole batch's; "split": the rank's slice, averaged in step();
    "oracle-split": one process emulating ``world`` ranks of "split" (sum of slice gradients / world)."""
    torch.manual_seed(0)
    model = Transformer(_config())
    reduce = mode == "split"
    opt = MuonClip.from_model(model, lr=LR, qk_clip_tau=TAU, process_group=process_group, reduce_gradients=reduce)
    clipped = []
    for step in range(STEPS):
        ids = _global_batch(step)
        model.zero_grad()
        if mode == "full":
            model.loss(ids[:, :-1], ids[:, 1:]).backward()
        elif mode == "split":
            rows = ids[rank * BATCH // world : (rank + 1) * BATCH // world]
            model.loss(rows[:, :-1], rows[:, 1:]).backward()
        else:
            grads, logits = [], []
            for r in range(world):
                rows = ids[r * BATCH // world : (r + 1) * BATCH // world]
                model.zero_grad()
                model.loss(rows[:, :-1], rows[:, 1:]).backward()
                grads.append([p.grad.clone() for p in model.parameters()])
                logits.append([a.max_logits.clone() for a in model.attention_layers()])
            for i, p in enumerate(model.parameters()):
                p.grad = sum(g[i] for g in grads[1:]) if world == 1 else (grads[0][i] + grads[1][i]) / world
            for i, a in enumerate(model.attention_layers()):
                a.max_logits = torch.maximum(logits[0][i], logits[1][i])
        opt.step()
        clipped.append(int(opt.last_qk_clip["clipped_heads"].sum()))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, clipped


def _worker(rank: int, world: int, mode: str, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        state, clipped = _train(rank, world, mode, dist.group.WORLD)
        torch.save({"state": state, "clipped": clipped}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    """A free TCP port on loopback for a gloo rendezvous (shared with the other multi-process tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process(mode: str) -> tuple[dict[str, torch.Tensor], list[int]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(0, 2, "oracle-split", None) if mode == "split" else _train(0, 1, "full", None)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(("world", "mode"), [(4, "full"), (2, "split")])
def test_distributed_equals_single_process(world, mode, tmp_path):
    mp.spawn(_worker, args=(world, mode, free_port(), str(tmp_path)), nprocs=world, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    expected_state, expected_clipped = _single_process(mode)
    assert sum(expected_clipped) > 0, expected_clipped  # QK-Clip fired: the MAX all-reduce is exercised
    for r, result in enumerate(results):
        assert result["clipped"] == expected_clipped, r
        for name, value in result["state"].items():
            assert torch.equal(value, expected_state[name]), (r, name, (value - expected_state[name]).abs().max())
