"""Weight sync from the trainer to the rollout engine, in the style of Moonshot's checkpoint-engine (Kimi K2 report,
arXiv 2507.20534 §3.3 and App. G; github.com/MoonshotAI/checkpoint-engine).

Two modes:

- :class:`ColocatedSync`: trainer and engine in one process, each with its own model (the engine's may have another
  dtype or device). Tensors are walked in a fixed order and packed into buckets of at most ``bucket_bytes``: a bucket
  is one staging copy (cast on the source device into a reusable buffer), one transfer, then per-tensor copies
  into the destination; when source and destination share a device and dtype each tensor is copied directly. No
  full-model temporary is made; the extra memory is at most two buckets.
- :class:`BroadcastSender` / :class:`BroadcastReceiver`: the engine runs in other processes that share a
  ``torch.distributed`` group with the trainer (gloo on CPU, NCCL on GPU). The metadata (names, shapes, dtypes,
  bucket layout) is broadcast once, at construction; every sync then broadcasts fixed-size flat buckets from the
  trainer's rank, double-buffered: the sender packs bucket b+1 while bucket b is in flight, the receiver unpacks
  bucket b while b+1 arrives. The receiver's tensors are bit-identical to the sender's (tested).

What is synced: the model's ``state_dict`` tensors (parameters and buffers such as the experts' score-correction
bias), so the engine's forward is the trainer's.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

DEFAULT_BUCKET_BYTES = 64 << 20


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state-dict tensors of ``model``, detached views sharing its storage."""
    return {k: v for k, v in model.state_dict(keep_vars=False).items() if isinstance(v, torch.Tensor)}


@dataclass(frozen=True)
class _Entry:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int  # elements into the bucket
    numel: int


def plan_buckets(
    tensors: dict[str, torch.Tensor], bucket_bytes: int, dtype: torch.dtype | None = None
) -> list[list[_Entry]]:
    """Tensors (in the dict's order) grouped into buckets of at most ``bucket_bytes`` (a larger tensor gets a
    bucket of its own); all entries of a bucket share one dtype (``dtype`` if given, else the tensor's)."""
    buckets: list[list[_Entry]] = []
    size, current_dtype = 0, None
    for name, t in tensors.items():
        dt = dtype or t.dtype
        nbytes = t.numel() * torch.empty((), dtype=dt).element_size()
        if not buckets or size + nbytes > bucket_bytes or dt != current_dtype:
            buckets.append([])
            size, current_dtype = 0, dt
        offset = size // torch.empty((), dtype=dt).element_size()
        buckets[-1].append(_Entry(name, tuple(t.shape), dt, offset, t.numel()))
        size += nbytes
    return buckets


def _bucket_numel(bucket: list[_Entry]) -> int:
    return bucket[-1].offset + bucket[-1].numel


class ColocatedSync:
    """Copy ``src``'s tensors into ``dst`` (same architecture) in buckets; call :meth:`sync` after each update."""

    def __init__(
        self, src: nn.Module, dst: nn.Module, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES, staged: bool | None = None
    ) -> None:
        self.src, self.dst = _tensors(src), _tensors(dst)
        if self.src.keys() != self.dst.keys():
            missing = sorted(set(self.src) ^ set(self.dst))
            raise ValueError(f"ColocatedSync: the models differ in tensor {missing[0]!r}")
        for k, v in self.src.items():
            if v.shape != self.dst[k].shape:
                raise ValueError(
                    f"ColocatedSync: {k} is {list(v.shape)} in the trainer, {list(self.dst[k].shape)} in the engine"
                )
        # Group by destination dtype (the staging buffer holds values already cast).
        self.buckets = plan_buckets({k: self.dst[k] for k in self.src}, bucket_bytes)
        # Direct per-tensor copies when nothing crosses a device (``staged=True`` forces the bucketed path).
        self._direct = not staged and all(self.src[k].device == self.dst[k].device for k in self.src)
        self._staging: dict[torch.dtype, torch.Tensor] = {}
        self.bytes = sum(v.numel() * v.element_size() for v in self.dst.values())

    @torch.no_grad()
    def sync(self) -> None:
        for bucket in self.buckets:
            if self._direct:
                for e in bucket:
                    self.dst[e.name].copy_(self.src[e.name])
                continue
            dtype, n = bucket[0].dtype, _bucket_numel(bucket)
            src_device = self.src[bucket[0].name].device
            buf = self._staging.get(dtype)
            if buf is None or buf.numel() < n:
                buf = self._staging[dtype] = torch.empty(n, dtype=dtype, device=src_device)
            for e in bucket:  # pack (cast on the source device)
                buf[e.offset : e.offset + e.numel].view(e.shape).copy_(self.src[e.name])
            moved = buf[:n].to(self.dst[bucket[0].name].device, non_blocking=True)
            for e in bucket:
                self.dst[e.name].copy_(moved[e.offset : e.offset + e.numel].view(e.shape))


class _Broadcast:
    def __init__(self, tensors: dict[str, torch.Tensor], buckets: list[list[_Entry]], src: int, group, device) -> None:
        self.tensors, self.buckets, self.src, self.group = tensors, buckets, src, group
        numel = {dt: max(_bucket_numel(b) for b in buckets if b[0].dtype == dt) for dt in {b[0].dtype for b in buckets}}
        # Two flat buffers per dtype: one in flight while the other is packed / unpacked.
        self.buffers = {dt: [torch.empty(n, dtype=dt, device=device) for _ in range(2)] for dt, n in numel.items()}
        self.bytes = sum(_bucket_numel(b) * b[0].dtype.itemsize for b in buckets)

    def _slots(self) -> Iterator[tuple[list[_Entry], torch.Tensor]]:
        for i, bucket in enumerate(self.buckets):
            yield bucket, self.buffers[bucket[0].dtype][i % 2][: _bucket_numel(bucket)]


class BroadcastSender(_Broadcast):
    """The trainer's side: ``model``'s tensors go to every rank of ``group`` from rank ``src`` (this process).
    Construction broadcasts the metadata once (collective with :class:`BroadcastReceiver`)."""

    def __init__(self, model: nn.Module, *, src: int = 0, group=None, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
        tensors = _tensors(model)
        buckets = plan_buckets(tensors, bucket_bytes)
        dist.broadcast_object_list([buckets], src=src, group=group)
        device = next(iter(tensors.values())).device
        super().__init__(tensors, buckets, src, group, device)

    @torch.no_grad()
    def sync(self) -> None:
        pending: list = [None, None]
        for i, (bucket, buf) in enumerate(self._slots()):
            if pending[i % 2] is not None:  # this buffer's previous bucket must have left
                pending[i % 2].wait()
            for e in bucket:
                buf[e.offset : e.offset + e.numel].view(e.shape).copy_(self.tensors[e.name])
            pending[i % 2] = dist.broadcast(buf, src=self.src, group=self.group, async_op=True)
        for work in pending:
            if work is not None:
                work.wait()


class BroadcastReceiver(_Broadcast):
    """A rollout process's side: receives into ``model``'s tensors (same names and shapes, any dtype)."""

    def __init__(self, model: nn.Module, *, src: int = 0, group=None) -> None:
        holder: list = [None]
        dist.broadcast_object_list(holder, src=src, group=group)
        buckets: list[list[_Entry]] = holder[0]
        tensors = _tensors(model)
        for e in (e for b in buckets for e in b):
            if e.name not in tensors or tuple(tensors[e.name].shape) != e.shape:
                raise ValueError(f"BroadcastReceiver: the sender's {e.name} {list(e.shape)} does not fit this model")
        device = next(iter(tensors.values())).device
        super().__init__(tensors, buckets, src, group, device)

    @torch.no_grad()
    def sync(self) -> None:
        slots = list(self._slots())
        if not slots:
            return
        works = [dist.broadcast(slots[0][1], src=self.src, group=self.group, async_op=True)]
        for i, (bucket, buf) in enumerate(slots):
            if i + 1 < len(slots):  # post the next receive into the other buffer before unpacking this one
                works.append(dist.broadcast(slots[i + 1][1], src=self.src, group=self.group, async_op=True))
            works[i].wait()
            for e in bucket:
                self.tensors[e.name].copy_(buf[e.offset : e.offset + e.numel].view(e.shape))
