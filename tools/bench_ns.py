"""Newton-Schulz (Muon's inner loop): k2.ops.newton_schulz vs the PyTorch reference, in TFLOP/s.

Each quintic step on X [r, c] (r <= c) costs 4 r^2 c + 2 r^3 FLOPs (X X^T, A A, B X); 5 steps are timed. On
CUDA k2 runs its native kernel (three CUTLASS GEMMs per step, the polynomial folded into their epilogues) and
the table states the fraction of ``--peak-tflops`` (default: H100 SXM dense bf16, 989); on CPU it runs the
dispatch k2 would use there, and the fraction is of a measured fp32 matmul's rate on this machine.

    python tools/bench_ns.py --json bench_ns.json
    python tools/bench_ns.py --device cuda --shapes 64x2048x7168 16x7168x2048 8x4096x4096
"""

from __future__ import annotations

import argparse
import json

import torch
from _timing import best_time

from k2.ops import newton_schulz, reference

QUINTIC = [(3.4445, -4.7750, 2.0315)] * 5


def ns_flops(batch: int, m: int, n: int, steps: int = 5) -> int:
    r, c = min(m, n), max(m, n)
    return batch * steps * (4 * r * r * c + 2 * r**3)


def cpu_matmul_tflops() -> float:
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    return 2 * 1024**3 / best_time(lambda: a @ b, torch.device("cpu"), 5, warmup=1) / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shapes", nargs="+", default=["8x256x768", "4x384x768", "2x768x768"], help="BxMxN")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 peak of the GPU")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    peak = args.peak_tflops if device.type == "cuda" else cpu_matmul_tflops()
    peak_name = "bf16 peak" if device.type == "cuda" else "fp32 matmul here"
    print(f"device {device}; limit {peak:.3f} TFLOP/s ({peak_name})")
    results = []
    for spec in args.shapes:
        b, m, n = (int(v) for v in spec.split("x"))
        g = torch.randn(b, m, n, device=device)
        flops = ns_flops(b, m, n)
        t_k2 = best_time(lambda g=g: newton_schulz(g, steps=5), device, args.repeat, warmup=1)
        t_ref = best_time(lambda g=g: reference.newton_schulz(g, QUINTIC, 1e-7), device, args.repeat, warmup=1)
        row = {
            "shape": spec,
            "k2_ms": t_k2 * 1e3,
            "reference_ms": t_ref * 1e3,
            "k2_TFLOPs": flops / t_k2 / 1e12,
            "fraction_of_limit": flops / t_k2 / 1e12 / peak,
            "speedup_vs_reference": t_ref / t_k2,
        }
        results.append(row)
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": str(device), "limit_tflops": peak, "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
