"""cpu backend: translated kernels compiled with the system C++ compiler, run by our fiber runtime.

Compiled libraries are cached on disk by a hash of everything that affects them (translated
source, prelude, runtime ABI, compiler and flags), so a second process pays nothing. Launches go
to one queue thread that calls the runtime through ctypes, which releases the GIL: Python keeps
preparing the next launch while the cores run this one, as on a GPU queue.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import queue
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import warnings
import weakref
from typing import Any

import numpy as np

from .core import (
    CPU_RT_DIR,
    KERNEL_DIR,
    PRELUDE_DIR,
    Buffer,
    Device,
    Kernel,
    Library,
    cache_dir,
    untrusted_reason,
)
from .errors import AsyncError, BackendUnavailable, CompileError, ValidationError
from .msl import translate_file

CXXFLAGS = ["-std=c++17", "-O2", "-fPIC", "-shared", "-fno-math-errno", "-fno-strict-aliasing"]
QUEUE_STACK = 64 << 20  # bytes of stack for the queue thread (see pmn_cpu_rt.cpp, kPoolStack)


def find_compiler() -> str:
    """The C++ compiler: $CXX, else c++, g++ or clang++ on PATH."""
    cxx = os.environ.get("CXX")
    if cxx:
        exe = shutil.which(cxx.split()[0])
        if exe:
            return cxx
        raise BackendUnavailable(f"CXX={cxx!r} is not an executable")
    for c in ("c++", "g++", "clang++"):
        if shutil.which(c):
            return c
    raise BackendUnavailable("no C++17 compiler found (set CXX or install g++ or clang++)")


def _platform_flags() -> list[str]:
    if sys.platform == "darwin":
        return ["-undefined", "dynamic_lookup"]
    return ["-pthread"]


def _runtime_flags() -> list[str]:
    # export only the ABI (PMN_CPU_API): see pmn_cpu_abi.h
    flags = ["-fvisibility=hidden"]
    if sys.platform.startswith("linux"):
        flags.append("-Wl,--exclude-libs,ALL")
    return flags


def _hash(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()[:24]


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


_ERR_LINE = re.compile(r"^(.+?):(\d+):(?:\d+:)?\s*(?:fatal )?error:\s*(.*)$", re.M)


def kernel_flags() -> list[str]:
    """Flags of the kernel libraries: CXXFLAGS at -O3, tuned for this host's CPU where the
    compiler can tell which it is (the flags, and so the cache key, then name that CPU)."""
    # -fopenmp-simd: honour the work-item loops' `omp simd` (no OpenMP runtime involved);
    # -fno-trapping-math: nothing reads the floating-point exception flags, and without it g++
    # keeps every float compare a branch, so no loop with a select (a ?: of floats) vectorizes
    flags = [f for f in CXXFLAGS if f != "-O2"] + ["-O3", "-fopenmp-simd", "-fno-trapping-math"]
    if kernel_flags_native():
        # no contraction of a*b+c into fma: results stay those of the source's roundings,
        # the same on every host (g++ contracts by default once -march offers FMA).
        # 512-bit vectors where the host has them (g++ prefers 256 on AVX-512 parts): the
        # blocked GEMM's 8 x 32 accumulator tile then fits the 32 registers instead of
        # spilling (float GEMM 84 -> 96-109 GFLOP/s on a 2-core AVX-512 Xeon; relu, tanh,
        # sigmoid and elu measured unchanged there)
        flags += [*_host_flags(), "-ffp-contract=off"]
        if platform.machine().lower() in ("x86_64", "amd64"):
            flags.append("-mprefer-vector-width=512")
    return flags


def _target_options(march: str) -> tuple[str, frozenset[str]]:
    """(the CPU name g++ reports for `march`, the -m options it enables), ("", {}) when the
    compiler cannot tell."""
    try:
        r = subprocess.run([*find_compiler().split(), march, "-Q", "--help=target"],
                           capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return "", frozenset()
    cpu, enabled = "", set()
    for line in r.stdout.splitlines():
        parts = line.split()
        if len(parts) < 2:
            continue
        if parts[0] == "-march=" and not cpu:
            cpu = parts[1]
        elif parts[1] == "[enabled]":
            enabled.add(parts[0][2:])
    return cpu, frozenset(enabled)


@functools.cache
def _native_target() -> tuple[str, frozenset[str], frozenset[str]]:
    """(the CPU the compiler picks for -march=native, the -m options native enables, those of
    them the CPU's name does not imply), ("", {}, {}) when it cannot tell. A compiler older
    than the CPU names a predecessor: g++ 12 calls an AVX-512 Zen 4 "znver3" and a Sapphire
    Rapids part (AVX512-FP16) "cooperlake", so the name alone builds for fewer instructions."""
    cpu, native = _target_options("-march=native")
    if cpu in ("native", ""):
        return "", frozenset(), frozenset()
    return cpu, native, native - _target_options(f"-march={cpu}")[1]


def _host_flags() -> tuple[str, ...]:
    """("-march=<the CPU the compiler picks for -march=native>", the instruction sets native
    enables beyond that name's), or () when it cannot tell: spelled out so that a cache shared
    between machines never hands one CPU's instructions to another."""
    cpu, _, extra = _native_target()
    return (f"-march={cpu}", *(f"-m{isa}" for isa in sorted(extra))) if cpu else ()


def vector_bits() -> int:
    """Width of the widest vector registers the kernel libraries are built for: 512 where they
    target the host and it has AVX-512, 256 with AVX, else 128. Kernels whose best blocking
    depends on the register file ask it (ops/gemm.py: gemm_blocked's block per thread, on every
    call: hence the cache per PYMETALNN_CPU_NATIVE setting)."""
    return _vector_bits(os.environ.get("PYMETALNN_CPU_NATIVE", "1") not in ("0", ""))


@functools.cache
def _vector_bits(native: bool) -> int:
    if not (native and _host_flags()):
        return 128
    enabled = _native_target()[1]
    return 512 if "avx512f" in enabled else 256 if "avx" in enabled else 128


def kernel_flags_native() -> bool:
    """Whether the kernel libraries are built for this host's CPU (PYMETALNN_CPU_NATIVE, on by
    default, and a compiler that can name it)."""
    return os.environ.get("PYMETALNN_CPU_NATIVE", "1") not in ("0", "") and bool(_host_flags())


def fiber_report(library: Library) -> dict[str, str]:
    """Kernels of a cpu `library` that run with a fiber per thread, and why (a kernel that
    synchronizes runs as work-item loops unless its structure does not allow them)."""
    return {name: k.info.fiber_reason for name, k in library.kernels.items()
            if k.info.needs_fibers}


def _report_fibers(path: str, tr: Any) -> None:
    if os.environ.get("PYMETALNN_CPU_REPORT", "") in ("", "0"):
        return
    for k in tr.kernels.values():
        if k.needs_fibers:
            print(f"pymetalnn cpu: {os.path.basename(path)}: kernel '{k.name}' runs on fibers: "
                  f"{k.fiber_reason}", file=sys.stderr)
        elif k.lockstep:
            print(f"pymetalnn cpu: {os.path.basename(path)}: kernel '{k.name}' runs as work-item "
                  "loops", file=sys.stderr)


def _compile_shared(cxx: str, src_path: str, out: str, extra: list[str],
                    flags: list[str] | None = None) -> None:
    tmp = out + f".tmp{os.getpid()}.{threading.get_ident()}"
    cmd = [*cxx.split(), *(flags or CXXFLAGS), *_platform_flags(), "-I", PRELUDE_DIR, "-I",
           CPU_RT_DIR, *extra, src_path, "-o", tmp]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        # lead with the first error's file:line (the .metal line, through #line) and message
        m = _ERR_LINE.search(r.stderr)
        head = (f"{os.path.basename(m.group(1))}:{m.group(2)}: error: {m.group(3)}" if m
                else "C++ compilation failed")
        raise CompileError(f"{head}\n\ncompiler output:\n{r.stderr.rstrip()}\n\n"
                           f"command: {' '.join(cmd)}")
    os.chmod(tmp, 0o600)
    _seal(tmp)
    os.replace(tmp, out)  # atomic: concurrent processes never load a half-written library


# Cache integrity: next to each library `x.so`, `x.so.sha256` holds its digest (written after
# the library, both atomically). A library is loaded only when it and its digest file are
# regular files of this user, not writable by others, and the digest matches: a truncated or
# garbage entry (which dlopen could crash on, e.g. SIGBUS) or a planted one is rebuilt.
def _digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _seal(lib_tmp: str) -> None:
    """Write the digest of a library about to be renamed from `lib_tmp` to its entry name."""
    out = lib_tmp[: lib_tmp.rindex(".tmp")]
    dtmp = lib_tmp + ".sha256"
    with open(dtmp, "w") as f:
        f.write(_digest(lib_tmp))
    os.chmod(dtmp, 0o600)
    os.replace(dtmp, out + ".sha256")  # before the library: a reader never sees a new library
    # with no digest; an old digest next to a new library only costs a rebuild


_warned: set[str] = set()


def _entry_ok(out: str) -> bool:
    """Whether the cached library `out` may be loaded (see above); warns about a bad entry."""
    why = None
    try:
        for p in (out, out + ".sha256"):
            st = os.lstat(p)
            if not stat.S_ISREG(st.st_mode):
                why = f"{os.path.basename(p)} is not a regular file"
                break
            why = untrusted_reason(st)
            if why is not None:
                why = f"{os.path.basename(p)} is {why}"
                break
        else:
            with open(out + ".sha256") as f:
                want = f.read().strip()
            if _digest(out) == want:
                return True
            why = "its contents do not match its digest (truncated or corrupt)"
    except FileNotFoundError:
        return False  # not built yet, or built before digests (or half-written): no warning
    except OSError as e:
        why = f"unreadable ({e.strerror})"
    if out not in _warned:
        _warned.add(out)
        warnings.warn(f"kernel cache entry {out}: {why}; rebuilding it", RuntimeWarning,
                      stacklevel=4)
    return False


def _spans(flat: list, written: tuple) -> list[tuple[int, int, bool]]:
    """(first byte, end, written) per buffer argument of a queue item."""
    return [(flat[2 * i], flat[2 * i] + flat[2 * i + 1], w) for i, w in enumerate(written)]


def _more(fs: list) -> str:
    return f" (and {len(fs) - 1} more failures)" if len(fs) > 1 else ""


_live_devices: list = []  # CpuDevices of this process, for the fork handler


def _after_fork_in_child() -> None:
    for d in _live_devices:
        d._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _Runtime:
    """The shared cpu runtime library (fibers, scheduler, worker pool), built once."""

    _lock = threading.Lock()
    _lib: ctypes.CDLL | None = None

    @classmethod
    def get(cls, cxx: str) -> ctypes.CDLL:
        with cls._lock:
            if cls._lib is None:
                src = os.path.join(CPU_RT_DIR, "pmn_cpu_rt.cpp")
                key = _hash(_read(src), _read(os.path.join(CPU_RT_DIR, "pmn_cpu_abi.h")), cxx,
                            " ".join(CXXFLAGS + _runtime_flags()), platform.machine())
                out = os.path.join(cache_dir(), f"pmn_cpu_rt-{key}.so")
                if not _entry_ok(out):
                    _compile_shared(cxx, src, out, _runtime_flags())
                lib = ctypes.CDLL(out, mode=ctypes.RTLD_GLOBAL)
                lib.pmn_cpu_launch.restype = ctypes.c_int
                lib.pmn_cpu_launch.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint32,
                                               ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                               ctypes.c_char_p, ctypes.c_size_t]
                lib.pmn_cpu_num_workers.restype = ctypes.c_int
                cls._lib = lib
            return cls._lib


class _Failure:
    """One failed job: what failed (a kernel, a callback, a copy), and whether it was raised yet."""

    __slots__ = ("what", "kernel", "cause", "reported")

    def __init__(self, what: str, kernel: str | None, cause: BaseException):
        self.what, self.kernel, self.cause, self.reported = what, kernel, cause, False

    def error(self, context: str = "") -> AsyncError:
        self.reported = True
        cls = ValidationError if isinstance(self.cause, ValidationError) else AsyncError
        e = cls(self.what + context, self.kernel)
        if not isinstance(self.cause, AsyncError):  # a callback's own exception: keep its trace
            e.__cause__ = self.cause
        return e


class _HostPool:
    """Freed host allocations kept for reuse, by size class, as a GPU framework's caching
    allocator keeps device memory: a fresh allocation costs a page fault per 4 KB page on first
    touch, more than an element-wise kernel over it (relu over 1M floats on a 2-core Xeon: 1183
    us per call with fresh outputs, 345 us with reused ones), a reused one none.

    Allocations of at least MIN bytes are rounded up to a size class (four per power of two:
    at most 25% unused) and handed out as a 64-byte aligned view of a larger array. When that
    view dies (weakref.finalize: every queued job holding it has finished) the array goes to its
    class's free list, unless CAP bytes are already cached. An array is reused only while
    nothing else refers to it: a view taken from a handle (numpy views refer to the array that
    owns the memory, not to the view they were taken from) keeps its array out of the pool."""

    MIN = 1 << 15

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.cached = 0
        self.free: dict[int, list[np.ndarray]] = {}
        self.lock = threading.Lock()  # finalizers run on whichever thread drops the last view

    @staticmethod
    def size_class(nbytes: int) -> int:
        step = 1 << max(nbytes.bit_length() - 3, 0)
        return -(-nbytes // step) * step

    def take(self, cls: int) -> np.ndarray | None:
        with self.lock:
            lst = self.free.get(cls)
            while lst:
                raw = lst.pop()
                self.cached -= cls
                if sys.getrefcount(raw) == 2:  # this frame's name and getrefcount's argument
                    return raw
        return None

    def give(self, raw: np.ndarray, cls: int) -> None:
        with self.lock:
            if self.cached + cls <= self.cap:
                self.free.setdefault(cls, []).append(raw)
                self.cached += cls

    def clear(self) -> None:
        with self.lock:
            self.free.clear()
            self.cached = 0


def _pool_cap() -> int:
    """PYMETALNN_CPU_CACHE_MB, else an eighth of the machine's memory, at most 2 GiB."""
    env = os.environ.get("PYMETALNN_CPU_CACHE_MB")
    if env is not None:
        try:
            return max(int(env), 0) << 20
        except ValueError:
            raise ValueError(f"PYMETALNN_CPU_CACHE_MB: expected a whole number of MiB, got {env!r}"
                             ) from None
    try:
        phys = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        phys = 8 << 30
    return min(phys // 8, 2 << 30)


class CpuDevice(Device):
    name = "cpu"

    def __init__(self) -> None:
        super().__init__()
        self.cxx = find_compiler()
        self.rt = _Runtime.get(self.cxx)
        self.num_workers = self.rt.pmn_cpu_num_workers()
        # validation mode: kernels built with bounds-checked pointers (prelude/pmn_validate.h);
        # read once, when the device is made. Off, nothing differs: not the kernels' code, not
        # the launch path.
        self.validate = os.environ.get("PYMETALNN_VALIDATE", "") not in ("", "0")
        if self.validate:
            self._launch = self._launch_validated  # type: ignore[method-assign]
        self._pool = _HostPool(_pool_cap())
        self._start_queue()
        _live_devices.append(self)

    # ---- queue
    # Items are (run, spans, kernel name, written): spans is a flat [first byte, bytes, ...] per
    # buffer argument (None for callbacks), `written` flags which of them the job may write
    # (unpacked by _spans only when something failed, so a launch pays two appends per buffer).
    # argument of a launch, None for callbacks. A job that fails marks the byte ranges it writes
    # as failed ("poisoned") with its _Failure; a later job touching a poisoned range does not
    # run and passes the poison on to what it writes; a read of a poisoned range raises. The
    # queue itself never stops: unrelated work keeps running, callbacks always run. A range is
    # clean again once the host writes it or its memory is allocated anew.
    def _start_queue(self) -> None:
        # a C SimpleQueue (put and get take no Python-level lock, so a launch does not wait for
        # the queue thread to let go of one) plus queue.Queue's join bookkeeping
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        # held by whichever thread runs a job: the queue thread, or a launching thread that runs
        # its kernel itself (_launch) -- jobs stay one at a time and in order
        self._exec = threading.Lock()
        self._unfinished = 0  # jobs put and not yet done, under _lock
        self._poison: list[tuple[int, int, _Failure]] = []  # (first byte, end, failure)
        self._failures: list[_Failure] = []  # for synchronize(), under _lock
        self._epoch: list[_Failure] = []  # failures since the last signal (under _exec)
        self._errbuf = ctypes.create_string_buffer(512)  # launch errors, written under _exec
        # the queue thread runs threadgroups too: the same big stack as the runtime's pool
        # threads (work-item-loop kernels keep per-thread arrays on the stack)
        old_stack = threading.stack_size()
        try:
            threading.stack_size(max(old_stack, QUEUE_STACK))
        except (ValueError, RuntimeError):
            old_stack = None
        try:
            self._thread = threading.Thread(target=self._worker, name="pymetalnn-cpu-queue",
                                            daemon=True)
            self._thread.start()
        finally:
            if old_stack is not None:
                threading.stack_size(old_stack)

    def _after_fork_in_child(self) -> None:
        # the queue thread did not survive the fork (the runtime's pool restarts by itself); the
        # parent's queued work is the parent's: the child starts with an empty, clean queue
        self._start_queue()

    def _worker(self) -> None:
        while True:
            item = self._queue.get()
            try:
                with self._exec:
                    self._run_job(item)
            except BaseException:  # noqa: BLE001 -- the queue thread must survive anything
                pass
            finally:
                self._job_done()

    def _job_done(self) -> None:
        with self._lock:
            self._unfinished -= 1
            if not self._unfinished:
                self._idle.notify_all()

    def _run_job(self, item: tuple) -> None:
        run, flat, name, written = item
        spans = None
        if name is not None and self._poison:
            spans = _spans(flat, written)
            f = self._tainted(spans)
            if f is not None:
                self._mark(spans, f)
                return
        try:
            run()
        except BaseException as e:  # noqa: BLE001 -- reported where it is depended on
            if isinstance(e, AsyncError):
                f = _Failure(str(e), e.kernel, e)
            elif name is not None:
                f = _Failure(f"kernel '{name}' failed: {e}", name, e)
            else:
                f = _Failure(f"a queued callback failed: {e.__class__.__name__}: {e}", None, e)
            self._epoch.append(f)
            with self._lock:
                self._failures.append(f)
            if flat:
                self._mark(spans or _spans(flat, written), f)
            if isinstance(e, KeyboardInterrupt) and threading.current_thread() is not self._thread:
                # a Ctrl-C during a kernel run inline (_run_inline) stops the program as ever;
                # what the kernel writes is marked failed (it may not have run)
                raise
            return
        if flat and self._poison:
            self._clean(spans or _spans(flat, written))

    def _tainted(self, spans: Any) -> _Failure | None:
        for lo, hi, _ in spans:
            for plo, phi, f in self._poison:
                if plo < hi and lo < phi:
                    return f
        return None

    def _mark(self, spans: Any, f: _Failure) -> None:
        # the status words (Device.status_buffer) are no result: a skipped kernel that could
        # have set them does not make every later kernel that may set them fail
        st = self._status
        slo = self._addr(st) + st.offset if st is not None else -1
        with self._lock:
            for lo, hi, writes in spans:
                if writes and hi > lo and lo != slo:
                    self._poison = [p for p in self._poison if not (lo <= p[0] and p[1] <= hi)]
                    self._poison.append((lo, hi, f))

    def _clean(self, spans: Any) -> None:
        with self._lock:
            for lo, hi, writes in spans:
                if writes:
                    self._poison = [p for p in self._poison if not (lo <= p[0] and p[1] <= hi)]

    def _forget(self, lo: int, hi: int) -> None:
        # memory freed and allocated anew: no live buffer can still overlap it
        with self._lock:
            self._poison = [p for p in self._poison if not (p[0] < hi and lo < p[1])]

    def _check_read(self, lo: int, hi: int, nbytes: int) -> None:
        with self._lock:
            hit = next((f for plo, phi, f in self._poison if plo < hi and lo < phi), None)
        if hit is not None:
            raise hit.error(f" (raised by a read of {nbytes} bytes computed from its result)")

    def forget_failures(self, buffer: Buffer) -> None:
        lo = self._addr(buffer.base) + buffer.offset
        hi = lo + buffer.nbytes
        if self._recording is not None:
            # recorded like a launch (an op's scratch is declared when its launches are made,
            # which a replay does not repeat): a failed replay must not fail the next one
            self._recording.jobs.append(
                (lambda: self._poison and self._forget(lo, hi), None, None, None))
        elif self._poison:  # nothing to forget otherwise: no queue item in the common case
            self._put((lambda: self._forget(lo, hi), None, None, None))

    def check_status(self, message: Any, kernel: str, outputs: tuple = ()) -> None:
        # a queue job right after the kernels: fails (marking `outputs` failed, as a failed
        # launch marks what it writes) when the status words are set, clearing them
        status = self.status_buffer()
        words = status.handle[status.offset : status.offset + status.nbytes].view(np.int32)
        flat: list[int] = []
        for b in outputs:
            flat += [self._addr(b) + b.offset, b.nbytes]

        def job() -> None:
            if words[0]:
                got = words.copy()
                words[:] = 0
                raise AsyncError(message(got), kernel)

        item = (job, flat, kernel, (True,) * len(outputs))
        if self._recording is not None:
            self._recording.jobs.append(item)
        else:
            self._put(item)

    def _put(self, item: tuple) -> None:
        with self._lock:
            self._unfinished += 1
        self._queue.put(item)

    def signal(self, callback: Any, with_error: bool = False) -> None:
        def fire() -> None:
            errs, self._epoch = [f for f in self._epoch if not f.reported], []
            if with_error:
                err = errs[0].error(_more(errs)) if errs else None
                for f in errs:  # handed over: synchronize() does not raise them again
                    f.reported = True
                callback(err)
            else:
                callback()

        self._put((fire, None, None, None))

    def _replay(self, rec: Any) -> None:
        for item in rec.jobs:
            self._put(item)

    def _wait(self) -> None:
        if threading.current_thread() is self._thread:
            raise RuntimeError("synchronize() (or a buffer read) from a completion callback "
                               "would wait for itself")
        with self._lock:
            while self._unfinished:
                self._idle.wait()

    def synchronize(self) -> None:
        self._wait()
        with self._lock:
            fs = [f for f in self._failures if not f.reported]
            self._failures.clear()
        if fs:
            raise fs[0].error(_more(fs))

    # ---- memory: 64-byte aligned host arrays
    def _alloc(self, nbytes: int, zero: bool) -> np.ndarray:
        return self._alloc_at(nbytes, zero)[0]

    def _alloc_at(self, nbytes: int, zero: bool) -> tuple[np.ndarray, int]:
        """(the 64-byte aligned array, its address): from the pool when one of its size class
        is free (zero-filled here when asked), else fresh."""
        if nbytes < _HostPool.MIN:
            raw = (np.zeros if zero else np.empty)(nbytes + 64, dtype=np.uint8)
            cls = 0
        else:
            cls = _HostPool.size_class(nbytes)
            raw = self._pool.take(cls)
            if raw is None:
                raw = (np.zeros if zero else np.empty)(cls + 64, dtype=np.uint8)
                zero = False
        addr = raw.ctypes.data
        off = (-addr) % 64
        view = raw[off : off + nbytes]
        if cls:
            if zero:
                view.fill(0)
            weakref.finalize(view, self._pool.give, raw, cls).atexit = False
        return view, addr + off

    def empty_cache(self) -> None:
        """Let go of the freed host memory kept for reuse (as torch.cuda.empty_cache)."""
        self._pool.clear()

    def _new_buffer(self, nbytes: int, zero: bool) -> Buffer:
        handle, addr = self._alloc_at(max(nbytes, 1), zero)
        if self._poison:  # fresh memory at a freed, poisoned address is clean
            self._forget(addr, addr + max(nbytes, 1))
        buf = Buffer(self, nbytes, handle)
        buf._host_addr = addr  # the handle's first byte, known here: _launch needs no lookup
        return buf

    def _read(self, buf: Buffer, offset: int, nbytes: int) -> np.ndarray:
        self._wait()
        if self._poison:
            lo = self._addr(buf) + offset
            self._check_read(lo, lo + nbytes, nbytes)
        return buf.handle[offset : offset + nbytes].copy()

    def _write(self, buf: Buffer, offset: int, raw: np.ndarray) -> None:
        self._wait()
        buf.handle[offset : offset + raw.nbytes] = raw
        if self._poison:
            lo = self._addr(buf) + offset
            self._clean(((lo, lo + raw.nbytes, True),))

    def _write_async(self, buf: Buffer, offset: int, raw: np.ndarray) -> None:
        h = buf.handle
        lo = self._addr(buf) + offset
        # a host copy reads nothing on the device: it always runs, and cleans what it writes
        self._put((lambda: h.__setitem__(slice(offset, offset + raw.nbytes), raw),
                   [lo, raw.nbytes], None, (True,)))

    # ---- compile
    def _compile(self, path: str, defines: dict) -> Library:
        lockstep = os.environ.get("PYMETALNN_CPU_FIBERS", "") in ("", "0") and \
            getattr(self, "lockstep", True)
        tr = translate_file(path, "cpu", defines, [KERNEL_DIR], validate=self.validate,
                            lockstep=lockstep)
        try:
            so = self._build(path, tr)
        except CompileError:
            if not any(k.lockstep for k in tr.kernels.values()):
                raise
            # the work-item-loop versions are generated code: should one not compile, the
            # library still builds with fibers (reported like every other fallback)
            tr = translate_file(path, "cpu", defines, [KERNEL_DIR], validate=self.validate,
                                lockstep=False)
            for k in tr.kernels.values():
                if k.needs_fibers:
                    k.fiber_reason = "the work-item-loop version did not compile"
            so = self._build(path, tr)
        _report_fibers(path, tr)
        lib = ctypes.CDLL(so)
        kernels: dict[str, Kernel] = {}
        library = Library(self, path, defines, kernels)
        for name, info in tr.kernels.items():
            # only a kernel that runs on fibers has a fiber entry (msl_emit._entry_points)
            thread_fn = None if not info.needs_fibers else \
                ctypes.cast(getattr(lib, f"pmn_thread_{name}"), ctypes.c_void_p).value
            loop_fn = ctypes.cast(getattr(lib, f"pmn_loop_{name}"), ctypes.c_void_p).value
            argsize = getattr(lib, f"pmn_argsize_{name}")
            argsize.restype = ctypes.c_uint
            argsize.argtypes = [ctypes.c_uint]
            sizes = [argsize(i) for i in range(len(info.args))]
            # c_char_p elements of the launch's pointer array: a buffer's address goes in as an
            # int, a constant argument's bytes as the bytes object itself, kept alive by the array
            ptr_array = ctypes.c_char_p * max(len(info.args), 1)
            k = kernels[name] = Kernel(library, info, (lib, thread_fn, loop_fn, ptr_array,
                                                       1 if info.needs_fibers else 0), sizes)
            k._writes = tuple(not a.const for a in k.args if a.kind == "buffer")
            k._inline = not info.needs_fibers  # see _run_inline
            if self.validate:
                k._vstate = ((ctypes.c_ulonglong * 64).in_dll(lib, "pmn_v_sizes"),
                             ctypes.c_int.in_dll(lib, "pmn_v_failed"),
                             (ctypes.c_char * 1024).in_dll(lib, "pmn_v_msg"))
        return library

    def _build(self, path: str, tr: Any) -> str:
        prelude = _read(os.path.join(PRELUDE_DIR, "pmn_prelude.h"))
        if self.validate:
            prelude += _read(os.path.join(PRELUDE_DIR, "pmn_validate.h"))
        lockstep = _read(os.path.join(PRELUDE_DIR, "pmn_lockstep.h"))
        abi = _read(os.path.join(CPU_RT_DIR, "pmn_cpu_abi.h"))
        key = _hash(tr.source, prelude, lockstep, abi, self.cxx, " ".join(kernel_flags()),
                    platform.machine())
        base = os.path.join(cache_dir(), f"{os.path.splitext(os.path.basename(path))[0]}-{key}")
        so = base + ".so"
        if not _entry_ok(so):
            fd, src = tempfile.mkstemp(suffix=".cpp", dir=cache_dir())
            with os.fdopen(fd, "w") as f:
                f.write(tr.source)
            try:
                _compile_shared(self.cxx, src, so, [], kernel_flags())
            finally:
                os.unlink(src)
        return so

    # ---- launch
    def _addr(self, buf: Buffer) -> int:
        try:
            return buf._host_addr
        except AttributeError:
            return self._handle_addr(buf)

    @staticmethod
    def _handle_addr(buf: Buffer) -> int:
        """Address of the first byte of `buf.handle`: a view's is its base's, found once."""
        base = buf.base
        if base is not buf and base.handle is buf.handle:
            try:
                return base._host_addr
            except AttributeError:
                addr = base._host_addr = buf.handle.ctypes.data
                return addr
        return buf.handle.ctypes.data

    def _launch(self, kernel: Kernel, groups: int, args: list[Any]) -> None:
        item = self._item(kernel, groups, args)
        if self._recording is not None:
            self._recording.jobs.append(item)
        elif not (kernel._inline and self._run_inline(item)):
            self._put(item)

    def _run_inline(self, item: tuple) -> bool:
        """Run a launch on the calling thread when nothing is queued before it (False: queue it).
        A queue round trip costs more than a small kernel (relu over 256 floats: ~25 us per call
        queued, ~17 inline, the handoff of the GIL to and from the queue thread; a softmax over
        64 x 100 1 ms after idle, when the queue thread must be woken: 390 us queued): with the
        queue idle, running it here keeps the order and the failure handling of _run_job.
        Work-item-loop kernels keep per-thread arrays on the stack: the runtime runs the calling
        thread's share on a launch stack of its own (pmn_cpu_rt.cpp, BigStack), so they come here
        too; fiber kernels (needs_fibers) keep the queue."""
        if not self._exec.acquire(blocking=False):
            return False
        try:
            with self._lock:
                if self._unfinished:
                    return False
                self._unfinished += 1  # a synchronize() on another thread waits for it
            try:
                self._run_job(item)
            finally:
                self._job_done()
        finally:
            self._exec.release()
        return True

    def _item(self, kernel: Kernel, groups: int, args: list[Any]) -> tuple:
        """The queue item of one launch: (run, spans, kernel name, written); see _run_job."""
        _, thread_fn, loop_fn, ptr_array, fibers = kernel.handle
        vals: list[Any] = []
        keep: list[Any] = []
        spans: list[int] = []  # what the job touches: see _run_job
        for a in args:
            if a.__class__ is bytes:
                vals.append(a)
            else:
                h = a.handle
                try:
                    addr = a._host_addr  # the handle's first byte, cached (a handle never changes)
                except AttributeError:
                    addr = a._host_addr = self._handle_addr(a)
                lo = addr + a.offset
                vals.append(lo)
                spans.append(lo)
                spans.append(a.nbytes)
                keep.append(h)
        ptrs = ptr_array(*vals)
        tg = kernel.threadgroup_size
        rt = self.rt
        err = self._errbuf

        def job(_keep: list[Any] = keep) -> None:
            # `ptrs` (the constants' bytes) and `_keep` (the buffers' memory) hold what the
            # pointers point to for as long as this closure lives; `err` is shared: jobs run one
            # at a time, under _exec
            rc = rt.pmn_cpu_launch(ptrs, groups, tg, fibers, thread_fn, loop_fn, err, 512)
            if rc != 0:
                raise AsyncError(f"kernel '{kernel.name}' failed: {err.value.decode()}",
                                 kernel.name)

        return job, spans, kernel.name, kernel._writes

    def _launch_validated(self, kernel: Kernel, groups: int, args: list[Any]) -> None:
        """_launch with the bytes bound to each argument handed to the checked pointers, and
        the first out-of-bounds access of the launch raised as a ValidationError."""
        sizes, failed, msg = kernel._vstate
        bound = [0 if a.__class__ is bytes else a.nbytes for a in args]
        run, spans, name, written = self._item(kernel, groups, args)

        def job() -> None:
            for i, n in enumerate(bound):
                sizes[i] = n
            failed.value = 0
            run()
            if failed.value:
                raise ValidationError(f"kernel '{name}': {msg.value.decode(errors='replace')}",
                                      name)

        if self._recording is not None:
            self._recording.jobs.append((job, spans, name, written))
        else:
            self._put((job, spans, name, written))


def probe() -> str | None:
    """None when the cpu backend can run here, else the reason."""
    try:
        find_compiler()
    except BackendUnavailable as e:
        return str(e)
    return None
