"""Pipeline parallelism on CPU processes and the planner's table for Kimi K2.

1. Step time of each ``torch.distributed.pipelining`` schedule at pp=2 (gloo, one thread per process) for the
   ``tiny`` or ``small`` preset, against the one-process step on the same batch; the measured idle share is
   ``1 - t_one / (pp · t_pp)`` (what the pipeline loses against perfect division of the work), next to the
   planner's bubble ``(pp-1)/(v·m + pp-1)``.
2. ``k2 plan`` for the report's layout (256 GPUs, pp=16 with 2 virtual stages and one extra warm-up micro-batch,
   ep=16, ZeRO-1, optimizer state in host memory) with each activation option.

    python tools/bench_pipeline.py [--preset tiny] [--microbatches 4] [--steps 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SCHEDULES = (("interleaved_1f1b", 2), ("interleaved_zero_bubble", 2), ("looped_bfs", 2), ("1f1b", 1), ("gpipe", 1))


def _batch(rows: int, seq: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, vocab, (rows, seq + 1), generator=torch.Generator().manual_seed(0))
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def worker(args: argparse.Namespace) -> None:
    """Under torchrun: time each schedule; rank 0 writes the results."""
    from k2.model import Transformer, presets
    from k2.parallel import init_parallel
    from k2.parallel.pipeline import Pipeline, clip_and_step

    torch.set_num_threads(1)
    cfg = presets.get(args.preset)
    par = init_parallel(dp=1, ep=1, pp=2, timeout_s=300, device=torch.device("cpu"))
    x, y = _batch(args.rows, args.seq, cfg.vocab_size)
    out = []
    for name, v in SCHEDULES:
        torch.manual_seed(0)
        pipe = Pipeline(
            Transformer(cfg).train(),
            par,
            virtual_stages=v,
            schedule=name,
            microbatches=args.microbatches,
            device=torch.device("cpu"),
        )
        opt = torch.optim.AdamW(pipe.local.parameters(), lr=1e-4)
        times = []
        for _ in range(args.steps + 1):  # the first step builds the stages
            torch.distributed.barrier()
            t0 = time.perf_counter()
            loss = pipe.step(x, y)
            clip_and_step(pipe, opt, grad_clip=1.0, expert_bias_rate=0.0, loss=loss)
            times.append(time.perf_counter() - t0)
        out.append({"schedule": name, "virtual_stages": v, "step_s": min(times[1:])})
    if par.is_main:
        Path(args.worker_out).write_text(json.dumps(out))
    par.close()


def one_process(args: argparse.Namespace) -> float:
    from k2.model import Transformer, presets

    torch.set_num_threads(1)
    cfg = presets.get(args.preset)
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = _batch(args.rows, args.seq, cfg.vocab_size)
    times = []
    for _ in range(args.steps + 1):
        t0 = time.perf_counter()
        for xb, yb in zip(x.chunk(args.microbatches), y.chunk(args.microbatches), strict=True):
            (model.loss(xb, yb) / args.microbatches).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def plan_table() -> list[dict]:
    from k2.model import presets
    from k2.parallel.plan import ActivationOptions, PlanInputs, make_plan

    rows = []
    options = {
        "none": ActivationOptions(),
        "recompute": ActivationOptions(recompute=True),
        "recompute+fp8": ActivationOptions(recompute=True, fp8_storage=True),
        "recompute+fp8+offload": ActivationOptions(recompute=True, fp8_storage=True, offload=True),
    }
    for label, opt in options.items():
        inputs = PlanInputs(
            gpus=256, gpu_memory=80e9, pp=16, ep=16, extra_warmup=1, optimizer_offload=1.0, activations=opt
        )
        p = make_plan(presets.kimi_k2(), inputs)
        rows.append(
            {
                "activations": label,
                "state_gb": p["state_bytes_per_gpu"] / 1e9,
                "activation_gb": p["activation_bytes_per_gpu"] / 1e9,
                "fits": p["fits"],
                "bubble": p["bubble_fraction"],
                "ep_a2a_gb": p["ep_all_to_all_bytes_per_gpu"] / 1e9,
                "pp_gb": p["pp_send_recv_bytes_per_gpu"] / 1e9,
                "dp_gb": p["dp_bytes_per_gpu"] / 1e9,
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", choices=("tiny", "small"))
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--rows", type=int, default=8, help="sequences per step")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker_out:
        worker(args)
        return
    from k2.parallel.plan import bubble_fraction

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pp.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", __file__]
        flags = [f"--preset={args.preset}", f"--microbatches={args.microbatches}", f"--rows={args.rows}"]
        flags += [f"--seq={args.seq}", f"--steps={args.steps}", f"--worker-out={out}"]
        subprocess.run([*cmd, *flags], check=True)
        pp_rows = json.loads(out.read_text())
    t_one = one_process(args)
    print(f"{args.preset}: {args.rows} x {args.seq} tokens per step, {args.microbatches} micro-batches, pp=2 (gloo)")
    print(f"  one process: {t_one * 1e3:8.1f} ms/step")
    print(f"  {'schedule':<24} {'v':>2} {'ms/step':>9} {'idle share':>10} {'planned bubble':>14}")
    for r in pp_rows:
        r["idle_share"] = 1 - t_one / (2 * r["step_s"])
        r["planned_bubble"] = bubble_fraction(r["schedule"], 2, r["virtual_stages"], args.microbatches)
        print(
            f"  {r['schedule']:<24} {r['virtual_stages']:>2} {r['step_s'] * 1e3:9.1f} {r['idle_share']:10.1%} "
            f"{r['planned_bubble']:14.1%}"
        )
    table = plan_table()
    print("\nk2 plan kimi_k2, 256 GPUs, pp=16 (v=2, +1 warm-up), ep=16, optimizer state in host memory")
    print(f"  {'activations':<24} {'states GB':>9} {'acts GB':>8} {'fits':>5} {'bubble':>7} {'EP a2a GB':>10}")
    for r in table:
        print(
            f"  {r['activations']:<24} {r['state_gb']:9.1f} {r['activation_gb']:8.1f} {r['fits']!s:>5} "
            f"{r['bubble']:7.1%} {r['ep_a2a_gb']:10.0f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"one_process_s": t_one, "pipeline": pp_rows, "plan": table}, indent=2))


if __name__ == "__main__":
    main()
