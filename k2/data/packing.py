"""Packing documents into fixed-length training sequences, a resumable deterministic order, a held-out split.

Legend: B batch, S = context_len, N tokens in the packed stream.

- ``pack_documents``: tokenize each document, append EOS, concatenate into one int32 stream ``[N]``; sequence i is
  ``stream[i·S : i·S + S + 1]`` (S+1 tokens: input = ``[:-1]``, labels = ``[1:]``), so consecutive sequences
  share one boundary token and every token after the first is a label exactly once. By default documents are
  not masked from each other (standard pre-training packing; EOS tells the model where one ends); with
  ``document_mask=True`` every document attends only to itself and its positions restart at 0 (``cu_seqlens``,
  Llama 3's intra-document masking), which equals running the documents separately. Labels do not change: the
  EOS still predicts the next document's first token, from its own document only.
- ``BatchIterator``: epoch e visits the sequences in ``permutation(seed, e)`` order; a batch that runs past the
  end of an epoch continues into the next one, so no sequence is dropped. Its position is ``(epoch, index)``;
  ``load_state_dict`` of a saved position yields exactly the batches the original run would have seen next.
- ``split_documents``: held-out split by a hash of the document text (stable when documents are added, removed
  or reordered, and identical documents never straddle the split) or as a fixed tail fraction.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from k2.data.tokenizer import Tokenizer
from k2.errors import DataError


def split_documents(
    documents: Iterable[str],
    heldout_fraction: float,
    *,
    method: Literal["hash", "tail"] = "hash",
    seed: int = 0,
) -> tuple[list[str], list[str]]:
    """``(train, heldout)``. ``hash``: a document is held out when its keyed BLAKE2b hash, as a number in [0, 1),
    is below ``heldout_fraction``; ``tail``: the last ``ceil(fraction · n)`` documents are held out."""
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"split_documents: heldout_fraction must be in [0, 1), got {heldout_fraction}")
    docs = list(documents)
    if method == "tail":
        n_held = math.ceil(heldout_fraction * len(docs))
        train, held = docs[: len(docs) - n_held], docs[len(docs) - n_held :]
    elif method == "hash":
        train, held = [], []
        for d, is_held in zip(docs, heldout_by_hash(docs, heldout_fraction, seed=seed), strict=True):
            (held if is_held else train).append(d)
    else:
        raise ValueError(f"split_documents: method must be 'hash' or 'tail', got {method!r}")
    if heldout_fraction > 0 and not held:
        raise DataError(f"held-out split is empty: {len(docs)} documents is too few for fraction {heldout_fraction}")
    if not train:
        raise DataError(f"training split is empty ({len(docs)} documents)")
    return train, held


def heldout_by_hash(texts: Iterable[str], heldout_fraction: float, *, seed: int = 0) -> list[bool]:
    """For each text: whether its keyed BLAKE2b hash, as a number in [0, 1), is below ``heldout_fraction``."""
    key = seed.to_bytes(8, "little", signed=True)
    hashes = (hashlib.blake2b(t.encode("utf-8"), digest_size=8, key=key).digest() for t in texts)
    return [int.from_bytes(h, "little") / 2.0**64 < heldout_fraction for h in hashes]


@dataclass(frozen=True)
class PackedSequences:
    """A token stream cut into overlapping windows of ``context_len + 1`` tokens. With ``document_eos`` set (the
    EOS id), each document of a window is kept apart: see ``batch``."""

    tokens: np.ndarray  # [N] int32
    context_len: int
    document_eos: int | None = None

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.context_len

    def window(self, indices: np.ndarray) -> np.ndarray:
        """``[len(indices), S+1]`` int64 windows of the given sequence indices."""
        offsets = np.asarray(indices, dtype=np.int64)[:, None] * self.context_len  # [B, 1]
        return self.tokens[offsets + np.arange(self.context_len + 1)].astype(np.int64)

    def batch(self, indices: Sequence[int] | np.ndarray) -> tuple[Any, ...]:
        """``(input_ids [B,S], labels [B,S])`` int64 tensors; labels are the inputs shifted by one. With
        ``document_eos``, a third element ``{"positions", "cu_seqlens"}`` (``k2.model.document_layout``) for
        ``Transformer.loss``: a document ends after its EOS, and the tail of a document cut by the row start is a
        document of its own."""
        w = torch.from_numpy(self.window(np.asarray(indices)))
        x, y = w[:, :-1].contiguous(), w[:, 1:].contiguous()
        if self.document_eos is None:
            return x, y
        from k2.model import document_layout

        positions, cu_seqlens = document_layout([document_lengths(row, self.document_eos) for row in x], x.shape[1])
        return x, y, {"positions": positions, "cu_seqlens": cu_seqlens}


def document_lengths(row: torch.Tensor, eos_id: int) -> list[int]:
    """Lengths of the documents of one row of input ids: each ends right after an EOS, the last at the row end."""
    ends = (torch.nonzero(row == eos_id).flatten() + 1).tolist()
    if not ends or ends[-1] != len(row):
        ends.append(len(row))
    return [b - a for a, b in zip([0, *ends[:-1]], ends, strict=True)]


def pack_documents(
    documents: Iterable[str],
    tokenizer: Tokenizer,
    context_len: int,
    *,
    add_eos: bool = True,
    document_mask: bool = False,
) -> PackedSequences:
    """Tokenize, append EOS to each document, and pack; raises ``DataError`` if not even one sequence fits.
    ``document_mask``: batches carry the document layout (needs ``add_eos``, which marks the boundaries)."""
    if document_mask and not add_eos:
        raise ValueError("pack_documents: document_mask needs add_eos (EOS marks where a document ends)")
    if context_len < 1:
        raise ValueError(f"pack_documents: context_len must be >= 1, got {context_len}")
    parts: list[np.ndarray] = []
    eos = np.array([tokenizer.eos_id], dtype=np.int32)
    for doc in documents:
        parts.append(np.asarray(tokenizer.encode(doc), dtype=np.int32))
        if add_eos:
            parts.append(eos)
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    if len(stream) < context_len + 1:
        raise DataError(
            f"not enough data: {len(stream)} tokens, but one sequence needs context_len + 1 = {context_len + 1}"
        )
    return PackedSequences(stream, context_len, tokenizer.eos_id if document_mask else None)


class BatchIterator:
    """Endless shuffled batches over ``PackedSequences`` with a resumable position ``{epoch, index}``."""

    def __init__(self, data: PackedSequences, batch_size: int, *, seed: int = 0, shuffle: bool = True) -> None:
        if batch_size < 1:
            raise ValueError(f"BatchIterator: batch_size must be >= 1, got {batch_size}")
        if len(data) == 0:
            raise DataError("BatchIterator: the data holds no complete sequence")
        self.data, self.batch_size, self.seed, self.shuffle = data, batch_size, seed, shuffle
        self.epoch, self.index = 0, 0
        self._order_epoch, self._order = -1, np.zeros(0, dtype=np.int64)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            n = len(self.data)
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            self._order = rng.permutation(n) if self.shuffle else np.arange(n)
            self._order_epoch = epoch
        return self._order

    def next_indices(self) -> np.ndarray:
        """The sequence indices of the next batch ``[B]``; advances the position."""
        out: list[np.ndarray] = []
        need = self.batch_size
        while need:
            order = self._epoch_order(self.epoch)
            take = order[self.index : self.index + need]
            out.append(take)
            need -= len(take)
            self.index += len(take)
            if self.index == len(order):
                self.epoch, self.index = self.epoch + 1, 0
        return np.concatenate(out)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data.batch(self.next_indices())

    def state_dict(self) -> dict[str, Any]:
        """The position plus what it is only valid for (seed, data size, batch size)."""
        return {
            "epoch": self.epoch,
            "index": self.index,
            "seed": self.seed,
            "num_sequences": len(self.data),
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; raises ``DataError`` if the data or seed differ from the saved run."""
        for key, mine in (("seed", self.seed), ("num_sequences", len(self.data))):
            if key in state and int(state[key]) != mine:
                raise DataError(f"cannot resume data position: saved {key} {state[key]} but this run has {mine}")
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index < len(self.data):
            raise DataError(f"cannot resume data position: invalid epoch/index {epoch}/{index}")
        self.epoch, self.index = epoch, index


def eval_batches(
    data: PackedSequences, batch_size: int, *, max_sequences: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Held-out batches in a fixed order (the first ``max_sequences`` sequences, all if None); last may be short."""
    n = len(data) if max_sequences is None else min(len(data), max_sequences)
    for start in range(0, n, batch_size):
        yield data.batch(np.arange(start, min(start + batch_size, n)))
