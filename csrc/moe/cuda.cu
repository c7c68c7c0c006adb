// CUDA kernels of the moe family (see moe.h for the contract).
//
// permute: the stable sort of the N = T*K token copies by expert is CUB's radix sort over the expert id bits
// (a counting sort per digit; stable, so copies of one expert stay in token order), with the flat index as the
// value, which is row_map. offsets[e] is the upper bound of e in the sorted keys (one binary search per expert,
// no atomics). The row gather then copies x[row_map[i] / K] into row i.
// unpermute: inverse permutation, then one block per token sums its K rows in fp32 (deterministic).
// backward: one block per sorted row writes dy_sorted[i] and reduces the dot product for dweights.
// Scratch memory is the caller's workspace (moe.h: permute_workspace, unpermute_workspace_size); nothing is allocated
// here. Empty work (no token copies) is finished on the host, never launched as an empty grid.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cub/block/block_reduce.cuh>
#include <cub/device/device_radix_sort.cuh>
#include <stdexcept>
#include <string>

#include "common/cuda_elements.cuh"
#include "common/nvtx.h"
#include "moe/moe.h"

namespace k2::moe {

namespace {

constexpr int kThreads = 256;

void check_cuda(cudaError_t err, const char* what) {
    cu::check(err, "moe", what);
}

using cu::from_f32;
using cu::to_f32;

unsigned grid_for(int64_t n, int threads) {
    return unsigned(std::min<int64_t>((n + threads - 1) / threads, 65535 * 32));
}

// ---- permute ----------------------------------------------------------------------------------------------

template <typename Id>
__global__ void make_keys(const Id* ids, int32_t* keys, int32_t* values, int64_t n) {
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
        keys[i] = static_cast<int32_t>(ids[i]);
        values[i] = static_cast<int32_t>(i);
    }
}

// offsets[e] = number of sorted keys <= e.
__global__ void expert_ends(const int32_t* sorted_keys, int64_t n, int32_t* offsets, int64_t num_experts) {
    const int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
    if (e >= num_experts) return;
    int64_t lo = 0, hi = n;
    while (lo < hi) {
        const int64_t mid = (lo + hi) / 2;
        if (sorted_keys[mid] <= e)
            lo = mid + 1;
        else
            hi = mid;
    }
    offsets[e] = static_cast<int32_t>(lo);
}

// x_sorted[i] = x[row_map[i] / K], copied in 16-byte words when rows allow it (words = row bytes / 16).
template <typename Word>
__global__ void gather_rows(const Word* x, const int32_t* row_map, Word* x_sorted, int64_t n, int64_t top_k,
                            int64_t words_per_row) {
    for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
        const Word* src = x + (row_map[i] / top_k) * words_per_row;
        Word* dst = x_sorted + i * words_per_row;
        for (int64_t w = threadIdx.x; w < words_per_row; w += blockDim.x) dst[w] = src[w];
    }
}

void launch_gather(const PermuteParams& p, int64_t n, cudaStream_t stream) {
    const int64_t row_bytes = p.hidden * (p.dtype == DType::Float32 ? 4 : 2);
    const unsigned blocks = unsigned(std::min<int64_t>(n, 65535 * 8));
    const bool aligned16 = row_bytes % 16 == 0 && reinterpret_cast<uintptr_t>(p.x) % 16 == 0 &&
                           reinterpret_cast<uintptr_t>(p.x_sorted) % 16 == 0;
    if (aligned16) {
        gather_rows<<<blocks, 128, 0, stream>>>(static_cast<const int4*>(p.x), p.row_map,
                                                static_cast<int4*>(p.x_sorted), n, p.top_k, row_bytes / 16);
    } else {
        gather_rows<<<blocks, 128, 0, stream>>>(static_cast<const uint16_t*>(p.x), p.row_map,
                                                static_cast<uint16_t*>(p.x_sorted), n, p.top_k, row_bytes / 2);
    }
}

// ---- unpermute --------------------------------------------------------------------------------------------

__global__ void invert_permutation(const int32_t* row_map, int32_t* inverse, int64_t n) {
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
        inverse[row_map[i]] = static_cast<int32_t>(i);
}

template <typename Data, typename Weight>
__global__ void combine_rows(const Data* y_sorted, const int32_t* inverse, const Weight* weights, Data* y,
                             int64_t num_tokens, int64_t top_k, int64_t hidden) {
    for (int64_t t = blockIdx.x; t < num_tokens; t += gridDim.x) {
        for (int64_t d = threadIdx.x; d < hidden; d += blockDim.x) {
            float acc = 0.0f;
            for (int64_t k = 0; k < top_k; ++k) {
                const int64_t f = t * top_k + k;
                acc += to_f32(weights[f]) * to_f32(y_sorted[int64_t(inverse[f]) * hidden + d]);
            }
            y[t * hidden + d] = from_f32<Data>(acc);
        }
    }
}

template <typename Data, typename Weight>
__global__ void unpermute_backward_rows(const Data* dy, const Data* y_sorted, const int32_t* row_map,
                                        const Weight* weights, Data* dy_sorted, Weight* dweights, int64_t n,
                                        int64_t top_k, int64_t hidden) {
    using Reduce = cub::BlockReduce<float, kThreads>;
    __shared__ typename Reduce::TempStorage scratch;
    for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
        const int64_t f = row_map[i];
        const float w = to_f32(weights[f]);
        const Data* g = dy + (f / top_k) * hidden;
        float dot = 0.0f;
        for (int64_t d = threadIdx.x; d < hidden; d += kThreads) {
            const float gd = to_f32(g[d]);
            dy_sorted[i * hidden + d] = from_f32<Data>(w * gd);
            dot += to_f32(y_sorted[i * hidden + d]) * gd;
        }
        dot = Reduce(scratch).Sum(dot);
        if (threadIdx.x == 0) dweights[f] = from_f32<Weight>(dot);
        __syncthreads();  // scratch is reused by the next row
    }
}

// CUB's temporary storage for sorting n int32 key/value pairs on the current device.
std::size_t radix_sort_bytes(int64_t n, int64_t num_experts) {
    std::size_t bytes = 0;
    check_cuda(cub::DeviceRadixSort::SortPairs(nullptr, bytes, (const int32_t*)nullptr, (int32_t*)nullptr,
                                               (const int32_t*)nullptr, (int32_t*)nullptr, n, 0,
                                               expert_id_bits(num_experts), cudaStream_t{}),
               "radix sort size");
    return bytes;
}

}  // namespace

std::size_t permute_workspace_size(int64_t num_tokens, int64_t top_k, int64_t num_experts, int device) {
    const int64_t n = num_tokens * top_k;
    if (n == 0) return 0;
    cu::ScopedDevice scope(device);
    return permute_workspace(n, radix_sort_bytes(n, num_experts)).plan.total;
}

void permute_cuda(const PermuteParams& p, void* stream_handle) {
    K2_NVTX_RANGE("k2::moe_permute");
    auto stream = static_cast<cudaStream_t>(stream_handle);
    const int64_t n = p.num_tokens * p.top_k;
    if (n == 0) {  // no copies (T = 0 or top_k = 0): every expert is empty
        if (p.num_experts > 0)
            check_cuda(cudaMemsetAsync(p.offsets, 0, sizeof(int32_t) * p.num_experts, stream), "memset offsets");
        return;
    }
    const PermuteWorkspace w = permute_workspace(n, radix_sort_bytes(n, p.num_experts));
    expect_workspace(p.workspace, w.plan.total, "moe_permute");
    auto* keys_in = w.plan.at<int32_t>(p.workspace.data, w.keys_in);
    auto* keys_out = w.plan.at<int32_t>(p.workspace.data, w.keys_out);
    auto* values_in = w.plan.at<int32_t>(p.workspace.data, w.values_in);
    std::size_t cub_bytes = w.plan.total - w.plan.offset[w.cub];

    if (p.ids_int64) {
        make_keys<<<grid_for(n, kThreads), kThreads, 0, stream>>>(static_cast<const int64_t*>(p.topk_ids), keys_in,
                                                                  values_in, n);
    } else {
        make_keys<<<grid_for(n, kThreads), kThreads, 0, stream>>>(static_cast<const int32_t*>(p.topk_ids), keys_in,
                                                                  values_in, n);
    }
    check_cuda(cub::DeviceRadixSort::SortPairs(w.plan.at<char>(p.workspace.data, w.cub), cub_bytes, keys_in, keys_out,
                                               values_in, p.row_map, n, 0, expert_id_bits(p.num_experts), stream),
               "radix sort");
    if (p.num_experts > 0)
        expert_ends<<<grid_for(p.num_experts, kThreads), kThreads, 0, stream>>>(keys_out, n, p.offsets, p.num_experts);
    if (p.hidden > 0) launch_gather(p, n, stream);
    check_cuda(cudaGetLastError(), "moe_permute launch");
}

void unpermute_cuda(const UnpermuteParams& p, void* stream_handle) {
    K2_NVTX_RANGE("k2::moe_unpermute");
    auto stream = static_cast<cudaStream_t>(stream_handle);
    const int64_t n = p.num_tokens * p.top_k;
    if (p.num_tokens == 0 || p.hidden == 0) return;
    if (n == 0) {  // top_k = 0: every token sums no expert output
        const int64_t elem = p.dtype == DType::Float32 ? 4 : 2;
        return check_cuda(cudaMemsetAsync(p.y, 0, p.num_tokens * p.hidden * elem, stream), "memset");
    }
    expect_workspace(p.workspace, unpermute_workspace_size(p.num_tokens, p.top_k), "moe_unpermute");
    auto* inverse = static_cast<int32_t*>(p.workspace.data);
    invert_permutation<<<grid_for(n, kThreads), kThreads, 0, stream>>>(p.row_map, inverse, n);
    const unsigned blocks = unsigned(std::min<int64_t>(p.num_tokens, 65535 * 8));
    cu::dispatch_float(p.dtype, "moe", [&](auto data_tag) {
        using Data = decltype(data_tag);
        cu::dispatch_float(p.weight_dtype, "moe", [&](auto weight_tag) {
            using Weight = decltype(weight_tag);
            combine_rows<<<blocks, kThreads, 0, stream>>>(static_cast<const Data*>(p.y_sorted), inverse,
                                                          static_cast<const Weight*>(p.weights),
                                                          static_cast<Data*>(p.y), p.num_tokens, p.top_k, p.hidden);
        });
    });
    check_cuda(cudaGetLastError(), "moe_unpermute launch");
}

void unpermute_backward_cuda(const UnpermuteBackwardParams& p, void* stream_handle) {
    K2_NVTX_RANGE("k2::moe_unpermute_backward");
    auto stream = static_cast<cudaStream_t>(stream_handle);
    const int64_t n = p.num_tokens * p.top_k;
    if (n == 0) return;
    const unsigned blocks = unsigned(std::min<int64_t>(n, 65535 * 8));
    cu::dispatch_float(p.dtype, "moe", [&](auto data_tag) {
        using Data = decltype(data_tag);
        cu::dispatch_float(p.weight_dtype, "moe", [&](auto weight_tag) {
            using Weight = decltype(weight_tag);
            unpermute_backward_rows<<<blocks, kThreads, 0, stream>>>(
                static_cast<const Data*>(p.dy), static_cast<const Data*>(p.y_sorted), p.row_map,
                static_cast<const Weight*>(p.weights), static_cast<Data*>(p.dy_sorted),
                static_cast<Weight*>(p.dweights), n, p.top_k, p.hidden);
        });
    });
    check_cuda(cudaGetLastError(), "moe_unpermute_backward launch");
}

}  // namespace k2::moe
