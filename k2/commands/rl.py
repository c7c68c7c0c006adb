"""``k2 rl``: reinforcement learning with the Kimi K1.5 objective (``k2.rl.train``), or resume a run.

With no arguments it trains the latest local model (the export of the newest ``k2 sft`` run in ``runs/``, else of
the newest ``k2 pretrain`` run) on the built-in arithmetic task, on the CPU, in minutes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from k2.commands._run_args import add_run_arguments, print_config, resolve_run, toml_string, train_and_report


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "rl",
        help="RL with the K1.5 objective (default: the latest local model on built-in arithmetic, CPU, minutes)",
        description="Reinforcement learning of a K2-architecture model: rollouts on the k2 engine, the Kimi K1.5 "
        "loss with MuonClip, token budgets, PTX loss, temperature decay, partial rollouts. Writes the resolved "
        "config, metrics.jsonl, TensorBoard events, checkpoints, plots, summary.json and a Hugging Face export into "
        "the run directory.",
    )
    add_run_arguments(
        p, sections="[model] [rl] [optim] [train] [checkpoint]", example="--set rl.iterations=20 --set rl.tau=0.1"
    )
    p.add_argument(
        "--from",
        dest="source",
        metavar="DIR",
        help="Hugging Face checkpoint to start from (default: the latest k2 sft export in runs/, else k2 pretrain's)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from k2.rl.config import build_rl_config, load_rl_config
    from k2.rl.loop import train

    overrides = list(args.overrides) + ([f"model.path={toml_string(args.source)}"] if args.source else [])
    config, run_dir = resolve_run(
        args, lambda o: build_rl_config(file=args.config, overrides=o), load_rl_config, overrides
    )
    if args.print_config:
        return print_config(config)
    return train_and_report("rl", train, config, run_dir, bool(args.resume), _report)


def _report(s: dict) -> None:
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
