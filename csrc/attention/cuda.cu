// CUDA kernels of the attention family: FlashAttention-2's tiled online softmax, forward and backward (Dao,
// "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning", 2023), over packed documents
// with MLA's unequal head dims (dqk = 192, dv = 128 in DeepSeek-V3 and Kimi K2, arXiv 2507.20534). See attention.h for
// the contract.
//
// Tiles. Every product is a warp-level GEMM whose operands sit in shared memory and whose fp32 accumulators are held
// in registers in the C-fragment layout of mma.sync.m16n8k16: each warp owns 16 rows, a thread holds rows g and g + 8
// (g = lane / 4) and columns 2t, 2t + 1 (t = lane % 4) of every 8-column tile. bf16 runs the tensor cores
// (mma.sync bf16 x bf16 -> fp32, sm_80+); fp32 runs the same tiles on CUDA cores with fp32 FMAs (no tf32 rounding,
// so it matches an fp32 reference to ~1e-6). Head dims are zero-padded to multiples of 16 in shared memory; the
// register accumulators are sized by a compile-time bucket of the padded dim (64, 128, 192, 256) and only the tiles
// of the actual padded dim are computed.
//
// Documents. Blocks of `tile` rows never straddle a document: document n owns the grid blocks
// [cu[n] / tile + n, cu[n+1] / tile + n + 1) (enough for its ceil(len / tile) row blocks, the last ones possibly
// idle), so block b belongs to the largest n with cu[n] / tile + n <= b, a binary search over cu_seqlens in every
// block. The grid is floor(T / tile) + N blocks by H heads and needs nothing read back from the device.
//
// Forward: one CTA per (query block of BLOCK_M rows, head), BLOCK_M / 16 warps. It walks the key blocks its queries can
// see (up to the diagonal when causal): S = Q K^T, scaled and masked; the running row max m and the per-thread partial
// row sum l are updated and the output accumulator rescaled by exp(m_old - m_new); P = exp(S - m) goes to shared memory
// (in the input dtype, as FlashAttention-2 feeds P to its second GEMM) and O += P V. Epilogue: O / l, lse = m + log l.
// max logits: m of a row after its last key block is the row's max logit, so each warp reduces its rows' m and does
// one float atomic max into max_logits[h] (initialised to -inf by a one-block kernel first); no second Q K^T.
//
// Backward: D = rowsum(dO * O) into an fp32 [H, T] workspace (one warp per row), dq's fp32 accumulator [H, T, dqk]
// zeroed; then one CTA per (key block of BLOCK_N rows, head), BLOCK_N / 16 warps, each owning 16 keys. For every query
// block that sees its keys it recomputes S^T = K Q^T and P^T = exp(scale S^T - lse), dP^T = V dO^T and
// dS^T = P^T * (dP^T - D); dV += P^T dO and dK += dS^T Q stay in registers, and dQ += dS K (dS read transposed from
// shared memory, split over the warps by 16-row, 32-column units) is added to the fp32 accumulator with atomicAdd.
// A last pass writes dq = scale * accumulator in the input dtype. dQ's fp32 sums are order-dependent (atomics); dK,
// dV and the forward are deterministic.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>

#include "attention/attention.h"
#include "common/check.h"
#include "common/cuda_elements.cuh"
#include "common/nvtx.h"

namespace k2::attention {

namespace {

using cu::from_f32;
using cu::to_f32;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

void check_cuda(cudaError_t err, const char* what) {
    cu::check(err, "attention", what);
}

// ---- Tile configuration ---------------------------------------------------------------------------------------

// BLOCK_M query rows x BLOCK_N key rows per step. The fp32 tiles are smaller so that the shared memory of the largest
// head dims (256, 256) stays within sm_80's 163 KB per block.
template <typename E>
struct ForwardTiles {
    static constexpr int BLOCK_M = 64;
    static constexpr int BLOCK_N = std::is_same_v<E, float> ? 32 : 64;
    static constexpr int kWarps = BLOCK_M / 16;  // a warp owns 16 query rows
    static constexpr int kThreads = kWarps * 32;
};

template <typename E>
struct BackwardTiles {
    static constexpr int BLOCK_M = 32;  // queries per step
    static constexpr int BLOCK_N = std::is_same_v<E, float> ? 32 : 64;
    static constexpr int kWarps = BLOCK_N / 16;  // a warp owns 16 key rows
    static constexpr int kThreads = kWarps * 32;
    static constexpr int kDqTiles = 4;  // dQ work unit: 16 query rows x 4 tiles of 8 columns
};

// Extra elements per shared-memory row (16 bytes): keeps rows 16-byte aligned and spreads a warp's fragment loads,
// whose rows are 4 words apart, over all 32 banks.
template <typename E>
constexpr int kRowPad = 16 / int(sizeof(E));

int pad16(int64_t d) {
    return int((d + 15) / 16 * 16);
}

// The compile-time bucket whose register accumulators hold a padded head dim.
int bucket(int d_pad) {
    return d_pad <= 64 ? 64 : d_pad <= 128 ? 128 : d_pad <= 192 ? 192 : 256;
}

// ---- Warp GEMM --------------------------------------------------------------------------------------------------

// Whether this compilation pass has mma.sync with bf16 operands (sm_80+; false in the host pass).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
constexpr bool kTensorCores = true;
#else
constexpr bool kTensorCores = false;
#endif

// Element (outer, k) of a shared-memory operand: outer is the row m of A or the column n of B, k the reduction index.
// K_MAJOR: stored [outer][k] (k contiguous); otherwise [k][outer].
template <bool K_MAJOR, typename E>
__device__ __forceinline__ E operand(const E* p, int ld, int outer, int k) {
    return K_MAJOR ? p[outer * ld + k] : p[k * ld + outer];
}

// Elements (outer, k) and (outer, k + 1) packed as mma.sync wants them: the lower k in the low half. k is even.
template <bool K_MAJOR>
__device__ __forceinline__ uint32_t operand_pair(const __nv_bfloat16* p, int ld, int outer, int k) {
    if constexpr (K_MAJOR) {
        return *reinterpret_cast<const uint32_t*>(p + outer * ld + k);
    } else {
        const uint32_t lo = __bfloat16_as_ushort(p[k * ld + outer]);
        const uint32_t hi = __bfloat16_as_ushort(p[(k + 1) * ld + outer]);
        return lo | (hi << 16);
    }
}

// acc[nt] += A[0:16, 0:k_size] B[0:k_size, 8 nt : 8 nt + 8] for the tiles nt < nt_active, with
// A(m, k) = operand<A_K_MAJOR>(a, lda, m, k) and B(k, n) = operand<B_K_MAJOR>(b, ldb, n, k); k_size is a multiple of
// 16. acc is in mma.m16n8k16's C layout: acc[nt][j] is row g + 8 (j / 2), column 8 nt + 2 t + j % 2. Every lane of the
// warp must call it with the same arguments (mma.sync is warp-collective).
template <bool A_K_MAJOR, bool B_K_MAJOR, int NT, typename E>
__device__ __forceinline__ void warp_gemm(float (&acc)[NT][4], const E* a, int lda, const E* b, int ldb, int k_size,
                                          int nt_active) {
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    if constexpr (std::is_same_v<E, __nv_bfloat16> && kTensorCores) {
        for (int k0 = 0; k0 < k_size; k0 += 16) {
            // A fragment: rows g, g + 8 x columns k0 + 2t (+1), k0 + 2t + 8 (+1).
            const uint32_t a0 = operand_pair<A_K_MAJOR>(a, lda, g, k0 + 2 * t);
            const uint32_t a1 = operand_pair<A_K_MAJOR>(a, lda, g + 8, k0 + 2 * t);
            const uint32_t a2 = operand_pair<A_K_MAJOR>(a, lda, g, k0 + 2 * t + 8);
            const uint32_t a3 = operand_pair<A_K_MAJOR>(a, lda, g + 8, k0 + 2 * t + 8);
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                if (nt >= nt_active) break;
                // B fragment: rows k0 + 2t (+1), k0 + 2t + 8 (+1) x column 8 nt + g.
                const uint32_t b0 = operand_pair<B_K_MAJOR>(b, ldb, nt * 8 + g, k0 + 2 * t);
                const uint32_t b1 = operand_pair<B_K_MAJOR>(b, ldb, nt * 8 + g, k0 + 2 * t + 8);
                asm volatile(
                    "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                    "{%8, %9}, {%0, %1, %2, %3};\n"
                    : "+f"(acc[nt][0]), "+f"(acc[nt][1]), "+f"(acc[nt][2]), "+f"(acc[nt][3])
                    : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
            }
        }
    } else {
        // CUDA cores (fp32, or bf16 below sm_80): the same tiles, one fp32 FMA per product.
        for (int k = 0; k < k_size; ++k) {
            const float a0 = to_f32(operand<A_K_MAJOR>(a, lda, g, k));
            const float a1 = to_f32(operand<A_K_MAJOR>(a, lda, g + 8, k));
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                if (nt >= nt_active) break;
                const float b0 = to_f32(operand<B_K_MAJOR>(b, ldb, nt * 8 + 2 * t, k));
                const float b1 = to_f32(operand<B_K_MAJOR>(b, ldb, nt * 8 + 2 * t + 1, k));
                acc[nt][0] = fmaf(a0, b0, acc[nt][0]);
                acc[nt][1] = fmaf(a0, b1, acc[nt][1]);
                acc[nt][2] = fmaf(a1, b0, acc[nt][2]);
                acc[nt][3] = fmaf(a1, b1, acc[nt][3]);
            }
        }
    }
}

// Row (within the warp's 16) and column (within the 8 nt-th columns) of accumulator element acc[nt][j].
__device__ __forceinline__ int frag_row(int j) {
    return (threadIdx.x % 32) / 4 + 8 * (j / 2);
}
__device__ __forceinline__ int frag_col(int nt, int j) {
    return nt * 8 + 2 * (threadIdx.x % 4) + j % 2;
}

// Reductions over the 4 threads (a quad) that hold one accumulator row.
__device__ __forceinline__ float quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// Float max through integer atomics: non-negative floats order like their int bits, negative ones inversely to their
// unsigned bits. Correct for any non-NaN stored value, -inf included.
__device__ __forceinline__ void atomic_max_float(float* address, float v) {
    if (v >= 0.0f)
        atomicMax(reinterpret_cast<int*>(address), __float_as_int(v));
    else
        atomicMin(reinterpret_cast<unsigned*>(address), __float_as_uint(v));
}

// ---- Documents and tiles ----------------------------------------------------------------------------------------

// The rows [begin, end) of grid block `block` (blocks of `tile` rows, see the header comment) and their document
// [doc_begin, doc_end). False for an idle block (past its document's last row).
struct Rows {
    int begin, end, doc_begin, doc_end;
};

__device__ bool block_rows(const int32_t* cu, int num_docs, int tokens, int block, int tile, Rows& rows) {
    int doc_begin = 0, doc_end = tokens, first_block = 0;
    if (cu != nullptr) {
        int lo = 0, hi = num_docs - 1;  // the largest n with cu[n] / tile + n <= block (n = 0 always qualifies)
        while (lo < hi) {
            const int mid = (lo + hi + 1) / 2;
            if (cu[mid] / tile + mid <= block)
                lo = mid;
            else
                hi = mid - 1;
        }
        doc_begin = cu[lo];
        doc_end = cu[lo + 1];
        first_block = doc_begin / tile + lo;
    }
    rows.doc_begin = doc_begin;
    rows.doc_end = doc_end;
    rows.begin = doc_begin + (block - first_block) * tile;
    rows.end = min(rows.begin + tile, doc_end);
    return rows.begin < doc_end;
}

// Grid blocks of `tile` rows for T tokens in N documents (cu_seqlens null: one document).
int64_t grid_blocks(int64_t tokens, int64_t num_docs, bool has_cu, int tile) {
    return has_cu ? tokens / tile + num_docs : (tokens + tile - 1) / tile;
}

// Copies rows [0, rows_valid) x columns [0, d) of head h's rows starting at `src` (a [T, H, d] tensor, pre-offset to
// the first row and the head) into the shared tile dst[rows][ld], zero-filling rows up to `rows` and columns up to
// d_pad (zeros keep the padded products finite and zero).
template <typename E>
__device__ void load_tile(E* dst, int ld, int rows, int d_pad, const E* src, int64_t row_stride, int rows_valid,
                          int d) {
    for (int idx = threadIdx.x; idx < rows * d_pad; idx += blockDim.x) {
        const int r = idx / d_pad, c = idx % d_pad;
        dst[r * ld + c] = (r < rows_valid && c < d) ? src[r * row_stride + c] : from_f32<E>(0.0f);
    }
}

// ---- Forward ----------------------------------------------------------------------------------------------------

struct ForwardSmem {
    int ldq, ldv, ldp;  // row strides (elements) of the Q and K tiles, the V tile, the P tile
    int q, k, v, p;     // element offsets
    int elements;

    template <typename E>
    __host__ __device__ static ForwardSmem make(int dqk_pad, int dv_pad) {
        using Tiles = ForwardTiles<E>;
        ForwardSmem s{};
        s.ldq = dqk_pad + kRowPad<E>;
        s.ldv = dv_pad + kRowPad<E>;
        s.ldp = Tiles::BLOCK_N + kRowPad<E>;
        s.q = 0;
        s.k = s.q + Tiles::BLOCK_M * s.ldq;
        s.v = s.k + Tiles::BLOCK_N * s.ldq;
        s.p = s.v + Tiles::BLOCK_N * s.ldv;
        s.elements = s.p + Tiles::BLOCK_M * s.ldp;
        return s;
    }
};

__global__ void fill_neg_inf(float* x, int n) {
    for (int i = threadIdx.x; i < n; i += blockDim.x) x[i] = kNegInf;
}

// Grid (query blocks, H); see the header comment. DV: bucket of the padded value dim (register accumulator width).
template <typename E, int DV>
__global__ void __launch_bounds__(ForwardTiles<E>::kThreads)
    forward_kernel(const ForwardParams p, int dqk_pad, int dv_pad) {
    using Tiles = ForwardTiles<E>;
    constexpr int BLOCK_M = Tiles::BLOCK_M, BLOCK_N = Tiles::BLOCK_N, NT_S = BLOCK_N / 8, NT_O = DV / 8;
    const int tokens = int(p.tokens), h = blockIdx.y;
    Rows rows;
    if (!block_rows(p.cu_seqlens, int(p.num_docs), tokens, blockIdx.x, BLOCK_M, rows)) return;

    extern __shared__ __align__(16) unsigned char smem_bytes[];
    E* smem = reinterpret_cast<E*>(smem_bytes);
    const ForwardSmem s = ForwardSmem::make<E>(dqk_pad, dv_pad);
    E *q_s = smem + s.q, *k_s = smem + s.k, *v_s = smem + s.v, *p_s = smem + s.p;
    const E* q = static_cast<const E*>(p.q.data) + h * p.q.head_stride;
    const E* k = static_cast<const E*>(p.k.data) + h * p.k.head_stride;
    const E* v = static_cast<const E*>(p.v.data) + h * p.v.head_stride;
    const int dqk = int(p.head_dim_qk), dv = int(p.head_dim_v);
    const int warp = threadIdx.x / 32, m0 = warp * 16;

    // Load: this block's queries.
    load_tile(q_s, s.ldq, BLOCK_M, dqk_pad, q + int64_t(rows.begin) * p.q.row_stride, p.q.row_stride,
              rows.end - rows.begin, dqk);

    float o_acc[NT_O][4] = {};
    float row_max[2] = {kNegInf, kNegInf};  // rows g, g + 8 of the warp: max logit so far
    float row_sum[2] = {0.0f, 0.0f};        // this thread's columns' share of sum exp(logit - row_max)
    const int key_end = p.causal ? rows.end : rows.doc_end;
    for (int k0 = rows.doc_begin; k0 < key_end; k0 += BLOCK_N) {
        const int keys = min(BLOCK_N, key_end - k0);
        __syncthreads();  // every warp is done with the previous K and V tiles
        load_tile(k_s, s.ldq, BLOCK_N, dqk_pad, k + int64_t(k0) * p.k.row_stride, p.k.row_stride, keys, dqk);
        load_tile(v_s, s.ldv, BLOCK_N, dv_pad, v + int64_t(k0) * p.v.row_stride, p.v.row_stride, keys, dv);
        __syncthreads();

        // S = Q K^T for the warp's 16 queries, scaled and masked (invisible: -inf).
        float s_acc[NT_S][4] = {};
        warp_gemm<true, true>(s_acc, q_s + m0 * s.ldq, s.ldq, k_s, s.ldq, dqk_pad, NT_S);
        float block_max[2] = {kNegInf, kNegInf};
#pragma unroll
        for (int nt = 0; nt < NT_S; ++nt) {
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int query = rows.begin + m0 + frag_row(j), key = k0 + frag_col(nt, j);
                const bool visible = query < rows.end && key < key_end && (!p.causal || key <= query);
                s_acc[nt][j] = visible ? s_acc[nt][j] * p.softmax_scale : kNegInf;
                block_max[j / 2] = fmaxf(block_max[j / 2], s_acc[nt][j]);
            }
        }

        // Online softmax: new row max, rescale of the running sum and output, P = exp(S - m).
        float base[2];
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const float m_new = fmaxf(row_max[half], quad_max(block_max[half]));
            const float alpha = m_new == kNegInf ? 1.0f : expf(row_max[half] - m_new);
            base[half] = m_new == kNegInf ? 0.0f : m_new;  // a row with nothing visible yet keeps P = 0
            row_max[half] = m_new;
            row_sum[half] *= alpha;
#pragma unroll
            for (int nt = 0; nt < NT_O; ++nt) {
                o_acc[nt][2 * half] *= alpha;
                o_acc[nt][2 * half + 1] *= alpha;
            }
        }
#pragma unroll
        for (int nt = 0; nt < NT_S; ++nt) {
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const float prob = expf(s_acc[nt][j] - base[j / 2]);
                row_sum[j / 2] += prob;
                p_s[(m0 + frag_row(j)) * s.ldp + frag_col(nt, j)] = from_f32<E>(prob);
            }
        }
        __syncwarp();  // the warp's P rows are in shared memory

        // O += P V (V stored [key][dv]: B is not k-major).
        warp_gemm<true, false>(o_acc, p_s + m0 * s.ldp, s.ldp, v_s, s.ldv, BLOCK_N, dv_pad / 8);
    }

    // Epilogue: O / l, lse = m + log l, this warp's share of max logits.
    E* o = static_cast<E*>(p.o.data) + h * p.o.head_stride;
    float warp_max = kNegInf;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const float sum = quad_sum(row_sum[half]);
        const int query = rows.begin + m0 + frag_row(2 * half);
        if (query >= rows.end) continue;  // every valid query sees itself, so sum > 0
        const float inv = 1.0f / sum;
#pragma unroll
        for (int nt = 0; nt < NT_O; ++nt) {
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                const int c = frag_col(nt, j);
                if (c < dv) o[int64_t(query) * p.o.row_stride + c] = from_f32<E>(o_acc[nt][2 * half + j] * inv);
            }
        }
        if (threadIdx.x % 4 == 0) p.lse[int64_t(h) * tokens + query] = row_max[half] + logf(sum);
        warp_max = fmaxf(warp_max, row_max[half]);
    }
    if (p.max_logits != nullptr) {
#pragma unroll
        for (int offset = 16; offset > 0; offset /= 2)
            warp_max = fmaxf(warp_max, __shfl_xor_sync(0xffffffffu, warp_max, offset));
        if (threadIdx.x % 32 == 0 && warp_max != kNegInf) atomic_max_float(p.max_logits + h, warp_max);
    }
}

// ---- Backward ---------------------------------------------------------------------------------------------------

struct BackwardSmem {
    int ldq, ldv, ldp;                  // row strides of the Q/K tiles, the V/dO tiles, the P^T/dS^T tiles
    int k, v, q, d_o, p, ds, lse, dlt;  // element offsets; lse and D (dlt) are fp32 [BLOCK_M]
    int bytes;

    template <typename E>
    __host__ __device__ static BackwardSmem make(int dqk_pad, int dv_pad) {
        using Tiles = BackwardTiles<E>;
        BackwardSmem s{};
        s.ldq = dqk_pad + kRowPad<E>;
        s.ldv = dv_pad + kRowPad<E>;
        s.ldp = Tiles::BLOCK_M + kRowPad<E>;
        s.k = 0;
        s.v = s.k + Tiles::BLOCK_N * s.ldq;
        s.q = s.v + Tiles::BLOCK_N * s.ldv;
        s.d_o = s.q + Tiles::BLOCK_M * s.ldq;
        s.p = s.d_o + Tiles::BLOCK_M * s.ldv;
        s.ds = s.p + Tiles::BLOCK_N * s.ldp;
        const int elements = s.ds + Tiles::BLOCK_N * s.ldp;  // a multiple of 16 bytes
        s.lse = elements * int(sizeof(E)) / 4;               // in floats from the base
        s.dlt = s.lse + Tiles::BLOCK_M;
        s.bytes = (s.dlt + Tiles::BLOCK_M) * 4;
        return s;
    }
};

// delta[h, t] = sum_c do[t, h, c] o[t, h, c] in fp32: one warp per (t, h).
template <typename E>
__global__ void backward_delta(const BackwardParams p, float* delta) {
    const int64_t rows = p.tokens * p.heads, warps = int64_t(gridDim.x) * (blockDim.x / 32);
    const int lane = threadIdx.x % 32;
    for (int64_t row = blockIdx.x * int64_t(blockDim.x / 32) + threadIdx.x / 32; row < rows; row += warps) {
        const int64_t t = row / p.heads, h = row % p.heads;
        const E* d_o = static_cast<const E*>(p.d_o.data) + t * p.d_o.row_stride + h * p.d_o.head_stride;
        const E* o = static_cast<const E*>(p.o.data) + t * p.o.row_stride + h * p.o.head_stride;
        float sum = 0.0f;
        for (int64_t c = lane; c < p.head_dim_v; c += 32) sum = fmaf(to_f32(d_o[c]), to_f32(o[c]), sum);
#pragma unroll
        for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
        if (lane == 0) delta[h * p.tokens + t] = sum;
    }
}

// Grid (key blocks, H); see the header comment. DQK, DV: buckets of the padded head dims (register accumulators).
template <typename E, int DQK, int DV>
__global__ void __launch_bounds__(BackwardTiles<E>::kThreads)
    backward_kernel(const BackwardParams p, int dqk_pad, int dv_pad, const float* delta, float* dq_acc) {
    using Tiles = BackwardTiles<E>;
    constexpr int BLOCK_M = Tiles::BLOCK_M, BLOCK_N = Tiles::BLOCK_N, NT_S = BLOCK_M / 8;
    constexpr int NT_DK = DQK / 8, NT_DV = DV / 8, DQ_TILES = Tiles::kDqTiles;
    const int tokens = int(p.tokens), h = blockIdx.y;
    Rows keys;
    if (!block_rows(p.cu_seqlens, int(p.num_docs), tokens, blockIdx.x, BLOCK_N, keys)) return;

    extern __shared__ __align__(16) unsigned char smem_bytes[];
    E* smem = reinterpret_cast<E*>(smem_bytes);
    const BackwardSmem s = BackwardSmem::make<E>(dqk_pad, dv_pad);
    E *k_s = smem + s.k, *v_s = smem + s.v, *q_s = smem + s.q, *do_s = smem + s.d_o, *p_s = smem + s.p,
      *ds_s = smem + s.ds;
    float* lse_s = reinterpret_cast<float*>(smem_bytes) + s.lse;
    float* delta_s = reinterpret_cast<float*>(smem_bytes) + s.dlt;
    const E* q = static_cast<const E*>(p.q.data) + h * p.q.head_stride;
    const E* k = static_cast<const E*>(p.k.data) + h * p.k.head_stride;
    const E* v = static_cast<const E*>(p.v.data) + h * p.v.head_stride;
    const E* d_o = static_cast<const E*>(p.d_o.data) + h * p.d_o.head_stride;
    const float* lse = p.lse + int64_t(h) * tokens;
    const float* delta_h = delta + int64_t(h) * tokens;
    const int dqk = int(p.head_dim_qk), dv = int(p.head_dim_v), num_keys = keys.end - keys.begin;
    const int warp = threadIdx.x / 32, m0 = warp * 16;

    // Load: this block's keys and values, once.
    load_tile(k_s, s.ldq, BLOCK_N, dqk_pad, k + int64_t(keys.begin) * p.k.row_stride, p.k.row_stride, num_keys, dqk);
    load_tile(v_s, s.ldv, BLOCK_N, dv_pad, v + int64_t(keys.begin) * p.v.row_stride, p.v.row_stride, num_keys, dv);

    float dk_acc[NT_DK][4] = {}, dv_acc[NT_DV][4] = {};
    const int dq_row_groups = BLOCK_M / 16, dq_chunks = (dqk_pad / 8 + DQ_TILES - 1) / DQ_TILES;
    // Causal: queries before the first key see none of this block's keys.
    for (int q0 = p.causal ? keys.begin : keys.doc_begin; q0 < keys.doc_end; q0 += BLOCK_M) {
        const int queries = min(BLOCK_M, keys.doc_end - q0);
        __syncthreads();  // every warp is done with the previous query block's tiles
        load_tile(q_s, s.ldq, BLOCK_M, dqk_pad, q + int64_t(q0) * p.q.row_stride, p.q.row_stride, queries, dqk);
        load_tile(do_s, s.ldv, BLOCK_M, dv_pad, d_o + int64_t(q0) * p.d_o.row_stride, p.d_o.row_stride, queries, dv);
        for (int r = threadIdx.x; r < BLOCK_M; r += blockDim.x) {
            lse_s[r] = r < queries ? lse[q0 + r] : 0.0f;
            delta_s[r] = r < queries ? delta_h[q0 + r] : 0.0f;
        }
        __syncthreads();

        // S^T = K Q^T and dP^T = V dO^T for the warp's 16 keys x BLOCK_M queries.
        float s_acc[NT_S][4] = {}, dp_acc[NT_S][4] = {};
        warp_gemm<true, true>(s_acc, k_s + m0 * s.ldq, s.ldq, q_s, s.ldq, dqk_pad, NT_S);
        warp_gemm<true, true>(dp_acc, v_s + m0 * s.ldv, s.ldv, do_s, s.ldv, dv_pad, NT_S);

        // P^T = exp(scale S^T - lse) (0 where invisible), dS^T = P^T (dP^T - D), both to shared memory.
#pragma unroll
        for (int nt = 0; nt < NT_S; ++nt) {
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int r = m0 + frag_row(j), c = frag_col(nt, j), key = keys.begin + r, query = q0 + c;
                const bool visible = r < num_keys && c < queries && (!p.causal || key <= query);
                const float prob = visible ? expf(s_acc[nt][j] * p.softmax_scale - lse_s[c]) : 0.0f;
                p_s[r * s.ldp + c] = from_f32<E>(prob);
                ds_s[r * s.ldp + c] = from_f32<E>(prob * (dp_acc[nt][j] - delta_s[c]));
            }
        }
        __syncwarp();  // the warp's P^T and dS^T rows are in shared memory

        // dV += P^T dO, dK += dS^T Q (dO and Q stored [query][d]: B is not k-major).
        warp_gemm<true, false>(dv_acc, p_s + m0 * s.ldp, s.ldp, do_s, s.ldv, BLOCK_M, dv_pad / 8);
        warp_gemm<true, false>(dk_acc, ds_s + m0 * s.ldp, s.ldp, q_s, s.ldq, BLOCK_M, dqk_pad / 8);
        __syncthreads();  // every warp's dS^T rows are in shared memory

        // dQ += dS K over this block's keys: units of 16 queries x 32 columns dealt to the warps; A = dS (dS^T read
        // transposed), B = K stored [key][dqk]; fp32 atomics into the accumulator.
        for (int unit = warp; unit < dq_row_groups * dq_chunks; unit += Tiles::kWarps) {
            const int rg = unit % dq_row_groups, chunk = unit / dq_row_groups;
            const int nt_active = min(DQ_TILES, dqk_pad / 8 - chunk * DQ_TILES);
            float dq_part[DQ_TILES][4] = {};
            warp_gemm<false, false>(dq_part, ds_s + rg * 16, s.ldp, k_s + chunk * DQ_TILES * 8, s.ldq, BLOCK_N,
                                    nt_active);
#pragma unroll
            for (int nt = 0; nt < DQ_TILES; ++nt) {
                if (nt >= nt_active) break;
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const int r = rg * 16 + frag_row(j), c = chunk * DQ_TILES * 8 + frag_col(nt, j);
                    if (r < queries && c < dqk)
                        atomicAdd(dq_acc + (int64_t(h) * tokens + q0 + r) * dqk + c, dq_part[nt][j]);
                }
            }
        }
    }

    // Epilogue: dV and scale * dK of the warp's keys.
    E* dv_out = static_cast<E*>(p.dv.data) + h * p.dv.head_stride;
    E* dk_out = static_cast<E*>(p.dk.data) + h * p.dk.head_stride;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int r = m0 + frag_row(2 * half);
        if (r >= num_keys) continue;
        const int64_t key = keys.begin + r;
#pragma unroll
        for (int j = 0; j < 2; ++j) {
#pragma unroll
            for (int nt = 0; nt < NT_DV; ++nt) {
                const int c = frag_col(nt, j);
                if (c < dv) dv_out[key * p.dv.row_stride + c] = from_f32<E>(dv_acc[nt][2 * half + j]);
            }
#pragma unroll
            for (int nt = 0; nt < NT_DK; ++nt) {
                const int c = frag_col(nt, j);
                if (c < dqk)
                    dk_out[key * p.dk.row_stride + c] = from_f32<E>(dk_acc[nt][2 * half + j] * p.softmax_scale);
            }
        }
    }
}

// dq[t, h, c] = scale * dq_acc[h, t, c] in the input dtype.
template <typename E>
__global__ void backward_dq(const BackwardParams p, const float* dq_acc) {
    const int64_t n = p.heads * p.tokens * p.head_dim_qk;
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
        const int64_t c = i % p.head_dim_qk, row = i / p.head_dim_qk, t = row % p.tokens, h = row / p.tokens;
        static_cast<E*>(p.dq.data)[t * p.dq.row_stride + h * p.dq.head_stride + c] =
            from_f32<E>(dq_acc[i] * p.softmax_scale);
    }
}

// ---- Host side --------------------------------------------------------------------------------------------------

// Refuses what the kernels cannot run, naming the dims: head dims that are not multiples of 8 up to 256, more heads
// than a grid's y dimension, a grid past 2^31 blocks.
void expect_supported(const char* op, int64_t tokens, int64_t heads, int64_t dqk, int64_t dv, int64_t num_docs) {
    if (dqk % 8 != 0 || dv % 8 != 0 || dqk > 256 || dv > 256 || dqk < 1 || dv < 1)
        throw UnsupportedError(detail::concat("k2.ops.", op,
                                              ": the CUDA kernel takes head dims that are multiples of 8 ",
                                              "up to 256, got dqk=", dqk, ", dv=", dv));
    if (heads > 65535)
        throw UnsupportedError(
            detail::concat("k2.ops.", op, ": the CUDA kernel takes at most 65535 heads, got ", heads));
    if (tokens / 32 + num_docs >= (int64_t(1) << 31))
        throw UnsupportedError(detail::concat("k2.ops.", op, ": too many documents for the CUDA grid: ", num_docs));
}

// Sets the kernel's dynamic shared memory limit to `bytes` after checking the device has that much per block.
template <typename Kernel>
void set_smem(Kernel kernel, int bytes, const char* op, int64_t dqk, int64_t dv) {
    int device = 0, optin = 0;
    check_cuda(cudaGetDevice(&device), "cudaGetDevice");
    check_cuda(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), "device attribute");
    if (bytes > optin)
        throw UnsupportedError(detail::concat("k2.ops.", op, ": head dims dqk=", dqk, ", dv=", dv, " need ", bytes,
                                              " bytes of shared memory per block, this GPU has ", optin));
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes), "smem attribute");
}

// Calls fn(std::integral_constant<int, B>{}) for the bucket B of a padded head dim.
template <typename Fn>
void dispatch_bucket(int d_pad, Fn&& fn) {
    switch (bucket(d_pad)) {
        case 64:
            return fn(std::integral_constant<int, 64>{});
        case 128:
            return fn(std::integral_constant<int, 128>{});
        case 192:
            return fn(std::integral_constant<int, 192>{});
        default:
            return fn(std::integral_constant<int, 256>{});
    }
}

template <typename E>
void launch_forward(const ForwardParams& p, cudaStream_t stream) {
    using Tiles = ForwardTiles<E>;
    const int dqk_pad = pad16(p.head_dim_qk), dv_pad = pad16(p.head_dim_v);
    const int bytes = ForwardSmem::make<E>(dqk_pad, dv_pad).elements * int(sizeof(E));
    const dim3 grid(unsigned(grid_blocks(p.tokens, p.num_docs, p.cu_seqlens != nullptr, Tiles::BLOCK_M)),
                    unsigned(p.heads));
    dispatch_bucket(dv_pad, [&](auto dv_bucket) {
        auto kernel = forward_kernel<E, decltype(dv_bucket)::value>;
        set_smem(kernel, bytes, "mla_attention", p.head_dim_qk, p.head_dim_v);
        kernel<<<grid, Tiles::kThreads, bytes, stream>>>(p, dqk_pad, dv_pad);
    });
}

template <typename E>
void launch_backward(const BackwardParams& p, const float* delta, float* dq_acc, cudaStream_t stream) {
    using Tiles = BackwardTiles<E>;
    const int dqk_pad = pad16(p.head_dim_qk), dv_pad = pad16(p.head_dim_v);
    const int bytes = BackwardSmem::make<E>(dqk_pad, dv_pad).bytes;
    const dim3 grid(unsigned(grid_blocks(p.tokens, p.num_docs, p.cu_seqlens != nullptr, Tiles::BLOCK_N)),
                    unsigned(p.heads));
    // K2's (192, 128) has its own instantiation; other pairs share the bucket of the larger dim.
    auto launch = [&](auto dqk_bucket, auto dv_bucket) {
        auto kernel = backward_kernel<E, decltype(dqk_bucket)::value, decltype(dv_bucket)::value>;
        set_smem(kernel, bytes, "mla_attention_backward", p.head_dim_qk, p.head_dim_v);
        kernel<<<grid, Tiles::kThreads, bytes, stream>>>(p, dqk_pad, dv_pad, delta, dq_acc);
    };
    if (bucket(dqk_pad) == 192 && bucket(dv_pad) == 128)
        return launch(std::integral_constant<int, 192>{}, std::integral_constant<int, 128>{});
    dispatch_bucket(std::max(dqk_pad, dv_pad), [&](auto b) { launch(b, b); });
}

unsigned blocks_for(int64_t items, int per_block) {
    return unsigned(std::max<int64_t>(1, std::min<int64_t>((items + per_block - 1) / per_block, 65535LL * 32)));
}

}  // namespace

void forward_cuda(const ForwardParams& p, void* stream_handle) {
    K2_NVTX_RANGE("k2::mla_attention");
    auto stream = static_cast<cudaStream_t>(stream_handle);
    expect_supported("mla_attention", p.tokens, p.heads, p.head_dim_qk, p.head_dim_v, p.num_docs);
    if (p.max_logits != nullptr) {
        fill_neg_inf<<<1, 256, 0, stream>>>(p.max_logits, int(p.heads));
        check_cuda(cudaGetLastError(), "mla_attention max_logits init launch");
    }
    if (p.tokens == 0) return;
    K2_CHECK_ARG(p.num_docs >= 1, "mla_attention", "cu_seqlens", "expected at least one document for T = ", p.tokens,
                 " tokens");
    cu::dispatch_float(p.dtype, "attention", [&](auto tag) {
        using E = decltype(tag);
        if constexpr (std::is_same_v<E, __half>)
            throw UnsupportedError("k2.ops.mla_attention: the CUDA kernel takes fp32 and bf16, got float16");
        else
            launch_forward<E>(p, stream);
    });
    check_cuda(cudaGetLastError(), "mla_attention launch");
}

void backward_cuda(const BackwardParams& p, void* stream_handle) {
    K2_NVTX_RANGE("k2::mla_attention_backward");
    auto stream = static_cast<cudaStream_t>(stream_handle);
    expect_supported("mla_attention_backward", p.tokens, p.heads, p.head_dim_qk, p.head_dim_v, p.num_docs);
    if (p.tokens == 0) return;
    K2_CHECK_ARG(p.num_docs >= 1, "mla_attention_backward", "cu_seqlens",
                 "expected at least one document for T = ", p.tokens, " tokens");
    const BackwardWorkspaceCuda w = backward_workspace_cuda(p.tokens, p.heads, p.head_dim_qk);
    expect_workspace(p.workspace, w.plan.total, "mla_attention_backward");
    auto* delta = w.plan.at<float>(p.workspace.data, w.delta);
    auto* dq_acc = w.plan.at<float>(p.workspace.data, w.dq);
    check_cuda(cudaMemsetAsync(dq_acc, 0, sizeof(float) * p.heads * p.tokens * p.head_dim_qk, stream), "memset dq");
    cu::dispatch_float(p.dtype, "attention", [&](auto tag) {
        using E = decltype(tag);
        if constexpr (std::is_same_v<E, __half>) {
            throw UnsupportedError("k2.ops.mla_attention_backward: the CUDA kernel takes fp32 and bf16, got float16");
        } else {
            backward_delta<E><<<blocks_for(p.tokens * p.heads, 8), 256, 0, stream>>>(p, delta);
            launch_backward<E>(p, delta, dq_acc, stream);
            backward_dq<E><<<blocks_for(p.heads * p.tokens * p.head_dim_qk, 256), 256, 0, stream>>>(p, dq_acc);
        }
    });
    check_cuda(cudaGetLastError(), "mla_attention_backward launch");
}

}  // namespace k2::attention
