"""Pipeline-parallel ``k2 pretrain`` launched as a user does (``torchrun --nproc-per-node=2 --no-python k2 pretrain
--set parallel.pp=2 --set parallel.pp_virtual_stages=2``, gloo on the CPU) against one process.

Oracle: the one-process run with the same global batch. The pipeline runs the same rows in 2 micro-batches (the
schedule's mean of the micro-batches' mean losses equals the batch's mean: equal token counts), so the gradient
differs only in summation order; with AdamW (fp32 update, as in ``test_parallel_dp``; MuonClip's bf16 Newton-Schulz
is covered by ``test_pipeline``) per-step and held-out losses agree to 1e-5 relative and the exported weights to
1e-4. Checkpoints hold each rank's stages under the full model's names: a resume at pp=2 reproduces the
uninterrupted pp=2 run bit for bit, and the same checkpoint resumes in one process (pp=1).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from _k2_cli import k2, losses
from test_parallel_dp import sets, torchrun, weights

from k2.errors import ConfigError
from k2.train.config import SFTConfig, build_config

pytestmark = pytest.mark.multiproc

RUN = [
    "model.hidden_size=32",
    "model.num_hidden_layers=4",  # pp=2 x 2 virtual stages: one layer per stage
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
    "data.context_len=32",
    "data.corpus_documents=300",
    "data.heldout_fraction=0.1",
    "train.batch_size=4",
    "train.steps=6",
    "train.checkpoint_every=3",
    "optim.warmup_steps=2",
    "optim.name=adamw",
    "eval.every=3",
    "eval.max_sequences=8",
    "checkpoint.hf_dtype=float32",
]
PP2 = ["parallel.pp=2", "parallel.pp_virtual_stages=2"]


@pytest.fixture(scope="module")
def pp2_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("pp") / "pp2"
    r = torchrun(2, "pretrain", "--run-dir", run, *sets(*RUN, *PP2))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("trained 6 steps") == 1  # rank 0 alone reports
    return run


@pytest.fixture(scope="module")
def one_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("pp") / "one"
    r = k2("pretrain", "--run-dir", run, *sets(*RUN))
    assert r.returncode == 0, r.stderr
    return run


def test_pp2_reproduces_one_process(pp2_run: Path, one_run: Path) -> None:
    (steps, pp), (_, one) = zip(*losses(pp2_run), strict=True), zip(*losses(one_run), strict=True)
    assert steps == tuple(range(1, 7))  # one record per step: rank 0 alone writes
    assert pp == pytest.approx(one, rel=1e-5)
    (eval_steps, eval_pp), (eval_steps_one, eval_one) = (
        zip(*losses(run, "eval", "eval_loss"), strict=True) for run in (pp2_run, one_run)
    )
    assert eval_steps == eval_steps_one and eval_pp == pytest.approx(eval_one, rel=1e-5)
    for key in ("grad_norm", "max_logit", "load_imbalance"):  # whole-model metrics gathered over the stages
        for (_, a), (_, b) in zip(losses(pp2_run, key=key), losses(one_run, key=key), strict=True):
            assert a == pytest.approx(b, rel=1e-4), key
    w_one, w_pp = weights(one_run), weights(pp2_run)  # the export gathers every stage on rank 0
    assert w_pp.keys() == w_one.keys()
    for name, t in w_one.items():
        torch.testing.assert_close(w_pp[name], t, rtol=1e-4, atol=1e-4, msg=name)
    shards = {p.name for p in (pp2_run / "checkpoints" / "step_00000006").glob("*.distcp")}
    assert shards == {"__0_0.distcp", "__1_0.distcp"}  # each pipeline rank wrote its stages
    assert "pp = 2" in (pp2_run / "config.toml").read_text()


def test_pp2_checkpoint_resumes_at_pp2_and_in_one_process(pp2_run: Path, tmp_path: Path) -> None:
    for name, nproc, extra in (("pp2", 2, []), ("pp1", 1, ["parallel.pp=1"])):
        run = tmp_path / name
        shutil.copytree(pp2_run, run)
        shutil.rmtree(run / "checkpoints" / "step_00000006")  # as if the run had died after step 3's checkpoint
        r = torchrun(nproc, "pretrain", "--resume", run, *sets(*extra))
        assert r.returncode == 0, r.stderr[-3000:]
        if nproc == 2:
            assert losses(run) == losses(pp2_run)  # steps 4..6 bit for bit
            for key, t in weights(pp2_run).items():
                assert torch.equal(weights(run)[key], t), key
        else:
            (_, resumed), (_, pp) = zip(*losses(run), strict=True), zip(*losses(pp2_run), strict=True)
            assert resumed == pytest.approx(pp, rel=1e-5)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["parallel.pp_microbatches=3"], "pp_microbatches=3: interleaved_1f1b needs a multiple of parallel.pp=2"),
        (["parallel.pp_virtual_stages=4"], "8 stages but the model has 4 layers"),
        (["parallel.pp_schedule=1f1b"], "runs one stage per rank; set parallel.pp_virtual_stages=1"),
        (["train.batch_size=6", "parallel.pp_microbatches=4"], "6 rows per pipeline, not a multiple of"),
        (["train.grad_accum=2"], "set train.grad_accum=1 and raise parallel.pp_microbatches"),
        (["data.document_mask=true"], "data.document_mask=true is not supported with parallel.pp=2"),
    ],
)
def test_bad_pipeline_config_is_one_line_error(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        build_config(overrides=[*RUN, *PP2, *overrides])
    assert "\n" not in str(info.value)


def test_bad_pipeline_config_from_the_command_line(tmp_path: Path) -> None:
    r = k2("pretrain", "--run-dir", tmp_path / "run", *sets(*RUN, *PP2, "parallel.pp_microbatches=3"))
    assert r.returncode != 0 and not (tmp_path / "run").exists()
    (line,) = r.stderr.strip().splitlines()
    assert "parallel.pp_microbatches=3" in line
    r = k2("pretrain", "--run-dir", tmp_path / "run", *sets(*RUN, *PP2))  # one process, two pipeline ranks asked
    assert r.returncode != 0 and "parallel: pp·dp = 2 but WORLD_SIZE = 1" in r.stderr
    with pytest.raises(ConfigError, match="k2 sft does not support pipeline parallelism"):
        build_config(overrides=["parallel.pp=2"], schema=SFTConfig)
