// pmn_lockstep.h -- cpu target only: the support code of work-item-loop ("lockstep") kernels.
//
// Design note
// -----------
// The front end (pymetalnn/runtime/lockstep.py) turns a kernel with barriers or SIMD-group
// functions into one function per threadgroup: the code between two synchronization points
// becomes a loop over the threadgroup's threads, values that live across a synchronization point
// are arrays indexed by the thread, and divergent control flow is tracked with one byte per
// thread (`mask`: 1 = the thread executes). A SIMD-group function is split in three:
//   1. in the loop before it, every active thread stores its operand into its pmn_simd_slot and
//      names the combining function (pmn::grp::<name>(slot, fn, args...)),
//   2. pmn::grp::exec runs that function once per simdgroup over the active threads -- the very
//      pmn_simd_fn the fiber runtime runs, so both paths give bit-identical results,
//   3. the loop after it reads the result (pmn::grp::res / the vote readers).
// The active set of a simdgroup is the set of its threads whose mask byte is set, which is what
// the fiber scheduler forms for structured control flow (docs/dialect.md).
#ifndef PMN_LOCKSTEP_H
#define PMN_LOCKSTEP_H
#ifdef PMN_CPU
#include <cstring>

namespace pmn {
namespace grp {

typedef unsigned char mask_t;

inline void fill(mask_t* m, unsigned n) { std::memset(m, 1, n); }
inline void copy(mask_t* d, const mask_t* s, unsigned n) { std::memcpy(d, s, n); }
inline void zero(mask_t* d, unsigned n) { std::memset(d, 0, n); }
inline bool any(const mask_t* m, unsigned n) {
  unsigned char a = 0;
  for (unsigned i = 0; i < n; ++i) a |= m[i];
  return a != 0;
}

// Runs fn once per simdgroup that has an active thread, with bit l = thread 32*s+l active.
inline void exec(pmn_simd_slot* s, const mask_t* m, unsigned n, pmn_simd_fn fn) {
  for (unsigned g = 0; g < n; g += 32u) {
    const unsigned e = n - g < 32u ? n - g : 32u;
    uint32_t bits = 0;
    for (unsigned l = 0; l < e; ++l) bits |= (uint32_t)(m[g + l] != 0) << l;
    if (bits) fn(s + g, bits);
  }
}

template <class T> inline void put(pmn_simd_slot& s, const T& v, uint32_t arg) {
  static_assert(sizeof(T) <= 16, "SIMD operand too large");
  std::memcpy(s.in, &v, sizeof(T));
  s.arg = arg;
}
template <class R> inline R res(const pmn_simd_slot& s) {
  R r;
  std::memcpy(&r, s.out, sizeof(R));
  return r;
}
inline simd_vote ballot_res(const pmn_simd_slot& s) { return simd_vote(res<pmn_ulong>(s)); }
inline bool all_res(const pmn_simd_slot& s) { return res<pmn_ulong>(s) == 0; }
inline bool any_res(const pmn_simd_slot& s) { return res<pmn_ulong>(s) != 0; }

// Step 1 of each SIMD-group function: the same operand and combining function as the fiber
// path's pmn::<name> (prelude, "SIMD-group functions").
inline void simd_ballot(pmn_simd_slot& s, pmn_simd_fn& fn, bool p) {
  put(s, p, 0);
  fn = &detail::fn_ballot;
}
inline void simd_all(pmn_simd_slot& s, pmn_simd_fn& fn, bool p) {
  put(s, !p, 0);
  fn = &detail::fn_ballot;
}
inline void simd_any(pmn_simd_slot& s, pmn_simd_fn& fn, bool p) {
  put(s, p, 0);
  fn = &detail::fn_ballot;
}
inline void simd_is_first(pmn_simd_slot& s, pmn_simd_fn& fn) {
  put(s, false, 0);
  fn = &detail::fn_is_first;
}
inline void simdgroup_barrier(pmn_simd_slot& s, pmn_simd_fn& fn, mem_flags) {
  s.arg = 0;
  fn = &detail::simd_noop;
}
#define PMN_GRP_REDUCE(name, op)                                                \
  template <class T> inline void name(pmn_simd_slot& s, pmn_simd_fn& fn, const T& v) { \
    put(s, v, 0);                                                               \
    fn = &detail::fn_reduce<detail::op, T>;                                     \
  }
#define PMN_GRP_SCAN(name, op, excl)                                            \
  template <class T> inline void name(pmn_simd_slot& s, pmn_simd_fn& fn, const T& v) { \
    put(s, v, 0);                                                               \
    fn = &detail::fn_scan<detail::op, excl, T>;                                 \
  }
#define PMN_GRP_SHUFFLE(name, mode)                                             \
  template <class T>                                                            \
  inline void name(pmn_simd_slot& s, pmn_simd_fn& fn, const T& v, unsigned a) { \
    put(s, v, a);                                                               \
    fn = &detail::fn_shuffle<detail::mode>;                                     \
  }
PMN_SIMD_FUNCTIONS(PMN_GRP_REDUCE, PMN_GRP_SCAN, PMN_GRP_SHUFFLE)  // the prelude's list
template <class T> inline void simd_broadcast_first(pmn_simd_slot& s, pmn_simd_fn& fn, const T& v) {
  put(s, v, 0);
  fn = &detail::fn_shuffle<detail::SH_FIRST>;
}
#undef PMN_GRP_REDUCE
#undef PMN_GRP_SCAN
#undef PMN_GRP_SHUFFLE

}  // namespace grp
}  // namespace pmn

#endif  // PMN_CPU
#endif  // PMN_LOCKSTEP_H
