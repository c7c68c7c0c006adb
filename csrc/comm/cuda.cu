// CUDA kernels of the comm family (see comm.h for the contract): the row moves around the all-to-all (pack and
// unpack, as gathers or a scatter through int32 row indices) and the weighted combine of the returned rows.
//
// move_rows: one block per row (grid-stride), copying 16-byte words when the row size and both base pointers
// allow, else 2-byte words, else bytes. The row indices make it a gather (src_index) or a scatter (dst_index);
// each destination row is written once, so the result is deterministic.
// combine: the inverse of send_copy goes into the workspace (-1 first, for copies that were not sent), then one
// block per token sums its K rows in fp32 in k order (deterministic).
// Nothing is allocated here; empty work is finished on the host, never launched as an empty grid.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "comm/comm.h"
#include "common/cuda_elements.cuh"
#include "common/nvtx.h"

namespace k2::comm {

namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 65535 * 8;

void check_cuda(cudaError_t err, const char* what) {
    cu::check(err, "comm", what);
}

using cu::from_f32;
using cu::to_f32;

// ---- move_rows --------------------------------------------------------------------------------------------

template <typename Word>
__global__ void move_rows_kernel(const Word* src, const int32_t* src_index, int64_t src_divisor, Word* dst,
                                 const int32_t* dst_index, int64_t rows, int64_t words_per_row) {
    for (int64_t i = blockIdx.x; i < rows; i += gridDim.x) {
        const int64_t s = src_index ? int64_t(src_index[i]) / src_divisor : i;
        const int64_t d = dst_index ? int64_t(dst_index[i]) : i;
        const Word* from = src + s * words_per_row;
        Word* to = dst + d * words_per_row;
        for (int64_t w = threadIdx.x; w < words_per_row; w += blockDim.x) to[w] = from[w];
    }
}

template <typename Word>
void launch_move(const MoveRowsParams& p, cudaStream_t stream) {
    const unsigned blocks = unsigned(std::min<int64_t>(p.rows, kMaxBlocks));
    const int64_t words = p.row_bytes / int64_t(sizeof(Word));
    const int threads = words >= 256 ? 256 : words >= 64 ? 128 : 32;
    move_rows_kernel<<<blocks, threads, 0, stream>>>(static_cast<const Word*>(p.src), p.src_index, p.src_divisor,
                                                     static_cast<Word*>(p.dst), p.dst_index, p.rows, words);
}

bool aligned(const void* ptr, int64_t row_bytes, int64_t word) {
    return row_bytes % word == 0 && reinterpret_cast<uintptr_t>(ptr) % word == 0;
}

// ---- combine ----------------------------------------------------------------------------------------------

__global__ void invert_send_copy(const int32_t* send_copy, int32_t* pos, int64_t num_sent) {
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < num_sent; i += int64_t(gridDim.x) * blockDim.x)
        pos[send_copy[i]] = static_cast<int32_t>(i);
}

template <typename Data, typename Weight>
__global__ void combine_kernel(const Data* rows, const int32_t* pos, const Weight* weights, Data* out,
                               int64_t num_tokens, int64_t top_k, int64_t hidden) {
    for (int64_t t = blockIdx.x; t < num_tokens; t += gridDim.x) {
        for (int64_t d = threadIdx.x; d < hidden; d += blockDim.x) {
            float acc = 0.0f;
            for (int64_t k = 0; k < top_k; ++k) {
                const int64_t f = t * top_k + k;
                const int32_t row = pos[f];
                if (row < 0) continue;  // this copy was not sent (dropped): it adds nothing
                const float w = weights ? to_f32(weights[f]) : 1.0f;
                acc += w * to_f32(rows[int64_t(row) * hidden + d]);
            }
            out[t * hidden + d] = from_f32<Data>(acc);
        }
    }
}

}  // namespace

void move_rows_cuda(const MoveRowsParams& p, cudaStream_t stream) {
    K2_NVTX_RANGE("k2::comm_move_rows");
    if (p.rows == 0 || p.row_bytes == 0) return;
    if (aligned(p.src, p.row_bytes, 16) && aligned(p.dst, p.row_bytes, 16))
        launch_move<int4>(p, stream);
    else if (aligned(p.src, p.row_bytes, 2) && aligned(p.dst, p.row_bytes, 2))
        launch_move<uint16_t>(p, stream);
    else
        launch_move<uint8_t>(p, stream);
    check_cuda(cudaGetLastError(), "move_rows launch");
}

void combine_cuda(const CombineParams& p, cudaStream_t stream) {
    K2_NVTX_RANGE("k2::comm_combine");
    if (p.num_tokens == 0 || p.hidden == 0) return;
    const int64_t copies = p.num_tokens * p.top_k;
    if (copies == 0) {  // top_k = 0: every token sums nothing
        const std::size_t bytes = std::size_t(p.num_tokens * p.hidden) * dtype_size(p.dtype);
        return check_cuda(cudaMemsetAsync(p.out, 0, bytes, stream), "memset out");
    }
    expect_workspace(p.workspace, combine_workspace_size(p.num_tokens, p.top_k), "nccl_combine");
    auto* pos = static_cast<int32_t*>(p.workspace.data);
    // Fill with -1: every byte 0xff.
    check_cuda(cudaMemsetAsync(pos, 0xff, std::size_t(copies) * sizeof(int32_t), stream), "memset positions");
    if (p.num_sent > 0) {
        const unsigned grid = unsigned(std::min<int64_t>((p.num_sent + kThreads - 1) / kThreads, kMaxBlocks));
        invert_send_copy<<<grid, kThreads, 0, stream>>>(p.send_copy, pos, p.num_sent);
    }
    const unsigned blocks = unsigned(std::min<int64_t>(p.num_tokens, kMaxBlocks));
    cu::dispatch_float(p.dtype, "comm", [&](auto data_tag) {
        using Data = decltype(data_tag);
        cu::dispatch_float(p.weight_dtype, "comm", [&](auto weight_tag) {
            using Weight = decltype(weight_tag);
            combine_kernel<<<blocks, kThreads, 0, stream>>>(static_cast<const Data*>(p.rows), pos,
                                                            static_cast<const Weight*>(p.weights),
                                                            static_cast<Data*>(p.out), p.num_tokens, p.top_k, p.hidden);
        });
    });
    check_cuda(cudaGetLastError(), "combine launch");
}

void with_device(int device, const std::function<void()>& fn) {
    cu::ScopedDevice scope(device);
    fn();
}

}  // namespace k2::comm
