"""Expert parallelism (Kimi K2 report §2.4; DeepSeek-V3's EP): each of the ``ep`` ranks of an expert-parallel
group keeps ``E/ep`` of every MoE layer's routed experts and the token copies travel to them by all-to-all.

Dimension legend: T tokens on this rank, D model dim, K top-k, E routed experts (global), L = E/ep local experts,
R rows this rank receives (copies routed to its experts by every rank of its EP group).

``apply_expert_parallel(model, state)`` replaces each ``MoE.experts`` of a built single-device ``Transformer`` by an
:class:`ExpertParallelExperts`: EP rank ``r`` keeps experts ``[r·L, (r+1)·L)`` (``k2.ops.ep_dispatch``'s ownership),
sliced from the full stacks, so every rank built the same seeded initialisation and EP starts from exactly the
one-process weights. Its ``forward`` keeps ``Experts``' contract: ``k2.ops.ep_dispatch`` over the EP group, the
inherited grouped-GEMM ``swiglu`` on the received rows, ``k2.ops.ep_combine`` with the routing weights, and
``tokens_per_expert [E]`` still counts this rank's token copies per global expert (so the dp-sum of loads the
trainer feeds to the expert-bias update is unchanged).

Gradients: the all-to-all's backward brings every EP peer's contribution to the expert weights of rank r, so an
expert gradient is the sum over the EP group's slices; summing it over the expert-replica group (the dp/ep ranks
holding the same experts) covers all dp slices, and dividing by dp gives the global mean, as the dense gradients
averaged over dp (``k2.parallel.data_parallel.reduce_gradients``). The dense parameters stay replicated over dp.

Every rank of an EP group must run the same number of forwards (the exchange is collective), which the trainer
and the evaluation keep.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from k2.model.moe import Experts, MoE
from k2.ops import ep_combine, ep_dispatch
from k2.parallel.mesh import ParallelState

EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")


class ExpertParallelExperts(Experts):
    """This EP rank's ``L = E/ep`` experts of one MoE layer; tokens reach them through ``ep_dispatch``."""

    def __init__(self, experts: Experts, group: Any, ep: int, ep_rank: int) -> None:
        num_experts, intermediate, hidden = experts.w_gate.shape
        local = num_experts // ep
        with torch.device("meta"):  # the parameters are replaced by this rank's slices just below
            super().__init__(local, hidden, intermediate)
        self.num_experts = num_experts  # the routing contract stays global: ids in [0, E), loads [E]
        self.num_local_experts = local
        self.group, self.ep, self.ep_rank = group, ep, ep_rank
        owned = slice(ep_rank * local, (ep_rank + 1) * local)
        for name in EXPERT_WEIGHTS:
            full = getattr(experts, name)
            setattr(self, name, nn.Parameter(full.detach()[owned].clone(), requires_grad=full.requires_grad))

    def forward(
        self, x_TD: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [T, D]``, ``topk_ids [T, K]``, ``topk_weights [T, K]`` → ``y [T, D]``, ``tokens_per_expert [E]``."""
        recv_x, recv_offsets, handle = ep_dispatch(x_TD, topk_ids, self.num_experts, self.group)  # [R, D], [L]
        y = ep_combine(self.swiglu(recv_x, recv_offsets), handle, topk_weights)  # [T, D]
        return y, torch.bincount(topk_ids.reshape(-1), minlength=self.num_experts)

    def gathered(self) -> Experts:
        """A plain ``Experts`` with the whole group's stacks (all-gather over the EP group; collective)."""
        num_experts, hidden, intermediate = self.num_experts, self.w_down.shape[1], self.w_down.shape[2]
        with torch.device("meta"):
            full = Experts(num_experts, hidden, intermediate)
        for name in EXPERT_WEIGHTS:
            mine = getattr(self, name).detach().contiguous()
            parts = [torch.empty_like(mine) for _ in range(self.ep)]
            dist.all_gather(parts, mine, group=self.group)
            setattr(full, name, nn.Parameter(torch.cat(parts), requires_grad=False))
        return full


@dataclass(frozen=True)
class ExpertShard:
    """How one expert-parallel parameter is laid out: this rank holds block ``rank`` of ``size`` equal blocks of
    the global tensor's dim 0 (the expert dim), over ``group``."""

    group: Any
    size: int
    rank: int

    def global_shape(self, local: torch.Size) -> torch.Size:
        return torch.Size([local[0] * self.size, *local[1:]])


def apply_expert_parallel(model: nn.Module, state: ParallelState) -> nn.Module:
    """Replace every ``MoE.experts`` of ``model`` by this rank's expert-parallel slice (no-op when ``ep == 1``);
    returns ``model``. Call it on the built model before creating the optimizer."""
    if state.ep_group is None:
        return model
    for module in model.modules():
        if isinstance(module, MoE) and not isinstance(module.experts, ExpertParallelExperts):
            module.experts = ExpertParallelExperts(module.experts, state.ep_group, state.ep, state.ep_rank)
    return model


def expert_shards(model: nn.Module) -> dict[str, ExpertShard]:
    """``{parameter name: ExpertShard}`` for every expert-parallel parameter of ``model`` (empty without EP)."""
    out = {}
    for prefix, module in model.named_modules():
        if isinstance(module, ExpertParallelExperts):
            for name in EXPERT_WEIGHTS:
                out[f"{prefix}.{name}"] = ExpertShard(module.group, module.ep, module.ep_rank)
    return out


def split_expert_parameters(
    model: nn.Module,
) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """Trainable ``(name, parameter)`` pairs of ``model``: (dense, routed experts) — the routed experts' stacks
    whether or not they are expert-parallel, so the split (and the optimizer's groups) is the same at any layout."""
    experts = {
        f"{prefix}.{name}" for prefix, m in model.named_modules() if isinstance(m, Experts) for name in EXPERT_WEIGHTS
    }
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [(n, p) for n, p in named if n not in experts], [(n, p) for n, p in named if n in experts]


@contextmanager
def gathered_experts(model: nn.Module) -> Iterator[nn.Module]:
    """Collective: within the block, ``model``'s MoE layers hold every expert (plain ``Experts`` gathered over
    the EP group), e.g. for the Hugging Face export; the expert-parallel modules are put back afterwards."""
    swapped = []
    for module in model.modules():
        if isinstance(module, MoE) and isinstance(module.experts, ExpertParallelExperts):
            swapped.append((module, module.experts))
            module.experts = module.experts.gathered()
    try:
        yield model
    finally:
        for module, experts in swapped:
            module.experts = experts
