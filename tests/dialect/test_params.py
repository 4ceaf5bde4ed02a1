"""File-scope constant arrays, struct/scalar `constant T&` arguments, buffer views, queue order."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
from helpers import rng

F32 = np.float32


class Params(ctypes.Structure):
    """Mirror of `struct Params` in params.metal (4-byte fields only)."""

    _fields_ = [("n", ctypes.c_uint32), ("scale", ctypes.c_float), ("offset", ctypes.c_int32),
                ("mode", ctypes.c_uint32), ("bias", ctypes.c_float * 2)]


def test_file_scope_constant_arrays(load) -> None:
    lib = load("params")
    dev = lib.device
    n = 1000
    idx = rng(1).integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
    out = dev.buffer(np.zeros(n, F32))
    iout = dev.buffer(np.zeros(n, np.int32))
    lib.kernel("const_arrays")(n, dev.buffer(idx), out, iout, n)
    coeffs = np.array([0.5, -1.25, 2.0, 3.5], F32)
    lut = np.array([3, 1, 4, 1, 5, 9, 2, 6], np.int64)
    np.testing.assert_array_equal(out.numpy(F32), coeffs[idx % 4] * F32(0.25))
    np.testing.assert_array_equal(iout.numpy(np.int32), lut[idx % 8] + (idx & 0xF0F0))


@pytest.mark.parametrize("mode", [0, 1])
def test_struct_and_scalar_params(load, mode: int) -> None:
    lib = load("params")
    dev = lib.device
    n = 333
    x = rng(2).standard_normal(n).astype(F32)
    p = Params(n=n - 3, scale=1.5, offset=-7, mode=mode, bias=(ctypes.c_float * 2)(0.25, -0.5))
    y = dev.buffer(np.full(n * 2, 99, F32))
    k = lib.kernel("struct_params")
    # alpha: a Python float; beta: a Python int; h: a Python float converted to half;
    # v2: a float2 given as a numpy array
    k(n, dev.buffer(x), y, p, 0.75, -3, 2.5, np.array([4.0, 1.5], F32))
    got = y.numpy(F32, (n, 2))
    m = n - 3
    r = x[:m] * F32(1.5) + F32(-7) + np.where(np.arange(m) % 2 == 0, F32(0.25), F32(-0.5))
    if mode == 1:
        r = -r
    np.testing.assert_allclose(got[:m, 0], r, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got[:m, 1], 0.75 * -3 + 2.5 + 4.0 - 1.5, rtol=1e-6)
    np.testing.assert_array_equal(got[m:], 99, err_msg="threads past p.n wrote")


def test_value_argument_forms(load) -> None:
    """numpy scalars and raw bytes are accepted as well as Python numbers."""
    lib = load("params")
    dev = lib.device
    n = 64
    x = np.arange(n, dtype=F32)
    y = dev.buffer(np.ones(n, F32))
    k = lib.kernel("axpy")
    k(n, dev.buffer(x), y, F32(2.0), np.uint32(n))
    k(n, dev.buffer(x), y, np.float32(0.5).tobytes(), bytes(np.uint32(n // 2).data))
    want = np.ones(n, F32) + 2 * x
    want[: n // 2] += F32(0.5) * x[: n // 2]
    np.testing.assert_array_equal(y.numpy(F32), want)


def test_scalar_types_from_python_numbers(load) -> None:
    lib = load("params")
    dev = lib.device
    out = dev.buffer(np.zeros(5, np.int32))
    lib.kernel("scalar_types")(1, out, 2**32 - 1, -5, 200, True, 65535)
    np.testing.assert_array_equal(out.numpy(np.int32), [0x7FFFFFFF, -5, 200, 1, 65535])
    lib.kernel("scalar_types")(1, out, 5, 32767, 0, False, 0)
    np.testing.assert_array_equal(out.numpy(np.int32), [5, 32767, 0, 0, 0])


def test_buffer_views(load) -> None:
    lib = load("params")
    dev = lib.device
    if not dev.supports_views:
        pytest.skip(f"the {dev.name} backend binds whole buffers only")
    n = 100
    x = np.arange(300, dtype=F32)
    y0 = np.full(300, -1, F32)
    xb, yb = dev.buffer(x), dev.buffer(y0)
    # x from element 16, y from element 40: the kernel sees offset pointers
    lib.kernel("axpy")(n, xb.view(16 * 4, n * 4), yb.view(40 * 4, n * 4), 3.0, n)
    want = y0.copy()
    want[40:40 + n] = 3 * x[16:16 + n] - 1
    np.testing.assert_array_equal(yb.numpy(F32), want)
    # a view of a view, and reading back through a view
    v = yb.view(40 * 4).view(8 * 4, 4 * 4)
    np.testing.assert_array_equal(v.numpy(F32), want[48:52])
    v.write(np.array([1, 2, 3, 4], F32))
    assert yb.numpy(F32)[48:52].tolist() == [1, 2, 3, 4]


def test_launches_run_in_queue_order(load) -> None:
    lib = load("params")
    dev = lib.device
    n = 1000
    x = rng(3).integers(-100, 100, n, dtype=np.int32)
    b = dev.buffer(x)
    add, mul = lib.kernel("add_one"), lib.kernel("mul_two")
    want = x.astype(np.int64)
    for _ in range(10):  # no synchronize in between: order comes from the queue
        add(n, b, n)
        mul(n, b, n)
        want = (want + 1) * 2
    np.testing.assert_array_equal(b.numpy(np.int32), want)


def test_dispatch_counts_by_name(load) -> None:
    lib = load("params")
    dev = lib.device
    before_add = dev.dispatch_counts["add_one"]
    before_mul = dev.dispatch_counts["mul_two"]
    b = dev.buffer(np.zeros(32, np.int32))
    for _ in range(3):
        lib.kernel("add_one")(32, b, 32)
    lib.kernel("mul_two")(32, b, 32)
    dev.synchronize()
    assert dev.dispatch_counts["add_one"] - before_add == 3
    assert dev.dispatch_counts["mul_two"] - before_mul == 1
    np.testing.assert_array_equal(b.numpy(np.int32), np.full(32, 6))


def test_kernel_without_value_args(load) -> None:
    lib = load("params")
    dev = lib.device
    out = dev.buffer(np.zeros(512, np.int32))
    lib.kernel("no_args")(512, out)
    np.testing.assert_array_equal(out.numpy(np.int32), np.full(512, 7))
