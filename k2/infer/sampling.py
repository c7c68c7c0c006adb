"""Token sampling for a batch of requests with per-request settings: temperature, top-k, top-p, seed.

Each row is sampled by inverse CDF with one uniform draw from that request's own ``torch.Generator``, so a
seeded request gives the same tokens whether it runs alone or batched with others (up to floating-point ties in
the logits). Temperature 0 is greedy (argmax, no draw). Order of the filters, as in Hugging Face and vLLM:
temperature, then top-k, then top-p (the smallest set of most likely tokens whose mass reaches ``top_p``; the
most likely token is always kept). A grammar's token mask (``k2.infer.grammar``) acts before all of them: the
disallowed tokens of a constrained row get logit -inf, so greedy, top-k and top-p only see allowed tokens.

Log-probs are ``log_softmax`` of the unmodified logits (before the grammar mask, temperature and filters), in fp32:
the model's distribution, which is what an RL trainer recomputes; ``top_logprobs`` lists the most likely tokens of
it, which under a grammar may include disallowed ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class SampleOutput:
    tokens: torch.Tensor  # [B] int64
    logprobs: torch.Tensor  # [B] fp32, log p(token) under the unmodified distribution
    top_ids: torch.Tensor | None  # [B, k] int64, the k most likely tokens (k = max requested), or None
    top_logprobs: torch.Tensor | None  # [B, k] fp32


def sample(
    logits: torch.Tensor,
    temperature: Sequence[float],
    top_p: Sequence[float],
    top_k: Sequence[int],
    generators: Sequence[torch.Generator],
    num_top_logprobs: int = 0,
    mask_rows: Sequence[int] = (),
    mask: torch.Tensor | None = None,
) -> SampleOutput:
    """``logits [B, V]`` → one token per row. ``top_k[b] <= 0`` disables top-k; ``top_p[b] = 1`` disables top-p;
    ``temperature[b] == 0`` is greedy. ``generators`` must be on ``logits``' device (CPU generators for CPU).
    ``mask [len(mask_rows), V]`` (bool, True = allowed, at least one per row) restricts rows ``mask_rows``; the other
    rows pay nothing for it."""
    if logits.dim() != 2:
        raise ValueError(f"sample: logits must be [B, V], got shape {tuple(logits.shape)}")
    b, v = logits.shape
    if not (len(temperature) == len(top_p) == len(top_k) == len(generators) == b):
        raise ValueError(f"sample: every per-row setting needs B = {b} entries")
    logits = logits.float()
    logprobs_all = torch.log_softmax(logits, dim=-1)  # [B, V]
    if mask is not None:
        rows = torch.tensor(list(mask_rows), device=logits.device)
        logits = logits.index_put((rows,), logits[rows].masked_fill(~mask, float("-inf")))
    tokens = logits.argmax(dim=-1)  # [B], greedy
    sampled = [i for i in range(b) if temperature[i] > 0]
    if sampled:
        rows = torch.tensor(sampled, device=logits.device)
        temp = torch.tensor([temperature[i] for i in sampled], device=logits.device)[:, None]
        u = torch.cat([torch.rand(1, generator=generators[i], device=logits.device) for i in sampled])  # [R]
        tokens[rows] = _sample_rows(logits[rows] / temp, u, [top_p[i] for i in sampled], [top_k[i] for i in sampled])
    out = SampleOutput(tokens, logprobs_all.gather(1, tokens[:, None])[:, 0], None, None)
    if num_top_logprobs > 0:
        out.top_logprobs, out.top_ids = logprobs_all.topk(min(num_top_logprobs, v), dim=-1)
    return out


def _sample_rows(scaled: torch.Tensor, u: torch.Tensor, top_p: list[float], top_k: list[int]) -> torch.Tensor:
    """Inverse-CDF draw per row of ``scaled [R, V]`` (temperature applied) with uniforms ``u [R]``."""
    v = scaled.shape[1]
    if all(p >= 1.0 for p in top_p) and all(k <= 0 or k >= v for k in top_k):
        cdf = torch.softmax(scaled, dim=-1).cumsum(dim=-1)  # [R, V]
        return _invert(cdf, u)
    sorted_logits, order = scaled.sort(dim=-1, descending=True)  # [R, V]
    probs = torch.softmax(sorted_logits, dim=-1)
    rank = torch.arange(v, device=scaled.device)[None, :]
    k = torch.tensor([kk if 0 < kk < v else v for kk in top_k], device=scaled.device)[:, None]
    p = torch.tensor(top_p, device=scaled.device, dtype=probs.dtype)[:, None]
    probs = probs.masked_fill(rank >= k, 0.0)
    probs = probs / probs.sum(dim=-1, keepdim=True)  # top-p acts on the top-k renormalised distribution
    mass_before = probs.cumsum(dim=-1) - probs  # [R, V], mass of strictly more likely tokens
    probs = probs.masked_fill((mass_before >= p) & (rank > 0), 0.0)
    return order.gather(1, _invert(probs.cumsum(dim=-1), u)[:, None])[:, 0]


def _invert(cdf: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Smallest index whose cumulative mass exceeds ``u · total`` (``cdf [R, V]`` unnormalised, ``u [R]``)."""
    target = (u * cdf[:, -1])[:, None]
    idx = torch.searchsorted(cdf, target, right=True)[:, 0]
    return idx.clamp_max(cdf.shape[1] - 1)
