// Absorbed-MLA decode over the latent cache (DeepSeek-V2 §2.1, "absorbed" attention; the job of FlashMLA): params
// struct, workspace plans and host API.
//
// Dimensions: B sequences, H heads, r = kv_lora_rank, dr = rope head dim, D = r + dr, T_max cache rows per sequence.
//   q      [B, H, D]      one query per sequence, already absorbed: [q_nope W_uk | rope(q_rope)]
//   cache  [B, T_max, D]  rows [c_kv | k_rope]; sequence b attends rows 0 .. lengths[b] - 1
//   o      [B, H, r]      o[b, h] = sum_j softmax_j(logits[b, h, :]) cache[b, j, :r]   (c_kv is the value)
//   lse    [B, H] fp32    lse[b, h] = log sum_j exp(logits[b, h, j]),  logits[b, h, j] = scale * <q[b, h], cache[b, j]>
// A sequence with lengths[b] = 0 gets o = 0 and lse = -inf.
// Tensors have a contiguous last dim and arbitrary other strides, in elements (the cache is a view of one layer of
// k2.infer's LatentCache [L, N, T_max, D] buffer, never copied); lse is contiguous. Data are fp32 or bf16 (q, cache
// and o of one dtype), accumulation is fp32.
//
// Split-K over keys (FlashDecoding): sequence b's keys are cut into splits[b] contiguous ranges, one work item (CPU)
// or CTA (CUDA) each, which scores every head against each cache row it loads and keeps a partial (o, lse) per head;
// the partials are merged by their lse afterwards. Workspaces (caller-allocated, sizes below) hold the partials.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "common/dtype.h"
#include "common/workspace.h"

namespace k2::attention {

struct DecodeParams {
    const void* q;  // [B, H, D]
    int64_t q_batch_stride, q_head_stride;
    const void* cache;  // [B, T_max, D]
    int64_t cache_batch_stride, cache_row_stride;
    const int32_t* lengths;  // [B], 0 <= lengths[b] <= T_max (checked on CPU, a precondition on CUDA)
    void* o;                 // [B, H, r]
    int64_t o_batch_stride, o_head_stride;
    float* lse;  // [B, H], contiguous
    int64_t batch, heads, max_len, kv_lora_rank, rope_dim;
    float softmax_scale;
    DType dtype;  // of q, cache and o
    Workspace workspace;
};

// ---- CPU --------------------------------------------------------------------------------------------------------

// Key tile of the CPU kernel (rows widened to fp32 together), and the fewest keys a split gets: each split costs one
// pass over its partial [H, r] in the combine, so it must amortise that over enough keys.
constexpr int64_t kDecodeBlockN = 32;
constexpr int64_t kDecodeMinSplitKeys = 256;

// Floats per row of the CPU kernel's fp32 tiles: D padded to whole 16-float vectors.
inline int64_t decode_padded(int64_t d) {
    return (d + 15) / 16 * 16;
}

// Most splits any sequence gets with `threads` threads: each split has at least kDecodeMinSplitKeys keys, and all
// splits together are about one per thread (see cpu_decode.cpp), so no sequence needs more than `threads`.
inline int64_t decode_max_splits_cpu(int64_t max_len, int threads) {
    const int64_t by_len = (max_len + kDecodeMinSplitKeys - 1) / kDecodeMinSplitKeys;
    return std::max<int64_t>(1, std::min<int64_t>(threads, by_len));
}

// CPU workspace: per (sequence, split slot) the partial o [H, r_pad] and lse [H], fp32, for `splits` slots per
// sequence; nothing when splits <= 1. Sequences with one split write o and lse directly, so only splits > 1 touch it.
inline WorkspacePlan decode_partial_plan(int64_t batch, int64_t heads, int64_t kv_lora_rank, int64_t splits) {
    WorkspacePlan plan;
    if (splits <= 1) return plan;
    const std::size_t slots = std::size_t(batch * splits * heads);
    plan.add(slots * std::size_t(decode_padded(kv_lora_rank)) * sizeof(float));  // o partials
    plan.add(slots * sizeof(float));                                             // lse partials
    return plan;
}

inline std::size_t decode_workspace_cpu(int64_t batch, int64_t heads, int64_t kv_lora_rank, int64_t max_len,
                                        int threads) {
    return decode_partial_plan(batch, heads, kv_lora_rank, decode_max_splits_cpu(max_len, threads)).total;
}

// Throws k2::ArgumentError for lengths outside [0, T_max] or a workspace smaller than decode_workspace_cpu's.
void decode_cpu(const DecodeParams& p);

// ---- CUDA -------------------------------------------------------------------------------------------------------

// CUDA: one CTA per (sequence, split, group of kDecodeCudaHeads heads); every sequence gets the same number of splits
// (lengths live on the device), chosen from B, H, T_max and the SM count so that the grid fills the GPU about twice.
// The workspace holds the partial o [B, splits, H, r] and lse [B, splits, H], fp32.
constexpr int64_t kDecodeCudaHeads = 16;
constexpr int64_t kDecodeCudaBlockN = 32;

int64_t decode_splits_cuda(int64_t batch, int64_t heads, int64_t max_len, int device);

inline WorkspacePlan decode_workspace_cuda(int64_t batch, int64_t heads, int64_t kv_lora_rank, int64_t splits) {
    WorkspacePlan plan;
    if (splits <= 1) return plan;  // one split writes o and lse directly
    plan.add(std::size_t(batch * splits * heads * kv_lora_rank) * sizeof(float));  // o partials
    plan.add(std::size_t(batch * splits * heads) * sizeof(float));                 // lse partials
    return plan;
}

// Limits of the CUDA kernel (k2.ops sends larger problems to the reference): the query tile [heads, D] lives in shared
// memory and each thread keeps at most 4 value columns.
constexpr int64_t kDecodeCudaMaxDim = 1152;
constexpr int64_t kDecodeCudaMaxRank = 1024;

// Runs on `stream` (a cudaStream_t) of the current device; the workspace must hold decode_workspace_cuda(..., splits)
// with `splits` from decode_splits_cuda.
void decode_cuda(const DecodeParams& p, int64_t splits, void* stream);

}  // namespace k2::attention
