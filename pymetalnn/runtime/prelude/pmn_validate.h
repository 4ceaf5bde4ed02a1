// pmn_validate.h -- validation mode of the cpu backend (PYMETALNN_VALIDATE=1), the counterpart
// of Metal's shader validation: every access through a device or threadgroup pointer is checked
// against the memory bound to it.
//
// Design notes (why, not what):
// * Only validation builds include this header: the translator then writes each `device T*` and
//   `threadgroup T*` declarator as PMN_DPTR(T) and each threadgroup array as pmn::tgarr, and the
//   entry points wrap the bound buffers; normal builds are byte-for-byte what they were (zero
//   cost when off, and a separate cache entry when on).
// * pmn::vptr carries its pointer, the bounds of the buffer or array it was derived from, and
//   the name of that argument or array. The `.metal` file:line of an access comes from
//   __builtin_FILE/__builtin_LINE as default arguments of the index type, which the compiler
//   evaluates where the index is converted, i.e. at the access, and which follow #line. A
//   dereference without an index (`*p`, `p->x`) reports where `p` was last offset or cast.
// * An out-of-bounds access records the first message of the launch (one atomic exchange) and
//   is redirected to a per-thread scratch element, so the launch runs to its end without
//   touching a neighbour; the host then raises ValidationError naming the kernel.
// * Pointers that do not come from a bound buffer or a threadgroup array (thread memory, a
//   null pointer) carry no bounds and are not checked.
#ifndef PMN_VALIDATE_H
#define PMN_VALIDATE_H
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <type_traits>

// Set by the host before each launch (launches run one at a time): the bytes bound to each
// argument; read back after it: the first violation.
extern "C" __attribute__((visibility("default"))) unsigned long long pmn_v_sizes[64];
extern "C" __attribute__((visibility("default"))) int pmn_v_failed;
extern "C" __attribute__((visibility("default"))) char pmn_v_msg[1024];
unsigned long long pmn_v_sizes[64];
int pmn_v_failed;
char pmn_v_msg[1024];

#define PMN_DPTR(...) pmn::vptr<__VA_ARGS__>

namespace pmn {

struct vidx {
  long long v;
  const char* file;
  int line;
  template <class I, class = typename std::enable_if<std::is_integral<I>::value ||
                                                     std::is_enum<I>::value>::type>
  vidx(I i, const char* f = __builtin_FILE(), int l = __builtin_LINE())
      : v((long long)i), file(f), line(l) {}
};

[[gnu::noinline, gnu::cold]] inline void v_fail(const char* file, int line, const char* name,
                                                const char* base, const char* addr,
                                                const char* end, size_t esize) {
  int expected = 0;
  if (!__atomic_compare_exchange_n(&pmn_v_failed, &expected, 1, false, __ATOMIC_ACQ_REL,
                                   __ATOMIC_ACQUIRE))
    return;  // the first violation of the launch is the one reported
  const char* slash = std::strrchr(file, '/');
  long long bytes = (long long)(end - base);
  long long off = (long long)(addr - base);
  long long idx = off >= 0 ? off / (long long)esize : -((-off + (long long)esize - 1) / (long long)esize);
  std::snprintf(pmn_v_msg, sizeof pmn_v_msg,
                "%s:%d: out-of-bounds access to '%s': index %lld, size %lld (elements of %zu "
                "bytes; %lld bytes bound)",
                slash ? slash + 1 : file, line, name, idx, bytes / (long long)esize, esize, bytes);
}

template <class T>
inline T& v_scratch() {  // where an out-of-bounds access goes instead
  alignas(64) static thread_local unsigned char buf[sizeof(T) < 4096 ? 4096 : sizeof(T)];
  return *reinterpret_cast<T*>(buf);
}

template <class T>
struct vptr {
  T* p;
  const char* base;  // bounds [base, end) in bytes; null base: unchecked
  const char* end;
  const char* name;
  const char* file;  // where p was last formed (offset, cast, bound)
  int line;

  vptr() : p(nullptr), base(nullptr), end(nullptr), name("?"), file("?"), line(0) {}
  vptr(std::nullptr_t) : vptr() {}
  vptr(T* q) : p(q), base(nullptr), end(nullptr), name("?"), file("?"), line(0) {}
  vptr(T* q, unsigned long long nbytes, const char* n, const char* f, int l)
      : p(q), base((const char*)q), end((const char*)q + nbytes), name(n), file(f), line(l) {}
  // element types are never cv-qualified here (the translator drops them), so every pointer
  // cast is a reinterpretation, explicit as in C++; a raw `const T*` (e.g. `&x[i]` of thread
  // data) converts implicitly, unchecked
  vptr(const T* q) : vptr(const_cast<T*>(q)) {}
  template <class U, class = typename std::enable_if<!std::is_same<U, T>::value>::type>
  explicit vptr(const vptr<U>& o)
      : p((T*)o.p), base(o.base), end(o.end), name(o.name), file(o.file), line(o.line) {}
  explicit vptr(T* q, const vptr& bounds)
      : p(q), base(bounds.base), end(bounds.end), name(bounds.name), file(bounds.file),
        line(bounds.line) {}

  T& at(T* q, const char* f, int l) const {
    if (base) {
      const char* a = (const char*)q;
      if (a < base || a + sizeof(T) > end) {
        v_fail(f, l, name, base, a, end, sizeof(T));
        return v_scratch<T>();
      }
    }
    return *q;
  }
  T& operator[](vidx i) const { return at(p + i.v, i.file, i.line); }
  T& operator*() const { return at(p, file, line); }
  T* operator->() const { return &at(p, file, line); }
  explicit operator bool() const { return p != nullptr; }

  vptr moved(long long d, const char* f, int l) const {
    vptr r = *this;
    r.p = p + d;
    r.file = f;
    r.line = l;
    return r;
  }
  vptr operator+(vidx i) const { return moved(i.v, i.file, i.line); }
  vptr operator-(vidx i) const { return moved(-i.v, i.file, i.line); }
  friend vptr operator+(vidx i, const vptr& q) { return q.moved(i.v, i.file, i.line); }
  vptr& operator+=(vidx i) { return *this = moved(i.v, i.file, i.line); }
  vptr& operator-=(vidx i) { return *this = moved(-i.v, i.file, i.line); }
  vptr& operator++() { ++p; return *this; }
  vptr& operator--() { --p; return *this; }
  vptr operator++(int) { vptr r = *this; ++p; return r; }
  vptr operator--(int) { vptr r = *this; --p; return r; }
  template <class U>
  std::ptrdiff_t operator-(const vptr<U>& o) const { return p - o.p; }
  template <class U> bool operator==(const vptr<U>& o) const { return p == o.p; }
  template <class U> bool operator!=(const vptr<U>& o) const { return p != o.p; }
  template <class U> bool operator<(const vptr<U>& o) const { return p < o.p; }
  template <class U> bool operator<=(const vptr<U>& o) const { return p <= o.p; }
  template <class U> bool operator>(const vptr<U>& o) const { return p > o.p; }
  template <class U> bool operator>=(const vptr<U>& o) const { return p >= o.p; }
  bool operator==(std::nullptr_t) const { return p == nullptr; }
  bool operator!=(std::nullptr_t) const { return p != nullptr; }
};

// A threadgroup array: its own storage, seen as a checked pointer to its first element.
template <class T, unsigned long long N>
struct tgarr : vptr<T> {
  T a[N];
  explicit tgarr(const char* n, const char* f = __builtin_FILE(), int l = __builtin_LINE())
      : vptr<T>(a, sizeof(a), n, f, l) {}
  tgarr(const tgarr&) = delete;
};

// Atomic functions take the object's address: check it, then call the unchecked version.
#define PMN_V_ATOMIC(fn)                                                          \
  template <class A, class... R>                                                  \
  inline auto fn(const vptr<A>& o, R... r) -> decltype(fn(o.p, r...)) {           \
    return fn(&*o, r...);                                                          \
  }
PMN_V_ATOMIC(atomic_load_explicit)
PMN_V_ATOMIC(atomic_store_explicit)
PMN_V_ATOMIC(atomic_exchange_explicit)
PMN_V_ATOMIC(atomic_compare_exchange_weak_explicit)
PMN_V_ATOMIC(atomic_fetch_add_explicit)
PMN_V_ATOMIC(atomic_fetch_sub_explicit)
PMN_V_ATOMIC(atomic_fetch_min_explicit)
PMN_V_ATOMIC(atomic_fetch_max_explicit)
PMN_V_ATOMIC(atomic_fetch_and_explicit)
PMN_V_ATOMIC(atomic_fetch_or_explicit)
PMN_V_ATOMIC(atomic_fetch_xor_explicit)
#undef PMN_V_ATOMIC

// Divergent barriers: every thread of a threadgroup must reach every threadgroup_barrier. Each
// thread counts the barriers it passes (in the spare word of its SIMD slot, which is per thread
// and lives as long as the threadgroup); the threadgroup (all of whose threads run on one OS
// thread) keeps the most barriers any thread reached and the fewest any returned after. A thread
// returning after fewer barriers than another reached, or reaching more than another returned
// after, is reported. Only fiber-mode kernels have barriers.
struct v_bar_state {
  unsigned min_exit, max_reached, tgid;
  const char* file;
  int line;
};
inline v_bar_state& v_bars() {
  static thread_local v_bar_state s;
  return s;
}
[[gnu::noinline, gnu::cold]] inline void v_diverged(const char* file, int line, unsigned tgid,
                                                    unsigned fewer, unsigned more) {
  int expected = 0;
  if (!__atomic_compare_exchange_n(&pmn_v_failed, &expected, 1, false, __ATOMIC_ACQ_REL,
                                   __ATOMIC_ACQUIRE))
    return;
  const char* slash = std::strrchr(file, '/');
  std::snprintf(pmn_v_msg, sizeof pmn_v_msg,
                "%s:%d: divergent threadgroup_barrier: in threadgroup %u a thread returned after "
                "%u barriers while another reached %u (every thread of a threadgroup must reach "
                "every barrier)",
                slash ? slash + 1 : file, line, tgid, fewer, more);
}
inline void v_thread_begin(const pmn_tinfo& ti) {
  if (ti.lid == 0) v_bars() = v_bar_state{~0u, 0u, ti.tgid, "?", 0};  // thread 0 starts first
  pmn_cpu_lane_slot()->pad[0] = 0;
}
inline void v_thread_end(const pmn_tinfo&) {
  v_bar_state& s = v_bars();
  const unsigned c = pmn_cpu_lane_slot()->pad[0];
  if (c < s.max_reached) v_diverged(s.file, s.line, s.tgid, c, s.max_reached);
  if (c < s.min_exit) s.min_exit = c;
}
inline void v_threadgroup_barrier(mem_flags f, const char* file = __builtin_FILE(),
                                  int line = __builtin_LINE()) {
  v_bar_state& s = v_bars();
  const unsigned c = ++pmn_cpu_lane_slot()->pad[0];
  if (c > s.max_reached) {
    s.max_reached = c;
    s.file = file;
    s.line = line;
  }
  if (c > s.min_exit) v_diverged(file, line, s.tgid, s.min_exit, c);
  threadgroup_barrier(f);
}

// simdgroup_load/store touch an 8x8 block (the same elements transposed or not): every element
// is checked, and the block is skipped when one is out of bounds.
template <class P>
inline bool v_block(const vptr<P>& q, pmn_ulong epr, detail::sgm_origin o) {
  if (!q.base) return true;
  for (pmn_ulong r = 0; r < 8; ++r)
    for (pmn_ulong c = 0; c < 8; ++c) {
      P* e = q.p + (o.y + r) * epr + o.x + c;
      if (&q.at(e, q.file, q.line) != e) return false;
    }
  return true;
}
template <class T, int C, int R, class P>
inline void simdgroup_load(simdgroup_matrix<T, C, R>& d, const vptr<P>& src,
                           pmn_ulong elements_per_row = C, detail::sgm_origin matrix_origin = 0,
                           bool transpose_matrix = false) {
  if (v_block(src, elements_per_row, matrix_origin))
    simdgroup_load(d, src.p, elements_per_row, matrix_origin, transpose_matrix);
}
template <class T, int C, int R, class P>
inline void simdgroup_store(const simdgroup_matrix<T, C, R>& a, const vptr<P>& dst,
                            pmn_ulong elements_per_row = C, detail::sgm_origin matrix_origin = 0,
                            bool transpose_matrix = false) {
  if (v_block(dst, elements_per_row, matrix_origin))
    simdgroup_store(a, dst.p, elements_per_row, matrix_origin, transpose_matrix);
}

}  // namespace pmn
#endif
