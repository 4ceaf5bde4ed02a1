"""metal backend: the `.metal` source goes to Apple's compiler unchanged (local includes inlined,
variant defines prepended), through `metalcompute`.

metalcompute dispatches a 1-D grid of `count` threads with the pipeline's maximum threadgroup size,
binds whole buffers only, and runs one command buffer per call; the dialect is shaped so kernels
are correct under those rules (docs/dialect.md, "Dispatch model"). The front end still parses the
source (for the argument table and to reject what the other backends cannot run), so a kernel
that runs here runs everywhere.
"""
from __future__ import annotations

import collections
import os
import sys
from typing import Any

import numpy as np

from .core import KERNEL_DIR, STATUS_WORDS, Buffer, Device, Kernel, Library
from .errors import AsyncError, BackendUnavailable, CompileError, unavailable_reason
from .metal_memory import MAX_THREADGROUP_MEMORY, source_layouts, threadgroup_memory, value_arg_sizes
from .msl import translate_file
from .preprocess import inline_includes

# handles of committed command buffers kept before the oldest is waited on: a Metal command queue
# blocks at 64 uncompleted command buffers by default anyway
MAX_IN_FLIGHT = 64


def _import_mc() -> Any:
    if os.environ.get("PYMETALNN_FAKE_METAL") == "1":
        # tests and CI: metalcompute's API executed by the cpu backend (pymetalnn/testing)
        from ..testing import fake_metalcompute  # noqa: PLC0415

        return fake_metalcompute
    if sys.platform != "darwin":
        raise BackendUnavailable("Metal needs macOS (this is " + sys.platform + ")")
    try:
        import metalcompute  # noqa: PLC0415
    except ImportError as e:
        raise BackendUnavailable(f"metalcompute is not importable ({e})") from None
    return metalcompute


def _first_line(msg: str) -> str:
    """Metal's first diagnostic, `file.metal:LINE: error: ...`, to lead the error with (the
    compiler's own text may start with a banner)."""
    for ln in msg.splitlines():
        if ": error:" in ln:
            name, _, rest = ln.partition(":")
            return os.path.basename(name) + ":" + rest
    return msg.splitlines()[0] if msg else "Metal compile error"


class MetalDevice(Device):
    name = "metal"
    supports_views = False  # metalcompute binds whole buffers

    def __init__(self) -> None:
        super().__init__()
        self.mc = _import_mc()
        try:
            self.dev = self.mc.Device()
        except Exception as e:
            raise BackendUnavailable(f"no Metal device ({e})") from None
        # "metalcompute.Device(Apple M1 Pro)": every Mac GPU named Apple is Apple7 or later
        # (simdgroup matrices in hardware); Intel and AMD GPUs are not. The GPU's name, not the
        # Python's architecture, which reads x86_64 under Rosetta on an Apple GPU.
        self.gpu_name = str(self.dev).partition("(")[2].rstrip(")")
        self.apple_gpu = self.gpu_name.startswith("Apple")
        self.max_threadgroup_memory = MAX_THREADGROUP_MEMORY  # Apple GPUs; assumed for every Mac
        # handles of committed command buffers, oldest first; a handle keeps its buffers alive
        self._pending: collections.deque[Any] = collections.deque()

    def _drain(self) -> None:
        pending = self._pending
        while pending:
            h = pending.popleft()
            del h  # metalcompute waits for a call's command buffer when its handle is released

    def synchronize(self) -> None:
        self._drain()
        self._raise_deferred()

    def signal(self, callback: Any, with_error: bool = False) -> None:
        # metalcompute offers no completion handler: wait, then call. The callback always runs;
        # what an earlier callback raised stays for synchronize() (it is handed to this one with
        # with_error), and what this one raises surfaces there too, as on the other backends
        err = None
        try:
            self._drain()
            err = self._status_failure() if self._checks else None
        except Exception as e:  # noqa: BLE001 -- handed to the callback
            err = e
        if with_error and err is None and self._cb_error is not None:
            err, self._cb_error = self._cb_error, None
            err = AsyncError(f"a queued callback failed: {err.__class__.__name__}: {err}")
        try:
            if with_error:
                callback(err)
            else:
                callback()
        except Exception as e:  # noqa: BLE001
            self._cb_error = self._cb_error or e

    def _commit(self, handle: Any) -> None:
        self._pending.append(handle)
        if len(self._pending) > MAX_IN_FLIGHT:
            # bound the handles (and the freed buffers they keep alive) of a long run that never
            # waits: releasing the oldest waits for it, which the GPU has long finished
            h = self._pending.popleft()
            del h

    def _replay(self, rec: Any) -> None:
        for job in rec.jobs:
            job()

    def _alloc(self, nbytes: int, zero: bool) -> Any:
        try:
            return self.dev.buffer(nbytes)  # metalcompute zero-fills new buffers
        except self.mc.error as e:  # metalcompute says only "Could not make buffer"
            raise MemoryError(f"Metal could not allocate a buffer of {nbytes} bytes ({e})") from None

    def _peek_status(self, status: Buffer) -> np.ndarray:
        return np.frombuffer(status.handle, dtype=np.int32)[:STATUS_WORDS].copy()

    def _clear_status(self, status: Buffer) -> None:
        np.frombuffer(status.handle, dtype=np.uint8)[: status.nbytes] = 0

    def _read(self, buf: Buffer, offset: int, nbytes: int) -> np.ndarray:
        self.synchronize()
        return np.frombuffer(buf.handle, dtype=np.uint8)[offset : offset + nbytes].copy()

    def _write(self, buf: Buffer, offset: int, raw: np.ndarray) -> None:
        self.synchronize()
        np.frombuffer(buf.handle, dtype=np.uint8)[offset : offset + raw.nbytes] = raw

    def _compile(self, path: str, defines: dict) -> Library:
        tr = translate_file(path, "cpu", defines, [KERNEL_DIR])  # checks the dialect, gets args
        src = "".join(f"#define {k} {1 if v is True else v}\n" for k, v in defines.items())
        src += inline_includes(path, [KERNEL_DIR])
        try:
            mod = self.dev.kernel(src)
            funcs = {name: mod.function(name) for name in tr.kernels}
        except Exception as e:
            raise CompileError(f"{_first_line(str(e))}\n(Metal failed on {path})\n{e}") from None
        kernels: dict[str, Kernel] = {}
        library = Library(self, path, defines, kernels)
        # sizeof of each `constant T&` in Metal's layout, so a wrong-sized value is refused before
        # dispatch here too (Metal would read past a short buffer silently)
        structs = source_layouts(path, defines, [KERNEL_DIR])
        tg_memory = threadgroup_memory(path, defines)
        for name, info in tr.kernels.items():
            kernels[name] = k = Kernel(library, info, funcs[name],
                                       value_arg_sizes(info.args, structs))
            # pipeline creation fails past max_threadgroup_memory: ops choose tiles that fit
            k.threadgroup_memory = tg_memory.get(name, 0)
        return library

    def _launch(self, kernel: Kernel, groups: int, args: list[Any]) -> None:
        bound = [a.handle if isinstance(a, Buffer) else self.dev.buffer(a) for a in args]
        count = groups * kernel.threadgroup_size

        def job() -> None:
            self._commit(kernel.handle(count, *bound))

        if self._recording is not None:
            self._recording.jobs.append(job)
        else:
            job()


def probe() -> str | None:
    """None when the metal backend can run here, else the reason."""
    return unavailable_reason(MetalDevice)
