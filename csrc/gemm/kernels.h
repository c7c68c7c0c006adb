// Internal to the gemm family's CUDA code: one entry point per compiled back end and layout. Each CUTLASS
// instantiation lives in its own small .cu file (sm90_*.cu for sm_90a, sm80_*.cu for sm_80) so builds run in
// parallel and each file is compiled only for the architecture it targets.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <string>

#include "common/dtype.h"
#include "common/workspace.h"
#include "gemm/gemm.h"
#include "gemm/grouped_problem.h"

namespace k2::gemm {

// One grouped (or batched) GEMM launch: problems from `desc`, operands at a/b/c/d, D = alpha A.B + beta C.
struct GroupedRun {
    GroupedDesc desc;
    const void* a;
    const void* b;
    const void* c;  // unread when beta == 0
    void* d;
    float alpha, beta;
    int64_t max_rows;  // upper bound of any group's M (kRows) or K (kWgrad): the total row count
    int device, sm_count;
    cudaStream_t stream;
    Workspace workspace;  // at least the chosen back end's workspace_* bytes
};

void check_cuda(cudaError_t err, const char* what);
[[noreturn]] void fail_cutlass(const char* what, const std::string& status);

// Each CUTLASS back end has a workspace_* function: the bytes its run_* needs for r.desc.num_groups problems on
// r.device (only the group count, device and SM count are read), which run_* checks r.workspace against.
// CUTLASS 3.x ptr-array grouped GEMM, bf16, sm_90a (sm90_bf16_*.cu).
void run_sm90_bf16_row_col(const GroupedRun& r);
void run_sm90_bf16_row_row(const GroupedRun& r);
void run_sm90_bf16_col_row(const GroupedRun& r);
std::size_t workspace_sm90_bf16_row_col(const GroupedRun& r);
std::size_t workspace_sm90_bf16_row_row(const GroupedRun& r);
std::size_t workspace_sm90_bf16_col_row(const GroupedRun& r);
// CUTLASS 3.x FP8 blockwise-scaled grouped GEMM, sm_90a (sm90_fp8_blockwise.cu).
void run_sm90_fp8_blockwise(const GroupedGemmFp8Params& p, int device, int sm_count, cudaStream_t stream);
std::size_t workspace_sm90_fp8_blockwise(int num_groups, int device, int sm_count);
// CUTLASS 2.x grouped GEMM, bf16, sm_80 (sm80_bf16_*.cu).
void run_sm80_bf16_row_col(const GroupedRun& r);
void run_sm80_bf16_row_row(const GroupedRun& r);
void run_sm80_bf16_col_row(const GroupedRun& r);
std::size_t workspace_sm80_bf16_row_col(const GroupedRun& r);
std::size_t workspace_sm80_bf16_row_row(const GroupedRun& r);
std::size_t workspace_sm80_bf16_col_row(const GroupedRun& r);
// Tiled CUDA-core kernel for any dtype / alignment (simt.cu).
void run_simt(const GroupedRun& r, DType dtype);

}  // namespace k2::gemm
