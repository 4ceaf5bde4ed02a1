"""Element-wise arithmetic nodes (pymetalnn/ops/arith.py): a + b, a - b, a * b, a / b (broadcasting)."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ... import functional as F
from .base import FilterNode, _act, _floats


class _ArithmeticNode(FilterNode):
    """a (op) b with broadcasting; `ops` = (the functional op, its backward)."""

    ops: tuple[Callable, Callable] = (F.add, F.add_backward)

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

    def forward(self, rc, xs, training, with_state, activation=None):
        # activation: fused with a following neuron (optimize.FusedNeuronNode), e.g. a residual
        # add + relu in one pass
        return [self.ops[0](xs[0], xs[1], **_act(activation))]

    def _same(self) -> bool:
        return self.sources[0].shape == self.sources[1].shape == self.result.shape

    def saved(self):
        return [] if (self.ops[0] is F.add and self._same()) else [("in", 0), ("in", 1)]

    def backward(self, rc, gouts, saved, need):
        g = gouts[0]
        if not saved:  # a + b of equal shapes: both gradients are g itself
            return [g if need[0] else None, g if need[1] else None], []
        ga, gb = self.ops[1](g, saved[0], saved[1])
        return [ga if need[0] else None, gb if need[1] else None], []


class AdditionNode(_ArithmeticNode):
    prefix, ops = "add", (F.add, F.add_backward)


class SubtractionNode(_ArithmeticNode):
    prefix, ops = "sub", (F.sub, F.sub_backward)


class MultiplicationNode(_ArithmeticNode):
    prefix, ops = "mul", (F.mul, F.mul_backward)


class DivisionNode(_ArithmeticNode):
    prefix, ops = "div", (F.div, F.div_backward)
