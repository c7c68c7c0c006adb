"""MuonClip (Kimi K2 report §2.1, Algorithm 1): Muon for the matrices, AdamW for the rest, QK-Clip after the step.

One ``torch.optim.Optimizer`` whose groups are each either Muon (``use_muon=True``: ``k2.optim.Muon``'s update,
default ``adjust_lr_fn="match_rms_adamw"`` so both halves share the lr and weight decay, as in Moonlight) or
AdamW (``torch.optim.AdamW``'s arithmetic via ``torch.optim.adam.adam``, betas (0.9, 0.95), eps 1e-8; ML App. A).

Which parameters get Muon (a group without ``use_muon`` is split in two by this rule; a group that sets it is taken
as is, which is how to override): matrices and matrix stacks (``ndim >= 2``) get Muon, except the token embedding
and the LM head, recognised by name (``embed`` or ``lm_head`` in the parameter name) — the report leaves K2's
split unstated in the K2 report; this is Moonlight's. Vectors (norm gains, biases) get AdamW. Names come
from named parameters (``model.named_parameters()`` or ``from_model``); unnamed parameters are split by shape
only. A parameter named ``...e_score_correction_bias`` (the router's aux-loss-free bias, a buffer in k2 but a
parameter in some ports) is never optimised: it follows the load-balancing rule, not the loss.

After the update, QK-Clip (``k2.optim.qk_clip``) rescales the query/key weights of every head whose max logit in
the last training forward exceeded ``qk_clip_tau``; ``opt.last_qk_clip`` holds that step's per-layer max logit and
clipped-head count. With ``process_group`` everything is ZeRO-1 sharded (``k2.optim.distributed``) and the max
logits are MAX-all-reduced before clipping.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim.adam import adam

from k2.ops.newton_schulz import Coefficients
from k2.optim.muon import Muon
from k2.optim.qk_clip import find_attention, qk_clip_

_NEVER_TRAINED = ("e_score_correction_bias",)


def default_use_muon(name: str | None, param: torch.Tensor) -> bool:
    """MuonClip's automatic rule: Muon for matrices except the embedding and the LM head (by name)."""
    if param.dim() < 2:
        return False
    return name is None or not any(key in name for key in ("embed", "lm_head"))


def _as_groups(params: Any) -> list[dict[str, Any]]:
    if isinstance(params, torch.Tensor):
        raise TypeError("k2.optim.MuonClip: params must be an iterable of tensors, (name, tensor) pairs or dicts")
    items = list(params)
    if not items:
        raise ValueError("k2.optim.MuonClip: got an empty parameter list")
    return [dict(g) for g in items] if isinstance(items[0], dict) else [{"params": items}]


def _split_groups(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Groups without ``use_muon`` → a Muon group and an AdamW group; never-trained parameters dropped."""
    out = []
    for group in groups:
        entries = list(group["params"]) if not isinstance(group["params"], torch.Tensor) else [group["params"]]
        named = [(e if isinstance(e, tuple) else (None, e)) for e in entries]
        named = [(n, p) for n, p in named if n is None or not n.endswith(_NEVER_TRAINED)]
        pack = lambda pairs: [(n, p) if n is not None else p for n, p in pairs]  # noqa: E731
        if "use_muon" in group:
            out.append({**group, "params": pack(named)})
            continue
        for flag in (True, False):
            chosen = [(n, p) for n, p in named if default_use_muon(n, p) == flag]
            if chosen:
                out.append({**group, "params": pack(chosen), "use_muon": flag})
    return out


class MuonClip(Muon):
    """Muon + AdamW + QK-Clip in one optimizer (see the module docstring for the parameter split).

    Args:
        params: tensors, ``(name, tensor)`` pairs (preferred: enables the name rules) or param groups; a group may
            set ``use_muon`` and any hyperparameter below (``betas``/``adamw_eps`` for AdamW groups).
        lr, weight_decay: shared by both halves (decoupled weight decay).
        momentum, nesterov, adjust_lr_fn, ns_steps, ns_coefficients, eps: Muon's (``k2.optim.Muon``).
        betas, adamw_eps: AdamW's.
        qk_clip_tau: τ; None turns QK-Clip off.
        attention: the attention modules to clip, in layer order (``k2.optim.qk_clip`` protocol); ``from_model``
            finds them.
        process_group, reduce_gradients: ZeRO-1 data parallelism (``k2.optim.distributed``); a param group may
            set its own ``process_group`` (``k2.optim.Muon``). QK-Clip's max logits are reduced over the optimizer's.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 2e-4,
        *,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        adjust_lr_fn: str | None = "match_rms_adamw",
        ns_steps: int = 5,
        ns_coefficients: str | Coefficients | Sequence[Coefficients] = "quintic",
        eps: float = 1e-7,
        betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        qk_clip_tau: float | None = 100.0,
        attention: Sequence[nn.Module] | None = None,
        process_group: Any = None,
        reduce_gradients: bool = True,
    ) -> None:
        if qk_clip_tau is not None and not qk_clip_tau > 0:
            raise ValueError(f"k2.optim.MuonClip: qk_clip_tau must be > 0 or None, got {qk_clip_tau!r}")
        self.qk_clip_tau = qk_clip_tau
        self.attention = list(attention or [])
        self.last_qk_clip: dict[str, torch.Tensor] = {
            "max_logit": torch.empty(0),
            "clipped_heads": torch.empty(0, dtype=torch.long),
        }
        self._extra_defaults = {"betas": tuple(betas), "adamw_eps": adamw_eps}
        super().__init__(
            _as_groups(params),  # split by add_param_group
            lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            adjust_lr_fn=adjust_lr_fn,
            ns_steps=ns_steps,
            ns_coefficients=ns_coefficients,
            eps=eps,
            process_group=process_group,
            reduce_gradients=reduce_gradients,
        )

    @classmethod
    def from_model(
        cls, model: nn.Module, lr: float = 2e-4, *, weight_decay: float = 0.1, qk_clip_tau: float | None = 100.0, **kw
    ) -> MuonClip:
        """MuonClip over ``model``'s trainable named parameters, clipping every attention module it finds."""
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return cls(named, lr, weight_decay=weight_decay, qk_clip_tau=qk_clip_tau, attention=find_attention(model), **kw)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds ``param_group`` split by the module docstring's rule (Muon matrices, AdamW vectors) unless it sets
        ``use_muon``, exactly as at construction; a Muon group that holds a vector is a ``ValueError``."""
        for group in _split_groups([param_group]):
            for key, value in self._extra_defaults.items():
                group.setdefault(key, value)
            super().add_param_group(group)

    def _is_muon_group(self, group: dict[str, Any]) -> bool:
        return bool(group["use_muon"])

    def _adamw_step(self) -> None:
        for group in self.param_groups:
            if group["use_muon"]:
                continue
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            zero = self.zero1_of(params[0])  # one process group per param group
            if zero is not None:
                grads = zero.grad_shards(params, grads)
                targets = [zero.shard(p) for p in params]
            else:
                targets = params
            exp_avgs, exp_avg_sqs, steps = [], [], []
            for p, target in zip(params, targets, strict=True):
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(target, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(target, memory_format=torch.preserve_format)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                steps.append(state["step"])
            beta1, beta2 = group["betas"]
            adam(
                targets,
                grads,
                exp_avgs,
                exp_avg_sqs,
                [],
                steps,
                decoupled_weight_decay=True,
                amsgrad=False,
                beta1=beta1,
                beta2=beta2,
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                eps=group["adamw_eps"],
                maximize=False,
            )
            if zero is not None:
                zero.all_gather_params(params)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Muon and AdamW updates, then QK-Clip from the last training forward's max logits."""
        loss = super().step(closure)  # closure, then the Muon update of the matrices
        self._adamw_step()
        if self.qk_clip_tau is not None and self.attention:
            group = None if self._zero is None else self._zero.group
            self.last_qk_clip = qk_clip_(self.attention, self.qk_clip_tau, process_group=group)
        return loss
