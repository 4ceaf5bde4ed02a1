"""Detection (kernels/detection.metal): the YOLO v2 loss and its gradient against the float64
numpy reference and finite differences, box decoding, per-class NMS and mAP against numpy
references.

Awkward cases: batch 1, one anchor / one class / a 1x1 grid, a 13x13 grid with more predictions
than a threadgroup, images without objects (all rows unused, and zero rows), two boxes assigned to
the same cell and anchor (the later row wins), boxes touching the image border (centre 0 or 1,
full-width boxes), both storage types, every reduction; NMS with ties, identical boxes, nothing
above the score threshold, max_det 1.
"""
from __future__ import annotations

import numpy as np
import pytest
from example_loader import load_example
from reference import detection as R
from reference._common import finite_difference

import pymetalnn as pm
from pymetalnn import functional as F

ANCHORS3 = np.array([[1.0, 1.5], [2.5, 2.0], [0.7, 0.6]])
ANCHORS5 = np.array([[1.08, 1.19], [3.42, 4.41], [6.63, 11.38], [9.42, 5.11], [16.62, 10.52]])


def _targets(kind: str, n: int, c: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "empty":
        return -np.ones((n, 3, 5), np.float32)
    if kind == "zero_rows":
        return np.zeros((n, 0, 5), np.float32)
    rows = 6
    t = -np.ones((n, rows, 5), np.float32)
    for k in range(n):
        m = rng.integers(1, rows + 1)
        for b in range(m):
            w, h = rng.uniform(0.05, 0.6, 2)
            t[k, b] = [rng.integers(0, c), *rng.uniform(0, 1, 2), w, h]
    if kind == "overlap":  # rows 0 and 1 share cell and shape (same anchor): row 1 wins
        t[:, 1] = t[:, 0]
        t[:, 1, 1] += 1e-3
        t[:, 1, 0] = (t[:, 0, 0] + 1) % c
        t[:, 2, :] = [0, 0.5, 0.5, 0.9, 0.9]  # a large box overlapping the others
    if kind == "border":
        t[:, 0] = [0, 1.0, 1.0, 0.3, 0.2]
        t[:, 1] = [c - 1, 0.0, 0.0, 0.2, 0.4]
        t[:, 2] = [0, 0.5, 1.0, 1.0, 1.0]
    return t


CASES = [  # (N, anchors, C, GH, GW, targets)
    (1, ANCHORS3[:1], 1, 1, 1, "random"),
    (1, ANCHORS3, 4, 5, 6, "random"),
    (2, ANCHORS3, 4, 5, 6, "empty"),
    (2, ANCHORS3, 2, 3, 3, "zero_rows"),
    (3, ANCHORS3, 3, 4, 4, "overlap"),
    (2, ANCHORS3, 5, 7, 5, "border"),
    (1, ANCHORS5, 3, 13, 13, "random"),
]


def _case(case, seed=0, scale=1.0):
    n, anchors, c, gh, gw, kind = case
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, len(anchors) * (5 + c), gh, gw)) * scale).astype(np.float32)
    return x, _targets(kind, n, c, rng), anchors


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{len(c[1])}a{c[2]}c{c[3]}x{c[4]}-{c[5]}")
def test_yolo_loss_matches_reference(dev, case, dtype):
    x, t, anchors = _case(case)
    x = x.astype(dtype)
    xd = pm.tensor(x, dev)
    ref_l, ref_g = R.yolo_loss(x.astype(np.float64), t, anchors)
    rtol = 1e-5 if dtype == np.float32 else 1e-3
    per = F.yolo_loss(xd, t, anchors, reduction="per_sample").numpy()
    np.testing.assert_allclose(per, ref_l, rtol=rtol, atol=1e-5)
    assert F.yolo_loss(xd, t, anchors, reduction="sum").numpy().shape == ()
    np.testing.assert_allclose(F.yolo_loss(xd, t, anchors, reduction="sum").numpy(), ref_l.sum(),
                               rtol=rtol, atol=1e-5)
    np.testing.assert_allclose(F.yolo_loss(xd, t, anchors).numpy(), ref_l.mean(), rtol=rtol,
                               atol=1e-5)
    gtol = dict(rtol=1e-4, atol=1e-5) if dtype == np.float32 else dict(rtol=5e-3, atol=2e-3)
    w = np.linspace(0.5, 2.0, len(x)).astype(np.float32)
    g = F.yolo_loss_backward(w, xd, t, anchors, reduction="per_sample")
    assert g.dtype == dtype and g.shape == x.shape
    np.testing.assert_allclose(g.numpy().astype(np.float64),
                               ref_g * w[:, None, None, None].astype(np.float64), **gtol)
    gm = F.yolo_loss_backward(1.5, xd, t, anchors)  # mean
    np.testing.assert_allclose(gm.numpy().astype(np.float64), ref_g * 1.5 / len(x), **gtol)
    gs = F.yolo_loss_backward(np.float32(0.5), xd, t, anchors, reduction="sum")
    np.testing.assert_allclose(gs.numpy().astype(np.float64), ref_g * 0.5, **gtol)


@pytest.mark.parametrize("rescore", [True, False])
def test_yolo_loss_options(dev, rescore):
    x, t, anchors = _case(CASES[4], seed=3)
    opts = dict(coord_scale=2.0, object_scale=3.0, noobject_scale=0.25, class_scale=0.5,
                ignore_thresh=0.2, rescore=rescore)
    ref_l, ref_g = R.yolo_loss(x, t, anchors, **opts)
    xd = pm.tensor(x, dev)
    np.testing.assert_allclose(F.yolo_loss(xd, t, anchors, reduction="per_sample", **opts).numpy(),
                               ref_l, rtol=1e-5)
    g = F.yolo_loss_backward(np.ones(len(x), np.float32), xd, t, anchors, reduction="per_sample",
                             **opts)
    np.testing.assert_allclose(g.numpy(), ref_g, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", [CASES[1], CASES[4], CASES[5]], ids=["random", "overlap", "border"])
def test_yolo_loss_gradient_finite_differences(dev, case):
    """The kernel's gradient against central differences of the float64 loss with its targets
    (objectness IoU, ignore mask) held at x, as the loss defines them."""
    x, t, anchors = _case(case, seed=7, scale=0.7)
    n = min(len(x), 2)
    x, t = x[:n], t[:n]
    fixed = R.yolo_targets_of(x.astype(np.float64), t, anchors)
    fd = finite_difference(lambda z: R.yolo_loss(z, t, anchors, fixed=fixed)[0].sum(), x)
    g = F.yolo_loss_backward(1.0, pm.tensor(x, dev), t, anchors, reduction="sum").numpy()
    np.testing.assert_allclose(g, fd, rtol=1e-3, atol=1e-4)
    assert np.abs(fd).max() > 0.1  # the check is not vacuous


def test_yolo_targets_checked_once(dev):
    x, t, anchors = _case(CASES[1])
    yt = F.yolo_targets(t, 4, dev)
    xd = pm.tensor(x, dev)
    np.testing.assert_allclose(F.yolo_loss(xd, yt, anchors).numpy(),
                               F.yolo_loss(xd, t, anchors).numpy(), rtol=0)


def test_yolo_loss_errors(dev):
    x, t, anchors = _case(CASES[1])
    xd = pm.tensor(x, dev)
    with pytest.raises(ValueError, match="input: 26 channels"):
        F.yolo_loss(pm.tensor(x[:, :26], dev), t, anchors)
    with pytest.raises(ValueError, match="anchors"):
        F.yolo_loss(xd, t, anchors[:, :1])
    with pytest.raises(ValueError, match="anchors"):
        F.yolo_loss(xd, t, -anchors)
    bad = t.copy()
    bad[0, 0, 0] = 4
    with pytest.raises(ValueError, match="target: class 4.0"):
        F.yolo_loss(xd, bad, anchors)
    bad = t.copy()
    bad[0, 0, 0], bad[0, 0, 3] = 0, 0.0
    with pytest.raises(ValueError, match="widths and heights"):
        F.yolo_loss(xd, bad, anchors)
    bad[0, 0, 3], bad[0, 0, 1] = 0.2, 1.5
    with pytest.raises(ValueError, match="centres"):
        F.yolo_loss(xd, bad, anchors)
    bad[0, 0, 1] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        F.yolo_loss(xd, bad, anchors)
    with pytest.raises(ValueError, match="rows per image"):
        F.yolo_loss(xd, -np.ones((1, 257, 5), np.float32), anchors)
    with pytest.raises(ValueError, match="target: 2 images"):
        F.yolo_loss(xd, np.concatenate([t, t]), anchors)
    with pytest.raises(ValueError, match="reduction"):
        F.yolo_loss(xd, t, anchors, reduction="none")
    with pytest.raises(ValueError, match="grad: expected the loss's shape"):
        F.yolo_loss_backward(np.ones(3, np.float32), xd, t, anchors, reduction="per_sample")
    with pytest.raises(ValueError, match="ignore_thresh"):
        F.yolo_loss(xd, t, anchors, ignore_thresh=1.5)
    with pytest.raises(ValueError, match="input: dtype"):
        F.yolo_loss(pm.tensor(x.astype(np.int32), dev), t, anchors)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_yolo_decode(dev, dtype):
    x, _, anchors = _case(CASES[6], seed=2)
    x = np.concatenate([x, -x]).astype(dtype)
    boxes, scores = F.yolo_decode(pm.tensor(x, dev), anchors)
    rb, rs = R.decode(x.astype(np.float64), anchors)
    assert boxes.shape == (2, 5 * 169, 4) and scores.shape == (2, 5 * 169, 3)
    np.testing.assert_allclose(boxes.numpy(), rb, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores.numpy(), rs, rtol=1e-5, atol=1e-7)


def _random_boxes(rng, n, p):
    xy = rng.uniform(0, 1, (n, p, 2))
    wh = rng.uniform(0.02, 0.4, (n, p, 2))
    return np.concatenate([xy - wh / 2, xy + wh / 2], -1).astype(np.float32)


@pytest.mark.parametrize("n,p,c,iou,thr,max_det", [
    (1, 1, 1, 0.5, 0.0, 10),
    (2, 37, 3, 0.3, 0.2, 100),
    (1, 845, 2, 0.45, 0.05, 50),
    (2, 300, 1, 0.5, 0.0, 1),
    (1, 20, 2, 0.5, 2.0, 5),  # nothing above the threshold
])
def test_multiclass_nms(dev, n, p, c, iou, thr, max_det):
    rng = np.random.default_rng(p)
    boxes = _random_boxes(rng, n, p)
    scores = rng.uniform(0, 1, (n, p, c)).astype(np.float32)
    if p > 3:
        scores[:, 1] = scores[:, 0]  # a tie
        boxes[:, 2] = boxes[:, 0]    # identical boxes (IoU 1)
        scores[:, 3] = np.nan        # never a candidate
    keep, count = F.multiclass_nms(pm.tensor(boxes, dev), pm.tensor(scores, dev), iou,
                                   score_threshold=thr, max_det=max_det)
    k, cnt = keep.numpy(), count.numpy()
    total = 0
    for i in range(n):
        for cc in range(c):
            ref = R.nms(boxes[i].astype(np.float64), scores[i, :, cc], iou, thr, max_det)
            assert list(k[i, cc, :cnt[i, cc]]) == ref
            total += len(ref)
    assert total > 0 or thr > 1


def test_nms_torchvision_form(dev):
    rng = np.random.default_rng(5)
    boxes = _random_boxes(rng, 1, 64)[0]
    scores = rng.uniform(0, 1, 64).astype(np.float32)
    keep = F.nms(pm.tensor(boxes, dev), pm.tensor(scores, dev), 0.4).numpy()
    assert list(keep) == R.nms(boxes.astype(np.float64), scores, 0.4)
    assert F.nms(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), 0.5).shape == (0,)
    with pytest.raises(ValueError, match="boxes/scores"):
        F.nms(boxes, scores[:3], 0.5)
    with pytest.raises(ValueError, match="max_det"):
        F.multiclass_nms(boxes[None], scores[None, :, None], 0.5, max_det=0)
    try:
        import torch
        import torchvision
    except ImportError:
        return
    tv = torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), 0.4).numpy()
    assert list(keep) == list(tv)


def test_yolo_detect_end_to_end(dev):
    """A prediction map built to hold two confident boxes gives those boxes back."""
    a, g = ANCHORS3, 4
    x = np.full((1, 3 * 7, g, g), -8.0, np.float32)
    v = x.reshape(1, 3, 7, g, g)
    v[0, 1, :, 1, 2] = [0, 0, 0, 0, 8, 8, -8]    # anchor 1 at row 1, col 2: class 0
    v[0, 2, :, 3, 0] = [1, -1, 0.2, 0, 8, -8, 8]  # anchor 2 at row 3, col 0: class 1
    dets = F.yolo_detect(pm.tensor(x, dev), a, score_threshold=0.5)[0]
    assert list(dets["labels"]) == [0, 1] or list(dets["labels"]) == [1, 0]
    rb, rs = R.decode(x.astype(np.float64), a)
    for box, lab in zip(dets["boxes"], dets["labels"]):
        q = (1 * g + 1) * g + 2 if lab == 0 else (2 * g + 3) * g + 0
        np.testing.assert_allclose(box, rb[0, q], rtol=1e-5, atol=1e-6)


def _gt_from(rng, n_img, c):
    out = []
    for _ in range(n_img):
        m = rng.integers(0, 4)
        out.append({"boxes": _random_boxes(rng, 1, m)[0], "labels": rng.integers(0, c, m)})
    return out


def test_mean_average_precision():
    rng = np.random.default_rng(11)
    c = 3
    gt = _gt_from(rng, 12, c)
    gt[0] = {"boxes": np.zeros((0, 4)), "labels": np.zeros(0, np.int64)}  # an image with none
    # perfect detections: mAP 1
    perfect = [{"boxes": g["boxes"], "scores": np.ones(len(g["labels"])), "labels": g["labels"]}
               for g in gt]
    m, ap = F.mean_average_precision(perfect, gt, c)
    assert m == pytest.approx(1.0)
    # noisy detections: jittered true boxes, duplicates and false positives with random scores
    dets = []
    for g in gt:
        b = g["boxes"] + rng.normal(0, 0.03, g["boxes"].shape)
        b = np.concatenate([b, b[:1], _random_boxes(rng, 1, 2)[0]])
        lab = np.concatenate([g["labels"], g["labels"][:1], rng.integers(0, c, 2)])
        dets.append({"boxes": b, "scores": rng.uniform(0, 1, len(b)), "labels": lab})
    m, ap = F.mean_average_precision(dets, gt, c)
    # reference: greedy matching in score order, then brute-force AP
    for cc in range(c):
        npos = sum(int((g["labels"] == cc).sum()) for g in gt)
        items = [(s, i, b) for i, d in enumerate(dets)
                 for b, s, lab in zip(d["boxes"], d["scores"], d["labels"]) if lab == cc]
        order = sorted(range(len(items)), key=lambda k: -items[k][0])
        used = {i: set() for i in range(len(gt))}
        tp = np.zeros(len(items))
        for k in order:
            s, i, b = items[k]
            best, bj = -1.0, -1
            for j, (gb, gl) in enumerate(zip(gt[i]["boxes"], gt[i]["labels"])):
                if gl == cc and j not in used[i]:
                    v = R.iou(b, gb)
                    if v > best:
                        best, bj = v, j
            if bj >= 0 and best >= 0.5:
                used[i].add(bj)
                tp[k] = 1
        want = R.average_precision([it[0] for it in items], tp, npos) if npos else np.nan
        if npos:
            assert ap[cc] == pytest.approx(want, abs=1e-12)
        else:
            assert np.isnan(ap[cc])
    assert m == pytest.approx(np.nanmean(ap))
    assert 0 < m < 1
    # no detections at all: 0
    none = [{"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0, int)}
            for _ in gt]
    assert F.mean_average_precision(none, gt, c)[0] == 0.0


@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[4], CASES[5], CASES[6]],
                         ids=["random", "empty", "overlap", "border", "13x13"])
def test_yolo_loss_matches_torch_peer(dev, case):
    """The example's PyTorch implementation (the timing peer) and its autograd gradient agree
    with the kernels: both follow the same definition."""
    torch = pytest.importorskip("torch")
    x, t, anchors = _case(case, seed=4)
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    peer = load_example("object_detection").torch_yolo_loss
    lt = peer(xt, torch.tensor(t, dtype=torch.float64), torch.tensor(anchors, dtype=torch.float64))
    lt.sum().backward()
    xd = pm.tensor(x, dev)
    np.testing.assert_allclose(F.yolo_loss(xd, t, anchors, reduction="per_sample").numpy(),
                               lt.detach().numpy(), rtol=1e-5, atol=1e-5)
    g = F.yolo_loss_backward(1.0, xd, t, anchors, reduction="sum").numpy()
    np.testing.assert_allclose(g, xt.grad.numpy(), rtol=1e-4, atol=1e-5)


def test_yolo_loss_node_trains_like_functional(dev):
    """YoloLossNode in a training graph: its loss and the gradient it sends to a 1x1 conv head
    equal the functional op's (checked through the conv's weight after one SGD step)."""
    from pymetalnn import graph as G
    from pymetalnn import optim

    rng = np.random.default_rng(0)
    a, c = ANCHORS3, 2
    img = rng.standard_normal((2, 4, 3, 3)).astype(np.float32)
    t = _targets("random", 2, c, rng)
    w0 = (rng.standard_normal((3 * 7, 4, 1, 1)) * 0.3).astype(np.float32)
    x = G.ImageNode((4, 3, 3))
    ds = G.ConvolutionDataSource(4, 21, 1, bias=False, init=w0)
    head = G.ConvolutionNode(x, ds, name="head")
    loss = G.YoloLossNode(head, a, max_boxes=t.shape[1])
    tg = G.TrainingGraph(loss, optimizer=lambda p: optim.SGD(p, lr=0.1), device=dev)
    h = tg.encode(img, t)
    out = np.einsum("kc,nchw->nkhw", w0[:, :, 0, 0], img)
    ref_l, ref_g = R.yolo_loss(out, t, a)
    np.testing.assert_allclose(h.losses, ref_l, rtol=1e-4)
    gw = np.einsum("nkhw,nchw->kc", ref_g / 2, img)  # mean over the 2 images
    tg.synchronize()
    w1 = ds.tensors()["weight"].numpy()[:, :, 0, 0]
    np.testing.assert_allclose(w1, w0[:, :, 0, 0] - 0.1 * gw, rtol=1e-4, atol=1e-5)
    bad = t.copy()
    bad[0, 0, 0] = 7
    with pytest.raises(G.GraphError, match="labels: class 7.0"):
        tg.encode(img, bad)
