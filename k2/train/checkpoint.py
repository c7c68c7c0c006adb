"""Training checkpoints with ``torch.distributed.checkpoint`` (DCP): model, optimizer, schedule, data position, RNG.

Layout: ``RUN_DIR/checkpoints/step_00000600/`` holds the DCP files (``.metadata``, one ``__R_0.distcp`` per rank
R that wrote data) and ``meta.json`` (step, world size, model config, time; for people and for the shape check).
The model and optimizer go through ``torch.distributed.checkpoint.state_dict.get_state_dict`` / ``set_state_dict``,
which key optimizer state by parameter name, so a checkpoint does not depend on parameter order.

Resharding: every per-parameter optimizer tensor (momentum, Adam moments) is stored flat, as one ``[numel]`` tensor
per parameter. A single process saves its full state flattened; a ZeRO-1 sharded ``k2.optim.Muon``/``MuonClip``
(built with ``process_group``, ``k2.optim.distributed``) saves each rank's chunk as a ``Shard(0)`` DTensor of that
flat tensor, which is exactly its layout (the chunks of ``ceil(numel / W)`` elements of the flattened parameter),
so no rank gathers anything. DCP then loads a checkpoint into any world size: 2 ranks → 1 process, 1 → 4, etc.
Expert parallelism (``k2.parallel.expert``): an EP rank's expert stacks ``[E/ep, ...]`` are saved as ``Shard(0)``
DTensors of the global ``[E, ...]`` stack over the EP group, and their optimizer state as ``Shard(0)`` DTensors of the
global flat tensor (over the EP group, or a 2-D ``(ep, ep_replica)`` mesh when ZeRO-1 also chunks them over the
expert-replica group: the expert dim is outermost, so EP rank r's block is ``[r·n, (r+1)·n)`` and ZeRO-1 chunks it),
so an EP checkpoint loads in one process and the reverse. Pipeline parallelism: each pipeline rank saves its stages
(``k2.parallel.pipeline.LocalStages``) under the full model's names and loads with ``part=True``, so the shards of all
ranks form the one-process checkpoint and load at any pp. Model parameters are replicated in data parallelism; DCP
writes one copy. ``trainer_state`` (schedule, data
position, counters) must be the same on every rank and is written once. RNG states are per rank (``rng.rankR``):
rank R resumes rank R's generators; a rank beyond the saved world size keeps its own (a warning says so).

Distributed save, on every rank (the function is collective: all ranks call it with the same step):
rank 0 removes leftover temporary directories of a crashed save and creates this save's temporary directory
(``.step_…tmp-XXXX``) and broadcasts its name; every rank writes its shards into that one directory; every rank
reports its result (a barrier); rank 0 writes ``meta.json``, renames the directory into place and deletes old
checkpoints (keep-last-N); a final broadcast of rank 0's result lets every rank return (or raise) together. Only
rank 0 ever deletes anything, and only before the broadcast or after every rank has finished writing.

Atomic: every file is fsynced (DCP's ``sync_files`` plus ``meta.json``), then the directory is renamed into place
and the parent directory fsynced. A crash or SIGKILL at any moment leaves either the complete new checkpoint or
none; the previous ones are removed (keep-last-N) only after the new one is in place. Leftover temporary
directories of a crashed save are never read and are deleted by the next save.

Before loading, the saved tensor shapes are compared with the model's, so a checkpoint of a different model is a
one-line ``CheckpointError`` naming the first differing tensor rather than a DCP stack trace.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from k2.errors import CheckpointError
from k2.parallel.expert import ExpertShard, expert_shards

CHECKPOINT_DIR = "checkpoints"
META_FILE = "meta.json"
_NAME = re.compile(r"^step_(\d{8})$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run as ``(step, path)``, oldest first (temporary directories are ignored)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1][1] if ckpts else None


def rng_state() -> dict[str, Any]:
    """Every random generator the run may draw from (torch CPU and CUDA, NumPy's global, Python's)."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def _quiet_dcp() -> Iterator[None]:
    # Single-process runs: DCP warns that it "assumes the intent" to save/load in one process; that is the intent.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled")
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\.checkpoint")
        yield


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (``value`` itself in a single process)."""
    if not _distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_ranks(value: Any) -> list[Any]:
    """Every rank's ``value``, by rank (a barrier)."""
    if not _distributed():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _describe(e: BaseException | None) -> str | None:
    return None if e is None else f"{type(e).__name__}: {e}"


def _zero1_of(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> Any:
    """The ZeRO-1 sharding that updates ``param`` in a ``k2.optim.Muon``/``MuonClip`` built with a process group,
    else None."""
    from k2.optim.distributed import Zero1

    zero_of = getattr(optimizer, "zero1_of", None)
    zero = zero_of(param) if zero_of is not None else None
    return zero if isinstance(zero, Zero1) else None


class _Meshes:
    """Device meshes for the saved DTensors, one per layout: a ZeRO-1 group, an EP group, or both — a 2-D
    ``(ep, ep_replica)`` mesh whose entry ``[r, q]`` is the rank with EP rank r in replica q (flat index
    ``r·n + q·chunk`` in the global flat state: the expert dim is outermost, ZeRO-1 chunks the local block)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[int, int], Any] = {}

    def __call__(self, zero: Any, ep: ExpertShard | None, device_type: str) -> Any:
        from torch.distributed.device_mesh import DeviceMesh

        key = (id(zero.group) if zero is not None else 0, id(ep.group) if ep is not None else 0)
        if key not in self._cache:
            if ep is None:
                self._cache[key] = DeviceMesh.from_group(zero.group, device_type)
            elif zero is None:
                self._cache[key] = DeviceMesh.from_group(ep.group, device_type)
            else:
                ep_ranks = torch.tensor(dist.get_process_group_ranks(ep.group))  # [ep] global ranks of my replica
                replica_ranks = torch.tensor(dist.get_process_group_ranks(zero.group))  # [dp/ep] of my EP rank
                mesh = ep_ranks[:, None] - dist.get_rank() + replica_ranks[None, :]  # [ep, dp/ep]
                self._cache[key] = DeviceMesh.from_group(
                    [ep.group, zero.group], device_type, mesh=mesh, mesh_dim_names=("ep", "ep_replica")
                )
        return self._cache[key]


def _model_to_saved(model_sd: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """Expert-parallel stacks as ``Shard(0)`` DTensors of the global ``[E, ...]`` stack over the EP group (each EP
    rank writes its experts once; the expert-replica ranks hold copies, which DCP writes once)."""
    experts = expert_shards(model)
    if not experts:
        return model_sd
    from torch.distributed.tensor import DTensor, Shard

    meshes = _Meshes()
    out = dict(model_sd)
    for fqn, ep in experts.items():
        local = model_sd[fqn]
        shape = ep.global_shape(local.shape)
        mesh = meshes(None, ep, local.device.type)
        out[fqn] = DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=shape, stride=_stride(shape))
    return out


def _stride(shape: torch.Size) -> tuple[int, ...]:
    return torch.empty(shape, device="meta").stride()


def _from_saved(state: dict[str, Any]) -> dict[str, Any]:
    from torch.distributed.tensor import DTensor

    return {k: v.to_local() if isinstance(v, DTensor) else v for k, v in state.items()}


def _optim_to_saved(optim_sd: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The checkpoint form of an optimizer state dict: each per-parameter state tensor as a flat ``[numel]`` view of
    the global (one-process) tensor — a ``Shard(0)`` DTensor of it for ZeRO-1 or expert-parallel state; 0-dim
    tensors (Adam's ``step``) and other values as they are. New dicts: ``optim_sd``'s per-parameter dicts are the
    optimizer's own."""
    params = dict(model.named_parameters(remove_duplicate=False))
    experts = expert_shards(model)
    meshes = _Meshes()

    def convert(fqn: str, key: str, value: Any) -> Any:
        p = params[fqn]
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            return value
        zero, ep = _zero1_of(optimizer, p), experts.get(fqn)
        if zero is None and ep is None:
            return value.reshape(-1) if value.shape == p.shape else value
        from torch.distributed.tensor import DTensor, Shard

        expected = zero.shard(p).numel() if zero is not None else p.numel()
        if value.numel() != expected or (zero is not None and value.dim() != 1):
            raise CheckpointError(
                f"optimizer state {fqn}.{key} has shape {list(value.shape)}, not this rank's "
                f"{'ZeRO-1 chunk' if zero is not None else 'expert slice'} of {expected} elements"
            )
        numel = p.numel() * (ep.size if ep is not None else 1)  # of the global flat tensor
        mesh = meshes(zero, ep, value.device.type)
        placements = [Shard(0)] * mesh.ndim
        return DTensor.from_local(
            value.reshape(-1), mesh, placements, run_check=False, shape=torch.Size([numel]), stride=(1,)
        )

    state = {fqn: {k: convert(fqn, k, v) for k, v in entry.items()} for fqn, entry in optim_sd.get("state", {}).items()}
    return {**optim_sd, "state": state}


def _optim_from_saved(optim_sd: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Undo ``_optim_to_saved`` on the loaded state: local chunks for ZeRO-1, the (local) parameter's shape
    otherwise."""
    from torch.distributed.tensor import DTensor

    params = dict(model.named_parameters(remove_duplicate=False))

    def convert(fqn: str, value: Any) -> Any:
        p = params[fqn]
        if isinstance(value, DTensor):
            value = value.to_local()
            return value if _zero1_of(optimizer, p) is not None else value.view(p.shape)
        if isinstance(value, torch.Tensor) and value.dim() == 1 and p.dim() != 1 and value.numel() == p.numel():
            return value.view(p.shape)
        return value

    state = {fqn: {k: convert(fqn, v) for k, v in entry.items()} for fqn, entry in optim_sd.get("state", {}).items()}
    return {**optim_sd, "state": state}


def _remove_stale_temporaries(root: Path) -> None:
    for stale in root.glob(".step_*tmp-*"):  # left by a crashed save
        shutil.rmtree(stale, ignore_errors=True)


def save_checkpoint(
    run_dir: str | os.PathLike[str],
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    *,
    keep_last: int,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Atomically write the checkpoint of ``step`` and delete all but the newest ``keep_last``; returns its path.

    ``trainer_state``: the loop's own state (schedule, data position, counters), the same on every rank; RNG states
    are added here. Under ``torch.distributed`` every rank must call this (see the module docstring).
    """
    root = Path(run_dir) / CHECKPOINT_DIR
    final = root / checkpoint_name(step)
    main = _rank() == 0

    tmp: Path | None = None
    error: BaseException | None = None
    if main:
        try:
            root.mkdir(parents=True, exist_ok=True)
            _remove_stale_temporaries(root)
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
            tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; a checkpoint gets the usual permissions
        except BaseException as e:
            error = e
    shared = _from_rank0((str(tmp), None) if error is None else (None, _describe(error)))
    if error is not None:
        raise error
    if shared[1] is not None:
        raise CheckpointError(f"cannot save checkpoint {final}: rank 0 could not create its directory ({shared[1]})")
    tmp = Path(shared[0])

    try:  # every rank writes its shards into the one directory rank 0 made
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {
            "model": _model_to_saved(model_sd, model),
            "optim": _optim_to_saved(optim_sd, model, optimizer),
            "trainer": trainer_state,
            "rng": {f"rank{_rank()}": rng_state()},
        }
        with _quiet_dcp():
            writer = dcp.FileSystemWriter(tmp, sync_files=True)
            dcp.save(state, storage_writer=writer, no_dist=not dist.is_initialized())
    except BaseException as e:
        error = e
    failed = [(r, msg) for r, msg in enumerate(_all_ranks(_describe(error))) if msg is not None]

    if main:  # every rank has finished writing: rank 0 alone publishes (or discards) the directory
        try:
            if failed:
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                info = {"step": step, "world_size": _world_size(), "time": time.time(), **(meta or {})}
                with open(tmp / META_FILE, "w") as f:
                    json.dump(info, f, indent=2)
                    f.flush()
                    os.fsync(f.fileno())
                _fsync_dir(tmp)
                if final.exists():  # a checkpoint of this step from an earlier attempt: replace it
                    shutil.rmtree(final)
                os.replace(tmp, final)
                _fsync_dir(root)
                for _, old in list_checkpoints(run_dir)[:-keep_last]:
                    shutil.rmtree(old, ignore_errors=True)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            error = error or e
    final_error = _from_rank0(_describe(error) if main else None)
    if error is not None:
        raise error
    if failed:
        rank, msg = failed[0]
        raise CheckpointError(f"cannot save checkpoint {final}: rank {rank} failed ({msg})")
    if final_error is not None:
        raise CheckpointError(f"cannot save checkpoint {final}: rank 0 failed ({final_error})")
    return final


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``meta.json`` of a checkpoint; ``CheckpointError`` if it is missing or unreadable."""
    file = Path(path) / META_FILE
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"damaged checkpoint {path}: cannot read {META_FILE} ({e})") from None


def _read_dcp_metadata(path: str | os.PathLike[str]) -> Any:
    try:
        with _quiet_dcp():
            return dcp.FileSystemReader(path).read_metadata()
    except Exception as e:
        raise CheckpointError(f"damaged checkpoint {path}: cannot read its DCP metadata ({e})") from None


def check_shapes(path: str | os.PathLike[str], model: nn.Module, metadata: Any = None, *, part: bool = False) -> None:
    """``CheckpointError`` unless the checkpoint's model tensors have exactly this model's names and shapes
    (``part``: this model's tensors are among them: one pipeline rank's stages, ``k2.parallel.pipeline``)."""
    metadata = metadata or _read_dcp_metadata(path)
    saved = {
        k.removeprefix("model."): tuple(v.size)
        for k, v in metadata.state_dict_metadata.items()
        if k.startswith("model.") and isinstance(v, TensorStorageMetadata)
    }
    experts = expert_shards(model)  # compared at their global shape
    mine = {
        k: tuple(experts[k].global_shape(v.shape) if k in experts else v.shape) for k, v in model.state_dict().items()
    }
    for name, shape in mine.items():
        if name not in saved:
            raise CheckpointError(f"checkpoint {path} is of a different model: it has no tensor {name}")
        if saved[name] != shape:
            raise CheckpointError(
                f"checkpoint {path} is of a different model shape: {name} is {list(saved[name])} in the checkpoint "
                f"but {list(shape)} in this model"
            )
    extra = sorted(set(saved) - set(mine))
    if extra and not part:
        raise CheckpointError(f"checkpoint {path} is of a different model: this model has no tensor {extra[0]}")


def load_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_template: dict[str, Any],
    *,
    part: bool = False,
) -> dict[str, Any]:
    """Load a checkpoint into ``model`` and ``optimizer`` in place, restore this rank's RNG states, and return the
    saved trainer state (same keys as ``trainer_template``, whose values only give the structure). Under
    ``torch.distributed`` every rank must call this; the checkpoint may come from any world size. ``part``: ``model``
    holds some of the checkpoint's tensors (a pipeline rank's stages under the full model's names, so a checkpoint
    loads at any pp)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path}")
    read_meta(path)
    metadata = _read_dcp_metadata(path)
    check_shapes(path, model, metadata, part=part)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    # The param groups (names and hyperparameters, no state) are written once, by rank 0: a pipeline rank keeps its
    # own, which list its parameters and were built from the same config.
    own_groups = [{**g, "params": list(g["params"])} for g in optim_sd["param_groups"]]
    optim_sd = _optim_to_saved(optim_sd, model, optimizer)
    state: dict[str, Any] = {
        "model": _model_to_saved(model_sd, model),
        "optim": optim_sd,
        "trainer": dict(trainer_template),
    }
    rng_key = f"rank{_rank()}"
    has_rng = any(k.startswith(f"rng.{rng_key}.") for k in metadata.state_dict_metadata)
    if has_rng:
        state["rng"] = {rng_key: rng_state()}
    else:
        warnings.warn(
            f"checkpoint {path} has no RNG state for rank {_rank()} (saved by fewer ranks); this rank keeps its own",
            stacklevel=2,
        )
    try:
        with _quiet_dcp():
            dcp.load(state, storage_reader=dcp.FileSystemReader(path), no_dist=not dist.is_initialized())
    except Exception as e:
        raise CheckpointError(f"cannot load checkpoint {path}: {str(e).strip().splitlines()[-1]}") from None
    optim_sd = _optim_from_saved(state["optim"], model, optimizer)
    if part:
        optim_sd["param_groups"] = own_groups
    set_state_dict(model, optimizer, model_state_dict=_from_saved(state["model"]), optim_state_dict=optim_sd)
    if has_rng:
        set_rng_state(state["rng"][rng_key])
    return dict(state["trainer"])
