"""Recurrent nodes (pymetalnn/ops/rnn.py): LSTM, GRU, Elman RNN over time-major sequences."""
from __future__ import annotations

from typing import Any, Callable

from ... import functional as F
from ..datasource import RecurrentDataSource
from ..errors import GraphError
from .base import FilterNode, _expect_ndim, _floats


class _RecurrentNode(FilterNode):
    """A recurrent stack over a sequence: time-major (T, N, F) or, with batch_first, (N, T, F)
    (torch's layouts); result 0 the output sequence in the same layout. initial_state: h_0 (and
    for an LSTM (h_0, c_0)), values of shape (L*D, N, H) as torch's (None: zeros); with
    return_state the final h_n (and c_n) are results 1 (and 2), also (L*D, N, H). Gradients
    flow to the sequence, the initial states and the weights."""

    mode = "lstm"
    prefix = "rnn"

    def __init__(self, source: Any, weights: RecurrentDataSource, *, initial_state: Any = None,
                 batch_first: bool = False, return_state: bool = False, name: str | None = None,
                 register: bool = True):
        if not isinstance(weights, RecurrentDataSource) or weights.mode != self.mode:
            raise GraphError(None, f"weights: expected a RecurrentDataSource of mode {self.mode!r}")
        self.weights = weights
        self.batch_first, self.return_state = bool(batch_first), bool(return_state)
        self.n_states = 2 if self.mode == "lstm" else 1
        if initial_state is None:
            init: list[Any] = []
        elif self.mode == "lstm":
            if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2:
                raise GraphError(None, "initial_state: an LSTM takes (h_0, c_0)")
            init = list(initial_state)
        else:
            init = [initial_state]
        self.has_init = bool(init)
        self.num_results = 1 + (self.n_states if self.return_state else 0)
        super().__init__([source, *init], name, register)

    def infer(self, shapes, dtypes):
        x = shapes[0]
        _expect_ndim(x, 3, "source (N, T, F) batch-first" if self.batch_first
                     else "source (T, N, F) time-major")
        ws = self.weights
        if x[2] != ws.input_size:
            raise ValueError(f"source has {x[2]} features, the weights expect {ws.input_size}")
        d = 2 if ws.bidirectional else 1
        n = x[0] if self.batch_first else x[1]
        st = (ws.num_layers * d, n, ws.hidden_size)
        for i, s in enumerate(shapes[1:]):
            if tuple(s[:1] + s[2:]) != (st[0], st[2]) or len(s) != 3:
                raise ValueError(f"initial state {i}: shape {s}, expected (L*D, N, H) = {st}")
        dt = _floats(dtypes[:1])
        out = [((x[0], x[1], d * ws.hidden_size), dt)]
        return out + [(st, dt)] * (self.num_results - 1)

    def num_states(self):
        # the op's RNNWorkspace, and its time-major input and output (batch_first: copies the
        # workspace reads, kept live until the backward as states)
        return 3 if self.batch_first else 1

    def _ops(self) -> tuple[Callable, Callable]:
        """The functional op of this mode and its backward."""
        if self.mode == "lstm":
            return F.lstm, F.lstm_backward
        if self.mode == "gru":
            return F.gru, F.gru_backward
        return F.rnn, F.rnn_backward

    def forward(self, rc, xs, training, with_state):
        ws = self.weights
        t = rc.math_weights(ws)  # float16 copies in a mixed-precision graph
        kw = dict(num_layers=ws.num_layers, bias=ws.has_bias, bidirectional=ws.bidirectional,
                  training=bool(with_state))
        if self.mode.startswith("rnn_"):
            kw["nonlinearity"] = self.mode[4:]
        x = F.to_time_major(xs[0]) if self.batch_first else xs[0]
        hx = (tuple(xs[1:3]) if self.mode == "lstm" else xs[1]) if self.has_init else None
        out, hn, work = self._ops()[0](x, t, hx, **kw)
        rc.release(ws)
        res = [F.to_batch_first(out) if self.batch_first else out]
        if self.return_state:
            res += list(hn) if self.mode == "lstm" else [hn]
        if with_state:
            res += [work, x, out] if self.batch_first else [work]
        return res

    def saved(self):
        # the workspace references the op's input and (its last layer's h sequence) output: the
        # backward reads them through it, so they must stay live (memory planning) until then
        if self.batch_first:
            return [("state", 0), ("state", 1), ("state", 2)]
        return [("state", 0), ("in", 0), ("out", 0)]

    def backward(self, rc, gouts, saved, need):
        ws = self.weights
        rc.acquire_dict(ws)
        f = self._ops()[1]
        g = gouts[0]
        if g is not None and self.batch_first:
            g = F.to_time_major(g)
        gs = list(gouts[1:]) + [None] * (self.n_states - len(gouts[1:]))
        if self.mode == "lstm":
            gx, (gh, gc), gw = f(g, gs[0], gs[1], saved[0])
            ginit = [gh, gc]
        else:
            gx, gh, gw = f(g, gs[0], saved[0])
            ginit = [gh]
        if self.batch_first:
            gx = F.to_batch_first(gx)
        return [gx] + (ginit if self.has_init else []), [gw[k] for k in ws.trainable]


class LSTMNode(_RecurrentNode):
    """LSTM over a sequence (T, N, F) -> (T, N, D*H), or batch-first (torch.nn.LSTM's math);
    see _RecurrentNode for initial/final states."""

    mode, prefix = "lstm", "lstm"


class GRUNode(_RecurrentNode):
    mode, prefix = "gru", "gru"


class RNNNode(_RecurrentNode):
    """Elman RNN; weights of mode 'rnn_tanh' or 'rnn_relu'."""

    prefix = "rnn"

    def __init__(self, source: Any, weights: RecurrentDataSource, **kw: Any):
        self.mode = weights.mode if isinstance(weights, RecurrentDataSource) else "rnn_tanh"
        super().__init__(source, weights, **kw)
