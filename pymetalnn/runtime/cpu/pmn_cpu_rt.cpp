// pmn_cpu_rt.cpp -- the cpu backend's runtime: thread pool, fibers and the SIMD-group/barrier
// scheduler behind pmn_cpu_abi.h. Build: c++ -std=c++17 -O2 -fPIC -shared -pthread.
//
// Design notes (why, not what):
// * Threads. PYMETALNN_CPU_THREADS (else the usable core count) is the number of threads that
//   execute threadgroups, and the calling (Python) thread is one of them, so the pool holds N-1
//   std::threads. With N == 1 nothing is spawned and a launch is a plain loop on the caller.
//   Workers spin briefly after a launch before sleeping on their own condition variable: back-to-
//   back launches from Python then start without a futex wake, and a launch that needs only k
//   threads wakes only k-1 workers (no thundering herd on a many-core box). A helper joins a
//   launch before touching it and the caller, once every chunk is taken, shuts out helpers that
//   have not joined: a worker asleep in a VM can take hundreds of microseconds to run again, and
//   a small launch must not wait for it (relu over 51,200 floats after 10 ms idle: 450 us).
// * Work split. A launch uses min(N, n_groups) threads (a 1-group grid never wakes anyone), and
//   each grabs chunks with one atomic fetch_add, "guided": chunk = remaining / (2 * threads). Big
//   grids therefore cost O(threads * log n_groups) atomics yet still balance at the end, where
//   chunks shrink to one threadgroup.
// * Every thread of a threadgroup runs on one OS thread, because translated kernels keep
//   threadgroup memory in `static thread_local` arrays.
// * Fibers. One fiber per kernel thread on a pooled mmap'd stack with a 64 KiB PROT_NONE guard
//   below it (not one page: a kernel frame with a big local array would jump a one-page guard and
//   silently corrupt the neighbouring fiber's stack; the guard costs address space only). A fiber
//   start only writes a small initial frame into a pooled stack, so creating 1M fibers costs about
//   as much as 1M small stores. The switch is ~20 instructions of our own asm (callee-saved
//   registers + stack pointer, plus the FP control state -- MXCSR/x87 CW, which the SysV ABI
//   makes callee-saved, and FPCR on aarch64 -- so a kernel's fesetround stays in its own fiber;
//   it is reloaded only when it differs, as those writes are slow). swapcontext would make a
//   sigprocmask system call per switch (about 10x slower on the reduction benchmark). A blocking
//   fiber switches straight to the next runnable fiber (one switch, not two via a scheduler
//   stack), and since all fibers block from the same call sites the return-stack predictor
//   stays right. Stack tops are staggered by multiples of 64 bytes so that 256+ fibers' hot
//   frames, which would otherwise sit at the same offset in page-multiple-spaced stacks, do not
//   all compete for one L1 cache set (cheap insurance; no effect measured on the test box).
// * Scheduling. The scheduler only acts when no fiber is runnable: SIMD waits first, grouping in
//   each simdgroup the lanes at the lowest call-site id (structured code then reconverges: lanes
//   that skipped an `if` containing a SIMD call wait at a later site until the lanes inside the
//   branch have passed the earlier one); a barrier opens only when no SIMD wait is pending and
//   every live thread is at it. Because a SIMD fn runs only when nothing is runnable, and its
//   lanes run before any further fn can run, a lane always reads its own `out` before anything
//   can overwrite it, and `in` of a waiting lane is never touched: one slot per lane suffices.
//   Lanes at the same site are also required to pass the same fn (a template instantiated for two
//   types shares a site id); mismatching lanes simply wait for the next round.
// * Errors in a launch (bad sizes, mmap failure) come back in `err`. A worker that cannot get
//   stacks just does not take work; the launch fails only if some threadgroup was left undone.
//   Misuse from kernel code (SIMD call outside fiber mode, impossible deadlock) aborts with a
//   message, since there is no way to unwind a kernel.
// * fork(): the pool's threads do not survive a fork, so a child would hang on its first launch.
//   pthread_atfork makes fork wait for a running launch, and the child starts a fresh pool.
// * Caveat: the context switch is not shadow-stack (CET SHSTK) aware; the object gets the
//   compiler's CET marking like any other TU, so build with -fcf-protection=branch or none if
//   user-space shadow stacks are ever enabled for the process.
#include "pmn_cpu_abi.h"

#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <thread>

#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>
#if defined(__linux__)
#include <sched.h>
#endif

#if defined(__x86_64__) && !defined(__ILP32__) && !defined(PMN_CPU_USE_UCONTEXT)
#define PMN_CTX_X86_64 1
#elif defined(__aarch64__) && !defined(__ILP32__) && !defined(PMN_CPU_USE_UCONTEXT)
#define PMN_CTX_AARCH64 1
#else
#define PMN_CTX_UCONTEXT 1
#include <ucontext.h>
#endif

#ifndef MAP_ANONYMOUS
#define MAP_ANONYMOUS MAP_ANON
#endif

namespace {

constexpr uint32_t kMaxTg = 1024;
constexpr uint32_t kMaxSimd = kMaxTg / 32;

[[noreturn]] void die(const char* msg) {
  std::fprintf(stderr, "pymetalnn cpu runtime: %s\n", msg);
  std::fflush(stderr);
  std::abort();
}

void set_err(char* err, size_t errlen, const char* fmt, ...) {
  if (!err || errlen == 0) return;
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(err, errlen, fmt, ap);
  va_end(ap);
}

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __asm__ __volatile__("pause");
#elif defined(__aarch64__)
  __asm__ __volatile__("yield");
#endif
}

// ---------------------------------------------------------------------------------------------
// Context switch
// ---------------------------------------------------------------------------------------------
struct Ctx {
#if PMN_CTX_UCONTEXT
  ucontext_t uc;
#else
  void* sp;
#endif
};

}  // namespace

#if !PMN_CTX_UCONTEXT
// Saves the callee-saved state on the current stack, stores the stack pointer in *save, loads
// `to` as the stack pointer and pops the state saved there. A fresh fiber's stack is prepared so
// that the pop "returns" into pmn_cpu_rt_fiber_start with the Fiber* in a callee-saved register.
extern "C" __attribute__((visibility("hidden"))) void pmn_cpu_rt_switch(void** save, void* to);
extern "C" __attribute__((visibility("hidden"))) void pmn_cpu_rt_fiber_start(void);

#if defined(__APPLE__)
#define PMN_ASM_FN(name) \
  ".text\n.p2align 4\n.globl _" #name "\n.private_extern _" #name "\n_" #name ":\n"
#define PMN_ASM_END(name) ""
#define PMN_CFI(x) ""
#else
#define PMN_ASM_FN(name)                                                                   \
  ".pushsection .text\n.p2align 4\n.globl " #name "\n.hidden " #name "\n.type " #name \
  ", %function\n" #name ":\n"
#define PMN_ASM_END(name) ".size " #name ", .-" #name "\n.popsection\n"
#define PMN_CFI(x) x
#endif

#if PMN_CTX_X86_64
// Frame at the saved sp (low to high): mxcsr(4) x87cw(2) pad(2) r15 r14 r13 r12 rbx rbp ret.
__asm__(PMN_ASM_FN(pmn_cpu_rt_switch)
        "  pushq %rbp\n"
        "  pushq %rbx\n"
        "  pushq %r12\n"
        "  pushq %r13\n"
        "  pushq %r14\n"
        "  pushq %r15\n"
        "  subq $8, %rsp\n"
        "  stmxcsr (%rsp)\n"
        "  fnstcw 4(%rsp)\n"
        "  movl (%rsp), %eax\n"
        "  movzwl 4(%rsp), %edx\n"
        "  movq %rsp, (%rdi)\n"
        "  movq %rsi, %rsp\n"
        // Loading MXCSR/x87 CW is slow; they almost never differ between fibers.
        "  cmpl (%rsp), %eax\n"
        "  jne 1f\n"
        "  cmpw 4(%rsp), %dx\n"
        "  jne 1f\n"
        "2:\n"
        "  addq $8, %rsp\n"
        "  popq %r15\n"
        "  popq %r14\n"
        "  popq %r13\n"
        "  popq %r12\n"
        "  popq %rbx\n"
        "  popq %rbp\n"
        "  ret\n"
        "1:\n"
        "  ldmxcsr (%rsp)\n"
        "  fldcw 4(%rsp)\n"
        "  jmp 2b\n"
        PMN_ASM_END(pmn_cpu_rt_switch)
        // Entered by `ret` with rsp 16-byte aligned; r12 = Fiber*, rbx = entry function, which
        // never returns. The undefined return address ends debugger/unwinder backtraces here.
        PMN_ASM_FN(pmn_cpu_rt_fiber_start)
        PMN_CFI("  .cfi_startproc\n  .cfi_undefined %rip\n")
        "  movq %r12, %rdi\n"
        "  callq *%rbx\n"
        "  ud2\n"
        PMN_CFI("  .cfi_endproc\n")
        PMN_ASM_END(pmn_cpu_rt_fiber_start));
#elif PMN_CTX_AARCH64
// Frame at the saved sp (176 bytes): x19..x28, x29, x30(lr), d8..d15, fpcr, pad.
__asm__(PMN_ASM_FN(pmn_cpu_rt_switch)
        "  hint #34\n"  // bti c (a NOP without BTI)
        "  sub sp, sp, #176\n"
        "  stp x19, x20, [sp, #0]\n"
        "  stp x21, x22, [sp, #16]\n"
        "  stp x23, x24, [sp, #32]\n"
        "  stp x25, x26, [sp, #48]\n"
        "  stp x27, x28, [sp, #64]\n"
        "  stp x29, x30, [sp, #80]\n"
        "  stp d8, d9, [sp, #96]\n"
        "  stp d10, d11, [sp, #112]\n"
        "  stp d12, d13, [sp, #128]\n"
        "  stp d14, d15, [sp, #144]\n"
        "  mrs x9, fpcr\n"
        "  str x9, [sp, #160]\n"
        "  mov x10, sp\n"
        "  str x10, [x0]\n"
        "  mov sp, x1\n"
        // Writing FPCR can be slow; it almost never differs between fibers.
        "  ldr x10, [sp, #160]\n"
        "  cmp x9, x10\n"
        "  b.ne 1f\n"
        "2:\n"
        "  ldp x19, x20, [sp, #0]\n"
        "  ldp x21, x22, [sp, #16]\n"
        "  ldp x23, x24, [sp, #32]\n"
        "  ldp x25, x26, [sp, #48]\n"
        "  ldp x27, x28, [sp, #64]\n"
        "  ldp x29, x30, [sp, #80]\n"
        "  ldp d8, d9, [sp, #96]\n"
        "  ldp d10, d11, [sp, #112]\n"
        "  ldp d12, d13, [sp, #128]\n"
        "  ldp d14, d15, [sp, #144]\n"
        "  add sp, sp, #176\n"
        "  ret\n"
        "1:\n"
        "  msr fpcr, x10\n"
        "  b 2b\n"
        PMN_ASM_END(pmn_cpu_rt_switch)
        // Entered by `ret`; x19 = Fiber*, x20 = entry function (never returns).
        PMN_ASM_FN(pmn_cpu_rt_fiber_start)
        PMN_CFI("  .cfi_startproc\n  .cfi_undefined x30\n")
        "  mov x0, x19\n"
        "  blr x20\n"
        "  brk #0\n"
        PMN_CFI("  .cfi_endproc\n")
        PMN_ASM_END(pmn_cpu_rt_fiber_start));
#endif
#endif  // !PMN_CTX_UCONTEXT

namespace {

enum : uint8_t { F_RUN = 0, F_SIMD = 1, F_BAR = 2, F_DONE = 3 };

struct Fiber {
  Ctx ctx;
  pmn_simd_fn fn;   // while F_SIMD
  uint32_t site;    // while F_SIMD
  uint8_t state;
  pmn_tinfo ti;
  char* stack_lo;   // lowest usable byte (just above the guard)
  char* stack_top;  // 64-byte aligned initial stack pointer bound
};

// Per executing thread (slot 0 = whichever thread calls pmn_cpu_launch; launches are serialized).
struct Worker {
  // --- fiber mode, allocated on first use and kept ---
  Fiber* fib = nullptr;            // kMaxTg
  pmn_simd_slot* slots = nullptr;  // kMaxTg, indexed by lid (simdgroup s owns [32*s, 32*s+32))
  uint16_t* runq = nullptr;        // kMaxTg
  uint32_t n_stacks = 0;
  // --- one threadgroup's scheduler state ---
  Ctx sched;
  Fiber* cur = nullptr;  // running fiber, null on the scheduler stack
  uint32_t nrun = 0, rq_pos = 0, live = 0, n_bar = 0, n_simd_wait = 0;
  uint16_t simd_cnt[kMaxSimd] = {};
  void* const* args = nullptr;
  pmn_thread_fn tfn = nullptr;
  uint32_t tg_size = 0, n_groups = 0;
  uint64_t fpctl = 0;
  // --- pool thread wake-up ---
  std::mutex m;
  std::condition_variable cv;
  bool sleeping = false;
};

thread_local Worker* tl_worker = nullptr;  // set only while this thread runs fiber-mode groups
thread_local bool tl_in_launch = false;

size_t page_size() {
  static const size_t ps = [] {
    long v = sysconf(_SC_PAGESIZE);
    return v > 0 ? (size_t)v : (size_t)4096;
  }();
  return ps;
}

// Bytes of PROT_NONE below every stack we map (fiber stacks and launch stacks).
size_t guard_size() { return page_size() > 65536 ? page_size() : 65536; }

// Address space for stacks: pages are committed only when touched.
void* map_stacks(size_t len) {
  int flags = MAP_PRIVATE | MAP_ANONYMOUS;
#ifdef MAP_NORESERVE
  flags |= MAP_NORESERVE;
#endif
#ifdef MAP_STACK
  flags |= MAP_STACK;
#endif
  return mmap(nullptr, len, PROT_READ | PROT_WRITE, flags, -1, 0);
}

// Stack allocation: one mmap per growth step, each stack preceded by a PROT_NONE guard region.
// Never freed (the pool lives as long as the process).
bool grow_stacks(Worker* w, uint32_t need, char* err, size_t errlen) {
  if (w->n_stacks >= need) return true;
  const size_t guard = guard_size();
  const size_t ss = pmn_cpu_stack_size();
  const size_t per = ss + guard;
  const uint32_t cnt = need - w->n_stacks;
  const size_t len = per * cnt;
  void* mem = map_stacks(len);
  if (mem == MAP_FAILED) {
    set_err(err, errlen, "cpu runtime: mmap of %u fiber stacks (%zu bytes) failed: %s", cnt, len,
            std::strerror(errno));
    return false;
  }
  char* base = (char*)mem;
  for (uint32_t i = 0; i < cnt; ++i) {
    if (mprotect(base + i * per, guard, PROT_NONE) != 0) {
      set_err(err, errlen,
              "cpu runtime: mprotect of a fiber stack guard failed: %s (too many mappings? "
              "see vm.max_map_count, or lower PYMETALNN_CPU_THREADS)",
              std::strerror(errno));
      munmap(mem, len);
      return false;
    }
  }
  for (uint32_t i = 0; i < cnt; ++i) {
    const uint32_t k = w->n_stacks + i;
    Fiber& f = w->fib[k];
    f.stack_lo = base + i * per + guard;
    // Stagger the tops by 64-byte steps (cache-set coloring, see the design notes).
    f.stack_top = f.stack_lo + ss - (size_t)(k & 63) * 64;
  }
  w->n_stacks = need;
  return true;
}

bool ensure_fibers(Worker* w, uint32_t tg, char* err, size_t errlen) {
  if (!w->fib) {
    Fiber* fib = new (std::nothrow) Fiber[kMaxTg];
    uint16_t* rq = new (std::nothrow) uint16_t[kMaxTg];
    void* sl = nullptr;
    if (!fib || !rq || posix_memalign(&sl, 64, sizeof(pmn_simd_slot) * kMaxTg) != 0) {
      delete[] fib;
      delete[] rq;
      set_err(err, errlen, "cpu runtime: out of memory allocating fiber state");
      return false;
    }
    std::memset(sl, 0, sizeof(pmn_simd_slot) * kMaxTg);
    std::memset((void*)fib, 0, sizeof(Fiber) * kMaxTg);
    w->fib = fib;
    w->runq = rq;
    w->slots = (pmn_simd_slot*)sl;
  }
  return grow_stacks(w, tg, err, errlen);
}

inline void ctx_switch(Ctx* save, Ctx* to) {
#if PMN_CTX_UCONTEXT
  if (swapcontext(&save->uc, &to->uc) != 0) die("swapcontext failed");
#else
  pmn_cpu_rt_switch(&save->sp, to->sp);
#endif
}

// Switches from fiber f (which has just blocked or finished) to the next runnable fiber of this
// round, or back to the scheduler when the round is over. Returns when f is resumed.
inline void yield_next(Worker* w, Fiber* f) {
  if (w->rq_pos < w->nrun) {
    Fiber* n = &w->fib[w->runq[w->rq_pos++]];
    w->cur = n;
    ctx_switch(&f->ctx, &n->ctx);
  } else {
    w->cur = nullptr;
    ctx_switch(&f->ctx, &w->sched);
  }
}

// Entry of every fiber (called from pmn_cpu_rt_fiber_start or the ucontext trampoline).
void fiber_main(Fiber* f) {
  Worker* w = tl_worker;
  w->tfn(w->args, &f->ti);
  f->state = F_DONE;
  w->live--;
  yield_next(w, f);
  die("a finished fiber was resumed");
}

#if PMN_CTX_UCONTEXT
void uc_entry(unsigned hi, unsigned lo) {
  fiber_main((Fiber*)(uintptr_t)(((uint64_t)hi << 32) | (uint64_t)lo));
}
void big_main(Fiber* f);
void uc_entry_big(unsigned hi, unsigned lo) {
  big_main((Fiber*)(uintptr_t)(((uint64_t)hi << 32) | (uint64_t)lo));
}
#endif

uint64_t read_fpctl() {
#if PMN_CTX_X86_64
  uint32_t mx;
  uint16_t cw;
  __asm__ __volatile__("stmxcsr %0" : "=m"(mx));
  __asm__ __volatile__("fnstcw %0" : "=m"(cw));
  return (uint64_t)mx | ((uint64_t)cw << 32);
#elif PMN_CTX_AARCH64
  uint64_t v;
  __asm__ __volatile__("mrs %0, fpcr" : "=r"(v));
  return v;
#else
  return 0;
#endif
}

inline void ctx_init(Worker* w, Fiber* f, void (*entry)(Fiber*) = &fiber_main) {
#if PMN_CTX_X86_64
  uint64_t* sp = (uint64_t*)(f->stack_top - 16 - 8 * 8);
  sp[0] = w->fpctl;
  sp[1] = 0;                                   // r15
  sp[2] = 0;                                   // r14
  sp[3] = 0;                                   // r13
  sp[4] = (uint64_t)(uintptr_t)f;              // r12
  sp[5] = (uint64_t)(uintptr_t)entry;          // rbx
  sp[6] = 0;                                   // rbp
  sp[7] = (uint64_t)(uintptr_t)&pmn_cpu_rt_fiber_start;
  f->ctx.sp = sp;
#elif PMN_CTX_AARCH64
  uint64_t* sp = (uint64_t*)(f->stack_top - 16 - 176);
  sp[0] = (uint64_t)(uintptr_t)f;              // x19
  sp[1] = (uint64_t)(uintptr_t)entry;          // x20
  for (int i = 2; i < 20; ++i) sp[i] = 0;      // x21..x29, d8..d15
  sp[11] = (uint64_t)(uintptr_t)&pmn_cpu_rt_fiber_start;  // x30
  sp[20] = w->fpctl;                           // fpcr
  f->ctx.sp = sp;
#else
  (void)w;
  if (getcontext(&f->ctx.uc) != 0) die("getcontext failed");
  f->ctx.uc.uc_stack.ss_sp = f->stack_lo;
  f->ctx.uc.uc_stack.ss_size = (size_t)(f->stack_top - f->stack_lo) - 16;
  f->ctx.uc.uc_link = nullptr;
  const uint64_t p = (uint64_t)(uintptr_t)f;
  makecontext(&f->ctx.uc, entry == &fiber_main ? (void (*)())uc_entry : (void (*)())uc_entry_big, 2,
              (unsigned)(p >> 32), (unsigned)p);
#endif
}

// Runs one threadgroup in fiber mode on this thread (tl_worker == w).
void run_tg_fibers(Worker* w, uint32_t tgid) {
  const uint32_t tg = w->tg_size;
  const uint32_t n_simd = (tg + 31) / 32;
  w->live = tg;
  w->n_bar = 0;
  w->n_simd_wait = 0;
  std::memset(w->simd_cnt, 0, sizeof(uint16_t) * n_simd);
  for (uint32_t i = 0; i < tg; ++i) {
    Fiber* f = &w->fib[i];
    f->state = F_RUN;
    f->ti.gid = tgid * tg + i;
    f->ti.lid = i;
    f->ti.tgid = tgid;
    f->ti.tg_size = tg;
    f->ti.n_groups = w->n_groups;
    f->ti.lane = i & 31;
    f->ti.simd_id = i >> 5;
    f->ti.n_simd = n_simd;
    ctx_init(w, f);
    w->runq[i] = (uint16_t)i;
  }
  w->nrun = tg;
  for (;;) {
    w->rq_pos = 1;
    Fiber* first = &w->fib[w->runq[0]];
    w->cur = first;
    ctx_switch(&w->sched, &first->ctx);
    // Every fiber has blocked or returned.
    w->cur = nullptr;
    if (w->live == 0) return;
    w->nrun = 0;
    if (w->n_simd_wait) {
      for (uint32_t s = 0; s < n_simd; ++s) {
        if (!w->simd_cnt[s]) continue;
        Fiber* lanes = &w->fib[s * 32];
        const uint32_t nl = (tg - s * 32) < 32 ? (tg - s * 32) : 32;
        uint32_t best = UINT32_MAX;
        pmn_simd_fn fn = nullptr;
        for (uint32_t l = 0; l < nl; ++l)
          if (lanes[l].state == F_SIMD && (!fn || lanes[l].site < best)) {
            best = lanes[l].site;
            fn = lanes[l].fn;
          }
        uint32_t mask = 0, cnt = 0;
        for (uint32_t l = 0; l < nl; ++l)
          if (lanes[l].state == F_SIMD && lanes[l].site == best && lanes[l].fn == fn) {
            mask |= 1u << l;
            ++cnt;
          }
        fn(&w->slots[s * 32], mask);  // writes `out` before any of these lanes resumes
        for (uint32_t l = 0; l < nl; ++l)
          if (mask & (1u << l)) {
            lanes[l].state = F_RUN;
            w->runq[w->nrun++] = (uint16_t)(s * 32 + l);
          }
        w->simd_cnt[s] = (uint16_t)(w->simd_cnt[s] - cnt);
        w->n_simd_wait -= cnt;
      }
    } else if (w->n_bar == w->live) {
      for (uint32_t i = 0; i < tg; ++i)
        if (w->fib[i].state == F_BAR) {
          w->fib[i].state = F_RUN;
          w->runq[w->nrun++] = (uint16_t)i;
        }
      w->n_bar = 0;
    }
    if (w->nrun == 0) {
      char msg[160];
      std::snprintf(msg, sizeof msg,
                    "threadgroup %u deadlocked: %u live threads, %u at a barrier, %u in SIMD waits",
                    tgid, w->live, w->n_bar, w->n_simd_wait);
      die(msg);
    }
  }
}

Worker* current_fiber_worker(const char* what) {
  Worker* w = tl_worker;
  if (!w || !w->cur) {
    char msg[200];
    std::snprintf(msg, sizeof msg,
                  "%s called outside a fiber-mode launch (a kernel that uses barriers or SIMD-group "
                  "functions must be launched with use_fibers=1)",
                  what);
    die(msg);
  }
  return w;
}

// ---------------------------------------------------------------------------------------------
// Thread pool
// ---------------------------------------------------------------------------------------------
struct Pool {
  uint32_t n = 1;            // executing threads, caller included
  Worker** w = nullptr;      // n entries
  uint64_t gen = 0;          // launches published (guarded by g_launch_mu)
  std::atomic<uint64_t> ticket{0};  // (gen << 32) | participants
  // Helpers join a launch before they touch it: gate = (gen << 32) | closed << 31 | joined. The
  // caller closes the gate once it has grabbed the last chunk and waits only for the helpers
  // that joined (finished == joined); a helper that wakes after that skips the launch.
  std::atomic<uint64_t> gate{0};
  std::atomic<uint32_t> finished{0};
  std::mutex done_m;
  std::condition_variable done_cv;
  // current launch (written before the ticket is published, read-only while it runs)
  void* const* args = nullptr;
  uint32_t n_groups = 0, tg_size = 0, participants = 0;
  int use_fibers = 0;
  pmn_thread_fn tfn = nullptr;
  pmn_tg_loop_fn lfn = nullptr;
  std::atomic<uint64_t> next{0};
  std::atomic<uint64_t> done_groups{0};
  std::mutex err_m;
  bool has_err = false;
  char err[256] = {};
};

std::mutex g_launch_mu;  // serializes launches, guards g_pool
Pool* g_pool = nullptr;
std::atomic<uint32_t> g_pool_threads{0};  // g_pool->n once created, for pmn_cpu_num_workers
bool g_atfork = false;

constexpr auto kSpin = std::chrono::microseconds(50);
constexpr uint64_t kGateClosed = (uint64_t)1 << 31;

bool grab(Pool* p, uint64_t& b, uint64_t& e) {
  const uint64_t n = p->n_groups;
  const uint64_t cur = p->next.load(std::memory_order_relaxed);
  if (cur >= n) return false;
  uint64_t chunk = (n - cur) / (2 * (uint64_t)p->participants);
  if (chunk == 0) chunk = 1;
  b = p->next.fetch_add(chunk, std::memory_order_relaxed);
  if (b >= n) return false;
  e = b + chunk < n ? b + chunk : n;
  return true;
}

void run_participant(Pool* p, uint32_t idx) {
  Worker* w = p->w[idx];
  uint64_t b, e, done = 0;
  if (p->use_fibers) {
    char err[256] = {};
    if (!ensure_fibers(w, p->tg_size, err, sizeof err)) {
      std::lock_guard<std::mutex> lk(p->err_m);
      if (!p->has_err) {
        p->has_err = true;
        std::memcpy(p->err, err, sizeof err);
      }
      return;  // the other threads take this one's share
    }
    w->args = p->args;
    w->tfn = p->tfn;
    w->tg_size = p->tg_size;
    w->n_groups = p->n_groups;
    w->fpctl = read_fpctl();
    Worker* saved = tl_worker;
    tl_worker = w;
    while (grab(p, b, e)) {
      for (uint64_t g = b; g < e; ++g) run_tg_fibers(w, (uint32_t)g);
      done += e - b;
    }
    tl_worker = saved;
  } else {
    void* const* args = p->args;
    const uint32_t tg = p->tg_size, ng = p->n_groups;
    pmn_tg_loop_fn fn = p->lfn;
    while (grab(p, b, e)) {
      for (uint64_t g = b; g < e; ++g) fn(args, (uint32_t)g, tg, ng);
      done += e - b;
    }
  }
  p->done_groups.fetch_add(done, std::memory_order_relaxed);
}

void worker_main(Pool* p, uint32_t idx) {
  Worker* w = p->w[idx];
  tl_in_launch = true;  // a kernel on a pool thread must not launch (it would deadlock)
  uint64_t seen = 0;
  for (;;) {
    uint64_t t = p->ticket.load(std::memory_order_acquire);
    if ((t >> 32) == seen) {
      auto deadline = std::chrono::steady_clock::now() + kSpin;
      for (unsigned i = 1;; ++i) {
        cpu_relax();
        t = p->ticket.load(std::memory_order_acquire);
        if ((t >> 32) != seen) break;
        if ((i & 63) == 0 && std::chrono::steady_clock::now() > deadline) break;
      }
      if ((t >> 32) == seen) {
        std::unique_lock<std::mutex> lk(w->m);
        while (((t = p->ticket.load(std::memory_order_acquire)) >> 32) == seen) {
          w->sleeping = true;
          w->cv.wait(lk);
          w->sleeping = false;
        }
      }
    }
    seen = t >> 32;
    if (idx >= (uint32_t)t) continue;  // not needed for this launch
    uint64_t g = p->gate.load(std::memory_order_acquire);
    bool joined = false;
    while ((g >> 32) == seen && !(g & kGateClosed)) {
      if (p->gate.compare_exchange_weak(g, g + 1, std::memory_order_acq_rel,
                                        std::memory_order_acquire)) {
        joined = true;
        break;
      }
    }
    if (!joined) continue;  // the caller ran the whole launch (or a newer one began)
    run_participant(p, idx);
    p->finished.fetch_add(1, std::memory_order_acq_rel);
    {
      std::lock_guard<std::mutex> lk(p->done_m);
      p->done_cv.notify_one();
    }
  }
}

void atfork_prepare() { g_launch_mu.lock(); }
void atfork_parent() { g_launch_mu.unlock(); }
void atfork_child() {
  g_pool = nullptr;  // its threads are gone; leak it and start over on the next launch
  g_pool_threads.store(0, std::memory_order_relaxed);
  g_launch_mu.unlock();
}

uint32_t configured_threads() {
  static const uint32_t n = [] {
    if (const char* s = std::getenv("PYMETALNN_CPU_THREADS")) {
      char* end = nullptr;
      long v = std::strtol(s, &end, 10);
      if (end != s && v > 0) return (uint32_t)(v > 4096 ? 4096 : v);
    }
    unsigned hw = std::thread::hardware_concurrency();
#if defined(__linux__)
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof set, &set) == 0) {
      unsigned c = (unsigned)CPU_COUNT(&set);
      if (c > 0 && (hw == 0 || c < hw)) hw = c;
    }
#endif
    if (hw == 0) hw = 1;
    return (uint32_t)(hw > 4096 ? 4096 : hw);
  }();
  return n;
}

// Pool threads get big stacks: a kernel compiled as work-item loops keeps its per-thread
// values as arrays of the threadgroup's size on the stack (up to a few MiB for the largest
// tiles), more than some platforms' default thread stack (512 KiB on macOS). Only touched pages
// cost memory.
constexpr size_t kPoolStack = (size_t)64 << 20;

struct ThreadStart {
  Pool* p;
  uint32_t idx;
};

void* pool_thread_main(void* arg) {
  ThreadStart st = *(ThreadStart*)arg;
  delete (ThreadStart*)arg;
  worker_main(st.p, st.idx);
  return nullptr;
}

bool start_pool_thread(Pool* p, uint32_t idx) {
  ThreadStart* st = new (std::nothrow) ThreadStart{p, idx};
  if (!st) return false;
  pthread_attr_t attr;
  if (pthread_attr_init(&attr) != 0) {
    delete st;
    return false;
  }
  pthread_attr_setstacksize(&attr, kPoolStack);  // failure: keep the default size
  pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
  pthread_t th;
  int rc = pthread_create(&th, &attr, pool_thread_main, st);
  pthread_attr_destroy(&attr);
  if (rc != 0) {
    delete st;
    return false;
  }
  return true;
}

// Called with g_launch_mu held.
Pool* get_pool() {
  if (g_pool) return g_pool;
  if (!g_atfork) {
    pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
    g_atfork = true;
  }
  const uint32_t n = configured_threads();
  Pool* p = new Pool;
  p->w = new Worker*[n];
  for (uint32_t i = 0; i < n; ++i) p->w[i] = new Worker;
  p->n = 1;
  for (uint32_t i = 1; i < n; ++i) {
    if (!start_pool_thread(p, i)) break;  // run with the threads we got
    p->n = i + 1;
  }
  g_pool = p;
  g_pool_threads.store(p->n, std::memory_order_relaxed);
  return p;
}

// The calling thread runs its share of a work-item-loop launch on a stack of its own: those
// kernels keep per-thread arrays of the threadgroup's size on the stack (up to a few MiB for the
// largest tiles), more than a caller's thread may have (512 KiB for a macOS secondary thread).
// So every launch can run on the thread that makes it, without the hand-off to a queue thread
// (whose wake-up after idle costs hundreds of microseconds in a VM). The stack is a fiber of
// this thread, entered and left once per launch (two context switches, tens of nanoseconds),
// reserved once (kPoolStack, pages touched on demand) and kept for the thread's life.
struct BigStack {
  Fiber f;  // first member: the entry is handed the Fiber*
  Ctx back;
  Pool* p = nullptr;
  void* mem = nullptr;  // the mapping: guard + stack
  size_t len = 0;
};
// Owns the thread's launch stack: unmapped when the thread exits (a program that launches from
// many short-lived threads keeps no stacks of dead ones). Between launches the stack's fiber is
// parked after its switch back, so nothing runs on it then.
struct BigStackOwner {
  BigStack* b = nullptr;
  ~BigStackOwner() {
    if (b) {
      munmap(b->mem, b->len);
      delete b;
    }
  }
};
thread_local BigStackOwner tl_big;

void big_main(Fiber* f) {
  BigStack* b = (BigStack*)f;
  for (;;) {
    try {
      run_participant(b->p, 0);
    } catch (const std::exception& e) {  // never across the context switch
      std::lock_guard<std::mutex> lk(b->p->err_m);
      if (!b->p->has_err) {
        b->p->has_err = true;
        std::snprintf(b->p->err, sizeof b->p->err, "cpu runtime: %s", e.what());
      }
    }
    ctx_switch(&b->f.ctx, &b->back);
  }
}

// Participant 0 of the current launch on this thread's big stack; false when the stack cannot
// be had (out of address space: the caller then runs on its own stack, as before).
bool run_on_big_stack(Pool* p) {
  if (!tl_big.b) {
    const size_t guard = guard_size();
    void* mem = map_stacks(kPoolStack + guard);
    if (mem == MAP_FAILED) return false;
    BigStack* b = new (std::nothrow) BigStack();
    if (!b || mprotect(mem, guard, PROT_NONE) != 0) {
      delete b;
      munmap(mem, kPoolStack + guard);
      return false;
    }
    b->mem = mem;
    b->len = kPoolStack + guard;
    b->f.stack_lo = (char*)mem + guard;
    b->f.stack_top = b->f.stack_lo + kPoolStack - 64;
    Worker* w0 = p->w[0];
    w0->fpctl = read_fpctl();
    ctx_init(w0, &b->f, &big_main);
    tl_big.b = b;
  }
  tl_big.b->p = p;
  ctx_switch(&tl_big.b->back, &tl_big.b->f.ctx);
  return true;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// ABI
// ---------------------------------------------------------------------------------------------
extern "C" int pmn_cpu_launch(void* const* args, uint32_t n_groups, uint32_t tg_size,
                              int use_fibers, pmn_thread_fn thread_fn, pmn_tg_loop_fn loop_fn,
                              char* err, size_t errlen) {
  if (err && errlen) err[0] = 0;
  if (tg_size == 0 || tg_size > kMaxTg) {
    set_err(err, errlen, "cpu runtime: threadgroup size %u out of range (1..%u)", tg_size, kMaxTg);
    return 1;
  }
  if (use_fibers ? !thread_fn : !loop_fn) {
    set_err(err, errlen, "cpu runtime: no %s entry point given",
            use_fibers ? "thread_fn (fiber)" : "loop_fn");
    return 1;
  }
  if ((uint64_t)n_groups * tg_size > ((uint64_t)1 << 32)) {
    set_err(err, errlen, "cpu runtime: grid of %u x %u threads exceeds 2^32 (32-bit thread ids)",
            n_groups, tg_size);
    return 1;
  }
  if (n_groups == 0) return 0;
  if (tl_in_launch) {
    set_err(err, errlen, "cpu runtime: pmn_cpu_launch called from inside a kernel");
    return 1;
  }
  try {
    std::lock_guard<std::mutex> lk(g_launch_mu);
    Pool* p = get_pool();
    p->args = args;
    p->n_groups = n_groups;
    p->tg_size = tg_size;
    p->use_fibers = use_fibers;
    p->tfn = thread_fn;
    p->lfn = loop_fn;
    const uint32_t parts = p->n < n_groups ? p->n : n_groups;
    p->participants = parts;
    p->next.store(0, std::memory_order_relaxed);
    p->done_groups.store(0, std::memory_order_relaxed);
    p->has_err = false;
    p->err[0] = 0;
    if (parts > 1) {
      p->finished.store(0, std::memory_order_relaxed);
      p->gate.store(++p->gen << 32, std::memory_order_release);
      p->ticket.store((p->gen << 32) | parts, std::memory_order_seq_cst);
      for (uint32_t i = 1; i < parts; ++i) {
        Worker* w = p->w[i];
        bool wake;
        {
          std::lock_guard<std::mutex> wl(w->m);
          wake = w->sleeping;
        }
        if (wake) w->cv.notify_one();
      }
    }
    tl_in_launch = true;
    if (use_fibers || !run_on_big_stack(p)) run_participant(p, 0);
    tl_in_launch = false;
    // every chunk is taken: helpers that have not joined yet (a sleeping thread's wake-up can
    // take far longer than a small launch) are shut out, those that joined are waited for. If
    // this thread gave up its share (no fiber stacks), every helper is let in to take it.
    while (parts > 1 && p->next.load(std::memory_order_relaxed) < n_groups &&
           (p->gate.load(std::memory_order_acquire) & (kGateClosed - 1)) < parts - 1)
      std::this_thread::yield();
    const uint32_t joined = parts > 1 ? (uint32_t)(p->gate.fetch_or(kGateClosed,
                                                                    std::memory_order_acq_rel) &
                                                   (kGateClosed - 1))
                                      : 0;
    if (joined && p->finished.load(std::memory_order_acquire) != joined) {
      auto deadline = std::chrono::steady_clock::now() + kSpin;
      for (unsigned i = 1; p->finished.load(std::memory_order_acquire) != joined; ++i) {
        cpu_relax();
        if ((i & 63) == 0 && std::chrono::steady_clock::now() > deadline) {
          std::unique_lock<std::mutex> dl(p->done_m);
          while (p->finished.load(std::memory_order_acquire) != joined) p->done_cv.wait(dl);
          break;
        }
      }
    }
    if (p->done_groups.load(std::memory_order_relaxed) != n_groups) {
      if (p->has_err)
        set_err(err, errlen, "%s", p->err);
      else
        set_err(err, errlen, "cpu runtime: %llu of %u threadgroups were not run",
                (unsigned long long)(n_groups - p->done_groups.load()), n_groups);
      return 1;
    }
    return 0;
  } catch (const std::exception& e) {
    tl_in_launch = false;
    set_err(err, errlen, "cpu runtime: %s", e.what());
    return 1;
  }
}

extern "C" int pmn_cpu_num_workers(void) {
  const uint32_t n = g_pool_threads.load(std::memory_order_relaxed);
  return (int)(n ? n : configured_threads());
}

extern "C" size_t pmn_cpu_stack_size(void) {
  static const size_t sz = [] {
    size_t v = 131072;
    if (const char* s = std::getenv("PYMETALNN_CPU_STACK")) {
      char* end = nullptr;
      unsigned long long x = std::strtoull(s, &end, 10);
      if (end != s && x > 0) v = (size_t)x;
    }
    if (v < 16384) v = 16384;  // room for the initial frame, the stagger and a small kernel
    if (v > ((size_t)1 << 30)) v = (size_t)1 << 30;
    const size_t ps = page_size();
    return (v + ps - 1) / ps * ps;
  }();
  return sz;
}

extern "C" pmn_simd_slot* pmn_cpu_lane_slot(void) {
  Worker* w = current_fiber_worker("pmn_cpu_lane_slot");
  return &w->slots[w->cur->ti.lid];
}

extern "C" void pmn_cpu_simd_wait(uint32_t site, pmn_simd_fn fn) {
  Worker* w = current_fiber_worker("pmn_cpu_simd_wait (a SIMD-group function)");
  if (!fn) die("pmn_cpu_simd_wait called with a null fn");
  Fiber* f = w->cur;
  f->state = F_SIMD;
  f->site = site;
  f->fn = fn;
  w->simd_cnt[f->ti.simd_id]++;
  w->n_simd_wait++;
  yield_next(w, f);
}

extern "C" void pmn_cpu_tg_barrier(void) {
  Worker* w = current_fiber_worker("pmn_cpu_tg_barrier (threadgroup_barrier)");
  Fiber* f = w->cur;
  f->state = F_BAR;
  w->n_bar++;
  yield_next(w, f);
}
