"""Plain numpy references for batch / group / instance norm, in float64, from the definitions.

Design note: the backward references run the chain rule step by step through the forward's
intermediates (xhat, var, mean), the textbook way, rather than the collapsed per-channel
coefficients the kernels use; the tests check them against float64 finite differences.

    y = (x - mean) / sqrt(var + eps) * w + b    (biased var)
    batch norm:  statistics per channel over (N, spatial); running r <- (1 - m) r + m s with the
                 unbiased variance
    group norm:  statistics per (sample, group) over the group's channels and positions
"""
from __future__ import annotations

import numpy as np

from ._common import finite_difference as finite_difference


def _axes(x: np.ndarray) -> tuple[int, ...]:
    return (0,) + tuple(range(2, x.ndim))


def _bshape(x: np.ndarray) -> tuple[int, ...]:
    return (1, x.shape[1]) + (1,) * (x.ndim - 2)


def batch_norm_train(x, w=None, b=None, eps=1e-5):
    """(y, batch mean, biased batch var, unbiased batch var)."""
    x = np.asarray(x, np.float64)
    ax = _axes(x)
    m = x.size // x.shape[1]
    mean = x.mean(axis=ax)
    var = ((x - mean.reshape(_bshape(x))) ** 2).mean(axis=ax)
    y = _affine((x - mean.reshape(_bshape(x))) / np.sqrt(var.reshape(_bshape(x)) + eps), w, b)
    return y, mean, var, var * m / (m - 1)


def running_update(rm, rv, mean, unbiased_var, momentum):
    return (1 - momentum) * np.asarray(rm, np.float64) + momentum * mean, \
        (1 - momentum) * np.asarray(rv, np.float64) + momentum * unbiased_var


def batch_norm_eval(x, rm, rv, w=None, b=None, eps=1e-5):
    x = np.asarray(x, np.float64)
    s = _bshape(x)
    return _affine((x - np.reshape(rm, s)) / np.sqrt(np.reshape(rv, s).astype(np.float64) + eps), w, b)


def _affine(xhat, w, b):
    s = (1, xhat.shape[1]) + (1,) * (xhat.ndim - 2)
    y = xhat * (1.0 if w is None else np.reshape(np.asarray(w, np.float64), s))
    return y + (0.0 if b is None else np.reshape(np.asarray(b, np.float64), s))


def _norm_backward(dxhat, xc, var, eps, axes, m):
    """Chain rule through xhat = xc / sqrt(var + eps), xc = x - mean, over `axes` (m elements)."""
    r = 1 / np.sqrt(var + eps)
    dvar = np.sum(dxhat * xc * -0.5 * r ** 3, axis=axes, keepdims=True)
    dmean = np.sum(-dxhat * r, axis=axes, keepdims=True) + dvar * np.sum(-2 * xc, axis=axes,
                                                                       keepdims=True) / m
    return dxhat * r + dvar * 2 * xc / m + dmean / m


def batch_norm_train_backward(dy, x, w=None, eps=1e-5):
    """(dx, dw, db) of the training-mode forward."""
    x = np.asarray(x, np.float64)
    dy = np.asarray(dy, np.float64)
    ax = _axes(x)
    s = _bshape(x)
    mean = x.mean(axis=ax, keepdims=True)
    xc = x - mean
    var = (xc ** 2).mean(axis=ax, keepdims=True)
    xhat = xc / np.sqrt(var + eps)
    wv = np.ones(x.shape[1]) if w is None else np.asarray(w, np.float64)
    dx = _norm_backward(dy * wv.reshape(s), xc, var, eps, ax, x.size // x.shape[1])
    return dx, np.sum(dy * xhat, axis=ax), np.sum(dy, axis=ax)


def batch_norm_eval_backward(dy, x, rm, rv, w=None, eps=1e-5):
    x = np.asarray(x, np.float64)
    dy = np.asarray(dy, np.float64)
    s = _bshape(x)
    r = 1 / np.sqrt(np.reshape(rv, s).astype(np.float64) + eps)
    xhat = (x - np.reshape(rm, s)) * r
    wv = np.ones(x.shape[1]) if w is None else np.asarray(w, np.float64)
    ax = _axes(x)
    return dy * wv.reshape(s) * r, np.sum(dy * xhat, axis=ax), np.sum(dy, axis=ax)


def group_norm(x, groups, w=None, b=None, eps=1e-5):
    """(y, mean (N, G), rstd (N, G))."""
    x = np.asarray(x, np.float64)
    n = x.shape[0]
    xg = x.reshape(n, groups, -1)
    mean = xg.mean(axis=2)
    var = ((xg - mean[..., None]) ** 2).mean(axis=2)
    xhat = ((xg - mean[..., None]) / np.sqrt(var[..., None] + eps)).reshape(x.shape)
    return _affine(xhat, w, b), mean, 1 / np.sqrt(var + eps)


def group_norm_backward(dy, x, groups, w=None, eps=1e-5):
    """(dx, dw, db)."""
    x = np.asarray(x, np.float64)
    dy = np.asarray(dy, np.float64)
    n, c = x.shape[:2]
    s = _bshape(x)
    wv = np.ones(c) if w is None else np.asarray(w, np.float64)
    xg = x.reshape(n, groups, -1)
    mean = xg.mean(axis=2, keepdims=True)
    xc = xg - mean
    var = (xc ** 2).mean(axis=2, keepdims=True)
    dxhat = (dy * wv.reshape(s)).reshape(n, groups, -1)
    dx = _norm_backward(dxhat, xc, var, eps, (2,), xg.shape[2]).reshape(x.shape)
    xhat = (xc / np.sqrt(var + eps)).reshape(x.shape)
    ax = _axes(x)
    return dx, np.sum(dy * xhat, axis=ax), np.sum(dy, axis=ax)
