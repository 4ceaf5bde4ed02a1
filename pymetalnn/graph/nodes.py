"""Graph nodes: data (image/tensor/labels nodes) and one filter node per op, each with its gradient.

As in MPSNNGraph, the result of one node is the source of the next:

    x = ImageNode((1, 28, 28))
    c = ConvolutionNode(x, ConvolutionDataSource(1, 6, 5), padding="same")
    r = ReLUNode(c)                    # a node stands for its result image
    loss = SoftmaxCrossEntropyLossNode(FullyConnectedNode(FlattenNode(r), fc_weights))
    g = r.gradient(...)                # one line: the gradient node of a forward node

Shapes are inferred when a node is made (and again when a graph is built); an inconsistent node
raises GraphError naming it. Every filter node implements its forward and backward with the
functional ops (`pymetalnn.functional`, looked up when the node runs), and declares what its
backward needs (inputs, outputs, states such as pooling indices or batch statistics), so the
graph keeps exactly those alive and frees everything else.
"""
from __future__ import annotations

import importlib
import itertools
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, Callable

import numpy as np

from ..tensor import Tensor, float16, float32, int32
from .datasource import (
    ConvolutionDataSource,
    ConvolutionTransposeDataSource,
    DataSource,
    FullyConnectedDataSource,
    NormalizationDataSource,
    RecurrentDataSource,
)
from .errors import GraphError, OpUnavailable
from .padding import Padding, policy

NOMINAL_BATCH = 2  # the batch size used for shape checks when an input gives none
_OP_MODULES = ("pool", "norm", "rnn", "conv", "gemm", "neuron", "softmax", "loss", "dropout",
               "arith", "copy")


OP_OVERRIDES: dict[str, Callable] = {}  # name -> function, consulted first (tests, experiments)


def op(name: str, node: Any = None) -> Callable:
    """The functional op `name`: from pymetalnn.functional, else from the op modules that are
    not exported there yet. Raises OpUnavailable naming the node."""
    from .. import functional as F

    f = OP_OVERRIDES.get(name) or getattr(F, name, None)
    if f is not None:
        return f
    for mod in _OP_MODULES:
        try:
            m = importlib.import_module(f"pymetalnn.ops.{mod}")
        except ImportError:
            continue
        f = getattr(m, name, None)
        if f is not None:
            return f
    raise OpUnavailable(node, f"needs the op pymetalnn.functional.{name}, which does not exist "
                              "(yet)")


def has_op(name: str) -> bool:
    try:
        op(name)
        return True
    except OpUnavailable:
        return False


_counters: dict[str, itertools.count] = defaultdict(lambda: itertools.count(1))


def _auto_name(prefix: str) -> str:
    return f"{prefix}{next(_counters[prefix])}"


# ---- values -----------------------------------------------------------------------------------

class Value:
    """A tensor flowing through the graph: a graph input, a node's result, a state saved for a
    gradient, or a gradient. `shape` is nominal (batch = the input's batch_size or 2)."""

    def __init__(self, producer: Any = None, index: int = 0, name: str | None = None,
                 shape: tuple[int, ...] = (), dtype: Any = float32):
        self.producer = producer
        self.index = index
        self.name = name or (f"{producer.name}.{index}" if producer is not None else "value")
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.consumers: list[Any] = []

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.shape} {self.dtype}>"


class ImageNode(Value):
    """A graph input: a batch of images (or any tensors) of per-sample shape `shape`, e.g.
    (C, H, W); the batch dimension sits at `batch_dim` (0; 1 for time-major sequences (T, N, F)).
    `batch_size` only fixes the nominal shape used for checks."""

    def __init__(self, shape: Sequence[int], dtype: Any = float32, name: str | None = None,
                 batch_size: int | None = None, batch_dim: int = 0):
        self.sample_shape = tuple(int(s) for s in shape)
        if any(s <= 0 for s in self.sample_shape):
            raise ValueError(f"shape: sizes must be positive, got {tuple(shape)}")
        if not 0 <= batch_dim <= len(self.sample_shape):
            raise ValueError(f"batch_dim: {batch_dim} is outside 0..{len(self.sample_shape)}")
        self.batch_dim = int(batch_dim)
        self.batch_size = batch_size
        super().__init__(None, 0, name or _auto_name("image"),
                         self.full_shape(batch_size or NOMINAL_BATCH), dtype)

    def full_shape(self, n: int) -> tuple[int, ...]:
        s = list(self.sample_shape)
        s.insert(self.batch_dim, int(n))
        return tuple(s)


TensorNode = ImageNode


class LabelsNode(ImageNode):
    """The labels input of a loss node (MPS's loss labels, passed as a state): int32 class
    indices of per-sample shape `shape` (() for one label per sample), or float targets."""

    def __init__(self, shape: Sequence[int] = (), dtype: Any = int32, name: str | None = None,
                 batch_size: int | None = None):
        super().__init__(shape, dtype, name or _auto_name("labels"), batch_size)


def as_value(x: Any, owner: Any = None) -> Value:
    if isinstance(x, Value):
        return x
    if isinstance(x, Node):
        return x.result
    raise GraphError(owner, f"a source must be an ImageNode or a node, got {type(x).__name__}")


# ---- nodes ------------------------------------------------------------------------------------

class Node:
    """Anything that runs as one step of a graph."""

    prefix = "node"
    num_results = 1

    def __init__(self, sources: Sequence[Any], name: str | None = None, register: bool = True):
        self.name = name or _auto_name(self.prefix)
        self.sources: list[Value | None] = [None if s is None else as_value(s, self) for s in sources]
        self.internal = not register
        if register:
            for s in self.sources:
                if s is not None:
                    s.consumers.append(self)
        self.results = [Value(self, i, f"{self.name}" if i == 0 else f"{self.name}.{i}")
                        for i in range(self.num_results)]

    @property
    def result(self) -> Value:
        return self.results[0]

    def input_values(self) -> list[Value]:
        """Every value this node's step reads (graph dependencies)."""
        return [s for s in self.sources if s is not None]

    def set_source(self, index: int, source: Any) -> None:
        """Rewire source `index` (checked when a graph is built; this is how a cycle could be
        made, which graph construction reports)."""
        old = self.sources[index]
        if old is not None and self in old.consumers:
            old.consumers.remove(self)
        v = as_value(source, self)
        self.sources[index] = v
        v.consumers.append(self)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


class FilterNode(Node):
    """A forward op. Subclasses implement `infer`, `forward`, `backward` and say what the
    backward needs (`saved`), and how many state tensors the training forward makes."""

    weights: DataSource | None = None

    def __init__(self, sources: Sequence[Any], name: str | None = None, register: bool = True):
        super().__init__(sources, name, register)
        self.state_values: list[Value] = []
        self._gradient: GradientNode | None = None
        self.check()

    # ---- shapes
    def check(self) -> None:
        """Infer the result shapes from the sources' (nominal) shapes; GraphError on mismatch."""
        srcs = [s for s in self.sources]
        try:
            outs = self.infer([s.shape if s is not None else None for s in srcs],
                              [s.dtype if s is not None else None for s in srcs])
        except GraphError:
            raise
        except (ValueError, TypeError, IndexError) as e:
            raise GraphError(self, str(e)) from None
        for v, (shape, dtype) in zip(self.results, outs):
            v.shape, v.dtype = tuple(int(s) for s in shape), np.dtype(dtype)

    def infer(self, shapes: list[tuple[int, ...]], dtypes: list[np.dtype]
              ) -> list[tuple[tuple[int, ...], Any]]:
        raise NotImplementedError

    # ---- execution
    @property
    def trainable(self) -> bool:
        return self.weights is not None and bool(self.weights.trainable)

    def num_states(self) -> int:
        """State tensors the training forward saves for the gradient."""
        return 0

    def saved(self) -> list[tuple[str, int]]:
        """What backward reads: ("in", i), ("out", i), ("state", j)."""
        return []

    def forward(self, rc: Any, xs: list[Any], training: bool, with_state: bool) -> list[Any]:
        raise NotImplementedError

    def backward(self, rc: Any, gouts: list[Tensor | None], saved: list[Any], need: list[bool]
                 ) -> tuple[list[Tensor | None], list[Tensor | None]]:
        """(gradients of the sources (None where need is False), gradients of the trainable
        weights in the data source's `trainable` order)."""
        raise GraphError(self, f"{type(self).__name__} has no gradient")

    def differentiable(self, i: int) -> bool:
        """Whether source i can receive a gradient."""
        return True

    def activation_in_backward(self, neuron: Any) -> bool:
        """Whether, fused with `neuron` (optimize.FusedNeuronNode), this node's backward takes
        activation= and applies the neuron's derivative itself (from its saved inputs), so the
        fused output is not needed by the gradient."""
        return False

    def strided_grad(self) -> bool:
        """Whether backward can read the gradient of its (first) result with a batch stride:
        images rc.state[("grad_nstride", self)] elements apart when that is set (its channel
        slice of an eliminated concatenation's gradient, read in place instead of split out)."""
        return False

    def gradient(self, grad_source: Any = None) -> GradientNode:
        """The gradient node of this node (MPS's gradientFilterWithSource:), reading the
        gradient of this node's result(s) `grad_source` (a value, a node, or a list with one per
        result; None for a loss node, whose gradient starts the gradient pass)."""
        return GradientNode(self, grad_source)


class GradientNode(Node):
    """The gradient of a forward node: reads the gradients of its results and what the forward
    saved, produces the gradients of its sources (`results`, one per source, same shapes) and of
    its trainable weights (`weight_results`, in the data source's `trainable` order)."""

    prefix = "grad"

    def __init__(self, forward: FilterNode, grad_source: Any = None, name: str | None = None):
        if grad_source is None:
            gs: list[Any] = [None] * len(forward.results)
        elif isinstance(grad_source, (list, tuple)):
            gs = list(grad_source)
        else:
            gs = [grad_source]
        if not isinstance(forward, LossNode) and all(g is None for g in gs):
            raise GraphError(forward, "gradient(): needs the gradient of the node's result")
        if len(gs) != len(forward.results):
            raise GraphError(forward, f"gradient(): {len(gs)} gradient sources for "
                                      f"{len(forward.results)} results")
        self.forward = forward
        self.num_results = len(forward.sources)
        super().__init__(gs, name or f"{forward.name}.grad", register=False)
        for g, r in zip(self.sources, forward.results):
            if g is not None and g.shape[1:] != r.shape[1:]:
                raise GraphError(self, f"gradient source {g.name} has shape {g.shape}, the "
                                       f"result {r.name} is {r.shape}")
        for v, s in zip(self.results, forward.sources):
            if s is not None:
                v.shape, v.dtype = s.shape, s.dtype
            v.name = f"d({s.name if s is not None else '-'})"
        ws = forward.weights
        self.weight_results: list[Value] = []
        if ws is not None and ws.trainable:
            shapes = ws.shapes()
            self.weight_results = [Value(self, len(self.results) + i, f"d({forward.name}.{k})",
                                         shapes[k], float32) for i, k in enumerate(ws.trainable)]
        n = forward.num_states()
        while len(forward.state_values) < n:
            j = len(forward.state_values)
            forward.state_values.append(Value(forward, len(forward.results) + j,
                                              f"{forward.name}.state{j}"))
        forward._gradient = self

    def saved_values(self) -> list[Value]:
        f = self.forward
        out = []
        for kind, i in f.saved():
            if kind == "in":
                out.append(f.sources[i])
            elif kind == "out":
                out.append(f.results[i])
            else:
                out.append(f.state_values[i])
        return out

    def input_values(self) -> list[Value]:
        return [s for s in self.sources if s is not None] + self.saved_values()


class GradientSumNode(Node):
    """Sum of the gradient contributions of a value read by several nodes."""

    prefix = "gradsum"

    def __init__(self, sources: Sequence[Value], name: str | None = None):
        super().__init__(sources, name, register=False)
        self.result.shape, self.result.dtype = self.sources[0].shape, self.sources[0].dtype


class UpdateNode(Node):
    """The weight update of a trainable node: calls its data source's update() with the weight
    gradients (after the node's gradient)."""

    prefix = "update"
    num_results = 0

    def __init__(self, grad: GradientNode):
        self.grad = grad
        self.forward = grad.forward
        super().__init__(grad.weight_results, f"{grad.forward.name}.update", register=False)


# ---- helpers ------------------------------------------------------------------------------------

def _pair(v: Any, name: str) -> tuple[int, int]:
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return int(v), int(v)
    t = tuple(int(a) for a in v)
    if len(t) != 2:
        raise ValueError(f"{name}: expected an int or a pair, got {v!r}")
    return t  # type: ignore[return-value]


def _expect_ndim(shape: tuple[int, ...], nd: int | tuple[int, ...], what: str = "source") -> None:
    nds = (nd,) if isinstance(nd, int) else nd
    if len(shape) not in nds:
        raise ValueError(f"{what}: expected {' or '.join(map(str, nds))} dimensions, got shape "
                         f"{shape}")


def _floats(dtypes: list[np.dtype]) -> np.dtype:
    dt = dtypes[0]
    if dt not in (float32, float16):
        raise ValueError(f"source: dtype {dt} is not a float type")
    return dt


def _weights_of(weights: Any, cls: type, exclude: type | None = None) -> Any:
    """`weights` if it is a `cls` (and not an `exclude`); GraphError otherwise."""
    if not isinstance(weights, cls) or (exclude is not None and isinstance(weights, exclude)):
        raise GraphError(None, f"weights: expected a {cls.__name__}, got {type(weights).__name__}")
    return weights


def _act(activation: Any) -> dict[str, Any]:
    """activation= for the op of a node fused with a neuron (optimize.FusedNeuronNode)."""
    return {} if activation is None else {"activation": activation}


def _conv_out(n: int, k: int, s: int, p0: int, p1: int, d: int) -> int:
    return (n + p0 + p1 - d * (k - 1) - 1) // s + 1


# ---- convolution / fully connected --------------------------------------------------------------

class ConvolutionNode(FilterNode):
    """2-D convolution with weights (and bias) from a ConvolutionDataSource. padding: a padding
    policy ("same" by default, as MPS; "valid", "full", ints or custom)."""

    prefix = "conv"

    def __init__(self, source: Any, weights: ConvolutionDataSource, *, stride: Any = 1,
                 dilation: Any = 1, padding: Any = "same", name: str | None = None,
                 register: bool = True):
        self.weights = _weights_of(weights, ConvolutionDataSource, ConvolutionTransposeDataSource)
        self.stride, self.dilation = _pair(stride, "stride"), _pair(dilation, "dilation")
        self.padding: Padding = policy(padding)
        self.pads = (0, 0, 0, 0)
        super().__init__([source], name, register)

    def infer(self, shapes, dtypes):
        (x,) = shapes
        _expect_ndim(x, 4)
        dt = _floats(dtypes)
        ws = self.weights
        if x[1] != ws.in_channels:
            raise ValueError(f"source has {x[1]} channels, the weights ({ws.label}) expect "
                             f"{ws.in_channels}")
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
        w, b = rc.acquire(self.weights)
        y = op("conv2d", self)(xs[0], w, b, **self._args(), **_act(activation), **rc.take_out())
        rc.release(self.weights)
        return [y]

    def saved(self):
        return [("in", 0)]

    def backward(self, rc, gouts, saved, need):
        (x,) = saved
        w, b = rc.acquire(self.weights)
        g = gouts[0]
        if not need[0] and rc.skip_dead:
            gw, gb = _conv_weight_grads(g, x, w, b, self._args())
            if gw is not None:
                rc.note(f"{self.name}: input gradient not computed (nothing uses it)")
                return [None], [gw, gb] if b is not None else [gw]
        gx, gw, gb = op("conv2d_backward", self)(g, x, w, b, **self._args())
        return [gx if need[0] else None], ([gw, gb] if b is not None else [gw])


def _conv_weight_grads(g: Tensor, x: Tensor, w: Tensor, b: Tensor | None, args: dict
                       ) -> tuple[Tensor | None, Tensor | None]:
    """dw, db of conv2d without the input gradient, via the conv module's plan functions (None
    if they are not there)."""
    try:
        from ..ops import conv as C

        dev, x, w, b, geo, prec = C._conv_args(x, w, b, args["stride"], args["padding"],
                                               args["dilation"], args["groups"], None)
        gy = C._grad_arg(g, dev, x, (geo.N, geo.K, geo.OH, geo.OW))
        gw = C._weight_grad(dev, prec, geo, gy, x, x.dtype)
        gb = C._bias_grad(dev, gy) if b is not None else None
        return gw, gb
    except (ImportError, AttributeError, TypeError):
        return None, None


class ConvolutionTransposeNode(FilterNode):
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
        (x,) = shapes
        _expect_ndim(x, 4)
        dt = _floats(dtypes)
        ws = self.weights
        if x[1] != ws.in_channels:
            raise ValueError(f"source has {x[1]} channels, the weights ({ws.label}) expect "
                             f"{ws.in_channels}")
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
        w, b = rc.acquire(self.weights)
        y = op("conv_transpose2d", self)(xs[0], w, b, **self._args())
        rc.release(self.weights)
        return [y]

    def saved(self):
        return [("in", 0)]

    def backward(self, rc, gouts, saved, need):
        (x,) = saved
        w, b = rc.acquire(self.weights)
        gx, gw, gb = op("conv_transpose2d_backward", self)(gouts[0], x, w, b, **self._args())
        return [gx if need[0] else None], ([gw, gb] if b is not None else [gw])


class FullyConnectedNode(FilterNode):
    """y = x W^T + b on (N, F) matrices, or on images (N, C, H, W) taken as (N, C*H*W) (MPS's
    fully connected layer); weights from a FullyConnectedDataSource. Result (N, out)."""

    prefix = "fc"

    def __init__(self, source: Any, weights: FullyConnectedDataSource, *, name: str | None = None,
                 register: bool = True):
        self.weights = _weights_of(weights, FullyConnectedDataSource)
        super().__init__([source], name, register)

    def infer(self, shapes, dtypes):
        (x,) = shapes
        dt = _floats(dtypes)
        if len(x) < 2:
            raise ValueError(f"source: expected (N, features) or images, got shape {x}")
        f = int(np.prod(x[1:]))
        if f != self.weights.in_features:
            raise ValueError(f"source has {f} features per sample (shape {x}), the weights "
                             f"({self.weights.label}) expect {self.weights.in_features}")
        return [((x[0], self.weights.out_features), dt)]

    def forward(self, rc, xs, training, with_state, activation=None):
        x = xs[0]
        w, b = rc.acquire(self.weights)
        y = op("linear", self)(x.reshape(x.shape[0], -1), w, b, **_act(activation))
        rc.release(self.weights)
        return [y]

    def saved(self):
        return [("in", 0)]

    def backward(self, rc, gouts, saved, need):
        (x,) = saved
        x2 = x.reshape(x.shape[0], -1)
        w, b = rc.acquire(self.weights)
        g = gouts[0]
        if not need[0] and rc.skip_dead:
            from ..ops.gemm import gemm, linear_bias_grad
            from ..tensor import empty

            gw = empty(w.shape, w.dtype, w.device)
            gemm(g, x2, gw, transpose_a=True)
            rc.note(f"{self.name}: input gradient not computed (nothing uses it)")
            return [None], ([gw, linear_bias_grad(g)] if b is not None else [gw])
        gx, gw, gb = op("linear_backward", self)(g, x2, w, b)
        return [gx.reshape(x.shape) if need[0] else None], ([gw, gb] if b is not None else [gw])


# ---- pooling ----------------------------------------------------------------------------------

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
        f = op("max_pool2d", self)
        if with_state:
            y, idx = f(xs[0], return_indices=True, **self._args(), **rc.take_out())
            return [y, idx]
        return [f(xs[0], **self._args(), **rc.take_out())]

    def saved(self):
        return [("in", 0), ("state", 0)]

    def backward(self, rc, gouts, saved, need):
        x, idx = saved
        return [op("max_pool2d_backward", self)(gouts[0], x, indices=idx, **self._args())], []


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
        return [op("avg_pool2d", self)(xs[0], **self._args(), **rc.take_out())]

    def saved(self):
        return [("in", 0)]

    def backward(self, rc, gouts, saved, need):
        return [op("avg_pool2d_backward", self)(gouts[0], saved[0], **self._args())], []


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
        return [op("global_avg_pool2d", self)(xs[0])]

    def saved(self):
        return [("in", 0)]

    def backward(self, rc, gouts, saved, need):
        return [op("global_avg_pool2d_backward", self)(gouts[0], saved[0])], []


# ---- neurons, softmax, dropout ------------------------------------------------------------------

NEURONS = {  # kind -> (op name, parameter names)
    "relu": ("relu", ()), "leaky_relu": ("leaky_relu", ("negative_slope",)),
    "elu": ("elu", ("alpha",)), "sigmoid": ("sigmoid", ()), "tanh": ("tanh", ()),
    "softplus": ("softplus", ("beta", "threshold")), "gelu": ("gelu", ("approximate",)),
    "hardsigmoid": ("hardsigmoid", ()), "hard_sigmoid": ("hard_sigmoid", ("a", "b")),
    "linear": ("linear_neuron", ("a", "b")),
}


class NeuronNode(FilterNode):
    """An element-wise activation (MPS's neuron): kind in NEURONS, with its parameters."""

    prefix = "neuron"
    kind = "relu"

    def __init__(self, source: Any, kind: str | None = None, *, name: str | None = None,
                 register: bool = True, **params: Any):
        kind = kind or type(self).kind
        if kind not in NEURONS:
            raise GraphError(None, f"kind: unknown neuron {kind!r} (choose from "
                                   f"{', '.join(NEURONS)})")
        self.kind = kind
        allowed = NEURONS[kind][1]
        bad = set(params) - set(allowed)
        if bad:
            raise GraphError(None, f"neuron {kind!r} takes {', '.join(allowed) or 'no parameters'}"
                                   f", got {', '.join(sorted(bad))}")
        self.params = params
        super().__init__([source], name or (_auto_name(kind) if type(self) is NeuronNode else None),
                         register)

    def infer(self, shapes, dtypes):
        return [(shapes[0], _floats(dtypes))]

    @property
    def from_output(self) -> bool:
        """relu and leaky relu (slope >= 0) take their gradient from the output (the input need
        not be kept)."""
        return self.kind == "relu" or (self.kind == "leaky_relu" and
                                       self.params.get("negative_slope", 0.01) >= 0)

    def forward(self, rc, xs, training, with_state):
        return [op(NEURONS[self.kind][0], self)(xs[0], **self.params, **rc.take_out())]

    def saved(self):
        return [("out", 0)] if self.from_output else [("in", 0)]

    def backward(self, rc, gouts, saved, need):
        ns = rc.state.get(("out_nstride", self))
        if ns and self.from_output:  # y in a strided channel slice of an eliminated concat
            f = op(NEURONS[self.kind][0] + "_backward_from_output", self)
            return [f(gouts[0], saved[0], **self.params, y_batch_stride=ns)], []
        return [op(NEURONS[self.kind][0] + "_backward", self)(gouts[0], saved[0], **self.params)], []


def _neuron_class(kind: str, doc: str) -> type:
    def __init__(self, source, *, name=None, register=True, **params):
        NeuronNode.__init__(self, source, kind, name=name, register=register, **params)

    cls_name = "".join(p.capitalize() for p in kind.split("_"))
    return type(f"{cls_name}Node", (NeuronNode,), {"__init__": __init__, "kind": kind,
                                                    "prefix": kind, "__doc__": doc})


ReLUNode = _neuron_class("relu", "max(x, 0)")
LeakyReLUNode = _neuron_class("leaky_relu", "x if x > 0 else negative_slope * x")
ELUNode = _neuron_class("elu", "x if x > 0 else alpha (exp(x) - 1)")
SigmoidNode = _neuron_class("sigmoid", "1 / (1 + exp(-x))")
TanhNode = _neuron_class("tanh", "tanh(x)")
SoftplusNode = _neuron_class("softplus", "log(1 + exp(beta x)) / beta")
GELUNode = _neuron_class("gelu", "x Phi(x)")
HardSigmoidNode = _neuron_class("hard_sigmoid", "clamp(a x + b, 0, 1) (MPS's hard sigmoid)")
LinearNeuronNode = _neuron_class("linear", "a x + b")


class SoftMaxNode(FilterNode):
    """Softmax along `dim` (the channel axis by default)."""

    prefix = "softmax"
    log = False

    def __init__(self, source: Any, dim: int = 1, *, name: str | None = None, register: bool = True):
        self.dim = dim
        super().__init__([source], name, register)

    def infer(self, shapes, dtypes):
        _expect_ndim(shapes[0], (2, 4))
        return [(shapes[0], _floats(dtypes))]

    def forward(self, rc, xs, training, with_state):
        return [op("log_softmax" if self.log else "softmax", self)(xs[0], self.dim)]

    def saved(self):
        return [("out", 0)]

    def backward(self, rc, gouts, saved, need):
        f = op("log_softmax_backward_from_output" if self.log else "softmax_backward_from_output", self)
        return [f(gouts[0], saved[0], self.dim)], []


class LogSoftMaxNode(SoftMaxNode):
    prefix = "logsoftmax"
    log = True


class DropoutNode(FilterNode):
    """Dropout with probability p (spatial: whole channels). The mask of training step k is
    drawn from (seed, offset=k) and recomputed by the gradient (MPS's dropout state, managed by
    the graph); in an inference graph the node passes its source through."""

    prefix = "dropout"

    def __init__(self, source: Any, p: float = 0.5, *, seed: int = 0, spatial: bool = False,
                 name: str | None = None, register: bool = True):
        if not 0.0 <= float(p) < 1.0:
            raise GraphError(None, f"p: must be in [0, 1), got {p}")
        self.p, self.seed, self.spatial = float(p), int(seed), bool(spatial)
        super().__init__([source], name, register)

    def infer(self, shapes, dtypes):
        if self.spatial:
            _expect_ndim(shapes[0], 4)
        return [(shapes[0], _floats(dtypes))]

    def offset(self, step: int) -> int:
        """The Philox offset of training step `step` (the mask is F.dropout(x, p, seed, offset))."""
        return int(step)

    def forward(self, rc, xs, training, with_state):
        if not training:
            rc.note(f"{self.name}: identity at inference (no dispatch)")
            return [xs[0]]
        f = op("dropout2d" if self.spatial else "dropout", self)
        return [f(xs[0], self.p, self.seed, self.offset(rc.step))]

    def backward(self, rc, gouts, saved, need):
        f = op("dropout2d_backward" if self.spatial else "dropout_backward", self)
        return [f(gouts[0], self.p, self.seed, self.offset(rc.step))], []


# ---- normalization ------------------------------------------------------------------------------

class BatchNormalizationNode(FilterNode):
    """Batch normalization over dim 1 (weights, running statistics from a
    NormalizationDataSource). Training: batch statistics (kept as states for the gradient) and
    the running statistics updated; inference: the running statistics."""

    prefix = "bn"

    def __init__(self, source: Any, weights: NormalizationDataSource, *, name: str | None = None,
                 register: bool = True):
        self.weights = _weights_of(weights, NormalizationDataSource)
        super().__init__([source], name, register)

    def infer(self, shapes, dtypes):
        x = shapes[0]
        _expect_ndim(x, (2, 3, 4))
        if x[1] != self.weights.num_features:
            raise ValueError(f"source has {x[1]} channels, the weights ({self.weights.label}) "
                             f"have {self.weights.num_features}")
        return [(x, _floats(dtypes))]

    def _wb(self, rc) -> tuple:
        t = rc.acquire_dict(self.weights)
        return t.get("running_mean"), t.get("running_var"), t.get("weight"), t.get("bias")

    def num_states(self):
        return 2

    def forward(self, rc, xs, training, with_state, activation=None):
        ws = self.weights
        rm, rv, w, b = self._wb(rc)
        kw = _act(activation)
        kw.update(rc.take_out())  # a channel slice of an eliminated concatenation
        if training:
            y, mean, invstd = op("batch_norm_with_stats", self)(
                xs[0], rm, rv, w, b, training=True, momentum=ws.momentum, eps=ws.eps, **kw)
            if rm is not None:
                ws.mark_dirty()
                ws.num_batches_tracked += 1
            rc.release(ws)
            return [y, mean, invstd] if with_state else [y]
        y = op("batch_norm_with_stats" if "activation" in kw else "batch_norm", self)(
            xs[0], rm, rv, w, b, training=False, eps=ws.eps, **kw)
        y = y[0] if isinstance(y, tuple) else y
        rc.release(ws)
        return [y]

    def saved(self):
        return [("in", 0), ("state", 0), ("state", 1)]

    def activation_in_backward(self, neuron):
        # act'(z) recomputed from x and the saved statistics inside batch_norm_backward's kernels
        from ..ops.neuron import ACTIVATIONS

        return neuron.kind in ACTIVATIONS

    def strided_grad(self):
        return True

    def backward(self, rc, gouts, saved, need, activation=None):
        x, mean, invstd = saved
        ws = self.weights
        rm, rv, w, b = self._wb(rc)
        kw = _act(activation)
        ns = rc.state.pop(("grad_nstride", self), None)
        if ns:
            kw["grad_out_batch_stride"] = ns
        gx, _, _, gw, gb = op("batch_norm_backward", self)(
            gouts[0], x, rm, rv, w, b, training=True, momentum=ws.momentum, eps=ws.eps,
            save_mean=mean, save_invstd=invstd, **kw)
        return [gx], ([gw, gb] if ws.affine else [])


class InstanceNormalizationNode(FilterNode):
    """Instance normalization (per sample and channel; weights from a NormalizationDataSource
    with running_stats=False)."""

    prefix = "in"

    def __init__(self, source: Any, weights: NormalizationDataSource, *, name: str | None = None,
                 register: bool = True):
        self.weights = _weights_of(weights, NormalizationDataSource)
        super().__init__([source], name, register)

    def infer(self, shapes, dtypes):
        x = shapes[0]
        _expect_ndim(x, (3, 4))
        if x[1] != self.weights.num_features:
            raise ValueError(f"source has {x[1]} channels, the weights have "
                             f"{self.weights.num_features}")
        return [(x, _floats(dtypes))]

    def forward(self, rc, xs, training, with_state):
        t = rc.acquire_dict(self.weights)
        y = op("instance_norm", self)(xs[0], None, None, t.get("weight"), t.get("bias"),
                                      eps=self.weights.eps)
        rc.release(self.weights)
        return [y]

    def saved(self):
        return [("in", 0)]

    def backward(self, rc, gouts, saved, need):
        t = rc.acquire_dict(self.weights)
        gx, _, _, gw, gb = op("instance_norm_backward", self)(
            gouts[0], saved[0], None, None, t.get("weight"), t.get("bias"), eps=self.weights.eps)
        return [gx], ([gw, gb] if self.weights.affine else [])


class GroupNormalizationNode(FilterNode):
    """Group normalization with `num_groups` groups (weights from a NormalizationDataSource
    with running_stats=False); the per-(sample, group) statistics are states."""

    prefix = "gn"

    def __init__(self, source: Any, weights: NormalizationDataSource, num_groups: int, *,
                 name: str | None = None, register: bool = True):
        self.weights = _weights_of(weights, NormalizationDataSource)
        self.num_groups = int(num_groups)
        super().__init__([source], name, register)

    def infer(self, shapes, dtypes):
        x = shapes[0]
        _expect_ndim(x, (3, 4))
        if x[1] != self.weights.num_features or x[1] % self.num_groups:
            raise ValueError(f"source has {x[1]} channels: needs {self.weights.num_features} "
                             f"divisible into {self.num_groups} groups")
        return [(x, _floats(dtypes))]

    def num_states(self):
        return 2

    def forward(self, rc, xs, training, with_state):
        t = rc.acquire_dict(self.weights)
        y, mean, rstd = op("group_norm_with_stats", self)(xs[0], self.num_groups, t.get("weight"),
                                                          t.get("bias"), eps=self.weights.eps)
        rc.release(self.weights)
        return [y, mean, rstd] if with_state else [y]

    def saved(self):
        return [("in", 0), ("state", 0), ("state", 1)]

    def backward(self, rc, gouts, saved, need):
        x, mean, rstd = saved
        t = rc.acquire_dict(self.weights)
        gx, gw, gb = op("group_norm_backward", self)(gouts[0], x, self.num_groups, t.get("weight"),
                                                     t.get("bias"), eps=self.weights.eps,
                                                     save_mean=mean, save_rstd=rstd)
        return [gx], ([gw, gb] if self.weights.affine else [])


# ---- concatenation, arithmetic, reshapes ---------------------------------------------------------

class ConcatenationNode(FilterNode):
    """Concatenation along `dim` (feature channels by default). The graph can eliminate it:
    producers then write straight into their slices of the result."""

    prefix = "concat"

    def __init__(self, sources: Sequence[Any], dim: int = 1, *, name: str | None = None,
                 register: bool = True):
        if len(sources) < 1:
            raise GraphError(None, "concatenation needs at least one source")
        self.dim = int(dim)
        super().__init__(list(sources), name, register)

    def infer(self, shapes, dtypes):
        first = shapes[0]
        d = self.dim if self.dim >= 0 else self.dim + len(first)
        if not 0 <= d < len(first):
            raise ValueError(f"dim {self.dim} is outside the sources' {len(first)} dimensions")
        for i, s in enumerate(shapes):
            if len(s) != len(first) or s[:d] != first[:d] or s[d + 1:] != first[d + 1:]:
                raise ValueError(f"source {i} ({self.sources[i].name}) has shape {s}, which does "
                                 f"not match source 0's {first} outside dim {d}")
            if dtypes[i] != dtypes[0]:
                raise ValueError(f"source {i} has dtype {dtypes[i]}, source 0 {dtypes[0]}")
        self._d = d
        out = list(first)
        out[d] = sum(s[d] for s in shapes)
        return [(tuple(out), dtypes[0])]

    def forward(self, rc, xs, training, with_state):
        rc.state[self] = [x.shape[self._d] for x in xs]  # the split sizes for the gradient
        return [op("concat", self)(list(xs), self._d)]

    def strided_grad(self):
        # a concat nested in another's channel slice: its pieces are sub-slices of that
        return self._d == 1

    def backward(self, rc, gouts, saved, need):
        g = gouts[0]
        sizes = rc.state.get(self) or [s.shape[self._d] for s in self.sources]
        outer = int(np.prod(g.shape[:self._d]))
        ns = rc.state.pop(("grad_nstride", self), None)
        strided = rc.g.strided_grads.get(self) \
            if outer > 1 and self._d == 1 and rc.views and rc.concat_views else None
        if strided or ns:
            return self._strided_backward(rc, g, sizes, need, strided or {}, ns), []
        if outer == 1 and rc.views and rc.concat_views:
            # the pieces are consecutive slabs of g: views, no copy
            inner = int(np.prod(g.shape[self._d + 1:]))
            out, off = [], 0
            for n, nd in zip(sizes, need):
                nb = n * inner * g.dtype.itemsize
                shape = list(g.shape)
                shape[self._d] = n
                out.append(Tensor(g.buffer.view(off, nb), tuple(shape), g.dtype) if nd else None)
                off += nb
            return out, []
        parts = op("split", self)(g, sizes, self._d)
        return [p if nd else None for p, nd in zip(parts, need)], []

    def _strided_backward(self, rc, g: Tensor, sizes: list[int], need: list[bool],
                          strided: dict[int, FilterNode], ns: int | None
                          ) -> list[Tensor | None]:
        """Channel concat at batch > 1: piece k goes to the gradient of strided[k] (a node whose
        backward reads a batch-strided gradient) as a view of g at its channel slice, images
        `pitch` elements apart (C*inner, or ns when g itself is such a slice of an enclosing
        concat's gradient); only the other needed pieces are copied out (one split)."""
        from ..ops.copy import _parts
        from ..tensor import empty

        n, inner = g.shape[0], int(np.prod(g.shape[2:]))
        pitch, isz = ns or g.shape[1] * inner, g.dtype.itemsize
        out: list[Tensor | None] = []
        copies = []
        off = 0
        for k, (c, nd) in enumerate(zip(sizes, need)):
            shape = (n, c) + tuple(g.shape[2:])
            if nd and k in strided:
                nb = ((n - 1) * pitch + c * inner) * isz
                out.append(Tensor(g.buffer.view(off * isz, nb), shape, g.dtype))
                rc.state[("grad_nstride", strided[k])] = pitch
            elif nd:
                out.append(empty(shape, g.dtype, g.device))
                copies.append((out[-1], c * inner, off))
            else:
                out.append(None)
            off += c * inner
        if copies:
            _parts("split", g, n, pitch, copies)
        return out


class _ArithmeticNode(FilterNode):
    opname = "add"

    def __init__(self, a: Any, b: Any, *, name: str | None = None, register: bool = True):
        super().__init__([a, b], name, register)

    def infer(self, shapes, dtypes):
        if dtypes[0] != dtypes[1]:
            raise ValueError(f"sources have dtypes {dtypes[0]} and {dtypes[1]}")
        try:
            out = np.broadcast_shapes(shapes[0], shapes[1])
        except ValueError:
            raise ValueError(f"sources of shapes {shapes[0]} and {shapes[1]} do not broadcast") from None
        return [(out, _floats(dtypes))]

    def forward(self, rc, xs, training, with_state):
        return [op(self.opname, self)(xs[0], xs[1])]

    def _same(self) -> bool:
        return self.sources[0].shape == self.sources[1].shape == self.result.shape

    def saved(self):
        return [] if (self.opname == "add" and self._same()) else [("in", 0), ("in", 1)]

    def backward(self, rc, gouts, saved, need):
        g = gouts[0]
        if not saved:  # a + b of equal shapes: both gradients are g itself
            return [g if need[0] else None, g if need[1] else None], []
        ga, gb = op(self.opname + "_backward", self)(g, saved[0], saved[1])
        return [ga if need[0] else None, gb if need[1] else None], []


class AdditionNode(_ArithmeticNode):
    prefix, opname = "add", "add"


class SubtractionNode(_ArithmeticNode):
    prefix, opname = "sub", "sub"


class MultiplicationNode(_ArithmeticNode):
    prefix, opname = "mul", "mul"


class DivisionNode(_ArithmeticNode):
    prefix, opname = "div", "div"


class ReshapeNode(FilterNode):
    """The same memory seen with per-sample shape `shape` (one entry may be -1); no dispatch."""

    prefix = "reshape"

    def __init__(self, source: Any, shape: Sequence[int], *, name: str | None = None,
                 register: bool = True):
        self.target = tuple(int(s) for s in shape)
        super().__init__([source], name, register)

    def infer(self, shapes, dtypes):
        x = shapes[0]
        per = int(np.prod(x[1:]))
        t = list(self.target)
        if t.count(-1) > 1:
            raise ValueError("shape: at most one -1")
        if -1 in t:
            known = int(np.prod([s for s in t if s != -1]))
            if known == 0 or per % known:
                raise ValueError(f"cannot reshape {x[1:]} into {self.target}")
            t[t.index(-1)] = per // known
        if int(np.prod(t)) != per:
            raise ValueError(f"cannot reshape per-sample shape {x[1:]} ({per} elements) into "
                             f"{self.target}")
        self._t = tuple(t)
        return [((x[0], *t), dtypes[0])]

    def forward(self, rc, xs, training, with_state):
        x = xs[0]
        return [x.reshape(x.shape[0], *self._t)]

    def backward(self, rc, gouts, saved, need):
        g = gouts[0]
        return [g.reshape(g.shape[0], *self.sources[0].shape[1:])], []


class FlattenNode(ReshapeNode):
    """(N, ...) -> (N, features); no dispatch."""

    prefix = "flatten"

    def __init__(self, source: Any, *, name: str | None = None, register: bool = True):
        super().__init__(source, (-1,), name=name, register=register)


class _LayoutNode(FilterNode):
    """Images <-> matrices: the same memory seen with the result's per-sample shape (a view, no
    dispatch), or with channels_last a copy by the op `opname` (and `opname`_backward)."""

    opname = ""

    def _op_args(self) -> tuple:
        return ()

    def forward(self, rc, xs, training, with_state):
        x = xs[0]
        if not self.channels_last:
            return [x.reshape(x.shape[0], *self.result.shape[1:])]
        return [op(self.opname, self)(x, *self._op_args(), True)]

    def saved(self):
        return [("in", 0)] if self.channels_last else []

    def backward(self, rc, gouts, saved, need):
        g = gouts[0]
        if not self.channels_last:
            return [g.reshape(g.shape[0], *self.sources[0].shape[1:])], []
        return [op(self.opname + "_backward", self)(g, saved[0], *self._op_args(), True)], []


class ImageToMatrixNode(_LayoutNode):
    """Images (N, C, H, W) as a matrix (N, C*H*W) (a view, no dispatch), or (N, H*W*C) with
    channels_last (a copy)."""

    prefix, opname = "im2mat", "image_to_matrix"

    def __init__(self, source: Any, channels_last: bool = False, *, name: str | None = None,
                 register: bool = True):
        self.channels_last = bool(channels_last)
        super().__init__([source], name, register)

    def infer(self, shapes, dtypes):
        x = shapes[0]
        _expect_ndim(x, 4)
        return [((x[0], int(np.prod(x[1:]))), _floats(dtypes))]


class MatrixToImageNode(_LayoutNode):
    """A matrix (N, C*H*W) as images (N, C, H, W) with chw = (C, H, W) (a view), or from
    channels-last rows (a copy)."""

    prefix, opname = "mat2im", "matrix_to_image"

    def __init__(self, source: Any, chw: Sequence[int], channels_last: bool = False, *,
                 name: str | None = None, register: bool = True):
        self.chw = tuple(int(v) for v in chw)
        self.channels_last = bool(channels_last)
        super().__init__([source], name, register)

    def _op_args(self) -> tuple:
        return (self.chw,)

    def infer(self, shapes, dtypes):
        m = shapes[0]
        _expect_ndim(m, 2)
        if m[1] != int(np.prod(self.chw)):
            raise ValueError(f"source has {m[1]} features, images {self.chw} need "
                             f"{int(np.prod(self.chw))}")
        return [((m[0], *self.chw), _floats(dtypes))]


# ---- recurrent ----------------------------------------------------------------------------------

class _RecurrentNode(FilterNode):
    mode = "lstm"
    prefix = "rnn"

    def __init__(self, source: Any, weights: RecurrentDataSource, *, name: str | None = None,
                 register: bool = True):
        if not isinstance(weights, RecurrentDataSource) or weights.mode != self.mode:
            raise GraphError(None, f"weights: expected a RecurrentDataSource of mode {self.mode!r}")
        self.weights = weights
        super().__init__([source], name, register)

    def infer(self, shapes, dtypes):
        x = shapes[0]
        _expect_ndim(x, 3, "source (T, N, F) time-major")
        ws = self.weights
        if x[2] != ws.input_size:
            raise ValueError(f"source has {x[2]} features, the weights expect {ws.input_size}")
        d = 2 if ws.bidirectional else 1
        return [((x[0], x[1], d * ws.hidden_size), _floats(dtypes))]

    def num_states(self):
        return 1  # the op's RNNWorkspace (an object holding what the backward needs)

    def _call(self) -> str:
        return {"lstm": "lstm", "gru": "gru"}.get(self.mode, "rnn")

    def forward(self, rc, xs, training, with_state):
        ws = self.weights
        t = rc.acquire_dict(ws)
        kw = dict(num_layers=ws.num_layers, bias=ws.has_bias, bidirectional=ws.bidirectional,
                  training=bool(with_state))
        if self.mode.startswith("rnn_"):
            kw["nonlinearity"] = self.mode[4:]
        out, _, work = op(self._call(), self)(xs[0], t, None, **kw)
        rc.release(ws)
        return [out, work] if with_state else [out]

    def saved(self):
        # the workspace references the op's input and (its last layer's h sequence) output: the
        # backward reads them through it, so they must stay live (memory planning) until then
        return [("state", 0), ("in", 0), ("out", 0)]

    def backward(self, rc, gouts, saved, need):
        ws = self.weights
        rc.acquire_dict(ws)
        f = op(self._call() + "_backward", self)
        if self.mode == "lstm":
            gx, _, gw = f(gouts[0], None, None, saved[0])
        else:
            gx, _, gw = f(gouts[0], None, saved[0])
        return [gx], [gw[k] for k in ws.trainable]


class LSTMNode(_RecurrentNode):
    """LSTM over a time-major sequence (T, N, F) -> (T, N, D*H) (torch.nn.LSTM's math)."""

    mode, prefix = "lstm", "lstm"


class GRUNode(_RecurrentNode):
    mode, prefix = "gru", "gru"


class RNNNode(_RecurrentNode):
    """Elman RNN; weights of mode 'rnn_tanh' or 'rnn_relu'."""

    prefix = "rnn"

    def __init__(self, source: Any, weights: RecurrentDataSource, **kw: Any):
        self.mode = weights.mode if isinstance(weights, RecurrentDataSource) else "rnn_tanh"
        super().__init__(source, weights, **kw)


# ---- losses -------------------------------------------------------------------------------------

LOSSES = {  # kind -> (op, class labels allowed)
    "cross_entropy": ("cross_entropy", True),
    "categorical_cross_entropy": ("categorical_cross_entropy", True),
    "sigmoid_cross_entropy": ("binary_cross_entropy_with_logits", False),
    "mse": ("mse_loss", False), "mae": ("l1_loss", False), "huber": ("huber_loss", False),
    "hinge": ("hinge_loss", False), "kl_divergence": ("kl_div", False),
    "cosine_distance": ("cosine_distance", False), "log": ("log_loss", False),
}


class LossNode(FilterNode):
    """A loss (MPS's MPSCNNLossNode): per-sample losses (N,) of `source` against the labels.

    labels: a LabelsNode (made if not given: int32 class indices for the class losses, else
    float targets shaped like the source). reduction: the training loss is the "mean" (default)
    or "sum" over samples of the per-sample losses; the gradient pass starts from it. options:
    the op's (label_smoothing, delta, eps, log_target, ignore_index ...)."""

    prefix = "loss"
    loss = "cross_entropy"

    def __init__(self, source: Any, loss: str | None = None, *, labels: LabelsNode | None = None,
                 reduction: str = "mean", name: str | None = None, register: bool = True,
                 **options: Any):
        self.loss = loss or type(self).loss
        if self.loss not in LOSSES:
            raise GraphError(None, f"loss: unknown {self.loss!r} (choose from {', '.join(LOSSES)})")
        if reduction not in ("mean", "sum"):
            raise GraphError(None, f"reduction: expected 'mean' or 'sum', got {reduction!r}")
        self.reduction, self.options = reduction, options
        src = as_value(source, None)
        if labels is None:
            _, cls = LOSSES[self.loss]
            if cls:
                labels = LabelsNode(src.shape[2:], int32, batch_size=src.shape[0])
            else:
                labels = LabelsNode(src.shape[1:], src.dtype, batch_size=src.shape[0])
        if not isinstance(labels, Value) or labels.producer is not None:
            raise GraphError(None, "labels: expected a LabelsNode (a graph input)")
        self.labels = labels
        super().__init__([src, labels], name, register)

    @property
    def class_labels(self) -> bool:
        return LOSSES[self.loss][1] and self.labels.dtype == int32

    def infer(self, shapes, dtypes):
        x, t = shapes
        _floats(dtypes[:1])
        _, cls = LOSSES[self.loss]
        if len(x) < 2:
            raise ValueError(f"source: expected (N, C, ...), got shape {x}")
        if cls and dtypes[1] == int32:
            want = x[2:]
            if t[1:] != want:
                raise ValueError(f"labels {self.labels.name} have per-sample shape {t[1:]}, "
                                 f"class labels for a source of shape {x} need {want}")
        else:
            if dtypes[1] not in (float32, float16):
                raise ValueError(f"labels {self.labels.name}: dtype {dtypes[1]}; this loss takes "
                                 "float targets")
            if t[1:] != x[1:]:
                raise ValueError(f"labels {self.labels.name} have per-sample shape {t[1:]}, "
                                 f"expected the source's {x[1:]}")
        return [((x[0],), float32)]

    def differentiable(self, i: int) -> bool:
        return i == 0

    def _fn(self, suffix: str = "") -> Callable:
        return op(LOSSES[self.loss][0] + suffix, self)

    def forward(self, rc, xs, training, with_state):
        return [self._fn()(xs[0], xs[1], reduction="per_sample", **self.options)]

    def saved(self):
        return [("in", 0), ("in", 1)]

    def backward(self, rc, gouts, saved, need):
        x, t = saved
        g = rc.loss_scale(x.shape[0], self.reduction, x.device)
        gx, _ = self._fn("_backward")(g, x, t, reduction="per_sample", target_grad=False,
                                      **self.options)
        return [gx, None], []


def _loss_class(kind: str, doc: str) -> type:
    def __init__(self, source, *, labels=None, reduction="mean", name=None, register=True, **opt):
        LossNode.__init__(self, source, kind, labels=labels, reduction=reduction, name=name,
                          register=register, **opt)

    cls = "".join(p.capitalize() for p in kind.split("_"))
    return type(f"{cls}LossNode", (LossNode,), {"__init__": __init__, "loss": kind, "__doc__": doc})


SoftmaxCrossEntropyLossNode = _loss_class("cross_entropy", "Softmax cross-entropy on logits.")
CrossEntropyLossNode = SoftmaxCrossEntropyLossNode
CategoricalCrossEntropyLossNode = _loss_class("categorical_cross_entropy",
                                              "Cross-entropy on probabilities (after a softmax).")
SigmoidCrossEntropyLossNode = _loss_class("sigmoid_cross_entropy", "Sigmoid cross-entropy on logits.")
MeanSquaredErrorLossNode = _loss_class("mse", "(x - t)^2")
MeanAbsoluteErrorLossNode = _loss_class("mae", "|x - t|")
HuberLossNode = _loss_class("huber", "Huber loss (delta)")
HingeLossNode = _loss_class("hinge", "max(0, 1 - (2t - 1) x)")
KLDivergenceLossNode = _loss_class("kl_divergence", "t (log t - x)")
CosineDistanceLossNode = _loss_class("cosine_distance", "1 - cos(x, t) over dim 1")
LogLossNode = _loss_class("log", "-t log(x + eps) - (1 - t) log(1 - x + eps)")

