"""The MLA latent cache: per token and layer only ``kv_lora_rank + qk_rope_head_dim`` values (DeepSeek-V2 §2.1.2).

Dimension legend: L layers, N slots (concurrent sequences), T_max tokens per slot, B rows of one forward (a
contiguous range of slots), S new tokens per row, T keys visible to the forward, r kv_lora_rank, dr
qk_rope_head_dim.

Layout: one buffer ``kv [L, N, T_max, r + dr]`` holding ``[c_kv | k_rope]`` of every cached token (the latent
after ``kv_a_layernorm`` and the rotated shared rope key). Keeping both halves in one row is the layout
``k2.ops.mla_decode`` scores a query against (FlashMLA's), and lets :meth:`update` return a plain view (no copy)
for the model's cache protocol.

Contiguous slots rather than pages, because:
- on CPU (and in PyTorch without a paged-attention kernel) pages must be gathered into contiguous tensors every
  layer of every step, which costs a copy of the whole visible cache; a slot is already contiguous;
- the engine keeps its running sequences in slots ``0..n-1`` (a finished sequence's slot is refilled by moving
  the last one into it, one copy per finished request), so every decode step reads the views ``kv[l, :n, :T]``;
- the latent is small (576 values per token per layer for Kimi-K2), so reserving ``T_max`` per slot costs far
  less than a full KV cache would; the price is that a slot's unused tail is reserved, not shared.

Protocol (``k2.model.mla``): before each forward the engine calls :meth:`bind` with the rows' slots, start
positions and valid lengths; the model then calls ``update(layer_idx, c_kv [B, S, r], k_rope [B, S, dr])``, which
writes the new entries at each row's positions and returns ``(kv [B, T, r + dr], lengths [B] int32)``: the bound
rows' cache and ``start_b + valid_b``, the keys row b's last real token sees. A prefill binds every row at start 0
(the model attends over the S new tokens, each row's first ``valid_b`` being its prompt); a decode step binds one
new token per row. Rows padded beyond ``valid_b`` write entries that are never visible and are overwritten by the
row's next tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from k2.model import ModelConfig


class LatentCache:
    """``kv [L, N, T_max, r + dr]`` plus the host-side length of every slot."""

    def __init__(
        self,
        config: ModelConfig,
        num_slots: int,
        max_len: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        if num_slots < 1 or max_len < 1:
            raise ValueError(f"LatentCache: num_slots and max_len must be >= 1, got {num_slots}, {max_len}")
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.num_layers = config.num_hidden_layers
        self.num_slots = num_slots
        self.max_len = max_len
        width = config.kv_lora_rank + config.qk_rope_head_dim
        self.kv = torch.zeros(self.num_layers, num_slots, max_len, width, dtype=dtype, device=device)
        self.lengths = [0] * num_slots  # tokens stored per slot
        self._rows: slice | None = None

    @property
    def values_per_token(self) -> int:
        """Cached values per token, all layers: ``L · (kv_lora_rank + qk_rope_head_dim)``."""
        return self.num_layers * self.kv.shape[-1]

    @property
    def bytes_per_token(self) -> int:
        return self.values_per_token * self.kv.element_size()

    # ---- one forward -----------------------------------------------------------------------------------------

    def bind(self, first_slot: int, starts: Sequence[int], num_new: int, valid: Sequence[int] | None = None) -> None:
        """Prepare the next forward over slots ``first_slot .. first_slot + B - 1``: row ``b`` writes ``num_new``
        tokens at positions ``starts[b]..`` of which the first ``valid[b]`` (default all) are real."""
        b = len(starts)
        valid = [num_new] * b if valid is None else list(valid)
        if b == 0 or len(valid) != b or num_new < 1:
            raise ValueError(f"LatentCache.bind: need B >= 1 rows, len(valid) == B and num_new >= 1, got {b}")
        if first_slot < 0 or first_slot + b > self.num_slots:
            last = first_slot + b - 1
            raise ValueError(f"LatentCache.bind: slots {first_slot}..{last} outside [0, {self.num_slots})")
        end = max(starts) + num_new
        if end > self.max_len:
            raise ValueError(f"LatentCache.bind: position {end - 1} does not fit max_len {self.max_len}")
        device = self.kv.device
        self._rows = slice(first_slot, first_slot + b)
        self._num_new = num_new
        self._visible = end  # T
        self._same_start = all(s == starts[0] for s in starts)
        self._starts = list(starts)
        self._lengths = torch.tensor([s + v for s, v in zip(starts, valid, strict=True)], dtype=torch.int32)
        self._lengths = self._lengths.to(device)  # [B]
        if num_new == 1:
            self._write_index = (torch.arange(b, device=device), torch.tensor(starts, device=device))
        for slot, s, v in zip(range(first_slot, first_slot + b), starts, valid, strict=True):
            self.lengths[slot] = s + v

    def update(self, layer_idx: int, c_kv: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``c_kv [B, S, r]`` and ``k_rope [B, S, dr]``; return ``(kv [B, T, r + dr], lengths [B] int32)``,
        ``kv`` a view of the buffer (valid until the next write)."""
        if self._rows is None:
            raise RuntimeError("LatentCache.update: call bind() before the forward")
        self._write(layer_idx, torch.cat((c_kv, k_rope), dim=-1))
        return self.kv[layer_idx, self._rows, : self._visible], self._lengths

    def _write(self, layer_idx: int, entries: torch.Tensor) -> None:
        """Store ``entries [B, S, r + dr]`` at the bound rows' positions."""
        buf = self.kv[layer_idx, self._rows]  # [B, T_max, r + dr]
        s = self._num_new
        if entries.shape[:2] != (buf.shape[0], s):
            raise ValueError(f"LatentCache.update: expected [{buf.shape[0]}, {s}, ...], got {tuple(entries.shape)}")
        if self._same_start:
            buf[:, self._starts[0] : self._starts[0] + s] = entries
        elif s == 1:
            buf[self._write_index] = entries[:, 0]
        else:
            for row, start in enumerate(self._starts):
                buf[row, start : start + s] = entries[row]

    # ---- slot management ---------------------------------------------------------------------------------------

    def move(self, src: int, dst: int) -> None:
        """Copy slot ``src``'s entries into slot ``dst`` (compaction when a sequence finishes)."""
        n = self.lengths[src]
        if n:
            self.kv[:, dst, :n] = self.kv[:, src, :n]
        self.lengths[dst], self.lengths[src] = n, 0

    def free(self, slot: int) -> None:
        self.lengths[slot] = 0
