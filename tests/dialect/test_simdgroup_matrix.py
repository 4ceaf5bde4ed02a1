"""simdgroup matrices (MSL 2.3 <metal_simdgroup_matrix>) against numpy float64 references:
loads and stores with elements_per_row, matrix_origin and transpose_matrix from device and
threadgroup memory, simdgroup_multiply(_accumulate) with float, half and mixed (half x half into
float) operands, make_filled_simdgroup_matrix and the diagonal constructor.

Tolerances come from unit roundoff: products of halves are exact in float, so float
accumulators differ from float64 by at most ~K * 2^-24 * sum|a||b|; a half result adds one
rounding to half (2^-11 relative) per 8-deep step plus the final one.
"""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
from helpers import rng


class SgmParams(ctypes.Structure):
    _fields_ = [("ksteps", ctypes.c_uint32), ("lda", ctypes.c_uint32),
                ("transpose_a", ctypes.c_uint32), ("transpose_b", ctypes.c_uint32)]


DT = {"f": np.float32, "h": np.float16}


@pytest.mark.parametrize("variant", ["fff", "fhf", "hhh"])
@pytest.mark.parametrize("ksteps", [1, 3])
@pytest.mark.parametrize("ta,tb", [(0, 0), (1, 0), (0, 1), (1, 1)])
def test_multiply_accumulate(dev, load, variant, ksteps, ta, tb):
    td, tab, tc = (DT[ch] for ch in variant)
    groups, kk = 5, 8 * ksteps
    r = rng(11 + ksteps)
    a = r.standard_normal((groups, 8, kk)).astype(tab)
    b = r.standard_normal((groups, kk, 8)).astype(tab)
    c = r.standard_normal((groups, 8, 8)).astype(tc)
    a_mem = np.ascontiguousarray(a.transpose(0, 2, 1)) if ta else a
    b_mem = np.ascontiguousarray(b.transpose(0, 2, 1)) if tb else b
    d = dev.buffer(groups * 64 * np.dtype(td).itemsize)
    lib = load("simdgroup_matrix")
    lib.kernel(f"mac_{variant}")(groups * 32, dev.buffer(a_mem), dev.buffer(b_mem), dev.buffer(c), d,
                                 SgmParams(ksteps, kk, ta, tb))
    got = d.numpy(td).reshape(groups, 8, 8).astype(np.float64)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    ref = np.einsum("gik,gkj->gij", a64, b64) + c.astype(np.float64)
    mag = np.einsum("gik,gkj->gij", np.abs(a64), np.abs(b64)) + np.abs(c.astype(np.float64))
    if td == np.float16:
        tol = (ksteps + 1) * 2.0 ** -11 * mag + 1e-3
    else:
        tol = (kk + 2) * 2.0 ** -24 * mag
    err = np.abs(got - ref)
    assert np.all(err <= tol), f"max err {err.max():.3g}, tol at that point {tol.flat[err.argmax()]:.3g}"
    # and not accidentally exact zero / uninitialized: the reference is far from 0 somewhere
    assert np.abs(ref).max() > 1.0


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_threadgroup_multiply_fill_diagonal(dev, load, dtype):
    groups = 3
    r = rng(5)
    a = r.standard_normal((groups, 8, 8)).astype(dtype)
    b = r.standard_normal((groups, 8, 8)).astype(dtype)
    out = dev.buffer(groups * 64 * np.dtype(dtype).itemsize)
    name = "tg_mul_float" if dtype == np.float32 else "tg_mul_half"
    load("simdgroup_matrix").kernel(name)(groups * 32, dev.buffer(a), dev.buffer(b), out)
    got = out.numpy(dtype).reshape(groups, 8, 8).astype(np.float64)
    ref = np.einsum("gik,gkj->gij", a.astype(np.float64), b.astype(np.float64))
    ref = ref + 2 * np.eye(8) + 0.5
    ref = ref.transpose(0, 2, 1)
    tol = 1e-5 if dtype == np.float32 else 3 * 2.0 ** -11 * (np.abs(ref) + 8) + 2e-3
    np.testing.assert_allclose(got, ref, rtol=0, atol=np.max(tol) if np.ndim(tol) else tol)


def test_named_types_and_origin(dev, load):
    r = rng(9)
    a = r.standard_normal((8, 8)).astype(np.float16)
    out = dev.buffer(np.full((8, 16), -7.0, np.float32))
    load("simdgroup_matrix").kernel("named_types")(32, dev.buffer(a), out)
    got = out.numpy(np.float32).reshape(8, 16)
    np.testing.assert_array_equal(got[:, :8], -7.0)  # left half untouched
    np.testing.assert_allclose(got[:, 8:], a.astype(np.float64) + 1.0, rtol=0, atol=1e-6)


def test_tf32_opt_in(dev, load):
    """PMN_MATRIX_TF32: float matrices on TF32 tensor cores on cuda (operands keep 10 mantissa
    bits: errors of order 2^-11 of the magnitudes), exact fp32 elsewhere (the define only
    configures the cuda prelude)."""
    groups, ksteps = 4, 4
    kk = 8 * ksteps
    r = rng(21)
    a = r.standard_normal((groups, 8, kk)).astype(np.float32)
    b = r.standard_normal((groups, kk, 8)).astype(np.float32)
    c = r.standard_normal((groups, 8, 8)).astype(np.float32)
    d = dev.buffer(groups * 64 * 4)
    load("simdgroup_matrix", PMN_MATRIX_TF32=1).kernel("mac_fff")(
        groups * 32, dev.buffer(a), dev.buffer(b), dev.buffer(c), d, SgmParams(ksteps, kk, 0, 0))
    got = d.numpy(np.float32).reshape(groups, 8, 8).astype(np.float64)
    ref = np.einsum("gik,gkj->gij", a.astype(np.float64), b.astype(np.float64)) + c
    mag = np.einsum("gik,gkj->gij", np.abs(a).astype(np.float64), np.abs(b)) + np.abs(c)
    err = np.abs(got - ref)
    if dev.name == "cuda":
        assert np.all(err <= 2 * 2.0 ** -10 * mag), err.max()
        assert (err > (kk + 2) * 2.0 ** -24 * mag).any(), "tf32 path not taken"
    else:
        assert np.all(err <= (kk + 2) * 2.0 ** -24 * mag), err.max()
