"""A stand-in for `metalcompute` 0.2.9 that runs anywhere, for tests and CI only.

Why: `backend_metal.py` can only meet the real package on a Mac. This module has the same API and
the same semantics as metalcompute 0.2.9's C and Swift sources show, so that the backend runs
exactly the calls it makes on Apple hardware; only the GPU is replaced: the unchanged Metal
source goes to pymetalnn's cpu translator and runs on the cpu backend. `PYMETALNN_FAKE_METAL=1`
makes `backend_metal` import it in place of the real package (on any platform).

The semantics reproduced (metalcompute 0.2.9):
- `Device(index=-1)`: the default device; `str(dev)` names it. `get_devices()` lists one.
- `dev.kernel(source)` compiles a library (MSL 2.3, fast math on); failure raises `error` with the
  compiler's log. Here "the compiler" is `pymetalnn.runtime.metal_check` (what MSL 2.3 rejects
  although our translator would run it) followed by the cpu translator and C++ compiler.
  `__METAL_VERSION__` is 230 and `__PYMETALNN__` is not defined, as under Apple's compiler.
- `kernel.function(name)` finds a kernel by its (host) name, else raises `error`.
- `dev.buffer(length)` is zero-filled shared memory (page aligned); `dev.buffer(obj)` copies any
  C-contiguous object with the buffer protocol. A Buffer exports a writable 1-D unsigned-byte
  buffer and offers nothing else (no len, no indexing). Length 0 cannot be made (Metal's
  makeBuffer returns nil for it).
- `fn(count, *buffers)`: at least one buffer; `count` any number (truncated to an integer).
  Each argument that is not a Buffer is copied into a new one (so an int makes a zero-filled
  buffer of that many bytes). Buffer i binds to `[[buffer(i)]]`, whole, at offset 0. One command
  buffer per call, committed at once on the device's in-order queue; the call returns a Run
  whose release (its last reference going away) waits for that command buffer. The threadgroup
  size is the pipeline's `maxTotalThreadsPerThreadgroup` rounded down to the SIMD width (32): the
  kernel's `[[max_total_threads_per_threadgroup(N)]]`, else the device maximum (1024 here; a real
  pipeline may report less for a register-heavy kernel). `ceil(count / size)` threadgroups run.
- The pipeline is made at each call; it fails (`error`, "Cannot create pipeline state") for a
  kernel that declares more than 32 KiB of threadgroup memory, Apple GPUs' limit.
- metalcompute never looks at a command buffer's status: a kernel that faults on the GPU reports
  nothing. Here such a fault (a missing buffer, a `constant T&` buffer smaller than T, an error
  raised by the cpu runtime) is kept in `faults` and printed to stderr, so tests can assert that
  none happened (`pop_faults()`).
"""
from __future__ import annotations

import hashlib
import mmap
import os
import queue
import re
import sys
import threading
from collections import namedtuple
from typing import Any

import numpy as np

__version__ = "0.2.9"

SIMD_WIDTH = 32  # Apple GPUs' threadExecutionWidth
MAX_THREADGROUP_MEMORY = 32768  # bytes, maxThreadgroupMemoryLength of Apple GPUs
DEVICE_MAX_THREADS = int(os.environ.get("PYMETALNN_FAKE_METAL_MAX_THREADS", "1024"))
DEVICE_NAME = "Apple GPU stand-in (pymetalnn cpu backend)"  # an Apple7+ GPU: simdgroup matrices


class error(Exception):  # noqa: N801 - the real module's name: metalcompute.error
    """metalcompute.error"""


DeviceInfo = namedtuple("DeviceInfo", "deviceName recommendedWorkingSetSize maxTransferRate "
                                      "hasUnifiedMemory")

faults: list[str] = []  # what a GPU would have got wrong silently (see the module docstring)
_faults_lock = threading.Lock()


def pop_faults() -> list[str]:
    """The faults recorded since the last call, cleared."""
    with _faults_lock:
        out = list(faults)
        faults.clear()
    return out


def _fault(msg: str) -> None:
    with _faults_lock:
        faults.append(msg)
    print(f"fake metalcompute: GPU fault (Metal would not report it): {msg}", file=sys.stderr)


def get_devices() -> tuple[DeviceInfo, ...]:
    return (DeviceInfo(DEVICE_NAME, 16 << 30, 0, True),)


# ---- the "GPU": one cpu device of our own, one queue thread ----------------------------------

class _Gpu:
    _lock = threading.Lock()
    _inst: _Gpu | None = None

    def __init__(self) -> None:
        from ..runtime.backend_cpu import CpuDevice

        self.cpu = CpuDevice()  # private: its queue, libraries and statistics are nobody else's
        # Metal runs a kernel without [[max_total_threads_per_threadgroup]] with the pipeline's
        # maximum (1024), set on the cpu kernel after it is built; work-item-loop builds size
        # their per-thread state for the attribute's (or the default 256) threads, fibers take
        # any threadgroup size
        self.cpu.lockstep = False
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._worker, name="fake-metal-queue", daemon=True).start()

    @classmethod
    def get(cls) -> _Gpu:
        with cls._lock:
            if cls._inst is None:
                cls._inst = cls()
            return cls._inst

    def _worker(self) -> None:
        while True:
            cb = self.queue.get()
            try:
                cb.execute(self.cpu)
            except BaseException as e:  # noqa: BLE001 - a fault, never the queue's end
                _fault(f"{cb.fn._name}: {e.__class__.__name__}: {e}")
            finally:
                cb.done.set()
                del cb  # the buffers of a finished command buffer are not kept


# ---- API ---------------------------------------------------------------------------------------

class Device:
    def __init__(self, index: int = -1) -> None:
        if int(index) >= len(get_devices()):
            raise error("Cannot create device")
        self._gpu = _Gpu.get()

    def __str__(self) -> str:
        return f"metalcompute.Device({DEVICE_NAME})"

    def kernel(self, source: str) -> Kernel:
        return Kernel(self, source)

    def buffer(self, length_or_data: Any) -> Buffer:
        return _make_buffer(self, length_or_data)


_PREFIX = "#undef __PYMETALNN__\n#undef __METAL_VERSION__\n#define __METAL_VERSION__ 230\n"
_PREFIX_LINES = _PREFIX.count("\n")


def _check_args(owner: Any, cls: type, text: Any) -> None:
    """metalcompute's checks (and words) for a (owner object, str) constructor."""
    if not isinstance(owner, cls):
        raise error(f"First argument should be a metalcompute.{cls.__name__} object")
    if not isinstance(text, str):
        raise TypeError(f"argument 1 must be str, not {type(text).__name__}")


class Kernel:
    def __init__(self, dev: Device, source: str) -> None:
        _check_args(dev, Device, source)
        self._dev = dev
        from ..runtime.core import cache_dir
        from ..runtime.errors import CompileError, MSLError
        from ..runtime.metal_check import check_file, compiler_findings, scan_kernels
        from ..runtime.metal_memory import threadgroup_memory

        text = _PREFIX + source
        path = os.path.join(cache_dir(), "fake-metal",
                            hashlib.sha256(text.encode()).hexdigest()[:24] + ".metal")
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.{threading.get_ident()}"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, path)
        try:
            bad = compiler_findings(check_file(path, metal_defines=False))
            if bad:
                raise error(_program_source("\n".join(str(v) for v in bad), path))
            self._lib = dev._gpu.cpu.library(path)
            self._max_threads = {k.name: k.max_threads for k in scan_kernels(path)}
            self._tg_memory = threadgroup_memory(path)
        except (MSLError, CompileError) as e:
            raise error(_program_source(str(e), path)) from None

    def __str__(self) -> str:
        return "metalcompute.Kernel"

    def function(self, name: str) -> Function:
        return Function(self, name)


def _program_source(msg: str, path: str) -> str:
    """A log in Apple's words: the source is 'program_source', lines count from its first."""
    base = re.escape(os.path.basename(path))

    def sub(m: re.Match) -> str:
        return f"program_source:{max(int(m.group(1)) - _PREFIX_LINES, 1)}"

    return re.sub(rf"(?:[^\s:]*/)?{base}:(\d+)", sub, msg)


class Function:
    def __init__(self, kern: Kernel, name: str) -> None:
        _check_args(kern, Kernel, name)
        if name not in kern._lib.kernels:
            raise error("Failed to find function")
        self._kern = kern
        self._name = name
        self._cpu_kernel = kern._lib.kernels[name]
        # the pipeline's maxTotalThreadsPerThreadgroup (the attribute's value, as the translator
        # reads it, else the device's maximum), then metalcompute's w * (max / w)
        declared = kern._max_threads.get(name)
        mx = DEVICE_MAX_THREADS if declared is None else self._cpu_kernel.info.threadgroup_size
        self.threadgroup_size = (min(mx, DEVICE_MAX_THREADS) // SIMD_WIDTH) * SIMD_WIDTH
        self._cpu_kernel.threadgroup_size = self.threadgroup_size

    def __str__(self) -> str:
        return "metalcompute.Function"

    def __call__(self, *args: Any) -> Run:
        return Run(self, args)


class Run:
    """A committed command buffer; releasing the last reference waits for it to complete."""

    def __init__(self, fn: Function, args: tuple) -> None:
        if len(args) - 1 <= 0:
            raise error("Buffer not found")
        first = args[0]
        if not any(hasattr(type(first), m) for m in ("__index__", "__int__", "__float__")):
            raise error("First argument should be an integer kernel count")
        dev = fn._kern._dev
        # makeComputePipelineState, per call as metalcompute does: it fails past the device's
        # threadgroup memory (the library itself compiled)
        if fn._kern._tg_memory.get(fn._name, 0) > MAX_THREADGROUP_MEMORY:
            raise error("Cannot create pipeline state")
        # arguments that are not metalcompute Buffers are copied into new ones, kept with the run
        bufs = tuple(a if type(a) is Buffer else _make_buffer(dev, a) for a in args[1:])
        # the queue holds the command buffer, never the Run: dropping the Run is what waits
        self._cb = _CommandBuffer(fn, int(first), bufs)
        dev._gpu.queue.put(self._cb)  # commit

    def __str__(self) -> str:
        return "metalcompute.Run"

    def __del__(self) -> None:
        cb = getattr(self, "_cb", None)
        if cb is not None:
            cb.done.wait()  # waitUntilCompleted


class _CommandBuffer:
    def __init__(self, fn: Function, count: int, bufs: tuple) -> None:
        self.fn = fn
        self.count = count
        self.bufs = bufs
        self.done = threading.Event()

    def execute(self, cpu: Any) -> None:
        """Runs on the queue thread."""
        from ..runtime.core import Buffer as CpuBuffer

        fn = self.fn
        k = fn._cpu_kernel
        tg = fn.threadgroup_size
        groups = (self.count + tg - 1) // tg if self.count > 0 else 0
        if groups <= 0:
            return
        vals: list[Any] = []
        for a in k.args:
            if a.index >= len(self.bufs):
                raise RuntimeError(f"[[buffer({a.index})]] '{a.name}' is not bound "
                                   f"({len(self.bufs)} buffers given)")
            mem = np.frombuffer(self.bufs[a.index], dtype=np.uint8)
            if a.kind == "value":
                want = k.arg_sizes[a.index]
                if mem.nbytes < want:
                    raise RuntimeError(f"[[buffer({a.index})]] '{a.name}' is 'constant {a.type}&' "
                                       f"({want} bytes) but its buffer has {mem.nbytes}")
                vals.append(mem[:want].tobytes())  # read when the kernel runs, as the GPU does
            else:
                vals.append(CpuBuffer(cpu, mem.nbytes, mem))
        k(groups * tg, *vals)
        cpu.synchronize()


class Buffer(mmap.mmap):
    """Shared memory of one MTLBuffer: the buffer protocol (writable bytes) and nothing else."""

    def __new__(cls, dev: Device, length_or_data: Any) -> Buffer:
        raise TypeError("make buffers with Device.buffer")

    def __getattribute__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_length", "_dev"):
            return object.__getattribute__(self, name)
        raise AttributeError(f"'metalcompute.Buffer' object has no attribute '{name}'")

    def __str__(self) -> str:
        return f"metalcompute.Buffer(length={self._length})"

    __repr__ = __str__

    def __len__(self) -> int:
        raise TypeError("object of type 'metalcompute.Buffer' has no len()")

    def __getitem__(self, key: Any) -> Any:
        raise TypeError("'metalcompute.Buffer' object is not subscriptable")

    def __setitem__(self, key: Any, value: Any) -> None:
        raise TypeError("'metalcompute.Buffer' object does not support item assignment")

    def __iter__(self) -> Any:
        raise TypeError("'metalcompute.Buffer' object is not iterable")

    def __enter__(self) -> Any:
        raise TypeError("'metalcompute.Buffer' object does not support the context manager "
                        "protocol")


def _make_buffer(dev: Device, x: Any) -> Buffer:
    if not isinstance(dev, Device):
        raise error("First argument should be a metalcompute.Device object")
    src = None
    try:
        mv = memoryview(x)
    except TypeError:
        mv = None
    if mv is not None and mv.c_contiguous:  # PyObject_GetBuffer(PyBUF_ND) succeeds
        src = mv.cast("B") if mv.ndim != 1 or mv.format != "B" else mv
        length = src.nbytes
    else:
        try:
            length = int(x)
        except (TypeError, ValueError):
            raise error("Unsupported input format") from None
    if length <= 0:
        raise error("Could not make buffer")
    buf = mmap.mmap.__new__(Buffer, -1, length)  # anonymous: zero-filled, page aligned
    object.__setattr__(buf, "_length", length)
    object.__setattr__(buf, "_dev", dev)
    if src is not None:
        np.frombuffer(buf, dtype=np.uint8)[:] = np.frombuffer(src, dtype=np.uint8)
    return buf
