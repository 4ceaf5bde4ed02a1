"""The dialect's math functions against numpy (float64 references from the float32 inputs)."""
from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_ulp, rng

F32 = np.float32
N = 2048

TRANSCENDENTALS = ["exp", "exp2", "exp10", "log", "log2", "log10", "sqrt", "rsqrt", "pow", "powr",
                   "tanh", "sinh", "cosh", "sin(4a)", "cos(4a)", "tan", "asin", "acos", "atan",
                   "atan2"]


def inputs():
    r = rng(1234)
    a = r.uniform(-3, 3, N).astype(F32)
    a[:64] = (np.arange(-32, 32) / 2.0 + 0.0).astype(F32)  # exact halves: round() ties
    a[64:70] = [0.0, -0.0, -1e-9, 1e-9, 2.5, -2.5]
    b = r.uniform(-3, 3, N).astype(F32)
    b[b == 0] = F32(0.75)
    p = r.uniform(0.05, 6, N).astype(F32)
    u = r.uniform(-0.98, 0.98, N).astype(F32)
    c = r.uniform(-3, 3, N).astype(F32)
    return a, b, p, u, c


def transcendental_reference(a, b, p, u) -> np.ndarray:
    a, b, p, u = (v.astype(np.float64) for v in (a, b, p, u))
    a4 = (a * 4).astype(F32).astype(np.float64)
    return np.stack([
        np.exp(a), np.exp2(a), 10.0**a, np.log(p), np.log2(p), np.log10(p), np.sqrt(p),
        1 / np.sqrt(p), p**b, p**b, np.tanh(a), np.sinh(a), np.cosh(a), np.sin(a4), np.cos(a4),
        np.tan(u), np.arcsin(u), np.arccos(u), np.arctan(a), np.arctan2(a, b),
    ], axis=1)


def run_transcendentals(lib, name: str) -> np.ndarray:
    dev = lib.device
    a, b, p, u, _ = inputs()
    out = dev.buffer(np.zeros(N * 20, F32))
    lib.kernel(name)(N, dev.buffer(a), dev.buffer(b), dev.buffer(p), dev.buffer(u), out, N)
    return out.numpy(F32, (N, 20))


def check(got: np.ndarray, want: np.ndarray, ulps: float, atol: float, rtol: float, kind: str):
    for i, label in enumerate(TRANSCENDENTALS):
        if rtol:
            np.testing.assert_allclose(got[:, i], want[:, i], rtol=rtol, atol=atol,
                                       err_msg=f"{kind}{label}")
        else:
            assert_ulp(got[:, i], want[:, i], ulps, atol, what=f"{kind}{label}")


@pytest.mark.parametrize("kernel,kind", [("math_precise", "precise::"),
                                         ("math_metal_precise_ns", "metal::precise::")])
def test_precise_math(load, kernel: str, kind: str) -> None:
    a, b, p, u, _ = inputs()
    got = run_transcendentals(load("mathfn"), kernel)
    check(got, transcendental_reference(a, b, p, u), ulps=4, atol=1e-7, rtol=0, kind=kind)


@pytest.mark.parametrize("kernel,kind", [("math_plain", ""), ("math_metal_ns", "metal::")])
def test_plain_math(load, backend: str, kernel: str, kind: str) -> None:
    a, b, p, u, _ = inputs()
    got = run_transcendentals(load("mathfn"), kernel)
    want = transcendental_reference(a, b, p, u)
    if backend == "metal":  # metalcompute compiles with fast math
        check(got, want, 0, atol=2e-3, rtol=2e-3, kind=kind)
    else:  # accurate on cuda and cpu (docs/dialect.md)
        check(got, want, ulps=4, atol=1e-7, rtol=0, kind=kind)


def test_fast_math(load) -> None:
    a, b, p, u, _ = inputs()
    got = run_transcendentals(load("mathfn"), "math_fast")
    check(got, transcendental_reference(a, b, p, u), 0, atol=2e-3, rtol=2e-3, kind="fast::")


def test_exp_log_tanh_every_range(load, backend: str) -> None:
    """exp, log and tanh over floats of every exponent (random bit patterns, subnormals) and
    the special values: within 1 ulp of float64 math everywhere (the cpu's inline versions
    round a double result once: 0.5 ulp + 1e-4), with IEEE/torch special cases: exp(-inf) = 0,
    exp(+-inf/overflow) = inf, log(0) = -inf, log(x < 0) = NaN, tanh(-0) = -0, NaN in NaN out."""
    r = rng(77)
    bits = r.integers(0, 1 << 32, 40000, dtype=np.uint64).astype(np.uint32)
    x = np.concatenate([
        bits.view(F32),
        r.uniform(-110, 110, 4000).astype(F32),                 # exp's range and its ends
        r.uniform(-1e-3, 1e-3, 2000).astype(F32),               # tanh near 0, log near 1 + x
        (1 + r.uniform(-1e-3, 1e-3, 2000)).astype(F32),
        np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1.0, -1.0, 88.72283, 88.72284, -87.33655,
                  -103.97208, -103.97209, -104.0, 89.0, 1e-45, -1e-45, 1.1754942e-38, 20.0,
                  -20.0, 9.0, 3.4028235e38, 0.34657359, -0.34657359, 1.4142135, 0.70710677],
                 dtype=F32)])
    if backend == "metal":  # metalcompute compiles with fast math: not this test's subject
        pytest.skip("metal's fast math has its own error bounds (test_plain_math)")
    dev = load("mathfn").device
    out = dev.buffer(np.zeros(3 * x.size, F32))
    load("mathfn").kernel("math_exp_log_tanh")(x.size, dev.buffer(x), out, np.uint32(x.size))
    got = out.numpy(F32, (x.size, 3)).astype(np.float64)
    x64 = x.astype(np.float64)
    with np.errstate(all="ignore"):
        want = np.stack([np.exp(x64), np.log(x64), np.tanh(x64)], 1)
    tiny = np.finfo(F32).tiny
    keep = np.ones(x.size, bool)
    ulps = 1.0
    if backend != "cpu":  # CUDA: 2 ulp documented bounds, and float subnormals flushed (-ftz)
        ulps = 2.0
        keep = ~((np.abs(x) < tiny) & (x != 0))
    for i, name in enumerate(("exp", "log", "tanh")):
        w, g = want[keep, i], got[keep, i]
        if backend != "cpu":
            w, g = w[~(np.abs(w) < tiny) | (w == 0)], g[~(np.abs(w) < tiny) | (w == 0)]
        special = ~np.isfinite(w.astype(F32)) | (w == 0)
        np.testing.assert_array_equal(g[special], w[special].astype(F32), err_msg=name)
        signed = special & ~np.isnan(w)
        assert (np.signbit(g[signed]) == np.signbit(w[signed])).all(), name
        assert_ulp(g[~special], w[~special], ulps, 0.0, what=name)


MISC_EXACT = {
    0: "abs", 1: "fabs", 2: "min", 3: "max", 4: "fmin", 5: "fmax", 6: "clamp", 10: "select",
    11: "floor", 12: "ceil", 13: "round", 14: "rint", 15: "trunc", 16: "fract", 17: "fmod",
    18: "sign", 19: "step", 21: "copysign", 22: "saturate", 36: "fract(-a)", 37: "fmod(-a, b)",
    38: "min(-a, b)", 39: "abs(INFINITY)", 34: "clamp(float4)", 35: "max(float2)",
}


def misc_reference(a, b, c, p):
    f = F32
    with np.errstate(all="ignore"):
        t = c * f(0.25) + f(0.5)
        fract = lambda x: np.minimum(x - np.floor(x), f(np.nextafter(f(1), f(0))))  # noqa: E731
        want = np.zeros((a.size, 40), np.float64)
        want[:, 0] = want[:, 1] = np.abs(a)
        want[:, 2] = want[:, 4] = np.minimum(a, b)
        want[:, 3] = want[:, 5] = np.maximum(a, b)
        want[:, 10] = np.where(a < b, b, a)  # select(x, y, c) is c ? y : x
        want[:, 6] = np.clip(a, -1, 1.5)
        a64, b64, c64, p64 = (v.astype(np.float64) for v in (a, b, c, p))
        want[:, 7] = (a64 * b64 + c64).astype(f)
        want[:, 8] = a64 * b64 + c64
        want[:, 9] = a64 + (b64 - a64) * t.astype(np.float64)
        want[:, 11], want[:, 12], want[:, 15] = np.floor(a), np.ceil(a), np.trunc(a)
        want[:, 13] = np.sign(a) * np.floor(np.abs(a64) + 0.5)  # halves away from zero
        want[:, 14] = np.rint(a)                                # halves to even
        want[:, 16] = fract(a)
        want[:, 17] = np.fmod(a, b)
        want[:, 18] = np.sign(a)
        want[:, 19] = np.where(a < b, 0.0, 1.0)
        x = np.clip((a64 - -1.0) / 3.0, 0, 1)
        want[:, 20] = x * x * (3 - 2 * x)
        want[:, 21] = np.copysign(p, b)
        want[:, 22] = np.clip(a, 0, 1)
        v4 = np.stack([a64, b64, c64, p64], 1)
        w4 = np.stack([b64, c64, -a64, np.full_like(a64, 0.5)], 1)
        want[:, 23] = (v4 * w4).sum(1)
        v3, w3 = v4[:, :3], np.stack([p64, -c64, a64], 1)
        want[:, 24] = np.linalg.norm(v3, axis=1)
        want[:, 25:28] = v3 / want[:, 24:25]
        want[:, 28:31] = np.cross(v3, w3)
        want[:, 31] = a64 * c64 + b64 * p64
        want[:, 32] = np.hypot(a64, b64)
        want[:, 33] = np.linalg.norm(v4, axis=1)
        cl = np.clip(v4.astype(f), -1, 1)
        want[:, 34] = cl[:, 0] - cl[:, 1]
        want[:, 35] = np.maximum(a, c) - np.maximum(b, c)
        want[:, 36] = fract(-a)
        want[:, 37] = np.fmod(-a, b)
        want[:, 38] = np.minimum(-a, b)
        want[:, 39] = np.inf
    return want


def test_misc_math(load) -> None:
    lib = load("mathfn")
    dev = lib.device
    a, b, p, _, c = inputs()
    out = dev.buffer(np.zeros(N * 40, F32))
    lib.kernel("math_misc")(N, dev.buffer(a), dev.buffer(b), dev.buffer(c), dev.buffer(p), out, N)
    got = out.numpy(F32, (N, 40))
    want = misc_reference(a, b, c, p)
    for i, label in MISC_EXACT.items():
        np.testing.assert_array_equal(got[:, i], want[:, i].astype(F32), err_msg=label)
    assert_ulp(got[:, 7], want[:, 7], 1, what="fma")
    a64, b64, c64 = (v.astype(np.float64) for v in (a, b, c))
    mag = np.abs(a64 * b64) + np.abs(c64)
    np.testing.assert_array_less(np.abs(got[:, 8] - want[:, 8]), 2.5e-7 * mag + 1e-30,
                                 err_msg="mad")
    for i, label in {9: "mix", 20: "smoothstep", 23: "dot(float4)", 24: "length(float3)",
                     25: "normalize.x", 26: "normalize.y", 27: "normalize.z", 28: "cross.x",
                     29: "cross.y", 30: "cross.z", 31: "dot(float2)", 32: "length(float2)",
                     33: "length(float4)"}.items():
        np.testing.assert_allclose(got[:, i], want[:, i], rtol=1e-5, atol=2e-6, err_msg=label)


def test_integer_math_and_classification(load) -> None:
    lib = load("mathfn")
    dev = lib.device
    r = rng(77)
    n = 512
    i = r.integers(-100, 100, n).astype(np.int32)
    j = r.integers(-100, 100, n).astype(np.int32)
    specials = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1.5, -2.0, 1e-40, -3e38, 5.0], F32)
    s = np.resize(specials, n).astype(F32)
    out = dev.buffer(np.zeros(n * 12, np.int32))
    lib.kernel("math_int")(n, dev.buffer(i), dev.buffer(j), dev.buffer(s), out, n)
    got = out.numpy(np.int32, (n, 12))
    ui, uj = i.view(np.uint32), j.view(np.uint32)
    with np.errstate(invalid="ignore"):
        sign = np.where(np.isnan(s), 0, np.sign(s))
    want = np.stack([
        np.abs(i), np.minimum(i, j), np.maximum(i, j), np.clip(i, -50, 70), np.where(i > j, j, i),
        np.minimum(ui, uj).view(np.int32), np.maximum(ui, uj).view(np.int32),
        np.isnan(s), np.isinf(s), np.isfinite(s), (sign * 2), np.clip(i & 255, 10, 200),
    ], axis=1).astype(np.int32)
    labels = ["abs(int)", "min(int)", "max(int)", "clamp(int)", "select(int)", "min(uint)",
              "max(uint)", "isnan", "isinf", "isfinite", "sign", "clamp(uint)"]
    for k, label in enumerate(labels):
        np.testing.assert_array_equal(got[:, k], want[:, k], err_msg=label)
