"""All-reduce of gradient buckets (pymetalnn.distributed) against torch.distributed's all_reduce
of the same sizes in the same run: NCCL on cuda (ours: CuPy's NCCL bindings on our own
communication stream; torch: its NCCL process group), MPI vs gloo on cpu.

For each size two forms of ours: a bucket of 16 gradient-like tensors (gathered into the bucket
buffer, reduced, scattered back: what DataParallel runs) and one flat tensor (reduced in place);
torch reduces one tensor of that size. Times are device time between events on the device's
stream (cuda) or host time after a barrier (cpu), median of the repetitions; algbw = bytes /
time, busbw = algbw * 2 (n - 1) / n (NCCL's convention; 0 on one rank, where the collective is
a copy at most: the one-rank run only checks that the path works). ratio = torch time / our
time (target >= 0.9 on two or more GPUs).

    NCCL_NVLS_ENABLE=0 mpiexec -n 2 python benchmarks/bench_distributed.py --backend cuda
    mpiexec -n 2 python benchmarks/bench_distributed.py --backend cpu --quick
    python benchmarks/bench_distributed.py --backend cuda    # one rank: the NCCL path works
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off (also set it in the launch)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import pymetalnn  # noqa: E402

SIZES_MIB = [1, 4, 25, 64, 256]  # 1 MiB: DataParallel's first bucket; 25: its default cap
QUICK_MIB = [0.25, 1, 4]
PIECES = 16


def _sizes(args) -> list[float]:
    if args.sizes:
        return [float(s) for s in args.sizes.split(",")]
    return QUICK_MIB if args.quick else SIZES_MIB


def time_ours(pg, dev, tensors, reps: int, warmup: int) -> float:
    """Median seconds of one all-reduce (sum) of `tensors` (one bucket)."""
    from pymetalnn.distributed import _Bucket

    bucket = _Bucket.split(pg, tensors, "sum", float("inf"))
    assert len(bucket) == 1
    b = bucket[0]

    def once():
        b.start(tensors)
        b.finish()

    return _timed(pg, dev, once, reps, warmup)


def _timed(pg, dev, fn, reps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    dev.synchronize()
    samples = []
    if dev.name == "cuda":
        cp = dev.cp
        for _ in range(reps):
            pg.barrier()
            s, e = cp.cuda.Event(), cp.cuda.Event()
            s.record(dev.cp_stream)
            fn()
            e.record(dev.cp_stream)
            e.synchronize()
            samples.append(cp.cuda.get_elapsed_time(s, e) / 1e3)
    else:
        for _ in range(reps):
            pg.barrier()
            t0 = time.perf_counter()
            fn()
            dev.synchronize()
            samples.append(time.perf_counter() - t0)
    # every rank's median; the slowest counts (a collective ends when its last rank does)
    med = float(np.median(samples))
    return float(pg.all_reduce_host(np.array([med]), "max")[0])


def torch_peer(pg, dev):
    """torch.distributed on the same ranks (tcp rendezvous on rank 0's host, port from MPI), or
    None with the reason printed."""
    try:
        import torch
        import torch.distributed as tdist
    except ImportError:
        print("torch: not importable -- no peer")
        return None
    backend = "nccl" if dev.name == "cuda" else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        print("torch: no CUDA -- no peer")
        return None
    if backend == "nccl":
        torch.cuda.set_device(dev.ordinal)
    port = None
    if pg.rank == 0:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    port = pg.broadcast_object(port, 0)
    host = pg.broadcast_object(os.uname().nodename if pg.rank == 0 else None, 0)
    if host != os.uname().nodename:
        print("torch: ranks on several hosts -- rendezvous not set up here, no peer")
        return None
    tdist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=pg.rank,
                             world_size=pg.size)
    return torch, tdist


def time_torch(pg, dev, torch, tdist, n: int, reps: int, warmup: int) -> float:
    if dev.name == "cuda":
        t = torch.ones(n, dtype=torch.float32, device=f"cuda:{dev.ordinal}")
        stream = torch.cuda.current_stream()
        for _ in range(warmup):
            tdist.all_reduce(t)
        torch.cuda.synchronize()
        samples = []
        for _ in range(reps):
            pg.barrier()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record(stream)
            tdist.all_reduce(t)
            e.record(stream)
            e.synchronize()
            samples.append(s.elapsed_time(e) / 1e3)
    else:
        t = torch.ones(n, dtype=torch.float32)
        for _ in range(warmup):
            tdist.all_reduce(t)
        samples = []
        for _ in range(reps):
            pg.barrier()
            t0 = time.perf_counter()
            tdist.all_reduce(t)
            samples.append(time.perf_counter() - t0)
    med = float(np.median(samples))
    return float(pg.all_reduce_host(np.array([med]), "max")[0])


def main() -> None:
    ap = common.parser(__doc__, quick_help="sizes 0.25, 1, 4 MiB, fewer repetitions")
    ap.add_argument("--sizes", default=None, help="comma-separated MiB (default "
                    f"{','.join(map(str, SIZES_MIB))})")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args()
    try:
        from pymetalnn import distributed
    except ImportError as e:
        print(f"bench_distributed: {e}")
        return
    try:
        pg = distributed.init(backend=args.backend)
    except ImportError as e:  # mpi4py (or NCCL) missing: nothing to measure
        print(f"bench_distributed: skipped ({e})")
        return
    dev = pg.device
    reps = args.reps or (5 if args.quick else 20)
    warmup = 2 if args.quick else 5
    say = print if pg.rank == 0 else (lambda *a, **k: None)
    say(f"all-reduce on {pg.size} rank(s), {common.device_label(dev)}; NCCL_NVLS_ENABLE="
        f"{os.environ.get('NCCL_NVLS_ENABLE')}")
    peer = None if args.no_torch else torch_peer(pg, dev)
    factor = 2 * (pg.size - 1) / pg.size
    rows = []
    for mib in _sizes(args):
        n = max(int(mib * 2**20) // 4, PIECES)
        nbytes = n * 4
        rng = np.random.default_rng(pg.rank)
        flat = pymetalnn.tensor(rng.standard_normal(n).astype(np.float32), dev)
        cuts = np.linspace(0, n, PIECES + 1).astype(int)
        pieces = [pymetalnn.tensor(rng.standard_normal(b - a).astype(np.float32), dev)
                  for a, b in zip(cuts[:-1], cuts[1:])]
        t_bucket = time_ours(pg, dev, pieces, reps, warmup)
        t_flat = time_ours(pg, dev, [flat], reps, warmup)
        t_torch = time_torch(pg, dev, *peer, n, reps, warmup) if peer is not None else None
        for form, t in ((f"bucket of {PIECES} tensors", t_bucket), ("one tensor", t_flat)):
            algbw = nbytes / t / 1e9
            rows.append({"op": "all_reduce", "variant": form, "shape": f"{mib:g} MiB",
                         "ranks": pg.size, "backend": dev.name, "seconds": t,
                         "algbw_GBs": algbw, "GB/s": algbw * factor,
                         "peer_seconds": t_torch,
                         "peer_busbw_GBs": (nbytes / t_torch / 1e9 * factor) if t_torch else None,
                         "ratio": (t_torch / t) if t_torch else None})
    # correctness on the way: a sum of ranks' values
    x = pymetalnn.tensor(np.full(7, pg.rank + 1, np.float32), dev)
    pg.all_reduce(x, "sum")
    want = pg.size * (pg.size + 1) / 2
    got = x.numpy()
    if not np.allclose(got, want):
        raise SystemExit(f"all_reduce check failed on rank {pg.rank}: {got} != {want}")
    if pg.rank == 0:
        common.report(rows, ["variant", "shape", "ranks", "seconds", "algbw_GBs", "GB/s",
                             "peer_seconds", "peer_busbw_GBs", "ratio"], "distributed",
                      f"all-reduce bus bandwidth, ours vs torch.distributed "
                      f"({'nccl' if dev.name == 'cuda' else 'MPI vs gloo'}), {pg.size} rank(s)")
    if peer is not None:
        peer[1].destroy_process_group()


if __name__ == "__main__":
    main()
