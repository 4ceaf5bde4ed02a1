"""Backend-independent half of the runtime: buffers, libraries, kernels and argument checking.

A backend subclasses `Device` and supplies memory, compilation and launch; everything a user can
get wrong is checked here, once, before any backend sees it, so all three backends raise the
same errors with the same words.
"""
from __future__ import annotations

import collections
import contextlib
import ctypes
import os
import threading
from collections.abc import Iterator
from typing import Any, Callable

import numpy as np

from .errors import ArgumentTypeError, AsyncError, DispatchError
from .msl import KernelArg, KernelInfo

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def data_dir(name: str) -> str:
    """A folder shipped with the package: inside it in a wheel (setup.py maps the repository's
    top-level folder there), else the checkout's top-level folder (editable install, PYTHONPATH)."""
    inside = os.path.join(PACKAGE_DIR, name)
    return inside if os.path.isdir(inside) else os.path.join(os.path.dirname(PACKAGE_DIR), name)


KERNEL_DIR = data_dir("kernels")
PRELUDE_DIR = os.path.join(PACKAGE_DIR, "runtime", "prelude")
CPU_RT_DIR = os.path.join(PACKAGE_DIR, "runtime", "cpu")

# numpy dtype of an MSL scalar, for `constant T&` arguments given as Python numbers
SCALAR_DTYPES = {
    "float": np.float32, "half": np.float16, "int": np.int32, "uint": np.uint32,
    "unsigned": np.uint32, "int32_t": np.int32, "uint32_t": np.uint32, "short": np.int16,
    "ushort": np.uint16, "char": np.int8, "uchar": np.uint8, "bool": np.bool_,
    "long": np.int64, "ulong": np.uint64,
}
MAX_GRID_THREADS = 2**32 - 1024  # gid is a 32-bit uint on every backend


_trusted_dirs: dict[str, str] = {}  # configured cache folder -> the folder used


def cache_dir() -> str:
    """Folder for compiled kernel libraries (PYMETALNN_CACHE, else ~/.cache/pymetalnn), made
    with mode 0700. Loading a library runs its code, so a folder that another user owns or may
    write to is not used: a warning names it and this process compiles into a private
    temporary folder instead."""
    d = os.environ.get("PYMETALNN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "pymetalnn")
    got = _trusted_dirs.get(d)
    if got is None or not os.path.isdir(got):
        got = _trusted_dirs[d] = _trusted_dir(d)
    return got


def untrusted_reason(st: os.stat_result) -> str | None:
    """Why a cache folder or file with this stat cannot be trusted, or None."""
    uid = getattr(os, "getuid", lambda: None)()
    if uid is not None and st.st_uid != uid:
        return f"owned by uid {st.st_uid}, not by this user ({uid})"
    if st.st_mode & 0o022:
        who = "others" if st.st_mode & 0o002 else "its group"
        return f"writable by {who} (mode {st.st_mode & 0o777:o})"
    return None


def _trusted_dir(d: str) -> str:
    import tempfile
    import warnings

    try:
        if not os.path.isdir(d):
            os.makedirs(d, mode=0o700, exist_ok=True)
            os.chmod(d, 0o700)  # makedirs' mode is filtered by the umask
        why = untrusted_reason(os.stat(d))
    except OSError as e:
        why = f"not usable ({e.strerror})"
    if why is None:
        return d
    priv = tempfile.mkdtemp(prefix="pymetalnn-cache-")  # 0700, ours
    import atexit
    import shutil

    atexit.register(shutil.rmtree, priv, True)
    warnings.warn(f"kernel cache folder {d} is {why}: not used; compiling into the private "
                  f"folder {priv} for this process instead (set PYMETALNN_CACHE to a folder of "
                  "your own)", RuntimeWarning, stacklevel=3)
    return priv


def resolve_source(path: str) -> str:
    """A kernel source: absolute, then the package's kernels/ folder, then relative to cwd."""
    if os.path.isabs(path):
        cands = [path]
    else:
        cands = [os.path.join(KERNEL_DIR, path), os.path.abspath(path)]
    for c in cands:
        if os.path.isfile(c):
            return os.path.abspath(c)
    raise FileNotFoundError(f"kernel source {path!r} not found (looked in {', '.join(cands)})")


class Buffer:
    """Device memory. `numpy()` reads it back (waiting for queued kernels first)."""

    _tracked = 0  # bytes counted in the device's memory statistics until this buffer dies

    def __init__(self, device: Device, nbytes: int, handle: Any):
        self.device = device
        self.nbytes = nbytes
        self.handle = handle
        self.offset = 0
        if type(self) is Buffer:  # views share their base's memory: counted once
            device._track(self)

    def __del__(self) -> None:
        if self._tracked:
            self.device._untrack(self._tracked)

    @property
    def base(self) -> Buffer:
        return self

    def view(self, offset: int, nbytes: int | None = None) -> BufferView:
        """A byte range of this buffer, usable wherever a buffer is (cuda, cpu)."""
        return BufferView(self, offset, self.nbytes - offset if nbytes is None else nbytes)

    def numpy(self, dtype: Any = np.uint8, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """Copy of the contents as an array of `dtype` (and `shape`, if given)."""
        dtype = np.dtype(dtype)
        if self.nbytes % dtype.itemsize:
            raise ValueError(f"dtype: buffer of {self.nbytes} bytes is not a whole number of "
                             f"{dtype} items")
        raw = self.device._read(self.base, self.offset, self.nbytes)
        arr = raw.view(dtype)
        return arr.reshape(shape) if shape is not None else arr

    def write(self, data: Any, offset: int = 0) -> None:
        """Copy `data` (array-like or bytes) into the buffer at byte `offset`."""
        raw = _as_bytes_array(data)
        if offset < 0 or offset + raw.nbytes > self.nbytes:
            raise ValueError(f"data: {raw.nbytes} bytes at offset {offset} do not fit a buffer of "
                             f"{self.nbytes} bytes")
        self.device._write(self.base, self.offset + offset, raw)

    def __repr__(self) -> str:
        return f"<Buffer {self.nbytes} bytes on {self.device.name}>"


class BufferView(Buffer):
    """A byte range of a Buffer; passed to kernels as a pointer to its first byte."""

    def __init__(self, buffer: Buffer, offset: int, nbytes: int):
        if offset < 0 or nbytes < 0 or offset + nbytes > buffer.nbytes:
            raise ValueError(f"view: bytes [{offset}, {offset + nbytes}) outside a buffer of "
                             f"{buffer.nbytes} bytes")
        if not buffer.device.supports_views:
            raise DispatchError(f"the {buffer.device.name} backend binds whole buffers only: "
                                "views are not available there")
        self._buf = buffer.base
        super().__init__(buffer.device, nbytes, self._buf.handle)
        self.offset = buffer.offset + offset

    @property
    def base(self) -> Buffer:
        return self._buf

    def __repr__(self) -> str:
        return f"<BufferView {self.nbytes} bytes at {self.offset} on {self.device.name}>"


def _as_bytes_array(data: Any) -> np.ndarray:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return np.frombuffer(bytes(data), dtype=np.uint8)
    arr = np.ascontiguousarray(np.asarray(data))
    return arr.reshape(-1).view(np.uint8)


def value_bytes(arg: KernelArg, value: Any, kernel: str) -> bytes:
    """Bytes of a `constant T&` argument from a ctypes struct, numpy scalar/record, bytes, or a
    Python number (converted with the declared MSL type). A scalar parameter takes a number of
    its kind only: an integral one an integer in its range (a float is refused, not truncated),
    a bool one a bool; a numpy scalar is converted by value, never reinterpreted."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, (ctypes.Structure, ctypes.Array)):
        return ctypes.string_at(ctypes.addressof(value), ctypes.sizeof(value))
    dt = SCALAR_DTYPES.get(arg.type)
    if isinstance(value, ctypes._SimpleCData):
        if dt is None:
            return ctypes.string_at(ctypes.addressof(value), ctypes.sizeof(value))
        value = value.value
    if isinstance(value, np.ndarray) and value.ndim == 0 and dt is not None:
        value = value[()]
    if isinstance(value, np.ndarray) or (isinstance(value, np.generic) and dt is None):
        return np.ascontiguousarray(value).tobytes()
    where = f"kernel '{kernel}': argument '{arg.name}' (buffer {arg.index}, {arg.type})"
    if isinstance(value, (bool, int, float, np.bool_, np.number)):
        if dt is None:
            raise ArgumentTypeError(f"{where}: pass its bytes (a ctypes struct or bytes), not a "
                                    f"{type(value).__name__}")
        if np.issubdtype(dt, np.integer):
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
                raise ArgumentTypeError(f"{where} is integral: got {type(value).__name__} "
                                        f"{value!r} (pass an int; nothing is rounded)")
            info = np.iinfo(dt)
            if not (info.min <= int(value) <= info.max):
                raise DispatchError(f"{where} = {value} is outside {info.min}..{info.max}")
            return np.array(int(value), dtype=dt).tobytes()
        if dt is np.bool_:
            if not isinstance(value, (bool, np.bool_)):
                raise ArgumentTypeError(f"{where} is a bool: got {type(value).__name__} {value!r}")
            return np.array(value, dtype=dt).tobytes()
        if isinstance(value, (complex, np.complexfloating)):
            raise ArgumentTypeError(f"{where}: got complex {value!r}")
        return np.array(value, dtype=dt).tobytes()
    raise ArgumentTypeError(f"{where} is 'constant {arg.type}&'; got {type(value).__name__}")


class Kernel:
    """One compiled kernel. `k(count, *args)` launches `count` threads (rounded up to whole
    threadgroups) on the device's queue and returns at once."""

    def __init__(self, library: Library, info: KernelInfo, handle: Any, arg_sizes: list[int]):
        self.library = library
        self.info = info
        self.name = info.name
        self.threadgroup_size = info.threadgroup_size
        self.handle = handle
        self.arg_sizes = arg_sizes
        self.args = sorted(info.args, key=lambda a: a.index)
        # per argument, precomputed once: (is a buffer, KernelArg, bytes wanted (0: unchecked))
        self._spec = tuple((a.kind == "buffer", a, 0 if a.kind == "buffer" else arg_sizes[a.index])
                           for a in self.args)
        self._nargs = len(self.args)

    @property
    def uses_fibers(self) -> bool:
        return self.info.needs_fibers

    def __call__(self, count: int, *args: Any) -> None:
        dev = self.library.device
        if count.__class__ is not int:  # fast path: a plain int needs no further type checks
            if not isinstance(count, (int, np.integer)) or isinstance(count, bool):
                raise DispatchError(f"kernel '{self.name}': count must be an int, got "
                                    f"{type(count).__name__}")
            count = int(count)
        if count <= 0 or count > MAX_GRID_THREADS:
            raise DispatchError(f"kernel '{self.name}': count must be in 1..{MAX_GRID_THREADS}, "
                                f"got {count}")
        if len(args) != self._nargs:
            names = ", ".join(f"{a.name} [[buffer({a.index})]]" for a in self.args)
            raise DispatchError(f"kernel '{self.name}' takes {len(self.args)} arguments ({names}), "
                                f"{len(args)} given")
        packed: list[Any] = []
        for (is_buf, a, want), v in zip(self._spec, args):
            if is_buf:
                if not isinstance(v, Buffer):
                    raise DispatchError(f"kernel '{self.name}': argument '{a.name}' (buffer "
                                        f"{a.index}) expects a Buffer, got {type(v).__name__}")
                if v.device is not dev:
                    raise DispatchError(f"kernel '{self.name}': argument '{a.name}' lives on "
                                        f"{v.device.name}, the kernel on {dev.name}")
                packed.append(v)
            else:
                if isinstance(v, ctypes.Structure):  # fast path: an op's params struct
                    b = bytes(v)  # its memory, as string_at(addressof, sizeof) gives it
                else:
                    if isinstance(v, Buffer):
                        raise DispatchError(f"kernel '{self.name}': argument '{a.name}' (buffer "
                                            f"{a.index}) is 'constant {a.type}&': pass the value "
                                            "(ctypes struct, numpy scalar, number or bytes)")
                    b = value_bytes(a, v, self.name)
                if want and len(b) != want:
                    raise DispatchError(f"kernel '{self.name}': argument '{a.name}' (buffer "
                                        f"{a.index}) needs {want} bytes (sizeof {a.type}), got "
                                        f"{len(b)}")
                packed.append(b)
        groups = -(-count // self.threadgroup_size)
        rec = dev._recording
        if dev._profiler is not None and rec is None:
            dev._profiled_launch(self, groups, packed)
        else:
            dev._launch(self, groups, packed)
        if rec is not None:
            rec.names.append(self.name)
        else:
            dev.dispatch_counts[self.name] += 1

    def __repr__(self) -> str:
        return f"<Kernel {self.name} tg={self.threadgroup_size} on {self.library.device.name}>"


class Library:
    """The kernels of one `.metal` source compiled for one device with one set of defines."""

    def __init__(self, device: Device, path: str, defines: dict, kernels: dict[str, Kernel]):
        self.device = device
        self.path = path
        self.defines = defines
        self.kernels = kernels

    @property
    def names(self) -> list[str]:
        return sorted(self.kernels)

    def kernel(self, name: str) -> Kernel:
        try:
            return self.kernels[name]
        except KeyError:
            raise KeyError(f"no kernel named {name!r} in {os.path.basename(self.path)} "
                           f"(it has: {', '.join(self.names)})") from None

    def __getitem__(self, name: str) -> Kernel:
        return self.kernel(name)


STATUS_WORDS = 4  # Device.status_buffer: int32 words


def _pend(pending: list[tuple], chk: tuple) -> None:
    """Add a check_status entry: one per (status buffer, kernel), which are read once per
    synchronization anyway (a loop that never waits does not grow the list)."""
    if not any(c[0] is chk[0] and c[2] == chk[2] for c in pending):
        pending.append(chk)


class Recording:
    """Launches captured by `Device.capture()`; `replay()` queues them again, in order."""

    def __init__(self, device: Device):
        self.device = device
        self.jobs: list[Callable[[], Any]] = []  # cpu/metal: one closure per launch
        self.graph: Any = None  # cuda: the captured CUDA graph
        self.names: list[str] = []
        self.checks: list[tuple] = []  # metal/cuda: Device.check_status calls, checked at the sync

    def replay(self) -> None:
        self.device._replay(self)
        for chk in self.checks:
            _pend(self.device._checks, chk)
        for n in self.names:
            self.device.dispatch_counts[n] += 1

    def __len__(self) -> int:
        return len(self.names)


class Profile:
    """Kernel times collected by `Device.profile()`: `samples` holds (kernel name, seconds) per
    launch once the block has ended; `by_kernel()` and `table()` summarize them."""

    def __init__(self, device: Device):
        self.device = device
        self.samples: list[tuple[str, Any]] = []  # cuda: (name, (start_event, end_event)) until done

    def _finish(self) -> None:
        self.samples = [(n, self.device._elapsed(t)) for n, t in self.samples]

    def by_kernel(self) -> list[tuple[str, int, float]]:
        """(kernel, launches, total seconds), slowest first."""
        acc: dict[str, list] = {}
        for n, t in self.samples:
            a = acc.setdefault(n, [0, 0.0])
            a[0] += 1
            a[1] += t
        return sorted(((n, c, t) for n, (c, t) in acc.items()), key=lambda r: -r[2])

    @property
    def total(self) -> float:
        return sum(t for _, t in self.samples)

    def table(self, top: int = 30) -> str:
        tot = self.total or 1.0
        rows = [f"{'kernel':48s} {'launches':>8s} {'ms':>10s} {'share':>6s}"]
        for n, c, t in self.by_kernel()[:top]:
            rows.append(f"{n:48s} {c:8d} {t * 1e3:10.3f} {100 * t / tot:5.1f}%")
        rows.append(f"{'total':48s} {len(self.samples):8d} {self.total * 1e3:10.3f}")
        return "\n".join(rows)


class Device:
    """A backend's device: memory, kernel libraries and one in-order queue."""

    name = "?"
    supports_views = True

    def __init__(self) -> None:
        self.dispatch_counts: collections.Counter[str] = collections.Counter()
        self._libraries: dict[tuple, Library] = {}
        self._recording: Recording | None = None
        self._profiler: Profile | None = None
        self._checks: list[tuple] = []  # check_status calls not yet checked (metal, cuda)
        self._cb_error: BaseException | None = None  # raised by a signal() callback (metal, cuda)
        self._status: Buffer | None = None
        self._hook = threading.local()  # allocation_hook, per thread
        self._mem_live = 0  # bytes of live Buffers (views excluded), for the memory statistics
        self._mem_peak = 0

    # ---- public API
    def buffer(self, data: Any = None, nbytes: int | None = None, zero: bool = True) -> Buffer:
        """New buffer: from an array-like/bytes (copied), or `nbytes` bytes (an int), zero-filled
        unless zero=False (for outputs a kernel overwrites: saves a fill pass on the GPU)."""
        if data.__class__ is int:  # fast path: buffer(nbytes), what every op's output does
            nbytes, data = data, None
        elif isinstance(data, (int, np.integer)) and not isinstance(data, bool):
            nbytes, data = int(data), None
        if data is None:
            if nbytes is None or nbytes < 0:
                raise ValueError(f"nbytes: need a size in bytes >= 0, got {nbytes}")
            hook = getattr(self._hook, "fn", None)
            if hook is not None:
                return hook(nbytes, zero, lambda: self._new_buffer(nbytes, zero))
            return self._new_buffer(nbytes, zero)
        raw = _as_bytes_array(data)
        buf = self._new_buffer(raw.nbytes, zero=False)
        self._write(buf, 0, raw)
        return buf

    def library(self, source: str, defines: dict | None = None) -> Library:
        """Compile (or fetch from cache) the kernels of `source` with variant `defines`."""
        dkey = tuple(sorted((k, str(v)) for k, v in defines.items())) if defines else ()
        lib = self._libraries.get((source, dkey))  # hot path: ops look kernels up per call
        if lib is None:
            path = resolve_source(source)
            lib = self._compile(path, dict(defines or {}))
            self._libraries[(source, dkey)] = lib
        return lib

    def synchronize(self) -> None:
        """Wait until every queued kernel has finished."""
        raise NotImplementedError

    def write_async(self, buffer: Buffer, data: Any, offset: int = 0) -> None:
        """Copy `data` into `buffer` at byte `offset`, ordered after the work queued so far and
        before work queued later, without waiting for the queue (Buffer.write waits). `data` is
        copied before this returns, so the caller may reuse it."""
        raw = _as_bytes_array(data).copy()
        if buffer.device is not self:
            raise ValueError(f"buffer: lives on {buffer.device.name}, not {self.name}")
        if offset < 0 or offset + raw.nbytes > buffer.nbytes:
            raise ValueError(f"data: {raw.nbytes} bytes at offset {offset} do not fit a buffer of "
                             f"{buffer.nbytes} bytes")
        if raw.nbytes:
            self._write_async(buffer.base, buffer.offset + offset, raw)

    def signal(self, callback: Callable[..., Any], with_error: bool = False) -> None:
        """Run `callback()` on a host thread once all work queued so far has finished (MPS's
        command-buffer completion handler). It always runs, also after failed work; with
        `with_error`, it is called as `callback(error)`: an AsyncError for work that failed since
        the previous signal, else None. Exceptions it raises surface at synchronize()."""
        raise NotImplementedError

    # ---- checks made by kernels: a status word on the device
    def status_buffer(self) -> Buffer:
        """The device's status words for checks made inside kernels (int32: flag, then what the
        check reports; e.g. loss.metal's label check): zero while nothing failed. A kernel that
        finds bad input sets them instead of reading out of bounds; check_status, queued after
        it, turns them into an AsyncError and clears them. Made once, before any capture."""
        if self._status is None:  # not through the allocation hook: no op's output
            self._status = self._new_buffer(STATUS_WORDS * 4, zero=True)
        return self._status

    def check_status(self, message: Callable[[np.ndarray], str], kernel: str,
                     outputs: tuple[Buffer, ...] = ()) -> None:
        """After the kernels queued so far: if the status words are set, the work fails like a
        failed launch of `kernel`, with AsyncError(message(words)) -- at the first read or wait
        of anything computed from `outputs` (cpu: those buffers are marked failed), at
        synchronize(), and at a graph step's wait -- and the words are cleared, so later calls
        run normally. Recorded by capture() like a launch. The metal and cuda backends check at
        their next synchronization (every read and wait synchronizes there)."""
        chk = (self.status_buffer(), message, kernel)
        _pend(self._recording.checks if self._recording is not None else self._checks, chk)

    def _status_failure(self, checks: list[tuple] | None = None) -> AsyncError | None:
        """Once the work before them is done: the first of `checks` (default: every pending
        one, taken over) whose status words are set (cleared here), as an AsyncError; None when
        none is."""
        if checks is None:
            checks, self._checks = self._checks, []
        err = None
        read: set[int] = set()
        for status, message, kernel in checks:
            if id(status) in read:  # one read per status buffer: what it holds, the first
                continue            # check that may have set it reports
            read.add(id(status))
            words = self._peek_status(status)
            if words[0]:
                self._clear_status(status)
                err = err or AsyncError(message(words), kernel)
        return err

    def _raise_deferred(self) -> None:
        """At a synchronization, the queue drained (metal, cuda): the first failed kernel check
        (status words), else what a signal() callback raised, as an AsyncError; each reported
        once."""
        if self._checks:
            serr = self._status_failure()
            if serr is not None:
                raise serr
        err, self._cb_error = self._cb_error, None
        if err is not None:
            raise AsyncError(f"a queued callback failed: {err.__class__.__name__}: {err}") from err

    def _peek_status(self, status: Buffer) -> np.ndarray:
        raise NotImplementedError

    def _clear_status(self, status: Buffer) -> None:
        raise NotImplementedError

    def forget_failures(self, buffer: Buffer) -> None:
        """Declare `buffer` scratch from this point of the queue on: work queued later does not
        inherit failures recorded on it (see docs/errors.md). For memory whose every use is
        written before it is read, e.g. a graph's per-step arena."""

    @contextlib.contextmanager
    def capture(self) -> Iterator[Recording]:
        """Record the launches made inside the block (they do not run) into a Recording whose
        `replay()` issues them again cheaply: a CUDA graph on cuda, a launch list elsewhere.
        Buffers used inside must exist before the block and stay alive while it is replayed."""
        rec = Recording(self)
        self._begin_capture(rec)
        try:
            yield rec
        finally:
            self._end_capture(rec)

    @contextlib.contextmanager
    def profile(self) -> Iterator[Profile]:
        """Time every kernel launched inside the block on the device (CUDA events around each
        launch on cuda; elsewhere each launch runs alone between two synchronizations). After the
        block, `prof.table()` lists time by kernel name."""
        if self._profiler is not None:
            raise RuntimeError("profile: already profiling")
        prof = Profile(self)
        self.synchronize()
        self._profiler = prof
        try:
            yield prof
        finally:
            self._profiler = None
            self.synchronize()
            prof._finish()

    def _profiled_launch(self, kernel: Kernel, groups: int, args: list[Any]) -> None:
        import time

        self.synchronize()
        t0 = time.perf_counter()
        self._launch(kernel, groups, args)
        self.synchronize()
        self._profiler.samples.append((kernel.name, time.perf_counter() - t0))

    @contextlib.contextmanager
    def allocation_hook(self, fn: Callable[[int, bool, Callable[[], Buffer]], Buffer]
                        ) -> Iterator[None]:
        """While the block runs on this thread, `dev.buffer(nbytes)` (every op's output) calls
        `fn(nbytes, zero, allocate)`, which returns the Buffer to use: `allocate()` for a fresh
        one, or e.g. a view of a planned arena (the graph's memory planner). Other threads are
        not affected; hooks do not nest."""
        if getattr(self._hook, "fn", None) is not None:
            raise RuntimeError("allocation_hook: a hook is already installed on this thread")
        self._hook.fn = fn
        try:
            yield
        finally:
            self._hook.fn = None

    def reset_counts(self) -> None:
        self.dispatch_counts.clear()

    # ---- memory statistics (as torch.cuda.memory_allocated / max_memory_allocated)
    def memory_allocated(self) -> int:
        """Bytes held by live buffers of this device now (views not counted twice)."""
        return self._mem_live

    def max_memory_allocated(self) -> int:
        """High-water mark of memory_allocated() since the device was made or reset_peak_memory()."""
        return self._mem_peak

    def reset_peak_memory(self) -> None:
        self._mem_peak = self._mem_live

    def empty_cache(self) -> None:
        """Hand freed memory kept for reuse back to the system (torch.cuda.empty_cache): the cuda
        backend's CuPy pool, the cpu backend's host pool; nothing to do on metal."""

    def _track(self, buf: Buffer) -> None:
        # Buffer.__del__ gives the bytes back (cheaper than a weakref.finalize per buffer)
        buf._tracked = buf.nbytes
        self._mem_live += buf.nbytes
        if self._mem_live > self._mem_peak:
            self._mem_peak = self._mem_live

    def _untrack(self, nbytes: int) -> None:
        self._mem_live -= nbytes

    def __repr__(self) -> str:
        return f"<Device {self.name}>"

    # ---- backend hooks
    def _begin_capture(self, rec: Recording) -> None:
        if self._recording is not None:
            raise RuntimeError("capture: already capturing")
        self.status_buffer()  # allocated (and zeroed) outside the recording
        self._recording = rec

    def _end_capture(self, rec: Recording) -> None:
        self._recording = None

    def _alloc(self, nbytes: int, zero: bool) -> Any:
        raise NotImplementedError

    def _new_buffer(self, nbytes: int, zero: bool) -> Buffer:
        """A fresh Buffer of `nbytes` (`buffer(nbytes)` without the hook); a backend may override
        it to attach what its launches need to the Buffer."""
        return Buffer(self, nbytes, self._alloc(max(nbytes, 1), zero=zero))

    def _read(self, buf: Buffer, offset: int, nbytes: int) -> np.ndarray:
        raise NotImplementedError

    def _write(self, buf: Buffer, offset: int, raw: np.ndarray) -> None:
        raise NotImplementedError

    def _write_async(self, buf: Buffer, offset: int, raw: np.ndarray) -> None:
        self._write(buf, offset, raw)  # backends without an ordered queue copy: wait, then copy

    def _compile(self, path: str, defines: dict) -> Library:
        raise NotImplementedError

    def _launch(self, kernel: Kernel, groups: int, args: list[Any]) -> None:
        raise NotImplementedError

    def _replay(self, rec: Recording) -> None:
        raise NotImplementedError

    def _elapsed(self, t: Any) -> float:
        return float(t)
