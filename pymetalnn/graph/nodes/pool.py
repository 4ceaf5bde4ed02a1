"""Pooling nodes (pymetalnn/ops/pool.py): max, average, global average, adaptive average; 1-D
forms of each ((N, C, L) run as the 2-D op of the (N, C, 1, L) view, no copy)."""
from __future__ import annotations

from typing import Any

from ... import functional as F
from ..padding import Padding, policy
from .base import FilterNode, _expect_ndim, _floats, _pair
from .conv import _int1, pads_1d


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


class _Pool1d:
    """The 1-D form of a 2-D pooling node (mixed in before it): kernel (1, k), no padding above
    or below, (N, C, L) sources and results viewed as (N, C, 1, L) around the 2-D node's code."""

    @staticmethod
    def _geometry(kernel_size: Any, stride: Any, padding: Any) -> dict[str, Any]:
        k = _int1(kernel_size, "kernel_size")
        return dict(kernel_size=(1, k), stride=(1, k if stride is None else _int1(stride, "stride")),
                    padding=pads_1d(padding))

    def strided_out(self):
        return False  # concat elimination writes 4-D channel slices

    def infer(self, shapes, dtypes):
        (x,) = shapes
        _expect_ndim(x, 3, "source (N, C, L)")
        [(y, dt)] = super().infer([(x[0], x[1], 1, x[2])], dtypes)  # type: ignore[misc]
        return [((y[0], y[1], y[3]), dt)]

    @staticmethod
    def _4d(t: Any) -> Any:
        return None if t is None else t.reshape(t.shape[0], t.shape[1], 1, t.shape[-1])

    def forward(self, rc, xs, training, with_state):
        ys = super().forward(rc, [self._4d(xs[0])], training, with_state)  # type: ignore[misc]
        return [y.reshape(y.shape[0], y.shape[1], y.shape[3]) if k == 0 else y
                for k, y in enumerate(ys)]

    def backward(self, rc, gouts, saved, need):
        x = saved[0]
        gx, gw = super().backward(rc, [self._4d(gouts[0])],  # type: ignore[misc]
                                  [self._4d(x), *saved[1:]], need)
        return [gx[0].reshape(x.shape)], gw


class PoolingMax1dNode(_Pool1d, PoolingMaxNode):
    """1-D max pooling (torch.nn.MaxPool1d): (N, C, L) -> (N, C, L'); padding "valid" (default,
    torch's 0), an int for both ends, (left, right) (one more on the right: ceil mode), or a
    name; dilation as torch's."""

    prefix = "maxpool1d"

    def __init__(self, source: Any, kernel_size: Any, stride: Any = None, *, padding: Any = "valid",
                 dilation: Any = 1, name: str | None = None, register: bool = True):
        geo = self._geometry(kernel_size, stride, padding)
        super().__init__(source, geo["kernel_size"], geo["stride"], padding=geo["padding"],
                         dilation=(1, _int1(dilation, "dilation")), name=name, register=register)


class PoolingAverage1dNode(_Pool1d, PoolingAverageNode):
    """1-D average pooling (torch.nn.AvgPool1d; count_include_pad as torch's)."""

    prefix = "avgpool1d"

    def __init__(self, source: Any, kernel_size: Any, stride: Any = None, *, padding: Any = "valid",
                 count_include_pad: bool = True, name: str | None = None, register: bool = True):
        geo = self._geometry(kernel_size, stride, padding)
        super().__init__(source, geo["kernel_size"], geo["stride"], padding=geo["padding"],
                         count_include_pad=count_include_pad, name=name, register=register)


class _AdaptiveAvgPoolNode(FilterNode):
    """Adaptive average pooling of the dims after (N, C) to output_size; `ops`: the functional
    (forward, backward), `_size` validates output_size."""

    ops: tuple = ()
    ndim, what = 4, "source"  # the source's dimensions, how an error names them

    def __init__(self, source: Any, output_size: Any, *, name: str | None = None,
                 register: bool = True):
        self.output_size = self._size(output_size)
        super().__init__([source], name, register)

    def _size(self, output_size: Any) -> Any:
        raise NotImplementedError

    def infer(self, shapes, dtypes):
        (x,) = shapes
        _expect_ndim(x, self.ndim, self.what)
        out = self.output_size if isinstance(self.output_size, tuple) else (self.output_size,)
        return [((x[0], x[1], *out), _floats(dtypes))]

    def forward(self, rc, xs, training, with_state):
        return [self.ops[0](xs[0], self.output_size)]

    def saved(self):
        return [("in", 0)]

    def backward(self, rc, gouts, saved, need):
        return [self.ops[1](gouts[0], saved[0], self.output_size)], []


class AdaptiveAveragePoolingNode(_AdaptiveAvgPoolNode):
    """Adaptive average pooling to output_size (torch.nn.AdaptiveAvgPool2d): cell i of an axis of
    length n averages [floor(i n / o), ceil((i + 1) n / o)); (N, C, H, W) -> (N, C, oh, ow)."""

    prefix = "adaptiveavgpool"
    ops = (F.adaptive_avg_pool2d, F.adaptive_avg_pool2d_backward)

    def _size(self, output_size: Any) -> tuple[int, int]:
        size = _pair(output_size, "output_size")
        if min(size) < 1:
            raise ValueError(f"output_size: sizes must be positive, got {output_size!r}")
        return size


class AdaptiveAveragePooling1dNode(_AdaptiveAvgPoolNode):
    """Adaptive average pooling of (N, C, L) to (N, C, output_size) (torch.nn.AdaptiveAvgPool1d)."""

    prefix = "adaptiveavgpool1d"
    ops = (F.adaptive_avg_pool1d, F.adaptive_avg_pool1d_backward)
    ndim, what = 3, "source (N, C, L)"

    def _size(self, output_size: Any) -> int:
        size = _int1(output_size, "output_size")
        if size < 1:
            raise ValueError(f"output_size: must be positive, got {output_size!r}")
        return size
