"""MLA attention: k2.ops.mla_attention against the model's eager path and SDPA, forward and forward+backward.

Shapes: one causal sequence of S tokens at Kimi-K2's head dims (dqk = 192 = 128 nope + 64 rope, dv = 128), with the
head count scaled to fit the machine (--heads; K2 has 64). Implementations, all on the same values:

- k2:    ``k2.ops.mla_attention`` on ``[S, H, d]`` (the C++ CPU kernel, or the CUDA kernel), max logits requested as
         QK-Clip needs them;
- eager: the model's attention before the kernel existed (k2 ≤ 0.1's ``MLA._eager_attention``): an fp32 ``baddbmm``
         of the scaled logits with an additive causal mask, their per-head max, ``softmax``, ``bmm`` — ``[H, S, S]``
         logits materialised;
- sdpa:  ``torch.nn.functional.scaled_dot_product_attention(is_causal=True)`` on ``[1, H, S, d]`` (no max logits; on CPU
         with dv != dqk it runs torch's math path).

Columns: time (fastest of --repeat runs; the implementations are interleaved so load from other processes hits all
alike), GFLOP/s of the useful causal FLOPs (forward 2·P·(dqk + dv), backward 2·P·(2·dqk + 2·dv), P = S(S+1)/2 visible
pairs per head; the same count for every implementation, recomputation not counted), % of the matmul rate measured
here in the same interleaved rounds (``torch.mm`` 4096² in the benchmark's dtype, the practical peak), speed-up of k2
over each, and peak extra memory: on CPU the rise of the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs, after malloc_trim) over its resident set before the call — what the call adds beyond its
inputs (outputs, saved tensors, gradients, workspaces); on CUDA ``torch.cuda.max_memory_allocated`` minus the
allocated bytes before. ``max_logits_cost_pct`` is k2's forward with ``return_max_logits`` on vs off: the median ratio
over back-to-back pairs of runs. Table on stdout, JSON with --json.

Decode section: ``k2.ops.mla_decode`` (absorbed MLA over the latent cache) against the eager absorbed decode the model
ran before the op existed (k2/infer/decode.py: an ``baddbmm`` of ``[B, H, r + dr]`` queries against the cache rows
with an additive mask, fp32 ``softmax``, ``bmm`` with the ``c_kv`` columns), at batch B in --decode-batches and T cached
tokens in --decode-seqlens (all visible), Kimi-K2's r = 512 and dr = 64, heads scaled to fit (--decode-heads; K2 has
64). The cache is one layer of a ``[2, B, T, r + dr]`` buffer, as ``LatentCache`` holds it. Columns: time (fastest of
--repeat interleaved runs), GB/s of cache bytes read (B·T·(r + dr)·element size, read once), % of the read bandwidth
measured in the same rounds (``torch.sum`` over the same bytes), and the speed-up of k2 over eager.

On a small shared CPU, run the decode comparison with ``OMP_WAIT_POLICY=PASSIVE``: otherwise torch's OpenMP workers
spin for a while after every eager op and take the cores from the k2 kernel that runs next (and the other way round),
so interleaved timings measure that contention rather than the kernels.

The attention section's default --seqlens stop at 4096: S = 8192 runs (``--seqlens 8192``) but the eager and SDPA
paths materialise [H, S, S] fp32 logits (3.1 GiB peak extra for fwd+bwd at 4 heads) and the section took ~8 minutes at
--repeat 1 on two shared cores (k2 fwd 3.7 s, 2.6x eager; fwd+bwd 6.6 s, 1.9x eager).

    python tools/bench_attention.py --json bench_attention.json
    python tools/bench_attention.py --seqlens 2048 --heads 8 --repeat 5
    python tools/bench_attention.py --device cuda --heads 64 --dtype bfloat16
    python tools/bench_attention.py --sections decode --decode-batches 1,8 --decode-heads 16
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _timing import print_rows, time_once

import k2.ops
from k2.ops import _native

DQK, DV = 192, 128
KV_LORA_RANK, ROPE_DIM = 512, 64  # Kimi-K2's latent cache row: [c_kv (r) | k_rope (dr)]


# ---- memory ------------------------------------------------------------------------------------------------------


def _proc_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_extra_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak memory that one call of ``fn`` adds over what was in use before it, in MiB (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    if not sys.platform.startswith("linux"):
        return None
    with contextlib.suppress(OSError):  # hand freed heap back to the OS, so the baseline is what is in use
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak RSS (VmHWM) to the current RSS
        f.write("5")
    before = _proc_kib("VmRSS")
    fn()
    return (_proc_kib("VmHWM") - before) / 1024


# ---- implementations ---------------------------------------------------------------------------------------------


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """The eager attention with max-logit recording for one causal sequence: ``[H, S, d] -> [H, S, dv]``."""
    s = q.shape[1]
    allowed = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
    bias = torch.zeros(allowed.shape, device=q.device).masked_fill_(~allowed, float("-inf"))
    logits = torch.baddbmm(bias, q.float(), k.float().transpose(1, 2), alpha=scale)  # [H, S, S] fp32
    logits.detach().amax(dim=(1, 2))  # the per-head max the model records for QK-Clip
    probs = torch.softmax(logits, dim=-1).to(v.dtype)
    return probs @ v


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, scale=scale)[0]


def k2_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, max_logits: bool = True):
    return k2.ops.mla_attention(q, k, v, softmax_scale=scale, causal=True, return_max_logits=max_logits)[0]


# ---- timing ------------------------------------------------------------------------------------------------------


def interleaved_best(fns: dict[str, Callable[[], object]], device: torch.device, repeat: int) -> dict[str, float]:
    """Fastest of ``repeat`` runs of each, after one warm-up each; the functions alternate within every round."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeat):
        for name, fn in fns.items():
            best[name] = min(best[name], time_once(fn, device))
    return best


def paired_cost_pct(with_fn: Callable[[], object], without_fn: Callable[[], object], device, rounds: int) -> float:
    """Median over ``rounds`` back-to-back pairs (order alternating) of time(with) / time(without) - 1, in %: adjacent
    runs see the same load from other processes, so the ratio is steadier than a ratio of two minima."""
    with_fn(), without_fn()
    ratios = []
    for i in range(rounds):
        if i % 2:
            t_without, t_with = time_once(without_fn, device), time_once(with_fn, device)
        else:
            t_with, t_without = time_once(with_fn, device), time_once(without_fn, device)
        ratios.append(t_with / t_without)
    ratios.sort()
    return 100 * (ratios[len(ratios) // 2] - 1)


# ---- benchmark ---------------------------------------------------------------------------------------------------


def bench_seqlen(s: int, heads: int, dtype: torch.dtype, device: torch.device, repeat: int) -> list[dict]:
    gen = torch.Generator(device=device).manual_seed(s)
    scale = DQK**-0.5
    q_hsd, k_hsd = (torch.randn(heads, s, DQK, device=device, generator=gen, dtype=dtype) for _ in range(2))
    v_hsd = torch.randn(heads, s, DV, device=device, generator=gen, dtype=dtype)
    do_hsd = torch.randn(heads, s, DV, device=device, generator=gen, dtype=dtype)
    q_shd, k_shd, v_shd, do_shd = (t.transpose(0, 1).contiguous() for t in (q_hsd, k_hsd, v_hsd, do_hsd))
    layouts = {"k2": (q_shd, k_shd, v_shd, do_shd), "eager": (q_hsd, k_hsd, v_hsd, do_hsd)}
    layouts["sdpa"] = layouts["eager"]
    impls = {"k2": k2_attention, "eager": eager_attention, "sdpa": sdpa_attention}

    def forward(name: str, **kw: bool) -> Callable[[], object]:
        q, k, v, _ = layouts[name]

        def run() -> None:
            with torch.no_grad():
                impls[name](q, k, v, scale, **kw)

        return run

    def forward_backward(name: str) -> Callable[[], object]:
        q, k, v, do = (t.detach().requires_grad_(i < 3) for i, t in enumerate(layouts[name]))

        def run() -> None:
            impls[name](q, k, v, scale).backward(do)
            q.grad = k.grad = v.grad = None

        return run

    n = 4096 if device.type == "cuda" or dtype == torch.float32 else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    matmul_flops = 2 * n**3

    def matmul() -> None:
        a @ b

    pairs = heads * s * (s + 1) // 2
    flops = {"fwd": 2 * pairs * (DQK + DV), "fwd+bwd": 2 * pairs * (DQK + DV) + 2 * pairs * (2 * DQK + 2 * DV)}
    rows = []
    for mode, make in (("fwd", forward), ("fwd+bwd", forward_backward)):
        fns = {name: make(name) for name in impls}
        times = interleaved_best({**fns, "matmul": matmul}, device, repeat)
        peak = matmul_flops / times["matmul"] / 1e9  # measured in the same rounds, under the same load
        if mode == "fwd":  # the cost of max logits: k2 with and without
            cost = paired_cost_pct(fns["k2"], forward("k2", max_logits=False), device, max(21, 4 * repeat + 1))
        memory = {name: peak_extra_mib(fns[name], device) for name in impls}
        for name in impls:
            row = {
                "op": f"attention {mode}: {name}",
                "shape": f"S={s} H={heads} dqk={DQK} dv={DV} {str(dtype).removeprefix('torch.')}",
                "ms": times[name] * 1e3,
                "GFLOPs": flops[mode] / times[name] / 1e9,
                "pct_of_matmul": 100 * flops[mode] / times[name] / 1e9 / peak,
                "matmul_GFLOPs": peak,
                "peak_extra_MiB": memory[name],
            }
            if name == "k2":
                row["speedup_vs_eager"] = times["eager"] / times["k2"]
                row["speedup_vs_sdpa"] = times["sdpa"] / times["k2"]
                if mode == "fwd":
                    row["max_logits_cost_pct"] = cost
            rows.append(row)
    return rows


# ---- decode ------------------------------------------------------------------------------------------------------


def eager_decode(q: torch.Tensor, kv: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    """The eager absorbed decode (k2 ≤ 0.1's decode step): ``[B, H, r + dr]`` queries over ``[B, T, r + dr]`` rows."""
    logits = torch.baddbmm(bias, q, kv.transpose(1, 2), alpha=scale)  # [B, H, T]
    p = torch.softmax(logits, dim=-1, dtype=torch.float32).to(kv.dtype)
    return torch.bmm(p, kv[..., :KV_LORA_RANK])  # [B, H, r]


def bench_decode(b: int, t: int, heads: int, dtype: torch.dtype, device: torch.device, repeat: int) -> list[dict]:
    gen = torch.Generator(device=device).manual_seed(b * 100_003 + t)
    dim = KV_LORA_RANK + ROPE_DIM
    scale = (128 + ROPE_DIM) ** -0.5
    buffer = torch.randn(2, b, t, dim, device=device, generator=gen, dtype=dtype)  # [L, N, T_max, r + dr]
    cache = buffer[1]  # one layer: [B, T, r + dr]
    q = torch.randn(b, heads, dim, device=device, generator=gen, dtype=dtype)
    lengths = torch.full((b,), t, dtype=torch.int32, device=device)
    bias = torch.zeros(b, 1, t, device=device, dtype=dtype)  # all visible; the additive mask the eager path adds

    def k2_decode() -> None:
        k2.ops.mla_decode(q, cache, lengths, softmax_scale=scale, kv_lora_rank=KV_LORA_RANK)

    def eager() -> None:
        eager_decode(q, cache, bias, scale)

    def read() -> None:  # the same bytes streamed once: the practical read bandwidth at this size
        cache.sum()

    with torch.no_grad():
        times = interleaved_best({"k2": k2_decode, "eager": eager, "read": read}, device, repeat)
    nbytes = cache.numel() * cache.element_size()
    read_gbs = nbytes / times["read"] / 1e9
    rows = []
    for name in ("k2", "eager"):
        row = {
            "op": f"decode: {name}",
            "shape": f"B={b} T={t} H={heads} r={KV_LORA_RANK} dr={ROPE_DIM} {str(dtype).removeprefix('torch.')}",
            "ms": times[name] * 1e3,
            "GBs": nbytes / times[name] / 1e9,
            "pct_of_read": 100 * nbytes / times[name] / 1e9 / read_gbs,
            "read_GBs": read_gbs,
        }
        if name == "k2":
            row["speedup_vs_eager"] = times["eager"] / times["k2"]
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--seqlens", default="512,1024,2048,4096", help="comma-separated S values")
    parser.add_argument("--heads", type=int, default=None, help="heads (default: 4 on CPU, 64 on CUDA)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--sections", default="attention,decode", help="comma-separated: attention, decode")
    parser.add_argument("--decode-batches", default="1,8", help="comma-separated B values of the decode section")
    parser.add_argument("--decode-seqlens", default="512,1024,2048,4096,8192", help="comma-separated cached T values")
    parser.add_argument("--decode-heads", type=int, default=None, help="decode heads (default: 16 on CPU, 64 on CUDA)")
    parser.add_argument("--json", help="write the rows and the machine description to this file")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    if not sections <= {"attention", "decode"}:
        parser.error(f"--sections: expected attention and/or decode, got {args.sections}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    dtype = getattr(torch, args.dtype)
    heads = args.heads or (64 if device.type == "cuda" else 4)
    kernel = "C++ kernel" if _native.has_kernel("attention", device) else "PyTorch reference (no kernel here)"
    print(
        f"# device={device} threads={torch.get_num_threads()} k2 threads="
        f"{_native.native().num_threads() if _native.native() else '-'} k2.ops.mla_attention: {kernel}",
        flush=True,
    )
    rows = []
    for s in (int(x) for x in args.seqlens.split(",")) if "attention" in sections else ():
        new = bench_seqlen(s, heads, dtype, device, args.repeat)
        print_rows(new, op_width=28, digits=2)
        rows += new
    decode_kernel = "native kernel" if _native.has_kernel("attention_decode", device) else "PyTorch reference"
    if "decode" in sections:
        print(f"# k2.ops.mla_decode: {decode_kernel}", flush=True)
    for b in (int(x) for x in args.decode_batches.split(",")) if "decode" in sections else ():
        for t in (int(x) for x in args.decode_seqlens.split(",")):
            decode_heads = args.decode_heads or (64 if device.type == "cuda" else 16)
            new = bench_decode(b, t, decode_heads, dtype, device, args.repeat)
            print_rows(new, op_width=28, digits=2)
            rows += new
    if args.json:
        info = {
            "device": str(device),
            "k2_kernel": kernel,
            "k2_decode_kernel": decode_kernel,
            "cpu_count": os.cpu_count(),
        }
        with open(args.json, "w") as f:
            json.dump({"machine": info, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
