"""Transposed convolutions: conv_transpose2d, conv_transpose1d and their backward passes.

Design note: a transposed conv is the input gradient of the conv whose input is the transpose's
output, so it runs kernels/conv.metal through ops/conv.py's plans with that conv's geometry
(`_transpose_args` builds it): the forward runs the input-gradient kernel, the backward runs the
forward kernel for dx and the weight-gradient kernel with dy and x swapped for dw. The 1-D ops
are the 2-D ones with H = 1. Names, positional order and defaults are torch's
(..., output_padding, groups, dilation). Re-exported by ops/conv.py.
"""
from __future__ import annotations

from typing import Any

from ..runtime import Device
from ..tensor import Tensor, TensorLike
from ._common import FLOATS, pick_device, positive_ints, tensor_arg
from .conv import (
    MAX_ELEMS,
    ConvGeometry,
    _as_1d,
    _as_2d,
    _batched,
    _bias,
    _bias_grad,
    _forward,
    _grad_arg,
    _group_count,
    _input_grad,
    _operands,
    _precision,
    _unbatched,
    _weight_grad,
)


def _transpose_args(x: TensorLike, w: TensorLike, b: TensorLike | None, stride: Any, padding: Any,
                    output_padding: Any, dilation: Any, groups: Any, accumulate: str | None
                    ) -> tuple[Device, Tensor, Tensor, Tensor | None, ConvGeometry, str]:
    """Validate conv_transpose2d's arguments; the geometry returned is the conv view (its input is
    the transpose's output, its output the transpose's input, its weights w as given)."""
    dev, x, w = _operands(x, w, b)
    n, cin, h, wd = x.shape
    wcin, cog, kh, kw = w.shape
    st = positive_ints(stride, 2, "stride")
    dil = positive_ints(dilation, 2, "dilation")
    pad = positive_ints(padding, 2, "padding", allow_zero=True)
    opad = positive_ints(output_padding, 2, "output_padding", allow_zero=True)
    g = _group_count(groups)
    if cin % g:
        raise ValueError(f"groups: {g} does not divide the {cin} input channels of x")
    if wcin != cin:
        raise ValueError(f"w: expected {cin} input channels (w is (C_in, C_out/groups, kH, kW)), "
                         f"got {wcin}")
    for i in range(2):
        if opad[i] >= max(st[i], dil[i]):
            raise ValueError(f"output_padding: {opad} must be smaller than stride {st} or dilation "
                             f"{dil} in each dimension")
    oh = (h - 1) * st[0] - 2 * pad[0] + dil[0] * (kh - 1) + opad[0] + 1
    ow = (wd - 1) * st[1] - 2 * pad[1] + dil[1] * (kw - 1) + opad[1] + 1
    if oh < 1 or ow < 1:
        raise ValueError(f"padding: {pad} leaves an empty output ({oh}x{ow})")
    geo = ConvGeometry(n, cog * g, oh, ow, cin, h, wd, kh, kw, st[0], st[1], pad[0], pad[1],
                       dil[0], dil[1], g)
    if n * geo.C * oh * ow >= MAX_ELEMS:
        raise ValueError("x: the output would have 2^31 elements or more")
    b = _bias(b, dev, x, geo.C)
    return dev, x, w, b, geo, _precision(x.dtype, accumulate)


def conv_transpose2d(input: TensorLike, weight: TensorLike, bias: TensorLike | None = None, stride: Any = 1,
                     padding: Any = 0,
                     output_padding: Any = 0, groups: int = 1, dilation: Any = 1,
                     accumulate: str | None = None) -> Tensor:
    """Transposed 2-D convolution (torch.nn.functional.conv_transpose2d), NCHW: the input gradient
    of conv2d. x (N, C_in, H, W), w (C_in, C_out/groups, KH, KW), b (C_out,) or None:

        y[n, g*Cog + o, i*sh - ph + r*dh, j*sw - pw + s*dw] += x[n, ci, i, j] * w[ci, o, r, s]

    summed over ci in group g, (i, j) and (r, s), plus b; output
    OH = (H-1)*sh - 2*ph + dh*(KH-1) + output_padding_h + 1 (output_padding < stride or < dilation).
    Runs the conv input-gradient kernel. accumulate as in conv2d. Positional order is torch's:
    (..., output_padding, groups, dilation), unlike conv2d's (..., dilation, groups).
    """
    x, w, b = input, weight, bias
    x, unb = _batched(x, 4, w, b)
    dev, x, w, b, geo, prec = _transpose_args(x, w, b, stride, padding, output_padding, dilation,
                                              groups, accumulate)
    return _unbatched(_input_grad(dev, prec, geo, x, w, b, x.dtype), unb)


def conv_transpose2d_backward(grad_out: TensorLike, input: TensorLike, weight: TensorLike,
                              bias: TensorLike | None = None, stride: Any = 1,
                              padding: Any = 0, output_padding: Any = 0, groups: int = 1,
                              dilation: Any = 1, accumulate: str | None = None
                              ) -> tuple[Tensor, Tensor, Tensor | None]:
    """Gradients of conv_transpose2d: (dL/dx, dL/dw, dL/db or None), given dL/dy.

        dx[n, ci, i, j]  = sum_{o, r, s} dy[n, o, i*sh - ph + r*dh, j*sw - pw + s*dw] * w[ci, o, r, s]
        dw[ci, o, r, s]  = sum_{n, i, j} x[n, ci, i, j] * dy[n, o, i*sh - ph + r*dh, j*sw - pw + s*dw]
        db[o]            = sum_{n, p, q} dy[n, o, p, q]

    dx is conv2d(dy, w) (the forward kernel); dw is conv2d's weight gradient with x in the role of
    dy and dy in the role of the input.
    """
    x, w, b = input, weight, bias
    x, unb = _batched(x, 4, w, b)
    if unb:
        grad_out, _ = _batched(grad_out, 4, x)
    dev, x, w, b, geo, prec = _transpose_args(x, w, b, stride, padding, output_padding, dilation,
                                              groups, accumulate)
    gy = _grad_arg(grad_out, dev, x, (geo.N, geo.C, geo.H, geo.W))
    gx = _forward(dev, prec, geo, gy, w, None, x.dtype)
    gw = _weight_grad(dev, prec, geo, x, gy, x.dtype)
    gb = _bias_grad(dev, gy) if b is not None else None
    return _unbatched(gx, unb), gw, gb


def _transpose1d_args(x: Any, w: Any, stride: Any, padding: Any, output_padding: Any,
                      dilation: Any, dev: Device) -> tuple[Tensor, Tensor, tuple, tuple, tuple, tuple]:
    x = tensor_arg(x, dev, "input", FLOATS, 3)
    w = tensor_arg(w, dev, "weight", FLOATS, 3)
    one = [positive_ints(v, 1, n, allow_zero=z)[0] for v, n, z in (
        (stride, "stride", False), (padding, "padding", True), (output_padding, "output_padding", True),
        (dilation, "dilation", False))]
    return _as_2d(x), _as_2d(w), (1, one[0]), (0, one[1]), (0, one[2]), (1, one[3])


def conv_transpose1d(input: TensorLike, weight: TensorLike, bias: TensorLike | None = None, stride: Any = 1,
                     padding: Any = 0,
                     output_padding: Any = 0, groups: int = 1, dilation: Any = 1,
                     accumulate: str | None = None) -> Tensor:
    """Transposed 1-D convolution (torch.nn.functional.conv_transpose1d): x (N, C_in, L) or
    (C_in, L), w (C_in, C_out/groups, K), b (C_out,) or None ->
    (N, C_out, (L-1)*s - 2*p + d*(K-1) + output_padding + 1):

        y[n, g*Cog + o, i*s - p + r*d] += x[n, ci, i] * w[ci, o, r]

    conv_transpose2d's kernels with H = 1; torch's positional order."""
    x, unb = _batched(input, 3, weight, bias)
    dev = pick_device(x, weight, bias)
    x4, w4, st, pad, opad, dil = _transpose1d_args(x, weight, stride, padding, output_padding,
                                                   dilation, dev)
    return _unbatched(_as_1d(conv_transpose2d(x4, w4, bias, st, pad, opad, groups, dil,
                                              accumulate)), unb)


def conv_transpose1d_backward(grad_out: TensorLike, input: TensorLike, weight: TensorLike,
                              bias: TensorLike | None = None,
                              stride: Any = 1, padding: Any = 0, output_padding: Any = 0,
                              groups: int = 1, dilation: Any = 1, accumulate: str | None = None
                              ) -> tuple[Tensor, Tensor, Tensor | None]:
    """Gradients of conv_transpose1d: (dL/dx, dL/dw, dL/db or None), conv_transpose2d_backward
    with H = 1."""
    x, unb = _batched(input, 3, weight, bias)
    if unb:
        grad_out, _ = _batched(grad_out, 3, x)
    dev = pick_device(grad_out, x, weight, bias)
    x4, w4, st, pad, opad, dil = _transpose1d_args(x, weight, stride, padding, output_padding,
                                                   dilation, dev)
    gy = tensor_arg(grad_out, dev, "grad_out", FLOATS, 3)
    gx, gw, gb = conv_transpose2d_backward(_as_2d(gy), x4, w4, bias, st, pad, opad, groups, dil,
                                           accumulate)
    return _unbatched(_as_1d(gx), unb), _as_1d(gw), gb
