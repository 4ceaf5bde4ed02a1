"""Plain numpy references for the arithmetic family, straight from the definitions, in float64.

Design note: broadcasting is written out index by index (an output index maps to an operand
index by taking 0 on every dimension where the operand has size 1, after aligning shapes on the
right), and every gradient is accumulated element by element into the operand it belongs to, so
no numpy broadcasting or reduction rule is trusted and nothing is shared with pymetalnn.

    out[i] = f(a[ia(i)], b[ib(i)])          dL/da[j] = sum over {i : ia(i) = j} of g[i] df/da
    sum(x, D)[k] = sum over {i : i restricted to the kept dims = k} of x[i]
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from ._common import numeric_grad as numeric_grad

FORWARD: dict[str, Callable[[float, float], float]] = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b,
}
# (df/da, df/db) at (a, b)
PARTIALS: dict[str, Callable[[float, float], tuple[float, float]]] = {
    "add": lambda a, b: (1.0, 1.0),
    "sub": lambda a, b: (1.0, -1.0),
    "mul": lambda a, b: (b, a),
    "div": lambda a, b: (1.0 / b, -a / (b * b)),
}


def broadcast_shape(sa: tuple, sb: tuple) -> tuple:
    nd = max(len(sa), len(sb))
    pa = (1,) * (nd - len(sa)) + tuple(sa)
    pb = (1,) * (nd - len(sb)) + tuple(sb)
    out = []
    for x, y in zip(pa, pb):
        assert x == y or x == 1 or y == 1, (sa, sb)
        out.append(max(x, y) if min(x, y) != 0 else 0)
    return tuple(out)


def source_index(i: tuple, shape: tuple) -> tuple:
    """The index of an operand of `shape` that output index `i` reads."""
    i = i[len(i) - len(shape):]
    return tuple(0 if n == 1 else k for k, n in zip(i, shape))


def binary(op: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    shape = broadcast_shape(a.shape, b.shape)
    out = np.zeros(shape)
    f = FORWARD[op]
    for i in np.ndindex(*shape):
        out[i] = f(a[source_index(i, a.shape)], b[source_index(i, b.shape)])
    return out


def binary_backward(op: str, g: np.ndarray, a: np.ndarray, b: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    g = np.asarray(g, np.float64)
    ga, gb = np.zeros(a.shape), np.zeros(b.shape)
    d = PARTIALS[op]
    for i in np.ndindex(*g.shape):
        ia, ib = source_index(i, a.shape), source_index(i, b.shape)
        da, db = d(a[ia], b[ib])
        ga[ia] += g[i] * da
        gb[ib] += g[i] * db
    return ga, gb


def reduce_sum(x: np.ndarray, dims: tuple, keepdim: bool, mean: bool = False) -> np.ndarray:
    """sum (or mean) of x over `dims` (already non-negative, possibly empty for 0-d x)."""
    x = np.asarray(x, np.float64)
    kept_shape = tuple(1 if d in dims else n for d, n in enumerate(x.shape))
    out = np.zeros(kept_shape)
    for i in np.ndindex(*x.shape):
        k = tuple(0 if d in dims else v for d, v in enumerate(i))
        out[k] += x[i]
    if mean:
        count = int(np.prod([x.shape[d] for d in dims if d < x.ndim]))
        out = out / count
    if not keepdim:
        out = out.reshape(tuple(n for d, n in enumerate(x.shape) if d not in dims))
    return out


def reduce_sum_backward(g: np.ndarray, x_shape: tuple, dims: tuple, keepdim: bool,
                        mean: bool = False) -> np.ndarray:
    g = np.asarray(g, np.float64).reshape(tuple(1 if d in dims else n for d, n in enumerate(x_shape)))
    count = int(np.prod([x_shape[d] for d in dims if d < len(x_shape)]))
    out = np.zeros(x_shape)
    for i in np.ndindex(*x_shape):
        k = tuple(0 if d in dims else v for d, v in enumerate(i))
        out[i] = g[k] / count if mean else g[k]
    return out
