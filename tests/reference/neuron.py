"""Plain numpy references for the activation ("neuron") family, in float64, from the definitions.

Design note: each op is written the obvious way with np.where / np.exp / math.erf and shares
nothing with pymetalnn. Backward functions are the analytic derivatives times grad_out, with
torch's conventions at kinks (relu'(0) = 0, leaky_relu'(0) = slope, elu'(0) = alpha,
hardsigmoid'(+-3) = 0); tests check them against float64 finite differences away from kinks.
NaN inputs give NaN outputs, as in torch.
"""
from __future__ import annotations

import math

import numpy as np

_erf = np.vectorize(math.erf, otypes=[np.float64])
_erfc = np.vectorize(math.erfc, otypes=[np.float64])
K_TANH = math.sqrt(2.0 / math.pi)
C_TANH = 0.044715


def _f64(x):
    return np.asarray(x, np.float64)


def _where(cond, a, b, x):
    """np.where that keeps NaN of x (comparisons with NaN are False, so pick NaN explicitly)."""
    return np.where(np.isnan(x), np.nan, np.where(cond, a, b))


def relu(x):
    x = _f64(x)
    return _where(x > 0, x, 0.0, x)


def relu_backward(g, x):
    g, x = _f64(g), _f64(x)
    return np.where(x <= 0, 0.0, g)  # torch: threshold_backward, NaN x passes grad


def leaky_relu(x, negative_slope=0.01):
    x = _f64(x)
    return np.where(x > 0, x, negative_slope * x)


def leaky_relu_backward(g, x, negative_slope=0.01):
    g, x = _f64(g), _f64(x)
    return np.where(x > 0, g, negative_slope * g)


def elu(x, alpha=1.0):
    x = _f64(x)
    with np.errstate(over="ignore"):
        return np.where(x > 0, x, alpha * np.expm1(np.minimum(x, 0.0)))


def elu_backward(g, x, alpha=1.0):
    g, x = _f64(g), _f64(x)
    return np.where(x <= 0, g * alpha * np.exp(np.minimum(x, 0.0)), g)


def sigmoid(x):
    x = _f64(x)
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-x))


def sigmoid_backward(g, x):
    s = sigmoid(x)
    return _f64(g) * s * (1.0 - s)


def tanh(x):
    return np.tanh(_f64(x))


def tanh_backward(g, x):
    t = np.tanh(_f64(x))
    return _f64(g) * (1.0 - t * t)


def softplus(x, beta=1.0, threshold=20.0):
    x = _f64(x)
    z = beta * x
    with np.errstate(over="ignore"):
        soft = np.log1p(np.exp(-np.abs(z))) + np.maximum(z, 0.0)  # = log(1 + exp(z)), no overflow
    return np.where(z > threshold, x, soft / beta)


def softplus_backward(g, x, beta=1.0, threshold=20.0):
    g, x = _f64(g), _f64(x)
    z = beta * x
    with np.errstate(over="ignore"):
        return np.where(z > threshold, g, g / (1.0 + np.exp(-z)))


def gelu(x, approximate="none"):
    x = _f64(x)
    if approximate == "tanh":
        with np.errstate(over="ignore", invalid="ignore"):
            return 0.5 * x * (1.0 + np.tanh(K_TANH * (x + C_TANH * x ** 3)))
    return 0.5 * x * _erfc(-x / math.sqrt(2.0))  # = x Phi(x), exact in the left tail


def gelu_backward(g, x, approximate="none"):
    g, x = _f64(g), _f64(x)
    if approximate == "tanh":
        with np.errstate(over="ignore", invalid="ignore"):
            t = np.tanh(K_TANH * (x + C_TANH * x ** 3))
            right = 0.5 * x * (1.0 - t * t) * K_TANH * (1.0 + 3.0 * C_TANH * x * x)
        right = np.where(t * t == 1.0, 0.0, right)  # saturated: the term is 0 (inf * 0 in f64)
        return g * (0.5 * (1.0 + t) + right)
    phi = 0.5 * _erfc(-x / math.sqrt(2.0))
    with np.errstate(under="ignore"):
        pdf = np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    return g * (phi + x * pdf)


def hardsigmoid(x):
    x = _f64(x)
    return _where(x <= -3, 0.0, np.where(x >= 3, 1.0, (x + 3.0) / 6.0), x)


def hardsigmoid_backward(g, x):
    g, x = _f64(g), _f64(x)
    return np.where((x > -3) & (x < 3), g / 6.0, 0.0)


def hard_sigmoid(x, a=0.2, b=0.5):
    v = a * _f64(x) + b
    return _where(v <= 0, 0.0, np.where(v >= 1, 1.0, v), v)


def hard_sigmoid_backward(g, x, a=0.2, b=0.5):
    v = a * _f64(x) + b
    return np.where((v > 0) & (v < 1), a * _f64(g), 0.0)


def linear_neuron(x, a=1.0, b=0.0):
    return a * _f64(x) + b


def linear_neuron_backward(g, x, a=1.0, b=0.0):
    return a * _f64(g) * np.ones_like(_f64(x))


def finite_diff(f, x, g, eps=1e-6):
    """Central-difference estimate of g * f'(x) element-wise (f element-wise), float64."""
    x = _f64(x)
    return _f64(g) * (f(x + eps) - f(x - eps)) / (2 * eps)
