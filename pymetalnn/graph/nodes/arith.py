"""Element-wise arithmetic nodes (pymetalnn/ops/arith.py): a + b, a - b, a * b, a / b (broadcasting)."""
from __future__ import annotations

from typing import Any

import numpy as np

from .base import FilterNode, _floats, op


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
