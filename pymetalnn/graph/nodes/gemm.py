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

    def __init__(self, source: Any, weights: FullyConnectedDataSource, *, per_step: bool = False,
                 name: str | None = None, register: bool = True):
        """per_step: the layer applied to the last dimension of every position of a sequence
        (N, T, F) or (T, N, F) -> (..., out), as torch.nn.Linear on a 3-D input, instead of
        flattening each sample."""
        self.weights = _weights_of(weights, FullyConnectedDataSource)
        self.per_step = bool(per_step)
        super().__init__([source], name, register)

    def infer(self, shapes, dtypes):
        (x,) = shapes
        dt = _floats(dtypes)
        if self.per_step:
            if len(x) < 3 or x[-1] != self.weights.in_features:
                raise ValueError(f"source: per_step needs a sequence (..., {self.weights.in_features}), "
                                 f"got shape {x}")
            return [((*x[:-1], self.weights.out_features), dt)]
        if len(x) < 2:
            raise ValueError(f"source: expected (N, features) or images, got shape {x}")
        f = int(np.prod(x[1:]))
        if f != self.weights.in_features:
            hint = " (a sequence? per_step=True applies the layer at every position)" \
                if len(x) == 3 and x[-1] == self.weights.in_features else ""
            raise ValueError(f"source has {f} features per sample (shape {x}), the weights "
                             f"({self.weights.label}) expect {self.weights.in_features}{hint}")
        return [((x[0], self.weights.out_features), dt)]

    def _rows(self, x: Any) -> Any:
        return x.reshape(-1, x.shape[-1]) if self.per_step else x.reshape(x.shape[0], -1)

    def forward(self, rc, xs, training, with_state, activation=None):
        x = xs[0]
        y = self.call_with_weights(rc, F.linear, self._rows(x), **_act(activation))
        if self.per_step:
            y = y.reshape(*x.shape[:-1], y.shape[-1])
        return [y]

    def saved(self):
        return [("in", 0)]

    def backward(self, rc, gouts, saved, need):
        (x,) = saved
        x2 = self._rows(x)
        w, b = rc.acquire(self.weights)
        g = gouts[0].reshape(-1, w.shape[0]) if self.per_step else gouts[0]
        if not need[0] and rc.skip_dead:
            return self.weight_grads_only(rc, *F.linear_weight_grad(g, x2, w, b,
                                                                     **rc.accumulate()))
        gx, gw, gb = F.linear_backward(g, x2, w, b, **rc.accumulate())
        return [gx.reshape(x.shape) if need[0] else None], _param_grads(gw, gb)
