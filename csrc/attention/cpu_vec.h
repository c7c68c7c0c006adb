// Element, vector and ISA helpers shared by the attention family's CPU kernels (cpu.cpp: mla_attention, cpu_decode.cpp:
// mla_decode).
//
// Vectors are GCC vector extensions of W floats, so one kernel body serves every ISA: a .cpp instantiates its hot
// function with W = 16 inside a K2_TARGET_AVX512 function, W = 8 inside a K2_TARGET_AVX2 one and W = 4 without a
// target, and picks one at run time with cpu_isa(). NOTE: every helper here is K2_ALWAYS_INLINE and carries no target
// attribute of its own, so it is compiled into (and for the ISA of) the calling variant; never take its address or call
// it from a non-inlined function with a vector argument (the vector ABI differs between ISAs, hence -Wpsabi is off).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"  // vector types never cross a non-inlined call (all helpers are inlined)
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define K2_ATTENTION_X86 1
#define K2_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")))
#define K2_TARGET_AVX2 __attribute__((target("avx2,fma")))
#endif
#define K2_ALWAYS_INLINE inline __attribute__((always_inline))

namespace k2::attention::cpu_vec {

// ---- Elements -------------------------------------------------------------------------------------------------

struct Bf16 {
    uint16_t bits;
};

K2_ALWAYS_INLINE float load_elem(const float* p) {
    return *p;
}
K2_ALWAYS_INLINE float load_elem(const Bf16* p) {
    const uint32_t u = uint32_t(p->bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
K2_ALWAYS_INLINE void store_elem(float* p, float v) {
    *p = v;
}
K2_ALWAYS_INLINE void store_elem(Bf16* p, float f) {  // round to nearest even, as torch's cast
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        p->bits = uint16_t((u >> 16) | 0x40u);
        return;
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    p->bits = uint16_t(u >> 16);
}

// ---- Vectors of W floats ----------------------------------------------------------------------------------------

template <int W>
struct VecTypes {
    typedef float f __attribute__((vector_size(W * 4)));
    typedef int32_t i __attribute__((vector_size(W * 4)));
    typedef uint32_t u __attribute__((vector_size(W * 4)));
    typedef uint16_t h __attribute__((vector_size(W * 2)));
};
template <int W>
using Vec = typename VecTypes<W>::f;
template <int W>
using IVec = typename VecTypes<W>::i;

template <int W>
K2_ALWAYS_INLINE Vec<W> load(const float* p) {
    Vec<W> v;
    std::memcpy(&v, p, sizeof v);
    return v;
}
template <int W>
K2_ALWAYS_INLINE Vec<W> load(const Bf16* p) {  // W bf16 widened: the bits move to the top half of each fp32
    typename VecTypes<W>::h h;
    std::memcpy(&h, p, sizeof h);
    return (Vec<W>)(__builtin_convertvector(h, typename VecTypes<W>::u) << 16);
}
template <int W>
K2_ALWAYS_INLINE void store(float* p, const Vec<W>& v) {
    std::memcpy(p, &v, sizeof v);
}
template <int W>
K2_ALWAYS_INLINE Vec<W> splat(float x) {
    // NOTE: not `x - Vec<W>{}` or lane stores: GCC 12 builds those lane by lane with AVX-512 masked broadcasts.
    return Vec<W>{} + x;
}
template <int W>
K2_ALWAYS_INLINE Vec<W> select(const IVec<W>& mask, const Vec<W>& a, const Vec<W>& b) {  // mask lanes: all-ones or 0
    return (Vec<W>)((mask & (IVec<W>)a) | (~mask & (IVec<W>)b));
}
template <int W>
K2_ALWAYS_INLINE Vec<W> vmax(const Vec<W>& a, const Vec<W>& b) {
    return select<W>(a > b, a, b);
}
template <int W>
K2_ALWAYS_INLINE Vec<W> iota() {
    Vec<W> v;
    for (int i = 0; i < W; ++i) v[i] = float(i);
    return v;
}
template <int W>
K2_ALWAYS_INLINE float hmax(const Vec<W>& v) {
    float m = v[0];
    for (int i = 1; i < W; ++i) m = v[i] > m ? v[i] : m;
    return m;
}

// Sum of the lanes in lane order, from 0 (W dependent adds). NOTE: rounds differently from hsum below; mla_attention's
// forward keeps this order so its results stay as they are.
template <int W>
K2_ALWAYS_INLINE float hsum_serial(const Vec<W>& v) {
    float s = 0.0f;
    for (int i = 0; i < W; ++i) s += v[i];
    return s;
}

// Sum of the lanes by halving (log2 W shuffles and adds, not W lane extracts).
K2_ALWAYS_INLINE float hsum(const Vec<4>& v) {
    const Vec<4> t = v + __builtin_shufflevector(v, v, 2, 3, 0, 1);
    return (t + __builtin_shufflevector(t, t, 1, 0, 3, 2))[0];
}
K2_ALWAYS_INLINE float hsum(const Vec<8>& v) {
    return hsum(__builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7));
}
K2_ALWAYS_INLINE float hsum(const Vec<16>& v) {
    return hsum(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15));
}

// exp(x) = 2^n e^r with n = round(x / ln 2) and |r| <= ln 2 / 2; e^r from Cephes' expf polynomial (about 2 ulp). x
// below ln(2^-126) (also -inf) gives 0, so masked logits drop out exactly. NOTE: not for NaN inputs.
template <int W>
K2_ALWAYS_INLINE Vec<W> exp_vec(const Vec<W>& x_in) {
    const Vec<W> lo = splat<W>(-87.33654f), hi = splat<W>(88.37626f);
    const IVec<W> underflow = x_in < lo;
    Vec<W> x = vmax<W>(x_in, lo);
    x = select<W>(x > hi, hi, x);
    const Vec<W> magic = splat<W>(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
    const Vec<W> n = (x * 1.44269504088896341f + magic) - magic;
    Vec<W> r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    Vec<W> y = splat<W>(1.9875691500e-4f);
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * (r * r) + r + 1.0f;
    const IVec<W> bits = (__builtin_convertvector(n, IVec<W>) + 127) << 23;
    return select<W>(underflow, Vec<W>{}, y * (Vec<W>)bits);
}

// ---- ISA choice -------------------------------------------------------------------------------------------------

enum class Isa { Baseline, Avx2, Avx512 };

// The widest variant this CPU runs (cpuid, read once), capped by K2_ATTENTION_ISA=avx2|baseline (read every call, so
// tests can cover each variant in one process).
inline Isa cpu_isa() {
    static const Isa supported = [] {
#ifdef K2_ATTENTION_X86
        __builtin_cpu_init();
        if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
            __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw"))
            return Isa::Avx512;
        if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::Avx2;
#endif
        return Isa::Baseline;
    }();
    Isa cap = Isa::Avx512;
    if (const char* env = std::getenv("K2_ATTENTION_ISA")) {
        const std::string want = env;
        if (want == "baseline") cap = Isa::Baseline;
        if (want == "avx2") cap = Isa::Avx2;
    }
    return std::min(supported, cap);
}

}  // namespace k2::attention::cpu_vec
