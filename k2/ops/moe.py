"""Token permutation for mixture-of-experts layers: sort token copies by expert, and combine them back.

``moe_permute(x [T, D], topk_ids [T, K], num_experts) -> (x_sorted [T*K, D], row_map [T*K] int32, offsets [E]
int32)``: ``x_sorted[i] = x[row_map[i] // K]``, where ``row_map[i]`` is the flat index ``t*K + k`` of the copy at
sorted row ``i`` (stable sort by expert) and ``offsets`` are the cumulative row ends per expert, ready for
``k2.ops.grouped_gemm``. ``moe_unpermute(y_sorted, row_map, topk_weights [T, K]) -> y [T, D]`` computes
``y[t] = sum_k topk_weights[t, k] * y_sorted[pos(t, k)]`` with fp32 accumulation.

Autograd: the backward of ``moe_permute`` is ``moe_unpermute`` with unit weights (each token's K copies sum
back); the backward of ``moe_unpermute`` is ``k2::moe_unpermute_backward``. All go through the same dispatch:
CUDA kernel → C++ CPU kernel → ``k2.ops.reference`` (also for float64). Native calls (through
``k2.ops._native.call``: view tuples, preallocated outputs, a workspace sized by ``k2._C.<op>_workspace_size``, which
is empty on CPU): ``k2._C.moe_permute(x, topk_ids, x_sorted, row_map, offsets, workspace, stream)``,
``k2._C.moe_unpermute(y_sorted, row_map, topk_weights, y, workspace, stream)`` and
``k2._C.moe_unpermute_backward(dy, y_sorted, row_map, topk_weights, dy_sorted, dweights, stream)``.

Autocast: ``moe_permute`` casts ``x`` to the autocast dtype (the copies feed the experts' GEMMs, which would cast
them anyway; casting the T rows before the gather moves half the bytes); ``moe_unpermute`` keeps its inputs' dtypes
(the routing weights stay fp32, the sum accumulates in fp32 and is returned in ``y_sorted``'s dtype).
"""

from __future__ import annotations

import torch

from k2.ops import _native, reference

_FAMILY = "moe"


# ---- moe_permute -------------------------------------------------------------------------------------------


@torch.library.custom_op("k2::moe_permute", mutates_args=())
def _moe_permute(
    x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if _native.kernel_module(_FAMILY, x.device, x, topk_ids) is None:
        return reference.moe_permute(x, topk_ids, num_experts)
    x, topk_ids = x.contiguous(), topk_ids.contiguous()
    n = topk_ids.numel()
    x_sorted = x.new_empty(n, x.shape[1])
    row_map = torch.empty(n, dtype=torch.int32, device=x.device)
    offsets = torch.empty(num_experts, dtype=torch.int32, device=x.device)
    sizes = (topk_ids.shape[0], topk_ids.shape[1], num_experts)
    _native.call(
        "moe_permute",
        x.device,
        x,
        topk_ids,
        x_sorted,
        row_map,
        offsets,
        workspace=("moe_permute_workspace_size", sizes),
    )
    return x_sorted, row_map, offsets


@_moe_permute.register_fake
def _(x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = topk_ids.numel()
    return (
        x.new_empty(n, x.shape[1]),
        torch.empty(n, dtype=torch.int32, device=x.device),
        torch.empty(num_experts, dtype=torch.int32, device=x.device),
    )


def _permute_setup(ctx, inputs, output) -> None:
    _, topk_ids, _ = inputs
    ctx.save_for_backward(output[1])
    ctx.topk_shape = tuple(topk_ids.shape)
    ctx.mark_non_differentiable(output[1], output[2])


def _permute_backward(ctx, dx_sorted: torch.Tensor, _drow_map, _doffsets):
    (row_map,) = ctx.saved_tensors
    ones = torch.ones(ctx.topk_shape, dtype=torch.float32, device=dx_sorted.device)
    return _moe_unpermute(dx_sorted.contiguous(), row_map, ones), None, None


_moe_permute.register_autograd(_permute_backward, setup_context=_permute_setup)
_native.register_autocast("moe_permute", cast=(0,))


def moe_permute(
    x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort each token's K copies by expert (stable) for :func:`k2.ops.grouped_gemm`.

    Args:
        x: ``[T, D]`` token activations.
        topk_ids: ``[T, K]`` integer expert ids in ``[0, num_experts)``.
        num_experts: ``E``.

    Returns:
        ``x_sorted [T*K, D]`` (differentiable), ``row_map [T*K]`` int32 with ``x_sorted[i] = x[row_map[i] // K]``,
        ``offsets [E]`` int32 cumulative row ends per expert.
    """
    if x.dim() != 2 or topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0]:
        raise ValueError(
            f"k2.ops.moe_permute: expected x [T, D] and topk_ids [T, K], got {tuple(x.shape)} and "
            f"{tuple(topk_ids.shape)}"
        )
    if topk_ids.dtype.is_floating_point or topk_ids.dtype == torch.bool:
        raise ValueError(f"k2.ops.moe_permute: topk_ids must be an integer tensor, got {topk_ids.dtype}")
    if num_experts < 1:
        raise ValueError(f"k2.ops.moe_permute: num_experts must be >= 1, got {num_experts}")
    return _moe_permute(x, topk_ids, num_experts)


# ---- moe_unpermute -----------------------------------------------------------------------------------------


@torch.library.custom_op("k2::moe_unpermute", mutates_args=())
def _moe_unpermute(y_sorted: torch.Tensor, row_map: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    if _native.kernel_module(_FAMILY, y_sorted.device, y_sorted, topk_weights) is None:
        return reference.moe_unpermute(y_sorted, row_map, topk_weights)
    y_sorted, topk_weights = y_sorted.contiguous(), topk_weights.contiguous()
    y = y_sorted.new_empty(topk_weights.shape[0], y_sorted.shape[1])
    sizes = tuple(topk_weights.shape)
    _native.call(
        "moe_unpermute", y.device, y_sorted, row_map, topk_weights, y, workspace=("moe_unpermute_workspace_size", sizes)
    )
    return y


@_moe_unpermute.register_fake
def _(y_sorted: torch.Tensor, row_map: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    return y_sorted.new_empty(topk_weights.shape[0], y_sorted.shape[1])


@torch.library.custom_op("k2::moe_unpermute_backward", mutates_args=())
def _moe_unpermute_backward(
    dy: torch.Tensor, y_sorted: torch.Tensor, row_map: torch.Tensor, topk_weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    if _native.kernel_module(_FAMILY, dy.device, dy, y_sorted, topk_weights) is None:
        return reference.moe_unpermute_backward(dy, y_sorted, row_map, topk_weights)
    dy, y_sorted, topk_weights = dy.contiguous(), y_sorted.contiguous(), topk_weights.contiguous()
    dy_sorted, dweights = torch.empty_like(y_sorted), torch.empty_like(topk_weights)
    _native.call("moe_unpermute_backward", dy.device, dy, y_sorted, row_map, topk_weights, dy_sorted, dweights)
    return dy_sorted, dweights


@_moe_unpermute_backward.register_fake
def _(
    dy: torch.Tensor, y_sorted: torch.Tensor, row_map: torch.Tensor, topk_weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(y_sorted), torch.empty_like(topk_weights)


def _unpermute_setup(ctx, inputs, output) -> None:
    y_sorted, row_map, topk_weights = inputs
    ctx.save_for_backward(y_sorted, row_map, topk_weights)


def _unpermute_backward(ctx, dy: torch.Tensor):
    y_sorted, row_map, topk_weights = ctx.saved_tensors
    dy_sorted, dweights = _moe_unpermute_backward(dy.contiguous(), y_sorted, row_map, topk_weights)
    return dy_sorted, None, dweights if ctx.needs_input_grad[2] else None


_moe_unpermute.register_autograd(_unpermute_backward, setup_context=_unpermute_setup)


def moe_unpermute(y_sorted: torch.Tensor, row_map: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum of each token's expert outputs: ``y[t] = sum_k topk_weights[t, k] * y_sorted[pos(t, k)]``.

    Args:
        y_sorted: ``[T*K, D]`` expert outputs in :func:`moe_permute` order.
        row_map: ``[T*K]`` int32 from :func:`moe_permute`.
        topk_weights: ``[T, K]`` routing weights (fp32 is typical).

    Returns:
        ``y [T, D]`` in ``y_sorted``'s dtype (fp32 accumulation). Differentiable in ``y_sorted`` and
        ``topk_weights``.
    """
    if y_sorted.dim() != 2 or topk_weights.dim() != 2 or row_map.dim() != 1:
        raise ValueError(
            f"k2.ops.moe_unpermute: expected y_sorted [T*K, D], row_map [T*K], topk_weights [T, K], got "
            f"{tuple(y_sorted.shape)}, {tuple(row_map.shape)}, {tuple(topk_weights.shape)}"
        )
    if not (y_sorted.shape[0] == row_map.shape[0] == topk_weights.numel()):
        raise ValueError(
            f"k2.ops.moe_unpermute: y_sorted rows ({y_sorted.shape[0]}), row_map ({row_map.shape[0]}) and "
            f"topk_weights.numel() ({topk_weights.numel()}) must be equal"
        )
    if row_map.dtype != torch.int32:
        raise ValueError(f"k2.ops.moe_unpermute: row_map must be int32, got {row_map.dtype}")
    return _moe_unpermute(y_sorted, row_map, topk_weights)
