"""The ``k2`` command.

Each subcommand lives in ``k2/commands/<name>.py`` with ``register(subparsers)``, which adds its parser and
sets ``func`` (``args -> exit code``). Heavy imports happen inside ``func`` so ``k2 --help`` stays fast.
User errors (``k2.errors.K2Error`` and bad files or values) print one line and exit 2; ``K2_DEBUG=1`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from k2.errors import K2Error

# Subcommand modules, in the order ``k2 --help`` lists them.
COMMANDS = ("info", "plan", "pretrain", "sft", "rl", "synth", "rephrase", "plot", "generate", "chat", "serve")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="k2", description="The Kimi K2 training stack.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"k2.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (K2Error, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, ValueError) as e:
        if os.environ.get("K2_DEBUG"):
            raise
        # One write: stderr is write-through, so print's separate newline would let the lines of several ranks
        # sharing one stderr (torchrun) interleave.
        sys.stderr.write(f"k2 {args.command}: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"k2 {args.command}: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
