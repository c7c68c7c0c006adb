"""k2.ops.newton_schulz against torch.optim.Muon's Newton-Schulz (the oracle), the SVD, and its own presets."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch.optim._muon import _zeropower_via_newtonschulz as torch_ns

import k2.ops
from k2.ops import reference
from k2.ops.newton_schulz import PRESETS, ns_coefficients

QUINTIC = (3.4445, -4.7750, 2.0315)


pytestmark = pytest.mark.usefixtures("one_thread")


def _torch_oracle(x: torch.Tensor, steps: int = 5) -> torch.Tensor:
    mats = x.reshape(-1, *x.shape[-2:])
    return torch.stack([torch_ns(m, QUINTIC, steps, 1e-7) for m in mats]).reshape(x.shape)


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (32, 32), (3, 16, 48), (2, 3, 40, 8)])
def test_reference_is_bit_identical_to_torch_muon(shape):
    torch.manual_seed(0)
    x = torch.randn(shape)
    out = reference.newton_schulz(x, ns_coefficients("quintic", 5), 1e-7)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, _torch_oracle(x))


def test_forced_reference_dispatch(monkeypatch):
    monkeypatch.setenv("K2_OPS", "reference")
    x = torch.randn(4, 24, 56)
    out = k2.ops.newton_schulz(x, out_dtype=torch.bfloat16)
    assert torch.equal(out, _torch_oracle(x))


@pytest.mark.parametrize("shape", [(8, 48, 96), (4, 96, 40)])
def test_default_path_matches_bf16_oracle(shape):
    # On CPUs without bf16 GEMMs the default path emulates bf16 with fp32 GEMMs: the same roundings, another
    # summation order, so single elements differ by a few bf16 ulps after five iterations.
    torch.manual_seed(1)
    x = torch.randn(shape)
    out = k2.ops.newton_schulz(x)
    expected = _torch_oracle(x).float()
    assert out.dtype == x.dtype and out.shape == x.shape
    rel = (out - expected).norm() / expected.norm()
    assert rel < 1e-2, rel
    torch.testing.assert_close(out, expected, rtol=0, atol=2e-2)


def test_batch_equals_each_matrix():
    torch.manual_seed(2)
    x = torch.randn(5, 32, 64)
    batched = k2.ops.newton_schulz(x)
    for i in range(5):
        assert torch.equal(batched[i], k2.ops.newton_schulz(x[i]))


def _orthogonal_factor(x: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(x.double(), full_matrices=False)
    return u @ vh


@pytest.mark.parametrize("shape", [(48, 96), (96, 48)])
def test_quintic_lands_singular_values_near_one(shape):
    torch.manual_seed(3)
    x = torch.randn(shape)
    out = k2.ops.newton_schulz(x).double()
    s = torch.linalg.svdvals(out)
    # the quintic's fixed band (Keller Jordan): not converged to 1, but no singular value left small or large
    assert s.min() > 0.5 and s.max() < 1.25
    # and the directions are the polar factor's: the cosine with U·Vᵀ is high
    cos = (out * _orthogonal_factor(x)).sum() / (out.norm() * _orthogonal_factor(x).norm())
    assert cos > 0.95


def test_polar_express_converges_to_polar_factor():
    torch.manual_seed(4)
    x = torch.randn(64, 96) * torch.logspace(-2, 0, 96)  # condition number ~100
    out = k2.ops.newton_schulz(x, steps=8, coefficients="polar_express").double()
    s = torch.linalg.svdvals(out)
    assert s.min() > 0.95 and s.max() < 1.05
    polar = _orthogonal_factor(x)
    assert (out - polar).norm() / polar.norm() < 0.05
    quintic = k2.ops.newton_schulz(x, steps=8).double()
    assert (out - polar).norm() < (quintic - polar).norm()


def test_polar_express_folding_equals_paper_normalisation():
    # Amsel et al. Algorithm 1 in fp64: X/(1.01·‖X‖), safety-scaled polynomials; k2 folds the 1.01 into step 1.
    raw = [
        (8.28721201814563, -23.595886519098837, 17.300387312530933),
        (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
        (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
        (3.3184196573706015, -2.488488024314874, 0.51004894012372),
        (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    ]
    paper = [(a / 1.01, b / 1.01**3, c / 1.01**5) for a, b, c in raw]
    x = torch.randn(16, 24, dtype=torch.float64)

    def run(y, coeffs):
        for a, b, c in coeffs:
            g = y @ y.T
            y = a * y + (b * g + c * g @ g) @ y
        return y

    ours = run(x / x.norm(), ns_coefficients("polar_express", 5))
    theirs = run(x / (x.norm() * 1.01), paper)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_schedules():
    assert ns_coefficients("quintic", 3) == [QUINTIC] * 3
    assert ns_coefficients(QUINTIC, 2) == [QUINTIC] * 2
    pe = ns_coefficients("polar_express", 10)
    assert pe[7:] == [PRESETS["polar_express"][-1]] * 3
    assert ns_coefficients([(1.0, 2.0, 3.0), (4.0, 5.0, 6.0)], 3) == [(1.0, 2.0, 3.0), (4.0, 5.0, 6.0), (4.0, 5.0, 6.0)]


def test_zero_matrix_maps_to_zero():
    out = k2.ops.newton_schulz(torch.zeros(2, 8, 12))
    assert torch.equal(out, torch.zeros(2, 8, 12))


@pytest.mark.parametrize(
    ("x", "kwargs", "match"),
    [
        (torch.randn(8), {}, r"x must be a floating tensor \[\.\.\., m, n\]"),
        (torch.ones(4, 4, dtype=torch.int64), {}, "x must be a floating tensor"),
        (torch.randn(4, 4), {"steps": 0}, "steps must be a positive int"),
        (torch.randn(4, 4), {"coefficients": "cubic"}, "unknown coefficients preset 'cubic'"),
        (torch.randn(4, 4), {"coefficients": [(1.0, 2.0)]}, "coefficients must be"),
        (torch.randn(4, 4), {"eps": 0.0}, "eps must be > 0"),
    ],
)
def test_bad_input_names_the_argument(x, kwargs, match):
    with pytest.raises(ValueError, match=match):
        k2.ops.newton_schulz(x, **kwargs)


def test_cpu_chunking_does_not_change_results(monkeypatch):
    ns = importlib.import_module("k2.ops.newton_schulz")  # the module; k2.ops.newton_schulz is the function

    x = torch.randn(7, 24, 40)
    whole = k2.ops.newton_schulz(x)
    monkeypatch.setattr(ns, "_CPU_CHUNK_ELEMENTS", 3 * 24 * 40)  # chunks of 3, 3, 1 matrices
    assert torch.equal(k2.ops.newton_schulz(x), whole)
