"""Weight sync from the trainer to the rollout engine, in the style of Moonshot's checkpoint-engine (Kimi K2 report,
arXiv 2507.20534 §3.3 and App. G; github.com/MoonshotAI/checkpoint-engine).

Two modes:

- :class:`ColocatedSync`: trainer and engine in one process, each with its own model (the engine's may have another
  dtype or device). On one device every tensor is copied straight into its destination; across devices tensors are
  packed into buckets of at most ``bucket_bytes`` (one staging copy, cast on the source device into a reusable
  buffer, one transfer, then per-tensor copies into the destination). No full-model temporary is made; the extra
  memory is at most one bucket per dtype on each side.
- :class:`BroadcastSender` / :class:`BroadcastReceiver`: the engine runs in other processes that share a
  ``torch.distributed`` group with the trainer (gloo on CPU, NCCL on GPU): the default group, or one of its own
  (:func:`sync_group`, gloo), which leaves the default group to the trainer's own parallelism (its checkpoints,
  for one, are collective over the default group). The metadata (names, shapes, dtypes,
  bucket layout) is broadcast once, at construction. Every sync is then: a header (sync id, or shutdown) from the
  trainer's rank; an acknowledgement from every rank once it is ready to load (a server pauses its engine first);
  the buckets, double-buffered (the sender packs bucket b+1 while bucket b is in flight, the receiver unpacks b
  while b+1 arrives); a final acknowledgement once every receiver holds the new weights. So when
  :meth:`BroadcastSender.sync` returns, every receiver computes with the new weights, and no receiver computes
  while they load. The receiver's tensors are bit-identical to the sender's (tested).

Copies: a tensor of at least half a bucket gets a bucket of its own and travels in place (broadcast from the
trainer's tensor straight into the receiver's, when both are contiguous and of the bucket's dtype), so the staging
copies touch only the small tensors. CPU copies within one dtype are memory copies: ``CHUNK_BYTES`` pieces, each
one single-threaded ``np.copyto``, spread over ``torch.get_num_threads()`` threads. Measured on a loaded 2-core
machine (the `small` preset, 902 MB), this runs at the speed of one flat ``copy_`` of the same bytes, where one
``torch`` ``copy_`` per tensor (each one an OpenMP region whose threads wait for each other) took 1.4 to 4 times as
long.

What is synced: the model's ``state_dict`` tensors (parameters and buffers such as the experts' score-correction
bias), so the engine's forward is the trainer's.
"""

from __future__ import annotations

import datetime
import pickle
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

DEFAULT_BUCKET_BYTES = 64 << 20
CHUNK_BYTES = 4 << 20  # one unit of work of the threaded CPU copies

_SHUTDOWN, _SYNC = 0, 1  # header commands


def sync_group(init_method: str, rank: int, world_size: int, timeout: datetime.timedelta) -> dist.ProcessGroup:
    """A gloo group of ``world_size`` processes for the weight sync alone, not the default group (and not
    registered with ``torch.distributed``: pass it as ``group``). ``init_method``: ``tcp://HOST:PORT`` (rank 0
    listens) or ``file://PATH``, as for ``torch.distributed.init_process_group``."""
    store, _, _ = next(dist.rendezvous(init_method, rank, world_size, timeout=timeout))
    return dist.ProcessGroupGloo(dist.PrefixStore("k2-weight-sync", store), rank, world_size, timeout)


def _broadcast_object(obj: object, src: int, group, device: torch.device) -> object:
    """``obj`` of rank ``src`` (pickled; ``None`` on the other ranks) on every rank of ``group``."""
    data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8) if group.rank() == src else None
    size = torch.tensor([0 if data is None else data.numel()], dtype=torch.int64, device=device)
    group.broadcast(size, src).wait()
    buf = data.to(device) if data is not None else torch.empty(int(size[0]), dtype=torch.uint8, device=device)
    group.broadcast(buf, src).wait()
    return pickle.loads(buf.cpu().numpy().tobytes())


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
    """Tensors (in the dict's order) grouped into buckets of at most ``bucket_bytes``; a tensor of at least half a
    bucket gets a bucket of its own (it may exceed ``bucket_bytes``). All entries of a bucket share one dtype
    (``dtype`` if given, else the tensor's)."""
    buckets: list[list[_Entry]] = []
    size, open_dtype = 0, None  # open_dtype: the dtype of the bucket still taking tensors (None: closed)
    for name, t in tensors.items():
        dt = dtype or t.dtype
        nbytes = t.numel() * dt.itemsize
        solo = 2 * nbytes >= bucket_bytes
        if solo or dt != open_dtype or size + nbytes > bucket_bytes:
            buckets.append([])
            size, open_dtype = 0, dt
        buckets[-1].append(_Entry(name, tuple(t.shape), dt, size // dt.itemsize, t.numel()))
        size += nbytes
        if solo:
            open_dtype = None
    return buckets


def _bucket_numel(bucket: list[_Entry]) -> int:
    return bucket[-1].offset + bucket[-1].numel


def _slice(buf: torch.Tensor, e: _Entry) -> torch.Tensor:
    return buf[e.offset : e.offset + e.numel].view(e.shape)


def _pool(tensors: list[torch.Tensor]) -> ThreadPoolExecutor | None:
    """Threads for the CPU memory copies (None: one CPU thread is enough, or the tensors are on an accelerator)."""
    threads = torch.get_num_threads()
    if threads < 2 or any(t.device.type != "cpu" for t in tensors):
        return None
    return ThreadPoolExecutor(threads, thread_name_prefix="k2-weight-sync")


def _memcpy(pairs: list[tuple[np.ndarray, np.ndarray]]) -> None:
    for dst, src in pairs:
        np.copyto(dst, src)  # releases the GIL


def _torch_copy(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for dst, src in pairs:
            dst.copy_(src)


class _Copies:
    """``dst.copy_(src)`` for a fixed list of same-shape pairs. CPU pairs of one dtype, both contiguous, are plain
    memory copies: cut into ``CHUNK_BYTES`` chunks of their bytes (NumPy views of the same memory), dealt
    round-robin to the pool's threads, each chunk one ``np.copyto`` (single-threaded, no OpenMP region); the rest
    (casts, strided or CUDA tensors) are ``torch`` copies in the calling thread."""

    def __init__(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], pool: ThreadPoolExecutor | None) -> None:
        self.pool = pool
        self.other: list[tuple[torch.Tensor, torch.Tensor]] = []
        chunks: list[tuple[np.ndarray, np.ndarray]] = []
        for dst, src in pairs:
            plain = dst.dtype == src.dtype and dst.is_contiguous() and src.is_contiguous()
            if not (plain and dst.device.type == src.device.type == "cpu"):
                self.other.append((dst, src))
                continue
            d, s = _bytes(dst), _bytes(src)
            chunks += [(d[i : i + CHUNK_BYTES], s[i : i + CHUNK_BYTES]) for i in range(0, d.size, CHUNK_BYTES)]
        n = pool._max_workers if pool is not None else 1
        self.parts = [p for p in (chunks[i::n] for i in range(n)) if p]

    def run(self) -> None:
        if self.pool is not None and len(self.parts) > 1:
            list(self.pool.map(_memcpy, self.parts))
        else:
            for part in self.parts:
                _memcpy(part)
        _torch_copy(self.other)


def _bytes(t: torch.Tensor) -> np.ndarray:
    """The bytes of a contiguous CPU tensor as a NumPy array sharing its memory."""
    return t.detach().reshape(-1).view(torch.uint8).numpy()


class ColocatedSync:
    """Copy ``src``'s tensors into ``dst`` (same architecture); call :meth:`sync` after each update."""

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
        # Grouped by destination dtype (the staging buffer holds values already cast).
        self.buckets = plan_buckets({k: self.dst[k] for k in self.src}, bucket_bytes)
        self.bytes = sum(v.numel() * v.element_size() for v in self.dst.values())
        self._pool = _pool([*self.src.values(), *self.dst.values()])
        # Direct copies when nothing crosses a device (``staged=True`` forces the bucketed path).
        if not staged and all(self.src[k].device == self.dst[k].device for k in self.src):
            self._steps = [_Copies([(self.dst[k], self.src[k]) for k in self.src], self._pool)]
            return
        src_device, dst_device = next(iter(self.src.values())).device, next(iter(self.dst.values())).device
        numel = _max_numel(self.buckets)
        staging = {dt: torch.empty(n, dtype=dt, device=src_device) for dt, n in numel.items()}
        landing = (
            staging
            if dst_device == src_device
            else {dt: torch.empty_like(b, device=dst_device) for dt, b in staging.items()}
        )
        self._steps = []
        for bucket in self.buckets:
            buf, out, n = staging[bucket[0].dtype], landing[bucket[0].dtype], _bucket_numel(bucket)
            self._steps.append(_Copies([(_slice(buf, e), self.src[e.name]) for e in bucket], self._pool))
            if out is not buf:
                self._steps.append(_Copies([(out[:n], buf[:n])], None))
            self._steps.append(_Copies([(self.dst[e.name], _slice(out, e)) for e in bucket], self._pool))

    def sync(self) -> None:
        for step in self._steps:
            step.run()


def _max_numel(buckets: list[list[_Entry]]) -> dict[torch.dtype, int]:
    out: dict[torch.dtype, int] = {}
    for b in buckets:
        out[b[0].dtype] = max(out.get(b[0].dtype, 0), _bucket_numel(b))
    return out


@dataclass
class _Item:
    """One broadcast of a sync: ``target`` is the tensor broadcast (a local tensor, in place, or a slice of a
    staging buffer); ``copies`` packs (sender) or unpacks (receiver) it, None in place; ``slot`` names the buffer."""

    target: torch.Tensor
    copies: _Copies | None
    slot: tuple[torch.dtype, int] | None


class _Broadcast:
    def __init__(
        self, tensors: dict[str, torch.Tensor], buckets: list[list[_Entry]], src: int, group, device, sending: bool
    ) -> None:
        self.tensors, self.buckets, self.src, self.group, self.device = tensors, buckets, src, group, device
        self.bytes = sum(_bucket_numel(b) * b[0].dtype.itemsize for b in buckets)
        self._pool = _pool(list(tensors.values()))

        def in_place(b: list[_Entry]) -> bool:
            t = tensors[b[0].name]
            return len(b) == 1 and t.dtype == b[0].dtype and t.is_contiguous()

        staged = [b for b in buckets if not in_place(b)]
        # Two flat buffers per dtype: one in flight while the other is packed / unpacked.
        self.buffers = {
            dt: [torch.empty(n, dtype=dt, device=device) for _ in range(2)] for dt, n in _max_numel(staged).items()
        }
        self.items: list[_Item] = []
        uses: dict[torch.dtype, int] = {}
        for b in buckets:
            if in_place(b):
                self.items.append(_Item(tensors[b[0].name], None, None))
                continue
            dt = b[0].dtype
            slot = (dt, uses.get(dt, 0) % 2)
            uses[dt] = uses.get(dt, 0) + 1
            buf = self.buffers[dt][slot[1]]
            pairs = [(_slice(buf, e), tensors[e.name]) if sending else (tensors[e.name], _slice(buf, e)) for e in b]
            self.items.append(_Item(buf[: _bucket_numel(b)], _Copies(pairs, self._pool), slot))

    def _broadcast(self, t: torch.Tensor):
        return self.group.broadcast(t, self.src)

    def _header(self, command: int, sync_id: int) -> tuple[int, int]:
        header = torch.tensor([command, sync_id], dtype=torch.int64, device=self.device)
        self._broadcast(header).wait()
        return int(header[0]), int(header[1])

    def _ack(self) -> None:
        self.group.allreduce(torch.zeros(1, device=self.device)).wait()


class BroadcastSender(_Broadcast):
    """The trainer's side: ``model``'s tensors go to every rank of ``group`` (default: the default group) from rank
    ``src`` (this process; a rank within ``group``). Construction broadcasts the metadata once (collective with
    :class:`BroadcastReceiver`)."""

    def __init__(self, model: nn.Module, *, src: int = 0, group=None, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
        tensors = _tensors(model)
        buckets = plan_buckets(tensors, bucket_bytes)
        device = next(iter(tensors.values())).device
        group = group or dist.group.WORLD
        _broadcast_object(buckets, src, group, device)
        super().__init__(tensors, buckets, src, group, device, sending=True)

    def sync(self, sync_id: int = 0) -> None:
        """Send the current weights; returns once every receiver holds them."""
        self.start(sync_id)
        self.send()

    def start(self, sync_id: int = 0) -> None:
        """Announce sync ``sync_id`` (>= 0); returns once every receiver is ready to load (its engine paused)."""
        if sync_id < 0:
            raise ValueError(f"BroadcastSender: sync ids are >= 0, got {sync_id}")
        self._header(_SYNC, sync_id)
        self._ack()

    def send(self) -> None:
        """The buckets of the sync announced by :meth:`start`; returns once every receiver holds them."""
        in_flight: dict[tuple[torch.dtype, int], object] = {}  # the last broadcast out of each staging buffer
        works = []
        for item in self.items:
            if item.copies is not None:
                if item.slot in in_flight:  # this buffer's previous bucket must have left
                    in_flight.pop(item.slot).wait()
                item.copies.run()
            works.append(self._broadcast(item.target))
            if item.slot is not None:
                in_flight[item.slot] = works[-1]
        for work in works:
            work.wait()
        self._ack()

    def close(self) -> None:
        """Tell every receiver that no sync follows (:meth:`BroadcastReceiver.wait` returns None)."""
        self._header(_SHUTDOWN, -1)


class BroadcastReceiver(_Broadcast):
    """A rollout process's side: receives into ``model``'s tensors (same names and shapes, any dtype)."""

    def __init__(self, model: nn.Module, *, src: int = 0, group=None) -> None:
        tensors = _tensors(model)
        device = next(iter(tensors.values())).device
        group = group or dist.group.WORLD
        buckets: list[list[_Entry]] = _broadcast_object(None, src, group, device)
        for e in (e for b in buckets for e in b):
            if e.name not in tensors or tuple(tensors[e.name].shape) != e.shape:
                raise ValueError(f"BroadcastReceiver: the sender's {e.name} {list(e.shape)} does not fit this model")
        super().__init__(tensors, buckets, src, group, device, sending=False)

    def wait(self) -> int | None:
        """Block until the sender announces a sync: its id, or None when the sender closed the channel. Call
        :meth:`load` next (after pausing whatever computes with the model)."""
        command, sync_id = self._header(_SHUTDOWN, -1)
        return sync_id if command == _SYNC else None

    def load(self) -> None:
        """Receive the announced sync's tensors into the model; returns once every receiver holds them."""
        self._ack()
        if self.items:
            works = [self._broadcast(self.items[0].target)]
            for i, item in enumerate(self.items):
                if i + 1 < len(self.items):  # post the next receive before unpacking this one
                    works.append(self._broadcast(self.items[i + 1].target))
                works[i].wait()
                if item.copies is not None:
                    item.copies.run()
        self._ack()

    def sync(self) -> int | None:
        """:meth:`wait` then :meth:`load`: the sync id received, or None after a shutdown."""
        sync_id = self.wait()
        if sync_id is not None:
            self.load()
        return sync_id
