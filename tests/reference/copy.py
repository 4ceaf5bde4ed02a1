"""Plain numpy references for the data-movement family, element by element, in float64.

Design note: every op is a map from output index to input index, written as a loop over the
output; its backward is the adjoint of that map written as a scatter-add loop over the same
indices (never as the inverse op), so the finite-difference check on the adjoint is meaningful.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from ._common import numeric_grad as numeric_grad

Index = tuple


def gather(out_shape: tuple, src: Callable[[Index], tuple[int, Index]], xs: list[np.ndarray]
           ) -> np.ndarray:
    """out[i] = xs[k][j] where (k, j) = src(i)."""
    out = np.zeros(out_shape)
    for i in np.ndindex(*out_shape):
        k, j = src(i)
        out[i] = xs[k][j]
    return out


def scatter(g: np.ndarray, src: Callable[[Index], tuple[int, Index]], shapes: list[tuple]
            ) -> list[np.ndarray]:
    """The adjoint of gather: grads[k][j] += g[i] for (k, j) = src(i)."""
    grads = [np.zeros(s) for s in shapes]
    for i in np.ndindex(*g.shape):
        k, j = src(i)
        grads[k][j] += g[i]
    return grads


def concat_map(shapes: list[tuple], d: int) -> tuple[tuple, Callable]:
    total = sum(s[d] for s in shapes)
    out_shape = shapes[0][:d] + (total,) + shapes[0][d + 1:]
    starts = np.cumsum([0] + [s[d] for s in shapes])

    def src(i: Index) -> tuple[int, Index]:
        k = int(np.searchsorted(starts, i[d], side="right") - 1)
        return k, i[:d] + (i[d] - int(starts[k]),) + i[d + 1:]

    return out_shape, src


def concat(xs: list[np.ndarray], d: int) -> np.ndarray:
    shape, src = concat_map([x.shape for x in xs], d)
    return gather(shape, src, [np.asarray(x, np.float64) for x in xs])


def concat_backward(g: np.ndarray, shapes: list[tuple], d: int) -> list[np.ndarray]:
    return scatter(np.asarray(g, np.float64), concat_map(shapes, d)[1], shapes)


def split(x: np.ndarray, sizes: list[int], d: int) -> list[np.ndarray]:
    out, start = [], 0
    for s in sizes:
        shape = x.shape[:d] + (s,) + x.shape[d + 1:]
        st = start
        out.append(gather(shape, lambda i, st=st: (0, i[:d] + (i[d] + st,) + i[d + 1:]),
                          [np.asarray(x, np.float64)]))
        start += s
    return out


def permute_map(p: tuple) -> Callable:
    def src(i: Index) -> tuple[int, Index]:
        j = [0] * len(p)
        for k, d in enumerate(p):
            j[d] = i[k]
        return 0, tuple(j)

    return src


def permute(x: np.ndarray, p: tuple) -> np.ndarray:
    return gather(tuple(x.shape[d] for d in p), permute_map(p), [np.asarray(x, np.float64)])


def permute_backward(g: np.ndarray, x_shape: tuple, p: tuple) -> np.ndarray:
    return scatter(np.asarray(g, np.float64), permute_map(p), [x_shape])[0]


def image_to_matrix_map(chw: tuple, channels_last: bool) -> Callable:
    c_, h_, w_ = chw

    def src(i: Index) -> tuple[int, Index]:
        n, f = i
        if channels_last:
            c = f % c_
            h, w = divmod(f // c_, w_)
        else:
            c, rem = divmod(f, h_ * w_)
            h, w = divmod(rem, w_)
        return 0, (n, c, h, w)

    return src


def image_to_matrix(x: np.ndarray, channels_last: bool) -> np.ndarray:
    n, c, h, w = x.shape
    return gather((n, c * h * w), image_to_matrix_map((c, h, w), channels_last),
                  [np.asarray(x, np.float64)])


def image_to_matrix_backward(g: np.ndarray, x_shape: tuple, channels_last: bool) -> np.ndarray:
    return scatter(np.asarray(g, np.float64), image_to_matrix_map(x_shape[1:], channels_last),
                   [x_shape])[0]


def sequence_to_list(x: np.ndarray) -> list[np.ndarray]:
    t_, n_, f_ = x.shape
    return [gather((n_, f_), lambda i, t=t: (0, (t, *i)), [np.asarray(x, np.float64)])
            for t in range(t_)]
