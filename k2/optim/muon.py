"""Muon for matrices and stacks of matrices, with every same-shape matrix orthogonalised in one batched call.

Semantics are ``torch.optim.Muon``'s (the oracle of ``python_tests/test_muon.py``), per matrix ``W [A, B]``:

    buf  = μ·buf + (1 − μ)·g                    (torch's ``buf.lerp_(g, 1 − μ)``; Moonlight's ``μ·buf + g`` differs
    u    = (1 − μ)·g + μ·buf  if nesterov else buf   only by a scale, which the normalisation removes)
    O    = NewtonSchulz(u)                      (``k2.ops.newton_schulz``: bf16, Frobenius-normalised, quintic)
    W    = W·(1 − lr·λ) − lr'·O                 (decoupled weight decay with the *unadjusted* lr)

with ``lr' = lr·sqrt(max(1, A/B))`` for ``adjust_lr_fn=None | "original"`` (Keller Jordan) and
``lr' = lr·0.2·sqrt(max(A, B))`` for ``"match_rms_adamw"`` (Moonlight / Kimi K2: an update RMS of 0.2, so
AdamW's lr and weight decay carry over).

Beyond ``torch.optim.Muon``: a parameter of shape ``[..., A, B]`` with leading dims (the stacked experts
``w_gate/w_up [E, F, D]``, ``w_down [E, D, F]``) is a batch of independent ``[A, B]`` matrices, each orthogonalised
on its own (Muon on the whole stack would couple the experts); and one step stacks every matrix of the same
shape, across parameters and groups, into a single Newton-Schulz call, so an MoE layer costs a few batched
GEMMs instead of thousands of small ones. With ``process_group`` the step is ZeRO-1 distributed Muon
(``k2.optim.distributed``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch.optim import Optimizer

from k2.ops.newton_schulz import Coefficients, newton_schulz, ns_coefficients

ADJUST_LR_FNS = (None, "original", "match_rms_adamw")

# Cap on the elements of one batched Newton-Schulz call (a bucket is split into chunks above it), so that
# stacking a whole model's expert matrices never needs more than ~1 GiB of extra fp32 workspace at once.
_NS_BATCH_ELEMENTS = 1 << 28


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: Sequence[int]) -> float:
    """The lr applied to the orthogonalised update of one ``[A, B]`` matrix (``torch.optim.Muon``'s rule)."""
    a, b = shape[-2], shape[-1]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1.0, a / b))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(a, b))
    raise ValueError(f"k2.optim.Muon: adjust_lr_fn must be one of {ADJUST_LR_FNS}, got {adjust_lr_fn!r}")


def orthogonalize(
    updates: Sequence[torch.Tensor],
    *,
    steps: int = 5,
    coefficients: str | Coefficients | Sequence[Coefficients] = "quintic",
    eps: float = 1e-7,
) -> list[torch.Tensor]:
    """Newton-Schulz of every matrix in ``updates`` (each ``[..., A, B]``), bf16 results in the same order.

    Matrices of equal ``(A, B)``, dtype and device are concatenated into ``[N, A, B]`` batches (split above
    ``_NS_BATCH_ELEMENTS``) and orthogonalised with one ``k2.ops.newton_schulz`` call per batch.
    """
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for i, u in enumerate(updates):
        buckets[(u.shape[-2], u.shape[-1], u.dtype, u.device)].append(i)
    out: list[torch.Tensor | None] = [None] * len(updates)
    for (a, b, _, _), members in buckets.items():
        chunk: list[int] = []
        size = 0
        for i in [*members, None]:
            n = 0 if i is None else updates[i].numel()
            if chunk and (i is None or size + n > _NS_BATCH_ELEMENTS):
                mats = [updates[j].reshape(-1, a, b) for j in chunk]  # [N_j, A, B]
                batch = mats[0] if len(mats) == 1 else torch.cat(mats)  # [N, A, B]
                ortho = newton_schulz(batch, steps=steps, coefficients=coefficients, eps=eps, out_dtype=torch.bfloat16)
                for j, o in zip(chunk, ortho.split([m.shape[0] for m in mats]), strict=True):
                    out[j] = o.view(updates[j].shape)
                chunk, size = [], 0
            if i is not None:
                chunk.append(i)
                size += n
    return out  # type: ignore[return-value]


def momentum_(
    grads: list[torch.Tensor], bufs: list[torch.Tensor], momentum: float, nesterov: bool
) -> list[torch.Tensor]:
    """Update the momentum buffers in place and return the Newton-Schulz inputs (torch.optim.Muon's order)."""
    if not grads:
        return []
    torch._foreach_lerp_(bufs, grads, 1 - momentum)
    return list(torch._foreach_lerp(grads, bufs, momentum)) if nesterov else list(bufs)


def apply_update_(
    params: list[torch.Tensor],
    updates: list[torch.Tensor],
    shapes: list[Sequence[int]],
    groups: list[dict[str, Any]],
) -> None:
    """``p = p·(1 − lr·λ) − lr'(shape)·O`` for each parameter (or shard) ``p`` with matrix shape ``shapes[i]``."""
    for p, o, shape, group in zip(params, updates, shapes, groups, strict=True):
        lr = group["lr"]
        p.mul_(1 - lr * group["weight_decay"])
        p.add_(o, alpha=-adjusted_lr(lr, group["adjust_lr_fn"], shape))


def _ns_key(group: dict[str, Any]) -> tuple:
    coeffs = tuple(ns_coefficients(group["ns_coefficients"], group["ns_steps"]))
    return (coeffs, group["eps"])


def orthogonalize_groups(updates: list[torch.Tensor], groups: list[dict[str, Any]]) -> list[torch.Tensor]:
    """:func:`orthogonalize` over parameters from several groups: one batch per (NS settings, shape)."""
    by_settings: dict[tuple, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        by_settings[_ns_key(g)].append(i)
    out: list[torch.Tensor | None] = [None] * len(updates)
    for (coeffs, eps), idx in by_settings.items():
        ortho = orthogonalize([updates[i] for i in idx], steps=len(coeffs), coefficients=list(coeffs), eps=eps)
        for i, o in zip(idx, ortho, strict=True):
            out[i] = o
    return out  # type: ignore[return-value]


class Muon(Optimizer):
    """Muon (momentum orthogonalised by Newton-Schulz) for matrices ``[A, B]`` and stacks ``[..., A, B]``.

    Args:
        params: parameters (or named parameters, or param groups) with ``ndim >= 2``.
        lr: learning rate. ``weight_decay``: decoupled, multiplied by the unadjusted ``lr``.
        momentum, nesterov: as ``torch.optim.Muon``.
        adjust_lr_fn: ``None``/``"original"`` (lr·sqrt(max(1, A/B))) or ``"match_rms_adamw"`` (lr·0.2·sqrt(max(A, B))).
        ns_steps, ns_coefficients, eps: Newton-Schulz settings (``k2.ops.newton_schulz``).
        process_group: a data-parallel group: run ZeRO-1 distributed Muon (``k2.optim.distributed``); every rank
            must construct the optimizer over the same parameters in the same order. A param group may set its own
            ``process_group`` (None: local, unsharded): expert parallelism shards expert stacks over the ranks that
            hold the same experts. It is kept out of ``param_groups`` (a process group is not state).
        reduce_gradients: with ``process_group``, average the gradients over the group inside ``step()`` (set
            False when they are already averaged, e.g. by DDP).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, torch.Tensor]],
        lr: float = 1e-3,
        *,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.1,
        adjust_lr_fn: str | None = None,
        ns_steps: int = 5,
        ns_coefficients: str | Coefficients | Sequence[Coefficients] = "quintic",
        eps: float = 1e-7,
        process_group: Any = None,
        reduce_gradients: bool = True,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            adjust_lr_fn=adjust_lr_fn,
            ns_steps=ns_steps,
            ns_coefficients=ns_coefficients,
            eps=eps,
        )
        self._check_hyperparameters(type(self).__name__, defaults)
        self._reduce_gradients = reduce_gradients
        self._zeros: dict[int, Any] = {}  # Zero1 (or None) by id of its process group
        self._zero_of: dict[torch.Tensor, Any] = {}  # each parameter's Zero1 (or None for a local update)
        self._zero = self._zero_for(process_group)
        super().__init__(params, defaults)  # validates each group through add_param_group

    def _zero_for(self, group: Any) -> Any:
        """One ``Zero1`` per process group (None for no group or a group of one rank)."""
        from k2.optim.distributed import Zero1  # here: distributed imports this module

        if id(group) not in self._zeros:
            self._zeros[id(group)] = Zero1.create(group, self._reduce_gradients)
        return self._zeros[id(group)]

    def zero1_of(self, param: torch.Tensor) -> Any:
        """The ZeRO-1 sharding that updates ``param`` (its group's ``process_group``, else the optimizer's), or
        None when ``param`` is updated locally."""
        return self._zero_of.get(param, self._zero)

    @property
    def zero1(self) -> Any:
        """The ZeRO-1 sharding (``k2.optim.distributed.Zero1``) when built with ``process_group``, else None:
        what a checkpointer needs to know about this optimizer's state layout."""
        return self._zero

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.add_param_group`` after the checks every group gets, at construction or later:
        hyperparameters in range, and only matrices ``[..., A, B]`` in a Muon group."""
        name = type(self).__name__
        param_group = dict(param_group)
        zero = self._zero_for(param_group.pop("process_group")) if "process_group" in param_group else self._zero
        self._check_hyperparameters(name, param_group)
        params = param_group["params"]
        entries = [params] if isinstance(params, torch.Tensor) else list(params)
        for entry in entries:
            self._zero_of[entry[1] if isinstance(entry, tuple) else entry] = zero
        if self._is_muon_group({**self.defaults, **param_group}):
            for entry in entries:
                p = entry[1] if isinstance(entry, tuple) else entry
                if p.dim() < 2:
                    raise ValueError(
                        f"k2.optim.{name}: Muon parameters must be matrices [..., A, B], got a parameter of shape "
                        f"{tuple(p.shape)}; optimise it with AdamW (k2.optim.MuonClip does)"
                    )
        super().add_param_group({**param_group, "params": entries})

    @staticmethod
    def _check_hyperparameters(name: str, group: dict[str, Any]) -> None:
        for key in ("lr", "weight_decay", "momentum"):
            if key in group and not group[key] >= 0:
                raise ValueError(f"k2.optim.{name}: {key} must be >= 0, got {group[key]!r}")
        if "adjust_lr_fn" in group and group["adjust_lr_fn"] not in ADJUST_LR_FNS:
            raise ValueError(
                f"k2.optim.{name}: adjust_lr_fn must be one of {ADJUST_LR_FNS}, got {group['adjust_lr_fn']!r}"
            )
        if "ns_steps" in group:
            ns_coefficients(group.get("ns_coefficients", "quintic"), group["ns_steps"])

    def _is_muon_group(self, group: dict[str, Any]) -> bool:
        return True

    def _muon_step(self) -> None:
        params, grads, groups = [], [], []
        for group in self.param_groups:
            if not self._is_muon_group(group):
                continue
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse or torch.is_complex(p):
                    raise RuntimeError(
                        f"k2.optim.{type(self).__name__}: sparse or complex parameters are not supported"
                    )
                params.append(p)
                grads.append(p.grad)
                groups.append(group)
        parts: dict[int, list[int]] = {}  # parameters by their Zero1, in first-appearance order (same on every rank)
        for i, p in enumerate(params):
            parts.setdefault(id(self.zero1_of(p)), []).append(i)
        for idx in parts.values():
            zero = self.zero1_of(params[idx[0]])
            sub = ([params[i] for i in idx], [grads[i] for i in idx], [groups[i] for i in idx])
            if zero is not None:
                zero.muon_step(self, *sub)
            else:
                self._local_muon_step(*sub)

    def _local_muon_step(
        self, params: list[torch.Tensor], grads: list[torch.Tensor], groups: list[dict[str, Any]]
    ) -> None:
        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            bufs.append(state["momentum_buffer"])
        by_momentum: dict[tuple[float, bool], list[int]] = defaultdict(list)
        for i, g in enumerate(groups):
            by_momentum[(g["momentum"], g["nesterov"])].append(i)
        updates: list[torch.Tensor | None] = [None] * len(params)
        for (mu, nesterov), idx in by_momentum.items():
            for i, u in zip(idx, momentum_([grads[i] for i in idx], [bufs[i] for i in idx], mu, nesterov), strict=True):
                updates[i] = u
        ortho = orthogonalize_groups(updates, groups)  # type: ignore[arg-type]
        apply_update_(params, ortho, [p.shape for p in params], groups)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One Muon update of every parameter that has a gradient; returns ``closure()``'s loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._muon_step()
        return loss
