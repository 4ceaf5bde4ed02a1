"""Every SIMD-group function against numpy references written from the Metal Shading Language
specification (section 6.9.2, tables 6.14 and 6.15):

* reductions (sum, product, min, max, and, or, xor, all, any, ballot) cover the *active* lanes;
* simd_prefix_exclusive_sum: sum over active lanes with a lower index (the first lane gets 0);
  inclusive adds the lane itself; products likewise with 1;
* simd_shuffle_up(data, delta): lane - delta; the lower `delta` lanes keep their own data (no
  wrapping); simd_shuffle_down: lane + delta; the upper `delta` lanes keep their own data;
* simd_shuffle / simd_shuffle_xor / simd_broadcast read another lane, which must be active:
  results read from an inactive lane are undefined and not checked;
* simd_broadcast_first / simd_is_first refer to the active lane with the lowest index.

Partial simdgroups come from lanes that returned early: `gid >= n` (n not a multiple of 32) and
`lane >= k`. Both remove a suffix of lanes, so the active lanes of a simdgroup are 0..m-1.
"""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
from helpers import rng

NF, NI = 12, 4
SIMD_CASES = [  # (n, k): threads past n and lanes >= k return
    (512, 32),   # full simdgroups
    (1, 32),     # one lane
    (213, 32),   # last simdgroup has 21 lanes
    (512, 20),   # every simdgroup has 20 lanes
    (77, 9),     # both
    (300, 1),    # one lane per simdgroup
]


class SimdParams(ctypes.Structure):
    _fields_ = [("n", ctypes.c_uint32), ("k", ctypes.c_uint32)]


def active_groups(n: int, k: int):
    """(base gid, m active lanes) of each simdgroup holding an active thread."""
    for base in range(0, n, 32):
        m = min(32, n - base, k)
        if m > 0:
            yield base, m


def simd_inputs(n: int, dtype, seed: int):
    r = rng(seed)
    lane = np.arange(n) % 32
    grp = np.arange(n) // 32
    if dtype == np.float32:
        x = (r.standard_normal(n) * 1.2).astype(np.float32)
        p = r.uniform(0.8, 1.25, n).astype(np.float32)
    else:
        x = r.integers(-1000, 1000, n).astype(np.int32)
        x[grp % 3 == 0] = np.abs(x[grp % 3 == 0])               # simd_all(v > -2) holds
        x[grp % 3 == 1] = np.minimum(x[grp % 3 == 1], 2)        # simd_any(v > 2) fails
        p = r.choice(np.array([-1, 1], dtype=np.int32), n)
        p[lane % 8 == 0] = 2                                    # products stay small
    return x, p


def simd_reference(x, p, n, k, dtype):
    """want[gid, op] and defined[gid, op] (False where Metal leaves the result undefined)."""
    want = np.zeros((n, NF), dtype=np.float64)
    defined = np.zeros((n, NF), dtype=bool)
    iwant = np.zeros((n, NI), dtype=np.int64)
    idef = np.zeros((n, NI), dtype=bool)
    for base, m in active_groups(n, k):
        xs = x[base:base + m].astype(np.float64 if dtype == np.float32 else np.int64)
        ps = p[base:base + m].astype(np.float64 if dtype == np.float32 else np.int64)
        ballot = sum(1 << j for j in range(m) if xs[j] > 0)
        for lane in range(m):
            g = base + lane
            w = want[g]
            w[0], w[1], w[2] = xs.sum(), xs.max(), xs.min()
            w[3], w[4] = xs[:lane].sum(), xs[:lane + 1].sum()
            w[5] = xs[(lane * 7 + 3) % m]
            w[6] = xs[lane ^ 1] if (lane ^ 1) < m else np.nan
            w[7] = xs[lane] if lane < 3 else xs[lane - 3]
            w[8] = xs[lane] if lane + 5 >= 32 else (xs[lane + 5] if lane + 5 < m else np.nan)
            w[9] = xs[2] if m > 2 else np.nan
            w[10] = np.prod(ps)
            w[11] = xs[lane ^ 16] if (lane ^ 16) < m else np.nan
            defined[g] = ~np.isnan(w)
            iwant[g] = [int((xs > -2).all()), int((xs > 2).any()),
                        int(np.uint32(ballot).view(np.int32)), 1]
            idef[g] = True
    return want, defined, iwant, idef


def run_simd(load, name, dtype, n, k, seed):
    dev = load("simd").device
    kern = load("simd").kernel(name)
    x, p = simd_inputs(n, dtype, seed)
    out = dev.buffer(np.zeros(n * NF, dtype=dtype))
    iout = dev.buffer(np.zeros(n * NI, dtype=np.int32))
    kern(n, dev.buffer(x), dev.buffer(p), out, iout, SimdParams(n, k))
    return x, p, out.numpy(dtype, (n, NF)), iout.numpy(np.int32, (n, NI))


OPS = ["simd_sum", "simd_max", "simd_min", "simd_prefix_exclusive_sum",
       "simd_prefix_inclusive_sum", "simd_shuffle", "simd_shuffle_xor(1)", "simd_shuffle_up(3)",
       "simd_shuffle_down(5)", "simd_broadcast(2)", "simd_product", "simd_shuffle_xor(16)"]
IOPS = ["simd_all", "simd_any", "simd_ballot", "simd_all(lane < m)"]


@pytest.mark.parametrize("n,k", SIMD_CASES)
def test_simd_int(load, n: int, k: int) -> None:
    x, p, got, igot = run_simd(load, "simd_int", np.int32, n, k, seed=n * 100 + k)
    want, defined, iwant, idef = simd_reference(x, p, n, k, np.int32)
    for op, label in enumerate(OPS):
        d = defined[:, op]
        np.testing.assert_array_equal(got[d, op], want[d, op].astype(np.int32),
                                      err_msg=f"{label} n={n} k={k}")
    for op, label in enumerate(IOPS):
        d = idef[:, op]
        np.testing.assert_array_equal(igot[d, op], iwant[d, op].astype(np.int32),
                                      err_msg=f"{label} n={n} k={k}")


@pytest.mark.parametrize("n,k", SIMD_CASES)
def test_simd_float(load, n: int, k: int) -> None:
    x, p, got, igot = run_simd(load, "simd_float", np.float32, n, k, seed=n * 100 + k + 1)
    want, defined, iwant, idef = simd_reference(x, p, n, k, np.float32)
    exact = {1, 2, 5, 6, 7, 8, 9, 11}  # selections: bit-exact
    for op, label in enumerate(OPS):
        d = defined[:, op]
        if op in exact:
            np.testing.assert_array_equal(got[d, op], want[d, op].astype(np.float32),
                                          err_msg=f"{label} n={n} k={k}")
        else:  # sums and products: any association order
            np.testing.assert_allclose(got[d, op], want[d, op], rtol=2e-5, atol=2e-5,
                                       err_msg=f"{label} n={n} k={k}")
    for op, label in enumerate(IOPS):
        d = idef[:, op]
        np.testing.assert_array_equal(igot[d, op], iwant[d, op].astype(np.int32),
                                      err_msg=f"{label} n={n} k={k}")


@pytest.mark.parametrize("n,k", [(512, 32), (213, 32), (77, 9), (300, 1)])
def test_simd_int_bitwise_prefix_product_first(load, n: int, k: int) -> None:
    lib = load("simd")
    dev = lib.device
    x, p = simd_inputs(n, np.int32, seed=7 * n + k)
    out = dev.buffer(np.full(n * 8, -99, dtype=np.int32))
    lib.kernel("simd_int_extra")(n, dev.buffer(x), dev.buffer(p), out, SimdParams(n, k))
    got = out.numpy(np.int32, (n, 8))
    want = np.full((n, 8), -99, dtype=np.int64)
    for base, m in active_groups(n, k):
        xs = x[base:base + m].astype(np.int64)
        ps = p[base:base + m].astype(np.int64)
        for lane in range(m):
            want[base + lane] = [
                np.bitwise_and.reduce(xs), np.bitwise_or.reduce(xs), np.bitwise_xor.reduce(xs),
                np.prod(ps[:lane]), np.prod(ps[:lane + 1]), xs[0], int(lane == 0),
                int(np.uint32(xs.sum() % 2**32).view(np.int32)),
            ]
    labels = ["simd_and", "simd_or", "simd_xor", "simd_prefix_exclusive_product",
              "simd_prefix_inclusive_product", "simd_broadcast_first", "simd_is_first",
              "simd_sum(uint)"]
    for op, label in enumerate(labels):
        np.testing.assert_array_equal(got[:, op], want[:, op].astype(np.int32),
                                      err_msg=f"{label} n={n} k={k}")


@pytest.mark.parametrize("n,k", [(512, 32), (213, 32), (77, 9)])
def test_simd_uint_and_float_prefix_products(load, n: int, k: int) -> None:
    lib = load("simd")
    dev = lib.device
    r = rng(n + k)
    xu = r.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
    pf = r.uniform(0.8, 1.25, n).astype(np.float32)
    ou = dev.buffer(np.zeros(n * 4, dtype=np.uint32))
    of = dev.buffer(np.zeros(n * 2, dtype=np.float32))
    lib.kernel("simd_uint_float_extra")(n, dev.buffer(xu), dev.buffer(pf), ou, of,
                                        SimdParams(n, k))
    gu = ou.numpy(np.uint32, (n, 4))
    gf = of.numpy(np.float32, (n, 2))
    for base, m in active_groups(n, k):
        us = xu[base:base + m].astype(np.uint64)
        fs = pf[base:base + m].astype(np.float64)
        for lane in range(m):
            g = base + lane
            want_u = [us.max(), us.min(), us.sum() % 2**32, us[:lane].sum() % 2**32]
            np.testing.assert_array_equal(gu[g], np.array(want_u, dtype=np.uint32),
                                          err_msg=f"uint max/min/sum/prefix gid={g}")
            np.testing.assert_allclose(gf[g], [np.prod(fs[:lane]), np.prod(fs[:lane + 1])],
                                       rtol=1e-5, err_msg=f"float prefix products gid={g}")


def _run_int_lanes(load, kernel: str, n: int, seed: int):
    """Run simd.metal's `kernel` on n random ints: (the ints, its (n, 3) int results)."""
    lib = load("simd")
    dev = lib.device
    x = rng(seed).integers(-500, 500, n, dtype=np.int32)
    out = dev.buffer(np.zeros(n * 3, dtype=np.int32))
    lib.kernel(kernel)(n, dev.buffer(x), out)
    return x, out.numpy(np.int32, (n, 3))


def test_simd_in_divergent_branches_and_loops(load) -> None:
    n = 512
    x, got = _run_int_lanes(load, "simd_divergent", n, 21)
    lanes = np.arange(32)
    loops_per_lane = {0: 0, 1: 24, 2: 24 + 16, 3: 24 + 16 + 8}  # active lanes per iteration
    for base in range(0, n, 32):
        xs = x[base:base + 32].astype(np.int64)
        odd_sum = xs[lanes % 2 == 1].sum()
        even_min = xs[lanes % 2 == 0].min()
        for lane in range(32):
            want = [odd_sum if lane % 2 else even_min, loops_per_lane[lane % 4], xs.sum()]
            np.testing.assert_array_equal(got[base + lane], want, err_msg=f"lane {lane}")


def test_simd_lanes_returning_between_calls(load) -> None:
    n = 512
    x, got = _run_int_lanes(load, "simd_midreturn", n, 26)
    lanes = np.arange(32)
    stay = lanes % 8 < 5             # lanes that pass the first return
    stay2 = stay & (lanes < 20)      # ... and the second
    for base in range(0, n, 32):
        xs = x[base:base + 32].astype(np.int64)
        for lane in range(32):
            if not stay[lane]:
                want = [xs.sum(), -1, -1]
            elif not stay2[lane]:
                want = [xs.sum(), xs[stay].sum(), -2]
            else:
                act = xs[stay2]
                before = xs[stay2 & (lanes < lane)].sum()
                want = [xs.sum(), xs[stay].sum(), before + act.max()]
            np.testing.assert_array_equal(got[base + lane], want, err_msg=f"lane {lane}")


def test_simd_in_helper_function(load) -> None:
    lib = load("simd")
    dev = lib.device
    n = 512  # whole threadgroups: the kernel has no bound check
    x = rng(22).integers(-100, 100, n, dtype=np.int32)
    out = dev.buffer(np.zeros(n, dtype=np.int32))
    lib.kernel("simd_helper")(n, dev.buffer(x), out)
    want = np.concatenate([np.cumsum(x[b:b + 32]) for b in range(0, n, 32)])
    np.testing.assert_array_equal(out.numpy(np.int32), want)


def test_simdgroup_barrier(load) -> None:
    lib = load("simd")
    dev = lib.device
    n = 64 * 3
    x = rng(23).integers(-100, 100, n, dtype=np.int32)
    out = dev.buffer(np.zeros(n, dtype=np.int32))
    lib.kernel("simd_barrier")(n, dev.buffer(x), out)
    gid = np.arange(n)
    want = 2 * x[(gid - gid % 32) + (gid % 32 + 1) % 32]
    np.testing.assert_array_equal(out.numpy(np.int32), want)


def test_simd_half(load) -> None:
    lib = load("simd_vec")
    dev = lib.device
    n = 256  # whole threadgroups: the kernel has no bound check
    x = rng(24).integers(-8, 9, n).astype(np.float16)  # small integers: half sums are exact
    out = dev.buffer(np.zeros(n * 5, dtype=np.float16))
    lib.kernel("simd_half")(n, dev.buffer(x), out)
    got = out.numpy(np.float16, (n, 5))
    lane = np.arange(n) % 32
    base = np.arange(n) - lane
    xs = x.astype(np.float64).reshape(-1, 32)
    want = np.stack([
        np.repeat(xs.sum(1), 32), np.repeat(xs.max(1), 32), x[base + (lane ^ 3)],
        np.cumsum(xs, axis=1).reshape(-1), x[base + 31 - lane],
    ], axis=1).astype(np.float16)
    np.testing.assert_array_equal(got, want)


def test_simd_vector_types(load) -> None:
    lib = load("simd_vec")
    dev = lib.device
    n = 256  # whole threadgroups: the kernel has no bound check
    r = rng(25)
    x = r.standard_normal((n, 4)).astype(np.float32)
    y = r.integers(-1000, 1000, (n, 2)).astype(np.int32)
    o4 = dev.buffer(np.zeros(n * 3 * 4, dtype=np.float32))
    o2 = dev.buffer(np.zeros(n * 3 * 2, dtype=np.int32))
    lib.kernel("simd_vector")(n, dev.buffer(x), dev.buffer(y), o4, o2)
    g4 = o4.numpy(np.float32, (n, 3, 4))
    g2 = o2.numpy(np.int32, (n, 3, 2))
    lane = np.arange(n) % 32
    base = np.arange(n) - lane
    down = np.where((lane + 1 >= 32)[:, None], x, x[np.minimum(np.arange(n) + 1, n - 1)])
    np.testing.assert_array_equal(g4[:, 0], down, err_msg="simd_shuffle_down(float4)")
    np.testing.assert_array_equal(g4[:, 1], np.repeat(x.reshape(-1, 32, 4).max(1), 32, axis=0),
                                  err_msg="simd_max(float4)")
    np.testing.assert_array_equal(g4[:, 2], x[base + 7], err_msg="simd_broadcast(float4)")
    y64 = y.astype(np.int64).reshape(-1, 32, 2)
    np.testing.assert_array_equal(g2[:, 0], np.repeat(y64.sum(1), 32, axis=0),
                                  err_msg="simd_sum(int2)")
    up = np.where((lane < 4)[:, None], y, y[np.maximum(np.arange(n) - 4, 0)])
    np.testing.assert_array_equal(g2[:, 1], up, err_msg="simd_shuffle_up(int2)")
    excl = (np.cumsum(y64, axis=1) - y64).reshape(-1, 2)
    np.testing.assert_array_equal(g2[:, 2], excl, err_msg="simd_prefix_exclusive_sum(int2)")
