"""Pipeline parallelism through ``torch.distributed.pipelining`` (its schedules; no scheduler of k2's own), applied
to a built single-device ``Transformer`` from outside, as in Kimi K2 (arXiv 2507.20534 §2.4: 16-way PP with
virtual stages, interleaved 1F1B as in Megatron-LM).

Dimension legend: B rows of this rank's step batch, b rows of a micro-batch, S sequence, D model dim, L layers.

Cutting: the model's layers are split into ``pp × v`` contiguous stages (``k2.parallel.plan.split_layers``: balanced
by per-GPU parameter count, or ``layers_per_stage``); stage 0 also holds the token embedding, the last stage the
final norm and LM head. Stage ``s`` lives on pipeline rank ``s mod pp`` (the loop placement of interleaved 1F1B),
so with ``v`` virtual stages a rank holds ``v`` non-adjacent chunks. :class:`LocalStages` holds this rank's modules
under the full model's parameter names (``embed_tokens.weight``, ``layers.7.self_attn.q_a_proj.weight``,
``lm_head.weight``), so optimizers, checkpoints and name-based rules see the same keys at any ``pp``.

A stage's forward is the model's: RoPE from per-row positions ``0..S-1``, the blocks, the final norm on the last
stage; the last stage's output goes to ``loss_fn`` = ``k2.model.loss.linear_cross_entropy`` against the LM head
(chunked, no full logits), which the schedule calls per micro-batch. The schedule scales gradients by
``1/microbatches`` (the mean over micro-batches of the micro-batches' mean losses, as gradient accumulation).
Packed documents (``cu_seqlens``) are not supported under PP.

MoE balance loss: each stage adds its layers' sequence-wise losses into the backward through
:class:`_AttachAuxLoss` (the identity on the hidden states whose backward also seeds ``d aux = 1``; Megatron-LM's
``MoEAuxLossAutoScaler`` idea), so the gradient equals that of ``ce + Σ aux`` in one process.

What the trainer reads per step (``Pipeline.step``): the mean loss (last stage, broadcast over the pipeline), the
expert loads of this rank's MoE layers summed over the micro-batches (forward hooks), the attention layers' running
max logits (their own buffers, MAX over micro-batches; MuonClip over this rank's attention modules MAX-reduces
them over dp). :func:`clip_and_step` finishes the step: dp-average of the gradients, the global gradient norm over
all stages (squares summed over the pipeline, expert squares over the EP group), clipping, the optimizer, and the
expert-bias update of this rank's MoE layers, and returns the step's metrics over the whole model (max logits,
clipped heads and load imbalance per layer, MAX-gathered over the pipeline).

For the trainer (``k2.train.loop``): :meth:`Pipeline.eval_loss` runs a held-out batch through the stages in turn
(forward only, point-to-point, any batch size; no schedule), and :meth:`Pipeline.gather_state_dict` brings every
stage's tensors to rank 0 for the Hugging Face export.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleLoopedBFS,
)

from k2.model import Transformer
from k2.model.loss import linear_cross_entropy
from k2.model.moe import MoE
from k2.parallel import data_parallel as dpar
from k2.parallel.expert import split_expert_parameters
from k2.parallel.mesh import ParallelState
from k2.parallel.plan import MULTI_STAGE_SCHEDULES, check_pipeline, split_layers

SCHEDULE_CLASSES: dict[str, Any] = {
    "interleaved_1f1b": ScheduleInterleaved1F1B,
    "interleaved_zero_bubble": ScheduleInterleavedZeroBubble,
    "looped_bfs": ScheduleLoopedBFS,
    "1f1b": Schedule1F1B,
    "gpipe": ScheduleGPipe,
}


class _AttachAuxLoss(torch.autograd.Function):
    """A copy of ``h`` (not a view: the schedule detaches stage outputs in place); the backward also returns
    ``d aux = 1`` (the balance loss's weight in the total loss)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        ctx.aux_shape = aux.shape
        return h.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, torch.ones(ctx.aux_shape, dtype=torch.float32, device=grad.device)


class LocalStages(nn.Module):
    """This pipeline rank's parts of a ``Transformer`` under the full model's names: ``embed_tokens`` (if it holds
    stage 0), ``layers`` (a ``ModuleDict`` keyed by global layer index), ``norm`` and ``lm_head`` (last stage)."""

    def __init__(self, model: Transformer, layers: list[int], first: bool, last: bool) -> None:
        super().__init__()
        self.config = model.config
        self.embed_tokens = model.embed_tokens if first else None
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layers})
        self.norm = model.norm if last else None
        self.lm_head = model.lm_head if last else None

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]


class StageModule(nn.Module):
    """One pipeline stage: token ids ``[b, S]`` (first stage) or hidden states ``[b, S, D]`` → hidden states
    ``[b, S, D]`` (the last stage's after the final norm)."""

    def __init__(self, local: LocalStages, model: Transformer, layers: range, first: bool, last: bool) -> None:
        super().__init__()
        self.embed_tokens = local.embed_tokens if first else None
        self.layers = nn.ModuleList(local.layers[str(i)] for i in layers)
        self.norm = local.norm if last else None
        self.lm_head = local.lm_head if last else None  # read by the loss, not by forward
        self.rotary_emb = model.rotary_emb

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed_tokens is not None:
            x = self.embed_tokens(x)  # [b, S] ids → [b, S, D]
        b, s = x.shape[:2]
        positions = torch.arange(s, device=x.device).expand(b, s)
        cos, sin = self.rotary_emb(positions, x.dtype)  # [b, S, dr/2]
        aux = []
        for layer in self.layers:
            x = layer(x, cos, sin)
            if isinstance(layer.mlp, MoE) and layer.mlp.aux_loss is not None:
                aux.append(layer.mlp.aux_loss)
        if aux and torch.is_grad_enabled():
            x = _AttachAuxLoss.apply(x, torch.stack(aux).sum())
        return self.norm(x) if self.norm is not None else x


class Pipeline:
    """``model`` cut into ``pp × virtual_stages`` stages, this rank's stages wrapped in ``PipelineStage`` and run
    by the named ``torch.distributed.pipelining`` schedule over ``par.pp_group``. Build it on every rank from the
    same seeded model (each keeps only its stages' modules; drop ``model`` afterwards)."""

    def __init__(
        self,
        model: Transformer,
        par: ParallelState,
        *,
        virtual_stages: int,
        schedule: str,
        microbatches: int,
        device: torch.device,
        layers_per_stage: list[int] | None = None,
    ) -> None:
        cfg = model.config
        pp = par.pp
        v = virtual_stages if schedule in MULTI_STAGE_SCHEDULES else 1
        check_pipeline(cfg.num_hidden_layers, pp, v, schedule, microbatches, layers_per_stage)
        self.pp, self.virtual_stages, self.microbatches, self.par = pp, v, microbatches, par
        self.num_stages = pp * v
        self.stage_layers = split_layers(cfg, self.num_stages, par.ep, layers_per_stage)
        self.local_ids = [s for s in range(self.num_stages) if s % pp == par.pp_rank]
        self.is_first = 0 in self.local_ids
        self.is_last = self.num_stages - 1 in self.local_ids
        layers = [i for s in self.local_ids for i in self.stage_layers[s]]
        self.local = LocalStages(model, layers, self.is_first, self.is_last)
        self.stage_modules = [
            StageModule(self.local, model, self.stage_layers[s], s == 0, s == self.num_stages - 1)
            for s in self.local_ids
        ]
        self.schedule_name, self.device = schedule, device
        self.hidden_dtype = model.norm.weight.dtype  # the residual stream's dtype (fp32 under autocast)
        self.schedule: Any = None
        self._shape: tuple[int, int] | None = None
        self._loads: dict[MoE, torch.Tensor] = {}
        self._aux: list[torch.Tensor] = []  # this rank's balance losses, one per MoE forward of the step
        for moe in self.local.moe_layers():
            moe.register_forward_hook(self._count_load)

    def _build_schedule(self, rows: int, seq: int) -> None:
        """``PipelineStage``s with static micro-batch shapes ``[rows, seq]`` (so the stages need no inference
        forward, which would run the model on uninitialised inputs and pollute the max logits and loads) and the
        schedule."""
        size = (rows, seq, self.local.config.hidden_size)
        hidden = torch.empty(size, dtype=self.hidden_dtype, device="meta", requires_grad=True)  # grads flow back
        ids = torch.empty(rows, seq, dtype=torch.long, device="meta")
        self.stages = [
            PipelineStage(
                m,
                s,
                self.num_stages,
                self.device,
                input_args=ids if s == 0 else hidden,
                output_args=hidden,
                input_grads=None if s == 0 else hidden,
                output_grads=hidden,
                group=self.par.pp_group,
            )
            for s, m in zip(self.local_ids, self.stage_modules, strict=True)
        ]
        cls = SCHEDULE_CLASSES[self.schedule_name]
        stages = self.stages if self.schedule_name in MULTI_STAGE_SCHEDULES else self.stages[0]
        self.schedule = cls(stages, n_microbatches=self.microbatches, loss_fn=self._loss)
        self._shape = (rows, seq)

    def _loss(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of one micro-batch (``h [b, S, D]`` from the last stage)."""
        return linear_cross_entropy(h.flatten(0, 1), self.local.lm_head.weight, labels.flatten())

    def _count_load(self, moe: MoE, _inputs: Any, _output: Any) -> None:
        if moe.training and torch.is_grad_enabled():
            load = moe.tokens_per_expert
            self._loads[moe] = load if moe not in self._loads else self._loads[moe] + load
            if moe.aux_loss is not None:
                self._aux.append(moe.aux_loss.detach().float())

    def step(self, input_ids: torch.Tensor, labels: torch.Tensor, amp: torch.dtype | None = None) -> torch.Tensor:
        """Forward and backward of this rank's step batch ``input_ids, labels [B, S]`` (B a multiple of the
        micro-batches; only the first stage reads ids, the last labels); returns the mean loss over the micro-
        batches, on every rank of the pipeline (fp32 scalar)."""
        device = input_ids.device
        if input_ids.shape[0] % self.microbatches:
            raise ValueError(f"Pipeline: {input_ids.shape[0]} rows do not split into {self.microbatches} micro-batches")
        shape = (input_ids.shape[0] // self.microbatches, input_ids.shape[1])
        if shape != self._shape:
            self._build_schedule(*shape)
        losses: list[torch.Tensor] = []
        self._loads.clear()
        self._aux.clear()
        args = (input_ids,) if self.is_first else ()
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            self.schedule.step(*args, target=labels if self.is_last else None, losses=losses)
        # mean cross-entropy (last stage) + this rank's balance losses per micro-batch, summed over the pipeline
        loss = (
            torch.stack([x.detach().float() for x in losses]).mean() if self.is_last else torch.zeros((), device=device)
        )
        if self._aux:
            loss = loss + torch.stack(self._aux).sum() / self.microbatches
        loss = loss.to(self.device)  # NCCL reduces device tensors
        if self.par.pp_group is not None:
            dist.all_reduce(loss, group=self.par.pp_group)
        return loss

    def expert_load(self) -> torch.Tensor:
        """``[local MoE layers, E]`` tokens per expert over the step's micro-batches."""
        moes = self.local.moe_layers()
        if not moes:
            return torch.zeros(0, self.local.config.n_routed_experts, dtype=torch.long, device=self.device)
        return torch.stack([self._loads[m] for m in moes])

    def max_attention_logits(self) -> torch.Tensor:
        """``[L, H]`` running max logits of every layer of the model (MAX over the pipeline; -inf elsewhere)."""
        cfg = self.local.config
        out = torch.full((cfg.num_hidden_layers, cfg.num_attention_heads), float("-inf"), device=self.device)
        for index, layer in self.local.layers.items():
            out[int(index)] = layer.self_attn.max_logits.float()
        if self.par.pp_group is not None:
            dist.all_reduce(out, op=dist.ReduceOp.MAX, group=self.par.pp_group)
        return out

    def reset_max_attention_logits(self) -> None:
        for layer in self.local.layers.values():
            layer.self_attn.max_logits.fill_(float("-inf"))

    def over_layers(self, values: dict[int, float]) -> torch.Tensor:
        """``[L]`` per-layer values of the whole model from each rank's ``{global layer: value}`` (MAX over the
        pipeline; -inf for a layer no rank gave)."""
        out = torch.full((self.local.config.num_hidden_layers,), float("-inf"), device=self.device)
        for index, value in values.items():
            out[index] = value
        if self.par.pp_group is not None:
            dist.all_reduce(out, op=dist.ReduceOp.MAX, group=self.par.pp_group)
        return out

    @torch.no_grad()
    def eval_loss(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the scored labels of ``input_ids, labels [B, S]`` (any B), on every rank of the
        pipeline (fp32 scalar). Forward only and without a schedule: the stages run one after another, each rank
        receiving the previous stage's hidden states ``[B, S, D]`` and sending its own on (evaluation is rare and has
        no backward to overlap, so a schedule's micro-batches would only add shape constraints)."""
        ranks = dist.get_process_group_ranks(self.par.pp_group)  # global rank of each pipeline rank
        b, s = input_ids.shape
        h = torch.empty(b, s, self.local.config.hidden_size, dtype=self.hidden_dtype, device=self.device)
        loss = torch.zeros((), device=self.device)
        for stage, module in zip(self.local_ids, self.stage_modules, strict=True):  # this rank's, in stage order
            if stage > 0:
                dist.recv(h, src=ranks[(stage - 1) % self.pp], group=self.par.pp_group)
            out = module(input_ids.to(self.device) if stage == 0 else h).to(self.hidden_dtype)
            if stage < self.num_stages - 1:
                dist.send(out.contiguous(), dst=ranks[(stage + 1) % self.pp], group=self.par.pp_group)
            else:
                loss = self._loss(out, labels.to(self.device)).float()
        dist.all_reduce(loss, group=self.par.pp_group)  # the last stage's loss, zeros elsewhere
        return loss

    def gather_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Collective over every rank: the whole model's state dict (CPU tensors, full-model names) on global rank 0,
        None elsewhere; the first dp replica of each pipeline rank sends its stages' tensors. Under expert
        parallelism call it inside ``k2.parallel.expert.gathered_experts`` so that they hold every expert."""
        own = {k: v.detach().cpu() for k, v in self.local.state_dict().items()} if self.par.dp_rank == 0 else {}
        parts: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(own, parts, dst=0)
        return None if parts is None else {k: v for part in parts for k, v in part.items()}


def global_grad_norm(pipe: Pipeline, dense: list[torch.Tensor], experts: list[torch.Tensor]) -> torch.Tensor:
    """2-norm of the whole model's gradient: this rank's dense squares + its experts' squares summed over the EP
    group, then summed over the pipeline."""
    par = pipe.par
    zero = torch.zeros((), dtype=torch.float64, device=pipe.device)
    dense_sq = torch.nn.utils.get_total_norm(dense, foreach=True).double().square() if dense else zero
    expert_sq = torch.nn.utils.get_total_norm(experts, foreach=True).double().square() if experts else zero
    if par.ep_group is not None:
        dist.all_reduce(expert_sq, group=par.ep_group)
    total = dense_sq + expert_sq
    if par.pp_group is not None:
        dist.all_reduce(total, group=par.pp_group)
    return total.sqrt().float()


def clip_and_step(
    pipe: Pipeline,
    optimizer: torch.optim.Optimizer,
    *,
    grad_clip: float,
    expert_bias_rate: float,
    loss: torch.Tensor,
) -> dict[str, Any]:
    """After :meth:`Pipeline.step`: dp-average the gradients (experts: sum over the replicas / dp), clip to the
    global norm over all stages, step the optimizer (MuonClip: QK-Clip of this rank's layers), update this rank's
    expert biases from the dp-summed loads, and consume the max logits. Returns the step's record: the fields of
    ``k2.train.loop.StepResult``, lists over the whole model's layers on every rank."""
    par = pipe.par
    dense, experts = ([p for _, p in named] for named in split_expert_parameters(pipe.local))
    load = pipe.expert_load()
    max_logits = pipe.max_attention_logits()
    if par.dp_group is not None:
        load = dpar.all_reduce(load, par.dp_group)
        max_logits = dpar.all_reduce(max_logits, par.dp_group, op="max")
        dpar.average_gradients(dense, par.dp_group)
        dpar.average_gradients(experts, par.expert_replica_group, divisor=par.dp)
    for p in [*dense, *experts]:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    norm = global_grad_norm(pipe, [p.grad for p in dense], [p.grad for p in experts])
    finite = bool(torch.isfinite(norm)) and bool(torch.isfinite(loss))
    params = [*dense, *experts]
    if finite and grad_clip > 0:
        torch.nn.utils.clip_grads_with_norm_(params, grad_clip, norm, foreach=True)
    if finite:
        optimizer.step()
        update_expert_bias(pipe.local.moe_layers(), load, expert_bias_rate)
    pipe.reset_max_attention_logits()
    optimizer.zero_grad(set_to_none=True)

    # Metrics of the whole model, gathered over the pipeline: QK-Clip's clipped heads and the load imbalance per layer.
    layers = [int(i) for i in pipe.local.layers]  # ascending: the order of find_attention and moe_layers
    qk = getattr(optimizer, "last_qk_clip", None)  # MuonClip: this step's clipped heads of this rank's layers
    clipped: list[int] = []
    if finite and qk is not None and qk["clipped_heads"].numel():  # the same on every rank
        counts = pipe.over_layers(dict(zip(layers, qk["clipped_heads"].tolist(), strict=True)))
        clipped = [int(c) for c in counts]
    moe_layers = [i for i in layers if isinstance(pipe.local.layers[str(i)].mlp, MoE)]
    load = load.float()
    mine = (load.amax(dim=1) / load.mean(dim=1).clamp_min(1e-9)).tolist() if load.numel() else []
    imbalance = pipe.over_layers(dict(zip(moe_layers, mine, strict=True)))
    cfg = pipe.local.config
    return {
        "loss": float(loss),
        "grad_norm": float(norm),
        "finite": finite,
        "max_logit": max_logits.amax(1).tolist(),
        "clipped_heads": clipped,
        "load_imbalance": [float(imbalance[i]) for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)],
    }


@torch.no_grad()
def update_expert_bias(moes: list[MoE], load: torch.Tensor, rate: float) -> None:
    """``Transformer.update_expert_bias`` for a stage's MoE layers: ``b_e += rate · sign(mean_load − load_e)``."""
    if rate == 0:
        return
    for moe, layer_load in zip(moes, load, strict=True):
        layer_load = layer_load.float().to(moe.gate.e_score_correction_bias.device)
        moe.gate.e_score_correction_bias += rate * torch.sign(layer_load.mean() - layer_load)
