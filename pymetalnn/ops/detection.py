"""Object detection (detection.metal): the YOLO v2 loss with its fused gradient, box decoding,
greedy non-maximum suppression, and mAP evaluation (host, numpy).

The network output x is (N, A*(5+C), GH, GW) (Darknet's region-layer layout: per anchor tx, ty,
tw, th, objectness, C class logits). A prediction decodes to the box
  cx = (j + sigmoid(tx)) / GW, cy = (i + sigmoid(ty)) / GH,
  w = anchor_w exp(tw) / GW,   h = anchor_h exp(th) / GH        (image-relative, anchors in cells)
with objectness sigmoid(to) and class probabilities softmax(c).

Targets are (N, B, 5) float rows (class, cx, cy, w, h), image-relative, class -1 for an unused
row (images hold different numbers of objects). The loss of one image (Darknet's YOLO v2):
  sum over target boxes b, at the prediction of b's centre cell and best-matching anchor:
      coord_scale (2 - w h) [(sigmoid(tx) - tx*)^2 + (sigmoid(ty) - ty*)^2 + (tw - tw*)^2
                             + (th - th*)^2]
    + object_scale (sigmoid(to) - iou)^2            (iou of the predicted box with b; 1 without
                                                     rescore)
    + class_scale (logsumexp(c) - c_class)          (softmax cross-entropy)
  + sum over the other predictions whose best IoU with the targets is <= ignore_thresh:
      noobject_scale sigmoid(to)^2
where tx* = cx GW - j, tw* = log(w GW / anchor_w) (ty*, th* alike). The objectness target iou and
the ignore test are targets (no gradient through them, as in Darknet). Two boxes with the same
cell and anchor: the later row wins.

reduction: 'per_sample' (N,), 'sum', or 'mean' (the sum / N, the batch mean).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..params import CONST, NmsParams, YoloParams
from ..runtime import Device
from ..tensor import Tensor, TensorLike, float32, int32
from ._common import (
    FLOATS,
    MAX_GROUPS,
    as_tensor,
    boolean,
    cdiv,
    dummy,
    empty,
    kernel,
    number,
    pick_device,
    suffix,
    tensor_arg,
)
from .loss import _MODE, _reduce

SOURCE = "detection.metal"
TG = CONST["TR_TG"]  # threads per threadgroup (the kernels stride by TR_TG: tile_reduce.h)
MAX_BOXES = CONST["YOLO_MAXB"]  # target rows per image (cached in threadgroup memory)
REDUCTIONS = ("per_sample", "sum", "mean")
MAX_ELEMENTS = 2**31 - 1


# ---- validation ------------------------------------------------------------------------------

def _finite(v: Any, name: str, lo: float | None = None, hi: float | None = None) -> float:
    f = number(v, name)
    if not np.isfinite(f) or (lo is not None and f < lo) or (hi is not None and f > hi):
        rng = f" in [{lo}, {hi}]" if hi is not None else f" >= {lo}" if lo is not None else ""
        raise ValueError(f"{name}: expected a finite number{rng}, got {v!r}")
    return f


class YoloAnchors(Tensor):
    """(A, 2) float32 anchors already checked on the host (made by `yolo_anchors`): the ops use
    them without reading them back."""

    def __init__(self, t: Tensor, host: np.ndarray):
        super().__init__(t.buffer, t.shape, t.dtype)
        self.host = host


def _check_anchors(a: np.ndarray) -> np.ndarray:
    if a.dtype.kind not in "fiu" or a.ndim != 2 or a.shape[1] != 2 or len(a) == 0:
        raise ValueError(f"anchors: expected a (A, 2) array of (width, height) in grid cells, got "
                         f"shape {a.shape} dtype {a.dtype}")
    if not (np.isfinite(a).all() and (a > 0).all()):
        raise ValueError("anchors: widths and heights must be finite and > 0")
    return np.ascontiguousarray(a, np.float32)


def yolo_anchors(anchors: TensorLike, device: Device | None = None) -> YoloAnchors:
    """Check (A, 2) anchors (finite widths and heights > 0, in grid cells) once and put them on
    the device; the detection ops then take them without a check (or a read-back)."""
    host = _check_anchors(anchors.numpy() if isinstance(anchors, Tensor) else np.asarray(anchors))
    dev = device or (anchors.device if isinstance(anchors, Tensor) else pick_device())
    return YoloAnchors(as_tensor(host, dev, "anchors"), host)


def _anchors(anchors: Any, dev: Device) -> tuple[Tensor, int]:
    if isinstance(anchors, YoloAnchors) and anchors.device is dev:
        return anchors, anchors.shape[0]
    a = yolo_anchors(anchors, dev)
    return a, a.shape[0]


def _geometry(input: Any, anchors: Any, dev: Device) -> tuple[Tensor, Tensor, int, int]:
    """(x, anchors tensor, A, C) after checking x is (N, A*(5+C), GH, GW)."""
    x = tensor_arg(input, dev, "input", FLOATS, 4)
    if x.size == 0:
        raise ValueError(f"input: empty tensor (shape {x.shape})")
    if x.size > MAX_ELEMENTS:
        raise ValueError(f"input: {x.size} elements exceed the detection kernels' 2^31 - 1")
    at, a = _anchors(anchors, dev)
    ch = x.shape[1]
    if ch % a or ch // a < 6:
        raise ValueError(f"input: {ch} channels is not A*(5+C) with A = {a} anchors and C >= 1 "
                         "classes")
    return x, at, a, ch // a - 5


class YoloTargets(Tensor):
    """(N, B, 5) float32 target rows already checked on the host for `num_classes` classes (made
    by `yolo_targets`): the loss skips its own check, which for a device tensor reads it back."""

    def __init__(self, t: Tensor, num_classes: int):
        super().__init__(t.buffer, t.shape, t.dtype)
        self.num_classes = num_classes


def check_targets(arr: np.ndarray, num_classes: int, name: str = "target") -> np.ndarray:
    """Check (N, B, 5) rows (class, cx, cy, w, h): class -1 (unused row) or an integer in
    [0, num_classes), cx, cy in [0, 1], w, h in (0, 1], all finite. Returns float32 rows."""
    a = np.asarray(arr)
    if a.dtype.kind not in "fiu" or a.ndim != 3 or a.shape[2] != 5:
        raise ValueError(f"{name}: expected (N, B, 5) rows (class, cx, cy, w, h), got shape "
                         f"{a.shape} dtype {a.dtype}")
    if a.shape[1] > MAX_BOXES:
        raise ValueError(f"{name}: {a.shape[1]} rows per image exceed the limit of {MAX_BOXES}")
    a = a.astype(np.float32)
    c = a[..., 0]
    used = c != -1
    if not np.isfinite(a[used]).all():
        raise ValueError(f"{name}: non-finite values in a used row")
    bad = used & ((c < 0) | (c >= num_classes) | (c != np.floor(c)))
    if bad.any():
        raise ValueError(f"{name}: class {float(c[bad][0])!r} is neither -1 (unused row) nor an integer "
                         f"in [0, {num_classes})")
    xy, wh = a[..., 1:3][used], a[..., 3:5][used]
    if ((xy < 0) | (xy > 1)).any():
        raise ValueError(f"{name}: box centres must lie in [0, 1] (image-relative)")
    if ((wh <= 0) | (wh > 1)).any():
        raise ValueError(f"{name}: box widths and heights must lie in (0, 1] (image-relative)")
    return np.ascontiguousarray(a)


def yolo_targets(target: TensorLike, num_classes: int, device: Device | None = None) -> YoloTargets:
    """Check target rows once (see check_targets) and put them on the device; the loss then
    uses them without a second check. They must not be modified afterwards."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) \
            or num_classes < 1:
        raise ValueError(f"num_classes: expected an int >= 1, got {num_classes!r}")
    arr = target.numpy() if isinstance(target, Tensor) else target
    dev = device or (target.device if isinstance(target, Tensor) else pick_device())
    a = check_targets(arr, int(num_classes))
    t = target if isinstance(target, Tensor) and target.dtype == float32 and target.device is dev \
        else as_tensor(a, dev, "target")
    return YoloTargets(t, int(num_classes))


def _targets(target: Any, x: Tensor, c: int, dev: Device) -> Tensor:
    if isinstance(target, YoloTargets) and target.num_classes == c:
        if target.device is not dev:
            raise ValueError(f"target: tensor is on {target.device.name}, expected {dev.name}")
        t = target
    else:
        t = yolo_targets(target, c, dev)
    if t.shape[0] != x.shape[0]:
        raise ValueError(f"target: {t.shape[0]} images, input has {x.shape[0]}")
    return t


def _options(coord_scale: Any, object_scale: Any, noobject_scale: Any, class_scale: Any,
             ignore_thresh: Any, rescore: Any) -> dict[str, Any]:
    return dict(coord_scale=_finite(coord_scale, "coord_scale", 0.0),
                object_scale=_finite(object_scale, "object_scale", 0.0),
                noobject_scale=_finite(noobject_scale, "noobject_scale", 0.0),
                class_scale=_finite(class_scale, "class_scale", 0.0),
                ignore_thresh=_finite(ignore_thresh, "ignore_thresh", 0.0, 1.0),
                rescore=int(boolean(rescore, "rescore")))


def _check_reduction(reduction: Any) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: {reduction!r} is not one of {', '.join(REDUCTIONS)}")
    return reduction


def _yolo_args(input: Any, target: Any, anchors: Any, reduction: Any, scales: tuple
               ) -> tuple[str, Device, Tensor, Tensor, Tensor, dict[str, Any]]:
    """yolo_loss's and its backward's checked arguments: the reduction, the device, x, the
    anchors and the targets as tensors, and the YoloParams fields both kernels read."""
    reduction = _check_reduction(reduction)
    dev = pick_device(input, target)
    x, at, a, c = _geometry(input, anchors, dev)
    opts = _options(*scales)
    t = _targets(target, x, c, dev)
    n, _, gh, gw = x.shape
    return reduction, dev, x, at, t, dict(N=n, A=a, C=c, GH=gh, GW=gw, B=t.shape[1], **opts)


# ---- YOLO v2 loss ------------------------------------------------------------------------------

def yolo_loss(input: TensorLike, target: TensorLike, anchors: TensorLike, *, coord_scale: float = 1.0,
              object_scale: float = 5.0, noobject_scale: float = 1.0, class_scale: float = 1.0,
              ignore_thresh: float = 0.6, rescore: bool = True, reduction: str = "mean") -> Tensor:
    """The YOLO v2 loss (module docstring) of raw network output `input` (N, A*(5+C), GH, GW),
    float32 or float16, against `target` (N, B, 5) rows (class, cx, cy, w, h) with class -1
    for unused rows, for `anchors` (A, 2) in grid cells. Returns float32: (N,) per_sample, else a
    scalar."""
    reduction, dev, x, at, t, fields = _yolo_args(input, target, anchors, reduction, (
        coord_scale, object_scale, noobject_scale, class_scale, ignore_thresh, rescore))
    n = x.shape[0]
    p = YoloParams(**fields)
    per = empty((n,), float32, dev)
    kernel(dev, SOURCE, f"yolo_loss_fwd_{suffix(x.dtype)}")(
        min(n, MAX_GROUPS) * TG, x.buffer, t.buffer if t.size else dummy(dev), at.buffer,
        per.buffer, p)
    if reduction == "per_sample":
        return per
    # the sum of the per-sample losses, or for "mean" the sum / N (loss.metal's "batchmean" mode)
    mode = _MODE["batchmean" if reduction == "mean" else "sum"]
    return _reduce(dev, per, dummy(dev), 1, n, mode, float(n), ())


def yolo_loss_backward(grad: TensorLike, input: TensorLike, target: TensorLike, anchors: TensorLike, *,
                       coord_scale: float = 1.0, object_scale: float = 5.0,
                       noobject_scale: float = 1.0, class_scale: float = 1.0,
                       ignore_thresh: float = 0.6, rescore: bool = True,
                       reduction: str = "mean") -> Tensor:
    """d(sum grad * yolo_loss)/d input, in input's dtype. grad: (N,) for per_sample, else one
    value. Per prediction: the coordinate terms' 2 scale (s - t*) s (1 - s) for x, y and
    2 scale (t - t*) for w, h; objectness 2 scale (sigma - target) sigma (1 - sigma); classes
    class_scale (softmax - onehot); zero for the channels a prediction's terms do not read."""
    reduction, dev, x, at, t, fields = _yolo_args(input, target, anchors, reduction, (
        coord_scale, object_scale, noobject_scale, class_scale, ignore_thresh, rescore))
    n = x.shape[0]
    g = _grad(grad, dev, (n,) if reduction == "per_sample" else ())
    p = YoloParams(gmode=int(reduction == "per_sample"),
                   gscale=1.0 / n if reduction == "mean" else 1.0, **fields)
    dx = empty(x.shape, x.dtype, dev)
    kernel(dev, SOURCE, f"yolo_loss_bwd_{suffix(x.dtype)}")(
        min(n, MAX_GROUPS) * TG, g.buffer, x.buffer, t.buffer if t.size else dummy(dev),
        at.buffer, dx.buffer, p)
    return dx


def _grad(grad: Any, dev: Device, shape: tuple[int, ...]) -> Tensor:
    if shape == () and isinstance(grad, (int, float, np.integer, np.floating)) \
            and not isinstance(grad, bool):
        return as_tensor(np.array([grad], np.float32), dev, "grad")
    if not isinstance(grad, Tensor):
        arr = np.asarray(grad)
        if arr.dtype.kind not in "fiu":
            raise ValueError(f"grad: expected numbers, got dtype {arr.dtype}")
        grad = arr.astype(np.float32)
    g = tensor_arg(grad, dev, "grad", (float32,))
    if shape == () and g.size != 1:
        raise ValueError(f"grad: the loss is a scalar, expected one value, got shape {g.shape}")
    if shape != () and g.shape != shape:
        raise ValueError(f"grad: expected the loss's shape {shape}, got {g.shape}")
    return g


# ---- decoding and NMS ------------------------------------------------------------------------

def yolo_decode(input: TensorLike, anchors: TensorLike) -> tuple[Tensor, Tensor]:
    """Boxes and scores of every prediction: boxes (N, P, 4) corners (x1, y1, x2, y2),
    image-relative, and scores (N, P, C) = sigmoid(to) softmax(c), float32, with
    P = A GH GW ordered (anchor, row, column)."""
    dev = pick_device(input)
    x, at, a, c = _geometry(input, anchors, dev)
    n, _, gh, gw = x.shape
    P = a * gh * gw
    if n * P * c > MAX_ELEMENTS:
        raise ValueError(f"input: {n * P * c} scores exceed the detection kernels' 2^31 - 1")
    boxes = empty((n, P, 4), float32, dev)
    scores = empty((n, P, c), float32, dev)
    p = YoloParams(N=n, A=a, C=c, GH=gh, GW=gw)
    groups = min(cdiv(n * P, TG), MAX_GROUPS)
    kernel(dev, SOURCE, f"yolo_decode_fwd_{suffix(x.dtype)}")(
        groups * TG, x.buffer, at.buffer, boxes.buffer, scores.buffer, p)
    return boxes, scores


def multiclass_nms(boxes: TensorLike, scores: TensorLike, iou_threshold: float, *,
                   score_threshold: float = 0.0, max_det: int = 100) -> tuple[Tensor, Tensor]:
    """Greedy NMS per image and class: boxes (N, P, 4) corners, scores (N, P, C). For each (n, c),
    among the predictions with score > score_threshold, repeatedly keep the highest score
    (lowest index on ties) and drop the rest whose IoU with it is > iou_threshold, up to
    max_det. Returns (keep (N, C, max_det) int32 prediction indices in descending score,
    entries past count undefined; count (N, C) int32)."""
    dev = pick_device(boxes, scores)
    b = tensor_arg(boxes, dev, "boxes", (float32,), 3)
    s = tensor_arg(scores, dev, "scores", (float32,), 3)
    if b.shape[2] != 4:
        raise ValueError(f"boxes: expected (N, P, 4) corners, got {b.shape}")
    if s.shape[:2] != b.shape[:2]:
        raise ValueError(f"scores: shape {s.shape} does not match boxes' (N, P) {b.shape[:2]}")
    if b.buffer.offset % 16:
        raise ValueError(f"boxes: the kernel reads float4 boxes; a view at byte offset "
                         f"{b.buffer.offset} is not 16-byte aligned (pass a copy)")
    n, P, c = s.shape
    if isinstance(max_det, bool) or not isinstance(max_det, (int, np.integer)) or max_det < 1:
        raise ValueError(f"max_det: expected an int >= 1, got {max_det!r}")
    it = _finite(iou_threshold, "iou_threshold", 0.0, 1.0)
    st = number(score_threshold, "score_threshold")
    if np.isnan(st):
        raise ValueError("score_threshold: NaN")
    if n * c * max(P, int(max_det)) > MAX_ELEMENTS or P == 0 or c == 0:
        raise ValueError(f"scores: shape {s.shape} with max_det {max_det} is empty or exceeds "
                         "2^31 - 1 elements")
    keep = empty((n, c, int(max_det)), int32, dev)
    count = empty((n, c), int32, dev)
    work = dev.buffer(4 * n * c * P, zero=False)
    p = NmsParams(N=n, C=c, P=P, max_det=int(max_det), iou_thresh=it,
                  score_thresh=max(st, -3.4e38))
    kernel(dev, SOURCE, "nms_fwd_float")(min(n * c, MAX_GROUPS) * TG, b.buffer, s.buffer, work,
                                         keep.buffer, count.buffer, p)
    return keep, count


def nms(boxes: TensorLike, scores: TensorLike, iou_threshold: float) -> Tensor:
    """torchvision.ops.nms: boxes (K, 4) corners, scores (K,); the indices (int32) of the boxes
    kept, in decreasing score. Reads the count back (a queue synchronization)."""
    dev = pick_device(boxes, scores)
    b = tensor_arg(boxes, dev, "boxes", (float32,), 2)
    s = tensor_arg(scores, dev, "scores", (float32,), 1)
    if b.shape[1:] != (4,) or s.shape[0] != b.shape[0]:
        raise ValueError(f"boxes/scores: expected (K, 4) and (K,), got {b.shape} and {s.shape}")
    k = b.shape[0]
    if k == 0:
        return as_tensor(np.zeros(0, np.int32), dev, "keep")
    keep, count = multiclass_nms(b.reshape((1, k, 4)), s.reshape((1, k, 1)), iou_threshold,
                                 score_threshold=-np.inf, max_det=k)
    m = int(count.numpy()[0, 0])
    return as_tensor(keep.numpy()[0, 0, :m].copy(), dev, "keep")


def yolo_detect(input: TensorLike, anchors: TensorLike, *, score_threshold: float = 0.05,
                iou_threshold: float = 0.45, max_det: int = 100) -> list[dict[str, np.ndarray]]:
    """Detections per image: decode (yolo_decode), per-class NMS (multiclass_nms), then the
    max_det highest scores over all classes. A list of N dicts of numpy arrays: boxes (K, 4)
    corners, scores (K,), labels (K,) int32, in decreasing score."""
    boxes, scores = yolo_decode(input, anchors)
    keep, count = multiclass_nms(boxes, scores, iou_threshold, score_threshold=score_threshold,
                                 max_det=max_det)
    b, s, k, cnt = boxes.numpy(), scores.numpy(), keep.numpy(), count.numpy()
    out = []
    for i in range(b.shape[0]):
        idx = [(int(q), c) for c in range(s.shape[2]) for q in k[i, c, :cnt[i, c]]]
        if idx:
            q = np.array([t[0] for t in idx], np.int64)
            lab = np.array([t[1] for t in idx], np.int32)
            sc = s[i, q, lab]
            order = np.argsort(-sc, kind="stable")[:max_det]
            out.append({"boxes": b[i, q[order]], "scores": sc[order], "labels": lab[order]})
        else:
            out.append({"boxes": np.zeros((0, 4), np.float32),
                        "scores": np.zeros(0, np.float32), "labels": np.zeros(0, np.int32)})
    return out


# ---- evaluation (host) -----------------------------------------------------------------------

def box_iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of a (K, 4) with every box of b (M, 4), corners; 0 for empty unions."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    iw = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]),
                 0, None)
    ih = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]),
                 0, None)
    inter = iw * ih
    area = lambda z: (z[:, 2] - z[:, 0]) * (z[:, 3] - z[:, 1])  # noqa: E731
    uni = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(uni > 0, inter / np.where(uni > 0, uni, 1), 0.0)


def mean_average_precision(detections: list[dict[str, np.ndarray]],
                           ground_truth: list[dict[str, np.ndarray]], num_classes: int,
                           iou_threshold: float = 0.5) -> tuple[float, np.ndarray]:
    """mAP@iou_threshold (PASCAL VOC's all-point interpolation). detections[i]: boxes (K, 4),
    scores (K,), labels (K,) of image i; ground_truth[i]: boxes (M, 4), labels (M,).

    Per class: detections of all images in decreasing score (stable order on ties) are matched
    greedily to the unmatched ground-truth box of the same image and class of highest IoU, a true
    positive when that IoU >= iou_threshold; AP is the area under the precision-recall curve with
    precision made monotone (p(r) = max precision at recall >= r). mAP averages the classes that
    have ground truth. Returns (mAP, AP per class, NaN where a class has no ground truth)."""
    if len(detections) != len(ground_truth):
        raise ValueError(f"detections: {len(detections)} images, ground_truth has "
                         f"{len(ground_truth)}")
    ap = np.full(num_classes, np.nan)
    for c in range(num_classes):
        gts = [np.asarray(g["boxes"])[np.asarray(g["labels"]) == c] for g in ground_truth]
        npos = sum(len(g) for g in gts)
        if npos == 0:
            continue
        img, sc, bx = [], [], []
        for i, d in enumerate(detections):
            m = np.asarray(d["labels"]) == c
            img += [i] * int(m.sum())
            sc.append(np.asarray(d["scores"], np.float64)[m])
            bx.append(np.asarray(d["boxes"], np.float64).reshape(-1, 4)[m])
        scores = np.concatenate(sc) if sc else np.zeros(0)
        boxes = np.concatenate(bx) if bx else np.zeros((0, 4))
        order = np.argsort(-scores, kind="stable")
        used = [np.zeros(len(g), bool) for g in gts]
        tp = np.zeros(len(order))
        for r, k in enumerate(order):
            i = img[k]
            if len(gts[i]) == 0:
                continue
            ious = box_iou_matrix(boxes[k:k + 1], gts[i])[0]
            ious[used[i]] = -1.0
            j = int(np.argmax(ious))
            if ious[j] >= iou_threshold:
                used[i][j] = True
                tp[r] = 1
        ctp = np.cumsum(tp)
        recall = ctp / npos
        precision = ctp / np.arange(1, len(tp) + 1)
        mrec = np.concatenate([[0.0], recall, [1.0]])
        mpre = np.concatenate([[0.0], precision, [0.0]])
        mpre = np.maximum.accumulate(mpre[::-1])[::-1]
        ap[c] = float(np.sum((mrec[1:] - mrec[:-1]) * mpre[1:]))
    valid = ~np.isnan(ap)
    return (float(ap[valid].mean()) if valid.any() else float("nan")), ap
