"""FP8 casting: the 1x128 activation tiles and 128x128 weight blocks of Kimi-K2 / DeepSeek-V3 FP8 training and
checkpoints, for ``torch.float8_e4m3fn`` (default) and ``torch.float8_e5m2``.

Semantics (DeepSeek-V3 ``act_quant`` / ``weight_dequant``; ``k2.ops.reference`` spells them out):

- a group is 1x128 values along the last dim (``quantize_1x128``) or a 128x128 tile of the last two dims
  (``quantize_128x128``); the last group / edge tiles may be partial;
- ``scale = max(amax, 1e-4) / fp8_max`` in fp32, ``amax`` the group's largest ``|x|`` and ``fp8_max`` 448
  (e4m3fn) or 57344 (e5m2); with ``pow2_scale`` the scale is rounded up to a power of two (exactly);
- ``q = cast(fp32(x) / scale)``: an IEEE fp32 division, then torch's own float -> float8 cast. That cast rounds
  to nearest even and keeps subnormals. **e4m3fn saturates**: finite values beyond the range and +-inf become
  +-448; NaN stays NaN. **e5m2 does not**: |v| >= 61440 and +-inf become +-inf; NaN stays NaN. Within a group,
  a NaN input makes amax and the scale NaN, so the whole group's q is NaN; an inf input makes the scale inf, so
  finite values become 0 and the inf itself NaN (inf/inf);
- dequantize: ``out = out_dtype(fp32(q) * scale_inv[tile])``.

The C++ and CUDA kernels compute exactly these operations, bit for bit (NaN payloads of the fp32 scales aside).
Dispatch: CUDA kernel -> C++ CPU kernel -> ``k2.ops.reference``; native calls (views, preallocated outputs):
``k2._C.quantize_1x128(x, q, scale, pow2_scale, stream)``, ``k2._C.quantize_1x128_transposed(...)``,
``k2._C.quantize_128x128(w, q, scale_inv, stream)``, ``k2._C.dequantize_128x128(q, scale_inv, out, stream)``.
Inputs whose last dim has stride 1 are read in place whatever their other strides; other layouts are copied
to contiguous first. The ops have no autograd (FP8 casts are not differentiated through).
"""

from __future__ import annotations

import torch

from k2.ops import _native, reference

_FAMILY = "quant"
_GROUP = 128
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dim has stride 1 (the kernels read strided rows in place), else a copy."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _check(op: str, arg: str, t: torch.Tensor, dtypes: tuple[torch.dtype, ...], min_dim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"k2.ops.{op}: argument '{arg}': expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"k2.ops.{op}: argument '{arg}': expected dtype {names}, got {t.dtype}")
    if t.dim() < min_dim:
        raise ValueError(f"k2.ops.{op}: argument '{arg}': expected at least {min_dim} dims, got {tuple(t.shape)}")


def _check_fp8(op: str, arg: str, dtype: torch.dtype) -> None:
    if dtype not in FP8_DTYPES:
        raise ValueError(
            f"k2.ops.{op}: argument '{arg}': expected torch.float8_e4m3fn or torch.float8_e5m2, got {dtype}"
        )


# ---- quantize_1x128 ----------------------------------------------------------------------------------------


@torch.library.custom_op("k2::quantize_1x128", mutates_args=())
def _quantize_1x128(x: torch.Tensor, dtype: torch.dtype, pow2_scale: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if _native.kernel_module(_FAMILY, x.device) is None:
        return reference.quantize_1x128(x, dtype, pow2_scale)
    x = _unit_last_stride(x)
    q = torch.empty(x.shape, dtype=dtype, device=x.device)
    scale = torch.empty(*x.shape[:-1], _cdiv(x.shape[-1], _GROUP), dtype=torch.float32, device=x.device)
    _native.call("quantize_1x128", x.device, x, q, scale, pow2_scale)
    return q, scale


@_quantize_1x128.register_fake
def _(x: torch.Tensor, dtype: torch.dtype, pow2_scale: bool) -> tuple[torch.Tensor, torch.Tensor]:
    groups = (x.shape[-1] + _GROUP - 1) // _GROUP
    return x.new_empty(x.shape, dtype=dtype), x.new_empty(*x.shape[:-1], groups, dtype=torch.float32)


def quantize_1x128(
    x: torch.Tensor, *, dtype: torch.dtype = torch.float8_e4m3fn, pow2_scale: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize groups of 128 consecutive values along the last dim to FP8 (DeepSeek-V3 ``act_quant``).

    Args:
        x: ``[..., K]`` fp32, bf16 or fp16; any leading dims, K need not be a multiple of 128.
        dtype: ``torch.float8_e4m3fn`` or ``torch.float8_e5m2``.
        pow2_scale: round each scale up to a power of two (UE8M0-style scales; exact, no log2 rounding).

    Returns:
        ``q [..., K]`` in ``dtype`` with ``q = cast(fp32(x) / scale)``, and ``scale [..., ceil(K/128)]`` fp32 with
        ``scale = max(amax, 1e-4) / fp8_max``. Out-of-range values: e4m3fn saturates to +-448 (inf too), e5m2
        overflows to +-inf, NaN stays NaN (a NaN or inf in a group: see the module docstring).
    """
    _check("quantize_1x128", "x", x, INPUT_DTYPES, 1)
    _check_fp8("quantize_1x128", "dtype", dtype)
    return _quantize_1x128(x, dtype, bool(pow2_scale))


# ---- quantize_1x128_transposed -----------------------------------------------------------------------------


@torch.library.custom_op("k2::quantize_1x128_transposed", mutates_args=())
def _quantize_1x128_transposed(
    x: torch.Tensor, dtype: torch.dtype, pow2_scale: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    if _native.kernel_module(_FAMILY, x.device) is None:
        return reference.quantize_1x128_transposed(x, dtype, pow2_scale)
    x = _unit_last_stride(x)
    m, k = x.shape[-2:]
    q = torch.empty(*x.shape[:-2], k, m, dtype=dtype, device=x.device)
    scale = torch.empty(*x.shape[:-2], k, _cdiv(m, _GROUP), dtype=torch.float32, device=x.device)
    _native.call("quantize_1x128_transposed", x.device, x, q, scale, pow2_scale)
    return q, scale


@_quantize_1x128_transposed.register_fake
def _(x: torch.Tensor, dtype: torch.dtype, pow2_scale: bool) -> tuple[torch.Tensor, torch.Tensor]:
    m, k = x.shape[-2:]
    groups = (m + _GROUP - 1) // _GROUP
    return (
        x.new_empty(*x.shape[:-2], k, m, dtype=dtype),
        x.new_empty(*x.shape[:-2], k, groups, dtype=torch.float32),
    )


def quantize_1x128_transposed(
    x: torch.Tensor, *, dtype: torch.dtype = torch.float8_e4m3fn, pow2_scale: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_1x128(x.mT.contiguous())`` without materialising the transpose.

    The column-wise layout the backward pass of FP8-stored activations needs: groups of 128 run along M.

    Args:
        x: ``[..., M, K]`` fp32, bf16 or fp16.
        dtype, pow2_scale: as for :func:`quantize_1x128`.

    Returns:
        ``q [..., K, M]`` and ``scale [..., K, ceil(M/128)]`` fp32, bit-identical to
        ``quantize_1x128(x.mT.contiguous())``.
    """
    _check("quantize_1x128_transposed", "x", x, INPUT_DTYPES, 2)
    _check_fp8("quantize_1x128_transposed", "dtype", dtype)
    return _quantize_1x128_transposed(x, dtype, bool(pow2_scale))


# ---- quantize_128x128 / dequantize_128x128 -----------------------------------------------------------------


@torch.library.custom_op("k2::quantize_128x128", mutates_args=())
def _quantize_128x128(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    if _native.kernel_module(_FAMILY, w.device) is None:
        return reference.quantize_128x128(w, dtype)
    w = _unit_last_stride(w)
    m, k = w.shape[-2:]
    q = torch.empty(w.shape, dtype=dtype, device=w.device)
    scale_inv = torch.empty(*w.shape[:-2], _cdiv(m, _GROUP), _cdiv(k, _GROUP), dtype=torch.float32, device=w.device)
    _native.call("quantize_128x128", w.device, w, q, scale_inv)
    return q, scale_inv


@_quantize_128x128.register_fake
def _(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    m, k = w.shape[-2:]
    tiles = ((m + _GROUP - 1) // _GROUP, (k + _GROUP - 1) // _GROUP)
    return w.new_empty(w.shape, dtype=dtype), w.new_empty(*w.shape[:-2], *tiles, dtype=torch.float32)


def quantize_128x128(w: torch.Tensor, *, dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize 128x128 tiles of the last two dims to FP8 in the Kimi-K2 / DeepSeek-V3 checkpoint layout.

    Args:
        w: ``[..., M, K]`` fp32, bf16 or fp16 (a weight, or a stack of them); edge tiles may be partial.
        dtype: ``torch.float8_e4m3fn`` or ``torch.float8_e5m2``.

    Returns:
        ``q [..., M, K]`` in ``dtype`` with ``q = cast(fp32(w) / scale_inv[tile])`` and ``scale_inv
        [..., ceil(M/128), ceil(K/128)]`` fp32 with ``scale_inv = max(amax_tile, 1e-4) / fp8_max`` (the
        ``weight_scale_inv`` tensors of the checkpoints). Overflow and NaN rules as for :func:`quantize_1x128`.
    """
    _check("quantize_128x128", "w", w, INPUT_DTYPES, 2)
    _check_fp8("quantize_128x128", "dtype", dtype)
    return _quantize_128x128(w, dtype)


@torch.library.custom_op("k2::dequantize_128x128", mutates_args=())
def _dequantize_128x128(q: torch.Tensor, scale_inv: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    if _native.kernel_module(_FAMILY, q.device) is None:
        return reference.dequantize_128x128(q, scale_inv, out_dtype)
    q, scale_inv = _unit_last_stride(q), scale_inv.contiguous()
    out = torch.empty(q.shape, dtype=out_dtype, device=q.device)
    _native.call("dequantize_128x128", q.device, q, scale_inv, out)
    return out


@_dequantize_128x128.register_fake
def _(q: torch.Tensor, scale_inv: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    return q.new_empty(q.shape, dtype=out_dtype)


def dequantize_128x128(
    q: torch.Tensor, scale_inv: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Dequantize 128x128-tile FP8 (DeepSeek-V3 ``weight_dequant``): ``out = out_dtype(fp32(q) * scale_inv[tile])``.

    Args:
        q: ``[..., M, K]`` ``torch.float8_e4m3fn`` or ``torch.float8_e5m2``.
        scale_inv: ``[..., ceil(M/128), ceil(K/128)]`` fp32 (multiplied, as in the checkpoints).
        out_dtype: fp32, bf16 (default) or fp16; rounded to nearest even.
    """
    op = "dequantize_128x128"
    _check(op, "q", q, FP8_DTYPES, 2)
    _check(op, "scale_inv", scale_inv, (torch.float32,), 2)
    if out_dtype not in INPUT_DTYPES:
        raise ValueError(f"k2.ops.{op}: argument 'out_dtype': expected float32, bfloat16 or float16, got {out_dtype}")
    m, k = q.shape[-2:]
    expected = (*q.shape[:-2], _cdiv(m, _GROUP), _cdiv(k, _GROUP))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"k2.ops.{op}: argument 'scale_inv': expected shape {expected} (one scale per 128x128 tile of q "
            f"{tuple(q.shape)}), got {tuple(scale_inv.shape)}"
        )
    if scale_inv.device != q.device:
        raise ValueError(f"k2.ops.{op}: argument 'scale_inv': expected a tensor on {q.device}, got {scale_inv.device}")
    return _dequantize_128x128(q, scale_inv, out_dtype)
