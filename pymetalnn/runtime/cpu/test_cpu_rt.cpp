// test_cpu_rt.cpp -- developer check of the cpu runtime (pmn_cpu_rt.cpp) straight against the C
// ABI in pmn_cpu_abi.h, with hand-written kernels standing in for translated ones.
//
//   c++ -std=c++17 -O2 -pthread test_cpu_rt.cpp pmn_cpu_rt.cpp -o test_cpu_rt && ./test_cpu_rt
//
// Without arguments it re-runs itself (--child) with PYMETALNN_CPU_THREADS = 1, 2, 3, 4 and the
// default, checks that every run passes and that all runs produce the same results (a hash over
// every test's output), and prints the reduction benchmark of each run. `--child` runs one
// configuration in-process; `--bench` runs only the benchmark.
#include "pmn_cpu_abi.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cfenv>
#include <string>
#include <thread>
#include <vector>

#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

// ------------------------------------------------------------------------------------------------
// Bookkeeping
// ------------------------------------------------------------------------------------------------
static std::atomic<int> g_kfail{0};  // failures detected inside kernels
static char g_kmsg[256];
static int g_fail = 0;
static uint64_t g_hash = 1469598103934665603ull;

#define KCHECK(cond, ...)                                                   \
  do {                                                                      \
    if (!(cond) && g_kfail.fetch_add(1) == 0)                               \
      std::snprintf(g_kmsg, sizeof g_kmsg, __VA_ARGS__);                    \
  } while (0)

static void hash_bytes(const void* p, size_t n) {
  const unsigned char* b = (const unsigned char*)p;
  for (size_t i = 0; i < n; ++i) g_hash = (g_hash ^ b[i]) * 1099511628211ull;
}
template <class T>
static void hash_vec(const std::vector<T>& v) {
  hash_bytes(v.data(), v.size() * sizeof(T));
}

static void report(const char* name, bool ok, const char* detail = "") {
  if (g_kfail.load()) {
    ok = false;
    detail = g_kmsg;
  }
  std::printf("  %-58s %s %s\n", name, ok ? "ok" : "FAIL", ok ? "" : detail);
  if (!ok) ++g_fail;
  g_kfail = 0;
  g_kmsg[0] = 0;
}

static bool launch(void* const* args, uint32_t ng, uint32_t tg, int fib, pmn_thread_fn tf,
                   pmn_tg_loop_fn lf) {
  char err[256];
  int rc = pmn_cpu_launch(args, ng, tg, fib, tf, lf, err, sizeof err);
  if (rc != 0) {
    std::printf("  launch(ng=%u, tg=%u, fibers=%d) failed: %s\n", ng, tg, fib, err);
    ++g_fail;
    return false;
  }
  return true;
}

// ------------------------------------------------------------------------------------------------
// SIMD-group functions (out[0..3] = result, out[4..7] = the mask the group ran with)
// ------------------------------------------------------------------------------------------------
static inline uint32_t in_u32(const pmn_simd_slot& s) {
  uint32_t v;
  std::memcpy(&v, s.in, 4);
  return v;
}
static inline void set_out(pmn_simd_slot& s, uint32_t v, uint32_t mask) {
  std::memcpy(s.out, &v, 4);
  std::memcpy(s.out + 4, &mask, 4);
}
static void fn_sum_u32(pmn_simd_slot* sl, uint32_t mask) {
  uint32_t t = 0;
  for (int l = 0; l < 32; ++l)
    if (mask >> l & 1) t += in_u32(sl[l]);
  for (int l = 0; l < 32; ++l)
    if (mask >> l & 1) set_out(sl[l], t, mask);
}
static void fn_prefix_excl_u32(pmn_simd_slot* sl, uint32_t mask) {
  uint32_t t = 0;
  for (int l = 0; l < 32; ++l)
    if (mask >> l & 1) {
      uint32_t v = in_u32(sl[l]);
      set_out(sl[l], t, mask);
      t += v;
    }
}
static void fn_shuffle_u32(pmn_simd_slot* sl, uint32_t mask) {  // out = in of lane `arg`
  uint32_t src[32];
  for (int l = 0; l < 32; ++l) src[l] = in_u32(sl[l]);
  for (int l = 0; l < 32; ++l)
    if (mask >> l & 1) {
      uint32_t a = sl[l].arg & 31;
      set_out(sl[l], (mask >> a & 1) ? src[a] : 0xFFFFFFFFu, mask);
    }
}
static void fn_sum_f32(pmn_simd_slot* sl, uint32_t mask) {
  float t = 0;
  for (int l = 0; l < 32; ++l)
    if (mask >> l & 1) {
      float v;
      std::memcpy(&v, sl[l].in, 4);
      t += v;
    }
  for (int l = 0; l < 32; ++l)
    if (mask >> l & 1) std::memcpy(sl[l].out, &t, 4);
}
static void fn_nop(pmn_simd_slot*, uint32_t) {}

// What the prelude does for one SIMD-group call.
static inline uint32_t simd_u32(uint32_t site, pmn_simd_fn fn, uint32_t v, uint32_t* mask = nullptr,
                                uint32_t arg = 0) {
  pmn_simd_slot* s = pmn_cpu_lane_slot();
  std::memcpy(s->in, &v, 4);
  s->arg = arg;
  pmn_cpu_simd_wait(site, fn);
  uint32_t r;
  std::memcpy(&r, s->out, 4);
  if (mask) std::memcpy(mask, s->out + 4, 4);
  return r;
}
static inline float simd_sum_f32(uint32_t site, float v) {
  pmn_simd_slot* s = pmn_cpu_lane_slot();
  std::memcpy(s->in, &v, 4);
  pmn_cpu_simd_wait(site, fn_sum_f32);
  float r;
  std::memcpy(&r, s->out, 4);
  return r;
}
static inline uint32_t lanes_mask(uint32_t n) { return n >= 32 ? 0xFFFFFFFFu : ((1u << n) - 1); }
static inline uint32_t simd_width(const pmn_tinfo* ti) {  // lanes in this thread's simdgroup
  uint32_t rest = ti->tg_size - ti->simd_id * 32;
  return rest < 32 ? rest : 32;
}

// ------------------------------------------------------------------------------------------------
// 1. loop mode covers every thread exactly once
// ------------------------------------------------------------------------------------------------
struct CoverArgs {
  std::atomic<uint32_t>* hits;
  uint32_t ng;
};
static void loop_cover(void* const* args, uint32_t tgid, uint32_t tg, uint32_t ng) {
  CoverArgs* a = (CoverArgs*)args[0];
  KCHECK(ng == a->ng, "loop_fn got n_groups %u, want %u", ng, a->ng);
  for (uint32_t i = 0; i < tg; ++i) a->hits[(size_t)tgid * tg + i].fetch_add(1);
}
static void test_loop_cover() {
  const uint32_t grids[] = {1, 31, 32, 33, 255, 256, 257};
  const uint32_t tgs[] = {1, 48, 64, 1024};
  bool ok = true;
  for (uint32_t tg : tgs)
    for (uint32_t ng : grids) {
      std::vector<std::atomic<uint32_t>> hits((size_t)ng * tg);
      for (auto& h : hits) h = 0;
      CoverArgs a{hits.data(), ng};
      void* args[] = {&a};
      if (!launch(args, ng, tg, 0, nullptr, loop_cover)) return;
      for (size_t i = 0; i < hits.size(); ++i)
        if (hits[i] != 1) {
          if (ok) std::printf("    tg=%u ng=%u thread %zu ran %u times\n", tg, ng, i, hits[i].load());
          ok = false;
        }
      std::vector<uint32_t> h(hits.size());
      for (size_t i = 0; i < h.size(); ++i) h[i] = hits[i];
      hash_vec(h);
    }
  report("loop mode: every thread once (ng 1..257, tg 1/48/64/1024)", ok);
}

// 1b. helpers that wake late: small launches separated by idle gaps of 0-200 us, so that pool
// threads fall asleep and wake in the middle of (or after) a launch. Each launch runs every
// thread exactly once, and nothing touches a launch's memory after pmn_cpu_launch returned
// (a late helper is shut out, or waited for once it joined).
static void loop_cover_slow(void* const* args, uint32_t tgid, uint32_t tg, uint32_t ng) {
  loop_cover(args, tgid, tg, ng);
  if (tgid % 3 == 1) std::this_thread::sleep_for(std::chrono::microseconds(20));
}
// 1c. a work-item-loop kernel with a 4 MiB frame launched from a thread with a 256 KiB stack:
// the caller's share runs on the runtime's launch stack, not the thread's own.
static void loop_big_frame(void* const* args, uint32_t tgid, uint32_t tg, uint32_t) {
  volatile char buf[4 << 20];  // volatile: the frame stays, and its far end is touched
  buf[0] = (char)tgid;
  buf[sizeof buf - 1] = buf[0];
  std::atomic<uint32_t>* hits = (std::atomic<uint32_t>*)args[0];
  for (uint32_t i = 0; i < tg; ++i) hits[(size_t)tgid * tg + i].fetch_add(1);
}
static void* small_stack_launch(void* arg) {
  std::vector<std::atomic<uint32_t>>& hits = *(std::vector<std::atomic<uint32_t>>*)arg;
  void* args[] = {hits.data()};
  for (int rep = 0; rep < 3; ++rep) launch(args, 3, 8, 0, nullptr, loop_big_frame);
  return nullptr;
}
static void test_small_caller_stack() {
  std::vector<std::atomic<uint32_t>> hits(3 * 8);
  for (auto& h : hits) h = 0;
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setstacksize(&attr, 256 << 10);
  pthread_t th;
  bool ok = pthread_create(&th, &attr, small_stack_launch, &hits) == 0;
  pthread_attr_destroy(&attr);
  if (ok) pthread_join(th, nullptr);
  for (auto& h : hits) ok = ok && h == 3;
  report("loop mode: a 4 MiB kernel frame launched from a 256 KiB thread stack", ok);
}

static void test_late_helpers() {
  const uint32_t gaps_us[] = {0, 5, 40, 70, 120, 200};
  std::vector<std::vector<std::atomic<uint32_t>>> prev;
  bool ok = true;
  for (uint32_t it = 0; it < 600 && ok; ++it) {
    const uint32_t ng = 1 + it % 9, tg = 32;
    std::this_thread::sleep_for(std::chrono::microseconds(gaps_us[it % 6]));
    prev.emplace_back((size_t)ng * tg);
    auto& hits = prev.back();
    for (auto& h : hits) h = 0;
    CoverArgs a{hits.data(), ng};
    void* args[] = {&a};
    if (!launch(args, ng, tg, 0, nullptr, it % 2 ? loop_cover_slow : loop_cover)) return;
    // this launch's threads once each, and the earlier launches' memory left as it was
    for (size_t k = prev.size() > 4 ? prev.size() - 4 : 0; k < prev.size() && ok; ++k)
      for (size_t i = 0; i < prev[k].size(); ++i)
        if (prev[k][i] != 1) {
          std::printf("    launch %zu (checked after %u): thread %zu ran %u times\n", k, it, i,
                      prev[k][i].load());
          ok = false;
          break;
        }
    if (prev.size() > 8) prev.erase(prev.begin());
  }
  report("loop mode: small launches after idle gaps, late helpers (600 launches)", ok);
}

// ------------------------------------------------------------------------------------------------
// 2. fiber mode covers every thread once with the right built-ins
// ------------------------------------------------------------------------------------------------
static void thread_cover(void* const* args, const pmn_tinfo* ti) {
  std::atomic<uint32_t>* hits = (std::atomic<uint32_t>*)args[0];
  const uint32_t ng = *(const uint32_t*)args[1];
  KCHECK(ti->gid == ti->tgid * ti->tg_size + ti->lid && ti->lane == ti->lid % 32 &&
             ti->simd_id == ti->lid / 32 && ti->n_simd == (ti->tg_size + 31) / 32 &&
             ti->n_groups == ng && ti->lid < ti->tg_size,
         "bad tinfo gid=%u lid=%u tgid=%u", ti->gid, ti->lid, ti->tgid);
  hits[ti->gid].fetch_add(1);
  pmn_cpu_tg_barrier();  // a barrier in the middle must not change anything
  hits[ti->gid].fetch_add(1);
}
static void test_fiber_cover() {
  const uint32_t grids[] = {1, 33, 257};
  const uint32_t tgs[] = {1, 32, 48, 256, 1024};
  bool ok = true;
  for (uint32_t tg : tgs)
    for (uint32_t ng : grids) {
      std::vector<std::atomic<uint32_t>> hits((size_t)ng * tg);
      for (auto& h : hits) h = 0;
      void* args[] = {hits.data(), &ng};
      if (!launch(args, ng, tg, 1, thread_cover, nullptr)) return;
      for (size_t i = 0; i < hits.size(); ++i)
        if (hits[i] != 2) {
          if (ok) std::printf("    tg=%u ng=%u thread %zu hits %u\n", tg, ng, i, hits[i].load());
          ok = false;
        }
    }
  report("fiber mode: every thread once, built-ins right", ok);
}

// ------------------------------------------------------------------------------------------------
// 3. barriers: tiled tree reduction through threadgroup memory (barriers per tile step and a
//    second barrier before the tile is overwritten); threads that returned early do not count
// ------------------------------------------------------------------------------------------------
static const uint32_t kTiles = 5;
static void thread_tiled(void* const* args, const pmn_tinfo* ti) {
  static thread_local uint32_t sh[1024];  // what PMN_THREADGROUP becomes on cpu
  const uint32_t* x = (const uint32_t*)args[0];
  uint32_t* out = (uint32_t*)args[1];
  const uint32_t active = *(const uint32_t*)args[2];  // threads with lid >= active return at once
  const uint32_t tg = ti->tg_size < active ? ti->tg_size : active;
  if (ti->lid >= active) return;
  uint32_t acc = 0;
  const size_t base = (size_t)ti->tgid * kTiles * ti->tg_size;
  for (uint32_t t = 0; t < kTiles; ++t) {
    sh[ti->lid] = x[base + (size_t)t * ti->tg_size + ti->lid];
    pmn_cpu_tg_barrier();
    uint32_t p2 = 1;
    while (p2 < tg) p2 <<= 1;
    for (uint32_t s = p2 / 2; s > 0; s /= 2) {
      if (ti->lid < s && ti->lid + s < tg) sh[ti->lid] += sh[ti->lid + s];
      pmn_cpu_tg_barrier();
    }
    if (ti->lid == 0) acc += sh[0];
    pmn_cpu_tg_barrier();  // nobody overwrites sh before thread 0 has read it
  }
  if (ti->lid == 0) out[ti->tgid] = acc;
}
static void test_tiled() {
  bool ok = true;
  const uint32_t cfg[][3] = {{256, 37, 256}, {100, 9, 100}, {1024, 3, 1024}, {64, 70, 40},
                             {256, 5, 1},    {1, 7, 1}};
  for (auto& c : cfg) {
    uint32_t tg = c[0], ng = c[1], active = c[2];
    std::vector<uint32_t> x((size_t)ng * kTiles * tg), out(ng, 0xdeadbeef);
    for (size_t i = 0; i < x.size(); ++i) x[i] = (uint32_t)(i * 2654435761u >> 7);
    void* args[] = {x.data(), out.data(), &active};
    if (!launch(args, ng, tg, 1, thread_tiled, nullptr)) return;
    for (uint32_t g = 0; g < ng; ++g) {
      uint32_t ref = 0;
      for (uint32_t t = 0; t < kTiles; ++t)
        for (uint32_t l = 0; l < active && l < tg; ++l) ref += x[(size_t)g * kTiles * tg + t * tg + l];
      if (out[g] != ref) {
        if (ok) std::printf("    tg=%u active=%u group %u: %u != %u\n", tg, active, g, out[g], ref);
        ok = false;
      }
    }
    hash_vec(out);
  }
  report("barriers: tiled tree reduction, early-returning threads", ok);
}

// ------------------------------------------------------------------------------------------------
// 4. SIMD waits: all lanes, early returns, divergence, partial simdgroups, slot reuse, mixing
//    with barriers. Each kernel checks its own results and also writes them out for the hash.
// ------------------------------------------------------------------------------------------------
static void thread_simd_all(void* const* args, const pmn_tinfo* ti) {
  uint32_t* out = (uint32_t*)args[0];
  const uint32_t w = simd_width(ti), first = ti->gid - ti->lane;
  uint32_t m;
  // sum
  uint32_t s = simd_u32(1, fn_sum_u32, ti->gid * 3 + 1, &m);
  uint32_t ref = 0;
  for (uint32_t l = 0; l < w; ++l) ref += (first + l) * 3 + 1;
  KCHECK(s == ref && m == lanes_mask(w), "simd_sum gid %u: %u (mask %x), want %u (mask %x)",
         ti->gid, s, m, ref, lanes_mask(w));
  // exclusive prefix sum: every lane gets a different value
  uint32_t p = simd_u32(2, fn_prefix_excl_u32, ti->lane + 1);
  KCHECK(p == ti->lane * (ti->lane + 1) / 2, "prefix gid %u: %u", ti->gid, p);
  // shuffle xor 5 (lanes beyond a partial simdgroup read as 0xFFFFFFFF)
  uint32_t src = ti->lane ^ 5;
  uint32_t sh = simd_u32(3, fn_shuffle_u32, ti->gid, nullptr, src);
  KCHECK(sh == (src < w ? first + src : 0xFFFFFFFFu), "shuffle gid %u: %u", ti->gid, sh);
  out[ti->gid] = s ^ (p << 8) ^ (sh << 16);
}

static void thread_simd_early(void* const* args, const pmn_tinfo* ti) {
  uint32_t* out = (uint32_t*)args[0];
  const uint32_t w = simd_width(ti);
  uint32_t ret_mask = 0;  // lanes returning before the SIMD call
  for (uint32_t l = 0; l < w; ++l)
    if (l % 3 == 0 || (ti->simd_id == 1 && l != 7)) ret_mask |= 1u << l;
  if (ret_mask >> ti->lane & 1) {
    out[ti->gid] = 0;
    return;
  }
  const uint32_t want_mask = lanes_mask(w) & ~ret_mask;
  uint32_t m;
  uint32_t s = simd_u32(1, fn_sum_u32, ti->lane, &m);
  uint32_t ref = 0;
  for (uint32_t l = 0; l < 32; ++l)
    if (want_mask >> l & 1) ref += l;
  KCHECK(s == ref && m == want_mask, "early-return group gid %u: sum %u mask %x, want %u %x",
         ti->gid, s, m, ref, want_mask);
  out[ti->gid] = s + m;
}

static void thread_simd_diverge(void* const* args, const pmn_tinfo* ti) {
  uint32_t* out = (uint32_t*)args[0];
  const uint32_t w = simd_width(ti);
  const uint32_t lo16 = lanes_mask(w < 16 ? w : 16);
  uint32_t m1 = 0, s1 = 0, m2, m3, m4, m5;
  // lanes < 16 take the branch with a SIMD call at site 1; the others go straight to site 2
  if (ti->lane < 16) {
    s1 = simd_u32(1, fn_sum_u32, ti->lane, &m1);
    KCHECK(m1 == lo16 && s1 == (w < 16 ? w * (w - 1) / 2 : 120u),
           "diverge site 1 gid %u: sum %u mask %x", ti->gid, s1, m1);
  }
  uint32_t s2 = simd_u32(2, fn_sum_u32, 1, &m2);
  KCHECK(m2 == lanes_mask(w) && s2 == w, "diverge site 2 gid %u: sum %u mask %x (want all %u lanes)",
         ti->gid, s2, m2, w);
  // upper lanes in the branch this time, nested: lanes >= 24 at site 3, lanes >= 16 at site 4
  if (ti->lane >= 16) {
    if (ti->lane >= 24) {
      simd_u32(3, fn_sum_u32, 1, &m3);
      KCHECK(m3 == (lanes_mask(w) & 0xFF000000u), "nested site 3 gid %u: mask %x", ti->gid, m3);
    }
    simd_u32(4, fn_sum_u32, 1, &m4);
    KCHECK(m4 == (lanes_mask(w) & 0xFFFF0000u), "nested site 4 gid %u: mask %x", ti->gid, m4);
  }
  uint32_t s5 = simd_u32(5, fn_prefix_excl_u32, 2, &m5);
  KCHECK(m5 == lanes_mask(w) && s5 == 2 * ti->lane, "site 5 gid %u: %u mask %x", ti->gid, s5, m5);
  out[ti->gid] = s1 ^ (m1 << 1) ^ s2 ^ s5;
}

// The same site inside a loop, with different per-lane results, and barriers mixed in (lanes of
// the upper half-simdgroup reach the barrier while the lower half still waits at a SIMD call).
static void thread_simd_loop(void* const* args, const pmn_tinfo* ti) {
  uint32_t* out = (uint32_t*)args[0];
  const uint32_t w = simd_width(ti);
  uint32_t acc = 0;
  for (uint32_t it = 0; it < 12; ++it) {
    uint32_t p = simd_u32(1, fn_prefix_excl_u32, ti->lane + it);
    uint32_t ref = ti->lane * (ti->lane - 1) / 2 + it * ti->lane;
    KCHECK(p == ref, "loop it %u gid %u: %u want %u", it, ti->gid, p, ref);
    acc = acc * 31 + p;
    if (it % 4 == 3) {
      if (ti->lane < 16) {
        uint32_t m;
        simd_u32(2, fn_sum_u32, 0, &m);
        KCHECK(m == lanes_mask(w < 16 ? w : 16), "loop site 2 gid %u: mask %x", ti->gid, m);
      }
      pmn_cpu_tg_barrier();
      pmn_cpu_simd_wait(3, fn_nop);  // simdgroup_barrier
    }
  }
  out[ti->gid] = acc;
}

static void test_simd() {
  struct K {
    const char* name;
    pmn_thread_fn fn;
  } ks[] = {{"SIMD: all lanes (sum, prefix, shuffle)", thread_simd_all},
            {"SIMD: lanes that returned early", thread_simd_early},
            {"SIMD: divergent branches reconverge (lowest site first)", thread_simd_diverge},
            {"SIMD: same site in a loop, mixed with barriers", thread_simd_loop}};
  const uint32_t tgs[] = {32, 48, 256, 1, 1000, 1024};
  for (auto& k : ks) {
    bool ok = true;
    for (uint32_t tg : tgs) {
      const uint32_t ng = tg >= 1000 ? 5 : 67;
      std::vector<uint32_t> out((size_t)tg * ng, 0xdeadbeef);
      void* args[] = {out.data()};
      if (!launch(args, ng, tg, 1, k.fn, nullptr)) ok = false;
      hash_vec(out);
    }
    report(k.name, ok);
  }
}

// tg 48: the second simdgroup has 16 lanes
static void thread_tg48(void* const* args, const pmn_tinfo* ti) {
  uint32_t* out = (uint32_t*)args[0];
  uint32_t m;
  uint32_t s = simd_u32(1, fn_sum_u32, 1, &m);
  uint32_t want = ti->simd_id == 0 ? 32 : 16;
  KCHECK(ti->n_simd == 2 && s == want && m == lanes_mask(want), "tg48 gid %u: n_simd %u sum %u mask %x",
         ti->gid, ti->n_simd, s, m);
  out[ti->gid] = s;
}
static void test_tg48() {
  std::vector<uint32_t> out(48 * 10);
  void* args[] = {out.data()};
  bool ok = launch(args, 10, 48, 1, thread_tg48, nullptr);
  hash_vec(out);
  report("SIMD: tg_size 48 -> second simdgroup has 16 lanes", ok);
}

// Each fiber keeps its own floating-point control state (MXCSR/x87 CW or FPCR rounding mode):
// thread 0 switches to round-upward and must still have it after blocking, nobody else sees it.
static void thread_fenv(void* const* args, const pmn_tinfo* ti) {
  std::atomic<int>* bad = (std::atomic<int>*)args[0];
  if (ti->lid == 0) std::fesetround(FE_UPWARD);
  pmn_cpu_tg_barrier();
  pmn_cpu_simd_wait(1, fn_nop);
  pmn_cpu_tg_barrier();
  if (std::fegetround() != (ti->lid == 0 ? FE_UPWARD : FE_TONEAREST)) bad->fetch_add(1);
  if (ti->lid == 0) std::fesetround(FE_TONEAREST);
}
static void test_fenv() {
  std::atomic<int> bad{0};
  void* args[] = {&bad};
  bool ok = launch(args, 9, 64, 1, thread_fenv, nullptr);
  report("fp control state is per fiber (fesetround in one fiber)",
         ok && bad == 0 && std::fegetround() == FE_TONEAREST);
}

// ------------------------------------------------------------------------------------------------
// 5. errors come back in err
// ------------------------------------------------------------------------------------------------
static void test_errors() {
  char err[256];
  void* args[] = {nullptr};
  bool ok = true;
  err[0] = 0;
  ok &= pmn_cpu_launch(args, 4, 0, 1, thread_cover, nullptr, err, sizeof err) != 0 && err[0];
  std::printf("    tg 0    -> \"%s\"\n", err);
  err[0] = 0;
  ok &= pmn_cpu_launch(args, 4, 1025, 0, nullptr, loop_cover, err, sizeof err) != 0 && err[0];
  std::printf("    tg 1025 -> \"%s\"\n", err);
  err[0] = 0;
  ok &= pmn_cpu_launch(args, 4, 32, 1, nullptr, loop_cover, err, sizeof err) != 0 && err[0];
  std::printf("    no fn   -> \"%s\"\n", err);
  err[0] = 0;
  ok &= pmn_cpu_launch(args, 1u << 23, 1024, 0, nullptr, loop_cover, err, sizeof err) != 0 && err[0];
  std::printf("    2^33 threads -> \"%s\"\n", err);
  ok &= pmn_cpu_launch(args, 0, 32, 1, thread_cover, nullptr, err, sizeof err) == 0;
  ok &= pmn_cpu_launch(args, 4, 0, 0, nullptr, loop_cover, nullptr, 0) != 0;  // no err buffer
  report("errors are returned (tg 0/1025, missing fn, grid > 2^32; ng 0 is a no-op)", ok);
}

// ------------------------------------------------------------------------------------------------
// 6. misuse aborts with a message; stack overflow hits the guard; fork gets a fresh pool
// ------------------------------------------------------------------------------------------------
static void loop_calls_barrier(void* const*, uint32_t, uint32_t, uint32_t) { pmn_cpu_tg_barrier(); }
static int deep(int n) {
  volatile char buf[512];
  buf[0] = (char)n;
  if (n == 0) return buf[0];
  return deep(n - 1) + buf[0];
}
__attribute__((noinline)) static int deep_big(int n) {
  // 20 KB frames, touched at their low end first: they would jump a one-page guard
  char buf[20000];
  __asm__ __volatile__("" : : "r"(buf) : "memory");  // the whole array must exist
  ((volatile char*)buf)[0] = (char)n;
  if (n == 0) return buf[0];
  int r = deep_big(n - 1);
  __asm__ __volatile__("" : : "r"(buf) : "memory");
  return r + ((volatile char*)buf)[0];
}
static void thread_overflow(void* const*, const pmn_tinfo* ti) {
  if (ti->lid == 3) deep(100000);  // ~50 MB of stack
}
static void thread_overflow_big(void* const*, const pmn_tinfo* ti) {
  // overflow by only 1-2 frames (20-40 KB): a one-page guard would be jumped silently
  if (ti->lid == 3) deep_big((int)(pmn_cpu_stack_size() / 20000) + 1);
}
static int child_status(void (*body)(), int timeout_s) {
  std::fflush(stdout);
  pid_t pid = fork();
  if (pid == 0) {
    alarm(timeout_s);
    body();
    _exit(0);
  }
  int st = 0;
  waitpid(pid, &st, 0);
  return st;
}
static void body_slot_outside() {
  dup2(open("/dev/null", 1), 2);
  pmn_cpu_lane_slot();
}
static void body_barrier_in_loop() {
  dup2(open("/dev/null", 1), 2);
  void* args[] = {nullptr};
  char err[128];
  pmn_cpu_launch(args, 1, 32, 0, nullptr, loop_calls_barrier, err, sizeof err);
}
static void body_overflow() {
  void* args[] = {nullptr};
  char err[128];
  pmn_cpu_launch(args, 1, 32, 1, thread_overflow, nullptr, err, sizeof err);
}
static void body_overflow_big() {
  void* args[] = {nullptr};
  char err[128];
  pmn_cpu_launch(args, 1, 32, 1, thread_overflow_big, nullptr, err, sizeof err);
}
static void body_fork_launch() {
  // the pool of the parent does not exist here; a launch must still complete
  std::vector<uint32_t> out(256 * 64);
  void* args[] = {out.data()};
  char err[128];
  if (pmn_cpu_launch(args, 64, 256, 1, thread_simd_all, nullptr, err, sizeof err) != 0) _exit(3);
  if (g_kfail.load()) _exit(4);
  _exit(0);
}
static void test_aborts() {
  int st = child_status(body_slot_outside, 10);
  report("pmn_cpu_lane_slot outside a fiber aborts",
         WIFSIGNALED(st) && WTERMSIG(st) == SIGABRT);
  st = child_status(body_barrier_in_loop, 10);
  report("pmn_cpu_tg_barrier in a loop-mode kernel aborts",
         WIFSIGNALED(st) && WTERMSIG(st) == SIGABRT);
  st = child_status(body_overflow, 10);
  report("fiber stack overflow hits the guard (SIGSEGV/SIGBUS)",
         WIFSIGNALED(st) && (WTERMSIG(st) == SIGSEGV || WTERMSIG(st) == SIGBUS));
  st = child_status(body_overflow_big, 10);
  report("... also with 20 KB stack frames (no jumping over the guard)",
         WIFSIGNALED(st) && (WTERMSIG(st) == SIGSEGV || WTERMSIG(st) == SIGBUS));
  st = child_status(body_fork_launch, 20);
  char d[64];
  std::snprintf(d, sizeof d, "status %#x", st);
  report("launch in a fork()ed child after the pool exists", WIFEXITED(st) && WEXITSTATUS(st) == 0, d);
}

// ------------------------------------------------------------------------------------------------
// 7. launches from several threads at once are serialized
// ------------------------------------------------------------------------------------------------
static void test_concurrent_launches() {
  std::atomic<int> bad{0};
  std::vector<std::thread> ths;
  for (int t = 0; t < 4; ++t)
    ths.emplace_back([t, &bad] {
      for (int rep = 0; rep < 25; ++rep) {
        const uint32_t tg = (t & 1) ? 64 : 100, ng = 13 + t;
        uint32_t active = tg;
        std::vector<uint32_t> x((size_t)ng * kTiles * tg), out(ng);
        for (size_t i = 0; i < x.size(); ++i) x[i] = (uint32_t)(i + t * 1000 + rep);
        void* args[] = {x.data(), out.data(), &active};
        char err[128];
        if (pmn_cpu_launch(args, ng, tg, 1, thread_tiled, nullptr, err, sizeof err) != 0) {
          bad++;
          continue;
        }
        for (uint32_t g = 0; g < ng; ++g) {
          uint32_t ref = 0;
          for (uint32_t i = 0; i < kTiles * tg; ++i) ref += x[(size_t)g * kTiles * tg + i];
          if (out[g] != ref) bad++;
        }
        // and a loop-mode launch in between
        std::vector<std::atomic<uint32_t>> hits((size_t)ng * tg);
        for (auto& h : hits) h = 0;
        CoverArgs a{hits.data(), ng};
        void* args2[] = {&a};
        if (pmn_cpu_launch(args2, ng, tg, 0, nullptr, loop_cover, err, sizeof err) != 0) bad++;
        for (auto& h : hits)
          if (h != 1) bad++;
      }
    });
  for (auto& th : ths) th.join();
  report("launches from 4 threads at once (fiber + loop mode)", bad == 0);
}

// ------------------------------------------------------------------------------------------------
// 8. benchmark: threadgroup reduction of 2^20 floats, TG 256
// ------------------------------------------------------------------------------------------------
static void atomic_add_f32(std::atomic<uint32_t>* a, float v) {
  uint32_t old = a->load(std::memory_order_relaxed), nw;
  do {
    float f;
    std::memcpy(&f, &old, 4);
    f += v;
    std::memcpy(&nw, &f, 4);
  } while (!a->compare_exchange_weak(old, nw, std::memory_order_relaxed));
}
static void thread_reduce(void* const* args, const pmn_tinfo* ti) {
  static thread_local float partial[32];  // threadgroup float partial[32]
  const float* x = (const float*)args[0];
  std::atomic<uint32_t>* result = (std::atomic<uint32_t>*)args[1];
  float s = simd_sum_f32(1, x[ti->gid]);
  if (ti->lane == 0) partial[ti->simd_id] = s;
  pmn_cpu_tg_barrier();
  if (ti->simd_id == 0) {
    float t = simd_sum_f32(2, ti->lane < ti->n_simd ? partial[ti->lane] : 0.0f);
    if (ti->lane == 0) atomic_add_f32(result, t);
  }
}
static void bench(bool verbose) {
  const uint32_t n = 1u << 20, tg = 256, ng = n / tg;
  std::vector<float> x(n);
  double ref = 0;
  for (uint32_t i = 0; i < n; ++i) {
    x[i] = (float)(i % 7);
    ref += x[i];
  }
  std::atomic<uint32_t> result;
  void* args[] = {x.data(), &result};
  std::vector<double> ts;
  bool ok = true;
  for (int rep = 0; rep < 11; ++rep) {
    result = 0;
    auto t0 = std::chrono::steady_clock::now();
    if (!launch(args, ng, tg, 1, thread_reduce, nullptr)) return;
    auto t1 = std::chrono::steady_clock::now();
    ts.push_back(std::chrono::duration<double>(t1 - t0).count());
    uint32_t bits = result.load();
    float r;
    std::memcpy(&r, &bits, 4);
    if ((double)r != ref) ok = false;
  }
  double first = ts[0];
  std::vector<double> rest(ts.begin() + 1, ts.end());
  std::sort(rest.begin(), rest.end());
  std::printf("BENCH threads=%d reduce 2^20 f32 tg256 fibers: first %.1f ms, best %.1f ms, median %.1f ms"
              " (%.1f ns/thread)\n",
              pmn_cpu_num_workers(), first * 1e3, rest[0] * 1e3, rest[rest.size() / 2] * 1e3,
              rest[rest.size() / 2] * 1e9 / n);
  if (verbose) report("benchmark reduction result", ok);
  else if (!ok) ++g_fail;
}

static int run_child() {
  std::printf("pmn_cpu_num_workers() = %d, pmn_cpu_stack_size() = %zu\n", pmn_cpu_num_workers(),
              pmn_cpu_stack_size());
  test_loop_cover();
  test_late_helpers();
  test_small_caller_stack();
  test_fiber_cover();
  test_tiled();
  test_simd();
  test_tg48();
  test_fenv();
  test_errors();
  test_concurrent_launches();
  test_aborts();
  bench(true);
  std::printf("HASH %016llx\n", (unsigned long long)g_hash);
  std::printf("%s (%d failures)\n", g_fail ? "FAILED" : "PASSED", g_fail);
  return g_fail ? 1 : 0;
}

int main(int argc, char** argv) {
  if (argc > 1 && std::strcmp(argv[1], "--child") == 0) return run_child();
  if (argc > 1 && std::strcmp(argv[1], "--bench") == 0) {
    bench(false);
    return g_fail ? 1 : 0;
  }
  const char* cfgs[] = {"PYMETALNN_CPU_THREADS=1", "PYMETALNN_CPU_THREADS=2",
                        "PYMETALNN_CPU_THREADS=3", "PYMETALNN_CPU_THREADS=4",
                        "PYMETALNN_CPU_THREADS=4 PYMETALNN_CPU_STACK=65536", ""};
  std::string hash0;
  int bad = 0;
  for (const char* c : cfgs) {
    std::string cmd = std::string("env -u PYMETALNN_CPU_THREADS -u PYMETALNN_CPU_STACK ") + c +
                      " '" + argv[0] + "' --child 2>&1";
    std::printf("== %s\n", *c ? c : "(default thread count)");
    std::fflush(stdout);
    FILE* f = popen(cmd.c_str(), "r");
    if (!f) return 2;
    char line[512];
    std::string hash;
    while (std::fgets(line, sizeof line, f)) {
      std::fputs(line, stdout);
      if (std::strncmp(line, "HASH ", 5) == 0) hash = line + 5;
    }
    int st = pclose(f);
    if (st != 0 || hash.empty()) ++bad;
    if (hash0.empty()) hash0 = hash;
    if (hash != hash0) {
      std::printf("  results differ from the first configuration\n");
      ++bad;
    }
  }
  std::printf("%s\n", bad ? "SOME CONFIGURATIONS FAILED" : "ALL CONFIGURATIONS PASSED, results identical");
  return bad ? 1 : 0;
}
