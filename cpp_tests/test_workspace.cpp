// Host-side logic of the caller-provided workspaces (common/workspace.h) and of the launch shapes that must stay
// within CUDA's limits: the WorkspacePlan carving, the workspace check, the Newton-Schulz and MoE workspace
// layouts, and the Newton-Schulz element-wise grid for batches beyond grid.y's 65,535.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/check.h"
#include "common/workspace.h"
#include "moe/moe.h"
#include "optim/optim.h"

namespace {

using k2::Workspace;
using k2::WorkspacePlan;

// Every array of `plan` starts aligned and ends before the next one starts.
void expect_aligned_and_disjoint(const WorkspacePlan& plan, const std::vector<std::size_t>& bytes) {
    ASSERT_EQ(plan.count, int(bytes.size()));
    for (int i = 0; i < plan.count; ++i) {
        EXPECT_EQ(plan.offset[i] % WorkspacePlan::kAlign, 0u) << "array " << i;
        const std::size_t end = plan.offset[i] + bytes[i];
        EXPECT_LE(end, i + 1 < plan.count ? plan.offset[i + 1] : plan.total) << "array " << i;
    }
}

TEST(WorkspacePlan, ArraysAreAlignedAndDisjoint) {
    WorkspacePlan plan;
    const int a = plan.add(12), b = plan.add(0), c = plan.add(300);
    EXPECT_EQ(plan.offset[a], 0u);
    EXPECT_EQ(plan.offset[b], 256u);
    EXPECT_EQ(plan.offset[c], 256u);
    EXPECT_EQ(plan.total, 256u + 512u);
    expect_aligned_and_disjoint(plan, {12, 0, 300});
    alignas(256) static char base[1024];
    EXPECT_EQ(plan.at<char>(base, c), base + 256);
    for (int i = plan.count; i < WorkspacePlan::kMaxArrays; ++i) plan.add(1);
    EXPECT_THROW(plan.add(1), std::length_error);
}

TEST(WorkspacePlan, ExpectWorkspaceNamesTheArgument) {
    alignas(256) static char buffer[512];
    EXPECT_NO_THROW(k2::expect_workspace(Workspace{}, 0, "op"));  // nothing needed: an empty workspace is fine
    EXPECT_NO_THROW(k2::expect_workspace(Workspace{buffer, 512}, 512, "op"));
    try {
        k2::expect_workspace(Workspace{buffer, 100}, 512, "moe_permute");
        FAIL() << "a too-small workspace was accepted";
    } catch (const k2::ArgumentError& e) {
        EXPECT_NE(std::string(e.what()).find("k2.ops.moe_permute: argument 'workspace': expected at least 512 bytes"),
                  std::string::npos)
            << e.what();
    }
    EXPECT_THROW(k2::expect_workspace(Workspace{buffer + 16, 496}, 256, "op"), k2::ArgumentError);
}

TEST(NewtonSchulzWorkspace, LayoutMatchesTheFormula) {
    // Tall [m, n] = [96, 40]: X is [40, 96]; r = 40, c = 96.
    const int64_t batch = 7, m = 96, n = 40;
    const std::size_t gemm = 1000;
    const auto w = k2::optim::newton_schulz_workspace(batch, m, n, gemm);
    const std::size_t sums = batch * 4, x = batch * 40 * 96 * 2, gram = batch * 40 * 40 * 2;
    expect_aligned_and_disjoint(w.plan, {sums, x, x, gram, gram, gemm});
    auto up = WorkspacePlan::round_up;
    EXPECT_EQ(w.plan.total, up(sums) + 2 * up(x) + 2 * up(gram) + up(gemm));
    // Wide matrices give the same layout as their transposes.
    EXPECT_EQ(k2::optim::newton_schulz_workspace(batch, n, m, gemm).plan.total, w.plan.total);
}

TEST(NewtonSchulzGrid, BatchBeyondGridYIsCoveredOnce) {
    // grid.y may not exceed 65,535: larger batches are walked by a grid-stride loop over blockIdx.y.
    for (int64_t batch : {int64_t(1), int64_t(65535), int64_t(65536), int64_t(200001)}) {
        const auto g = k2::optim::elementwise_grid(4, batch);
        EXPECT_GE(g.x, 1u);
        EXPECT_LE(g.y, 65535u);
        std::vector<int> visits(batch, 0);
        for (int64_t y = 0; y < int64_t(g.y); ++y)
            for (int64_t b = y; b < batch; b += g.y) ++visits[b];
        EXPECT_TRUE(std::all_of(visits.begin(), visits.end(), [](int v) { return v == 1; })) << batch;
    }
    EXPECT_EQ(k2::optim::elementwise_grid(1 << 30, 3).x, 1024u);  // x is bounded too, grid-stride inside a matrix
}

TEST(MoeWorkspace, PermuteAndUnpermuteLayouts) {
    const int64_t n = 1000;  // T*K copies
    const std::size_t cub = 4321;
    const auto w = k2::moe::permute_workspace(n, cub);
    expect_aligned_and_disjoint(w.plan, {n * 4, n * 4, n * 4, cub});
    EXPECT_EQ(w.plan.total, 3 * WorkspacePlan::round_up(n * 4) + WorkspacePlan::round_up(cub));
    EXPECT_EQ(k2::moe::unpermute_workspace_size(250, 4), WorkspacePlan::round_up(1000 * 4));
    EXPECT_EQ(k2::moe::unpermute_workspace_size(250, 0), 0u);  // top_k = 0: no copies, no launch
    EXPECT_EQ(k2::moe::unpermute_workspace_size(0, 8), 0u);
}

TEST(MoeWorkspace, ExpertIdBitsCoverEveryExpert) {
    for (int64_t e : {1, 2, 3, 8, 9, 256, 384}) {
        const int bits = k2::moe::expert_id_bits(e);
        EXPECT_GE(int64_t(1) << bits, e) << e;
        if (bits > 1) EXPECT_LT(int64_t(1) << (bits - 1), e) << e;
    }
}

}  // namespace
