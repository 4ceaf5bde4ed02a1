// real_rt.h -- run_launch on the real fiber runtime (pymetalnn/runtime/cpu/pmn_cpu_rt.cpp).
#pragma once
static void unused_loop(void* const*, uint32_t, uint32_t, uint32_t) {}
static int run_launch(void* const* args, uint32_t n_groups, uint32_t tg, pmn_thread_fn fn) {
  char err[256];
  int rc = pmn_cpu_launch(args, n_groups, tg, 1, fn, unused_loop, err, sizeof err);
  if (rc) printf("FAIL pmn_cpu_launch: %s\n", err);
  return rc;
}
