"""An object detector in the style of Turi Create's (TinyYOLO v2 body, YOLO v2 loss), trained with
pymetalnn.graph on a synthetic shapes set, evaluated by mAP@0.5 on held-out images.

Network: five [3x3 conv -> batch norm -> leaky ReLU(0.1) -> 2x2 max pool] stages (16, 32, 64, 128,
256 channels), two 3x3 conv + batch norm + leaky ReLU of 512, a 1x1 conv to A*(5+C) channels: a
13x13 grid at 416x416, 5 anchors (k-means of the training boxes, 1 - IoU distance, as YOLO v2).
Loss: functional.yolo_loss through G.YoloLossNode (fused .metal forward and gradient). Detection:
yolo_decode + multiclass_nms kernels, then mean_average_precision on the held-out split.
Data: datasets.synthetic_detection (circles, squares, triangles; 1-4 per image, overlapping,
random colours on noisy gradients); horizontal flips while training.

When torch imports, the same network and loss in PyTorch eager (torch_yolo_loss below) are
timed on the same device kind in the same run (images/s of training steps), after ours.

    PYTHONPATH=. python examples/object_detection.py --backend cuda            # full: 416, 13x13
    PYTHONPATH=. python examples/object_detection.py --backend cpu --size 128 --width 0.25 \\
        --train 600 --test 150 --epochs 30                                      # a cpu-sized run
    PYTHONPATH=. python examples/object_detection.py --smoke                    # CI: a few steps
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

import pymetalnn as pm  # noqa: E402
from pymetalnn import datasets, optim  # noqa: E402
from pymetalnn import functional as F  # noqa: E402
from pymetalnn import graph as G  # noqa: E402

CLASSES = datasets.SHAPES
STAGES = (16, 32, 64, 128, 256)  # each followed by a 2x2 max pool: stride 32
TOP = (512, 512)
LOSS_OPTS = dict(coord_scale=1.0, object_scale=5.0, noobject_scale=1.0, class_scale=1.0,
                 ignore_thresh=0.6, rescore=True)


def anchor_kmeans(boxes: np.ndarray, k: int, grid: int, iters: int = 50) -> np.ndarray:
    """YOLO v2's anchors: k-means of the used rows' (w, h) with distance 1 - IoU (boxes sharing a
    corner), deterministic start (quantiles of the area); (k, 2) in grid cells, by area."""
    wh = boxes[boxes[..., 0] >= 0][:, 3:5].astype(np.float64)
    order = np.argsort(wh[:, 0] * wh[:, 1])
    cent = wh[order[((np.arange(k) + 0.5) / k * len(wh)).astype(int)]]
    for _ in range(iters):
        inter = np.minimum(wh[:, None, 0], cent[None, :, 0]) * np.minimum(wh[:, None, 1], cent[None, :, 1])
        iou = inter / (wh[:, None].prod(-1) + cent[None].prod(-1) - inter)
        a = iou.argmax(1)
        new = np.array([wh[a == j].mean(0) if (a == j).any() else cent[j] for j in range(k)])
        if np.allclose(new, cent):
            break
        cent = new
    cent = cent[np.argsort(cent.prod(-1))]
    return (cent * grid).astype(np.float32)


def channels(width: float) -> tuple[list[int], list[int]]:
    return [max(int(c * width), 4) for c in STAGES], [max(int(c * width), 8) for c in TOP]


def tiny_yolo(size: int, anchors: np.ndarray, num_classes: int, width: float = 1.0,
              max_boxes: int = 4, seed: int = 0) -> tuple[G.ImageNode, Any, G.YoloLossNode]:
    """(input node, head node (N, A*(5+C), size/32, size/32), loss node)."""
    stages, top = channels(width)
    x = G.ImageNode((3, size, size), name="image")
    h: Any = x
    cin, s = 3, seed

    def block(h: Any, cin: int, cout: int, name: str, s: int) -> Any:
        h = G.ConvolutionNode(h, G.ConvolutionDataSource(cin, cout, 3, bias=False, seed=s),
                              name=f"{name}.conv")
        h = G.BatchNormalizationNode(h, G.NormalizationDataSource(cout), name=f"{name}.bn")
        return G.LeakyReLUNode(h, negative_slope=0.1, name=f"{name}.act")

    for i, c in enumerate(stages):
        h = G.PoolingMaxNode(block(h, cin, c, f"s{i}", s), 2, name=f"s{i}.pool")
        cin, s = c, s + 1
    for i, c in enumerate(top):
        h = block(h, cin, c, f"top{i}", s)
        cin, s = c, s + 1
    out = len(anchors) * (5 + num_classes)
    head = G.ConvolutionNode(h, G.ConvolutionDataSource(cin, out, 1, seed=s), name="head")
    loss = G.YoloLossNode(head, anchors, max_boxes=max_boxes, name="yolo", **LOSS_OPTS)
    return x, head, loss


def flip(x: np.ndarray, b: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Horizontal flips of the images where mask (boxes: cx -> 1 - cx; triangles are symmetric)."""
    x, b = x.copy(), b.copy()
    x[mask] = x[mask][..., ::-1]
    used = (b[..., 0] >= 0) & mask[:, None]
    b[..., 1] = np.where(used, 1.0 - b[..., 1], b[..., 1])
    return x, b


def to_float(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) * np.float32(1 / 255)


def ground_truth(boxes: np.ndarray) -> list[dict[str, np.ndarray]]:
    out = []
    for rows in boxes:
        r = rows[rows[:, 0] >= 0]
        c = np.stack([r[:, 1] - r[:, 3] / 2, r[:, 2] - r[:, 4] / 2, r[:, 1] + r[:, 3] / 2,
                      r[:, 2] + r[:, 4] / 2], 1) if len(r) else np.zeros((0, 4))
        out.append({"boxes": c, "labels": r[:, 0].astype(np.int32)})
    return out


def evaluate(inf: G.Graph, x: np.ndarray, boxes: np.ndarray, anchors: np.ndarray, dev: Any,
             batch: int = 32) -> tuple[float, np.ndarray, list[dict[str, np.ndarray]]]:
    dets = []
    for i in range(0, len(x), batch):
        head = inf(to_float(x[i:i + batch]))
        dets += F.yolo_detect(pm.tensor(head, dev), anchors, score_threshold=0.005,
                              iou_threshold=0.45, max_det=50)
    m, ap = F.mean_average_precision(dets, ground_truth(boxes), len(CLASSES), 0.5)
    return m, ap, dets


def detections_png(path: str, x: np.ndarray, dets: list[dict[str, np.ndarray]],
                   cols: int = 4, thresh: float = 0.3) -> None:
    """Test images with their detections (score > thresh) outlined, a colour per class."""
    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 80, 255]], np.uint8)
    n, _, h, w = x.shape
    rows = -(-n // cols)
    canvas = np.zeros((rows * h, cols * w, 3), np.uint8)
    for k in range(n):
        img = x[k].transpose(1, 2, 0).copy()
        d = dets[k]
        for b, s, lab in zip(d["boxes"], d["scores"], d["labels"]):
            if s < thresh:
                continue
            x0, y0, x1, y1 = np.clip((b * [w, h, w, h]).round().astype(int), 0, [w - 1, h - 1] * 2)
            col = colours[int(lab) % 3]
            img[y0:y1 + 1, [x0, x1]] = col
            img[[y0, y1], x0:x1 + 1] = col
        r, c = divmod(k, cols)
        canvas[r * h:(r + 1) * h, c * w:(c + 1) * w] = img
    _common.write_png(path, canvas)


# ---- the PyTorch eager peer -----------------------------------------------------------------------

def torch_yolo_loss(out: Any, target: Any, anchors: Any, coord_scale: float = 1.0,
                    object_scale: float = 5.0, noobject_scale: float = 1.0,
                    class_scale: float = 1.0, ignore_thresh: float = 0.6, rescore: bool = True) -> Any:
    """The YOLO v2 loss of pymetalnn.ops.detection in torch ops (per-image losses (N,)):
    vectorized, the objectness target and ignore mask detached, the last box winning a shared
    (cell, anchor) through scatter_reduce(amax)."""
    import torch

    n, ch, gh, gw = out.shape
    a = anchors.shape[0]
    c = ch // a - 5
    v = out.float().view(n, a, 5 + c, gh, gw)
    sx, sy, tw, th = torch.sigmoid(v[:, :, 0]), torch.sigmoid(v[:, :, 1]), v[:, :, 2], v[:, :, 3]
    conf = torch.sigmoid(v[:, :, 4])
    jj = torch.arange(gw, device=out.device, dtype=torch.float32).view(1, 1, 1, gw)
    ii = torch.arange(gh, device=out.device, dtype=torch.float32).view(1, 1, gh, 1)
    aw, ah = anchors[:, 0].view(1, a, 1, 1), anchors[:, 1].view(1, a, 1, 1)
    with torch.no_grad():
        cx, cy = (jj + sx) / gw, (ii + sy) / gh
        w, h = aw * torch.exp(tw) / gw, ah * torch.exp(th) / gh
        pred = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1).view(n, -1, 4)
        valid = target[..., 0] >= 0                                    # (n, B)
        t = target
        gt = torch.stack([t[..., 1] - t[..., 3] / 2, t[..., 2] - t[..., 4] / 2,
                          t[..., 1] + t[..., 3] / 2, t[..., 2] + t[..., 4] / 2], -1)

        def iou(p, q):  # (..., 4) x (..., 4) broadcast
            iw = (torch.minimum(p[..., 2], q[..., 2]) - torch.maximum(p[..., 0], q[..., 0])).clamp(min=0)
            ih = (torch.minimum(p[..., 3], q[..., 3]) - torch.maximum(p[..., 1], q[..., 1])).clamp(min=0)
            inter = iw * ih
            uni = (p[..., 2] - p[..., 0]) * (p[..., 3] - p[..., 1]) \
                + (q[..., 2] - q[..., 0]) * (q[..., 3] - q[..., 1]) - inter
            return torch.where(uni > 0, inter / uni.clamp(min=1e-30), torch.zeros_like(inter))

        ious = iou(pred[:, :, None], gt[:, None])                        # (n, P, B)
        ious = torch.where(valid[:, None], ious, torch.zeros_like(ious))
        best = ious.max(-1).values if ious.shape[-1] else torch.zeros_like(pred[..., 0])
        # assignment: centre cell and best-shape anchor, the last row winning
        bw, bh = t[..., 3] * gw, t[..., 4] * gh
        aw1, ah1 = aw.view(1, 1, a), ah.view(1, 1, a)
        inter = torch.minimum(aw1, bw[..., None]) * torch.minimum(ah1, bh[..., None])
        shape_iou = inter / (aw1 * ah1 + (bw * bh)[..., None] - inter)
        anc = shape_iou.argmax(-1)                                       # first maximum
        j = (t[..., 1] * gw).long().clamp(max=gw - 1)
        i = (t[..., 2] * gh).long().clamp(max=gh - 1)
        P = a * gh * gw
        q = (anc * gh + i) * gw + j + torch.arange(n, device=out.device).view(n, 1) * P
        rowid = torch.arange(t.shape[1], device=out.device).expand(n, -1)
        owner = torch.full((n * P,), -1, dtype=torch.long, device=out.device)
        owner.scatter_reduce_(0, q[valid], rowid[valid], reduce="amax")
        owner = owner.view(n, a, gh, gw)
        resp = owner >= 0
        rows = torch.gather(t, 1, owner.clamp(min=0).view(n, -1, 1).expand(-1, -1, 5)).view(n, a, gh, gw, 5)
        tx, ty = rows[..., 1] * gw - jj, rows[..., 2] * gh - ii
        twt = torch.log(rows[..., 3].clamp(min=1e-12) * gw / aw)
        tht = torch.log(rows[..., 4].clamp(min=1e-12) * gh / ah)
        sc = coord_scale * (2 - rows[..., 3] * rows[..., 4])
        gtc = torch.stack([rows[..., 1] - rows[..., 3] / 2, rows[..., 2] - rows[..., 4] / 2,
                           rows[..., 1] + rows[..., 3] / 2, rows[..., 2] + rows[..., 4] / 2], -1)
        tobj = iou(pred.view(n, a, gh, gw, 4), gtc) if rescore else torch.ones_like(sx)
        noobj = (~resp) & (best.view(n, a, gh, gw) <= ignore_thresh)
    zero = torch.zeros_like(sx)
    coord = sc * ((sx - tx) ** 2 + (sy - ty) ** 2 + (tw - twt) ** 2 + (th - tht) ** 2)
    obj = object_scale * (conf - tobj) ** 2
    logits = v[:, :, 5:].permute(0, 1, 3, 4, 2)
    ce = torch.logsumexp(logits, -1) - torch.gather(
        logits, -1, rows[..., 0].clamp(min=0).long()[..., None])[..., 0]
    pos = torch.where(resp, coord + obj + class_scale * ce, zero)
    neg = torch.where(noobj, noobject_scale * conf * conf, zero)
    return (pos + neg).flatten(1).sum(1)


def torch_tiny_yolo(anchors: np.ndarray, num_classes: int, width: float) -> Any:
    import torch.nn as nn

    stages, top = channels(width)
    layers: list[Any] = []
    cin = 3
    for i, c in enumerate(stages + top):
        layers += [nn.Conv2d(cin, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
                   nn.LeakyReLU(0.1)]
        if i < len(stages):
            layers.append(nn.MaxPool2d(2))
        cin = c
    layers.append(nn.Conv2d(cin, len(anchors) * (5 + num_classes), 1))
    return nn.Sequential(*layers)


def time_torch(args: argparse.Namespace, dev: Any, x: np.ndarray, b: np.ndarray,
               anchors: np.ndarray, steps: int) -> dict[str, Any] | None:
    try:
        import torch
    except ImportError:
        return None
    want_cuda = dev.name.startswith("cuda") or "cuda" in str(dev.name).lower()
    tdev = torch.device("cuda" if want_cuda and torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    net = torch_tiny_yolo(anchors, len(CLASSES), args.width).to(tdev)
    # --precision mixed: what a PyTorch user runs for speed, AMP (float16 autocast, dynamic loss
    # scaling) with channels-last activations, the loss in float32 as ours; float32 otherwise
    # (PyTorch's defaults: TF32 convolutions on GPUs that have it)
    amp = args.precision == "mixed"
    if amp:
        net = net.to(memory_format=torch.channels_last)
    scaler = torch.amp.GradScaler(tdev.type, enabled=amp)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    at = torch.tensor(anchors, device=tdev)
    rng = np.random.default_rng(1)

    def batch():
        idx = rng.integers(0, len(x), args.batch)
        return (torch.from_numpy(to_float(x[idx])).to(tdev), torch.from_numpy(b[idx]).to(tdev))

    def step(xb, bb):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(tdev.type, dtype=torch.float16, enabled=amp):
            out = net(xb.contiguous(memory_format=torch.channels_last) if amp else xb)
        loss = torch_yolo_loss(out.float(), bb, at, **LOSS_OPTS).mean()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return loss

    sync = torch.cuda.synchronize if tdev.type == "cuda" else (lambda: None)
    data = [batch() for _ in range(steps)]
    for xb, bb in data[:3]:
        step(xb, bb)
    sync()
    t0 = time.perf_counter()
    for xb, bb in data:
        loss = step(xb, bb)
    sync()
    dt = time.perf_counter() - t0
    return {"device": str(tdev), "images_per_s": steps * args.batch / dt, "loss": float(loss.detach()),
            "precision": "AMP float16, channels-last" if amp else "float32"}


def time_ours(tg: G.TrainingGraph, x: np.ndarray, b: np.ndarray, batch: int, steps: int) -> float:
    """Training images/s over `steps` steps of a warm graph, the batches already on the device
    (as the PyTorch peer's), so neither side times host-side conversion or transfers."""
    rng = np.random.default_rng(1)
    data = []
    for _ in range(steps):
        idx = rng.integers(0, len(x), batch)
        data.append((tg.bind(to_float(x[idx])), tg.labels(b[idx])))
    tg.encode(*data[0])
    tg.synchronize()
    t0 = time.perf_counter()
    for xb, bb in data:
        tg.encode(xb, bb)
    tg.synchronize()
    return steps * batch / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default=None, help="cpu, cuda or metal (default: the best here)")
    ap.add_argument("--size", type=int, default=416, help="image side (a multiple of 32)")
    ap.add_argument("--train", type=int, default=2000, help="training images")
    ap.add_argument("--test", type=int, default=300, help="held-out images")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--width", type=float, default=1.0, help="channel width multiplier")
    ap.add_argument("--max-objects", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target", type=float, default=None, help="stop once held-out mAP reaches it")
    ap.add_argument("--eval-every", type=int, default=5, help="epochs between held-out mAPs")
    ap.add_argument("--torch", choices=("auto", "on", "off"), default="auto",
                    help="time the PyTorch eager peer (auto: when torch imports, not in --smoke)")
    ap.add_argument("--time-steps", type=int, default=30, help="steps of the timing comparison")
    ap.add_argument("--out", default="results/detection", help="folder for the model and PNG")
    ap.add_argument("--smoke", action="store_true", help="10 steps on 8 images at 64x64 on cpu; "
                    "asserts that the loss goes down")
    ap.add_argument("--precision", choices=("float32", "mixed"), default="float32",
                    help="mixed: float16 activations and math, float32 master weights, dynamic "
                    "loss scaling (the YOLO loss in float32)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.smoke:
        args.backend = args.backend or "cpu"
        args.size, args.width = 64, min(args.width, 0.25)
        args.train, args.test, args.batch = 8, 8, 4  # a few images seen again: the loss must fall
        args.epochs, args.eval_every = 5, 5
        args.time_steps = min(args.time_steps, 1)
    if args.size % 32:
        raise SystemExit(f"--size {args.size}: must be a multiple of 32")
    dev = pm.device(args.backend)
    grid = args.size // 32
    t0 = time.perf_counter()
    (xtr, btr), (xte, bte) = datasets.synthetic_detection(args.train, args.test, args.size,
                                                          args.seed, args.max_objects)
    anchors = anchor_kmeans(btr, 5, grid)
    print(f"device: {dev.name}; data: {len(xtr)} train / {len(xte)} held-out {args.size}x"
          f"{args.size} images ({time.perf_counter() - t0:.1f} s to generate), grid {grid}x{grid}, "
          f"anchors {np.round(anchors, 2).tolist()}")

    x, head, loss = tiny_yolo(args.size, anchors, len(CLASSES), args.width, args.max_objects,
                              args.seed)
    tg = G.TrainingGraph(loss, optimizer=lambda p: optim.Adam(p, lr=args.lr), device=dev,
                         name="tiny yolo", precision=args.precision)
    inf = tg.inference_graph()
    rng = np.random.default_rng(args.seed)
    nb = len(xtr) // args.batch
    step_loss: list[float] = []
    maps: list[tuple[int, float]] = []
    t_train = time.perf_counter()
    for ep in range(args.epochs):
        lr = args.lr * (0.1 if ep >= int(args.epochs * 0.8) else 1.0)  # one drop near the end
        for ds in tg.data_sources:
            for grp in getattr(ds.optimizer, "param_groups", []):
                grp["lr"] = lr
        perm = rng.permutation(len(xtr))
        handles = []
        for k in range(nb):
            idx = np.sort(perm[k * args.batch:(k + 1) * args.batch])
            xb, bb = flip(xtr[idx], btr[idx], rng.uniform(size=len(idx)) < 0.5)
            handles.append(tg.encode(to_float(xb), bb))
        tg.synchronize()
        ls = [h.loss for h in handles]
        step_loss += ls
        msg = f"epoch {ep + 1}/{args.epochs}: loss {np.mean(ls):.4f}"
        last = ep + 1 == args.epochs
        if (ep + 1) % args.eval_every == 0 or last:
            m, _, _ = evaluate(inf, xte, bte, anchors, dev)
            maps.append((ep + 1, m))
            msg += f", held-out mAP@0.5 {m:.4f}"
            if args.target is not None and m >= args.target:
                print(msg) if not args.quiet else None
                break
        if not args.quiet:
            print(msg, flush=True)
    train_s = time.perf_counter() - t_train
    m, ap, dets = evaluate(inf, xte, bte, anchors, dev)
    steps = len(step_loss)
    print(f"held-out mAP@0.5 {m:.4f} (AP per class: "
          f"{', '.join(f'{c} {a:.3f}' for c, a in zip(CLASSES, ap))}) after {steps} steps, "
          f"{train_s:.1f} s")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "tiny_yolo.npz")
    tg.save(path)
    png = os.path.join(args.out, "detections.png")
    detections_png(png, xte[:8], dets[:8])
    print(f"wrote {path} and {png}")

    result: dict[str, Any] = {"map": m, "ap": ap.tolist(), "steps": steps, "seconds": train_s,
                              "device": dev.name, "maps": maps}
    ours = time_ours(tg, xtr, btr, args.batch, args.time_steps)
    result["images_per_s"] = ours
    line = f"training throughput, batch {args.batch}: pymetalnn {ours:.1f} images/s on {dev.name}"
    if args.torch == "on" or (args.torch == "auto" and not args.smoke):
        peer = time_torch(args, dev, xtr, btr, anchors, args.time_steps)
        if peer is None and args.torch == "on":
            raise SystemExit("--torch on: torch does not import")
        if peer is not None:
            result["torch"] = peer
            line += (f"; PyTorch eager ({peer['precision']}) {peer['images_per_s']:.1f} images/s "
                     f"on {peer['device']} (ratio {ours / peer['images_per_s']:.2f}x)")
    print(line)
    if step_loss:  # --epochs 0 times the step without training
        first = float(np.mean(step_loss[:2]))
        lastl = float(np.mean(step_loss[-2:]))
        print(f"loss: first steps {first:.4f}, last steps {lastl:.4f}")
        result.update(first_loss=first, last_loss=lastl)
        if args.smoke and not lastl < first:
            raise SystemExit(f"smoke: the loss did not go down ({first:.4f} -> {lastl:.4f})")
    return result


if __name__ == "__main__":
    main()
