"""Activation memory of Kimi K2's three reductions (``k2.parallel.activations``): saved bytes per token per layer,
kept on the device and offloaded, for each option alone and combined, against the plain model, with the
activation model's prediction (``k2.parallel.activation_model``) and the step-time overhead on this machine.

Two subjects:
- ``small`` (fp32, 8 layers, the CPU preset): bytes of its MoE layers (layer 1) per token, and the time of one
  forward + backward of the whole model (best of ``--repeat``);
- one K2-shaped MoE layer in bf16: hidden 7168, 64 heads, q/kv LoRA ranks 1536/512, expert width 2048, top-8
  routing plus a shared expert — the activation shapes of Kimi K2's layers. Only the *number* of routed experts is
  cut (``--k2-experts``, default 8, instead of 384: the weights of 384 experts are 34 GB in bf16, and the saved
  activations do not depend on how many experts there are, only on top-8) and the vocabulary (512; the embedding
  and LM head are outside the layer). ``--k2-tokens`` tokens (default 64) per forward.

Bytes are counted by the saved-tensor hooks, per storage, and divided by the tokens of the forward; "device %" is
the device-resident bytes against the plain run's. Time: the process CPU time of one forward + backward (no
optimizer) on ``--threads`` threads (default 1), the least of ``--repeat`` after a warm-up (CPU time, not wall
time: the machine is shared); on a CPU, offload is a memcpy and recompute costs its FLOPs again.

    python tools/bench_memory.py                      # small and the K2-shaped layer, table
    python tools/bench_memory.py --json mem.json --k2-time all
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch
from _timing import print_rows

from k2.model import Transformer
from k2.model.presets import kimi_k2, small
from k2.parallel.activation_model import layer_saved_bytes
from k2.parallel.activations import FP8, RECOMPUTE, apply_activation_memory

K2_RECOMPUTE = ("norm", "swiglu", "mla_up_proj", "moe_down_proj")
OPTIONS: dict[str, dict] = {
    "plain": {},
    **{f"recompute={r}": {"recompute": [r]} for r in RECOMPUTE},
    **{f"fp8={f}": {"fp8_activations": [f]} for f in FP8},
    "offload": {"offload": True},
    "recompute(K2)": {"recompute": list(K2_RECOMPUTE)},
    "fp8(both)": {"fp8_activations": list(FP8)},
    "K2: all three": {"recompute": list(K2_RECOMPUTE), "fp8_activations": list(FP8), "offload": True},
}


def k2_layer_config(experts: int):
    return kimi_k2().replace(
        num_hidden_layers=1,
        first_k_dense_replace=0,
        n_routed_experts=experts,
        vocab_size=512,
    )


def _cpu_seconds(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def _step(model: Transformer, ids: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    model.loss(ids, ids).backward()


def bench(subject: str, config, dtype: torch.dtype, tokens: tuple[int, int], layer: int, timed: set[str], repeat: int):
    torch.manual_seed(0)
    base = Transformer(config).to(dtype).train()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    del base
    ids = torch.randint(0, config.vocab_size, tokens, generator=torch.Generator().manual_seed(1))
    n = tokens[0] * tokens[1]
    rows, plain_device, plain_time = [], None, None
    for name, options in OPTIONS.items():
        model = Transformer(config).to(dtype).train()
        model.load_state_dict(state)
        mem = apply_activation_memory(model, **options)
        with mem.measure() as stats:
            model.loss(ids, ids).backward()
        got = stats[layer]
        want = layer_saved_bytes(config, layer, act_bytes=dtype.itemsize, **options)
        plain_device = got.device if plain_device is None else plain_device
        seconds = None
        if name in timed:  # process CPU time: steadier than wall time on a shared machine
            _step(model, ids)
            seconds = min(_cpu_seconds(lambda m=model: _step(m, ids)) for _ in range(repeat))
        plain_time = seconds if name == "plain" else plain_time
        row = {
            "op": f"{subject} {name}",
            "shape": f"{n} tok, layer {layer}, {str(dtype).removeprefix('torch.')}",
            "device_B_per_tok": round(got.device / n),
            "offloaded_B_per_tok": round(got.offloaded / n),
            "device_pct_of_plain": round(100 * got.device / plain_device, 1),
            "model_device": round(want.device),
            "model_offloaded": round(want.offloaded),
        }
        if seconds is not None:
            row["step_ms"] = round(seconds * 1e3, 1)
            if plain_time:
                row["overhead_pct"] = round(100 * (seconds / plain_time - 1), 1)
        rows.append(row)
        print_rows([row], op_width=34)
        del model, mem
        gc.collect()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--subjects", nargs="+", default=["small", "k2_layer"], choices=["small", "k2_layer"])
    p.add_argument("--tokens", type=int, nargs=2, default=[2, 256], metavar=("B", "S"), help="small's batch")
    p.add_argument("--k2-tokens", type=int, default=64)
    p.add_argument("--k2-experts", type=int, default=8)
    p.add_argument("--k2-time", choices=["none", "some", "all"], default="some", help="some: plain and all three")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)  # 1: the CPU time of a step is its work, not the pool's spinning
    rows = []
    if "small" in args.subjects:
        rows += bench("small", small(), torch.float32, tuple(args.tokens), 1, set(OPTIONS), args.repeat)
    if "k2_layer" in args.subjects:
        timed = {"none": set(), "some": {"plain", "K2: all three"}, "all": set(OPTIONS)}[args.k2_time]
        config = k2_layer_config(args.k2_experts)
        rows += bench("K2 layer", config, torch.bfloat16, (1, args.k2_tokens), 0, timed, max(1, args.repeat - 1))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
