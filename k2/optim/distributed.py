"""ZeRO-1 distributed Muon (Moonlight, arXiv 2502.16982 §2.3, Algorithm 1) over a data-parallel process group.

Every rank holds the full parameters (data parallelism) but only a 1/W slice of the optimizer state: each
parameter's flattened elements are cut into W equal chunks (the last padded) and rank r owns chunk r. One step:

1. average the gradients over the group and keep the local chunk (reduce-scatter on NCCL; all-reduce + slice on
   gloo, which has no reduce-scatter), fp32 or the gradient's dtype;
2. update the momentum of the local chunk (and AdamW's moments, for ``MuonClip``'s non-matrix parameters);
3. Newton-Schulz needs whole matrices, so each Muon parameter has an *owner* rank (greedy balance of the NS cost
   ``numel · min(A, B)``): the chunks of its Newton-Schulz input are gathered to the owner in bf16 (the first
   thing Newton-Schulz does is cast to bf16, so this is exact and halves the traffic), the owner orthogonalises
   all of its matrices in batched calls, and scatters each rank its chunk of the result;
4. each rank applies weight decay and the update to its chunk of the parameter;
5. the parameters are all-gathered so every rank holds the full updated weights again.

Deviation from Moonlight: it gathers every matrix to every rank and runs Newton-Schulz redundantly; gathering to
one owner per matrix and scattering back moves the same bytes and divides the Newton-Schulz work by W.
The result equals single-process Muon up to the summation order of the gradient average. Collective calls are
identical on every rank, so all ranks must pass the same parameters, in the same order, with gradients present on
the same ones. An optimizer may hold several ``Zero1`` (one per param group ``process_group``: expert-parallel stacks
are sharded over the ranks that hold the same experts, not over dp); each runs the step above for its parameters.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from k2.optim.muon import apply_update_, momentum_, orthogonalize_groups

if TYPE_CHECKING:
    from torch.optim import Optimizer


class Zero1:
    """The sharding of one data-parallel group; created by ``Muon``/``MuonClip`` when given ``process_group``."""

    def __init__(self, group: Any, reduce_gradients: bool) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.reduce_gradients = reduce_gradients
        self.has_reduce_scatter = dist.get_backend(group) != "gloo"

    @classmethod
    def create(cls, group: Any, reduce_gradients: bool) -> Zero1 | None:
        """None when no group is given or the group has one rank (the local step is then identical)."""
        if group is None:
            return None
        if not dist.is_initialized():
            raise RuntimeError("k2.optim: process_group was given but torch.distributed is not initialised")
        return cls(group, reduce_gradients) if dist.get_world_size(group) > 1 else None

    # ---- layout ------------------------------------------------------------------------------------------

    def chunk(self, numel: int) -> int:
        """Elements per rank of a tensor of ``numel`` elements (the last chunks are padded)."""
        return -(-numel // self.world)

    def shard(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's chunk of ``t`` as a view of its flattened storage (length ≤ ``chunk``, possibly 0)."""
        flat = t.view(-1)
        c = self.chunk(flat.numel())
        return flat[min(self.rank * c, flat.numel()) : min((self.rank + 1) * c, flat.numel())]

    def _padded(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``t`` flattened, zero-padded to W·chunk and viewed ``[W, chunk]``."""
        flat = t.reshape(-1).to(dtype or t.dtype)
        c = self.chunk(flat.numel())
        return torch.nn.functional.pad(flat, (0, self.world * c - flat.numel())).view(self.world, c)

    # ---- collectives -------------------------------------------------------------------------------------

    def grad_shards(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """This rank's chunk of each gradient, averaged over the group when ``reduce_gradients``."""
        if not self.reduce_gradients:
            return [self.shard(g.contiguous()).clone() for g in grads]
        out: list[torch.Tensor | None] = [None] * len(grads)
        by_dtype: dict[tuple, list[int]] = defaultdict(list)
        for i, g in enumerate(grads):
            by_dtype[(g.dtype, g.device)].append(i)
        for idx in by_dtype.values():
            blocks = [self._padded(grads[i]) for i in idx]  # each [W, c_i]
            table = torch.cat(blocks, dim=1)  # [W, C]: row w holds rank w's chunk of every gradient
            if self.has_reduce_scatter:
                mine = table.new_empty(table.shape[1])
                dist.reduce_scatter_tensor(mine, table.reshape(-1), group=self.group)
            else:
                dist.all_reduce(table, group=self.group)
                mine = table[self.rank]
            mine = mine / self.world
            for i, piece in zip(idx, mine.split([b.shape[1] for b in blocks]), strict=True):
                out[i] = piece[: self.shard(params[i]).numel()]
        return out  # type: ignore[return-value]

    def all_gather_params(self, params: list[torch.Tensor]) -> None:
        """Rebuild every full parameter from the ranks' updated chunks."""
        by_dtype: dict[tuple, list[torch.Tensor]] = defaultdict(list)
        for p in params:
            by_dtype[(p.dtype, p.device)].append(p)
        for group_params in by_dtype.values():
            sizes = [self.chunk(p.numel()) for p in group_params]
            mine = torch.cat([self._padded(p)[self.rank] for p in group_params])  # [C]
            parts = [torch.empty_like(mine) for _ in range(self.world)]
            dist.all_gather(parts, mine, group=self.group)
            table = torch.stack(parts)  # [W, C]
            for p, block in zip(group_params, table.split(sizes, dim=1), strict=True):
                p.view(-1).copy_(block.reshape(-1)[: p.numel()])

    def owners(self, params: list[torch.Tensor]) -> list[int]:
        """Owner rank of each parameter's Newton-Schulz: largest cost first onto the least-loaded rank."""
        cost = [p.numel() * min(p.shape[-2], p.shape[-1]) for p in params]
        load = [0] * self.world
        owner = [0] * len(params)
        for i in sorted(range(len(params)), key=lambda i: (-cost[i], i)):
            r = min(range(self.world), key=lambda r: (load[r], r))
            owner[i] = r
            load[r] += cost[i]
        return owner

    def orthogonalize_sharded(
        self, params: list[torch.Tensor], u_shards: list[torch.Tensor], groups: list[dict[str, Any]]
    ) -> list[torch.Tensor]:
        """Gather each parameter's Newton-Schulz input to its owner, orthogonalise there, return local chunks."""
        owner = self.owners(params)
        sizes = [self.chunk(p.numel()) for p in params]
        result: list[torch.Tensor | None] = [None] * len(params)
        for o in range(self.world):
            idx = [i for i in range(len(params)) if owner[i] == o]
            if not idx:
                continue
            send = torch.cat(
                [torch.nn.functional.pad(u_shards[i].bfloat16(), (0, sizes[i] - u_shards[i].numel())) for i in idx]
            )  # [C_o] bf16
            gathered = [torch.empty_like(send) for _ in range(self.world)] if self.rank == o else None
            dist.gather(send, gathered, group=self.group, group_dst=o)
            scatter_list = None
            if self.rank == o:
                table = torch.stack(gathered)  # [W, C_o]: column block i holds parameter idx[i]
                blocks = table.split([sizes[i] for i in idx], dim=1)
                full = [
                    b.reshape(-1)[: params[i].numel()].view(params[i].shape) for i, b in zip(idx, blocks, strict=True)
                ]
                ortho = orthogonalize_groups(full, [groups[i] for i in idx])
                scatter_list = list(torch.cat([self._padded(x) for x in ortho], dim=1).unbind(0))  # W × [C_o]
            mine = torch.empty_like(send)
            dist.scatter(mine, scatter_list, group=self.group, group_src=o)
            for i, piece in zip(idx, mine.split([sizes[i] for i in idx]), strict=True):
                result[i] = piece[: u_shards[i].numel()]
        return result  # type: ignore[return-value]

    # ---- the step ----------------------------------------------------------------------------------------

    def muon_step(
        self, opt: Optimizer, params: list[torch.Tensor], grads: list[torch.Tensor], groups: list[dict[str, Any]]
    ) -> None:
        """Steps 1–5 of the module docstring for Muon parameters; momentum state is the local chunk."""
        if not params:
            return
        g_shards = self.grad_shards(params, grads)
        bufs = []
        for p, g in zip(params, g_shards, strict=True):
            state = opt.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(g)
            bufs.append(state["momentum_buffer"])
        by_momentum: dict[tuple[float, bool], list[int]] = defaultdict(list)
        for i, g in enumerate(groups):
            by_momentum[(g["momentum"], g["nesterov"])].append(i)
        u_shards: list[torch.Tensor | None] = [None] * len(params)
        for (mu, nesterov), idx in by_momentum.items():
            us = momentum_([g_shards[i] for i in idx], [bufs[i] for i in idx], mu, nesterov)
            for i, u in zip(idx, us, strict=True):
                u_shards[i] = u
        o_shards = self.orthogonalize_sharded(params, u_shards, groups)  # type: ignore[arg-type]
        apply_update_([self.shard(p) for p in params], o_shards, [p.shape for p in params], groups)
        self.all_gather_params(params)
