"""Normalization nodes (pymetalnn/ops/norm.py): batch, instance, group."""
from __future__ import annotations

from typing import Any

from ... import functional as F
from ..datasource import NormalizationDataSource
from .base import FilterNode, _act, _expect_ndim, _floats, _weights_of
from .weighted import with_weights


class _NormNode(FilterNode):
    """A normalization over dim 1 with weights from a NormalizationDataSource; sources of
    `ndims` dimensions whose channels match the weights'."""

    ndims: tuple[int, ...] = (3, 4)

    def __init__(self, source: Any, weights: NormalizationDataSource, *, name: str | None = None,
                 register: bool = True):
        self.weights = _weights_of(weights, NormalizationDataSource)
        super().__init__([source], name, register)

    def infer(self, shapes, dtypes):
        x = shapes[0]
        _expect_ndim(x, self.ndims)
        if x[1] != self.weights.num_features:
            raise ValueError(f"source has {x[1]} channels, the weights ({self.weights.label}) "
                             f"have {self.weights.num_features}")
        return [(x, _floats(dtypes))]


class BatchNormalizationNode(_NormNode):
    """Batch normalization over dim 1 (weights, running statistics from a
    NormalizationDataSource). Training: batch statistics (kept as states for the gradient) and
    the running statistics updated; inference: the running statistics."""

    prefix = "bn"
    ndims = (2, 3, 4)
    # training statistics over several processes (pymetalnn.distributed.SyncBatchNorm)
    sync: Any = None

    def _wb(self, rc) -> tuple:
        t = rc.acquire_dict(self.weights)
        return t.get("running_mean"), t.get("running_var"), t.get("weight"), t.get("bias")

    def num_states(self):
        return 2

    def forward(self, rc, xs, training, with_state, activation=None):
        if training and self.sync is not None:
            return self.sync.forward(self, rc, xs, with_state, activation)
        ws = self.weights
        rm, rv, w, b = self._wb(rc)
        kw = _act(activation)
        kw.update(rc.take_out())  # a channel slice of an eliminated concatenation
        if training:
            y, mean, invstd = F.batch_norm_with_stats(
                xs[0], rm, rv, w, b, training=True, momentum=ws.momentum, eps=ws.eps, **kw)
            if rm is not None:
                ws.mark_dirty()
                ws.num_batches_tracked += 1
            rc.release(ws)
            return [y, mean, invstd] if with_state else [y]
        y = (F.batch_norm_with_stats if "activation" in kw else F.batch_norm)(
            xs[0], rm, rv, w, b, training=False, eps=ws.eps, **kw)
        y = y[0] if isinstance(y, tuple) else y
        rc.release(ws)
        return [y]

    def saved(self):
        return [("in", 0), ("state", 0), ("state", 1)]

    def activation_in_backward(self, neuron):
        # act'(z) recomputed from x and the saved statistics inside batch_norm_backward's kernels
        return neuron.kind in F.ACTIVATIONS

    def strided_out(self):
        return True

    def strided_grad(self):
        return True

    def backward(self, rc, gouts, saved, need, activation=None):
        if self.sync is not None:
            return self.sync.backward(self, rc, gouts, saved, need, activation)
        x, mean, invstd = saved
        ws = self.weights
        rm, rv, w, b = self._wb(rc)
        kw = _act(activation)
        ns = rc.state.pop(("grad_nstride", self), None)
        if ns:
            kw["grad_out_batch_stride"] = ns
        gx, _, _, gw, gb = F.batch_norm_backward(
            gouts[0], x, rm, rv, w, b, training=True, momentum=ws.momentum, eps=ws.eps,
            save_mean=mean, save_invstd=invstd, **kw)
        return [gx], ([gw, gb] if ws.affine else [])


class InstanceNormalizationNode(_NormNode):
    """Instance normalization (per sample and channel; weights from a NormalizationDataSource
    with running_stats=False)."""

    prefix = "in"

    def forward(self, rc, xs, training, with_state):
        eps = self.weights.eps
        return [with_weights(rc, self.weights, lambda t: F.instance_norm(
            xs[0], None, None, t.get("weight"), t.get("bias"), eps=eps))]

    def saved(self):
        return [("in", 0)]

    def backward(self, rc, gouts, saved, need):
        eps = self.weights.eps
        gx, _, _, gw, gb = with_weights(rc, self.weights, lambda t: F.instance_norm_backward(
            gouts[0], saved[0], None, None, t.get("weight"), t.get("bias"), eps=eps))
        return [gx], ([gw, gb] if self.weights.affine else [])


class GroupNormalizationNode(_NormNode):
    """Group normalization with `num_groups` groups (weights from a NormalizationDataSource
    with running_stats=False); the per-(sample, group) statistics are states."""

    prefix = "gn"

    def __init__(self, source: Any, weights: NormalizationDataSource, num_groups: int, *,
                 name: str | None = None, register: bool = True):
        self.num_groups = int(num_groups)
        super().__init__(source, weights, name=name, register=register)

    def infer(self, shapes, dtypes):
        x = shapes[0]
        _expect_ndim(x, (3, 4))
        if x[1] != self.weights.num_features or x[1] % self.num_groups:
            raise ValueError(f"source has {x[1]} channels: needs {self.weights.num_features} "
                             f"divisible into {self.num_groups} groups")
        return [(x, _floats(dtypes))]

    def num_states(self):
        return 2

    def forward(self, rc, xs, training, with_state):
        t = rc.acquire_dict(self.weights)
        y, mean, rstd = F.group_norm_with_stats(xs[0], self.num_groups, t.get("weight"),
                                                t.get("bias"), eps=self.weights.eps)
        rc.release(self.weights)
        return [y, mean, rstd] if with_state else [y]

    def saved(self):
        return [("in", 0), ("state", 0), ("state", 1)]

    def backward(self, rc, gouts, saved, need):
        x, mean, rstd = saved
        t = rc.acquire_dict(self.weights)
        gx, gw, gb = F.group_norm_backward(gouts[0], x, self.num_groups, t.get("weight"),
                                           t.get("bias"), eps=self.weights.eps,
                                           save_mean=mean, save_rstd=rstd)
        return [gx], ([gw, gb] if self.weights.affine else [])


class LayerNormalizationNode(FilterNode):
    """Layer normalization over the trailing normalized_shape dimensions of each sample
    (torch.nn.LayerNorm; weights from a LayerNormDataSource): the layer_norm kernels, the row
    statistics recomputed by the gradient."""

    prefix = "ln"

    def __init__(self, source: Any, weights: Any, *, name: str | None = None, register: bool = True):
        from ..datasource import LayerNormDataSource

        self.weights = _weights_of(weights, LayerNormDataSource)
        super().__init__([source], name, register)

    def infer(self, shapes, dtypes):
        x, ns = shapes[0], self.weights.normalized_shape
        if len(x) < len(ns) + 1 or tuple(x[len(x) - len(ns):]) != ns:
            raise ValueError(f"source shape {x} does not end with normalized_shape {ns} "
                             f"({self.weights.label})")
        return [(x, _floats(dtypes))]

    def forward(self, rc, xs, training, with_state):
        # the input's dtype (float16 copies in mixed precision)
        ns, eps = self.weights.normalized_shape, self.weights.eps
        return [with_weights(rc, self.weights, lambda t: F.layer_norm(
            xs[0], ns, t.get("weight"), t.get("bias"), eps), math=True)]

    def saved(self):
        return [("in", 0)]

    def backward(self, rc, gouts, saved, need):
        ns, eps = self.weights.normalized_shape, self.weights.eps
        gx, gw, gb = with_weights(rc, self.weights, lambda t: F.layer_norm_backward(
            gouts[0], saved[0], ns, t.get("weight"), t.get("bias"), eps), math=True)
        return [gx], [g for g in (gw, gb) if g is not None]
