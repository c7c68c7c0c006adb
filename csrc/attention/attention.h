// Softmax attention over packed variable-length documents (MLA's training/prefill attention): params structs and host
// API of the attention family.
//
// Dimensions: T tokens (all documents packed), H heads, dqk query/key head dim, dv value head dim, N documents.
//   forward:   q, k [T, H, dqk], v [T, H, dv] -> o [T, H, dv], lse [H, T] fp32, max_logits [H] fp32 (optional)
//              logits[h, i, j] = scale * <q[i, h], k[j, h]> for j visible from i, i.e. i and j in the same document
//              [cu[n], cu[n+1]) and, when causal, j <= i; lse[h, i] = log sum_j exp(logits[h, i, j]);
//              o[i, h] = sum_j exp(logits[h, i, j] - lse[h, i]) v[j, h]; max_logits[h] = max over i, j of logits.
//   backward:  do [T, H, dv] (+ q, k, v, o, lse) -> dq, dk [T, H, dqk], dv [T, H, dv], recomputing
//              P = exp(logits - lse), D = rowsum(do * o), dS = P * (do v^T - D), dq = scale dS k, dk = scale dS^T q,
//              dv = P^T do.
// Tensors: q, k, v, o, do and the gradients have a contiguous last dim and arbitrary row (token) and head strides, in
// elements; lse is contiguous [H, T]. Data are fp32 or bf16 (all of one dtype), accumulation is fp32.
// cu_seqlens: int32 [N+1] with 0 = cu[0] <= ... <= cu[N] = T, or null for one document of T tokens (the CPU kernels
// validate it; the CUDA kernels take it as a precondition, checking on the host only that N >= 1 when T > 0).
// Workspaces (caller-allocated, sizes below): CPU: fp32 packed copies of the operands every tile re-reads, the row
// maxima, D and the dq accumulators; CUDA: none forward, D and the fp32 dq accumulator backward. All linear in T.
// Nothing of size [T, T] exists anywhere.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/dtype.h"
#include "common/workspace.h"

namespace k2::attention {

// Where a [T, H, d] tensor's elements are: element (t, h, i) at data + t * row_stride + h * head_stride + i.
struct HeadTensor {
    const void* data;
    int64_t row_stride, head_stride;
};
struct MutableHeadTensor {
    void* data;
    int64_t row_stride, head_stride;
};

struct ForwardParams {
    HeadTensor q, k, v;
    MutableHeadTensor o;
    float* lse;                 // [H, T]
    float* max_logits;          // [H], or null: not requested
    const int32_t* cu_seqlens;  // [num_docs + 1], or null: one document
    int64_t num_docs;           // N (1 when cu_seqlens is null)
    int64_t tokens, heads, head_dim_qk, head_dim_v;
    float softmax_scale;
    bool causal;
    DType dtype;  // of q, k, v, o
    Workspace workspace;
};

struct BackwardParams {
    HeadTensor d_o, q, k, v, o;
    const float* lse;  // [H, T]
    MutableHeadTensor dq, dk, dv;
    const int32_t* cu_seqlens;
    int64_t num_docs;
    int64_t tokens, heads, head_dim_qk, head_dim_v;
    float softmax_scale;
    bool causal;
    DType dtype;  // of every [T, H, d] tensor
    Workspace workspace;
};

// Tile sizes of the CPU kernels: BLOCK_M queries x BLOCK_N keys. Documents start on a tile boundary.
constexpr int64_t kBlockM = 64;
constexpr int64_t kBlockN = 64;

// Head dims padded to whole vectors in the packed fp32 copies.
inline int64_t padded_head_dim(int64_t d) {
    return (d + 15) / 16 * 16;
}

// Blocks of kBlockN tokens when every document starts a new block: at most ceil(T / kBlockN) + N.
inline int64_t max_blocks(int64_t tokens, int64_t num_docs) {
    return (tokens + kBlockN - 1) / kBlockN + num_docs;
}

// CPU forward workspace: fp32 copies that every query block of a head reads (K^T per key block [dqk_pad, kBlockN], V
// [dv_pad] per token), and the row maxima [H, T] when max_logits are requested. Linear in T.
struct ForwardWorkspace {
    WorkspacePlan plan;
    int kt, v, row_max;
};

inline ForwardWorkspace forward_workspace_cpu(int64_t tokens, int64_t heads, int64_t head_dim_qk, int64_t head_dim_v,
                                              int64_t num_docs, bool max_logits) {
    ForwardWorkspace w;
    if (tokens == 0) num_docs = 0;  // nothing to pack
    w.kt = w.plan.add(std::size_t(heads * max_blocks(tokens, num_docs) * padded_head_dim(head_dim_qk) * kBlockN) *
                      sizeof(float));
    w.v = w.plan.add(std::size_t(heads * tokens * padded_head_dim(head_dim_v)) * sizeof(float));
    w.row_max = w.plan.add(max_logits ? std::size_t(heads * tokens) * sizeof(float) : 0);
    return w;
}

// CPU backward workspace: D [H, T]; fp32 copies of Q and dO by token and transposed by block (what every key block
// reads); then `splits` fp32 dq accumulators [H, T, dqk_pad]. Each (head, document) owns its rows of an accumulator;
// when there are fewer heads than threads, a head's key blocks are dealt to splits = ceil(threads / H) workers, each
// with its own accumulator, summed at the end. Linear in T.
struct BackwardWorkspace {
    WorkspacePlan plan;
    int d, q, qt, d_o, dot, dq;  // dq last: its size alone depends on `splits`
    int64_t splits, dq_stride;   // accumulators, floats per accumulator row
};

inline BackwardWorkspace backward_workspace_cpu(int64_t tokens, int64_t heads, int64_t head_dim_qk, int64_t head_dim_v,
                                                int64_t num_docs, int threads) {
    BackwardWorkspace w;
    if (tokens == 0) num_docs = 0;
    const int64_t dqkp = padded_head_dim(head_dim_qk), dvp = padded_head_dim(head_dim_v);
    const int64_t blocks = max_blocks(tokens, num_docs);
    w.splits = heads >= threads ? 1 : (threads + heads - 1) / heads;
    w.dq_stride = dqkp;
    w.d = w.plan.add(std::size_t(heads * tokens) * sizeof(float));
    w.q = w.plan.add(std::size_t(heads * tokens * dqkp) * sizeof(float));
    w.qt = w.plan.add(std::size_t(heads * blocks * dqkp * kBlockM) * sizeof(float));
    w.d_o = w.plan.add(std::size_t(heads * tokens * dvp) * sizeof(float));
    w.dot = w.plan.add(std::size_t(heads * blocks * dvp * kBlockM) * sizeof(float));
    w.dq = w.plan.add(std::size_t(w.splits * heads * tokens * dqkp) * sizeof(float));
    return w;
}

// CPU kernels (k2::parallel_for over (head, query block) forward and (head, document, key split) backward). Throw
// k2::ArgumentError for a bad cu_seqlens or a workspace smaller than the *_workspace_size query returned.
void forward_cpu(const ForwardParams& p);
void backward_cpu(const BackwardParams& p);

// CUDA backward workspace: D [H, T] fp32, then dq's fp32 accumulator [H, T, dqk] (zeroed by the kernel, summed into by
// every key block with atomics). The CUDA forward needs none: max logits are reduced with atomics into max_logits.
struct BackwardWorkspaceCuda {
    WorkspacePlan plan;
    int delta, dq;
};

inline BackwardWorkspaceCuda backward_workspace_cuda(int64_t tokens, int64_t heads, int64_t head_dim_qk) {
    BackwardWorkspaceCuda w;
    w.delta = w.plan.add(std::size_t(heads * tokens) * sizeof(float));
    w.dq = w.plan.add(std::size_t(heads * tokens * head_dim_qk) * sizeof(float));
    return w;
}

// CUDA kernels (csrc/attention/cuda.cu) on `stream` (a cudaStream_t), on the current device: FlashAttention-2 tiles on
// tensor cores for bf16 (sm_80+), on CUDA cores in fp32 for fp32. Throw k2::UnsupportedError for head dims that are
// not multiples of 8 up to 256, float16, or more than 65535 heads; cu_seqlens is a precondition (not validated).
void forward_cuda(const ForwardParams& p, void* stream);
void backward_cuda(const BackwardParams& p, void* stream);

}  // namespace k2::attention
