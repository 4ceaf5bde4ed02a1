"""Recurrent nodes (pymetalnn/ops/rnn.py): LSTM, GRU, Elman RNN over time-major sequences."""
from __future__ import annotations

from typing import Any, Callable

from ... import functional as F
from ..datasource import RecurrentDataSource
from ..errors import GraphError
from .base import FilterNode, _expect_ndim, _floats


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

    def _ops(self) -> tuple[Callable, Callable]:
        """The functional op of this mode and its backward."""
        if self.mode == "lstm":
            return F.lstm, F.lstm_backward
        if self.mode == "gru":
            return F.gru, F.gru_backward
        return F.rnn, F.rnn_backward

    def forward(self, rc, xs, training, with_state):
        ws = self.weights
        t = rc.acquire_dict(ws)
        kw = dict(num_layers=ws.num_layers, bias=ws.has_bias, bidirectional=ws.bidirectional,
                  training=bool(with_state))
        if self.mode.startswith("rnn_"):
            kw["nonlinearity"] = self.mode[4:]
        out, _, work = self._ops()[0](xs[0], t, None, **kw)
        rc.release(ws)
        return [out, work] if with_state else [out]

    def saved(self):
        # the workspace references the op's input and (its last layer's h sequence) output: the
        # backward reads them through it, so they must stay live (memory planning) until then
        return [("state", 0), ("in", 0), ("out", 0)]

    def backward(self, rc, gouts, saved, need):
        ws = self.weights
        rc.acquire_dict(ws)
        f = self._ops()[1]
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
