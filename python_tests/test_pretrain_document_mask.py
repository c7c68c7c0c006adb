"""``data.document_mask`` in pre-training: a packed row of two documents gives the same logits and loss as the two
documents run separately; off (the default), batches are unchanged; on, ``k2.train.pretrain`` trains with it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_train_checkpoint import MICRO_MODEL

from k2.data import ByteTokenizer, packing
from k2.model import Transformer
from k2.train import pretrain
from k2.train.config import build_config

pytestmark = pytest.mark.usefixtures("one_thread")

TOK = ByteTokenizer()
DOC_A = "The first document, about rivers."
DOC_B = "A second one: mountains!"


def _model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(build_config(overrides=MICRO_MODEL).model.build()).eval()


def test_two_document_row_equals_the_documents_run_separately() -> None:
    n_a, n_b = len(TOK.encode(DOC_A)) + 1, len(TOK.encode(DOC_B))  # A + EOS, then B; B's EOS is the last label
    data = packing.pack_documents([DOC_A, DOC_B], TOK, n_a + n_b, document_mask=True)
    x, y, layout = data.batch([0])
    assert layout["cu_seqlens"].tolist() == [0, n_a, n_a + n_b]
    assert layout["positions"][0].tolist() == [*range(n_a), *range(n_b)]

    model = _model()
    with torch.no_grad():
        row = model(x, layout["positions"], cu_seqlens=layout["cu_seqlens"])[0]  # [S, V]
        alone_a = model(x[:, :n_a])[0]
        alone_b = model(x[:, n_a:])[0]
        torch.testing.assert_close(row, torch.cat([alone_a, alone_b]), rtol=1e-5, atol=1e-5)
        loss = model.loss(x, y, **layout)
        per_token = torch.nn.functional.cross_entropy(torch.cat([alone_a, alone_b]), y[0], reduction="none")
        torch.testing.assert_close(loss, per_token.mean(), rtol=1e-5, atol=1e-6)
        # Without the mask the second document sees the first: its logits differ.
        assert not torch.allclose(model(x)[0, n_a:], alone_b, atol=1e-3)


def test_rows_split_at_every_eos_and_at_row_starts() -> None:
    docs = ["ab", "cde", "f", "ghij"]
    data = packing.pack_documents(docs, TOK, 5, document_mask=True)
    eos = TOK.eos_id
    assert data.tokens.tolist()[:6] == [97, 98, eos, 99, 100, 101]
    _, _, layout = data.batch([0, 1])
    # row 0: a b EOS | c d ; row 1: e EOS | f EOS | g  (the cut document's tail starts row 1 as its own document)
    assert layout["cu_seqlens"].tolist() == [0, 3, 5, 7, 9, 10]
    assert packing.document_lengths(torch.tensor([eos, 1, eos]), eos) == [1, 2]


def test_off_by_default_keeps_plain_batches() -> None:
    data = packing.pack_documents([DOC_A, DOC_B], TOK, 16)
    assert build_config().data.document_mask is False and len(data.batch([0])) == 2


def test_pretrain_with_document_mask(tmp_path: Path) -> None:
    settings = [
        *MICRO_MODEL,
        "data.context_len=64",
        "data.corpus_documents=120",
        "data.heldout_fraction=0.1",
        "data.document_mask=true",
        "train.batch_size=4",
        "train.steps=6",
        "optim.warmup_steps=1",
        "eval.max_sequences=4",
        "checkpoint.export_hf=false",
    ]
    summary = pretrain(build_config(overrides=settings), tmp_path / "run")
    plain = pretrain(build_config(overrides=[*settings, "data.document_mask=false"]), tmp_path / "plain")
    assert summary["steps"] == 6 and summary["eval_loss"] is not None and summary["skipped_steps"] == 0
    assert summary["eval_loss"] != plain["eval_loss"]  # the mask changes what the model sees
    assert "document_mask = true" in (tmp_path / "run" / "config.toml").read_text()
