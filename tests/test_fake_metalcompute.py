"""The metalcompute 0.2.9 stand-in (pymetalnn/testing/fake_metalcompute.py): its API and dispatch
rules are the real package's, so the metal backend's tests mean what they would on a Mac.

Used directly here (no environment flag needed); PYMETALNN_FAKE_METAL=1 puts it under
backend_metal for the whole suite."""
from __future__ import annotations

import gc

import numpy as np
import pytest

import pymetalnn

if pymetalnn.availability().get("cpu"):
    pytest.skip("the stand-in runs kernels on the cpu backend", allow_module_level=True)

from pymetalnn.testing import fake_metalcompute as mc  # noqa: E402

RECORD = """
#include <metal_stdlib>
using namespace metal;
// every thread of the grid writes what it sees: the dispatch, as the kernel observes it
#define RECORD_BODY                                                         \\
    device uint* o = out + gid * 6u;                                        \\
    o[0] = 1u; o[1] = tg_size; o[2] = n_groups; o[3] = tgid; o[4] = lid;    \\
    o[5] = calls[0];
#define RECORD_PARAMS                                                       \\
    device uint* out [[buffer(0)]], constant uint* calls [[buffer(1)]],     \\
    uint gid [[thread_position_in_grid]], uint lid [[thread_position_in_threadgroup]], \\
    uint tgid [[threadgroup_position_in_grid]],                             \\
    uint tg_size [[threads_per_threadgroup]], uint n_groups [[threadgroups_per_grid]]

[[max_total_threads_per_threadgroup(64)]]
kernel void record64(RECORD_PARAMS) { RECORD_BODY }
[[max_total_threads_per_threadgroup(96)]]
kernel void record96(RECORD_PARAMS) { RECORD_BODY }
kernel void record_default(RECORD_PARAMS) { RECORD_BODY }
"""


@pytest.fixture(scope="module")
def dev() -> mc.Device:
    return mc.Device()


@pytest.fixture(scope="module")
def rec(dev: mc.Device) -> mc.Kernel:
    return dev.kernel(RECORD)


def _dispatch(dev, rec, name: str, count, cap: int) -> np.ndarray:
    out = dev.buffer(cap * 6 * 4)
    handle = rec.function(name)(count, out, np.array([7], np.uint32))
    del handle  # releasing the run waits for it
    return np.frombuffer(out, np.uint32).reshape(cap, 6)


@pytest.mark.parametrize("name,tg,count", [
    ("record64", 64, 1), ("record64", 64, 64), ("record64", 64, 65), ("record64", 64, 200),
    ("record96", 96, 97), ("record96", 96, 96 * 3),
    ("record_default", mc.DEVICE_MAX_THREADS, 1), ("record_default", mc.DEVICE_MAX_THREADS, 1500),
])
def test_dispatch_rules(dev, rec, name: str, tg: int, count: int) -> None:
    """ceil(count / tg) threadgroups of tg threads, tg = the pipeline's maximum: the kernel's
    max_total_threads_per_threadgroup, else the device's; a 1-D grid."""
    groups = -(-count // tg)
    cap = groups * tg + 64  # room past the grid, which must stay untouched
    got = _dispatch(dev, rec, name, count, cap)
    ran = got[:, 0] == 1
    assert ran[: groups * tg].all() and not ran[groups * tg :].any()
    g = np.arange(groups * tg)
    np.testing.assert_array_equal(got[: groups * tg, 1], tg)
    np.testing.assert_array_equal(got[: groups * tg, 2], groups)
    np.testing.assert_array_equal(got[: groups * tg, 3], g // tg)
    np.testing.assert_array_equal(got[: groups * tg, 4], g % tg)
    np.testing.assert_array_equal(got[: groups * tg, 5], 7)  # a numpy argument, copied


def test_count_is_any_number(dev, rec) -> None:
    got = _dispatch(dev, rec, "record64", 64.9, 192)  # truncated, as PyLong(PyNumber_Long)
    assert got[:64, 0].all() and not got[64:, 0].any()
    got = _dispatch(dev, rec, "record64", np.int64(65), 192)
    assert got[:128, 0].all()
    with pytest.raises(mc.error, match="integer kernel count"):
        rec.function("record64")("64", dev.buffer(4))
    with pytest.raises(mc.error, match="Buffer not found"):
        rec.function("record64")(64)


def test_buffers(dev) -> None:
    b = dev.buffer(16)
    np.testing.assert_array_equal(np.frombuffer(b, np.uint8), np.zeros(16, np.uint8))
    m = memoryview(b)
    assert (m.format, m.itemsize, m.ndim, m.readonly, m.nbytes) == ("B", 1, 1, False, 16)
    m[3] = 9
    assert np.frombuffer(b, np.uint8)[3] == 9
    src = np.arange(6, dtype=np.float32).reshape(2, 3)
    c = dev.buffer(src)
    src[:] = -1  # a copy was made
    np.testing.assert_array_equal(np.frombuffer(c, np.float32), np.arange(6, dtype=np.float32))
    assert str(c) == "metalcompute.Buffer(length=24)"
    assert np.frombuffer(c, np.uint8).ctypes.data % 4096 == 0  # Metal buffers are page aligned
    with pytest.raises(TypeError):
        len(c)
    with pytest.raises(TypeError):
        c[0]
    with pytest.raises(AttributeError):
        c.read(4)  # the real Buffer has no methods
    with pytest.raises(mc.error):
        dev.buffer(0)
    with pytest.raises(mc.error):
        dev.buffer(np.zeros((4, 4))[:, ::2])  # not C-contiguous
    with pytest.raises(mc.error):
        dev.buffer("text")


def test_library_errors(dev, rec) -> None:
    with pytest.raises(mc.error, match="Failed to find function"):
        rec.function("nope")
    with pytest.raises(mc.error, match="program_source:3"):
        dev.kernel("kernel void k(device float* x [[buffer(0)]],\n"
                   "              uint i [[thread_position_in_grid]]) {\n"
                   "  x[i] = undeclared_name;\n}\n")
    # what MSL 2.3 refuses although our translator would run it
    with pytest.raises(mc.error, match=r"atomic_float' needs MSL 3\.0"):
        dev.kernel("kernel void k(device atomic_float* x [[buffer(0)]]) {}\n")


def test_predefined_macros_are_metal_23s(dev) -> None:
    k = dev.kernel("""
kernel void version(device int* out [[buffer(0)]], uint i [[thread_position_in_grid]]) {
    if (i > 0) return;
    out[0] = __METAL_VERSION__;
#ifdef __PYMETALNN__
    out[1] = 1;
#endif
}
""")
    out = dev.buffer(8)
    h = k.function("version")(1, out)
    del h
    np.testing.assert_array_equal(np.frombuffer(out, np.int32), [230, 0])


def test_queue_is_in_order_and_release_waits(dev) -> None:
    k = dev.kernel("""
[[max_total_threads_per_threadgroup(32)]]
kernel void step(device uint* x [[buffer(0)]], constant uint& n [[buffer(1)]],
                 uint i [[thread_position_in_grid]]) {
    if (i < n) x[i] = x[i] * 3u + 1u;
}
""").function("step")
    x = dev.buffer(np.zeros(100, np.uint32))
    n = np.array([100], np.uint32)
    runs = [k(100, x, n) for _ in range(5)]
    del runs
    want = 0
    for _ in range(5):
        want = want * 3 + 1
    np.testing.assert_array_equal(np.frombuffer(x, np.uint32), want)


def test_int_argument_is_a_zero_filled_buffer(dev) -> None:
    k = dev.kernel("""
[[max_total_threads_per_threadgroup(32)]]
kernel void copy(device uint* out [[buffer(0)]], device const uint* src [[buffer(1)]],
                 uint i [[thread_position_in_grid]]) {
    out[i] = src[i] + 5u;
}
""").function("copy")
    out = dev.buffer(np.full(32, 99, np.uint32))
    h = k(32, out, 128)  # an int becomes dev.buffer(128): 128 zero bytes
    del h
    np.testing.assert_array_equal(np.frombuffer(out, np.uint32), 5)


def test_faults_are_recorded_not_raised(dev, rec) -> None:
    mc.pop_faults()
    h = rec.function("record64")(64, dev.buffer(64 * 6 * 4))  # [[buffer(1)]] not bound
    del h
    gc.collect()
    (f,) = mc.pop_faults()
    assert "buffer(1)" in f and "record64" in f
