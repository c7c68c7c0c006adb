"""MoE hot path: token permutation (k2 native vs the PyTorch composition), grouped GEMM (reference
torch._grouped_mm vs a per-expert loop; on CUDA k2's CUTLASS kernel vs torch._grouped_mm vs one dense GEMM of
the same FLOPs), and the model's MoE layer forward+backward with k2's kernels vs ``K2_OPS=reference``.

Shapes are Kimi-K2's MoE scaled down (K2: D 7168, F 2048, E 384, K 8); on CPU ``--scale`` divides D and F and
the token count is small. Every ratio compares runs made in the same process. Table on stdout, JSON with --json.

    python tools/bench_moe.py --json bench_moe.json
    python tools/bench_moe.py --device cuda --tokens 16384 --scale 1      # on a GPU: real K2 widths
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from _timing import best_time, print_rows

from k2.ops import _native, grouped_gemm, moe_permute, moe_unpermute, reference


class _Reference:
    """Context: every k2 op runs its PyTorch reference (K2_OPS=reference), restored on exit."""

    def __enter__(self) -> None:
        self.saved = os.environ.get("K2_OPS")
        os.environ["K2_OPS"] = "reference"

    def __exit__(self, *exc) -> None:
        if self.saved is None:
            os.environ.pop("K2_OPS", None)
        else:
            os.environ["K2_OPS"] = self.saved


def _routing(t: int, k: int, e: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.rand(t, e, device=device)
    weights, ids = scores.topk(k, dim=-1)
    return ids, weights


def bench_permutation(t: int, k: int, d: int, e: int, dtype: torch.dtype, device: torch.device, repeat: int):
    x = torch.randn(t, d, device=device).to(dtype)
    ids, weights = _routing(t, k, e, device)
    x_sorted, row_map, _ = reference.moe_permute(x, ids, e)
    dy = torch.randn(t, d, device=device).to(dtype)
    bytes_moved = {  # reads + writes of the row data (the index traffic is small)
        "permute": 2 * t * k * d * x.element_size(),
        "unpermute": (t * k + t) * d * x.element_size(),
        "unpermute_bwd": (2 * t * k + t) * d * x.element_size(),
    }
    ops = {
        "permute": (lambda: moe_permute(x, ids, e), lambda: reference.moe_permute(x, ids, e)),
        "unpermute": (
            lambda: moe_unpermute(x_sorted, row_map, weights),
            lambda: reference.moe_unpermute(x_sorted, row_map, weights),
        ),
        "unpermute_bwd": (
            lambda: torch.ops.k2.moe_unpermute_backward(dy, x_sorted, row_map, weights),
            lambda: reference.moe_unpermute_backward(dy, x_sorted, row_map, weights),
        ),
    }
    rows = []
    for name, (k2_fn, ref_fn) in ops.items():
        t_k2 = best_time(k2_fn, device, repeat)
        t_ref = best_time(ref_fn, device, repeat)
        rows.append(
            {
                "op": f"moe_{name}",
                "shape": f"T={t} K={k} D={d} E={e} {str(dtype).removeprefix('torch.')}",
                "k2_ms": t_k2 * 1e3,
                "reference_ms": t_ref * 1e3,
                "k2_GBps": bytes_moved[name] / t_k2 / 1e9,
                "speedup_vs_reference": t_ref / t_k2,
            }
        )
    return rows


def _loop_gemm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    out, start = x.new_empty(x.shape[0], w.shape[1]), 0
    for e, end in enumerate(offsets.tolist()):
        if end > start:
            out[start:end] = x[start:end] @ w[e].t()
        start = end
    return out


def bench_grouped_gemm(t: int, k: int, d: int, f: int, e: int, dtype: torch.dtype, device, repeat: int):
    """The gate/up projection of an MoE layer: x_sorted [T*K, D] @ w [E, F, D]^T."""
    ids, _ = _routing(t, k, e, device)
    counts = torch.bincount(ids.flatten(), minlength=e)
    offsets = counts.cumsum(0).to(torch.int32)
    rows_total = t * k
    x = torch.randn(rows_total, d, device=device).to(dtype)
    w = (torch.randn(e, f, d, device=device) / d**0.5).to(dtype)
    flops = 2 * rows_total * d * f
    candidates = {
        "k2.ops.grouped_gemm": lambda: grouped_gemm(x, w, offsets, trans_w=True),
        "torch._grouped_mm": lambda: torch._grouped_mm(x, w.transpose(1, 2), offs=offsets),
        "per-expert loop": lambda: _loop_gemm(x, w, offsets),
    }
    if device.type == "cuda":
        dense_w = (torch.randn(f, d, device=device) / d**0.5).to(dtype)
        candidates["dense GEMM, same FLOPs"] = lambda: x @ dense_w.t()
    times = {name: best_time(fn, device, repeat) for name, fn in candidates.items()}
    base = times["k2.ops.grouped_gemm"]
    return [
        {
            "op": f"grouped_gemm: {name}",
            "shape": f"T*K={rows_total} D={d} F={f} E={e} {str(dtype).removeprefix('torch.')}",
            "ms": s * 1e3,
            "TFLOPs": flops / s / 1e12,
            "time_vs_k2": s / base,
        }
        for name, s in times.items()
    ]


def bench_dispatch_combine(t: int, k: int, d: int, e: int, device: torch.device, repeat: int):
    """What k2's moe kernels change in the layer: permute -> (experts) -> unpermute, forward+backward."""
    x = torch.randn(t, d, device=device, requires_grad=True)
    ids, weights = _routing(t, k, e, device)
    weights.requires_grad_()

    def step() -> None:
        x_sorted, row_map, _ = moe_permute(x, ids, e)
        moe_unpermute(x_sorted * 2.0, row_map, weights).square().mean().backward()

    t_k2, t_ref = float("inf"), float("inf")
    for _ in range(repeat):  # interleaved, as in bench_moe_layer
        t_k2 = min(t_k2, best_time(step, device, 1, warmup=1))
        with _Reference():
            t_ref = min(t_ref, best_time(step, device, 1, warmup=1))
    return [
        {
            "op": "MoE permute+unpermute fwd+bwd",
            "shape": f"T={t} D={d} E={e} K={k} fp32",
            "k2_ms": t_k2 * 1e3,
            "reference_ms": t_ref * 1e3,
            "speedup_vs_reference": t_ref / t_k2,
        }
    ]


def bench_moe_layer(t: int, d: int, f: int, e: int, k: int, device: torch.device, repeat: int):
    """The model's MoE layer (router, permute, 3 grouped GEMMs, unpermute) forward+backward."""
    from k2.model import presets
    from k2.model.moe import MoE

    cfg = presets.get("small")
    cfg = type(cfg).from_dict(
        {
            **cfg.to_dict(),
            "hidden_size": d,
            "moe_intermediate_size": f,
            "n_routed_experts": e,
            "num_experts_per_tok": k,
            "n_group": 1,
            "topk_group": 1,
            "n_shared_experts": 0,
        }
    )
    torch.manual_seed(0)
    layer = MoE(cfg).to(device)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=d**-0.5)
    x = torch.randn(1, t, d, device=device, requires_grad=True)

    def step() -> None:
        layer(x).square().mean().backward()

    # Interleave the two configurations so drifting load on a shared machine hits both alike.
    t_k2, t_ref = float("inf"), float("inf")
    for _ in range(repeat):
        t_k2 = min(t_k2, best_time(step, device, 1, warmup=1))
        with _Reference():
            t_ref = min(t_ref, best_time(step, device, 1, warmup=1))
    return [
        {
            "op": "MoE layer fwd+bwd",
            "shape": f"T={t} D={d} F={f} E={e} K={k} fp32",
            "k2_ms": t_k2 * 1e3,
            "reference_ms": t_ref * 1e3,
            "speedup_vs_reference": t_ref / t_k2,
        }
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=2048, help="T (tokens per batch)")
    parser.add_argument("--scale", type=int, default=8, help="divide K2's D=7168 and F=2048 by this")
    parser.add_argument("--experts", type=int, default=64, help="E (K2: 384)")
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    d, f = 7168 // args.scale, 2048 // args.scale
    t, k, e = args.tokens, args.top_k, args.experts
    native = {fam: _native.has_kernel(fam, device) for fam in ("moe", "gemm")}
    print(f"device {device}, threads {torch.get_num_threads()}, native kernels {native}")

    results = []
    for dtype in (torch.float32, torch.bfloat16):
        results += bench_permutation(t, k, d, e, dtype, device, args.repeat)
    results += bench_permutation(t, k, d, 384, torch.bfloat16, device, args.repeat)
    gemm_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    results += bench_grouped_gemm(t, k, d, f, e, gemm_dtype, device, args.repeat)
    results += bench_dispatch_combine(t // 4, k, d // 2, e, device, args.repeat)
    results += bench_moe_layer(t // 4, d // 2, f // 2, e, k, device, args.repeat)
    print_rows(results, op_width=40)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": str(device), "args": vars(args), "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
