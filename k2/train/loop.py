"""The trainer shared by pre-training and SFT, and ``pretrain(config)``: the pre-training loop of Kimi K2 (TR
§2.4–2.5) at any scale that fits one device.

A front end (``pretrain`` here, ``k2.train.sft.sft``) builds a ``Job`` (model, optimizer, schedule, batches, how
to evaluate, count tokens and export) and hands it to ``run_job``, which owns everything else: device and process
group, the run directory, resume, the loop below, metrics, checkpoints, the Hugging Face export, plots and
``summary.json``. A batch is ``(input_ids, labels)`` or, for packed documents, ``(input_ids, labels, {"positions",
"cu_seqlens"})``, passed on to ``Transformer.loss``; labels of -100 are not scored.

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
uninterrupted run's losses bit for bit (tested). Under torchrun (``[parallel]``) each rank trains its slice of the
global batch; with ``ep > 1`` the MoE experts are split over the expert-parallel group (``k2.parallel.expert``),
expert gradients are summed over the expert-replica group and divided by dp, and the clipping norm adds the EP
ranks' expert norms² to the replicated dense norm². With ``pp > 1`` (``pretrain`` only) the model is cut into
``k2.parallel.pipeline`` stages: ``pipeline_step`` replaces steps 2–4 (the schedule's micro-batches replace
``grad_accum``), the held-out loss runs through the stages in turn, each rank checkpoints its stages under the full
model's names (so a run resumes at any pp), and rank 0 gathers the stages for the export. At the end: a final
evaluation and checkpoint, the Hugging Face export (``RUN_DIR/hf``: safetensors, ``config.json`` and the tokenizer,
loadable by ``k2 chat``), PNG plots and ``summary.json``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from k2.data import packing
from k2.data.sft import IGNORE_INDEX, SFTRows
from k2.data.tokenizer import Tokenizer
from k2.errors import ConfigError, K2Error
from k2.model import ModelConfig, Transformer, count_parameters, save_hf
from k2.optim import MuonClip
from k2.optim.qk_clip import find_attention
from k2.parallel import ParallelState, init_parallel, local_rank_from_env, world_size_from_env
from k2.parallel import data_parallel as dpar
from k2.parallel.activations import apply_activation_memory
from k2.parallel.expert import apply_expert_parallel, gathered_experts, split_expert_parameters
from k2.train import checkpoint as ckpt
from k2.train.config import CONFIG_FILE, RunConfig, SFTConfig, TrainConfig, lr_schedule, validate_parallel
from k2.train.data import TrainData, baseline_loss, build_data, eval_sequences
from k2.train.metrics import METRICS_FILE, TENSORBOARD_DIR, MetricsLogger, Progress

if TYPE_CHECKING:  # imported where used: torch.distributed.pipelining takes ~0.4 s to import
    from k2.parallel.pipeline import Pipeline

SUMMARY_FILE = "summary.json"
HF_DIR = "hf"
PLOTS_DIR = "plots"

# Dense bf16 peak FLOP/s by GPU name fragment, for MFU (datasheet values; first match wins).
_GPU_PEAK_BF16 = (("H200", 989e12), ("H100", 989e12), ("H800", 989e12), ("H20", 148e12), ("A100", 312e12))


class TrainingDiverged(K2Error):
    """Too many consecutive steps had a non-finite loss or gradient."""


def default_run_dir(suffix: str = "") -> Path:
    return Path("runs") / (datetime.now().strftime("%Y%m%d-%H%M%S") + suffix)


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """``train.device`` as a device; under torchrun (``local_rank`` given) "auto"/"cuda" mean ``cuda:LOCAL_RANK``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device: unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but CUDA is not available")
    if device.type == "cuda" and device.index is None and local_rank is not None:
        device = torch.device("cuda", local_rank)
    return device


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """bf16 for autocast, or None for plain fp32. ``auto``: bf16 on a GPU that supports it; fp32 on CPU, where
    bf16 autocast is ~4× slower on CPUs without AVX512-BF16/AMX (``tools/bench_train.py`` measures it)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None


def build_optimizer(model: nn.Module, config: RunConfig, par: ParallelState | None = None) -> torch.optim.Optimizer:
    """AdamW (replicated over dp) or MuonClip, ZeRO-1 over the dp group and, for expert-parallel stacks, over the
    expert-replica group (the ranks holding the same experts); gradients arrive reduced (``train_step``), so
    MuonClip does not reduce them again. The parameter groups are the same with or without parallelism (dense,
    then experts), so a checkpoint loads at any layout. ``model``: a ``Transformer``, or a pipeline rank's stages
    (``Pipeline.local``)."""
    o = config.optim
    if o.name == "adamw":
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    par = par or ParallelState()
    dense, experts = split_expert_parameters(model)
    groups: list[dict[str, Any]] = [{"params": dense}]
    if experts:
        groups.append({"params": experts, "process_group": par.expert_replica_group if par.ep > 1 else par.dp_group})
    return MuonClip(
        groups,
        attention=find_attention(model),
        lr=o.lr,
        weight_decay=o.weight_decay,
        qk_clip_tau=o.qk_clip_tau or None,
        momentum=o.momentum,
        betas=o.betas,
        adamw_eps=o.eps,
        process_group=par.dp_group,
        reduce_gradients=False,
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
    model: Transformer,
    heldout: packing.PackedSequences | SFTRows,
    *,
    batch_size: int,
    num_sequences: int,
    device,
    amp,
    par: ParallelState | None = None,
    pipeline: Pipeline | None = None,
) -> tuple[float, int]:
    """Token-weighted mean cross-entropy over the first ``num_sequences`` held-out sequences (``heldout`` is
    ``PackedSequences`` or anything with the same ``batch``: SFT rows), and the count of scored (label != -100)
    tokens. Data parallel: rank r scores batches r, r+dp, ...; the sums are all-reduced (fp64). Pipeline parallel:
    each batch goes through ``pipeline.eval_loss`` (the stages in turn), whose loss every pipeline rank gets."""
    par = par or ParallelState()
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    batches = list(packing.eval_batches(heldout, batch_size, max_sequences=num_sequences))
    for first in range(0, len(batches), par.dp):  # rounds of dp batches
        i = first + par.dp_rank
        if i >= len(batches) and par.ep_group is None:
            break
        # Expert parallelism: the exchange is collective, so a rank without a batch in the last round runs the
        # round's first one and discards it.
        x, y, layout = _to_device(batches[i if i < len(batches) else first], device)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = pipeline.eval_loss(x, y) if pipeline is not None else model.loss(x, y, **layout)
        if i < len(batches):
            n = int((y != IGNORE_INDEX).sum())
            total += float(loss) * n
            count += n
    model.train(was_training)
    if par.dp_group is not None:
        sums = dpar.all_reduce(torch.tensor([total, count], dtype=torch.float64, device=device), par.dp_group)
        total, count = float(sums[0]), int(sums[1])
    return total / count, count


def _to_device(batch: tuple[Any, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """``(input_ids, labels)`` or ``(input_ids, labels, layout)`` (packed documents: ``positions``, ``cu_seqlens``)
    → the tensors on ``device`` and the keyword arguments of ``Transformer.loss``."""
    x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
    layout = {k: v.to(device, non_blocking=True) for k, v in batch[2].items()} if len(batch) > 2 else {}
    return x, y, layout


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
    config: RunConfig,
    device: torch.device,
    amp: torch.dtype | None,
    par: ParallelState | None = None,
) -> StepResult:
    """One optimizer step over ``train.grad_accum`` micro-batches (see the module docstring). Data parallel: this
    rank's rows of each global micro-batch; loss, gradients, loads and max logits are then those of the global
    batch on every rank."""
    par = par or ParallelState()
    accum = config.train.grad_accum
    rows = dpar.batch_rows(config.train.batch_size, par)
    loss_sum = torch.zeros((), device=device)
    load: torch.Tensor | None = None  # [n_moe_layers, E]
    for _ in range(accum):
        batch = next(batches) if par.dp == 1 else batches.data.batch(batches.next_indices()[rows])
        x, y, layout = _to_device(batch, device)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = model.loss(x, y, **layout)
        (loss / accum).backward()
        loss_sum += loss.detach().float()
        micro_load = model.expert_load()
        load = micro_load if load is None else load + micro_load
    max_logits = model.max_attention_logits()  # [L, H], running max over the micro-batches
    dense, experts = ([p for _, p in named] for named in split_expert_parameters(model))
    if par.dp_group is not None:
        loss_sum = dpar.all_reduce(loss_sum, par.dp_group) / par.dp  # mean of equal-sized slices' means
        load = dpar.all_reduce(load, par.dp_group) if load is not None else None
        max_logits = dpar.all_reduce(max_logits, par.dp_group, op="max")  # MuonClip reduces its own copy too
        dpar.average_gradients(dense, par.dp_group)
        # Expert gradients already sum their EP group's slices: sum over the replicas, divide by dp.
        dpar.average_gradients(experts, par.expert_replica_group, divisor=par.dp)
    loss_value = float(loss_sum) / accum

    params = [p for p in model.parameters() if p.grad is not None]
    if par.ep_group is None:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
    else:
        grad_norm = dpar.global_grad_norm([p.grad for p in dense], [p.grad for p in experts], par.ep_group)
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


def pipeline_step(
    pipe: Pipeline,
    optimizer: torch.optim.Optimizer,
    batches: packing.BatchIterator,
    config: RunConfig,
    device: torch.device,
    amp: torch.dtype | None,
    par: ParallelState,
) -> StepResult:
    """``train_step`` under pipeline parallelism (``parallel.pp > 1``, ``train.grad_accum = 1``): this rank's rows of
    the global batch go through ``Pipeline.step`` (the schedule splits them into ``parallel.pp_microbatches`` and
    accumulates), then ``clip_and_step`` (dp average, global norm over the stages, optimizer per stage, expert bias per
    stage). The loss is the global batch's mean on every rank."""
    from k2.parallel.pipeline import clip_and_step

    rows = dpar.batch_rows(config.train.batch_size, par)
    batch = next(batches) if par.dp == 1 else batches.data.batch(batches.next_indices()[rows])
    x, y, _ = _to_device(batch, device)
    loss = pipe.step(x, y, amp)
    if par.dp_group is not None:
        loss = dpar.all_reduce(loss, par.dp_group) / par.dp  # mean of equal-sized slices' means
    o = config.optim
    return StepResult(
        **clip_and_step(pipe, optimizer, grad_clip=o.grad_clip, expert_bias_rate=o.expert_bias_rate, loss=loss)
    )


@dataclass
class Job:
    """What a front end (``pretrain``, ``k2.train.sft``) hands the shared trainer, built before the run directory is
    written to: the model, its optimizer and schedule, the batches, and how to evaluate, count and export."""

    model: Transformer
    optimizer: torch.optim.Optimizer
    schedule: Any  # step -> lr, with state_dict / load_state_dict
    batches: packing.BatchIterator
    evaluate: Callable[[], dict[str, Any]]  # the fields of an eval record, "eval_loss" first
    step_tokens: Callable[[], int]  # tokens (over all ranks) of the step just taken
    context_len: int  # for the FLOPs of a token (MFU)
    tokenizer: Tokenizer  # saved with the Hugging Face export
    source: str  # what the data is, for the summary
    summary: dict[str, Any] = field(default_factory=dict)  # front-end fields of summary.json, first in it
    eval_at_start: bool = False  # evaluate the starting model as step 0 (a fresh run only)
    summarize: Callable[[Path], dict[str, Any]] | None = None  # more summary fields from the finished run directory
    # Pipeline parallelism: this rank's stages of ``model``, which it trains and checkpoints (``model`` is kept whole on
    # every rank: the configuration, the activation-memory hooks and, on rank 0, the export gathered into it).
    pipeline: Pipeline | None = None

    @property
    def trained(self) -> nn.Module:
        """The module whose parameters this rank's optimizer owns and its checkpoint shards hold."""
        return self.pipeline.local if self.pipeline is not None else self.model


def _prepare_run_dir(run_dir: Path | None, resume: bool, command: str) -> Path:
    if resume:
        if run_dir is None or not (run_dir / CONFIG_FILE).is_file():
            raise ConfigError(f"--resume: {run_dir} is not a k2 {command} run directory (no {CONFIG_FILE})")
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

    Under torchrun (``WORLD_SIZE`` > 1) every rank calls this: ``[parallel]`` is checked against the world size
    first, then ``torch.distributed`` is initialised (``k2.parallel``); a setup error on any rank stops every rank
    before training; rank 0 alone prints and writes the run files, all ranks write their checkpoint shards.
    """
    validate_parallel(config, dist.get_world_size() if dist.is_initialized() else world_size_from_env())
    return run_job(config, run_dir, resume, _pretrain_job)


def _pretrain_job(config: TrainConfig, device: torch.device, amp: torch.dtype | None, par: ParallelState) -> Job:
    model_cfg = config.model.build()
    schedule = lr_schedule(config)
    data: TrainData = build_data(config.data, vocab_size=model_cfg.vocab_size)
    n_eval = eval_sequences(data.heldout, config.eval.max_sequences)
    baseline = baseline_loss(data.heldout, n_eval)

    torch.manual_seed(config.train.seed)  # the same initial weights on every rank
    model = Transformer(model_cfg).to(device)
    apply_expert_parallel(model, par)  # this rank's slice of the seeded experts
    model.train()
    pipe = None
    if par.pp > 1:
        from k2.parallel.pipeline import Pipeline

        p = config.parallel
        pipe = Pipeline(
            model,
            par,
            virtual_stages=p.pp_virtual_stages,
            schedule=p.pp_schedule,
            microbatches=p.microbatches,
            device=device,
            layers_per_stage=list(p.pp_layers) or None,
        )
    optimizer = build_optimizer(pipe.local if pipe is not None else model, config, par)
    batches = packing.BatchIterator(data.train, config.train.batch_size, seed=config.data.seed)
    tokens_per_step = config.train.batch_size * config.train.grad_accum * config.data.context_len

    def run_eval() -> dict[str, Any]:
        loss, tokens = evaluate(
            model,
            data.heldout,
            batch_size=config.eval.batch_size,
            num_sequences=n_eval,
            device=device,
            amp=amp,
            par=par,
            pipeline=pipe,
        )
        return {"eval_loss": loss, "eval_tokens": tokens}

    return Job(
        model=model,
        optimizer=optimizer,
        schedule=schedule,
        batches=batches,
        evaluate=run_eval,
        step_tokens=lambda: tokens_per_step,
        context_len=config.data.context_len,
        tokenizer=data.tokenizer,
        source=data.source,
        summary={"baseline_loss": baseline},
        pipeline=pipe,
    )


def run_job(
    config: RunConfig,
    run_dir: str | os.PathLike[str] | None,
    resume: bool,
    build: Callable[[Any, torch.device, torch.dtype | None, ParallelState], Job],
) -> dict[str, Any]:
    """The shared trainer: device and process group, run directory, ``build(config, device, amp, par)`` (the front
    end's setup; on every rank, before anything is written), resume, the training loop, the final export, plots and
    ``summary.json``. ``config.train.threads`` applies for the duration."""
    threads = torch.get_num_threads()
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    try:
        t_start = time.perf_counter()
        p = config.parallel
        device = resolve_device(config.train.device, local_rank_from_env() if p.dp * p.pp > 1 else None)
        par = init_parallel(dp=p.dp, ep=p.ep, pp=p.pp, timeout_s=p.timeout_s, device=device)
        try:
            return _run_job_ranks(
                config, Path(run_dir) if run_dir is not None else None, resume, build, device, par, t_start
            )
        finally:
            par.close()
    finally:
        torch.set_num_threads(threads)


def _run_job_ranks(
    config: RunConfig,
    run_dir: Path | None,
    resume: bool,
    build: Callable[[Any, torch.device, torch.dtype | None, ParallelState], Job],
    device: torch.device,
    par: ParallelState,
    t_start: float,
) -> dict[str, Any]:
    command = "sft" if isinstance(config, SFTConfig) else "pretrain"
    if run_dir is None and not resume:
        run_dir = dpar.from_main(par, default_run_dir("-sft" if command == "sft" else ""))  # one for all ranks
    error = None
    try:
        run_dir = _prepare_run_dir(run_dir, resume, command)
        amp = autocast_dtype(device, config.train.precision)
        job = build(config, device, amp, par)
        t = config.train  # after expert parallelism (the front end's), before the first forward
        apply_activation_memory(job.model, t.recompute, t.fp8_activations, t.offload_activations)
    except Exception as e:
        error = e
    dpar.agree(par, error)  # every rank has checked its input before any rank goes on
    model, optimizer, batches, schedule = job.model, job.optimizer, job.batches, job.schedule
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
        state = ckpt.load_checkpoint(latest, job.trained, optimizer, state, part=job.pipeline is not None)
        batches.load_state_dict(state["data"])
        resumed_from = latest
    if state["step"] >= config.train.steps:
        raise ConfigError(f"the run in {run_dir} already did {state['step']} steps; raise train.steps to continue")

    # Nothing above wrote to run_dir; from here on the run owns it (rank 0 writes its files).
    logger = None
    if par.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        config.save(run_dir)
        logger = MetricsLogger(run_dir, start_step=state["step"])
    try:
        summary = _run(config, run_dir, job, state, logger, device, amp, par)
    finally:
        if logger is not None:
            logger.close()

    cfg = model.config
    summary.update(
        **job.summary,
        wall_s=time.perf_counter() - t_start,
        resumed_from=str(resumed_from) if resumed_from else None,
        run_dir=str(run_dir),
        parameters=count_parameters(cfg).total,
        activated_parameters=count_parameters(cfg).activated,
        data=job.source,
        device=str(device),
        precision="bf16" if amp is not None else "fp32",
        parallel={"dp": par.dp, "ep": par.ep, "pp": par.pp, "world_size": par.world_size},
    )
    if job.summarize is not None and par.is_main:
        summary.update(job.summarize(run_dir))
    with gathered_experts(model):  # collective: the export holds every expert
        if job.pipeline is not None:  # collective: rank 0's model gets every stage's trained tensors
            whole = job.pipeline.gather_state_dict()
            if whole is not None:
                model.load_state_dict(whole)
        if not par.is_main:
            return {**summary, "files": {}}
        _write_json(run_dir / SUMMARY_FILE, summary)  # the plots read the baseline from it
        summary["files"] = _finish(config, run_dir, model, job.tokenizer)
    _write_json(run_dir / SUMMARY_FILE, summary)
    return summary


def _progress_extra(ev: dict[str, Any] | None) -> str:
    if not ev:
        return ""
    extra = f", eval {ev['eval_loss']:.4f}"
    if ev.get("tool_call_validity") is not None:
        extra += f", tool calls {ev['tool_call_validity']:.0%} valid"
    return extra


def _run(
    config: RunConfig,
    run_dir: Path,
    job: Job,
    state: dict[str, Any],
    logger: MetricsLogger | None,
    device: torch.device,
    amp: torch.dtype | None,
    par: ParallelState,
) -> dict[str, Any]:
    """The training loop on every rank; ``logger`` (rank 0 only, else None) gets the records."""
    model, optimizer, batches, schedule = job.model, job.optimizer, job.batches, job.schedule
    t, total = config.train, config.train.steps
    fpt, peak = flops_per_token(model.config, job.context_len), peak_flops(device, amp)
    meta = {"model_config": model.config.to_dict()}
    progress = Progress(total=total, initial=state["step"], log_every=t.log_every) if par.is_main else None
    step_s_avg, last_eval, last_loss, run_tokens, run_s = None, None, None, 0, 0.0

    def trainer_state() -> dict[str, Any]:
        return {**state, "data": batches.state_dict(), "schedule": schedule.state_dict()}

    def log_eval(step: int) -> dict[str, Any]:
        ev = job.evaluate()
        if logger is not None:
            logger.log({"kind": "eval", "step": step, **ev})
        return ev

    try:
        if job.eval_at_start and state["step"] == 0:
            last_eval = log_eval(0)
            if progress is not None:
                progress.write(f"step 0 (starting model){_progress_extra(last_eval)}")
        while state["step"] < total:
            t0 = time.perf_counter()
            lr = schedule(state["step"])
            for group in optimizer.param_groups:
                group["lr"] = lr
            if job.pipeline is not None:
                r = pipeline_step(job.pipeline, optimizer, batches, config, device, amp, par)
            else:
                r = train_step(model, optimizer, batches, config, device, amp, par)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            step_s = time.perf_counter() - t0
            tokens_per_step = job.step_tokens()
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
            if logger is not None:
                logger.log(record)

            if r.finite:
                state["consecutive_skipped"] = 0
                last_loss = r.loss
            else:
                state["skipped"] += 1
                state["consecutive_skipped"] += 1
                if progress is not None:
                    progress.write(f"step {step}: non-finite loss {r.loss} or grad norm {r.grad_norm}; update skipped")
                if state["consecutive_skipped"] >= t.max_skipped_steps:
                    last = ckpt.latest_checkpoint(run_dir)
                    raise TrainingDiverged(
                        f"training stopped at step {step}: {state['consecutive_skipped']} consecutive steps had a "
                        f"non-finite loss or gradient (train.max_skipped_steps={t.max_skipped_steps}); lower "
                        f"optim.lr or raise optim.grad_clip; last good checkpoint: {last or 'none'}"
                    )
            if progress is not None:
                progress.update(
                    step,
                    loss=r.loss if r.finite else None,
                    tokens_per_s=tokens_per_step / step_s_avg,
                    eta_s=(total - step) * step_s_avg,
                    extra=_progress_extra(last_eval),
                )

            if (config.eval.every and step % config.eval.every == 0) or step == total:
                last_eval = log_eval(step)
            periodic = t.checkpoint_every and step % t.checkpoint_every == 0
            if (periodic and not state["consecutive_skipped"]) or step == total:  # not in the middle of a bad streak
                ckpt.save_checkpoint(
                    run_dir,
                    step,
                    job.trained,
                    optimizer,
                    trainer_state(),
                    keep_last=config.checkpoint.keep_last,
                    meta=meta,
                )
    finally:
        if progress is not None:
            progress.close()
    last_eval = last_eval or {}
    extra_eval = {k: v for k, v in last_eval.items() if k not in ("eval_loss", "eval_tokens")}
    return {
        "eval_loss": last_eval.get("eval_loss"),
        "train_loss": last_loss,
        "steps": state["step"],
        "tokens": state["tokens"],
        "skipped_steps": state["skipped"],
        "tokens_per_s": run_tokens / run_s if run_s else None,
        **extra_eval,
    }


def _finish(config: RunConfig, run_dir: Path, model: nn.Module, tokenizer: Tokenizer) -> dict[str, Any]:
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
        files["hf"] = str(export_hf(config.checkpoint, run_dir, model, tokenizer))
    files["plots"] = [str(p) for p in plot_run(run_dir, run_dir / PLOTS_DIR)]
    return files


def export_hf(section: Any, run_dir: Path, model: nn.Module, tokenizer: Tokenizer) -> Path:
    """The run's Hugging Face export, ``RUN_DIR/hf`` (safetensors in ``section.hf_dtype`` + config + tokenizer)."""
    hf_dir = run_dir / HF_DIR
    save_hf(model, hf_dir, dtype=torch.bfloat16 if section.hf_dtype == "bfloat16" else torch.float32)
    tokenizer.save(hf_dir)
    return hf_dir
