"""Buckets and the engines that run their collectives on device buffers.

Design. A bucket is tensors of one dtype reduced (or broadcast) by one collective through a flat
buffer, made at its first start and kept, so a captured step replays the same buffers. start()
queues the collective after the device's work so far; finish() orders the device's later work
after it; neither blocks the encoding thread. On cpu and metal (_HostEngine) both are jobs on the
device's in-order queue: the first copies the tensors into a host buffer and starts an
MPI_Iallreduce (or Ibcast), the second waits (up to the group's timeout) and writes the result
back; one extra element counts the ranks whose inputs had failed, so every rank raises and none
waits. On cuda (_NcclEngine) NCCL runs on a communication stream of its own, ordered after the
compute stream by one event and before its later work by another.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..runtime import Device
from ..runtime.errors import AsyncError
from ..tensor import Tensor
from .group import DistributedError, ProcessGroup


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
        from ..runtime.backend_cpu import _spans

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
