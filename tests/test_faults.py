"""Fault injection: every fault ends in a clear error or a correct result -- no crash, no hang,
no silently wrong result -- and the library stays usable afterwards.

Categories: bad input (kernel arguments, sizes past the kernels' 32-bit index width, found with
intercepted allocations rather than huge memory), kernel faults under validation mode, async
errors (failed launches and callbacks), threads and fork, files (datasets, checkpoints,
compile errors) and training faults. Most cases run on the cpu backend, where
faults can be injected into the queue and validation mode exists; the async-error cases also
run on cuda. The kernel cache's faults: test_kernel_cache.py.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from fault_helpers import ZERO, write_kernel

import pymetalnn
from pymetalnn import AsyncError, DispatchError, ValidationError
from pymetalnn import functional as F
from pymetalnn.runtime import Buffer
from pymetalnn.tensor import Tensor

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 60  # seconds: a case that takes longer than this counts as a hang


@pytest.fixture
def cpu():
    reason = pymetalnn.availability().get("cpu")
    if reason:
        pytest.skip(f"backend cpu unavailable: {reason}")
    return pymetalnn.device("cpu")


# ---- injected launch failures ------------------------------------------------------------------

class FailingRuntime:
    """The cpu runtime with every launch failing as a real launch error would."""

    def __init__(self, rt):
        self._rt = rt

    def __getattr__(self, name):
        return getattr(self._rt, name)

    def pmn_cpu_launch(self, *args):
        args[-2].value = b"injected fault"
        return 1


@pytest.fixture
def failing(cpu):
    """A context manager: the launches made inside it fail (a launch takes the runtime it
    runs on when it is queued, so the fault hits exactly those launches)."""
    import contextlib

    @contextlib.contextmanager
    def inject():
        rt = cpu.rt
        cpu.rt = FailingRuntime(rt)
        try:
            yield
        finally:
            cpu.rt = rt

    yield inject
    cpu.rt = getattr(cpu.rt, "_rt", cpu.rt)


def t32(dev, a):
    return pymetalnn.tensor(np.asarray(a, np.float32), dev)


# ---- async errors -------------------------------------------------------------------------------

def test_failed_launch_surfaces_at_dependent_reads_only(cpu, failing):
    a, b = t32(cpu, np.arange(10)), t32(cpu, np.full(10, 2.0))
    with failing():
        c = F.add(a, b)          # fails
    d = F.add(a, a)          # independent
    e = F.mul(c, b)          # depends on the failed launch
    f = F.relu(e)            # depends on it through e
    np.testing.assert_array_equal(d.numpy(), 2 * np.arange(10, dtype=np.float32))
    for t in (c, e, f, c):   # every read of a dependent result raises, not only the first
        with pytest.raises(AsyncError, match=r"kernel 'add_fwd\w*' failed: injected fault") as ei:
            t.numpy()
        assert ei.value.kernel.startswith("add_fwd")
    cpu.synchronize()        # already raised where it was read: not raised again
    # the queue keeps serving: new work is correct
    np.testing.assert_array_equal(F.add(a, b).numpy(), np.arange(10, dtype=np.float32) + 2)


def test_unread_failure_raises_at_synchronize_once(cpu, failing):
    a = t32(cpu, np.ones(8))
    with failing():
        F.add(a, a)
    with pytest.raises(AsyncError, match="injected fault"):
        cpu.synchronize()
    cpu.synchronize()


def test_host_write_clears_a_failed_buffer(cpu, failing):
    a = t32(cpu, np.ones(8))
    with failing():
        c = F.add(a, a)
    with pytest.raises(AsyncError):
        c.numpy()
    c.buffer.write(np.full(8, 5.0, np.float32))
    np.testing.assert_array_equal(c.numpy(), np.full(8, 5.0, np.float32))


def test_callbacks_always_run_and_get_the_error(cpu, failing):
    a = t32(cpu, np.ones(8))
    with failing():
        F.add(a, a)
    got: list = []
    done = threading.Event()
    cpu.signal(lambda err: (got.append(err), done.set()), with_error=True)
    assert done.wait(TIMEOUT), "callback did not run after a failed launch"
    assert isinstance(got[0], AsyncError) and "injected fault" in str(got[0])
    cpu.synchronize()  # handed to the callback: not raised again
    cpu.signal(lambda err: got.append(err), with_error=True)
    cpu.synchronize()
    assert got[1] is None  # a later signal sees no failure


def test_failing_callback_surfaces_at_synchronize_and_queue_continues(dev):
    ran = threading.Event()

    def bad():
        raise KeyError("boom")

    dev.signal(bad)
    dev.signal(ran.set)
    with pytest.raises(AsyncError, match="callback failed: KeyError") as ei:
        dev.synchronize()
    assert isinstance(ei.value.__cause__, KeyError)
    assert ran.is_set()
    a = t32(dev, np.ones(4))
    np.testing.assert_array_equal(F.add(a, a).numpy(), np.full(4, 2.0, np.float32))


def test_synchronize_inside_a_callback_is_refused_not_a_deadlock(cpu):
    errs: list = []

    def cb():
        try:
            cpu.synchronize()
        except RuntimeError as e:
            errs.append(e)

    cpu.signal(cb)
    cpu.synchronize()
    assert errs and "would wait for itself" in str(errs[0])


def test_failed_replay_surfaces_and_other_work_continues(cpu, failing):
    a = t32(cpu, np.arange(6))
    with failing(), cpu.capture() as bad:
        bad_out = F.add(a, a)
    with cpu.capture() as good:
        good_out = F.mul(a, a)
    for _ in range(2):
        bad.replay()
        good.replay()
        with pytest.raises(AsyncError, match="injected fault"):
            bad_out.numpy()
        np.testing.assert_array_equal(good_out.numpy(), np.arange(6, dtype=np.float32) ** 2)
    cpu.synchronize()


def small_graph(dev):
    from pymetalnn import graph as G
    from pymetalnn import optim

    x = G.ImageNode((1, 4, 4), name="x")
    h = G.FlattenNode(x, name="flat")
    ds = G.FullyConnectedDataSource(16, 3, seed=1, init="glorot")
    logits = G.FullyConnectedNode(h, ds, name="fc")
    loss = G.SoftmaxCrossEntropyLossNode(logits, name="loss")
    tg = G.TrainingGraph(loss, optimizer=lambda p: optim.SGD(p, lr=0.1), device=dev)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((4, 1, 4, 4)).astype(np.float32)
    Y = rng.integers(0, 3, 4)
    return tg, ds, X, Y


def test_graph_step_with_a_failed_launch_raises_at_wait_never_hangs(cpu, failing):
    tg, _, X, Y = small_graph(cpu)
    tg.encode(X, Y).wait()
    good = tg.state_dict()
    with failing():
        h = tg.encode(X, Y)
    with pytest.raises(AsyncError, match="injected fault"):
        h.wait(timeout=TIMEOUT)
    assert h.done
    with pytest.raises(AsyncError):
        _ = h.loss
    # the weights may hold results of the failed work: no further step until they are reloaded
    with pytest.raises(AsyncError, match=r"step 1 of this training graph failed .*injected fault"):
        tg.encode(X, Y)
    tg.load_state_dict(good)
    h = tg.encode(X, Y).wait(timeout=TIMEOUT)
    assert np.isfinite(h.loss)


def test_inference_graph_recovers_after_a_failed_step(cpu, failing):
    tg, X, _ = two_fc(cpu)
    inf = tg.inference_graph()
    want = [inf(X) for _ in range(3)][-1]  # planned by now: per-step values live in an arena
    with failing():
        h = inf.encode(X)
    with pytest.raises(AsyncError, match="injected fault"):
        h.wait(timeout=TIMEOUT)
    np.testing.assert_array_equal(inf(X), want)  # the arena's failure marks do not carry over
    cap = inf.capture(X)
    np.testing.assert_array_equal(cap.run(X).numpy()[0], want)


# ---- threads and fork ----------------------------------------------------------------------------

def _child_add(q):
    dev = pymetalnn.device("cpu")
    a = pymetalnn.tensor(np.arange(100, dtype=np.float32), dev)
    q.put(float(F.add(a, a).numpy().sum()))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_fork_after_first_op_child_has_working_queue(cpu):
    a = t32(cpu, np.ones(4))
    F.add(a, a).numpy()  # the queue thread and the runtime's pool are running
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child_add, args=(q,))
    p.start()
    try:
        assert q.get(timeout=TIMEOUT) == float(2 * np.arange(100).sum())
    finally:
        p.join(TIMEOUT)
        if p.is_alive():
            p.kill()
    assert p.exitcode == 0


def test_ops_from_several_threads(cpu):
    errs: list = []

    def work(k):
        try:
            x = np.arange(50, dtype=np.float32) + k
            for _ in range(5):
                np.testing.assert_array_equal(F.add(t32(cpu, x), t32(cpu, x)).numpy(), 2 * x)
        except BaseException as e:  # noqa: BLE001
            errs.append(e)

    ts = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(TIMEOUT)
    assert not errs and not any(t.is_alive() for t in ts)


# ---- bad input: kernel arguments ---------------------------------------------------------------

@pytest.mark.parametrize("n, err", [
    (3.9, TypeError), (3.0, TypeError), (np.float32(3), TypeError), (True, TypeError),
    (-1, ValueError), (2**32, ValueError), ("3", TypeError), (None, TypeError),
])
def test_integral_argument_takes_only_integers_in_range(dev, tmp_path, n, err):
    k = dev.library(write_kernel(tmp_path, "fill", ZERO)[0]).kernel("fill")
    x = dev.buffer(np.zeros(8, np.float32))
    with pytest.raises(err) as ei:
        k(8, x, n, 1.0)
    assert isinstance(ei.value, DispatchError) and "'n'" in str(ei.value)
    np.testing.assert_array_equal(x.numpy(np.float32), np.zeros(8, np.float32))


@pytest.mark.parametrize("n", [3, np.uint32(3), np.int64(3), np.array(3)])
def test_integral_argument_accepts_integers(dev, tmp_path, n):
    k = dev.library(write_kernel(tmp_path, "fill", ZERO)[0]).kernel("fill")
    x = dev.buffer(np.zeros(8, np.float32))
    k(8, x, n, np.float64(2.5))
    np.testing.assert_array_equal(x.numpy(np.float32), [2.5] * 3 + [0] * 5)


def test_op_integer_parameters_that_would_wrap_are_refused(dev):
    x = pymetalnn.tensor(np.zeros((1, 1, 4, 4), np.float32), dev)
    logits = pymetalnn.tensor(np.zeros((2, 3), np.float32), dev)
    labels = pymetalnn.tensor(np.array([0, 1], np.int32), dev)
    cases = {
        "ignore_index": (lambda: F.cross_entropy(logits, labels, ignore_index=2**32), "ignore_index"),
        "kernel_size": (lambda: F.max_pool2d(x, 2**32 + 2), "kernel_size"),
        "stride": (lambda: F.avg_pool2d(x, 2, stride=(1, 2**32 + 1)), "stride"),
        "padding": (lambda: F.conv2d(x, x, padding=2**32), "padding|32-bit"),
    }
    for label, (call, match) in cases.items():
        with pytest.raises(ValueError, match=match):
            call()
            pytest.fail(f"accepted: {label}")


# ---- bad input: sizes past the kernels' 32-bit index width -------------------------------------

BIG = 2**31  # bytes: no allocation in these tests may come near this


def fake(dev, shape, dtype=np.float32):
    """A tensor that claims `shape` but owns 64 bytes: any kernel touching it would fault, so
    the op must refuse it before dispatch."""
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    handle = dev._alloc(64, True) if dev.name != "cpu" else np.zeros(64, np.uint8)
    return Tensor(Buffer(dev, n, handle), shape, dtype)


def _huge_cases(dev):
    t = lambda *s: pymetalnn.tensor(np.ones(s, np.float32), dev)  # noqa: E731
    return {
        "add broadcast": lambda: F.add(t(60000, 1), t(1, 60000)),
        "mul broadcast": lambda: F.mul(t(1, 60000), t(60000, 1)),
        "mul_backward": lambda: F.mul_backward(fake(dev, (60000, 60000)), t(60000, 1),
                                               t(1, 60000)),
        "conv2d padded": lambda: F.conv2d(t(1, 1, 1, 1), t(65536, 1, 1, 1), padding=256),
        "concat": lambda: F.cat([fake(dev, (2**31,)), fake(dev, (2**31,))]),
        "relu input": lambda: F.relu(fake(dev, (2**32 + 8,))),
        "matmul output": lambda: F.linear(t(70000, 1), t(70000, 1)),
        "softmax input": lambda: F.softmax(fake(dev, (2**16, 2**16 + 1)), dim=-1),
    }


def test_sizes_past_index_width_refused_before_allocation(dev):
    allocations: list[int] = []

    def hook(nbytes, zero, alloc):
        allocations.append(nbytes)
        if nbytes >= BIG:
            raise AssertionError(f"allocation of {nbytes} bytes reached the device")
        return alloc()

    for name, call in _huge_cases(dev).items():
        before = sum(dev.dispatch_counts.values())
        with dev.allocation_hook(hook):
            with pytest.raises(ValueError, match="32-bit") as ei:
                call()
        assert "elements" in str(ei.value), name
        assert sum(dev.dispatch_counts.values()) == before, f"{name}: dispatched"
    assert max(allocations, default=0) < BIG
    dev.synchronize()


# ---- kernel faults under validation mode ---------------------------------------------------------

@pytest.fixture(scope="module")
def vdev():
    if pymetalnn.availability().get("cpu"):
        pytest.skip("cpu backend unavailable")
    from pymetalnn.runtime.backend_cpu import CpuDevice

    old = os.environ.get("PYMETALNN_VALIDATE")
    os.environ["PYMETALNN_VALIDATE"] = "1"
    try:
        d = CpuDevice()
    finally:
        if old is None:
            del os.environ["PYMETALNN_VALIDATE"]
        else:
            os.environ["PYMETALNN_VALIDATE"] = old
    assert d.validate
    return d


OOB = """
kernel void oob_write(device const float* x [[buffer(0)]], device float* y [[buffer(1)]],
                      constant uint& n [[buffer(2)]], uint i [[thread_position_in_grid]]) {
    if (i < n) y[i] = x[i] * 2.0f;  // <- writes y[n-1], past y when n > len(y)
}
kernel void oob_read(device const float* x [[buffer(0)]], device float* y [[buffer(1)]],
                     constant int& off [[buffer(2)]], uint i [[thread_position_in_grid]]) {
    if (i < 4) y[i] = x[int(i) + off];
}
kernel void oob_vec(device float* y [[buffer(0)]], constant uint& k [[buffer(1)]],
                    uint i [[thread_position_in_grid]]) {
    device float4* v = (device float4*)y;
    if (i == 0) v[k] = float4(1.0f);
}
kernel void oob_ptr(device float* y [[buffer(0)]], constant uint& k [[buffer(1)]],
                    uint i [[thread_position_in_grid]]) {
    device float* p = y + k;
    if (i == 0) *p = 7.0f;
}
kernel void oob_tg(device float* y [[buffer(0)]], constant uint& k [[buffer(1)]],
                   uint i [[thread_position_in_grid]], uint l [[thread_position_in_threadgroup]]) {
    threadgroup float tile[32];
    tile[l % 32] = float(l);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    y[i] = tile[(l + k) % 64];
}
kernel void diverge(device float* y [[buffer(0)]], constant uint& k [[buffer(1)]],
                    uint l [[thread_position_in_threadgroup]]) {
    threadgroup float tile[64];
    tile[l % 64] = 1.0f;
    if (l >= k) return;  // threads at or past k skip the barrier below
    threadgroup_barrier(mem_flags::mem_threadgroup);
    y[l] = tile[(l + 1) % 64];
}
kernel void oob_atomic(device atomic_uint* c [[buffer(0)]], constant uint& k [[buffer(1)]],
                       uint i [[thread_position_in_grid]]) {
    if (i < 8) atomic_fetch_add_explicit(c + (i % 2) * k, 1u, memory_order_relaxed);
}
"""


@pytest.fixture(scope="module")
def vlib(vdev, tmp_path_factory):
    path, line = write_kernel(tmp_path_factory.mktemp("v"), "faults", OOB)
    return vdev.library(path), line


def test_validation_correct_kernel_runs_correctly(vdev, vlib):
    lib, _ = vlib
    x = vdev.buffer(np.arange(8, dtype=np.float32))
    y = vdev.buffer(np.zeros(8, np.float32))
    lib.kernel("oob_write")(8, x, y, 8)
    np.testing.assert_array_equal(y.numpy(np.float32), 2 * np.arange(8, dtype=np.float32))


def test_validation_write_past_buffer(vdev, vlib):
    lib, line = vlib
    x = vdev.buffer(np.arange(16, dtype=np.float32))
    y = vdev.buffer(np.zeros(8, np.float32))
    lib.kernel("oob_write")(16, x, y, 16)
    with pytest.raises(ValidationError) as ei:
        y.numpy(np.float32)
    msg = str(ei.value)
    assert ei.value.kernel == "oob_write"
    for part in ("kernel 'oob_write'", f"faults.metal:{line}", "'y'", "index 8", "size 8"):
        assert part in msg, (part, msg)


def test_validation_view_protects_its_neighbours(vdev, vlib):
    lib, _ = vlib
    base = vdev.buffer(np.full(16, -1.0, np.float32))
    x = vdev.buffer(np.arange(16, dtype=np.float32))
    view = base.view(16, 16)  # elements 4..7
    lib.kernel("oob_write")(16, x, view, 6)
    with pytest.raises(ValidationError, match=r"'y': index 4, size 4"):
        vdev.synchronize()
    raw = base.handle.view(np.float32)  # the neighbours of the view were not written
    assert (raw[:4] == -1).all() and (raw[8:] == -1).all()


@pytest.mark.parametrize("off, idx", [(-1, -1), (5, 8)])
def test_validation_read_outside_a_view(vdev, vlib, off, idx):
    lib, _ = vlib
    x = vdev.buffer(np.arange(32, dtype=np.float32)).view(32, 32)
    y = vdev.buffer(np.zeros(4, np.float32))
    lib.kernel("oob_read")(4, x, y, off)
    with pytest.raises(ValidationError, match=rf"'x': index {idx}, size 8"):
        y.numpy()


def test_validation_vector_cast_pointer_arith_threadgroup_atomic(vdev, vlib):
    lib, _ = vlib
    y = vdev.buffer(np.zeros(8, np.float32))  # two float4s
    lib.kernel("oob_vec")(1, y, 2)
    with pytest.raises(ValidationError, match=r"'y': index 2, size 2 \(elements of 16 bytes"):
        vdev.synchronize()
    lib.kernel("oob_ptr")(1, vdev.buffer(np.zeros(8, np.float32)), 8)
    with pytest.raises(ValidationError, match=r"'y': index 8, size 8"):
        vdev.synchronize()
    lib.kernel("oob_tg")(32, vdev.buffer(np.zeros(32, np.float32)), 40)
    with pytest.raises(ValidationError, match=r"'tile': index (3[2-9]|[4-6]\d), size 32"):
        vdev.synchronize()
    c = vdev.buffer(np.zeros(2, np.uint32))
    lib.kernel("oob_atomic")(8, c, 1)
    np.testing.assert_array_equal(c.numpy(np.uint32), [4, 4])
    lib.kernel("oob_atomic")(8, c, 2)
    with pytest.raises(ValidationError, match=r"'c': index 2, size 2"):
        vdev.synchronize()


def test_validation_divergent_barrier_reported(vdev, vlib):
    lib, _ = vlib
    y = vdev.buffer(np.zeros(256, np.float32))
    lib.kernel("diverge")(256, y, 256)  # every thread reaches the barrier: fine
    np.testing.assert_array_equal(y.numpy(np.float32), np.ones(256, np.float32))
    lib.kernel("diverge")(256, y, 100)
    with pytest.raises(ValidationError, match=r"kernel 'diverge': faults\.metal:\d+: divergent "
                                              r"threadgroup_barrier: .* returned after 0 barriers "
                                              r"while another reached 1"):
        vdev.synchronize()


def test_validation_builds_run_synchronizing_kernels_on_fibers(vdev, vlib):
    # the barrier count and checked pointers live in each thread's own code path: validation
    # builds keep fibers where a normal build runs work-item loops
    from pymetalnn.runtime.backend_cpu import fiber_report
    from pymetalnn.runtime.core import KERNEL_DIR
    from pymetalnn.runtime.msl import translate_file

    lib, _ = vlib
    report = fiber_report(lib)
    assert report.get("diverge") == "validation mode", report
    assert report.get("oob_tg") == "validation mode", report
    plain = translate_file(lib.path, "cpu", {}, [KERNEL_DIR]).kernels
    assert plain["diverge"].lockstep and plain["oob_tg"].lockstep


def test_validation_error_leaves_the_device_usable(vdev, vlib):
    lib, _ = vlib
    x = vdev.buffer(np.arange(8, dtype=np.float32))
    bad = vdev.buffer(np.zeros(4, np.float32))
    lib.kernel("oob_write")(8, x, bad, 8)
    good = vdev.buffer(np.zeros(8, np.float32))
    lib.kernel("oob_write")(8, x, good, 8)
    np.testing.assert_array_equal(good.numpy(np.float32), 2 * np.arange(8, dtype=np.float32))
    with pytest.raises(ValidationError):
        bad.numpy()


def test_validation_off_builds_the_same_source():
    from pymetalnn.runtime.core import KERNEL_DIR
    from pymetalnn.runtime.msl import translate_file

    src = os.path.join(KERNEL_DIR, "copy.metal")
    plain = translate_file(src, "cpu", {}, [KERNEL_DIR]).source
    assert "PMN_DPTR" not in plain and "pmn_validate" not in plain and "tgarr" not in plain
    checked = translate_file(src, "cpu", {}, [KERNEL_DIR], validate=True).source
    assert "PMN_DPTR" in checked and '#include "pmn_validate.h"' in checked

# ---- files: compile errors and datasets --------------------------------------------------------

def test_compile_error_leads_with_metal_line(dev, tmp_path):
    path, line = write_kernel(tmp_path, "broken", """
kernel void k(device float* x [[buffer(0)]], uint i [[thread_position_in_grid]]) {
    x[i] = no_such_name + 1.0f;  // <-
}
""")
    with pytest.raises(pymetalnn.CompileError) as ei:
        dev.library(path)
    first = str(ei.value).splitlines()[0]
    assert first.startswith(f"broken.metal:{line}: error:") and "no_such_name" in first


def test_dataset_faults_name_file_and_defect(tmp_path):
    import gzip

    from pymetalnn import datasets as D

    p = tmp_path / "img.idx.gz"
    D.write_idx(str(p), np.zeros((10, 28, 28), np.uint8), compress=True)
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(D.DatasetError, match=rf"{p.name}: truncated or corrupt gzip"):
        D.read_idx(str(p))
    q = tmp_path / "absurd.idx"
    q.write_bytes(bytes([0, 0, 8, 3]) + np.array([2**32 - 1] * 3, ">u4").tobytes() + b"\0" * 8)
    with pytest.raises(D.DatasetError, match=rf"{q.name}: 8 data bytes, dims"):
        D.read_idx(str(q))
    q.write_bytes(gzip.compress(b"\0\0\x08\x01" + (5).to_bytes(4, "big") + b"\1\2"))
    with pytest.raises(D.DatasetError, match=rf"{q.name}: 2 data bytes"):
        D.read_idx(str(q))
    ts = tmp_path / "bad.ts"
    ts.write_text("@problemName x\n@classLabel true a b\n@data\n1,2:a\nb\n")
    with pytest.raises(D.DatasetError, match=rf"{ts.name}:5: a case with no dimensions"):
        D.read_ts(str(ts))
    ts.write_text("@problemName x\n@classLabel true a b\n@data\n1,2:a\n1,x:b\n")
    with pytest.raises(D.DatasetError, match=rf"{ts.name}:5: dimension 0"):
        D.read_ts(str(ts))


# ---- files: checkpoints --------------------------------------------------------------------------

def two_fc(dev, seed=1):
    from pymetalnn import graph as G
    from pymetalnn import optim

    x = G.ImageNode((1, 4, 4), name="x")
    h = G.FlattenNode(x, name="flat")
    h = G.FullyConnectedNode(h, G.FullyConnectedDataSource(16, 8, seed=seed), name="fc1")
    h = G.ReLUNode(h, name="relu")
    h = G.FullyConnectedNode(h, G.FullyConnectedDataSource(8, 3, seed=seed + 1), name="fc2")
    loss = G.SoftmaxCrossEntropyLossNode(h, name="loss")
    tg = G.TrainingGraph(loss, optimizer=lambda p: optim.SGD(p, lr=0.1, momentum=0.9),
                         device=dev)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((4, 1, 4, 4)).astype(np.float32)
    Y = rng.integers(0, 3, 4)
    tg.encode(X, Y).wait()
    return tg, X, Y


def _same_state(a, b):
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_checkpoint_faults_refused_before_any_change(cpu, tmp_path):
    from pymetalnn import graph as G

    tg, X, Y = two_fc(cpu)
    good = tg.state_dict()
    w = good["fc1.weight"]
    bad_cases = {
        "transposed weight": ({**good, "fc2.weight": good["fc2.weight"].T.copy()}, "shape"),
        "same size, other shape": ({**good, "fc1.weight": w.reshape(-1)}, "shape"),
        "integer weight": ({**good, "fc1.bias": np.zeros(8, np.int32)}, "dtype int32"),
        "late optimizer error": ({**good, "fc2.optim.param0.momentum_buffer":
                                  np.zeros((2, 2), np.float32)}, "fc2"),
        "bad step count": ({**good, "fc1.optim.param0.step": np.array(-1)}, "fc1"),
    }
    other, _, _ = two_fc(cpu, seed=7)
    before = other.state_dict()
    for name, (d, match) in bad_cases.items():
        with pytest.raises(G.GraphError, match=match):
            other.load_state_dict(d)
            pytest.fail(f"accepted: {name}")
        _same_state(other.state_dict(), before)  # nothing changed, also after a late error
    other.load_state_dict(good)
    _same_state(other.state_dict(), good)


def test_checkpoint_npz_suffix_both_ways_and_bad_files(cpu, tmp_path):
    from pymetalnn import graph as G

    tg, X, Y = two_fc(cpu)
    tg.save(tmp_path / "model")  # written as model.npz
    assert (tmp_path / "model.npz").exists() and not (tmp_path / "model").exists()
    other, _, _ = two_fc(cpu, seed=5)
    other.load(tmp_path / "model")
    _same_state(other.state_dict(), tg.state_dict())
    other.load(tmp_path / "model.npz")
    raw = (tmp_path / "model.npz").read_bytes()
    before = other.state_dict()
    cases = {
        "missing.npz": (None, "no such file"),
        "truncated.npz": (raw[: len(raw) // 2], "not a readable .npz"),
        "garbage.npz": (os.urandom(len(raw)), "not a readable .npz"),
        "empty.npz": (b"", "not a readable .npz"),
    }
    for fname, (data, match) in cases.items():
        p = tmp_path / fname
        if data is not None:
            p.write_bytes(data)
        with pytest.raises(G.GraphError, match=rf"checkpoint .*{fname}.*{match}"):
            other.load(p)
        _same_state(other.state_dict(), before)
    objs = tmp_path / "objects.npz"
    np.savez(objs, **{**tg.state_dict(), "fc1.weight": np.array([object()], dtype=object)})
    with pytest.raises(G.GraphError, match=r"objects\.npz: key 'fc1\.weight'"):
        other.load(objs)
    _same_state(other.state_dict(), before)


# ---- training faults -----------------------------------------------------------------------------

def test_fit_stops_at_first_nonfinite_loss(cpu):
    from pymetalnn import graph as G

    tg, X, Y = two_fc(cpu)
    rng = np.random.default_rng(3)
    n, bs, bad = 160, 4, 9  # 40 batches; batch 9 (0-based) holds a NaN input
    x = rng.standard_normal((n, 1, 4, 4)).astype(np.float32)
    y = rng.integers(0, 3, n)
    x[bad * bs + 1, 0, 2, 2] = np.nan
    start = tg._steps_encoded
    with pytest.raises(G.NonFiniteLossError, match=rf"loss nan at epoch 1, step {bad + 1} ") as ei:
        G.fit(tg, (x, y), epochs=3, batch_size=bs, shuffle=False, progress=False)
    e = ei.value
    assert (e.step, e.epoch) == (bad + 1, 1) and np.isnan(e.loss)
    assert len(e.history.step_loss) == bad + 1 and np.isfinite(e.history.step_loss[:bad]).all()
    assert tg._steps_encoded - start <= bad + 2 + G.train.CHECK_EVERY  # stopped, not 120 steps
    # ignore: trains on through every step (NaN weights and all), as asked
    tg2, _, _ = two_fc(cpu)
    hist = G.fit(tg2, (x, y), epochs=1, batch_size=bs, shuffle=False, progress=False,
                 nonfinite="ignore")
    assert len(hist.step_loss) == n // bs and np.isnan(hist.step_loss[-1])
    with pytest.raises(ValueError, match="nonfinite"):
        G.fit(tg2, (x, y), nonfinite="skip", progress=False)


# ---- cuda: a kernel fault and fork (in child processes: a CUDA fault ends the context) ----------

CUDA_FAULT = r"""
import sys, threading, numpy as np, pymetalnn
from pymetalnn import AsyncError
dev = pymetalnn.device("cuda")
k = dev.library(sys.argv[1]).kernel("wild")
x = dev.buffer(np.zeros(4, np.float32))
k(64, x)
got = []
done = threading.Event()
dev.signal(lambda err: (got.append(err), done.set()), with_error=True)
assert done.wait(60), "callback did not run after a kernel fault"
assert isinstance(got[0], AsyncError) and got[0].kernel == "wild", got
try:
    x.numpy()
    print("NO ERROR")
except AsyncError as e:
    print("OK", e.kernel)
"""

CUDA_FORK = r"""
import os, numpy as np, pymetalnn, pymetalnn.functional as F
dev = pymetalnn.device("cuda")
a = pymetalnn.tensor(np.ones(4, np.float32), dev)
F.add(a, a).numpy()
pid = os.fork()
if pid == 0:
    try:
        F.add(a, a)
        os._exit(3)
    except RuntimeError as e:
        os._exit(0 if "forked" in str(e) else 4)
_, status = os.waitpid(pid, 0)
print("child", os.waitstatus_to_exitcode(status))
"""


def _cuda_or_skip():
    reason = pymetalnn.availability().get("cuda")
    if reason:
        pytest.skip(f"backend cuda unavailable: {reason}")


def test_cuda_kernel_fault_names_kernel_and_callbacks_run(tmp_path):
    _cuda_or_skip()
    path, _ = write_kernel(tmp_path, "wild", """
kernel void wild(device float* x [[buffer(0)]], uint i [[thread_position_in_grid]]) {
    x[i + (1u << 31)] = 1.0f;  // far outside any allocation
}
""")
    r = subprocess.run([sys.executable, "-c", CUDA_FAULT, path], capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0 and r.stdout.strip() == "OK wild", r.stdout + r.stderr


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_cuda_in_forked_child_raises_clearly():
    _cuda_or_skip()
    r = subprocess.run([sys.executable, "-c", CUDA_FORK], capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0 and r.stdout.strip() == "child 0", r.stdout + r.stderr
