"""Shared by the convolution tests (test_conv.py, test_conv_winograd.py): precisions, the
scale-relative tolerance and its check, inputs, and the explicit padding the references take.

Errors are measured against the scale of each output's sum: |got - ref| <= tol * sum|terms|
(+ |b|), computed by running the reference on |x|, |w|.
"""
from __future__ import annotations

import numpy as np

# name -> (dtype, accumulate)
PRECISIONS = {"float": (np.float32, None), "half": (np.float16, None),
              "hacc_half": (np.float16, "half")}
U16 = 2.0 ** -11  # fp16 unit roundoff


def tol(prec: str, terms: int) -> float:
    """Relative-to-scale tolerance for sums of `terms` products."""
    if prec == "float":
        return 2e-6 + 2e-7 * np.sqrt(terms)
    if prec == "half":
        return 1.1 * U16 + 2e-6 * np.sqrt(terms)
    return U16 * (2.0 + 3.0 * np.sqrt(terms))


def assert_close(name: str, got, want: np.ndarray, scale: np.ndarray, t: float) -> None:
    got = np.asarray(got, np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape}, expected {want.shape}"
    err = np.abs(got - want)
    bound = t * scale + 1e-7
    bad = err > bound
    if bad.any():
        i = np.unravel_index(np.argmax(err - bound), err.shape)
        raise AssertionError(f"{name}: {bad.sum()} of {err.size} elements off; worst at {i}: got "
                             f"{got[i]}, expected {want[i]} (scale {scale[i]}, tol {t:.3g})")


def rand(rng: np.random.Generator, shape, dtype) -> np.ndarray:
    return rng.uniform(-1.0, 1.0, shape).astype(dtype)


def ref_pads(padding, h, w, kh, kw, st, dil):
    """The explicit (top, bottom, left, right) padding the reference needs (computed plainly)."""
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        out = []
        for n, k, s, d in ((h, kh, st[0], dil[0]), (w, kw, st[1], dil[1])):
            o = -(-n // s)
            tot = max((o - 1) * s + d * (k - 1) + 1 - n, 0)
            out += [tot // 2, tot - tot // 2]
        return tuple(out)
    if isinstance(padding, int):
        return (padding,) * 4
    if len(padding) == 2:
        return (padding[0], padding[0], padding[1], padding[1])
    return tuple(padding)
