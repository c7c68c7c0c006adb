"""``k2 synth export``: the kept episodes as SFT JSONL, plus ``stats.json`` and a short table.

``sft.jsonl`` has one ``{"messages": [...], "tools": [...]}`` line per episode the judge kept, in rollout-id order,
exactly what ``k2 sft --data`` reads (``k2.data.sft``); each line is checked with ``k2.data.sft.check_record``
first, and one that fails it (e.g. a call to a tool the agent does not have) is left out with the reason. The file
is rewritten whole each time (written beside and renamed), so it always matches the current judgements.

``stats.json``: record counts per stage file, acceptance rates (tools kept of those proposed or imported,
episodes the judge passed, episodes exported), rejection and failure reasons, injected tool outcomes, stop
reasons, and the requests and tokens each stage spent (summed over the invocations in ``log.jsonl``).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from k2.agentic.agents import AGENTS_FILE
from k2.agentic.backend import ChatBackend
from k2.agentic.config import SynthConfig
from k2.agentic.evolve import DOMAINS_FILE, PROPOSALS_FILE, REJECTED_FILE, TOOLS_FILE
from k2.agentic.judge import JUDGEMENTS_FILE
from k2.agentic.rollouts import ROLLOUTS_FILE
from k2.agentic.stage import LOG_FILE, StageResult, read_store, run_logged
from k2.agentic.store import JsonlStore
from k2.agentic.tasks import TASKS_FILE
from k2.data.sft import Record, check_record
from k2.errors import DataError

SFT_FILE = "sft.jsonl"
STATS_FILE = "stats.json"
STAGES = ("tools", "agents", "tasks", "rollouts", "judge", "export")


def _records(run_dir: Path, name: str) -> list[dict[str, Any]]:
    if not (run_dir / name).exists():
        return []
    with JsonlStore(run_dir / name) as store:
        return store.records()


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def _rate(a: int, b: int) -> float | None:
    return round(a / b, 4) if b else None


def collect_stats(run_dir: Path, exported: int, export_drops: Counter) -> dict[str, Any]:
    """The run's statistics from its files (see the module docstring)."""
    domains, proposals = _records(run_dir, DOMAINS_FILE), _records(run_dir, PROPOSALS_FILE)
    tools, rejected = _records(run_dir, TOOLS_FILE), _records(run_dir, REJECTED_FILE)
    rollouts, judgements = _records(run_dir, ROLLOUTS_FILE), _records(run_dir, JUDGEMENTS_FILE)
    kept = sum(j["kept"] for j in judgements)
    tokens: dict[str, Counter] = {s: Counter() for s in STAGES}
    failures: dict[str, Counter] = {s: Counter() for s in STAGES}
    for entry in _records(run_dir, LOG_FILE):
        tokens[entry["stage"]].update(entry["usage"])
        failures[entry["stage"]].update(entry["failures"])
    outcomes = Counter(e["outcome"] for r in rollouts for e in r["metadata"]["outcomes"])
    return {
        "run_dir": str(run_dir),
        "counts": {
            "categories": len(domains),
            "domains": sum(len(d["domains"]) for d in domains),
            "tools_proposed": sum(len(p["tools"]) for p in proposals),
            "tools_imported": sum(t["source"] != "synthetic" for t in tools + rejected),
            "tools": len(tools),
            "tools_rejected": len(rejected),
            "agents": len(_records(run_dir, AGENTS_FILE)),
            "tasks": len(_records(run_dir, TASKS_FILE)),
            "rollouts": len(rollouts),
            "judged": len(judgements),
            "kept": kept,
            "exported": exported,
        },
        "acceptance": {
            "tools": _rate(len(tools), len(tools) + len(rejected)),
            "judge": _rate(kept, len(judgements)),
            "export": _rate(exported, kept),
        },
        "rejections": {
            "tools": dict(Counter(" ".join(r["reason"].split()[:2]) for r in rejected)),
            "judge": dict(
                Counter(
                    j["reasons"][0] if j["judge"] == "rules" else "judge: fail" for j in judgements if not j["kept"]
                )
            ),
            "export": dict(export_drops),
        },
        "tool_outcomes": dict(outcomes),
        "stop_reasons": dict(Counter(r["metadata"]["stop_reason"] for r in rollouts)),
        "usage": {s: dict(c) for s, c in tokens.items() if c},
        "failures": {s: dict(c) for s, c in failures.items() if c},
    }


def format_table(stats: dict[str, Any]) -> str:
    """A short plain-text table of a run's stats."""
    c, a, u, f = stats["counts"], stats["acceptance"], stats["usage"], stats["failures"]

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x:.0%}"

    rows = [
        ("tools", f"{c['tools']} ({c['tools_rejected']} rejected)", pct(a["tools"])),
        ("agents", str(c["agents"]), ""),
        ("tasks", str(c["tasks"]), ""),
        ("rollouts", str(c["rollouts"]), ""),
        ("judge", f"{c['kept']} kept of {c['judged']}", pct(a["judge"])),
        ("export", f"{c['exported']} SFT lines", pct(a["export"])),
    ]
    lines = [f"{'stage':<9} {'records':<22} {'accept':>6} {'requests':>8} {'tokens in/out':>17}  failures"]
    for stage, records, accept in rows:
        use = u.get(stage, {})
        tok = f"{use.get('prompt_tokens', 0)}/{use.get('completion_tokens', 0)}" if use else "-"
        fails = ", ".join(f"{k} {v}" for k, v in sorted(f.get(stage, {}).items())) or "-"
        lines.append(f"{stage:<9} {records:<22} {accept:>6} {use.get('requests', 0):>8} {tok:>17}  {fails}")
    return "\n".join(lines)


def synth_export(run_dir: Path, backend: ChatBackend | None, cfg: SynthConfig) -> StageResult:
    """Write ``sft.jsonl`` and ``stats.json`` (``backend`` is unused: export sends no requests)."""

    def body(result: StageResult) -> None:
        rollouts = {r["id"]: r for r in read_store(run_dir, ROLLOUTS_FILE, "export")}
        kept = sorted(j["rollout_id"] for j in _records(run_dir, JUDGEMENTS_FILE) if j["kept"])
        lines = []
        for rid in kept:
            r = rollouts[rid]
            try:
                check_record(Record(f"rollout {rid}", r["messages"], r["tools"]))
            except DataError as e:
                result.dropped[f"sft check: {str(e).split(': ', 1)[1]}"] += 1
                continue
            lines.append(json.dumps({"messages": r["messages"], "tools": r["tools"]}, ensure_ascii=False) + "\n")
        _atomic_write(run_dir / SFT_FILE, "".join(lines))
        result.total = len(kept)
        result.new = len(lines)
        stats = collect_stats(run_dir, len(lines), result.dropped)
        _atomic_write(run_dir / STATS_FILE, json.dumps(stats, indent=2) + "\n")

    return run_logged("export", run_dir, backend, body)
