// Batched Newton-Schulz on CUDA (see optim.h). The three GEMMs of a step run through the gemm family's batched
// GEMM (CUTLASS grouped kernels: sm_90a WGMMA, sm_80 mma.sync, or the SIMT fallback for unaligned sizes) with
// the polynomial's linear terms folded into the epilogues (D = alpha * A.B + beta * C), so a step is exactly
// three kernels and no element-wise pass. A is computed once per step and feeds both terms of B; since A is
// symmetric, A A = A A^T reads A in the same K-major layout as X X^T. Around the loop, one kernel computes the
// Frobenius norms and one writes the normalised (and, for tall matrices, transposed) bf16 X; one kernel writes
// the result back in the caller's layout and dtype. Every buffer lives in the caller's workspace (optim.h).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "common/cuda_elements.cuh"
#include "common/nvtx.h"
#include "gemm/gemm.h"
#include "optim/optim.h"

namespace k2::optim {

namespace {

void check_cuda(cudaError_t err, const char* what) {
    cu::check(err, "newton_schulz", what);
}

using cu::to_f32;

// The value torch's x.bfloat16() gives, as float.
template <typename T>
__device__ __forceinline__ float as_bf16(T v) {
    return __bfloat162float(__float2bfloat16(to_f32(v)));
}

// sums[b] += sum of squares of bf16(x_b); grid (chunks, batch), both grid-stride (optim.h: elementwise_grid).
template <typename T>
__global__ void sum_squares(const T* x, int64_t batch, int64_t per_matrix, float* sums) {
    __shared__ float warp_sums[32];
    for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
        const T* xb = x + b * per_matrix;
        float acc = 0.0f;
        for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < per_matrix;
             i += int64_t(gridDim.x) * blockDim.x) {
            const float v = as_bf16(xb[i]);
            acc += v * v;
        }
        for (int offset = 16; offset > 0; offset /= 2) acc += __shfl_down_sync(0xffffffffu, acc, offset);
        if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = acc;
        __syncthreads();
        if (threadIdx.x == 0) {
            float total = 0.0f;
            for (int w = 0; w < int(blockDim.x / 32); ++w) total += warp_sums[w];
            atomicAdd(sums + b, total);
        }
        __syncthreads();  // warp_sums is reused by the next matrix
    }
}

// X_b [r, c] = bf16(bf16(x_b) / max(bf16(||x_b||), eps)), transposed when the input is tall (m > n).
template <typename T>
__global__ void normalise(const T* x, const float* sums, float eps, __nv_bfloat16* X, int64_t batch, int64_t m,
                          int64_t n, bool transpose) {
    const int64_t per_matrix = m * n;
    for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
        const float norm = fmaxf(__bfloat162float(__float2bfloat16(sqrtf(sums[b]))), eps);
        const T* xb = x + b * per_matrix;
        __nv_bfloat16* Xb = X + b * per_matrix;
        for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < per_matrix;
             i += int64_t(gridDim.x) * blockDim.x) {
            // i indexes the output [r, c]; for a transpose, output (p, q) is input (q, p).
            const int64_t src = transpose ? (i % m) * n + i / m : i;
            Xb[i] = __float2bfloat16(as_bf16(xb[src]) / norm);
        }
    }
}

// out_b [m, n] = X_b (transposed back when needed), in out's dtype.
template <typename T>
__global__ void write_out(const __nv_bfloat16* X, T* out, int64_t batch, int64_t m, int64_t n, bool transpose) {
    const int64_t per_matrix = m * n;
    for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
        const __nv_bfloat16* Xb = X + b * per_matrix;
        T* ob = out + b * per_matrix;
        for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < per_matrix;
             i += int64_t(gridDim.x) * blockDim.x) {
            // i indexes out [m, n]; X is [n, m] when transposed.
            const float v = __bfloat162float(transpose ? Xb[(i % n) * m + i / n] : Xb[i]);
            if constexpr (std::is_same_v<T, float>)
                ob[i] = v;
            else if constexpr (std::is_same_v<T, __nv_bfloat16>)
                ob[i] = __float2bfloat16(v);
            else
                ob[i] = __float2half(v);
        }
    }
}

// D_b = alpha * A_b . B_b + beta * C_b over the batch, all bf16 row-major [.., ld] buffers.
void batched(gemm::GemmLayout layout, int64_t batch, int64_t M, int64_t N, int64_t K, const void* a, int64_t lda,
             const void* b, int64_t ldb, const void* c, void* d, int64_t ldd, float alpha, float beta,
             Workspace workspace, cudaStream_t stream) {
    gemm::BatchedGemmParams p{};
    p.desc.mode = gemm::GroupedMode::kBatch;
    p.desc.num_groups = int32_t(batch);
    p.desc.batch_layout = layout;
    p.desc.batch_m = int32_t(M), p.desc.batch_n = int32_t(N), p.desc.batch_k = int32_t(K);
    p.desc.batch_lda = lda, p.desc.batch_ldb = ldb, p.desc.batch_ldc = ldd, p.desc.batch_ldd = ldd;
    p.desc.stride_a = M * lda;
    p.desc.stride_b = layout == gemm::GemmLayout::kRowCol ? N * ldb : K * ldb;
    p.desc.stride_c = p.desc.stride_d = M * ldd;
    p.dtype = DType::BFloat16, p.a = a, p.b = b, p.c = c, p.d = d, p.alpha = alpha, p.beta = beta;
    p.workspace = workspace;
    gemm::batched_gemm_cuda(p, stream);
}

}  // namespace

std::size_t newton_schulz_workspace_size(int64_t batch, int64_t m, int64_t n, int device) {
    if (batch == 0 || m * n == 0) return 0;
    return newton_schulz_workspace(batch, m, n, gemm::grouped_workspace_size(DType::BFloat16, batch, device))
        .plan.total;
}

void newton_schulz_cuda(const NewtonSchulzParams& p, void* stream_handle) {
    K2_NVTX_RANGE("k2::newton_schulz");
    auto stream = static_cast<cudaStream_t>(stream_handle);
    const int64_t per_matrix = p.m * p.n;
    if (p.batch == 0 || per_matrix == 0) return;
    const bool transpose = p.m > p.n;
    const int64_t r = transpose ? p.n : p.m, c = transpose ? p.m : p.n;  // X is [r, c], r <= c

    int device = 0;
    check_cuda(cudaGetDevice(&device), "cudaGetDevice");
    const NewtonSchulzWorkspace w =
        newton_schulz_workspace(p.batch, p.m, p.n, gemm::grouped_workspace_size(DType::BFloat16, p.batch, device));
    expect_workspace(p.workspace, w.plan.total, "newton_schulz");
    void* base = p.workspace.data;
    auto* sums = w.plan.at<float>(base, w.sums);
    auto* X = w.plan.at<__nv_bfloat16>(base, w.x);
    auto* X_next = w.plan.at<__nv_bfloat16>(base, w.x_next);
    void* A = w.plan.at<char>(base, w.a);
    void* B = w.plan.at<char>(base, w.b);
    const Workspace gemm_ws{w.plan.at<char>(base, w.gemm), w.plan.total - w.plan.offset[w.gemm]};

    // Normalise.
    const Grid2 g = elementwise_grid(per_matrix, p.batch);
    const dim3 grid(g.x, g.y);
    check_cuda(cudaMemsetAsync(sums, 0, p.batch * sizeof(float), stream), "memset");
    cu::dispatch_float(p.x_dtype, "newton_schulz", [&](auto tag) {
        using T = decltype(tag);
        sum_squares<<<grid, 256, 0, stream>>>(static_cast<const T*>(p.x), p.batch, per_matrix, sums);
        normalise<<<grid, 256, 0, stream>>>(static_cast<const T*>(p.x), sums, p.eps, X, p.batch, p.m, p.n, transpose);
    });
    check_cuda(cudaGetLastError(), "normalise launch");

    // Iterate: three GEMMs per step.
    for (std::size_t s = 0; s + 2 < p.coefficients.size(); s += 3) {
        const float a = p.coefficients[s], b = p.coefficients[s + 1], cc = p.coefficients[s + 2];
        using gemm::GemmLayout;
        // A = X X^T, B = c A A + b A, X = B X + a X.
        batched(GemmLayout::kRowCol, p.batch, r, r, c, X, c, X, c, nullptr, A, r, 1.0f, 0.0f, gemm_ws, stream);
        batched(GemmLayout::kRowCol, p.batch, r, r, r, A, r, A, r, A, B, r, cc, b, gemm_ws, stream);
        batched(GemmLayout::kRowRow, p.batch, r, c, r, B, r, X, c, X, X_next, c, 1.0f, a, gemm_ws, stream);
        std::swap(X, X_next);
    }

    cu::dispatch_float(p.out_dtype, "newton_schulz", [&](auto tag) {
        using T = decltype(tag);
        write_out<<<grid, 256, 0, stream>>>(X, static_cast<T*>(p.out), p.batch, p.m, p.n, transpose);
    });
    check_cuda(cudaGetLastError(), "write_out launch");
}

}  // namespace k2::optim
