"""Cross-entropy of the LM head without materialising the full ``[N, V]`` fp32 logits.

``linear_cross_entropy(h [N, D], weight [V, D], labels [N])`` = ``F.cross_entropy(h @ weightᵀ, labels)`` (mean
over labels != ignore_index). Rows are processed in chunks of about ``chunk_elements / V``; each chunk's logits
are upcast to fp32, reduced to its loss and, when a gradient is needed, immediately turned into its
contributions to ``dh`` and ``dweight`` (``dlogits = softmax − onehot``), then freed; with grad disabled
(evaluation) only the loss is computed. Backward only scales the
stored gradients, so nothing is recomputed: the cost is the three matmuls of an ordinary LM head. Peak extra
memory is one chunk of logits plus an fp32 ``[V, D]`` accumulator. (The same scheme as Liger-Kernel's fused
linear cross-entropy; written here in PyTorch so it runs on any device.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Logit elements per chunk: 2^24 fp32 = 64 MiB, i.e. ~100 rows of a 160K vocabulary.
DEFAULT_CHUNK_ELEMENTS = 1 << 24


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, labels, ignore_index: int, chunk_elements: int, grad_enabled: bool):
        n, v = h.shape[0], weight.shape[0]
        rows = max(1, chunk_elements // v)
        count = (labels != ignore_index).sum().clamp(min=1).float()
        # needs_input_grad is True under no_grad too (it only reads requires_grad): ask the caller's grad mode
        need_grad = grad_enabled and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        grad_h = torch.empty_like(h) if need_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grad else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, n, rows):
            h_c, y_c = h[start : start + rows], labels[start : start + rows]
            logits = (h_c @ weight.t()).float()  # [rows, V]
            total += F.cross_entropy(logits, y_c, ignore_index=ignore_index, reduction="sum")
            if need_grad:
                valid = y_c != ignore_index
                dlogits = torch.softmax(logits, dim=-1)
                dlogits[valid, y_c[valid]] -= 1.0
                dlogits *= valid[:, None] / count
                d = dlogits.to(h.dtype)
                grad_h[start : start + rows] = d @ weight
                grad_w += (d.t() @ h_c).float()
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype) if need_grad else None)
        return total / count

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        dh = grad_h * grad_out.to(grad_h.dtype) if ctx.needs_input_grad[0] else None
        dw = grad_w * grad_out.to(grad_w.dtype) if ctx.needs_input_grad[1] else None
        return dh, dw, None, None, None, None


def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Mean cross-entropy of ``h [N, D] @ weight [V, D]ᵀ`` against ``labels [N]`` (fp32 scalar), chunked.

    Labels equal to ``ignore_index`` are skipped; if every label is ignored the loss is 0.
    """
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1] or labels.shape != h.shape[:1]:
        raise ValueError(
            f"linear_cross_entropy: expected h [N, D], weight [V, D], labels [N]; got {tuple(h.shape)}, "
            f"{tuple(weight.shape)}, {tuple(labels.shape)}"
        )
    return _LinearCrossEntropy.apply(h, weight, labels, ignore_index, chunk_elements, torch.is_grad_enabled())
