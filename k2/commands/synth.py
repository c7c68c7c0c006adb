"""``k2 synth``: the agentic data-synthesis pipeline (``k2.agentic.pipeline``), one subcommand per stage and ``run``
for all of them.

A run directory holds one JSONL file per stage; every command appends only the records that are missing, so a
killed command is resumed by running it again. ``--backend`` has no default: the corpus is only as good as the
model behind it, so the user names it (an OpenAI-compatible URL such as vLLM, SGLang or ``k2 serve``, or a k2
checkpoint directory run in process); it is saved with the run, so later commands on the run can leave it out.
Without ``--run-dir``, ``tools`` and ``run`` start ``runs/<timestamp>-synth`` and the other stages continue the
newest ``runs/*-synth``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

STAGE_HELP = {
    "tools": "import MCP tools and evolve synthetic ones (category -> domain -> tools); validate and deduplicate",
    "agents": "agents: system prompts over seeded tool subsets",
    "tasks": "tasks from simple to complex per agent, each with a rubric",
    "rollouts": "multi-turn episodes: user simulator x agent x tool simulator (seeded failure injection)",
    "judge": "LLM judge against each task's rubric; keep or drop with reasons",
    "export": "the kept episodes as SFT JSONL (k2 sft --data), stats.json and a table",
    "run": "all stages in order",
}
# flag → (SynthConfig field, type, help); defaults and validation come from SynthConfig.
_FLAGS: dict[str, tuple[str, type, str]] = {
    "--backend": ("backend", str, "OpenAI-compatible base URL (http://HOST:PORT/v1) or a k2 checkpoint/run dir"),
    "--model": ("model", str, "model id sent to the server (default: the first the server lists)"),
    "--concurrency": ("concurrency", int, "requests in flight at once"),
    "--timeout": ("timeout_s", float, "seconds per request try"),
    "--max-retries": ("max_retries", int, "extra tries of a failed request"),
    "--seed": ("seed", int, "seed of every random choice (per record: stable under reruns)"),
    "--num-categories": ("num_categories", int, "seed categories to evolve (a seeded sample)"),
    "--domains-per-category": ("domains_per_category", int, "application domains per category"),
    "--tools-per-domain": ("tools_per_domain", int, "tools per application domain"),
    "--agents": ("num_agents", int, "agents"),
    "--min-tools": ("min_tools", int, "fewest tools per agent"),
    "--max-tools": ("max_tools", int, "most tools per agent"),
    "--tasks-per-agent": ("tasks_per_agent", int, "tasks per agent, simple to complex"),
    "--rollouts-per-task": ("rollouts_per_task", int, "episodes per task"),
    "--max-turns": ("max_turns", int, "user turns per episode"),
    "--max-steps": ("max_steps", int, "agent replies per user turn"),
    "--partial-rate": ("partial_rate", float, "share of valid tool calls answered with a partial failure"),
    "--edge-rate": ("edge_rate", float, "share answered with an edge case"),
    "--error-rate": ("error_rate", float, "share answered with an error"),
    "--temperature": ("temperature", float, "sampling temperature of generation (the judge uses 0)"),
    "--max-tokens": ("max_tokens", int, "max tokens per reply"),
    "--max-text-chars": ("max_text_chars", int, "maxLength of free-text fields in the reply schemas"),
}


def _common() -> argparse.ArgumentParser:
    from k2.agentic.config import SynthConfig

    defaults = SynthConfig()
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--run-dir", metavar="DIR", help="run directory (see `k2 synth --help`)")
    for flag, (field, kind, text) in _FLAGS.items():
        default = getattr(defaults, field)
        p.add_argument(flag, dest=field, type=kind, default=argparse.SUPPRESS, help=f"{text} (default {default})")
    p.add_argument(
        "--categories",
        type=lambda s: tuple(c.strip() for c in s.split(",")),
        default=argparse.SUPPRESS,
        help="comma-separated seed categories (default: a built-in list of 12)",
    )
    p.add_argument(
        "--mcp-json",
        dest="mcp_json",
        metavar="FILE",
        action="append",
        default=argparse.SUPPRESS,
        help="JSON file of an MCP tools/list result to import (repeatable)",
    )
    p.add_argument(
        "--mcp-server",
        dest="mcp_server",
        metavar='"CMD ARGS"',
        action="append",
        default=argparse.SUPPRESS,
        help="stdio MCP server to start and import tools from (repeatable)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the requests it would send; write nothing")
    return p


def register(sub: argparse._SubParsersAction) -> None:
    from k2.agentic.config import RUN_LAYOUT

    p = sub.add_parser(
        "synth",
        help="agentic data synthesis: tools, agents, tasks, rollouts, judge, export (any OpenAI-compatible LLM)",
        description=__doc__ + "\nRun directory:\n" + RUN_LAYOUT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    stages = p.add_subparsers(dest="stage", metavar="STAGE", required=True)
    common = _common()
    for name, text in STAGE_HELP.items():
        stages.add_parser(name, parents=[common], help=text, description=text).set_defaults(func=run, stage=name)


def run(args: argparse.Namespace) -> int:
    from k2.agentic.config import SynthConfig, resolve_config, save_config
    from k2.agentic.export import SFT_FILE, STATS_FILE, format_table
    from k2.agentic.pipeline import STAGES, backend_for, dry_run, latest_run_dir, run_stages

    fields = {f.name for f in dataclasses.fields(SynthConfig)}
    changes = {k: v for k, v in vars(args).items() if k in fields}
    if args.run_dir:
        run_dir = Path(args.run_dir)
    elif args.stage in ("tools", "run"):
        from k2.train.loop import default_run_dir

        run_dir = default_run_dir("-synth")
    else:
        run_dir = latest_run_dir()
    stages = list(STAGES) if args.stage == "run" else [args.stage]
    cfg = resolve_config(run_dir, changes)
    if args.dry_run:
        results = dry_run(run_dir, cfg, stages)
        print(f"k2 synth: dry run: {sum(r.usage.get('requests', 0) for r in results)} requests printed, nothing sent")
        return 0
    save_config(run_dir, cfg)
    backend = None if stages == ["export"] else backend_for(cfg)
    print(f"k2 synth: run directory {run_dir}, back end {backend.name if backend else '(none)'}", flush=True)
    try:
        for name in stages:
            (result,) = run_stages(run_dir, backend, cfg, [name])
            fails = ", ".join(f"{k} {v}" for k, v in sorted(result.failures.items()))
            line = f"  {result.stage:<9} {result.new} new, {result.existing} existing of {result.total}"
            print(line + (f"; failed: {fails} (rerun to retry)" if fails else ""), flush=True)
    except KeyboardInterrupt:
        sys.stderr.write(f"k2 synth: interrupted; continue with: k2 synth {args.stage} --run-dir {run_dir}\n")
        return 130
    finally:
        close = getattr(backend, "close", None)
        if close is not None:
            close()
    if "export" in stages:
        print(format_table(json.loads((run_dir / STATS_FILE).read_text())))
        print(f"SFT data: {run_dir / SFT_FILE}   (train: k2 sft --data {run_dir / SFT_FILE})")
    return 0
