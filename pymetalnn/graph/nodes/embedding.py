"""The embedding node (pymetalnn/ops/embedding.py)."""
from __future__ import annotations

from typing import Any

import numpy as np

from ... import functional as F
from ...tensor import float32, int32
from ..datasource import EmbeddingDataSource
from .base import FilterNode, _weights_of
from .weighted import with_weights


class EmbeddingNode(FilterNode):
    """y[..., :] = weight[indices[...]] (torch.nn.Embedding): the source holds int32 indices
    (an ImageNode of dtype int32), the table comes from an EmbeddingDataSource. The indices get
    no gradient; the table's gradient skips padding_idx."""

    prefix = "embedding"

    def __init__(self, source: Any, weights: EmbeddingDataSource, *, name: str | None = None,
                 register: bool = True):
        self.weights = _weights_of(weights, EmbeddingDataSource)
        super().__init__([source], name, register)

    def infer(self, shapes, dtypes):
        if dtypes[0] != int32:
            raise ValueError(f"source: expected int32 indices, got {dtypes[0]}")
        return [((*shapes[0], self.weights.embedding_dim), float32)]

    def differentiable(self, i: int) -> bool:
        return False

    def forward(self, rc, xs, training, with_state):
        pad = self.weights.padding_idx
        y = with_weights(rc, self.weights, lambda t: F.embedding(xs[0], t["weight"], pad))
        if rc.mixed:  # the lookup in the table's float32, the activations float16
            y = F.cast(y, np.float16)
        return [y]

    def saved(self):
        return [("in", 0)]

    def backward(self, rc, gouts, saved, need):
        pad = self.weights.padding_idx

        def grad(t: dict) -> tuple:
            g = gouts[0]
            if g.dtype != t["weight"].dtype:  # mixed precision: accumulate rows in float32
                g = F.cast(g, t["weight"].dtype)
            return F.embedding_backward(g, saved[0], t["weight"], pad)

        _, gw = with_weights(rc, self.weights, grad)
        return [None], [gw]
