// The attention family's CPU kernels against a direct definition: per document, every logit, the softmax, and its
// gradients written as plain double-precision loops. Shapes include empty and length-1 documents, lengths that are
// not a multiple of the 64-token tile, dqk != dv, H = 1 with several threads (the backward's key splits), strided
// inputs, bf16, and malformed cu_seqlens.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "attention/attention.h"
#include "common/check.h"
#include "common/thread_pool.h"

namespace {

using k2::DType;
namespace att = k2::attention;

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

struct Case {
    std::vector<int32_t> cu;  // empty: one document
    int64_t T, H, dqk, dv;
    bool causal;
};

struct Expected {
    std::vector<double> o, lse, max_logits, dq, dk, dv;
};

// The definition, in double: x[t, h, :] at x[(t * H + h) * d].
Expected naive(const Case& c, const std::vector<float>& q, const std::vector<float>& k, const std::vector<float>& v,
               const std::vector<float>& d_o, float scale) {
    const int64_t T = c.T, H = c.H, dqk = c.dqk, dv = c.dv;
    Expected e{std::vector<double>(T * H * dv),  std::vector<double>(H * T),       std::vector<double>(H, kNegInf),
               std::vector<double>(T * H * dqk), std::vector<double>(T * H * dqk), std::vector<double>(T * H * dv)};
    std::vector<int32_t> cu = c.cu.empty() ? std::vector<int32_t>{0, int32_t(T)} : c.cu;
    for (size_t doc = 0; doc + 1 < cu.size(); ++doc) {
        const int64_t a = cu[doc], b = cu[doc + 1];
        for (int64_t h = 0; h < H; ++h) {
            const int64_t n = b - a;
            std::vector<double> p(n * n, 0.0), dp(n * n, 0.0);
            for (int64_t i = 0; i < n; ++i) {
                double mx = kNegInf;
                std::vector<double> s(n, kNegInf);
                for (int64_t j = 0; j < n; ++j) {
                    if (c.causal && j > i) continue;
                    double dot = 0;
                    for (int64_t x = 0; x < dqk; ++x)
                        dot += double(q[((a + i) * H + h) * dqk + x]) * k[((a + j) * H + h) * dqk + x];
                    s[j] = dot * scale;
                    mx = std::max(mx, s[j]);
                }
                double sum = 0;
                for (int64_t j = 0; j < n; ++j) sum += s[j] == kNegInf ? 0.0 : std::exp(s[j] - mx);
                e.lse[h * T + a + i] = mx + std::log(sum);
                e.max_logits[h] = std::max(e.max_logits[h], mx);
                for (int64_t j = 0; j < n; ++j) p[i * n + j] = s[j] == kNegInf ? 0.0 : std::exp(s[j] - mx) / sum;
                for (int64_t x = 0; x < dv; ++x) {
                    double acc = 0;
                    for (int64_t j = 0; j < n; ++j) acc += p[i * n + j] * v[((a + j) * H + h) * dv + x];
                    e.o[((a + i) * H + h) * dv + x] = acc;
                }
            }
            // Gradients of sum(o * d_o): dv = P^T dO, dP = dO V^T, dS = P (dP - rowsum(P dP)), dq = scale dS K, ...
            for (int64_t i = 0; i < n; ++i) {
                double row = 0;
                for (int64_t j = 0; j < n; ++j) {
                    double acc = 0;
                    for (int64_t x = 0; x < dv; ++x)
                        acc += double(d_o[((a + i) * H + h) * dv + x]) * v[((a + j) * H + h) * dv + x];
                    dp[i * n + j] = acc;
                    row += p[i * n + j] * acc;
                }
                for (int64_t j = 0; j < n; ++j) {
                    const double ds = p[i * n + j] * (dp[i * n + j] - row) * scale;
                    for (int64_t x = 0; x < dqk; ++x) {
                        e.dq[((a + i) * H + h) * dqk + x] += ds * k[((a + j) * H + h) * dqk + x];
                        e.dk[((a + j) * H + h) * dqk + x] += ds * q[((a + i) * H + h) * dqk + x];
                    }
                    for (int64_t x = 0; x < dv; ++x)
                        e.dv[((a + j) * H + h) * dv + x] += p[i * n + j] * d_o[((a + i) * H + h) * dv + x];
                }
            }
        }
    }
    return e;
}

void expect_near_all(const std::vector<float>& got, const std::vector<double>& want, double tol, const char* what) {
    ASSERT_EQ(got.size(), want.size()) << what;
    for (size_t i = 0; i < got.size(); ++i) {
        if (std::isinf(want[i]))
            ASSERT_EQ(double(got[i]), want[i]) << what << " element " << i;
        else
            ASSERT_NEAR(got[i], want[i], tol * (1.0 + std::fabs(want[i]))) << what << " element " << i;
    }
}

struct KernelRun {
    std::vector<float> o, lse, max_logits, dq, dk, dv;
};

// Runs forward and backward through the params structs on contiguous fp32 [T, H, d] buffers.
KernelRun run_kernels(const Case& c, const std::vector<float>& q, const std::vector<float>& k,
                      const std::vector<float>& v, const std::vector<float>& d_o, float scale) {
    const int64_t T = c.T, H = c.H, dqk = c.dqk, dv = c.dv;
    const int64_t N = c.cu.empty() ? 1 : int64_t(c.cu.size()) - 1;
    const int32_t* cu = c.cu.empty() ? nullptr : c.cu.data();
    KernelRun r{std::vector<float>(T * H * dv),  std::vector<float>(H * T),       std::vector<float>(H),
                std::vector<float>(T * H * dqk), std::vector<float>(T * H * dqk), std::vector<float>(T * H * dv)};
    std::vector<float> fws(att::forward_workspace_cpu(T, H, dqk, dv, N, true).plan.total / sizeof(float) + 1);
    att::ForwardParams fp{{q.data(), H * dqk, dqk},
                          {k.data(), H * dqk, dqk},
                          {v.data(), H * dv, dv},
                          {r.o.data(), H * dv, dv},
                          r.lse.data(),
                          r.max_logits.data(),
                          cu,
                          N,
                          T,
                          H,
                          dqk,
                          dv,
                          scale,
                          c.causal,
                          DType::Float32,
                          {fws.data(), fws.size() * sizeof(float)}};
    att::forward_cpu(fp);
    const auto plan = att::backward_workspace_cpu(T, H, dqk, dv, N, k2::num_threads());
    std::vector<float> bws(plan.plan.total / sizeof(float) + 1);
    att::BackwardParams bp{{d_o.data(), H * dv, dv},
                           {q.data(), H * dqk, dqk},
                           {k.data(), H * dqk, dqk},
                           {v.data(), H * dv, dv},
                           {r.o.data(), H * dv, dv},
                           r.lse.data(),
                           {r.dq.data(), H * dqk, dqk},
                           {r.dk.data(), H * dqk, dqk},
                           {r.dv.data(), H * dv, dv},
                           cu,
                           N,
                           T,
                           H,
                           dqk,
                           dv,
                           scale,
                           c.causal,
                           DType::Float32,
                           {bws.data(), bws.size() * sizeof(float)}};
    att::backward_cpu(bp);
    return r;
}

std::vector<float> random_values(int64_t n, std::mt19937& rng) {
    std::normal_distribution<float> normal;
    std::vector<float> x(n);
    for (auto& v : x) v = normal(rng);
    return x;
}

class AttentionTest : public ::testing::TestWithParam<std::tuple<Case, int>> {};

TEST_P(AttentionTest, MatchesDefinition) {
    const auto& [c, threads] = GetParam();
    const int saved = k2::num_threads();
    k2::set_num_threads(threads);
    std::mt19937 rng(11);
    const auto q = random_values(c.T * c.H * c.dqk, rng), k = random_values(c.T * c.H * c.dqk, rng);
    const auto v = random_values(c.T * c.H * c.dv, rng), d_o = random_values(c.T * c.H * c.dv, rng);
    const float scale = 1.0f / std::sqrt(float(c.dqk));
    const KernelRun got = run_kernels(c, q, k, v, d_o, scale);
    k2::set_num_threads(saved);
    const Expected want = naive(c, q, k, v, d_o, scale);
    expect_near_all(got.o, want.o, 2e-5, "o");
    expect_near_all(got.lse, want.lse, 2e-5, "lse");
    expect_near_all(got.max_logits, want.max_logits, 2e-5, "max_logits");
    expect_near_all(got.dq, want.dq, 5e-5, "dq");
    expect_near_all(got.dk, want.dk, 5e-5, "dk");
    expect_near_all(got.dv, want.dv, 5e-5, "dv");
}

INSTANTIATE_TEST_SUITE_P(Shapes, AttentionTest,
                         ::testing::Combine(::testing::Values(Case{{}, 1, 1, 8, 4, true}, Case{{}, 70, 1, 24, 16, true},
                                                              Case{{}, 130, 2, 20, 12, false},
                                                              Case{{0, 1, 1, 65, 100, 100, 170}, 170, 3, 48, 32, true},
                                                              Case{{0, 1, 1, 65, 100, 100, 170}, 170, 2, 16, 40, false},
                                                              Case{{0, 0}, 0, 2, 8, 8, true}),
                                            ::testing::Values(1, 3)));

TEST(Attention, StridedBf16InputsMatchFp32OfTheSameValues) {
    // q, k, v as slices of one [T, H, dqk + dqk + dv] bf16 buffer; the kernel widens bf16 exactly, so the fp32 run on
    // the same (rounded) values is the reference, up to the bf16 rounding of o.
    const int64_t T = 77, H = 2, dqk = 16, dv = 8, width = 2 * dqk + dv;
    std::mt19937 rng(3);
    std::vector<uint16_t> packed(T * H * width);
    std::vector<float> q(T * H * dqk), k(T * H * dqk), v(T * H * dv), d_o(T * H * dv, 0.0f);
    for (int64_t t = 0; t < T; ++t)
        for (int64_t h = 0; h < H; ++h)
            for (int64_t x = 0; x < width; ++x) {
                const float value = float(int(rng() % 512) - 256) / 64.0f;  // exact in bf16
                uint32_t bits;
                std::memcpy(&bits, &value, 4);
                packed[(t * H + h) * width + x] = uint16_t(bits >> 16);
                if (x < dqk)
                    q[(t * H + h) * dqk + x] = value;
                else if (x < 2 * dqk)
                    k[(t * H + h) * dqk + x - dqk] = value;
                else
                    v[(t * H + h) * dv + x - 2 * dqk] = value;
            }
    const float scale = 0.25f;
    std::vector<uint16_t> o(T * H * dv);
    std::vector<float> lse(H * T), max_logits(H);
    std::vector<float> ws(att::forward_workspace_cpu(T, H, dqk, dv, 1, true).plan.total / 4 + 1);
    att::ForwardParams p{{packed.data(), H * width, width},
                         {packed.data() + dqk, H * width, width},
                         {packed.data() + 2 * dqk, H * width, width},
                         {o.data(), H * dv, dv},
                         lse.data(),
                         max_logits.data(),
                         nullptr,
                         1,
                         T,
                         H,
                         dqk,
                         dv,
                         scale,
                         true,
                         DType::BFloat16,
                         {ws.data(), ws.size() * 4}};
    att::forward_cpu(p);
    const Expected want = naive({{}, T, H, dqk, dv, true}, q, k, v, d_o, scale);
    for (size_t i = 0; i < o.size(); ++i) {
        const uint32_t bits = uint32_t(o[i]) << 16;
        float value;
        std::memcpy(&value, &bits, 4);
        ASSERT_NEAR(value, want.o[i], 8e-3 * (1.0 + std::fabs(want.o[i]))) << "o element " << i;
    }
    for (size_t i = 0; i < lse.size(); ++i) ASSERT_NEAR(lse[i], want.lse[i], 1e-4) << "lse element " << i;
    for (int64_t h = 0; h < H; ++h) ASSERT_NEAR(max_logits[h], want.max_logits[h], 1e-4);
}

TEST(Attention, RejectsMalformedCuSeqlens) {
    const int64_t T = 10, H = 1, d = 4;
    std::vector<float> x(T * H * d), o(T * H * d), lse(H * T);
    for (const std::vector<int32_t>& cu :
         {std::vector<int32_t>{1, 10}, std::vector<int32_t>{0, 6, 4, 10}, std::vector<int32_t>{0, 5, 9}}) {
        std::vector<float> ws(att::forward_workspace_cpu(T, H, d, d, int64_t(cu.size()) - 1, false).plan.total / 4 + 1);
        att::ForwardParams p{{x.data(), H * d, d},
                             {x.data(), H * d, d},
                             {x.data(), H * d, d},
                             {o.data(), H * d, d},
                             lse.data(),
                             nullptr,
                             cu.data(),
                             int64_t(cu.size()) - 1,
                             T,
                             H,
                             d,
                             d,
                             1.0f,
                             true,
                             DType::Float32,
                             {ws.data(), ws.size() * 4}};
        EXPECT_THROW(att::forward_cpu(p), k2::ArgumentError);
    }
}

}  // namespace
