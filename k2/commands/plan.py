"""``k2 plan``: per-GPU memory, communication and pipeline bubble of a training layout, by calculation
(``k2.parallel.plan``); nothing is built or allocated, so the 1T ``kimi_k2`` plans in milliseconds."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="per-GPU memory, communication and bubble of a parallel layout (no GPU needed)",
        description="Plan a training run: per-GPU parameters, gradients, ZeRO-1 optimizer state and activations "
        "under the pipeline schedule, communication per step, bubble, and whether it fits.",
    )
    p.add_argument("--preset", default="kimi_k2", help="model preset (default kimi_k2)")
    p.add_argument("--gpus", type=int, required=True, help="GPUs in the job (= pp x dp)")
    p.add_argument("--gpu-memory", default="80GB", help="memory of one GPU, e.g. 80GB, 141GB (default 80GB)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel ranks")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel ranks (drawn from dp)")
    p.add_argument("--vpp", type=int, default=2, help="virtual stages per pipeline rank (default 2)")
    p.add_argument("--schedule", default="interleaved_1f1b", help="pipeline schedule (default interleaved_1f1b)")
    p.add_argument("--pp-layers", help="explicit layers per stage, comma-separated (default: balanced)")
    p.add_argument("--extra-warmup", type=int, default=0, help="extra warm-up micro-batches (K2 uses 1)")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch (default 1)")
    p.add_argument("--seq-len", type=int, default=4096, help="tokens per sequence (default 4096)")
    p.add_argument(
        "--global-batch", type=int, default=16384, help="sequences per step (default 16384: K2's 67M tokens)"
    )
    p.add_argument("--optimizer", default="muonclip", choices=("muonclip", "adamw"))
    p.add_argument(
        "--optimizer-offload", type=float, default=0.0, help="share of the optimizer state in host memory (0..1)"
    )
    p.add_argument(
        "--recompute", action="store_true", help="selective recompute as K2 (norms, SwiGLU, MLA up-proj, MoE down-proj)"
    )
    p.add_argument(
        "--recompute-moe-down",
        action="store_true",
        help="recompute only the MoE down-projections (implied by --recompute)",
    )
    p.add_argument("--fp8-storage", action="store_true", help="FP8 storage of the MoE up-proj and SwiGLU inputs")
    p.add_argument("--offload", action="store_true", help="CPU offload of the remaining activations")
    p.add_argument("--expert-imbalance", type=float, default=1.0, help="busiest expert rank's tokens / mean")
    p.add_argument("--headroom", type=float, default=0.1, help="share of GPU memory kept free (default 0.1)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from k2.errors import ConfigError
    from k2.model import presets
    from k2.parallel.plan import ActivationOptions, PlanInputs, format_plan, make_plan, parse_bytes

    layers = None
    if args.pp_layers:
        try:
            layers = [int(x) for x in args.pp_layers.split(",")]
        except ValueError:
            raise ConfigError(f"--pp-layers must be comma-separated integers, got {args.pp_layers!r}") from None
    inputs = PlanInputs(
        gpus=args.gpus,
        gpu_memory=parse_bytes(args.gpu_memory),
        pp=args.pp,
        virtual_stages=args.vpp,
        ep=args.ep,
        schedule=args.schedule,
        micro_batch_size=args.micro_batch,
        seq_len=args.seq_len,
        global_batch=args.global_batch,
        extra_warmup=args.extra_warmup,
        layers_per_stage=layers,
        optimizer=args.optimizer,
        optimizer_offload=args.optimizer_offload,
        expert_imbalance=args.expert_imbalance,
        headroom=args.headroom,
        activations=ActivationOptions(
            recompute=args.recompute,
            recompute_moe_down=args.recompute_moe_down,
            fp8_storage=args.fp8_storage,
            offload=args.offload,
        ),
    )
    plan = make_plan(presets.get(args.preset), inputs)
    if args.json:
        print(json.dumps({"preset": args.preset, **plan}, indent=2))
    else:
        print(format_plan(plan, args.preset))
    return 0
