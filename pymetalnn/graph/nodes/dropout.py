"""The dropout node (pymetalnn/ops/dropout.py)."""
from __future__ import annotations

from typing import Any

from ... import functional as F
from ..errors import GraphError
from .base import FilterNode, _expect_ndim, _floats


class DropoutNode(FilterNode):
    """Dropout with probability p (spatial: whole channels). The mask of training step k is
    drawn from (seed, offset=k) and recomputed by the gradient (MPS's dropout state, managed by
    the graph); in an inference graph the node passes its source through. k is read on the
    device (the graph's step_counter), so a captured step replayed draws each step's mask."""

    prefix = "dropout"
    uses_step_counter = True

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
        f = F.dropout2d if self.spatial else F.dropout
        return [f(xs[0], self.p, self.seed, 0, offset_tensor=rc.g.step_counter())]

    def backward(self, rc, gouts, saved, need):
        f = F.dropout2d_backward if self.spatial else F.dropout_backward
        return [f(gouts[0], self.p, self.seed, 0, offset_tensor=rc.g.step_counter())], []
