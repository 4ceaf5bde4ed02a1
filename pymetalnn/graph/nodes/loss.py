"""Loss nodes (pymetalnn/ops/loss.py): per-sample losses against a LabelsNode; the gradient pass
starts from their reduction.
"""
from __future__ import annotations

from typing import Any

from ... import functional as F
from ...tensor import float16, float32, int32
from ..errors import GraphError
from .base import FilterNode, LabelsNode, Value, _floats, as_value
from .kinds import kind_class

LOSSES = {  # kind -> (forward op, backward op, class labels allowed)
    "cross_entropy": (F.cross_entropy, F.cross_entropy_backward, True),
    "categorical_cross_entropy": (F.categorical_cross_entropy,
                                  F.categorical_cross_entropy_backward, True),
    "sigmoid_cross_entropy": (F.binary_cross_entropy_with_logits,
                              F.binary_cross_entropy_with_logits_backward, False),
    "mse": (F.mse_loss, F.mse_loss_backward, False),
    "mae": (F.l1_loss, F.l1_loss_backward, False),
    "huber": (F.huber_loss, F.huber_loss_backward, False),
    "hinge": (F.hinge_loss, F.hinge_loss_backward, False),
    "kl_divergence": (F.kl_div, F.kl_div_backward, False),
    "cosine_distance": (F.cosine_distance, F.cosine_distance_backward, False),
    "log": (F.log_loss, F.log_loss_backward, False),
}


class LossNode(FilterNode):
    """A loss (MPS's MPSCNNLossNode): per-sample losses (N,) of `source` against the labels.

    labels: a LabelsNode (made if not given: int32 class indices for the class losses, else
    float targets shaped like the source). reduction: the training loss is the "mean" (default)
    or "sum" over samples of the per-sample losses, or "elementwise_mean", PyTorch's "mean": the
    sum of every term over the number of terms (positions, not ignored labels; the sum of class
    weights where given), as a ported torch loss; the gradient pass starts from it. options:
    the op's (label_smoothing, delta, eps, log_target, ignore_index ...)."""

    prefix = "loss"
    is_loss = True
    loss = "cross_entropy"

    def __init__(self, source: Any, loss: str | None = None, *, labels: LabelsNode | None = None,
                 reduction: str = "mean", name: str | None = None, register: bool = True,
                 **options: Any):
        self.loss = loss or type(self).loss
        if self.loss not in LOSSES:
            raise GraphError(None, f"loss: unknown {self.loss!r} (choose from {', '.join(LOSSES)})")
        if reduction not in ("mean", "sum", "elementwise_mean"):
            raise GraphError(None, f"reduction: expected 'mean', 'sum' or 'elementwise_mean', got "
                                   f"{reduction!r}")
        self.reduction, self.options = reduction, options
        src = as_value(source, None)
        if labels is None:
            if LOSSES[self.loss][2]:
                labels = LabelsNode(src.shape[2:], int32, batch_size=src.shape[0])
            else:
                labels = LabelsNode(src.shape[1:], src.dtype, batch_size=src.shape[0])
        if not isinstance(labels, Value) or labels.producer is not None:
            raise GraphError(None, "labels: expected a LabelsNode (a graph input)")
        self.labels = labels
        super().__init__([src, labels], name, register)

    @property
    def class_labels(self) -> bool:
        return LOSSES[self.loss][2] and self.labels.dtype == int32

    def infer(self, shapes, dtypes):
        x, t = shapes
        _floats(dtypes[:1])
        cls = LOSSES[self.loss][2]
        if len(x) < 2:
            raise ValueError(f"source: expected (N, C, ...), got shape {x}")
        if cls and dtypes[1] == int32:
            want = x[2:]
            if t[1:] != want:
                raise ValueError(f"labels {self.labels.name} have per-sample shape {t[1:]}, "
                                 f"class labels for a source of shape {x} need {want}")
        else:
            if dtypes[1] not in (float32, float16):
                raise ValueError(f"labels {self.labels.name}: dtype {dtypes[1]}; this loss takes "
                                 "float targets")
            if t[1:] != x[1:]:
                raise ValueError(f"labels {self.labels.name} have per-sample shape {t[1:]}, "
                                 f"expected the source's {x[1:]}")
        return [((x[0],), float32)]

    def differentiable(self, i: int) -> bool:
        return i == 0

    def forward(self, rc, xs, training, with_state):
        return [LOSSES[self.loss][0](rc.loss_input(xs[0]), xs[1], reduction="per_sample",
                                     **self.options)]

    def saved(self):
        return [("in", 0), ("in", 1)]

    def backward(self, rc, gouts, saved, need):
        x0, t = saved
        x = rc.loss_input(x0)  # mixed precision: the loss in float, its gradient cast back
        if self.reduction == "elementwise_mean":  # the op's own (torch's) mean
            gx, _ = LOSSES[self.loss][1](rc.loss_unit(x.device), x, t, reduction="mean",
                                         target_grad=False, **self.options)
        else:
            g = rc.loss_scale(x.shape[0], self.reduction, x.device)
            gx, _ = LOSSES[self.loss][1](g, x, t, reduction="per_sample", target_grad=False,
                                         **self.options)
        if gx.dtype != x0.dtype:
            gx = F.cast(gx, x0.dtype)
        return [gx, None], []


def _loss_class(kind: str, doc: str) -> type:
    return kind_class(LossNode, "loss", kind, "LossNode", doc)


SoftmaxCrossEntropyLossNode = _loss_class("cross_entropy", "Softmax cross-entropy on logits.")
CrossEntropyLossNode = SoftmaxCrossEntropyLossNode
CategoricalCrossEntropyLossNode = _loss_class("categorical_cross_entropy",
                                              "Cross-entropy on probabilities (after a softmax).")
SigmoidCrossEntropyLossNode = _loss_class("sigmoid_cross_entropy", "Sigmoid cross-entropy on logits.")
MeanSquaredErrorLossNode = _loss_class("mse", "(x - t)^2")
MeanAbsoluteErrorLossNode = _loss_class("mae", "|x - t|")
HuberLossNode = _loss_class("huber", "Huber loss (delta)")
HingeLossNode = _loss_class("hinge", "max(0, 1 - (2t - 1) x)")
KLDivergenceLossNode = _loss_class("kl_divergence", "t (log t - x)")
CosineDistanceLossNode = _loss_class("cosine_distance", "1 - cos(x, t) over dim 1")
LogLossNode = _loss_class("log", "-t log(x + eps) - (1 - t) log(1 - x + eps)")
