"""Numerical helpers shared by the references (plain numpy / Python only, nothing from pymetalnn)."""
from __future__ import annotations

from typing import Callable

import numpy as np


def numeric_grad(f: Callable[[], float], x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central differences of the scalar f() with respect to every element of x (changed in place
    and restored)."""
    grad = np.zeros(x.shape)
    for i in np.ndindex(*x.shape):
        old = x[i]
        x[i] = old + eps
        hi = f()
        x[i] = old - eps
        lo = f()
        x[i] = old
        grad[i] = (hi - lo) / (2 * eps)
    return grad


def finite_difference(f: Callable[[np.ndarray], float], x: np.ndarray, h: float = 1e-6
                      ) -> np.ndarray:
    """Central differences of the scalar f(x) w.r.t. every element of x, on a float64 copy of x."""
    x = np.array(x, np.float64)
    return numeric_grad(lambda: float(f(x)), x, h)


def activation(z: np.ndarray, act) -> tuple[np.ndarray, np.ndarray]:
    """(act(z), act'(z)) in z's dtype for a fused-activation spec: None, "relu", "sigmoid", "tanh",
    ("leaky_relu", slope) or ("leaky_relu", {"negative_slope": slope})."""
    name = act[0] if isinstance(act, tuple) else act
    if name is None:
        return z, np.ones_like(z)
    if name == "relu":
        return np.maximum(z, 0), (z > 0).astype(z.dtype)
    if name == "leaky_relu":
        a = act[1]["negative_slope"] if isinstance(act[1], dict) else act[1]
        return np.where(z > 0, z, a * z), np.where(z > 0, 1.0, a)
    if name == "sigmoid":
        s = 1 / (1 + np.exp(-z))
        return s, s * (1 - s)
    t = np.tanh(z)
    return t, 1 - t * t
