// mock_rt.h -- a thread-based mock of the cpu runtime's three pmn_cpu_* calls: one OS thread per
// kernel thread, same grouping rule as the real runtime (all live threads blocked -> per simdgroup,
// the lanes at the lowest site run `fn`; otherwise the threadgroup barrier releases when every
// live thread waits there).
#pragma once
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>
namespace mock {
enum { RUN, SIMD, BAR, DONE };
struct Lane { int state; uint32_t site; pmn_simd_fn fn; };
std::mutex mu;
std::condition_variable cv;
std::vector<Lane> lanes;
std::vector<pmn_simd_slot> slots;
thread_local int me = -1;
void schedule_locked() {
  for (auto& l : lanes) if (l.state == RUN) return;
  bool any = false;
  const int n = (int)lanes.size();
  for (int sg = 0; sg * 32 < n; ++sg) {
    uint32_t best = 0xffffffffu;
    bool have = false;
    for (int i = sg * 32; i < n && i < sg * 32 + 32; ++i)
      if (lanes[i].state == SIMD && (!have || lanes[i].site < best)) { best = lanes[i].site; have = true; }
    if (!have) continue;
    any = true;
    uint32_t mask = 0;
    pmn_simd_fn fn = nullptr;
    for (int i = sg * 32; i < n && i < sg * 32 + 32; ++i)
      if (lanes[i].state == SIMD && lanes[i].site == best) { mask |= 1u << (i - sg * 32); fn = lanes[i].fn; }
    fn(&slots[sg * 32], mask);
    for (int i = sg * 32; i < n && i < sg * 32 + 32; ++i)
      if (mask >> (i - sg * 32) & 1u) lanes[i].state = RUN;
  }
  if (!any) for (auto& l : lanes) if (l.state == BAR) l.state = RUN;
  cv.notify_all();
}
void block(int state, uint32_t site, pmn_simd_fn fn) {
  std::unique_lock<std::mutex> lk(mu);
  lanes[me].state = state; lanes[me].site = site; lanes[me].fn = fn;
  schedule_locked();
  cv.wait(lk, [] { return lanes[me].state == RUN; });
}
int launch(void* const* args, uint32_t n_groups, uint32_t tg, pmn_thread_fn fn) {
  for (uint32_t g = 0; g < n_groups; ++g) {
    lanes.assign(tg, Lane{RUN, 0, nullptr});
    slots.assign((tg + 31) / 32 * 32, pmn_simd_slot{});
    std::vector<std::thread> th;
    for (uint32_t t = 0; t < tg; ++t) {
      th.emplace_back([=] {
        me = (int)t;
        pmn_tinfo ti{g * tg + t, t, g, tg, n_groups, t & 31u, t / 32u, (tg + 31) / 32};
        fn(args, &ti);
        std::lock_guard<std::mutex> lk(mu);
        lanes[t].state = DONE;
        schedule_locked();
      });
    }
    for (auto& x : th) x.join();
  }
  return 0;
}
}  // namespace mock
extern "C" pmn_simd_slot* pmn_cpu_lane_slot(void) { return &mock::slots[mock::me]; }
extern "C" void pmn_cpu_simd_wait(uint32_t site, pmn_simd_fn fn) { mock::block(mock::SIMD, site, fn); }
extern "C" void pmn_cpu_tg_barrier(void) { mock::block(mock::BAR, 0, nullptr); }
static int run_launch(void* const* args, uint32_t n_groups, uint32_t tg, pmn_thread_fn fn) {
  return mock::launch(args, n_groups, tg, fn);
}
