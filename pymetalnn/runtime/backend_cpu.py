"""cpu backend: translated kernels compiled with the system C++ compiler, run by our fiber runtime.

Compiled libraries are cached on disk by a hash of everything that affects them (translated
source, prelude, runtime ABI, compiler and flags), so a second process pays nothing. Launches go
to one queue thread that calls the runtime through ctypes, which releases the GIL: Python keeps
preparing the next launch while the cores run this one, as on a GPU queue.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
from typing import Any

import numpy as np

from .core import CPU_RT_DIR, KERNEL_DIR, PRELUDE_DIR, Buffer, Device, Kernel, Library, cache_dir
from .errors import BackendUnavailable, CompileError
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


def kernel_flags() -> list[str]:
    """Flags of the kernel libraries: CXXFLAGS at -O3, tuned for this host's CPU where the
    compiler can tell which it is (the flags, and so the cache key, then name that CPU)."""
    # -fopenmp-simd: honour the work-item loops' `omp simd` (no OpenMP runtime involved)
    flags = [f for f in CXXFLAGS if f != "-O2"] + ["-O3", "-fopenmp-simd"]
    if os.environ.get("PYMETALNN_CPU_NATIVE", "1") not in ("0", ""):
        cpu = _host_cpu()
        if cpu:
            # no contraction of a*b+c into fma: results stay those of the source's roundings,
            # the same on every host (g++ contracts by default once -march offers FMA)
            flags += [f"-march={cpu}", "-ffp-contract=off"]
    return flags


_HOST_CPU: list[str] = []


def _host_cpu() -> str:
    """The -march value the compiler picks for -march=native (e.g. "skylake-avx512"), or ""
    when it cannot tell: spelled out so that a cache shared between machines never hands one
    CPU's instructions to another."""
    if not _HOST_CPU:
        cpu = ""
        try:
            r = subprocess.run([*find_compiler().split(), "-march=native", "-Q", "--help=target"],
                               capture_output=True, text=True, timeout=60)
            for line in r.stdout.splitlines():
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "-march=":
                    cpu = parts[1]
                    break
        except (OSError, subprocess.SubprocessError):
            cpu = ""
        _HOST_CPU.append(cpu if cpu not in ("native", "") else "")
    return _HOST_CPU[0]


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
        raise CompileError(f"C++ compilation failed ({' '.join(cmd)}):\n{r.stderr}")
    os.replace(tmp, out)  # atomic: concurrent processes never load a half-written library


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
                if not os.path.exists(out):
                    _compile_shared(cxx, src, out, _runtime_flags())
                lib = ctypes.CDLL(out, mode=ctypes.RTLD_GLOBAL)
                lib.pmn_cpu_launch.restype = ctypes.c_int
                lib.pmn_cpu_launch.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint32,
                                               ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                               ctypes.c_char_p, ctypes.c_size_t]
                lib.pmn_cpu_num_workers.restype = ctypes.c_int
                cls._lib = lib
            return cls._lib


class CpuDevice(Device):
    name = "cpu"

    def __init__(self) -> None:
        super().__init__()
        self.cxx = find_compiler()
        self.rt = _Runtime.get(self.cxx)
        self.num_workers = self.rt.pmn_cpu_num_workers()
        # the queue: a C SimpleQueue (put and get take no Python-level lock, so a launch does not
        # wait for the queue thread to let go of one) plus queue.Queue's join bookkeeping
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._unfinished = 0  # jobs put and not yet done, under _lock
        self._error: BaseException | None = None
        self._errbuf = ctypes.create_string_buffer(512)  # launch errors, written by the queue thread
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

    # ---- queue
    def _worker(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is not None and self._error is None:
                    job()
            except BaseException as e:  # reported at the next synchronize
                self._error = e
            finally:
                with self._lock:
                    self._unfinished -= 1
                    if not self._unfinished:
                        self._idle.notify_all()

    def _put(self, job: Any) -> None:
        with self._lock:
            self._unfinished += 1
        self._queue.put(job)

    def signal(self, callback: Any) -> None:
        self._put(callback)

    def _replay(self, rec: Any) -> None:
        for job in rec.jobs:
            self._put(job)

    def synchronize(self) -> None:
        if threading.current_thread() is self._thread:
            raise RuntimeError("synchronize() (or a buffer read) from a completion callback "
                               "would wait for itself")
        with self._lock:
            while self._unfinished:
                self._idle.wait()
        if self._error is not None:
            e, self._error = self._error, None
            raise e

    # ---- memory: 64-byte aligned host arrays
    def _alloc(self, nbytes: int, zero: bool) -> np.ndarray:
        return self._alloc_at(nbytes, zero)[0]

    @staticmethod
    def _alloc_at(nbytes: int, zero: bool) -> tuple[np.ndarray, int]:
        """(the 64-byte aligned array, its address)."""
        raw = (np.zeros if zero else np.empty)(nbytes + 64, dtype=np.uint8)
        addr = raw.ctypes.data
        off = (-addr) % 64
        return raw[off : off + nbytes], addr + off

    def _new_buffer(self, nbytes: int, zero: bool) -> Buffer:
        handle, addr = self._alloc_at(max(nbytes, 1), zero)
        buf = Buffer(self, nbytes, handle)
        buf._host_addr = addr  # the handle's first byte, known here: _launch needs no lookup
        return buf

    def _read(self, buf: Buffer, offset: int, nbytes: int) -> np.ndarray:
        self.synchronize()
        return buf.handle[offset : offset + nbytes].copy()

    def _write(self, buf: Buffer, offset: int, raw: np.ndarray) -> None:
        self.synchronize()
        buf.handle[offset : offset + raw.nbytes] = raw

    def _write_async(self, buf: Buffer, offset: int, raw: np.ndarray) -> None:
        h = buf.handle
        self._put(lambda: h.__setitem__(slice(offset, offset + raw.nbytes), raw))

    # ---- compile
    def _compile(self, path: str, defines: dict) -> Library:
        lockstep = os.environ.get("PYMETALNN_CPU_FIBERS", "") in ("", "0")
        tr = translate_file(path, "cpu", defines, [KERNEL_DIR], lockstep=lockstep)
        try:
            so = self._build(path, tr)
        except CompileError:
            if not any(k.lockstep for k in tr.kernels.values()):
                raise
            # the work-item-loop versions are generated code: should one not compile, the
            # library still builds with fibers (reported like every other fallback)
            tr = translate_file(path, "cpu", defines, [KERNEL_DIR], lockstep=False)
            for k in tr.kernels.values():
                if k.needs_fibers:
                    k.fiber_reason = "the work-item-loop version did not compile"
            so = self._build(path, tr)
        _report_fibers(path, tr)
        lib = ctypes.CDLL(so)
        kernels: dict[str, Kernel] = {}
        library = Library(self, path, defines, kernels)
        for name, info in tr.kernels.items():
            # a kernel that runs as work-item loops has no fiber entry (lockstep.py)
            thread_fn = None if info.lockstep else \
                ctypes.cast(getattr(lib, f"pmn_thread_{name}"), ctypes.c_void_p).value
            loop_fn = ctypes.cast(getattr(lib, f"pmn_loop_{name}"), ctypes.c_void_p).value
            argsize = getattr(lib, f"pmn_argsize_{name}")
            argsize.restype = ctypes.c_uint
            argsize.argtypes = [ctypes.c_uint]
            sizes = [argsize(i) for i in range(len(info.args))]
            # c_char_p elements of the launch's pointer array: a buffer's address goes in as an
            # int, a constant argument's bytes as the bytes object itself, kept alive by the array
            ptr_array = ctypes.c_char_p * max(len(info.args), 1)
            kernels[name] = Kernel(library, info, (lib, thread_fn, loop_fn, ptr_array,
                                                   1 if info.needs_fibers else 0), sizes)
        return library

    def _build(self, path: str, tr: Any) -> str:
        prelude = _read(os.path.join(PRELUDE_DIR, "pmn_prelude.h"))
        lockstep = _read(os.path.join(PRELUDE_DIR, "pmn_lockstep.h"))
        abi = _read(os.path.join(CPU_RT_DIR, "pmn_cpu_abi.h"))
        key = _hash(tr.source, prelude, lockstep, abi, self.cxx, " ".join(kernel_flags()),
                    platform.machine())
        base = os.path.join(cache_dir(), f"{os.path.splitext(os.path.basename(path))[0]}-{key}")
        so = base + ".so"
        if not os.path.exists(so):
            fd, src = tempfile.mkstemp(suffix=".cpp", dir=cache_dir())
            with os.fdopen(fd, "w") as f:
                f.write(tr.source)
            try:
                _compile_shared(self.cxx, src, so, [], kernel_flags())
            finally:
                os.unlink(src)
        return so

    # ---- launch
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
        _, thread_fn, loop_fn, ptr_array, fibers = kernel.handle
        vals: list[Any] = []
        keep: list[Any] = []
        for a in args:
            if a.__class__ is bytes:
                vals.append(a)
            else:
                h = a.handle
                try:
                    addr = a._host_addr  # the handle's first byte, cached (a handle never changes)
                except AttributeError:
                    addr = a._host_addr = self._handle_addr(a)
                vals.append(addr + a.offset)
                keep.append(h)
        ptrs = ptr_array(*vals)
        tg = kernel.threadgroup_size
        rt = self.rt
        err = self._errbuf

        def job(_keep: list[Any] = keep) -> None:
            # `ptrs` (the constants' bytes) and `_keep` (the buffers' memory) hold what the
            # pointers point to for as long as this closure lives; `err` is shared: jobs run one
            # at a time, on the queue thread only
            rc = rt.pmn_cpu_launch(ptrs, groups, tg, fibers, thread_fn, loop_fn, err, 512)
            if rc != 0:
                raise RuntimeError(f"kernel '{kernel.name}' failed: {err.value.decode()} "
                                   f"(kept {len(vals)} arguments)")

        if self._recording is not None:
            self._recording.jobs.append(job)
        else:
            self._put(job)


def probe() -> str | None:
    """None when the cpu backend can run here, else the reason."""
    try:
        find_compiler()
    except BackendUnavailable as e:
        return str(e)
    return None
