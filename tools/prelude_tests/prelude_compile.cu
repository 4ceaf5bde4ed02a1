// prelude_compile.cu -- instantiates every prelude operator and function for each type (NVRTC only,
// tools/prelude_check.py --cuda).
#include "pmn_prelude.h"
PMN_CONSTANT pmn_half k_half = pmn_half(1.0f);
PMN_CONSTANT pmn_half k_halves[3] = {pmn_half(0.1f), pmn_half(2049.0f), pmn_half(1e-7f)};
PMN_CONSTANT pmn_float4 k_vec = pmn_float4(pmn_float2(1, 2), 3, 4);
PMN_CONSTANT pmn_half4 k_hvec = pmn_half4(1, 2.0f, 0.5, pmn_half(3.0f));
PMN_CONSTANT float k_tab[4] = {1.0f, 2.0f, 3.0f, 4.0f};
static_assert(pmn_half(2049.0f).bits == 0x6800 && pmn_half(0.1f).bits == 0x2e66, "constexpr half");
static_assert(pmn_half(0x1p-25f).bits == 0 && pmn_half(65520.0f).bits == 0x7c00, "constexpr half");
static_assert((float)pmn_half::from_bits(0x0001) == 0x1p-24f, "constexpr h2f");
static_assert(sizeof(pmn_float3) == 16 && alignof(pmn_float4) == 16 && sizeof(pmn_half3) == 8, "layout");

template <class T> __device__ void sink(T* o, const T& v) { *o = v; }

// Arithmetic, comparison and compound operators of a scalar or vector type.
template <class T> __device__ void ops_common(T* o, T a, T b) {
  sink(o, a + b); sink(o, a - b); sink(o, a * b); sink(o, a / b); sink(o, -a); sink(o, +a);
  T c = a; c += b; c -= b; c *= b; c /= b; sink(o, c);
}
template <class T> __device__ void ops_int(T* o, T a, T b) {
  ops_common(o, a, b);
  sink(o, a % b); sink(o, a & b); sink(o, a | b); sink(o, a ^ b); sink(o, a << b); sink(o, a >> b);
  sink(o, ~a);
  T c = a; c %= b; c &= b; c |= b; c ^= b; c <<= b; c >>= b; sink(o, c);
}
template <class V, class S> __device__ void ops_vec_scalar(V* o, bool* ob, V a, S s) {
  sink(o, a + s); sink(o, s + a); sink(o, a - s); sink(o, s - a); sink(o, a * s); sink(o, s * a);
  sink(o, a / s); sink(o, s / a); V c = a; c += s; c -= s; c *= s; c /= s; c++; ++c; c--; --c; sink(o, c);
  *ob = pmn::all(a == s) || pmn::any(a != s) || pmn::all(a < s) || pmn::any(s <= a) || pmn::all(a > s) ||
        pmn::any(a >= s) || pmn::all(!(a == a)) || pmn::any(a < a && a > s) || pmn::any(a < a || a > s);
}
template <class V> __device__ void ops_vec_int_scalar(V* o, V a, typename V::value_type s) {
  sink(o, a % s); sink(o, s % a); sink(o, a & s); sink(o, s | a); sink(o, a ^ s); sink(o, a << s);
  sink(o, s >> a);
}
// Floating-point functions for float, half and their vectors.
template <class T> __device__ void fn_float(T* o, bool* ob, T a, T b, T c) {
  sink(o, pmn::exp(a)); sink(o, pmn::exp2(a)); sink(o, pmn::exp10(a)); sink(o, pmn::log(a));
  sink(o, pmn::log2(a)); sink(o, pmn::log10(a)); sink(o, pmn::sqrt(a)); sink(o, pmn::rsqrt(a));
  sink(o, pmn::pow(a, b)); sink(o, pmn::powr(a, b)); sink(o, pmn::tanh(a)); sink(o, pmn::sinh(a));
  sink(o, pmn::cosh(a)); sink(o, pmn::sin(a)); sink(o, pmn::cos(a)); sink(o, pmn::tan(a));
  sink(o, pmn::asin(a)); sink(o, pmn::acos(a)); sink(o, pmn::atan(a)); sink(o, pmn::atan2(a, b));
  sink(o, pmn::abs(a)); sink(o, pmn::fabs(a)); sink(o, pmn::min(a, b)); sink(o, pmn::max(a, b));
  sink(o, pmn::fmin(a, b)); sink(o, pmn::fmax(a, b)); sink(o, pmn::clamp(a, b, c));
  sink(o, pmn::fma(a, b, c)); sink(o, pmn::mad(a, b, c)); sink(o, pmn::mix(a, b, c));
  sink(o, pmn::select(a, b, true)); sink(o, pmn::floor(a)); sink(o, pmn::ceil(a)); sink(o, pmn::round(a));
  sink(o, pmn::rint(a)); sink(o, pmn::trunc(a)); sink(o, pmn::fract(a)); sink(o, pmn::fmod(a, b));
  sink(o, pmn::sign(a)); sink(o, pmn::step(a, b)); sink(o, pmn::smoothstep(a, b, c));
  sink(o, pmn::copysign(a, b)); sink(o, pmn::saturate(a)); sink(o, pmn::divide(a, b));
  *ob = pmn::all(pmn::isnan(a)) || pmn::any(pmn::isinf(b)) || pmn::all(pmn::isfinite(c)) || pmn::any(pmn::signbit(a));
  sink(o, pmn::precise::exp(a)); sink(o, pmn::precise::sqrt(a)); sink(o, pmn::precise::max(a, b));
  sink(o, pmn::fast::exp(a)); sink(o, pmn::fast::exp2(a)); sink(o, pmn::fast::exp10(a));
  sink(o, pmn::fast::log(a)); sink(o, pmn::fast::log2(a)); sink(o, pmn::fast::log10(a));
  sink(o, pmn::fast::sqrt(a)); sink(o, pmn::fast::rsqrt(a)); sink(o, pmn::fast::tanh(a));
  sink(o, pmn::fast::sin(a)); sink(o, pmn::fast::cos(a)); sink(o, pmn::fast::tan(a));
  sink(o, pmn::fast::pow(a, b)); sink(o, pmn::fast::powr(a, b)); sink(o, pmn::fast::divide(a, b));
  sink(o, pmn::fast::clamp(a, b, c)); sink(o, pmn::fast::mix(a, b, c)); sink(o, pmn::fast::atan(a));
}
template <class V> __device__ void fn_geom(V* o, typename V::value_type* os, V a, V b) {
  sink(os, pmn::dot(a, b)); sink(os, pmn::length(a)); sink(os, pmn::distance(a, b));
  sink(os, pmn::length_squared(a)); sink(os, pmn::distance_squared(a, b));
  sink(o, pmn::normalize(a)); sink(o, pmn::fast::normalize(a)); sink(os, pmn::fast::length(a));
  sink(os, pmn::fast::distance(a, b)); sink(os, pmn::precise::length(a));
  sink(o, pmn::max(a, 0.0f)); sink(o, pmn::min(1, a)); sink(o, pmn::clamp(a, 0.0f, 1.0f));
  sink(o, pmn::mix(a, b, 0.5f)); sink(o, pmn::step(0.5f, a)); sink(o, pmn::smoothstep(0.0f, 1.0f, a));
  sink(o, pmn::fma(a, 2.0f, b)); sink(o, pmn::pow(a, 2.0f)); sink(o, pmn::select(a, b, a < b));
}
template <class T> __device__ void fn_int(T* o, T a, T b, T c) {
  sink(o, pmn::abs(a)); sink(o, pmn::min(a, b)); sink(o, pmn::max(a, b)); sink(o, pmn::clamp(a, b, c));
  sink(o, pmn::select(a, b, true));
}
// SIMD-group functions for one type.
template <class T> __device__ void simd_arith(T* o, T v) {
  sink(o, pmn::simd_sum(pmn::site_t{1}, v)); sink(o, pmn::simd_product(pmn::site_t{2}, v));
  sink(o, pmn::simd_max(pmn::site_t{3}, v)); sink(o, pmn::simd_min(pmn::site_t{4}, v));
  sink(o, pmn::simd_prefix_exclusive_sum(pmn::site_t{5}, v));
  sink(o, pmn::simd_prefix_inclusive_sum(pmn::site_t{6}, v));
  sink(o, pmn::simd_prefix_exclusive_product(pmn::site_t{7}, v));
  sink(o, pmn::simd_prefix_inclusive_product(pmn::site_t{8}, v));
}
template <class T> __device__ void simd_perm(T* o, T v, unsigned i) {
  sink(o, pmn::simd_shuffle(pmn::site_t{9}, v, i)); sink(o, pmn::simd_shuffle_xor(pmn::site_t{10}, v, 1u));
  sink(o, pmn::simd_shuffle_up(pmn::site_t{11}, v, 2u)); sink(o, pmn::simd_shuffle_down(pmn::site_t{12}, v, 2u));
  sink(o, pmn::simd_broadcast(pmn::site_t{13}, v, 3u)); sink(o, pmn::simd_broadcast_first(pmn::site_t{14}, v));
}
template <class T> __device__ void simd_bits(T* o, T v) {
  sink(o, pmn::simd_and(pmn::site_t{15}, v)); sink(o, pmn::simd_or(pmn::site_t{16}, v));
  sink(o, pmn::simd_xor(pmn::site_t{17}, v));
}
// Atomics for one object type.
template <class A, class T> __device__ void atomics(A* p, T* o, T v) {
  const auto R = pmn::memory_order_relaxed;
  sink(o, pmn::atomic_load_explicit(p, R)); pmn::atomic_store_explicit(p, v, R);
  sink(o, pmn::atomic_exchange_explicit(p, v, R)); sink(o, pmn::atomic_fetch_add_explicit(p, v, R));
  sink(o, pmn::atomic_fetch_sub_explicit(p, v, R)); sink(o, pmn::atomic_fetch_min_explicit(p, v, R));
  sink(o, pmn::atomic_fetch_max_explicit(p, v, pmn::memory_order_seq_cst));
  T e = v;
  *o += (T)pmn::atomic_compare_exchange_weak_explicit(p, &e, v, R, R);
  volatile A* vp = p;
  sink(o, pmn::atomic_fetch_add_explicit(vp, v, R));
}
template <class A, class T> __device__ void atomics_int(A* p, T* o, T v) {
  atomics(p, o, v);
  const auto R = pmn::memory_order_relaxed;
  sink(o, pmn::atomic_fetch_and_explicit(p, v, R)); sink(o, pmn::atomic_fetch_or_explicit(p, v, R));
  sink(o, pmn::atomic_fetch_xor_explicit(p, v, R));
}

#define SCALARS(X) X(float) X(pmn_half) X(int) X(pmn_uint)
extern "C" __global__ void t_half(pmn_half* oh, float* of, bool* ob, int* oi, const float* x) {
  pmn_half h = x[0];
  float f = h;
  sink(of, h * 2.0f); sink(of, 2.0f * h); sink(oh, h + h); sink(ob, h < 0.5f); sink(oh, pmn::max(h, h));
  sink(oh, h * 2); sink(oh, 3u + h); sink(of, h + 1.0); sink(oh, pmn_half(f)); sink(oi, (int)h);
  sink(ob, h == 1); sink(ob, 1.0f != h); sink(ob, h <= h); sink(ob, h >= 0.0f); sink(ob, h > 2u);
  pmn_half c = h; c += h; c += 1.0f; c += 2; c -= h; c *= 2.0f; c /= 3; ++c; c++; --c; c--; sink(oh, c);
  sink(oh, pmn_half(0.5)); sink(oh, pmn_half(7ull)); sink(oh, pmn::fma(h, h, h)); sink(oi, (int)(bool)h);
  sink(of, f + k_half + k_halves[1] + k_vec.w + (float)k_hvec.y + k_tab[threadIdx.x & 3]);
  sink(oh, pmn::as_type<pmn_half>((pmn_ushort)0x3c00)); sink(oi, (int)pmn::as_type<pmn_ushort>(h));
  sink(oi, (int)pmn::as_type<pmn_uint>(1.0f)); sink(of, pmn::as_type<float>(pmn_half2(h, h)));
  PMN_THREADGROUP pmn_half sh[64];
  PMN_THREADGROUP pmn_float4 s4[64];
  sh[threadIdx.x] = h; s4[threadIdx.x] = k_vec * f;
  pmn::threadgroup_barrier(pmn::mem_flags::mem_threadgroup);
  pmn::threadgroup_barrier(pmn::mem_flags::mem_device | pmn::mem_flags::mem_threadgroup);
  pmn::simdgroup_barrier(pmn::site_t{0}, pmn::mem_flags::mem_none);
  sink(oh, sh[threadIdx.x ^ 1]); sink(of, s4[threadIdx.x ^ 2].z);
}
extern "C" __global__ void t_scalar_ops(float* of, pmn_half* oh, int* oi, pmn_uint* ou, short* os,
                                        const float* x) {
  ops_common(of, x[0], x[1]); ops_common(oh, pmn_half(x[0]), pmn_half(x[1]));
  ops_int(oi, (int)x[0], (int)x[1]); ops_int(ou, (pmn_uint)x[0], (pmn_uint)x[1]);
  fn_float(of, (bool*)oi, x[0], x[1], x[2]); fn_float(oh, (bool*)oi, pmn_half(x[0]), pmn_half(x[1]), pmn_half(x[2]));
  fn_int(oi, (int)x[0], 1, 2); fn_int(ou, (pmn_uint)x[0], 1u, 2u); fn_int(os, (short)x[0], (short)1, (short)2);
  sink(of, pmn::max(x[0], 1)); sink(ou, pmn::max(1u, (pmn_uint)x[0])); sink(oh, pmn::clamp(pmn_half(x[0]), 0, 1));
  sink(of, pmn::clamp(x[0], 0, 1)); sink(of, pmn::min(pmn_half(x[0]), 1.0f)); sink(of, pmn::exp(1));
  sink(oi, pmn::select(1, 2, x[0] > 0)); sink(oi, (int)pmn::abs(-3));
}
#define VEC_KERNEL(T, name)                                                                      \
  extern "C" __global__ void t_vec_##name(T##2* o2, T##3* o3, T##4* o4, bool* ob, const T##4* x) { \
    T##4 a = x[0], b = x[1];                                                                     \
    T##2 a2(a.x, a.y), b2 = T##2(b.x, b.y);                                                      \
    T##3 a3(a2, a.z), b3 = T##3(b.x, b2);                                                        \
    T##4 c(a3, a.w), d(a2, b2), e(a.x, a3), g = a.x;                                             \
    sink(o4, c + d + e + g); sink(o4, T##4(1)); sink(o4, T##4(1, 2, 3, 4));                      \
    a[threadIdx.x & 3] = b[(threadIdx.x + 1) & 3];                                               \
    sink(o4, a); sink(o3, a3); sink(o2, a2);                                                     \
    ops_common(o2, a2, b2); ops_common(o3, a3, b3); ops_common(o4, a, b);                        \
    ops_vec_scalar(o2, ob, a2, b.x); ops_vec_scalar(o3, ob, a3, b.y); ops_vec_scalar(o4, ob, a, b.z); \
    ops_vec_scalar(o4, ob, a, 1);                                                                \
    *ob = pmn::all(a == b) || pmn::any(a != b) || pmn::all(a < b) || pmn::all(a <= b) ||         \
          pmn::all(a > b) || pmn::all(a >= b) || pmn::all(!a);                                   \
  }
VEC_KERNEL(pmn_float, float)
VEC_KERNEL(pmn_half, half)
VEC_KERNEL(pmn_int, int)
VEC_KERNEL(pmn_uint, uint)
VEC_KERNEL(pmn_short, short)
VEC_KERNEL(pmn_ushort, ushort)
VEC_KERNEL(pmn_char, char)
VEC_KERNEL(pmn_uchar, uchar)
extern "C" __global__ void t_vec_int_ops(pmn_int2* o2, pmn_int3* o3, pmn_int4* o4, pmn_uint4* ou4, pmn_uchar4* oc4,
                                         pmn_bool4* ob4, const pmn_int4* x) {
  pmn_int4 a = x[0], b = x[1];
  ops_int(o2, pmn_int2(a.x, a.y), pmn_int2(b.x, b.y)); ops_int(o3, pmn_int3(a.x, a.y, a.z), pmn_int3(b.x, b.y, b.z));
  ops_int(o4, a, b); ops_int(ou4, pmn_uint4(a), pmn_uint4(b)); ops_int(oc4, pmn_uchar4(a), pmn_uchar4(b));
  ops_vec_int_scalar(o4, a, 3); ops_vec_int_scalar(ou4, pmn_uint4(a), 3u);
  fn_int(o4, a, b, pmn_int4(7)); fn_int(ou4, pmn_uint4(a), pmn_uint4(b), pmn_uint4(9));
  sink(o4, pmn::max(a, 0)); sink(o4, pmn::clamp(a, 0, 10)); sink(o4, pmn::select(a, b, a < b));
  pmn_bool4 bb = a < b; sink(ob4, bb); sink(ob4, !bb); sink(ob4, bb & pmn_bool4(true)); sink(ob4, bb | bb);
  sink(ob4, pmn_bool4(a)); sink(o4, pmn_int4(pmn_float4(a) * 0.5f)); sink(o4, pmn::as_type<pmn_int4>(pmn_float4(a)));
  sink(o2, pmn::as_type<pmn_int2>(pmn_half4(a))); sink(o4, pmn::abs(pmn_int4(pmn_char4(a))));
  pmn::vec<pmn_long, 2> l2(a.x, 5); pmn::vec<pmn_ulong, 4> l4(7ull); sink((pmn::vec<pmn_long, 2>*)o4, l2 + l2);
  sink((pmn::vec<pmn_ulong, 4>*)o4, l4 * 3ull);
}
extern "C" __global__ void t_vec_math(pmn_float2* o2, pmn_float3* o3, pmn_float4* o4, pmn_half2* h2,
                                      pmn_half3* h3, pmn_half4* h4, float* of, pmn_half* oh, pmn_bool4* ob,
                                      const pmn_float4* x) {
  pmn_float4 a = x[0], b = x[1], c = x[2];
  fn_float(o4, (bool*)ob, a, b, c); fn_float(o2, (bool*)ob, pmn_float2(a.x, a.y), pmn_float2(b.x, b.y), pmn_float2(c.x, c.y));
  fn_float(o3, (bool*)ob, pmn_float3(a.x, a.y, a.z), pmn_float3(b.x, b.y, b.z), pmn_float3(c.x, c.y, c.z));
  fn_float(h4, (bool*)ob, pmn_half4(a), pmn_half4(b), pmn_half4(c));
  fn_float(h2, (bool*)ob, pmn_half2(a.x, a.y), pmn_half2(b.x, b.y), pmn_half2(c.x, c.y));
  fn_float(h3, (bool*)ob, pmn_half3(a.x, a.y, a.z), pmn_half3(b.x, b.y, b.z), pmn_half3(c.x, c.y, c.z));
  fn_geom(o4, of, a, b); fn_geom(o2, of, pmn_float2(a.x, a.y), pmn_float2(b.x, b.y));
  fn_geom(o3, of, pmn_float3(a.x, a.y, a.z), pmn_float3(b.x, b.y, b.z));
  fn_geom(h4, oh, pmn_half4(a), pmn_half4(b)); fn_geom(h3, oh, pmn_half3(a.x, a.y, a.z), pmn_half3(b.x, b.y, b.z));
  sink(o3, pmn::cross(pmn_float3(a.x, a.y, a.z), pmn_float3(b.x, b.y, b.z)));
  sink(h3, pmn::cross(pmn_half3(a.x, a.y, a.z), pmn_half3(b.x, b.y, b.z)));
  sink(ob, pmn::isnan(a)); sink(ob, pmn::isinf(pmn_half4(a))); sink(o4, pmn::select(a, b, pmn::isfinite(c)));
  sink(o4, pmn_float4(pmn_half4(a))); sink(o4, pmn::max(a, pmn_half(1.0f))); sink(h4, pmn::max(pmn_half4(a), 0));
  sink(h4, pmn_half4(a) * 2.0f); sink(o4, a * pmn_half(2.0f)); sink(h4, pmn::mix(pmn_half4(a), pmn_half4(b), pmn_half(0.5f)));
}
extern "C" __global__ void t_simd(float* of, pmn_half* oh, int* oi, pmn_uint* ou, short* os, pmn_float4* o4,
                                  pmn_half2* oh2, pmn_int4* oi4, pmn_uint2* ou2, bool* ob, pmn_ulong* ol,
                                  const float* x) {
  float f = x[threadIdx.x];
  unsigned i = threadIdx.x;
  simd_arith(of, f); simd_arith(oh, pmn_half(f)); simd_arith(oi, (int)i); simd_arith(ou, i);
  simd_arith(os, (short)i); simd_arith(o4, pmn_float4(f)); simd_arith(oh2, pmn_half2(f));
  simd_arith(oi4, pmn_int4((int)i)); simd_arith(ou2, pmn_uint2(i));
  simd_perm(of, f, i ^ 7); simd_perm(oh, pmn_half(f), i); simd_perm(oi, (int)i, i); simd_perm(ou, i, i);
  simd_perm(o4, pmn_float4(f), i); simd_perm(oh2, pmn_half2(f), i); simd_perm(oi4, pmn_int4((int)i), i);
  simd_perm(os, (short)i, i);
  simd_bits(oi, (int)i); simd_bits(ou, i); simd_bits(os, (short)i); simd_bits(oi4, pmn_int4((int)i)); simd_bits(ou2, pmn_uint2(i));
  sink(ob, pmn::simd_all(pmn::site_t{20}, f > 0)); sink(ob, pmn::simd_any(pmn::site_t{21}, f > 0));
  sink(ob, pmn::simd_is_first(pmn::site_t{22}));
  pmn::simd_vote v = pmn::simd_ballot(pmn::site_t{23}, f > 0);
  sink(ol, (pmn_ulong)v); sink(ob, v.all()); sink(ob, v.any());
  pmn_ulong m = pmn::simd_ballot(pmn::site_t{24}, true); sink(ol, m);
}
extern "C" __global__ void t_atomics(pmn_atomic_int* ai, pmn_atomic_uint* au, pmn_atomic_float* af,
                                     int* oi, pmn_uint* ou, float* of) {
  atomics_int(ai, oi, 1); atomics_int(au, ou, 1u); atomics(af, of, 1.0f);
  PMN_THREADGROUP pmn_atomic_int tg_counter;
  if (threadIdx.x == 0) pmn::atomic_store_explicit(&tg_counter, 0, pmn::memory_order_relaxed);
  pmn::threadgroup_barrier(pmn::mem_flags::mem_threadgroup);
  pmn::atomic_fetch_add_explicit(&tg_counter, 1, pmn::memory_order_relaxed);
}
