"""The fully connected node (pymetalnn/ops/gemm.py: linear)."""
from __future__ import annotations

from typing import Any

import numpy as np

from ... import functional as F
from ..datasource import FullyConnectedDataSource
from .base import FilterNode, _act, _floats, _param_grads, _weights_of


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
        return [self.call_with_weights(rc, F.linear, x.reshape(x.shape[0], -1), **_act(activation))]

    def saved(self):
        return [("in", 0)]

    def backward(self, rc, gouts, saved, need):
        (x,) = saved
        x2 = x.reshape(x.shape[0], -1)
        w, b = rc.acquire(self.weights)
        if not need[0] and rc.skip_dead:
            return self.weight_grads_only(rc, *F.linear_weight_grad(gouts[0], x2, w, b))
        gx, gw, gb = F.linear_backward(gouts[0], x2, w, b)
        return [gx.reshape(x.shape) if need[0] else None], _param_grads(gw, gb)
