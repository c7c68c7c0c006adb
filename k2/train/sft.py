"""``sft(config)``: supervised fine-tuning on chat and tool-use conversations, the first post-training stage of
Kimi K2 (K2 report, arXiv 2507.20534 §3.1), optimised with MuonClip as the report recommends for fine-tuning a
Muon-pre-trained model (and as Moonlight, arXiv 2502.16982, found best: Muon pre-training, Muon SFT).

It is the pre-training trainer with another front end (``k2.train.loop.run_job``): the same optimizer step,
checkpoints, ``--resume``, metrics, TensorBoard, plots, torchrun layouts and Hugging Face export. What differs:

- the model is a Hugging Face-format checkpoint (``model.path``; "" = the export of the latest ``k2 pretrain`` run
  in ``runs/``), its ``config.json`` is the model config and its tokenizer is the run's;
- the data are chat records (``k2.data.sft``), or, with no ``data.path``, the built-in dialogues
  (``k2.data.toolgen``: tool use, and short tool-free arithmetic); the loss covers only what the assistant
  produces; the held-out split is by conversation;
- every evaluation adds the tool-call metrics (``k2.train.tool_eval``) of the held-out tool-calling turns, and the
  starting checkpoint is evaluated as step 0 (``eval.at_start``), so ``summary.json`` holds the numbers before
  (``*_start``) and after fine-tuning.

Under expert parallelism the experts are gathered for the tool-call generation, which rank 0 runs alone.

As in pre-training, a step's loss is the mean of its micro-batches' (and data-parallel ranks') token means. SFT rows
hold different numbers of supervised tokens, so this weighs tokens slightly differently from one large batch: a
dp=2 run follows the one-process run closely but not bit for bit (the evaluation is token-weighted and equal).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from k2.data import packing, toolgen
from k2.data.sft import Record, SFTRows, encode, read_records
from k2.data.tokenizer import CONFIG_NAME, TIKTOKEN_NAME, Tokenizer, load_tokenizer
from k2.errors import CheckpointError, ConfigError, DataError
from k2.model import load_hf
from k2.model.hf import read_config
from k2.parallel import ParallelState, world_size_from_env
from k2.parallel.expert import apply_expert_parallel, gathered_experts
from k2.train.config import CONFIG_FILE, SFTConfig, SFTDataSection, lr_schedule, validate_parallel
from k2.train.data import eval_sequences
from k2.train.loop import HF_DIR, Job, build_optimizer, evaluate, run_job
from k2.train.metrics import METRICS_FILE, read_metrics
from k2.train.tool_eval import evaluate_tool_calls, tool_turns

RUNS_DIR = Path("runs")


def latest_pretrain_export(runs: str | os.PathLike[str] = RUNS_DIR) -> Path:
    """``RUN/hf`` of the most recently exported ``k2 pretrain`` run under ``runs``; ``ConfigError`` saying how to
    make one when there is none."""
    found = []
    for hf in Path(runs).glob(f"*/{HF_DIR}/config.json"):
        run = hf.parent.parent
        try:
            text = (run / CONFIG_FILE).read_text(encoding="utf-8")
        except OSError:
            continue
        if "\npreset = " in f"\n{text}":  # a pretrain run ([model] preset); an SFT run has [model] path
            found.append((hf.stat().st_mtime, str(hf.parent)))
    if not found:
        raise ConfigError(
            f"no k2 pretrain run with a Hugging Face export in {Path(runs).resolve()}: make one with `k2 pretrain` "
            "(the tiny default, about a minute on a CPU), or pass --from DIR"
        )
    return Path(max(found)[1])


def sft(config: SFTConfig, run_dir: str | os.PathLike[str] | None = None, *, resume: bool = False) -> dict[str, Any]:
    """Fine-tune ``config.model.path`` (a Hugging Face checkpoint directory, or a run directory with one in ``hf/``)
    in ``run_dir`` (default ``runs/<timestamp>-sft``) and return the summary (also
    ``RUN_DIR/summary.json``); ``resume=True`` continues from the run directory's latest checkpoint. As ``pretrain``:
    every input is checked before the run directory is written to; under torchrun every rank calls it."""
    base = Path(config.model.path) if config.model.path else latest_pretrain_export()
    if not (base / "config.json").is_file() and (base / HF_DIR / "config.json").is_file():
        base = base / HF_DIR  # a run directory: its export
    if not (base / "config.json").is_file():
        raise CheckpointError(f"{base} is not a Hugging Face checkpoint directory (no config.json)")
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, path=str(base.resolve())))
    model_cfg = read_config(base)
    world = dist.get_world_size() if dist.is_initialized() else world_size_from_env()
    validate_parallel(config, world, n_routed_experts=model_cfg.n_routed_experts)
    return run_job(config, run_dir, resume, _sft_job)


@dataclass(frozen=True)
class SFTData:
    train: SFTRows
    heldout: SFTRows
    heldout_records: list[Record]  # the held-out conversations that fit, for the tool-call evaluation
    source: str
    counts: dict[str, int]  # conversations: train, heldout, skipped (too long); rows


def _records(cfg: SFTDataSection) -> tuple[list[Record], str]:
    if cfg.path:
        return list(read_records(cfg.path)), cfg.path
    dialogues = toolgen.generate(cfg.generated, seed=cfg.generator_seed)
    records = [Record(f"built-in dialogue {i}", d["messages"], d["tools"]) for i, d in enumerate(dialogues)]
    return records, f"built-in dialogues ({cfg.generated}, seed {cfg.generator_seed})"


def build_sft_data(cfg: SFTDataSection, tokenizer: Tokenizer, *, max_positions: int | None = None) -> SFTData:
    """Read (or generate), check, split by conversation (a keyed hash of the record's canonical JSON), render and
    lay out in rows; ``DataError`` naming the file and line for bad input. A conversation may have up to
    ``min(data.context_len, max_positions)`` positions (the model's ``max_position_embeddings``)."""
    limit, limit_name = cfg.context_len, "data.context_len"
    if max_positions is not None and max_positions < limit:
        limit, limit_name = max_positions, "the model's max_position_embeddings"
    records, source = _records(cfg)
    if not records:
        raise DataError(f"no conversations in {source}")
    keys = [json.dumps(r.as_dict(), sort_keys=True, ensure_ascii=False) for r in records]
    held = packing.heldout_by_hash(keys, cfg.heldout_fraction)
    train_records = [r for r, h in zip(records, held, strict=True) if not h]
    held_records = [r for r, h in zip(records, held, strict=True) if h]
    train, skipped = encode(train_records, tokenizer, limit, too_long=cfg.too_long, limit=limit_name)
    heldout, held_skipped = encode(held_records, tokenizer, limit, too_long=cfg.too_long, limit=limit_name)
    if not train:
        raise DataError(f"no training conversation of {source} fits {limit_name}={limit}")
    if not heldout:
        raise DataError(
            f"the held-out split of {source} is empty ({len(records)} conversations, data.heldout_fraction="
            f"{cfg.heldout_fraction}); raise data.heldout_fraction or add data"
        )
    pad = tokenizer.pad_id
    train_rows = SFTRows(train, cfg.context_len, pack=cfg.pack, pad_id=pad)
    held_rows = SFTRows(heldout, cfg.context_len, pack=cfg.pack, pad_id=pad)
    counts = {
        "train_conversations": len(train),
        "heldout_conversations": len(heldout),
        "skipped_too_long": skipped + held_skipped,
        "train_rows": len(train_rows),
    }
    return SFTData(train_rows, held_rows, [held_records[c.record] for c in heldout], source, counts)


class _CountingBatches(packing.BatchIterator):
    """A ``BatchIterator`` over ``SFTRows`` that counts the real tokens of the rows it hands out."""

    drawn = 0

    def next_indices(self):
        indices = super().next_indices()
        self.drawn += self.data.num_tokens(indices)
        return indices

    def take_drawn(self) -> int:
        n, self.drawn = self.drawn, 0
        return n


def _load_tokenizer(path: Path) -> Tokenizer:
    if not ((path / CONFIG_NAME).is_file() or (path / TIKTOKEN_NAME).is_file()):
        raise CheckpointError(f"no tokenizer in {path} ({CONFIG_NAME} or {TIKTOKEN_NAME})")
    return load_tokenizer(path)


def _sft_job(config: SFTConfig, device: torch.device, amp: torch.dtype | None, par: ParallelState) -> Job:
    base = Path(config.model.path)
    tokenizer = _load_tokenizer(base)
    data = build_sft_data(config.data, tokenizer, max_positions=read_config(base).max_position_embeddings)
    torch.manual_seed(config.train.seed)
    model = load_hf(base, dtype=torch.float32, device=device)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise CheckpointError(
            f"{base}: the tokenizer has {tokenizer.vocab_size} ids, the model {model.config.vocab_size}"
        )
    apply_expert_parallel(model, par)
    model.train()
    schedule = lr_schedule(config)
    optimizer = build_optimizer(model, config, par)
    batches = _CountingBatches(data.train, config.train.batch_size, seed=config.data.seed)
    e = config.eval
    n_eval = eval_sequences(data.heldout, e.max_sequences)  # type: ignore[arg-type]
    turns = tool_turns(data.heldout_records, e.tool_turns)

    def run_eval() -> dict[str, Any]:
        loss, tokens = evaluate(
            model, data.heldout, batch_size=e.batch_size, num_sequences=n_eval, device=device, amp=amp, par=par
        )
        out: dict[str, Any] = {"eval_loss": loss, "eval_tokens": tokens}
        if turns:
            with gathered_experts(model):  # collective; rank 0 generates alone
                if par.is_main:
                    out |= evaluate_tool_calls(model, tokenizer, turns, max_new_tokens=e.max_new_tokens, batch_size=64)
        return out

    def summarize(run_dir: Path) -> dict[str, Any]:
        """The starting checkpoint's numbers (the step-0 evaluation, kept in metrics.jsonl across resumes)."""
        start = [r for r in read_metrics(run_dir / METRICS_FILE) if r.get("kind") == "eval" and r["step"] == 0]
        keys = ("eval_loss", "tool_call_validity", "tool_call_exact")
        return {f"{k}_start": start[0].get(k) for k in keys} if start else {}

    return Job(
        model=model,
        optimizer=optimizer,
        schedule=schedule,
        batches=batches,
        evaluate=run_eval,
        step_tokens=batches.take_drawn,
        context_len=config.data.context_len,
        tokenizer=tokenizer,
        source=data.source,
        summary={"base_model": str(base), **data.counts},
        eval_at_start=e.at_start,
        summarize=summarize,
    )
