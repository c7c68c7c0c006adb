// Host API of the gemm family (CUDA only: on CPU, k2.ops uses torch._grouped_mm, which a C++ loop does not beat).
//
//   grouped_gemm        out [T, N] = x_e @ W_e for each group e of x's rows (see grouped_problem.h, kRows)
//   grouped_gemm_wgrad  dw [E, K, N] (or [E, N, K] with trans_w) = x_e^T dy_e over each group's rows
//   grouped_gemm_fp8    out [T, N] bf16 = (x_fp8 * x_scale) @ (w_fp8 * w_scale)_e^T, DeepSeek-V3 block scales:
//                       x_scale [T, ceil(K/128)] per 1x128 block, w_scale [E, ceil(N/128), ceil(K/128)] per 128x128
//   batched_gemm        D_b = alpha * A_b . B_b + beta * C_b for equal problems (Newton-Schulz's three GEMMs)
// All tensors are contiguous; offsets stay on the device; work runs on `stream` (a cudaStream_t) on the current
// CUDA device, which must be the tensors' device. Each call takes a workspace of at least the bytes its
// *_workspace_size query returns for that device (common/workspace.h); the kernels allocate nothing.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/dtype.h"
#include "common/workspace.h"
#include "gemm/grouped_problem.h"

namespace k2::gemm {

struct GroupedGemmParams {
    GroupedDesc desc;    // mode kRows or kWgrad
    DType dtype;         // float32, bfloat16 or float16 (a, b and d)
    const void* a;       // kRows: x [T, K]; kWgrad: x (trans_w false) or dy (trans_w true)
    const void* b;       // kRows: w; kWgrad: dy (trans_w false) or x (trans_w true)
    void* d;             // out
    int64_t total_rows;  // T
    Workspace workspace;
};

struct GroupedGemmFp8Params {
    const int32_t* offsets;  // [E]
    int32_t num_groups;
    int64_t total_rows, n, k;  // x [T, K], w [E, N, K], out [T, N]
    const void* x;             // float8_e4m3fn [T, K]
    const float* x_scale;      // [T, ceil(K/128)]
    const void* w;             // float8_e4m3fn [E, N, K]
    const float* w_scale;      // [E, ceil(N/128), ceil(K/128)]
    void* out;                 // bfloat16 [T, N]
    Workspace workspace;
};

struct BatchedGemmParams {
    GroupedDesc desc;  // mode kBatch
    DType dtype;       // bfloat16 (tensor cores) or float32 / float16 (SIMT)
    const void* a;
    const void* b;
    const void* c;  // may equal d; unread when beta == 0
    void* d;
    float alpha, beta;
    Workspace workspace;
};

// Workspace bytes of grouped_gemm_cuda and batched_gemm_cuda for `num_groups` problems of `dtype` on CUDA device
// `device` (the same for every layout and mode), and of grouped_gemm_fp8_cuda. Zero when no tensor-core back end
// can run (fp32, fp16, pre-Ampere GPUs) or there are no groups.
std::size_t grouped_workspace_size(DType dtype, int64_t num_groups, int device);
std::size_t grouped_gemm_fp8_workspace_size(int64_t num_groups, int device);

void grouped_gemm_cuda(const GroupedGemmParams& p, void* stream);
void grouped_gemm_fp8_cuda(const GroupedGemmFp8Params& p, void* stream);
void batched_gemm_cuda(const BatchedGemmParams& p, void* stream);

// Whether grouped_gemm_fp8_cuda can run on CUDA device `device` (an sm_90 GPU and an sm_90a build).
bool fp8_supported(int device);

}  // namespace k2::gemm
