"""Pooling nodes (pymetalnn/ops/pool.py): max, average, global average."""
from __future__ import annotations

from typing import Any

from ... import functional as F
from ..padding import Padding, policy
from .base import FilterNode, _expect_ndim, _floats, _pair


def _pool_out(n: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    o = (n + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (o - 1) * s >= n + p:
        o -= 1
    return o


class _PoolNode(FilterNode):
    prefix = "pool"

    def __init__(self, source: Any, kernel_size: Any, stride: Any = None, *, padding: Any = "valid",
                 dilation: Any = 1, name: str | None = None, register: bool = True):
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = self.kernel_size if stride is None else _pair(stride, "stride")
        self.dilation = _pair(dilation, "dilation")
        self.padding: Padding = policy(padding)
        self.pad = (0, 0)
        self.ceil_mode = False
        super().__init__([source], name, register)

    def strided_out(self):
        return True

    def infer(self, shapes, dtypes):
        (x,) = shapes
        _expect_ndim(x, 4)
        dt = _floats(dtypes)
        k, s, d = self.kernel_size, self.stride, self.dilation
        pt, pb, pl, pr = self.padding.pads(self, x[2:], k, s, d)
        if self.padding.name == "same":
            want = [-(-x[2] // s[0]), -(-x[3] // s[1])]
        else:
            want = None
        pad, ceil = [pt, pl], False
        if (pt, pl) != (pb, pr):
            if pb - pt not in (0, 1) or pr - pl not in (0, 1):
                raise ValueError(f"padding {(pt, pb, pl, pr)}: pooling pads symmetrically (one "
                                 "extra row/column at the bottom/right at most)")
            ceil = True
        out = [_pool_out(x[2 + i], k[i], s[i], pad[i], d[i], ceil) for i in range(2)]
        if want is not None and out != want:
            ceil = not ceil
            out = [_pool_out(x[2 + i], k[i], s[i], pad[i], d[i], ceil) for i in range(2)]
            if out != want:
                raise ValueError(f"'same' pooling of {x[2:]} with kernel {k}, stride {s} cannot "
                                 "be expressed with symmetric padding")
        for i in range(2):
            if pad[i] > k[i] // 2:
                raise ValueError(f"padding {pad} exceeds half the kernel {k}")
        if min(out) < 1:
            raise ValueError(f"the window {k} does not fit the input {x[2:]}")
        self.pad, self.ceil_mode = tuple(pad), ceil  # type: ignore
        return [((x[0], x[1], *out), dt)]


class PoolingMaxNode(_PoolNode):
    """Max pooling; the training forward keeps the argmax indices (a state) for the gradient."""

    prefix = "maxpool"

    def _args(self) -> dict:
        return dict(kernel_size=self.kernel_size, stride=self.stride, padding=self.pad,
                    dilation=self.dilation, ceil_mode=self.ceil_mode)

    def num_states(self):
        return 1

    def forward(self, rc, xs, training, with_state):
        f = F.max_pool2d
        if with_state:
            y, idx = f(xs[0], return_indices=True, **self._args(), **rc.take_out())
            return [y, idx]
        return [f(xs[0], **self._args(), **rc.take_out())]

    def saved(self):
        return [("in", 0), ("state", 0)]

    def backward(self, rc, gouts, saved, need):
        x, idx = saved
        return [F.max_pool2d_backward(gouts[0], x, indices=idx, **self._args())], []


class PoolingAverageNode(_PoolNode):
    """Average pooling (count_include_pad as torch; False is MPS's 'exclude edges')."""

    prefix = "avgpool"

    def __init__(self, source: Any, kernel_size: Any, stride: Any = None, *, padding: Any = "valid",
                 count_include_pad: bool = True, name: str | None = None, register: bool = True):
        self.count_include_pad = count_include_pad
        super().__init__(source, kernel_size, stride, padding=padding, name=name, register=register)

    def _args(self) -> dict:
        return dict(kernel_size=self.kernel_size, stride=self.stride, padding=self.pad,
                    ceil_mode=self.ceil_mode, count_include_pad=self.count_include_pad)

    def infer(self, shapes, dtypes):
        if self.dilation != (1, 1):
            raise ValueError("average pooling has no dilation")
        return super().infer(shapes, dtypes)

    def forward(self, rc, xs, training, with_state):
        return [F.avg_pool2d(xs[0], **self._args(), **rc.take_out())]

    def saved(self):
        return [("in", 0)]

    def backward(self, rc, gouts, saved, need):
        return [F.avg_pool2d_backward(gouts[0], saved[0], **self._args())], []


class GlobalAveragePoolingNode(FilterNode):
    """Mean over each channel's positions: (N, C, H, W) -> (N, C, 1, 1)."""

    prefix = "gap"

    def __init__(self, source: Any, *, name: str | None = None, register: bool = True):
        super().__init__([source], name, register)

    def infer(self, shapes, dtypes):
        (x,) = shapes
        _expect_ndim(x, 4)
        return [((x[0], x[1], 1, 1), _floats(dtypes))]

    def forward(self, rc, xs, training, with_state):
        return [F.global_avg_pool2d(xs[0])]

    def saved(self):
        return [("in", 0)]

    def backward(self, rc, gouts, saved, need):
        return [F.global_avg_pool2d_backward(gouts[0], saved[0])], []
