"""Run a hand-written Metal kernel on whichever backend this machine has.

    python examples/custom_kernel.py            # PYMETALNN_BACKEND=cpu|cuda|metal to choose
"""
from __future__ import annotations

import ctypes
import os

import numpy as np

import pymetalnn


class ScaleParams(ctypes.Structure):  # mirrors `struct ScaleParams` in scale.metal
    _fields_ = [("n", ctypes.c_uint32), ("a", ctypes.c_float)]


def main() -> None:
    dev = pymetalnn.device()
    lib = dev.library(os.path.join(os.path.dirname(os.path.abspath(__file__)), "scale.metal"))
    x = np.arange(10, dtype=np.float32)
    buf = dev.buffer(x)
    lib.kernel("scale_float")(len(x), buf, ScaleParams(len(x), 2.5))
    out = buf.numpy(np.float32)
    assert np.array_equal(out, x * np.float32(2.5))
    print(f"{dev.name}: {out}")


if __name__ == "__main__":
    main()
