"""k2.optim.Muon against torch.optim.Muon (the oracle) on 2-D parameters, and on expert stacks vs their matrices."""

from __future__ import annotations

import pytest
import torch

import k2.optim.muon as muon_module
from k2.optim import Muon

SHAPES = [(32, 48), (48, 32), (32, 48), (16, 16), (64, 8)]


pytestmark = pytest.mark.usefixtures("one_thread")


def _run(opt_cls, shapes, steps=4, seed=0, **kwargs):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
    opt = opt_cls(params, **kwargs)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return [p.detach() for p in params], opt


@pytest.mark.parametrize("adjust_lr_fn", [None, "original", "match_rms_adamw"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_equals_torch_muon(monkeypatch, adjust_lr_fn, nesterov):
    # The reference Newton-Schulz is torch's bf16 arithmetic, so k2 equals torch.optim.Muon to fp32 tolerance
    # (in fact bit for bit) although it batches the three same-shape matrices.
    monkeypatch.setenv("K2_OPS", "reference")
    kw = dict(lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
    ours, _ = _run(Muon, SHAPES, **kw)
    theirs, _ = _run(torch.optim.Muon, SHAPES, **kw)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1.3e-6, atol=1e-5)


def test_default_cpu_path_tracks_torch_muon():
    # The bf16-emulating CPU path differs from torch's bf16 GEMMs by summation order only: a few bf16 ulps of
    # the update, i.e. ≤ 2 % of lr' per element after four steps.
    kw = dict(lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    ours, _ = _run(Muon, SHAPES, **kw)
    theirs, _ = _run(torch.optim.Muon, SHAPES, **kw)
    for a, b in zip(ours, theirs, strict=True):
        lr_adj = 0.02 * 0.2 * max(a.shape) ** 0.5
        torch.testing.assert_close(a, b, rtol=0, atol=0.02 * lr_adj * 4)


def test_expert_stack_equals_its_matrices_under_torch_muon(monkeypatch):
    monkeypatch.setenv("K2_OPS", "reference")
    gen = torch.Generator().manual_seed(1)
    stack = torch.randn(4, 24, 40, generator=gen)  # [E, F, D]
    w3 = stack.clone().requires_grad_()
    w2 = [stack[e].clone().requires_grad_() for e in range(4)]
    ours = Muon([w3], lr=0.01, adjust_lr_fn="match_rms_adamw")
    theirs = torch.optim.Muon(w2, lr=0.01, adjust_lr_fn="match_rms_adamw")
    for _ in range(3):
        g = torch.randn(4, 24, 40, generator=gen)
        w3.grad = g.clone()
        for e in range(4):
            w2[e].grad = g[e].clone()
        ours.step()
        theirs.step()
    torch.testing.assert_close(w3.detach(), torch.stack([w.detach() for w in w2]), rtol=1.3e-6, atol=1e-5)


def test_same_shape_matrices_share_one_newton_schulz_call(monkeypatch):
    calls = []
    real = muon_module.newton_schulz

    def counting(x, **kw):
        calls.append(tuple(x.shape))
        return real(x, **kw)

    monkeypatch.setattr(muon_module, "newton_schulz", counting)
    shapes = [(8, 24, 40), (24, 40), (8, 40, 24), (24, 40), (16, 16)]
    _run(Muon, shapes, steps=1, lr=0.01)
    assert sorted(calls) == sorted([(10, 24, 40), (8, 40, 24), (1, 16, 16)])


def test_batching_does_not_change_results():
    gen = torch.Generator().manual_seed(3)
    init = [torch.randn(24, 40, generator=gen) for _ in range(3)]
    grads = [[torch.randn(24, 40, generator=gen) for _ in range(3)] for _ in range(2)]

    def train(indices):
        params = [init[i].clone().requires_grad_() for i in indices]
        opt = Muon(params, lr=0.01)
        for step_grads in grads:
            for p, i in zip(params, indices, strict=True):
                p.grad = step_grads[i].clone()
            opt.step()
        return [p.detach() for p in params]

    together = train([0, 1, 2])
    for i in range(3):
        assert torch.equal(train([i])[0], together[i])


def test_state_dict_round_trip():
    straight, _ = _run(Muon, SHAPES, steps=4, seed=5, lr=0.02)
    gen = torch.Generator().manual_seed(5)
    params = [torch.randn(s, generator=gen).requires_grad_() for s in SHAPES]
    opt = Muon(params, lr=0.02)
    for step in range(4):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        if step == 2:
            state = opt.state_dict()
            opt = Muon(params, lr=0.5)
            opt.load_state_dict(state)
        opt.step()
    for a, b in zip(straight, params, strict=True):
        assert torch.equal(a, b.detach())


def test_weight_decay_uses_unadjusted_lr():
    w = torch.ones(4, 16, requires_grad=True)
    w.grad = torch.zeros(4, 16)
    Muon([w], lr=0.1, weight_decay=0.5, adjust_lr_fn="match_rms_adamw").step()
    torch.testing.assert_close(w.detach(), torch.full((4, 16), 1 - 0.1 * 0.5))


@pytest.mark.parametrize(
    ("params", "kwargs", "match"),
    [
        ([torch.zeros(8, requires_grad=True)], {}, r"Muon parameters must be matrices \[\.\.\., A, B\]"),
        ([torch.zeros(4, 4, requires_grad=True)], {"adjust_lr_fn": "rms"}, "adjust_lr_fn must be one of"),
        ([torch.zeros(4, 4, requires_grad=True)], {"lr": -1.0}, "lr must be >= 0"),
        ([torch.zeros(4, 4, requires_grad=True)], {"ns_coefficients": "cubic"}, "unknown coefficients preset"),
    ],
)
def test_bad_arguments(params, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Muon(params, **kwargs)
