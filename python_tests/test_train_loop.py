"""The pre-training loop (k2.train.pretrain) in-process on a micro model: it learns, records what it promises,
accumulates gradients like a larger batch, skips non-finite steps and stops after too many."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_train_checkpoint import MICRO, _setup

from k2.model import Transformer, load_hf
from k2.train import TrainingDiverged, build_config, pretrain
from k2.train.checkpoint import list_checkpoints
from k2.train.loop import build_optimizer, train_step
from k2.train.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


RUN = [
    *MICRO,
    "data.corpus_documents=400",
    "data.heldout_fraction=0.1",
    "eval.max_sequences=16",
    "optim.warmup_steps=3",
]


def test_pretrain_learns_and_records_everything(tmp_path: Path) -> None:
    config = build_config(overrides=[*RUN, "train.steps=40", "eval.every=20", "train.checkpoint_every=15"])
    summary = pretrain(config, tmp_path / "run")
    run = tmp_path / "run"
    assert summary == json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 40 and summary["tokens"] == 40 * 4 * 32
    assert summary["eval_loss"] < summary["baseline_loss"] - 0.3  # learned more than unigram statistics
    assert summary["wall_s"] > 0 and summary["skipped_steps"] == 0

    records = read_metrics(run)
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in train] == list(range(1, 41))
    assert [r["step"] for r in evals] == [20, 40] and evals[-1]["eval_loss"] == summary["eval_loss"]
    first = train[0]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "max_logit", "clipped_heads", "load_imbalance"):
        assert key in first, key
    assert len(first["max_logit"]) == 2 and len(first["clipped_heads"]) == 2  # per layer
    assert len(first["load_imbalance"]) == 1  # one MoE layer (first_k_dense_replace = 1)
    assert first["load_imbalance_max"] >= 1.0
    assert train[0]["lr"] == pytest.approx(1e-2 / 3) and train[-1]["lr"] == pytest.approx(1e-3)
    assert sum(r["loss"] for r in train[-5:]) < sum(r["loss"] for r in train[:5])

    assert [s for s, _ in list_checkpoints(run)] == [30, 40]  # keep_last = 2
    assert {p.name for p in (run / "plots").iterdir()} == {"loss.png", "max_logit.png", "load_imbalance.png", "lr.png"}
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    # The export is the trained model: same held-out loss up to bf16 storage.
    exported = load_hf(run / "hf", dtype=torch.float32)
    assert exported.config == config.model.build()
    assert (run / "hf" / "tokenizer_config.json").is_file()
    assert "[model]" in (run / "config.toml").read_text()


def test_existing_run_is_not_overwritten(tmp_path: Path) -> None:
    config = build_config(overrides=[*RUN, "train.steps=4", "checkpoint.export_hf=false"])
    pretrain(config, tmp_path)
    before = (tmp_path / "metrics.jsonl").read_bytes()
    with pytest.raises(Exception, match="already holds a run; continue it with --resume"):
        pretrain(config, tmp_path)
    assert (tmp_path / "metrics.jsonl").read_bytes() == before


@pytest.mark.parametrize("optim", ["muonclip", "adamw"])
def test_grad_accumulation_equals_the_larger_batch(optim: str) -> None:
    # Two micro-batches of 4 = one batch of 8: same sequences (the iterator is sequential in its permutation), same
    # mean loss and gradient up to summation order, same max logits for QK-Clip, same expert loads for the bias.
    results, models = [], []
    for batch, accum in ((8, 1), (4, 2)):
        config, model, opt, batches = _setup(
            optim, (f"train.batch_size={batch}", f"train.grad_accum={accum}", "optim.qk_clip_tau=0.01")
        )
        init = {name: t.clone() for name, t in model.state_dict().items()}
        results.append(train_step(model, opt, batches, config, torch.device("cpu"), None))
        models.append(model)
    a, b = results
    assert a.loss == pytest.approx(b.loss, rel=1e-6)
    assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-5)
    assert a.max_logit == pytest.approx(b.max_logit, rel=1e-6)
    assert a.load_imbalance == pytest.approx(b.load_imbalance, rel=1e-6)
    if optim == "muonclip":
        assert (
            a.clipped_heads == b.clipped_heads and sum(a.clipped_heads) > 0
        )  # τ = 0.01 is below the init logits (~0.03)
    # Muon's update comes out of a bf16 Newton-Schulz: a gradient that differs in summation order can flip a
    # bf16 rounding, so the two updates agree to bf16 precision (a few 2^-8 of the update), not to fp32's.
    for (name, p), q in zip(models[0].state_dict().items(), models[1].state_dict().values(), strict=True):
        update = (p.float() - init[name].float()).abs().max().item() if p.is_floating_point() else 0.0
        torch.testing.assert_close(p, q, rtol=1e-4, atol=max(1e-5, 2**-5 * update), msg=name)


def test_expert_bias_follows_the_load() -> None:
    config, model, opt, batches = _setup("muonclip", ("optim.expert_bias_rate=0.01",))
    moe = next(model.moe_layers())
    r = train_step(model, opt, batches, config, torch.device("cpu"), None)
    load = model.expert_load()[0].float()  # one micro-batch: the step's load
    expected = 0.01 * torch.sign(load.mean() - load)
    torch.testing.assert_close(moe.gate.e_score_correction_bias, expected)
    assert r.load_imbalance[0] == pytest.approx(float(load.max() / load.mean()))


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_loss = Transformer.loss
    calls = {"n": 0}
    bad = {3, 4}  # forwards (= steps here) that produce NaN

    def loss(self, *args, **kwargs):
        calls["n"] += 1
        out = real_loss(self, *args, **kwargs)
        return out * float("nan") if self.training and calls["n"] in bad else out

    monkeypatch.setattr(Transformer, "loss", loss)
    config = build_config(overrides=[*RUN, "train.steps=8", "checkpoint.export_hf=false", "eval.every=0"])
    summary = pretrain(config, tmp_path / "a")
    assert summary["skipped_steps"] == 2
    train = [r for r in read_metrics(tmp_path / "a") if r["kind"] == "train"]
    assert [r["skipped"] for r in train] == [i in bad for i in range(1, 9)]
    assert train[2]["loss"] is None  # NaN is written as null
    assert all(r["loss"] is not None for r in train if not r["skipped"])

    calls["n"], bad = 0, set(range(5, 100))
    config = build_config(
        overrides=[*RUN, "train.steps=20", "train.max_skipped_steps=3", "train.checkpoint_every=2", "eval.every=0"]
    )
    with pytest.raises(TrainingDiverged, match=r"stopped at step 7: 3 consecutive steps .*/step_00000004"):
        pretrain(config, tmp_path / "b")
    assert [s for s, _ in list_checkpoints(tmp_path / "b")] == [2, 4]  # no checkpoint of a bad state


def test_adamw_option_builds_torch_adamw() -> None:
    config, model, _, _ = _setup("adamw")
    assert isinstance(build_optimizer(model, config), torch.optim.AdamW)
