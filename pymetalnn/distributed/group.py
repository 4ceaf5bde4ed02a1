"""The process group: ranks of an MPI communicator and the device whose buffers they exchange.

Design. init() makes one group per process (MPI.COMM_WORLD by default) and picks its device; on
cuda, a rank's GPU is its local rank (place among the ranks of its host) modulo the GPU count.
Host collectives (numpy arrays, Python objects) run at once on the calling thread through one
duplicate of the communicator; device collectives go through the group's engine (engines.py) on
another duplicate, so the two kinds never interleave on one communicator. engines.py imports this
module, so the group reaches it only inside the methods that need it. With more than one rank,
an uncaught exception in any thread calls MPI_Abort: every rank ends, rather than some waiting
forever in a collective that a dead rank will never join.
"""
from __future__ import annotations

import math
import os
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..runtime import Device
from ..runtime import device as default_device
from ..tensor import Tensor

INSTALL_HINT = 'pip install -e ".[distributed]" (mpi4py and MPICH from PyPI)'
ABORT_GRACE_S = 0.5  # between an aborting rank's last stderr write and MPI_Abort


class DistributedError(RuntimeError):
    """A collective failed, or ranks disagree (e.g. on the graph's gradients)."""


def _mpi() -> Any:
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise ImportError(f"pymetalnn.distributed needs mpi4py and an MPI library: {INSTALL_HINT}"
                          f" ({e})") from None
    return MPI


_group: ProcessGroup | None = None
_group_lock = threading.Lock()


def init(backend: str | None = None, *, device: Device | None = None, comm: Any = None,
         abort_on_error: bool = True, timeout: float | None = 600.0) -> ProcessGroup:
    """The process group of this process (made once): `comm` (default MPI.COMM_WORLD) and the
    device its collectives run on (`device`, else that of `backend`, else
    $PYMETALNN_BACKEND's, else the default). On cuda, when the cuda device does not exist yet,
    it is made on GPU `local_rank % gpu count` (local_rank: this rank's place among the ranks
    of its host). abort_on_error: an uncaught exception in any thread calls MPI_Abort (all
    ranks end, none waits forever in a collective). timeout: seconds a device collective on
    cpu or metal may wait for the other ranks before it fails (a rank that stopped or runs other
    steps), None: forever; NCCL collectives wait for ever."""
    global _group
    with _group_lock:
        if _group is not None:
            return _group
        MPI = _mpi()
        comm = comm if comm is not None else MPI.COMM_WORLD
        local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
        local_rank = local.Get_rank()
        local.Free()
        if device is None:
            device = _pick_device(backend or os.environ.get("PYMETALNN_BACKEND") or None,
                                  local_rank)
        _group = ProcessGroup(comm, device, local_rank, timeout)
        if abort_on_error and _group.size > 1:
            _install_abort_hooks(_group)
        return _group


def _pick_device(name: str | None, local_rank: int) -> Device:
    from .. import runtime

    if name is None and not runtime._devices:
        avail = runtime.availability()
        if avail.get("metal") and avail.get("cuda") is None:
            name = "cuda"  # the default device would be cuda: make it on this rank's GPU
    if name == "cuda" and "cuda" not in runtime._devices:
        from ..runtime.backend_cuda import CudaDevice, _import_cupy

        n = _import_cupy().cuda.runtime.getDeviceCount()
        with runtime._lock:
            runtime._devices["cuda"] = CudaDevice(local_rank % max(n, 1))
    return default_device(name)


def is_initialized() -> bool:
    return _group is not None


def process_group() -> ProcessGroup:
    """The group made by init() (raises if there is none)."""
    if _group is None:
        raise DistributedError("pymetalnn.distributed.init() has not been called")
    return _group


def get_rank() -> int:
    """This process's rank (0 without an initialized group)."""
    return _group.rank if _group is not None else 0


def get_world_size() -> int:
    """How many ranks (1 without an initialized group)."""
    return _group.size if _group is not None else 1


def _install_abort_hooks(pg: ProcessGroup) -> None:
    prev_sys, prev_thread = sys.excepthook, threading.excepthook

    def abort(kind: str, tb_print: Any) -> None:
        # the one-line summary goes first: once any rank aborts, mpiexec may end this process
        # while the traceback is still being written
        try:
            sys.stderr.write(f"pymetalnn.distributed: rank {pg.rank} of {pg.size}: {kind}; "
                             "aborting all ranks (MPI_Abort)\n")
            sys.stderr.flush()
            tb_print()
            sys.stderr.flush()
            # mpiexec forwards a rank's stderr asynchronously and MPI_Abort ends its forwarding
            # too: without a pause the message was lost now and then (a 2-core CI replica's run
            # of test_exception_on_one_rank_ends_all ended with no output at all)
            time.sleep(ABORT_GRACE_S)
        finally:
            pg.world.Abort(1)

    def sys_hook(tp: Any, val: Any, tb: Any) -> None:
        abort(f"uncaught {tp.__name__}: {val}", lambda: prev_sys(tp, val, tb))

    def thread_hook(args: Any) -> None:
        if args.exc_type is SystemExit:
            return
        abort(f"uncaught {args.exc_type.__name__} in thread "
              f"{getattr(args.thread, 'name', '?')}: {args.exc_value}", lambda: prev_thread(args))

    sys.excepthook = sys_hook
    threading.excepthook = thread_hook


# ---- the process group ---------------------------------------------------------------------------

_NP_OPS = ("sum", "mean", "max", "min")


class ProcessGroup:
    """Ranks of an MPI communicator and the device whose buffers they exchange.

    Host collectives (numpy arrays, Python objects) run at once on the calling thread; device
    collectives (`all_reduce`, `broadcast` on Tensors) are queued with the device's work and
    return at once. They use separate duplicates of the communicator, so the two kinds never
    interleave on one communicator. Every rank must make the same calls in the same order."""

    def __init__(self, comm: Any, device: Device, local_rank: int = 0,
                 timeout: float | None = 600.0):
        self.MPI = _mpi()
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout: expected seconds > 0 or None, got {timeout!r}")
        self.timeout = timeout
        self.world = comm
        self.comm = comm.Dup()        # host collectives, calling thread
        self._qcomm = comm.Dup()      # device collectives run by the cpu/metal queue
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.local_rank = local_rank
        self.device = device
        self._nccl: Any = None
        self._stream: Any = None
        self._engine: Any = None

    def __repr__(self) -> str:
        return f"<ProcessGroup rank {self.rank} of {self.size} on {self.device.name}>"

    # ---- host side
    def barrier(self) -> None:
        self.comm.Barrier()

    def all_reduce_host(self, arr: Any, op: str = "sum") -> np.ndarray:
        """Elementwise reduction of a numpy array over the ranks (a new array)."""
        if op not in _NP_OPS:
            raise ValueError(f"op: expected one of {', '.join(_NP_OPS)}, got {op!r}")
        a = np.ascontiguousarray(arr)
        out = np.empty_like(a)
        mop = {"sum": self.MPI.SUM, "mean": self.MPI.SUM, "max": self.MPI.MAX,
               "min": self.MPI.MIN}[op]
        self.comm.Allreduce(a, out, op=mop)
        if op == "mean":
            out = out / self.size if out.dtype.kind == "f" else out / self.size
        return out

    def mean(self, value: float) -> float:
        """The mean of a number over the ranks (e.g. a loss for logging)."""
        return float(self.all_reduce_host(np.array([value], np.float64), "mean")[0])

    def broadcast_host(self, arr: np.ndarray, src: int = 0) -> np.ndarray:
        """`arr` (contiguous) overwritten with rank src's, in place; returned."""
        if not arr.flags.c_contiguous:
            raise ValueError("arr: needs a C-contiguous array (it is overwritten in place)")
        self.comm.Bcast(arr, root=src)
        return arr

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        return self.comm.bcast(obj, root=src)

    # ---- device side
    def engine(self) -> Any:
        if self._engine is None:
            from .engines import _HostEngine, _NcclEngine

            self._engine = _NcclEngine(self) if self.device.name == "cuda" else _HostEngine(self)
        return self._engine

    def all_reduce(self, tensors: Tensor | Sequence[Tensor], op: str = "sum") -> None:
        """Sum (op="sum") or average (op="mean") each tensor over the ranks, in place, queued
        after the device's work so far (one collective for all of them). Returns at once."""
        from .engines import _Bucket

        ts = [tensors] if isinstance(tensors, Tensor) else list(tensors)
        if op not in ("sum", "mean"):
            raise ValueError(f"op: expected 'sum' or 'mean', got {op!r}")
        for b in _Bucket.split(self, ts, op, math.inf):
            b.start(ts)
            b.finish()

    def all_gather(self, src: Tensor, dst: Tensor) -> None:
        """dst = every rank's src, in rank order (dst holds size times src's elements; float32),
        queued after the device's work so far."""
        from .engines import _check

        _check([src, dst], self.device)
        if src.dtype != np.float32 or dst.dtype != np.float32:
            raise TypeError("all_gather: float32 tensors only")
        if dst.size != src.size * self.size:
            raise ValueError(f"dst: {dst.size} elements, expected {self.size} x {src.size}")
        self.engine().all_gather(src, dst)

    def broadcast(self, tensors: Tensor | Sequence[Tensor], src: int = 0) -> None:
        """Overwrite each tensor with rank src's, queued after the device's work so far."""
        from .engines import _Bucket

        ts = [tensors] if isinstance(tensors, Tensor) else list(tensors)
        if not 0 <= src < self.size:
            raise ValueError(f"src: rank {src} outside [0, {self.size})")
        for b in _Bucket.split(self, ts, "bcast", math.inf, src=src):
            b.start(ts)
            b.finish()


def wait_all(group: ProcessGroup, timeout: float, what: str = "barrier") -> None:
    """A barrier that gives up after `timeout` seconds with DistributedError (a rank that never
    arrives), instead of waiting forever."""
    req = group.comm.Ibarrier()
    t0 = time.monotonic()
    while not req.Test():
        if time.monotonic() - t0 > timeout:
            raise DistributedError(f"{what}: not every rank arrived within {timeout} s")
        time.sleep(0.001)
