"""Activation memory as in Kimi K2 (arXiv 2507.20534 §2.4, "activation reduction"): selective recomputation, FP8
storage of chosen activations and CPU offload of the rest, applied to a built ``k2.model.Transformer`` from outside.

What backward keeps is decided per saved tensor, in ``torch.autograd.graph.saved_tensors_hooks`` that each
``Block`` forward installs; the autograd graph itself is the model's, so the backward kernels are the plain run's:

- ``recompute`` (Megatron-LM's ``recompute_modules``): an operation runs as a *region*. Every tensor its own ops
  save is dropped and recomputed in backward by running the region again on its stored inputs (as non-reentrant
  ``torch.utils.checkpoint``), and so is its *output* wherever a later op saves it (a view of it included; Megatron's
  "checkpoint without output"), so a recomputed output costs nothing until backward needs it. Regions, from
  :data:`RECOMPUTE`: ``norm`` (every RMSNorm of a block), ``swiglu`` (``silu(gate) * up`` of the routed experts,
  the shared experts and the dense MLP), ``mla_up_proj`` (MLA's ``q_b_proj``, and ``kv_b_proj`` with the assembly
  of the attention's per-head q, k, v), ``moe_down_proj`` (the routed experts' down GEMM), ``attention`` (the
  ``k2.ops.mla_attention`` call: o and its log-sum-exp) and ``layer`` (the whole block: only its inputs are kept; the
  other regions then run plainly inside it). A region whose input is another region's output recomputes that one
  first. Recomputation reruns the same ops on the same values, so losses and gradients are bit-identical.
- ``fp8_activations`` (:data:`FP8`; DeepSeek-V3's FP8 activation caching): ``moe_up_proj_input`` (the expert-sorted
  token copies the routed experts' gate/up GEMMs save) and ``swiglu_input`` (the gate and up GEMM outputs that
  SwiGLU's backward reads, routed and shared experts and dense MLP) are kept as E4M3 in 1x128 tiles with fp32 scales
  (``k2.ops.quantize_1x128``) and dequantised when backward unpacks them. Storage only: every product is computed in
  the run's precision; backward sees values within FP8's relative rounding (2^-4) of the kept ones.
- ``offload``: every other saved tensor of a block goes to host memory when it is saved — on CUDA a pinned buffer
  written by a copy stream (the device block is released to the allocator once the copy has run), prefetched back
  one layer ahead of backward; on the CPU a plain copy into a separate buffer (nothing is saved, but the copy is
  real and visible: the offloaded bytes and the copy's time show in :meth:`ActivationMemory.measure`). FP8-kept
  tensors stay on the device, as in K2.

Parameters (and autocast's casts of them) are never touched. What the hooks see is accounted by storage:
:meth:`ActivationMemory.measure` returns, per layer, the bytes kept on the device, offloaded and recomputed
(``tools/bench_memory.py``; ``k2.parallel.activation_model`` predicts the same numbers from a ``ModelConfig``).

Deviations from K2: offloading happens as tensors are saved rather than per micro-batch of a 1F1B pipeline (k2
has no pipeline yet); the final norm and the LM head (outside the blocks) are left alone; a decode-sized MoE call
(``Experts._forward_few``, at most ``FEW_ROWS`` token copies) gets the offload but not the expert regions. Apply
after ``k2.parallel.expert.apply_expert_parallel`` (which replaces the experts modules).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from k2.model.mla import MLA
from k2.model.moe import MLP, Experts
from k2.model.rope import RMSNorm
from k2.model.transformer import Block
from k2.ops import grouped_gemm, mla_attention, quantize_1x128

RECOMPUTE = ("norm", "swiglu", "mla_up_proj", "moe_down_proj", "attention", "layer")
FP8 = ("moe_up_proj_input", "swiglu_input")
_FP8_GROUP = 128


# ---- what one saved tensor becomes ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Geometry:
    """Where a saved tensor lies in its storage, to rebuild it over a restored or recomputed copy of that storage."""

    size: torch.Size
    stride: tuple[int, ...]
    offset: int
    dtype: torch.dtype

    @staticmethod
    def of(t: torch.Tensor) -> _Geometry:
        return _Geometry(t.size(), t.stride(), t.storage_offset(), t.dtype)

    def over(self, base: torch.Tensor) -> torch.Tensor:
        return base.as_strided(self.size, self.stride, self.offset)


class _Stored:
    """One storage's worth of kept bytes; materialised once per backward however many saved views read it."""

    def __init__(self) -> None:
        self.refs = 0
        self._value: torch.Tensor | None = None

    def materialize(self) -> torch.Tensor:
        raise NotImplementedError

    def get(self) -> torch.Tensor:
        value = self._value if self._value is not None else self.materialize()
        self.refs -= 1
        self._value = value if self.refs > 0 else None  # kept for the next reader, released after the last
        return value


class _Fp8(_Stored):
    """A contiguous tensor as E4M3 1x128 tiles with fp32 scales."""

    def __init__(self, t: torch.Tensor) -> None:
        super().__init__()
        self.dtype = t.dtype
        self.q, self.scale = quantize_1x128(t.detach())  # [..., K] fp8, [..., ceil(K/128)] fp32
        self.nbytes = self.q.numel() * self.q.element_size() + self.scale.numel() * 4

    def materialize(self) -> torch.Tensor:
        return dequantize_1x128(self.q, self.scale, self.dtype)


class _Host(_Stored):
    """A whole storage copied to host memory (pinned, by the copy stream, on CUDA), restored on demand."""

    def __init__(self, t: torch.Tensor, layer: int, copy_stream: Any) -> None:
        super().__init__()
        self.layer, self.device, self.stream = layer, t.device, copy_stream
        flat = torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())  # the whole storage
        self.nbytes = flat.numel()
        self._ready: Any = None
        if t.device.type == "cuda":
            self.host = torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=True)
            self.stream.wait_stream(torch.cuda.current_stream(t.device))
            with torch.cuda.stream(self.stream):
                self.host.copy_(flat, non_blocking=True)
            flat.record_stream(self.stream)  # the allocator reuses the block only after the copy has run
            self.copied = self.stream.record_event()
        else:
            self.host = flat.clone()

    def prefetch(self) -> None:
        """Start the copy back (CUDA: on the copy stream; :meth:`materialize` waits for it)."""
        if self._value is not None or self.device.type != "cuda":
            return
        current = torch.cuda.current_stream(self.device)
        value = torch.empty(self.nbytes, dtype=torch.uint8, device=self.device)
        self.stream.wait_stream(current)  # the block may still be read by earlier work on the compute stream
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(self.copied)
            value.copy_(self.host, non_blocking=True)
        value.record_stream(self.stream)
        self._ready = self.stream.record_event()
        self._value = value

    def materialize(self) -> torch.Tensor:
        if self.device.type != "cuda":
            return self.host
        self.prefetch()
        torch.cuda.current_stream(self.device).wait_event(self._ready)
        return self._value  # type: ignore[return-value]


@dataclass(frozen=True)
class _Ref:
    """A saved tensor: a view (``geometry``) of a stored, offloaded, FP8 or recomputed storage."""

    source: Any  # _Stored, or (_Region, output index) for a recomputed output
    geometry: _Geometry


@dataclass(frozen=True)
class _Slot:
    """A tensor saved inside a region: recomputed (``index`` in save order) or one of the region's inputs."""

    region: _Region
    index: int
    geometry: _Geometry | None = None  # set for a view of input ``index``


def dequantize_1x128(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of ``k2.ops.quantize_1x128``: ``q [..., K]`` fp8, ``scale [..., ceil(K/128)]`` → ``dtype [..., K]``."""
    k, groups = q.shape[-1], scale.shape[-1]
    x = q.float()
    if groups * _FP8_GROUP != k:
        x = F.pad(x, (0, groups * _FP8_GROUP - k))
    x = (x.unflatten(-1, (groups, _FP8_GROUP)) * scale[..., None]).flatten(-2)
    return x[..., :k].to(dtype).contiguous()  # callers rebuild views over it by strides


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _whole(t: torch.Tensor) -> bool:
    """``t`` is its whole storage, contiguous."""
    whole = t.numel() * t.element_size() == t.untyped_storage().nbytes()
    return whole and t.is_contiguous() and t.storage_offset() == 0


_PARAMETER_PATH = frozenset(
    ("ToCopyBackward0", "TBackward0", "TransposeBackward0", "ViewBackward0", "PermuteBackward0")
)


def _is_parameter(t: torch.Tensor, parameters: set[int]) -> bool:
    """A parameter or a view of one (``parameters``: their storages), or a cast of one and its views (autocast's
    weight casts, the router's ``weight.float()``): a chain of casts and views straight from an ``AccumulateGrad``."""
    if isinstance(t, nn.Parameter) or _storage_key(t) in parameters:
        return True
    fn = t.grad_fn
    for _ in range(4):
        if fn is None or type(fn).__name__ not in _PARAMETER_PATH or len(fn.next_functions) != 1:
            return False
        fn = fn.next_functions[0][0]
        if type(fn).__name__ == "AccumulateGrad":  # a leaf: a parameter, or a recomputation's detached input
            leaf = fn.variable
            return isinstance(leaf, nn.Parameter) or _storage_key(leaf) in parameters
    return False


# ---- regions: recomputed operations ---------------------------------------------------------------------------


class _Region:
    """One forward of a recomputed operation ``fn(*args)``: its inputs are stored by the block's policy, every
    tensor its ops save becomes a slot, and its outputs are registered so later savers get a recomputed copy."""

    def __init__(self, mem: ActivationMemory, name: str, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.mem, self.name, self.fn = mem, name, fn
        self.args = [None if isinstance(a, torch.Tensor) else a for a in args]  # non-tensor arguments as they are
        self.inputs = {i: mem.pack(a) for i, a in enumerate(args) if isinstance(a, torch.Tensor)}
        self.requires_grad = {i: a.requires_grad for i, a in enumerate(args) if isinstance(a, torch.Tensor)}
        self.device_type = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        self.autocast = (
            torch.is_autocast_enabled(self.device_type),
            torch.get_autocast_dtype(self.device_type),
        )
        self.num_slots = 0
        self.slots: list[torch.Tensor | None] | None = None
        self.outputs: list[torch.Tensor | None] = []
        self.output_refs: list[int] = []
        self._input_values: dict[int, torch.Tensor] | None = None

    # -- forward

    def run(self, args: tuple[Any, ...]) -> Any:
        keys = {_storage_key(a): i for i, a in enumerate(args) if isinstance(a, torch.Tensor)}

        def pack(t: torch.Tensor) -> Any:
            if _is_parameter(t, self.mem.parameters):
                return t
            i = keys.get(_storage_key(t))
            if i is not None:
                return _Slot(self, i, _Geometry.of(t))
            self.num_slots += 1
            self.mem.stats.add(self.mem.layer, "recomputed", t)
            return _Slot(self, self.num_slots - 1)

        with torch.autograd.graph.saved_tensors_hooks(pack, self.mem.unpack), self.mem.inside_region():
            out = self.fn(*args)
        outs = out if isinstance(out, tuple) else (out,)
        self.outputs = [None] * len(outs)
        self.output_refs = [0] * len(outs)
        self.output_nbytes = [o.untyped_storage().nbytes() if isinstance(o, torch.Tensor) else 0 for o in outs]
        if self.name != "layer":  # a block's output is the next block's input, kept (as torch.utils.checkpoint)
            for j, o in enumerate(outs):
                if isinstance(o, torch.Tensor) and o.is_floating_point():
                    self.mem.register(o, (self, j))
        return out

    # -- backward

    def input_value(self, i: int) -> torch.Tensor:
        if self._input_values is None:
            self._input_values = {}
        if i not in self._input_values:
            self._input_values[i] = self.mem.unpack(self.inputs[i])
        return self._input_values[i]

    def slot(self, slot: _Slot) -> torch.Tensor:
        if slot.geometry is not None:
            return slot.geometry.over(self.input_value(slot.index))
        if self.slots is None or self.slots[slot.index] is None:
            self.recompute()
        value, self.slots[slot.index] = self.slots[slot.index], None  # type: ignore[index]
        return value  # type: ignore[return-value]

    def output(self, j: int) -> torch.Tensor:
        if self.outputs[j] is None:
            self.recompute()
        value = self.outputs[j]
        self.output_refs[j] -= 1
        if self.output_refs[j] <= 0:
            self.outputs[j] = None
        return value  # type: ignore[return-value]

    def recompute(self) -> None:
        args = list(self.args)
        for i in self.inputs:
            args[i] = self.input_value(i).detach().requires_grad_(self.requires_grad[i])
        keys = {_storage_key(args[i]) for i in self.inputs}
        captured: list[torch.Tensor] = []

        def pack(t: torch.Tensor) -> None:  # classified exactly as in the forward
            if not _is_parameter(t, self.mem.parameters) and _storage_key(t) not in keys:
                captured.append(t.detach())

        enabled, dtype = self.autocast
        with (
            torch.enable_grad(),
            torch.autocast(self.device_type, dtype=dtype, enabled=enabled),
            torch.autograd.graph.saved_tensors_hooks(pack, _unreachable),
            self.mem.inside_region(),
        ):
            out = self.fn(*args)
        if len(captured) != self.num_slots:
            raise RuntimeError(
                f"k2.parallel.activations: recomputing {self.name!r} saved {len(captured)} tensors, the forward "
                f"{self.num_slots} (the operation must be deterministic and free of data-dependent control flow)"
            )
        self.slots = list(captured)
        outs = out if isinstance(out, tuple) else (out,)
        for j, o in enumerate(outs):
            if isinstance(o, torch.Tensor) and self.output_refs[j] > 0:
                if o.untyped_storage().nbytes() != self.output_nbytes[j]:
                    raise RuntimeError(f"k2.parallel.activations: {self.name!r} recomputed a different layout")
                self.outputs[j] = o.detach()


def _unreachable(_: Any) -> torch.Tensor:
    raise RuntimeError("k2.parallel.activations: a recomputation's own graph is never differentiated")


# ---- accounting -----------------------------------------------------------------------------------------------


@dataclass
class SavedBytes:
    """Bytes saved for backward by one layer's forward, by where they are kept (each storage counted once)."""

    device: int = 0  # kept on the device (FP8 tiles and scales included)
    offloaded: int = 0  # copied to host memory
    recomputed: int = 0  # dropped, recomputed in backward
    _seen: dict[str, set[int]] = field(
        default_factory=lambda: {k: set() for k in ("device", "offloaded", "recomputed")}
    )

    def add(self, kind: str, key: int, nbytes: int) -> None:
        if key not in self._seen[kind]:
            self._seen[kind].add(key)
            setattr(self, kind, getattr(self, kind) + nbytes)


class _Stats:
    def __init__(self) -> None:
        self.layers: dict[int, SavedBytes] | None = None  # None: not measuring
        self._alive: list[torch.Tensor] = []  # counted tensors, held while measuring so no storage is reused

    def add(self, layer: int, kind: str, t: torch.Tensor, nbytes: int | None = None) -> None:
        if self.layers is None:
            return
        self._alive.append(t)
        nbytes = t.untyped_storage().nbytes() if nbytes is None else nbytes
        self.layers.setdefault(layer, SavedBytes()).add(kind, _storage_key(t), nbytes)


# ---- the policy ----------------------------------------------------------------------------------------------


class ActivationMemory:
    """The saved-tensor policy of one model (see the module docstring); made by :func:`apply_activation_memory`."""

    def __init__(self, recompute: Iterable[str] = (), fp8_activations: Iterable[str] = (), offload: bool = False):
        self.recompute, self.fp8 = frozenset(recompute), frozenset(fp8_activations)
        unknown = sorted(self.recompute - set(RECOMPUTE)) + sorted(self.fp8 - set(FP8))
        if unknown:
            raise ValueError(
                f"k2.parallel.activations: unknown option(s) {unknown}; recompute takes {list(RECOMPUTE)}, "
                f"fp8_activations takes {list(FP8)}"
            )
        self.offload = bool(offload)
        self.model: weakref.ref | None = None  # the model holds the policy: no reference cycle back
        self.parameters: set[int] = set()  # storages of the model's parameters (never stored or counted)
        self.stats = _Stats()
        self.layer = -1
        self._depth = 0  # > 0 inside a region: nested regions run plainly, nothing is registered
        self._registry: dict[int, tuple[weakref.ref, Any]] = {}  # storage → (its tensor, region output or FP8 tag)
        self._scope: dict[int, tuple[torch.Tensor, _Stored]] = {}  # this layer's stored storages (kept alive)
        self._host: dict[int, weakref.WeakSet] = {}  # layer → its offloaded storages, for the prefetch
        self._prefetched: set[int] = set()
        self._copy_stream: Any = None

    # -- forward side

    @contextmanager
    def layer_scope(self, layer: int) -> Iterator[None]:
        """Saved-tensor hooks for one block's forward."""
        model = self.model() if self.model is not None else None
        if model is not None:  # parameters may have moved (``.to()``, a loaded state dict) since the last forward
            self.parameters = {_storage_key(p) for p in model.parameters()}
        self.layer, self._scope = layer, {}
        self._prefetched.discard(layer)
        try:
            with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
                yield
        finally:
            self._scope, self.layer = {}, -1

    @contextmanager
    def inside_region(self) -> Iterator[None]:
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1

    def run(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``, as a recomputed region when ``name`` is switched on (and grad is being recorded)."""
        if name not in self.recompute or self._depth > 0 or self.layer < 0 or not torch.is_grad_enabled():
            return fn(*args)
        region = _Region(self, name, fn, args)
        return region.run(args)

    def tag(self, name: str, *tensors: torch.Tensor) -> None:
        """Store ``tensors`` (contiguous, whole storages) in FP8 wherever they are saved, if ``name`` is switched on."""
        if name in self.fp8 and self._depth == 0:
            for t in tensors:
                if _whole(t):
                    self.register(t, name)

    def register(self, t: torch.Tensor, what: Any) -> None:
        if self._depth > 0:
            return
        key = _storage_key(t)
        self._registry[key] = (weakref.ref(t, lambda _, k=key: self._registry.pop(k, None)), what)

    def _registered(self, t: torch.Tensor) -> Any:
        entry = self._registry.get(_storage_key(t))
        if entry is None or entry[0]() is None:
            return None
        return entry[1]

    def pack(self, t: torch.Tensor) -> Any:
        if _is_parameter(t, self.parameters):
            return t
        what = self._registered(t)
        if isinstance(what, tuple):  # a region's output: recomputed when read
            region, j = what
            region.output_refs[j] += 1
            self.stats.add(self.layer, "recomputed", t)
            return _Ref(what, _Geometry.of(t))
        key = _storage_key(t)
        if key in self._scope:
            stored = self._scope[key][1]
        elif isinstance(what, str) and _whole(t) and t.dtype in (torch.float32, torch.bfloat16, torch.float16):
            stored = _Fp8(t)
        elif self.offload and t.device.type in ("cpu", "cuda") and self.layer >= 0:
            if t.device.type == "cuda" and self._copy_stream is None:
                self._copy_stream = torch.cuda.Stream(t.device)
            stored = _Host(t, self.layer, self._copy_stream)
            self._host.setdefault(self.layer, weakref.WeakSet()).add(stored)
        else:
            self.stats.add(self.layer, "device", t)
            return t
        if key not in self._scope:
            self._scope[key] = (t, stored)
            kind = "device" if isinstance(stored, _Fp8) else "offloaded"
            self.stats.add(self.layer, kind, t, stored.nbytes)  # type: ignore[attr-defined]
        stored.refs += 1
        return _Ref(stored, _Geometry.of(t))

    # -- backward side

    def unpack(self, packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        if isinstance(packed, _Slot):
            return packed.region.slot(packed)
        source, geometry = packed.source, packed.geometry
        if isinstance(source, tuple):
            region, j = source
            return geometry.over(region.output(j))
        if isinstance(source, _Host):
            self._prefetch(source.layer - 1)
            return geometry.over(source.get().view(geometry.dtype))
        return geometry.over(source.get())

    def _prefetch(self, layer: int) -> None:
        """Start bringing back layer ``layer``'s offloaded storages (CUDA; once per backward)."""
        if layer < 0 or layer in self._prefetched or self._copy_stream is None:
            return
        self._prefetched.add(layer)
        for stored in list(self._host.get(layer, ())):
            stored.prefetch()

    # -- accounting

    @contextmanager
    def measure(self) -> Iterator[dict[int, SavedBytes]]:
        """Within the block, each layer's forward adds its saved bytes to the yielded ``{layer: SavedBytes}``."""
        self.stats.layers = {}
        try:
            yield self.stats.layers
        finally:
            self.stats.layers, self.stats._alive = None, []


# ---- the model's operations, split into regions ---------------------------------------------------------------
# Same ops, in the same order, as the model's methods they stand in for (tests compare them bit for bit).


def _swiglu_act(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def _experts_swiglu(self: Experts, mem: ActivationMemory, x_sorted: torch.Tensor, offsets: torch.Tensor):
    """``Experts.swiglu``: ``x_sorted [N, D]`` grouped by expert, ``offsets [E]`` int32 → ``[N, D]``."""
    mem.tag("moe_up_proj_input", x_sorted)
    gate = grouped_gemm(x_sorted, self.w_gate, offsets, trans_w=True)  # [N, F]
    up = grouped_gemm(x_sorted, self.w_up, offsets, trans_w=True)  # [N, F]
    mem.tag("swiglu_input", gate, up)
    act = mem.run("swiglu", _swiglu_act, gate, up)  # [N, F]
    return mem.run("moe_down_proj", functools.partial(_down, self.w_down), act, offsets)  # [N, D]


def _down(w_down: torch.Tensor, act: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return grouped_gemm(act, w_down, offsets, trans_w=True)


def _mlp_forward(self: MLP, mem: ActivationMemory, x: torch.Tensor) -> torch.Tensor:
    """``MLP.forward``: ``down(silu(gate(x)) * up(x))``."""
    gate, up = self.gate_proj(x), self.up_proj(x)
    mem.tag("swiglu_input", gate, up)
    return self.down_proj(mem.run("swiglu", _swiglu_act, gate, up))


def _attend_expanded(self: MLA, mem: ActivationMemory, q_nope, q_rope, c_kv, k_rope, cu_seqlens) -> torch.Tensor:
    """``MLA._attend_expanded``: the q, k, v assembly as ``mla_up_proj``, the attention op as ``attention``."""
    b, s, h = c_kv.shape[0], c_kv.shape[1], self.num_heads
    q, k, v = mem.run("mla_up_proj", functools.partial(_mla_qkv, self), q_nope, q_rope, c_kv, k_rope)
    recording = self._recording()
    o, *max_logits = mem.run("attention", functools.partial(_mla_attend, self, recording), q, k, v, cu_seqlens)
    if recording:  # fold this forward's [H] maxima into the running max (k2.model.mla)
        self.max_logits = torch.maximum(self.max_logits, max_logits[0])
    return o.view(b, s, h, -1)


def _mla_qkv(self: MLA, q_nope, q_rope, c_kv, k_rope) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-head ``q, k [B*S, H, dn + dr]`` and ``v [B*S, H, dv]`` from the rotated queries and the latent."""
    b, s, h = c_kv.shape[0], c_kv.shape[1], self.num_heads
    k_nope, v = self.kv_b_proj(c_kv).view(b, s, h, -1).split([self.qk_nope_head_dim, self.v_head_dim], -1)
    q = torch.cat((q_nope, q_rope), -1).flatten(0, 1)
    k = torch.cat((k_nope, k_rope[:, :, None].expand(-1, -1, h, -1)), -1).flatten(0, 1)
    return q, k, v.flatten(0, 1)


def _mla_attend(self: MLA, recording: bool, q, k, v, cu_seqlens) -> tuple[torch.Tensor, ...]:
    o, _, *max_logits = mla_attention(
        q, k, v, softmax_scale=self.softmax_scale, causal=True, cu_seqlens=cu_seqlens, return_max_logits=recording
    )
    return (o, *max_logits)


def _region_forward(mem: ActivationMemory, name: str, forward: Callable[..., Any], *args: Any) -> Any:
    return mem.run(name, forward, *args)


def _block_forward(mem: ActivationMemory, layer: int, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    with mem.layer_scope(layer):
        return mem.run("layer", functools.partial(forward, **kwargs), *args)


def apply_activation_memory(
    model: nn.Module,
    recompute: Iterable[str] = (),
    fp8_activations: Iterable[str] = (),
    offload: bool = False,
) -> ActivationMemory:
    """Switch on K2's activation reductions for every ``Block`` of ``model`` (a built ``k2.model.Transformer``,
    after expert parallelism if any); returns the policy (``.measure()`` for the saved bytes). Each block's
    ``forward`` (and its RMSNorms', MLA's ``_attend_expanded``, ``q_b_proj``, MLPs' ``forward``, experts' ``swiglu``)
    is replaced on the instance by a wrapper running the same ops; with no option on, the hooks only measure."""
    mem = ActivationMemory(recompute, fp8_activations, offload)
    if getattr(model, "_activation_memory", None) is not None:
        raise ValueError("k2.parallel.activations: apply_activation_memory was already applied to this model")
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for i, block in enumerate(blocks):
        for module in block.modules():
            if isinstance(module, RMSNorm):
                module.forward = functools.partial(_region_forward, mem, "norm", module.forward)
            elif isinstance(module, MLA):
                module._attend_expanded = functools.partial(_attend_expanded, module, mem)
                if module.q_lora_rank is not None:
                    q_b = module.q_b_proj
                    q_b.forward = functools.partial(_region_forward, mem, "mla_up_proj", q_b.forward)
            elif isinstance(module, MLP):
                module.forward = functools.partial(_mlp_forward, module, mem)
            elif isinstance(module, Experts):
                module.swiglu = functools.partial(_experts_swiglu, module, mem)
        block.forward = functools.partial(_block_forward, mem, i, block.forward)
    mem.model = weakref.ref(model)
    model._activation_memory = mem
    return mem
