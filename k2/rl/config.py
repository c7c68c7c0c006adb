"""``RLConfig`` (``k2 rl``): frozen keyword-only dataclasses, one per TOML section, resolved like the other trainers'
configs (defaults → ``--config`` TOML → ``--set section.key=value``; every key and type checked, ``ConfigError``
naming the key) and saved as ``RUN_DIR/config.toml`` for ``--resume``.

Sections: ``[model]`` (the starting checkpoint), ``[rl]`` (the objective, rollouts, budgets, PTX, temperature),
``[optim]`` (``k2.train``'s, with RL defaults: MuonClip at a constant learning rate), ``[train]`` (device, threads,
micro-batch, checkpoints) and ``[checkpoint]`` (``k2.train``'s). The defaults are the embedded default run: the
``arith`` task on the latest local model, minutes on a 2-core CPU.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tomli_w

from k2.errors import ConfigError
from k2.train.config import CONFIG_FILE, CheckpointSection, OptimSection, _coerce, _parse_override, _read_toml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True, kw_only=True)
class RLModelSection:
    # A Hugging Face-format checkpoint directory; "" = the export (hf/) of the latest k2 sft run in runs/, else of the
    # latest k2 pretrain run. config.toml records the directory it resolved to.
    path: str = ""


@dataclass(frozen=True, kw_only=True)
class RLSection:
    envs: str = "arith"  # comma-separated built-in environments (k2.rl.tasks.BUILTIN_ENVS), mixed uniformly
    reward: str = ""  # "module:function" with the k2.rl.rewards contract; "" = the exact-answer reward
    iterations: int = 40
    prompts_per_iteration: int = 32  # P
    samples_per_prompt: int = 8  # K
    tau: float = 0.05  # K1.5's τ: weight of the log-ratio in the residual
    updates_per_iteration: int = 2  # optimizer steps on each iteration's rollouts (π_old fixed within them)
    # Default per-episode budget of action tokens (all turns). The default SFT model answers arith in ~8 byte tokens
    # ("4+7=11" and <|im_end|>); an arith_tools episode (a calculator call, ~65 tokens, then an answer) takes 63-112.
    max_response_tokens: int = 128
    token_budgets: str = ""  # per-environment budgets, "env:tokens,env:tokens"; others use max_response_tokens
    # The reward of an episode cut by its token budget (it is not graded); 0 keeps the reward curve the exact-answer
    # accuracy.
    truncation_penalty: float = 0.0
    length_penalty: float = 0.0  # weight of K1.5's length reward; 0 = off
    rollout_budget: int = 0  # generated tokens per iteration (partial rollouts beyond it); 0 = unlimited
    max_staleness: int = 1  # a buffered group sampled more than this many iterations ago is dropped
    # Weight of the PTX loss; 0 = off. The K1.5 term's gradient is 2τ·(advantage)·∇log π, ~0.1x a cross-entropy's at
    # τ = 0.05, and MuonClip normalises the update, so at 0.1 PTX steered it: reward 0.59 -> 0.64 and held-out
    # accuracy 27 -> 20 % where PTX off gave 0.69 -> 0.79 and 27 -> 42 % (same SFT model, README).
    ptx_weight: float = 0.01
    ptx_data: str = ""  # .jsonl/.parquet chat records for PTX; "" = built-in dialogues that declare tools
    ptx_batch_size: int = 2  # PTX conversations per optimizer step
    temperature_start: float = 1.0
    temperature_end: float = 0.7
    temperature_decay: Literal["linear", "cosine", "exponential", "constant"] = "cosine"
    reset_optimizer: bool = True  # K1.5: fresh optimizer state every iteration
    max_turns: int = 3  # assistant turns per episode in tool environments
    heldout_problems: int = 64  # held-out problems scored (greedy) before and after; 0 = none
    max_batch_size: int = 64  # engine slots (concurrent episodes), per rollout server with rollout = "servers"
    # Where rollouts run: "colocated" = a k2 Engine in the trainer's process (weights copied after each update);
    # "servers" = rollout_servers `k2 serve` processes on loopback (weights broadcast after each update).
    rollout: Literal["colocated", "servers"] = "colocated"
    rollout_servers: int = 1
    sync_bucket_mb: int = 64  # weight-sync bucket size
    seed: int = 0


@dataclass(frozen=True, kw_only=True)
class RLTrainSection:
    device: str = "auto"  # "auto" (CUDA if available), "cpu", "cuda", ...
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    micro_batch: int = 16  # sequences per training forward
    threads: int = 1  # torch CPU threads, 0 = all cores
    checkpoint_every: int = 10  # iterations between checkpoints (and one at the end); 0 = only at the end
    log_every: int = 1  # progress lines (iterations)


@dataclass(frozen=True, kw_only=True)
class RLConfig:
    """An RL run (``k2 rl``)."""

    model: RLModelSection = field(default_factory=RLModelSection)
    rl: RLSection = field(default_factory=RLSection)
    optim: OptimSection = field(
        default_factory=lambda: OptimSection(lr=2e-3, warmup_steps=0, weight_decay=0.0, grad_clip=1.0)
    )
    train: RLTrainSection = field(default_factory=RLTrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        out = {f.name: dataclasses.asdict(getattr(self, f.name)) for f in dataclasses.fields(self)}
        out["optim"]["betas"] = list(self.optim.betas)
        return out

    def save(self, run_dir: str | os.PathLike[str]) -> Path:
        path = Path(run_dir) / CONFIG_FILE
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(tomli_w.dumps(self.to_dict()).encode())
        os.replace(tmp, path)
        return path

    def budgets(self) -> dict[str, int]:
        """``rl.token_budgets`` as ``{env: tokens}``."""
        out: dict[str, int] = {}
        for item in filter(None, (s.strip() for s in self.rl.token_budgets.split(","))):
            name, _, value = item.partition(":")
            if not value.strip().isdigit() or int(value) < 1:
                raise ConfigError(f"rl.token_budgets: expected env:tokens, got {item!r}")
            out[name.strip()] = int(value)
        return out

    def env_names(self) -> list[str]:
        return [s.strip() for s in self.rl.envs.split(",") if s.strip()]


def build_rl_config(
    *, file: str | os.PathLike[str] | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> RLConfig:
    """Resolve an ``RLConfig`` from an optional TOML ``file`` and ``--set`` overrides (later wins)."""
    defaults = RLConfig()
    sections = {f.name: getattr(defaults, f.name) for f in dataclasses.fields(defaults)}
    merged: dict[str, dict[str, Any]] = {name: {} for name in sections}
    layers: list[tuple[str, dict[str, Any]]] = []
    if file is not None:
        layers.append((str(file), _read_toml(file)))
    for item in overrides:
        section, key, value = _parse_override(item)
        layers.append((f"--set {item}", {section: {key: value}}))
    for origin, layer in layers:
        for name, values in layer.items():
            if name not in sections:
                raise ConfigError(f"{origin}: unknown section [{name}]; sections are {', '.join(sections)}")
            if not isinstance(values, dict):
                raise ConfigError(f"{origin}: [{name}] must be a table of key = value")
            merged[name].update(values)
    resolved = {}
    for name, default in sections.items():
        hints = typing.get_type_hints(type(default))
        unknown = [k for k in merged[name] if k not in hints]
        if unknown:
            raise ConfigError(f"unknown key {name}.{unknown[0]}; [{name}] keys are {', '.join(hints)}")
        given = {k: _coerce(v, hints[k], f"{name}.{k}") for k, v in merged[name].items()}
        resolved[name] = dataclasses.replace(default, **given)
    config = RLConfig(**resolved)
    validate(config)
    return config


def validate(config: RLConfig) -> None:
    from k2.rl.tasks import BUILTIN_ENVS

    r = config.rl
    positive = {
        "rl.iterations": r.iterations,
        "rl.prompts_per_iteration": r.prompts_per_iteration,
        "rl.samples_per_prompt": r.samples_per_prompt,
        "rl.tau": r.tau,
        "rl.updates_per_iteration": r.updates_per_iteration,
        "rl.max_response_tokens": r.max_response_tokens,
        "rl.ptx_batch_size": r.ptx_batch_size,
        "rl.temperature_start": r.temperature_start,
        "rl.temperature_end": r.temperature_end,
        "rl.max_turns": r.max_turns,
        "rl.max_batch_size": r.max_batch_size,
        "rl.rollout_servers": r.rollout_servers,
        "rl.sync_bucket_mb": r.sync_bucket_mb,
        "train.micro_batch": config.train.micro_batch,
        "train.log_every": config.train.log_every,
        "optim.lr": config.optim.lr,
        "checkpoint.keep_last": config.checkpoint.keep_last,
    }
    for key, value in positive.items():
        if not value > 0:
            raise ConfigError(f"{key} must be > 0, got {value}")
    for key, value in {
        "rl.rollout_budget": r.rollout_budget,
        "rl.max_staleness": r.max_staleness,
        "rl.ptx_weight": r.ptx_weight,
        "rl.length_penalty": r.length_penalty,
        "rl.heldout_problems": r.heldout_problems,
        "train.checkpoint_every": config.train.checkpoint_every,
        "train.threads": config.train.threads,
    }.items():
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    names = config.env_names()
    if not names:
        raise ConfigError("rl.envs: name at least one environment")
    unknown = [n for n in names if n not in BUILTIN_ENVS]
    if unknown:
        raise ConfigError(f"rl.envs: unknown environment {unknown[0]!r}; built-in: {', '.join(BUILTIN_ENVS)}")
    for name in config.budgets():
        if name not in names:
            raise ConfigError(f"rl.token_budgets names {name!r}, which is not in rl.envs ({r.envs})")
    if r.rollout == "servers" and r.rollout_budget > 0:
        raise ConfigError(
            "rl.rollout_budget > 0 (partial rollouts) needs rl.rollout = colocated: a paused request's sampling "
            "state does not travel over HTTP"
        )
    if r.reward and ":" not in r.reward:
        raise ConfigError(f"rl.reward: expected module:function, got {r.reward!r}")


def load_rl_config(run_dir: str | os.PathLike[str], overrides: list[str] | tuple[str, ...] = ()) -> RLConfig:
    """The config saved in ``RUN_DIR/config.toml`` with ``--set`` overrides on top (for ``--resume``)."""
    path = Path(run_dir) / CONFIG_FILE
    if not Path(run_dir).is_dir():
        raise ConfigError(f"--resume: run directory not found: {run_dir}")
    if not path.is_file():
        raise ConfigError(f"--resume: {run_dir} holds no {CONFIG_FILE}; is it a k2 rl run directory?")
    try:
        saved = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read it ({e})") from None
    if "rl" not in saved:
        raise ConfigError(f"--resume: {run_dir} is not a k2 rl run (its config has no [rl] section)")
    return build_rl_config(file=path, overrides=overrides)
