"""A training plan by calculation (``k2 plan``): per-GPU memory, communication and pipeline bubble of a layout.

Layout (as ``k2.parallel.mesh`` builds it): ``gpus = pp · dp``; the ``ep`` expert-parallel ranks are drawn from
dp, so a stage's dense parameters are replicated over its dp ranks and its routed experts split ``ep`` ways, and
ZeRO-1 shards the optimizer state of dense parameters over dp and of experts over the ``dp/ep`` ranks holding the
same experts. The Kimi K2 report (arXiv 2507.20534 §2.4) trains on 256-GPU model-parallel groups: 16-way pipeline
parallelism with virtual stages (interleaved 1F1B, Megatron-LM), 16-way EP and ZeRO-1 DP; BF16 parameters plus
their FP32 gradient buffer are ≈ 6 TB over the 256 GPUs, ≈ 30 GB per GPU for all states once the optimizer state
is sharded or partly offloaded.

Memory per GPU, for the pipeline rank that holds the most (the stages of a rank are ``r, r + pp, ...``):

- states: parameters (``param_bytes``, bf16), gradient buffer (``grad_bytes``, fp32), optimizer state (ZeRO-1:
  fp32 master copy + Muon momentum for matrices, or AdamW's two moments for the embedding, LM head and vectors
  (Moonlight's split, ``k2.optim.MuonClip``); ``optimizer_offload`` of it lives in host memory);
- activations: the bytes autograd saves per micro-batch for each stage (:func:`activation_bytes`): its blocks as
  ``k2.parallel.activation_model`` counts them (validated against ``torch.autograd.graph.saved_tensors_hooks``
  under the real options of ``k2.parallel.activations``), the per-micro-batch constants and the embedding / final
  norm / LM-head bytes outside the blocks, times the micro-batches in flight on that rank at the schedule's peak
  (:func:`in_flight`: a replay of the schedule's order of forwards and backwards, as
  ``torch.distributed.pipelining`` builds it), plus the stage's received input and sent output, which the pipeline
  keeps for the backward.

The reduction options are the report's (§2.4.3), as ``k2.parallel.activations`` applies them: selective recompute
(``norm``, ``swiglu``, ``mla_up_proj``, ``moe_down_proj``), FP8 storage (E4M3, 1×128 tiles, fp32 scales) of the
MoE up-projections' and SwiGLU's inputs, which stays on the GPU, and CPU offload of the rest of the blocks' saved
bytes, of which only the working set (the chunk computing and the one prefetched) stays on the GPU (the pipeline's
stage inputs and outputs and the bytes outside the blocks stay too).

Communication per GPU per step (bytes sent by the busiest rank): EP all-to-all (dispatch and combine, forward and
backward, the ``(ep-1)/ep`` of the token copies that leave the rank), PP send/recv (activations forward, their
gradients backward, one ``[b, S, D]`` tensor per micro-batch and stage boundary), DP (ZeRO-1 reduce-scatter of the
fp32 gradients, Newton-Schulz gather/scatter of the Muon matrices in bf16 (``k2.optim.distributed``), all-gather
of the bf16 parameters).

Bubble fraction (idle share of a step, Megatron-LM): ``(pp-1) / (v·m + pp-1)`` for ``m`` micro-batches and ``v``
stages per rank (``v = 1``: GPipe, 1F1B). For ``interleaved_zero_bubble`` this is an upper bound.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from k2.errors import ConfigError
from k2.model.config import ModelConfig
from k2.model.params import attention_parameters
from k2.parallel.activation_model import LayerBytes, layer_saved_bytes
from k2.parallel.activations import FP8

F32 = 4
# Schedules of torch.distributed.pipelining by k2 name; the first set runs several stages per rank.
MULTI_STAGE_SCHEDULES = ("interleaved_1f1b", "interleaved_zero_bubble", "looped_bfs")
SINGLE_STAGE_SCHEDULES = ("1f1b", "gpipe")
SCHEDULES = MULTI_STAGE_SCHEDULES + SINGLE_STAGE_SCHEDULES
GB = 1e9


# The report's selective recompute (§2.4.3) as ``k2.parallel.activations`` names its regions.
K2_RECOMPUTE = ("norm", "swiglu", "mla_up_proj", "moe_down_proj")


@dataclass(frozen=True, kw_only=True)
class ActivationOptions:
    """The report's activation reductions (§2.4.3), each on or off."""

    recompute: bool = False  # selective: RMSNorm, SwiGLU, MLA up-projections, MoE down-projections
    recompute_moe_down: bool = False  # the MoE down-projections alone (implied by recompute)
    fp8_storage: bool = False  # inputs of the MoE up-projections and of SwiGLU in FP8 (1x128 tiles)
    offload: bool = False  # every other activation to host memory, a working set of two chunks on the GPU

    def modules(self) -> dict[str, Any]:
        """These flags as the options of ``k2.parallel.activations.apply_activation_memory``."""
        recompute = K2_RECOMPUTE if self.recompute else ("moe_down_proj",) if self.recompute_moe_down else ()
        return {"recompute": recompute, "fp8_activations": FP8 if self.fp8_storage else (), "offload": self.offload}


# ---- validation ---------------------------------------------------------------------------------------------------


CONFIG_NAMES = {
    "pp": "parallel.pp",
    "v": "parallel.pp_virtual_stages",
    "schedule": "parallel.pp_schedule",
    "m": "parallel.pp_microbatches",
    "layers": "parallel.pp_layers",
}
CLI_NAMES = {
    "pp": "--pp",
    "v": "--vpp",
    "schedule": "--schedule",
    "m": "micro-batches (--global-batch / (dp x --micro-batch))",
    "layers": "--pp-layers",
}


def check_pipeline(
    num_layers: int,
    pp: int,
    virtual_stages: int,
    schedule: str,
    microbatches: int,
    layers_per_stage: list[int] | None = None,
    names: dict[str, str] = CONFIG_NAMES,
) -> None:
    """Every rule of a pipeline layout, one ``ConfigError`` line each (the trainer and ``k2 plan`` share them;
    ``names`` are how the caller's user spells the settings)."""
    n = names
    if pp < 1 or virtual_stages < 1 or microbatches < 1:
        raise ConfigError(f"{n['pp']}={pp}, {n['v']}={virtual_stages} and {n['m']}={microbatches} must all be >= 1")
    if schedule not in SCHEDULES:
        raise ConfigError(f"{n['schedule']}={schedule!r}; known schedules: {', '.join(SCHEDULES)}")
    if pp == 1:
        return
    if schedule in SINGLE_STAGE_SCHEDULES and virtual_stages != 1:
        raise ConfigError(
            f"{n['schedule']}={schedule!r} runs one stage per rank; set {n['v']}=1 or use "
            f"{', '.join(MULTI_STAGE_SCHEDULES)}"
        )
    stages = pp * virtual_stages
    if stages > num_layers:
        raise ConfigError(
            f"{n['pp']}={pp} x {n['v']}={virtual_stages} = {stages} stages but the model has {num_layers} layers "
            "(every stage needs at least one)"
        )
    if layers_per_stage is not None and (
        len(layers_per_stage) != stages or sum(layers_per_stage) != num_layers or min(layers_per_stage) < 1
    ):
        raise ConfigError(
            f"{n['layers']}={layers_per_stage} must give {stages} stages of >= 1 layer summing to the model's "
            f"{num_layers} layers"
        )
    if schedule in MULTI_STAGE_SCHEDULES and (microbatches < pp or microbatches % pp):
        raise ConfigError(
            f"{n['m']}={microbatches}: {schedule} needs a multiple of {n['pp']}={pp} micro-batches (at least one "
            "per pipeline rank)"
        )


# ---- parameters per stage ----------------------------------------------------------------------------------------


def layer_parameters(cfg: ModelConfig, layer: int) -> tuple[int, int]:
    """``(dense, routed experts)`` parameter counts of decoder layer ``layer`` (norms, router, shared experts in
    dense)."""
    d = cfg.hidden_size
    dense = attention_parameters(cfg) + 2 * d
    if not cfg.is_moe_layer(layer):
        return dense + 3 * d * cfg.intermediate_size, 0
    expert = 3 * d * cfg.moe_intermediate_size
    return dense + cfg.n_shared_experts * expert + cfg.n_routed_experts * d, cfg.n_routed_experts * expert


def stage_parameters(cfg: ModelConfig, layers: range, first: bool, last: bool) -> tuple[int, int]:
    """``(dense, routed experts)`` parameters of a stage: its layers, the embedding on the first, the final norm and
    LM head on the last."""
    dense = experts = 0
    for i in layers:
        dn, ex = layer_parameters(cfg, i)
        dense, experts = dense + dn, experts + ex
    if first:
        dense += cfg.vocab_size * cfg.hidden_size
    if last:
        dense += cfg.vocab_size * cfg.hidden_size + cfg.hidden_size
    return dense, experts


def split_layers(
    cfg: ModelConfig, num_stages: int, ep: int = 1, layers_per_stage: list[int] | None = None
) -> list[range]:
    """The decoder layers of each of ``num_stages`` stages: ``layers_per_stage`` if given, else the contiguous split
    that minimises the largest stage's per-GPU parameter count (dense + experts/ep, embedding with the first stage,
    final norm and LM head with the last), every stage holding at least one layer."""
    n = cfg.num_hidden_layers
    if layers_per_stage is None:
        layers_per_stage = _balanced_counts(cfg, num_stages, ep)
    bounds = [0]
    for count in layers_per_stage:
        bounds.append(bounds[-1] + count)
    if len(layers_per_stage) != num_stages or bounds[-1] != n or min(layers_per_stage) < 1:
        raise ConfigError(f"pp_layers={layers_per_stage} must give {num_stages} stages summing to {n} layers")
    return [range(bounds[i], bounds[i + 1]) for i in range(num_stages)]


def _balanced_counts(cfg: ModelConfig, k: int, ep: int) -> list[int]:
    """Optimal contiguous partition (min-max, dynamic programming over prefix sums)."""
    n = cfg.num_hidden_layers
    if k > n:
        raise ConfigError(f"{k} pipeline stages but the model has {n} layers")
    cost = []
    for i in range(n):
        dense, experts = layer_parameters(cfg, i)
        cost.append(dense + experts / ep)
    cost[0] += cfg.vocab_size * cfg.hidden_size
    cost[-1] += cfg.vocab_size * cfg.hidden_size
    prefix = [0.0]
    for c in cost:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[j][i]: the smallest max-stage cost of the first i layers in j stages; cut[j][i]: where the last starts
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for j in range(1, k + 1):
        for i in range(j, n - (k - j) + 1):
            for s in range(j - 1, i):
                value = max(best[j - 1][s], prefix[i] - prefix[s])
                if value < best[j][i]:
                    best[j][i], cut[j][i] = value, s
    counts, i = [], n
    for j in range(k, 0, -1):
        counts.append(i - cut[j][i])
        i = cut[j][i]
    return counts[::-1]


# ---- activations -------------------------------------------------------------------------------------------------


def layer_activation_constant_bytes(cfg: ModelConfig, layer: int, *, act_bytes: int = 2) -> float:
    """Bytes per micro-batch a layer saves independently of its token count (``k2.parallel.activation_model`` counts
    per token): the fp32 copy of the router weight under bf16 parameters, the expert offsets."""
    if not cfg.is_moe_layer(layer):
        return 0.0
    e = cfg.n_routed_experts
    return (F32 * e * cfg.hidden_size if act_bytes != F32 else 0.0) + 4 * e


def activation_bytes(
    cfg: ModelConfig,
    *,
    tokens: int,
    layers: range | None = None,
    first: bool = True,
    last: bool = True,
    act_bytes: int = 2,
    param_bytes: int | None = None,
    options: ActivationOptions = ActivationOptions(),
    expert_imbalance: float = 1.0,
) -> LayerBytes:
    """Bytes saved for the backward by one micro-batch of ``tokens`` tokens through a stage of ``layers`` (default:
    the whole model), kept on the device and offloaded: the blocks as ``k2.parallel.activation_model`` counts them
    under ``options`` (their routed token copies times ``expert_imbalance``: the busiest expert rank), their
    per-micro-batch constants, and, on the device, the token ids (``first``) and the final norm + chunked LM loss
    (``last``; its forward computes the gradients of the hidden states and of the LM head weight and keeps them)."""
    layers = range(cfg.num_hidden_layers) if layers is None else layers
    param_bytes = act_bytes if param_bytes is None else param_bytes
    device = offloaded = 0.0
    for i in layers:
        b = layer_saved_bytes(
            cfg, i, act_bytes=act_bytes, routed_copies=cfg.num_experts_per_tok * expert_imbalance, **options.modules()
        )
        const = layer_activation_constant_bytes(cfg, i, act_bytes=act_bytes)
        device += tokens * b.device + (0.0 if options.offload else const)
        offloaded += tokens * b.offloaded + (const if options.offload else 0.0)
    if not options.offload:  # RoPE's cos and sin: one storage for all the stage's layers (offload copies it per layer)
        device -= max(len(layers) - 1, 0) * tokens * act_bytes * cfg.qk_rope_head_dim
    if first:
        device += tokens * 8  # token ids
    if last:
        d = cfg.hidden_size
        device += tokens * (F32 * d + F32 + 2 * act_bytes * d)  # final norm (fp32 input, rsqrt, normed), dL/dh
        device += cfg.vocab_size * d * param_bytes  # dL/dW of the LM head, computed in the forward
    return LayerBytes(device=device, offloaded=offloaded)


# ---- schedules ---------------------------------------------------------------------------------------------------


def in_flight(schedule: str, pp: int, v: int, microbatches: int, rank: int, extra_warmup: int = 0) -> list[int]:
    """Peak micro-batches in flight per local stage of pipeline rank ``rank`` (forwards done, backwards not yet),
    from a replay of the schedule's order of forwards and backwards (``torch.distributed.pipelining``'s warm-up
    counts; ``extra_warmup`` more warm-up forwards, as K2 uses to hide the EP all-to-all). Returns the count of each
    local stage at the moment their sum (weighted equally) peaks."""
    m = microbatches
    if pp == 1:
        return [1] * v
    if schedule == "gpipe" or schedule == "looped_bfs":
        return [m] * v
    total = m * v
    if schedule == "1f1b":
        warmup = min(pp - 1 - rank + extra_warmup, m)
    else:  # interleaved: (v-1) rounds of pp micro-batches, then two per hop from the last rank
        per_round = m // max(1, m // pp)
        warmup = min((v - 1) * per_round + 2 * (pp - 1 - rank) + extra_warmup, total)

    def fwd_chunk(step: int) -> int:
        return (step // pp) % v if v > 1 else 0

    def bwd_chunk(step: int) -> int:
        return v - 1 - (step // pp) % v if v > 1 else 0

    live = [0] * v
    peak, best = -1, live[:]
    f = b = 0
    while b < total:
        if f < total and (f < warmup or f - b <= warmup):
            live[fwd_chunk(f)] += 1
            f += 1
            if sum(live) > peak:
                peak, best = sum(live), live[:]
            if f > warmup:  # steady state: one backward after each forward
                live[bwd_chunk(b)] -= 1
                b += 1
        else:
            live[bwd_chunk(b)] -= 1
            b += 1
    return best


def bubble_fraction(schedule: str, pp: int, v: int, microbatches: int) -> float:
    """Idle share of a step: ``(pp-1) / (v·m + pp-1)`` (Megatron-LM; v = 1 for GPipe and 1F1B)."""
    if pp == 1:
        return 0.0
    v = v if schedule in MULTI_STAGE_SCHEDULES else 1
    return (pp - 1) / (v * microbatches + pp - 1)


# ---- the plan ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class PlanInputs:
    gpus: int
    gpu_memory: float  # bytes
    pp: int = 1
    virtual_stages: int = 2
    ep: int = 1
    schedule: str = "interleaved_1f1b"
    micro_batch_size: int = 1  # sequences per micro-batch on one dp rank
    seq_len: int = 4096
    global_batch: int = 16384  # sequences per optimizer step (K2: 67M tokens = 16384 x 4096)
    extra_warmup: int = 0
    layers_per_stage: list[int] | None = None
    optimizer: str = "muonclip"
    optimizer_offload: float = 0.0  # share of the optimizer state kept in host memory
    param_bytes: int = 2
    grad_bytes: int = 4
    act_bytes: int = 2
    expert_imbalance: float = 1.0  # tokens of the busiest expert rank / the mean
    headroom: float = 0.1  # share of GPU memory left to the allocator, workspaces and communication buffers
    activations: ActivationOptions = field(default_factory=ActivationOptions)


def check_inputs(cfg: ModelConfig, p: PlanInputs) -> int:
    """Validate a layout; returns dp."""
    if min(p.gpus, p.pp, p.ep, p.micro_batch_size, p.seq_len, p.global_batch) < 1 or p.extra_warmup < 0:
        raise ConfigError(
            "--gpus, --pp, --ep, --micro-batch, --seq-len and --global-batch must be >= 1, --extra-warmup >= 0"
        )
    if p.expert_imbalance < 1.0:
        raise ConfigError(f"--expert-imbalance is the busiest rank's tokens / the mean, >= 1; got {p.expert_imbalance}")
    if p.gpus % p.pp:
        raise ConfigError(f"--pp={p.pp} must divide --gpus={p.gpus} (gpus = pp x dp)")
    dp = p.gpus // p.pp
    if dp % p.ep:
        raise ConfigError(f"--ep={p.ep} must divide dp = gpus/pp = {dp} (an EP group is ep of the dp ranks)")
    if cfg.n_routed_experts % p.ep:
        raise ConfigError(f"--ep={p.ep} must divide the model's {cfg.n_routed_experts} routed experts")
    if p.global_batch % (dp * p.micro_batch_size):
        raise ConfigError(
            f"--global-batch={p.global_batch} sequences must be a multiple of dp x micro-batch = {dp} x "
            f"{p.micro_batch_size}"
        )
    if p.optimizer not in ("muonclip", "adamw"):
        raise ConfigError(f"--optimizer must be muonclip or adamw, got {p.optimizer!r}")
    if not 0.0 <= p.optimizer_offload <= 1.0 or not 0.0 <= p.headroom < 1.0:
        raise ConfigError("--optimizer-offload must be in [0, 1] and --headroom in [0, 1)")
    v = p.virtual_stages if p.pp > 1 else 1
    check_pipeline(
        cfg.num_hidden_layers,
        p.pp,
        v,
        p.schedule,
        p.global_batch // (dp * p.micro_batch_size),
        p.layers_per_stage,
        names=CLI_NAMES,
    )
    return dp


def make_plan(cfg: ModelConfig, p: PlanInputs) -> dict[str, Any]:
    """The plan of ``cfg`` under ``p`` as one JSON-able dict (see the module docstring); bytes are per GPU unless
    the key says otherwise."""
    dp = check_inputs(cfg, p)
    v = p.virtual_stages if p.pp > 1 else 1
    num_stages = p.pp * v
    m = p.global_batch // (dp * p.micro_batch_size)
    tokens = p.micro_batch_size * p.seq_len
    stages = split_layers(cfg, num_stages, p.ep, p.layers_per_stage)
    expert_dp = dp // p.ep
    opt = p.activations

    def opt_bytes(dense_matrix: int, dense_other: int, experts: int) -> float:
        # fp32 master + Muon momentum (matrices) or AdamW moments; ZeRO-1 over dp / the expert replicas
        muon = 2 * F32 if p.optimizer == "muonclip" else 3 * F32
        adam = 3 * F32
        return (dense_matrix * muon + dense_other * adam) / dp + experts * muon / expert_dp

    ranks = []
    for rank in range(p.pp):
        local = [s for s in range(num_stages) if s % p.pp == rank]
        dense = experts = adam_like = 0
        acts, in_out = [], []
        for s in local:
            first, last = s == 0, s == num_stages - 1
            dn, ex = stage_parameters(cfg, stages[s], first, last)
            dense, experts = dense + dn, experts + ex
            adam_like += cfg.vocab_size * cfg.hidden_size * (first + last) + _vector_parameters(cfg, stages[s])
            acts.append(
                activation_bytes(
                    cfg,
                    tokens=tokens,
                    layers=stages[s],
                    first=first,
                    last=last,
                    act_bytes=p.act_bytes,
                    param_bytes=p.param_bytes,
                    options=opt,
                    expert_imbalance=p.expert_imbalance,
                )
            )
            in_out.append(tokens * cfg.hidden_size * p.act_bytes * ((not first) + (not last)))  # kept input/output
        experts_local = experts / p.ep
        live = in_flight(p.schedule, p.pp, v, m, rank, p.extra_warmup)
        # every micro-batch in flight keeps its device bytes and the stage's input/output; of the offloaded bytes
        # only the chunk computing and the one prefetched are on the GPU
        act_bytes = sum(n * (a.device + io) for n, a, io in zip(live, acts, in_out, strict=True))
        act_bytes += 2 * max(a.offloaded for a in acts)
        params = (dense + experts_local) * p.param_bytes
        grads = (dense + experts_local) * p.grad_bytes
        optimizer = opt_bytes(dense - adam_like, adam_like, int(experts_local)) * (1.0 - p.optimizer_offload)
        moe_layers = sum(1 for s in local for i in stages[s] if cfg.is_moe_layer(i))
        ep_bytes = 4 * m * moe_layers * tokens * cfg.num_experts_per_tok * cfg.hidden_size * p.act_bytes
        ep_bytes *= (p.ep - 1) / p.ep
        boundary_sends = sum((s != num_stages - 1) + (s != 0) for s in local)
        pp_bytes = m * boundary_sends * tokens * cfg.hidden_size * p.act_bytes
        dp_bytes = _zero1_bytes(dense, adam_like, dp, p) + _zero1_bytes(experts_local, 0, expert_dp, p)
        ranks.append(
            {
                "rank": rank,
                "stages": local,
                "layers": [[stages[s].start, stages[s].stop] for s in local],
                "params": dense + experts_local,
                "param_bytes": params,
                "grad_bytes": grads,
                "optimizer_bytes": optimizer,
                "state_bytes": params + grads + optimizer,
                "in_flight": live,
                "activation_bytes": act_bytes,
                "total_bytes": params + grads + optimizer + act_bytes,
                "ep_all_to_all_bytes": ep_bytes,
                "pp_send_recv_bytes": pp_bytes,
                "dp_bytes": dp_bytes,
            }
        )
    worst = max(ranks, key=lambda r: r["total_bytes"])
    usable = p.gpu_memory * (1.0 - p.headroom)
    counts_dense = sum(stage_parameters(cfg, stages[s], s == 0, s == num_stages - 1)[0] for s in range(num_stages))
    counts_experts = sum(stage_parameters(cfg, stages[s], False, False)[1] for s in range(num_stages))
    total_params = counts_dense + counts_experts
    inputs = asdict(p)
    inputs["activations"] = asdict(p.activations)
    return {
        "inputs": inputs,
        "dp": dp,
        "expert_dp": expert_dp,
        "microbatches": m,
        "tokens_per_step": p.global_batch * p.seq_len,
        "layers_per_stage": [len(s) for s in stages],
        "total_params": total_params,
        # bf16 parameters + fp32 gradients of one model-parallel group (each parameter counted once)
        "model_state_bytes_total": total_params * (p.param_bytes + p.grad_bytes),
        "param_bytes_per_gpu": worst["param_bytes"],
        "grad_bytes_per_gpu": worst["grad_bytes"],
        "optimizer_bytes_per_gpu": worst["optimizer_bytes"],
        "state_bytes_per_gpu": worst["state_bytes"],
        "activation_bytes_per_gpu": worst["activation_bytes"],
        "total_bytes_per_gpu": worst["total_bytes"],
        "usable_bytes_per_gpu": usable,
        "busiest_rank": worst["rank"],
        "fits": all(r["total_bytes"] <= usable for r in ranks),
        "bubble_fraction": bubble_fraction(p.schedule, p.pp, v, m),
        "ep_all_to_all_bytes_per_gpu": max(r["ep_all_to_all_bytes"] for r in ranks),
        "pp_send_recv_bytes_per_gpu": max(r["pp_send_recv_bytes"] for r in ranks),
        "dp_bytes_per_gpu": max(r["dp_bytes"] for r in ranks),
        "ranks": ranks,
    }


def _vector_parameters(cfg: ModelConfig, layers: range) -> int:
    """Norm gains of the stage's layers (AdamW under MuonClip); the final norm is counted with the LM head."""
    d = cfg.hidden_size
    per_layer = 2 * d + (cfg.q_lora_rank or 0) + cfg.kv_lora_rank
    return per_layer * len(layers)


def _zero1_bytes(params: float, adam_like: float, n: int, p: PlanInputs) -> float:
    """Bytes one rank sends for ZeRO-1 over ``n`` ranks: reduce-scatter of the fp32 gradients, Newton-Schulz
    gather and scatter of the Muon matrices (bf16), all-gather of the bf16 parameters."""
    if n == 1:
        return 0.0
    share = (n - 1) / n
    muon = (params - adam_like) if p.optimizer == "muonclip" else 0
    return share * (params * (p.grad_bytes + p.param_bytes) + muon * 2 * 2)


def format_plan(plan: dict[str, Any], preset: str) -> str:
    """The plan as a human-readable table."""
    i = plan["inputs"]
    acts = [k for k, on in i["activations"].items() if on]
    gb = lambda x: f"{x / GB:8.2f} GB"  # noqa: E731
    lines = [
        f"k2 plan: {preset} on {i['gpus']} GPUs of {i['gpu_memory'] / GB:.0f} GB: pp={i['pp']} x dp={plan['dp']} "
        f"(ep={i['ep']}, expert replicas={plan['expert_dp']}), {i['schedule']} with "
        f"{i['virtual_stages'] if i['pp'] > 1 else 1} stage(s) per rank",
        f"  batch: {i['global_batch']} x {i['seq_len']} tokens per step, micro-batch {i['micro_batch_size']}, "
        f"{plan['microbatches']} micro-batches per dp rank; activation options: {', '.join(acts) or 'none'}",
        f"  layers per stage: {plan['layers_per_stage']}",
        f"  parameters: {plan['total_params'] / 1e9:.1f} B; bf16 params + fp32 grads of the model-parallel group: "
        f"{plan['model_state_bytes_total'] / 1e12:.2f} TB",
        "",
        f"  per GPU (busiest rank {plan['busiest_rank']})",
        f"    parameters        {gb(plan['param_bytes_per_gpu'])}",
        f"    gradients         {gb(plan['grad_bytes_per_gpu'])}",
        f"    optimizer (ZeRO-1){gb(plan['optimizer_bytes_per_gpu'])}"
        + (f"  ({i['optimizer_offload']:.0%} in host memory)" if i["optimizer_offload"] else ""),
        f"    states            {gb(plan['state_bytes_per_gpu'])}",
        f"    activations       {gb(plan['activation_bytes_per_gpu'])}",
        f"    total             {gb(plan['total_bytes_per_gpu'])}  of {gb(plan['usable_bytes_per_gpu'])} usable "
        f"({i['headroom']:.0%} headroom)",
        f"    fits              {'yes' if plan['fits'] else 'NO'}",
        "",
        "  communication per GPU per step",
        f"    EP all-to-all     {gb(plan['ep_all_to_all_bytes_per_gpu'])}",
        f"    PP send/recv      {gb(plan['pp_send_recv_bytes_per_gpu'])}",
        f"    DP (ZeRO-1)       {gb(plan['dp_bytes_per_gpu'])}",
        f"  pipeline bubble     {plan['bubble_fraction']:8.1%}",
        "",
        "  rank  layers                       states  activations  in flight",
    ]
    for r in plan["ranks"]:
        layers = ",".join(f"{a}-{b - 1}" for a, b in r["layers"])
        lines.append(
            f"  {r['rank']:>4}  {layers:<24} {gb(r['state_bytes'])} {gb(r['activation_bytes'])}  {r['in_flight']}"
        )
    return "\n".join(lines)


def parse_bytes(text: str) -> float:
    """``80GB``, ``141GiB``, ``8e10`` → bytes."""
    t = text.strip().upper().replace(" ", "")
    units = {"TIB": 2**40, "GIB": 2**30, "MIB": 2**20, "TB": 1e12, "GB": 1e9, "MB": 1e6, "B": 1}
    for unit, scale in units.items():
        if t.endswith(unit):
            try:
                return float(t[: -len(unit)]) * scale
            except ValueError:
                break
    try:
        return float(t)
    except ValueError:
        raise ConfigError(f"cannot read {text!r} as a size (e.g. 80GB, 141GiB)") from None
