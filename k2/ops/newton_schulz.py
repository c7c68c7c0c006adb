"""Newton-Schulz orthogonalisation for Muon: ``newton_schulz(x [..., m, n]) ≈ U·S'·Vᵀ`` for every matrix in ``x``.

Muon (Keller Jordan's, as in ``torch.optim.Muon`` and Moonlight) replaces a momentum matrix ``M = U·S·Vᵀ`` by
approximately ``U·Vᵀ``. Five iterations of the odd quintic ``p(X) = a·X + b·(XXᵀ)X + c·(XXᵀ)²X`` on
``X₀ = M / ‖M‖_F`` (so every singular value starts in (0, 1]) push the singular values into roughly [0.7, 1.2]:
the default coefficients ``(3.4445, -4.7750, 2.0315)`` maximise the slope at zero so that small singular values
grow fast, at the price of not converging to exactly 1, which Muon does not need. A per-step schedule converges
further in the same number of GEMMs ("polar_express", Amsel et al. 2025, arXiv 2505.16932, Algorithm 1).

Numerics follow ``torch.optim.Muon`` exactly: the input is cast to bf16, a tall matrix is transposed so the Gram
matrix ``XXᵀ`` is ``min(m, n)`` square, the Frobenius norm is clamped below at ``eps``, and every GEMM runs with
bf16 operands, fp32 accumulation and a bf16 result. All leading dimensions are a batch: an expert stack
``[E, F, D]`` gets E independent orthogonalisations in one batched GEMM per product.

Dispatch: CUDA kernel (``k2._C.newton_schulz``, family ``optim``: three batched GEMMs per step, its iterates in a
workspace of ``k2._C.newton_schulz_workspace_size`` bytes that torch allocates; float64 takes the reference) → C++
CPU kernel (none: on CPU the GEMMs are the whole cost and torch's MKL/oneDNN GEMMs are already at the machine's
peak, so a hand-written kernel could not beat them) → on a CPU without native bf16 GEMMs (no AVX512-BF16/AMX),
bf16 emulated with fp32 GEMMs: operands hold bf16 values and every product is rounded to bf16, so the arithmetic is
bf16 arithmetic up to the fp32 summation order, ~100× faster than torch's generic bf16 CPU GEMM there
(``tools/bench_optim.py``) → ``k2.ops.reference.newton_schulz`` (torch-exact bf16). ``K2_OPS=reference`` forces
the last.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from k2.ops import _native, reference

_FAMILY = "optim"

Coefficients = tuple[float, float, float]

_POLAR_EXPRESS_RAW: tuple[Coefficients, ...] = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)


def _polar_express() -> tuple[Coefficients, ...]:
    # The paper divides every polynomial but the last by a 1.01 safety factor (a/s, b/s³, c/s⁵) and normalises
    # by 1.01·‖X‖_F; the latter is folded into the first polynomial here (p₁(X/s) = a/s·X + b/s³·X³ + c/s⁵·X⁵),
    # so the normalisation stays the plain Frobenius one shared with the quintic preset.
    s = 1.01
    safe = [(a / s, b / s**3, c / s**5) for a, b, c in _POLAR_EXPRESS_RAW[:-1]] + [_POLAR_EXPRESS_RAW[-1]]
    a, b, c = safe[0]
    safe[0] = (a / s, b / s**3, c / s**5)
    return tuple(safe)


PRESETS: dict[str, tuple[Coefficients, ...]] = {
    "quintic": ((3.4445, -4.7750, 2.0315),),  # Keller Jordan's Muon; one polynomial, repeated
    "polar_express": _polar_express(),  # one polynomial per step; steps past the list repeat the last
}


def ns_coefficients(coefficients: str | Coefficients | Sequence[Coefficients], steps: int) -> list[Coefficients]:
    """The ``steps`` (a, b, c) triples one Newton-Schulz call applies, from a preset name, one triple (repeated)
    or a per-step schedule (its last triple repeated when ``steps`` is longer)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"k2.ops.newton_schulz: steps must be a positive int, got {steps!r}")
    if isinstance(coefficients, str):
        if coefficients not in PRESETS:
            raise ValueError(
                f"k2.ops.newton_schulz: unknown coefficients preset {coefficients!r}; known: {', '.join(PRESETS)}"
            )
        schedule = PRESETS[coefficients]
    elif len(coefficients) == 3 and all(isinstance(v, int | float) for v in coefficients):
        schedule = (tuple(float(v) for v in coefficients),)
    else:
        schedule = tuple(tuple(float(v) for v in triple) for triple in coefficients)
        if not schedule or any(len(t) != 3 for t in schedule):
            raise ValueError(
                "k2.ops.newton_schulz: coefficients must be a preset name, an (a, b, c) triple or a non-empty "
                f"sequence of triples, got {coefficients!r}"
            )
    return [schedule[min(i, len(schedule) - 1)] for i in range(steps)]


def _round_bf16(t: torch.Tensor) -> torch.Tensor:
    return t.bfloat16().float()


# Matrices per emulated-bf16 chunk are capped at this many elements (16 MiB of fp32): the iteration's
# temporaries then stay below glibc's mmap threshold and are reused from the heap instead of being page-faulted
# in on every product, which costs more than the batching saves on big stacks.
_CPU_CHUNK_ELEMENTS = 1 << 22


def _iterate_fp32(X: torch.Tensor, coefficients: list[Coefficients]) -> torch.Tensor:
    for a, b, c in coefficients:
        A = _round_bf16(X @ X.mT)  # [N, k, k]
        B = _round_bf16(torch.baddbmm(A, A, A, beta=b, alpha=c))
        X = _round_bf16(torch.baddbmm(X, B, X, beta=a))
    return X


def _newton_schulz_bf16_emulated(x: torch.Tensor, coefficients: list[Coefficients], eps: float) -> torch.Tensor:
    """The reference's arithmetic with fp32 GEMMs on bf16-valued operands, each result rounded to bf16."""
    shape = x.shape
    X = x.reshape(-1, shape[-2], shape[-1]).bfloat16()  # [N, m, n]
    transpose = shape[-2] > shape[-1]
    if transpose:
        X = X.mT
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # bf16, [N, k, l] with k <= l
    out = torch.empty_like(X)
    per_chunk = max(1, _CPU_CHUNK_ELEMENTS // (shape[-2] * shape[-1]))
    for start in range(0, X.shape[0], per_chunk):
        chunk = X[start : start + per_chunk].float()  # bf16 values held in fp32
        out[start : start + per_chunk] = _iterate_fp32(chunk, coefficients)
    if transpose:
        out = out.mT
    return out.reshape(shape)


def _cpu_has_bf16_gemm() -> bool:
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


@torch.library.custom_op("k2::newton_schulz", mutates_args=())
def _newton_schulz(x: torch.Tensor, coefficients: list[float], eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    triples = [tuple(coefficients[i : i + 3]) for i in range(0, len(coefficients), 3)]
    device = x.device
    if _native.kernel_module(_FAMILY, device, x, out_dtype) is not None:
        x = x.contiguous()
        out = torch.empty(x.shape, dtype=out_dtype, device=device)
        m, n = x.shape[-2:]
        sizes = (x.numel() // (m * n) if m * n else 0, m, n)
        _native.call(
            "newton_schulz", device, x, out, coefficients, eps, workspace=("newton_schulz_workspace_size", sizes)
        )
        return out
    if device.type == "cpu" and not _native.forced_reference() and not _cpu_has_bf16_gemm():
        return _newton_schulz_bf16_emulated(x, triples, eps).to(out_dtype)
    return reference.newton_schulz(x, triples, eps).to(out_dtype)


@_newton_schulz.register_fake
def _(x: torch.Tensor, coefficients: list[float], eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(x.shape, dtype=out_dtype, device=x.device)


def newton_schulz(
    x: torch.Tensor,
    *,
    steps: int = 5,
    coefficients: str | Coefficients | Sequence[Coefficients] = "quintic",
    eps: float = 1e-7,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Orthogonalise every matrix of ``x [..., m, n]`` with ``steps`` bf16 Newton-Schulz iterations.

    Args:
        x: ``[..., m, n]`` floating tensor; leading dims are a batch of independent matrices.
        steps: iterations (GEMM triples) to run.
        coefficients: ``"quintic"`` (3.4445, -4.7750, 2.0315), ``"polar_express"``, one (a, b, c) triple, or a
            per-step sequence of triples.
        eps: lower clamp on each matrix's Frobenius norm (an all-zero matrix maps to zeros).
        out_dtype: result dtype; default ``x.dtype`` (the values are bf16 either way).

    Returns:
        ``[..., m, n]``: ≈ ``U·S'·Vᵀ`` of each matrix, singular values S' near 1. Not differentiable.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or not x.is_floating_point():
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"k2.ops.newton_schulz: x must be a floating tensor [..., m, n], got {got}")
    if not eps > 0:
        raise ValueError(f"k2.ops.newton_schulz: eps must be > 0, got {eps!r}")
    flat = [float(v) for triple in ns_coefficients(coefficients, steps) for v in triple]
    return _newton_schulz(x.detach(), flat, float(eps), out_dtype or x.dtype)
