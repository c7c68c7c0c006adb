// Host/device logic of the grouped GEMM that needs no CUDA: how each group's problem is derived from the int32
// cumulative offsets, which back end may run it, and which back end sizes a call's workspace. Header-only and
// framework-free: the CUDA argument builders call group_problem() on the device (one thread per group, so no host
// sync), and cpp_tests check all of it on the host.
//
// Every problem is D [M, N] (row-major, ldd) = alpha * A [M, K] . B [K, N] + beta * C [M, N] (row-major, ldc), with
// A and B in the layout of their GemmLayout (CUTLASS's RowMajor / ColumnMajor naming). Three layouts cover the
// grouped GEMM, both its gradients and Newton-Schulz:
//   kRowCol  A row-major, B column-major (both K-major)   x @ W_e^T (trans_w forward), X X^T
//   kRowRow  A row-major, B row-major                     x @ W_e   (forward), dy @ W_e (trans_w dgrad), B X
//   kColRow  A column-major, B row-major                  x_e^T dy_e (the weight gradient, K = group rows)
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>

#if defined(__CUDACC__)
#define K2_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define K2_HOST_DEVICE inline
#endif

namespace k2::gemm {

enum class GemmLayout : uint8_t { kRowCol, kRowRow, kColRow };

// One group's GEMM; offsets are in elements from the operand's base pointer.
struct GroupProblem {
    int32_t m, n, k;
    int64_t a_offset, b_offset, c_offset, d_offset;
    int64_t lda, ldb, ldc, ldd;
};

enum class GroupedMode : uint8_t {
    kRows,   // group e owns rows offsets[e-1]:offsets[e] of A and D: out = x @ W_e (forward and dgrad)
    kWgrad,  // group e owns rows of both x and dy, which become the reduction: dW_e = x_e^T dy_e
    kBatch,  // num_groups equal problems at fixed batch strides (Newton-Schulz)
};

// Everything the device needs to derive every group's problem. Sizes in elements.
struct GroupedDesc {
    GroupedMode mode;
    bool trans_w;  // kRows/kWgrad: w is [E, N, K] (nn.Linear layout) instead of [E, K, N]
    int32_t num_groups;
    const int32_t* offsets;  // kRows/kWgrad: [num_groups] cumulative row ends (device memory for CUDA)
    int64_t k, n;            // kRows: x [T, k], out [T, n]; kWgrad: x [T, k], dy [T, n]
    // kBatch only: the common problem and the batch strides (elements) of A, B, C, D.
    GemmLayout batch_layout;
    int32_t batch_m, batch_n, batch_k;
    int64_t batch_lda, batch_ldb, batch_ldc, batch_ldd;
    int64_t stride_a, stride_b, stride_c, stride_d;
};

// The layout of A and B for a descriptor.
K2_HOST_DEVICE GemmLayout layout_of(const GroupedDesc& d) {
    if (d.mode == GroupedMode::kBatch) return d.batch_layout;
    if (d.mode == GroupedMode::kWgrad) return GemmLayout::kColRow;
    return d.trans_w ? GemmLayout::kRowCol : GemmLayout::kRowRow;
}

// Group e's problem. `begin`/`end` are its row range (offsets[e-1], offsets[e]); ignored for kBatch.
//   kRows:  A = x [T, k] (row-major), B = W_e (k x n: w[e] as [k, n], or w[e]^T from [n, k]), D = out [T, n].
//   kWgrad: trans_w == false: D = dW_e [k, n] = x_e^T dy_e (A = x, B = dy);
//           trans_w == true:  D = dW_e [n, k] = dy_e^T x_e (A = dy, B = x).
//           An empty group gets an empty problem: its dW_e is zero-filled separately.
K2_HOST_DEVICE GroupProblem group_problem(const GroupedDesc& d, int32_t e, int64_t begin, int64_t end) {
    GroupProblem g{};
    const int64_t rows = end > begin ? end - begin : 0;
    switch (d.mode) {
        case GroupedMode::kRows:
            g.m = int32_t(rows), g.n = int32_t(d.n), g.k = int32_t(d.k);
            g.a_offset = begin * d.k, g.lda = d.k;
            g.b_offset = int64_t(e) * d.k * d.n, g.ldb = d.trans_w ? d.k : d.n;
            g.d_offset = g.c_offset = begin * d.n, g.ldd = g.ldc = d.n;
            break;
        case GroupedMode::kWgrad: {
            // A is the operand whose columns index the output rows (column-major view of its row block).
            const int64_t a_cols = d.trans_w ? d.n : d.k, b_cols = d.trans_w ? d.k : d.n;
            if (rows > 0) g.m = int32_t(a_cols), g.n = int32_t(b_cols), g.k = int32_t(rows);
            g.a_offset = begin * a_cols, g.lda = a_cols;
            g.b_offset = begin * b_cols, g.ldb = b_cols;
            g.d_offset = g.c_offset = int64_t(e) * a_cols * b_cols, g.ldd = g.ldc = b_cols;
            break;
        }
        case GroupedMode::kBatch:
            g.m = d.batch_m, g.n = d.batch_n, g.k = d.batch_k;
            g.a_offset = e * d.stride_a, g.b_offset = e * d.stride_b;
            g.c_offset = e * d.stride_c, g.d_offset = e * d.stride_d;
            g.lda = d.batch_lda, g.ldb = d.batch_ldb, g.ldc = d.batch_ldc, g.ldd = d.batch_ldd;
            break;
    }
    return g;
}

// ---- Back-end choice ------------------------------------------------------------------------------------------

enum class Backend : uint8_t {
    kSm90,  // CUTLASS 3.x ptr-array grouped GEMM: TMA + warp-specialised WGMMA (sm_90a cubin)
    kSm80,  // CUTLASS 2.x grouped GEMM: cp.async + mma.sync (sm_80 cubin, PTX for later GPUs)
    kSimt,  // k2's own tiled fp32-accumulating CUDA-core kernel: any dtype, stride and alignment
};

enum class ElementKind : uint8_t { kFloat32, kBFloat16, kFloat16 };

// The tensor-core paths read 16-byte vectors (TMA, cp.async): every leading dimension must be a multiple of
// 8 bf16 elements and every base pointer 16-byte aligned; then every group's operands are aligned too, because
// group offsets are multiples of a leading dimension.
inline bool tensor_core_aligned(std::initializer_list<int64_t> leading_dims, std::initializer_list<const void*> ptrs) {
    for (int64_t ld : leading_dims)
        if (ld % 8 != 0) return false;
    for (const void* p : ptrs)
        if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
    return true;
}

// bf16 runs on tensor cores (sm_90 with the sm_90a build, else sm_80+ with the sm_80 build) when aligned;
// fp32 and fp16 run the SIMT kernel (full fp32 products, like torch with TF32 off).
inline Backend choose_backend(ElementKind element, int cc_major, int cc_minor, bool aligned, bool have_sm90,
                              bool have_sm80) {
    if (element != ElementKind::kBFloat16 || !aligned) return Backend::kSimt;
    if (have_sm90 && cc_major == 9 && cc_minor == 0) return Backend::kSm90;
    if (have_sm80 && cc_major >= 8) return Backend::kSm80;
    return Backend::kSimt;
}

// The back end whose workspace a call must be given: the one choose_backend picks for aligned operands. Unaligned
// operands fall back to the SIMT kernel, which needs none, so the size is known before the pointers are.
inline Backend workspace_backend(ElementKind element, int cc_major, int cc_minor, bool have_sm90, bool have_sm80) {
    return choose_backend(element, cc_major, cc_minor, true, have_sm90, have_sm80);
}

}  // namespace k2::gemm
