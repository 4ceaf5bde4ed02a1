"""Plain numpy references for pooling, in float64, written from the definitions with loops.

Design note: every function loops over output positions and window taps in the obvious order
and shares nothing with pymetalnn. Backward functions SCATTER (each output sends its gradient to
the inputs of its window), the opposite formulation of the kernels (which gather per input), so
the two cannot share a mistake in the window-range arithmetic. Sizes are torch's: stride defaults
to the kernel, out = floor((in + 2p - d(k - 1) - 1 + (s - 1 if ceil_mode)) / s) + 1, and in
ceil mode the last window must start inside the input or its left padding. Inputs are 4-d
(N, C, H, W); 1-d pooling is tested through a (N, C, 1, L) view with a 1-row window.
"""
from __future__ import annotations

import math

import numpy as np


def out_size(n, k, s, p, d, ceil_mode):
    o = (n + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (o - 1) * s >= n + p:
        o -= 1
    return o


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _geom(x, kernel_size, stride, padding, dilation, ceil_mode):
    k = _pair(kernel_size)
    s = k if stride is None else _pair(stride)
    p, d = _pair(padding), _pair(dilation)
    oh = out_size(x.shape[2], k[0], s[0], p[0], d[0], ceil_mode)
    ow = out_size(x.shape[3], k[1], s[1], p[1], d[1], ceil_mode)
    return k, s, p, d, oh, ow


def _taps(i, k, s, p, d, n):
    """Input rows (or columns) of output i's window that lie inside the input, in order."""
    return [i * s - p + r * d for r in range(k) if 0 <= i * s - p + r * d < n]


def max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
    """(y, indices): y = window max; indices = h * W + w of the first maximum in row-major window
    order (a NaN beats everything, a later NaN an earlier one); a window with no tap inside
    the input gives -inf and index -1."""
    x = np.asarray(x, np.float64)
    n, c, h, w = x.shape
    k, s, p, d, oh, ow = _geom(x, kernel_size, stride, padding, dilation, ceil_mode)
    y = np.full((n, c, oh, ow), -np.inf)
    idx = np.full((n, c, oh, ow), -1, np.int64)
    for b in range(n):
        for ch in range(c):
            for i in range(oh):
                for j in range(ow):
                    best, arg = -math.inf, -1
                    for hh in _taps(i, k[0], s[0], p[0], d[0], h):
                        for ww in _taps(j, k[1], s[1], p[1], d[1], w):
                            v = x[b, ch, hh, ww]
                            if arg < 0 or v > best or math.isnan(v):
                                best, arg = v, hh * w + ww
                    y[b, ch, i, j], idx[b, ch, i, j] = best, arg
    return y, idx


def max_pool2d_backward(g, x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
    """Scatter: each output's gradient goes to its argmax (summed where argmaxes coincide)."""
    g = np.asarray(g, np.float64)
    _, idx = max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)
    n, c, h, w = np.shape(x)
    dx = np.zeros((n, c, h * w))
    for b in range(n):
        for ch in range(c):
            for o, i in zip(g[b, ch].reshape(-1), idx[b, ch].reshape(-1)):
                if i >= 0:
                    dx[b, ch, i] += o
    return dx.reshape(n, c, h, w)


def _avg_windows(shape, kernel_size, stride, padding, ceil_mode, count_include_pad,
                 divisor_override):
    """Yields (i, j, rows, cols, divisor) per output, torch's divisor rule: divisor_override,
    else the window clipped to the padded input (count_include_pad) or to the input."""
    _, _, h, w = shape
    k = _pair(kernel_size)
    s = k if stride is None else _pair(stride)
    p = _pair(padding)
    oh = out_size(h, k[0], s[0], p[0], 1, ceil_mode)
    ow = out_size(w, k[1], s[1], p[1], 1, ceil_mode)
    for i in range(oh):
        for j in range(ow):
            h0, w0 = i * s[0] - p[0], j * s[1] - p[1]
            h1, w1 = min(h0 + k[0], h + p[0]), min(w0 + k[1], w + p[1])
            rows = [r for r in range(h0, h1) if 0 <= r < h]
            cols = [q for q in range(w0, w1) if 0 <= q < w]
            if divisor_override:
                div = divisor_override
            elif count_include_pad:
                div = (h1 - h0) * (w1 - w0)
            else:
                div = len(rows) * len(cols)
            yield i, j, rows, cols, div, (oh, ow)


def avg_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
               divisor_override=None):
    x = np.asarray(x, np.float64)
    out = None
    for i, j, rows, cols, div, (oh, ow) in _avg_windows(x.shape, kernel_size, stride, padding,
                                                        ceil_mode, count_include_pad,
                                                        divisor_override):
        if out is None:
            out = np.zeros((*x.shape[:2], oh, ow))
        if rows and cols:
            out[:, :, i, j] = x[:, :, rows][:, :, :, cols].sum(axis=(2, 3)) / div
    return out


def avg_pool2d_backward(g, x, kernel_size, stride=None, padding=0, ceil_mode=False,
                        count_include_pad=True, divisor_override=None):
    g = np.asarray(g, np.float64)
    dx = np.zeros(np.shape(x))
    for i, j, rows, cols, div, _ in _avg_windows(np.shape(x), kernel_size, stride, padding,
                                                 ceil_mode, count_include_pad, divisor_override):
        for r in rows:
            for q in cols:
                dx[:, :, r, q] += g[:, :, i, j] / div
    return dx


def _cells(n_in, n_out):
    return [(o * n_in // n_out, -(-(o + 1) * n_in // n_out)) for o in range(n_out)]


def adaptive_avg_pool2d(x, output_size):
    x = np.asarray(x, np.float64)
    oh, ow = _pair(output_size)
    y = np.zeros((*x.shape[:2], oh, ow))
    for i, (h0, h1) in enumerate(_cells(x.shape[2], oh)):
        for j, (w0, w1) in enumerate(_cells(x.shape[3], ow)):
            y[:, :, i, j] = x[:, :, h0:h1, w0:w1].mean(axis=(2, 3))
    return y


def adaptive_avg_pool2d_backward(g, x, output_size):
    g = np.asarray(g, np.float64)
    oh, ow = _pair(output_size)
    dx = np.zeros(np.shape(x))
    for i, (h0, h1) in enumerate(_cells(dx.shape[2], oh)):
        for j, (w0, w1) in enumerate(_cells(dx.shape[3], ow)):
            dx[:, :, h0:h1, w0:w1] += g[:, :, i:i + 1, j:j + 1] / ((h1 - h0) * (w1 - w0))
    return dx


def finite_diff_vjp(f, x, g, eps=1e-6):
    """sum(g * (f(x + eps e_i) - f(x - eps e_i)) / 2 eps) for every element i of x: the
    vector-Jacobian product a backward must return, by central differences (float64)."""
    x = np.asarray(x, np.float64)
    out = np.zeros_like(x)
    flat = out.reshape(-1)
    for i in range(x.size):
        e = np.zeros(x.size)
        e[i] = eps
        e = e.reshape(x.shape)
        flat[i] = np.sum(g * (f(x + e) - f(x - e))) / (2 * eps)
    return out
