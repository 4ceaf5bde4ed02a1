"""The graph's building blocks: values (inputs, results, states, gradients), the node base
classes (FilterNode: a forward op; GradientNode, GradientSumNode, UpdateNode: what the training
graph adds), and the shape helpers they share.

A filter node implements its forward and backward with the functional ops (pymetalnn.functional,
called directly) and declares what its
backward needs (inputs, outputs, states such as pooling indices or batch statistics), so the
graph keeps exactly those alive and frees everything else.
"""
from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, Callable

import numpy as np

from ... import functional as F
from ...tensor import Tensor, float16, float32, int32
from ..datasource import DataSource
from ..errors import GraphError

NOMINAL_BATCH = 2  # the batch size used for shape checks when an input gives none


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
    is_loss = False  # a loss node's gradient starts the gradient pass (it reads no gradient)

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

    def call_with_weights(self, rc: Any, op: Callable, x: Any, **kw: Any) -> Any:
        """op(x, weight, bias, **kw) with this node's weights acquired for the call."""
        w, b = rc.acquire(self.weights)  # float16 copies in a mixed-precision graph
        if op in (F.conv2d, F.linear, F.conv_transpose2d):
            kw.update(rc.accumulate())
        y = op(x, w, b, **kw)
        rc.release(self.weights)
        return y

    def weight_grads_only(self, rc: Any, gw: Tensor, gb: Tensor | None
                          ) -> tuple[list[Tensor | None], list[Tensor]]:
        """backward's result when nothing reads the input gradient (the dead-node pass): only
        the weights' (and bias's) gradients were computed."""
        rc.note(f"{self.name}: input gradient not computed (nothing uses it)")
        return [None], _param_grads(gw, gb)

    def strided_out(self) -> bool:
        """Whether forward can write its (first) result into a channel slice of a larger tensor:
        its op takes out=, out_batch_stride= (rc.take_out()), which the graph's concat
        elimination passes at batch > 1."""
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
        if not forward.is_loss and all(g is None for g in gs):
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


def _param_grads(gw: Tensor, gb: Tensor | None) -> list[Tensor]:
    """The weight gradients in a data source's trainable order: weight, then bias if it has one."""
    return [gw] if gb is None else [gw, gb]


def _act(activation: Any) -> dict[str, Any]:
    """activation= for the op of a node fused with a neuron (optimize.FusedNeuronNode)."""
    return {} if activation is None else {"activation": activation}


def _conv_out(n: int, k: int, s: int, p0: int, p1: int, d: int) -> int:
    return (n + p0 + p1 - d * (k - 1) - 1) // s + 1
