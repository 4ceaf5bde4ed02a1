"""Softmax nodes (pymetalnn/ops/softmax.py)."""
from __future__ import annotations

from typing import Any

from ... import functional as F
from .base import FilterNode, _expect_ndim, _floats


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
        return [(F.log_softmax if self.log else F.softmax)(xs[0], self.dim)]

    def saved(self):
        return [("out", 0)]

    def backward(self, rc, gouts, saved, need):
        f = F.log_softmax_backward_from_output if self.log else F.softmax_backward_from_output
        return [f(gouts[0], saved[0], self.dim)], []


class LogSoftMaxNode(SoftMaxNode):
    prefix = "logsoftmax"
    log = True
