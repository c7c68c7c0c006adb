// CPU kernels of the attention family: FlashAttention-2's tiled online softmax, forward and backward, on k2's thread
// pool. See attention.h for the contract.
//
// Forward: one work item per (head, document, block of kBlockM queries). The item packs its queries once (fp32,
// widened from bf16), then walks the key blocks its queries can see (up to the diagonal when causal), each packed as
// K^T [dqk, kBlockN] and V [kBlockN, dv]: S = Q K^T, scaled and masked, updates the running row max m, the row sum
// l and the fp32 output accumulator (rescaled by exp(m_old - m_new)), then O += P V. Nothing of size [S, T] is ever
// formed; per-thread scratch is a few tiles. Row maxima m are the max logits of their rows: written to a [H, T]
// workspace when max_logits are requested and reduced per head afterwards (no shared state between items).
//
// Backward: D = rowsum(dO * O) first; then one work item per (head, document, key split): for each key block it owns,
// it walks the query blocks that see it, recomputes S^T = K Q^T and P^T = exp(scale S^T - lse), and accumulates
// dV += P^T dO and dK += dS^T Q in tiles it owns (dS^T = P^T * (V dO^T - D)), so dK and dV need no synchronisation.
// dQ += dS K goes to an fp32 accumulator of which the item owns the rows of its (head, document): with H >= threads
// there is one accumulator; with fewer heads, each key split has its own and they are summed at the end.
//
// Every product is one small GEMM C (+)= A B with A broadcast by element and B read in vectors of W floats (GCC vector
// extensions from cpu_vec.h, so the same code serves every ISA); register blocks of MR rows x NV vectors. The hot
// functions are compiled three times (AVX-512, AVX2+FMA, baseline) and chosen at run time from the CPU (cpuid), which
// keeps the wheel portable; K2_ATTENTION_ISA=avx2|baseline caps the choice (the tests use it to cover each variant).
// exp is a vectorised Cephes-style polynomial (about 2 ulp), accumulation is fp32 throughout.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "attention/attention.h"
#include "attention/cpu_vec.h"
#include "common/check.h"
#include "common/thread_pool.h"

namespace k2::attention {

namespace {

using namespace cpu_vec;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int64_t BLOCK_M = kBlockM, BLOCK_N = kBlockN;

// ---- GEMM tiles -------------------------------------------------------------------------------------------------

// Register blocking: MR rows x NV vectors of accumulators (AVX-512 has 32 vector registers, AVX2 and SSE 16). MR
// divides the tile sizes, so only a document's last block has remainder rows.
template <int W>
struct Blocking {
    static constexpr int MR = 4;
    static constexpr int NV = W == 16 ? 4 : 2;
};

// A's element (row r, k): A[r * lda + k], or A[r + k * lda] when TRANS_A (A stored transposed).
template <bool TRANS_A>
K2_ALWAYS_INLINE float a_at(const float* A, int64_t lda, int r, int64_t k) {
    return TRANS_A ? A[r + k * lda] : A[r * lda + k];
}

// C[0:MR, 0:NV*W] (+)= A[0:MR, 0:K] B[0:K, 0:NV*W]; row strides in floats.
template <int W, int MR, int NV, bool TRANS_A>
K2_ALWAYS_INLINE void micro_kernel(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                                   int64_t K, bool accumulate) {
    Vec<W> acc[MR][NV];
    for (int r = 0; r < MR; ++r)
        for (int v = 0; v < NV; ++v) acc[r][v] = accumulate ? load<W>(C + r * ldc + v * W) : Vec<W>{};
    for (int64_t k = 0; k < K; ++k) {
        Vec<W> b[NV];
        for (int v = 0; v < NV; ++v) b[v] = load<W>(B + k * ldb + v * W);
        for (int r = 0; r < MR; ++r) {
            const Vec<W> a = splat<W>(a_at<TRANS_A>(A, lda, r, k));
            for (int v = 0; v < NV; ++v) acc[r][v] += a * b[v];
        }
    }
    for (int r = 0; r < MR; ++r)
        for (int v = 0; v < NV; ++v) store<W>(C + r * ldc + v * W, acc[r][v]);
}

template <int W, int NV, bool TRANS_A>
K2_ALWAYS_INLINE void gemm_panel(int64_t M, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                                 float* C, int64_t ldc, bool accumulate) {
    constexpr int MR = Blocking<W>::MR;
    const int64_t row_step = TRANS_A ? 1 : lda;
    int64_t i = 0;
    for (; i + MR <= M; i += MR)
        micro_kernel<W, MR, NV, TRANS_A>(A + i * row_step, lda, B, ldb, C + i * ldc, ldc, K, accumulate);
    for (; i < M; ++i) micro_kernel<W, 1, NV, TRANS_A>(A + i * row_step, lda, B, ldb, C + i * ldc, ldc, K, accumulate);
}

// C[M, N] (+)= A[M, K] B[K, N]. NOTE: N must be a multiple of W (packed rows are padded to 16 floats).
template <int W, bool TRANS_A = false>
K2_ALWAYS_INLINE void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                           float* C, int64_t ldc, bool accumulate) {
    constexpr int NV = Blocking<W>::NV;
    int64_t j = 0;
    for (; j + NV * W <= N; j += NV * W) gemm_panel<W, NV, TRANS_A>(M, K, A, lda, B + j, ldb, C + j, ldc, accumulate);
    for (; j < N; j += W) gemm_panel<W, 1, TRANS_A>(M, K, A, lda, B + j, ldb, C + j, ldc, accumulate);
}

// ---- Packing ----------------------------------------------------------------------------------------------------

// `rows` x d elements of head h from token `first` on -> dst [rows, ld] fp32, zero in columns [d, ld).
template <typename T>
void pack_rows(const HeadTensor& src, int64_t h, int64_t first, int64_t rows, int64_t d, float* dst, int64_t ld) {
    for (int64_t r = 0; r < rows; ++r) {
        const T* in = static_cast<const T*>(src.data) + (first + r) * src.row_stride + h * src.head_stride;
        float* out = dst + r * ld;
        for (int64_t i = 0; i < d; ++i) out[i] = load_elem(in + i);
        for (int64_t i = d; i < ld; ++i) out[i] = 0.0f;
    }
}

// The same elements transposed into a block: dst [d, cols] with dst[i, r] = row r's element i, zero for r >= rows.
template <typename T>
void pack_transposed(const HeadTensor& src, int64_t h, int64_t first, int64_t rows, int64_t d, float* dst,
                     int64_t cols) {
    const T* base = static_cast<const T*>(src.data) + first * src.row_stride + h * src.head_stride;
    for (int64_t i = 0; i < d; ++i) {
        float* out = dst + i * cols;
        for (int64_t r = 0; r < rows; ++r) out[r] = load_elem(base + r * src.row_stride + i);
        for (int64_t r = rows; r < cols; ++r) out[r] = 0.0f;
    }
}

// ---- Documents, work items, scratch -----------------------------------------------------------------------------

struct Doc {
    int64_t start, length, first_block;  // tokens [start, start + length); its blocks in the blocked packs
};

struct Item {
    int64_t head;
    Doc doc;
    int64_t index;  // query block (forward) or key split (backward)
};

// Documents from cu_seqlens (null: one of T tokens); throws unless 0 = c[0] <= ... <= c[N] = T.
std::vector<Doc> documents(const int32_t* cu, int64_t num_docs, int64_t tokens, const char* op) {
    std::vector<Doc> docs;
    int64_t block = 0;
    auto add = [&](int64_t start, int64_t length) {
        docs.push_back({start, length, block});
        block += (length + BLOCK_N - 1) / BLOCK_N;
    };
    if (!cu) {
        add(0, tokens);
        return docs;
    }
    K2_CHECK_ARG(cu[0] == 0, op, "cu_seqlens", "expected c[0] = 0, got ", cu[0]);
    for (int64_t i = 0; i < num_docs; ++i) {
        K2_CHECK_ARG(cu[i + 1] >= cu[i], op, "cu_seqlens", "expected non-decreasing offsets, got c[", i, "] = ", cu[i],
                     " > c[", i + 1, "] = ", cu[i + 1]);
        add(cu[i], cu[i + 1] - cu[i]);
    }
    K2_CHECK_ARG(cu[num_docs] == tokens, op, "cu_seqlens", "expected c[N] = T = ", tokens, ", got ", cu[num_docs]);
    return docs;
}

// One thread's tiles: a 64-byte aligned fp32 buffer (every tile is a multiple of 16 floats, so all stay aligned).
class Scratch {
  public:
    explicit Scratch(int64_t floats) : buffer_(std::size_t(floats) + 16) {}
    float* data() {
        const uintptr_t misalign = (reinterpret_cast<uintptr_t>(buffer_.data()) / sizeof(float)) % 16;
        return buffer_.data() + (16 - misalign) % 16;
    }

  private:
    std::vector<float> buffer_;
};

// ---- Forward ----------------------------------------------------------------------------------------------------

struct ForwardPacks {
    float* kt;       // [H, blocks, dqk_pad, BLOCK_N]
    float* v;        // [H, T, dv_pad]
    float* row_max;  // [H, T] or null
    int64_t blocks;
};

int64_t forward_scratch_floats(int64_t dqkp, int64_t dvp) {
    return BLOCK_M * dqkp + BLOCK_M * BLOCK_N + BLOCK_M * dvp + 2 * BLOCK_M;
}

template <typename T, int W>
K2_ALWAYS_INLINE void forward_block(const ForwardParams& p, const ForwardPacks& packs, const Item& it, float* scratch) {
    const int64_t dqk = p.head_dim_qk, dv = p.head_dim_v, dqkp = padded_head_dim(dqk), dvp = padded_head_dim(dv);
    const int64_t h = it.head, start = it.doc.start, len = it.doc.length;
    const int64_t q0 = it.index * BLOCK_M, m = std::min(BLOCK_M, len - q0);
    const float scale = p.softmax_scale;
    float* q_tile = scratch;                    // [m, dqkp]
    float* s_tile = q_tile + BLOCK_M * dqkp;    // [m, BLOCK_N]: logits, then P
    float* o_acc = s_tile + BLOCK_M * BLOCK_N;  // [m, dvp]
    float* m_row = o_acc + BLOCK_M * dvp;       // [m] running max
    float* l_row = m_row + BLOCK_M;             // [m] running sum

    // Load: the query block.
    pack_rows<T>(p.q, h, start + q0, m, dqk, q_tile, dqkp);
    for (int64_t r = 0; r < m; ++r) m_row[r] = kNegInf, l_row[r] = 0.0f;
    std::memset(o_acc, 0, sizeof(float) * m * dvp);

    const Vec<W> lane = iota<W>();
    const int64_t key_blocks = ((p.causal ? q0 + m : len) + BLOCK_N - 1) / BLOCK_N;
    for (int64_t kb = 0; kb < key_blocks; ++kb) {
        const int64_t k0 = kb * BLOCK_N, n = std::min(BLOCK_N, len - k0);
        const float* kt = packs.kt + ((h * packs.blocks + it.doc.first_block + kb) * dqkp) * BLOCK_N;
        const float* v = packs.v + (h * p.tokens + start + k0) * dvp;

        // Logits: S = Q K^T [m, BLOCK_N] (columns >= n are padding, masked below).
        gemm<W>(m, BLOCK_N, dqk, q_tile, dqkp, kt, BLOCK_N, s_tile, BLOCK_N, false);

        // Online softmax: scale, mask (padding keys; keys after the query when causal), new max, P = exp(S - m).
        const bool masked = n < BLOCK_N || (p.causal && k0 + BLOCK_N - 1 > q0);
        for (int64_t r = 0; r < m; ++r) {
            float* row = s_tile + r * BLOCK_N;
            const float visible = float(p.causal ? std::min(n, q0 + r - k0 + 1) : n);  // keys [0, visible)
            Vec<W> mx = splat<W>(kNegInf);
            for (int64_t c = 0; c < BLOCK_N; c += W) {
                Vec<W> x = load<W>(row + c) * scale;
                if (masked) x = select<W>(lane + float(c) < visible, x, splat<W>(kNegInf));
                store<W>(row + c, x);
                mx = vmax<W>(mx, x);
            }
            const float m_old = m_row[r], m_new = std::max(m_old, hmax<W>(mx));
            const float m_use = m_new == kNegInf ? 0.0f : m_new;
            const float alpha = std::exp(m_old - m_use);
            Vec<W> sum = Vec<W>{};
            for (int64_t c = 0; c < BLOCK_N; c += W) {
                const Vec<W> e = exp_vec<W>(load<W>(row + c) - m_use);
                store<W>(row + c, e);
                sum += e;
            }
            m_row[r] = m_new;
            l_row[r] = l_row[r] * alpha + hsum_serial<W>(sum);
            if (alpha != 1.0f) {
                float* o = o_acc + r * dvp;
                for (int64_t c = 0; c < dvp; c += W) store<W>(o + c, load<W>(o + c) * alpha);
            }
        }

        // O += P V [m, dvp] over the n real keys.
        gemm<W>(m, dvp, n, s_tile, BLOCK_N, v, dvp, o_acc, dvp, true);
    }

    // Epilogue: o = O / l, lse = m + log l, row maxima.
    for (int64_t r = 0; r < m; ++r) {
        const int64_t t = start + q0 + r;
        const float l = l_row[r], inv = l > 0.0f ? 1.0f / l : 0.0f;
        T* out = static_cast<T*>(p.o.data) + t * p.o.row_stride + h * p.o.head_stride;
        const float* acc = o_acc + r * dvp;
        for (int64_t i = 0; i < dv; ++i) store_elem(out + i, acc[i] * inv);
        p.lse[h * p.tokens + t] = l > 0.0f ? m_row[r] + std::log(l) : kNegInf;
        if (packs.row_max) packs.row_max[h * p.tokens + t] = m_row[r];
    }
}

// ---- Backward ---------------------------------------------------------------------------------------------------

struct BackwardPacks {
    float* d;    // [H, T]  rowsum(dO * O)
    float* q;    // [H, T, dqk_pad]
    float* qt;   // [H, blocks, dqk_pad, BLOCK_M]
    float* d_o;  // [H, T, dv_pad]
    float* dot;  // [H, blocks, dv_pad, BLOCK_M]
    float* dq;   // [splits, H, T, dqk_pad]
    int64_t blocks, splits;
};

int64_t backward_scratch_floats(int64_t dqkp, int64_t dvp) {
    return 2 * BLOCK_N * dqkp + 2 * BLOCK_N * dvp + 2 * BLOCK_N * BLOCK_M + 2 * BLOCK_M;
}

template <typename T, int W>
K2_ALWAYS_INLINE void backward_split(const BackwardParams& p, const BackwardPacks& packs, const Item& it,
                                     float* scratch) {
    const int64_t dqk = p.head_dim_qk, dv = p.head_dim_v, dqkp = padded_head_dim(dqk), dvp = padded_head_dim(dv);
    const int64_t h = it.head, start = it.doc.start, len = it.doc.length, tokens = p.tokens;
    const float scale = p.softmax_scale;
    float* k_tile = scratch;                         // [n, dqkp]
    float* v_tile = k_tile + BLOCK_N * dqkp;         // [n, dvp]
    float* dk_acc = v_tile + BLOCK_N * dvp;          // [n, dqkp]
    float* dv_acc = dk_acc + BLOCK_N * dqkp;         // [n, dvp]
    float* pt_tile = dv_acc + BLOCK_N * dvp;         // [n, BLOCK_M]  P^T
    float* dst_tile = pt_tile + BLOCK_N * BLOCK_M;   // [n, BLOCK_M]  dP^T, then dS^T
    float* lse_tile = dst_tile + BLOCK_N * BLOCK_M;  // [BLOCK_M]
    float* d_tile = lse_tile + BLOCK_M;              // [BLOCK_M]
    // This item's rows of its dq accumulator: head h, the document's tokens.
    float* dq_rows = packs.dq + ((it.index * p.heads + h) * tokens + start) * dqkp;

    const Vec<W> lane = iota<W>();
    const int64_t key_blocks = (len + BLOCK_N - 1) / BLOCK_N, query_blocks = (len + BLOCK_M - 1) / BLOCK_M;
    for (int64_t kb = it.index; kb < key_blocks; kb += packs.splits) {
        const int64_t k0 = kb * BLOCK_N, n = std::min(BLOCK_N, len - k0);
        pack_rows<T>(p.k, h, start + k0, n, dqk, k_tile, dqkp);
        pack_rows<T>(p.v, h, start + k0, n, dv, v_tile, dvp);
        std::memset(dk_acc, 0, sizeof(float) * n * dqkp);
        std::memset(dv_acc, 0, sizeof(float) * n * dvp);

        // NOTE: query and key blocks have the same size and both start at the document's start, so under the causal
        // mask the first query block that sees key block kb is block kb, and only that one needs masking.
        static_assert(BLOCK_M == BLOCK_N, "the causal block walk assumes square tiles");
        for (int64_t qb = p.causal ? kb : 0; qb < query_blocks; ++qb) {
            const int64_t q0 = qb * BLOCK_M, m = std::min(BLOCK_M, len - q0);
            const int64_t block = h * packs.blocks + it.doc.first_block + qb;
            const float* qt = packs.qt + block * dqkp * BLOCK_M;
            const float* dot = packs.dot + block * dvp * BLOCK_M;
            const float* q = packs.q + (h * tokens + start + q0) * dqkp;
            const float* d_o = packs.d_o + (h * tokens + start + q0) * dvp;
            // lse is +inf on padding columns, so P^T = 0 there.
            for (int64_t c = 0; c < BLOCK_M; ++c) {
                lse_tile[c] = c < m ? p.lse[h * tokens + start + q0 + c] : kInf;
                d_tile[c] = c < m ? packs.d[h * tokens + start + q0 + c] : 0.0f;
            }

            // Recompute: S^T = K Q^T [n, BLOCK_M], P^T = exp(scale S^T - lse), zero above the causal diagonal.
            gemm<W>(n, BLOCK_M, dqk, k_tile, dqkp, qt, BLOCK_M, pt_tile, BLOCK_M, false);
            const bool diagonal = p.causal && qb == kb;
            for (int64_t r = 0; r < n; ++r) {
                float* row = pt_tile + r * BLOCK_M;
                for (int64_t c = 0; c < BLOCK_M; c += W) {
                    Vec<W> x = load<W>(row + c) * scale - load<W>(lse_tile + c);
                    if (diagonal) x = select<W>(lane + float(c) >= float(r), x, splat<W>(kNegInf));
                    store<W>(row + c, exp_vec<W>(x));
                }
            }

            // dV += P^T dO; dP^T = V dO^T; dS^T = P^T * (dP^T - D).
            gemm<W>(n, dvp, m, pt_tile, BLOCK_M, d_o, dvp, dv_acc, dvp, true);
            gemm<W>(n, BLOCK_M, dv, v_tile, dvp, dot, BLOCK_M, dst_tile, BLOCK_M, false);
            for (int64_t r = 0; r < n; ++r) {
                float* row = dst_tile + r * BLOCK_M;
                const float* prow = pt_tile + r * BLOCK_M;
                for (int64_t c = 0; c < BLOCK_M; c += W)
                    store<W>(row + c, load<W>(prow + c) * (load<W>(row + c) - load<W>(d_tile + c)));
            }

            // dK += dS^T Q; dQ += dS K, reading dS^T transposed (rows: the block's m queries; k: its n keys).
            gemm<W>(n, dqkp, m, dst_tile, BLOCK_M, q, dqkp, dk_acc, dqkp, true);
            gemm<W, true>(m, dqkp, n, dst_tile, BLOCK_M, k_tile, dqkp, dq_rows + q0 * dqkp, dqkp, true);
        }

        // Epilogue: this key block's dK (times the softmax scale) and dV.
        for (int64_t r = 0; r < n; ++r) {
            const int64_t t = start + k0 + r;
            T* dk = static_cast<T*>(p.dk.data) + t * p.dk.row_stride + h * p.dk.head_stride;
            T* dvv = static_cast<T*>(p.dv.data) + t * p.dv.row_stride + h * p.dv.head_stride;
            for (int64_t i = 0; i < dqk; ++i) store_elem(dk + i, dk_acc[r * dqkp + i] * scale);
            for (int64_t i = 0; i < dv; ++i) store_elem(dvv + i, dv_acc[r * dvp + i]);
        }
    }
}

// ---- ISA variants and dispatch ----------------------------------------------------------------------------------

template <typename T>
struct Kernels {
    void (*forward)(const ForwardParams&, const ForwardPacks&, const Item&, float*);
    void (*backward)(const BackwardParams&, const BackwardPacks&, const Item&, float*);
};

template <typename T>
void forward_baseline(const ForwardParams& p, const ForwardPacks& packs, const Item& it, float* scratch) {
    forward_block<T, 4>(p, packs, it, scratch);
}
template <typename T>
void backward_baseline(const BackwardParams& p, const BackwardPacks& packs, const Item& it, float* scratch) {
    backward_split<T, 4>(p, packs, it, scratch);
}

#ifdef K2_ATTENTION_X86
template <typename T>
K2_TARGET_AVX2 void forward_avx2(const ForwardParams& p, const ForwardPacks& packs, const Item& it, float* scratch) {
    forward_block<T, 8>(p, packs, it, scratch);
}
template <typename T>
K2_TARGET_AVX2 void backward_avx2(const BackwardParams& p, const BackwardPacks& packs, const Item& it, float* scratch) {
    backward_split<T, 8>(p, packs, it, scratch);
}
template <typename T>
K2_TARGET_AVX512 void forward_avx512(const ForwardParams& p, const ForwardPacks& packs, const Item& it,
                                     float* scratch) {
    forward_block<T, 16>(p, packs, it, scratch);
}
template <typename T>
K2_TARGET_AVX512 void backward_avx512(const BackwardParams& p, const BackwardPacks& packs, const Item& it,
                                      float* scratch) {
    backward_split<T, 16>(p, packs, it, scratch);
}
#endif

template <typename T>
Kernels<T> kernels() {
    switch (cpu_isa()) {
#ifdef K2_ATTENTION_X86
        case Isa::Avx512:
            return {&forward_avx512<T>, &backward_avx512<T>};
        case Isa::Avx2:
            return {&forward_avx2<T>, &backward_avx2<T>};
#endif
        default:
            return {&forward_baseline<T>, &backward_baseline<T>};
    }
}

template <typename Fn>
void dispatch_dtype(DType dtype, const char* op, Fn&& fn) {
    switch (dtype) {
        case DType::Float32:
            return fn(float{});
        case DType::BFloat16:
            return fn(Bf16{});
        default:
            fail_argument(op, "q", "expected float32 or bfloat16, got ", dtype_name(dtype));
    }
}

void expect_workspace_bytes(const Workspace& ws, std::size_t need, const char* op, const char* query) {
    K2_CHECK_ARG(ws.bytes >= need, op, "workspace", "expected at least ", need, " bytes (k2._C.", query, "), got ",
                 ws.bytes);
    // NOTE: torch aligns CPU allocations to 64 bytes, not WorkspacePlan::kAlign; fp32 arrays need only 4.
    K2_CHECK_ARG(need == 0 || reinterpret_cast<uintptr_t>(ws.data) % alignof(float) == 0, op, "workspace",
                 "expected a ", alignof(float), "-byte aligned address");
}

// (head, document, block) for every block of every document: the unit of the packing passes.
std::vector<Item> block_items(int64_t heads, const std::vector<Doc>& docs) {
    std::vector<Item> items;
    for (int64_t h = 0; h < heads; ++h)
        for (const Doc& doc : docs)
            for (int64_t b = 0; b < (doc.length + BLOCK_N - 1) / BLOCK_N; ++b) items.push_back({h, doc, b});
    return items;
}

// Multiply-adds of one pass's attention products: visible (query, key) pairs x heads x (dqk + dv). Decides whether the
// pool is worth waking (grain_for_work).
int64_t attention_work(const std::vector<Doc>& docs, bool causal, int64_t heads, int64_t dqk, int64_t dv) {
    int64_t pairs = 0;
    for (const Doc& doc : docs) pairs += causal ? doc.length * (doc.length + 1) / 2 : doc.length * doc.length;
    return pairs * heads * (dqk + dv);
}

}  // namespace

void forward_cpu(const ForwardParams& p) {
    const char* op = "mla_attention";
    const std::vector<Doc> docs = documents(p.cu_seqlens, p.num_docs, p.tokens, op);
    const int64_t tokens = p.tokens, dqk = p.head_dim_qk, dv = p.head_dim_v;
    const int64_t dqkp = padded_head_dim(dqk), dvp = padded_head_dim(dv);
    const ForwardWorkspace plan = forward_workspace_cpu(tokens, p.heads, dqk, dv, p.num_docs, p.max_logits != nullptr);
    expect_workspace_bytes(p.workspace, plan.plan.total, op, "mla_attention_forward_workspace_size");
    const ForwardPacks packs{
        plan.plan.at<float>(p.workspace.data, plan.kt), plan.plan.at<float>(p.workspace.data, plan.v),
        p.max_logits ? plan.plan.at<float>(p.workspace.data, plan.row_max) : nullptr, max_blocks(tokens, p.num_docs)};
    const std::vector<Item> blocks = block_items(p.heads, docs);
    // Work: (head, document, query block), heaviest (last) blocks first so the dynamic chunks even out.
    std::vector<Item> items;
    for (int64_t h = 0; h < p.heads; ++h)
        for (const Doc& doc : docs)
            for (int64_t b = (doc.length + BLOCK_M - 1) / BLOCK_M - 1; b >= 0; --b) items.push_back({h, doc, b});
    const int64_t work = attention_work(docs, p.causal, p.heads, dqk, dv);

    dispatch_dtype(p.dtype, op, [&](auto tag) {
        using T = decltype(tag);
        // Pack: K^T per key block and V per token, fp32, once for all query blocks.
        parallel_for(int64_t(blocks.size()), grain_for_work(int64_t(blocks.size()), work), [&](int64_t i0, int64_t i1) {
            for (int64_t i = i0; i < i1; ++i) {
                const Item& b = blocks[i];
                const int64_t k0 = b.index * BLOCK_N, n = std::min(BLOCK_N, b.doc.length - k0);
                float* kt = packs.kt + ((b.head * packs.blocks + b.doc.first_block + b.index) * dqkp) * BLOCK_N;
                pack_transposed<T>(p.k, b.head, b.doc.start + k0, n, dqk, kt, BLOCK_N);
                pack_rows<T>(p.v, b.head, b.doc.start + k0, n, dv, packs.v + (b.head * tokens + b.doc.start + k0) * dvp,
                             dvp);
            }
        });
        const auto run = kernels<T>().forward;
        parallel_for(int64_t(items.size()), grain_for_work(int64_t(items.size()), work), [&](int64_t i0, int64_t i1) {
            Scratch scratch(forward_scratch_floats(dqkp, dvp));
            for (int64_t i = i0; i < i1; ++i) run(p, packs, items[i], scratch.data());
        });
    });
    if (p.max_logits) {
        for (int64_t h = 0; h < p.heads; ++h) {
            float best = kNegInf;
            const float* rows = packs.row_max + h * tokens;
            for (int64_t t = 0; t < tokens; ++t) best = std::max(best, rows[t]);
            p.max_logits[h] = best;
        }
    }
}

void backward_cpu(const BackwardParams& p) {
    const char* op = "mla_attention_backward";
    const std::vector<Doc> docs = documents(p.cu_seqlens, p.num_docs, p.tokens, op);
    const int64_t tokens = p.tokens, heads = p.heads, dqk = p.head_dim_qk, dv = p.head_dim_v;
    const int64_t dqkp = padded_head_dim(dqk), dvp = padded_head_dim(dv);
    // As many dq accumulators as fit the workspace, at most what the size query asks for now (the thread count may
    // have changed in between).
    const BackwardWorkspace plan = backward_workspace_cpu(tokens, heads, dqk, dv, p.num_docs, num_threads());
    const int64_t per_split = heads * tokens * dqkp * int64_t(sizeof(float));
    const int64_t room = int64_t(p.workspace.bytes) - int64_t(plan.plan.offset[plan.dq]);
    const int64_t splits = per_split == 0 ? 1 : std::min(plan.splits, room / per_split);
    expect_workspace_bytes(p.workspace, plan.plan.offset[plan.dq] + (splits >= 1 ? 0 : per_split), op,
                           "mla_attention_backward_workspace_size");
    if (tokens == 0) return;
    void* ws = p.workspace.data;
    const BackwardPacks packs{plan.plan.at<float>(ws, plan.d),   plan.plan.at<float>(ws, plan.q),
                              plan.plan.at<float>(ws, plan.qt),  plan.plan.at<float>(ws, plan.d_o),
                              plan.plan.at<float>(ws, plan.dot), plan.plan.at<float>(ws, plan.dq),
                              max_blocks(tokens, p.num_docs),    splits};
    const std::vector<Item> blocks = block_items(heads, docs);
    // Work: (head, document, key split); a split never has fewer than one key block.
    std::vector<Item> items;
    for (int64_t h = 0; h < heads; ++h)
        for (const Doc& doc : docs)
            for (int64_t s = 0; s < std::min(splits, (doc.length + BLOCK_N - 1) / BLOCK_N); ++s)
                items.push_back({h, doc, s});
    const int64_t work = 2 * attention_work(docs, p.causal, heads, dqk, dv);  // twice the forward's products

    dispatch_dtype(p.dtype, op, [&](auto tag) {
        using T = decltype(tag);
        // Pack: Q and dO per token and transposed per block, fp32; D = rowsum(dO * O); zero the dq accumulators.
        parallel_for(int64_t(blocks.size()), grain_for_work(int64_t(blocks.size()), work), [&](int64_t i0, int64_t i1) {
            for (int64_t i = i0; i < i1; ++i) {
                const Item& b = blocks[i];
                const int64_t h = b.head, q0 = b.index * BLOCK_M, m = std::min(BLOCK_M, b.doc.length - q0);
                const int64_t first = b.doc.start + q0, block = h * packs.blocks + b.doc.first_block + b.index;
                pack_rows<T>(p.q, h, first, m, dqk, packs.q + (h * tokens + first) * dqkp, dqkp);
                pack_transposed<T>(p.q, h, first, m, dqk, packs.qt + block * dqkp * BLOCK_M, BLOCK_M);
                pack_rows<T>(p.d_o, h, first, m, dv, packs.d_o + (h * tokens + first) * dvp, dvp);
                pack_transposed<T>(p.d_o, h, first, m, dv, packs.dot + block * dvp * BLOCK_M, BLOCK_M);
                for (int64_t r = 0; r < m; ++r) {
                    const T* o = static_cast<const T*>(p.o.data) + (first + r) * p.o.row_stride + h * p.o.head_stride;
                    const float* d_o = packs.d_o + (h * tokens + first + r) * dvp;
                    float acc = 0.0f;
                    for (int64_t c = 0; c < dv; ++c) acc += d_o[c] * load_elem(o + c);
                    packs.d[h * tokens + first + r] = acc;
                }
                for (int64_t s = 0; s < splits; ++s)
                    std::memset(packs.dq + ((s * heads + h) * tokens + first) * dqkp, 0, sizeof(float) * m * dqkp);
            }
        });

        // dK, dV (written per key block) and the dq accumulators.
        const auto run = kernels<T>().backward;
        parallel_for(int64_t(items.size()), grain_for_work(int64_t(items.size()), work), [&](int64_t i0, int64_t i1) {
            Scratch scratch(backward_scratch_floats(dqkp, dvp));
            for (int64_t i = i0; i < i1; ++i) run(p, packs, items[i], scratch.data());
        });

        // dq = scale * sum of the accumulators.
        parallel_for(tokens, std::max<int64_t>(16, grain_for_work(tokens, work)), [&](int64_t t0, int64_t t1) {
            for (int64_t t = t0; t < t1; ++t)
                for (int64_t h = 0; h < heads; ++h) {
                    T* dq = static_cast<T*>(p.dq.data) + t * p.dq.row_stride + h * p.dq.head_stride;
                    const float* acc = packs.dq + (h * tokens + t) * dqkp;
                    for (int64_t i = 0; i < dqk; ++i) {
                        float sum = acc[i];
                        for (int64_t s = 1; s < splits; ++s) sum += acc[s * heads * tokens * dqkp + i];
                        store_elem(dq + i, sum * p.softmax_scale);
                    }
                }
        });
    });
}

}  // namespace k2::attention
