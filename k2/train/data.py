"""The trainer's data: ``DataSection`` → tokenizer, packed training and held-out sequences, and the baseline loss.

Built on ``k2.data`` (corpus, readers, packing). Documents are split into training and held-out sets by a hash of
their text before packing, so no held-out document leaks into training whatever the order. The whole corpus is
tokenized into memory: right for the built-in corpus and local files up to a few GB of tokens (a streaming
reader for larger corpora would plug in here).

``baseline_loss`` is the unigram entropy of the held-out tokens an evaluation scores: the lowest cross-entropy any
model that ignores context can reach on exactly those tokens, so an ``eval_loss`` below it is learned structure.
"""

from __future__ import annotations

from dataclasses import dataclass

from k2.data import corpus, packing, readers
from k2.data.tokenizer import Tokenizer, load_tokenizer
from k2.errors import ConfigError, DataError
from k2.train.config import DataSection


@dataclass(frozen=True)
class TrainData:
    tokenizer: Tokenizer
    train: packing.PackedSequences
    heldout: packing.PackedSequences
    source: str  # what was read, for messages
    num_documents: int


def build_data(cfg: DataSection, *, vocab_size: int) -> TrainData:
    """Read or generate the documents, split, tokenize and pack them; ``DataError`` / ``ConfigError`` on bad input."""
    tokenizer = load_tokenizer(cfg.tokenizer)
    if tokenizer.vocab_size > vocab_size:
        raise ConfigError(
            f"data.tokenizer {cfg.tokenizer!r} has {tokenizer.vocab_size} tokens but the model's vocab_size is "
            f"{vocab_size}; set model.vocab_size >= {tokenizer.vocab_size}"
        )
    if cfg.path:
        docs = list(readers.read_documents(cfg.path, text_field=cfg.text_field, txt_split=cfg.txt_split))
        source = cfg.path
    else:
        docs = corpus.generate(cfg.corpus_documents, seed=cfg.corpus_seed)
        source = f"built-in corpus ({cfg.corpus_documents} documents, seed {cfg.corpus_seed})"
    if not docs:
        raise DataError(f"no documents in {source}")
    train_docs, held_docs = packing.split_documents(docs, cfg.heldout_fraction, method="hash", seed=cfg.corpus_seed)
    train = packing.pack_documents(train_docs, tokenizer, cfg.context_len, document_mask=cfg.document_mask)
    try:
        heldout = packing.pack_documents(held_docs, tokenizer, cfg.context_len, document_mask=cfg.document_mask)
    except DataError:
        raise DataError(
            f"held-out split of {source} is too small for one sequence of data.context_len={cfg.context_len} "
            f"tokens; raise data.heldout_fraction (now {cfg.heldout_fraction}) or add data"
        ) from None
    return TrainData(tokenizer, train, heldout, source, len(docs))


def eval_sequences(heldout: packing.PackedSequences, max_sequences: int) -> int:
    """How many held-out sequences an evaluation scores (``max_sequences`` 0 = all)."""
    return len(heldout) if max_sequences == 0 else min(len(heldout), max_sequences)


def baseline_loss(heldout: packing.PackedSequences, num_sequences: int) -> float:
    """Unigram entropy (nats/token) of the labels of the first ``num_sequences`` held-out sequences."""
    return corpus.unigram_baseline_loss(heldout.tokens[1 : num_sequences * heldout.context_len + 1])
