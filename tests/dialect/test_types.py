"""half arithmetic (bit-exact against numpy float16), scalar conversions and vector types."""
from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_bits_equal, rng

F16, F32 = np.float16, np.float32


@pytest.fixture
def lib(load):
    """tests/dialect/kernels/types.metal on the test's backend."""
    return load("types")


def random_halves(r: np.random.Generator, n: int, max_exp: int = 15) -> np.ndarray:
    """Finite halves spread over the exponent range (subnormals included), both signs."""
    bits = r.integers(0, 2**16, n, dtype=np.uint32).astype(np.uint16)
    exp = (bits >> 10) & 0x1F
    bits = np.where(exp > max_exp + 15, bits & ~np.uint16(0x7C00) | np.uint16((max_exp + 15) << 10),
                    bits).astype(np.uint16)
    return bits.view(F16)


def half_inputs(n: int, seed: int):
    r = rng(seed)
    a = random_halves(r, n)
    b = random_halves(r, n)
    c = random_halves(r, n)
    # plenty of ordinary magnitudes too, where rounding happens in every operation
    m = n // 2
    a[:m] = (r.uniform(-40, 40, m)).astype(F16)
    b[:m] = (r.uniform(-40, 40, m)).astype(F16)
    c[:m] = (r.uniform(-40, 40, m)).astype(F16)
    b[b == 0] = F16(1.5)
    a[a == 0] = F16(-0.75)
    return a, b, c


def half_reference(a, b, c):
    with np.errstate(all="ignore"):
        t = a + b
        u = a + b
        u = u * c
        u = u - a
        prod = a.astype(np.float64) * b.astype(np.float64)
        fma = (prod + c.astype(np.float64)).astype(F16)  # one rounding, from an exact sum
        fma_exact = (prod + c.astype(np.float64)) - prod == c.astype(np.float64)
        want = np.stack([a + b, a * b, a - b, a / b, fma, -a, t * c, u, a * F16(2.5),
                         np.where(a < b, a, b), a + F16(3), F16(1) / a], axis=1)
        fwant = np.stack([a.astype(F32) * F32(1.1), a.astype(F32) + b.astype(F32)], axis=1)
    return want.astype(F16), fma_exact, fwant


def test_half_arithmetic_bit_exact(lib) -> None:
    dev = lib.device
    n = 4096
    a, b, c = half_inputs(n, seed=1)
    out = dev.buffer(np.zeros(n * 12, dtype=F16))
    fout = dev.buffer(np.zeros(n * 2, dtype=F32))
    lib.kernel("half_arith")(n, dev.buffer(a), dev.buffer(b), dev.buffer(c), out, fout, n)
    got = out.numpy(F16, (n, 12))
    want, fma_exact, fwant = half_reference(a, b, c)
    labels = ["a+b", "a*b", "a-b", "a/b", "fma(a,b,c)", "-a", "(a+b)*c", "compound +=,*=,-=",
              "a*2.5h", "select", "half+int", "half(1)/a"]
    for i, label in enumerate(labels):
        rows = fma_exact if i == 4 else slice(None)
        assert_bits_equal(got[rows, i], want[rows, i], what=label)
    assert_bits_equal(fout.numpy(F32, (n, 2)), fwant, what="half op float -> float")


def test_conversions(lib) -> None:
    dev = lib.device
    r = rng(2)
    n = 4096
    f = np.concatenate([
        r.uniform(-7e4, 7e4, 1024),                       # past HALF_MAX: inf
        r.uniform(-2.0, 2.0, 1024),
        r.uniform(-1e-4, 1e-4, 1024),                     # half subnormals
        (r.integers(-2048, 2048, 1024) + 0.5) / 1024.0,   # ties for the half rounding
    ]).astype(F32)
    f[:4] = [65519.99, 65520.0, -65520.0, 2.0**-25]
    h = random_halves(r, n)
    i = r.integers(-2**31, 2**31, n, dtype=np.int64).astype(np.int32)
    i[: n // 2] = r.integers(-65519, 65520, n // 2)        # in half range
    i[:6] = [2049, -2049, 16777217, 2**31 - 1, -2**31, 65519]
    u = r.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
    u[:3] = [0xFFFFFFFF, 16777217, 0x7F800001]
    bufs = [dev.buffer(np.zeros(n, F16)), dev.buffer(np.zeros(n, F32)),
            dev.buffer(np.zeros(n * 6, np.int32)), dev.buffer(np.zeros(n * 4, np.uint32)),
            dev.buffer(np.zeros(n * 3, F32)), dev.buffer(np.zeros(n * 3, F16))]
    lib.kernel("conversions")(n, dev.buffer(f), dev.buffer(h), dev.buffer(i), dev.buffer(u),
                              *bufs, n)
    f2h, h2f = bufs[0].numpy(F16), bufs[1].numpy(F32)
    io = bufs[2].numpy(np.int32, (n, 6))
    uo = bufs[3].numpy(np.uint32, (n, 4))
    fo = bufs[4].numpy(F32, (n, 3))
    ho = bufs[5].numpy(F16, (n, 3))
    with np.errstate(all="ignore"):
        assert_bits_equal(f2h, f.astype(F16), "float -> half (nearest even, overflow to inf)")
        assert_bits_equal(h2f, h.astype(F32), "half -> float")
        np.testing.assert_array_equal(io[:, 0], np.trunc(h.astype(np.float64)).astype(np.int32),
                                      err_msg="half -> int")
        np.testing.assert_array_equal(io[:, 1], np.trunc(f.astype(np.float64)).astype(np.int32),
                                      err_msg="float -> int")
        np.testing.assert_array_equal(io[:, 2], i.astype(np.int16), err_msg="int -> short")
        np.testing.assert_array_equal(io[:, 3], i.astype(np.int8), err_msg="int -> char")
        np.testing.assert_array_equal(io[:, 4], i.astype(np.uint8), err_msg="int -> uchar")
        np.testing.assert_array_equal(io[:, 5], f.view(np.int32), err_msg="as_type<int>(float)")
        np.testing.assert_array_equal(uo[:, 0], np.trunc(np.abs(f.astype(np.float64))).astype(np.uint32),
                                      err_msg="float -> uint")
        np.testing.assert_array_equal(uo[:, 1], h.view(np.uint16), err_msg="as_type<ushort>(half)")
        np.testing.assert_array_equal(uo[:, 2], h.astype(F32).view(np.uint32),
                                      err_msg="as_type<uint>(float(half))")
        np.testing.assert_array_equal(uo[:, 3], u & 0xFFFF, err_msg="uint -> ushort")
        assert_bits_equal(fo[:, 0], i.astype(F32), "int -> float (nearest even)")
        assert_bits_equal(fo[:, 1], u.astype(F32), "uint -> float (nearest even)")
        assert_bits_equal(fo[:, 2], u.view(F32), "as_type<float>(uint)")
        small = np.abs(i.astype(np.int64)) < 65520
        assert_bits_equal(ho[small, 0], i[small].astype(F16), "int -> half")
        assert_bits_equal(ho[:, 1], (u & 0xFFFF).astype(np.uint16).view(F16),
                          "as_type<half>(ushort)")
        assert_bits_equal(ho[:, 2], (h.astype(F32) * F32(3)).astype(F16), "half(float(h) * 3)")


def fma_double_rounding_cases(r: np.random.Generator, n: int):
    """Halves a, b, c whose exact a*b + c rounds to a different half when first rounded to
    float: they catch an fma that rounds twice."""
    a = r.uniform(-4, 4, 2_000_000).astype(F16)
    b = r.uniform(-4, 4, a.size).astype(F16)
    c = (r.uniform(-1, 1, a.size) * 2.0 ** r.integers(-24, 3, a.size)).astype(F16)
    d = a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)
    hard = np.flatnonzero(d.astype(F16).view(np.uint16) != d.astype(F32).astype(F16).view(np.uint16))
    assert hard.size >= n
    return a[hard[:n]], b[hard[:n]], c[hard[:n]]


def test_half_conversions_exhaustive(lib) -> None:
    """All 65,536 halves to float and through fma(h, h, h) (exact in double, so one rounding to
    half is the reference), fmas that a double rounding gets wrong, and floats around every half
    tie, past HALF_MAX and with NaN payloads to half. NaN results must be the canonical NaN bit
    for bit (half 0x7fff, float 0x7fffffff), whatever conversion instructions the backend uses."""
    dev = lib.device
    hb = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    h = hb.view(F16)
    r = rng(7)
    with np.errstate(all="ignore"):
        # midpoints between neighbouring halves and one float ulp either side of them
        fin = np.isfinite(h) & (hb != 0x7BFF) & (hb != 0xFBFF)
        up = np.nextafter(h, F16(np.inf))
        mid = ((h[fin].astype(np.float64) + up[fin].astype(np.float64)) / 2).astype(F32)
    ties = np.concatenate([mid, np.nextafter(mid, F32(np.inf)), np.nextafter(mid, F32(-np.inf))])
    nan_bits = (r.integers(1, 2**23, 2048, dtype=np.uint64)
                | (r.integers(0, 2, 2048, dtype=np.uint64) << np.uint64(31))
                | np.uint64(0x7F800000)).astype(np.uint32)
    f = np.concatenate([ties, nan_bits.view(F32), r.uniform(-7e4, 7e4, 4096).astype(F32),
                        np.array([np.inf, -np.inf, 0.0, -0.0, 1e-40, -1e-45, 65520.0, -65519.99,
                                  2.0**-25, 2.0**-25 * 1.0000001], F32)]).astype(F32)
    ha, hb2, hc = fma_double_rounding_cases(r, 200)
    fa, fb, fc = (np.concatenate([h, x]) for x in (ha, hb2, hc))
    n = max(h.size, f.size, fa.size)
    f, hbits = np.resize(f, n), np.resize(hb, n)
    fa, fb, fc = np.resize(fa, n), np.resize(fb, n), np.resize(fc, n)
    out = [dev.buffer(np.zeros(n, t)) for t in (F32, F16, F16)]
    lib.kernel("half_convert_all")(n, dev.buffer(hbits), dev.buffer(f), dev.buffer(fa),
                                   dev.buffer(fb), dev.buffer(fc), *out, n)
    hn = hbits.view(F16)
    with np.errstate(all="ignore"):
        want_h2f = np.where(np.isnan(hn), np.uint32(0x7FFFFFFF), hn.astype(F32).view(np.uint32))
        want_f2h = np.where(np.isnan(f), np.uint16(0x7FFF), f.astype(F16).view(np.uint16))
        exact = fa.astype(np.float64) * fb.astype(np.float64) + fc.astype(np.float64)
        want_fma = np.where(np.isnan(exact), np.uint16(0x7FFF), exact.astype(F16).view(np.uint16))
    np.testing.assert_array_equal(out[0].numpy(np.uint32), want_h2f, err_msg="half -> float bits")
    np.testing.assert_array_equal(out[1].numpy(np.uint16), want_f2h, err_msg="float -> half bits")
    np.testing.assert_array_equal(out[2].numpy(np.uint16), want_fma, err_msg="fma bits")

def test_vector_float4(lib) -> None:
    dev = lib.device
    r = rng(3)
    n = 300
    x = r.uniform(-4, 4, (n, 4)).astype(F32)
    y = r.uniform(0.5, 3, (n, 4)).astype(F32) * r.choice([-1, 1], (n, 4)).astype(F32)
    x[::7, 0] = y[::7, 0]  # some equal components for the comparisons
    ia = r.integers(-2**24, 2**24, (n, 4)).astype(np.int32)
    out = dev.buffer(np.zeros(n * 16 * 4, F32))
    lib.kernel("vec_float")(n, dev.buffer(x), dev.buffer(y), dev.buffer(ia), out, n)
    got = out.numpy(F32, (n, 16, 4))
    X, Y, s = x.T, y.T, x[:, 3]
    gid = np.arange(n)
    c = np.float32
    exact = {
        0: np.repeat(s[:, None], 4, axis=1),
        1: np.stack([X[0], Y[1], X[2], Y[3]], 1),
        2: np.stack([X[0], X[1], Y[2], Y[3]], 1),
        3: np.stack([X[0], X[1], X[2], Y[0]], 1),
        4: np.stack([Y[1], X[3], X[2], X[1]], 1),
        5: np.stack([X[1], Y[0], X[3], np.full(n, 7, F32)], 1),
        6: ia.astype(F32),
        7: x + y, 9: x * y, 10: x / y, 12: -x,
        14: (x < y).astype(F32),
        15: np.stack([X[3], y[gid, gid % 4], X[1], (X[2] > Y[2]).astype(F32) + 1], 1),
    }
    for i, want in exact.items():
        np.testing.assert_array_equal(got[:, i], want.astype(F32), err_msg=f"vec_float o[{i}]")
    # expressions a compiler may contract into fma: within an ulp or two
    t = (((x + y) * c(0.5)) - np.array([1, 2, 3, 4], F32)) / y
    for i, want in {8: x - y * c(2), 11: c(3) * x + s[:, None], 13: t}.items():
        np.testing.assert_allclose(got[:, i], want, rtol=1e-6, atol=1e-6, err_msg=f"vec_float o[{i}]")


def test_vector_float2_float3_layout(lib) -> None:
    dev = lib.device
    r = rng(4)
    n = 257
    x = r.uniform(-4, 4, (n, 2)).astype(F32)
    y = np.full((n, 4), np.nan, F32)  # float3 occupies 16 bytes; the pad is never read
    y[:, :3] = r.uniform(-4, 4, (n, 3))
    out2 = dev.buffer(np.zeros(n * 3 * 2, F32))
    out3 = dev.buffer(np.zeros(n * 2 * 4, F32))
    outs = dev.buffer(np.zeros(n * 4, F32))
    lib.kernel("vec_float23")(n, dev.buffer(x), dev.buffer(y), out2, out3, outs, n)
    g2 = out2.numpy(F32, (n, 3, 2))
    g3 = out3.numpy(F32, (n, 2, 4))[:, :, :3]
    gs = outs.numpy(F32, (n, 4))
    gid = np.arange(n)
    np.testing.assert_array_equal(g2[:, 0], x * F32(2) + y[:, [2, 0]])
    np.testing.assert_array_equal(g2[:, 1], x[:, ::-1] / F32(4))
    np.testing.assert_array_equal(g2[:, 2], np.where(x >= y[:, [1]], F32(1), F32(-1)))
    np.testing.assert_array_equal(g3[:, 0], y[:, :3] + np.stack([x[:, 0], x[:, 1], np.ones(n, F32)], 1))
    np.testing.assert_array_equal(g3[:, 1], y[:, [2, 1, 0]] * x[:, [1]])
    np.testing.assert_array_equal(gs[:, 0], (y[:, 0] + y[:, 1]) + y[:, 2])
    np.testing.assert_array_equal(gs[:, 1], x[:, 0] * x[:, 1])
    np.testing.assert_array_equal(gs[:, 2], y[gid, gid % 3])
    np.testing.assert_array_equal(gs[:, 3], np.full(n, 16 + 8 * 100, F32),
                                  err_msg="sizeof(float3) == 16, sizeof(float2) == 8")


def test_vector_int4_uint2(lib) -> None:
    dev = lib.device
    r = rng(5)
    n = 300
    x = r.integers(-1000, 1000, (n, 4)).astype(np.int32)
    y = r.integers(1, 50, (n, 4)).astype(np.int32) * r.choice([-1, 1], (n, 4)).astype(np.int32)
    u = r.integers(0, 2**32, (n, 2), dtype=np.uint64).astype(np.uint32)
    out = dev.buffer(np.zeros(n * 10 * 4, np.int32))
    uout = dev.buffer(np.zeros(n * 3 * 2, np.uint32))
    lib.kernel("vec_int")(n, dev.buffer(x), dev.buffer(y), dev.buffer(u), out, uout, n)
    got = out.numpy(np.int32, (n, 10, 4))
    gu = uout.numpy(np.uint32, (n, 3, 2))
    gid = np.arange(n)
    want = {
        0: x + y, 1: x - y, 2: x * y,
        3: np.trunc(x / y).astype(np.int32),  # C division truncates
        4: np.fmod(x, y),                     # remainder has the dividend's sign
        5: (x & y) | (x ^ 0x55),
        6: ((x & 0xFFF) << 2) >> 1,
        7: np.trunc(x.astype(F32) * F32(0.5)).astype(np.int32),
        8: (x > y).astype(np.int32),
        9: np.stack([x[:, 3], y[:, 1], x[gid, gid % 4], np.full(n, 10)], 1),
    }
    for i, w in want.items():
        np.testing.assert_array_equal(got[:, i], w.astype(np.int32), err_msg=f"vec_int o[{i}]")
    u64 = u.astype(np.uint64)
    np.testing.assert_array_equal(gu[:, 0], ((u64 + [1, 2]) % 2**32).astype(np.uint32))
    np.testing.assert_array_equal(gu[:, 1], ((u64 * 3 - u64[:, ::-1]) % 2**32).astype(np.uint32))
    np.testing.assert_array_equal(gu[:, 2], np.stack([u[:, 1] >> 3, u[:, 0] & 0xFF], 1))


def test_vector_half4_bit_exact(lib) -> None:
    dev = lib.device
    r = rng(6)
    n = 512
    x = random_halves(r, n * 4).reshape(n, 4)
    y = random_halves(r, n * 4).reshape(n, 4)
    x[: n // 2] = r.uniform(-30, 30, (n // 2, 4)).astype(F16)
    y[: n // 2] = r.uniform(-30, 30, (n // 2, 4)).astype(F16)
    y[y == 0] = F16(2)
    out = dev.buffer(np.zeros(n * 6 * 4, F16))
    fout = dev.buffer(np.zeros(n * 4, F32))
    lib.kernel("vec_half")(n, dev.buffer(x), dev.buffer(y), out, fout, n)
    got = out.numpy(F16, (n, 6, 4))
    with np.errstate(all="ignore"):
        for i, (label, w) in enumerate([("+", x + y), ("*", x * y), ("-", x - y), ("/", x / y),
                                        ("half4(float4(x)*3)", (x.astype(F32) * 3).astype(F16))]):
            assert_bits_equal(got[:, i], w, what=f"half4 {label}")
    assert_bits_equal(got[:, 5], np.stack([x[:, 3], y[:, 2], x[:, 0], np.full(n, 1.5, F16)], 1),
                      what="half4 components")
    assert_bits_equal(fout.numpy(F32, (n, 4)), x.astype(F32), what="float4(half4)")


def _ftz(a: np.ndarray) -> np.ndarray:
    """Flush float32 subnormals to signed zero, as CUDA's -ftz=true does."""
    a = np.asarray(a, F32)
    return np.where(np.abs(a) < F32(2.0**-126), np.copysign(F32(0), a), a).astype(F32)


def test_float_denormals(lib) -> None:
    """cpu keeps subnormals (IEEE); cuda flushes them to zero (NVRTC through CuPy compiles with
    -ftz=true, as Metal's fast math does). docs/dialect.md documents both."""
    dev = lib.device
    x = np.array([1e-40, -3e-39, 1.5e-38, 2.0**-126, -(2.0**-149), 0.0, 1.0, 2.0**-125], F32)
    n = x.size
    out = dev.buffer(np.zeros(n * 3, F32))
    iout = dev.buffer(np.zeros(n * 2, np.int32))
    lib.kernel("denormals")(n, dev.buffer(x), out, iout, n)
    flush = dev.name == "cuda"
    xe = _ftz(x) if flush else x
    want = np.stack([xe * F32(1e20), xe + xe, xe * F32(0.5)], 1)
    if flush:
        want = _ftz(want)
    assert_bits_equal(out.numpy(F32, (n, 3)), want, what="float arithmetic on/into denormals")
    np.testing.assert_array_equal(iout.numpy(np.int32, (n, 2)),
                                  np.stack([np.sign(xe), xe == 0], 1).astype(np.int32),
                                  err_msg="comparisons of denormals with zero")
