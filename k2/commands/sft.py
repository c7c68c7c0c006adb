"""``k2 sft``: supervised fine-tuning of a Hugging Face-format checkpoint on chat / tool-use data
(``k2.train.sft``), or resume a run.

With no arguments it runs the embedded default: the export of the latest ``k2 pretrain`` run in ``runs/``,
fine-tuned on the built-in dialogues (tool use and tool-free arithmetic), on the CPU, in a few minutes, into
``runs/<timestamp>-sft``; the report shows the held-out tool-call validity before and after.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from k2.commands._run_args import add_run_arguments, print_config, resolve_run, toml_string, train_and_report


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sft",
        help="fine-tune a checkpoint on chat and tool-use data (default: the latest pretrain run, built-in tools)",
        description="Supervised fine-tuning with MuonClip: loss on what the assistant produces, held-out loss and "
        "tool-call validity / exact-call accuracy. Writes the resolved config, metrics.jsonl, TensorBoard events, "
        "checkpoints, plots, summary.json and a Hugging Face export into the run directory.",
    )
    p.add_argument(
        "--from",
        dest="base",
        metavar="DIR",
        help="Hugging Face-format checkpoint (or a run directory with one in hf/) to fine-tune (default: hf/ of the "
        "latest k2 pretrain run in runs/)",
    )
    p.add_argument(
        "--data",
        metavar="PATH",
        help='.jsonl / .parquet chat records ({"messages": [...], "tools": [...]}) or a directory of them '
        "(default: the built-in dialogues: tool use and tool-free arithmetic)",
    )
    add_run_arguments(
        p,
        sections="[data] [optim] [train] [eval] [checkpoint] [parallel]",
        example="--set train.steps=300 --set optim.lr=3e-3",
        run_dir="runs/<timestamp>-sft",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from k2.errors import ConfigError
    from k2.train.config import SFTConfig, build_config, load_run_config
    from k2.train.sft import sft

    overrides = list(args.overrides)
    if args.base:
        overrides.append(f"model.path={toml_string(args.base)}")
    if args.data:
        overrides.append(f"data.path={toml_string(args.data)}")
    if args.resume and (args.base or args.data):
        raise ConfigError("--resume continues a run with its own model and data; drop --from / --data")
    config, run_dir = resolve_run(
        args,
        lambda o: build_config(file=args.config, overrides=o, schema=SFTConfig),
        lambda d, o: load_run_config(d, o, schema=SFTConfig),
        overrides,
    )
    if args.print_config:
        return print_config(config)
    return train_and_report("sft", sft, config, run_dir, bool(args.resume), _report)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _report(s: dict) -> None:
    files = s["files"]
    print(
        f"\nfine-tuned {s['steps']} steps, {s['tokens']:,} tokens in {s['wall_s']:.0f} s "
        f"({s['tokens_per_s'] or 0:,.0f} tok/s, {s['device']}, {s['precision']})"
    )
    print(f"base model     {s['base_model']}")
    print(
        f"data           {s['data']}: {s['train_conversations']:,} training / {s['heldout_conversations']:,} held-out "
        f"conversations, {s['skipped_too_long']} skipped (longer than data.context_len)"
    )
    if s.get("eval_loss") is not None:
        start = f"{s['eval_loss_start']:.4f} -> " if s.get("eval_loss_start") is not None else ""
        print(f"held-out loss  {start}{s['eval_loss']:.4f} (assistant tokens)")
    if s.get("tool_call_validity") is not None:
        before = s.get("tool_call_validity_start")
        print(
            f"tool calls     validity {_pct(before) + ' -> ' if before is not None else ''}"
            f"{_pct(s['tool_call_validity'])}, exact {_pct(s.get('tool_call_exact'))} "
            f"on {s['tool_turns']} held-out turns"
        )
    print(f"run directory  {s['run_dir']}")
    print(f"  config       {files['config']}")
    print(f"  metrics      {files['metrics']}")
    print(f"  tensorboard  tensorboard --logdir {files['tensorboard']}")
    print(f"  checkpoint   {files['checkpoint']}")
    if "hf" in files:
        print(f"  model (HF)   {files['hf']}    (try: k2 chat {files['hf']} --tools calculator,get_weather)")
    print(f"  plots        {', '.join(Path(p).name for p in files['plots'])} in {Path(files['plots'][0]).parent}")
    print(f"  summary      {files['summary']}")
