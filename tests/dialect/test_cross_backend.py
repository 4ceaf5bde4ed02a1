"""Where results are exact (integers, integer atomics, conversions, half arithmetic), the cpu and
cuda backends must agree bit for bit (any NaN matching any NaN). Skipped unless both run here."""
from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import assert_bits_equal, kernel_path, rng

import pymetalnn


class SimdParams(ctypes.Structure):
    _fields_ = [("n", ctypes.c_uint32), ("k", ctypes.c_uint32)]


@pytest.fixture(scope="module")
def pair():
    only = os.environ.get("PYMETALNN_BACKEND")
    if only:
        pytest.skip(f"PYMETALNN_BACKEND={only}: one backend only")
    avail = pymetalnn.availability()
    missing = {b: avail[b] for b in ("cpu", "cuda") if avail[b]}
    if missing:
        pytest.skip("needs cpu and cuda: " + "; ".join(f"{b}: {r}" for b, r in missing.items()))
    cuda = pymetalnn.device("cuda")  # first: see test_cpu_device_then_cupy_import
    return pymetalnn.device("cpu"), cuda


def run_both(pair, fn):
    return [fn(dev) for dev in pair]


def lib(dev, name):
    return dev.library(kernel_path(name))


def case_simd_int(dev):
    n, k = 213, 20
    r = rng(1)
    x = r.integers(-1000, 1000, n).astype(np.int32)
    p = r.choice(np.array([-1, 1], np.int32), n)
    out = dev.buffer(np.zeros(n * 12, np.int32))
    iout = dev.buffer(np.zeros(n * 4, np.int32))
    lib(dev, "simd").kernel("simd_int")(n, dev.buffer(x), dev.buffer(p), out, iout, SimdParams(n, k))
    o = out.numpy(np.int32, (n, 12)).copy()
    o[:, [6, 8, 9, 11]] = 0  # shuffles that may read inactive lanes: undefined
    active = (np.arange(n) % 32) < k
    return {"out": o[active], "iout": iout.numpy(np.int32, (n, 4))[active]}


def case_atomics(dev):
    n = 64 * 256 + 77
    r = rng(2)
    xi = r.integers(-10**6, 10**6, n, dtype=np.int32)
    ci = dev.buffer(np.array([0, 2**31 - 1, -2**31, 1000], np.int32))
    cu = dev.buffer(np.array([0, 0, 0xFFFFFFFF, 0, 0, 0xFFFFFFFF, 7], np.uint32))
    old = dev.buffer(np.zeros(n, np.int32))
    lib(dev, "atomics").kernel("atomic_contention")(n, ci, cu, old, dev.buffer(xi), n)
    return {"ci": ci.numpy(np.int32), "cu": cu.numpy(np.uint32),
            "old_sorted": np.sort(old.numpy(np.int32))}


def case_conversions(dev):
    n = 2048
    r = rng(3)
    f = r.uniform(-7e4, 7e4, n).astype(np.float32)
    f[::3] = r.uniform(-1e-4, 1e-4, f[::3].size)
    h = r.integers(0, 2**16, n).astype(np.uint16)
    h[(h & 0x7C00) == 0x7C00] = 0x3C00  # finite halves
    i = r.integers(-65519, 65520, n).astype(np.int32)
    u = r.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
    bufs = [dev.buffer(np.zeros(n, np.float16)), dev.buffer(np.zeros(n, np.float32)),
            dev.buffer(np.zeros(n * 6, np.int32)), dev.buffer(np.zeros(n * 4, np.uint32)),
            dev.buffer(np.zeros(n * 3, np.float32)), dev.buffer(np.zeros(n * 3, np.float16))]
    lib(dev, "types").kernel("conversions")(n, dev.buffer(f), dev.buffer(h.view(np.float16)),
                                            dev.buffer(i), dev.buffer(u), *bufs, n)
    dts = [np.float16, np.float32, np.int32, np.uint32, np.float32, np.float16]
    return {f"conv{j}": b.numpy(dt) for j, (b, dt) in enumerate(zip(bufs, dts))}


def case_half(dev):
    n = 4096
    r = rng(4)
    a, b, c = (r.integers(0, 2**16, n).astype(np.uint16) for _ in range(3))
    for v in (a, b, c):
        v[(v & 0x7C00) == 0x7C00] = 0x4000
    out = dev.buffer(np.zeros(n * 12, np.float16))
    fout = dev.buffer(np.zeros(n * 2, np.float32))
    lib(dev, "types").kernel("half_arith")(n, *(dev.buffer(v.view(np.float16)) for v in (a, b, c)),
                                           out, fout, n)
    x = r.uniform(-30, 30, (n, 4)).astype(np.float16)
    y = r.uniform(-30, 30, (n, 4)).astype(np.float16)
    hout = dev.buffer(np.zeros(n * 24, np.float16))
    hf = dev.buffer(np.zeros(n * 4, np.float32))
    lib(dev, "types").kernel("vec_half")(n, dev.buffer(x), dev.buffer(y), hout, hf, n)
    return {"half_arith": out.numpy(np.float16), "half_float": fout.numpy(np.float32),
            "half4": hout.numpy(np.float16)}


def case_integers(dev):
    n = 1000
    r = rng(5)
    x = r.integers(-1000, 1000, (n, 4)).astype(np.int32)
    y = r.integers(1, 50, (n, 4)).astype(np.int32) * r.choice([-1, 1], (n, 4)).astype(np.int32)
    u = r.integers(0, 2**32, (n, 2), dtype=np.uint64).astype(np.uint32)
    out = dev.buffer(np.zeros(n * 40, np.int32))
    uout = dev.buffer(np.zeros(n * 6, np.uint32))
    lib(dev, "types").kernel("vec_int")(n, dev.buffer(x), dev.buffer(y), dev.buffer(u), out, uout, n)
    xs = r.integers(-1000, 1000, 10_001).astype(np.int32)
    part = dev.buffer(np.zeros(7, np.int32))
    lib(dev, "grid").kernel("reduce_int_64")(7 * 64, dev.buffer(xs), part, 10_001)
    return {"vec_int": out.numpy(np.int32), "vec_uint": uout.numpy(np.uint32),
            "reduce": part.numpy(np.int32)}


@pytest.mark.parametrize("case", [case_simd_int, case_atomics, case_conversions, case_half,
                                  case_integers], ids=lambda f: f.__name__[5:])
def test_cpu_and_cuda_bit_identical(pair, case) -> None:
    cpu, cuda = run_both(pair, case)
    assert cpu.keys() == cuda.keys()
    for key in cpu:
        assert_bits_equal(cuda[key], cpu[key], what=f"{case.__name__}: {key} (cuda vs cpu)")


def test_cpu_device_then_cupy_import() -> None:
    """Creating the cpu device first must not break importing CuPy (and its C++ extensions)
    afterwards in the same process. Run in a subprocess: the failure mode is a crash."""
    if os.environ.get("PYMETALNN_BACKEND"):
        pytest.skip(f"PYMETALNN_BACKEND={os.environ['PYMETALNN_BACKEND']}: one backend only")
    avail = pymetalnn.availability()
    if avail["cuda"] or avail["cpu"]:
        pytest.skip(f"needs cpu and cuda: cpu: {avail['cpu']}; cuda: {avail['cuda']}")
    code = "import pymetalnn; pymetalnn.device('cpu'); import cupy; print('ok')"
    root = os.path.dirname(os.path.dirname(os.path.abspath(pymetalnn.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env=env)
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stderr[-2000:])
