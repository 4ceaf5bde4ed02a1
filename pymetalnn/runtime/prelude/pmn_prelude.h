// pmn_prelude.h -- Metal Shading Language types and built-ins for translated kernels.
//
// Design note
// -----------
// The front end (docs/internals.md) rewrites MSL names to `pmn_*` / `pmn::*` names and then
// includes this one header, for two targets:
//   PMN_CUDA  NVRTC, -std=c++17 -default-device -arch=compute_90. No system headers at all:
//             only NVRTC built-ins (expf, __shfl_sync, atomicAdd, ...) and inline PTX.
//   PMN_CPU   g++/clang++ -std=c++17 -O2. Standard headers plus the cpu runtime ABI
//             (pmn_cpu_abi.h): SIMD-group functions and barriers go through fibers.
//
// Principles:
// * Results that Metal defines exactly are bit-identical on both targets. half is IEEE binary16
//   stored in 16 bits; + - * / fma round once to nearest-even. cuda uses native f16 PTX
//   (add/sub/mul/fma.rn.f16, no contraction); cpu uses native half instructions where the host
//   has AVX512-FP16, else computes in float (double for fma) and rounds once -- exact, because
//   float has >= 2*11+2 significand bits (tests/dialect/test_types.py checks every half; the
//   conversions are branch-free so that they vectorize, or F16C). A NaN becomes the
//   canonical NaN (half 0x7fff, float 0x7fffffff from half) as the PTX cvt/f16 instructions do.
//   float min/max reproduce the GPU's NaN and signed-zero results on the cpu.
// * SIMD-group reductions and scans use one fixed combination order (documented at
//   "SIMD-group functions") that both targets follow, so float/half sums agree bit for bit.
//   cuda takes the active set from __activemask(), i.e. it relies on the warp having reconverged
//   after divergent code, as the compiler arranges for structured control flow.
// * Verified by tools/prelude_check.py (cpu values and reference semantics; NVRTC compile; with
//   --gpu a bitwise cpu-vs-GPU comparison of half and SIMD-group results).
// * Transcendental functions (exp, sin, ...) call each target's libm: they agree to a few ulp,
//   not bitwise. Plain pmn::f is the accurate ("precise") variant on both targets;
//   pmn::fast::f uses CUDA's approximate intrinsics on cuda and equals precise on cpu.
//   Functions built from + - * (mix, dot, smoothstep, ...) are plain C++ expressions, so they
//   follow the build's contraction policy (NVRTC contracts a*b+c into fma unless -fmad=false).
// * cuda may flush float subnormals (CuPy passes -ftz=true to NVRTC); the cpu keeps them. sign,
//   fabs/abs and the classification functions (isnan, isinf, isfinite, signbit) work on the bits
//   and agree across targets either way; half never meets an f32 subnormal (halves are >= 2^-24).
// * Everything is header-only, inline, and trivially copyable with trivial default constructors,
//   so the types work in __shared__ / __constant__ (cuda) and static thread_local (cpu) storage.
//   Constructors and half conversions are constexpr so `PMN_CONSTANT pmn_half k = pmn_half(1.0f);`
//   is a constant initializer on cuda.
//
// Known gaps (C++ limits, not bugs): `c ? h : 1.0f` (half vs float in ?:) is ambiguous because
// half converts both ways implicitly -- cast one side. Swizzles (v.xy, v.zyx) are not provided.
#ifndef PMN_PRELUDE_H
#define PMN_PRELUDE_H

#if defined(PMN_CUDA) == defined(PMN_CPU)
#error "pmn_prelude.h: define exactly one of PMN_CUDA and PMN_CPU"
#endif

#ifdef PMN_CPU
#include <cmath>
#include <cstdint>
#include <cstring>
#include "pmn_cpu_abi.h"
#ifdef __F16C__
#include <immintrin.h>
#endif
#define PMN_FN inline
#define PMN_MEMCPY std::memcpy
#define PMN_THREADGROUP static thread_local
#define PMN_CONSTANT static const
#else
#define PMN_FN __forceinline__
#define PMN_MEMCPY memcpy
#define PMN_THREADGROUP __shared__
#define PMN_CONSTANT __constant__ const
#endif

// ============================================================================================
// Scalar typedefs. Metal's long/ulong are 64-bit everywhere.
// ============================================================================================
typedef unsigned int pmn_uint;
typedef unsigned char pmn_uchar;
typedef unsigned short pmn_ushort;
typedef long long pmn_long;
typedef unsigned long long pmn_ulong;

namespace pmn {

// ============================================================================================
// Minimal type traits (NVRTC has no <type_traits>).
// ============================================================================================
struct half;
template <class T, int N> struct vec;

namespace detail {
template <bool B, class T = int> struct enable_if_ {};
template <class T> struct enable_if_<true, T> { typedef T type; };
template <bool B, class T = int> using enable_if_t = typename enable_if_<B, T>::type;
template <bool B, class A, class C> struct cond_ { typedef A type; };
template <class A, class C> struct cond_<false, A, C> { typedef C type; };
template <bool B, class A, class C> using cond_t = typename cond_<B, A, C>::type;
template <class A, class B> struct same_ { static constexpr bool value = false; };
template <class A> struct same_<A, A> { static constexpr bool value = true; };
template <class T> struct ident { typedef T type; };  // blocks template deduction

template <class T> struct is_int { static constexpr bool value = false; };
#define PMN_INT_TYPE(T) template <> struct is_int<T> { static constexpr bool value = true; };
PMN_INT_TYPE(bool) PMN_INT_TYPE(char) PMN_INT_TYPE(signed char) PMN_INT_TYPE(unsigned char)
PMN_INT_TYPE(short) PMN_INT_TYPE(unsigned short) PMN_INT_TYPE(int) PMN_INT_TYPE(unsigned int)
PMN_INT_TYPE(long) PMN_INT_TYPE(unsigned long) PMN_INT_TYPE(long long)
PMN_INT_TYPE(unsigned long long)
#undef PMN_INT_TYPE
template <class T> struct is_flt { static constexpr bool value = false; };
template <> struct is_flt<float> { static constexpr bool value = true; };
template <> struct is_flt<double> { static constexpr bool value = true; };
template <> struct is_flt<half> { static constexpr bool value = true; };
template <class T> struct is_scalar {
  static constexpr bool value = is_int<T>::value || is_flt<T>::value;
};
template <class T> struct is_vec { static constexpr bool value = false; };
template <class T, int N> struct is_vec<vec<T, N>> { static constexpr bool value = true; };
template <class T> struct is_signed_int {
  static constexpr bool value = is_int<T>::value && (T(-1) < T(0));
};

template <class T> using if_int = enable_if_t<is_int<T>::value>;
template <class T> using if_scalar = enable_if_t<is_scalar<T>::value>;

// Result type of a Metal built-in called with mixed argument types, following the usual
// arithmetic conversions with half ranked between the integers and float:
//   half op int -> half, half op float -> float, int op float -> float, vector op scalar -> vector.
// double (which Metal lacks) is treated as float.
template <class A, class B> struct promote_s {
  static constexpr int rank_a = same_<A, double>::value || same_<A, float>::value ? 2
                                : same_<A, half>::value ? 1 : 0;
  static constexpr int rank_b = same_<B, double>::value || same_<B, float>::value ? 2
                                : same_<B, half>::value ? 1 : 0;
  static constexpr int r = rank_a > rank_b ? rank_a : rank_b;
  typedef cond_t<same_<A, B>::value, cond_t<same_<A, double>::value, float, A>,
                 cond_t<r == 2, float, cond_t<r == 1, half, decltype(A() + B())>>> type;
};
template <class A, class B, class = void> struct promote {};
template <class A, class B>
struct promote<A, B, enable_if_t<is_scalar<A>::value && is_scalar<B>::value, void>> {
  typedef typename promote_s<A, B>::type type;
};
template <class T, int N, class B>
struct promote<vec<T, N>, B, enable_if_t<is_scalar<B>::value, void>> { typedef vec<T, N> type; };
template <class A, class T, int N>
struct promote<A, vec<T, N>, enable_if_t<is_scalar<A>::value, void>> { typedef vec<T, N> type; };
template <class T, class U, int N> struct promote<vec<T, N>, vec<U, N>, void> {
  typedef vec<typename promote_s<T, U>::type, N> type;
};
template <class A, class B> using promote_t = typename promote<A, B>::type;
template <class A, class B, class C> using promote3_t = promote_t<promote_t<A, B>, C>;

// Bit casts usable in constant expressions (both compilers support __builtin_bit_cast).
PMN_FN constexpr unsigned f2u(float f) { return __builtin_bit_cast(unsigned, f); }
PMN_FN constexpr float u2f(unsigned u) { return __builtin_bit_cast(float, u); }
PMN_FN constexpr unsigned long long d2u(double d) {
  return __builtin_bit_cast(unsigned long long, d);
}

// ============================================================================================
// float/double <-> binary16. cuda: PTX cvt at run time, and in software (integer arithmetic,
// exact) for constant evaluation (a __constant__ half needs a constant initializer). cpu: the
// branch-free forms below, at run time and in constant evaluation alike.
// ============================================================================================
constexpr unsigned short kHalfNaN = 0x7fff;  // canonical NaN of PTX f16 arithmetic

#ifdef PMN_CUDA
PMN_FN constexpr int bit_length(unsigned long long m) {
  int n = 0;  // only reached in constant evaluation
  for (; m; m >>= 1) ++n;
  return n;
}

// Rounds M * 2^E (M != 0, up to 63 bits) to half, nearest-even, with subnormals and overflow.
PMN_FN constexpr unsigned short half_round(unsigned sign, unsigned long long M, int E) {
  int bl = bit_length(M);
  int k = bl - 1 + E - 10;                          // exponent of the result's last bit
  if (k < -24) k = -24;                             // subnormal grid
  int s = k - E;
  unsigned long long q = 0;
  if (s <= 0) {
    q = M << (-s);
  } else if (s < 64) {
    q = M >> s;
    unsigned long long rem = M & ((1ull << s) - 1), hw = 1ull << (s - 1);
    if (rem > hw || (rem == hw && (q & 1))) ++q;
  }
  // q in [0, 2048]; q == 2048 carries into the exponent by itself.
  unsigned bits = (unsigned)(((k + 25) << 10) + (long long)q - 1024);
  if (bits >= 0x7c00u) bits = 0x7c00u;
  return (unsigned short)(sign | bits);
}

PMN_FN constexpr unsigned short f2h_soft(float f) {
  unsigned x = f2u(f);
  unsigned sign = (x >> 16) & 0x8000u;
  unsigned a = x & 0x7fffffffu;
  if (a > 0x7f800000u) return kHalfNaN;
  if (a >= 0x477ff000u) return (unsigned short)(sign | 0x7c00u);  // >= 65520 rounds to inf
  if (a >= 0x38800000u) {  // normal half range: rebias exponent, round 23 -> 10 bits
    unsigned r = a - 0x38000000u;
    r += 0xfffu + ((r >> 13) & 1u);
    return (unsigned short)(sign | (r >> 13));
  }
  if (a <= 0x33000000u) return (unsigned short)sign;  // <= 2^-25 rounds to (signed) zero
  unsigned e = a >> 23, m = (a & 0x7fffffu) | 0x800000u, s = 126 - e;  // s in [14, 24]
  unsigned q = m >> s, rem = m & ((1u << s) - 1), hw = 1u << (s - 1);
  if (rem > hw || (rem == hw && (q & 1))) ++q;
  return (unsigned short)(sign | q);
}

PMN_FN constexpr unsigned short d2h_soft(double d) {
  unsigned long long x = d2u(d);
  unsigned sign = (unsigned)(x >> 48) & 0x8000u;
  unsigned long long a = x & 0x7fffffffffffffffull;
  if (a > 0x7ff0000000000000ull) return kHalfNaN;
  if (a == 0) return (unsigned short)sign;
  int e = (int)(a >> 52);
  unsigned long long m = a & 0xfffffffffffffull;
  if (e == 0) return half_round(sign, m, -1074);
  if (e > 1023 + 16) return (unsigned short)(sign | 0x7c00u);  // also catches inf
  return half_round(sign, m | (1ull << 52), e - 1075);
}

PMN_FN constexpr float h2f_soft(unsigned short h) {
  unsigned sign = (unsigned)(h & 0x8000u) << 16;
  unsigned e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0x1f) return m ? u2f(0x7fffffffu) : u2f(sign | 0x7f800000u);  // NaN: canonical, as PTX
  if (e == 0) {
    if (m == 0) return u2f(sign);
    int p = 9;  // subnormal: value m * 2^-24, normalize
    while (!(m & (1u << p))) --p;
    return u2f(sign | ((unsigned)(p + 103) << 23) | ((m << (23 - p)) & 0x7fffffu));
  }
  return u2f(sign | ((e + 112) << 23) | (m << 13));
}

PMN_FN unsigned short f2h_hw(float f) {
  unsigned short r;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(f));
  return r;
}
PMN_FN unsigned short d2h_hw(double d) {
  unsigned short r;
  asm("cvt.rn.f16.f64 %0, %1;" : "=h"(r) : "d"(d));
  return r;
}
PMN_FN float h2f_hw(unsigned short h) {
  float r;
  asm("cvt.f32.f16 %0, %1;" : "=f"(r) : "h"(h));
  return r;
}
#else
// cpu: branch-free conversions (selects instead of branches, float arithmetic for the rounding),
// so a loop over them vectorizes: g++ 12 vectorizes neither the F16C intrinsics nor _Float16
// casts (a loop of those stays scalar, ~1-2 ns an element against ~0.3). half -> float is always
// the branch-free form (a few operations: gemm_blocked's fp16 GEMM at 256^3 took 0.75-1.6 ms with
// it, 14-21 ms with scalar F16C); float -> half takes F16C's single instruction where the host
// has it (f2h below: the element-wise kernels' stores do not vectorize, and there the
// branch-free form cost 2-3x, relu over 4x64x28x28 half 0.80-1.03 against 0.32-0.35 ms) and
// the branch-free form elsewhere. Both exact on every host: the float adds round to
// nearest-even as IEEE requires and the cpu keeps float subnormals (no FTZ/DAZ); F16C rounds to
// nearest-even with immediate 0 whatever MXCSR says. tests/dialect/test_types.py checks every
// half and every tie, bit for bit.
// float -> half: normal halves by rebiasing the exponent and rounding the 13 dropped bits to
// nearest-even in integer arithmetic; subnormal halves by adding 0.5, whose float ulp is the
// half subnormal step 2^-24, so the float adder does the rounding.
PMN_FN constexpr unsigned short f2h_bf(float f) {
  unsigned x = f2u(f);
  unsigned sign = (x >> 16) & 0x8000u, a = x & 0x7fffffffu;
  unsigned r = a - 0x38000000u;
  r += 0xfffu + ((r >> 13) & 1u);
  unsigned sub = f2u(u2f(a) + 0.5f) - 0x3f000000u;
  unsigned o = a < 0x38800000u ? sub : (r >> 13);
  o = a >= 0x477ff000u ? 0x7c00u : o;  // >= 65520 rounds to inf
  return (unsigned short)(a > 0x7f800000u ? unsigned(kHalfNaN) : (o | sign));
}
// half -> float: the exponent and mantissa bits shifted into place are the value times 2^-112
// (a subnormal half lands on a float subnormal), so one exact multiply rebiases both kinds.
PMN_FN constexpr float h2f_bf(unsigned short h) {
  unsigned em = h & 0x7fffu;
  unsigned o = f2u(u2f(em << 13) * 0x1p112f);
  o = em >= 0x7c00u ? (0x7f800000u | (em << 13)) : o;
  return u2f(em > 0x7c00u ? 0x7fffffffu : (o | ((unsigned)(h & 0x8000u) << 16)));
}
// double -> half in one rounding: to float towards odd (truncated, the last bit set if anything
// was dropped), then to half. Float keeps 13 bits more than half, so that sticky bit decides
// every half tie as the full double would (the round-to-odd theorem); a NaN stays a NaN.
PMN_FN constexpr unsigned short d2h_bf(double d) {
  float f = (float)d;
  unsigned u = f2u(f);
  bool away = __builtin_fabs((double)f) > __builtin_fabs(d);  // rounded away from zero
  u = (double)f != d ? ((u - (away ? 1u : 0u)) | 1u) : u;
  return f2h_bf(u2f(u));
}
#endif  // PMN_CUDA / PMN_CPU

PMN_FN constexpr unsigned short f2h(float f) {
#ifdef PMN_CPU
#ifdef __F16C__
  if (!__builtin_is_constant_evaluated()) {  // F16C keeps a NaN's payload; PTX's is canonical
    unsigned short r = (unsigned short)_cvtss_sh(f, 0);
    return (r & 0x7fffu) > 0x7c00u ? kHalfNaN : r;
  }
#endif
  return f2h_bf(f);
#else
  if (!__builtin_is_constant_evaluated()) return f2h_hw(f);
  return f2h_soft(f);
#endif
}
PMN_FN constexpr unsigned short d2h(double d) {
#ifdef PMN_CPU
  return d2h_bf(d);
#else
  if (!__builtin_is_constant_evaluated()) return d2h_hw(d);
  return d2h_soft(d);
#endif
}
PMN_FN constexpr float h2f(unsigned short h) {
#ifdef PMN_CPU
  return h2f_bf(h);
#else
  if (!__builtin_is_constant_evaluated()) return h2f_hw(h);
  return h2f_soft(h);
#endif
}
struct bits_tag {};
struct splat_tag {};
}  // namespace detail

// ============================================================================================
// half: IEEE binary16 storage. Converts implicitly from float/double/integers (rounding to
// nearest-even) and to float (exactly), as MSL does.
// ============================================================================================
struct half {
  unsigned short bits;
  half() = default;
  PMN_FN constexpr half(float f) : bits(detail::f2h(f)) {}
  PMN_FN constexpr half(double d) : bits(detail::d2h(d)) {}
  // int -> float is exact below 2^24 and anything larger overflows half anyway.
  template <class I, detail::if_int<I> = 0>
  PMN_FN constexpr half(I i) : bits(detail::f2h((float)i)) {}
  PMN_FN constexpr operator float() const { return detail::h2f(bits); }
  PMN_FN constexpr half(detail::bits_tag, unsigned short b) : bits(b) {}
  PMN_FN static constexpr half from_bits(unsigned short b) { return half(detail::bits_tag(), b); }
};

namespace detail {
// Correctly rounded half arithmetic. cpu: float (+ - * /) or double (fma) is wide enough that
// rounding the wide result to half equals rounding the exact result (no double-rounding error).
#ifdef PMN_CUDA
#define PMN_H_BIN(name, ins)                                                  \
  PMN_FN half name(half a, half b) {                                          \
    half r;                                                                   \
    asm(ins " %0, %1, %2;" : "=h"(r.bits) : "h"(a.bits), "h"(b.bits));       \
    return r;                                                                 \
  }
PMN_H_BIN(hadd, "add.rn.f16")
PMN_H_BIN(hsub, "sub.rn.f16")
PMN_H_BIN(hmul, "mul.rn.f16")
#undef PMN_H_BIN
PMN_FN half hfma(half a, half b, half c) {
  half r;
  asm("fma.rn.f16 %0, %1, %2, %3;" : "=h"(r.bits) : "h"(a.bits), "h"(b.bits), "h"(c.bits));
  return r;
}
#elif defined(__AVX512FP16__)
// x86 AVX512-FP16: native half + - * fma, single rounding to nearest-even as IEEE defines them
// (these instructions always keep subnormals, whatever MXCSR's DAZ/FTZ say), and vectorized by
// g++ in loops of them (a half-accumulating GEMM's row updates). A NaN result keeps an input's
// payload or is x86's negative default NaN: made the canonical NaN of the PTX instructions.
PMN_FN _Float16 hnat(half a) { return __builtin_bit_cast(_Float16, a.bits); }
PMN_FN half hcanon(_Float16 r) {
  unsigned short u = __builtin_bit_cast(unsigned short, r);
  return half::from_bits((u & 0x7fffu) > 0x7c00u ? kHalfNaN : u);
}
PMN_FN half hadd(half a, half b) { return hcanon(hnat(a) + hnat(b)); }
PMN_FN half hsub(half a, half b) { return hcanon(hnat(a) - hnat(b)); }
PMN_FN half hmul(half a, half b) { return hcanon(hnat(a) * hnat(b)); }
PMN_FN half hfma(half a, half b, half c) { return hcanon(__builtin_fmaf16(hnat(a), hnat(b), hnat(c))); }
#else
PMN_FN half hadd(half a, half b) { return half(float(a) + float(b)); }
PMN_FN half hsub(half a, half b) { return half(float(a) - float(b)); }
PMN_FN half hmul(half a, half b) { return half(float(a) * float(b)); }
// a*b is exact in double; a*b+c is then exact or, when not, cannot sit near a half rounding
// boundary (analysis: operands' bit spans only exceed 53 bits when |result| overflows half or
// one term is < 2^-31 of the other), so one rounding double -> half is correct.
PMN_FN half hfma(half a, half b, half c) {
  return half((double)float(a) * (double)float(b) + (double)float(c));
}
#endif
PMN_FN half hdiv(half a, half b) { return half(float(a) / float(b)); }
}  // namespace detail

// ---- half operators. Overloads for every operand kind so no call is ambiguous:
//      half op half -> half; half op float/double -> float; half op integer -> half.
#define PMN_H_ARITH(op, fn)                                                                 \
  PMN_FN half operator op(half a, half b) { return detail::fn(a, b); }                      \
  PMN_FN float operator op(half a, float b) { return float(a) op b; }                       \
  PMN_FN float operator op(float a, half b) { return a op float(b); }                       \
  PMN_FN float operator op(half a, double b) { return float(a) op(float) b; }               \
  PMN_FN float operator op(double a, half b) { return (float)a op float(b); }               \
  template <class I, detail::if_int<I> = 0>                                                 \
  PMN_FN half operator op(half a, I b) { return detail::fn(a, half(b)); }                   \
  template <class I, detail::if_int<I> = 0>                                                 \
  PMN_FN half operator op(I a, half b) { return detail::fn(half(a), b); }                   \
  PMN_FN half& operator op##=(half & a, half b) { return a = detail::fn(a, b); }            \
  PMN_FN half& operator op##=(half & a, float b) { return a = half(float(a) op b); }        \
  PMN_FN half& operator op##=(half & a, double b) { return a = half(float(a) op(float) b); } \
  template <class I, detail::if_int<I> = 0>                                                 \
  PMN_FN half& operator op##=(half & a, I b) { return a = detail::fn(a, half(b)); }
PMN_H_ARITH(+, hadd)
PMN_H_ARITH(-, hsub)
PMN_H_ARITH(*, hmul)
PMN_H_ARITH(/, hdiv)
#undef PMN_H_ARITH

// Comparisons are exact in float. An integer operand is first converted to half, as in Metal.
#define PMN_H_CMP(op)                                                                       \
  PMN_FN bool operator op(half a, half b) { return float(a) op float(b); }                  \
  PMN_FN bool operator op(half a, float b) { return float(a) op b; }                        \
  PMN_FN bool operator op(float a, half b) { return a op float(b); }                        \
  PMN_FN bool operator op(half a, double b) { return (double)float(a) op b; }               \
  PMN_FN bool operator op(double a, half b) { return a op(double) float(b); }               \
  template <class I, detail::if_int<I> = 0>                                                 \
  PMN_FN bool operator op(half a, I b) { return float(a) op float(half(b)); }               \
  template <class I, detail::if_int<I> = 0>                                                 \
  PMN_FN bool operator op(I a, half b) { return float(half(a)) op float(b); }
PMN_H_CMP(==)
PMN_H_CMP(!=)
PMN_H_CMP(<)
PMN_H_CMP(<=)
PMN_H_CMP(>)
PMN_H_CMP(>=)
#undef PMN_H_CMP

PMN_FN half operator-(half a) { return half::from_bits((unsigned short)(a.bits ^ 0x8000u)); }
PMN_FN half operator+(half a) { return a; }
PMN_FN half& operator++(half& a) { return a += half::from_bits(0x3c00); }
PMN_FN half& operator--(half& a) { return a -= half::from_bits(0x3c00); }
PMN_FN half operator++(half& a, int) { half t = a; ++a; return t; }
PMN_FN half operator--(half& a, int) { half t = a; --a; return t; }

}  // namespace pmn

typedef pmn::half pmn_half;

namespace pmn {

// ============================================================================================
// vec<T, N>: Metal vector layout -- sizeof == alignof == N*sizeof(T) for N = 2, 4 and
// 4*sizeof(T) for N = 3 (float3 is 16 bytes). The alignment lets cuda emit 64/128-bit accesses.
// Constructors: splat from a scalar (implicit, as MSL converts scalars to vectors), components
// with vectors flattened (float4(float2, z, w)), explicit conversion from vec<U, N>.
// ============================================================================================
namespace detail {
template <class A> struct ncomp { static constexpr int value = 1; };
template <class U, int M> struct ncomp<vec<U, M>> { static constexpr int value = M; };
template <class... A> PMN_FN constexpr int ncomp_sum() { return (0 + ... + ncomp<A>::value); }
template <class A> struct ctor_arg {
  static constexpr bool value = is_scalar<A>::value || is_vec<A>::value;
};
template <int N, class... A>
using if_ctor_args = enable_if_t<(sizeof...(A) >= 2) && ncomp_sum<A...>() == N &&
                                 (true && ... && ctor_arg<A>::value)>;

// Component i of the flattened argument list, converted to T.
template <class T, class A0, class... R>
PMN_FN constexpr T comp(int i, const A0& a0, const R&... r) {
  if constexpr (is_vec<A0>::value) {
    if (i < ncomp<A0>::value) return T(a0[i]);
  } else {
    if (i == 0) return T(a0);
  }
  if constexpr (sizeof...(R) > 0) {
    return comp<T>(i - ncomp<A0>::value, r...);
  } else {
    return T();
  }
}
}  // namespace detail

#define PMN_VEC_COMMON(N)                                                                   \
  typedef T value_type;                                                                     \
  static constexpr int size = N;                                                            \
  vec() = default;                                                                          \
  template <class U, detail::enable_if_t<!detail::same_<U, T>::value> = 0>                  \
  PMN_FN explicit constexpr vec(const vec<U, N>& v) : vec(v, 0) {}                          \
  PMN_FN vec& operator+=(const vec& b) { return *this = *this + b; }                        \
  PMN_FN vec& operator-=(const vec& b) { return *this = *this - b; }                        \
  PMN_FN vec& operator*=(const vec& b) { return *this = *this * b; }                        \
  PMN_FN vec& operator/=(const vec& b) { return *this = *this / b; }                        \
  PMN_FN vec& operator%=(const vec& b) { return *this = *this % b; }                        \
  PMN_FN vec& operator&=(const vec& b) { return *this = *this & b; }                        \
  PMN_FN vec& operator|=(const vec& b) { return *this = *this | b; }                        \
  PMN_FN vec& operator^=(const vec& b) { return *this = *this ^ b; }                        \
  PMN_FN vec& operator<<=(const vec& b) { return *this = *this << b; }                      \
  PMN_FN vec& operator>>=(const vec& b) { return *this = *this >> b; }

template <class T> struct alignas(2 * sizeof(T)) vec<T, 2> {
  T x, y;
  PMN_VEC_COMMON(2)
  template <class S, detail::if_scalar<S> = 0>
  PMN_FN constexpr vec(S s) : vec(detail::splat_tag(), T(s)) {}
  template <class... A, detail::if_ctor_args<2, A...> = 0>
  PMN_FN constexpr vec(const A&... a) : x(detail::comp<T>(0, a...)), y(detail::comp<T>(1, a...)) {}
  PMN_FN constexpr T& operator[](int i) { return i == 0 ? x : y; }
  PMN_FN constexpr const T& operator[](int i) const { return i == 0 ? x : y; }

 private:
  template <class U> PMN_FN constexpr vec(const vec<U, 2>& v, int) : x(T(v.x)), y(T(v.y)) {}
  PMN_FN constexpr vec(detail::splat_tag, T s) : x(s), y(s) {}
};

template <class T> struct alignas(4 * sizeof(T)) vec<T, 3> {
  T x, y, z;
  PMN_VEC_COMMON(3)
  template <class S, detail::if_scalar<S> = 0>
  PMN_FN constexpr vec(S s) : vec(detail::splat_tag(), T(s)) {}
  template <class... A, detail::if_ctor_args<3, A...> = 0>
  PMN_FN constexpr vec(const A&... a)
      : x(detail::comp<T>(0, a...)), y(detail::comp<T>(1, a...)), z(detail::comp<T>(2, a...)) {}
  PMN_FN constexpr T& operator[](int i) { return i == 0 ? x : i == 1 ? y : z; }
  PMN_FN constexpr const T& operator[](int i) const { return i == 0 ? x : i == 1 ? y : z; }

 private:
  template <class U>
  PMN_FN constexpr vec(const vec<U, 3>& v, int) : x(T(v.x)), y(T(v.y)), z(T(v.z)) {}
  PMN_FN constexpr vec(detail::splat_tag, T s) : x(s), y(s), z(s) {}
};

template <class T> struct alignas(4 * sizeof(T)) vec<T, 4> {
  T x, y, z, w;
  PMN_VEC_COMMON(4)
  template <class S, detail::if_scalar<S> = 0>
  PMN_FN constexpr vec(S s) : vec(detail::splat_tag(), T(s)) {}
  template <class... A, detail::if_ctor_args<4, A...> = 0>
  PMN_FN constexpr vec(const A&... a)
      : x(detail::comp<T>(0, a...)), y(detail::comp<T>(1, a...)), z(detail::comp<T>(2, a...)),
        w(detail::comp<T>(3, a...)) {}
  PMN_FN constexpr T& operator[](int i) { return i == 0 ? x : i == 1 ? y : i == 2 ? z : w; }
  PMN_FN constexpr const T& operator[](int i) const {
    return i == 0 ? x : i == 1 ? y : i == 2 ? z : w;
  }

 private:
  template <class U>
  PMN_FN constexpr vec(const vec<U, 4>& v, int)
      : x(T(v.x)), y(T(v.y)), z(T(v.z)), w(T(v.w)) {}
  PMN_FN constexpr vec(detail::splat_tag, T s) : x(s), y(s), z(s), w(s) {}
};
#undef PMN_VEC_COMMON

// Element-wise helpers, spelled out per N so both compilers see straight-line code.
namespace detail {
template <class R, class T, class F> PMN_FN vec<R, 2> vmap(const vec<T, 2>& a, F f) {
  vec<R, 2> r; r.x = R(f(a.x)); r.y = R(f(a.y)); return r;
}
template <class R, class T, class F> PMN_FN vec<R, 3> vmap(const vec<T, 3>& a, F f) {
  vec<R, 3> r; r.x = R(f(a.x)); r.y = R(f(a.y)); r.z = R(f(a.z)); return r;
}
template <class R, class T, class F> PMN_FN vec<R, 4> vmap(const vec<T, 4>& a, F f) {
  vec<R, 4> r; r.x = R(f(a.x)); r.y = R(f(a.y)); r.z = R(f(a.z)); r.w = R(f(a.w)); return r;
}
template <class R, class T, class U, class F>
PMN_FN vec<R, 2> vzip(const vec<T, 2>& a, const vec<U, 2>& b, F f) {
  vec<R, 2> r; r.x = R(f(a.x, b.x)); r.y = R(f(a.y, b.y)); return r;
}
template <class R, class T, class U, class F>
PMN_FN vec<R, 3> vzip(const vec<T, 3>& a, const vec<U, 3>& b, F f) {
  vec<R, 3> r; r.x = R(f(a.x, b.x)); r.y = R(f(a.y, b.y)); r.z = R(f(a.z, b.z)); return r;
}
template <class R, class T, class U, class F>
PMN_FN vec<R, 4> vzip(const vec<T, 4>& a, const vec<U, 4>& b, F f) {
  vec<R, 4> r;
  r.x = R(f(a.x, b.x)); r.y = R(f(a.y, b.y)); r.z = R(f(a.z, b.z)); r.w = R(f(a.w, b.w));
  return r;
}
template <class R, class T, class U, class V, class F>
PMN_FN vec<R, 2> vzip3(const vec<T, 2>& a, const vec<U, 2>& b, const vec<V, 2>& c, F f) {
  vec<R, 2> r; r.x = R(f(a.x, b.x, c.x)); r.y = R(f(a.y, b.y, c.y)); return r;
}
template <class R, class T, class U, class V, class F>
PMN_FN vec<R, 3> vzip3(const vec<T, 3>& a, const vec<U, 3>& b, const vec<V, 3>& c, F f) {
  vec<R, 3> r;
  r.x = R(f(a.x, b.x, c.x)); r.y = R(f(a.y, b.y, c.y)); r.z = R(f(a.z, b.z, c.z));
  return r;
}
template <class R, class T, class U, class V, class F>
PMN_FN vec<R, 4> vzip3(const vec<T, 4>& a, const vec<U, 4>& b, const vec<V, 4>& c, F f) {
  vec<R, 4> r;
  r.x = R(f(a.x, b.x, c.x)); r.y = R(f(a.y, b.y, c.y)); r.z = R(f(a.z, b.z, c.z));
  r.w = R(f(a.w, b.w, c.w));
  return r;
}
}  // namespace detail

// ---- vector operators: vec op vec, vec op scalar, scalar op vec (the scalar converts to T); the
// result's elements are R: T for arithmetic and bitwise operators, bool for comparisons.
#define PMN_V_OP(op, R)                                                                      \
  template <class T, int N>                                                                  \
  PMN_FN vec<R, N> operator op(const vec<T, N>& a, const vec<T, N>& b) {                     \
    return detail::vzip<R>(a, b, [](const T& p, const T& q) { return p op q; });             \
  }                                                                                          \
  template <class T, int N>                                                                  \
  PMN_FN vec<R, N> operator op(const vec<T, N>& a, const typename detail::ident<T>::type& b) { \
    return a op vec<T, N>(b);                                                                \
  }                                                                                          \
  template <class T, int N>                                                                  \
  PMN_FN vec<R, N> operator op(const typename detail::ident<T>::type& a, const vec<T, N>& b) { \
    return vec<T, N>(a) op b;                                                                \
  }
#define PMN_V_BIN(op) PMN_V_OP(op, T)
#define PMN_V_CMP(op) PMN_V_OP(op, bool)
PMN_V_BIN(+) PMN_V_BIN(-) PMN_V_BIN(*) PMN_V_BIN(/) PMN_V_BIN(%)
PMN_V_BIN(&) PMN_V_BIN(|) PMN_V_BIN(^) PMN_V_BIN(<<) PMN_V_BIN(>>)
PMN_V_CMP(==) PMN_V_CMP(!=) PMN_V_CMP(<) PMN_V_CMP(<=) PMN_V_CMP(>) PMN_V_CMP(>=)
PMN_V_CMP(&&) PMN_V_CMP(||)
#undef PMN_V_BIN
#undef PMN_V_CMP
#undef PMN_V_OP

template <class T, int N> PMN_FN vec<T, N> operator-(const vec<T, N>& a) {
  return detail::vmap<T>(a, [](const T& p) { return -p; });
}
template <class T, int N> PMN_FN vec<T, N> operator+(const vec<T, N>& a) { return a; }
template <class T, int N> PMN_FN vec<T, N> operator~(const vec<T, N>& a) {
  return detail::vmap<T>(a, [](const T& p) { return ~p; });
}
template <class T, int N> PMN_FN vec<bool, N> operator!(const vec<T, N>& a) {
  return detail::vmap<bool>(a, [](const T& p) { return !p; });
}
template <class T, int N> PMN_FN vec<T, N>& operator++(vec<T, N>& a) { return a += T(1); }
template <class T, int N> PMN_FN vec<T, N>& operator--(vec<T, N>& a) { return a -= T(1); }
template <class T, int N> PMN_FN vec<T, N> operator++(vec<T, N>& a, int) {
  vec<T, N> t = a; a += T(1); return t;
}
template <class T, int N> PMN_FN vec<T, N> operator--(vec<T, N>& a, int) {
  vec<T, N> t = a; a -= T(1); return t;
}

#ifdef PMN_CUDA
// half2 / half4 arithmetic on cuda: packed f16x2 instructions (same per-lane rounding as f16).
// Non-template overloads, so they win over the element-wise templates above.
namespace detail {
struct h4w { unsigned lo, hi; };
}
#define PMN_H2_BIN(op, ins)                                                                   \
  PMN_FN vec<half, 2> operator op(const vec<half, 2>& a, const vec<half, 2>& b) {            \
    unsigned r;                                                                               \
    asm(ins " %0, %1, %2;"                                                                    \
        : "=r"(r)                                                                             \
        : "r"(__builtin_bit_cast(unsigned, a)), "r"(__builtin_bit_cast(unsigned, b)));        \
    return __builtin_bit_cast(vec<half, 2>, r);                                               \
  }                                                                                           \
  PMN_FN vec<half, 4> operator op(const vec<half, 4>& a, const vec<half, 4>& b) {            \
    detail::h4w x = __builtin_bit_cast(detail::h4w, a), y = __builtin_bit_cast(detail::h4w, b), r; \
    asm(ins " %0, %1, %2;" : "=r"(r.lo) : "r"(x.lo), "r"(y.lo));                              \
    asm(ins " %0, %1, %2;" : "=r"(r.hi) : "r"(x.hi), "r"(y.hi));                              \
    return __builtin_bit_cast(vec<half, 4>, r);                                               \
  }
PMN_H2_BIN(+, "add.rn.f16x2")
PMN_H2_BIN(-, "sub.rn.f16x2")
PMN_H2_BIN(*, "mul.rn.f16x2")
#undef PMN_H2_BIN
#endif

}  // namespace pmn

#define PMN_VEC_TYPEDEFS(T, name)                          \
  typedef pmn::vec<T, 2> pmn_##name##2;                    \
  typedef pmn::vec<T, 3> pmn_##name##3;                    \
  typedef pmn::vec<T, 4> pmn_##name##4;
PMN_VEC_TYPEDEFS(bool, bool)
PMN_VEC_TYPEDEFS(signed char, char)  // Metal's char is signed on every target
PMN_VEC_TYPEDEFS(unsigned char, uchar)
PMN_VEC_TYPEDEFS(short, short)
PMN_VEC_TYPEDEFS(unsigned short, ushort)
PMN_VEC_TYPEDEFS(int, int)
PMN_VEC_TYPEDEFS(unsigned int, uint)
PMN_VEC_TYPEDEFS(pmn::half, half)
PMN_VEC_TYPEDEFS(float, float)
PMN_VEC_TYPEDEFS(pmn_long, long)
PMN_VEC_TYPEDEFS(pmn_ulong, ulong)
#undef PMN_VEC_TYPEDEFS

static_assert(sizeof(pmn_half) == 2 && alignof(pmn_half) == 2, "half layout");
static_assert(sizeof(pmn_float2) == 8 && alignof(pmn_float2) == 8, "float2 layout");
static_assert(sizeof(pmn_float3) == 16 && alignof(pmn_float3) == 16, "float3 layout");
static_assert(sizeof(pmn_float4) == 16 && alignof(pmn_float4) == 16, "float4 layout");
static_assert(sizeof(pmn_half3) == 8 && sizeof(pmn_half4) == 8, "half3/4 layout");
static_assert(sizeof(pmn_char3) == 4 && sizeof(pmn_bool4) == 4, "char3/bool4 layout");

namespace pmn {

// ============================================================================================
// Math. Scalar float and half overloads plus element-wise vector templates. half functions are
// computed in float and rounded once. Functions that accept mixed argument types (min, clamp,
// mix, ...) convert every argument to the promoted type first (see detail::promote).
// ============================================================================================
namespace detail {
#ifdef PMN_CUDA
#define PMN_LIBM(fn) ::fn##f
#else
#define PMN_LIBM(fn) std::fn
#endif
PMN_FN constexpr bool isnan_f(float x) { return (f2u(x) & 0x7fffffffu) > 0x7f800000u; }
PMN_FN constexpr bool isinf_f(float x) { return (f2u(x) & 0x7fffffffu) == 0x7f800000u; }

#ifndef PMN_CUDA
// exp, log and tanh of float for the cpu, branch-free and evaluated in double: glibc's expf,
// logf and tanhf are opaque calls, so a loop over them stays scalar, while these inline into
// the kernels' element loops and vectorize (the cpu's softmax, sigmoid, tanh, LSTM and loss
// kernels spend most of their time here). Each result is a double with a relative error below
// 1e-12 rounded once to float: within 0.5 ulp + 1e-4 ulp of the exact value, as accurate as
// glibc's (tests/dialect/test_math.py checks every float range and the special values).
PMN_FN double pow2i_(double k) {  // 2^k, k integral in [-1022, 1023]: k lands in the low bits
  const unsigned long long b = __builtin_bit_cast(unsigned long long, k + 0x1.8p52);
  return __builtin_bit_cast(double, (b + 1023ull) << 52);
}
// a b + c: fused where the hardware has it (one rounding fewer, half the latency), else two
// operations; either is far inside the double margin these functions keep
PMN_FN double fma_d_(double a, double b, double c) {
#if defined(__FMA__) || defined(__aarch64__)
  return __builtin_fma(a, b, c);
#else
  return a * b + c;
#endif
}
// e^y - 1 = s q + (s - 1) with s = 2^k, k = round(y / ln 2), q = e^r - 1, r = y - k ln 2 in
// [-0.35, 0.35]. q = r P(r), P a degree-6 fit of (e^r - 1) / r on that interval (Chebyshev
// nodes; relative error < 3e-10), evaluated in Estrin's order (a short dependency chain for
// the scalar case); q keeps its sign and relative accuracy near 0, so s q + (s - 1) is an
// accurate expm1 where k = 0.
PMN_FN double expm1_parts_(double y, double& s) {
  const double k = __builtin_rint(y * 1.4426950408889634);
  const double r = y - k * 0.6931471805599453;
  const double r2 = r * r;
  const double p01 = fma_d_(0.50000000471573, r, 0.9999999999955039);
  const double p23 = fma_d_(0.04166635273369443, r, 0.16666666786398743);
  const double p45 = fma_d_(0.001394112138739507, r, 0.008333283514712015);
  const double p46 = fma_d_(0.00019907584839315458, r2, p45);
  s = pow2i_(k);
  return r * fma_d_(fma_d_(p46, r2, p23), r2, p01);
}
// The clamps below are a row of flat selects: written as nested ?: they left, after g++'s
// partial redundancy elimination, control flow in the element loop of a kernel's thread loop,
// which its vectorizer refuses (tanh over a 4-float chunk stayed scalar; same results either way).
// exp: inputs clamped to [-104, 89] (beyond, the float result is 0 or inf already)
PMN_FN float exp_f(float x) {
  const bool nan = x != x;
  double y = double(x);
  y = y < -104.0 ? -104.0 : y;
  y = y > 89.0 ? 89.0 : y;
  y = nan ? 0.0 : y;
  double s;
  const double q = expm1_parts_(y, s);
  const float e = float(s * q + s);
  return nan ? x : e;
}
// tanh = (e^2x - 1) / (e^2x + 1), from expm1 so small |x| keeps its relative accuracy; |x| >= 20
// rounds to +-1; odd, so the sign (and -0) is x's
PMN_FN float tanh_f(float x) {
  const bool nan = x != x;
  double y = 2.0 * double(x);  // exact
  y = y < -40.0 ? -40.0 : y;
  y = y > 40.0 ? 40.0 : y;
  y = nan ? 0.0 : y;
  double s;
  const double q = expm1_parts_(y, s);
  const double em1 = s * q + (s - 1.0);
  const float t = float(__builtin_copysign(em1 / (em1 + 2.0), double(x)));
  return nan ? x : t;
}
// log: x = m 2^e with m in [sqrt(1/2), sqrt(2)) (from the double's bits: subnormal floats are
// normal doubles), log m = 2 atanh(t), t = (m - 1) / (m + 1), |t| < 0.172
PMN_FN float log_f(float x) {
  const double d = x > 0.0f ? double(x) : 1.0;
  const unsigned long long b = __builtin_bit_cast(unsigned long long, d);
  const unsigned long long mb = (b & 0x000fffffffffffffull) | 0x3ff0000000000000ull;
  const bool hi = mb > 0x3ff6a09e667f3bcdull;  // m > sqrt(2): use m / 2, e + 1
  const double m = __builtin_bit_cast(double, mb) * (hi ? 0.5 : 1.0);
  // the biased exponent as a double, exactly, by the same low-bits trick as pow2i_
  const double e = __builtin_bit_cast(double, (b >> 52) | 0x4330000000000000ull) -
                   (0x1.0p52 + 1023.0) + (hi ? 1.0 : 0.0);
  // 2 atanh(t) / t as a degree-4 polynomial in z = t^2 (Chebyshev fit, relative error < 5e-12)
  const double t = (m - 1.0) / (m + 1.0), z = t * t, z2 = z * z;
  const double p = fma_d_(fma_d_(0.11808780676139193, z2,
                                 fma_d_(0.14267491217394992, z, 0.20000192947069045)), z2,
                          fma_d_(0.3333333262026784, z, 1.0000000000042106));
  float r = float(e * 0.6931471805599453 + 2.0 * t * p);
  r = x == __builtin_inff() ? x : r;
  r = x == 0.0f ? -__builtin_inff() : r;
  return x < 0.0f || x != x ? __builtin_nanf("") : r;
}
#endif

// min/max with Metal's NaN rule (a NaN argument yields the other one). cuda uses the hardware
// min/max; the cpu version reproduces its signed-zero and NaN results bit for bit
// (max(-0, +0) = +0, min(-0, +0) = -0, both NaN -> canonical NaN).
#ifdef PMN_CUDA
PMN_FN float fmax_(float a, float b) { return ::fmaxf(a, b); }
PMN_FN float fmin_(float a, float b) { return ::fminf(a, b); }
#else
PMN_FN float fmax_(float a, float b) {
  if (isnan_f(a)) return isnan_f(b) ? u2f(0x7fffffffu) : b;
  if (isnan_f(b)) return a;
  if (a == b) return u2f(f2u(a) & f2u(b));  // +0 wins over -0
  return a < b ? b : a;
}
PMN_FN float fmin_(float a, float b) {
  if (isnan_f(a)) return isnan_f(b) ? u2f(0x7fffffffu) : b;
  if (isnan_f(b)) return a;
  if (a == b) return u2f(f2u(a) | f2u(b));  // -0 wins over +0
  return b < a ? b : a;
}
#endif
}  // namespace detail

// ---- unary floating-point functions: float, half (via float), vec (element-wise).
#define PMN_UNARY_F(ns, name, expr)                                                         \
  PMN_FN float name(float x) { return expr; }                                               \
  PMN_FN half name(half x) { return half(ns::name(float(x))); }                             \
  template <class T, int N> PMN_FN vec<T, N> name(const vec<T, N>& v) {                     \
    return ::pmn::detail::vmap<T>(v, [](const T& e) { return ns::name(e); });               \
  }

// exp, log, tanh: the cpu's own vectorizable versions (detail::exp_f, ...), libm on cuda
#ifdef PMN_CUDA
#define PMN_OWN_F(fn) PMN_LIBM(fn)
#else
#define PMN_OWN_F(fn) detail::fn##_f
#endif
PMN_UNARY_F(::pmn, exp, PMN_OWN_F(exp)(x))
PMN_UNARY_F(::pmn, log, PMN_OWN_F(log)(x))
PMN_UNARY_F(::pmn, tanh, PMN_OWN_F(tanh)(x))
#undef PMN_OWN_F
PMN_UNARY_F(::pmn, exp2, PMN_LIBM(exp2)(x))
#ifdef PMN_CUDA
PMN_UNARY_F(::pmn, exp10, ::exp10f(x))
PMN_UNARY_F(::pmn, rsqrt, ::rsqrtf(x))
#else
PMN_UNARY_F(::pmn, exp10, std::pow(10.0f, x))
PMN_UNARY_F(::pmn, rsqrt, 1.0f / std::sqrt(x))
#endif
// the rest: each target's C library (round: halfway cases away from zero; rint: to even)
#define PMN_LIBM_UNARY(fn) PMN_UNARY_F(::pmn, fn, PMN_LIBM(fn)(x))
PMN_LIBM_UNARY(log2) PMN_LIBM_UNARY(log10) PMN_LIBM_UNARY(sqrt) PMN_LIBM_UNARY(sinh)
PMN_LIBM_UNARY(cosh) PMN_LIBM_UNARY(sin) PMN_LIBM_UNARY(cos) PMN_LIBM_UNARY(tan)
PMN_LIBM_UNARY(asin) PMN_LIBM_UNARY(acos) PMN_LIBM_UNARY(atan) PMN_LIBM_UNARY(floor)
PMN_LIBM_UNARY(ceil) PMN_LIBM_UNARY(round) PMN_LIBM_UNARY(rint) PMN_LIBM_UNARY(trunc)
#undef PMN_LIBM_UNARY
PMN_FN float fabs(float x) { return detail::u2f(detail::f2u(x) & 0x7fffffffu); }
PMN_FN half fabs(half x) { return half::from_bits((unsigned short)(x.bits & 0x7fffu)); }
template <class T, int N> PMN_FN vec<T, N> fabs(const vec<T, N>& v) {
  return detail::vmap<T>(v, [](const T& e) { return ::pmn::fabs(e); });
}
// fract: x - floor(x) kept below 1 (a tiny negative x would otherwise give 1.0);
// fract(+-inf) = +-0 and fract(NaN) = NaN as in OpenCL.
PMN_UNARY_F(::pmn, fract,
            detail::isnan_f(x)   ? x
            : detail::isinf_f(x) ? detail::u2f(detail::f2u(x) & 0x80000000u)
                                 : detail::fmin_(x - ::pmn::floor(x), 0x1.fffffep-1f))
// sign: 1 for x > 0, -1 for x < 0, x itself for +-0, +0 for NaN. Decided on the bits, so a
// subnormal x gives +-1 even where the target flushes subnormals in comparisons (cuda -ftz).
PMN_UNARY_F(::pmn, sign,
            detail::isnan_f(x)                    ? 0.0f
            : (detail::f2u(x) & 0x7fffffffu) == 0 ? x
                                                  : detail::u2f((detail::f2u(x) & 0x80000000u) | 0x3f800000u))
// saturate: clamp to [0, 1]; NaN -> 0 (fmin(fmax(NaN, 0), 1)).
PMN_UNARY_F(::pmn, saturate, detail::fmin_(detail::fmax_(x, 0.0f), 1.0f))

// ---- classification: float/half -> bool, vec -> vec<bool, N>.
#define PMN_CLASSIFY(name, expr)                                                            \
  PMN_FN bool name(float x) { return expr; }                                                \
  PMN_FN bool name(half x) { return ::pmn::name(float(x)); }                                \
  template <class T, int N> PMN_FN vec<bool, N> name(const vec<T, N>& v) {                  \
    return detail::vmap<bool>(v, [](const T& e) { return ::pmn::name(e); });                \
  }
PMN_CLASSIFY(isnan, detail::isnan_f(x))
PMN_CLASSIFY(isinf, detail::isinf_f(x))
PMN_CLASSIFY(isfinite, (detail::f2u(x) & 0x7fffffffu) < 0x7f800000u)
PMN_CLASSIFY(signbit, (detail::f2u(x) >> 31) != 0)
#undef PMN_CLASSIFY

// ---- abs: floats and integers (MSL allows both). INT_MIN stays INT_MIN (wraps) as on GPUs.
namespace detail {
PMN_FN float abs_(float x) { return ::pmn::fabs(x); }
PMN_FN half abs_(half x) { return ::pmn::fabs(x); }
template <class I, if_int<I> = 0> PMN_FN I abs_(I x) {
  if constexpr (is_signed_int<I>::value) {
    return x < I(0) ? I(0ull - (unsigned long long)x) : x;
  } else {
    return x;
  }
}
template <class T, int N> PMN_FN vec<T, N> abs_(const vec<T, N>& v) {
  return vmap<T>(v, [](const T& e) { return abs_(e); });
}
template <class A> using norm_t = cond_t<same_<A, double>::value, float, A>;
}  // namespace detail
template <class A> PMN_FN detail::norm_t<A> abs(const A& x) {
  return detail::abs_(detail::norm_t<A>(x));
}

// ---- min/max/clamp. Floats: NaN-ignoring fmin/fmax (Metal: max == fmax). Integers:
//      max = x < y ? y : x, min = y < x ? y : x. clamp = min(max(x, lo), hi).
namespace detail {
PMN_FN float max_(float a, float b) { return fmax_(a, b); }
PMN_FN float min_(float a, float b) { return fmin_(a, b); }
PMN_FN half max_(half a, half b) { return half(fmax_(float(a), float(b))); }
PMN_FN half min_(half a, half b) { return half(fmin_(float(a), float(b))); }
template <class I, if_int<I> = 0> PMN_FN I max_(I a, I b) { return a < b ? b : a; }
template <class I, if_int<I> = 0> PMN_FN I min_(I a, I b) { return b < a ? b : a; }
template <class T, int N> PMN_FN vec<T, N> max_(const vec<T, N>& a, const vec<T, N>& b) {
  return vzip<T>(a, b, [](const T& p, const T& q) { return max_(p, q); });
}
template <class T, int N> PMN_FN vec<T, N> min_(const vec<T, N>& a, const vec<T, N>& b) {
  return vzip<T>(a, b, [](const T& p, const T& q) { return min_(p, q); });
}
}  // namespace detail

// max / min and fmax / fmin (the same functions here) of a and b in their promoted common type.
#define PMN_MINMAX(name, impl)                                                             \
  template <class A, class B> PMN_FN detail::promote_t<A, B> name(const A& a, const B& b) { \
    typedef detail::promote_t<A, B> R;                                                      \
    return detail::impl(R(a), R(b));                                                        \
  }
PMN_MINMAX(max, max_) PMN_MINMAX(min, min_) PMN_MINMAX(fmax, max_) PMN_MINMAX(fmin, min_)
#undef PMN_MINMAX
template <class A, class B, class C>
PMN_FN detail::promote3_t<A, B, C> clamp(const A& x, const B& lo, const C& hi) {
  typedef detail::promote3_t<A, B, C> R;
  return detail::min_(detail::max_(R(x), R(lo)), R(hi));
}

// ---- binary and ternary floating-point functions, same promotion rule.
namespace detail {
// Type that element computations run in: half computes in float and rounds once at the end.
template <class T> struct fcalc { typedef T type; };
template <> struct fcalc<half> { typedef float type; };
}  // namespace detail

// name##_ holds the same-type implementations (in the current namespace, so pmn::fast can
// define its own); name() promotes mixed arguments and calls it.
#define PMN_BINARY_F(ns, name, expr)                                                         \
  PMN_FN float name##_(float x, float y) { return expr; }                                    \
  PMN_FN half name##_(half x, half y) { return half(ns::name##_(float(x), float(y))); }      \
  template <class T, int N>                                                                  \
  PMN_FN vec<T, N> name##_(const vec<T, N>& a, const vec<T, N>& b) {                         \
    return ::pmn::detail::vzip<T>(a, b, [](const T& p, const T& q) { return ns::name##_(p, q); }); \
  }                                                                                          \
  template <class A, class B>                                                                \
  PMN_FN ::pmn::detail::promote_t<A, B> name(const A& a, const B& b) {                       \
    typedef ::pmn::detail::promote_t<A, B> R;                                                \
    return ns::name##_(R(a), R(b));                                                          \
  }

PMN_BINARY_F(::pmn, pow, PMN_LIBM(pow)(x, y))
// powr is defined for x >= 0 only; x < 0 gives NaN (as OpenCL's powr).
PMN_BINARY_F(::pmn, powr, x < 0.0f ? detail::u2f(0x7fffffffu) : PMN_LIBM(pow)(x, y))
PMN_BINARY_F(::pmn, atan2, PMN_LIBM(atan2)(x, y))
PMN_BINARY_F(::pmn, fmod, PMN_LIBM(fmod)(x, y))
PMN_BINARY_F(::pmn, copysign, PMN_LIBM(copysign)(x, y))
PMN_BINARY_F(::pmn, step, y < x ? 0.0f : 1.0f)  // step(edge, x)
PMN_BINARY_F(::pmn, divide, x / y)

namespace detail {
#ifdef PMN_CUDA
PMN_FN float fma_(float a, float b, float c) { return ::fmaf(a, b, c); }
#else
PMN_FN float fma_(float a, float b, float c) { return std::fma(a, b, c); }
#endif
PMN_FN half fma_(half a, half b, half c) { return hfma(a, b, c); }
#ifdef PMN_CUDA
PMN_FN vec<half, 2> fma_(const vec<half, 2>& a, const vec<half, 2>& b, const vec<half, 2>& c) {
  unsigned r;
  asm("fma.rn.f16x2 %0, %1, %2, %3;"
      : "=r"(r)
      : "r"(__builtin_bit_cast(unsigned, a)), "r"(__builtin_bit_cast(unsigned, b)),
        "r"(__builtin_bit_cast(unsigned, c)));
  return __builtin_bit_cast(vec<half, 2>, r);
}
PMN_FN vec<half, 4> fma_(const vec<half, 4>& a, const vec<half, 4>& b, const vec<half, 4>& c) {
  h4w x = __builtin_bit_cast(h4w, a), y = __builtin_bit_cast(h4w, b), z = __builtin_bit_cast(h4w, c), r;
  asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(r.lo) : "r"(x.lo), "r"(y.lo), "r"(z.lo));
  asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(r.hi) : "r"(x.hi), "r"(y.hi), "r"(z.hi));
  return __builtin_bit_cast(vec<half, 4>, r);
}
#endif
PMN_FN float mix_(float x, float y, float a) { return x + (y - x) * a; }
PMN_FN half mix_(half x, half y, half a) { return half(mix_(float(x), float(y), float(a))); }
PMN_FN float smoothstep_(float e0, float e1, float x) {
  float t = fmin_(fmax_((x - e0) / (e1 - e0), 0.0f), 1.0f);
  return t * t * (3.0f - 2.0f * t);
}
PMN_FN half smoothstep_(half e0, half e1, half x) {
  return half(smoothstep_(float(e0), float(e1), float(x)));
}
#define PMN_TERNARY_VEC(name)                                                               \
  template <class T, int N>                                                                 \
  PMN_FN vec<T, N> name(const vec<T, N>& a, const vec<T, N>& b, const vec<T, N>& c) {       \
    return vzip3<T>(a, b, c, [](const T& p, const T& q, const T& r) { return name(p, q, r); }); \
  }
PMN_TERNARY_VEC(fma_)
PMN_TERNARY_VEC(mix_)
PMN_TERNARY_VEC(smoothstep_)
#undef PMN_TERNARY_VEC
}  // namespace detail

#define PMN_TERNARY_F(name, impl)                                                            \
  template <class A, class B, class C>                                                       \
  PMN_FN detail::promote3_t<A, B, C> name(const A& a, const B& b, const C& c) {              \
    typedef detail::promote3_t<A, B, C> R;                                                   \
    return detail::impl(R(a), R(b), R(c));                                                   \
  }
PMN_TERNARY_F(fma, fma_)
PMN_TERNARY_F(mad, fma_)  // mad = fma: one rounding on both targets, so results agree
PMN_TERNARY_F(mix, mix_)
PMN_TERNARY_F(smoothstep, smoothstep_)
#undef PMN_TERNARY_F

// ---- select(a, b, c) = c ? b : a, per component when c is a vector.
namespace detail {
template <class T> PMN_FN T select_(const T& a, const T& b, bool c) { return c ? b : a; }
template <class T, class U, int N>
PMN_FN vec<T, N> select_(const vec<T, N>& a, const vec<T, N>& b, const vec<U, N>& c) {
  return vzip3<T>(a, b, c, [](const T& p, const T& q, const U& s) { return s ? q : p; });
}
}  // namespace detail
template <class A, class B, class C>
PMN_FN detail::promote_t<A, B> select(const A& a, const B& b, const C& c) {
  typedef detail::promote_t<A, B> R;
  return detail::select_(R(a), R(b), c);
}

// ---- relational helpers for bool vectors (found by ADL; MSL's all/any/not).
PMN_FN bool all(bool b) { return b; }
PMN_FN bool any(bool b) { return b; }
template <class T> PMN_FN bool all(const vec<T, 2>& v) { return v.x && v.y; }
template <class T> PMN_FN bool all(const vec<T, 3>& v) { return v.x && v.y && v.z; }
template <class T> PMN_FN bool all(const vec<T, 4>& v) { return v.x && v.y && v.z && v.w; }
template <class T> PMN_FN bool any(const vec<T, 2>& v) { return v.x || v.y; }
template <class T> PMN_FN bool any(const vec<T, 3>& v) { return v.x || v.y || v.z; }
template <class T> PMN_FN bool any(const vec<T, 4>& v) { return v.x || v.y || v.z || v.w; }

// ---- geometric functions (float and half vectors; half computes in float, rounds once).
namespace detail {
template <class T, int N> PMN_FN typename fcalc<T>::type dot_(const vec<T, N>& a, const vec<T, N>& b) {
  typedef typename fcalc<T>::type F;
  F s = F(a.x) * F(b.x) + F(a.y) * F(b.y);
  if constexpr (N >= 3) s += F(a.z) * F(b.z);
  if constexpr (N >= 4) s += F(a.w) * F(b.w);
  return s;
}
}  // namespace detail
template <class T, int N> PMN_FN T dot(const vec<T, N>& a, const vec<T, N>& b) {
  return T(detail::dot_(a, b));
}
template <class T, int N> PMN_FN T length_squared(const vec<T, N>& a) {
  return T(detail::dot_(a, a));
}
template <class T, int N> PMN_FN T length(const vec<T, N>& a) {
  return T(::pmn::sqrt(detail::dot_(a, a)));
}
template <class T, int N> PMN_FN T distance(const vec<T, N>& a, const vec<T, N>& b) {
  return ::pmn::length(a - b);
}
template <class T, int N> PMN_FN T distance_squared(const vec<T, N>& a, const vec<T, N>& b) {
  return ::pmn::length_squared(a - b);
}
template <class T, int N> PMN_FN vec<T, N> normalize(const vec<T, N>& a) {
  typedef typename detail::fcalc<T>::type F;
  F len = ::pmn::sqrt(detail::dot_(a, a));
  return detail::vmap<T>(a, [len](const T& e) { return F(e) / len; });
}
template <class T> PMN_FN vec<T, 3> cross(const vec<T, 3>& a, const vec<T, 3>& b) {
  typedef typename detail::fcalc<T>::type F;
  vec<T, 3> r;
  r.x = T(F(a.y) * F(b.z) - F(a.z) * F(b.y));
  r.y = T(F(a.z) * F(b.x) - F(a.x) * F(b.z));
  r.z = T(F(a.x) * F(b.y) - F(a.y) * F(b.x));
  return r;
}

// ---- precise / fast namespaces. pmn::f is already the precise variant; pmn::precise::f and
//      pmn::fast::f of any function not redefined below resolve to pmn::f.
namespace precise {
using namespace ::pmn;
}
namespace fast {
using namespace ::pmn;
#ifdef PMN_CUDA
// One PTX instruction on a float (the approximations fast:: maps to).
#define PMN_PTX_F1(name, insn)                      \
  PMN_FN float name(float x) {                      \
    float r;                                        \
    asm(insn : "=f"(r) : "f"(x));                   \
    return r;                                       \
  }
PMN_PTX_F1(ex2_approx, "ex2.approx.ftz.f32 %0, %1;")
PMN_PTX_F1(lg2_approx, "lg2.approx.ftz.f32 %0, %1;")
PMN_PTX_F1(tanh_approx, "tanh.approx.f32 %0, %1;")
PMN_PTX_F1(sqrt_approx, "sqrt.approx.f32 %0, %1;")
#undef PMN_PTX_F1
PMN_UNARY_F(::pmn::fast, exp, ::__expf(x))
PMN_UNARY_F(::pmn::fast, exp2, ex2_approx(x))
PMN_UNARY_F(::pmn::fast, exp10, ::__exp10f(x))
PMN_UNARY_F(::pmn::fast, log, ::__logf(x))
PMN_UNARY_F(::pmn::fast, log2, lg2_approx(x))
PMN_UNARY_F(::pmn::fast, log10, ::__log10f(x))
PMN_UNARY_F(::pmn::fast, sqrt, sqrt_approx(x))
PMN_UNARY_F(::pmn::fast, rsqrt, ::rsqrtf(x))
PMN_UNARY_F(::pmn::fast, tanh, tanh_approx(x))
PMN_UNARY_F(::pmn::fast, sin, ::__sinf(x))
PMN_UNARY_F(::pmn::fast, cos, ::__cosf(x))
PMN_UNARY_F(::pmn::fast, tan, ::__tanf(x))
PMN_BINARY_F(::pmn::fast, pow, ::__powf(x, y))
PMN_BINARY_F(::pmn::fast, powr, ::__powf(x, y))
PMN_BINARY_F(::pmn::fast, divide, ::__fdividef(x, y))
template <class T, int N> PMN_FN T length(const vec<T, N>& a) {
  return T(::pmn::fast::sqrt(::pmn::detail::dot_(a, a)));
}
template <class T, int N> PMN_FN T distance(const vec<T, N>& a, const vec<T, N>& b) {
  return ::pmn::fast::length(a - b);
}
template <class T, int N> PMN_FN vec<T, N> normalize(const vec<T, N>& a) {
  typedef typename ::pmn::detail::fcalc<T>::type F;
  F r = ::rsqrtf(float(::pmn::detail::dot_(a, a)));
  return ::pmn::detail::vmap<T>(a, [r](const T& e) { return F(e) * r; });
}
#endif
}  // namespace fast
#undef PMN_UNARY_F
#undef PMN_BINARY_F
#undef PMN_LIBM

// ---- as_type<T>(x): reinterpret the bits; sizes must match.
template <class To, class From> PMN_FN constexpr To as_type(const From& x) {
  static_assert(sizeof(To) == sizeof(From), "as_type: source and destination sizes differ");
  return __builtin_bit_cast(To, x);
}

// ============================================================================================
// Barriers.
// ============================================================================================
struct site_t {
  unsigned id;  // per-file call-site id assigned by the front end, increasing in source order
};

enum class mem_flags : unsigned {  // bit flags, combined with | and tested with &
  mem_none = 0,
  mem_device = 1u << 0,
  mem_threadgroup = 1u << 1,
  mem_texture = 1u << 2,
  mem_threadgroup_imageblock = 1u << 3,
  mem_object_data = 1u << 4,
};
PMN_FN constexpr mem_flags operator|(mem_flags a, mem_flags b) {
  return mem_flags((unsigned)a | (unsigned)b);
}
PMN_FN constexpr mem_flags operator&(mem_flags a, mem_flags b) {
  return mem_flags((unsigned)a & (unsigned)b);
}

#ifdef PMN_CUDA
// __syncthreads orders global and shared memory among the block's threads, which covers every
// mem_flags combination.
PMN_FN void threadgroup_barrier(mem_flags) { __syncthreads(); }
PMN_FN void simdgroup_barrier(site_t, mem_flags) { __syncwarp(__activemask()); }
#else
namespace detail {
// Fibers of one threadgroup share an OS thread, so no hardware fence is needed; the asm tells the
// compiler that memory (including PMN_THREADGROUP statics) may change across the switch.
PMN_FN void compiler_fence() { __asm__ __volatile__("" ::: "memory"); }
inline void simd_noop(pmn_simd_slot*, uint32_t) {}
}  // namespace detail
PMN_FN void threadgroup_barrier(mem_flags) {
  detail::compiler_fence();
  pmn_cpu_tg_barrier();
  detail::compiler_fence();
}
PMN_FN void simdgroup_barrier(site_t s, mem_flags) {
  detail::compiler_fence();
  pmn_cpu_simd_wait(s.id, &detail::simd_noop);
  detail::compiler_fence();
}
#endif

// ============================================================================================
// SIMD-group functions (width 32), over the ACTIVE lanes only: lanes that returned, or that are
// on another path, take no part. Deterministic definitions used by both targets:
//  * simd_sum/product/min/max/and/or/xor: active values in lane order v[0..n-1] (rank order)
//    are combined as a pairwise tree, lower half first: step k = 1, 2, 4, 8, 16 sets
//    v[r] = op(v[r], v[r+k]) for r = 0, 2k, 4k, ... with r+k < n; v[0] is the result, for all.
//  * simd_prefix_inclusive_*: Hillis-Steele over ranks: step k = 1..16 sets
//    v[r] = op(v[r-k], v[r]) for r >= k. Exclusive = inclusive of the previous active lane;
//    the first active lane gets T(0) (sum) or T(1) (product), as Metal specifies.
//  * Shuffles read lane `src` (simd_shuffle/broadcast: the index; _xor: lane ^ mask; _up:
//    lane - delta; _down: lane + delta). If src is outside 0..31 or not active, the lane keeps
//    its own value -- exactly Metal's rule for shuffle_up/down (the lower/upper delta lanes are
//    unchanged); for an inactive or invalid source Metal leaves the value undefined.
//  * simd_ballot returns simd_vote, which converts implicitly to pmn_ulong (64-bit); bits
//    32..63 are 0 and bit i is lane i's vote (inactive lanes 0).
// ============================================================================================
struct simd_vote {
  typedef pmn_ulong vote_t;
  vote_t v;
  PMN_FN explicit constexpr simd_vote(vote_t x = 0) : v(x) {}
  PMN_FN constexpr operator vote_t() const { return v; }
  PMN_FN constexpr bool all() const { return (v & 0xffffffffull) == 0xffffffffull; }
  PMN_FN constexpr bool any() const { return (v & 0xffffffffull) != 0; }
};

namespace detail {
struct op_add {
  template <class T> PMN_FN static T apply(const T& a, const T& b) { return T(a + b); }
  template <class T> PMN_FN static T identity() { return T(0); }
};
struct op_mul {
  template <class T> PMN_FN static T apply(const T& a, const T& b) { return T(a * b); }
  template <class T> PMN_FN static T identity() { return T(1); }
};
struct op_max {
  template <class T> PMN_FN static T apply(const T& a, const T& b) { return max_(a, b); }
};
struct op_min {
  template <class T> PMN_FN static T apply(const T& a, const T& b) { return min_(a, b); }
};
struct op_and {
  template <class T> PMN_FN static T apply(const T& a, const T& b) { return T(a & b); }
};
struct op_or {
  template <class T> PMN_FN static T apply(const T& a, const T& b) { return T(a | b); }
};
struct op_xor {
  template <class T> PMN_FN static T apply(const T& a, const T& b) { return T(a ^ b); }
};
enum shfl_mode { SH_IDX, SH_XOR, SH_UP, SH_DOWN, SH_FIRST };
}  // namespace detail

#ifdef PMN_CUDA
namespace detail {
PMN_FN unsigned lane_id() {
  unsigned r;
  asm("mov.u32 %0, %%laneid;" : "=r"(r));
  return r;
}
// Shuffle any trivially copyable T (<= 16 bytes) as 32-bit words; half moves as 16 bits.
template <class T> struct words {
  static constexpr int n = (sizeof(T) + 3) / 4;
};
// Move v through `shfl` one 32-bit word at a time (shfl: unsigned -> unsigned, one __shfl_*_sync).
template <class T, class Shfl> PMN_FN T shfl_words(const T& v, Shfl shfl) {
  unsigned w[words<T>::n] = {};
  memcpy(w, &v, sizeof(T));
  for (int i = 0; i < words<T>::n; ++i) w[i] = shfl(w[i]);
  T r;
  memcpy(&r, w, sizeof(T));
  return r;
}
template <class T> PMN_FN T shfl_idx(unsigned mask, const T& v, unsigned src) {
  return shfl_words(v, [=](unsigned x) { return __shfl_sync(mask, x, src); });
}
template <class T> PMN_FN T shfl_xor(unsigned mask, const T& v, unsigned m) {
  return shfl_words(v, [=](unsigned x) { return __shfl_xor_sync(mask, x, m); });
}
template <class T> PMN_FN T shfl_up(unsigned mask, const T& v, unsigned d) {
  return shfl_words(v, [=](unsigned x) { return __shfl_up_sync(mask, x, d); });
}
template <class T> PMN_FN T shfl_down(unsigned mask, const T& v, unsigned d) {
  return shfl_words(v, [=](unsigned x) { return __shfl_down_sync(mask, x, d); });
}

// Tree reduction (see the definition above). Full warp: butterfly, each lane combining the
// lower block first so every lane computes the same operations. Partial warp: rank r reads the
// k-th active lane above it (fns), then lane 0's tree is broadcast from the first active lane.
template <class Op, class T> PMN_FN T reduce_tree(T v) {
  unsigned mask = __activemask();
  unsigned me = lane_id();
  if (mask == 0xffffffffu) {
    for (unsigned k = 1; k < 32; k <<= 1) {
      T t = shfl_xor(mask, v, k);
      v = (me & k) ? Op::apply(t, v) : Op::apply(v, t);
    }
    return v;
  }
  for (unsigned k = 1; k < 32; k <<= 1) {
    unsigned src = __fns(mask, me, (int)k + 1);
    bool ok = src != 0xffffffffu;
    T t = shfl_idx(mask, v, ok ? src : me);
    if (ok) v = Op::apply(v, t);
  }
  return shfl_idx(mask, v, (unsigned)(__ffs(mask) - 1));
}

template <class Op, class T> PMN_FN T reduce(const T& v) {
  // Integer add/min/max/and/or/xor are associative: one redux.sync instruction for 32-bit ints.
  constexpr bool i32 = same_<T, int>::value || same_<T, unsigned>::value;
  if constexpr (i32 && same_<Op, op_add>::value) {
    return T(__reduce_add_sync(__activemask(), v));
  } else if constexpr (i32 && same_<Op, op_max>::value) {
    return T(__reduce_max_sync(__activemask(), v));
  } else if constexpr (i32 && same_<Op, op_min>::value) {
    return T(__reduce_min_sync(__activemask(), v));
  } else if constexpr (i32 && same_<Op, op_and>::value) {
    return T(__reduce_and_sync(__activemask(), (unsigned)v));
  } else if constexpr (i32 && same_<Op, op_or>::value) {
    return T(__reduce_or_sync(__activemask(), (unsigned)v));
  } else if constexpr (i32 && same_<Op, op_xor>::value) {
    return T(__reduce_xor_sync(__activemask(), (unsigned)v));
  } else {
    return reduce_tree<Op>(v);
  }
}

template <class Op, bool Excl, class T> PMN_FN T scan(T v) {
  unsigned mask = __activemask();
  unsigned me = lane_id();
  if (mask == 0xffffffffu) {
    for (unsigned k = 1; k < 32; k <<= 1) {
      T t = shfl_up(mask, v, k);
      if (me >= k) v = Op::apply(t, v);
    }
    if (Excl) {
      T t = shfl_up(mask, v, 1);
      v = me >= 1 ? t : Op::template identity<T>();
    }
    return v;
  }
  for (unsigned k = 1; k < 32; k <<= 1) {
    unsigned src = __fns(mask, me, -(int)k - 1);
    bool ok = src != 0xffffffffu;
    T t = shfl_idx(mask, v, ok ? src : me);
    if (ok) v = Op::apply(t, v);
  }
  if (Excl) {
    unsigned src = __fns(mask, me, -2);
    bool ok = src != 0xffffffffu;
    T t = shfl_idx(mask, v, ok ? src : me);
    v = ok ? t : Op::template identity<T>();
  }
  return v;
}

template <shfl_mode M, class T> PMN_FN T shuffle(const T& v, unsigned a) {
  unsigned mask = __activemask();
  // Full warp and a < 32: the hardware keeps the own value when the source is out of range,
  // which is exactly the rule below, so a bare shuffle suffices.
  if (mask == 0xffffffffu && a < 32u) {
    if constexpr (M == SH_UP) return shfl_up(mask, v, a);
    if constexpr (M == SH_DOWN) return shfl_down(mask, v, a);
    if constexpr (M == SH_XOR) return shfl_xor(mask, v, a);
  }
  unsigned me = lane_id();
  unsigned src;
  switch (M) {
    case SH_IDX: src = a; break;
    case SH_XOR: src = me ^ a; break;
    case SH_UP: src = a <= me ? me - a : 32u; break;
    case SH_DOWN: src = me + a; break;
    default: src = (unsigned)(__ffs(mask) - 1); break;
  }
  bool ok = src < 32u && ((mask >> src) & 1u);
  return shfl_idx(mask, v, ok ? src : me);
}
}  // namespace detail

PMN_FN bool simd_all(site_t, bool p) { return __all_sync(__activemask(), p) != 0; }
PMN_FN bool simd_any(site_t, bool p) { return __any_sync(__activemask(), p) != 0; }
PMN_FN simd_vote simd_ballot(site_t, bool p) {
  return simd_vote((pmn_ulong)__ballot_sync(__activemask(), p));
}
PMN_FN bool simd_is_first(site_t) {
  return detail::lane_id() == (unsigned)(__ffs(__activemask()) - 1);
}
#define PMN_SIMD_REDUCE(name, op) \
  template <class T> PMN_FN T name(site_t, const T& v) { return detail::reduce<detail::op>(v); }
#define PMN_SIMD_SCAN(name, op, excl)                   \
  template <class T> PMN_FN T name(site_t, const T& v) { \
    return detail::scan<detail::op, excl>(v);            \
  }
#define PMN_SIMD_SHUFFLE(name, mode)                                  \
  template <class T> PMN_FN T name(site_t, const T& v, unsigned a) { \
    return detail::shuffle<detail::mode>(v, a);                       \
  }
template <class T> PMN_FN T simd_broadcast_first(site_t, const T& v) {
  return detail::shuffle<detail::SH_FIRST>(v, 0u);
}

#else  // PMN_CPU
namespace detail {
// Each lane writes its operand into its slot, blocks in the runtime, and reads its result; the
// runtime calls `fn` once for the group of lanes waiting at the same site (bit i = lane i).
template <class R, class T>
PMN_FN R simd_call(site_t s, const T& v, uint32_t arg, pmn_simd_fn fn) {
  static_assert(sizeof(T) <= 16 && sizeof(R) <= 16, "SIMD operand too large");
  pmn_simd_slot* slot = pmn_cpu_lane_slot();
  std::memcpy(slot->in, &v, sizeof(T));
  slot->arg = arg;
  compiler_fence();
  pmn_cpu_simd_wait(s.id, fn);
  compiler_fence();
  R r;
  std::memcpy(&r, slot->out, sizeof(R));
  return r;
}
template <class T> PMN_FN T load_in(const pmn_simd_slot& s) {
  T v;
  std::memcpy(&v, s.in, sizeof(T));
  return v;
}
template <class T> PMN_FN void store_out(pmn_simd_slot& s, const T& v) {
  std::memcpy(s.out, &v, sizeof(T));
}

template <class Op, class T> void fn_reduce(pmn_simd_slot* s, uint32_t mask) {
  T v[32];
  int n = 0;
  for (uint32_t m = mask; m; m &= m - 1) v[n++] = load_in<T>(s[__builtin_ctz(m)]);
  for (int k = 1; k < n; k <<= 1)
    for (int r = 0; r + k < n; r += 2 * k) v[r] = Op::apply(v[r], v[r + k]);
  for (uint32_t m = mask; m; m &= m - 1) store_out(s[__builtin_ctz(m)], v[0]);
}
template <class Op, bool Excl, class T> void fn_scan(pmn_simd_slot* s, uint32_t mask) {
  T v[32];
  int lanes[32];
  int n = 0;
  for (uint32_t m = mask; m; m &= m - 1) {
    lanes[n] = __builtin_ctz(m);
    v[n] = load_in<T>(s[lanes[n]]);
    ++n;
  }
  for (int k = 1; k < n; k <<= 1)
    for (int r = n - 1; r >= k; --r) v[r] = Op::apply(v[r - k], v[r]);  // top-down: reads old
  for (int r = 0; r < n; ++r) {
    if (Excl) {
      store_out(s[lanes[r]], r == 0 ? Op::template identity<T>() : v[r - 1]);
    } else {
      store_out(s[lanes[r]], v[r]);
    }
  }
}
template <shfl_mode M> void fn_shuffle(pmn_simd_slot* s, uint32_t mask) {
  unsigned first = (unsigned)__builtin_ctz(mask);
  unsigned char tmp[32][16];
  for (uint32_t m = mask; m; m &= m - 1) {
    unsigned me = (unsigned)__builtin_ctz(m), a = s[me].arg, src;
    switch (M) {
      case SH_IDX: src = a; break;
      case SH_XOR: src = me ^ a; break;
      case SH_UP: src = a <= me ? me - a : 32u; break;
      case SH_DOWN: src = me + a; break;
      default: src = first; break;
    }
    bool ok = src < 32u && ((mask >> src) & 1u);
    std::memcpy(tmp[me], s[ok ? src : me].in, 16);
  }
  for (uint32_t m = mask; m; m &= m - 1) {
    unsigned me = (unsigned)__builtin_ctz(m);
    std::memcpy(s[me].out, tmp[me], 16);
  }
}
inline void fn_ballot(pmn_simd_slot* s, uint32_t mask) {
  pmn_ulong b = 0;
  for (uint32_t m = mask; m; m &= m - 1) {
    int l = __builtin_ctz(m);
    if (load_in<bool>(s[l])) b |= 1ull << l;
  }
  for (uint32_t m = mask; m; m &= m - 1) store_out(s[__builtin_ctz(m)], b);
}
inline void fn_is_first(pmn_simd_slot* s, uint32_t mask) {
  int first = __builtin_ctz(mask);
  for (uint32_t m = mask; m; m &= m - 1) {
    int l = __builtin_ctz(m);
    store_out(s[l], l == first);
  }
}
}  // namespace detail

PMN_FN simd_vote simd_ballot(site_t s, bool p) {
  return simd_vote(detail::simd_call<pmn_ulong>(s, p, 0, &detail::fn_ballot));
}
PMN_FN bool simd_all(site_t s, bool p) {
  pmn_ulong b = detail::simd_call<pmn_ulong>(s, !p, 0, &detail::fn_ballot);
  return b == 0;
}
PMN_FN bool simd_any(site_t s, bool p) {
  return detail::simd_call<pmn_ulong>(s, p, 0, &detail::fn_ballot) != 0;
}
PMN_FN bool simd_is_first(site_t s) {
  return detail::simd_call<bool>(s, false, 0, &detail::fn_is_first);
}
#define PMN_SIMD_REDUCE(name, op)                                                  \
  template <class T> PMN_FN T name(site_t s, const T& v) {                         \
    return detail::simd_call<T>(s, v, 0, &detail::fn_reduce<detail::op, T>);       \
  }
#define PMN_SIMD_SCAN(name, op, excl)                                              \
  template <class T> PMN_FN T name(site_t s, const T& v) {                         \
    return detail::simd_call<T>(s, v, 0, &detail::fn_scan<detail::op, excl, T>);   \
  }
#define PMN_SIMD_SHUFFLE(name, mode)                                               \
  template <class T> PMN_FN T name(site_t s, const T& v, unsigned a) {             \
    return detail::simd_call<T>(s, v, a, &detail::fn_shuffle<detail::mode>);       \
  }
template <class T> PMN_FN T simd_broadcast_first(site_t s, const T& v) {
  return detail::simd_call<T>(s, v, 0, &detail::fn_shuffle<detail::SH_FIRST>);
}
#endif

// The reductions, scans and shuffles with their combining functions (detail::op_*, shuffle
// modes), listed once: expanded here into each target's functions and, for the cpu's work-item
// loops, in pmn_lockstep.h into their first steps.
#define PMN_SIMD_FUNCTIONS(REDUCE, SCAN, SHUFFLE)    \
  REDUCE(simd_sum, op_add)                           \
  REDUCE(simd_product, op_mul)                       \
  REDUCE(simd_max, op_max)                           \
  REDUCE(simd_min, op_min)                           \
  REDUCE(simd_and, op_and)                           \
  REDUCE(simd_or, op_or)                             \
  REDUCE(simd_xor, op_xor)                           \
  SCAN(simd_prefix_inclusive_sum, op_add, false)     \
  SCAN(simd_prefix_exclusive_sum, op_add, true)      \
  SCAN(simd_prefix_inclusive_product, op_mul, false) \
  SCAN(simd_prefix_exclusive_product, op_mul, true)  \
  SHUFFLE(simd_shuffle, SH_IDX)                      \
  SHUFFLE(simd_broadcast, SH_IDX)                    \
  SHUFFLE(simd_shuffle_xor, SH_XOR)                  \
  SHUFFLE(simd_shuffle_up, SH_UP)                    \
  SHUFFLE(simd_shuffle_down, SH_DOWN)
PMN_SIMD_FUNCTIONS(PMN_SIMD_REDUCE, PMN_SIMD_SCAN, PMN_SIMD_SHUFFLE)
#undef PMN_SIMD_REDUCE
#undef PMN_SIMD_SCAN
#undef PMN_SIMD_SHUFFLE

// ============================================================================================
// simdgroup matrices (MSL 2.3, <metal_simdgroup_matrix>): an 8x8 matrix owned by the 32 lanes of
// a simdgroup. Every lane executes each matrix operation (uniform control flow); the element
// layout inside the simdgroup is opaque to kernels (MSL 2.3 has no per-element access), so each
// target picks its own:
//  * cuda: lane l holds elements (row l/4, cols 2*(l%4) + {0,1}) -- the rows 0..7 half of the
//    accumulator and A fragments of mma.sync m16n8k8, so half x half products run on tensor
//    cores with no data movement but one movmatrix of B. Float x float stays exact fp32: SIMT
//    FMAs in k order over operands gathered with shuffles, unless PMN_MATRIX_TF32 is defined
//    (the tf32 opt-in: float operands rounded to tf32 and multiplied on tensor cores).
//  * cpu: every lane holds the whole matrix (row-major, as float) and computes every operation itself, so
//    matrix operations need no lane exchange and no fiber switch; loads read the same memory in
//    every lane and stores write the same values.
// Arithmetic: products are formed exactly (half x half fits in float), summed in float in k order
// starting from C (cpu, and cuda's SIMT path), or in the tensor core's order (cuda mma); the
// result is rounded once to D's type. With half accumulators (all operands half) that is MPS's
// "fp16 accumulation": one rounding to half per 8-deep step.
// ============================================================================================
template <class T, int Cols, int Rows> struct simdgroup_matrix {
  static_assert(Cols == 8 && Rows == 8, "MSL 2.3 defines 8x8 simdgroup matrices only");
  static_assert(detail::same_<T, float>::value || detail::same_<T, half>::value,
                "simdgroup matrices hold float or half");
#ifdef PMN_CUDA
  alignas(2 * sizeof(T)) T e[2];  // a half pair is one 32-bit register: the mma operand as is
#else
  float e[64];  // T's values held as float (exact): the products need no conversions
#endif
  simdgroup_matrix() = default;
  // MSL: a diagonal matrix with `dval` on the diagonal, zeros elsewhere.
  PMN_FN simdgroup_matrix(T dval);
};
typedef simdgroup_matrix<float, 8, 8> simdgroup_float8x8;
typedef simdgroup_matrix<half, 8, 8> simdgroup_half8x8;

namespace detail {
// matrix_origin: MSL's ulong2 (x = column, y = row, in elements of the source/destination);
// accepts a scalar (splat) or any 2-vector of integers.
struct sgm_origin {
  pmn_ulong x, y;
  template <class I, class = if_int<I>> PMN_FN sgm_origin(I v) : x((pmn_ulong)v), y((pmn_ulong)v) {}
  template <class I> PMN_FN sgm_origin(const vec<I, 2>& v) : x((pmn_ulong)v[0]), y((pmn_ulong)v[1]) {}
};
#ifdef PMN_CUDA
PMN_FN unsigned sgm_row() { return lane_id() >> 2; }
PMN_FN unsigned sgm_col() { return (lane_id() & 3u) * 2u; }
PMN_FN unsigned pair_bits(const half (&e)[2]) {
  unsigned v;
  memcpy(&v, e, 4);
  return v;
}
// B of m16n8k8 is held column-wise: lane l needs B(2*(l%4) + i, l/4), i.e. B^T in our layout.
PMN_FN unsigned transpose_h2(unsigned v) {
  unsigned r;
  asm("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(r) : "r"(v));
  return r;
}
#ifdef PMN_MATRIX_TF32
PMN_FN unsigned to_tf32(float f) {
  unsigned r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(f));
  return r;
}
#endif
#endif
}  // namespace detail

template <class T, int C, int R>
PMN_FN simdgroup_matrix<T, C, R>::simdgroup_matrix(T dval) {
#ifdef PMN_CUDA
  const unsigned r = detail::sgm_row(), c = detail::sgm_col();
  e[0] = r == c ? dval : T(0);
  e[1] = r == c + 1 ? dval : T(0);
#else
  const float v = float(dval);
  for (int i = 0; i < 64; ++i) e[i] = (i / 8 == i % 8) ? v : 0.f;
#endif
}

template <class T, int C, int R>
PMN_FN simdgroup_matrix<T, C, R> make_filled_simdgroup_matrix(const typename detail::ident<T>::type value) {
  simdgroup_matrix<T, C, R> m;
#ifdef PMN_CUDA
  m.e[0] = value;
  m.e[1] = value;
#else
  const float v = float(T(value));
  for (int i = 0; i < 64; ++i) m.e[i] = v;
#endif
  return m;
}

// d(r, c) = src[(origin.y + r) * elements_per_row + origin.x + c], or with transpose_matrix
// d(r, c) = src[(origin.y + c) * elements_per_row + origin.x + r] (the origin stays in the
// source's coordinates).
template <class T, int C, int R>
PMN_FN void simdgroup_load(simdgroup_matrix<T, C, R>& d, const typename detail::ident<T>::type* src,
                           pmn_ulong elements_per_row = C, detail::sgm_origin matrix_origin = 0,
                           bool transpose_matrix = false) {
  const T* base = src + matrix_origin.y * elements_per_row + matrix_origin.x;
#ifdef PMN_CUDA
  const unsigned r = detail::sgm_row(), c = detail::sgm_col();
  if (!transpose_matrix) {
    const T* q = base + r * elements_per_row + c;
    if constexpr (sizeof(T) == 2) {
      if ((reinterpret_cast<unsigned long long>(q) & 3u) == 0) {  // one 32-bit access
        memcpy(d.e, q, 4);
        return;
      }
    }
    d.e[0] = q[0];
    d.e[1] = q[1];
  } else {
    d.e[0] = base[c * elements_per_row + r];
    d.e[1] = base[(c + 1) * elements_per_row + r];
  }
#else
  for (int r = 0; r < 8; ++r)
    for (int c = 0; c < 8; ++c)
      d.e[r * 8 + c] = float(transpose_matrix ? base[c * elements_per_row + r] : base[r * elements_per_row + c]);
#endif
}

template <class T, int C, int R>
PMN_FN void simdgroup_store(const simdgroup_matrix<T, C, R>& a, typename detail::ident<T>::type* dst,
                            pmn_ulong elements_per_row = C, detail::sgm_origin matrix_origin = 0,
                            bool transpose_matrix = false) {
  T* base = dst + matrix_origin.y * elements_per_row + matrix_origin.x;
#ifdef PMN_CUDA
  const unsigned r = detail::sgm_row(), c = detail::sgm_col();
  if (!transpose_matrix) {
    T* q = base + r * elements_per_row + c;
    if constexpr (sizeof(T) == 4) {
      if ((reinterpret_cast<unsigned long long>(q) & 7u) == 0) {  // one 64-bit access
        *reinterpret_cast<vec<float, 2>*>(q) = vec<float, 2>(a.e[0], a.e[1]);
        return;
      }
    }
    q[0] = a.e[0];
    q[1] = a.e[1];
  } else {
    base[c * elements_per_row + r] = a.e[0];
    base[(c + 1) * elements_per_row + r] = a.e[1];
  }
#else
  for (int r = 0; r < 8; ++r)
    for (int c = 0; c < 8; ++c) {
      T v = T(a.e[r * 8 + c]);
      if (transpose_matrix) base[c * elements_per_row + r] = v; else base[r * elements_per_row + c] = v;
    }
#endif
}

// d = a * b + c (d may be any of a, b, c).
template <class TD, class TA, class TB, class TC>
PMN_FN void simdgroup_multiply_accumulate(simdgroup_matrix<TD, 8, 8>& d, const simdgroup_matrix<TA, 8, 8>& a,
                                          const simdgroup_matrix<TB, 8, 8>& b,
                                          const simdgroup_matrix<TC, 8, 8>& c) {
#ifdef PMN_CUDA
  using detail::same_;
  if constexpr (same_<TA, half>::value && same_<TB, half>::value && same_<TC, float>::value &&
                same_<TD, float>::value) {
    const unsigned a0 = detail::pair_bits(a.e), a1 = 0u;
    const unsigned b0 = detail::transpose_h2(detail::pair_bits(b.e));
    float d0, d1, d2, d3;
    asm("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, "
        "{%7,%8,%9,%10};"
        : "=f"(d0), "=f"(d1), "=f"(d2), "=f"(d3)
        : "r"(a0), "r"(a1), "r"(b0), "f"(c.e[0]), "f"(c.e[1]), "f"(0.f), "f"(0.f));
    d.e[0] = d0;
    d.e[1] = d1;
  } else if constexpr (same_<TA, half>::value && same_<TB, half>::value &&
                       same_<TC, half>::value && same_<TD, half>::value) {
    const unsigned a0 = detail::pair_bits(a.e), a1 = 0u;
    const unsigned b0 = detail::transpose_h2(detail::pair_bits(b.e));
    const unsigned c0 = detail::pair_bits(c.e), c1 = 0u;
    unsigned d0, d1;
    asm("mma.sync.aligned.m16n8k8.row.col.f16.f16.f16.f16 {%0,%1}, {%2,%3}, {%4}, {%5,%6};"
        : "=r"(d0), "=r"(d1)
        : "r"(a0), "r"(a1), "r"(b0), "r"(c0), "r"(c1));
    memcpy(d.e, &d0, 4);
#ifdef PMN_MATRIX_TF32
  } else if constexpr (same_<TA, float>::value && same_<TB, float>::value &&
                       same_<TC, float>::value && same_<TD, float>::value) {
    // m16n8k8 tf32: A k-columns 0..3 in a0 (rows 0-7), 4..7 in a2; B rows 0..3 in b0, 4..7 in b1.
    const unsigned l = detail::lane_id(), g = l >> 2, t = l & 3u;
    // A(g, t) and A(g, t + 4) live in lane 4g + t/2 (slot t%2) and lane 4g + 2 + t/2.
    // the slot read is the reader's column parity: shuffle both slots and pick.
    const float a00 = __shfl_sync(0xffffffffu, a.e[0], 4u * g + (t >> 1));
    const float a01 = __shfl_sync(0xffffffffu, a.e[1], 4u * g + (t >> 1));
    const float a10 = __shfl_sync(0xffffffffu, a.e[0], 4u * g + 2u + (t >> 1));
    const float a11 = __shfl_sync(0xffffffffu, a.e[1], 4u * g + 2u + (t >> 1));
    const float av0 = (t & 1u) ? a01 : a00, av1 = (t & 1u) ? a11 : a10;
    // B(t, g) in lane 4t + g/2 slot g%2; B(t + 4, g) in lane 4(t+4) + g/2.
    const float b00 = __shfl_sync(0xffffffffu, b.e[0], 4u * t + (g >> 1));
    const float b01 = __shfl_sync(0xffffffffu, b.e[1], 4u * t + (g >> 1));
    const float b10 = __shfl_sync(0xffffffffu, b.e[0], 4u * (t + 4u) + (g >> 1));
    const float b11 = __shfl_sync(0xffffffffu, b.e[1], 4u * (t + 4u) + (g >> 1));
    const float bv0 = (g & 1u) ? b01 : b00, bv1 = (g & 1u) ? b11 : b10;
    float d0, d1, d2, d3;
    asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%10,%11,%12,%13};"
        : "=f"(d0), "=f"(d1), "=f"(d2), "=f"(d3)
        : "r"(detail::to_tf32(av0)), "r"(0u), "r"(detail::to_tf32(av1)), "r"(0u),
          "r"(detail::to_tf32(bv0)), "r"(detail::to_tf32(bv1)), "f"(c.e[0]), "f"(c.e[1]), "f"(0.f),
          "f"(0.f));
    d.e[0] = d0;
    d.e[1] = d1;
#endif
  } else {
    // Exact path: lane (r, cols 2p, 2p+1) gathers A(r, k) from lane 4r + k/2 and B(k, 2p + j)
    // from lane 4k + p, then FMAs in k order (the cpu emulation's order: bit-identical results).
    const unsigned l = detail::lane_id(), r = l >> 2, p = l & 3u;
    float acc0 = (float)c.e[0], acc1 = (float)c.e[1];
    const float ae0 = (float)a.e[0], ae1 = (float)a.e[1], be0 = (float)b.e[0], be1 = (float)b.e[1];
#pragma unroll
    for (unsigned k = 0; k < 8; ++k) {
      const float av = __shfl_sync(0xffffffffu, (k & 1u) ? ae1 : ae0, 4u * r + (k >> 1));
      const float bv0 = __shfl_sync(0xffffffffu, be0, 4u * k + p);
      const float bv1 = __shfl_sync(0xffffffffu, be1, 4u * k + p);
      acc0 = __fmaf_rn(av, bv0, acc0);
      acc1 = __fmaf_rn(av, bv1, acc1);
    }
    d.e[0] = TD(acc0);
    d.e[1] = TD(acc1);
  }
#else
  float out[64];
  for (int r = 0; r < 8; ++r) {
    float acc[8];
    for (int col = 0; col < 8; ++col) acc[col] = c.e[r * 8 + col];
    for (int k = 0; k < 8; ++k) {
      const float x = a.e[r * 8 + k];
      for (int col = 0; col < 8; ++col) acc[col] = std::fma(x, b.e[k * 8 + col], acc[col]);
    }
    for (int col = 0; col < 8; ++col) out[r * 8 + col] = acc[col];
  }
  if (detail::same_<TD, float>::value) {
    for (int i = 0; i < 64; ++i) d.e[i] = out[i];
  } else {
    for (int i = 0; i < 64; ++i) d.e[i] = float(TD(out[i]));  // one rounding to TD
  }
#endif
}

// d = a * b
template <class TD, class TA, class TB>
PMN_FN void simdgroup_multiply(simdgroup_matrix<TD, 8, 8>& d, const simdgroup_matrix<TA, 8, 8>& a,
                               const simdgroup_matrix<TB, 8, 8>& b) {
  simdgroup_multiply_accumulate(d, a, b, make_filled_simdgroup_matrix<TD, 8, 8>(TD(0)));
}

// --------------------------------------------------------------------------------------------
// Tiles of simdgroup matrices: a pymetalnn extension whose Metal definition is plain MSL 2.3
// (kernels/simdgroup_tile.h; the contract is in docs/dialect.md). Matrix arrays are row-major
// grids of 8x8 blocks.
//  * simdgroup_load_tile<R, C>(d, src, elements_per_row): d[r * C + c] = the block at rows 8r,
//    columns 8c of src (threadgroup memory): R * C simdgroup_loads.
//  * simdgroup_multiply_accumulate_tile<FM, FN>(c, a, b): a 16-deep product, A an FM x 2 grid,
//    B 2 x FN, C FM x FN: c[i][j] = a[i][0] * b[0][j] + c[i][j], then a[i][1] * b[1][j] + that.
//    (c, a, b, elements_per_row): the same with B read from threadgroup memory (the 16 x 8FN
//    region at b), as simdgroup_load_tile<2, FN> would.
// Why: each 8x8 operation alone maps to half a tensor-core instruction (m16n8k8 with rows 8..15
// zeroed) and a transpose of B per product. With the whole tile in view, cuda issues one
// mma.sync.m16n8k16 per two row blocks x one column block (the a0..a3 fragment of m16n8k16 is
// exactly the four half pairs of a[2p][0], a[2p+1][0], a[2p][1], a[2p+1][1] in our layout; C's
// c0c1 / c2c3 are c[2p][j] and c[2p+1][j]), transposes each B block once, and loads four
// blocks per ldmatrix where the rows are 16-byte aligned shared memory (one warp-uniform check
// per tile instead of one alignment branch per block). Float accumulators: the tensor core's
// order of the 16 sums. Half accumulators: one rounding to half per 16-deep product instead of
// two (at least as accurate). Other operand types and the cpu run the 8x8 operations.
// In pmn::ext (the translator qualifies the calls): a source compiled as Metal sees (fake metal
// backend: the cpu translator without __PYMETALNN__) defines the same names itself.
// --------------------------------------------------------------------------------------------
namespace ext {
#ifdef PMN_CUDA
namespace tile {
// Whether ldmatrix may read 8x8 blocks of halves at src with this row pitch: src in shared memory
// and every row 16-byte aligned, in every lane (the check is warp-uniform, as ldmatrix must be).
// `s`: src's shared-window address.
PMN_FN bool ldsm_ok(const void* src, pmn_ulong elements_per_row, unsigned& s) {
  // the builtins (not inline PTX), so that the compiler sees through the generic <-> shared
  // conversions of a threadgroup array's address: for the tiles of a kernel whose offsets are
  // multiples of 16 bytes the test then folds to true at compile time
  s = unsigned(__cvta_generic_to_shared(src));
  const bool ok = __isShared(src) && ((s | unsigned(elements_per_row * 2u)) & 15u) == 0;
  return __all_sync(0xffffffffu, ok);
}
// The lane index as threadIdx.x & 31 (1-D threadgroups, as the translator's
// thread_index_in_simdgroup): a plain register read that the compiler hoists, unlike %laneid.
PMN_FN unsigned lane() { return threadIdx.x & 31u; }

// c[i][j] += A(rows 16p..) x B(column block j) over 16 k: one mma.sync.m16n8k16 per row-block pair
// and column block. a: FM x 2 grid in our layout (the A fragment's a0..a3 as they are); bt[j],
// bt[FN + j]: column block j's b0, b1 (the B fragment layout: B^T in ours).
template <int FM, int FN, class TC>
PMN_FN void mma_k16(simdgroup_matrix<TC, 8, 8>* c, const simdgroup_matrix<half, 8, 8>* a, const unsigned* bt) {
#pragma unroll
  for (int i = 0; i < FM; i += 2) {
    const bool two = i + 1 < FM;  // an odd last row block runs with rows 8..15 zero
    const unsigned a0 = detail::pair_bits(a[2 * i].e), a2 = detail::pair_bits(a[2 * i + 1].e);
    const unsigned a1 = two ? detail::pair_bits(a[2 * i + 2].e) : 0u;
    const unsigned a3 = two ? detail::pair_bits(a[2 * i + 3].e) : 0u;
#pragma unroll
    for (int j = 0; j < FN; ++j) {
      simdgroup_matrix<TC, 8, 8>& lo = c[i * FN + j];
      simdgroup_matrix<TC, 8, 8>& hi = c[(two ? i + 1 : i) * FN + j];
      if constexpr (detail::same_<TC, float>::value) {
        float d0, d1, d2, d3;
        asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%10,%11,%12,%13};"
            : "=f"(d0), "=f"(d1), "=f"(d2), "=f"(d3)
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(bt[j]), "r"(bt[FN + j]), "f"(lo.e[0]), "f"(lo.e[1]),
              "f"(two ? hi.e[0] : 0.f), "f"(two ? hi.e[1] : 0.f));
        lo.e[0] = d0;
        lo.e[1] = d1;
        if (two) {
          hi.e[0] = d2;
          hi.e[1] = d3;
        }
      } else {
        unsigned d0, d1;
        asm("mma.sync.aligned.m16n8k16.row.col.f16.f16.f16.f16 {%0,%1}, {%2,%3,%4,%5}, {%6,%7}, "
            "{%8,%9};"
            : "=r"(d0), "=r"(d1)
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(bt[j]), "r"(bt[FN + j]), "r"(detail::pair_bits(lo.e)),
              "r"(two ? detail::pair_bits(hi.e) : 0u));
        memcpy(lo.e, &d0, 4);
        if (two) memcpy(hi.e, &d1, 4);
      }
    }
  }
}
}  // namespace tile
#endif

template <int R, int C, class T>
PMN_FN void simdgroup_load_tile(simdgroup_matrix<T, 8, 8>* d, const typename detail::ident<T>::type* src,
                                pmn_ulong elements_per_row) {
#ifdef PMN_CUDA
  if constexpr (sizeof(T) == 2 && (R * C) % 4 == 0) {
    static_assert(C % 4 == 0 || 4 % C == 0, "simdgroup_load_tile: C must divide 4 or be a multiple of 4");
    unsigned s;
    if (tile::ldsm_ok(src, elements_per_row, s)) {
      // lanes 8q..8q+7 give the row addresses of block m + q (row l % 8); register q receives it.
      // The lane's part of the offset is the same for every m (m is a multiple of 4 and so is C,
      // or C < 4 divides 4): one constant per instruction on top of it.
      const unsigned l = tile::lane(), q = l >> 3, rr = l & 7u, ld = unsigned(elements_per_row);
      const unsigned lane_off = C % 4 == 0 ? rr * ld + q * 8u : ((q / unsigned(C)) * 8u + rr) * ld + (q % unsigned(C)) * 8u;
      s += lane_off * 2u;
#pragma unroll
      for (int m = 0; m < R * C; m += 4) {
        const unsigned addr = s + ((unsigned(m / C) * 8u) * ld + unsigned(m % C) * 8u) * 2u;
        unsigned r0, r1, r2, r3;
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                     : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                     : "r"(addr));
        memcpy(d[m].e, &r0, 4);
        memcpy(d[m + 1].e, &r1, 4);
        memcpy(d[m + 2].e, &r2, 4);
        memcpy(d[m + 3].e, &r3, 4);
      }
      return;
    }
  }
#endif
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c)
      simdgroup_load(d[r * C + c], src + pmn_ulong(8 * r) * elements_per_row + pmn_ulong(8 * c), elements_per_row);
}

template <int FM, int FN, class TC, class T>
PMN_FN void simdgroup_multiply_accumulate_tile(simdgroup_matrix<TC, 8, 8>* c, const simdgroup_matrix<T, 8, 8>* a,
                                               const simdgroup_matrix<T, 8, 8>* b) {
#ifdef PMN_CUDA
  using detail::same_;
  if constexpr (same_<T, half>::value && (same_<TC, float>::value || same_<TC, half>::value)) {
    unsigned bt[2 * FN];  // B in the m16n8k16 B-fragment layout: b0 = k 0..7, b1 = k 8..15
#pragma unroll
    for (int j = 0; j < 2 * FN; ++j) bt[j] = detail::transpose_h2(detail::pair_bits(b[j].e));
    tile::mma_k16<FM, FN>(c, a, bt);
  } else
#endif
  {
    for (int i = 0; i < FM; ++i)
      for (int j = 0; j < FN; ++j) {
        simdgroup_multiply_accumulate(c[i * FN + j], a[2 * i], b[j], c[i * FN + j]);
        simdgroup_multiply_accumulate(c[i * FN + j], a[2 * i + 1], b[FN + j], c[i * FN + j]);
      }
  }
}

// B straight from threadgroup memory (the 16 x 8FN region at b): on cuda ldmatrix.trans yields
// the B fragments themselves, so B needs no transpose and no registers in our layout.
template <int FM, int FN, class TC, class T>
PMN_FN void simdgroup_multiply_accumulate_tile(simdgroup_matrix<TC, 8, 8>* c, const simdgroup_matrix<T, 8, 8>* a,
                                               const typename detail::ident<T>::type* b,
                                               pmn_ulong elements_per_row) {
#ifdef PMN_CUDA
  using detail::same_;
  if constexpr (same_<T, half>::value && (same_<TC, float>::value || same_<TC, half>::value) && FN % 2 == 0) {
    unsigned s;
    if (tile::ldsm_ok(b, elements_per_row, s)) {
      // x4.trans: matrices (k block 0, column j), (1, j), (0, j + 1), (1, j + 1) -> b0, b1 of
      // columns j and j + 1; lanes 8q..8q+7 address matrix q's rows
      const unsigned l = tile::lane(), q = l >> 3, ld = unsigned(elements_per_row);
      s += (((q & 1u) * 8u + (l & 7u)) * ld + (q >> 1) * 8u) * 2u;
      unsigned bt[2 * FN];
#pragma unroll
      for (int j = 0; j < FN; j += 2) {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                     : "=r"(bt[j]), "=r"(bt[FN + j]), "=r"(bt[j + 1]), "=r"(bt[FN + j + 1])
                     : "r"(s + unsigned(j) * 16u));
      }
      tile::mma_k16<FM, FN>(c, a, bt);
      return;
    }
  }
#endif
  simdgroup_matrix<T, 8, 8> mb[2 * FN];
  simdgroup_load_tile<2, FN>(mb, b, elements_per_row);
  simdgroup_multiply_accumulate_tile<FM, FN>(c, a, mb);
}
}  // namespace ext

// ============================================================================================
// Atomics. 4-byte objects; functions take `volatile A*` so plain and volatile pointers both
// bind. Metal only guarantees memory_order_relaxed; stronger orders add fences (cuda) or map to
// the same C++ order (cpu).
// ============================================================================================
enum memory_order {
  memory_order_relaxed = 0,
  memory_order_consume = 1,
  memory_order_acquire = 2,
  memory_order_release = 3,
  memory_order_acq_rel = 4,
  memory_order_seq_cst = 5,
};
struct atomic_int { int v; };
struct atomic_uint { unsigned v; };
struct atomic_float { float v; };

namespace detail {
template <class A> struct atom {};
template <> struct atom<atomic_int> { typedef int T; };
template <> struct atom<atomic_uint> { typedef unsigned T; };
template <> struct atom<atomic_float> { typedef float T; };
template <class A> using atom_t = typename atom<A>::T;
template <class T> PMN_FN T no_float() {
  static_assert(!sizeof(T*), "and/or/xor are not available for atomic_float");
  return T();
}

#ifdef PMN_CUDA
PMN_FN void fence_before(memory_order o) { if (o != memory_order_relaxed) __threadfence(); }
PMN_FN void fence_after(memory_order o) { if (o != memory_order_relaxed) __threadfence(); }
template <class A> PMN_FN atom_t<A>* ptr(volatile A* o) { return (atom_t<A>*)&o->v; }
// Float min/max by compare-and-swap on the bit pattern.
template <bool IsMax> PMN_FN float cas_minmax(volatile atomic_float* o, float val) {
  unsigned* p = (unsigned*)&o->v;
  unsigned old = *(volatile unsigned*)p;
  while (true) {
    float of = u2f(old);
    float nf = IsMax ? fmax_(of, val) : fmin_(of, val);
    unsigned nb = f2u(nf);
    if (nb == old) return of;
    unsigned seen = atomicCAS(p, old, nb);
    if (seen == old) return of;
    old = seen;
  }
}
#else
PMN_FN int mo(memory_order o) { return (int)o; }
PMN_FN int mo_fail(memory_order o) {  // failure order may not be release / acq_rel
  return o == memory_order_release ? __ATOMIC_RELAXED
         : o == memory_order_acq_rel ? __ATOMIC_ACQUIRE : (int)o;
}
template <class A> PMN_FN atom_t<A>* ptr(volatile A* o) { return (atom_t<A>*)&o->v; }
template <class F> PMN_FN float cas_float(volatile atomic_float* o, memory_order ord, F f) {
  unsigned* p = (unsigned*)&o->v;
  unsigned old = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (true) {
    unsigned nb = f2u(f(u2f(old)));
    if (__atomic_compare_exchange_n(p, &old, nb, false, mo(ord), __ATOMIC_RELAXED))
      return u2f(old);
  }
}
#endif
}  // namespace detail

template <class A>
PMN_FN detail::atom_t<A> atomic_load_explicit(const volatile A* o, memory_order ord) {
  typedef detail::atom_t<A> T;
#ifdef PMN_CUDA
  T r = *(const volatile T*)&o->v;
  detail::fence_after(ord);
  return r;
#else
  T r;
  __atomic_load((T*)&o->v, &r, detail::mo(ord));
  return r;
#endif
}
template <class A>
PMN_FN void atomic_store_explicit(volatile A* o, typename detail::ident<detail::atom_t<A>>::type d,
                                  memory_order ord) {
#ifdef PMN_CUDA
  typedef detail::atom_t<A> T;
  detail::fence_before(ord);
  *(volatile T*)&o->v = d;
#else
  __atomic_store(detail::ptr(o), &d, detail::mo(ord));
#endif
}
template <class A>
PMN_FN detail::atom_t<A> atomic_exchange_explicit(
    volatile A* o, typename detail::ident<detail::atom_t<A>>::type d, memory_order ord) {
  typedef detail::atom_t<A> T;
#ifdef PMN_CUDA
  detail::fence_before(ord);
  T r = atomicExch(detail::ptr(o), d);
  detail::fence_after(ord);
  return r;
#else
  T r;
  __atomic_exchange(detail::ptr(o), &d, &r, detail::mo(ord));
  return r;
#endif
}
// Compares bit patterns (so a float NaN can match itself). Never fails spuriously.
template <class A>
PMN_FN bool atomic_compare_exchange_weak_explicit(
    volatile A* o, detail::atom_t<A>* expected,
    typename detail::ident<detail::atom_t<A>>::type desired, memory_order succ,
    memory_order fail) {
  typedef detail::atom_t<A> T;
#ifdef PMN_CUDA
  (void)fail;
  unsigned e, d, r;
  memcpy(&e, expected, 4);
  memcpy(&d, &desired, 4);
  detail::fence_before(succ);
  r = atomicCAS((unsigned*)&o->v, e, d);
  detail::fence_after(succ);
  if (r == e) return true;
  memcpy(expected, &r, 4);
  return false;
#else
  static_assert(sizeof(T) == 4, "");
  unsigned e, d;
  std::memcpy(&e, expected, 4);
  std::memcpy(&d, &desired, 4);
  bool ok = __atomic_compare_exchange_n((unsigned*)&o->v, &e, d, false, detail::mo(succ),
                                        detail::mo_fail(fail));
  if (!ok) std::memcpy(expected, &e, 4);
  return ok;
#endif
}

// atomic_fetch_<op>_explicit(object o, operand d, order ord) with a body (the rest of the
// arguments) in which T is the value type: the definition both targets share.
#define PMN_ATOMIC_RMW_DEF(name, ...)                                                      \
  template <class A>                                                                       \
  PMN_FN detail::atom_t<A> name(volatile A* o,                                             \
                                typename detail::ident<detail::atom_t<A>>::type d,         \
                                memory_order ord) {                                        \
    typedef detail::atom_t<A> T;                                                           \
    __VA_ARGS__                                                                            \
  }
#ifdef PMN_CUDA
#define PMN_ATOMIC_RMW(name, cuda_int, cuda_float)                                          \
  PMN_ATOMIC_RMW_DEF(name,                                                                 \
    detail::fence_before(ord);                                                             \
    T r;                                                                                   \
    if constexpr (detail::same_<T, float>::value) {                                        \
      cuda_float;                                                                          \
    } else {                                                                               \
      r = cuda_int(detail::ptr(o), d);                                                     \
    }                                                                                      \
    detail::fence_after(ord);                                                              \
    return r;)
#define PMN_NO_FLOAT r = detail::no_float<T>()
PMN_ATOMIC_RMW(atomic_fetch_add_explicit, atomicAdd, r = atomicAdd(detail::ptr(o), d))
PMN_ATOMIC_RMW(atomic_fetch_sub_explicit, atomicSub, r = atomicAdd(detail::ptr(o), -d))
PMN_ATOMIC_RMW(atomic_fetch_min_explicit, atomicMin, r = detail::cas_minmax<false>(o, d))
PMN_ATOMIC_RMW(atomic_fetch_max_explicit, atomicMax, r = detail::cas_minmax<true>(o, d))
PMN_ATOMIC_RMW(atomic_fetch_and_explicit, atomicAnd, PMN_NO_FLOAT)
PMN_ATOMIC_RMW(atomic_fetch_or_explicit, atomicOr, PMN_NO_FLOAT)
PMN_ATOMIC_RMW(atomic_fetch_xor_explicit, atomicXor, PMN_NO_FLOAT)
#else
#define PMN_ATOMIC_RMW(name, int_expr, float_fn)                                            \
  PMN_ATOMIC_RMW_DEF(name,                                                                 \
    if constexpr (detail::same_<T, float>::value) {                                        \
      return detail::cas_float(o, ord, [d](float x) { return float_fn; });                 \
    } else {                                                                               \
      T* p = detail::ptr(o);                                                               \
      return int_expr;                                                                     \
    })
#define PMN_NO_FLOAT detail::no_float<T>()
// min/max for integers: CAS loop via __atomic (no fetch_min builtin before GCC 13).
namespace detail {
template <bool IsMax, class T> PMN_FN T int_minmax(T* p, T d, memory_order ord) {
  T old = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (true) {
    T n = IsMax ? (old < d ? d : old) : (d < old ? d : old);
    if (n == old) return old;
    if (__atomic_compare_exchange_n(p, &old, n, false, mo(ord), __ATOMIC_RELAXED)) return old;
  }
}
}  // namespace detail
PMN_ATOMIC_RMW(atomic_fetch_add_explicit, __atomic_fetch_add(p, d, detail::mo(ord)), x + d)
PMN_ATOMIC_RMW(atomic_fetch_sub_explicit, __atomic_fetch_sub(p, d, detail::mo(ord)), x - d)
PMN_ATOMIC_RMW(atomic_fetch_min_explicit, detail::int_minmax<false>(p, d, ord),
               detail::fmin_(x, d))
PMN_ATOMIC_RMW(atomic_fetch_max_explicit, detail::int_minmax<true>(p, d, ord),
               detail::fmax_(x, d))
PMN_ATOMIC_RMW(atomic_fetch_and_explicit, __atomic_fetch_and(p, d, detail::mo(ord)), PMN_NO_FLOAT)
PMN_ATOMIC_RMW(atomic_fetch_or_explicit, __atomic_fetch_or(p, d, detail::mo(ord)), PMN_NO_FLOAT)
PMN_ATOMIC_RMW(atomic_fetch_xor_explicit, __atomic_fetch_xor(p, d, detail::mo(ord)), PMN_NO_FLOAT)
#endif
#undef PMN_ATOMIC_RMW
#undef PMN_ATOMIC_RMW_DEF
#undef PMN_NO_FLOAT

}  // namespace pmn

typedef pmn::simdgroup_float8x8 pmn_simdgroup_float8x8;
typedef pmn::simdgroup_half8x8 pmn_simdgroup_half8x8;
typedef pmn::atomic_int pmn_atomic_int;
typedef pmn::atomic_uint pmn_atomic_uint;
typedef pmn::atomic_float pmn_atomic_float;
static_assert(sizeof(pmn_atomic_int) == 4 && sizeof(pmn_atomic_float) == 4, "atomic layout");

#endif  // PMN_PRELUDE_H
