"""``pretrain(config)``: the pre-training loop of Kimi K2 (TR §2.4–2.5) at any scale that fits one device.

One optimizer step:
1. set the WSD learning rate of this step;
2. ``grad_accum`` micro-batches: forward under autocast (bf16 where the device has fast bf16), backward of
   ``loss / grad_accum``; the attention layers keep the running per-head max logit over them, expert loads are
   summed;
3. global gradient norm, clipped to ``optim.grad_clip``; a non-finite loss or norm skips the update (logged;
   ``train.max_skipped_steps`` in a row stop the run with ``TrainingDiverged``);
4. ``optimizer.step()`` — MuonClip applies QK-Clip with the step's max logits right after its update and
   consumes them (any other optimizer: they are reset here) — then the aux-loss-free expert-bias update from the
   step's loads (DeepSeek-V3 / Moonlight sign rule);
5. log; every ``eval.every`` steps the held-out loss; every ``train.checkpoint_every`` steps a checkpoint.

The run is deterministic on a given machine: initialisation from ``train.seed``, the data order from
``data.seed`` and the saved position, and no other randomness, so ``--resume`` from a checkpoint reproduces the
uninterrupted run's losses bit for bit (tested). At the end: a final evaluation and checkpoint, the Hugging Face
export (``RUN_DIR/hf``: safetensors, ``config.json`` and the tokenizer, loadable by ``k2 chat``), PNG plots and
``summary.json``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from k2.data import packing
from k2.errors import ConfigError, K2Error
from k2.model import ModelConfig, Transformer, count_parameters, save_hf
from k2.optim import MuonClip
from k2.train import checkpoint as ckpt
from k2.train.config import CONFIG_FILE, TrainConfig, lr_schedule
from k2.train.data import TrainData, baseline_loss, build_data, eval_sequences
from k2.train.metrics import METRICS_FILE, TENSORBOARD_DIR, MetricsLogger, Progress

SUMMARY_FILE = "summary.json"
HF_DIR = "hf"
PLOTS_DIR = "plots"

# Dense bf16 peak FLOP/s by GPU name fragment, for MFU (datasheet values; first match wins).
_GPU_PEAK_BF16 = (("H200", 989e12), ("H100", 989e12), ("H800", 989e12), ("H20", 148e12), ("A100", 312e12))


class TrainingDiverged(K2Error):
    """Too many consecutive steps had a non-finite loss or gradient."""


def default_run_dir() -> Path:
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device: unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but CUDA is not available")
    return device


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """bf16 for autocast, or None for plain fp32. ``auto``: bf16 on a GPU that supports it; fp32 on CPU, where
    bf16 autocast is ~4× slower on CPUs without AVX512-BF16/AMX (``tools/bench_train.py`` measures it)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None


def build_optimizer(model: Transformer, config: TrainConfig) -> torch.optim.Optimizer:
    o = config.optim
    if o.name == "adamw":
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    return MuonClip.from_model(
        model,
        lr=o.lr,
        weight_decay=o.weight_decay,
        qk_clip_tau=o.qk_clip_tau or None,
        momentum=o.momentum,
        betas=o.betas,
        adamw_eps=o.eps,
    )


def flops_per_token(cfg: ModelConfig, context_len: int) -> float:
    """Training FLOPs per token: 6·(activated parameters without the embedding table) plus causal attention
    (3 passes × 2·H·(d_qk + d_v)·S/2 per layer)."""
    matmul_params = count_parameters(cfg).activated - cfg.vocab_size * cfg.hidden_size
    attention = 3 * cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * context_len
    return 6.0 * matmul_params + attention


def peak_flops(device: torch.device, amp: torch.dtype | None) -> float | None:
    if device.type != "cuda" or amp is None:
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in _GPU_PEAK_BF16 if key in name), None)


@torch.no_grad()
def evaluate(
    model: Transformer, heldout: packing.PackedSequences, *, batch_size: int, num_sequences: int, device, amp
) -> tuple[float, int]:
    """Token-weighted mean cross-entropy over the first ``num_sequences`` held-out sequences, and the token count."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in packing.eval_batches(heldout, batch_size, max_sequences=num_sequences):
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = model.loss(x, y)
        total += float(loss) * y.numel()
        count += y.numel()
    model.train(was_training)
    return total / count, count


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    finite: bool
    max_logit: list[float]  # [L]
    clipped_heads: list[int]  # [L] (MuonClip) or []
    load_imbalance: list[float]  # [n_moe_layers]


def train_step(
    model: Transformer,
    optimizer: torch.optim.Optimizer,
    batches: packing.BatchIterator,
    config: TrainConfig,
    device: torch.device,
    amp: torch.dtype | None,
) -> StepResult:
    """One optimizer step over ``train.grad_accum`` micro-batches (see the module docstring)."""
    accum = config.train.grad_accum
    loss_sum = torch.zeros((), device=device)
    load: torch.Tensor | None = None  # [n_moe_layers, E]
    for _ in range(accum):
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = model.loss(x, y)
        (loss / accum).backward()
        loss_sum += loss.detach().float()
        micro_load = model.expert_load()
        load = micro_load if load is None else load + micro_load
    loss_value = float(loss_sum) / accum
    max_logits = model.max_attention_logits()  # [L, H], running max over the micro-batches

    params = [p for p in model.parameters() if p.grad is not None]
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
    finite = bool(torch.isfinite(grad_norm)) and bool(torch.isfinite(loss_sum))
    if finite and config.optim.grad_clip > 0:
        torch.nn.utils.clip_grads_with_norm_(params, config.optim.grad_clip, grad_norm, foreach=True)

    clipped: list[int] = []
    if finite:
        optimizer.step()
        model.update_expert_bias(config.optim.expert_bias_rate, load)
        qk = getattr(optimizer, "last_qk_clip", None)
        if qk is not None and qk["clipped_heads"].numel():
            clipped = [int(c) for c in qk["clipped_heads"]]
    model.reset_max_attention_logits()  # consumed by this step, clipped or skipped
    optimizer.zero_grad(set_to_none=True)

    imbalance = []
    if load is not None and load.numel():
        load = load.float()
        imbalance = (load.amax(dim=1) / load.mean(dim=1).clamp_min(1e-9)).tolist()
    return StepResult(
        loss=loss_value,
        grad_norm=float(grad_norm),
        finite=finite,
        max_logit=max_logits.amax(dim=1).tolist(),
        clipped_heads=clipped,
        load_imbalance=imbalance,
    )


def _prepare_run_dir(run_dir: Path | None, resume: bool) -> Path:
    if resume:
        if run_dir is None or not (run_dir / CONFIG_FILE).is_file():
            raise ConfigError(f"--resume: {run_dir} is not a k2 pretrain run directory (no {CONFIG_FILE})")
        return run_dir
    run_dir = run_dir or default_run_dir()
    if (run_dir / CONFIG_FILE).exists() or ckpt.list_checkpoints(run_dir):
        raise ConfigError(f"run directory {run_dir} already holds a run; continue it with --resume {run_dir}")
    return run_dir


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def pretrain(
    config: TrainConfig, run_dir: str | os.PathLike[str] | None = None, *, resume: bool = False
) -> dict[str, Any]:
    """Train ``config`` in ``run_dir`` (default ``runs/<timestamp>``) and return the summary (also in
    ``RUN_DIR/summary.json``). ``resume=True`` continues from the run directory's latest checkpoint.

    Everything that can fail on user input (data, model shape, checkpoint) is checked before the run directory
    is written to, so a bad invocation leaves an existing run untouched.
    """
    threads = torch.get_num_threads()
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    try:
        return _pretrain(config, Path(run_dir) if run_dir is not None else None, resume)
    finally:
        torch.set_num_threads(threads)


def _pretrain(config: TrainConfig, run_dir: Path | None, resume: bool) -> dict[str, Any]:
    t_start = time.perf_counter()
    run_dir = _prepare_run_dir(run_dir, resume)
    device = resolve_device(config.train.device)
    amp = autocast_dtype(device, config.train.precision)
    model_cfg = config.model.build()
    schedule = lr_schedule(config)
    data: TrainData = build_data(config.data, vocab_size=model_cfg.vocab_size)
    n_eval = eval_sequences(data.heldout, config.eval.max_sequences)
    baseline = baseline_loss(data.heldout, n_eval)

    torch.manual_seed(config.train.seed)
    model = Transformer(model_cfg).to(device)
    model.train()
    optimizer = build_optimizer(model, config)
    batches = packing.BatchIterator(data.train, config.train.batch_size, seed=config.data.seed)
    state: dict[str, Any] = {
        "step": 0,
        "tokens": 0,
        "skipped": 0,
        "consecutive_skipped": 0,
        "data": batches.state_dict(),
        "schedule": schedule.state_dict(),
    }
    resumed_from = None
    if resume and (latest := ckpt.latest_checkpoint(run_dir)) is not None:
        state = ckpt.load_checkpoint(latest, model, optimizer, state)
        batches.load_state_dict(state["data"])
        resumed_from = latest
    if state["step"] >= config.train.steps:
        raise ConfigError(f"the run in {run_dir} already did {state['step']} steps; raise train.steps to continue")

    # Nothing above wrote to run_dir; from here on the run owns it.
    run_dir.mkdir(parents=True, exist_ok=True)
    config.save(run_dir)
    logger = MetricsLogger(run_dir, start_step=state["step"])
    try:
        summary = _run(config, run_dir, model, optimizer, batches, data, schedule, state, logger, device, amp, n_eval)
    finally:
        logger.close()

    summary.update(
        baseline_loss=baseline,
        wall_s=time.perf_counter() - t_start,
        resumed_from=str(resumed_from) if resumed_from else None,
        run_dir=str(run_dir),
        parameters=count_parameters(model_cfg).total,
        activated_parameters=count_parameters(model_cfg).activated,
        data=data.source,
        device=str(device),
        precision="bf16" if amp is not None else "fp32",
    )
    _write_json(run_dir / SUMMARY_FILE, summary)  # the plots read the baseline from it
    summary["files"] = _finish(config, run_dir, model, data)
    _write_json(run_dir / SUMMARY_FILE, summary)
    return summary


def _run(
    config: TrainConfig,
    run_dir: Path,
    model: Transformer,
    optimizer: torch.optim.Optimizer,
    batches: packing.BatchIterator,
    data: TrainData,
    schedule,
    state: dict[str, Any],
    logger: MetricsLogger,
    device: torch.device,
    amp: torch.dtype | None,
    n_eval: int,
) -> dict[str, Any]:
    t, total = config.train, config.train.steps
    tokens_per_step = t.batch_size * t.grad_accum * config.data.context_len
    fpt, peak = flops_per_token(model.config, config.data.context_len), peak_flops(device, amp)
    meta = {"model_config": model.config.to_dict()}
    progress = Progress(total=total, initial=state["step"], log_every=t.log_every)
    step_s_avg, eval_loss, last_loss, run_tokens, run_s = None, None, None, 0, 0.0

    def trainer_state() -> dict[str, Any]:
        return {**state, "data": batches.state_dict(), "schedule": schedule.state_dict()}

    try:
        while state["step"] < total:
            t0 = time.perf_counter()
            lr = schedule(state["step"])
            for group in optimizer.param_groups:
                group["lr"] = lr
            r = train_step(model, optimizer, batches, config, device, amp)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            step_s = time.perf_counter() - t0
            state["step"] += 1
            state["tokens"] += tokens_per_step
            step = state["step"]
            run_tokens, run_s = run_tokens + tokens_per_step, run_s + step_s
            step_s_avg = step_s if step_s_avg is None else 0.9 * step_s_avg + 0.1 * step_s
            record: dict[str, Any] = {
                "kind": "train",
                "step": step,
                "loss": r.loss,
                "lr": lr,
                "grad_norm": r.grad_norm,
                "tokens": state["tokens"],
                "tokens_per_s": tokens_per_step / step_s,
                "step_s": step_s,
                "skipped": not r.finite,
                "max_logit": r.max_logit,
                "clipped_heads": r.clipped_heads,
                "load_imbalance": r.load_imbalance,
                "load_imbalance_max": max(r.load_imbalance, default=None),
            }
            if peak is not None:
                record["mfu"] = fpt * tokens_per_step / step_s / peak
            logger.log(record)

            if r.finite:
                state["consecutive_skipped"] = 0
                last_loss = r.loss
            else:
                state["skipped"] += 1
                state["consecutive_skipped"] += 1
                progress.write(f"step {step}: non-finite loss {r.loss} or grad norm {r.grad_norm}; update skipped")
                if state["consecutive_skipped"] >= t.max_skipped_steps:
                    last = ckpt.latest_checkpoint(run_dir)
                    raise TrainingDiverged(
                        f"training stopped at step {step}: {state['consecutive_skipped']} consecutive steps had a "
                        f"non-finite loss or gradient (train.max_skipped_steps={t.max_skipped_steps}); lower "
                        f"optim.lr or raise optim.grad_clip; last good checkpoint: {last or 'none'}"
                    )
            progress.update(
                step,
                loss=r.loss if r.finite else None,
                tokens_per_s=tokens_per_step / step_s_avg,
                eta_s=(total - step) * step_s_avg,
                extra=f", eval {eval_loss:.4f}" if eval_loss is not None else "",
            )

            if (config.eval.every and step % config.eval.every == 0) or step == total:
                eval_loss, eval_tokens = evaluate(
                    model, data.heldout, batch_size=config.eval.batch_size, num_sequences=n_eval, device=device, amp=amp
                )
                logger.log({"kind": "eval", "step": step, "eval_loss": eval_loss, "eval_tokens": eval_tokens})
            periodic = t.checkpoint_every and step % t.checkpoint_every == 0
            if (periodic and not state["consecutive_skipped"]) or step == total:  # not in the middle of a bad streak
                ckpt.save_checkpoint(
                    run_dir, step, model, optimizer, trainer_state(), keep_last=config.checkpoint.keep_last, meta=meta
                )
    finally:
        progress.close()
    return {
        "eval_loss": eval_loss,
        "train_loss": last_loss,
        "steps": state["step"],
        "tokens": state["tokens"],
        "skipped_steps": state["skipped"],
        "tokens_per_s": run_tokens / run_s if run_s else None,
    }


def _finish(config: TrainConfig, run_dir: Path, model: nn.Module, data: TrainData) -> dict[str, Any]:
    """Export, plots; returns where everything is."""
    from k2.train.plot import plot_run

    files: dict[str, Any] = {
        "config": str(run_dir / CONFIG_FILE),
        "metrics": str(run_dir / METRICS_FILE),
        "tensorboard": str(run_dir / TENSORBOARD_DIR),
        "checkpoint": str(ckpt.latest_checkpoint(run_dir)),
        "summary": str(run_dir / SUMMARY_FILE),
    }
    if config.checkpoint.export_hf:
        hf_dir = run_dir / HF_DIR
        dtype = torch.bfloat16 if config.checkpoint.hf_dtype == "bfloat16" else torch.float32
        save_hf(model, hf_dir, dtype=dtype)
        data.tokenizer.save(hf_dir)
        files["hf"] = str(hf_dir)
    files["plots"] = [str(p) for p in plot_run(run_dir, run_dir / PLOTS_DIR)]
    return files
