// pmn_cpu_abi.h -- the C ABI between translated kernel libraries (cpu backend) and the
// cpu runtime library (pmn_cpu_rt.cpp). Both sides include this file; nothing else is shared.
//
// Execution model: a launch runs n_groups threadgroups of tg_size threads. Threadgroups are
// spread over worker threads; every thread of one threadgroup runs on the same worker. Kernels
// that use no barrier and no SIMD-group function run through `loop_fn` (a plain loop over the
// threadgroup's threads, inlined by the compiler). The others run each thread as a fiber through
// `thread_fn`; a fiber gives up the worker only at a barrier or a SIMD-group function.
#ifndef PMN_CPU_ABI_H
#define PMN_CPU_ABI_H
#include <stdint.h>
#include <stddef.h>

// The runtime library is built with hidden visibility and exports only these functions, so
// loading it RTLD_GLOBAL cannot leak a (possibly static) C++ runtime into other extensions.
#if defined(__GNUC__)
#define PMN_CPU_API __attribute__((visibility("default")))
#else
#define PMN_CPU_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

// Built-in values of one thread (MSL attribute names in comments). 1-D grids only.
typedef struct pmn_tinfo {
  uint32_t gid;       // thread_position_in_grid
  uint32_t lid;       // thread_position_in_threadgroup
  uint32_t tgid;      // threadgroup_position_in_grid
  uint32_t tg_size;   // threads_per_threadgroup
  uint32_t n_groups;  // threadgroups_per_grid
  uint32_t lane;      // thread_index_in_simdgroup
  uint32_t simd_id;   // simdgroup_index_in_threadgroup
  uint32_t n_simd;    // simdgroups_per_threadgroup
} pmn_tinfo;

// One lane's mailbox for a SIMD-group function: the lane writes its operand into `in` (and a
// per-lane integer such as a shuffle source or delta into `arg`), waits, then reads `out`.
typedef struct pmn_simd_slot {
  unsigned char in[16];
  unsigned char out[16];
  uint32_t arg;
  uint32_t pad[3];
} pmn_simd_slot;

// Computes `out` for every lane whose bit is set in `mask` from the `in`/`arg` of those lanes.
// `slots` has 32 entries indexed by lane. Called once per participating group, by the scheduler.
typedef void (*pmn_simd_fn)(pmn_simd_slot* slots, uint32_t mask);

typedef void (*pmn_thread_fn)(void* const* args, const pmn_tinfo* ti);
typedef void (*pmn_tg_loop_fn)(void* const* args, uint32_t tgid, uint32_t tg_size, uint32_t n_groups);

// --- called by Python (ctypes) ---------------------------------------------------------------
// Runs the whole grid and returns when it is done. use_fibers selects thread_fn (fibers) over
// loop_fn. Returns 0, or non-zero with a message in err.
PMN_CPU_API int pmn_cpu_launch(void* const* args, uint32_t n_groups, uint32_t tg_size, int use_fibers,
                   pmn_thread_fn thread_fn, pmn_tg_loop_fn loop_fn, char* err, size_t errlen);
// Number of worker threads (PYMETALNN_CPU_THREADS, else the number of cores).
PMN_CPU_API int pmn_cpu_num_workers(void);
// Fiber stack size in bytes (PYMETALNN_CPU_STACK, default 128 KiB).
PMN_CPU_API size_t pmn_cpu_stack_size(void);

// --- called by kernel code, only inside fiber-mode launches ----------------------------------
// The calling lane's slot. Aborts with a message when called outside a fiber.
PMN_CPU_API pmn_simd_slot* pmn_cpu_lane_slot(void);
// Blocks the calling lane until every lane of its simdgroup that has not returned is blocked;
// lanes waiting on the same `site` with the lowest site id are grouped, `fn` runs once for them,
// and they resume. Lanes waiting at a threadgroup barrier are not part of the group.
PMN_CPU_API void pmn_cpu_simd_wait(uint32_t site, pmn_simd_fn fn);
// threadgroup_barrier: blocks until every thread of the threadgroup that has not returned waits here.
PMN_CPU_API void pmn_cpu_tg_barrier(void);

#ifdef __cplusplus
}
#endif
#endif
