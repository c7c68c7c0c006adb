// Token permutation for mixture-of-experts layers: params structs and host API of the moe family.
//
// Dimensions: T tokens, K experts per token (top-k), D hidden size, E experts, N = T*K token copies.
//   permute:             x [T, D], topk_ids [T, K] -> x_sorted [N, D], row_map [N] int32, offsets [E] int32
//                        row_map[i] = t*K + k of the copy at sorted row i, stable-sorted by expert;
//                        x_sorted[i] = x[row_map[i] / K]; offsets[e] = cumulative row end of expert e.
//   unpermute:           y[t] = sum_k w[t, k] * y_sorted[pos(t, k)]            (fp32 accumulation)
//   unpermute_backward:  dy_sorted[i] = w[f] * dy[f / K], dweights[f] = <y_sorted[i], dy[f / K]>, f = row_map[i]
// Every tensor is contiguous (api.cpp checks); data are fp32, bf16 or fp16, weights any of those.
// The CUDA kernels run on the current device (the tensors') in a caller-provided workspace (sizes below); the
// CPU kernels need none.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/dtype.h"
#include "common/workspace.h"

namespace k2::moe {

struct PermuteParams {
    const void* x;         // [T, D] dtype
    const void* topk_ids;  // [T, K] int32 or int64
    void* x_sorted;        // [N, D] dtype
    int32_t* row_map;      // [N]
    int32_t* offsets;      // [E]
    int64_t num_tokens, top_k, hidden, num_experts;
    DType dtype;
    bool ids_int64;
    Workspace workspace;  // CUDA: permute_workspace_size bytes
};

struct UnpermuteParams {
    const void* y_sorted;  // [N, D] dtype
    const int32_t* row_map;
    const void* weights;  // [T, K] weight_dtype
    void* y;              // [T, D] dtype
    int64_t num_tokens, top_k, hidden;
    DType dtype, weight_dtype;
    Workspace workspace;  // CUDA: unpermute_workspace_size bytes
};

struct UnpermuteBackwardParams {
    const void* dy;        // [T, D] dtype
    const void* y_sorted;  // [N, D] dtype
    const int32_t* row_map;
    const void* weights;  // [T, K] weight_dtype
    void* dy_sorted;      // [N, D] dtype
    void* dweights;       // [T, K] weight_dtype
    int64_t num_tokens, top_k, hidden;
    DType dtype, weight_dtype;
};

// CUDA workspaces. permute: the radix sort's keys in, keys out and values in, int32 [N] each, then CUB's
// temporary storage (`cub_bytes`, which depends on N, the key bits and the GPU); unpermute: the inverse
// permutation, int32 [N]. Nothing when N = 0 (no launch happens).
struct PermuteWorkspace {
    WorkspacePlan plan;
    int keys_in, keys_out, values_in, cub;
};

inline PermuteWorkspace permute_workspace(int64_t n, std::size_t cub_bytes) {
    PermuteWorkspace w;
    w.keys_in = w.plan.add(std::size_t(n) * sizeof(int32_t));
    w.keys_out = w.plan.add(std::size_t(n) * sizeof(int32_t));
    w.values_in = w.plan.add(std::size_t(n) * sizeof(int32_t));
    w.cub = w.plan.add(cub_bytes);
    return w;
}

inline std::size_t unpermute_workspace_size(int64_t num_tokens, int64_t top_k) {
    return WorkspacePlan::round_up(std::size_t(num_tokens * top_k) * sizeof(int32_t));
}

// Key bits the radix sort orders: enough for every expert id in [0, num_experts).
inline int expert_id_bits(int64_t num_experts) {
    int bits = 1;
    while ((int64_t(1) << bits) < num_experts) ++bits;
    return bits;
}

// Bytes permute_cuda needs for N = num_tokens * top_k copies and E experts on CUDA device `device`.
std::size_t permute_workspace_size(int64_t num_tokens, int64_t top_k, int64_t num_experts, int device);

// CPU kernels (k2::parallel_for). Throw k2::ArgumentError for an expert id outside [0, E) or a row_map that is
// not a permutation of [0, N).
void permute_cpu(const PermuteParams& p);
void unpermute_cpu(const UnpermuteParams& p);
void unpermute_backward_cpu(const UnpermuteBackwardParams& p);

// CUDA kernels on `stream` (a cudaStream_t). Ids and row_map are not validated on the device (that would need a
// host sync): out-of-range values are a precondition violation, as for torch's index ops.
void permute_cuda(const PermuteParams& p, void* stream);
void unpermute_cuda(const UnpermuteParams& p, void* stream);
void unpermute_backward_cuda(const UnpermuteBackwardParams& p, void* stream);

}  // namespace k2::moe
