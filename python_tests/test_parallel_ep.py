"""Expert-parallel ``k2 pretrain`` (``torchrun ... --set parallel.ep=N``, gloo on the CPU) against one process.

The micro model with E = 8 experts (top-2): at dp=4/ep=4 each rank holds 2 experts and may receive no rows.

Oracle: one process with ``batch_size = B/dp`` and ``grad_accum = dp`` runs the same forwards on the same rows
(``test_parallel_dp``). With expert parallelism it is no longer bit-identical: an expert's weight gradient is one
grouped GEMM over the rows every EP peer sent (summed inside the GEMM, source-rank-major) instead of dp separate
backward passes added one after the other, so the gradient differs in summation order (~1e-7 relative) and the
global norm is a sum of the EP ranks' squares. Hence:
- AdamW (fp32 update): per-step losses within 1e-5 relative for 10 steps and final weights within 1e-4, as
  ``test_parallel_dp``'s same-global-batch comparison;
- MuonClip: the update comes out of a bf16 Newton-Schulz, which turns that rounding difference into a bf16 one
  (a few 2^-8 of an update, ``test_train_loop``); per-step losses within 2e-4 relative.
- Before any update the runs are the same model: step 1's loss agrees to 1e-6 (forwards only differ in where the
  expert rows are computed).
Checkpoints reshard exactly: the first step after a resume at another world size has the loss the saving layout
had at that step (same weights), and the curve continues within the tolerances above. The Hugging Face export of
an EP run holds every expert: it equals, tensor for tensor, the one-process model loaded from the same checkpoint.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from _k2_cli import k2, losses
from safetensors.torch import load_file
from test_parallel_dp import RUN, sets, torchrun, weights

from k2.model import Transformer, load_hf, save_hf
from k2.train import checkpoint as ckpt
from k2.train.config import load_run_config
from k2.train.loop import build_optimizer

pytestmark = pytest.mark.multiproc

EP_RUN = [*RUN, "model.n_routed_experts=8"]
ADAMW = [*EP_RUN, "optim.name=adamw"]
LAYOUTS = {"dp2-ep2": (2, 2), "dp4-ep2": (4, 2), "dp4-ep4": (4, 4)}
GLOBAL_BATCH = 8


def layout(dp: int, ep: int) -> list[str]:
    return [f"parallel.dp={dp}", f"parallel.ep={ep}", f"train.batch_size={GLOBAL_BATCH}"]


def accumulating(dp: int) -> list[str]:
    """One process doing what the dp ranks do (the oracle)."""
    return [f"train.batch_size={GLOBAL_BATCH // dp}", f"train.grad_accum={dp}"]


def assert_curves(run: Path, oracle: Path, rel: float) -> None:
    (steps, got), (_, want) = zip(*losses(run), strict=True), zip(*losses(oracle), strict=True)
    assert list(steps) == list(range(1, 11))
    assert got[0] == pytest.approx(want[0], rel=1e-6)
    assert got == pytest.approx(want, rel=rel)


@pytest.fixture(scope="module")
def ep_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """dp=2/ep=2 with MuonClip, checkpoints at steps 5 and 10."""
    run = tmp_path_factory.mktemp("ep") / "ep"
    r = torchrun(2, "pretrain", "--run-dir", run, *sets(*EP_RUN, *layout(2, 2)))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("trained 10 steps") == 1  # rank 0 alone reports
    return run


@pytest.fixture(scope="module")
def accum_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("ep") / "accum"
    r = k2("pretrain", "--run-dir", run, *sets(*EP_RUN, *accumulating(2)))
    assert r.returncode == 0, r.stderr
    return run


def test_ep_run_layout(ep_run: Path) -> None:
    assert [s for s, _ in losses(ep_run)] == list(range(1, 11))  # one writer
    assert "ep = 2" in (ep_run / "config.toml").read_text()
    step10 = ep_run / "checkpoints" / "step_00000010"
    assert {p.name for p in step10.glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}
    w_up = weights(ep_run)["model.layers.1.mlp.experts.7.up_proj.weight"]  # the export holds all 8 experts
    assert w_up.shape == (32, 32)


def test_ep2_muonclip_tracks_one_process(ep_run: Path, accum_run: Path) -> None:
    assert_curves(ep_run, accum_run, rel=2e-4)


@pytest.mark.parametrize("name", LAYOUTS)
def test_ep_adamw_reproduces_one_process(name: str, tmp_path: Path) -> None:
    dp, ep = LAYOUTS[name]
    r = torchrun(dp, "pretrain", "--run-dir", tmp_path / "ep", *sets(*ADAMW, *layout(dp, ep)))
    assert r.returncode == 0, r.stderr[-3000:]
    r = k2("pretrain", "--run-dir", tmp_path / "one", *sets(*ADAMW, *accumulating(dp)))
    assert r.returncode == 0, r.stderr
    assert_curves(tmp_path / "ep", tmp_path / "one", rel=1e-5)
    one, ep_weights = weights(tmp_path / "one"), weights(tmp_path / "ep")
    assert one.keys() == ep_weights.keys()
    for key, t in one.items():
        torch.testing.assert_close(ep_weights[key], t, rtol=1e-4, atol=1e-4, msg=key)


def test_ep_checkpoint_resumes_in_one_process(ep_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "resumed"
    shutil.copytree(ep_run, run)
    shutil.rmtree(run / "checkpoints" / "step_00000010")  # as if the EP job had died after step 5's checkpoint
    r = k2("pretrain", "--resume", run, *sets("parallel.dp=1", "parallel.ep=1", *accumulating(2)))
    assert r.returncode == 0, r.stderr
    (_, got), (_, want) = zip(*losses(run), strict=True), zip(*losses(ep_run), strict=True)
    assert got[:5] == want[:5]  # the saving run's records
    assert got[5] == pytest.approx(want[5], rel=1e-6)  # resharded weights: the same model at step 6
    assert got == pytest.approx(want, rel=2e-4)


def test_one_process_checkpoint_resumes_with_ep(accum_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "resumed"
    shutil.copytree(accum_run, run)
    shutil.rmtree(run / "checkpoints" / "step_00000010")
    r = torchrun(2, "pretrain", "--resume", run, *sets(*layout(2, 2), "train.grad_accum=1"))
    assert r.returncode == 0, r.stderr[-3000:]
    (_, got), (_, want) = zip(*losses(run), strict=True), zip(*losses(accum_run), strict=True)
    assert got[5] == pytest.approx(want[5], rel=1e-6)
    assert got == pytest.approx(want, rel=2e-4)


def test_ep_export_equals_the_one_process_model_of_its_checkpoint(ep_run: Path, tmp_path: Path) -> None:
    # The EP run's last checkpoint, resharded into one process, is the model the export must hold.
    config = load_run_config(ep_run, ["parallel.dp=1", "parallel.ep=1"])
    torch.manual_seed(1)  # any init: everything comes from the checkpoint
    model = Transformer(config.model.build())
    opt = build_optimizer(model, config)
    ckpt.load_checkpoint(ckpt.latest_checkpoint(ep_run), model, opt, {"step": 0})
    exported = weights(ep_run)
    save_hf(model, tmp_path / "one", dtype=torch.float32)
    (file,) = (tmp_path / "one").glob("*.safetensors")
    reference = load_file(file)
    assert exported.keys() == reference.keys()
    for key, t in reference.items():
        assert torch.equal(exported[key], t), key
    x = torch.randint(0, config.model.build().vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(load_hf(ep_run / "hf").eval()(x), model.eval()(x), rtol=0, atol=0)


def test_dp4_ep2_muonclip_checkpoint_resumes_in_one_process(tmp_path: Path) -> None:
    # ZeRO-1 chunks the expert stacks over the expert-replica group (2 ranks) inside each EP rank's block: the
    # checkpoint's 2-D (ep, ep_replica) layout must reshard into one process's full state.
    run = tmp_path / "ep"
    r = torchrun(4, "pretrain", "--run-dir", run, *sets(*EP_RUN, *layout(4, 2)))
    assert r.returncode == 0, r.stderr[-3000:]
    want = [loss for _, loss in losses(run)]
    shutil.rmtree(run / "checkpoints" / "step_00000010")
    r = k2("pretrain", "--resume", run, *sets("parallel.dp=1", "parallel.ep=1", *accumulating(4)))
    assert r.returncode == 0, r.stderr
    got = [loss for _, loss in losses(run)]
    assert got[5] == pytest.approx(want[5], rel=1e-6)  # the same model at step 6
    assert got == pytest.approx(want, rel=2e-4)
