"""Worker of ``test_pipeline.py``: ``torchrun --nproc-per-node=N _pipeline_worker.py OUT SPEC_JSON`` trains the tiny
model through ``k2.parallel.pipeline`` and saves each rank's losses and parameters to ``OUT/rank{r}.pt``;
``reference`` is the one-process run of the same batches (gradient accumulation over the same micro-batches)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from k2.model import Transformer, presets
from k2.optim import MuonClip
from k2.optim.qk_clip import find_attention


def model_config(spec: dict[str, Any]):
    return presets.tiny().replace(aux_loss_alpha=spec.get("aux", 0.01))


def batches(spec: dict[str, Any], step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global step batch ``[G, S]`` (ids, next-token labels), the same in every process."""
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, 512, (spec["rows"], spec["seq"] + 1), generator=g)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def make_optimizer(named: list[tuple[str, torch.nn.Parameter]], attention, spec):
    if spec["optim"] == "adamw":
        return torch.optim.AdamW([p for _, p in named], lr=1e-3, weight_decay=0.1)
    return MuonClip(named, lr=1e-3, weight_decay=0.1, qk_clip_tau=spec.get("tau", 5.0), attention=attention)


def reference(spec: dict[str, Any]) -> dict[str, Any]:
    """One process: ``microbatches`` accumulation micro-batches per step, global clip, bias update."""
    torch.manual_seed(0)
    model = Transformer(model_config(spec)).train()
    opt = make_optimizer(list(model.named_parameters()), find_attention(model), spec)
    m, losses = spec["microbatches"], []
    for step in range(spec["steps"]):
        x, y = batches(spec, step)
        total, load = 0.0, None
        for xb, yb in zip(x.chunk(m), y.chunk(m), strict=True):
            loss = model.loss(xb, yb)
            (loss / m).backward()
            total += float(loss) / m
            load = model.expert_load() if load is None else load + model.expert_load()
        params = [p for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        torch.nn.utils.clip_grads_with_norm_(params, 1.0, norm)
        opt.step()
        model.update_expert_bias(1e-3, load)
        model.reset_max_attention_logits()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    return {"losses": losses, "params": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def main() -> None:
    from k2.parallel import init_parallel
    from k2.parallel.expert import apply_expert_parallel
    from k2.parallel.pipeline import Pipeline, clip_and_step

    out, runs = Path(sys.argv[1]), json.loads(sys.argv[2])
    torch.set_num_threads(1)
    first = runs[0]
    par = init_parallel(
        dp=first["dp"], ep=first.get("ep", 1), pp=first["pp"], timeout_s=120, device=torch.device("cpu")
    )
    results = []
    for spec in runs:
        torch.manual_seed(0)
        model = Transformer(model_config(spec)).train()
        apply_expert_parallel(model, par)
        pipe = Pipeline(
            model,
            par,
            virtual_stages=spec["v"],
            schedule=spec["schedule"],
            microbatches=spec["microbatches"],
            device=torch.device("cpu"),
        )
        del model
        opt = make_optimizer(list(pipe.local.named_parameters()), find_attention(pipe.local), spec)
        if spec["optim"] == "muonclip" and par.dp_group is not None:
            opt = MuonClip(
                list(pipe.local.named_parameters()),
                lr=1e-3,
                weight_decay=0.1,
                qk_clip_tau=spec.get("tau", 5.0),
                attention=find_attention(pipe.local),
                process_group=par.dp_group,
                reduce_gradients=False,
            )
        losses = []
        rows = spec["rows"] // par.dp
        for step in range(spec["steps"]):
            x, y = batches(spec, step)
            x, y = x[par.dp_rank * rows : (par.dp_rank + 1) * rows], y[par.dp_rank * rows : (par.dp_rank + 1) * rows]
            loss = pipe.step(x, y)
            if par.dp_group is not None:
                torch.distributed.all_reduce(loss, group=par.dp_group)
                loss /= par.dp
            record = clip_and_step(pipe, opt, grad_clip=1.0, expert_bias_rate=1e-3, loss=loss)
            losses.append(record["loss"])
        state = {k: v.detach().clone() for k, v in pipe.local.state_dict().items()}
        results.append({"spec": spec, "losses": losses, "params": state, "stages": pipe.local_ids})
    torch.save(results, out / f"rank{par.rank}.pt")
    par.close()


if __name__ == "__main__":
    main()
