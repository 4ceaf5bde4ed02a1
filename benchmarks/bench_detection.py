"""Detection benchmarks (detection.metal): the YOLO v2 loss forward and forward + backward, and box
decoding + per-class NMS, against the same loss written in torch ops (examples/object_detection.py
torch_yolo_loss: vectorized, autograd for the gradient) on the same device where torch imports
(torch CUDA next to our cuda backend, torch CPU next to our cpu backend).

Shapes: a TinyYOLO v2 VOC head (N, 5 * (5 + 20), 13, 13) with 8 boxes per image, and this
project's demo head (N, 5 * (5 + 3), 13, 13) with 4. Target (reported, not asserted): the fused
loss at least as fast as the torch version (which runs ~60 small kernels).

    PYTHONPATH=. python benchmarks/bench_detection.py [--backend cpu|cuda] [--quick]
"""
from __future__ import annotations

import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))
import common  # noqa: E402

import pymetalnn as pm  # noqa: E402
from pymetalnn import functional as F  # noqa: E402

ANCHORS = np.array([[1.08, 1.19], [3.42, 4.41], [6.63, 11.38], [9.42, 5.11], [16.62, 10.52]],
                   np.float32)
COLUMNS = ["op", "dtype", "shape", "ms", "spread", "peer", "peer_ms", "ratio"]


def _targets(n: int, b: int, c: int, rng: np.random.Generator) -> np.ndarray:
    t = -np.ones((n, b, 5), np.float32)
    for k in range(n):
        m = int(rng.integers(1, b + 1))
        wh = rng.uniform(0.05, 0.6, (m, 2))
        xy = rng.uniform(0, 1, (m, 2))
        t[k, :m] = np.concatenate([rng.integers(0, c, (m, 1)), xy, wh], 1)
    return t


def _torch(dev: pm.Device):
    try:
        import torch
    except ImportError:
        return None, None
    if dev.name == "cuda":
        if not torch.cuda.is_available():
            return None, None
        common.disable_tf32()
        return torch, torch.device("cuda")
    return torch, torch.device("cpu")


def bench_loss(dev: pm.Device, n: int, c: int, boxes: int, dtype, quick: bool) -> list[dict]:
    rng = np.random.default_rng(0)
    shape = (n, len(ANCHORS) * (5 + c), 13, 13)
    x_np = rng.standard_normal(shape).astype(dtype)
    t_np = _targets(n, boxes, c, rng)
    x = pm.tensor(x_np, dev)
    t = F.yolo_targets(t_np, c, dev)    # checked once, as a training loop does per batch
    a = F.yolo_anchors(ANCHORS, dev)
    fwd = lambda: F.yolo_loss(x, t, a)  # noqa: E731
    both = lambda: (F.yolo_loss(x, t, a), F.yolo_loss_backward(1.0, x, t, a))  # noqa: E731
    sf, spf = common.time_on(dev, fwd, quick)
    sb, spb = common.time_on(dev, both, quick)
    torch, tdev = _torch(dev)
    pf = pb = None
    peer = None
    if torch is not None:
        from object_detection import torch_yolo_loss

        xt = torch.tensor(x_np, device=tdev, requires_grad=True)
        tt = torch.tensor(t_np, device=tdev)
        at = torch.tensor(ANCHORS, device=tdev)
        ref = float(torch_yolo_loss(xt, tt, at).mean())
        ours = float(fwd().numpy())
        assert abs(ref - ours) <= 2e-3 * max(1.0, abs(ref)), (ref, ours)

        def t_both() -> None:
            torch.autograd.grad(torch_yolo_loss(xt, tt, at).mean(), xt)

        sync = torch.cuda.synchronize if dev.name == "cuda" else (lambda: None)
        if dev.name == "cuda":
            pf, _ = common.time_cuda(lambda: torch_yolo_loss(xt, tt, at).mean(),
                                     reps=5 if quick else 20)
            pb, _ = common.time_cuda(t_both, reps=5 if quick else 20)
        else:
            pf, _ = common.time_host(lambda: torch_yolo_loss(xt, tt, at).mean(), sync,
                                     reps=3 if quick else 5)
            pb, _ = common.time_host(t_both, sync, reps=3 if quick else 5)
        peer = f"torch ({tdev.type})"
    d = np.dtype(dtype).name
    return [_row("yolo_loss fwd", d, shape, sf, spf, peer, pf),
            _row("yolo_loss fwd+bwd", d, shape, sb, spb, peer, pb)]


def bench_detect(dev: pm.Device, n: int, c: int, quick: bool) -> list[dict]:
    rng = np.random.default_rng(1)
    shape = (n, len(ANCHORS) * (5 + c), 13, 13)
    x = pm.tensor(rng.standard_normal(shape).astype(np.float32), dev)
    a = F.yolo_anchors(ANCHORS, dev)

    def run() -> None:
        b, s = F.yolo_decode(x, a)
        F.multiclass_nms(b, s, 0.45, score_threshold=0.05, max_det=100)

    sec, sp = common.time_on(dev, run, quick)
    return [_row("yolo_decode + multiclass_nms", "float32", shape, sec, sp, None, None)]


def _row(op: str, dtype: str, shape: tuple, sec: float, spread: float, peer: str | None,
         peer_sec: float | None) -> dict:
    return {"op": op, "dtype": dtype, "shape": "x".join(map(str, shape)), "ms": sec * 1e3,
            "spread": spread, "peer": peer or "-",
            "peer_ms": peer_sec * 1e3 if peer_sec is not None else None,
            "ratio": peer_sec / sec if peer_sec is not None else None}


def main() -> int:
    args = common.parser(__doc__).parse_args()
    dev = pm.device(args.backend)
    n = 32 if dev.name == "cuda" and not args.quick else 8
    rows: list[dict] = []
    for dtype in (np.float32, np.float16):
        rows += bench_loss(dev, n, 20, 8, dtype, args.quick)
        rows += bench_loss(dev, n, 3, 4, dtype, args.quick)
    rows += bench_detect(dev, n, 20, args.quick)
    common.report(rows, COLUMNS, f"detection_{dev.name}",
                  f"# detection on {common.device_label(dev)} (ratio = peer time / ours)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
