"""``SynthConfig``: every knob of ``k2 synth`` (sizes, failure rates, seed, back end), defaults defined here once.

The config of a run is saved as ``config.json`` in its run directory; a later ``k2 synth`` command on the same
directory starts from the saved config and applies only the flags it is given, so ``k2 synth tools --run-dir D
--seed 3`` followed by ``k2 synth agents --run-dir D`` keeps seed 3. Sizes follow the shape of the Kimi K2 report
(arXiv 2507.20534 §3.1.1: categories → application domains → tools; agents over tool subsets; tasks with rubrics;
simulated multi-turn rollouts) at a scale that runs on one machine; the report's corpus is tens of thousands of
tools and thousands of agents.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from k2.errors import ConfigError

CONFIG_FILE = "config.json"
RUN_LAYOUT = """\
config.json            the SynthConfig of the run (later commands start from it)
domains.jsonl          categories -> application domains
tool_proposals.jsonl   domains -> proposed tools
tools.jsonl            the tool repository (imported MCP + synthetic), validated and deduplicated
tools_rejected.jsonl   tools left out, with the reason
agents.jsonl           agents: system prompt + tool subset
tasks.jsonl            tasks with rubrics, simple -> complex
rollouts.jsonl         episodes: messages, tools, metadata (injected outcomes, stop reason, state)
judgements.jsonl       verdict, scores and reasons per episode; kept or not
sft.jsonl              the kept episodes in the format `k2 sft --data` reads
stats.json             counts, acceptance rates, rejection/failure reasons, tokens
log.jsonl              one line per stage invocation (counts, failures, requests, tokens)
"""

# Seed categories for the synthetic tools: broad areas of everyday and professional software.
SEED_CATEGORIES: tuple[str, ...] = (
    "finance and banking",
    "travel and transportation",
    "health and fitness",
    "e-commerce and retail",
    "software development",
    "education and learning",
    "home automation",
    "media and entertainment",
    "productivity and office work",
    "weather and environment",
    "food and cooking",
    "customer support",
)

# Outcomes the tool simulator injects, in the order of the cumulative draw (``k2.agentic.simulators``).
OUTCOMES: tuple[str, ...] = ("success", "partial_failure", "edge_case", "error")


@dataclass(frozen=True, kw_only=True)
class SynthConfig:
    seed: int = 0
    # ---- tools: imported MCP tools + synthetic ones evolved category → domain → tools
    categories: tuple[str, ...] = SEED_CATEGORIES
    num_categories: int = 4  # a seeded sample of ``categories``
    domains_per_category: int = 2
    tools_per_domain: int = 3
    mcp_json: tuple[str, ...] = ()  # files holding MCP ``tools/list`` results
    mcp_server: tuple[str, ...] = ()  # stdio MCP server command lines ("CMD ARGS")
    # ---- agents and tasks
    num_agents: int = 6
    min_tools: int = 2  # tools per agent, inclusive range
    max_tools: int = 4
    tasks_per_agent: int = 3  # spread from simple to complex
    # ---- rollouts
    rollouts_per_task: int = 1
    max_turns: int = 3  # user turns per episode
    max_steps: int = 4  # agent replies (tool rounds) per user turn
    partial_rate: float = 0.1  # tool outcomes; success takes the rest
    edge_rate: float = 0.1
    error_rate: float = 0.1
    # ---- generation
    temperature: float = 0.7  # judge calls use 0
    max_tokens: int = 1024  # per request
    max_text_chars: int = 400  # maxLength of free-text fields in the JSON schemas (bounds every JSON reply)
    # ---- back end (not part of any record's content)
    backend: str | None = None  # http(s)://host:port/v1 or a checkpoint directory
    model: str | None = None
    concurrency: int = 4
    timeout_s: float = 120.0
    max_retries: int = 3

    def __post_init__(self) -> None:
        counts = ("num_categories", "domains_per_category", "tools_per_domain", "num_agents", "min_tools")
        counts += ("tasks_per_agent", "rollouts_per_task", "max_turns", "max_steps", "concurrency", "max_tokens")
        for name in counts:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"synth: {name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.max_tools < self.min_tools:
            raise ConfigError(f"synth: max_tools ({self.max_tools}) is below min_tools ({self.min_tools})")
        if self.num_categories > len(self.categories):
            raise ConfigError(
                f"synth: num_categories={self.num_categories} but only {len(self.categories)} categories are given"
            )
        if len(set(self.categories)) != len(self.categories) or not all(c.strip() for c in self.categories):
            raise ConfigError("synth: categories must be distinct, non-empty names")
        for name in ("partial_rate", "edge_rate", "error_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"synth: {name} must be in [0, 1], got {getattr(self, name)}")
        if self.partial_rate + self.edge_rate + self.error_rate > 1.0 + 1e-12:
            raise ConfigError("synth: partial_rate + edge_rate + error_rate must be at most 1")
        if self.max_text_chars < 8:
            raise ConfigError(f"synth: max_text_chars must be >= 8, got {self.max_text_chars}")
        if self.timeout_s <= 0 or self.max_retries < 0:
            raise ConfigError("synth: timeout_s must be > 0 and max_retries >= 0")

    @property
    def outcome_rates(self) -> dict[str, float]:
        """Probability of each of :data:`OUTCOMES` for a valid tool call."""
        failures = self.partial_rate + self.edge_rate + self.error_rate
        rates = (max(0.0, 1.0 - failures), self.partial_rate, self.edge_rate, self.error_rate)
        return dict(zip(OUTCOMES, rates, strict=True))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in _FIELDS}

    def replace(self, **changes: Any) -> SynthConfig:
        unknown = sorted(set(changes) - {f.name for f in _FIELDS})
        if unknown:
            raise ConfigError(f"synth: unknown config keys {unknown}")
        tuples = {f.name for f in _FIELDS if isinstance(f.default, tuple)}
        changes = {k: tuple(v) if k in tuples else v for k, v in changes.items()}
        return dataclasses.replace(self, **changes)


_FIELDS = dataclasses.fields(SynthConfig)


def resolve_config(run_dir: Path, changes: dict[str, Any]) -> SynthConfig:
    """The run's saved config (the defaults for a new run) with ``changes`` applied."""
    path = run_dir / CONFIG_FILE
    base = SynthConfig()
    if path.exists():
        try:
            base = base.replace(**json.loads(path.read_text()))
        except ValueError as e:
            raise ConfigError(f"{path}: not a k2 synth config ({e})") from None
    return base.replace(**changes)


def save_config(run_dir: Path, cfg: SynthConfig) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    tmp.replace(run_dir / CONFIG_FILE)
