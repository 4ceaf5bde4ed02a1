"""cuda backend: MSL translated to CUDA C++, compiled by NVRTC through CuPy, launched through the
driver API.

CuPy supplies NVRTC, module loading, its on-disk kernel cache and the memory pool. Launches skip
CuPy's argument marshalling and call cuLaunchKernel through ctypes with a parameter block prepared
once per kernel: a launch is then a handful of attribute stores and one foreign call, which keeps
Python's share of a launch to a few microseconds. `constant T&` arguments travel by value in the
kernel's parameter space, as Metal's setBytes does, so no upload precedes a launch.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from .core import KERNEL_DIR, PRELUDE_DIR, STATUS_WORDS, Buffer, Device, Kernel, Library, cache_dir
from .errors import AsyncError, BackendUnavailable, CompileError, DispatchError, unavailable_reason
from .msl import translate_file
from .msl_emit import cuda_entry

NVRTC_OPTIONS = ("-std=c++17", "-default-device")
NVRTC_ERROR_COMPILATION = 6  # nvrtcResult: the source has errors (others: options, NVRTC itself)


def _import_cupy() -> Any:
    try:
        import cupy  # noqa: PLC0415
    except Exception as e:  # ImportError, or a CUDA library load failure
        raise BackendUnavailable(f"CuPy is not importable ({e.__class__.__name__}: {e}); "
                                 "install pymetalnn[cuda]") from None
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        raise BackendUnavailable(f"no usable CUDA driver/GPU ({e})") from None
    if n == 0:
        raise BackendUnavailable("CuPy sees no CUDA GPU")
    return cupy


def _libcuda() -> ctypes.CDLL:
    for name in ("libcuda.so.1", "libcuda.so", ctypes.util.find_library("cuda") or "", "nvcuda.dll"):
        if not name:
            continue
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise BackendUnavailable("the CUDA driver library (libcuda) cannot be loaded")


class CudaDevice(Device):
    name = "cuda"

    def __init__(self, ordinal: int = 0) -> None:
        super().__init__()
        self.cp = _import_cupy()
        self.ordinal = ordinal
        self.cp.cuda.Device(ordinal).use()
        self.props = self.cp.cuda.runtime.getDeviceProperties(ordinal)
        self.gpu_name = self.props["name"].decode() if isinstance(self.props["name"], bytes) \
            else str(self.props["name"])
        self.cu = _libcuda()
        self.cu.cuLaunchKernel.restype = ctypes.c_int
        self.cu.cuLaunchKernel.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [
            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        # One blocking stream of our own: capturable into CUDA graphs (the legacy default stream is
        # not), yet implicitly ordered with work on the legacy default stream (PyTorch's default),
        # and made CuPy's current stream so CuPy calls and events here follow our order.
        self.cp_stream = self.cp.cuda.Stream(non_blocking=False)
        self.cp_stream.use()
        self.stream = self.cp_stream.ptr
        self._watch: Any = None  # completion-callback queue, started by the first signal()
        self._last_kernel: str | None = None  # named by an asynchronous CUDA error
        with open(os.path.join(PRELUDE_DIR, "pmn_prelude.h"), encoding="utf-8") as f:
            self._prelude = '#line 1 "pmn_prelude.h"\n' + f.read() + "\n"

    def synchronize(self) -> None:
        try:
            self.cp.cuda.runtime.deviceSynchronize()
        except self.cp.cuda.runtime.CUDARuntimeError as e:
            raise self._async_error(e) from e
        if self._watch is not None:
            self._watch.join()
        self._raise_deferred()

    def _async_error(self, e: BaseException) -> AsyncError:
        # CUDA reports a kernel fault at the next synchronization, without naming the kernel,
        # and the context stays unusable (a "sticky" error): name the last kernel launched
        return AsyncError(f"CUDA error at or before kernel '{self._last_kernel}': {e} (a kernel "
                          "fault leaves the CUDA context unusable: restart the process)",
                          self._last_kernel)

    def signal(self, callback: Any, with_error: bool = False) -> None:
        """Record an event; a watcher thread waits for it, then calls back (always: with
        `with_error`, `callback(error or None)`)."""
        import queue
        import threading

        if self._watch is None:
            self._watch = queue.Queue()

            def watcher() -> None:
                while True:
                    ev, cb, pass_err, err, checks = self._watch.get()
                    try:
                        try:
                            if ev is not None:
                                ev.synchronize()
                            if checks and err is None:  # the kernels they follow are done
                                with self.cp.cuda.Device(self.ordinal):
                                    err = self._status_failure(checks)
                        except Exception as e:  # noqa: BLE001 -- handed to the callback
                            err = self._async_error(e)
                        if pass_err:
                            cb(err)
                        else:
                            cb()
                            if err is not None:
                                raise err
                    except BaseException as e:  # noqa: BLE001 -- surfaces at synchronize()
                        self._cb_error = e
                    finally:
                        self._watch.task_done()

            threading.Thread(target=watcher, name="pymetalnn-cuda-signal", daemon=True).start()
        # the checks queued so far are this signal's: checked once its event has completed
        checks, self._checks = self._checks, []
        try:
            ev = self.cp.cuda.Event(block=False, disable_timing=True)
            ev.record(self.cp_stream)
            self._watch.put((ev, callback, with_error, None, checks))
        except self.cp.cuda.runtime.CUDARuntimeError as e:  # a fault already reported
            self._watch.put((None, callback, with_error, self._async_error(e), checks))

    def _begin_capture(self, rec: Any) -> None:
        super()._begin_capture(rec)
        self.cp_stream.begin_capture()

    def _end_capture(self, rec: Any) -> None:
        try:
            rec.graph = self.cp_stream.end_capture()
        finally:  # a capture that failed (invalidated) must not leave the device recording
            super()._end_capture(rec)

    def _replay(self, rec: Any) -> None:
        rec.graph.launch(self.cp_stream)

    # ---- memory (CuPy's pool)
    def empty_cache(self) -> None:
        self.synchronize()
        self.cp.get_default_memory_pool().free_all_blocks()

    def _alloc(self, nbytes: int, zero: bool) -> Any:
        mem = self.cp.cuda.alloc(nbytes)
        if zero:
            mem.memset_async(0, nbytes, self.cp_stream)
        return mem

    def _peek_status(self, status: Buffer) -> np.ndarray:
        out = np.empty(STATUS_WORDS, dtype=np.int32)
        (status.handle + status.offset).copy_to_host(out.ctypes.data, out.nbytes)
        return out

    def _clear_status(self, status: Buffer) -> None:
        (status.handle + status.offset).memset(0, status.nbytes)

    def _read(self, buf: Buffer, offset: int, nbytes: int) -> np.ndarray:
        out = np.empty(nbytes, dtype=np.uint8)
        if nbytes:
            self.synchronize()
            (buf.handle + offset).copy_to_host(out.ctypes.data, nbytes)
        return out

    def _write(self, buf: Buffer, offset: int, raw: np.ndarray) -> None:
        if raw.nbytes:
            raw = np.ascontiguousarray(raw)
            (buf.handle + offset).copy_from_host(raw.ctypes.data, raw.nbytes)

    def _write_async(self, buf: Buffer, offset: int, raw: np.ndarray) -> None:
        # pageable source: the driver stages it before returning, so `raw` may be freed after
        (buf.handle + offset).copy_from_host_async(raw.ctypes.data, raw.nbytes, self.cp_stream)

    def _profiled_launch(self, kernel: Kernel, groups: int, args: list[Any]) -> None:
        # events on our stream bracket the kernel: device time without host synchronization
        start, end = self.cp.cuda.Event(), self.cp.cuda.Event()
        start.record(self.cp_stream)
        self._launch(kernel, groups, args)
        end.record(self.cp_stream)
        self._profiler.samples.append((kernel.name, (start, end)))

    def _elapsed(self, t: Any) -> float:
        start, end = t
        return self.cp.cuda.get_elapsed_time(start, end) / 1e3

    def pointer(self, buf: Buffer) -> int:
        """Device address of a buffer or view (for interop with CuPy/PyTorch)."""
        return int(buf.handle.ptr) + buf.offset

    def as_cupy(self, buf: Buffer, dtype: Any, shape: tuple[int, ...]) -> Any:
        """A CuPy array over the buffer's memory (no copy)."""
        dtype = np.dtype(dtype)
        count = int(np.prod(shape))
        if count * dtype.itemsize > buf.nbytes:
            raise ValueError(f"shape: {shape} of {dtype} does not fit {buf.nbytes} bytes")
        return self.cp.ndarray(shape, dtype, buf.handle + buf.offset)

    # ---- compile
    # A library compiles in three steps, so that a process pays only for the kernels it runs
    # (gemm.metal's 78 instantiations took about 105 s through NVRTC and ptxas on a 2-core host,
    # one of them about 1 s): (1) the whole translation through NVRTC's front end only
    # (-fdevice-syntax-only, templates instantiated, no code generated; a fraction of a second):
    # every error of the source surfaces when the library loads, with its .metal line, as
    # before; (2) one module with every kernel's argument-size table and no kernel code, read
    # once; (3) each kernel, on first lookup, a module of its own: the source without the other
    # kernels' instantiations (CuPy caches each on disk).
    def _compile(self, path: str, defines: dict) -> Library:
        tr = translate_file(path, "cuda", defines, [KERNEL_DIR], prelude=self._prelude)
        self._syntax_check(tr.source, path)
        entries = {name: cuda_entry(info) for name, info in tr.kernels.items()}
        with self.cp.cuda.Device(self.ordinal):
            mod = self._module(tr.head + "".join(e[1] for e in entries.values()), path)
            sizes = {}
            for name, info in tr.kernels.items():
                n = len(info.args)
                host = np.zeros(max(n, 1), dtype=np.uint32)
                if n:
                    mod.get_global(f"pmn_argsizes_{name}").copy_to_host(host.ctypes.data, 4 * n)
                sizes[name] = [int(v) for v in host[:n]]
        library = Library(self, path, defines, {})
        library.kernels = _LazyKernels(self, library, tr, entries, sizes)
        return library

    def _module(self, source: str, path: str) -> Any:
        """A RawModule of `source`, compiled now (CuPy compiles on first use otherwise)."""
        try:
            mod = self.cp.RawModule(code=source, options=NVRTC_OPTIONS, backend="nvrtc")
            mod.compile()
        except self.cp.cuda.compiler.CompileException as e:
            raise _compile_error(path, str(e)) from None
        return mod

    def _syntax_check(self, source: str, path: str) -> None:
        # a source that passed once leaves a marker in the kernel cache (keyed by the source,
        # options, architecture and NVRTC version), so a later process skips the check, as it
        # skips compiles through CuPy's cache
        try:
            from cupy_backends.cuda.libs import nvrtc  # noqa: PLC0415
        except ImportError:  # no such binding: errors then surface when a kernel compiles
            return
        opts = [*NVRTC_OPTIONS, f"-arch=compute_{self.cp.cuda.Device(self.ordinal).compute_capability}",
                "-fdevice-syntax-only"]
        h = hashlib.sha256("\0".join([source, *opts, str(nvrtc.getVersion())]).encode())
        marker = os.path.join(cache_dir(), f"cuda-syntax-{h.hexdigest()[:24]}.ok")
        if os.path.exists(marker):
            return
        prog = nvrtc.createProgram(source, os.path.basename(path) + ".cu", [], [])
        try:
            nvrtc.compileProgram(prog, opts)
        except nvrtc.NVRTCError as e:
            if e.status != NVRTC_ERROR_COMPILATION:  # e.g. an NVRTC without the option
                return
            raise _compile_error(path, nvrtc.getProgramLog(prog)) from None
        finally:
            nvrtc.destroyProgram(prog)
        with open(marker, "w"):
            pass

    def _load_kernel(self, library: Library, tr: Any, name: str, wrapper: str, sizes: list[int]
                     ) -> Kernel:
        info = tr.kernels[name]
        with self.cp.cuda.Device(self.ordinal):
            mod = self._module(tr.head + wrapper, library.path)
            func = mod.get_function(name)
        stores: list[Any] = []
        for a, sz in zip(sorted(info.args, key=lambda a: a.index), sizes):
            stores.append(ctypes.c_void_p() if a.kind == "buffer" else ctypes.create_string_buffer(sz))
        params = (ctypes.c_void_p * max(len(info.args), 1))(*[ctypes.addressof(s) for s in stores])
        # the handle keeps func (and through it the module) alive
        return Kernel(library, info, (func, func.kernel.ptr, stores, params), sizes)

    # ---- launch
    def _launch(self, kernel: Kernel, groups: int, args: list[Any]) -> None:
        _, fptr, stores, params = kernel.handle
        if groups > 2**31 - 1:
            raise DispatchError(f"kernel '{kernel.name}': {groups} threadgroups exceed the grid limit")
        for s, a in zip(stores, args):
            if a.__class__ is bytes:  # a constant argument (core hands over bytes)
                s.raw = a  # into the create_string_buffer of its exact size: a memcpy
            elif isinstance(a, Buffer):
                try:
                    addr = a._dev_addr  # the handle's device address, cached: handles never change
                except AttributeError:
                    addr = a._dev_addr = int(a.handle.ptr)
                s.value = addr + a.offset
            else:
                ctypes.memmove(s, a, len(a))
        self._last_kernel = kernel.name
        rc = self.cu.cuLaunchKernel(fptr, groups, 1, 1, kernel.threadgroup_size, 1, 1, 0,
                                    self.stream, params, None)
        if rc != 0:
            raise RuntimeError(f"cuLaunchKernel failed for '{kernel.name}' (CUresult {rc})")


def _compile_error(path: str, log: str) -> CompileError:
    """NVRTC's log as a CompileError led by the first error's file(line) (the .metal line,
    through #line)."""
    m = re.search(r"^(.+?)\((\d+)\): (?:catastrophic )?error:\s*(.*)$", log, re.M)
    head = (f"{os.path.basename(m.group(1))}:{m.group(2)}: error: {m.group(3)}" if m
            else f"NVRTC failed on {os.path.basename(path)}")
    return CompileError(f"{head}\n\nNVRTC output:\n{log}")


class _LazyKernels(Mapping):
    """A cuda library's kernels by name, each compiled (CudaDevice._load_kernel) on first lookup."""

    def __init__(self, dev: CudaDevice, library: Library, tr: Any, entries: dict, sizes: dict):
        self._dev, self._library, self._tr = dev, library, tr
        self._entries, self._sizes = entries, sizes
        self._loaded: dict[str, Kernel] = {}

    def __getitem__(self, name: str) -> Kernel:
        k = self._loaded.get(name)
        if k is None:
            if name not in self._entries:
                raise KeyError(name)
            k = self._loaded[name] = self._dev._load_kernel(self._library, self._tr, name,
                                                            self._entries[name][0], self._sizes[name])
        return k

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


_FORKED = ("the cuda backend cannot be used in a process forked after CUDA was initialized; "
           "start workers with multiprocessing's 'spawn' or 'forkserver' method")


def _forked(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError(_FORKED)


class _ForkedCudaDevice(CudaDevice):
    """What a CudaDevice becomes in a forked child: every use raises (a CUDA context does not
    survive fork()); buffers can still be garbage-collected."""

    synchronize = signal = pointer = as_cupy = _forked
    _launch = _alloc = _new_buffer = _read = _write = _write_async = _compile = _load_kernel = _replay = \
        _forked
    _begin_capture = _profiled_launch = _forked


def _after_fork_in_child() -> None:
    from . import _devices

    for d in list(_devices.values()):
        if isinstance(d, CudaDevice):
            d.__class__ = _ForkedCudaDevice


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def probe() -> str | None:
    """None when the cuda backend can run here (CuPy and the driver load), else the reason."""
    return unavailable_reason(lambda: (_import_cupy(), _libcuda()))
