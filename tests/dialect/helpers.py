"""Reference helpers shared by the dialect tests (numpy only; nothing here runs a kernel)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

SIMD = 32
KERNELS = Path(__file__).resolve().parent / "kernels"


def kernel_path(name: str) -> str:
    """Absolute path of tests/dialect/kernels/<name>.metal."""
    return str(KERNELS / f"{name}.metal")


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def groups(count: int, tg: int) -> int:
    return -(-count // tg)


def ulp32(x: np.ndarray) -> np.ndarray:
    """Size of one float32 ulp at |x| (the spacing above |x|, at least the smallest normal's)."""
    x = np.abs(np.asarray(x, dtype=np.float64)).astype(np.float32)
    return np.spacing(np.maximum(x, np.float32(np.finfo(np.float32).tiny))).astype(np.float64)


def assert_ulp(got: np.ndarray, ref: np.ndarray, ulps: float, atol: float = 0.0, what: str = "") -> None:
    """|got - ref| <= ulps * ulp(ref) + atol elementwise, ref computed in float64."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    err = np.abs(got - ref)
    tol = ulps * ulp32(ref) + atol
    bad = ~(err <= tol)
    if bad.any():
        i = np.flatnonzero(bad.reshape(-1))[:8]
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.size} values off by more than {ulps} ulp + {atol}; "
            f"first at {i.tolist()}: got {got.reshape(-1)[i].tolist()}, "
            f"want {ref.reshape(-1)[i].tolist()}")


def assert_bits_equal(got: np.ndarray, want: np.ndarray, what: str = "") -> None:
    """Bit-identical floats (any NaN matches any NaN)."""
    got = np.asarray(got)
    want = np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.shape)
    if not np.issubdtype(got.dtype, np.floating):
        np.testing.assert_array_equal(got, want, err_msg=what)
        return
    ibits = {2: np.uint16, 4: np.uint32, 8: np.uint64}[got.dtype.itemsize]
    same = (got.view(ibits) == want.view(ibits)) | (np.isnan(got) & np.isnan(want))
    if not same.all():
        i = np.flatnonzero(~same.reshape(-1))[:8]
        raise AssertionError(
            f"{what}: {int((~same).sum())} of {same.size} values differ; first at {i.tolist()}: "
            f"got {got.reshape(-1)[i].tolist()}, want {want.reshape(-1)[i].tolist()}")
