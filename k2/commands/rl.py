"""``k2 rl``: reinforcement learning with the Kimi K1.5 objective (``k2.rl.train``), or resume a run.

With no arguments it trains the latest local model (the export of the newest ``k2 sft`` run in ``runs/``, else of
the newest ``k2 pretrain`` run) on the built-in arithmetic task, on the CPU, in minutes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "rl",
        help="RL with the K1.5 objective (default: the latest local model on built-in arithmetic, CPU, minutes)",
        description="Reinforcement learning of a K2-architecture model: rollouts on the k2 engine, the Kimi K1.5 "
        "loss with MuonClip, token budgets, PTX loss, temperature decay, partial rollouts. Writes the resolved "
        "config, metrics.jsonl, TensorBoard events, checkpoints, plots, summary.json and a Hugging Face export into "
        "the run directory.",
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument("--config", metavar="FILE", help="TOML file with [model] [rl] [optim] [train] [checkpoint]")
    source.add_argument(
        "--resume", metavar="DIR", help="continue the run in DIR from its latest checkpoint (--set still applies)"
    )
    p.add_argument(
        "--from",
        dest="source",
        metavar="DIR",
        help="Hugging Face checkpoint to start from (default: the latest k2 sft export in runs/, else k2 pretrain's)",
    )
    p.add_argument(
        "--set",
        metavar="SECTION.KEY=VALUE",
        action="append",
        default=[],
        dest="overrides",
        help="override one config value, e.g. --set rl.iterations=20 --set rl.tau=0.1 (repeatable)",
    )
    p.add_argument("--run-dir", metavar="DIR", help="where the run is written (default runs/<timestamp>)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as TOML and exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import tomli_w

    from k2.errors import ConfigError
    from k2.rl.config import build_rl_config, load_rl_config
    from k2.rl.loop import train

    overrides = list(args.overrides) + ([f"model.path={_toml_string(args.source)}"] if args.source else [])
    if args.resume:
        if args.run_dir and Path(args.run_dir) != Path(args.resume):
            raise ConfigError("--resume DIR continues the run in DIR; do not also pass a different --run-dir")
        config = load_rl_config(args.resume, overrides)
        run_dir = Path(args.resume)
    else:
        config = build_rl_config(file=args.config, overrides=overrides)
        run_dir = Path(args.run_dir) if args.run_dir else None
    if args.print_config:
        print(tomli_w.dumps(config.to_dict()), end="")
        return 0
    try:
        s = train(config, run_dir, resume=bool(args.resume))
    except KeyboardInterrupt:
        print(f"k2 rl: interrupted; continue with: k2 rl --resume {run_dir or 'RUN_DIR'}", file=sys.stderr)
        return 130
    print(
        f"\nRL: {s['iterations']} iterations in {s['wall_s']:.0f} s from {s['from']}\n"
        f"reward: first fifth {s['reward_first_fifth']:.3f} -> last fifth {s['reward_last_fifth']:.3f}\n"
        f"held-out accuracy ({s['heldout_problems']} problems, greedy): {s['heldout_accuracy_before']:.3f} -> "
        f"{s['heldout_accuracy_after']:.3f}\n"
        f"run directory  {s['run_dir']}"
    )
    for key in ("metrics", "checkpoint", "hf", "summary"):
        if key in s["files"]:
            print(f"  {key:<12} {s['files'][key]}")
    print(f"  plots        {', '.join(Path(p).name for p in s['files']['plots'])}")
    return 0


def _toml_string(value: str) -> str:
    import json

    return json.dumps(value)  # a TOML basic string
