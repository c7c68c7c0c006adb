// CPU kernel of absorbed-MLA decode (see decode.h for the contract): FlashDecoding's split-K over the latent cache on
// k2's thread pool.
//
// Plan: sequence b's keys are cut into splits[b] even ranges of at least kDecodeMinSplitKeys keys, with about one
// split per thread over the whole batch (keys per split = max(kDecodeMinSplitKeys, sum of lengths / threads)), so
// one long sequence spreads over all threads and a large batch runs one sequence per item. Items run longest first.
//
// Item (b, key range): q[b] for all H heads is widened once to fp32 Q [H, D_pad]. Then per tile of kDecodeBlockN
// cache rows, each row widened to fp32 once and shared by every head:
//   scores  S [H, n] = Q K^T: register blocks of MR heads x NJ rows, each a dot product over D in W-float vectors
//           (every loaded row vector meets MR heads, every query vector NJ rows), reduced across lanes at the end;
//   softmax online per head (running max m, sum l; the accumulator is rescaled only when m grows);
//   values  O [H, r_pad] += P [H, n] C [n, r_pad], C the tile's first r columns (c_kv): a broadcast-A GEMM.
// An item that is its sequence's only split writes o and lse; otherwise it writes a normalised partial (o, lse) to
// the workspace and a second pass merges a sequence's partials: lse = log sum_s exp(lse_s), o = sum_s
// exp(lse_s - lse) o_s.
//
// The hot functions are compiled for AVX-512, AVX2+FMA and a baseline and chosen at run time from cpuid, capped by
// K2_ATTENTION_ISA=avx2|baseline like the attention forward. bf16 is widened to fp32 on load; accumulation is fp32.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "attention/cpu_vec.h"
#include "attention/decode.h"
#include "common/check.h"
#include "common/thread_pool.h"

namespace k2::attention {

namespace {

using namespace cpu_vec;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t BLOCK_N = kDecodeBlockN;

// ---- Register blocks ----------------------------------------------------------------------------------------------

// Scores: MR heads x NJ rows of accumulators; values: MR heads x NV vectors (AVX-512 has 32 vector registers, AVX2 and
// the baseline 16).
template <int W>
struct Blocking {
    static constexpr int MR = W == 16 ? 4 : 2;
    static constexpr int NJ = 4;
    static constexpr int NV = W == 16 ? 4 : 2;
};

// S[i, j] = <Q[i], K[j]> for MR heads and NJ rows; D a multiple of W; Q rows D apart, K rows ldk apart.
template <int W, int MR, int NJ>
K2_ALWAYS_INLINE void dot_block(const float* Q, const float* K, int64_t ldk, int64_t D, float* S, int64_t lds) {
    Vec<W> acc[MR][NJ];
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NJ; ++j) acc[i][j] = Vec<W>{};
    for (int64_t d = 0; d < D; d += W) {
        Vec<W> k[NJ];
        for (int j = 0; j < NJ; ++j) k[j] = load<W>(K + j * ldk + d);
        for (int i = 0; i < MR; ++i) {
            const Vec<W> q = load<W>(Q + i * D + d);
            for (int j = 0; j < NJ; ++j) acc[i][j] += q * k[j];
        }
    }
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NJ; ++j) S[i * lds + j] = hsum(acc[i][j]);
}

// S [H, lds] = Q [H, D] K [n, D]^T, K rows ldk apart. Row groups outer, so a group's NJ rows stay in L1 while every
// head meets them.
template <int W>
K2_ALWAYS_INLINE void scores(const float* Q, int64_t heads, const float* K, int64_t ldk, int64_t n, int64_t D, float* S,
                             int64_t lds) {
    constexpr int MR = Blocking<W>::MR, NJ = Blocking<W>::NJ;
    int64_t j = 0;
    for (; j + NJ <= n; j += NJ) {
        int64_t h = 0;
        for (; h + MR <= heads; h += MR) dot_block<W, MR, NJ>(Q + h * D, K + j * ldk, ldk, D, S + h * lds + j, lds);
        for (; h < heads; ++h) dot_block<W, 1, NJ>(Q + h * D, K + j * ldk, ldk, D, S + h * lds + j, lds);
    }
    for (; j < n; ++j) {
        int64_t h = 0;
        for (; h + MR <= heads; h += MR) dot_block<W, MR, 1>(Q + h * D, K + j * ldk, ldk, D, S + h * lds + j, lds);
        for (; h < heads; ++h) dot_block<W, 1, 1>(Q + h * D, K + j * ldk, ldk, D, S + h * lds + j, lds);
    }
}

// C[0:MR, 0:NV*W] += A[0:MR, 0:K] B[0:K, 0:NV*W]; row strides in floats.
template <int W, int MR, int NV>
K2_ALWAYS_INLINE void value_block(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                                  int64_t K) {
    Vec<W> acc[MR][NV];
    for (int i = 0; i < MR; ++i)
        for (int v = 0; v < NV; ++v) acc[i][v] = load<W>(C + i * ldc + v * W);
    for (int64_t k = 0; k < K; ++k) {
        Vec<W> b[NV];
        for (int v = 0; v < NV; ++v) b[v] = load<W>(B + k * ldb + v * W);
        for (int i = 0; i < MR; ++i) {
            const Vec<W> a = splat<W>(A[i * lda + k]);
            for (int v = 0; v < NV; ++v) acc[i][v] += a * b[v];
        }
    }
    for (int i = 0; i < MR; ++i)
        for (int v = 0; v < NV; ++v) store<W>(C + i * ldc + v * W, acc[i][v]);
}

// O [H, N] += P [H, K] V [K, N] with N a multiple of W. Column panels outer, so a panel of V stays in L1 for all heads.
template <int W>
K2_ALWAYS_INLINE void values(const float* P, int64_t lda, int64_t heads, const float* V, int64_t ldb, int64_t K,
                             float* O, int64_t N) {
    constexpr int MR = Blocking<W>::MR, NV = Blocking<W>::NV;
    auto panel = [&](auto nv, int64_t c) {
        constexpr int PV = decltype(nv)::value;
        int64_t h = 0;
        for (; h + MR <= heads; h += MR) value_block<W, MR, PV>(P + h * lda, lda, V + c, ldb, O + h * N + c, N, K);
        for (; h < heads; ++h) value_block<W, 1, PV>(P + h * lda, lda, V + c, ldb, O + h * N + c, N, K);
    };
    int64_t c = 0;
    for (; c + NV * W <= N; c += NV * W) panel(std::integral_constant<int, NV>{}, c);
    for (; c < N; c += W) panel(std::integral_constant<int, 1>{}, c);
}

// ---- Work items ---------------------------------------------------------------------------------------------------

struct Split {
    int64_t b, begin, end;
    int64_t slot;  // partial slot (b * capacity + s) in the workspace, or -1: the sequence's only split
};

struct Partials {
    float* o;    // [B * capacity * H, r_pad]
    float* lse;  // [B * capacity * H]
};

// Floats of one item's scratch: Q [H, D_pad], the tile [BLOCK_N, D_pad], S [H, BLOCK_N], O [H, r_pad], m [H], l [H].
int64_t scratch_floats(int64_t heads, int64_t dp, int64_t rp) {
    const int64_t hp = decode_padded(heads);
    return heads * dp + BLOCK_N * dp + heads * BLOCK_N + heads * rp + 2 * hp;
}

// This thread's scratch, 64-byte aligned; kept between calls so a decode step allocates nothing once warm.
float* thread_scratch(int64_t floats) {
    thread_local std::vector<float> buffer;
    if (buffer.size() < std::size_t(floats) + 16) buffer.resize(std::size_t(floats) + 16);
    const uintptr_t misalign = (reinterpret_cast<uintptr_t>(buffer.data()) / sizeof(float)) % 16;
    return buffer.data() + (16 - misalign) % 16;
}

// d elements -> fp32 out [dp], zero in [d, dp).
template <typename T, int W>
K2_ALWAYS_INLINE void widen_row(const T* in, int64_t d, float* out, int64_t dp) {
    int64_t i = 0;
    for (; i + W <= d; i += W) store<W>(out + i, load<W>(in + i));
    for (; i < d; ++i) out[i] = load_elem(in + i);
    for (; i < dp; ++i) out[i] = 0.0f;
}

template <typename T, int W>
K2_ALWAYS_INLINE void decode_split(const DecodeParams& p, const Split& it, const Partials& parts, float* scratch) {
    const int64_t H = p.heads, r = p.kv_lora_rank, D = r + p.rope_dim;
    const int64_t dp = decode_padded(D), rp = decode_padded(r), hp = decode_padded(H);
    const float scale = p.softmax_scale;
    float* q = scratch;              // [H, dp]
    float* tile = q + H * dp;        // [BLOCK_N, dp]
    float* s = tile + BLOCK_N * dp;  // [H, BLOCK_N]: logits, then P
    float* o_acc = s + H * BLOCK_N;  // [H, rp]
    float* m_row = o_acc + H * rp;   // [H] running max
    float* l_row = m_row + hp;       // [H] running sum

    // Load: the query of every head.
    for (int64_t h = 0; h < H; ++h)
        widen_row<T, W>(static_cast<const T*>(p.q) + it.b * p.q_batch_stride + h * p.q_head_stride, D, q + h * dp, dp);
    for (int64_t h = 0; h < H; ++h) m_row[h] = kNegInf, l_row[h] = 0.0f;
    std::memset(o_acc, 0, sizeof(float) * H * rp);

    const T* rows = static_cast<const T*>(p.cache) + it.b * p.cache_batch_stride;
    // NOTE: fp32 rows whose width needs no padding (and covers the padded value columns) are read in place; bf16
    // rows and other widths are widened into the tile first.
    const bool in_place = std::is_same_v<T, float> && dp == D && rp <= D;
    const Vec<W> lane = iota<W>();
    for (int64_t k0 = it.begin; k0 < it.end; k0 += BLOCK_N) {
        const int64_t n = std::min(BLOCK_N, it.end - k0);
        // Load: n cache rows, widened once for all heads (or read where they are).
        const float* keys = tile;
        int64_t ldk = dp;
        if constexpr (std::is_same_v<T, float>) {
            if (in_place) {
                keys = rows + k0 * p.cache_row_stride;
                ldk = p.cache_row_stride;
            }
        }
        if (keys == tile)
            for (int64_t j = 0; j < n; ++j) widen_row<T, W>(rows + (k0 + j) * p.cache_row_stride, D, tile + j * dp, dp);

        // Scores: S = Q K^T over all D (c_kv and k_rope).
        scores<W>(q, H, keys, ldk, n, dp, s, BLOCK_N);

        // Online softmax per head: scale, mask the columns past n, new max, P = exp(S - m), rescale O if m grew.
        for (int64_t h = 0; h < H; ++h) {
            float* row = s + h * BLOCK_N;
            Vec<W> mx = splat<W>(kNegInf);
            for (int64_t c = 0; c < BLOCK_N; c += W) {
                const Vec<W> x = select<W>(lane + float(c) < float(n), load<W>(row + c) * scale, splat<W>(kNegInf));
                store<W>(row + c, x);
                mx = vmax<W>(mx, x);
            }
            const float m_old = m_row[h], m_new = std::max(m_old, hmax<W>(mx));
            Vec<W> sum = Vec<W>{};
            for (int64_t c = 0; c < BLOCK_N; c += W) {
                const Vec<W> e = exp_vec<W>(load<W>(row + c) - m_new);
                store<W>(row + c, e);
                sum += e;
            }
            if (m_new > m_old && m_old != kNegInf) {
                const float alpha = std::exp(m_old - m_new);
                float* o_h = o_acc + h * rp;
                for (int64_t c = 0; c < rp; c += W) store<W>(o_h + c, load<W>(o_h + c) * alpha);
                l_row[h] *= alpha;
            }
            m_row[h] = m_new;
            l_row[h] += hsum(sum);
        }

        // Values: O += P C, C the rows' first r_pad columns (columns r.. are k_rope or padding: outputs discarded).
        values<W>(s, BLOCK_N, H, keys, ldk, n, o_acc, rp);
    }

    // Epilogue: normalise; the only split writes o and lse, others a partial.
    for (int64_t h = 0; h < H; ++h) {
        const float l = l_row[h], inv = l > 0.0f ? 1.0f / l : 0.0f;
        const float lse = l > 0.0f ? m_row[h] + std::log(l) : kNegInf;
        const float* acc = o_acc + h * rp;
        if (it.slot < 0) {
            T* out = static_cast<T*>(p.o) + it.b * p.o_batch_stride + h * p.o_head_stride;
            for (int64_t c = 0; c < r; ++c) store_elem(out + c, acc[c] * inv);
            p.lse[it.b * H + h] = lse;
        } else {
            float* out = parts.o + (it.slot * H + h) * rp;
            for (int64_t c = 0; c < rp; c += W) store<W>(out + c, load<W>(acc + c) * inv);
            parts.lse[it.slot * H + h] = lse;
        }
    }
}

// Merges sequence b's `splits` partials into o and lse.
template <typename T>
void combine(const DecodeParams& p, const Partials& parts, int64_t b, int64_t first_slot, int64_t splits) {
    const int64_t H = p.heads, r = p.kv_lora_rank, rp = decode_padded(r);
    std::vector<float> acc(static_cast<std::size_t>(r));
    for (int64_t h = 0; h < H; ++h) {
        float mx = kNegInf;
        for (int64_t s = 0; s < splits; ++s) mx = std::max(mx, parts.lse[(first_slot + s) * H + h]);
        float total = 0.0f;
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t s = 0; s < splits; ++s) {
            const float w = std::exp(parts.lse[(first_slot + s) * H + h] - mx);
            total += w;
            const float* o_s = parts.o + ((first_slot + s) * H + h) * rp;
            for (int64_t c = 0; c < r; ++c) acc[c] += w * o_s[c];
        }
        T* out = static_cast<T*>(p.o) + b * p.o_batch_stride + h * p.o_head_stride;
        for (int64_t c = 0; c < r; ++c) store_elem(out + c, acc[c] / total);
        p.lse[b * H + h] = mx + std::log(total);
    }
}

// ---- ISA variants and dispatch ------------------------------------------------------------------------------------

template <typename T>
using SplitFn = void (*)(const DecodeParams&, const Split&, const Partials&, float*);

template <typename T>
void split_baseline(const DecodeParams& p, const Split& it, const Partials& parts, float* scratch) {
    decode_split<T, 4>(p, it, parts, scratch);
}
#ifdef K2_ATTENTION_X86
template <typename T>
K2_TARGET_AVX2 void split_avx2(const DecodeParams& p, const Split& it, const Partials& parts, float* scratch) {
    decode_split<T, 8>(p, it, parts, scratch);
}
template <typename T>
K2_TARGET_AVX512 void split_avx512(const DecodeParams& p, const Split& it, const Partials& parts, float* scratch) {
    decode_split<T, 16>(p, it, parts, scratch);
}
#endif

template <typename T>
SplitFn<T> split_kernel() {
    switch (cpu_isa()) {
#ifdef K2_ATTENTION_X86
        case Isa::Avx512:
            return &split_avx512<T>;
        case Isa::Avx2:
            return &split_avx2<T>;
#endif
        default:
            return &split_baseline<T>;
    }
}

}  // namespace

void decode_cpu(const DecodeParams& p) {
    const char* op = "mla_decode";
    const int64_t B = p.batch, H = p.heads, r = p.kv_lora_rank;
    K2_CHECK_ARG(B >= 0 && H >= 1 && r >= 1 && p.rope_dim >= 0 && p.max_len >= 0, op, "q",
                 "expected B >= 0, H >= 1, kv_lora_rank >= 1, rope dim >= 0, T_max >= 0, got ", B, ", ", H, ", ", r,
                 ", ", p.rope_dim, ", ", p.max_len);
    int64_t total = 0;
    for (int64_t b = 0; b < B; ++b) {
        K2_CHECK_ARG(p.lengths[b] >= 0 && p.lengths[b] <= p.max_len, op, "lengths",
                     "expected 0 <= lengths[b] <= T_max = ", p.max_len, ", got lengths[", b, "] = ", p.lengths[b]);
        total += p.lengths[b];
    }
    if (B == 0) return;

    // Splits: about one per thread over the batch, each at least kDecodeMinSplitKeys keys, at most what the
    // workspace holds (the thread count may have grown since the size query).
    const int threads = num_threads();
    int64_t capacity = decode_max_splits_cpu(p.max_len, threads);
    while (capacity > 1 && decode_partial_plan(B, H, r, capacity).total > p.workspace.bytes) --capacity;
    const WorkspacePlan plan = decode_partial_plan(B, H, r, capacity);
    K2_CHECK_ARG(plan.total == 0 || reinterpret_cast<uintptr_t>(p.workspace.data) % alignof(float) == 0, op,
                 "workspace", "expected a ", alignof(float), "-byte aligned address");
    const Partials parts{plan.count ? plan.at<float>(p.workspace.data, 0) : nullptr,
                         plan.count ? plan.at<float>(p.workspace.data, 1) : nullptr};
    const int64_t per_split = std::max(kDecodeMinSplitKeys, (total + threads - 1) / threads);
    std::vector<Split> items;
    std::vector<std::pair<int64_t, int64_t>> merges;  // (b, splits) of sequences with several splits
    for (int64_t b = 0; b < B; ++b) {
        const int64_t len = p.lengths[b];
        const int64_t splits = std::clamp<int64_t>((len + per_split - 1) / per_split, 1, capacity);
        for (int64_t s = 0; s < splits; ++s)
            items.push_back({b, len * s / splits, len * (s + 1) / splits, splits == 1 ? -1 : b * capacity + s});
        if (splits > 1) merges.push_back({b, splits});
    }
    std::stable_sort(items.begin(), items.end(),
                     [](const Split& x, const Split& y) { return x.end - x.begin > y.end - y.begin; });

    const int64_t floats = scratch_floats(H, decode_padded(r + p.rope_dim), decode_padded(r));
    const int64_t grain = grain_for_work(int64_t(items.size()), total * H * (2 * r + p.rope_dim));
    auto run_all = [&](auto tag) {
        using T = decltype(tag);
        const SplitFn<T> run = split_kernel<T>();
        parallel_for(int64_t(items.size()), grain, [&](int64_t i0, int64_t i1) {
            float* scratch = thread_scratch(floats);
            for (int64_t i = i0; i < i1; ++i) run(p, items[i], parts, scratch);
        });
        parallel_for(int64_t(merges.size()), 1, [&](int64_t i0, int64_t i1) {
            for (int64_t i = i0; i < i1; ++i)
                combine<T>(p, parts, merges[i].first, merges[i].first * capacity, merges[i].second);
        });
    };
    switch (p.dtype) {
        case DType::Float32:
            return run_all(float{});
        case DType::BFloat16:
            return run_all(Bf16{});
        default:
            fail_argument(op, "q", "expected float32 or bfloat16, got ", dtype_name(p.dtype));
    }
}

}  // namespace k2::attention
