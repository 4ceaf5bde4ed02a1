"""`#pragma unroll` in its three spellings, `#pragma clang loop vectorize(enable)`, METAL_FUNC
and plain inline helpers (kernels/unroll_inline.metal): the values against numpy on the device
under test, and what the cpu target makes of them (docs/dialect.md, "Source organization")."""
from __future__ import annotations

import numpy as np
import pytest
from helpers import kernel_path, rng

from pymetalnn.runtime.msl import translate_file

F32 = np.float32


def _poly(x: np.ndarray) -> np.ndarray:
    r = np.zeros_like(x)
    for c in (0.5, -1.25, 2.0, 0.125, -0.75, 1.5, -0.0625, 0.25):
        r = r * x + F32(c)
    r = np.where(x > 1, r - x * F32(0.5), np.where(x < -1, r + x * F32(0.25), r * F32(0.75) + x))
    s = np.zeros_like(x)
    for k in range(3):
        s = s + (r + F32(k)) * (x - F32(k)) * F32(0.125)
    return r + s


@pytest.mark.parametrize("n", [1, 7, 8, 31, 33, 1000])
def test_values(load, n: int) -> None:
    lib = load("unroll_inline")
    dev = lib.device
    x = rng(n).uniform(-2, 2, n).astype(F32)
    out = dev.buffer(np.zeros(n, F32))
    threads = -(-n // 8)
    lib.kernel("unroll_inline")(threads, dev.buffer(x), out, np.uint32(n))
    pad = np.concatenate([x, np.full(threads * 8 - n, x[-1], F32)])
    v = (F32(1.5) * pad - F32(0.25)).reshape(-1, 4)
    acc = v[:, 0] * F32(1) + v[:, 1] * F32(2) + v[:, 2] * F32(3)
    want = _poly(np.where(v <= 0, F32(0), v * F32(2)))
    want[:, 3] += acc
    np.testing.assert_allclose(out.numpy(F32), want.reshape(-1)[:n], rtol=2e-6, atol=2e-6)


def test_cpu_translation() -> None:
    src = translate_file(kernel_path("unroll_inline"), "cpu", {}).source
    assert "#pragma GCC unroll 3" in src and "#pragma GCC unroll 1" in src
    assert src.count("#pragma unroll") == 2  # the bare ones, which g++ ignores
    assert "#pragma omp simd" in src and "clang loop" not in src
    assert "PMN_INLINE void chunk_axpy" in src  # METAL_FUNC: always inlined
    assert "inline float poly" in src and "PMN_INLINE float poly" not in src


def test_cuda_keeps_the_source_spelling() -> None:
    src = translate_file(kernel_path("unroll_inline"), "cuda", {}).source
    assert "#pragma unroll 3" in src or "#pragma unroll ( 3 )" in src
    assert "GCC unroll" not in src and "PMN_INLINE" not in src
    assert "inline void chunk_axpy" in src
    assert "clang loop" not in src and "omp simd" not in src  # NVRTC knows neither
