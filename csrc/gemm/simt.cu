// k2's CUDA-core grouped GEMM: the back end for fp32 and fp16 (full fp32 products, the precision torch gives
// with TF32 off) and for bf16 operands the tensor-core paths cannot take (leading dimensions not a multiple of
// 8, unaligned pointers, GPUs older than sm_80). Any of the three layouts, any size.
//
// Tiling: a 64x64 output tile per block of 256 threads, 4x4 outputs per thread, K in steps of 16 through shared
// memory, fp32 accumulation. grid.z walks the groups, grid.y the M tiles and grid.x the N tiles, each with a
// grid-stride loop, so group sizes read on the device need no host sync.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/cuda_elements.cuh"
#include "common/nvtx.h"
#include "gemm/kernels.h"

namespace k2::gemm {

namespace {

constexpr int BLOCK_M = 64, BLOCK_N = 64, BLOCK_K = 16, kThreads = 256, kMicro = 4;

using cu::from_f32;
using cu::to_f32;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    grouped_gemm_simt(GroupedDesc desc, const T* __restrict__ a, const T* __restrict__ b, const T* c, T* d, float alpha,
                      float beta) {
    __shared__ float tile_a[BLOCK_K][BLOCK_M];  // A tile transposed: k-major for broadcast reads
    __shared__ float tile_b[BLOCK_K][BLOCK_N];
    const GemmLayout layout = layout_of(desc);
    const bool a_row = layout != GemmLayout::kColRow, b_row = layout != GemmLayout::kRowCol;
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;

    for (int e = blockIdx.z; e < desc.num_groups; e += gridDim.z) {
        int64_t begin = 0, end = 0;
        if (desc.mode != GroupedMode::kBatch) begin = e > 0 ? desc.offsets[e - 1] : 0, end = desc.offsets[e];
        const GroupProblem g = group_problem(desc, e, begin, end);
        const T* ga = a + g.a_offset;
        const T* gb = b + g.b_offset;
        for (int m0 = blockIdx.y * BLOCK_M; m0 < g.m; m0 += gridDim.y * BLOCK_M) {
            for (int n0 = blockIdx.x * BLOCK_N; n0 < g.n; n0 += gridDim.x * BLOCK_N) {
                float acc[kMicro][kMicro] = {};
                for (int k0 = 0; k0 < g.k; k0 += BLOCK_K) {
                    // Load: each thread stages 4 elements of A and 4 of B (zero outside the problem).
                    for (int idx = threadIdx.x; idx < BLOCK_K * BLOCK_M; idx += kThreads) {
                        // Walk the contiguous dimension of each operand fastest, for coalesced reads.
                        const int i = a_row ? idx / BLOCK_K : idx % BLOCK_M, kk = a_row ? idx % BLOCK_K : idx / BLOCK_M;
                        const int gi = m0 + i, gk = k0 + kk;
                        float v = 0.0f;
                        if (gi < g.m && gk < g.k) v = to_f32(a_row ? ga[gi * g.lda + gk] : ga[gk * g.lda + gi]);
                        tile_a[kk][i] = v;
                    }
                    for (int idx = threadIdx.x; idx < BLOCK_K * BLOCK_N; idx += kThreads) {
                        const int j = b_row ? idx % BLOCK_N : idx / BLOCK_K, kk = b_row ? idx / BLOCK_N : idx % BLOCK_K;
                        const int gj = n0 + j, gk = k0 + kk;
                        float v = 0.0f;
                        if (gj < g.n && gk < g.k) v = to_f32(b_row ? gb[gk * g.ldb + gj] : gb[gj * g.ldb + gk]);
                        tile_b[kk][j] = v;
                    }
                    __syncthreads();
                    // Multiply: outer products over the K slice.
#pragma unroll
                    for (int kk = 0; kk < BLOCK_K; ++kk) {
                        float ra[kMicro], rb[kMicro];
#pragma unroll
                        for (int u = 0; u < kMicro; ++u)
                            ra[u] = tile_a[kk][ty + 16 * u], rb[u] = tile_b[kk][tx + 16 * u];
#pragma unroll
                        for (int u = 0; u < kMicro; ++u)
#pragma unroll
                            for (int v = 0; v < kMicro; ++v) acc[u][v] += ra[u] * rb[v];
                    }
                    __syncthreads();
                }
                // Epilogue: D = alpha * acc + beta * C.
#pragma unroll
                for (int u = 0; u < kMicro; ++u) {
                    const int gi = m0 + ty + 16 * u;
                    if (gi >= g.m) continue;
#pragma unroll
                    for (int v = 0; v < kMicro; ++v) {
                        const int gj = n0 + tx + 16 * v;
                        if (gj >= g.n) continue;
                        float out = alpha * acc[u][v];
                        if (beta != 0.0f) out += beta * to_f32(c[g.c_offset + gi * g.ldc + gj]);
                        d[g.d_offset + gi * g.ldd + gj] = from_f32<T>(out);
                    }
                }
            }
        }
    }
}

template <typename T>
void launch(const GroupedRun& r) {
    const GroupedDesc& desc = r.desc;
    // Upper bounds of any group's M and N, known on the host without reading the offsets.
    int64_t m_max = 0, n_max = 0;
    switch (desc.mode) {
        case GroupedMode::kRows:
            m_max = r.max_rows, n_max = desc.n;
            break;
        case GroupedMode::kWgrad:
            m_max = desc.trans_w ? desc.n : desc.k, n_max = desc.trans_w ? desc.k : desc.n;
            break;
        case GroupedMode::kBatch:
            m_max = desc.batch_m, n_max = desc.batch_n;
            break;
    }
    if (m_max <= 0 || n_max <= 0 || desc.num_groups <= 0) return;
    const int64_t tiles_m = (m_max + BLOCK_M - 1) / BLOCK_M, tiles_n = (n_max + BLOCK_N - 1) / BLOCK_N;
    // Bound the grid: about 8 blocks per SM in total, at least one tile column per group.
    const int64_t target = int64_t(r.sm_count) * 8;
    const int64_t groups = std::min<int64_t>(desc.num_groups, 65535);
    const int64_t grid_n = std::min<int64_t>(tiles_n, std::max<int64_t>(1, target / groups));
    const int64_t grid_m = std::min<int64_t>(tiles_m, std::max<int64_t>(1, target / (groups * grid_n)));
    const dim3 grid(unsigned(grid_n), unsigned(std::min<int64_t>(grid_m, 65535)), unsigned(groups));
    const T* c = static_cast<const T*>(r.c ? r.c : r.d);
    grouped_gemm_simt<T><<<grid, kThreads, 0, r.stream>>>(desc, static_cast<const T*>(r.a), static_cast<const T*>(r.b),
                                                          c, static_cast<T*>(r.d), r.alpha, r.beta);
    check_cuda(cudaGetLastError(), "grouped_gemm_simt launch");
}

}  // namespace

void run_simt(const GroupedRun& r, DType dtype) {
    K2_NVTX_RANGE("k2::grouped_gemm[simt]");
    switch (dtype) {
        case DType::Float32:
            return launch<float>(r);
        case DType::BFloat16:
            return launch<__nv_bfloat16>(r);
        case DType::Float16:
            return launch<__half>(r);
        default:
            throw std::invalid_argument("k2 gemm: the SIMT kernel takes float32, bfloat16 or float16");
    }
}

}  // namespace k2::gemm
