// xk.h -- the cross-check kernel of tools/prelude_check.py, compiled for both targets (prelude_test.cpp,
// prelude_xk.cu). Every thread writes XK_NOUT 32-bit results and a kind code per result ('h' half
// bits, 'f' float bits, 'i' integer, 'a' float approx (libm), 'b' half approx). Site ids are __LINE__
// (one SIMD call per line), increasing in source order like the front end's call-site ids.
#pragma once
#define XK_TG 64
#define XK_NOUT 256
#define XK_SIMD0 128  /* index of the first SIMD-group output */
#define XK_NSCEN 6
#define XK_SITE pmn::site_t{__LINE__}  /* one SIMD call per line; NVRTC lacks __COUNTER__ */

PMN_FN unsigned xk_hash(unsigned x) {
  x ^= x >> 16; x *= 0x7feb352dU; x ^= x >> 15; x *= 0x846ca68bU; x ^= x >> 16;
  return x;
}
PMN_FN float xk_special(unsigned i) {
  switch (i % 17) {
    case 0: return pmn::as_type<float>(0x7f800000u);   /* +inf */
    case 1: return pmn::as_type<float>(0xff800000u);   /* -inf */
    case 2: return pmn::as_type<float>(0x7fc00000u);   /* qNaN */
    case 3: return pmn::as_type<float>(0xffc12345u);   /* -NaN with payload */
    case 4: return 65504.0f;
    case 5: return pmn::as_type<float>(0x477fefffu);   /* just below 65520 */
    case 6: return 65520.0f;                           /* rounds to inf */
    case 7: return 0x1p-24f;                           /* smallest subnormal half */
    case 8: return 0x1p-25f;                           /* tie -> 0 */
    case 9: return 0x1.8p-25f;                         /* -> 2^-24 */
    case 10: return 0.1f;
    case 11: return 2049.0f;                           /* tie -> 2048 */
    case 12: return 1e-8f;
    case 13: return -3.5f;
    case 14: return 0.0f;
    case 15: return -0.0f;
    default: return 0x1.ffcp-15f;                      /* subnormal half boundary region */
  }
}
/* Any float: specials, or sign/exponent/mantissa covering half's whole range and beyond. */
PMN_FN float xk_float(unsigned seed) {
  unsigned h = xk_hash(seed);
  if ((h & 7u) == 0) return xk_special(h >> 3);
  unsigned e = 100u + ((h >> 3) % 46u);  /* 2^-27 .. 2^18 */
  unsigned m = xk_hash(seed ^ 0x9e3779b9u) & 0x7fffffu;
  if ((h >> 9) & 1u) m &= 0x7fe000u;     /* sometimes exactly representable in half */
  return pmn::as_type<float>(((h >> 31) << 31) | (e << 23) | m);
}
/* Finite values 2^-9 .. 2^8 with full mantissas: float sums depend on the order. */
PMN_FN float xk_sum_val(unsigned seed) {
  unsigned h = xk_hash(seed);
  return pmn::as_type<float>(((h >> 31) << 31) | ((118u + (h >> 3) % 17u) << 23) |
                             (xk_hash(seed + 77u) & 0x7fffffu));
}
/* Values near +-1 for products. */
PMN_FN float xk_prod_val(unsigned seed) {
  unsigned h = xk_hash(seed);
  return pmn::as_type<float>(((h >> 31) << 31) | 0x3f800000u | (h & 0x1fffffu));
}
PMN_FN bool xk_active(unsigned scen, unsigned tid) {
  unsigned lane = tid & 31u;
  switch (scen) {
    case 1: return ((lane * 11u) % 32u) < 19u;
    case 2: return tid < 45u;
    case 3: return lane == 9u;
    case 4: return (lane % 3u) != 1u;
    case 5: return (xk_hash(tid * 3u + 1u) & 3u) != 0u;
    default: return true;
  }
}

struct XkOut {
  unsigned* out;
  unsigned char* kinds;
  int o;
};
template <class T> PMN_FN unsigned xk_bits(const T& v) {
  unsigned r = 0;
  PMN_MEMCPY(&r, &v, sizeof(T) < 4 ? sizeof(T) : 4);
  return r;
}
#define XK_PUT(k, v) do { xk.out[xk.o] = xk_bits(v); xk.kinds[xk.o] = (unsigned char)(k); ++xk.o; } while (0)
#define XK_PUT4(k, v) do { XK_PUT(k, (v).x); XK_PUT(k, (v).y); XK_PUT(k, (v).z); XK_PUT(k, (v).w); } while (0)

PMN_FN void xk_body(unsigned tid, unsigned scen, unsigned* out_all, unsigned char* kinds,
                    unsigned* scratch) {
  XkOut xk{out_all + tid * XK_NOUT, kinds, 0};
  const unsigned lane = tid & 31u;
  const unsigned seed = tid * 7919u + scen * 104729u;
  const float fa = xk_float(seed), fb = xk_float(seed + 1u), fc = xk_float(seed + 2u);
  const pmn_half ha = fa, hb = fb, hc = fc;

  /* ---- half conversions and arithmetic (exact, bit-identical on both targets) ---- */
  XK_PUT('h', ha.bits); XK_PUT('h', hb.bits); XK_PUT('h', hc.bits);
  XK_PUT('f', (float)ha); XK_PUT('f', (float)hb);
  XK_PUT('h', (ha + hb).bits); XK_PUT('h', (ha - hb).bits); XK_PUT('h', (ha * hb).bits);
  XK_PUT('h', (ha / hb).bits); XK_PUT('h', pmn::fma(ha, hb, hc).bits);
  XK_PUT('h', pmn::fma(pmn_half::from_bits(0x3d61), pmn_half::from_bits((unsigned short)(0x0df3 + (tid & 1u))), pmn_half(1.0f)).bits);
  XK_PUT('h', (-ha).bits); XK_PUT('h', pmn::abs(ha).bits); XK_PUT('h', pmn::sqrt(ha).bits);
  XK_PUT('h', pmn::max(ha, hb).bits); XK_PUT('h', pmn::min(ha, hb).bits);
  XK_PUT('h', (ha * 3).bits); XK_PUT('h', (2u + ha).bits);
  XK_PUT('h', pmn_half((double)fa * 3.0).bits);
  XK_PUT('h', pmn::rint(ha).bits); XK_PUT('h', pmn::floor(ha).bits); XK_PUT('h', pmn::fract(ha).bits);
  XK_PUT('h', pmn::clamp(ha, pmn_half(-1.0f), pmn_half(1.0f)).bits);
  XK_PUT('h', pmn::mix(ha, hb, pmn_half(0.25f)).bits);
  XK_PUT('i', ha < hb); XK_PUT('i', ha == hb); XK_PUT('i', ha <= 1);
  XK_PUT('f', ha + 1.5f); XK_PUT('f', ha * fb);
  {
    pmn_half h2 = ha; h2 += hb; h2 *= 2; h2 -= 0.5f; ++h2;
    XK_PUT('h', h2.bits);
  }
  /* float min/max corner cases: signed zeros and NaN payloads made at run time */
  const float z1 = pmn::as_type<float>((tid & 1u) << 31), z2 = pmn::as_type<float>((tid & 2u) << 30);
  const float n1 = pmn::as_type<float>(0x7fc00000u | (tid & 0xffu));
  const float n2 = pmn::as_type<float>(0xffc00000u | (tid << 8));
  XK_PUT('f', pmn::max(fa, fb)); XK_PUT('f', pmn::min(fa, fb));
  XK_PUT('f', pmn::max(z1, z2)); XK_PUT('f', pmn::min(z1, z2));
  XK_PUT('f', pmn::fmax(n1, n2)); XK_PUT('f', pmn::fmin(n1, n2));
  XK_PUT('h', pmn::max(pmn_half(z1), pmn_half(z2)).bits); XK_PUT('h', pmn::min(pmn_half(z1), pmn_half(z2)).bits);
  XK_PUT('h', pmn::max(pmn_half(n1), pmn_half(n2)).bits);
  XK_PUT('f', pmn::clamp(fa, -1.0f, 1.0f)); XK_PUT('f', pmn::saturate(fa)); XK_PUT('f', pmn::sign(fa));
  XK_PUT('f', pmn::step(fb, fa)); XK_PUT('f', pmn::fract(fa)); XK_PUT('f', pmn::round(fa));
  XK_PUT('f', pmn::mix(fa, fb, 0.375f)); XK_PUT('f', pmn::smoothstep(-1.0f, 2.0f, fa));
  XK_PUT('f', pmn::fma(fa, fb, fc)); XK_PUT('f', pmn::fmod(fa, fb)); XK_PUT('f', pmn::copysign(fa, fb));
  XK_PUT('f', pmn::sqrt(fa)); XK_PUT('f', fa / fb);
  {
    const float sub = pmn::as_type<float>(((tid & 4u) << 29) | (tid + 1u));  /* f32 subnormal */
    XK_PUT('f', pmn::sign(sub)); XK_PUT('f', pmn::abs(sub));
    XK_PUT('i', pmn::isfinite(sub) + 2 * pmn::isnan(sub) + 4 * pmn::isinf(sub) + 8 * pmn::signbit(sub));
  }
  /* vectors */
  {
    pmn_half4 h4a(ha, hb, hc, ha), h4b(hc, ha, hb, pmn_half(0.5f));
    XK_PUT4('h', h4a + h4b); XK_PUT4('h', h4a * h4b); XK_PUT4('h', h4a - h4b);
    XK_PUT4('h', pmn::fma(h4a, h4b, pmn_half4(hc, hb, ha, hc)));
    pmn_half2 h2a(ha, hb), h2b(hc, ha);
    pmn_half2 h2s = h2a * h2b + h2a; XK_PUT('h', h2s.x.bits); XK_PUT('h', h2s.y.bits);
    h2s = pmn::fma(h2a, h2b, h2a) - 1.0f; XK_PUT('h', h2s.x.bits); XK_PUT('h', h2s.y.bits);
    pmn_float4 f4a(xk_sum_val(seed + 3u), xk_sum_val(seed + 4u), xk_sum_val(seed + 5u), fa);
    pmn_float3 f3a(f4a.x, f4a.y, f4a.z), f3b(f4a.w, f4a.z, xk_sum_val(seed + 6u));
    XK_PUT('f', pmn::dot(f3a, f3b)); XK_PUT('f', pmn::length(f3a));
    pmn_float3 nn = pmn::normalize(f3a); XK_PUT('f', nn.x); XK_PUT('f', nn.y); XK_PUT('f', nn.z);
    pmn_float3 cr = pmn::cross(f3a, f3b); XK_PUT('f', cr.x); XK_PUT('f', cr.y); XK_PUT('f', cr.z);
    XK_PUT4('f', pmn::max(f4a, 0.0f));
  }
  /* libm: agree within a tolerance only */
  {
    float pa = pmn::fabs(xk_sum_val(seed + 9u));
    XK_PUT('a', pmn::exp(fa)); XK_PUT('a', pmn::log(pa)); XK_PUT('a', pmn::sin(pa)); XK_PUT('a', pmn::cos(pa));
    XK_PUT('a', pmn::tanh(fa)); XK_PUT('a', pmn::pow(pa, 1.25f)); XK_PUT('a', pmn::exp2(fb)); XK_PUT('a', pmn::rsqrt(pa));
    XK_PUT('a', pmn::atan2(fa, fb)); XK_PUT('a', pmn::exp10(pmn::clamp(fa, -10.0f, 10.0f)));
    XK_PUT('b', (float)pmn::exp(pmn_half(pmn::clamp(fa, -8.0f, 8.0f))));
    XK_PUT('b', (float)pmn::log(pmn_half(pa)));
  }
  const int used0 = xk.o;
  while (xk.o < XK_SIMD0) XK_PUT('i', 0u);
  xk.out[XK_SIMD0 - 1] = (unsigned)used0;  /* layout check: must stay below XK_SIMD0 */

  /* ---- threadgroup barrier with some threads already returned (scenario-dependent) ---- */
  const bool act = xk_active(scen, tid);
  if (!act) return;
  scratch[tid] = xk_bits(fa);
  pmn::threadgroup_barrier(pmn::mem_flags::mem_device | pmn::mem_flags::mem_threadgroup);
  XK_PUT('i', xk_active(scen, tid ^ 33u) ? scratch[tid ^ 33u] : 0u);

  /* ---- SIMD-group functions over the active lanes ---- */
  const float sf = xk_sum_val(seed + 10u), pf = xk_prod_val(seed + 11u);
  const pmn_half sh = pmn_half(sf * 0.25f), ph = pmn_half(xk_prod_val(seed + 12u));
  const int ia = (int)xk_hash(seed + 13u), ib = (int)(xk_hash(seed + 14u) % 7u) - 3;
  const unsigned ua = xk_hash(seed + 15u);
  XK_PUT('f', pmn::simd_sum(XK_SITE, sf));
  XK_PUT('f', pmn::simd_product(XK_SITE, pf));
  XK_PUT('f', pmn::simd_max(XK_SITE, fa));
  XK_PUT('f', pmn::simd_min(XK_SITE, fa));
  XK_PUT('h', pmn::simd_sum(XK_SITE, sh).bits);
  XK_PUT('h', pmn::simd_product(XK_SITE, ph).bits);
  XK_PUT('h', pmn::simd_max(XK_SITE, ha).bits);
  XK_PUT('h', pmn::simd_min(XK_SITE, ha).bits);
  XK_PUT('i', pmn::simd_sum(XK_SITE, ia));
  XK_PUT('i', pmn::simd_product(XK_SITE, ib));
  XK_PUT('i', pmn::simd_max(XK_SITE, ia));
  XK_PUT('i', pmn::simd_min(XK_SITE, ia));
  XK_PUT('i', pmn::simd_and(XK_SITE, ua));
  XK_PUT('i', pmn::simd_or(XK_SITE, ua));
  XK_PUT('i', pmn::simd_xor(XK_SITE, ua));
  XK_PUT('i', pmn::simd_sum(XK_SITE, ua));
  XK_PUT('i', pmn::simd_max(XK_SITE, ua));
  XK_PUT('i', pmn::simd_min(XK_SITE, ua));
  XK_PUT('i', (int)pmn::simd_sum(XK_SITE, (short)ib));
  XK_PUT('i', pmn::simd_and(XK_SITE, ia));
  {
    pmn_float4 s4 = pmn::simd_sum(XK_SITE, pmn_float4(sf, pf, sf * 2.0f, -sf));
    XK_PUT4('f', s4);
  }
  {
    pmn_half2 h2 = pmn::simd_sum(XK_SITE, pmn_half2(sh, ph));
    XK_PUT('h', h2.x.bits); XK_PUT('h', h2.y.bits);
    pmn_int2 i2 = pmn::simd_max(XK_SITE, pmn_int2(ia, ib));
    XK_PUT('i', i2.x); XK_PUT('i', i2.y);
  }
  XK_PUT('f', pmn::simd_prefix_inclusive_sum(XK_SITE, sf));
  XK_PUT('f', pmn::simd_prefix_exclusive_sum(XK_SITE, sf));
  XK_PUT('f', pmn::simd_prefix_inclusive_product(XK_SITE, pf));
  XK_PUT('f', pmn::simd_prefix_exclusive_product(XK_SITE, pf));
  XK_PUT('h', pmn::simd_prefix_inclusive_sum(XK_SITE, sh).bits);
  XK_PUT('h', pmn::simd_prefix_exclusive_sum(XK_SITE, sh).bits);
  XK_PUT('i', pmn::simd_prefix_inclusive_sum(XK_SITE, ia));
  XK_PUT('i', pmn::simd_prefix_exclusive_sum(XK_SITE, ia));
  XK_PUT('i', pmn::simd_prefix_inclusive_product(XK_SITE, ib));
  XK_PUT('i', pmn::simd_prefix_exclusive_product(XK_SITE, ib));
  XK_PUT('f', pmn::simd_shuffle(XK_SITE, fa, (lane * 7u + 3u) & 31u));
  XK_PUT('f', pmn::simd_shuffle_xor(XK_SITE, fa, 5u));
  XK_PUT('f', pmn::simd_shuffle_xor(XK_SITE, fa, 16u));
  XK_PUT('f', pmn::simd_shuffle_up(XK_SITE, fa, 3u));
  XK_PUT('f', pmn::simd_shuffle_down(XK_SITE, fa, 3u));
  XK_PUT('f', pmn::simd_shuffle_up(XK_SITE, fa, 0u));
  XK_PUT('f', pmn::simd_broadcast(XK_SITE, fa, 9u));
  XK_PUT('f', pmn::simd_broadcast_first(XK_SITE, fa));
  XK_PUT('h', pmn::simd_shuffle_down(XK_SITE, ha, 1u).bits);
  XK_PUT('i', pmn::simd_shuffle_up(XK_SITE, ia, 1u));
  {
    pmn_float4 s4 = pmn::simd_shuffle(XK_SITE, pmn_float4(fa, fb, fc, sf), lane ^ 3u);
    XK_PUT4('f', s4);
  }
  {
    pmn_ulong b = pmn::simd_ballot(XK_SITE, fa > 0.0f);
    XK_PUT('i', (unsigned)b); XK_PUT('i', (unsigned)(b >> 32));
  }
  XK_PUT('i', pmn::simd_all(XK_SITE, fa == fa));
  XK_PUT('i', pmn::simd_any(XK_SITE, fa > 1000.0f));
  XK_PUT('i', pmn::simd_is_first(XK_SITE));
  XK_PUT('i', pmn::simd_all(XK_SITE, true));
  XK_PUT('i', pmn::simd_ballot(XK_SITE, true).all());
  pmn::simdgroup_barrier(XK_SITE, pmn::mem_flags::mem_none);

  /* ---- divergent branches: each half of the lanes is its own group ---- */
  if (lane & 1u) {
    XK_PUT('f', pmn::simd_sum(XK_SITE, sf));
    XK_PUT('f', pmn::simd_prefix_inclusive_sum(XK_SITE, sf));
    XK_PUT('f', pmn::simd_shuffle_down(XK_SITE, fa, 1u));
    XK_PUT('i', (unsigned)pmn::simd_ballot(XK_SITE, true));
    XK_PUT('i', pmn::simd_is_first(XK_SITE));
  } else {
    XK_PUT('f', pmn::simd_sum(XK_SITE, sf));
    XK_PUT('f', pmn::simd_prefix_inclusive_sum(XK_SITE, sf));
    XK_PUT('f', pmn::simd_shuffle_down(XK_SITE, fa, 1u));
    XK_PUT('i', (unsigned)pmn::simd_ballot(XK_SITE, true));
    XK_PUT('i', pmn::simd_is_first(XK_SITE));
  }
  /* ---- a loop whose trip count differs per lane, then reconvergence ---- */
  {
    float acc = 0.0f;
    unsigned cnt = 0;
    for (unsigned i = 0; i <= (lane & 3u); ++i) {
      acc += pmn::simd_sum(XK_SITE, sf * (float)(i + 1u));
      cnt = cnt * 3u + (unsigned)pmn::simd_ballot(XK_SITE, true);
    }
    XK_PUT('f', acc); XK_PUT('i', cnt);
    XK_PUT('f', pmn::simd_sum(XK_SITE, sf));
    XK_PUT('i', (unsigned)pmn::simd_ballot(XK_SITE, true));
  }
  const int used1 = xk.o;
  while (xk.o < XK_NOUT) XK_PUT('i', 0u);
  xk.out[XK_NOUT - 1] = (unsigned)used1;   /* layout check: must stay below XK_NOUT */
}
