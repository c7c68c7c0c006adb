"""Expert-parallel token exchange: k2.ops.ep_dispatch / ep_combine against a plain all_to_all_single of the same
bytes, over W processes that this script spawns (gloo on CPU, NCCL with one GPU per rank on CUDA).

Rows are Kimi-K2's (hidden 7168 bf16, top-8 of E experts, uniform random routing, so each rank sends T*K rows
and receives T*K on average); ``--scale`` divides the hidden size and ``--tokens`` sets T per rank. The baseline
moves exactly the rows of the dispatch (and back, for combine) with pre-allocated buffers and known split sizes,
so the difference is k2's overhead: the permutation by expert, the count exchange (the one host sync), the regroup
by local expert, the weighted sum, and (on CPU) page faults of freshly allocated outputs. Each time is the slowest
rank's, best of ``--repeat`` barrier-aligned runs, op and baseline interleaved. GB/s is the rows one rank sends per
exchange / time (algorithm bandwidth); bus GB/s scales it by (W-1)/W, the share that crosses the link (nccl-tests'
all-to-all convention); ``--link-gbps`` adds the fraction of that link.

    python tools/bench_comm.py --json bench_comm.json
    python tools/bench_comm.py --device cuda --world 8 --tokens 4096 --experts 384 --link-gbps 450
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _timing import print_rows, time_once

from k2.ops import ep_combine, ep_dispatch, moe_permute


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slowest_rank_time(fn: Callable[[], object], device: torch.device, repeat: int, warmup: int = 2) -> float:
    """Best over ``repeat`` barrier-aligned runs of the slowest rank's time, in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        dist.barrier()
        times.append(time_once(fn, device))
    slowest = torch.tensor(times, dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return slowest.min().item()


def _bench_tokens(t: int, args: argparse.Namespace, rank: int, world: int, device: torch.device) -> list[dict]:
    d, k, e = 7168 // args.scale, args.top_k, args.experts
    g = torch.Generator(device=device).manual_seed(rank)
    x = torch.randn(t, d, device=device, generator=g).to(torch.bfloat16)
    ids = torch.rand(t, e, device=device, generator=g).topk(k, dim=1).indices
    weights = torch.rand(t, k, device=device, generator=g)
    recv_x, _, handle = ep_dispatch(x, ids, e)
    y = torch.randn_like(recv_x)
    dy = torch.randn_like(x)

    # The baseline: the same rows, already in send order, into pre-allocated buffers.
    send = moe_permute(x, ids, e)[0]
    recv_buf, back_buf = torch.empty_like(recv_x), torch.empty_like(send)
    send_splits, recv_splits = list(handle.send_splits), list(handle.recv_splits)

    def a2a_dispatch() -> None:
        dist.all_to_all_single(recv_buf, send, recv_splits, send_splits)

    def a2a_combine() -> None:
        dist.all_to_all_single(back_buf, recv_buf, send_splits, recv_splits)

    def a2a_both() -> None:
        a2a_dispatch()
        a2a_combine()

    def a2a_four() -> None:
        a2a_both()
        a2a_both()

    def ep_both() -> None:
        rx, _, h = ep_dispatch(x, ids, e)
        ep_combine(rx, h, weights)

    xg, wg = x.detach().requires_grad_(), weights.detach().requires_grad_()

    def ep_fwd_bwd() -> None:
        rx, _, h = ep_dispatch(xg, ids, e)
        ep_combine(rx * 2.0, h, wg).backward(dy)

    exchange_bytes = t * k * d * x.element_size()  # rows one rank sends in one exchange
    cases = [  # (name, k2 op, baseline, exchanges)
        ("ep_dispatch", lambda: ep_dispatch(x, ids, e), a2a_dispatch, 1),
        ("ep_combine", lambda: ep_combine(y, handle, weights), a2a_combine, 1),
        ("ep_dispatch+ep_combine", ep_both, a2a_both, 2),
        ("dispatch+combine fwd+bwd", ep_fwd_bwd, a2a_four, 4),
    ]
    rows = []
    for name, op, baseline, exchanges in cases:
        op(), baseline()  # warm-up
        t_op, t_base = float("inf"), float("inf")
        for _ in range(args.repeat):  # interleaved, so drifting load on a shared machine hits both alike
            t_op = min(t_op, _slowest_rank_time(op, device, 1, warmup=0))
            t_base = min(t_base, _slowest_rank_time(baseline, device, 1, warmup=0))
        gbps = exchanges * exchange_bytes / t_op / 1e9
        row = {
            "op": name,
            "shape": f"W={world} T={t} K={k} D={d} E={e} bf16",
            "ms": t_op * 1e3,
            "all_to_all_ms": t_base * 1e3,
            "GBps": gbps,
            "bus_GBps": gbps * (world - 1) / world,
            "all_to_all_bus_GBps": exchanges * exchange_bytes / t_base / 1e9 * (world - 1) / world,
            "time_vs_all_to_all": t_op / t_base,
        }
        if args.link_gbps:
            row["pct_link"] = 100 * row["bus_GBps"] / args.link_gbps
        rows.append(row)
    return rows


def _worker(rank: int, args: argparse.Namespace, port: int, out_path: str) -> None:
    cuda = args.device == "cuda"
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.world))
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=args.world,
        device_id=device if cuda else None,
    )
    try:
        rows = []
        for t in args.tokens:
            rows += _bench_tokens(t, args, rank, args.world, device)
        if rank == 0:
            torch.save(rows, out_path)
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--world", type=int, default=2, help="W processes (on cuda: one GPU each)")
    parser.add_argument("--tokens", type=lambda s: [int(v) for v in s.split(",")], default=[64, 256], help="T per rank")
    parser.add_argument("--scale", type=int, default=1, help="divide K2's hidden size 7168 by this")
    parser.add_argument("--experts", type=int, default=64, help="E (K2: 384), a multiple of --world")
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--link-gbps", type=float, default=None, help="per-GPU link bandwidth, for %% of link")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    if args.device == "cuda" and torch.cuda.device_count() < args.world:
        parser.error(f"--device cuda needs one GPU per rank: {args.world} ranks, {torch.cuda.device_count()} GPUs")
    if args.experts % args.world:
        parser.error(f"--experts ({args.experts}) must be a multiple of --world ({args.world})")
    backend = "nccl" if args.device == "cuda" else "gloo"
    threads = max(1, (os.cpu_count() or 1) // args.world)
    print(f"device {args.device}, backend {backend}, world {args.world}, threads/rank {threads}")

    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "rows.pt")
        mp.spawn(_worker, args=(args, _free_port(), out_path), nprocs=args.world, join=True)
        results = torch.load(out_path)
    print_rows(results, op_width=26)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": args.device, "backend": backend, "args": vars(args), "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
