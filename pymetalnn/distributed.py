"""Data-parallel training across processes: a process group on MPI (mpi4py), collectives on
device buffers (NCCL through CuPy on cuda, MPI elsewhere), gradient averaging in buckets hooked
into a training graph, a distributed sampler, losses reduced for logging, checkpoints by rank 0.

    mpiexec -n 2 python train.py
    pg = distributed.init()                        # MPI.COMM_WORLD; cuda: GPU local_rank % count
    tg = G.TrainingGraph(loss, optimizer=..., device=pg.device)
    ddp = distributed.DataParallel(tg)              # rank 0's weights and optimizer state to all
    hist = fit(tg, (x, y), batch_size=32, distributed=ddp)   # batch_size per rank

Design. Every rank runs the same graph on its own slice of the global batch. After the backward
step that produces the last gradient of a bucket (buckets fill in the order the backward
produces the weight gradients, 1 MiB first, then `bucket_cap_mb`), the bucket's collective is
queued at once: on cuda on a communication stream of its own (an event orders it after the
gradients; NCCL sums while the compute stream runs the rest of the backward; the compute stream
waits for another event only just before the first update that reads the bucket); on cpu and
metal, a job on the device's in-order queue gathers the gradients into a host bucket and starts
an MPI_Iallreduce, and a later job, queued just before the first update that reads the bucket,
waits for it and writes the mean back. On cpu the queue thread also runs the kernels, so the
overlap is structural: the reduction is in flight between the two jobs, but MPI progresses it
only inside MPI calls (or on MPICH's progress thread, MPIR_CVAR_ASYNC_PROGRESS=1). Collectives
run on the device's queue (or stream): encoding never blocks on them, and a captured step
records them with the kernels (a CUDA graph on cuda, a job list on cpu).

The mean over ranks of per-rank mean losses' gradients is the gradient of the mean loss over
the global batch (equal per-rank batches): 2 ranks with batch B/2 each train the weights of one
rank with batch B, up to rounding, for any optimizer. Batch norm keeps per-rank statistics (like
PyTorch's BatchNorm under DDP), or with sync_bn=True uses the statistics of all ranks' samples
(SyncBatchNorm: one all-gather in the forward and one all-reduce in the backward per batch norm,
on the device's stream, so they do not overlap). Gradients are averaged whatever the loss's
reduction (as DDP does).

Failures. A rank whose gradients failed (a poisoned buffer on cpu) still takes part in the
collective, with a flag element set: every rank then raises at the gradients' first read,
naming the failure. An exception that ends a rank's main thread (and one in a callback thread)
calls MPI_Abort, which ends all ranks instead of leaving them waiting in a collective.
"""
from __future__ import annotations

import math
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .runtime import Device
from .runtime import device as default_device
from .runtime.errors import AsyncError
from .tensor import Tensor

if TYPE_CHECKING:
    from .graph.graph import Graph, TrainingGraph
    from .graph.nodes import Value

__all__ = ["DataParallel", "DistributedError", "DistributedSampler", "ProcessGroup", "SyncBatchNorm",
           "get_rank", "get_world_size", "init", "is_initialized", "process_group"]

INSTALL_HINT = 'pip install -e ".[distributed]" (mpi4py and MPICH from PyPI)'


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
    from . import runtime

    if name is None and not runtime._devices:
        avail = runtime.availability()
        if avail.get("metal") and avail.get("cuda") is None:
            name = "cuda"  # the default device would be cuda: make it on this rank's GPU
    if name == "cuda" and "cuda" not in runtime._devices:
        from .runtime.backend_cuda import CudaDevice, _import_cupy

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
        try:
            tb_print()
            sys.stderr.write(f"pymetalnn.distributed: rank {pg.rank} of {pg.size}: {kind}; "
                             "aborting all ranks (MPI_Abort)\n")
            sys.stderr.flush()
        finally:
            pg.world.Abort(1)

    def sys_hook(tp: Any, val: Any, tb: Any) -> None:
        abort(f"uncaught {tp.__name__}", lambda: prev_sys(tp, val, tb))

    def thread_hook(args: Any) -> None:
        if args.exc_type is SystemExit:
            return
        abort(f"uncaught {args.exc_type.__name__} in thread "
              f"{getattr(args.thread, 'name', '?')}", lambda: prev_thread(args))

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
            self._engine = _NcclEngine(self) if self.device.name == "cuda" else _HostEngine(self)
        return self._engine

    def all_reduce(self, tensors: Tensor | Sequence[Tensor], op: str = "sum") -> None:
        """Sum (op="sum") or average (op="mean") each tensor over the ranks, in place, queued
        after the device's work so far (one collective for all of them). Returns at once."""
        ts = [tensors] if isinstance(tensors, Tensor) else list(tensors)
        if op not in ("sum", "mean"):
            raise ValueError(f"op: expected 'sum' or 'mean', got {op!r}")
        for b in _Bucket.split(self, ts, op, math.inf):
            b.start(ts)
            b.finish()

    def all_gather(self, src: Tensor, dst: Tensor) -> None:
        """dst = every rank's src, in rank order (dst holds size times src's elements; float32),
        queued after the device's work so far."""
        _check([src, dst], self.device)
        if src.dtype != np.float32 or dst.dtype != np.float32:
            raise TypeError("all_gather: float32 tensors only")
        if dst.size != src.size * self.size:
            raise ValueError(f"dst: {dst.size} elements, expected {self.size} x {src.size}")
        self.engine().all_gather(src, dst)

    def broadcast(self, tensors: Tensor | Sequence[Tensor], src: int = 0) -> None:
        """Overwrite each tensor with rank src's, queued after the device's work so far."""
        ts = [tensors] if isinstance(tensors, Tensor) else list(tensors)
        if not 0 <= src < self.size:
            raise ValueError(f"src: rank {src} outside [0, {self.size})")
        for b in _Bucket.split(self, ts, "bcast", math.inf, src=src):
            b.start(ts)
            b.finish()


def _check(ts: Sequence[Tensor], dev: Device) -> None:
    for i, t in enumerate(ts):
        if not isinstance(t, Tensor):
            raise TypeError(f"tensors[{i}]: expected a Tensor, got {type(t).__name__}")
        if t.device is not dev:
            raise ValueError(f"tensors[{i}]: lives on {t.device.name}, the group's collectives "
                             f"on {dev.name}")
        if t.dtype.kind != "f":
            raise TypeError(f"tensors[{i}]: expected a floating-point tensor, got {t.dtype}")


class _Bucket:
    """Tensors (their positions in a list) reduced by one collective through a flat buffer of
    one dtype. The buffer is made at the first start and kept (captured steps use it)."""

    def __init__(self, pg: ProcessGroup, idx: list[int], dtype: Any, op: str, src: int = 0):
        self.pg, self.idx, self.dtype, self.op, self.src = pg, idx, np.dtype(dtype), op, src
        self.sizes: list[int] = []
        self.state: Any = None  # the engine's buffers and events

    @staticmethod
    def split(pg: ProcessGroup, ts: list[Tensor], op: str, cap_bytes: float, src: int = 0
              ) -> list[_Bucket]:
        _check(ts, pg.device)
        out: list[_Bucket] = []
        by: dict[Any, list[int]] = {}
        for i, t in enumerate(ts):
            by.setdefault(t.dtype, []).append(i)
        for dt, idx in by.items():
            cur: list[int] = []
            nb = 0
            for i in idx:
                cur.append(i)
                nb += ts[i].nbytes
                if nb >= cap_bytes:
                    out.append(_Bucket(pg, cur, dt, op, src))
                    cur, nb = [], 0
            if cur:
                out.append(_Bucket(pg, cur, dt, op, src))
        return out

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    def start(self, ts: list[Tensor]) -> None:
        mine = [ts[i] for i in self.idx]
        sizes = [t.size for t in mine]
        if not self.sizes:
            self.sizes = sizes
        elif sizes != self.sizes:
            raise DistributedError(f"bucket of {len(sizes)} tensors: sizes changed from "
                                   f"{self.sizes} to {sizes}")
        if any(t.dtype != self.dtype for t in mine):
            raise DistributedError("bucket: a tensor changed dtype")
        self.pg.engine().start(self, mine)

    def finish(self) -> None:
        self.pg.engine().finish(self)


# ---- cpu and metal: MPI from the device's queue ----------------------------------------------------

class _HostEngine:
    """Collectives as jobs on the device's in-order queue (cpu), or run at their place in the
    launch order after draining the queue (metal, whose launches commit at once)."""

    def __init__(self, pg: ProcessGroup):
        self.pg = pg
        self.dev = pg.device
        self.MPI = pg.MPI

    def _view(self, t: Tensor) -> np.ndarray:
        b = t.buffer
        if self.dev.name == "cpu":
            raw = b.handle[b.offset:b.offset + t.nbytes]
        else:  # metal: shared memory, whole buffers
            raw = np.frombuffer(b.handle, np.uint8)[b.offset:b.offset + t.nbytes]
        return raw.view(t.dtype)

    def _enqueue(self, fn: Any, ts: list[Tensor], writes: bool) -> None:
        dev = self.dev
        if dev.name == "cpu":
            flat: list[int] = []
            for t in ts:
                flat += [dev._addr(t.buffer) + t.buffer.offset, t.nbytes]
            # name None: the queue runs the job even where its inputs failed (a rank that
            # skipped a collective would leave the others waiting); the job checks them itself
            item = (fn, flat, None, (writes,) * len(ts))
            if dev._recording is not None:
                dev._recording.jobs.append(item)
            else:
                dev._put(item)
            return

        def job() -> None:
            dev._drain()
            fn()

        if dev._recording is not None:
            dev._recording.jobs.append(job)
        else:
            job()

    def _failure(self, ts: list[Tensor]) -> str | None:
        dev = self.dev
        if dev.name != "cpu" or not dev._poison:
            return None
        from .runtime.backend_cpu import _spans

        flat: list[int] = []
        for t in ts:
            flat += [dev._addr(t.buffer) + t.buffer.offset, t.nbytes]
        f = dev._tainted(_spans(flat, (False,) * len(ts)))
        return None if f is None else f.what

    def start(self, b: _Bucket, ts: list[Tensor]) -> None:
        n = b.numel
        if b.state is None:
            # one extra element: how many ranks' inputs had failed (see finish_job)
            # float16 travels as float32 (MPI has no half type; the sum is then rounded once)
            wire = np.float32 if b.dtype == np.float16 else b.dtype
            b.state = {"buf": np.zeros(n + 1, wire), "req": None, "why": None}
        st = b.state
        views = [self._view(t) for t in ts]
        offs = np.cumsum([0] + b.sizes).tolist()
        comm, MPI, pg = self.pg._qcomm, self.MPI, self.pg

        def start_job() -> None:
            buf = st["buf"]
            st["why"] = self._failure(ts)
            if b.op == "bcast":
                if pg.rank == b.src:
                    for v, o in zip(views, offs):
                        buf[o:o + v.size] = v.ravel()
                buf[n] = 1.0 if st["why"] else 0.0
                st["req"] = comm.Ibcast(buf, root=b.src)
            else:
                for v, o in zip(views, offs):
                    buf[o:o + v.size] = v.ravel()
                buf[n] = 1.0 if st["why"] else 0.0
                st["req"] = comm.Iallreduce(MPI.IN_PLACE, buf, op=MPI.SUM)

        def finish_job() -> None:
            req, st["req"] = st["req"], None
            if req is None:
                raise AsyncError("collective: finished before it was started")
            _wait(req, pg.timeout, b, pg)
            buf = st["buf"]
            bad = int(round(float(buf[n])))
            if bad or st["why"]:
                raise AsyncError(f"{_op_name(b)} on rank {pg.rank} of {pg.size}: "
                                 + (f"this rank's input failed ({st['why']})" if st["why"] else
                                    f"the inputs of {bad} other rank(s) failed"), None)
            if b.op == "mean":
                buf[:n] *= np.asarray(1.0 / pg.size, buf.dtype)
            if b.op != "bcast" or pg.rank != b.src:
                for v, o in zip(views, offs):
                    v.reshape(-1)[:] = buf[o:o + v.size]

        self._enqueue(start_job, ts, writes=False)
        b.state["finish"] = (finish_job, ts)

    def finish(self, b: _Bucket) -> None:
        fn, ts = b.state.pop("finish")
        self._enqueue(fn, ts, writes=True)

    def all_gather(self, src: Tensor, dst: Tensor) -> None:
        _host_gather(self, src, dst, f"all-gather of {src.size:,} values")

    def sum_in_place(self, t: Tensor) -> None:
        b = _Bucket(self.pg, [0], t.dtype, "sum")
        b.start([t])
        b.finish()


def _host_gather(eng: _HostEngine, src: Tensor, dst: Tensor, what: str) -> None:
    """dst = the ranks' src one after another (rank order), as one job on the queue."""
    pg = eng.pg
    n = src.size
    sv, dv = eng._view(src), eng._view(dst)
    send = np.zeros(n + 1, np.float32)
    recv = np.zeros((pg.size, n + 1), np.float32)

    def job() -> None:
        why = eng._failure([src])
        send[:n] = sv.ravel()
        send[n] = 1.0 if why else 0.0
        req = pg._qcomm.Iallgather(send, recv)
        _wait(req, pg.timeout, None, pg, what)
        bad = int(recv[:, n].sum())
        if bad or why:
            raise AsyncError(f"{what} on rank {pg.rank} of {pg.size}: " +
                             (f"this rank's input failed ({why})" if why else
                              f"the inputs of {bad} other rank(s) failed"), None)
        dv.reshape(pg.size, n)[:] = recv[:, :n]

    eng._enqueue(job, [src, dst], writes=True)


def _wait(req: Any, timeout: float | None, b: _Bucket | None, pg: ProcessGroup,
          what: str | None = None) -> None:
    if timeout is None:
        req.Wait()
        return
    deadline = time.monotonic() + timeout
    while not req.Test():
        if time.monotonic() > deadline:
            raise AsyncError(f"{what or _op_name(b)} on rank {pg.rank} of {pg.size}: not "
                             "complete after "
                             f"{timeout:g} s (a rank stopped, failed, or runs other steps)",
                             None)
        time.sleep(1e-4)


def _op_name(b: _Bucket) -> str:
    what = {"sum": "all-reduce (sum)", "mean": "all-reduce (mean)", "bcast": "broadcast"}[b.op]
    return f"{what} of {len(b.sizes)} tensors ({b.numel:,} {b.dtype} values)"


# ---- cuda: NCCL on a stream of its own ---------------------------------------------------------------

class _NcclEngine:
    """NCCL (CuPy's bindings; the unique id broadcast over MPI) on a communication stream: an
    event orders each collective after the work queued so far on the device's stream, another
    one orders the device's stream after it at finish()."""

    def __init__(self, pg: ProcessGroup):
        self.pg = pg
        self.dev = pg.device
        cp = self.cp = self.dev.cp
        try:
            from cupy.cuda import nccl
        except ImportError as e:
            raise ImportError(f"collectives on cuda need NCCL through CuPy ({e}); `pip install "
                              "nvidia-nccl-cu12` or `python -m cupyx.tools.install_library "
                              "--library nccl --cuda 12.x`") from None
        if not nccl.available:
            raise ImportError("CuPy was built without NCCL support: pip install nvidia-nccl-cu12")
        self.nccl = nccl
        uid = nccl.get_unique_id() if pg.rank == 0 else None
        uid = pg.comm.bcast(uid, root=0)
        cp.cuda.Device(self.dev.ordinal).use()
        self.comm = nccl.NcclCommunicator(pg.size, uid, pg.rank)
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.avg = getattr(nccl, "NCCL_AVG", None)
        self.types = {np.dtype(np.float32): nccl.NCCL_FLOAT32,
                      np.dtype(np.float16): nccl.NCCL_FLOAT16}

    def start(self, b: _Bucket, ts: list[Tensor]) -> None:
        cp, nccl, s = self.cp, self.nccl, self.stream
        n = b.numel
        if b.state is None:
            if b.dtype not in self.types:
                raise TypeError(f"collective: dtype {b.dtype} not supported on cuda")
            single = len(ts) == 1  # no staging copy: NCCL works in place
            b.state = {"buf": None if single else cp.cuda.alloc(max(n, 1) * b.dtype.itemsize),
                       "ready": cp.cuda.Event(block=False, disable_timing=True),
                       "done": cp.cuda.Event(block=False, disable_timing=True)}
        st = b.state
        item = b.dtype.itemsize
        ptrs = [self.dev.pointer(t.buffer) for t in ts]
        buf = st["buf"]
        base = int(buf.ptr) if buf is not None else ptrs[0]
        offs = np.cumsum([0] + b.sizes).tolist()
        st["ready"].record(self.dev.cp_stream)
        s.wait_event(st["ready"])
        d2d = cp.cuda.runtime.memcpyDeviceToDevice
        if buf is not None:
            for p, o, k in zip(ptrs, offs, b.sizes):
                if k:
                    cp.cuda.runtime.memcpyAsync(base + o * item, p, k * item, d2d, s.ptr)
        dt = self.types[b.dtype]
        if b.op == "bcast":
            self.comm.bcast(base, n, dt, b.src, s.ptr)
        else:
            red = self.avg if (b.op == "mean" and self.avg is not None) else nccl.NCCL_SUM
            self.comm.allReduce(base, base, n, dt, red, s.ptr)
            if b.op == "mean" and self.avg is None and self.pg.size > 1:
                # NCCL before 2.10 has no ncclAvg: sum, then scale on the same stream
                mem = cp.cuda.UnownedMemory(base, n * item, None)
                arr = cp.ndarray((n,), b.dtype, cp.cuda.MemoryPointer(mem, 0))
                with s:
                    arr *= b.dtype.type(1.0 / self.pg.size)
        if buf is not None:
            for p, o, k in zip(ptrs, offs, b.sizes):
                if k:
                    cp.cuda.runtime.memcpyAsync(p, base + o * item, k * item, d2d, s.ptr)
        st["done"].record(s)

    def finish(self, b: _Bucket) -> None:
        self.dev.cp_stream.wait_event(b.state["done"])

    def sum_in_place(self, t: Tensor) -> None:
        p = self.dev.pointer(t.buffer)
        self.comm.allReduce(p, p, t.size, self.types[np.dtype(t.dtype)], self.nccl.NCCL_SUM,
                            self.dev.stream)

    def all_gather(self, src: Tensor, dst: Tensor) -> None:
        # on the device's stream: the kernels right after read the result
        self.comm.allGather(self.dev.pointer(src.buffer), self.dev.pointer(dst.buffer), src.size,
                            self.nccl.NCCL_FLOAT32, self.dev.stream)


# ---- data parallel training graphs -----------------------------------------------------------------

class DataParallel:
    """Data-parallel training of `tg` over the ranks of `group` (default: init()).

    At construction, rank `src`'s parameters, buffers and optimizer state are copied to every
    rank (broadcast=False skips it). At every training step (encoded or replayed), the weight
    gradients are averaged over the ranks in buckets: the first of `first_bucket_mb` MiB, the
    others of `bucket_cap_mb`, filled in the order the backward produces them; each bucket's
    collective is queued as soon as its last gradient is, and the step's first update that
    reads it waits for it. Optimizers, grouped updates and captured steps see the averaged
    gradients. Batch norm statistics stay per rank (sync_buffers() averages the running ones),
    or with sync_bn=True are those of all ranks' samples together (SyncBatchNorm; equal
    per-rank batch sizes, checked at every step).
    To resume, load a checkpoint on every rank (tg.load), or on rank 0 and then call
    broadcast_state().
    """

    def __init__(self, tg: TrainingGraph, group: ProcessGroup | None = None, *,
                 bucket_cap_mb: float = 25.0, first_bucket_mb: float = 1.0,
                 broadcast: bool = True, src: int = 0, sync_bn: bool = False):
        if not getattr(tg, "training", False):
            raise ValueError("tg: expected a TrainingGraph (gradients to average)")
        if bucket_cap_mb <= 0 or first_bucket_mb <= 0:
            raise ValueError(f"bucket_cap_mb, first_bucket_mb: expected > 0, got "
                             f"{bucket_cap_mb}, {first_bucket_mb}")
        self.tg = tg
        self.group = group if group is not None else init()
        if tg.device is not self.group.device:
            raise ValueError(f"tg: runs on {tg.device.name}, the group's collectives on "
                             f"{self.group.device.name} (init(device=...))")
        self.cap = int(bucket_cap_mb * 2**20)
        self.first_cap = int(first_bucket_mb * 2**20)
        self._steps: list | None = None  # the g.steps the schedule was made for
        self.buckets: list[tuple[list[Value], _Bucket]] = []
        self.step_hook_calls = 0
        tg.step_hooks.append(self._hook)
        self.sync_bn = bool(sync_bn)
        self._bn_nodes: list = []
        if self.sync_bn:
            from .graph.nodes import BatchNormalizationNode

            sync = SyncBatchNorm(self.group)
            for n in tg.forward_order:
                base = getattr(n, "base", None)  # a fused node runs its batch norm's code
                for m in (n, base):
                    if isinstance(m, BatchNormalizationNode) and m.sync is None:
                        m.sync = sync
                        self._bn_nodes.append(m)
            tg.note(f"distributed: {len(self._bn_nodes)} batch norms with statistics over "
                    f"all {self.size} ranks")
        if broadcast:
            self.broadcast_state(src)

    def detach(self) -> None:
        """Stop averaging (the graph trains on this rank's gradients alone again)."""
        if self._hook in self.tg.step_hooks:
            self.tg.step_hooks.remove(self._hook)

    @property
    def rank(self) -> int:
        return self.group.rank

    @property
    def size(self) -> int:
        return self.group.size

    # ---- state
    def broadcast_state(self, src: int = 0) -> None:
        """Every rank gets rank src's parameters, buffers, optimizer state and step count."""
        pg, tg = self.group, self.tg
        sd = tg.state_dict()
        meta = [(k, v.shape, v.dtype.str) for k, v in sd.items()]
        theirs = pg.broadcast_object(meta, src)
        if theirs != meta:
            mine, other = {m[0]: m[1:] for m in meta}, {m[0]: m[1:] for m in theirs}
            diff = sorted(set(mine) ^ set(other)) or \
                [k for k in mine if mine[k] != other[k]]
            pg.barrier()
            raise DistributedError(f"broadcast_state: rank {pg.rank}'s graph differs from rank "
                                   f"{src}'s (first differing keys: {', '.join(diff[:4])})")
        out = {}
        for k, _, _ in meta:
            a = np.array(sd[k], copy=True, order="C")  # keeps 0-d arrays 0-d
            out[k] = pg.broadcast_host(a, src)
        if pg.rank != src:
            tg.load_state_dict(out)

    def sync_buffers(self) -> None:
        """Average the batch norms' running statistics over the ranks (before evaluating or
        saving: each rank tracked its own batches)."""
        sd = self.tg.state_dict()
        keys = sorted(k for k in sd if k.endswith((".running_mean", ".running_var")))
        if not keys:
            return
        flat = np.concatenate([sd[k].astype(np.float64).ravel() for k in keys])
        flat = self.group.all_reduce_host(flat, "mean")
        new, o = {}, 0
        for k in keys:
            n = sd[k].size
            new[k] = flat[o:o + n].reshape(sd[k].shape).astype(sd[k].dtype)
            o += n
        self.tg.load_state_dict(new, strict=False)

    def save(self, path: Any, sync_buffers: bool = True) -> None:
        """Rank 0 writes the checkpoint (Graph.save); every rank waits until it is written.
        Running statistics are averaged over the ranks first unless sync_buffers=False."""
        if sync_buffers:
            self.sync_buffers()
        err = None
        if self.rank == 0:
            try:
                self.tg.save(path)
            except Exception as e:  # noqa: BLE001 -- every rank learns that it failed
                err = f"{type(e).__name__}: {e}"
        err = self.group.broadcast_object(err, 0)
        if err is not None:
            raise DistributedError(f"save: rank 0 could not write {path}: {err}")

    def mean_loss(self, value: float) -> float:
        """The mean of a per-rank loss over the ranks (for logging)."""
        return self.group.mean(value)

    # ---- the gradient hook (Graph.step_hooks)
    def _schedule(self, g: Graph) -> None:
        """Weight gradients (the update steps' inputs), the step producing each, and the
        first step reading each."""
        prod: dict[Any, int] = {}
        for i, st in enumerate(g.steps):
            for v in st.outs:
                prod[v] = i
        first_use: dict[Any, int] = {}
        for j, st in enumerate(g.steps):
            if st.kind == "update":
                for v in st.ins:
                    first_use.setdefault(v, j)
        missing = [v for v in first_use if v not in prod]
        if missing:
            raise DistributedError(f"gradients without a producing step: {missing[:3]}")
        self._grads = sorted(first_use, key=lambda v: prod[v])
        self._prod, self._use = prod, first_use
        self._by_step: dict[int, list[Any]] = {}
        for v in self._grads:
            self._by_step.setdefault(prod[v], []).append(v)
        self._last = max(prod[v] for v in self._grads) if self._grads else -1
        self.buckets = []
        self._open: list[Any] = []
        self._starts: dict[int, list[tuple[list[Any], _Bucket]]] = {}
        self._finishes: dict[int, list[_Bucket]] = {}
        self._frozen = False
        self._steps = g.steps
        g.note(f"distributed: {len(self._grads)} weight gradients averaged over {self.size} "
               f"ranks in buckets (first {self.first_cap / 2**20:g} MiB, then "
               f"{self.cap / 2**20:g} MiB)")

    def _hook(self, g: Graph, i: int, env: dict) -> None:
        if g.steps is not self._steps:
            self._schedule(g)
        if i == 0 and self.sync_bn and self._bn_nodes:
            n = g._batch_of(env)
            ns = self.group.comm.allgather(n)
            if len(set(ns)) > 1:
                raise DistributedError(f"sync_bn: ranks' batch sizes differ ({ns}); "
                                       "synchronized batch norm needs equal per-rank batches")
        self.step_hook_calls += i == 0
        if not self._frozen:
            self._grow(g, i, env)
        for vals, b in self._starts.get(i, ()):
            b.start([env[v] for v in vals])
        for b in self._finishes.get(i, ()):
            b.finish()
        if i == len(g.steps) - 1:
            self._frozen = True

    def _grow(self, g: Graph, i: int, env: dict) -> None:
        """First step: buckets fill in the order gradients appear; sizes come from the tensors
        (the same on every rank, so every rank makes the same buckets). A bucket closes at its
        size cap, after the last gradient, or when the next step reads one of its gradients
        (updates not grouped: each follows its gradient, so no later gradient can wait)."""
        for v in self._by_step.get(i, ()):
            t = env.get(v)
            if not isinstance(t, Tensor):
                raise DistributedError(f"weight gradient {v.name}: no tensor at step {i}")
            self._open.append((v, t))
            cap = self.first_cap if not self.buckets else self.cap
            if sum(tt.nbytes for _, tt in self._open) >= cap:
                self._close(i)
        if self._open and (i == self._last or
                           min(self._use[v] for v, _ in self._open) - 1 <= i):
            self._close(i)

    def _close(self, i: int) -> None:
        vals = [v for v, _ in self._open]
        ts = [t for _, t in self._open]
        self._open = []
        for b in _Bucket.split(self.group, ts, "mean", math.inf):
            bv = [vals[k] for k in b.idx]
            b.idx = list(range(len(bv)))
            self.buckets.append((bv, b))
            self._starts.setdefault(i, []).append((bv, b))
            j = min(self._use[v] for v in bv) - 1
            if j < i:
                raise DistributedError(f"bucket read at step {j + 1} before its last gradient "
                                       f"(step {i})")
            self._finishes.setdefault(j, []).append(b)


# ---- synchronized batch norm -------------------------------------------------------------------------

class SyncBatchNorm:
    """Batch statistics over every rank's samples (PyTorch's SyncBatchNorm), for the batch norm
    nodes of a graph trained by DataParallel(sync_bn=True). Ranks need equal batch sizes.

    Forward: each rank's per-chunk Welford partials (norm.metal's norm_part kernels) are
    gathered from every rank (all-gather, the device's stream), laid out as more chunks of the
    same channels, and merged by the same finalize kernel: mean and variance of the union, the
    running estimates moved by them (the same on every rank). Backward: the per-chunk sums
    (sum dy, sum dy (x - mean)) are summed over the ranks, and dx's coefficients use M = the
    global count: rank r computes S times its share of the global-batch gradient, as its weight
    gradients' average over the S ranks then expects; the batch norm's own weight and bias
    gradients come from the local sums (averaged like every other weight gradient)."""

    def __init__(self, group: ProcessGroup):
        self.group = group

    def forward(self, node: Any, rc: Any, xs: list, with_state: bool, activation: Any) -> list:
        from .graph.nodes.base import _act
        from .ops import norm as N
        from .ops.copy import _block
        from .params import NormParams
        from .tensor import float32

        ws = node.weights
        rm, rv, w, b = node._wb(rc)
        kw = _act(activation)
        kw.update(rc.take_out())
        dev, x, rm, rv, w, b, _, momentum, eps = N._bn_validate(
            xs[0], rm, rv, w, b, True, ws.momentum, ws.eps)
        out = kw.get("out")
        y, ns = N.strided_out(out, kw.get("out_batch_stride"), x.shape, x.dtype, dev)
        p = N._bn_params(x, eps, momentum, True, w is not None, b is not None, rm is not None)
        p.act, p.act_alpha = N.activation_code(kw.get("activation"))
        p.out_nstride = ns
        size = self.group.size
        part = N._partials(dev, p, x, None, None)
        count = part.shape[0]
        gathered = N.empty((size * count, 4), float32, dev)
        self.group.engine().all_gather(part, gathered)
        q = NormParams.from_buffer_copy(p)
        if p.cols:  # chunk-major: the ranks' partials are more chunks as they lie
            q.col_chunks = p.col_chunks * size
            q.parts = q.col_chunks * p.HW
            allp = gathered
        else:  # channel-major: each channel's chunks from every rank side by side
            allp = N.empty((size * count, 4), float32, dev)
            k4 = p.chunks * 4
            for r in range(size):
                _block(gathered, allp, p.rows, k4, k4, size * k4, r * count * 4, r * k4)
            q.chunks = p.chunks * size
            q.parts = q.chunks
        c = x.shape[1]
        d = N.dummy(dev)
        mean, invstd = N.empty((c,), float32, dev), N.empty((c,), float32, dev)
        coef = N.empty((c, 4), float32, dev)
        N.kernel(dev, N.SOURCE, "batch_norm_finalize_fwd_float")(
            min(c, N.MAX_GROUPS) * N.TG, allp.buffer, rm.buffer if rm is not None else d,
            rv.buffer if rv is not None else d, mean.buffer, invstd.buffer, q,
            w.buffer if w is not None else d, b.buffer if b is not None else d, coef.buffer)
        yt = N._apply(dev, p, x, None, coef, y if out is not None else None)
        if rm is not None:
            ws.mark_dirty()
            ws.num_batches_tracked += 1
        rc.release(ws)
        return [yt, mean, invstd] if with_state else [yt]

    def backward(self, node: Any, rc: Any, gouts: list, saved: list, need: Any,
                 activation: Any) -> tuple:
        from .graph.nodes.base import _act
        from .ops import norm as N
        from .params import NormParams
        from .tensor import float32

        x, mean, invstd = saved
        ws = node.weights
        rm, rv, w, b = node._wb(rc)
        kw = _act(activation)
        ns = rc.state.pop(("grad_nstride", node), None)
        dev, x, rm, rv, w, b, _, momentum, eps = N._bn_validate(
            x, rm, rv, w, b, True, ws.momentum, ws.eps)
        g = N._grad_out(gouts[0], x, dev)
        p = N._bn_params(x, eps, momentum, True, w is not None, b is not None, False)
        p.act, p.act_alpha = N.activation_code(kw.get("activation"))
        p.dy_nstride = N._grad_stride(g, ns)
        part = N._partials(dev, p, x, g, mean, (invstd, w, b))
        c = x.shape[1]
        d = N.dummy(dev)
        dw = N.empty((c,), float32, dev) if w is not None else None
        db = N.empty((c,), float32, dev) if b is not None else None
        ncoef = 2 * c if p.act else c
        grad = N.kernel(dev, N.SOURCE, "batch_norm_grad_bwd_float")
        groups = min(c, N.MAX_GROUPS) * N.TG
        wb = (w.buffer if w is not None else d, b.buffer if b is not None else d)
        # this rank's sums: its weight and bias gradients
        grad(groups, part.buffer, *wb, mean.buffer, invstd.buffer,
             dw.buffer if dw is not None else d, db.buffer if db is not None else d,
             N.empty((ncoef, 4), float32, dev).buffer, p)
        # every rank's sums, M = the global count: dx's coefficients
        self.group.engine().sum_in_place(part)
        q = NormParams.from_buffer_copy(p)
        q.row_len = p.row_len * self.group.size
        coef = N.empty((ncoef, 4), float32, dev)
        scratch = N.empty((c,), float32, dev)
        grad(groups, part.buffer, *wb, mean.buffer, invstd.buffer, scratch.buffer, scratch.buffer,
             coef.buffer, q)
        gx = N._apply(dev, p, g, x, coef)
        return [gx], ([dw, db] if ws.affine else [])


# ---- data ----------------------------------------------------------------------------------------

class DistributedSampler:
    """The indices of this rank's share of a data set of `n` samples (torch's
    DistributedSampler): each epoch a permutation (seed + epoch; the same on every rank) whose
    positions rank, rank + size, ... are this rank's. drop_last: drop the tail that does not
    divide evenly; else pad with the first indices so every rank has as many.

    With per-rank batches of b taken in order from the rank's indices, step k of the ranks
    together sees the samples of step k of one process with batch size*b over the permutation.
    """

    def __init__(self, n: int, num_replicas: int | None = None, rank: int | None = None,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False):
        self.n = int(n)
        self.num_replicas = get_world_size() if num_replicas is None else int(num_replicas)
        self.rank = get_rank() if rank is None else int(rank)
        if self.num_replicas < 1 or not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank: {self.rank} outside [0, {self.num_replicas})")
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch = 0
        if drop_last:
            self.num_samples = self.n // self.num_replicas
        else:
            self.num_samples = -(-self.n // self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def indices(self) -> np.ndarray:
        if self.shuffle:
            idx = np.random.default_rng(self.seed + self.epoch).permutation(self.n)
        else:
            idx = np.arange(self.n)
        if self.drop_last:
            idx = idx[:self.total_size]
        elif self.total_size > self.n:
            idx = np.concatenate([idx, np.resize(idx, self.total_size - self.n)])
        return idx[self.rank:self.total_size:self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return self.num_samples


def wait_all(group: ProcessGroup, timeout: float, what: str = "barrier") -> None:
    """A barrier that gives up after `timeout` seconds with DistributedError (a rank that never
    arrives), instead of waiting forever."""
    req = group.comm.Ibarrier()
    t0 = time.monotonic()
    while not req.Test():
        if time.monotonic() - t0 > timeout:
            raise DistributedError(f"{what}: not every rank arrived within {timeout} s")
        time.sleep(0.001)
