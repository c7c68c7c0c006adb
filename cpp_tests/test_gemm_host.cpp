// Host-side logic of the CUDA grouped GEMM (gemm/grouped_problem.h): each group's problem as the device
// argument builders derive it from the offsets, checked by running the described GEMMs on the host against a
// plain per-group loop; layouts, back-end choice, alignment and the scratch layout.
#include <gtest/gtest.h>

#include <random>
#include <vector>

#include "gemm/grouped_problem.h"

namespace {

using namespace k2::gemm;

// D = A . B for one GroupProblem, reading A and B in `layout` (the way CUTLASS reads them).
void run_problem(const GroupProblem& g, GemmLayout layout, const float* a, const float* b, float* d) {
    const bool a_row = layout != GemmLayout::kColRow, b_row = layout != GemmLayout::kRowCol;
    for (int i = 0; i < g.m; ++i)
        for (int j = 0; j < g.n; ++j) {
            double acc = 0;
            for (int k = 0; k < g.k; ++k) {
                const float av = a_row ? a[g.a_offset + i * g.lda + k] : a[g.a_offset + k * g.lda + i];
                const float bv = b_row ? b[g.b_offset + k * g.ldb + j] : b[g.b_offset + j * g.ldb + k];
                acc += double(av) * bv;
            }
            d[g.d_offset + i * g.ldd + j] = float(acc);
        }
}

std::vector<float> random_vector(std::size_t n, uint32_t seed) {
    std::mt19937 rng(seed);
    std::vector<float> v(n);
    for (auto& x : v) x = float(int(rng() % 17) - 8);
    return v;
}

struct Groups {
    std::vector<int32_t> offsets;  // cumulative row ends
    int64_t total() const { return offsets.empty() ? 0 : offsets.back(); }
};

class GroupedProblemTest : public ::testing::TestWithParam<std::tuple<std::vector<int32_t>, bool>> {};

TEST_P(GroupedProblemTest, RowsModeMatchesPerGroupLoop) {
    const auto& [sizes, trans_w] = GetParam();
    const int64_t K = 5, N = 3, E = int64_t(sizes.size());
    Groups g;
    for (int32_t s : sizes) g.offsets.push_back((g.offsets.empty() ? 0 : g.offsets.back()) + s);
    const int64_t T = g.total();
    auto x = random_vector(T * K, 1), w = random_vector(E * K * N, 2);
    std::vector<float> out(T * N, -1.0f);
    GroupedDesc desc{};
    desc.mode = GroupedMode::kRows, desc.trans_w = trans_w, desc.num_groups = int32_t(E);
    desc.offsets = g.offsets.data(), desc.k = K, desc.n = N;
    for (int32_t e = 0; e < E; ++e) {
        const GroupProblem p = group_problem(desc, e, e ? g.offsets[e - 1] : 0, g.offsets[e]);
        EXPECT_EQ(p.m, sizes[e]);
        run_problem(p, layout_of(desc), x.data(), w.data(), out.data());
    }
    // Direct definition: out[t] = x[t] @ W_e, W_e = w[e] ([K, N]) or w[e]^T (w[e] is [N, K]).
    for (int32_t e = 0, t = 0; e < E; ++e)
        for (; t < g.offsets[e]; ++t)
            for (int64_t j = 0; j < N; ++j) {
                double acc = 0;
                for (int64_t k = 0; k < K; ++k)
                    acc += double(x[t * K + k]) * (trans_w ? w[(e * N + j) * K + k] : w[(e * K + k) * N + j]);
                ASSERT_EQ(out[t * N + j], float(acc)) << "t=" << t << " j=" << j;
            }
}

TEST_P(GroupedProblemTest, WgradModeMatchesPerGroupLoop) {
    const auto& [sizes, trans_w] = GetParam();
    const int64_t K = 4, N = 6, E = int64_t(sizes.size());
    Groups g;
    for (int32_t s : sizes) g.offsets.push_back((g.offsets.empty() ? 0 : g.offsets.back()) + s);
    const int64_t T = g.total();
    auto x = random_vector(T * K, 3), dy = random_vector(T * N, 4);
    std::vector<float> dw(E * K * N, 0.0f);
    GroupedDesc desc{};
    desc.mode = GroupedMode::kWgrad, desc.trans_w = trans_w, desc.num_groups = int32_t(E);
    desc.offsets = g.offsets.data(), desc.k = K, desc.n = N;
    ASSERT_EQ(layout_of(desc), GemmLayout::kColRow);
    for (int32_t e = 0; e < E; ++e) {
        const GroupProblem p = group_problem(desc, e, e ? g.offsets[e - 1] : 0, g.offsets[e]);
        if (sizes[e] == 0) {
            EXPECT_EQ(p.m, 0);  // empty problem: the zero fill owns this group's dW
            EXPECT_EQ(p.n, 0);
            EXPECT_EQ(p.k, 0);
        }
        // A = x (or dy), B = dy (or x), as the trans_w flag of the descriptor says.
        run_problem(p, layout_of(desc), trans_w ? dy.data() : x.data(), trans_w ? x.data() : dy.data(), dw.data());
    }
    for (int32_t e = 0, begin = 0; e < E; begin = g.offsets[e++])
        for (int64_t k = 0; k < K; ++k)
            for (int64_t j = 0; j < N; ++j) {
                double acc = 0;
                for (int32_t t = begin; t < g.offsets[e]; ++t) acc += double(x[t * K + k]) * dy[t * N + j];
                const int64_t idx = trans_w ? (e * N + j) * K + k : (e * K + k) * N + j;
                ASSERT_EQ(dw[idx], float(acc)) << "e=" << e << " k=" << k << " j=" << j;
            }
}

INSTANTIATE_TEST_SUITE_P(
    Groups, GroupedProblemTest,
    ::testing::Combine(::testing::Values(std::vector<int32_t>{7}, std::vector<int32_t>{0, 3, 0, 5, 1},
                                         std::vector<int32_t>{0, 0, 0}, std::vector<int32_t>(37, 2)),
                       ::testing::Bool()));

TEST(GroupedProblem, BatchModeUsesBatchStrides) {
    GroupedDesc desc{};
    desc.mode = GroupedMode::kBatch, desc.num_groups = 3, desc.batch_layout = GemmLayout::kRowCol;
    desc.batch_m = 4, desc.batch_n = 4, desc.batch_k = 8;
    desc.batch_lda = 8, desc.batch_ldb = 8, desc.batch_ldc = 4, desc.batch_ldd = 4;
    desc.stride_a = 32, desc.stride_b = 32, desc.stride_c = 16, desc.stride_d = 16;
    const GroupProblem p = group_problem(desc, 2, 0, 0);
    EXPECT_EQ(layout_of(desc), GemmLayout::kRowCol);
    EXPECT_EQ(p.m, 4);
    EXPECT_EQ(p.k, 8);
    EXPECT_EQ(p.a_offset, 64);
    EXPECT_EQ(p.d_offset, 32);
    EXPECT_EQ(p.ldc, 4);
}

TEST(Backend, ChoiceFollowsDtypeAlignmentAndArchitecture) {
    EXPECT_EQ(choose_backend(ElementKind::kBFloat16, 9, 0, true, true, true), Backend::kSm90);
    EXPECT_EQ(choose_backend(ElementKind::kBFloat16, 9, 0, true, false, true), Backend::kSm80);
    EXPECT_EQ(choose_backend(ElementKind::kBFloat16, 8, 6, true, true, true), Backend::kSm80);
    EXPECT_EQ(choose_backend(ElementKind::kBFloat16, 10, 0, true, true, true), Backend::kSm80);  // PTX of sm_80
    EXPECT_EQ(choose_backend(ElementKind::kBFloat16, 7, 5, true, true, true), Backend::kSimt);
    EXPECT_EQ(choose_backend(ElementKind::kBFloat16, 9, 0, false, true, true), Backend::kSimt);
    EXPECT_EQ(choose_backend(ElementKind::kFloat32, 9, 0, true, true, true), Backend::kSimt);
    EXPECT_EQ(choose_backend(ElementKind::kFloat16, 8, 0, true, true, true), Backend::kSimt);
}

TEST(Backend, TensorCoreAlignment) {
    alignas(16) static char buffer[64];
    EXPECT_TRUE(tensor_core_aligned({8, 4096, 7168}, {buffer, buffer + 32}));
    EXPECT_FALSE(tensor_core_aligned({8, 4100}, {buffer}));
    EXPECT_FALSE(tensor_core_aligned({8}, {buffer + 2}));
}

TEST(Backend, WorkspaceBoundsTheChosenBackend) {
    // The workspace is sized before the operands' alignment is known: by the back end aligned operands get.
    // Unaligned operands may only fall back to the SIMT kernel, which needs no workspace.
    for (ElementKind element : {ElementKind::kFloat32, ElementKind::kBFloat16, ElementKind::kFloat16})
        for (int major : {7, 8, 9, 10})
            for (bool have90 : {false, true})
                for (bool have80 : {false, true}) {
                    const Backend sized = workspace_backend(element, major, 0, have90, have80);
                    EXPECT_EQ(choose_backend(element, major, 0, true, have90, have80), sized);
                    EXPECT_EQ(choose_backend(element, major, 0, false, have90, have80), Backend::kSimt);
                }
    EXPECT_EQ(workspace_backend(ElementKind::kFloat32, 9, 0, true, true), Backend::kSimt);
    EXPECT_EQ(workspace_backend(ElementKind::kBFloat16, 9, 0, true, true), Backend::kSm90);
}

}  // namespace
