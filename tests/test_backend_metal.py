"""backend_metal.py's own behaviour, through the metalcompute stand-in on any machine (the whole
suite also runs on it with PYMETALNN_FAKE_METAL=1 PYMETALNN_BACKEND=metal)."""
from __future__ import annotations

import ctypes
import re

import numpy as np
import pytest

import pymetalnn
from pymetalnn import AsyncError, CompileError, DispatchError

if pymetalnn.availability().get("cpu"):
    pytest.skip("the stand-in runs kernels on the cpu backend", allow_module_level=True)


@pytest.fixture
def mdev(monkeypatch):
    monkeypatch.setenv("PYMETALNN_FAKE_METAL", "1")
    from pymetalnn.runtime.backend_metal import MetalDevice

    return MetalDevice()


class ScaleParams(ctypes.Structure):
    _fields_ = [("n", ctypes.c_uint32), ("a", ctypes.c_float)]


def test_whole_buffers_values_and_capture(mdev) -> None:
    k = mdev.library("examples/scale.metal").kernel("scale_float")
    x = mdev.buffer(np.arange(300, dtype=np.float32))
    k(300, x, ScaleParams(300, 2.0))
    np.testing.assert_array_equal(x.numpy(np.float32), 2 * np.arange(300, dtype=np.float32))
    with mdev.capture() as rec:
        k(300, x, ScaleParams(300, 0.5))
    np.testing.assert_array_equal(x.numpy(np.float32), 2 * np.arange(300, dtype=np.float32))
    rec.replay()
    rec.replay()
    np.testing.assert_array_equal(x.numpy(np.float32), 0.5 * np.arange(300, dtype=np.float32))
    with pytest.raises(DispatchError):
        x.view(4, 8)  # whole buffers only


def test_value_sizes_checked_before_dispatch(mdev) -> None:
    k = mdev.library("examples/scale.metal").kernel("scale_float")
    x = mdev.buffer(np.ones(8, np.float32))
    with pytest.raises(DispatchError, match="needs 8 bytes"):
        k(8, x, bytes(4))
    np.testing.assert_array_equal(x.numpy(np.float32), 1)


def test_compile_errors_name_the_metal_file_and_line(mdev, tmp_path) -> None:
    (tmp_path / "inc.h").write_text("#pragma once\ninline float f(float v) {\n"
                                    "  return v + undeclared_in_header;\n}\n")
    src = tmp_path / "bad.metal"
    src.write_text('#include "inc.h"\nkernel void k(device float* x [[buffer(0)]],\n'
                   "              uint i [[thread_position_in_grid]]) { x[i] = f(x[i]); }\n")
    with pytest.raises(CompileError) as ei:
        mdev.library(str(src), defines={"UNUSED": 1})
    assert re.search(r"inc\.h:3:", str(ei.value)), str(ei.value)


def test_signal_errors_surface_at_synchronize(mdev) -> None:
    seen = []
    mdev.signal(lambda: seen.append(1))
    assert seen == [1]

    def boom() -> None:
        raise ValueError("from the callback")

    mdev.signal(boom)
    with pytest.raises(AsyncError, match="from the callback") as ei:
        mdev.synchronize()
    assert isinstance(ei.value.__cause__, ValueError)
    mdev.synchronize()  # reported once; the device stays usable


def test_in_flight_handles_are_bounded(mdev) -> None:
    from pymetalnn.runtime.backend_metal import MAX_IN_FLIGHT

    k = mdev.library("examples/scale.metal").kernel("scale_float")
    x = mdev.buffer(np.ones(4, np.float32))
    for _ in range(MAX_IN_FLIGHT + 40):
        k(4, x, ScaleParams(4, 1.0))
    assert len(mdev._pending) <= MAX_IN_FLIGHT
    np.testing.assert_array_equal(x.numpy(np.float32), 1)
    assert not mdev._pending
