"""Weight-sync throughput (``k2.rl.weight_sync``) against a plain copy / broadcast of the same bytes.

Rows:
- colocated: ``ColocatedSync.sync()`` (direct copies, and the staged bucketed path that crosses devices: two
  copies of every byte, so at most 50 % of a copy on one device) vs one ``torch.Tensor.copy_`` of a flat buffer
  holding the same bytes;
- broadcast (2 processes, gloo on CPU / NCCL with ``--device cuda``): ``BroadcastSender.sync()`` (header,
  acknowledgements and buckets) vs one ``dist.broadcast`` of a flat buffer of the same bytes.

GB/s = synced bytes / median time; "% of plain" is the ratio to the plain row (goal: >= 80 %).

    python tools/bench_weight_sync.py --preset small [--device cuda] [--bucket-mb 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist

from k2.model import Transformer, presets
from k2.rl.weight_sync import BroadcastReceiver, BroadcastSender, ColocatedSync


def _median_s(fn, repeat: int, device: str) -> float:
    times = []
    for _ in range(repeat + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])  # the first call warms up


def _model(preset: str, device: str, seed: int) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(presets.get(preset)).to(device)


def colocated(args) -> list[dict]:
    src, dst = _model(args.preset, args.device, 0), _model(args.preset, args.device, 1)
    rows = []
    for staged in (False, True):
        sync = ColocatedSync(src, dst, bucket_bytes=args.bucket_mb << 20, staged=staged)
        t = _median_s(sync.sync, args.repeat, args.device)
        rows.append({"mode": f"colocated{' staged' if staged else ''}", "bytes": sync.bytes, "s": t})
    flat_src = torch.empty(rows[0]["bytes"], dtype=torch.uint8, device=args.device)
    flat_dst = torch.empty_like(flat_src)
    rows.append(
        {
            "mode": "plain copy_",
            "bytes": flat_src.numel(),
            "s": _median_s(lambda: flat_dst.copy_(flat_src), args.repeat, args.device),
        }
    )
    return rows


def _broadcast_worker(rank: int, init: str, args, out: str) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    device = args.device if args.device == "cpu" else f"cuda:{rank}"
    dist.init_process_group(
        "gloo" if args.device == "cpu" else "nccl", init_method=f"file://{init}", rank=rank, world_size=2
    )
    try:
        model = _model(args.preset, device, rank)
        side = BroadcastSender(model, bucket_bytes=args.bucket_mb << 20) if rank == 0 else BroadcastReceiver(model)
        t_sync = _median_s(side.sync, args.repeat, args.device)
        flat = torch.empty(side.bytes, dtype=torch.uint8, device=device)
        t_plain = _median_s(lambda: dist.broadcast(flat, src=0), args.repeat, args.device)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(
                    [
                        {"mode": "broadcast (2 proc)", "bytes": side.bytes, "s": t_sync},
                        {"mode": "plain broadcast", "bytes": side.bytes, "s": t_plain},
                    ],
                    f,
                )
    finally:
        dist.destroy_process_group()


def broadcast(args) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.get_context("spawn")
        out = os.path.join(tmp, "rows.json")
        procs = [
            ctx.Process(target=_broadcast_worker, args=(r, os.path.join(tmp, "init"), args, out)) for r in range(2)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        with open(out) as f:
            return json.load(f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--bucket-mb", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    rows = colocated(args)
    if args.device == "cpu" or torch.cuda.device_count() >= 2:
        rows += broadcast(args)
    plain = {"colocated": rows[2]["s"], "broadcast": rows[-1]["s"] if len(rows) > 3 else None}
    print(f"{'mode':<22} {'MB':>9} {'ms':>9} {'GB/s':>8} {'% of plain':>11}")
    for r in rows:
        ref = plain["broadcast" if "broadcast" in r["mode"] else "colocated"]
        r["gb_s"] = r["bytes"] / r["s"] / 1e9
        r["pct_of_plain"] = 100 * ref / r["s"] if ref else None
        mb, ms = r["bytes"] / 1e6, r["s"] * 1e3
        print(f"{r['mode']:<22} {mb:>9.1f} {ms:>9.2f} {r['gb_s']:>8.2f} {r['pct_of_plain']:>10.0f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"preset": args.preset, "device": args.device, "bucket_mb": args.bucket_mb, "rows": rows}, f, indent=2
            )


if __name__ == "__main__":
    main()
