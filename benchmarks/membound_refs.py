"""float64/float32 numpy references of benchmarks/dev_membound.py's check shapes (batch norm
training / eval / backward, softmax and its backward, cross-entropy, pooling), kept apart from the
sweep so each stays readable."""
from __future__ import annotations

import numpy as np


def f32(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32)


def bn_train(ctx: dict) -> np.ndarray:
    x = ctx["x_np"].astype(np.float64)
    m = x.mean((0, 2, 3), keepdims=True)
    v = x.var((0, 2, 3), keepdims=True)
    w = ctx["bw_np"].reshape(1, -1, 1, 1)
    b = ctx["bb_np"].reshape(1, -1, 1, 1)
    return (x - m) / np.sqrt(v + 1e-5) * w + b


def bn_eval(ctx: dict) -> np.ndarray:
    x = ctx["x_np"].astype(np.float64)
    w = ctx["bw_np"].reshape(1, -1, 1, 1)
    b = ctx["bb_np"].reshape(1, -1, 1, 1)
    rm = ctx["rm"].numpy().astype(np.float64).reshape(1, -1, 1, 1)
    rv = ctx["rv"].numpy().astype(np.float64).reshape(1, -1, 1, 1)
    return (x - rm) / np.sqrt(rv + 1e-5) * w + b


def bn_bwd(ctx: dict) -> np.ndarray:
    x = ctx["x_np"].astype(np.float64)
    g = (ctx["x_np"] * 0.5 + 0.1).astype(ctx["dtype"]).astype(np.float64)
    ax = (0, 2, 3)
    m = x.mean(ax, keepdims=True)
    inv = 1 / np.sqrt(x.var(ax, keepdims=True) + 1e-5)
    xh = (x - m) * inv
    w = ctx["bw_np"].reshape(1, -1, 1, 1)
    cnt = x.size / x.shape[1]
    return w * inv * (g - g.sum(ax, keepdims=True) / cnt - xh * (g * xh).sum(ax, keepdims=True) / cnt)


def softmax_bwd(ctx: dict, log: bool) -> np.ndarray:
    g = ctx["g_np"].astype(np.float64)
    if log:
        return g - np.exp(ctx["ly_np"].astype(np.float64)) * g.sum(1, keepdims=True)
    y = ctx["y_np"].astype(np.float64)
    return y * (g - (g * y).sum(1, keepdims=True))


def softmax(ctx: dict) -> np.ndarray:
    x = ctx["x_np"].astype(np.float64)
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def cross_entropy(ctx: dict) -> np.ndarray:
    s = softmax(ctx)
    n = s.shape[0]
    oh = np.zeros_like(s)
    oh[np.arange(n), ctx["lab_np"]] = 1
    return (s - oh) / n


def pool(x: np.ndarray, kk: int, s: int, pad: int, mode: str) -> np.ndarray:
    n, c, h, w = x.shape
    oh, ow = (h + 2 * pad - kk) // s + 1, (w + 2 * pad - kk) // s + 1
    fill = -np.inf if mode == "max" else 0.0
    xp = np.full((n, c, h + 2 * pad, w + 2 * pad), fill)
    xp[:, :, pad:pad + h, pad:pad + w] = x
    out = np.full((n, c, oh, ow), fill) if mode == "max" else np.zeros((n, c, oh, ow))
    for i in range(kk):
        for j in range(kk):
            win = xp[:, :, i:i + s * oh:s, j:j + s * ow:s]
            out = np.maximum(out, win) if mode == "max" else out + win
    return out if mode == "max" else out / (kk * kk)
