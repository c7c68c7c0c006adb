"""Training checkpoints (k2.train.checkpoint): exact continuation, shape check, atomicity, keep-last-N."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from k2.data import ByteTokenizer, corpus, packing
from k2.errors import CheckpointError
from k2.model import Transformer
from k2.train import checkpoint as ckpt
from k2.train.config import build_config
from k2.train.loop import build_optimizer, train_step

pytestmark = pytest.mark.usefixtures("one_thread")


MICRO_MODEL = [  # a 2-layer MLA + MoE model that trains in milliseconds per step
    "model.hidden_size=32",
    "model.num_hidden_layers=2",
    "model.num_attention_heads=2",
    "model.q_lora_rank=16",
    "model.kv_lora_rank=16",
    "model.qk_nope_head_dim=8",
    "model.qk_rope_head_dim=8",
    "model.v_head_dim=8",
    "model.intermediate_size=64",
    "model.moe_intermediate_size=32",
    "model.n_routed_experts=4",
    "model.num_experts_per_tok=2",
]
MICRO = [
    *MICRO_MODEL,
    "data.context_len=32",
    "train.batch_size=4",
    "optim.warmup_steps=0",
    "optim.lr=1e-2",
]


def _setup(optim: str, extra: tuple[str, ...] = ()):
    config = build_config(overrides=[*MICRO, f"optim.name={optim}", *extra])
    torch.manual_seed(0)
    model = Transformer(config.model.build())
    opt = build_optimizer(model, config)
    data = packing.pack_documents(corpus.generate(100, seed=3), ByteTokenizer(), config.data.context_len)
    return config, model, opt, packing.BatchIterator(data, config.train.batch_size, seed=0)


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _state(batches: packing.BatchIterator, step: int) -> dict:
    return {"step": step, "data": batches.state_dict(), "note": "x"}


@pytest.mark.parametrize("optim", ["muonclip", "adamw"])
def test_resume_continues_exactly(tmp_path: Path, optim: str) -> None:
    config, model, opt, batches = _setup(optim)
    for _ in range(3):
        train_step(model, opt, batches, config, torch.device("cpu"), None)
    saved_rng = ckpt.rng_state()
    path = ckpt.save_checkpoint(tmp_path, 3, model, opt, _state(batches, 3), keep_last=2)
    reference = [train_step(model, opt, batches, config, torch.device("cpu"), None).loss for _ in range(3)]

    torch.manual_seed(123)  # a different init: everything must come from the checkpoint
    config, model2, opt2, batches2 = _setup(optim)
    _seed(999)
    state = ckpt.load_checkpoint(path, model2, opt2, _state(batches2, 0))
    assert state["step"] == 3 and state["note"] == "x"
    assert torch.equal(torch.get_rng_state(), saved_rng["torch"])  # the generators are where they were at the save
    assert repr(np.random.get_state()) == repr(saved_rng["numpy"])
    assert random.getstate() == saved_rng["python"]
    batches2.load_state_dict(state["data"])
    resumed = [train_step(model2, opt2, batches2, config, torch.device("cpu"), None).loss for _ in range(3)]
    assert resumed == reference  # bit-exact
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_rng_state_is_restored(tmp_path: Path) -> None:
    _, model, opt, batches = _setup("adamw")
    _seed(7)
    path = ckpt.save_checkpoint(tmp_path, 1, model, opt, _state(batches, 1), keep_last=1)
    expected = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    _seed(8)
    ckpt.load_checkpoint(path, model, opt, _state(batches, 0))
    assert torch.equal(torch.rand(4), expected[0])
    assert np.array_equal(np.random.rand(4), expected[1])
    assert [random.random() for _ in range(4)] == expected[2]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("model.hidden_size=48", r"different model shape: embed_tokens\.weight is \[512, 32\] in the checkpoint"),
        ("model.num_hidden_layers=3", r"different model: it has no tensor layers\.2\."),
        ("model.num_hidden_layers=1", r"different model: this model has no tensor layers\.1\."),
    ],
)
def test_different_model_shape_is_a_checkpoint_error(tmp_path: Path, change: str, message: str) -> None:
    _, model, opt, batches = _setup("muonclip")
    path = ckpt.save_checkpoint(tmp_path, 1, model, opt, _state(batches, 1), keep_last=1)
    _, other, other_opt, _ = _setup("muonclip", (change,))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointError, match=message):
        ckpt.load_checkpoint(path, other, other_opt, _state(batches, 0))
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())  # untouched


def test_damaged_checkpoint_is_a_checkpoint_error(tmp_path: Path) -> None:
    _, model, opt, batches = _setup("adamw")
    path = ckpt.save_checkpoint(tmp_path, 1, model, opt, _state(batches, 1), keep_last=1)
    (path / ".metadata").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="damaged checkpoint"):
        ckpt.load_checkpoint(path, model, opt, _state(batches, 0))
    with pytest.raises(CheckpointError, match="not found"):
        ckpt.load_checkpoint(tmp_path / "nope", model, opt, _state(batches, 0))


def test_crash_during_save_keeps_the_last_good_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config, model, opt, batches = _setup("muonclip")
    train_step(model, opt, batches, config, torch.device("cpu"), None)
    good = ckpt.save_checkpoint(tmp_path, 1, model, opt, _state(batches, 1), keep_last=1)
    good_files = {p.name: p.read_bytes() for p in good.iterdir()}
    train_step(model, opt, batches, config, torch.device("cpu"), None)

    real_replace = ckpt.os.replace

    def crash(src, dst):  # the process dies after writing every file, just before the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 2, model, opt, _state(batches, 2), keep_last=1)
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    assert ckpt.latest_checkpoint(tmp_path) == good
    assert {p.name: p.read_bytes() for p in good.iterdir()} == good_files

    # A SIGKILL leaves a temporary directory behind: it is never taken for a checkpoint, and the next save removes it.
    leftover = tmp_path / ckpt.CHECKPOINT_DIR / ".step_00000002.tmp-abc"
    shutil.copytree(good, leftover)
    assert ckpt.latest_checkpoint(tmp_path) == good
    ckpt.save_checkpoint(tmp_path, 2, model, opt, _state(batches, 2), keep_last=1)
    assert not leftover.exists()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2]


def test_keep_last(tmp_path: Path) -> None:
    _, model, opt, batches = _setup("adamw")
    for step in (10, 20, 30, 40):
        ckpt.save_checkpoint(tmp_path, step, model, opt, _state(batches, step), keep_last=2, meta={"k": step})
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [30, 40]
    assert ckpt.read_meta(ckpt.latest_checkpoint(tmp_path))["k"] == 40
