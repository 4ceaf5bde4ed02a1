"""Convolution nodes (pymetalnn/ops/conv.py): ConvolutionNode, Convolution1dNode,
ConvolutionTransposeNode."""
from __future__ import annotations

from typing import Any

from ... import functional as F
from ..datasource import Conv1dDataSource, ConvolutionDataSource, ConvolutionTransposeDataSource
from ..errors import GraphError
from ..padding import Padding, policy
from .base import (
    FilterNode,
    _act,
    _conv_out,
    _expect_ndim,
    _floats,
    _pair,
    _param_grads,
    _weights_of,
)


class _ConvNode(FilterNode):
    """What the convolution nodes share: images in, channels checked against the weights, the
    input kept for the gradient."""

    def _images(self, shapes: list[tuple[int, ...]], dtypes: list[Any]) -> tuple[tuple, Any]:
        (x,) = shapes
        _expect_ndim(x, 4)
        dt = _floats(dtypes)
        ws = self.weights
        if x[1] != ws.in_channels:
            raise ValueError(f"source has {x[1]} channels, the weights ({ws.label}) expect "
                             f"{ws.in_channels}")
        return x, dt

    def saved(self):
        return [("in", 0)]


class ConvolutionNode(_ConvNode):
    """2-D convolution with weights (and bias) from a ConvolutionDataSource. padding: a padding
    policy (graph/padding.py): "symmetric" by default, dilation*(k-1)//2 on every side as torch's
    padding=k//2 (so a strided convolution ported from torch keeps torch's numbers); "same"
    (MPS/TensorFlow: output ceil(in / stride), the odd pixel at the bottom/right; it differs from
    torch at stride > 1) only by name; "valid", "full", ints or custom."""

    prefix = "conv"

    def __init__(self, source: Any, weights: ConvolutionDataSource, *, stride: Any = 1,
                 dilation: Any = 1, padding: Any = "symmetric", name: str | None = None,
                 register: bool = True):
        self.weights = _weights_of(weights, ConvolutionDataSource, ConvolutionTransposeDataSource)
        self.stride, self.dilation = _pair(stride, "stride"), _pair(dilation, "dilation")
        self.padding: Padding = policy(padding)
        self.pads = (0, 0, 0, 0)
        super().__init__([source], name, register)

    def infer(self, shapes, dtypes):
        x, dt = self._images(shapes, dtypes)
        ws = self.weights
        k = ws.kernel_size
        self.pads = tuple(int(p) for p in self.padding.pads(self, x[2:], k, self.stride,
                                                            self.dilation))  # type: ignore
        if len(self.pads) != 4 or min(self.pads) < 0:
            raise ValueError(f"padding policy {self.padding!r} gave {self.pads}")
        pt, pb, pl, pr = self.pads
        oh = _conv_out(x[2], k[0], self.stride[0], pt, pb, self.dilation[0])
        ow = _conv_out(x[3], k[1], self.stride[1], pl, pr, self.dilation[1])
        if oh < 1 or ow < 1:
            raise ValueError(f"the kernel {k} does not fit the input {x[2:]} padded by {self.pads}")
        return [((x[0], ws.out_channels, oh, ow), dt)]

    def _args(self) -> dict:
        return dict(stride=self.stride, padding=self.pads, dilation=self.dilation,
                    groups=self.weights.groups)

    def forward(self, rc, xs, training, with_state, activation=None):
        return [self.call_with_weights(rc, F.conv2d, xs[0], **self._args(), **_act(activation),
                                       **rc.take_out())]

    def strided_out(self):
        return True

    def backward(self, rc, gouts, saved, need):
        (x,) = saved
        w, b = rc.acquire(self.weights)
        if not need[0] and rc.skip_dead:
            return self.weight_grads_only(rc, *F.conv2d_weight_grad(gouts[0], x, w, b,
                                                                     **self._args(),
                                                                     **rc.accumulate()))
        gx, gw, gb = F.conv2d_backward(gouts[0], x, w, b, **self._args(), **rc.accumulate())
        return [gx if need[0] else None], _param_grads(gw, gb)


def _int1(v: Any, name: str) -> int:
    """An int or a 1-tuple (torch's 1-D argument forms)."""
    t = tuple(v) if isinstance(v, (tuple, list)) else (v,)
    if len(t) != 1 or isinstance(t[0], bool) or int(t[0]) != t[0]:
        raise ValueError(f"{name}: expected an int, got {v!r}")
    return int(t[0])


def pads_1d(padding: Any) -> Any:
    """A 1-D padding (a name, an int for both ends, (left, right), or a 2-D policy) as the 2-D
    policy of the (1, L) image it runs as: nothing above or below."""
    if isinstance(padding, (str, Padding)) or callable(padding):
        return padding
    t = tuple(padding) if isinstance(padding, (tuple, list)) else (padding,)
    if len(t) == 1:
        t = (t[0], t[0])
    if len(t) != 2 or any(isinstance(v, bool) or int(v) != v for v in t):
        raise ValueError(f"padding: expected a name, an int or (left, right), got {padding!r}")
    return (0, 0, int(t[0]), int(t[1]))


class Convolution1dNode(ConvolutionNode):
    """1-D convolution (torch.nn.Conv1d): (N, C, L) -> (N, O, L'), weights from a
    Conv1dDataSource (torch's (out, in/groups, k)). It runs as the 2-D convolution of the
    (N, C, 1, L) view (no copy), so it shares that op's kernels and gradient. padding:
    "symmetric" by default (dilation*(k-1)//2 at both ends, torch's padding=k//2), an int for
    both ends, (left, right), or the names of graph/padding.py ("same", "valid", "full")."""

    prefix = "conv1d"

    def __init__(self, source: Any, weights: Conv1dDataSource, *, stride: Any = 1,
                 dilation: Any = 1, padding: Any = "symmetric", name: str | None = None,
                 register: bool = True):
        if not isinstance(weights, Conv1dDataSource):
            raise GraphError(None, f"weights: expected a Conv1dDataSource, got {type(weights).__name__}")
        super().__init__(source, weights, stride=(1, _int1(stride, "stride")),
                         dilation=(1, _int1(dilation, "dilation")), padding=pads_1d(padding),
                         name=name, register=register)

    def infer(self, shapes, dtypes):
        (x,) = shapes
        _expect_ndim(x, 3, "source (N, C, L)")
        [(y, dt)] = super().infer([(x[0], x[1], 1, x[2])], dtypes)
        return [((y[0], y[1], y[3]), dt)]

    def strided_out(self):
        return False  # concat elimination writes 4-D channel slices

    def forward(self, rc, xs, training, with_state, activation=None):
        x = xs[0]
        y = super().forward(rc, [x.reshape(x.shape[0], x.shape[1], 1, x.shape[2])], training,
                            with_state, activation)[0]
        return [y.reshape(y.shape[0], y.shape[1], y.shape[3])]

    def backward(self, rc, gouts, saved, need):
        (x,) = saved
        g = gouts[0]
        gxs, gw = super().backward(rc, [g.reshape(g.shape[0], g.shape[1], 1, g.shape[2])],
                                   [x.reshape(x.shape[0], x.shape[1], 1, x.shape[2])], need)
        return [None if gxs[0] is None else gxs[0].reshape(x.shape)], gw


class ConvolutionTransposeNode(_ConvNode):
    """Transposed 2-D convolution (weights from a ConvolutionTransposeDataSource). padding:
    "valid" (torch padding 0), "same" (output = input * stride), an int/pair (torch's padding),
    with `output_padding` as torch's."""

    prefix = "convT"

    def __init__(self, source: Any, weights: ConvolutionTransposeDataSource, *, stride: Any = 1,
                 dilation: Any = 1, padding: Any = "valid", output_padding: Any = 0,
                 name: str | None = None, register: bool = True):
        self.weights = _weights_of(weights, ConvolutionTransposeDataSource)
        self.stride, self.dilation = _pair(stride, "stride"), _pair(dilation, "dilation")
        self.padding_arg = padding
        self.output_padding = _pair(output_padding, "output_padding")
        self.pad = (0, 0)
        super().__init__([source], name, register)

    def infer(self, shapes, dtypes):
        x, dt = self._images(shapes, dtypes)
        ws = self.weights
        k, s, d = ws.kernel_size, self.stride, self.dilation
        p = self.padding_arg
        if isinstance(p, str) and p.lower() == "same":
            pads, opads = [], []
            for i in range(2):
                need = d[i] * (k[i] - 1) + 1 - s[i]  # 2p - op
                pp = max(0, -(-need // 2))
                pads.append(pp)
                opads.append(2 * pp - need)
            self.pad, self.output_padding = tuple(pads), tuple(opads)  # type: ignore
        elif isinstance(p, str) and p.lower() == "valid":
            self.pad = (0, 0)
        elif isinstance(p, str):
            raise ValueError(f"padding: {p!r} is not supported for transposed convolution "
                             "('valid', 'same' or ints)")
        else:
            self.pad = _pair(p, "padding")
        out = []
        for i in range(2):
            o = (x[2 + i] - 1) * s[i] - 2 * self.pad[i] + d[i] * (k[i] - 1) + \
                self.output_padding[i] + 1
            if self.output_padding[i] >= max(s[i], d[i]) or o < 1:
                raise ValueError(f"padding {self.pad} / output_padding {self.output_padding} do "
                                 f"not fit stride {s} and dilation {d}")
            out.append(o)
        return [((x[0], ws.out_channels, *out), dt)]

    def _args(self) -> dict:
        return dict(stride=self.stride, padding=self.pad, output_padding=self.output_padding,
                    dilation=self.dilation, groups=self.weights.groups)

    def forward(self, rc, xs, training, with_state):
        return [self.call_with_weights(rc, F.conv_transpose2d, xs[0], **self._args())]

    def backward(self, rc, gouts, saved, need):
        (x,) = saved
        w, b = rc.acquire(self.weights)
        gx, gw, gb = F.conv_transpose2d_backward(gouts[0], x, w, b, **self._args(),
                                                 **rc.accumulate())
        return [gx if need[0] else None], _param_grads(gw, gb)
