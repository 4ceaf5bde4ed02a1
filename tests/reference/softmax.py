"""Plain numpy references for softmax and log_softmax, in float64, from the definitions.

Design note: the backward references go through the full Jacobian (an einsum over
dy_j * d y_j / d x_i per position) instead of the simplified closed forms the kernels use, so
the two are independent derivations of the same gradient.

    softmax(x)_i     = exp(x_i) / sum_j exp(x_j)          (computed with the max subtracted)
    log_softmax(x)_i = x_i - log(sum_j exp(x_j))
    d softmax_j / d x_i     = s_j (delta_ij - s_i)
    d log_softmax_j / d x_i = delta_ij - s_i
"""
from __future__ import annotations

import numpy as np

from . import _common


def softmax(x: np.ndarray, dim: int) -> np.ndarray:
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(axis=dim, keepdims=True))
    return e / e.sum(axis=dim, keepdims=True)


def log_softmax(x: np.ndarray, dim: int) -> np.ndarray:
    x = np.asarray(x, np.float64)
    m = x.max(axis=dim, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=dim, keepdims=True))


def _jacobian_vjp(dy: np.ndarray, jac: np.ndarray, dim: int) -> np.ndarray:
    """dx[..., i] = sum_j dy[..., j] * jac[..., j, i] with the axis moved last and back."""
    g = np.moveaxis(np.asarray(dy, np.float64), dim, -1)
    return np.moveaxis(np.einsum("...j,...ji->...i", g, jac), -1, dim)


def softmax_backward(dy: np.ndarray, x: np.ndarray, dim: int) -> np.ndarray:
    """Gradient w.r.t. the INPUT x of softmax(x, dim), given dy."""
    s = np.moveaxis(softmax(x, dim), dim, -1)
    eye = np.eye(s.shape[-1])
    jac = s[..., :, None] * (eye - s[..., None, :])  # [j, i] = s_j (delta_ij - s_i)
    return _jacobian_vjp(dy, jac, dim)


def log_softmax_backward(dy: np.ndarray, x: np.ndarray, dim: int) -> np.ndarray:
    s = np.moveaxis(softmax(x, dim), dim, -1)
    eye = np.eye(s.shape[-1])
    jac = eye - s[..., None, :]  # [j, i] = delta_ij - s_i
    return _jacobian_vjp(dy, jac, dim)


def finite_difference(f, x: np.ndarray, dy: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """Central differences of sum(dy * f(x)) w.r.t. every element of x (float64)."""
    return _common.finite_difference(lambda z: (dy * f(z)).sum(), x, h)
