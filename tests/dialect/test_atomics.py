"""Atomics under contention: many threadgroups update the same few words."""
from __future__ import annotations

import numpy as np
import pytest
from helpers import rng

N_CONTENDED = 64 * 256 + 77  # many threadgroups, last one partial


@pytest.mark.parametrize("n", [1, 33, N_CONTENDED])
def test_contended_fetch_ops(load, n: int) -> None:
    lib = load("atomics")
    dev = lib.device
    r = rng(n)
    xi = r.integers(-10**6, 10**6, n, dtype=np.int32)
    ci0 = np.array([0, 2**31 - 1, -2**31, 1000], dtype=np.int32)
    cu0 = np.array([0, 0, 0xFFFFFFFF, 0, 0, 0xFFFFFFFF, 0x12345678], dtype=np.uint32)
    ci, cu = dev.buffer(ci0), dev.buffer(cu0)
    old = dev.buffer(np.full(n, -1, dtype=np.int32))
    lib.kernel("atomic_contention")(n, ci, cu, old, dev.buffer(xi), n)

    gi = ci.numpy(np.int32)
    gu = cu.numpy(np.uint32)
    gid = np.arange(n, dtype=np.uint64)
    assert gi[0] == n, "atomic_int fetch_add(1) lost updates"
    # each fetch_add returned a distinct previous value: exactly 0..n-1
    np.testing.assert_array_equal(np.sort(old.numpy(np.int32)), np.arange(n, dtype=np.int32))
    assert gi[1] == xi.min() and gi[2] == xi.max(), "atomic_int fetch_min/max"
    assert gi[3] == 1000 - 2 * n, "atomic_int fetch_sub"
    assert gu[0] == gid.sum() % 2**32, "atomic_uint fetch_add"
    assert gu[1] == (-int(gid.sum())) % 2**32, "atomic_uint fetch_sub wraps"
    xu = xi.view(np.uint32)
    assert gu[2] == xu.min() and gu[3] == xu.max(), "atomic_uint fetch_min/max (unsigned order)"
    assert gu[4] == np.bitwise_or.reduce((np.uint64(1) << (gid % 32)) & 0xFFFFFFFF), "fetch_or"
    assert gu[5] == np.uint32(0xFFFFFFFF) & ~np.bitwise_or.reduce(
        (np.uint64(1) << (gid % 29)).astype(np.uint32)), "fetch_and"
    assert gu[6] == np.bitwise_xor.reduce(
        np.concatenate([[np.uint64(0x12345678)], (gid * 2654435761) % 2**32])), "fetch_xor"


@pytest.mark.parametrize("n", [1, 33, N_CONTENDED])
def test_contended_float_fetch_ops(load, backend: str, n: int) -> None:
    if backend == "metal":
        pytest.skip("atomic_float is MSL 3.0; metalcompute compiles MSL 2.3")
    lib = load("atomics_float")
    dev = lib.device
    x = rng(n).uniform(-1.0, 1.0, n).astype(np.float32)
    cf = dev.buffer(np.array([0.5, 0.0], dtype=np.float32))
    lib.kernel("atomic_float_contention")(n, cf, dev.buffer(x), n)
    gf = cf.numpy(np.float32)
    np.testing.assert_allclose(gf[0], 0.5 + x.astype(np.float64).sum(), rtol=0, atol=1e-3 + n * 1e-6,
                               err_msg="atomic_float fetch_add")
    np.testing.assert_allclose(gf[1], -x.astype(np.float64).sum(), rtol=0, atol=1e-3 + n * 1e-6,
                               err_msg="atomic_float fetch_sub")


def test_compare_exchange_loops(load) -> None:
    lib = load("atomics")
    dev = lib.device
    n = N_CONTENDED
    x = rng(2).standard_normal(n).astype(np.float32) * 100
    fmax = dev.buffer(np.array([np.float32(-np.inf)]).view(np.uint32))
    acc = dev.buffer(np.array([5], dtype=np.int32))
    lib.kernel("atomic_cas")(n, fmax, acc, dev.buffer(x), n)
    assert fmax.numpy(np.float32)[0] == x.max(), "CAS-loop float max"
    assert acc.numpy(np.int32)[0] == 5 + int((np.arange(n) % 7).sum()), "CAS-loop int add"


def test_exchange_store_load(load) -> None:
    lib = load("atomics")
    dev = lib.device
    n = 5000
    slot = dev.buffer(np.array([-42], dtype=np.int32))
    olds = dev.buffer(np.zeros(n, dtype=np.int32))
    cells = dev.buffer(np.zeros(n, dtype=np.int32))
    ucells = dev.buffer(np.zeros(n, dtype=np.uint32))
    lib.kernel("atomic_xchg_store")(n, slot, olds, cells, ucells, n)
    # the exchanges form one chain: {old values} + {final} == {initial} + {stored values}
    got = np.sort(np.concatenate([olds.numpy(np.int32), slot.numpy(np.int32)]))
    want = np.sort(np.concatenate([[-42], np.arange(n) + 1]))
    np.testing.assert_array_equal(got, want)
    gid = np.arange(n, dtype=np.int64)
    np.testing.assert_array_equal(cells.numpy(np.int32), gid * 3 - 7)
    out = dev.buffer(np.zeros(n, dtype=np.int32))
    uout = dev.buffer(np.zeros(n, dtype=np.uint32))
    lib.kernel("atomic_load_other")(n, cells, ucells, out, uout, n)
    j = (gid * 7 + 3) % n
    np.testing.assert_array_equal(out.numpy(np.int32), j * 3 - 7)
    np.testing.assert_array_equal(uout.numpy(np.uint32), (j ^ 0xDEADBEEF).astype(np.uint32))


def test_threadgroup_atomics(load) -> None:
    lib = load("atomics")
    dev = lib.device
    n = 128 * 9 + 50
    ng = -(-n // 128)
    xi = rng(4).integers(-1000, 1000, n, dtype=np.int32)
    sums = dev.buffer(np.zeros(ng, dtype=np.int32))
    hist = dev.buffer(np.zeros(ng * 16, dtype=np.uint32))
    lib.kernel("atomic_threadgroup")(n, sums, hist, dev.buffer(xi), n)
    want_s = np.array([xi[g * 128:(g + 1) * 128].sum() for g in range(ng)])
    want_h = np.stack([np.bincount(xi[g * 128:(g + 1) * 128].view(np.uint32) & 15, minlength=16)
                       for g in range(ng)])
    np.testing.assert_array_equal(sums.numpy(np.int32), want_s)
    np.testing.assert_array_equal(hist.numpy(np.uint32, (ng, 16)), want_h)
