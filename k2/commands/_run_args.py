"""What the training commands (``k2 pretrain``, ``k2 sft``, ``k2 rl``) share on the command line: the config source
(``--config FILE`` or ``--resume DIR``), ``--set`` overrides, ``--run-dir``, ``--print-config``, and how they resolve
into a config and a run directory."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def add_run_arguments(
    p: argparse.ArgumentParser, *, sections: str, example: str, run_dir: str = "runs/<timestamp>"
) -> argparse._MutuallyExclusiveGroup:
    """Adds ``--config``/``--resume`` (mutually exclusive; the group is returned for more sources), ``--set``,
    ``--run-dir`` and ``--print-config``. ``sections``: the TOML sections the config takes; ``example``: a
    ``--set`` example."""
    source = p.add_mutually_exclusive_group()
    source.add_argument("--config", metavar="FILE", help=f"TOML file with {sections} sections")
    source.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the run in DIR from its latest checkpoint, with its saved config (--set still applies)",
    )
    p.add_argument(
        "--set",
        metavar="SECTION.KEY=VALUE",
        action="append",
        default=[],
        dest="overrides",
        help=f"override one config value, e.g. {example} (repeatable)",
    )
    p.add_argument("--run-dir", metavar="DIR", help=f"where the run is written (default {run_dir})")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as TOML and exit")
    return source


def resolve_run(
    args: argparse.Namespace,
    build: Callable[[list[str]], Any],
    load: Callable[[str, list[str]], Any],
    overrides: list[str] | None = None,
) -> tuple[Any, Path | None]:
    """``(config, run_dir)``: ``load(resume_dir, overrides)`` for ``--resume`` (whose run directory it continues),
    else ``build(overrides)`` with ``--run-dir`` (None: the trainer's default)."""
    from k2.errors import ConfigError

    overrides = list(args.overrides) if overrides is None else overrides
    if args.resume:
        if args.run_dir and Path(args.run_dir) != Path(args.resume):
            raise ConfigError("--resume DIR continues the run in DIR; do not also pass a different --run-dir")
        return load(args.resume, overrides), Path(args.resume)
    return build(overrides), Path(args.run_dir) if args.run_dir else None


def print_config(config: Any) -> int:
    import tomli_w

    print(tomli_w.dumps(config.to_dict()), end="")
    return 0


def train_and_report(
    command: str,
    train: Callable[..., dict[str, Any]],
    config: Any,
    run_dir: Path | None,
    resume: bool,
    report: Callable[[dict[str, Any]], None],
) -> int:
    """Run ``train(config, run_dir, resume=resume)`` and ``report`` its summary (rank 0 alone under torchrun); an
    interrupt says how to continue. Returns the exit code."""
    try:
        summary = train(config, run_dir, resume=resume)
    except KeyboardInterrupt:
        print(
            f"k2 {command}: interrupted; continue with: k2 {command} --resume {run_dir or 'RUN_DIR'}", file=sys.stderr
        )
        return 130
    if int(os.environ.get("RANK", "0")) == 0:
        report(summary)
    return 0


def toml_string(value: str) -> str:
    """``value`` as a TOML basic string (a JSON string is one), for a ``--set`` built from a path argument."""
    return json.dumps(value)
