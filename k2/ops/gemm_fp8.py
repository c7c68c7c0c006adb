"""FP8 grouped GEMM for MoE experts with DeepSeek-V3 block scales (the layout of Kimi-K2's FP8 checkpoints).

``grouped_gemm_fp8(x, x_scale, w, w_scale, offsets) -> out [T, N] bf16`` computes, for each group ``e`` of rows
``offsets[e-1]:offsets[e]``, ``out_e = dequant(x_e) @ dequant(w_e)^T`` where ``x [T, K]`` float8_e4m3fn carries
one fp32 scale per 1x128 block (``x_scale [T, ceil(K/128)]``, as :func:`k2.ops.quantize_1x128` returns) and
``w [E, N, K]`` float8_e4m3fn one per 128x128 block (``w_scale [E, ceil(N/128), ceil(K/128)]``, as
:func:`k2.ops.quantize_128x128` returns). Forward only (no autograd).

Dispatch: on an sm_90 GPU with the sm_90a kernels built, ``k2._C.grouped_gemm_fp8`` (CUTLASS blockwise-scaled
grouped GEMM: the scales multiply each 128-wide K block's fp32 partial sums, operands are never dequantised;
needs K % 16 == 0 and N % 8 == 0); everywhere else ``k2.ops.reference.grouped_gemm_fp8`` (dequantise, then a
grouped GEMM in fp32). The CUTLASS kernel's per-group argument arrays live in a workspace of
``k2._C.grouped_gemm_fp8_workspace_size(E, ...)`` bytes allocated by torch.
"""

from __future__ import annotations

import torch

from k2.ops import _native, reference

_FAMILY = "gemm"


def _native_runs(x: torch.Tensor, w: torch.Tensor) -> bool:
    if x.device.type != "cuda" or not _native.has_kernel(_FAMILY, x.device):
        return False
    supported = _native.native().grouped_gemm_fp8_supported(x.device.index or 0)
    return bool(supported) and x.shape[1] % 16 == 0 and w.shape[1] % 8 == 0


@torch.library.custom_op("k2::grouped_gemm_fp8", mutates_args=())
def _grouped_gemm_fp8(
    x: torch.Tensor, x_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    if not _native_runs(x, w):
        return reference.grouped_gemm_fp8(x, x_scale, w, w_scale, offsets)
    x, x_scale, w, w_scale = x.contiguous(), x_scale.contiguous(), w.contiguous(), w_scale.contiguous()
    out = torch.empty(x.shape[0], w.shape[1], dtype=torch.bfloat16, device=x.device)
    workspace = ("grouped_gemm_fp8_workspace_size", (w.shape[0],))
    _native.call("grouped_gemm_fp8", x.device, x, x_scale, w, w_scale, offsets.contiguous(), out, workspace=workspace)
    return out


@_grouped_gemm_fp8.register_fake
def _(x: torch.Tensor, x_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, offsets: torch.Tensor):
    return torch.empty(x.shape[0], w.shape[1], dtype=torch.bfloat16, device=x.device)


def grouped_gemm_fp8(
    x: torch.Tensor, x_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    """``out[rows of e] = (x * x_scale)[rows of e] @ (w[e] * w_scale[e])^T`` in bf16, fp32 accumulation.

    Args:
        x: ``[T, K]`` float8_e4m3fn activations, rows sorted by group.
        x_scale: ``[T, ceil(K/128)]`` fp32, one scale per 1x128 block of ``x``.
        w: ``[E, N, K]`` float8_e4m3fn expert weights (``nn.Linear`` layout).
        w_scale: ``[E, ceil(N/128), ceil(K/128)]`` fp32, one scale per 128x128 block of ``w``.
        offsets: ``[E]`` int32 cumulative row ends on ``x``'s device; empty groups allowed.

    Returns:
        ``[T, N]`` bfloat16.
    """
    op = "k2.ops.grouped_gemm_fp8"
    if x.dim() != 2 or w.dim() != 3 or w.shape[2] != x.shape[1]:
        raise ValueError(f"{op}: expected x [T, K] and w [E, N, K], got {tuple(x.shape)} and {tuple(w.shape)}")
    if x.dtype != torch.float8_e4m3fn or w.dtype != torch.float8_e4m3fn:
        raise ValueError(f"{op}: x and w must be float8_e4m3fn, got {x.dtype} and {w.dtype}")
    t, k = x.shape
    e, n = w.shape[0], w.shape[1]
    kb, nb = -(-k // 128), -(-n // 128)
    if x_scale.shape != (t, kb) or x_scale.dtype != torch.float32:
        raise ValueError(f"{op}: x_scale must be float32 [{t}, {kb}], got {x_scale.dtype} {tuple(x_scale.shape)}")
    if w_scale.shape != (e, nb, kb) or w_scale.dtype != torch.float32:
        raise ValueError(f"{op}: w_scale must be float32 [{e}, {nb}, {kb}], got {w_scale.dtype} {tuple(w_scale.shape)}")
    if offsets.dtype != torch.int32 or offsets.shape != (e,):
        raise ValueError(f"{op}: offsets must be int32 [{e}], got {offsets.dtype} {tuple(offsets.shape)}")
    if len({x.device, x_scale.device, w.device, w_scale.device, offsets.device}) != 1:
        raise ValueError(f"{op}: all arguments must be on one device")
    return _grouped_gemm_fp8(x, x_scale, w, w_scale, offsets)
