"""The embedding node (pymetalnn/ops/embedding.py)."""
from __future__ import annotations

from typing import Any

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
        return [with_weights(rc, self.weights, lambda t: F.embedding(xs[0], t["weight"], pad))]

    def saved(self):
        return [("in", 0)]

    def backward(self, rc, gouts, saved, need):
        pad = self.weights.padding_idx
        _, gw = with_weights(rc, self.weights,
                             lambda t: F.embedding_backward(gouts[0], saved[0], t["weight"], pad))
        return [None], [gw]
