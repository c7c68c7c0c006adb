// CUDA kernel of absorbed-MLA decode (see decode.h for the contract): FlashDecoding's split-K over the latent cache.
//
// decode_split: one CTA of 256 threads (8 warps) per (sequence b, split s, group of HG heads); split s of sequence b
// covers keys [len * s / S, len * (s + 1) / S). The group's queries, widened to fp32, stay in shared memory [HG, D].
// Per tile of BLOCK_N = 32 cache rows:
//   Scores  warp w scores rows 4w .. 4w + 3 of the tile against all HG heads: lane l reads elements l, l + 32, ...
//           of the 4 rows (coalesced), each meeting HG query elements from shared memory (one shared load feeds 4
//           FMAs), and the 4 x HG dot products are summed across the warp by shuffles -> S [BLOCK_N, HG].
//   Softmax thread h < HG updates head h's running max m and sum l over the tile and writes P = exp(S - m) in place
//           and the rescale factor alpha = exp(m_old - m_new).
//   Values  thread t owns value columns t, t + 256, ... (COLS of them) for all HG heads: O = alpha O + P C, the rows
//           re-read from global memory (they were just loaded, so they come from L1/L2) and P read as float4.
// Epilogue: with one split, o = O / l and lse = m + log l go straight to the outputs; otherwise a normalised partial
// (o, lse) goes to the workspace and decode_combine (one CTA per (b, h)) merges the S partials by their lse.
// fp32 accumulation throughout; bf16 is widened on load. Lengths are a precondition (0 <= lengths[b] <= T_max).
//
// NOTE: CUDA-core FMAs, not tensor cores. At K2's 64 heads (per CTA: 16) the scores and values cost ~2 * 16 FMAs per
// cache element, so this kernel is compute-bound well below HBM bandwidth; FlashMLA's WGMMA pipeline (64 heads per
// CTA, the tile in shared memory via TMA) is the way to the bandwidth limit.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "attention/decode.h"
#include "common/cuda_elements.cuh"
#include "common/nvtx.h"

namespace k2::attention {

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int BLOCK_N = int(kDecodeCudaBlockN);
constexpr int kRowsPerWarp = BLOCK_N / kWarps;  // 4
static_assert(kRowsPerWarp * kWarps == BLOCK_N, "a tile is split evenly over the warps");

using cu::from_f32;
using cu::to_f32;

void check_cuda(cudaError_t err, const char* what) {
    cu::check(err, "attention", what);
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

struct SplitArgs {
    DecodeParams p;
    int64_t splits;
    float* o_part;    // [B, S, H, r] or null (one split)
    float* lse_part;  // [B, S, H]
};

// Shared memory: q [HG, D] fp32, then S/P [BLOCK_N, HG], then m, l, alpha [HG] each.
template <int HG>
std::size_t split_smem_bytes(int64_t dim) {
    return sizeof(float) * (std::size_t(HG) * dim + BLOCK_N * HG + 3 * HG);
}

template <typename T, int HG, int COLS>
__global__ void __launch_bounds__(kThreads) decode_split(const SplitArgs a) {
    const DecodeParams& p = a.p;
    extern __shared__ float smem[];
    const int D = int(p.kv_lora_rank + p.rope_dim), r = int(p.kv_lora_rank);
    float* q_s = smem;                // [HG, D]
    float* p_s = q_s + HG * D;        // [BLOCK_N, HG]: logits, then P
    float* m_s = p_s + BLOCK_N * HG;  // [HG] running max
    float* l_s = m_s + HG;            // [HG] running sum
    float* alpha_s = l_s + HG;        // [HG] this tile's rescale factor
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int64_t split = blockIdx.x, b = blockIdx.y, h0 = int64_t(blockIdx.z) * HG;
    const int64_t len = p.lengths[b];
    const int64_t begin = len * split / a.splits, end = len * (split + 1) / a.splits;
    const T* rows = static_cast<const T*>(p.cache) + b * p.cache_batch_stride;

    // Load: the group's queries (heads past H are zero and never written out).
    for (int i = tid; i < HG * D; i += kThreads) {
        const int h = i / D, d = i % D;
        q_s[i] = h0 + h < p.heads
                     ? to_f32(static_cast<const T*>(p.q)[b * p.q_batch_stride + (h0 + h) * p.q_head_stride + d])
                     : 0.0f;
    }
    if (tid < HG) m_s[tid] = -INFINITY, l_s[tid] = 0.0f;
    float acc[COLS][HG];
#pragma unroll
    for (int c = 0; c < COLS; ++c)
#pragma unroll
        for (int h = 0; h < HG; ++h) acc[c][h] = 0.0f;
    __syncthreads();

    for (int64_t k0 = begin; k0 < end; k0 += BLOCK_N) {
        const int n = int(end - k0 < BLOCK_N ? end - k0 : BLOCK_N);

        // Scores: this warp's 4 rows against every head of the group.
        {
            float dot[kRowsPerWarp][HG];
#pragma unroll
            for (int j = 0; j < kRowsPerWarp; ++j)
#pragma unroll
                for (int h = 0; h < HG; ++h) dot[j][h] = 0.0f;
            const int j0 = warp * kRowsPerWarp;
            for (int d = lane; d < D; d += 32) {
                float k[kRowsPerWarp];
#pragma unroll
                for (int j = 0; j < kRowsPerWarp; ++j)
                    k[j] = j0 + j < n ? to_f32(rows[(k0 + j0 + j) * p.cache_row_stride + d]) : 0.0f;
#pragma unroll
                for (int h = 0; h < HG; ++h) {
                    const float q = q_s[h * D + d];
#pragma unroll
                    for (int j = 0; j < kRowsPerWarp; ++j) dot[j][h] += q * k[j];
                }
            }
#pragma unroll
            for (int j = 0; j < kRowsPerWarp; ++j)
#pragma unroll
                for (int h = 0; h < HG; ++h) {
                    const float s = warp_sum(dot[j][h]);
                    if (lane == 0) p_s[(j0 + j) * HG + h] = s * p.softmax_scale;
                }
        }
        __syncthreads();

        // Softmax: one thread per head.
        if (tid < HG) {
            const int h = tid;
            float mx = m_s[h];
            for (int j = 0; j < n; ++j) mx = fmaxf(mx, p_s[j * HG + h]);
            float sum = 0.0f;
            for (int j = 0; j < BLOCK_N; ++j) {
                const float e = j < n ? expf(p_s[j * HG + h] - mx) : 0.0f;
                p_s[j * HG + h] = e;
                sum += e;
            }
            const float alpha = m_s[h] == -INFINITY ? 0.0f : expf(m_s[h] - mx);
            alpha_s[h] = alpha;
            l_s[h] = l_s[h] * alpha + sum;
            m_s[h] = mx;
        }
        __syncthreads();

        // Values: O = alpha O + P C over this thread's columns of c_kv.
#pragma unroll
        for (int h = 0; h < HG; ++h) {
            const float alpha = alpha_s[h];
#pragma unroll
            for (int c = 0; c < COLS; ++c) acc[c][h] *= alpha;
        }
        for (int j = 0; j < n; ++j) {
            float v[COLS];
#pragma unroll
            for (int c = 0; c < COLS; ++c) {
                const int col = tid + c * kThreads;
                v[c] = col < r ? to_f32(rows[(k0 + j) * p.cache_row_stride + col]) : 0.0f;
            }
            const float4* pj = reinterpret_cast<const float4*>(p_s + j * HG);
#pragma unroll
            for (int h4 = 0; h4 < HG / 4; ++h4) {
                const float4 pr = pj[h4];
                const float pv[4] = {pr.x, pr.y, pr.z, pr.w};
#pragma unroll
                for (int i = 0; i < 4; ++i)
#pragma unroll
                    for (int c = 0; c < COLS; ++c) acc[c][h4 * 4 + i] += pv[i] * v[c];
            }
        }
        __syncthreads();  // p_s is rewritten by the next tile's scores
    }

    // Epilogue: normalise; one split writes the outputs, several a partial each.
#pragma unroll
    for (int h = 0; h < HG; ++h) {
        const int64_t head = h0 + h;
        if (head >= p.heads) break;
        const float l = l_s[h], inv = l > 0.0f ? 1.0f / l : 0.0f;
        const float lse = l > 0.0f ? m_s[h] + logf(l) : -INFINITY;
        if (a.o_part == nullptr) {
            T* out = static_cast<T*>(p.o) + b * p.o_batch_stride + head * p.o_head_stride;
#pragma unroll
            for (int c = 0; c < COLS; ++c) {
                const int col = tid + c * kThreads;
                if (col < r) out[col] = from_f32<T>(acc[c][h] * inv);
            }
            if (tid == 0) p.lse[b * p.heads + head] = lse;
        } else {
            const int64_t slot = (b * a.splits + split) * p.heads + head;
#pragma unroll
            for (int c = 0; c < COLS; ++c) {
                const int col = tid + c * kThreads;
                if (col < r) a.o_part[slot * r + col] = acc[c][h] * inv;
            }
            if (tid == 0) a.lse_part[slot] = lse;
        }
    }
}

// One CTA per (b, h): lse = log sum_s exp(lse_s), o = sum_s exp(lse_s - lse) o_s; all splits empty: o = 0, -inf.
template <typename T>
__global__ void __launch_bounds__(128) decode_combine(const SplitArgs a) {
    const DecodeParams& p = a.p;
    const int64_t b = blockIdx.x, h = blockIdx.y, r = p.kv_lora_rank;
    const float* lse_s = a.lse_part + b * a.splits * p.heads + h;  // stride H between splits
    float mx = -INFINITY;
    for (int64_t s = 0; s < a.splits; ++s) mx = fmaxf(mx, lse_s[s * p.heads]);
    float total = 0.0f;
    if (mx != -INFINITY)
        for (int64_t s = 0; s < a.splits; ++s) total += expf(lse_s[s * p.heads] - mx);
    T* out = static_cast<T*>(p.o) + b * p.o_batch_stride + h * p.o_head_stride;
    for (int64_t c = threadIdx.x; c < r; c += blockDim.x) {
        float acc = 0.0f;
        if (mx != -INFINITY)
            for (int64_t s = 0; s < a.splits; ++s) {
                const float w = expf(lse_s[s * p.heads] - mx);
                acc += w * a.o_part[((b * a.splits + s) * p.heads + h) * r + c];
            }
        out[c] = from_f32<T>(mx != -INFINITY ? acc / total : 0.0f);
    }
    if (threadIdx.x == 0) p.lse[b * p.heads + h] = mx != -INFINITY ? mx + logf(total) : -INFINITY;
}

int head_group(int64_t heads) {
    return heads <= 4 ? 4 : int(kDecodeCudaHeads);
}

template <typename T, int HG, int COLS>
void launch_split(const SplitArgs& a, cudaStream_t stream) {
    const int64_t dim = a.p.kv_lora_rank + a.p.rope_dim;
    const std::size_t smem = split_smem_bytes<HG>(dim);
    auto kernel = decode_split<T, HG, COLS>;
    if (smem > 48 * 1024)
        check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
                   "mla_decode: cudaFuncSetAttribute");
    const dim3 grid(unsigned(a.splits), unsigned(a.p.batch), unsigned((a.p.heads + HG - 1) / HG));
    kernel<<<grid, kThreads, smem, stream>>>(a);
    check_cuda(cudaGetLastError(), "mla_decode: decode_split launch");
}

template <typename T, int HG>
void launch_split_cols(const SplitArgs& a, cudaStream_t stream) {
    if (a.p.kv_lora_rank <= 2 * kThreads) return launch_split<T, HG, 2>(a, stream);
    launch_split<T, HG, 4>(a, stream);
}

}  // namespace

int64_t decode_splits_cuda(int64_t batch, int64_t heads, int64_t max_len, int device) {
    // About two waves of CTAs over the SMs, each split keeping at least 4 tiles of keys.
    int sms = 0;
    check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "mla_decode: SM count");
    const int64_t groups = (heads + head_group(heads) - 1) / head_group(heads);
    const int64_t ctas = std::max<int64_t>(1, batch * groups);
    const int64_t by_grid = (2 * sms + ctas - 1) / ctas;
    const int64_t by_len = (max_len + 4 * BLOCK_N - 1) / (4 * BLOCK_N);
    return std::max<int64_t>(1, std::min<int64_t>({by_grid, by_len, 64}));
}

void decode_cuda(const DecodeParams& p, int64_t splits, void* stream_ptr) {
    K2_NVTX_RANGE("k2::mla_decode");
    if (p.batch == 0) return;
    const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
    const WorkspacePlan plan = decode_workspace_cuda(p.batch, p.heads, p.kv_lora_rank, splits);
    if (p.workspace.bytes < plan.total)
        throw std::invalid_argument("k2.ops.mla_decode: argument 'workspace': expected at least " +
                                    std::to_string(plan.total) + " bytes, got " + std::to_string(p.workspace.bytes));
    SplitArgs a{p, std::max<int64_t>(1, splits), nullptr, nullptr};
    if (a.splits > 1) a.o_part = plan.at<float>(p.workspace.data, 0), a.lse_part = plan.at<float>(p.workspace.data, 1);
    cu::dispatch_float(p.dtype, "attention", [&](auto tag) {
        using T = decltype(tag);
        if constexpr (std::is_same_v<T, __half>) {
            throw std::invalid_argument("k2.ops.mla_decode: argument 'q': expected float32 or bfloat16, got float16");
        } else {
            if (head_group(p.heads) == 4)
                launch_split_cols<T, 4>(a, stream);
            else
                launch_split_cols<T, int(kDecodeCudaHeads)>(a, stream);
            if (a.splits > 1) {
                decode_combine<T><<<dim3(unsigned(p.batch), unsigned(p.heads)), 128, 0, stream>>>(a);
                check_cuda(cudaGetLastError(), "mla_decode: decode_combine launch");
            }
        }
    });
}

}  // namespace k2::attention
