"""Plain numpy references for the convolution family, straight from the definitions, in float64.

Design note: these are deliberately written the obvious way (a loop over the kernel taps with an
einsum over channels per tap) and share nothing with pymetalnn, so a kernel bug cannot hide in a
shared helper. conv_transpose2d is written from its own definition (scatter every input pixel
through the kernel) rather than as a conv input gradient, so it checks that identity instead of
assuming it. Padding is always explicit here: (top, bottom, left, right).

    y[n, g*Kg + k, oh, ow] = b[g*Kg + k] + sum_{c < Cg, r, s} x[n, g*Cg + c, oh*sh - pt + r*dh,
                                                                 ow*sw - pl + s*dw] * w[g*Kg + k, c, r, s]
"""
from __future__ import annotations

import numpy as np


def out_size(n: int, k: int, s: int, p0: int, p1: int, d: int) -> int:
    return (n + p0 + p1 - d * (k - 1) - 1) // s + 1


def _taps(xp: np.ndarray, r: int, s: int, oh: int, ow: int, st: tuple, dil: tuple) -> np.ndarray:
    """xp[..., oh*sh + r*dh, ow*sw + s*dw] for all (oh, ow): the input pixels tap (r, s) sees."""
    h0, w0 = r * dil[0], s * dil[1]
    return xp[..., h0: h0 + st[0] * (oh - 1) + 1: st[0], w0: w0 + st[1] * (ow - 1) + 1: st[1]]


def _pad(x: np.ndarray, pad: tuple) -> np.ndarray:
    """x (N, C, H, W) zero-padded by (top, bottom, left, right); negative padding never occurs."""
    n, c, h, wd = x.shape
    xp = np.zeros((n, c, h + pad[0] + pad[1], wd + pad[2] + pad[3]))
    xp[:, :, pad[0]: pad[0] + h, pad[2]: pad[2] + wd] = x
    return xp


def _canvas(h: int, wd: int, kh: int, kw: int, oh: int, ow: int, stride, padding, dilation
            ) -> tuple[int, int]:
    """(height, width) of conv_transpose2d's full (uncropped) canvas: big enough for every tap
    and the output padding."""
    fh = max((h - 1) * stride[0] + dilation[0] * (kh - 1) + 1, padding[0] + oh)
    fw = max((wd - 1) * stride[1] + dilation[1] * (kw - 1) + 1, padding[1] + ow)
    return fh, fw


def _grouped(x: np.ndarray, w: np.ndarray, groups: int, pad: tuple
             ) -> tuple[np.ndarray, np.ndarray]:
    """A conv's zero-padded x as (N, G, C/G, Hp, Wp) and w as (G, K/G, C/G, KH, KW)."""
    n, _, _, _ = x.shape
    k, cg, kh, kw = w.shape
    xp = _pad(x, pad)
    return xp.reshape(n, groups, cg, *xp.shape[2:]), w.reshape(groups, k // groups, cg, kh, kw)


def _transpose_grouped(x: np.ndarray, w: np.ndarray, groups: int
                       ) -> tuple[np.ndarray, np.ndarray]:
    """A transposed conv's x as (N, G, Cin/G, H, W) and w as (G, Cin/G, Cout/G, KH, KW)."""
    n, cin, h, wd = x.shape
    _, cog, kh, kw = w.shape
    return x.reshape(n, groups, cin // groups, h, wd), w.reshape(groups, cin // groups, cog, kh, kw)


def _scatter(h: int, wd: int, kh: int, kw: int, stride, dilation):
    """(i, j, r, s, p, q) for every input pixel (i, j) and tap (r, s) of a transposed conv: the
    pixel reaches the uncropped canvas at (p, q) = (i*sh + r*dh, j*sw + s*dw)."""
    for i in range(h):
        for j in range(wd):
            for r in range(kh):
                for s in range(kw):
                    yield i, j, r, s, i * stride[0] + r * dilation[0], j * stride[1] + s * dilation[1]


def conv2d(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None, stride=(1, 1),
           pad=(0, 0, 0, 0), dilation=(1, 1), groups: int = 1) -> np.ndarray:
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    n, _, h, wd = x.shape
    k, _, kh, kw = w.shape
    oh = out_size(h, kh, stride[0], pad[0], pad[1], dilation[0])
    ow = out_size(wd, kw, stride[1], pad[2], pad[3], dilation[1])
    xg, wg = _grouped(x, w, groups, pad)
    y = np.zeros((n, groups, k // groups, oh, ow))
    for r in range(kh):
        for s in range(kw):
            y += np.einsum("ngchw,gkc->ngkhw", _taps(xg, r, s, oh, ow, stride, dilation),
                           wg[:, :, :, r, s])
    y = y.reshape(n, k, oh, ow)
    if b is not None:
        y += np.asarray(b, np.float64)[None, :, None, None]
    return y


def conv2d_backward(gy: np.ndarray, x: np.ndarray, w: np.ndarray, has_bias: bool, stride=(1, 1),
                    pad=(0, 0, 0, 0), dilation=(1, 1), groups: int = 1):
    """(dL/dx, dL/dw, dL/db or None) given dL/dy, by the chain rule on each tap."""
    gy, x, w = (np.asarray(a, np.float64) for a in (gy, x, w))
    n, c, h, wd = x.shape
    k, cg, kh, kw = w.shape
    _, _, oh, ow = gy.shape
    xg, wg = _grouped(x, w, groups, pad)
    hp, wp = xg.shape[3:]
    gyg = gy.reshape(n, groups, k // groups, oh, ow)
    gxp = np.zeros(xg.shape)
    gw = np.zeros(wg.shape)
    for r in range(kh):
        for s in range(kw):
            # y[.., oh, ow] used xp[.., oh*sh + r*dh, ow*sw + s*dw] with weight w[.., r, s]
            _taps(gxp, r, s, oh, ow, stride, dilation)[...] += np.einsum(
                "ngkhw,gkc->ngchw", gyg, wg[:, :, :, r, s])
            gw[:, :, :, r, s] = np.einsum("ngkhw,ngchw->gkc", gyg,
                                          _taps(xg, r, s, oh, ow, stride, dilation))
    gx = gxp.reshape(n, c, hp, wp)[:, :, pad[0]: pad[0] + h, pad[2]: pad[2] + wd]
    gb = gy.sum(axis=(0, 2, 3)) if has_bias else None
    return gx, gw.reshape(k, cg, kh, kw), gb


def conv_transpose2d(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None, stride=(1, 1),
                     padding=(0, 0), output_padding=(0, 0), dilation=(1, 1), groups: int = 1
                     ) -> np.ndarray:
    """Each input pixel x[n, ci, i, j] adds x * w[ci, co, r, s] at output (i*sh - ph + r*dh,
    j*sw - pw + s*dw) (torch semantics; weights (C_in, C_out/groups, kH, kW))."""
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    n, _, h, wd = x.shape
    _, cog, kh, kw = w.shape
    oh = (h - 1) * stride[0] - 2 * padding[0] + dilation[0] * (kh - 1) + output_padding[0] + 1
    ow = (wd - 1) * stride[1] - 2 * padding[1] + dilation[1] * (kw - 1) + output_padding[1] + 1
    fh, fw = _canvas(h, wd, kh, kw, oh, ow, stride, padding, dilation)
    full = np.zeros((n, groups, cog, fh, fw))
    xg, wg = _transpose_grouped(x, w, groups)
    for i, j, r, s, p, q in _scatter(h, wd, kh, kw, stride, dilation):
        full[:, :, :, p, q] += np.einsum("ngc,gco->ngo", xg[:, :, :, i, j], wg[:, :, :, r, s])
    y = full[:, :, :, padding[0]: padding[0] + oh, padding[1]: padding[1] + ow].reshape(
        n, groups * cog, oh, ow)
    if b is not None:
        y = y + np.asarray(b, np.float64)[None, :, None, None]
    return y


def conv_transpose2d_backward(gy: np.ndarray, x: np.ndarray, w: np.ndarray, has_bias: bool,
                              stride=(1, 1), padding=(0, 0), output_padding=(0, 0),
                              dilation=(1, 1), groups: int = 1):
    """Gradients of conv_transpose2d: y[o] gathered x*w, so dx and dw gather gy at the same taps."""
    gy, x, w = (np.asarray(a, np.float64) for a in (gy, x, w))
    n, cin, h, wd = x.shape
    _, cog, kh, kw = w.shape
    _, _, oh, ow = gy.shape
    fh, fw = _canvas(h, wd, kh, kw, oh, ow, stride, padding, dilation)
    full = np.zeros((n, groups, cog, fh, fw))
    full[:, :, :, padding[0]: padding[0] + oh, padding[1]: padding[1] + ow] = gy.reshape(
        n, groups, cog, oh, ow)
    xg, wg = _transpose_grouped(x, w, groups)
    gx = np.zeros(xg.shape)
    gw = np.zeros(wg.shape)
    for i, j, r, s, p, q in _scatter(h, wd, kh, kw, stride, dilation):
        t = full[:, :, :, p, q]
        gx[:, :, :, i, j] += np.einsum("ngo,gco->ngc", t, wg[:, :, :, r, s])
        gw[:, :, :, r, s] += np.einsum("ngc,ngo->gco", xg[:, :, :, i, j], t)
    gb = gy.sum(axis=(0, 2, 3)) if has_bias else None
    return gx.reshape(n, cin, h, wd), gw.reshape(cin, cog, kh, kw), gb


def conv2d_abs(x: np.ndarray, w: np.ndarray, **kw) -> np.ndarray:
    """sum of |x*w| over each output's terms: the scale that rounding errors are measured against."""
    return conv2d(np.abs(x), np.abs(w), None, **kw)
