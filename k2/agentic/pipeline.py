"""The ``k2 synth`` pipeline (Kimi K2 report, arXiv 2507.20534 §3.1.1, Fig. 8): tools → agents → tasks →
rollouts → judge → export, each a function ``(run_dir, backend, cfg) -> StageResult`` reading the previous stage's
JSONL and appending its own, so any stage can be killed and rerun.

The run directory (default ``runs/<timestamp>-synth``) is laid out as ``k2.agentic.config.RUN_LAYOUT`` says.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from k2.agentic.agents import synth_agents
from k2.agentic.backend import ChatBackend, make_backend
from k2.agentic.config import CONFIG_FILE, SynthConfig, save_config
from k2.agentic.dryrun import DryRunBackend
from k2.agentic.evolve import synth_tools
from k2.agentic.export import synth_export
from k2.agentic.judge import synth_judge
from k2.agentic.rollouts import synth_rollouts
from k2.agentic.stage import StageResult
from k2.agentic.tasks import synth_tasks
from k2.errors import ConfigError

Stage = Callable[[Path, ChatBackend, SynthConfig], StageResult]
STAGES: dict[str, Stage] = {
    "tools": synth_tools,
    "agents": synth_agents,
    "tasks": synth_tasks,
    "rollouts": synth_rollouts,
    "judge": synth_judge,
    "export": synth_export,
}
RUNS_DIR = Path("runs")


def latest_run_dir(runs: Path = RUNS_DIR) -> Path:
    """The newest ``runs/*-synth`` directory that has a config (``ConfigError`` if there is none)."""
    found = sorted(p for p in runs.glob("*-synth") if (p / CONFIG_FILE).is_file())
    if not found:
        raise ConfigError(f"no k2 synth run in {runs}/; pass --run-dir or start one with `k2 synth run`")
    return found[-1]


def backend_for(cfg: SynthConfig) -> ChatBackend:
    if not cfg.backend:
        raise ConfigError(
            "--backend is required: an OpenAI-compatible base URL (vLLM, SGLang or k2 serve, e.g. "
            "http://127.0.0.1:8000/v1) or a k2 checkpoint / run directory"
        )
    return make_backend(
        cfg.backend,
        model=cfg.model,
        concurrency=cfg.concurrency,
        timeout_s=cfg.timeout_s,
        max_retries=cfg.max_retries,
    )


def run_stages(
    run_dir: Path, backend: ChatBackend | None, cfg: SynthConfig, stages: Sequence[str] = tuple(STAGES)
) -> list[StageResult]:
    """Run ``stages`` in order (``export`` needs no back end; the others need one)."""
    results = []
    for name in stages:
        if name != "export" and backend is None:
            raise ConfigError(f"synth {name}: needs a back end")
        results.append(STAGES[name](run_dir, backend, cfg))
    return results


def dry_run(run_dir: Path, cfg: SynthConfig, stages: Sequence[str]) -> list[StageResult]:
    """Print the requests ``stages`` would send for ``run_dir`` (its records so far are read, nothing is written
    there): the stages run on a temporary copy against :class:`~k2.agentic.dryrun.DryRunBackend`."""
    with tempfile.TemporaryDirectory(prefix="k2-synth-dry-") as tmp:
        copy = Path(tmp) / "run"
        if run_dir.exists():
            shutil.copytree(run_dir, copy)
        cfg = cfg.replace(concurrency=1)
        save_config(copy, cfg)
        return run_stages(copy, DryRunBackend(), cfg, stages)
