// Host API of the optim family: batched Newton-Schulz orthogonalisation on CUDA (Muon's inner loop).
//
// For each matrix G_b [m, n] of the batch: X = bf16(G_b), transposed when m > n so X is [r, c] with r <= c;
// X /= max(||X||_F, eps); then per step (a, b, c):
//   A = X X^T              [r, r]   (one GEMM)
//   B = c A A + b A        [r, r]   (one GEMM; b A is folded into its epilogue as beta * C)
//   X = B X + a X          [r, c]   (one GEMM; a X is folded into its epilogue as beta * C)
// every GEMM with bf16 operands, fp32 accumulation and one bf16 rounding of the epilogue's result, the numerics
// of torch.optim.Muon. The result (transposed back) is written in out's dtype.
//
// Work runs on the current CUDA device (the tensors' device) in the caller's workspace, sized by
// newton_schulz_workspace_size; nothing is allocated. Any batch size runs: the element-wise kernels walk the
// batch with a grid-stride loop over grid.y (at most kMaxGridY blocks), the GEMMs take every matrix as a group.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "common/dtype.h"
#include "common/workspace.h"

namespace k2::optim {

struct NewtonSchulzParams {
    const void* x;  // [batch, m, n], contiguous
    void* out;      // [batch, m, n], contiguous
    DType x_dtype, out_dtype;
    int64_t batch, m, n;
    std::vector<float> coefficients;  // 3 per step: a, b, c
    float eps;
    Workspace workspace;
};

// The workspace of one call, for X [r, c] = the (transposed when tall) matrices, r = min(m, n), c = max(m, n):
// Frobenius sums fp32 [batch]; the iterate X and the next one, bf16 [batch, r, c] each; A = X X^T and
// B = c A A + b A, bf16 [batch, r, r] each; then the batched GEMMs' own workspace (`gemm_bytes`, shared by the
// three GEMMs of a step, which run one after the other on the stream).
struct NewtonSchulzWorkspace {
    WorkspacePlan plan;
    int sums, x, x_next, a, b, gemm;
};

inline NewtonSchulzWorkspace newton_schulz_workspace(int64_t batch, int64_t m, int64_t n, std::size_t gemm_bytes) {
    const auto r = std::size_t(std::min(m, n)), c = std::size_t(std::max(m, n)), nb = std::size_t(batch);
    NewtonSchulzWorkspace w;
    w.sums = w.plan.add(nb * sizeof(float));
    w.x = w.plan.add(nb * r * c * 2);
    w.x_next = w.plan.add(nb * r * c * 2);
    w.a = w.plan.add(nb * r * r * 2);
    w.b = w.plan.add(nb * r * r * 2);
    w.gemm = w.plan.add(gemm_bytes);
    return w;
}

// Grid of the element-wise kernels (norms, normalise, write-out): x covers one matrix's elements (at most 1024
// blocks of 256 threads, grid-stride beyond), y the batch (at most kMaxGridY, grid-stride beyond).
constexpr int64_t kMaxGridY = 65535;
struct Grid2 {
    unsigned x, y;
};
inline Grid2 elementwise_grid(int64_t per_matrix, int64_t batch) {
    return {unsigned(std::clamp<int64_t>((per_matrix + 255) / 256, 1, 1024)),
            unsigned(std::clamp<int64_t>(batch, 1, kMaxGridY))};
}

// Bytes newton_schulz_cuda needs for `batch` matrices [m, n] on CUDA device `device` (0 for an empty batch).
std::size_t newton_schulz_workspace_size(int64_t batch, int64_t m, int64_t n, int device);

void newton_schulz_cuda(const NewtonSchulzParams& p, void* stream);

}  // namespace k2::optim
