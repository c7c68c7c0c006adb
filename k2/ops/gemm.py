"""Grouped GEMM for mixture-of-experts layers: one GEMM per expert over that expert's contiguous rows.

``grouped_gemm(x [T, K], w, offsets [E] int32, *, trans_w=False, out=None) -> [T, N]`` multiplies the rows of
group ``e`` (``offsets[e-1]:offsets[e]``) by expert ``e``'s matrix: ``w [E, K, N]``, or ``w [E, N, K]`` (the
``nn.Linear`` layout the model stores) with ``trans_w=True``. The offsets are cumulative row ends, stay on the
device (no host sync), may describe empty groups, and ``offsets[-1]`` must equal ``T``.

Autograd: ``dx = grouped_gemm(dy, w, offsets, trans_w=not trans_w)`` and ``dw = grouped_gemm_wgrad(x, dy, ...)``
(the per-group ``x_e^T dy_e``), both through this same front door, so native kernels serve the backward too.
With ``out=`` the product is written into a caller's buffer (``k2::grouped_gemm_out``, which mutates ``out``); as
with torch's ``out=`` ops, that form does not record autograd.

Dispatch (``k2.ops`` pattern): CUDA kernel → C++ CPU kernel → ``k2.ops.reference`` (``torch._grouped_mm`` where it
runs, a per-group loop otherwise; also for float64). A native kernel is called through ``k2.ops._native.call`` as
``k2._C.grouped_gemm(x, w, offsets, out, trans_w, workspace, stream)`` and ``k2._C.grouped_gemm_wgrad(x, dy,
offsets, out, trans_w, workspace, stream)`` with view tuples, a preallocated ``out`` and a workspace of
``k2._C.grouped_gemm_workspace_size(dtype, E, device_type, device)`` bytes (CUTLASS's per-group argument arrays).
With no groups (``E = 0``) no row belongs to any group and the product is zero.

Autocast: under ``torch.autocast`` x and w are cast to the autocast dtype (torch's rule for ``torch.mm``), so the
experts of a bf16-autocast model run the bf16 tensor-core kernels; gradients come back in the inputs' dtypes.
"""

from __future__ import annotations

import torch

from k2.ops import _native, reference

_FAMILY = "gemm"


def _check(
    op: str, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, trans_w: bool, *, autocast: bool = False
) -> None:
    if x.dim() != 2:
        raise ValueError(f"k2.ops.{op}: x must be [T, K], got shape {tuple(x.shape)}")
    if w.dim() != 3:
        raise ValueError(f"k2.ops.{op}: w must be [E, K, N] (or [E, N, K] with trans_w), got {tuple(w.shape)}")
    k_w = w.shape[2] if trans_w else w.shape[1]
    if k_w != x.shape[1]:
        layout = "[E, N, K]" if trans_w else "[E, K, N]"
        raise ValueError(f"k2.ops.{op}: w {tuple(w.shape)} as {layout} does not match x's K = {x.shape[1]}")
    if offsets.dtype != torch.int32 or offsets.dim() != 1 or offsets.shape[0] != w.shape[0]:
        raise ValueError(
            f"k2.ops.{op}: offsets must be int32 [E={w.shape[0]}], got {offsets.dtype} {tuple(offsets.shape)}"
        )
    if x.dtype != w.dtype and not autocast:  # under autocast both are cast to the autocast dtype
        raise ValueError(f"k2.ops.{op}: x ({x.dtype}) and w ({w.dtype}) must have the same dtype")
    if not (x.device == w.device == offsets.device):
        raise ValueError(
            f"k2.ops.{op}: x, w and offsets must be on one device, got {x.device}, {w.device}, {offsets.device}"
        )


def _native_grouped_gemm(
    fn: str, a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, trans_w: bool, out: torch.Tensor
) -> None:
    """``k2._C.<fn>(a, b, offsets, out, trans_w)`` with its workspace, on ``a``'s device."""
    a, b, offsets = a.contiguous(), b.contiguous(), offsets.contiguous()
    sizes = (str(a.dtype).removeprefix("torch."), offsets.shape[0])
    _native.call(fn, a.device, a, b, offsets, out, trans_w, workspace=("grouped_gemm_workspace_size", sizes))


@torch.library.custom_op("k2::grouped_gemm", mutates_args=())
def _grouped_gemm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, trans_w: bool) -> torch.Tensor:
    if _native.kernel_module(_FAMILY, x.device, x, w) is None:
        return reference.grouped_gemm(x, w, offsets, trans_w)
    out = x.new_empty(x.shape[0], w.shape[1] if trans_w else w.shape[2])
    _native_grouped_gemm("grouped_gemm", x, w, offsets, trans_w, out)
    return out


@_grouped_gemm.register_fake
def _(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, trans_w: bool) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[1] if trans_w else w.shape[2])


@torch.library.custom_op("k2::grouped_gemm_wgrad", mutates_args=())
def _grouped_gemm_wgrad(x: torch.Tensor, dy: torch.Tensor, offsets: torch.Tensor, trans_w: bool) -> torch.Tensor:
    if _native.kernel_module(_FAMILY, x.device, x, dy) is None:
        return reference.grouped_gemm_wgrad(x, dy, offsets, trans_w)
    shape = (offsets.shape[0], dy.shape[1], x.shape[1]) if trans_w else (offsets.shape[0], x.shape[1], dy.shape[1])
    out = x.new_empty(shape)
    _native_grouped_gemm("grouped_gemm_wgrad", x, dy, offsets, trans_w, out)
    return out


@_grouped_gemm_wgrad.register_fake
def _(x: torch.Tensor, dy: torch.Tensor, offsets: torch.Tensor, trans_w: bool) -> torch.Tensor:
    num_groups = offsets.shape[0]
    if trans_w:
        return x.new_empty(num_groups, dy.shape[1], x.shape[1])
    return x.new_empty(num_groups, x.shape[1], dy.shape[1])


@torch.library.custom_op("k2::grouped_gemm_out", mutates_args=("out",))
def _grouped_gemm_out(
    x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, trans_w: bool, out: torch.Tensor
) -> None:
    # The kernels write a dense [T, N]; any other layout gets a copy.
    if _native.kernel_module(_FAMILY, x.device, x, w) is None or not out.is_contiguous():
        out.copy_(_grouped_gemm(x, w, offsets, trans_w))
        return
    _native_grouped_gemm("grouped_gemm", x, w, offsets, trans_w, out)


@_grouped_gemm_out.register_fake
def _(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, trans_w: bool, out: torch.Tensor) -> None:
    return None


def _setup_context(ctx, inputs, output) -> None:
    x, w, offsets, trans_w = inputs
    ctx.save_for_backward(x, w, offsets)
    ctx.trans_w = trans_w


def _backward(ctx, dy: torch.Tensor):
    x, w, offsets = ctx.saved_tensors
    dy = dy.contiguous()
    dx = _grouped_gemm(dy, w, offsets, not ctx.trans_w) if ctx.needs_input_grad[0] else None
    dw = _grouped_gemm_wgrad(x, dy, offsets, ctx.trans_w) if ctx.needs_input_grad[1] else None
    return dx, dw, None, None


_grouped_gemm.register_autograd(_backward, setup_context=_setup_context)
# Matmul-like: inputs cast to the autocast dtype. grouped_gemm_out casts nothing, as torch's out= ops: the result
# dtype is the caller's buffer's, and the product inside it runs with autocast off.
_native.register_autocast("grouped_gemm")
_native.register_autocast("grouped_gemm_wgrad")
_native.register_autocast("grouped_gemm_out", cast=())


def grouped_gemm(
    x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, *, trans_w: bool = False, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``out[offsets[e-1]:offsets[e]] = x[offsets[e-1]:offsets[e]] @ W_e`` for every group ``e``.

    Args:
        x: ``[T, K]`` rows sorted by group.
        w: ``[E, K, N]`` (``W_e = w[e]``), or ``[E, N, K]`` with ``trans_w=True`` (``W_e = w[e].T``).
        offsets: ``[E]`` int32 cumulative row ends on ``x``'s device; ``offsets[-1] == T``; empty groups allowed.
        trans_w: read ``w`` in the ``nn.Linear`` layout.
        out: optional ``[T, N]`` tensor of ``x``'s dtype and device to write the result into (then returned);
            not differentiable and not autocast, like torch's ``out=`` arguments.

    Returns:
        ``[T, N]`` in ``x``'s dtype, or the autocast dtype under ``torch.autocast`` (then ``x`` and ``w`` may differ
        in dtype, as for ``torch.mm``). Differentiable in ``x`` and ``w`` when ``out`` is None.
    """
    autocast = out is None and torch.is_autocast_enabled(x.device.type)
    _check("grouped_gemm", x, w, offsets, trans_w, autocast=autocast)
    if out is None:
        return _grouped_gemm(x, w, offsets, trans_w)
    shape = (x.shape[0], w.shape[1] if trans_w else w.shape[2])
    if tuple(out.shape) != shape or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(
            f"k2.ops.grouped_gemm: out must be {x.dtype} {shape} on {x.device}, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}"
        )
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or out.requires_grad):
        raise ValueError(
            "k2.ops.grouped_gemm: out= does not support autograd (as torch's out= arguments); "
            "call it without out, or under torch.no_grad()"
        )
    _grouped_gemm_out(x, w, offsets, trans_w, out)
    return out
