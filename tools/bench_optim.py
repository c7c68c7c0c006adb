"""Optimizer step time on MoE-shaped parameter sets: k2's batched Muon vs a per-matrix loop vs torch.optim.Muon.

Sets (shapes from ``k2.model.presets``; real fp32 tensors with random gradients):
- ``tiny-experts``: the routed-expert stacks of ``tiny`` (3 MoE layers × [8, 96, 128] / [8, 128, 96]);
- ``small-experts``: every routed-expert stack of ``small`` (7 MoE layers × w_gate/w_up [32, 384, 768] and
  w_down [32, 768, 384]: 672 matrices), the "expert-shaped set";
- ``small``: every Muon matrix of ``small`` (experts, attention, dense and shared MLPs, routers);
- ``kimi_k2-experts``: ``--kimi-experts`` of one Kimi-K2 MoE layer's 384 experts (w_gate/w_up [E, 2048, 7168],
  w_down [E, 7168, 2048]): a slice that fits in memory and time here (one such Newton-Schulz is 0.69 TFLOP).

Candidates, same hyperparameters (lr 0.02, momentum 0.95, Nesterov, weight decay 0.1, match_rms_adamw):
- ``k2 batched``: ``k2.optim.Muon`` on the stacks (each expert its own matrix; one Newton-Schulz call per shape);
- ``k2 per-matrix``: the same optimizer on the matrices as a list of 2-D tensors with batching disabled (one
  Newton-Schulz call per matrix: the loop baseline);
- ``torch.optim.Muon``: given the same matrices as a list of 2-D tensors. It loops matrix by matrix, so its step
  time is a sum of per-matrix costs; on CPUs without bf16 GEMMs (this one) each matrix costs seconds, so it is
  timed on the first ``--torch-matrices`` matrices of the set and scaled by count/measured (labelled
  "extrapolated" in the table and JSON). ``0`` skips it.

    python tools/bench_optim.py --sets small-experts --json bench_optim.json
    python tools/bench_optim.py --sets kimi_k2-experts --steps 1 --warmup 0 --kimi-torch-matrices 0
    python tools/bench_optim.py --device cuda --json bench_optim.json       # on a GPU (CUDA synchronised)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

import k2.optim.muon as muon_module
from k2.model import Transformer, presets
from k2.optim import Muon

HYPER = dict(lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")


def _muon_shapes(cfg, experts_only: bool, layer: int | None = None, max_experts: int | None = None):
    with torch.device("meta"):
        model = Transformer(cfg)
    shapes = []
    for name, p in model.named_parameters():
        if p.dim() < 2 or "embed" in name or "lm_head" in name:
            continue
        if layer is not None and not name.startswith(f"layers.{layer}."):
            continue
        is_expert = ".experts." in name
        if experts_only and not is_expert:
            continue
        shape = tuple(p.shape)
        if is_expert and max_experts is not None:
            shape = (min(max_experts, shape[0]), *shape[1:])
        shapes.append(shape)
    return shapes


def parameter_set(name: str, kimi_experts: int) -> list[tuple[int, ...]]:
    if name == "tiny-experts":
        return _muon_shapes(presets.tiny(), experts_only=True)
    if name == "small-experts":
        return _muon_shapes(presets.small(), experts_only=True)
    if name == "small":
        return _muon_shapes(presets.small(), experts_only=False)
    if name == "kimi_k2-experts":  # layer 1 is the first MoE layer
        return _muon_shapes(presets.kimi_k2(), experts_only=True, layer=1, max_experts=kimi_experts)
    raise SystemExit(f"bench_optim: unknown set {name!r}; known: tiny-experts, small-experts, small, kimi_k2-experts")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_steps(params: list[torch.Tensor], opt: torch.optim.Optimizer, steps: int, warmup: int) -> list[float]:
    gen = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.device)
    device = params[0].device
    for _ in range(warmup):  # state allocation, first-call costs
        opt.step()
    times = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        opt.step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def bench_set(
    name: str, shapes: list[tuple[int, ...]], steps: int, warmup: int, torch_matrices: int, device: torch.device
) -> dict:
    matrices = [s[-2:] for s in shapes for _ in range(s[0] if len(s) == 3 else 1)]
    row: dict = {"set": name, "matrices": len(matrices), "elements": sum(a * b for a, b in matrices)}
    stacks = [torch.randn(s, device=device) * 0.02 for s in shapes]
    row["k2_batched_s"] = statistics.median(_time_steps(stacks, Muon(stacks, **HYPER), steps, warmup))
    del stacks
    singles = [torch.randn(a, b, device=device) * 0.02 for a, b in matrices]
    limit = muon_module._NS_BATCH_ELEMENTS
    muon_module._NS_BATCH_ELEMENTS = 1  # every Newton-Schulz call gets one matrix: the per-matrix loop
    try:
        row["k2_per_matrix_s"] = statistics.median(_time_steps(singles, Muon(singles, **HYPER), steps, warmup))
    finally:
        muon_module._NS_BATCH_ELEMENTS = limit
    del singles
    if torch_matrices > 0:
        subset = [torch.randn(a, b, device=device) * 0.02 for a, b in matrices[:torch_matrices]]
        measured = statistics.median(_time_steps(subset, torch.optim.Muon(subset, **HYPER), steps, warmup))
        row["torch_measured_matrices"] = len(subset)
        row["torch_measured_s"] = measured
        row["torch_muon_s"] = measured * len(matrices) / len(subset)
        row["torch_extrapolated"] = len(subset) < len(matrices)
        row["speedup_vs_torch"] = row["torch_muon_s"] / row["k2_batched_s"]
    row["speedup_vs_loop"] = row["k2_per_matrix_s"] / row["k2_batched_s"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sets", default="small-experts,kimi_k2-experts")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per candidate (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--torch-matrices", type=int, default=8, help="matrices torch.optim.Muon is timed on")
    parser.add_argument("--kimi-torch-matrices", type=int, default=0, help="the same for kimi_k2-experts")
    parser.add_argument("--kimi-experts", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = []
    for name in args.sets.split(","):
        torch_n = args.kimi_torch_matrices if name == "kimi_k2-experts" else args.torch_matrices
        shapes = parameter_set(name, args.kimi_experts)
        rows.append(bench_set(name, shapes, args.steps, args.warmup, torch_n, torch.device(args.device)))
        r = rows[-1]
        torch_col = "not run"
        if "torch_muon_s" in r:
            note = f" (extrapolated from {r['torch_measured_matrices']})" if r["torch_extrapolated"] else ""
            torch_col = f"{r['torch_muon_s']:.2f}s{note}  ×{r['speedup_vs_torch']:.1f}"
        print(
            f"{r['set']:15s} {r['matrices']:5d} matrices  k2 batched {r['k2_batched_s']:.3f}s  "
            f"k2 per-matrix {r['k2_per_matrix_s']:.3f}s (×{r['speedup_vs_loop']:.2f})  torch.optim.Muon {torch_col}",
            flush=True,
        )
    info = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu",
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "hyperparameters": HYPER,
        "rows": rows,
    }
    if args.json:
        directory = os.path.dirname(os.path.abspath(args.json))
        with tempfile.NamedTemporaryFile("w", dir=directory, delete=False, suffix=".tmp") as f:
            json.dump(info, f, indent=2)
        os.replace(f.name, args.json)


if __name__ == "__main__":
    main()
