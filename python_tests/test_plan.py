"""``k2 plan`` and ``k2.parallel.plan``.

Oracles:
- the activation model against the bytes autograd really saves (``torch.autograd.graph.saved_tensors_hooks`` on a
  real ``Transformer.loss`` forward of the ``tiny``/``small`` presets, unique storages, parameters excluded), fp32
  and bf16, with and without the balance loss: within 10 % (the model follows the code, so it is much closer);
- the in-flight micro-batches against the order of forwards and backwards that ``torch.distributed.pipelining``
  builds for interleaved 1F1B;
- the K2 report (arXiv 2507.20534 §2.4): BF16 parameters + FP32 gradients ≈ 6 TB over the 256-GPU model-parallel
  group and ≈ 30 GB of states per GPU (optimizer state in host memory at 32 nodes), within 10 %.
"""

from __future__ import annotations

import dataclasses
import itertools
import json

import pytest
import torch
from torch.distributed.pipelining.schedules import ScheduleInterleaved1F1B, _ComputationType

from k2.cli import main
from k2.errors import ConfigError
from k2.model import Transformer, count_parameters, presets
from k2.parallel.activation_model import layer_saved_bytes
from k2.parallel.plan import (
    ActivationOptions,
    PlanInputs,
    activation_bytes,
    bubble_fraction,
    in_flight,
    make_plan,
    split_layers,
    stage_parameters,
)


def saved_bytes(model: Transformer, ids: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves in ``model.loss``'s forward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.loss(ids, ids)
    return sum(seen.values())


@pytest.mark.parametrize(
    "preset,dtype,batch,seq,aux",
    [
        ("tiny", torch.float32, 2, 64, 0.0),
        ("tiny", torch.bfloat16, 2, 64, 0.0),
        ("tiny", torch.bfloat16, 1, 96, 0.01),
        ("small", torch.bfloat16, 1, 64, 0.0),
    ],
)
def test_activation_model_matches_saved_tensors(one_thread, preset, dtype, batch, seq, aux) -> None:
    torch.manual_seed(0)
    cfg = presets.get(preset).replace(aux_loss_alpha=aux)
    model = Transformer(cfg).to(dtype).train()
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    measured = saved_bytes(model, ids)
    predicted = activation_bytes(cfg, tokens=batch * seq, act_bytes=dtype.itemsize)
    assert predicted.offloaded == 0
    assert abs(predicted.device / measured - 1) < 0.10, (predicted, measured)


def test_activation_options_are_the_activation_models() -> None:
    """The planner's flags are K2's option lists, and its blocks' bytes are ``activation_model``'s."""
    cfg = presets.kimi_k2()
    assert ActivationOptions(recompute=True, fp8_storage=True, offload=True).modules() == {
        "recompute": ("norm", "swiglu", "mla_up_proj", "moe_down_proj"),
        "fp8_activations": ("moe_up_proj_input", "swiglu_input"),
        "offload": True,
    }
    assert ActivationOptions(recompute_moe_down=True).modules()["recompute"] == ("moe_down_proj",)
    base = activation_bytes(cfg, tokens=4096).total
    recompute = activation_bytes(cfg, tokens=4096, options=ActivationOptions(recompute=True)).total
    both = activation_bytes(cfg, tokens=4096, options=ActivationOptions(recompute=True, fp8_storage=True)).total
    assert both < recompute < base
    layers = range(3, 5)  # MoE layers inside the pipeline: the blocks only, FP8 kept on the device under offload
    options = ActivationOptions(recompute=True, fp8_storage=True, offload=True)
    stage = activation_bytes(cfg, tokens=4096, layers=layers, first=False, last=False, options=options)
    blocks = [layer_saved_bytes(cfg, i, act_bytes=2, **options.modules()) for i in layers]
    assert stage.device == pytest.approx(4096 * sum(b.device for b in blocks))
    assert stage.offloaded > 4096 * sum(b.offloaded for b in blocks)  # + the router's fp32 weight copies


def torch_interleaved_peak(pp: int, v: int, m: int, rank: int) -> int:
    """Peak forwards-without-backward in torch's own interleaved 1F1B order for ``rank``."""
    sched = ScheduleInterleaved1F1B.__new__(ScheduleInterleaved1F1B)  # the order only; no process group
    sched.pp_group_size, sched.n_local_stages, sched._n_microbatches, sched.rank = pp, v, m, rank
    sched.number_of_rounds = max(1, m // pp)
    sched.microbatches_per_round = m // sched.number_of_rounds
    live = peak = 0
    for action in sched._calculate_single_rank_operations(rank):
        if action is None:
            continue
        if action.computation_type == _ComputationType.FORWARD:
            live += 1
            peak = max(peak, live)
        elif action.computation_type == _ComputationType.FULL_BACKWARD:
            live -= 1
    return peak


@pytest.mark.parametrize("pp,v,m", [(2, 2, 4), (4, 2, 8), (4, 3, 12), (4, 2, 4), (16, 2, 1024)])
def test_in_flight_replays_torch_interleaved_1f1b(pp: int, v: int, m: int) -> None:
    for rank in range(pp):
        assert sum(in_flight("interleaved_1f1b", pp, v, m, rank)) == torch_interleaved_peak(pp, v, m, rank)


def test_schedules_in_flight_and_bubble() -> None:
    assert in_flight("gpipe", 4, 1, 8, 0) == [8]
    assert in_flight("1f1b", 4, 1, 8, 0) == [4] and in_flight("1f1b", 4, 1, 8, 3) == [1]
    assert bubble_fraction("1f1b", 4, 1, 8) == pytest.approx(3 / 11)
    assert bubble_fraction("interleaved_1f1b", 4, 2, 8) == pytest.approx(3 / 19)
    assert bubble_fraction("interleaved_1f1b", 1, 2, 8) == 0.0


def test_split_layers_balances_and_respects_explicit_counts() -> None:
    cfg = presets.kimi_k2()
    stages = split_layers(cfg, 32, ep=16)
    assert stages[0].start == 0 and stages[-1].stop == 61 and all(len(s) >= 1 for s in stages)
    assert all(a.stop == b.start for a, b in itertools.pairwise(stages))
    total = sum(sum(stage_parameters(cfg, s, i == 0, i == 31)) for i, s in enumerate(stages))
    assert total == count_parameters(cfg).total
    assert [len(s) for s in split_layers(presets.tiny(), 2, layers_per_stage=[1, 3])] == [1, 3]
    with pytest.raises(ConfigError):
        split_layers(presets.tiny(), 2, layers_per_stage=[2, 3])


REPORT = PlanInputs(gpus=256, gpu_memory=80e9, pp=16, ep=16, virtual_stages=2, extra_warmup=1, optimizer_offload=1.0)


def test_report_state_memory() -> None:
    plan = make_plan(presets.kimi_k2(), REPORT)
    assert plan["dp"] == 16 and plan["expert_dp"] == 1
    assert abs(plan["model_state_bytes_total"] / 6e12 - 1) < 0.10  # "approximately 6 TB"
    assert abs(plan["state_bytes_per_gpu"] / 30e9 - 1) < 0.10  # "approximately 30 GB ... for all states"
    with_opt = make_plan(presets.kimi_k2(), dataclasses.replace(REPORT, optimizer_offload=0.0))
    assert with_opt["state_bytes_per_gpu"] > plan["state_bytes_per_gpu"]  # why K2 offloads at 32 nodes


def test_plan_cli_json_and_fits(capsys) -> None:
    base = ["plan", "--gpus", "256", "--pp", "16", "--ep", "16", "--extra-warmup", "1", "--optimizer-offload", "1"]
    assert main([*base, "--recompute", "--fp8-storage", "--offload", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert {"state_bytes_per_gpu", "activation_bytes_per_gpu", "fits"} <= plan.keys()
    assert plan["fits"] is True
    assert main([*base, "--json"]) == 0  # no activation reduction: 1024 micro-batches of 4096 tokens do not fit
    assert json.loads(capsys.readouterr().out)["fits"] is False
    assert main(base) == 0
    out = capsys.readouterr().out
    assert "states" in out and "pipeline bubble" in out and "EP all-to-all" in out


@pytest.mark.parametrize(
    "args,message",
    [
        (["--gpus", "250", "--pp", "16"], "must divide --gpus"),
        (["--gpus", "256", "--pp", "64", "--ep", "4"], "stages but the model has 61 layers"),
        (["--gpus", "256", "--pp", "16", "--ep", "16", "--global-batch", "160"], "needs a multiple of --pp=16"),
        (["--gpus", "256", "--pp", "16", "--pp-layers", "30,31"], "--pp-layers"),
        (["--gpus", "256", "--pp", "16", "--schedule", "1f1b"], "runs one stage per rank"),
        (["--gpus", "256", "--pp", "16", "--ep", "3"], "--ep=3 must divide"),
    ],
)
def test_bad_plans_are_one_line_errors(capsys, args: list[str], message: str) -> None:
    assert main(["plan", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("k2 plan: error:") and message in err
