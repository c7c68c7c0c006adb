"""The process layout of a distributed run: ``torch.distributed`` from torchrun's environment, a ``pp × dp``
``DeviceMesh`` and the expert-parallel groups drawn from dp as in Kimi K2 (arXiv 2507.20534 §2.4).

Layout (global rank = pp_index · dp + dp_rank):
- ``dp``: the data-parallel ranks of one pipeline stage; each reads its slice of every global batch, holds the
  dense parameters replicated and 1/dp of their optimizer state (ZeRO-1).
- ``ep``: ``ep`` consecutive dp ranks form one expert-parallel group that together holds all experts (E/ep each);
  ``ep_rank = dp_rank mod ep``.
- expert-replica group: the dp ranks with the same ``ep_rank`` hold the same experts (dp/ep of them).
- ``pp``: the ranks with the same ``dp_rank`` form one pipeline (``pp_group``); ``pp_rank = rank // dp`` holds its
  stages (``k2.parallel.pipeline``).

Backend: NCCL when the run's device is CUDA, gloo on the CPU; the collective timeout is ``parallel.timeout_s``.
One process (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) initialises nothing: every group is None and the trainer runs
exactly its single-device code. The state is a frozen dataclass passed to whoever needs it (no module globals).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


def world_size_from_env() -> int:
    """``WORLD_SIZE`` set by torchrun (1 without it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank_from_env() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


@dataclass(frozen=True)
class ParallelState:
    """Where this process sits in the run; groups are None when their size is 1."""

    rank: int = 0  # global rank
    world_size: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1
    dp_rank: int = 0
    ep_rank: int = 0
    pp_rank: int = 0  # pipeline rank: global rank // dp
    device_mesh: Any = None  # DeviceMesh over ("pp", "dp"); None in one process
    dp_group: Any = None
    pp_group: Any = None  # the pp ranks with this dp_rank (one pipeline)
    ep_group: Any = None  # the ep ranks that together hold all experts
    expert_replica_group: Any = None  # the dp/ep ranks holding this rank's experts
    owns_process_group: bool = False  # init_parallel started torch.distributed (close() ends it)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints and writes run files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def close(self) -> None:
        """End torch.distributed if this state started it."""
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()


def init_parallel(*, dp: int, ep: int, pp: int, timeout_s: float, device: torch.device) -> ParallelState:
    """Initialise ``torch.distributed`` from torchrun's environment (unless the caller already did) and build the
    mesh and groups; a single process returns the trivial state. The caller has checked ``pp·dp = WORLD_SIZE``
    and ``ep | dp`` (``k2.train.config.validate_parallel``); this re-checks cheaply."""
    world = dist.get_world_size() if dist.is_initialized() else world_size_from_env()
    if pp * dp != world or dp % ep:
        raise ValueError(f"k2.parallel: pp={pp}, dp={dp}, ep={ep} do not fit WORLD_SIZE={world}")
    if world == 1:
        return ParallelState()
    owns = not dist.is_initialized()
    if owns:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend, timeout=timedelta(seconds=timeout_s), device_id=device if device.type == "cuda" else None
        )
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    rank = dist.get_rank()
    mesh = init_device_mesh(device.type, (pp, dp), mesh_dim_names=("pp", "dp"))
    dp_rank = rank % dp
    ep_group = replica_group = None
    if ep > 1:
        # Same ranks as the ("pp", "dp") mesh, dp split into (dp/ep replicas) × (ep consecutive ranks).
        expert_mesh = DeviceMesh(
            device.type, torch.arange(world).view(pp, dp // ep, ep), mesh_dim_names=("pp", "ep_replica", "ep")
        )
        ep_group = expert_mesh.get_group("ep")
        replica_group = expert_mesh.get_group("ep_replica") if dp // ep > 1 else None
    else:
        replica_group = mesh.get_group("dp") if dp > 1 else None
    return ParallelState(
        rank=rank,
        world_size=world,
        pp=pp,
        dp=dp,
        ep=ep,
        dp_rank=dp_rank,
        ep_rank=dp_rank % ep,
        pp_rank=rank // dp,
        device_mesh=mesh,
        dp_group=mesh.get_group("dp") if dp > 1 else None,
        pp_group=mesh.get_group("pp") if pp > 1 else None,
        ep_group=ep_group,
        expert_replica_group=replica_group,
        owns_process_group=owns,
    )
