// prelude_test.cpp -- the cpu test program of tools/prelude_check.py: half rounding against an
// independent reference, vectors, math, as_type, atomics, and the SIMD-group functions through the
// cross-check kernel (xk.h), run under the mock runtime (PMN_TEST_MOCK_RT=1) or the real one.
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <type_traits>
#include "pmn_cpu_abi.h"
#if PMN_TEST_MOCK_RT
#include "mock_rt.h"
#else
#include "real_rt.h"
#endif
#include "pmn_prelude.h"
#include <algorithm>
#include <cfloat>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

static long g_checks = 0, g_fail = 0;
#define CHECK(c) do { ++g_checks; if (!(c)) { if (++g_fail <= 60) printf("FAIL line %d: %s\n", __LINE__, #c); } } while (0)
#define CHECK_MSG(c, ...) do { ++g_checks; if (!(c)) { if (++g_fail <= 60) { printf("FAIL line %d: %s: ", __LINE__, #c); printf(__VA_ARGS__); printf("\n"); } } } while (0)
template <class A, class B> struct same_t { static constexpr bool value = false; };
template <class A> struct same_t<A, A> { static constexpr bool value = true; };
#define CHECK_TYPE(expr, T) static_assert(same_t<decltype(expr), T>::value, "type of " #expr)

static unsigned fbits(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
static float bitsf(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
static bool same_float(float a, float b) { return fbits(a) == fbits(b) || (a != a && b != b); }
static bool near(float a, float b, float tol) {
  if (a != a || b != b) return a != a && b != b;
  if (std::isinf(a) || std::isinf(b)) return a == b;
  return std::fabs(a - b) <= tol * std::fmax(1.0f, std::fmax(std::fabs(a), std::fabs(b)));
}

// ---- independent reference for rounding to binary16: pure arithmetic in a wide type Q ----
#if defined(__SIZEOF_FLOAT128__) && !defined(__clang__)
typedef __float128 Quad;
#else
typedef long double Quad;
#endif
// Returns the value of v rounded to half (nearest-even, subnormals, overflow), as a double.
template <class Q> static double ref_half(Q v) {
  if (v != v) return NAN;
  if (v == 0) return ((Q)1 / v) < 0 ? -0.0 : 0.0;   // keeps the sign of zero
  bool neg = v < 0;
  if (neg) v = -v;
  if (v >= (Q)65520) return neg ? -INFINITY : INFINITY;
  int e = 0;                         // v = m * 2^e with m in [1, 2)
  Q m = v;
  while (m >= 2) { m /= 2; ++e; }
  while (m < 1) { m *= 2; --e; }
  if (e < -14) e = -14;              // subnormal grid: spacing 2^-24
  Q scaled = v;                      // scaled = v / 2^(e-10), exact
  for (int i = 0; i < 10 - e; ++i) scaled *= 2;
  for (int i = 0; i < e - 10; ++i) scaled /= 2;
  long long r = (long long)scaled;   // floor (scaled >= 0, < 2^12)
  Q frac = scaled - (Q)r;
  if (frac > (Q)0.5 || (frac == (Q)0.5 && (r & 1))) ++r;
  double out = (double)r;
  for (int i = 0; i < 10 - e; ++i) out /= 2;
  for (int i = 0; i < e - 10; ++i) out *= 2;
  if (out >= 65520.0) out = INFINITY;
  return neg ? -out : out;
}
static bool half_matches(pmn_half h, double ref) {
  float f = (float)h;
  if (ref != ref) return h.bits == 0x7fff;                      // canonical NaN
  if (ref == 0) return (double)f == 0 && (std::signbit(f) == std::signbit(ref));
  return (double)f == ref;
}

static void test_half_conversions() {
  CHECK(pmn_half(2049.0f).bits == 0x6800);                      // 2049 -> 2048 (tie to even)
  CHECK((float)pmn_half(2049.0f) == 2048.0f);
  CHECK(pmn_half(2051.0f).bits == 0x6802);                      // 2051 -> 2052 (tie to even)
  CHECK((float)pmn_half(0.1f) == 0.0999755859375f);
  CHECK(pmn_half(0.1f).bits == 0x2e66);
  CHECK(pmn_half(65504.0f).bits == 0x7bff);
  CHECK(pmn_half(65519.99f).bits == 0x7bff);
  CHECK(pmn_half(65520.0f).bits == 0x7c00);                     // overflow to inf
  CHECK(pmn_half(1e9f).bits == 0x7c00 && pmn_half(-1e9f).bits == 0xfc00);
  CHECK(pmn_half(INFINITY).bits == 0x7c00 && pmn_half(-INFINITY).bits == 0xfc00);
  CHECK(pmn_half(-0.0f).bits == 0x8000 && pmn_half(0.0f).bits == 0);
  CHECK(pmn_half(0x1p-24f).bits == 0x0001);                     // smallest subnormal
  CHECK(pmn_half(0x1p-25f).bits == 0x0000);                     // tie -> even (0)
  CHECK(pmn_half(-0x1p-25f).bits == 0x8000);
  CHECK(pmn_half(0x1.000002p-25f).bits == 0x0001);
  CHECK(pmn_half(0x1.8p-24f).bits == 0x0002);                   // 1.5 ulp -> 2 (tie to even)
  CHECK(pmn_half(0x1.4p-23f).bits == 0x0002);                   // 2.5 ulp -> 2
  CHECK(pmn_half(0x1p-14f).bits == 0x0400);                     // smallest normal
  CHECK(pmn_half(0x1.ffcp-15f).bits == 0x0400);                 // 1023.5 ulp -> rounds up to normal
  CHECK(pmn_half(0x1.ff8p-15f).bits == 0x03ff);                 // largest subnormal
  CHECK(pmn_half(0x1.ff0p-15f).bits == 0x03fe);                 // 1022 ulp exactly
  CHECK(pmn_half(1e-8f).bits == 0);
  CHECK(pmn_half(NAN).bits == 0x7fff && pmn_half(-NAN).bits == 0x7fff);
  CHECK(pmn::isnan(pmn_half(NAN)) && !pmn::isnan(pmn_half(1.0f)));
  CHECK(pmn::isinf(pmn_half(70000.0f)));
  CHECK((float)pmn_half::from_bits(0x0001) == 0x1p-24f);
  CHECK((float)pmn_half::from_bits(0x03ff) == 0x1.ff8p-15f);
  CHECK((float)pmn_half::from_bits(0x7bff) == 65504.0f);
  CHECK(std::isinf((float)pmn_half::from_bits(0xfc00)) && (float)pmn_half::from_bits(0xfc00) < 0);
  CHECK(std::isnan((float)pmn_half::from_bits(0x7e00)));
  CHECK(pmn_half(3).bits == 0x4200 && pmn_half(-2).bits == 0xc000 && pmn_half(70000).bits == 0x7c00);
  CHECK(pmn_half(4097u).bits == pmn_half(4096.0f).bits);
  CHECK(pmn_half(0.1).bits == 0x2e66);                          // from double
  CHECK(pmn_half(0x1.0020000001p0).bits == 0x3c01);             // double just above a tie rounds up
  CHECK(pmn_half(0x1.002p0).bits == 0x3c00);                    // exact tie -> even
  CHECK(pmn_half(1e300).bits == 0x7c00 && pmn_half(1e-300).bits == 0);
  // constexpr conversions (needed for PMN_CONSTANT initializers on cuda)
  static_assert(pmn_half(2049.0f).bits == 0x6800, "constexpr f2h");
  static_assert(pmn_half(0.1).bits == 0x2e66, "constexpr d2h");
  static_assert((float)pmn_half::from_bits(0x3555) == 0x1.554p-2f, "constexpr h2f");

  // Exhaustive: every half converts to float exactly and back to the same bits (NaN -> canonical).
  long bad = 0;
  for (unsigned b = 0; b < 65536; ++b) {
    pmn_half h = pmn_half::from_bits((unsigned short)b);
    float f = (float)h;
    bool is_nan = (b & 0x7c00) == 0x7c00 && (b & 0x3ff);
    unsigned back = pmn_half(f).bits;
    if (is_nan ? (back != 0x7fff || f == f) : back != b) ++bad;
#ifdef __FLT16_MANT_DIG__
    _Float16 r; std::memcpy(&r, &b, 2);
    if (!is_nan && fbits((float)r) != fbits(f)) ++bad;
#endif
  }
  CHECK_MSG(bad == 0, "%ld halves failed the round trip", bad);

  // Boundary sweep: for every pair of neighbouring halves, floats around the midpoint and the
  // endpoints, both signs; plus random float bit patterns. Against the arithmetic reference.
  bad = 0;
  for (unsigned b = 0; b < 0x7c00; ++b) {
    float lo = (float)pmn_half::from_bits((unsigned short)b);
    float hi = b + 1 < 0x7c00 ? (float)pmn_half::from_bits((unsigned short)(b + 1)) : 65536.0f;
    float mid = (float)(((double)lo + (double)hi) / 2);
    unsigned mb = fbits(mid);
    for (int d = -3; d <= 3; ++d) {
      for (unsigned s = 0; s < 2; ++s) {
        float f = bitsf((mb + (unsigned)d) ^ (s << 31));
        if (!half_matches(pmn_half(f), ref_half<Quad>((Quad)f))) {
          if (++bad < 5) printf("  f2h(%a) = %04x\n", f, pmn_half(f).bits);
        }
#ifdef __FLT16_MANT_DIG__
        _Float16 r = (_Float16)f; unsigned short rb; std::memcpy(&rb, &r, 2);
        if (f == f && rb != pmn_half(f).bits) ++bad;
#endif
      }
    }
  }
  unsigned long long st = 0x243f6a8885a308d3ull;
  for (long i = 0; i < 4000000; ++i) {
    st = st * 6364136223846793005ull + 1442695040888963407ull;
    float f = bitsf((unsigned)(st >> 32));
    if (!half_matches(pmn_half(f), ref_half<Quad>((Quad)f))) ++bad;
    double d = (double)f * (1.0 + (double)(st & 0xffff) * 0x1p-40);
    if (!half_matches(pmn_half(d), ref_half<Quad>((Quad)d))) ++bad;
  }
  CHECK_MSG(bad == 0, "%ld float/double -> half conversions differ from the reference", bad);
}

static void test_half_arith() {
  long bad = 0;
  unsigned long long st = 0x13198a2e03707344ull;
  auto rnd = [&]() { st = st * 6364136223846793005ull + 1442695040888963407ull; return (unsigned)(st >> 33); };
  for (long i = 0; i < 3000000; ++i) {
    unsigned ra = rnd(), rb = rnd(), rc = rnd();
    // bias towards interesting exponents: half the time draw near each other
    unsigned short ab = (unsigned short)ra, bb = (unsigned short)rb, cb = (unsigned short)rc;
    if (i & 1) bb = (unsigned short)((ab & 0xfc00) ^ (rb & 0x83ff));
    pmn_half a = pmn_half::from_bits(ab), b = pmn_half::from_bits(bb), c = pmn_half::from_bits(cb);
    Quad qa = (Quad)(float)a, qb = (Quad)(float)b, qc = (Quad)(float)c;
    if (!half_matches(a + b, ref_half<Quad>(qa + qb))) ++bad;
    if (!half_matches(a - b, ref_half<Quad>(qa - qb))) ++bad;
    if (!half_matches(a * b, ref_half<Quad>(qa * qb))) ++bad;
    if (!half_matches(pmn::fma(a, b, c), ref_half<Quad>(qa * qb + qc))) {
      if (++bad < 5) printf("  fma(%04x,%04x,%04x) = %04x\n", ab, bb, cb, pmn::fma(a, b, c).bits);
    }
    // division: a/b is not exact in Quad, but Quad has far more than 2*11+2 bits
    if (!half_matches(a / b, ref_half<Quad>(qa / qb))) ++bad;
    if (!half_matches(pmn::sqrt(a), ref_half<Quad>((Quad)std::sqrt((double)(float)a)))) ++bad;
#ifdef __FLT16_MANT_DIG__
    _Float16 fa, fb; std::memcpy(&fa, &ab, 2); std::memcpy(&fb, &bb, 2);
    _Float16 s = fa + fb, p = fa * fb; unsigned short sb, pb; std::memcpy(&sb, &s, 2); std::memcpy(&pb, &p, 2);
    if (!(s != s) && sb != (a + b).bits) ++bad;
    if (!(p != p) && pb != (a * b).bits) ++bad;
#endif
  }
  CHECK_MSG(bad == 0, "%ld half arithmetic results differ from the reference", bad);

  // Worst cases of fma: products needing the full 22 bits plus a tiny or cancelling addend.
  pmn_half x = pmn_half::from_bits(0x3c01), y = pmn_half::from_bits(0x3c01);   // (1+2^-10)^2
  CHECK(pmn::fma(x, y, pmn_half(-1.0f)).bits == pmn_half(0x1p-9f).bits);     // 2^-9 + 2^-20: tie -> even
  CHECK(pmn::fma(pmn_half(1.0f), pmn_half(1.0f), pmn_half::from_bits(0x0001)).bits == 0x3c00);
  // 1377/1024 * 1523*2^-22 + 1 = 1 + 2^-11 + 19*2^-32: just above a tie. Rounding through float
  // first would land exactly on the tie and give 0x3c00 (double rounding); correct is 0x3c01.
  CHECK(pmn::fma(pmn_half::from_bits(0x3d61), pmn_half::from_bits(0x0df3), pmn_half(1.0f)).bits == 0x3c01);
  CHECK(pmn::fma(pmn_half::from_bits(0x3c01), pmn_half::from_bits(0x1001), pmn_half(1.0f)).bits == 0x3c01);  // just above a tie

  // Mixed operands and semantics.
  pmn_half h = 1.0f;
  CHECK_TYPE(h + h, pmn_half); CHECK_TYPE(h * 2.0f, float); CHECK_TYPE(2.0f * h, float);
  CHECK_TYPE(h * 2, pmn_half); CHECK_TYPE(2u * h, pmn_half); CHECK_TYPE(h < 0.5f, bool);
  CHECK_TYPE(h + 1.0, float); CHECK_TYPE(-h, pmn_half); CHECK_TYPE(pmn::max(h, h), pmn_half);
  CHECK_TYPE(pmn::max(h, 1.0f), float); CHECK_TYPE(pmn::max(h, 1), pmn_half);
  CHECK((h + h).bits == 0x4000 && (h - 2).bits == 0xbc00 && (h / 3).bits == 0x3555);
  CHECK(h * 2.5f == 2.5f && h < 1.5f && !(h > 1.0f) && h >= 1 && h == 1.0f && 1.0f == h && h != 2);
  CHECK(pmn_half(2048.0f) + 1 == 2048.0f);                     // 2049 rounds to 2048 in half
  CHECK(pmn_half(2048.0f) + 1.0f == 2049.0f);                  // half + float is float
  pmn_half g = 0.5f; g += 1; g *= 2.0f; g -= pmn_half(1.0f); g /= 4; CHECK((float)g == 0.5f);
  g = 3; g++; ++g; g--; CHECK((float)g == 4.0f && (float)(-g) == -4.0f && (float)(+g) == 4.0f);
  float f = h; double d = h; int i = (int)pmn_half(-2.75f); unsigned u = (unsigned)pmn_half(7.5f);
  CHECK(f == 1.0f && d == 1.0 && i == -2 && u == 7);
  pmn_half x2 = pmn::max(h, pmn_half(3.0f)); CHECK((float)x2 == 3.0f);
  CHECK((float)(pmn_half(65504.0f) * 2) == INFINITY);
  CHECK((-pmn_half(0.0f)).bits == 0x8000);
  bool bt = pmn_half(0.5f); CHECK(bt); if (pmn_half(0.0f)) CHECK(false);
}

static void test_vectors() {
  // half's and float2/3/4's layouts are asserted by the prelude itself, in every build
  static_assert(sizeof(pmn_half2) == 4 && alignof(pmn_half2) == 4, "");
  static_assert(sizeof(pmn_half3) == 8 && alignof(pmn_half3) == 8, "");
  static_assert(sizeof(pmn_half4) == 8 && alignof(pmn_half4) == 8, "");
  static_assert(sizeof(pmn_int3) == 16 && sizeof(pmn_uint4) == 16 && sizeof(pmn_short3) == 8, "");
  static_assert(sizeof(pmn_char3) == 4 && sizeof(pmn_uchar4) == 4 && sizeof(pmn_bool2) == 2, "");
  static_assert(sizeof(pmn_bool3) == 4 && sizeof(pmn_ushort2) == 4, "");
  static_assert(std::is_trivially_copyable<pmn_float4>::value && std::is_trivial<pmn_half3>::value, "");
  static_assert(std::is_trivial<pmn_half>::value, "");
  constexpr pmn_float4 kc(1, 2, 3, 4);
  static_assert(kc.w == 4.0f && kc[2] == 3.0f, "constexpr vec");
  constexpr pmn_half2 kh(0.1f, 2049.0f);
  static_assert(kh.y.bits == 0x6800, "constexpr half2");

  pmn_float4 a(1, 2, 3, 4);
  CHECK(a.x == 1 && a.y == 2 && a.z == 3 && a.w == 4 && a[0] == 1 && a[3] == 4);
  pmn_float4 b = pmn_float4(pmn_float2(5, 6), 7, 8); CHECK(b.x == 5 && b.w == 8);
  pmn_float4 c(1, pmn_float2(2, 3), 4); CHECK(c.y == 2 && c.z == 3 && c.w == 4);
  pmn_float4 e(pmn_float3(1, 2, 3), 9.0f); CHECK(e.z == 3 && e.w == 9);
  pmn_float4 e2(pmn_float2(1, 2), pmn_float2(3, 4)); CHECK(e2.z == 3 && e2.w == 4);
  pmn_float3 f3(pmn_float2(1, 2), 3); CHECK(f3.z == 3);
  pmn_float2 s2 = 2.5f; CHECK(s2.x == 2.5f && s2.y == 2.5f);
  pmn_float4 sp(7); CHECK(sp.x == 7 && sp.w == 7);
  pmn_float4 li = {1, 2, 3, 4}; CHECK(li.z == 3);
  pmn_int4 iv(pmn_float4(1.5f, -2.5f, 3.9f, -0.5f)); CHECK(iv.x == 1 && iv.y == -2 && iv.z == 3 && iv.w == 0);
  pmn_float4 fv(pmn_int4(1, -2, 3, 4)); CHECK(fv.y == -2.0f);
  pmn_half4 hv(pmn_float4(0.1f, 2049.0f, 1e9f, -1.0f));
  CHECK(hv.x.bits == 0x2e66 && hv.y.bits == 0x6800 && hv.z.bits == 0x7c00 && hv.w.bits == 0xbc00);
  pmn_float4 back(hv); CHECK(back.y == 2048.0f);
  pmn_half4 hs = 1.0f; CHECK(hs.w.bits == 0x3c00);
  pmn_half2 hm(1, 2.0f); CHECK((float)hm.x == 1 && (float)hm.y == 2);
  pmn_uchar4 u4(pmn_int4(256 + 7, -1, 3, 4)); CHECK(u4.x == 7 && u4.y == 255);
  a[1] = 20; CHECK(a.y == 20); a[1] = 2;
  pmn_int2 i2(3, 4); i2[0] += 5; CHECK(i2.x == 8);

  CHECK(pmn::all(a + b == pmn_float4(6, 8, 10, 12)));
  CHECK(pmn::all(a * 2.0f == pmn_float4(2, 4, 6, 8)) && pmn::all(2 * a == a + a));
  CHECK(pmn::all(a - 1 == pmn_float4(0, 1, 2, 3)) && pmn::all(1 - a == -(a - 1)));
  CHECK(pmn::all(a / 2 == pmn_float4(0.5f, 1, 1.5f, 2)) && pmn::all(12 / a == pmn_float4(12, 6, 4, 3)));
  pmn_float4 t = a; t += b; t -= 1; t *= pmn_float4(2); t /= 2.0f;
  CHECK(pmn::all(t == a + b - 1));
  t = a; t++; ++t; t--; CHECK(pmn::all(t == a + 1));
  pmn_int4 p(7, -7, 12, 5), q(2, 3, 5, 4);
  CHECK(pmn::all(p % q == pmn_int4(1, -1, 2, 1)) && pmn::all(p % 4 == pmn_int4(3, -3, 0, 1)));
  CHECK(pmn::all((p & q) == pmn_int4(7 & 2, -7 & 3, 12 & 5, 5 & 4)));
  CHECK(pmn::all((p | 1) == pmn_int4(7, -7, 13, 5)) && pmn::all((p ^ q) == pmn_int4(5, -6, 9, 1)));
  CHECK(pmn::all((q << 2) == pmn_int4(8, 12, 20, 16)) && pmn::all((p >> 1) == pmn_int4(3, -4, 6, 2)));
  CHECK(pmn::all((1 << q) == pmn_int4(4, 8, 32, 16)) && pmn::all(~q == pmn_int4(-3, -4, -6, -5)));
  pmn_int4 r = p; r %= 3; r &= 0xff; r |= 0x100; r ^= 1; r <<= 1; r >>= 1;
  CHECK(r.x == ((((7 % 3) & 0xff) | 0x100) ^ 1));
  pmn_uint4 uu(1, 2, 3, 0xffffffffu); CHECK(pmn::all(uu + 1u == pmn_uint4(2, 3, 4, 0)));
  pmn_bool4 cmp = a < pmn_float4(2, 2, 2, 2);
  CHECK(cmp.x && !cmp.y && !cmp.z && !cmp.w);
  CHECK(pmn::any(a >= 4.0f) && !pmn::any(a > 4.0f) && pmn::all(a <= 4.0f) && pmn::all(a != 0.0f));
  CHECK(pmn::all((!(a > 2.0f)) == pmn_bool4(true, true, false, false)));
  CHECK(pmn::all((a > 1.0f && a < 4.0f) == pmn_bool4(false, true, true, false)));
  CHECK(pmn::all((a < 2.0f || a > 3.0f) == pmn_bool4(true, false, false, true)));
  pmn_half4 h4 = pmn_half4(1, 2, 3, 4) * pmn_half(0.5f) + 1;
  CHECK(pmn::all(h4 == pmn_half4(1.5f, 2, 2.5f, 3)));
  pmn_half4 h4b = h4 * 2.0f; CHECK((float)h4b.w == 6);   // scalar converts to half
  pmn_float4 fh = a * pmn_half(2.0f); CHECK(fh.w == 8);
  pmn_short2 sh2(30000, -30000); sh2 += 10000; CHECK(sh2.x == (short)40000);
  pmn_char4 c4(-1, 2, 3, 4); CHECK(c4.x == -1 && (int)pmn::abs(c4).x == 1);
  pmn_bool2 bb(true, false); CHECK(pmn::all((!bb) == pmn_bool2(false, true)));
  CHECK(pmn::all(pmn::select(a, b, a > 2.0f) == pmn_float4(1, 2, 7, 8)));
  CHECK(pmn::all(pmn::select(a, b, true) == b) && pmn::select(1.0f, 2.0f, false) == 1.0f);
}

static void test_math() {
  const float pi = 3.14159265358979f;
  CHECK(near(pmn::exp(1.0f), 2.7182818f, 1e-6f) && near(pmn::exp2(3.0f), 8, 1e-6f));
  CHECK(near(pmn::exp10(2.0f), 100, 1e-6f) && near(pmn::log(2.7182818f), 1, 1e-6f));
  CHECK(near(pmn::log2(8.0f), 3, 1e-6f) && near(pmn::log10(1000.0f), 3, 1e-6f));
  CHECK(pmn::sqrt(16.0f) == 4 && near(pmn::rsqrt(4.0f), 0.5f, 1e-6f));
  CHECK(near(pmn::pow(2.0f, 10.0f), 1024, 1e-6f) && near(pmn::powr(2.0f, 0.5f), 1.4142135f, 1e-6f));
  CHECK(std::isnan(pmn::powr(-2.0f, 2.0f)) && pmn::pow(-2.0f, 2.0f) == 4);
  CHECK(near(pmn::tanh(0.5f), 0.46211716f, 1e-6f) && near(pmn::sinh(1.0f), 1.1752012f, 1e-6f));
  CHECK(near(pmn::cosh(1.0f), 1.5430806f, 1e-6f) && near(pmn::sin(pi / 6), 0.5f, 1e-6f));
  CHECK(near(pmn::cos(pi / 3), 0.5f, 1e-6f) && near(pmn::tan(pi / 4), 1, 1e-6f));
  CHECK(near(pmn::asin(1.0f), pi / 2, 1e-6f) && near(pmn::acos(0.0f), pi / 2, 1e-6f));
  CHECK(near(pmn::atan(1.0f), pi / 4, 1e-6f) && near(pmn::atan2(1.0f, -1.0f), 3 * pi / 4, 1e-6f));
  CHECK(pmn::abs(-3.5f) == 3.5f && pmn::fabs(-2.0f) == 2 && pmn::abs(-7) == 7 && pmn::abs(7u) == 7u);
  CHECK(pmn::abs(INT_MIN) == INT_MIN && pmn::abs((short)-5) == 5);
  CHECK(pmn::min(3, 5) == 3 && pmn::max(3u, 5u) == 5u && pmn::min(-1.0f, 2.0f) == -1.0f);
  CHECK(pmn::max(NAN, 1.0f) == 1.0f && pmn::min(2.0f, NAN) == 2.0f && pmn::fmax(NAN, 3.0f) == 3);
  CHECK(std::isnan(pmn::fmin(NAN, NAN)) && pmn::fmin(4.0f, 5.0f) == 4);
  CHECK(std::signbit(pmn::min(0.0f, -0.0f)) && !std::signbit(pmn::max(-0.0f, 0.0f)));
  CHECK(pmn::clamp(5, 0, 3) == 3 && pmn::clamp(-1.5f, 0.0f, 1.0f) == 0 && pmn::clamp(NAN, 0.0f, 1.0f) == 0);
  CHECK(pmn::clamp(2u, 3u, 9u) == 3u);
  CHECK(pmn::fma(2.0f, 3.0f, 4.0f) == 10 && pmn::mad(2.0f, 3.0f, 4.0f) == 10);
  CHECK(pmn::fma(1.0f + 0x1p-23f, 1.0f - 0x1p-23f, -1.0f) == -0x1p-46f);   // single rounding
  CHECK(pmn::mix(0.0f, 10.0f, 0.25f) == 2.5f);
  CHECK(pmn::select(1, 2, true) == 2 && pmn::select(1.0f, 2.0f, false) == 1.0f);
  CHECK(pmn::floor(-1.5f) == -2 && pmn::ceil(-1.5f) == -1 && pmn::round(2.5f) == 3 && pmn::round(-2.5f) == -3);
  CHECK(pmn::rint(2.5f) == 2 && pmn::rint(3.5f) == 4 && pmn::trunc(-2.7f) == -2);
  CHECK(pmn::fract(-0.25f) == 0.75f && pmn::fract(-1e-10f) < 1.0f && pmn::fract(2.5f) == 0.5f);
  CHECK(pmn::fract(INFINITY) == 0 && std::isnan(pmn::fract(NAN)));
  CHECK(pmn::fmod(7.0f, 3.0f) == 1 && pmn::fmod(-7.0f, 3.0f) == -1);
  CHECK(pmn::isnan(NAN) && !pmn::isnan(1.0f) && pmn::isinf(-INFINITY) && pmn::isfinite(1e30f) && !pmn::isfinite(NAN));
  CHECK(pmn::sign(-3.0f) == -1 && pmn::sign(2.0f) == 1 && std::signbit(pmn::sign(-0.0f)) && pmn::sign(NAN) == 0);
  CHECK(pmn::sign(1e-40f) == 1 && pmn::sign(-1e-40f) == -1 && pmn::sign(-INFINITY) == -1 && pmn::sign(0.0f) == 0);
  CHECK(pmn::step(1.0f, 0.5f) == 0 && pmn::step(1.0f, 1.0f) == 1);
  CHECK(pmn::smoothstep(0.0f, 1.0f, 0.5f) == 0.5f && pmn::smoothstep(0.0f, 1.0f, -1.0f) == 0 && pmn::smoothstep(0.0f, 1.0f, 2.0f) == 1);
  CHECK(pmn::copysign(1.0f, -0.0f) == -1 && pmn::saturate(1.5f) == 1 && pmn::saturate(-0.5f) == 0);
  CHECK(pmn::divide(1.0f, 4.0f) == 0.25f);
  // half versions compute in float and round once
  pmn_half h2 = 2.0f;
  CHECK_TYPE(pmn::exp(h2), pmn_half); CHECK_TYPE(pmn::sqrt(h2), pmn_half); CHECK_TYPE(pmn::isnan(h2), bool);
  CHECK(pmn::exp(h2).bits == pmn_half(std::exp(2.0f)).bits && pmn::sqrt(h2).bits == pmn_half(std::sqrt(2.0f)).bits);
  CHECK((float)pmn::abs(pmn_half(-3.0f)) == 3 && (float)pmn::clamp(pmn_half(5.0f), pmn_half(0.0f), pmn_half(1.0f)) == 1);
  CHECK((float)pmn::mix(pmn_half(0.0f), pmn_half(8.0f), pmn_half(0.25f)) == 2);
  CHECK((float)pmn::fma(h2, h2, pmn_half(1.0f)) == 5 && (float)pmn::sign(pmn_half(-3.0f)) == -1);
  CHECK((float)pmn::pow(h2, pmn_half(3.0f)) == 8 && (float)pmn::floor(pmn_half(-1.5f)) == -2);
  CHECK(pmn::max(pmn_half(NAN), pmn_half(1.0f)) == 1.0f);
  // vectors: element-wise, scalars broadcast
  pmn_float4 v(1, -4, 9, 16);
  CHECK(pmn::all(pmn::abs(v) == pmn_float4(1, 4, 9, 16)) && pmn::all(pmn::sqrt(pmn::abs(v)) == pmn_float4(1, 2, 3, 4)));
  CHECK(pmn::all(pmn::max(v, 0.0f) == pmn_float4(1, 0, 9, 16)) && pmn::all(pmn::min(0, v) == pmn_float4(0, -4, 0, 0)));
  CHECK(pmn::all(pmn::clamp(v, 0.0f, 10.0f) == pmn_float4(1, 0, 9, 10)));
  CHECK(pmn::all(pmn::clamp(v, pmn_float4(0), pmn_float4(2, 2, 2, 20)) == pmn_float4(1, 0, 2, 16)));
  CHECK(pmn::all(pmn::mix(pmn_float2(0, 10), pmn_float2(10, 20), 0.5f) == pmn_float2(5, 15)));
  CHECK(pmn::all(pmn::step(0.0f, v) == pmn_float4(1, 0, 1, 1)) && pmn::all(pmn::fma(v, 2.0f, 1.0f) == v * 2 + 1));
  CHECK(pmn::all(pmn::isnan(pmn_float2(NAN, 1)) == pmn_bool2(true, false)));
  CHECK(pmn::all(pmn::abs(pmn_int4(-1, 2, -3, INT_MIN)) == pmn_int4(1, 2, 3, INT_MIN)));
  CHECK(pmn::all(pmn::max(pmn_int2(1, 5), 3) == pmn_int2(3, 5)) && pmn::all(pmn::min(pmn_uint2(1, 5), 3u) == pmn_uint2(1, 3)));
  CHECK(pmn::all(pmn::floor(pmn_half2(1.5f, -1.5f)) == pmn_half2(1, -2)));
  CHECK(pmn::all(pmn::exp(pmn_float2(0, 1)) == pmn_float2(1, pmn::exp(1.0f))));
  CHECK(pmn::all(pmn::pow(pmn_float2(2, 3), 2.0f) == pmn_float2(4, 9)));
  CHECK(pmn::dot(pmn_float3(1, 2, 3), pmn_float3(4, 5, 6)) == 32 && pmn::length(pmn_float2(3, 4)) == 5);
  CHECK(pmn::distance(pmn_float2(1, 1), pmn_float2(4, 5)) == 5 && pmn::length_squared(pmn_float2(3, 4)) == 25);
  CHECK(pmn::all(pmn::normalize(pmn_float2(3, 4)) == pmn_float2(0.6f, 0.8f)));
  CHECK(pmn::all(pmn::cross(pmn_float3(1, 0, 0), pmn_float3(0, 1, 0)) == pmn_float3(0, 0, 1)));
  CHECK((float)pmn::dot(pmn_half2(1, 2), pmn_half2(3, 4)) == 11 && (float)pmn::length(pmn_half2(3, 4)) == 5);
  CHECK(pmn::all(pmn::normalize(pmn_half2(0, 2)) == pmn_half2(0, 1)));
  // precise / fast namespaces: every function reachable
  CHECK(pmn::precise::exp(1.0f) == pmn::exp(1.0f) && near(pmn::fast::exp(1.0f), 2.7182818f, 1e-5f));
  CHECK(pmn::fast::max(1.0f, 2.0f) == 2 && pmn::precise::clamp(3.0f, 0.0f, 1.0f) == 1);
  CHECK(near(pmn::fast::normalize(pmn_float2(3, 4)).x, 0.6f, 1e-5f) && pmn::fast::length(pmn_float2(3, 4)) == 5);
  CHECK(near(pmn::fast::pow(2.0f, 3.0f), 8, 1e-5f) && near(pmn::fast::divide(1.0f, 3.0f), 0.3333333f, 1e-5f));
  CHECK(near((float)pmn::fast::exp(pmn_half(1.0f)), 2.71875f, 1e-3f) && pmn::fast::sqrt(4.0f) == 2);
  // type promotion of mixed arguments
  CHECK_TYPE(pmn::max(1.0f, 2), float); CHECK_TYPE(pmn::max(1u, 2u), unsigned); CHECK_TYPE(pmn::max(1, 2u), unsigned);
  CHECK_TYPE(pmn::max(pmn_float4(1), 0), pmn_float4); CHECK_TYPE(pmn::clamp(pmn_half(1.0f), 0, 1), pmn_half);
  CHECK_TYPE(pmn::clamp(1.0f, 0, 1), float); CHECK_TYPE(pmn::mix(pmn_half4(0), pmn_half4(1), pmn_half(0.5f)), pmn_half4);
  CHECK_TYPE(pmn::abs(-1), int); CHECK_TYPE(pmn::abs(pmn_char2(1, -1)), pmn_char2); CHECK_TYPE(pmn::dot(pmn_half2(1), pmn_half2(1)), pmn_half);
  CHECK_TYPE(pmn::select(pmn_int2(1), pmn_int2(2), pmn_bool2(true)), pmn_int2);
  CHECK_TYPE(pmn::exp(1), float); CHECK_TYPE(pmn::isnan(pmn_float3(1)), pmn_bool3);
  // as_type
  CHECK(pmn::as_type<pmn_uint>(1.0f) == 0x3f800000u && pmn::as_type<float>(0x40000000u) == 2.0f);
  CHECK(pmn::as_type<pmn_ushort>(pmn_half(1.0f)) == 0x3c00 && (float)pmn::as_type<pmn_half>((pmn_ushort)0x4000) == 2.0f);
  CHECK(pmn::as_type<pmn_uint2>(pmn_float2(1, 2)).y == 0x40000000u && pmn::as_type<float>(pmn_half2(1, 2)) == pmn::as_type<float>(0x40003c00u));
  CHECK(pmn::as_type<pmn_ulong>(pmn_float2(0, 1)) == 0x3f80000000000000ull && pmn::as_type<pmn_half4>(0x3c003c003c003c00ull).w.bits == 0x3c00);
  CHECK(pmn::as_type<int>(pmn_uchar4(1, 0, 0, 0)) == 1);
}

static void test_atomics() {
  pmn_atomic_int ai{10};
  pmn_atomic_uint au{10};
  pmn_atomic_float af{1.5f};
  const auto R = pmn::memory_order_relaxed;
  CHECK(pmn::atomic_load_explicit(&ai, R) == 10);
  pmn::atomic_store_explicit(&ai, 20, R); CHECK(ai.v == 20);
  CHECK(pmn::atomic_exchange_explicit(&ai, 5, R) == 20 && ai.v == 5);
  CHECK(pmn::atomic_fetch_add_explicit(&ai, 3, R) == 5 && ai.v == 8);
  CHECK(pmn::atomic_fetch_sub_explicit(&ai, 10, R) == 8 && ai.v == -2);
  CHECK(pmn::atomic_fetch_min_explicit(&ai, -5, R) == -2 && ai.v == -5);
  CHECK(pmn::atomic_fetch_max_explicit(&ai, 7, R) == -5 && ai.v == 7);
  CHECK(pmn::atomic_fetch_max_explicit(&ai, 1, R) == 7 && ai.v == 7);
  CHECK(pmn::atomic_fetch_and_explicit(&ai, 6, R) == 7 && ai.v == 6);
  CHECK(pmn::atomic_fetch_or_explicit(&ai, 9, R) == 6 && ai.v == 15);
  CHECK(pmn::atomic_fetch_xor_explicit(&ai, 5, R) == 15 && ai.v == 10);
  int exp = 3;
  CHECK(!pmn::atomic_compare_exchange_weak_explicit(&ai, &exp, 4, R, R) && exp == 10 && ai.v == 10);
  CHECK(pmn::atomic_compare_exchange_weak_explicit(&ai, &exp, 4, R, R) && ai.v == 4);
  CHECK(pmn::atomic_fetch_sub_explicit(&au, 11u, R) == 10u && au.v == 0xffffffffu);
  CHECK(pmn::atomic_fetch_min_explicit(&au, 3u, R) == 0xffffffffu && au.v == 3u);
  CHECK(pmn::atomic_fetch_max_explicit(&au, 0x80000000u, R) == 3u && au.v == 0x80000000u);
  CHECK(pmn::atomic_fetch_add_explicit(&af, 2.0f, R) == 1.5f && af.v == 3.5f);
  CHECK(pmn::atomic_fetch_sub_explicit(&af, 0.5f, R) == 3.5f && af.v == 3.0f);
  CHECK(pmn::atomic_fetch_max_explicit(&af, 5.0f, R) == 3.0f && af.v == 5.0f);
  CHECK(pmn::atomic_fetch_min_explicit(&af, -1.0f, R) == 5.0f && af.v == -1.0f);
  CHECK(pmn::atomic_exchange_explicit(&af, 2.0f, R) == -1.0f && pmn::atomic_load_explicit(&af, R) == 2.0f);
  pmn::atomic_store_explicit(&af, 0, R);
  float fe = 1.0f;
  CHECK(!pmn::atomic_compare_exchange_weak_explicit(&af, &fe, 3.0f, R, R) && fe == 0.0f);
  CHECK(pmn::atomic_compare_exchange_weak_explicit(&af, &fe, 3.0f, pmn::memory_order_seq_cst, R) && af.v == 3.0f);
  volatile pmn_atomic_int* vp = &ai;                               // volatile pointers bind too
  CHECK(pmn::atomic_fetch_add_explicit(vp, 1, R) == 4);
  // contention from several OS threads (threadgroups run concurrently on the cpu backend)
  pmn_atomic_int ci{0}; pmn_atomic_uint cu{0}; pmn_atomic_float cf{0.0f}, cm{-1e30f}; pmn_atomic_int cmi{INT_MIN};
  std::vector<std::thread> th;
  for (int t = 0; t < 8; ++t) th.emplace_back([&, t] {
    for (int i = 0; i < 20000; ++i) {
      pmn::atomic_fetch_add_explicit(&ci, 1, R);
      pmn::atomic_fetch_or_explicit(&cu, 1u << ((t * 20000 + i) % 32), R);
      pmn::atomic_fetch_add_explicit(&cf, 1.0f, R);
      pmn::atomic_fetch_max_explicit(&cm, (float)(t * 20000 + i), R);
      pmn::atomic_fetch_max_explicit(&cmi, t * 20000 + i, R);
    }
  });
  for (auto& x : th) x.join();
  CHECK(ci.v == 160000 && cu.v == 0xffffffffu && cf.v == 160000.0f && cm.v == 159999.0f && cmi.v == 159999);
}

// Overload resolution of the spellings translated kernels use (compile test).
PMN_CONSTANT pmn_half k_half = pmn_half(1.0f);
PMN_CONSTANT pmn_float4 k_vec = pmn_float4(1, 2, 3, 4);
PMN_CONSTANT float k_tab[3] = {1.0f, 2.0f, 3.0f};
static void test_overloads() {
  pmn_half h = 1.0f;
  float f = h;
  float m1 = h * 2.0f;
  pmn_half m2 = h + h;
  bool m3 = h < 0.5f;
  pmn_half x;
  x = pmn::max(h, h);
  x = 2; x = 2.0f; x = 0.5;
  pmn_half y = h * 2 + 1;
  float z = h * 2.0f + f;
  h = h * h - h / h;
  pmn_float4 v = 1.0f;
  v = v * h + k_vec;
  pmn_half4 hv = h;
  hv = hv * h + 1;
  pmn_uint idx = 3u;
  float g = k_tab[idx % 3] + k_half;
  unsigned long long bal = pmn::simd_vote(5);
  CHECK(f == 1 && m1 == 2 && (float)m2 == 2 && !m3 && (float)x == 0.5f && (float)y == 3 && z == 3 && (float)h == 0);
  CHECK(v.w == 4 && hv.x.bits == 0x3c00 && g == 2 && bal == 5 && k_half.bits == 0x3c00);
  pmn_long l = -1; pmn_ulong ul = 1; pmn_uchar uc = 255; pmn_ushort us = 65535;
  static_assert(sizeof(pmn_long) == 8 && sizeof(pmn_ulong) == 8, "64-bit long");
  CHECK(l < 0 && ul == 1 && uc == 255 && us == 65535);
  pmn::mem_flags fl = pmn::mem_flags::mem_device | pmn::mem_flags::mem_threadgroup;
  CHECK((fl & pmn::mem_flags::mem_threadgroup) == pmn::mem_flags::mem_threadgroup);
}
#include "xk.h"

// ---- cpu run of the cross-check kernel and its reference check ----
static unsigned g_out[XK_NSCEN][XK_TG * XK_NOUT];
static unsigned char g_kinds[XK_NOUT];
static unsigned g_scratch[XK_TG];
static unsigned g_scen;
static void xk_thread(void* const*, const pmn_tinfo* ti) {
  xk_body(ti->lid, g_scen, g_out[g_scen], g_kinds, g_scratch);
}

// Canonical combination orders (restated independently of the prelude).
template <class T, class F> static T ref_tree(std::vector<T> v, F op) {
  int n = (int)v.size();
  for (int k = 1; k < n; k <<= 1)
    for (int r = 0; r + k < n; r += 2 * k) v[r] = op(v[r], v[r + k]);
  return v[0];
}
template <class T, class F> static std::vector<T> ref_scan(std::vector<T> v, F op) {
  int n = (int)v.size();
  for (int k = 1; k < n; k <<= 1) {
    std::vector<T> w = v;
    for (int r = k; r < n; ++r) w[r] = op(v[r - k], v[r]);
    v = w;
  }
  return v;
}

static void check_xk(unsigned scen) {
  const unsigned* out = g_out[scen];
  for (unsigned t = 0; t < XK_TG; ++t) {
    CHECK_MSG(out[t * XK_NOUT + XK_SIMD0 - 1] < XK_SIMD0, "first block overflows XK_SIMD0");
    if (xk_active(scen, t)) CHECK_MSG(out[t * XK_NOUT + XK_NOUT - 1] < XK_NOUT, "outputs overflow XK_NOUT");
  }
  for (unsigned sg = 0; sg < XK_TG / 32; ++sg) {
    std::vector<unsigned> act;
    for (unsigned l = 0; l < 32; ++l) if (xk_active(scen, sg * 32 + l)) act.push_back(l);
    if (act.empty()) continue;
    std::vector<float> sf, pf, fa;
    std::vector<pmn_half> sh;
    std::vector<int> ia, ib;
    std::vector<unsigned> ua;
    for (unsigned l : act) {
      unsigned tid = sg * 32 + l, seed = tid * 7919u + scen * 104729u;
      sf.push_back(xk_sum_val(seed + 10u)); pf.push_back(xk_prod_val(seed + 11u));
      fa.push_back(xk_float(seed));
      sh.push_back(pmn_half(xk_sum_val(seed + 10u) * 0.25f));
      ia.push_back((int)xk_hash(seed + 13u)); ib.push_back((int)(xk_hash(seed + 14u) % 7u) - 3);
      ua.push_back(xk_hash(seed + 15u));
    }
    auto fadd = [](float a, float b) { return a + b; };
    auto fmul = [](float a, float b) { return a * b; };
    auto hadd = [](pmn_half a, pmn_half b) { return pmn_half(a + b); };
    float tsum = ref_tree(sf, fadd), tprod = ref_tree(pf, fmul);
    pmn_half hsum = ref_tree(sh, hadd);
    int isum = 0, imax = INT_MIN, imin = INT_MAX, iprod = 1;
    unsigned uand = ~0u, uor = 0, uxor = 0, usum = 0, umax = 0, umin = ~0u;
    double dsum = 0;
    for (size_t i = 0; i < act.size(); ++i) {
      isum = (int)((unsigned)isum + (unsigned)ia[i]); imax = std::max(imax, ia[i]); imin = std::min(imin, ia[i]);
      iprod = (int)((unsigned)iprod * (unsigned)ib[i]);
      uand &= ua[i]; uor |= ua[i]; uxor ^= ua[i]; usum += ua[i]; umax = std::max(umax, ua[i]); umin = std::min(umin, ua[i]);
      dsum += sf[i];
    }
    CHECK_MSG(std::fabs(dsum - tsum) <= 1e-4 * 32 * 256, "tree sum %g vs %g", tsum, dsum);
    std::vector<float> incl = ref_scan(sf, fadd), pincl = ref_scan(pf, fmul);
    std::vector<pmn_half> hincl = ref_scan(sh, hadd);
    unsigned first = act[0];
    unsigned long long ballot = 0;
    for (size_t i = 0; i < act.size(); ++i) if (fa[i] > 0.0f) ballot |= 1ull << act[i];
    for (size_t r = 0; r < act.size(); ++r) {
      unsigned l = act[r], tid = sg * 32 + l;
      const unsigned* o = out + tid * XK_NOUT;
      int k = XK_SIMD0;
      unsigned partner = tid ^ 33u;
      unsigned seedp = partner * 7919u + scen * 104729u;
      CHECK(o[k++] == (xk_active(scen, partner) ? fbits(xk_float(seedp)) : 0u));
      CHECK_MSG(o[k] == fbits(tsum), "scen %u lane %u simd_sum %a vs %a", scen, l, bitsf(o[k]), tsum); ++k;
      CHECK(o[k++] == fbits(tprod));
      float mx = fa[0], mn = fa[0];
      for (float v : fa) { mx = pmn::max(mx, v); mn = pmn::min(mn, v); }
      CHECK_MSG(same_float(bitsf(o[k]), mx), "simd_max"); ++k;
      CHECK(same_float(bitsf(o[k++]), mn));
      CHECK(o[k++] == hsum.bits);
      k += 3;  // half product / max / min: covered by the bitwise cpu-vs-gpu comparison
      CHECK(o[k++] == (unsigned)isum); CHECK(o[k++] == (unsigned)iprod);
      CHECK(o[k++] == (unsigned)imax); CHECK(o[k++] == (unsigned)imin);
      CHECK(o[k++] == uand); CHECK(o[k++] == uor); CHECK(o[k++] == uxor);
      CHECK(o[k++] == usum); CHECK(o[k++] == umax); CHECK(o[k++] == umin);
      { short ss = 0; for (int v : ib) ss = (short)(ss + v); CHECK(o[k++] == (unsigned)(int)ss); }
      { unsigned a = ~0u; for (int v : ia) a &= (unsigned)v; CHECK(o[k++] == a); }
      CHECK(o[k] == fbits(tsum)); k += 4;            // float4 sum, x component
      k += 2;                                          // half2 sum
      { int m2 = INT_MIN; for (int v : ib) m2 = std::max(m2, v); CHECK(o[k++] == (unsigned)imax); CHECK(o[k++] == (unsigned)m2); }
      CHECK_MSG(o[k] == fbits(incl[r]), "scen %u lane %u prefix incl", scen, l); ++k;
      CHECK(o[k++] == (r == 0 ? fbits(0.0f) : fbits(incl[r - 1])));
      CHECK(o[k++] == fbits(pincl[r]));
      CHECK(o[k++] == (r == 0 ? fbits(1.0f) : fbits(pincl[r - 1])));
      CHECK(o[k++] == hincl[r].bits);
      CHECK(o[k++] == (r == 0 ? 0u : hincl[r - 1].bits));
      { int s = 0, e = 0, p = 1, pe = 1;
        for (size_t i = 0; i <= r; ++i) { e = s; s = (int)((unsigned)s + (unsigned)ia[i]); pe = p; p = (int)((unsigned)p * (unsigned)ib[i]); }
        CHECK(o[k++] == (unsigned)s); CHECK(o[k++] == (unsigned)e); CHECK(o[k++] == (unsigned)p); CHECK(o[k++] == (unsigned)pe); }
      auto src_val = [&](unsigned src) -> unsigned {   // lane src's fa if active, else own
        if (src < 32 && xk_active(scen, sg * 32 + src)) return fbits(xk_float((sg * 32 + src) * 7919u + scen * 104729u));
        return fbits(xk_float(tid * 7919u + scen * 104729u));
      };
      CHECK(o[k++] == src_val((l * 7u + 3u) & 31u));
      CHECK(o[k++] == src_val(l ^ 5u));
      CHECK(o[k++] == src_val(l ^ 16u));
      CHECK_MSG(o[k] == src_val(l >= 3 ? l - 3 : 99u), "scen %u lane %u shuffle_up", scen, l); ++k;
      CHECK(o[k++] == src_val(l + 3u));
      CHECK(o[k++] == src_val(l));
      CHECK(o[k++] == src_val(9u));
      CHECK(o[k++] == src_val(first));
      k += 2;                                          // half shuffle_down, int shuffle_up
      CHECK(o[k] == src_val(l ^ 3u)); k += 4;          // float4 shuffle, x component
      CHECK_MSG(o[k] == (unsigned)ballot, "scen %u lane %u ballot %08x vs %08llx", scen, l, o[k], ballot); ++k;
      CHECK(o[k++] == 0u);
      { bool all = true; for (float v : fa) all = all && v == v; CHECK(o[k++] == (unsigned)all); }
      { bool any = false; for (float v : fa) any = any || v > 1000.0f; CHECK(o[k++] == (unsigned)any); }
      CHECK(o[k++] == (unsigned)(l == first));
      CHECK(o[k++] == 1u);
      CHECK(o[k++] == (unsigned)(act.size() == 32));
      // divergent branch: the group is the active lanes of the same parity
      std::vector<float> grp; std::vector<unsigned> glanes; size_t gr = 0;
      for (size_t i = 0; i < act.size(); ++i)
        if ((act[i] & 1u) == (l & 1u)) { if (act[i] == l) gr = grp.size(); grp.push_back(sf[i]); glanes.push_back(act[i]); }
      unsigned gmask = 0; for (unsigned gl : glanes) gmask |= 1u << gl;
      CHECK_MSG(o[k] == fbits(ref_tree(grp, fadd)), "scen %u lane %u branch sum", scen, l); ++k;
      CHECK(o[k++] == fbits(ref_scan(grp, fadd)[gr]));
      { unsigned s = l + 1; unsigned v = (s < 32 && (gmask >> s & 1u)) ? fbits(xk_float((sg * 32 + s) * 7919u + scen * 104729u))
                                                                      : fbits(xk_float(tid * 7919u + scen * 104729u));
        CHECK(o[k++] == v); }
      CHECK(o[k++] == gmask);
      CHECK(o[k++] == (unsigned)(l == glanes[0]));
      // loop with per-lane trip counts: iteration i groups the active lanes with (lane & 3) >= i
      float acc = 0; unsigned cnt = 0;
      for (unsigned i = 0; i <= (l & 3u); ++i) {
        std::vector<float> g; unsigned m = 0;
        for (size_t j = 0; j < act.size(); ++j) if ((act[j] & 3u) >= i) { g.push_back(sf[j] * (float)(i + 1u)); m |= 1u << act[j]; }
        acc += ref_tree(g, fadd); cnt = cnt * 3u + m;
      }
      CHECK_MSG(o[k] == fbits(acc), "scen %u lane %u loop sum", scen, l); ++k;
      CHECK(o[k++] == cnt);
      CHECK(o[k++] == fbits(tsum));
      unsigned amask = 0; for (unsigned al : act) amask |= 1u << al;
      CHECK(o[k++] == amask);
    }
  }
}

static int run_xk(const char* dump) {
  for (unsigned s = 0; s < XK_NSCEN; ++s) {
    for (unsigned i = 0; i < XK_TG * XK_NOUT; ++i) g_out[s][i] = 0xdeadbeefu;
    for (unsigned i = 0; i < XK_TG; ++i) g_scratch[i] = 0;
    g_scen = s;
    if (run_launch(nullptr, 1, XK_TG, xk_thread) != 0) { ++g_fail; return 1; }
    check_xk(s);
  }
  if (dump) {
    FILE* fp = fopen(dump, "wb");
    if (!fp) { printf("FAIL cannot write %s\n", dump); ++g_fail; return 1; }
    fwrite(g_kinds, 1, XK_NOUT, fp);
    fwrite(g_out, sizeof(unsigned), XK_NSCEN * XK_TG * XK_NOUT, fp);
    fclose(fp);
  }
  return 0;
}

int main(int argc, char** argv) {
  const char* dump = nullptr;
  bool only_xk = false;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--dump") && i + 1 < argc) dump = argv[++i];
    if (!std::strcmp(argv[i], "--xk-only")) only_xk = true;
  }
  if (!only_xk) {
    test_half_conversions();
    test_half_arith();
    test_vectors();
    test_math();
    test_atomics();
    test_overloads();
  }
  run_xk(dump);
  printf("%ld checks, %ld failed\n", g_checks, g_fail);
  return g_fail ? 1 : 0;
}
