"""``train(config)``: the RL loop of Kimi K2 (arXiv 2507.20534 §3.2) with the objective of Kimi K1.5 (arXiv
2501.12599 §2.3), at any scale that fits one device.

One iteration i:
1. temperature of iteration i (``rl.temperature_*``: starts high for exploration, decays); if
   ``rl.reset_optimizer``, a fresh optimizer state (K1.5 resets it every iteration);
2. rollout on the engine's copy of the policy: the replay buffer's groups still fresh enough (paused or waiting for
   their group, ``k2.rl.rollout``) plus ``rl.prompts_per_iteration`` new prompts × ``rl.samples_per_prompt``
   episodes, at most ``rl.rollout_budget`` generated tokens (0: until all end); per-episode token budgets
   (``rl.token_budgets``, ``rl.max_response_tokens``): an episode cut by its budget gets
   ``rl.truncation_penalty`` as its reward; optional K1.5 length reward (``rl.length_penalty``);
3. the complete groups are trained on: the trainer recomputes the log-probs of the exact sampled ids (the
   engine's vs the trainer's, max and mean |Δ| over this iteration's tokens, is logged), then
   ``rl.updates_per_iteration`` MuonClip steps on ``k15_loss`` (π_old = the engine's per-token log-probs of
   whichever policy sampled each part) plus ``rl.ptx_weight`` × the PTX loss on curated chat data;
4. weight sync into the engine: ``rl.rollout = "colocated"`` (default): a k2 ``Engine`` in this process with its own
   copy of the model, refreshed by ``k2.rl.weight_sync.ColocatedSync`` (no full-model temporary); ``"servers"``:
   ``rl.rollout_servers`` ``k2 serve`` processes on loopback (``k2.rl.remote``), sampled through ``/v1/completions``
   with token ids in and out, and refreshed by a bucketed broadcast (``BroadcastSender``) that each server loads
   with its engine paused; the same episode logic (``k2.rl.rollout``) drives both;
5. metrics; a checkpoint every ``train.checkpoint_every`` iterations (model, optimizer, replay buffer, counters;
   every random draw is seeded from ``rl.seed`` and the iteration, so ``--resume`` continues exactly).

Before the first and after the last iteration the held-out problems are answered greedily: the held-out accuracy
before and after. ``summary.json`` holds the mean reward of the first and the last fifth of the iterations.

Deviations: the learning rate is constant (``optim.lr``; no schedule over iterations); the aux-loss-free expert
bias is not updated during RL (the router bias of the starting checkpoint is kept).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import random
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from k2.data import chat, toolgen
from k2.errors import ConfigError
from k2.infer.engine import Engine
from k2.infer.loading import load_checkpoint
from k2.rl import rollout as R
from k2.rl.config import CONFIG_FILE, RLConfig
from k2.rl.env import RewardFn
from k2.rl.loss import k15_loss, length_penalty, sequence_logprobs, token_logprobs
from k2.rl.tasks import builtin_env
from k2.rl.weight_sync import ColocatedSync
from k2.train import checkpoint as ckpt
from k2.train.loop import HF_DIR, autocast_dtype, build_optimizer, default_run_dir, export_hf, resolve_device
from k2.train.metrics import METRICS_FILE, MetricsLogger, Progress

SUMMARY_FILE = "summary.json"
SERVERS_DIR = "servers"  # rollout servers' logs and port files
MAX_SEQ_LEN = 4096  # tokens per episode context (at most the model's max_position_embeddings)


# ---- the starting checkpoint ----------------------------------------------------------------------------------


def latest_export(runs: str | os.PathLike[str] = "runs") -> Path | None:
    """The ``hf/`` export of the newest k2 sft run in ``runs``, else of the newest k2 pretrain run (newest by the
    export's time); RL runs are skipped."""
    found: dict[str, list[tuple[float, Path]]] = {"sft": [], "pretrain": []}
    for run in Path(runs).glob("*"):
        hf, cfg = run / HF_DIR / "config.json", run / CONFIG_FILE
        if not (hf.is_file() and cfg.is_file()):
            continue
        text = cfg.read_text(errors="replace")
        if "[rl]" in text:
            continue
        kind = "pretrain" if "preset =" in text else "sft"
        found[kind].append((hf.stat().st_mtime, run / HF_DIR))
    for kind in ("sft", "pretrain"):
        if found[kind]:
            return max(found[kind])[1]
    return None


def resolve_model_path(config: RLConfig) -> Path:
    if config.model.path:
        return Path(config.model.path)
    path = latest_export()
    if path is None:
        raise ConfigError(
            "no model to start from: runs/ holds no k2 sft or k2 pretrain export; run `k2 pretrain && "
            "k2 sft` first or pass --from DIR"
        )
    return path


def load_reward(spec: str) -> RewardFn | None:
    """``"module:function"`` → the callable (``None`` for ""); ``ConfigError`` if it cannot be imported."""
    if not spec:
        return None
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"rl.reward: cannot import {spec!r} ({e})") from None
    if not callable(fn):
        raise ConfigError(f"rl.reward: {spec!r} is not callable")
    return fn


# ---- schedules and data ---------------------------------------------------------------------------------------


def temperature(config: RLConfig, iteration: int) -> float:
    """The sampling temperature of ``iteration``: from ``temperature_start`` to ``temperature_end`` over the run."""
    r = config.rl
    x = iteration / max(1, r.iterations - 1)
    if r.temperature_decay == "constant":
        return r.temperature_start
    if r.temperature_decay == "linear":
        f = 1 - x
    elif r.temperature_decay == "cosine":
        f = 0.5 * (1 + math.cos(math.pi * x))
    else:  # exponential: geometric interpolation
        return r.temperature_start * (r.temperature_end / r.temperature_start) ** x
    return r.temperature_end + (r.temperature_start - r.temperature_end) * f


def ptx_rows(config: RLConfig, tokenizer, max_len: int) -> list[tuple[list[int], list[int]]]:
    """The PTX data as (ids, loss mask) rows: ``rl.ptx_data`` chat records, or 512 built-in dialogues that declare
    tools (PTX guards the tool-use skills; the tool-free arithmetic is left out, since it is the default RL task)."""
    if config.rl.ptx_weight == 0:
        return []
    if config.rl.ptx_data:
        from k2.data.sft import read_records

        records = [(r.messages, r.tools) for r in read_records(config.rl.ptx_data)]
    else:
        dialogues = toolgen.generate(4096, seed=config.rl.seed + 1)  # ~13 % declare tools
        records = [(d["messages"], d["tools"]) for d in dialogues if d["tools"]][:512]
    rows = []
    for messages, tools in records:
        ids, mask = chat.render(messages, tokenizer, tools=tools or None)
        if 1 < len(ids) <= max_len and any(mask):
            rows.append((ids, mask))
    if not rows:
        raise ConfigError(f"rl.ptx_data: no conversation of at most {max_len} tokens with an assistant turn")
    return rows


def _pad(rows: list[list[int]], value: int, device) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], device=device)


# ---- evaluation -----------------------------------------------------------------------------------------------


def heldout_accuracy(engine: R.RolloutEngine, make_env, problems: int, seed: int, config: RLConfig, stop_ids) -> float:
    """Greedy episodes on ``problems`` held-out problems; the fraction with reward 1."""
    if problems == 0:
        return float("nan")
    trajs, envs = [], {}
    for i in range(problems):
        name, env = make_env(i, heldout=True)
        t = R.start(env, name=name, group=i, seed=R.derive_seed(seed, "heldout", i), sample_seed=i)
        trajs.append(t)
        envs[id(t)] = env
    budgets = config.budgets()
    R.rollout(
        engine,
        trajs,
        envs,
        version=-1,
        temperature=0.0,
        stop_token_ids=stop_ids,
        max_response_tokens=lambda t: budgets.get(t.env, config.rl.max_response_tokens),
    )
    return sum(float(t.reward == 1.0 and t.terminated) for t in trajs) / problems


# ---- the loop -------------------------------------------------------------------------------------------------


def train(
    config: RLConfig,
    run_dir: str | os.PathLike[str] | None = None,
    *,
    resume: bool = False,
    reward: RewardFn | None = None,
) -> dict[str, Any]:
    """Run ``config`` in ``run_dir`` (default ``runs/<timestamp>``) and return the summary (also in
    ``RUN_DIR/summary.json``). ``reward``: any callable of the ``k2.rl.rewards`` contract, instead of
    ``rl.reward`` / the built-in exact-answer reward. ``resume=True`` continues from the latest checkpoint."""
    threads = torch.get_num_threads()
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    try:
        return _train(config, Path(run_dir) if run_dir is not None else None, resume, reward)
    finally:
        torch.set_num_threads(threads)


def _train(config: RLConfig, run_dir: Path | None, resume: bool, reward: RewardFn | None) -> dict[str, Any]:
    t_start = time.perf_counter()
    r = config.rl
    if resume:
        if run_dir is None or not (run_dir / CONFIG_FILE).is_file():
            raise ConfigError(f"--resume: {run_dir} is not a k2 rl run directory (no {CONFIG_FILE})")
    else:
        run_dir = run_dir or default_run_dir()
        if (run_dir / CONFIG_FILE).exists() or ckpt.list_checkpoints(run_dir):
            raise ConfigError(f"run directory {run_dir} already holds a run; continue it with --resume {run_dir}")
    model_path = resolve_model_path(config)
    config = type(config)(
        **{
            **{f: getattr(config, f) for f in ("rl", "optim", "train", "checkpoint")},
            "model": type(config.model)(path=str(model_path)),
        }
    )
    device = resolve_device(config.train.device)
    amp = autocast_dtype(device, config.train.precision)
    reward_fn = reward or load_reward(r.reward)
    model, tok = load_checkpoint(model_path, device=str(device))
    model.train()
    optimizer = build_optimizer(model, config)  # type: ignore[arg-type]  # reads config.optim only
    max_seq_len = min(MAX_SEQ_LEN, model.config.max_position_embeddings)
    stop_ids = chat.stop_token_ids(tok)
    names = config.env_names()
    budgets = config.budgets()

    def make_env(index: int, *, heldout: bool = False, name: str | None = None):
        name = name or names[index % len(names)]
        return name, builtin_env(name, tok, reward=reward_fn, heldout=heldout, max_turns=r.max_turns)

    ptx = ptx_rows(config, tok, max_seq_len)
    buffer = R.ReplayBuffer(r.samples_per_prompt, r.max_staleness)
    state: dict[str, Any] = {"iteration": 0, "next_group": 0, "replay": "[]", "history": "[]", "before": "null"}
    if resume and (latest := ckpt.latest_checkpoint(run_dir)) is not None:
        state = ckpt.load_checkpoint(latest, model, optimizer, state)
        buffer.load_state_dict(json.loads(state["replay"]))
    if state["iteration"] >= r.iterations:
        raise ConfigError(f"the run in {run_dir} already did {state['iteration']} iterations; raise rl.iterations")
    run_dir.mkdir(parents=True, exist_ok=True)
    with _rollout_engine(config, model_path, model, device, max_seq_len, run_dir) as (engine, sync):
        sync.sync()  # the engine starts from the trainer's weights (the latest checkpoint's on --resume)
        history: list[dict[str, float]] = json.loads(state["history"])
        before = json.loads(state["before"])
        if before is None:
            before = heldout_accuracy(engine, make_env, r.heldout_problems, r.seed, config, stop_ids)

        config.save(run_dir)
        logger = MetricsLogger(run_dir, start_step=state["iteration"])
        progress = Progress(total=r.iterations, initial=state["iteration"], log_every=config.train.log_every)
        if state["iteration"] == 0:
            logger.log({"kind": "eval", "step": 0, "heldout_accuracy": before})
        try:
            while state["iteration"] < r.iterations:
                it = state["iteration"]
                record = _iteration(
                    config,
                    it,
                    state,
                    model,
                    optimizer,
                    engine,
                    sync,
                    buffer,
                    make_env,
                    ptx,
                    stop_ids,
                    budgets,
                    device,
                    amp,
                )
                state["iteration"] = it + 1
                history.append({"reward": record["reward_mean"]})
                logger.log(record)
                progress.update(
                    it + 1,
                    loss=record["loss"],
                    tokens_per_s=record["rollout_tokens_per_s"],
                    eta_s=record["iteration_s"] * (r.iterations - it - 1),
                    extra=f", reward {record['reward_mean']:.3f}, T {record['temperature']:.2f}",
                )
                every = config.train.checkpoint_every
                if (every and (it + 1) % every == 0) or it + 1 == r.iterations:
                    state.update(
                        replay=json.dumps(buffer.state_dict()), history=json.dumps(history), before=json.dumps(before)
                    )
                    ckpt.save_checkpoint(
                        run_dir, it + 1, model, optimizer, dict(state), keep_last=config.checkpoint.keep_last
                    )
            after = heldout_accuracy(engine, make_env, r.heldout_problems, r.seed, config, stop_ids)
            logger.log({"kind": "eval", "step": r.iterations, "heldout_accuracy": after})
        finally:
            progress.close()
            logger.close()

    fifth = max(1, len(history) // 5)
    rewards = [h["reward"] for h in history]
    summary: dict[str, Any] = {
        "reward_first_fifth": sum(rewards[:fifth]) / fifth,
        "reward_last_fifth": sum(rewards[-fifth:]) / fifth,
        "heldout_accuracy_before": before,
        "heldout_accuracy_after": after,
        "heldout_problems": r.heldout_problems,
        "iterations": state["iteration"],
        "from": str(model_path),
        "envs": names,
        "wall_s": time.perf_counter() - t_start,
        "run_dir": str(run_dir),
        "device": str(device),
    }
    summary["files"] = _finish(config, run_dir, model, tok)
    _write_json(run_dir / SUMMARY_FILE, summary)
    return summary


@contextlib.contextmanager
def _rollout_engine(
    config: RLConfig, model_path: Path, model, device, max_seq_len: int, run_dir: Path
) -> Iterator[tuple[R.RolloutEngine, Any]]:
    """``(engine, sync)`` of ``rl.rollout``: a k2 ``Engine`` on a second copy of the model with ``ColocatedSync``,
    or ``rl.rollout_servers`` ``k2 serve`` processes (``RolloutServers``, stopped on exit, also on errors)."""
    r = config.rl
    if r.rollout == "colocated":
        engine_model, tok = load_checkpoint(model_path, device=str(device))
        engine = Engine(engine_model, tok, max_batch_size=r.max_batch_size, max_seq_len=max_seq_len)
        yield engine, ColocatedSync(model, engine_model, bucket_bytes=r.sync_bucket_mb << 20)
        return
    from k2.rl.remote import RolloutServers

    with RolloutServers(
        model_path,
        model,
        r.rollout_servers,
        run_dir / SERVERS_DIR,
        device=str(device),
        threads=max(1, config.train.threads),
        max_batch_size=r.max_batch_size,
        max_seq_len=max_seq_len,
        bucket_bytes=r.sync_bucket_mb << 20,
    ) as servers:
        yield servers.engine, servers


def _iteration(
    config, it, state, model, optimizer, engine, sync, buffer, make_env, ptx, stop_ids, budgets, device, amp
) -> dict[str, Any]:
    r, k = config.rl, config.rl.samples_per_prompt
    t0 = time.perf_counter()
    temp = temperature(config, it)
    if r.reset_optimizer:
        optimizer.state = defaultdict(dict)

    # ---- rollout
    resumed, dropped = buffer.take(it)
    trajs, envs = list(resumed), {}
    for t in resumed:
        _, env = make_env(0, name=t.env)
        R.rebuild_env(env, t)
        envs[id(t)] = env
    for p in range(r.prompts_per_iteration):
        group = state["next_group"] + p
        name, _ = make_env(group)
        seed = R.derive_seed(r.seed, "prompt", group)
        for s in range(k):
            _, env = make_env(group, name=name)
            t = R.start(env, name=name, group=group, seed=seed, sample_seed=R.derive_seed(r.seed, group, s))
            trajs.append(t)
            envs[id(t)] = env
    state["next_group"] += r.prompts_per_iteration
    stats = R.rollout(
        engine,
        trajs,
        envs,
        version=it,
        temperature=temp,
        stop_token_ids=stop_ids,
        max_response_tokens=lambda t: budgets.get(t.env, r.max_response_tokens),
        budget=r.rollout_budget or None,
    )
    groups = buffer.split(trajs)
    batch = [t for g in groups for t in g]
    rewards = torch.tensor(
        [r.truncation_penalty if t.truncated else float(t.reward or 0.0) for t in batch], dtype=torch.float32
    )
    lengths = torch.tensor([t.num_actions for t in batch])
    if r.length_penalty and batch:
        correct = torch.tensor([float(t.reward or 0.0) > 0 and not t.truncated for t in batch])
        rewards = rewards + r.length_penalty * length_penalty(lengths, correct, k)
    record: dict[str, Any] = {
        "kind": "train",
        "step": it + 1,
        "temperature": temp,
        "lr": config.optim.lr,
        "groups_trained": len(groups),
        "paused": stats.paused,
        "dropped_stale": dropped,
        "buffered": len(buffer),
        "finished_fraction": sum(t.terminated for t in batch) / max(1, len(batch)),
        "truncated_fraction": sum(t.truncated for t in batch) / max(1, len(batch)),
        "response_length": float(lengths.float().mean()) if batch else None,
        "rollout_tokens": stats.generated_tokens,
        "rollout_tokens_per_s": stats.tokens_per_s,
        "reward_mean": float(rewards.mean()) if batch else None,
        "reward_std": float(rewards.std()) if len(batch) > 1 else None,
    }
    for name in sorted({t.env for t in batch}):
        env_r = rewards[[i for i, t in enumerate(batch) if t.env == name]]
        record[f"reward_{name}"] = float(env_r.mean())
        record[f"reward_std_{name}"] = float(env_r.std()) if env_r.numel() > 1 else 0.0

    # ---- train
    t1 = time.perf_counter()
    record.update(_update(config, it, model, optimizer, batch, rewards, ptx, device, amp))
    record["train_tokens_per_s"] = (
        sum(len(t.token_ids) for t in batch) * r.updates_per_iteration / max(1e-9, time.perf_counter() - t1)
    )
    sync.sync()
    record["iteration_s"] = time.perf_counter() - t0
    if record["reward_mean"] is None:  # nothing finished this iteration: carry the curve (rare; logged as such)
        record["reward_mean"] = float("nan")
    return record


def _update(config, it, model, optimizer, batch, rewards, ptx, device, amp) -> dict[str, Any]:
    """Mismatch check, then ``rl.updates_per_iteration`` optimizer steps on the K1.5 + PTX loss."""
    r, k = config.rl, config.rl.samples_per_prompt
    if not batch:
        return {"loss": None, "k15_loss": None, "ptx_loss": None, "grad_norm": None}
    rows = [t.token_ids for t in batch]
    mask = _pad([t.mask for t in batch], 0, device).float()  # [N, S]
    engine_lp = _pad([t.logprobs for t in batch], 0.0, device).float()  # [N, S]
    current = _pad([[int(v == it) for v in t.versions] for t in batch], 0, device).bool()
    ids = _pad(rows, 0, device)  # [N, S]
    logp_old = sequence_logprobs(engine_lp, mask)  # [N]: each part under the policy that sampled it
    micro = max(1, config.train.micro_batch // k) * k  # whole groups per micro-batch
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        recomputed = torch.cat([token_logprobs(model, ids[i : i + micro]) for i in range(0, len(rows), micro)])
    model.train()
    delta = (recomputed - engine_lp).abs()[current]
    out: dict[str, Any] = {
        "mismatch_max": float(delta.max()) if delta.numel() else 0.0,
        "mismatch_mean": float(delta.mean()) if delta.numel() else 0.0,
    }
    rewards = rewards.to(device)
    losses, ptx_losses, norms, ratios = [], [], [], []
    for u in range(r.updates_per_iteration):
        total = torch.zeros((), device=device)
        for i in range(0, len(rows), micro):
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                logp = sequence_logprobs(token_logprobs(model, ids[i : i + micro]), mask[i : i + micro])
            part = k15_loss(logp, logp_old[i : i + micro], rewards[i : i + micro], k, r.tau)
            (part * (logp.numel() / len(rows))).backward()
            total += part.detach() * (logp.numel() / len(rows))
            ratios.append((logp.detach() - logp_old[i : i + micro]).float())
        if ptx:
            rng = random.Random(R.derive_seed(r.seed, "ptx", it, u))
            chosen = [ptx[j] for j in rng.sample(range(len(ptx)), min(r.ptx_batch_size, len(ptx)))]
            x = _pad([c[0][:-1] for c in chosen], 0, device)
            y = _pad(
                [[t if m else -100 for t, m in zip(c[0][1:], c[1][1:], strict=True)] for c in chosen], -100, device
            )
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                p_loss = model.loss(x, y)
            (r.ptx_weight * p_loss).backward()
            ptx_losses.append(float(p_loss.detach()))
        params = [p for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if torch.isfinite(norm):
            if config.optim.grad_clip > 0:
                torch.nn.utils.clip_grads_with_norm_(params, config.optim.grad_clip, norm)
            for group in optimizer.param_groups:
                group["lr"] = config.optim.lr
            optimizer.step()
        model.reset_max_attention_logits()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(total))
        norms.append(float(norm))
    ratio = torch.cat(ratios)
    out.update(
        loss=sum(losses) / len(losses),
        k15_loss=losses[0],
        ptx_loss=sum(ptx_losses) / len(ptx_losses) if ptx_losses else None,
        grad_norm=sum(norms) / len(norms),
        log_ratio_mean=float(ratio.mean()),
        log_ratio_abs_max=float(ratio.abs().max()),
    )
    return out


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _finish(config: RLConfig, run_dir: Path, model, tokenizer) -> dict[str, Any]:
    from k2.rl.plot import plot_rl

    files: dict[str, Any] = {
        "config": str(run_dir / CONFIG_FILE),
        "metrics": str(run_dir / METRICS_FILE),
        "checkpoint": str(ckpt.latest_checkpoint(run_dir)),
        "summary": str(run_dir / SUMMARY_FILE),
    }
    if config.checkpoint.export_hf:
        files["hf"] = str(export_hf(config.checkpoint, run_dir, model, tokenizer))
    files["plots"] = [str(p) for p in plot_rl(run_dir)]
    return files
