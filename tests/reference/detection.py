"""Plain numpy float64 references for detection.metal: the YOLO v2 loss (explicit loops over
images, anchors, cells and boxes, from the definition in pymetalnn/ops/detection.py), its gradient
from the per-term derivatives, box decoding, greedy NMS (sort then sweep) and mAP by brute force.

The objectness target (IoU with the assigned box) and the no-object ignore mask are targets, not
functions of the input: `yolo_targets_of(x, ...)` computes them once and `yolo_loss(...,
fixed=...)` holds them fixed, so finite differences of the loss match the gradient definition.
"""
from __future__ import annotations

import numpy as np


def _sig(v: float) -> float:
    return 1.0 / (1.0 + np.exp(-v))


def iou(a, b) -> float:
    """IoU of two corner boxes (x1, y1, x2, y2)."""
    iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    inter = iw * ih
    uni = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / uni if uni > 0 else 0.0


def corners(cx, cy, w, h):
    return (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)


def decode(x: np.ndarray, anchors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """boxes (N, P, 4) and scores (N, P, C), P ordered (anchor, row, column)."""
    x = np.asarray(x, np.float64)
    n, ch, gh, gw = x.shape
    a = len(anchors)
    c = ch // a - 5
    v = x.reshape(n, a, 5 + c, gh, gw)
    boxes = np.zeros((n, a, gh, gw, 4))
    scores = np.zeros((n, a, gh, gw, c))
    for k in range(n):
        for q in range(a):
            for i in range(gh):
                for j in range(gw):
                    t = v[k, q, :, i, j]
                    cx, cy = (j + _sig(t[0])) / gw, (i + _sig(t[1])) / gh
                    w = anchors[q][0] * np.exp(t[2]) / gw
                    h = anchors[q][1] * np.exp(t[3]) / gh
                    boxes[k, q, i, j] = corners(cx, cy, w, h)
                    e = np.exp(t[5:] - t[5:].max())
                    scores[k, q, i, j] = _sig(t[4]) * e / e.sum()
    return boxes.reshape(n, -1, 4), scores.reshape(n, -1, c)


def assignments(tgt: np.ndarray, anchors: np.ndarray, gh: int, gw: int) -> dict:
    """{(image, anchor, row, col): box row} for the used rows, later rows overwriting."""
    out = {}
    for k in range(tgt.shape[0]):
        for b in range(tgt.shape[1]):
            cls, cx, cy, w, h = tgt[k, b]
            if cls == -1:
                continue
            j, i = min(int(cx * gw), gw - 1), min(int(cy * gh), gh - 1)
            bw, bh = w * gw, h * gh
            shape_iou = [min(aw, bw) * min(ah, bh) / (aw * ah + bw * bh - min(aw, bw) * min(ah, bh))
                         for aw, ah in anchors]
            q = int(np.argmax(shape_iou))  # first maximum
            out[(k, q, i, j)] = b
    return out


def yolo_targets_of(x, tgt, anchors, ignore_thresh=0.6, rescore=True) -> dict:
    """The loss's detached targets at x: objectness target per assigned prediction, and whether
    each unassigned prediction's no-object term counts."""
    boxes, _ = decode(x, anchors)
    n, ch, gh, gw = x.shape
    a = len(anchors)
    asg = assignments(tgt, anchors, gh, gw)
    tobj, noobj = {}, {}
    for k in range(n):
        gts = [corners(*tgt[k, b, 1:]) for b in range(tgt.shape[1]) if tgt[k, b, 0] != -1]
        for q in range(a):
            for i in range(gh):
                for j in range(gw):
                    box = boxes[k, (q * gh + i) * gw + j]
                    key = (k, q, i, j)
                    if key in asg:
                        b = asg[key]
                        tobj[key] = iou(box, corners(*tgt[k, b, 1:])) if rescore else 1.0
                    else:
                        best = max([iou(box, g) for g in gts], default=0.0)
                        noobj[key] = best <= ignore_thresh
    return {"asg": asg, "tobj": tobj, "noobj": noobj}


def yolo_loss(x, tgt, anchors, coord_scale=1.0, object_scale=5.0, noobject_scale=1.0,
              class_scale=1.0, ignore_thresh=0.6, rescore=True, fixed=None):
    """Per-image losses (N,) and the gradient of their sum w.r.t. x (float64)."""
    x = np.asarray(x, np.float64)
    tgt = np.asarray(tgt, np.float64)
    fixed = fixed or yolo_targets_of(x, tgt, anchors, ignore_thresh, rescore)
    n, ch, gh, gw = x.shape
    a = len(anchors)
    c = ch // a - 5
    v = x.reshape(n, a, 5 + c, gh, gw)
    g = np.zeros_like(v)
    loss = np.zeros(n)
    for k in range(n):
        for q in range(a):
            aw, ah = anchors[q]
            for i in range(gh):
                for j in range(gw):
                    t = v[k, q, :, i, j]
                    key = (k, q, i, j)
                    so = _sig(t[4])
                    if key not in fixed["asg"]:
                        if fixed["noobj"][key]:
                            loss[k] += noobject_scale * so * so
                            g[k, q, 4, i, j] = noobject_scale * 2 * so * so * (1 - so)
                        continue
                    cls, cx, cy, w, h = tgt[k, fixed["asg"][key]]
                    sx, sy = _sig(t[0]), _sig(t[1])
                    tx, ty = cx * gw - j, cy * gh - i
                    tw, th = np.log(w * gw / aw), np.log(h * gh / ah)
                    sc = coord_scale * (2 - w * h)
                    loss[k] += sc * ((sx - tx) ** 2 + (sy - ty) ** 2 + (t[2] - tw) ** 2
                                     + (t[3] - th) ** 2)
                    g[k, q, 0, i, j] = sc * 2 * (sx - tx) * sx * (1 - sx)
                    g[k, q, 1, i, j] = sc * 2 * (sy - ty) * sy * (1 - sy)
                    g[k, q, 2, i, j] = sc * 2 * (t[2] - tw)
                    g[k, q, 3, i, j] = sc * 2 * (t[3] - th)
                    to = fixed["tobj"][key]
                    loss[k] += object_scale * (so - to) ** 2
                    g[k, q, 4, i, j] = object_scale * 2 * (so - to) * so * (1 - so)
                    logits = t[5:]
                    m = logits.max()
                    lse = m + np.log(np.exp(logits - m).sum())
                    loss[k] += class_scale * (lse - logits[int(cls)])
                    p = np.exp(logits - lse)
                    p[int(cls)] -= 1
                    g[k, q, 5:, i, j] = class_scale * p
    return loss, g.reshape(x.shape)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float,
        score_threshold: float = -np.inf, max_det: int | None = None) -> list[int]:
    """Greedy NMS: sort by score (stable, so ties keep index order), sweep, drop IoU >
    threshold with any kept box."""
    order = [int(i) for i in np.argsort(-np.asarray(scores, np.float64), kind="stable")
             if scores[i] > score_threshold]
    kept: list[int] = []
    for i in order:
        if max_det is not None and len(kept) == max_det:
            break
        if all(iou(boxes[i], boxes[k]) <= iou_threshold for k in kept):
            kept.append(i)
    return kept


def average_precision(det_scores, det_tp, npos) -> float:
    """AP as the sum over each distinct recall step of (recall gain) * (best precision at that
    recall or beyond), computed by brute force over cut-offs."""
    order = np.argsort(-np.asarray(det_scores, np.float64), kind="stable")
    tp = np.asarray(det_tp, np.float64)[order]
    pts = []  # (recall, precision) after each detection
    for r in range(1, len(tp) + 1):
        pts.append((tp[:r].sum() / npos, tp[:r].sum() / r))
    ap, prev = 0.0, 0.0
    for rec, _ in pts:
        if rec > prev:
            best = max(p for r2, p in pts if r2 >= rec)
            ap += (rec - prev) * best
            prev = rec
    return ap
