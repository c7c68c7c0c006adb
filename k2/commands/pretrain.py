"""``k2 pretrain``: train a model from a preset or a TOML config (``k2.train.pretrain``), or resume a run.

With no arguments it trains the embedded default: the ``tiny`` model on the built-in corpus, on the CPU, in a
few minutes, into ``runs/<timestamp>``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from k2.commands._run_args import add_run_arguments, print_config, resolve_run, train_and_report


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain",
        help="pre-train a model (default: tiny on the built-in corpus, CPU, minutes)",
        description="Pre-train a K2-architecture model with MuonClip and a WSD schedule. Writes the resolved "
        "config, metrics.jsonl, TensorBoard events, checkpoints, plots, summary.json and a Hugging Face export "
        "into the run directory.",
    )
    source = add_run_arguments(
        p,
        sections="[model] [data] [optim] [train] [eval] [checkpoint] [parallel]",
        example="--set train.steps=100 --set optim.lr=3e-3",
    )
    source.add_argument("--preset", metavar="NAME", help="model preset (tiny, small, moonlight, deepseek_v3, kimi_k2)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from k2.train import build_config, load_run_config, pretrain

    config, run_dir = resolve_run(
        args, lambda o: build_config(file=args.config, preset=args.preset, overrides=o), load_run_config
    )
    if args.print_config:
        return print_config(config)
    return train_and_report("pretrain", pretrain, config, run_dir, bool(args.resume), _report)


def _report(s: dict) -> None:
    files = s["files"]
    ok = s["eval_loss"] is not None and s["eval_loss"] < s["baseline_loss"]
    print(
        f"\ntrained {s['steps']} steps, {s['tokens']:,} tokens in {s['wall_s']:.0f} s "
        f"({s['tokens_per_s'] or 0:,.0f} tok/s, {s['device']}, {s['precision']})"
    )
    print(
        f"held-out loss {s['eval_loss']:.4f} vs unigram baseline {s['baseline_loss']:.4f} "
        f"({'below' if ok else 'NOT below'} baseline)"
    )
    print(f"run directory  {s['run_dir']}")
    print(f"  config       {files['config']}")
    print(f"  metrics      {files['metrics']}")
    print(f"  tensorboard  tensorboard --logdir {files['tensorboard']}")
    print(f"  checkpoint   {files['checkpoint']}")
    if "hf" in files:
        print(f"  model (HF)   {files['hf']}    (try: k2 chat {files['hf']})")
    print(f"  plots        {', '.join(Path(p).name for p in files['plots'])} in {Path(files['plots'][0]).parent}")
    print(f"  summary      {files['summary']}")
