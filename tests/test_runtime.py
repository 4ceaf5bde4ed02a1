"""Runtime services beyond the dialect: completion callbacks, captured launch replay, tensors
and the backend report (the params header: test_params.py)."""
from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import pymetalnn
from pymetalnn.runtime import backend_cpu

SCALE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                     "scale.metal")


class ScaleParams(ctypes.Structure):
    _fields_ = [("n", ctypes.c_uint32), ("a", ctypes.c_float)]


def test_capture_records_without_running_and_replays(dev) -> None:
    k = dev.library(SCALE).kernel("scale_float")
    x = np.arange(1, 10, dtype=np.float32)
    buf = dev.buffer(x)
    dev.reset_counts()
    with dev.capture() as rec:
        k(x.size, buf, ScaleParams(x.size, 3.0))
        k(x.size, buf, ScaleParams(x.size, 0.5))
    assert len(rec) == 2
    np.testing.assert_array_equal(buf.numpy(np.float32), x)  # nothing ran yet
    assert dev.dispatch_counts["scale_float"] == 0
    rec.replay()
    rec.replay()
    np.testing.assert_array_equal(buf.numpy(np.float32), x * np.float32(1.5) * np.float32(1.5))
    assert dev.dispatch_counts["scale_float"] == 4


def test_launch_copies_its_constants(dev) -> None:
    """A launch takes its params struct's bytes when called: changing or dropping the struct
    afterwards changes nothing, queued, captured or replayed (launch paths keep the bytes)."""
    import gc

    k = dev.library(SCALE).kernel("scale_float")
    x = np.arange(1, 10, dtype=np.float32)
    buf = dev.buffer(x)
    p = ScaleParams(x.size, 2.0)
    with dev.capture() as rec:
        k(x.size, buf, p)
    k(x.size, buf, p)
    p.a, p.n = 100.0, 0
    del p
    gc.collect()
    rec.replay()
    np.testing.assert_array_equal(buf.numpy(np.float32), x * np.float32(4.0))
    k(x.size, buf.view(4, 32) if dev.supports_views else buf, ScaleParams(x.size - 1, 0.5))
    want = x * np.float32(4.0)
    if dev.supports_views:
        want[1:] *= np.float32(0.5)
    else:
        want[:-1] *= np.float32(0.5)
    np.testing.assert_array_equal(buf.numpy(np.float32), want)


def test_synchronize_waits_for_work_queued_by_callbacks(dev) -> None:
    if dev.name == "metal":
        pytest.skip("completion callbacks that queue more work: cpu and cuda queues")
    seen: list[int] = []
    dev.signal(lambda: dev.signal(lambda: seen.append(1)))
    dev.synchronize()
    assert seen == [1]


def test_signal_runs_after_prior_work(dev) -> None:
    k = dev.library(SCALE).kernel("scale_float")
    n = 1 << 16
    buf = dev.buffer(np.ones(n, np.float32))
    seen: list[float] = []
    done = threading.Event()
    for _ in range(3):
        k(n, buf, ScaleParams(n, 2.0))

    def cb() -> None:
        # runs on the queue/watcher thread once the three launches are done: never synchronize here
        if dev.name == "cpu":
            seen.append(float(buf.handle[-4:].view(np.float32)[0]))
        done.set()

    dev.signal(cb)
    dev.synchronize()
    assert done.is_set()
    if seen:
        assert seen == [8.0]
    np.testing.assert_array_equal(buf.numpy(np.float32), np.full(n, 8.0, np.float32))


def test_tensor_roundtrip_and_reshape(dev) -> None:
    a = np.random.default_rng(0).standard_normal((2, 3, 5)).astype(np.float32)
    t = pymetalnn.tensor(a, dev)
    assert t.shape == (2, 3, 5) and t.dtype == np.float32 and t.device is dev
    np.testing.assert_array_equal(np.asarray(t), a)
    np.testing.assert_array_equal(t.reshape(6, -1).numpy(), a.reshape(6, 5))
    h = pymetalnn.tensor(a.astype(np.float16), dev)
    assert h.dtype == np.float16
    labels = pymetalnn.tensor(np.array([1, 2, 3]), dev)
    assert labels.dtype == np.int32
    with pytest.raises(ValueError, match="shape"):
        t.reshape(7, -1)
    with pytest.raises(ValueError, match="dtype"):
        pymetalnn.tensor(a.astype(np.float64), dev, dtype=np.float64)


def test_cli_reports_backends() -> None:
    r = subprocess.run([sys.executable, "-m", "pymetalnn"], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert r.returncode == 0
    for name in ("metal", "cuda", "cpu"):
        assert name in r.stdout
    assert "default backend" in r.stdout


def test_unknown_backend_name() -> None:
    with pytest.raises(ValueError, match="name"):
        pymetalnn.device("vulkan")


def test_memory_statistics(dev) -> None:
    """memory_allocated counts live buffers once (views are free); the peak is a high-water mark."""
    import gc

    gc.collect()
    dev.reset_peak_memory()
    base = dev.memory_allocated()
    a = dev.buffer(1 << 20)
    b = dev.buffer(3 << 20)
    if dev.supports_views:
        v = a.view(1024, 4096)
        assert v.nbytes == 4096
    assert dev.memory_allocated() == base + (4 << 20)
    del b
    gc.collect()
    assert dev.memory_allocated() == base + (1 << 20)
    assert dev.max_memory_allocated() == base + (4 << 20)
    dev.reset_peak_memory()
    assert dev.max_memory_allocated() == base + (1 << 20)


def test_allocation_hook_serves_planned_buffers(dev) -> None:
    """Inside allocation_hook, dev.buffer(n) returns what the hook gives (a view of an arena
    here), outside it a fresh buffer; other threads are not affected."""
    if not dev.supports_views:
        pytest.skip("arena views need buffer views")
    arena = dev.buffer(1 << 12)
    seen: list[int] = []

    def hook(nbytes, zero, allocate):
        seen.append(nbytes)
        return arena.view(256, nbytes) if nbytes == 64 else allocate()

    other: list = []
    with dev.allocation_hook(hook):
        a = dev.buffer(64, zero=False)
        b = dev.buffer(128)
        t = threading.Thread(target=lambda: other.append(dev.buffer(64)))
        t.start()
        t.join()
        with pytest.raises(RuntimeError, match="already installed"):
            with dev.allocation_hook(hook):
                pass
    assert seen == [64, 128]
    assert a.base is arena and a.offset == 256
    assert b.base is b and other[0].base is other[0]
    c = dev.buffer(64)
    assert c.base is c
    k = dev.library(SCALE).kernel("scale_float")
    a.write(np.arange(16, dtype=np.float32))
    k(16, a, ScaleParams(16, 2.0))
    np.testing.assert_array_equal(arena.numpy(np.float32)[64:80], np.arange(16) * np.float32(2))


def test_write_async_is_ordered_with_kernels(dev) -> None:
    """write_async lands after the work queued before it and before the work queued after."""
    k = dev.library(SCALE).kernel("scale_float")
    n = 4096
    buf = dev.buffer(np.ones(n, np.float32))
    k(n, buf, ScaleParams(n, 3.0))                      # 3
    src = np.full(n, 5.0, np.float32)
    dev.write_async(buf, src)                           # 5 (overwrites the 3s)
    src[:] = -1.0                                       # the copy was taken already
    k(n, buf, ScaleParams(n, 2.0))                      # 10
    dev.write_async(buf, np.full(8, 7.0, np.float32), offset=4 * 8)
    np.testing.assert_array_equal(buf.numpy(np.float32)[:8], np.full(8, 10.0, np.float32))
    np.testing.assert_array_equal(buf.numpy(np.float32)[8:16], np.full(8, 7.0, np.float32))
    np.testing.assert_array_equal(buf.numpy(np.float32)[16:], np.full(n - 16, 10.0, np.float32))
    with pytest.raises(ValueError, match="data"):
        dev.write_async(buf, np.zeros(n + 1, np.float32))


def test_profile_times_each_launch(dev) -> None:
    k = dev.library(SCALE).kernel("scale_float")
    n = 1 << 16
    buf = dev.buffer(np.ones(n, np.float32))
    with dev.profile() as prof:
        for _ in range(3):
            k(n, buf, ScaleParams(n, 2.0))
    rows = prof.by_kernel()
    assert [(r[0], r[1]) for r in rows] == [("scale_float", 3)]
    assert rows[0][2] > 0 and prof.total == pytest.approx(rows[0][2])
    assert "scale_float" in prof.table()
    np.testing.assert_array_equal(buf.numpy(np.float32), np.full(n, 8.0, np.float32))


def _host_addr(buf) -> int:
    return buf.handle.ctypes.data


@pytest.fixture
def cpu_dev():
    if backend_cpu.probe() is not None:
        pytest.skip("no C++ compiler")
    return pymetalnn.device("cpu")


def test_cpu_pool_reuses_freed_memory_zeroed(cpu_dev) -> None:
    """A freed allocation of a size class comes back for the next of that class (no first-touch
    page faults), zero-filled when asked; small allocations and other classes get fresh memory."""
    import gc

    dev = cpu_dev
    dev.empty_cache()
    n = 300_000  # class 327680 bytes: 301_000 shares it, 400_000 does not
    a = dev.buffer(np.full(n // 4, 7.0, np.float32))
    addr = _host_addr(a)
    del a
    gc.collect()
    dev.synchronize()
    b = dev.buffer(301_000)  # zero-filled by default
    assert _host_addr(b) == addr
    assert not b.numpy(np.uint8).any()
    b.write(np.full(301_000, 3, np.uint8))
    del b
    gc.collect()
    c = dev.buffer(400_000, zero=False)
    assert _host_addr(c) != addr
    d = dev.buffer(300_500, zero=False)  # not zeroed: what the last user left
    assert _host_addr(d) == addr
    assert (d.numpy(np.uint8) == 3).all()


def test_cpu_pool_keeps_memory_a_view_or_a_capture_still_uses(cpu_dev) -> None:
    """Memory goes back to the pool only once nothing refers to it: not while a numpy view taken
    from the buffer's handle lives, not while a captured launch list that writes it lives."""
    import gc

    dev = cpu_dev
    dev.empty_cache()
    k = dev.library(SCALE).kernel("scale_float")
    n = 1 << 16
    a = dev.buffer(np.ones(n, np.float32))
    view = a.handle[:16].view(np.float32)  # a view's base is the owning array, not the handle
    addr = _host_addr(a)
    del a
    gc.collect()
    b = dev.buffer(np.full(n, 2.0, np.float32))
    assert _host_addr(b) != addr
    np.testing.assert_array_equal(view, np.ones(4, np.float32))

    c = dev.buffer(np.ones(n, np.float32))
    caddr = _host_addr(c)
    with dev.capture() as rec:
        k(n, c, ScaleParams(n, 3.0))
    del c
    gc.collect()
    d = dev.buffer(np.full(n, 5.0, np.float32))
    assert _host_addr(d) not in (addr, caddr)
    rec.replay()
    np.testing.assert_array_equal(d.numpy(np.float32), np.full(n, 5.0, np.float32))


def test_cpu_pool_cap_and_empty_cache(cpu_dev, monkeypatch) -> None:
    """PYMETALNN_CPU_CACHE_MB bounds what is kept (0: nothing); empty_cache lets all of it go."""
    import gc

    monkeypatch.setenv("PYMETALNN_CPU_CACHE_MB", "0")
    dev = backend_cpu.CpuDevice()
    a = dev.buffer(1 << 20)
    del a
    gc.collect()
    dev.synchronize()
    assert dev._pool.cached == 0
    monkeypatch.setenv("PYMETALNN_CPU_CACHE_MB", "lots")
    with pytest.raises(ValueError, match="PYMETALNN_CPU_CACHE_MB"):
        backend_cpu.CpuDevice()
    monkeypatch.delenv("PYMETALNN_CPU_CACHE_MB")
    dev = cpu_dev
    bufs = [dev.buffer(1 << 20) for _ in range(3)]
    del bufs
    gc.collect()
    dev.synchronize()
    assert dev._pool.cached >= 3 << 20
    dev.empty_cache()
    assert dev._pool.cached == 0


def test_automatic_choice_probes_an_unavailable_backend_once(monkeypatch) -> None:
    # with no backend named, a backend that cannot run is skipped without trying it again (a
    # failed import costs ~80 us per attempt, paid by every op that takes the default device)
    from pymetalnn import runtime

    calls: list[str] = []
    sentinel = object()

    def fake_make(name: str):
        calls.append(name)
        if name != "cpu":
            raise runtime.BackendUnavailable(f"{name}: not here")
        return sentinel

    monkeypatch.delenv("PYMETALNN_BACKEND", raising=False)
    monkeypatch.setattr(runtime, "_make", fake_make)
    monkeypatch.setattr(runtime, "_devices", {})
    monkeypatch.setattr(runtime, "_unavailable", {})
    assert runtime.device() is sentinel
    assert runtime.device() is sentinel
    assert calls == ["metal", "cuda", "cpu"]
    assert "not here" in str(runtime._unavailable["cuda"])
    # a backend named explicitly is still tried (and its reason raised) every time
    with pytest.raises(runtime.BackendUnavailable, match="metal: not here"):
        runtime.device("metal")
    assert calls[-1] == "metal"


def test_cpu_launch_runs_inline_only_when_nothing_is_queued(cpu_dev) -> None:
    """A kernel without work-item loops runs on the launching thread when the queue is idle
    (no queue round trip); queued work before it keeps it queued, in order; a launch from a
    completion callback (the queue thread, mid-job) is queued, not deadlocked."""
    k = cpu_dev.library(SCALE).kernel("scale_float")
    assert k._inline
    cpu_dev.synchronize()
    x = np.arange(1, 8, dtype=np.float32)
    buf = cpu_dev.buffer(x)
    view = buf.handle[: x.nbytes].view(np.float32)  # the memory itself, read without waiting
    k(x.size, buf, ScaleParams(x.size, 2.0))
    np.testing.assert_array_equal(view, x * 2)  # done on return: it ran here
    gate = threading.Event()
    cpu_dev.signal(lambda: gate.wait(10))
    k(x.size, buf, ScaleParams(x.size, 3.0))  # behind the blocked callback: must wait its turn
    np.testing.assert_array_equal(view, x * 2)
    gate.set()
    cpu_dev.synchronize()
    np.testing.assert_array_equal(view, x * 6)
    cpu_dev.signal(lambda: k(x.size, buf, ScaleParams(x.size, 0.5)))
    cpu_dev.synchronize()
    np.testing.assert_array_equal(buf.numpy(np.float32), x * 3)


def test_cpu_launches_from_several_threads(cpu_dev) -> None:
    k = cpu_dev.library(SCALE).kernel("scale_float")
    n, steps = 1000, 60
    bufs = [cpu_dev.buffer(np.full(n, t + 1, np.float32)) for t in range(4)]

    def work(t: int) -> None:
        for i in range(steps):
            k(n, bufs[t], ScaleParams(n, 2.0 if i % 2 == 0 else 0.75))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    cpu_dev.synchronize()
    for t in range(4):
        want = np.float32(t + 1)
        for i in range(steps):  # the same float32 roundings, in the launches' order
            want = np.float32(want * np.float32(2.0 if i % 2 == 0 else 0.75))
        np.testing.assert_array_equal(bufs[t].numpy(np.float32), np.full(n, want, np.float32))
