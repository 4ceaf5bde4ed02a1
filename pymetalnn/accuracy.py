"""The fp32 accuracy budget (docs/accuracy.md): how far a float32 result may be from the exact one.

Error of a result y against a float64 reference r of the same inputs:

    err(y) = max |y - r| / max |r|

A float32 op family is within budget on a shape when, for every output it computes (forward
result, input gradient, weight gradient, ...),

    err(y) <= min(FACTOR * err(y_direct), CEILING)

where y_direct is the family's direct algorithm (conv: the implicit-GEMM kernels that sum every
product in float, conv.FORCE "direct"/tiles; gemm: the tiled kernel without split-K; rnn: its
gemm + cell kernels, which have no alternative) on the same inputs and device. FACTOR keeps a fast
algorithm (Winograd) to the order of magnitude of a plain float sum; CEILING bounds every family,
the direct algorithms included, on the benchmark shapes. Where no alternative algorithm exists,
only CEILING applies.

Why these numbers: a float32 sum of L random-sign products has a relative error of order
2^-24 * sqrt(L); on the benchmark shapes (L up to 10^5) the direct kernels land at 2e-7 to 2e-6,
so 10x leaves room for summation-order changes (split-K, tile shapes) and stays two to three
orders of magnitude under fp16's 2^-11 ~ 5e-4, which is what distinguishes an fp32 result from a
reduced-precision one. A fast algorithm above the budget is opt-in (conv.set_winograd("fast")).
"""
from __future__ import annotations

from typing import Any

import numpy as np

FACTOR = 10.0    # times the direct algorithm's error on the same inputs
CEILING = 1e-4   # of max |reference|, for every family and algorithm
FAMILIES = ("conv", "gemm", "rnn")


def rel_err(got: Any, want: Any) -> float:
    """max |got - want| / max |want| (want: the float64 reference; both array-likes of one shape).
    A zero reference gives the absolute error."""
    g = np.asarray(got, dtype=np.float64)
    w = np.asarray(want, dtype=np.float64)
    if g.shape != w.shape:
        raise ValueError(f"got: shape {g.shape} does not match the reference's {w.shape}")
    scale = float(np.abs(w).max()) if w.size else 0.0
    diff = float(np.abs(g - w).max()) if w.size else 0.0
    return diff / scale if scale > 0 else diff


def limit(direct_err: float | None = None) -> float:
    """The largest error within budget: min(FACTOR * direct_err, CEILING), or CEILING when the
    op has no alternative to its direct algorithm (direct_err None)."""
    if direct_err is None:
        return CEILING
    return min(FACTOR * float(direct_err), CEILING)


def within(err: float, direct_err: float | None = None) -> bool:
    """Whether an error is within the budget (see limit)."""
    return bool(err <= limit(direct_err))
