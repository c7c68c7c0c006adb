// The absorbed-MLA decode CPU kernel against its definition written as plain double-precision loops: logits over all
// r + dr dims, softmax over the first lengths[b] rows, values the first r dims. Covers ragged lengths with 0, 1 and
// T_max, H = 1, heads and lengths that are not a multiple of the register blocks or the 32-row tile, long sequences
// split over threads (and merged by lse), a strided cache view, bf16, every instruction-set variant, a workspace
// smaller than the query's (fewer splits, same result), and lengths outside [0, T_max].
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "attention/decode.h"
#include "common/check.h"
#include "common/thread_pool.h"

namespace {

using k2::DType;
namespace att = k2::attention;

struct Shape {
    std::vector<int32_t> lengths;
    int64_t T_max, H, r, dr;
};

struct Result {
    std::vector<float> o, lse;
};

// The definition in double; q [B, H, D] and cache rows at cache[b * cache_batch + t * cache_row].
void naive(const Shape& s, const std::vector<float>& q, const std::vector<float>& cache, int64_t cache_batch,
           int64_t cache_row, float scale, std::vector<double>& o, std::vector<double>& lse) {
    const int64_t B = int64_t(s.lengths.size()), H = s.H, r = s.r, D = s.r + s.dr;
    o.assign(B * H * r, 0.0);
    lse.assign(B * H, -std::numeric_limits<double>::infinity());
    for (int64_t b = 0; b < B; ++b)
        for (int64_t h = 0; h < H; ++h) {
            const int64_t n = s.lengths[b];
            if (n == 0) continue;
            std::vector<double> x(n);
            double mx = -std::numeric_limits<double>::infinity();
            for (int64_t j = 0; j < n; ++j) {
                double dot = 0;
                for (int64_t i = 0; i < D; ++i)
                    dot += double(q[(b * H + h) * D + i]) * cache[b * cache_batch + j * cache_row + i];
                x[j] = dot * scale;
                mx = std::max(mx, x[j]);
            }
            double sum = 0;
            for (int64_t j = 0; j < n; ++j) sum += std::exp(x[j] - mx);
            lse[b * H + h] = mx + std::log(sum);
            for (int64_t c = 0; c < r; ++c) {
                double acc = 0;
                for (int64_t j = 0; j < n; ++j)
                    acc += std::exp(x[j] - mx) / sum * cache[b * cache_batch + j * cache_row + c];
                o[(b * H + h) * r + c] = acc;
            }
        }
}

uint16_t to_bf16(float f) {  // round to nearest even
    uint32_t u;
    std::memcpy(&u, &f, 4);
    u += 0x7fffu + ((u >> 16) & 1u);
    return uint16_t(u >> 16);
}
float from_bf16(uint16_t h) {
    const uint32_t u = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// Runs the kernel on random data with the cache as a strided view: each sequence's rows sit `row_pad` elements apart
// beyond D, and sequences `batch_gap` rows apart beyond T_max (a slice of a bigger buffer). `bf16` rounds q and the
// cache to bf16 first, so the double reference sees exactly the kernel's inputs. `workspace_scale` < 1 hands the
// kernel less workspace than it asked for.
void check(const Shape& s, bool bf16, int64_t row_pad = 0, int64_t batch_gap = 0, double workspace_scale = 1.0) {
    const int64_t B = int64_t(s.lengths.size()), H = s.H, r = s.r, D = s.r + s.dr;
    const int64_t cache_row = D + row_pad, cache_batch = (s.T_max + batch_gap) * cache_row;
    std::mt19937 gen(int(B * 131 + H * 17 + r + s.T_max));
    std::normal_distribution<float> normal;
    std::vector<float> q(B * H * D), cache(std::max<int64_t>(B, 1) * cache_batch);
    for (auto& x : q) x = normal(gen);
    for (auto& x : cache) x = normal(gen);
    if (bf16) {
        for (auto& x : q) x = from_bf16(to_bf16(x));
        for (auto& x : cache) x = from_bf16(to_bf16(x));
    }
    const float scale = 1.0f / std::sqrt(float(D));
    std::vector<double> o_ref, lse_ref;
    naive(s, q, cache, cache_batch, cache_row, scale, o_ref, lse_ref);

    std::vector<uint16_t> q16(q.size()), cache16(cache.size()), o16(B * H * r);
    for (size_t i = 0; i < q.size(); ++i) q16[i] = to_bf16(q[i]);
    for (size_t i = 0; i < cache.size(); ++i) cache16[i] = to_bf16(cache[i]);
    std::vector<float> o(B * H * r, -7.0f), lse(B * H, -7.0f);
    const std::size_t ws_bytes =
        std::size_t(double(att::decode_workspace_cpu(B, H, r, s.T_max, k2::num_threads())) * workspace_scale);
    std::vector<float> workspace(ws_bytes / sizeof(float) + 1);
    att::DecodeParams p{bf16 ? static_cast<const void*>(q16.data()) : q.data(),
                        H * D,
                        D,
                        bf16 ? static_cast<const void*>(cache16.data()) : cache.data(),
                        cache_batch,
                        cache_row,
                        s.lengths.data(),
                        bf16 ? static_cast<void*>(o16.data()) : o.data(),
                        H * r,
                        r,
                        lse.data(),
                        B,
                        H,
                        s.T_max,
                        r,
                        s.dr,
                        scale,
                        bf16 ? DType::BFloat16 : DType::Float32,
                        {workspace.data(), ws_bytes}};
    att::decode_cpu(p);
    if (bf16)
        for (size_t i = 0; i < o.size(); ++i) o[i] = from_bf16(o16[i]);

    // fp32 accumulation of O(T) terms of size O(1); bf16 output adds one rounding (2^-8 relative).
    const double tol = bf16 ? 1e-2 : 2e-5;
    for (int64_t i = 0; i < B * H; ++i) {
        if (std::isinf(lse_ref[i]))
            EXPECT_TRUE(std::isinf(lse[i]) && lse[i] < 0) << "lse " << i;
        else
            EXPECT_NEAR(lse[i], lse_ref[i], 2e-5 * (1 + std::abs(lse_ref[i]))) << "lse " << i;
    }
    for (int64_t i = 0; i < B * H * r; ++i)
        ASSERT_NEAR(o[i], o_ref[i], tol * (1 + std::abs(o_ref[i]))) << "o " << i << " (b " << i / (H * r) << ")";
}

class DecodeThreads : public ::testing::TestWithParam<int> {
  protected:
    void SetUp() override { k2::set_num_threads(GetParam()); }
    void TearDown() override { k2::set_num_threads(saved_); }
    int saved_ = k2::num_threads();
};

TEST_P(DecodeThreads, RaggedLengthsWithEmptyAndFullSequences) {
    check({{0, 1, 37, 70, 70}, 70, 5, 32, 16}, false);
    check({{0, 1, 37, 70, 70}, 70, 5, 32, 16}, true);
}

TEST_P(DecodeThreads, OneHeadAndDimsOffTheVectorWidth) {
    check({{3, 33, 1}, 40, 1, 24, 8}, false);
    check({{29}, 29, 3, 20, 0}, false);  // no rope part
}

TEST_P(DecodeThreads, LongSequencesAreSplitAndMergedByLse) {
    check({{5000}, 5000, 4, 32, 16}, false);
    check({{5000, 1, 700, 2600}, 5000, 2, 32, 16}, true);
}

TEST_P(DecodeThreads, KimiK2DimsWithAStridedCache) {
    check({{1, 300, 129}, 300, 6, 512, 64}, false, /*row_pad=*/8, /*batch_gap=*/5);
    check({{600, 64}, 640, 4, 512, 64}, true, /*row_pad=*/0, /*batch_gap=*/3);
}

INSTANTIATE_TEST_SUITE_P(Threads, DecodeThreads, ::testing::Values(1, 3));

TEST(Decode, SmallerWorkspaceMeansFewerSplitsNotAnotherResult) {
    const int saved = k2::num_threads();
    k2::set_num_threads(4);
    check({{3000, 2000}, 3000, 2, 32, 16}, false, 0, 0, 0.5);
    check({{3000, 2000}, 3000, 2, 32, 16}, false, 0, 0, 0.0);
    k2::set_num_threads(saved);
}

TEST(Decode, EveryInstructionSetVariant) {
    const char* before = std::getenv("K2_ATTENTION_ISA");
    const std::string saved = before ? before : "";
    for (const char* isa : {"baseline", "avx2", "avx512"}) {
        setenv("K2_ATTENTION_ISA", isa, 1);
        check({{0, 45, 300}, 300, 5, 48, 16}, false);
        check({{45, 300}, 300, 5, 48, 16}, true);
    }
    if (before)
        setenv("K2_ATTENTION_ISA", saved.c_str(), 1);
    else
        unsetenv("K2_ATTENTION_ISA");
}

TEST(Decode, RejectsLengthsOutsideTheCache) {
    for (int32_t bad : {-1, 11}) {
        std::vector<int32_t> lengths{3, bad};
        std::vector<float> q(2 * 2 * 8), cache(2 * 10 * 8), o(2 * 2 * 4), lse(4);
        att::DecodeParams p{q.data(),   16, 8, cache.data(), 80, 8, lengths.data(), o.data(),       8, 4,
                            lse.data(), 2,  2, 10,           4,  4, 0.5f,           DType::Float32, {}};
        try {
            att::decode_cpu(p);
            FAIL() << "lengths[1] = " << bad << " accepted";
        } catch (const k2::ArgumentError& e) {
            EXPECT_NE(std::string(e.what()).find("argument 'lengths'"), std::string::npos) << e.what();
        }
    }
}

}  // namespace
