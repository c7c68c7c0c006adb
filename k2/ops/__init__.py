"""k2's kernels behind one front door per op.

Each op is a ``torch.library.custom_op`` (with a fake implementation, and autograd where it has a backward)
that dispatches to the CUDA kernel, then the C++ CPU kernel, then the pure-PyTorch oracle in
``k2.ops.reference``. ``K2_OPS=reference`` forces the reference. This package imports nothing else of k2.
"""

from k2.ops._native import available, forced_reference
from k2.ops.attention import mla_attention
from k2.ops.comm import EpHandle, ep_combine, ep_dispatch
from k2.ops.decode import mla_decode
from k2.ops.gemm import grouped_gemm
from k2.ops.gemm_fp8 import grouped_gemm_fp8
from k2.ops.moe import moe_permute, moe_unpermute
from k2.ops.newton_schulz import newton_schulz
from k2.ops.quant import dequantize_128x128, quantize_1x128, quantize_1x128_transposed, quantize_128x128

__all__ = [
    "EpHandle",
    "available",
    "dequantize_128x128",
    "ep_combine",
    "ep_dispatch",
    "forced_reference",
    "grouped_gemm",
    "grouped_gemm_fp8",
    "mla_attention",
    "mla_decode",
    "moe_permute",
    "moe_unpermute",
    "newton_schulz",
    "quantize_1x128",
    "quantize_1x128_transposed",
    "quantize_128x128",
]
