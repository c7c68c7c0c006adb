"""Packed documents: the ``positions`` and ``cu_seqlens`` a forward needs to keep several documents in one row apart.

Dimension legend: B rows, S tokens per row, N documents over all rows.

A packed batch ``[B, S]`` holds several documents per row. ``Transformer`` attends within documents when it gets
``cu_seqlens [N+1]`` (int32 cumulative document lengths over the row-major flattened ``B·S`` tokens; every row
boundary is also a document boundary), and RoPE restarts with each document when ``positions [B, S]`` count from 0
in each one — then every document's logits equal those of the document alone (``python_tests/test_model.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def row_documents(batch: int, seq_len: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``cu_seqlens [B+1]`` int32 of one document per row: ``0, S, 2S, ..., B·S``."""
    return torch.arange(0, batch * seq_len + 1, max(seq_len, 1), dtype=torch.int32, device=device)[: batch + 1]


def document_layout(
    lengths: Sequence[Sequence[int]], seq_len: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``lengths[b]`` = the document lengths of row ``b`` (in order, summing to at most ``seq_len``; the rest of the
    row is one more document, the padding) → ``positions [B, S]`` int64 restarting at 0 in each document and
    ``cu_seqlens [N+1]`` int32 over the flattened ``B·S`` tokens."""
    positions = torch.empty(len(lengths), seq_len, dtype=torch.long)
    bounds = [0]
    for row, docs in enumerate(lengths):
        if any(n < 0 for n in docs) or sum(docs) > seq_len:
            raise ValueError(f"document_layout: row {row}: lengths {list(docs)} must be >= 0 and sum to <= {seq_len}")
        start = 0
        for n in [*docs, seq_len - sum(docs)]:
            positions[row, start : start + n] = torch.arange(n)
            start += n
            if n:
                bounds.append(row * seq_len + start)
    return positions.to(device), torch.tensor(bounds, dtype=torch.int32, device=device)
