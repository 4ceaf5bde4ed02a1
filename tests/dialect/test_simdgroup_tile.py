"""simdgroup_load_tile / simdgroup_multiply_accumulate_tile (kernels/simdgroup_tile.h, pymetalnn's
tile extension of MSL 2.3 simdgroup matrices) against numpy float64 references: tiles staged in
threadgroup memory at 16-byte aligned and unaligned row pitches and offsets (cuda takes ldmatrix
for the former, 8x8 loads for the latter), B loaded as matrices or read by the product itself,
even and odd row grids and column counts, half x half into float and half, float x float.

Tolerances from unit roundoff: products of halves are exact in float, so a float accumulator
is within ~(K + 2) * 2^-24 * sum|a||b| of float64 (2^-23 here: the tensor core's own order and
rounding of its 16-deep sums); a half accumulator adds one rounding to half (2^-11 relative)
per 8-deep product at most (cpu and Metal: per 8x8 operation; cuda: per 16-deep mma).
"""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
from helpers import rng


class TileParams(ctypes.Structure):
    _fields_ = [("ksteps", ctypes.c_uint32), ("pa", ctypes.c_uint32), ("pb", ctypes.c_uint32),
                ("offset", ctypes.c_uint32), ("b_direct", ctypes.c_uint32)]


DT = {"f": np.float32, "h": np.float16}
KERNELS = [("hf", 2, 4), ("hf", 3, 2), ("hf", 4, 1), ("hh", 2, 4), ("hh", 3, 2), ("ff", 2, 2)]


@pytest.mark.parametrize("variant,fm,fn", KERNELS, ids=[f"{v}_{m}x{n}" for v, m, n in KERNELS])
@pytest.mark.parametrize("ksteps", [1, 2])
@pytest.mark.parametrize("layout", ["aligned", "odd_pitch", "offset"])
@pytest.mark.parametrize("b_direct", [0, 1], ids=["b_loaded", "b_from_memory"])
def test_tile_multiply_accumulate(dev, load, variant, fm, fn, ksteps, layout, b_direct):
    tab, tc = DT[variant[0]], DT[variant[1]]
    groups, kk, rows, cols = 3, 16 * ksteps, 8 * fm, 8 * fn
    pa, pb, offset = kk + 8, cols + 8, 0  # rows of 16-byte multiples (half)
    if layout == "odd_pitch":
        pa, pb = kk + 3, cols + 1
    elif layout == "offset":
        offset = 3
    r = rng(100 + 7 * fm + fn + ksteps)
    a = r.standard_normal((groups, rows, kk)).astype(tab)
    b = r.standard_normal((groups, kk, cols)).astype(tab)
    c = r.standard_normal((groups, rows, cols)).astype(tc)
    d = dev.buffer(np.full(c.shape, np.nan, tc))
    lib = load("simdgroup_tile")
    lib.kernel(f"tile_mac_{variant}_{fm}x{fn}")(groups * 32, dev.buffer(a), dev.buffer(b),
                                                dev.buffer(c), d,
                                                TileParams(ksteps, pa, pb, offset, b_direct))
    got = d.numpy(tc).reshape(c.shape).astype(np.float64)
    a64, b64, c64 = a.astype(np.float64), b.astype(np.float64), c.astype(np.float64)
    want = np.einsum("gik,gkj->gij", a64, b64) + c64
    mag = np.einsum("gik,gkj->gij", np.abs(a64), np.abs(b64)) + np.abs(c64)
    if tc == np.float16:
        tol = (2 * ksteps + 1) * 2.0 ** -11 * mag + 1e-3
    else:
        tol = (kk + 2) * 2.0 ** -23 * mag
    err = np.abs(got - want)
    assert np.all(err <= tol), f"max err {err.max():.3g}, tol there {tol.flat[err.argmax()]:.3g}"
    assert np.abs(want).max() > 1.0


def test_tile_matches_8x8_operations_on_cpu(dev, load):
    """On the cpu backend the tile functions are the 8x8 operations they stand for, in the
    documented order: bit-identical to the same sums done by the reference order in float32."""
    if dev.name != "cpu":
        pytest.skip("exact order only on the cpu emulation")
    groups, fm, fn, ksteps = 2, 2, 4, 2
    kk, rows, cols = 16 * ksteps, 8 * fm, 8 * fn
    r = rng(3)
    a = r.standard_normal((groups, rows, kk)).astype(np.float16)
    b = r.standard_normal((groups, kk, cols)).astype(np.float16)
    c = r.standard_normal((groups, rows, cols)).astype(np.float32)
    d = dev.buffer(c.nbytes)
    load("simdgroup_tile").kernel("tile_mac_hf_2x4")(groups * 32, dev.buffer(a), dev.buffer(b),
                                                     dev.buffer(c), d,
                                                     TileParams(ksteps, kk + 8, cols + 8, 0, 1))
    got = d.numpy(np.float32).reshape(c.shape)
    want = c.copy()
    for k in range(kk):  # 8-deep blocks in k order, each summed in k order by fma
        want = (want.astype(np.float64) + a[:, :, k:k + 1].astype(np.float64)
                * b[:, k:k + 1, :].astype(np.float64)).astype(np.float32)
    np.testing.assert_array_equal(got, want)
