"""numpy references for the gemm family, written from the definitions in float64 (einsum over
the index formulas; no call into the code under test).

    gemm:     out[i, m, n] = alpha * sum_k op(a_i)[m, k] op(b_i)[k, n] + beta * c[i, m, n] + bias[n]
    linear:   y[r, o] = sum_j x[r, j] w[o, j] + b[o]
    backward: the chain rule of the above, written out per index.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from . import _common

F64 = np.float64


def op(x: np.ndarray, transpose: bool) -> np.ndarray:
    """op(x) = x or x^T over the last two dimensions, as float64."""
    x = np.asarray(x, F64)
    return np.swapaxes(x, -1, -2) if transpose else x


def matmul(a: np.ndarray, b: np.ndarray, transpose_a: bool = False,
           transpose_b: bool = False) -> np.ndarray:
    """out[..., m, n] = sum_k op(a)[..., m, k] op(b)[..., k, n]; a 2-D operand is shared by every
    batch entry of the other."""
    oa, ob = op(a, transpose_a), op(b, transpose_b)
    ia = "imk" if oa.ndim == 3 else "mk"
    ib = "ikn" if ob.ndim == 3 else "kn"
    io = "imn" if 3 in (oa.ndim, ob.ndim) else "mn"
    return np.einsum(f"{ia},{ib}->{io}", oa, ob)


def gemm(a: np.ndarray, b: np.ndarray, c: np.ndarray, transpose_a: bool = False,
         transpose_b: bool = False, alpha: float = 1.0, beta: float = 0.0,
         bias: np.ndarray | None = None) -> np.ndarray:
    """alpha * op(a) op(b) + beta * c + bias; a 2-D c with batched operands takes the sum over the
    batch. beta == 0 ignores c (BLAS: NaNs in c do not propagate)."""
    prod = matmul(a, b, transpose_a, transpose_b)
    if np.ndim(c) == 2 and prod.ndim == 3:
        prod = prod.sum(axis=0)
    out = alpha * prod
    if beta != 0.0:
        out = out + beta * np.asarray(c, F64)
    if bias is not None:
        out = out + np.asarray(bias, F64)
    return out


def abs_product(a: np.ndarray, b: np.ndarray, transpose_a: bool = False,
                transpose_b: bool = False, reduce_batch: bool = False) -> np.ndarray:
    """sum_k |op(a)[m, k]| |op(b)[k, n]|: the scale that rounding errors of the sum are
    measured against."""
    p = matmul(np.abs(np.asarray(a, F64)), np.abs(np.asarray(b, F64)), transpose_a, transpose_b)
    return p.sum(axis=0) if reduce_batch and p.ndim == 3 else p


def matmul_backward(g: np.ndarray, a: np.ndarray, b: np.ndarray, transpose_a: bool = False,
                    transpose_b: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(dL/da, dL/db) for C = op(a) op(b), G = dL/dC, by the index formulas:
    dL/dop(a)[m, k] = sum_n G[m, n] op(b)[k, n];  dL/dop(b)[k, n] = sum_m op(a)[m, k] G[m, n];
    a 2-D operand of a batched product sums over the batch."""
    g = np.asarray(g, F64)
    oa, ob = op(a, transpose_a), op(b, transpose_b)
    ig = "imn" if g.ndim == 3 else "mn"
    ia = "imk" if oa.ndim == 3 else "mk"
    ib = "ikn" if ob.ndim == 3 else "kn"
    d_oa = np.einsum(f"{ig},{ib}->{ia}", g, ob)
    d_ob = np.einsum(f"{ia},{ig}->{ib}", oa, g)
    return (np.swapaxes(d_oa, -1, -2) if transpose_a else d_oa,
            np.swapaxes(d_ob, -1, -2) if transpose_b else d_ob)


def linear(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """y[..., o] = sum_j x[..., j] w[o, j] + b[o]."""
    y = np.einsum("...j,oj->...o", np.asarray(x, F64), np.asarray(w, F64))
    return y if b is None else y + np.asarray(b, F64)


def linear_backward(g: np.ndarray, x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """grad_x[..., j] = sum_o g[..., o] w[o, j]; grad_w[o, j] = sum over rows of g[., o] x[., j];
    grad_b[o] = sum over rows of g[., o]."""
    g, x, w = (np.asarray(v, F64) for v in (g, x, w))
    gx = np.einsum("...o,oj->...j", g, w)
    gw = np.einsum("ro,rj->oj", g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1]))
    gb = g.reshape(-1, g.shape[-1]).sum(axis=0) if b is not None else None
    return gx, gw, gb


def half_accumulate_matmul(a: np.ndarray, b: np.ndarray, step: int = 1) -> np.ndarray:
    """op(a) @ op(b) for 2-D float16 operands with a half accumulator updated once per `step`
    consecutive k (k = 0..K-1 in order): step 1 is one correctly rounded fma per k (an SIMT
    fp16-accumulating GEMM); step 8 rounds once per 8-deep matrix product, as simdgroup-matrix
    (tensor-core) fp16 accumulation does. Products and their sums over a step are exact in
    float64 for the sizes tested, so rounding there once is the hardware's single rounding."""
    a = np.asarray(a, np.float16)
    b = np.asarray(b, np.float16)
    acc = np.zeros((a.shape[0], b.shape[1]), np.float16)
    for k in range(0, a.shape[1], step):
        exact = a[:, k:k + step].astype(F64) @ b[k:k + step].astype(F64) + acc.astype(F64)
        acc = exact.astype(np.float16)
    return acc


def numeric_grad(f: Callable[[np.ndarray], float], x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central differences of the scalar function f at x (float64)."""
    x = np.array(x, F64)
    return _common.numeric_grad(lambda: f(x), x, eps)
