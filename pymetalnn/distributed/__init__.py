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

Layout (modules of this package; every public name is re-exported here, so the import path stays
`pymetalnn.distributed`): `group` holds the process group, init() and the abort hooks; `engines`
the buckets and the engines that run their collectives (MPI from the device's queue on cpu and
metal, NCCL on a stream of its own on cuda); `parallel` DataParallel (the gradient hook) and
DistributedSampler; `sync_bn` the synchronized batch norm.
"""
from __future__ import annotations

# the internals are re-exported too (tests and benchmarks reach some of them)
from .engines import _Bucket as _Bucket
from .engines import _check as _check
from .engines import _host_gather as _host_gather
from .engines import _HostEngine as _HostEngine
from .engines import _NcclEngine as _NcclEngine
from .engines import _op_name as _op_name
from .engines import _wait as _wait
from .group import INSTALL_HINT as INSTALL_HINT
from .group import (
    DistributedError,
    ProcessGroup,
    get_rank,
    get_world_size,
    init,
    is_initialized,
    process_group,
)
from .group import _install_abort_hooks as _install_abort_hooks
from .group import _mpi as _mpi
from .group import _pick_device as _pick_device
from .group import wait_all as wait_all
from .parallel import DataParallel, DistributedSampler
from .sync_bn import SyncBatchNorm

__all__ = ["DataParallel", "DistributedError", "DistributedSampler", "ProcessGroup", "SyncBatchNorm",
           "get_rank", "get_world_size", "init", "is_initialized", "process_group"]
