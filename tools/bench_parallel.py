"""Step time of distributed ``k2 pretrain`` (torchrun, gloo on the CPU) against one process with the same global
batch.

Each row is a real ``k2 pretrain`` run, launched as a user does, with no eval, checkpoint or export during the
timed steps: ``torchrun --nproc-per-node=2 --no-python k2 pretrain --set parallel.dp=2 [--set parallel.ep=2]``
with ``train.threads=1`` per rank, and one process with ``train.threads=1`` and ``=2`` (on 2 cores the 2-thread
process uses the same cores as the two ranks: the fair baseline). ``train.batch_size`` is the global batch in
every layout, so all rows do the same math. Reported: the median ``step_s`` that rank 0 records in
``metrics.jsonl`` over the steps after ``--warmup`` (a distributed step includes waiting for the slowest rank and
the gradient all-reduce) and the fastest of them (the step least disturbed by other work on a shared machine;
the load average before and after is printed too), tokens/s of the global batch at the median, and the speed-up
over one process with 1 thread. Rows for
``--ep`` values that the config refuses (before expert parallelism lands) are skipped with the refusal as a note.

    python tools/bench_parallel.py                            # tiny and small: 1 process ×1/×2 threads, dp=2
    python tools/bench_parallel.py --ep 2 --json out.json     # plus dp=2, ep=2
    python tools/bench_parallel.py --presets tiny --dp 4 --steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from k2.train.metrics import read_metrics


@dataclass(frozen=True)
class Layout:
    name: str
    nproc: int  # processes (torchrun when > 1)
    threads: int  # torch threads per process
    dp: int = 1
    ep: int = 1


def _k2() -> list[str]:
    script = Path(sys.executable).with_name("k2")
    return [str(script)] if script.exists() else [sys.executable, "-m", "k2.cli"]


def run_layout(layout: Layout, preset: str, *, batch: int, seq: int, steps: int, warmup: int, workdir: Path) -> dict:
    """One ``k2 pretrain`` run; its timed steps' median ``step_s``, or ``{"note": why}`` if k2 refused it."""
    run = workdir / f"{preset}-{layout.name.replace(' ', '').replace('=', '').replace('×', 'x').replace(',', '-')}"
    overrides = [
        f"model.preset='{preset}'",
        f"train.batch_size={batch}",
        f"data.context_len={seq}",
        f"data.corpus_documents={max(300, 2 * batch * (steps + warmup) * seq // 400)}",
        f"train.steps={warmup + steps}",
        "train.checkpoint_every=0",
        "train.log_every=1000000",
        "eval.every=0",
        "eval.max_sequences=2",
        "checkpoint.export_hf=false",
        "optim.warmup_steps=0",
        f"train.threads={layout.threads}",
        f"parallel.dp={layout.dp}",
        f"parallel.ep={layout.ep}",
    ]
    sets = [arg for item in overrides for arg in ("--set", item)]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={layout.nproc}"]
    launch = [*torchrun, "--no-python"] if layout.nproc > 1 else []
    env = {**os.environ, "OMP_NUM_THREADS": str(layout.threads), "K2_DEBUG": ""}
    r = subprocess.run(
        [*launch, *_k2(), "pretrain", "--run-dir", str(run), *sets], capture_output=True, text=True, env=env
    )
    if r.returncode != 0:
        refusals = [line for line in r.stderr.splitlines() if line.startswith("k2 pretrain: error: ")]
        if refusals:  # k2's one-line refusal of a config it does not accept (printed by every rank): a note
            return {"note": refusals[0].removeprefix("k2 pretrain: error: ")}
        raise RuntimeError(f"{layout.name} {preset} failed (rc {r.returncode}):\n{r.stderr[-3000:]}")
    step_s = [rec["step_s"] for rec in read_metrics(run) if rec["kind"] == "train" and rec["step"] > warmup]
    ms = 1e3 * statistics.median(step_s)
    return {"step_ms": ms, "best_ms": 1e3 * min(step_s), "tokens_per_s": batch * seq / (ms / 1e3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["tiny"], help="e.g. tiny small (small takes minutes on 2 cores)")
    p.add_argument("--dp", type=int, default=2, help="data-parallel ranks of the distributed rows")
    p.add_argument("--ep", type=int, nargs="*", default=[], help="also rows with these expert-parallel sizes")
    p.add_argument("--batch", type=int, default=4, help="global batch (sequences per step) in every layout")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed first steps")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = p.parse_args()

    layouts = [
        Layout("1 proc ×1 thr", 1, 1),
        Layout(f"1 proc ×{args.dp} thr", 1, args.dp),
        Layout(f"dp={args.dp} ×1 thr", args.dp, 1, dp=args.dp),
        *(Layout(f"dp={args.dp},ep={ep} ×1 thr", args.dp, 1, dp=args.dp, ep=ep) for ep in args.ep if ep > 1),
    ]
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    header = f"{'preset':<7} {'layout':<18} {'B×S':>8} {'ms/step':>9} {'best ms':>8} {'tokens/s':>9} {'speed-up':>9}"
    print(header)
    print("-" * len(header), flush=True)
    rows, notes = [], []
    with tempfile.TemporaryDirectory(prefix="k2-bench-parallel-") as tmp:
        for preset in args.presets:
            base = None
            for layout in layouts:
                r = run_layout(
                    layout, preset, batch=args.batch, seq=args.seq, steps=args.steps, warmup=args.warmup,
                    workdir=Path(tmp),
                )  # fmt: skip
                row = {"preset": preset, "layout": layout.name, "processes": layout.nproc, "threads": layout.threads,
                       "dp": layout.dp, "ep": layout.ep, "batch": args.batch, "seq": args.seq, **r}  # fmt: skip
                rows.append(row)
                if "note" in r:
                    notes.append(f"{preset} {layout.name}: skipped — {r['note']}")
                    print(f"{preset:<7} {layout.name:<18} {'skipped (see note)':>46}", flush=True)
                    continue
                base = base or r["step_ms"]
                row["speedup"] = base / r["step_ms"]
                print(
                    f"{preset:<7} {layout.name:<18} {f'{args.batch}×{args.seq}':>8} {r['step_ms']:>9.0f} "
                    f"{r['best_ms']:>8.0f} {r['tokens_per_s']:>9.0f} {row['speedup']:>8.2f}×",
                    flush=True,
                )
    for note in notes:
        print(note)
    print(f"load average {os.getloadavg()[0]:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpus": os.cpu_count(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
