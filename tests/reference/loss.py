"""Plain numpy references for the losses, in float64, from the definitions (see the table in
pymetalnn/ops/loss.py).

Design note: a loss is (terms, reduction). `terms(name, x, t, ...)` gives the unweighted loss of
every term (elements for pointwise losses; (sample, position) for the class-axis ones, written as
loops over the class vector of each position), `reduce` applies per-sample weights and the
reduction. Gradients are written from the derivatives of each term (`term_grads`) and chained
through the reduction by `backward`; the test suite checks them against float64 finite
differences of `forward`, so none of the kernels' algebra (shifted sums, fused coefficients) is
reused here.
"""
from __future__ import annotations

import numpy as np

from ._common import finite_difference as finite_difference

POINTWISE = ("mse_loss", "l1_loss", "huber_loss", "bce_with_logits", "hinge_loss", "kl_div",
             "log_loss")
CLASS_AXIS = ("cross_entropy", "categorical_cross_entropy", "cosine_distance")


def _positions(x: np.ndarray) -> np.ndarray:
    """(N, C, *S) -> (N, *S, C): one class vector per position."""
    return np.moveaxis(x, 1, -1)


def smoothed(t: np.ndarray, labels: bool, c: int, s: float, ignore_index: int = -100) -> np.ndarray:
    """Targets as class vectors (N, *S, C): one-hot labels or probabilities, label-smoothed."""
    if labels:
        onehot = np.zeros(t.shape + (c,))
        for idx in np.ndindex(t.shape):
            if t[idx] != ignore_index:
                onehot[idx + (int(t[idx]),)] = 1.0
        return (1 - s) * onehot + s / c
    return (1 - s) * _positions(np.asarray(t, np.float64)) + s / c


def terms(name: str, x: np.ndarray, t: np.ndarray, labels: bool = False, smoothing: float = 0.0,
          ignore_index: int = -100, delta: float = 1.0, eps: float = 1e-8, epsilon: float = 1e-7,
          log_target: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(unweighted terms, valid mask) in the shape of reduction='none'."""
    x = np.asarray(x, np.float64)
    if name in POINTWISE:
        t = np.asarray(t, np.float64)
        d = x - t
        if name == "mse_loss":
            v = d * d
        elif name == "l1_loss":
            v = np.abs(d)
        elif name == "huber_loss":
            v = np.where(np.abs(d) < delta, 0.5 * d * d, delta * (np.abs(d) - 0.5 * delta))
        elif name == "bce_with_logits":
            ts = t * (1 - smoothing) + 0.5 * smoothing
            v = np.maximum(x, 0) - x * ts + np.log1p(np.exp(-np.abs(x)))
        elif name == "hinge_loss":
            v = np.maximum(0.0, 1.0 - (2 * t - 1) * x)
        elif name == "kl_div":
            if log_target:
                v = np.exp(t) * (t - x)
            else:
                with np.errstate(divide="ignore", invalid="ignore"):
                    v = np.where(t == 0, 0.0, t * np.log(np.where(t == 0, 1.0, t))) - t * x
        elif name == "log_loss":
            v = -t * np.log(x + epsilon) - (1 - t) * np.log(1 - x + epsilon)
        else:
            raise KeyError(name)
        return v, np.ones(v.shape, bool)
    c = x.shape[1]
    xs = _positions(x)
    out = np.zeros(xs.shape[:-1])
    valid = np.ones(out.shape, bool)
    if labels:
        valid = np.asarray(t) != ignore_index
    if name == "cosine_distance":
        ts = _positions(np.asarray(t, np.float64))
    else:
        ts = smoothed(np.asarray(t), labels, c, smoothing, ignore_index)
    for idx in np.ndindex(out.shape):
        if not valid[idx]:
            continue
        v, tv = xs[idx], ts[idx]
        if name == "cross_entropy":
            z = v - v.max()  # -log softmax = log sum exp(z) - z, exact for huge logits too
            out[idx] = np.sum(tv * (np.log(np.sum(np.exp(z))) - z))
        elif name == "categorical_cross_entropy":
            out[idx] = -sum(tv[k] * np.log(v[k]) for k in range(c) if tv[k] != 0)
        elif name == "cosine_distance":
            out[idx] = 1 - np.dot(v, tv) / np.sqrt(max(np.dot(v, v) * np.dot(tv, tv), eps * eps))
        else:
            raise KeyError(name)
    return out, valid


def term_grads(name: str, x: np.ndarray, t: np.ndarray, labels: bool = False,
               smoothing: float = 0.0, ignore_index: int = -100, delta: float = 1.0,
               eps: float = 1e-8, epsilon: float = 1e-7, log_target: bool = False) -> np.ndarray:
    """d term / d x, shaped like x (each term depends only on its own element or class vector)."""
    x = np.asarray(x, np.float64)
    if name in POINTWISE:
        t = np.asarray(t, np.float64)
        d = x - t
        if name == "mse_loss":
            return 2 * d
        if name == "l1_loss":
            return np.sign(d)
        if name == "huber_loss":
            return np.where(np.abs(d) < delta, d, delta * np.sign(d))
        if name == "bce_with_logits":
            return 1 / (1 + np.exp(-x)) - (t * (1 - smoothing) + 0.5 * smoothing)
        if name == "hinge_loss":
            y = 2 * t - 1
            return np.where(1 - y * x > 0, -y, 0.0)
        if name == "kl_div":
            return -np.exp(t) if log_target else -t
        if name == "log_loss":
            return -t / (x + epsilon) + (1 - t) / (1 - x + epsilon)
        raise KeyError(name)
    c = x.shape[1]
    xs = _positions(x)
    g = np.zeros(xs.shape)
    if name == "cosine_distance":
        ts = _positions(np.asarray(t, np.float64))
    else:
        ts = smoothed(np.asarray(t), labels, c, smoothing, ignore_index)
    for idx in np.ndindex(xs.shape[:-1]):
        if labels and t[idx] == ignore_index:
            continue
        v, tv = xs[idx], ts[idx]
        if name == "cross_entropy":
            e = np.exp(v - v.max())
            g[idx] = e / e.sum() * tv.sum() - tv
        elif name == "categorical_cross_entropy":
            g[idx] = np.where(tv != 0, -tv / np.where(tv != 0, v, 1.0), 0.0)
        elif name == "cosine_distance":
            nx, nt, dot = np.dot(v, v), np.dot(tv, tv), np.dot(v, tv)
            if nx * nt > eps * eps:
                den = np.sqrt(nx * nt)
                g[idx] = -(tv / den - dot / den * v / nx)
            else:
                g[idx] = -tv / eps
        else:
            raise KeyError(name)
    return np.moveaxis(g, -1, 1)


def _weights(shape: tuple[int, ...], w: np.ndarray | None) -> np.ndarray:
    n = shape[0]
    wv = np.ones(n) if w is None else np.asarray(w, np.float64)
    return np.broadcast_to(wv.reshape((n,) + (1,) * (len(shape) - 1)), shape)


def reduce(v: np.ndarray, valid: np.ndarray, w: np.ndarray | None, reduction: str) -> np.ndarray:
    """Weight the terms (0 where invalid or weight 0) and apply the reduction."""
    ww = _weights(v.shape, w)
    use = valid & (ww != 0)
    wt = np.where(use, ww * np.where(use, v, 0.0), 0.0)
    if reduction == "none":
        return wt
    if reduction == "per_sample":
        return wt.reshape(v.shape[0], -1).sum(axis=1)
    total = wt.sum()
    if reduction == "sum":
        return np.array(total)
    if reduction == "mean":
        return np.array(total / valid.sum())
    if reduction == "sum_by_nonzero_weights":
        k = use.sum()
        return np.array(total / k if k else 0.0)
    if reduction == "batchmean":
        return np.array(total / v.shape[0])
    raise KeyError(reduction)


def forward(name: str, x: np.ndarray, t: np.ndarray, w: np.ndarray | None = None,
            reduction: str = "mean", **opts) -> np.ndarray:
    v, valid = terms(name, x, t, **opts)
    return reduce(v, valid, w, reduction)


def backward(name: str, grad, x: np.ndarray, t: np.ndarray, w: np.ndarray | None = None,
             reduction: str = "mean", **opts) -> np.ndarray:
    """d/dx of sum(grad * forward(...))."""
    x = np.asarray(x, np.float64)
    v, valid = terms(name, x, t, **opts)
    ww = _weights(v.shape, w)
    use = valid & (ww != 0)
    grad = np.asarray(grad, np.float64)
    if reduction == "none":
        coef = grad
    elif reduction == "per_sample":
        coef = np.broadcast_to(grad.reshape((-1,) + (1,) * (v.ndim - 1)), v.shape)
    else:
        den = {"sum": 1.0, "mean": valid.sum(), "batchmean": v.shape[0],
               "sum_by_nonzero_weights": use.sum()}[reduction]
        coef = np.full(v.shape, float(grad) / den if den else 0.0)
    coef = np.where(use, coef * ww, 0.0)
    dg = term_grads(name, x, t, **opts)
    if name in POINTWISE:
        return coef * dg
    return dg * coef[:, None]
