"""The YOLO v2 loss as a graph loss node (pymetalnn/ops/detection.py: functional.yolo_loss and
yolo_loss_backward).

    x = G.ImageNode((3, 416, 416))
    ...                                        # a TinyYOLO body ending in (A*(5+C), 13, 13)
    loss = G.YoloLossNode(head, anchors)       # labels: (N, max_boxes, 5) rows (class, cx, cy, w, h)
    tg = G.TrainingGraph(loss, optimizer=...)
    tg.encode(images, boxes)

The labels input holds `max_boxes` rows per image, class -1 for unused rows. They are checked on
the host when bound (classes, coordinates: see ops.detection.check_targets), so the kernels never
read them back.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ... import functional as F
from ...tensor import Tensor, float32
from ..errors import GraphError
from .base import FilterNode, LabelsNode, as_value
from .loss import LossNode


class YoloLossNode(LossNode):
    """YOLO v2 loss (see pymetalnn.ops.detection) of a (N, A*(5+C), GH, GW) source for `anchors`
    (A, 2) in grid cells. reduction: the training loss is the "mean" (default) or "sum" over
    images of the per-image losses. options: yolo_loss's (coord_scale, object_scale,
    noobject_scale, class_scale, ignore_thresh, rescore)."""

    prefix = "yololoss"
    loss = "yolo"

    def __init__(self, source: Any, anchors: Any, *, max_boxes: int = 16,
                 labels: LabelsNode | None = None, reduction: str = "mean",
                 name: str | None = None, register: bool = True, **options: Any):
        a = np.asarray(anchors, np.float64)
        if a.ndim != 2 or a.shape[1] != 2 or len(a) == 0 or not (np.isfinite(a).all() and (a > 0).all()):
            raise GraphError(None, f"anchors: expected (A, 2) positive widths and heights, got {a!r}")
        if reduction not in ("mean", "sum"):
            raise GraphError(None, f"reduction: expected 'mean' or 'sum', got {reduction!r}")
        if isinstance(max_boxes, bool) or not isinstance(max_boxes, (int, np.integer)) \
                or max_boxes < 0:
            raise GraphError(None, f"max_boxes: expected an int >= 0, got {max_boxes!r}")
        self.anchors = a.astype(np.float32)
        self.reduction, self.options = reduction, dict(options)
        src = as_value(source, None)
        if labels is None:
            labels = LabelsNode((int(max_boxes), 5), float32, batch_size=src.shape[0])
        if not isinstance(labels, LabelsNode) or labels.producer is not None:
            raise GraphError(None, "labels: expected a LabelsNode (a graph input)")
        self.labels = labels
        FilterNode.__init__(self, [src, labels], name, register)

    @property
    def class_labels(self) -> bool:
        return False

    @property
    def num_classes(self) -> int:
        return self.sources[0].shape[1] // len(self.anchors) - 5

    def infer(self, shapes, dtypes):
        x, t = shapes
        if dtypes[0] not in (np.dtype(np.float32), np.dtype(np.float16)):
            raise ValueError(f"source: dtype {dtypes[0]}, expected float32 or float16")
        a = len(self.anchors)
        if len(x) != 4 or x[1] % a or x[1] // a < 6:
            raise ValueError(f"source: expected (N, A*(5+C), GH, GW) with A = {a} anchors and "
                             f"C >= 1, got shape {x}")
        if dtypes[1] != np.dtype(np.float32) or len(t) != 3 or t[2] != 5:
            raise ValueError(f"labels {self.labels.name}: expected float32 (max_boxes, 5) rows per "
                             f"image, got {t[1:]} {dtypes[1]}")
        return [((x[0],), float32)]

    def bind_labels(self, g: Any, v: LabelsNode, x: Any) -> Tensor:
        """Check the rows on the host (once per step, before anything is dispatched) and bind
        them as YoloTargets, which the loss then trusts."""
        c = g.resolve(self.sources[0]).shape[1] // len(self.anchors) - 5
        if isinstance(x, F.YoloTargets) and x.num_classes == c:
            return g._bind_input(v, x)
        arr = x.numpy() if isinstance(x, Tensor) else np.asarray(x)
        try:
            arr = F.check_targets(arr, c, "labels")
        except ValueError as e:
            raise GraphError(v, str(e)) from None
        return F.YoloTargets(g._bind_input(v, arr), c)

    def _anchors(self, rc: Any) -> Tensor:
        t = rc.g._const(("yolo_anchors", id(self)), lambda: self.anchors)
        return F.YoloAnchors(t, self.anchors)

    def forward(self, rc, xs, training, with_state):
        return [F.yolo_loss(rc.loss_input(xs[0]), xs[1], self._anchors(rc),
                            reduction="per_sample", **self.options)]

    def backward(self, rc, gouts, saved, need):
        x0, t = saved
        x = rc.loss_input(x0)  # mixed precision: the loss in float, its gradient cast back
        g = rc.loss_scale(x.shape[0], self.reduction, x.device)
        gx = F.yolo_loss_backward(g, x, t, self._anchors(rc), reduction="per_sample",
                                  **self.options)
        if gx.dtype != x0.dtype:
            gx = F.cast(gx, x0.dtype)
        return [gx, None], []
