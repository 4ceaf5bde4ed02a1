"""The activity classifier of WWDC 2018 session 609: 6-channel motion-sensor sequences, 1-D
convolutions that compress time while widening channels (2,000 samples to 20, as in the session), an
LSTM over the compressed steps, fully connected layers and softmax cross-entropy, all trained
through one pymetalnn.graph TrainingGraph (the LSTM's gradient flows into the convolutions).

A sequence (N, C, T) is an image (N, C, 1, T); the 1-D convolutions are (1, k) convolutions
with stride (1, s); `PermuteNode` (below: a custom graph node) turns (N, C, 1, T') into the
LSTM's time-major (T', N, C) and its output back to (N, T', H).

Data: BasicMotions (UEA; 4 classes, 6 channels, 100 samples, 40 train / 40 test) through our
.ts reader from the copy the `aeon` package ships (`--data DIR` for another copy), or
`--synthetic`: generated 2,000-sample recordings of standing / walking / running / badminton.

    PYTHONPATH=. python examples/activity_classifier.py [--backend cuda] [--epochs 150]
    PYTHONPATH=. python examples/activity_classifier.py --synthetic [--epochs 30]
    PYTHONPATH=. python examples/activity_classifier.py --smoke --backend cpu
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402, F401  (puts the repo on sys.path)

import pymetalnn as pm  # noqa: E402
from pymetalnn import datasets, optim  # noqa: E402
from pymetalnn import functional as F  # noqa: E402
from pymetalnn import graph as G  # noqa: E402
from pymetalnn.graph.nodes import FilterNode  # noqa: E402


class PermuteNode(FilterNode):
    """Permute the axes of the source (a copy), optionally reshaping the result: out =
    permute(x, dims).reshape(shape) (one entry of shape may be -1: the batch). The batch axis
    may move (e.g. to 1 for an LSTM's time-major input); the gradient is the inverse
    permutation."""

    prefix = "permute"

    def __init__(self, source: Any, dims: Sequence[int], shape: Sequence[int] | None = None, *,
                 name: str | None = None, register: bool = True):
        self.dims = tuple(int(d) for d in dims)
        self.inv = tuple(int(i) for i in np.argsort(self.dims))
        self.out_shape = None if shape is None else tuple(int(s) for s in shape)
        super().__init__([source], name, register)

    def _shapes(self, x: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        perm = tuple(int(x[d]) for d in self.dims)
        if self.out_shape is None:
            return perm, perm
        n = int(np.prod(perm))
        out = list(self.out_shape)
        if -1 in out:
            out[out.index(-1)] = n // int(np.prod([s for s in out if s != -1]))
        return perm, tuple(out)

    def infer(self, shapes, dtypes):
        x = shapes[0]
        if sorted(self.dims) != list(range(len(x))):
            raise ValueError(f"dims {self.dims} is not a permutation of {len(x)} axes")
        perm, out = self._shapes(x)
        if int(np.prod(out)) != int(np.prod(perm)):
            raise ValueError(f"cannot reshape {perm} into {self.out_shape}")
        return [(out, dtypes[0])]

    def forward(self, rc, xs, training, with_state):
        x = xs[0]
        perm, out = self._shapes(x.shape)
        y = F.permute(x, self.dims)
        return [y.reshape(*out) if out != perm else y]

    def saved(self):
        return [("in", 0)]  # only its shape is read: the batch may sit on any axis

    def backward(self, rc, gouts, saved, need):
        g = gouts[0]
        perm = tuple(int(saved[0].shape[d]) for d in self.dims)
        gp = g.reshape(*perm) if tuple(g.shape) != perm else g
        return [F.permute(gp, self.inv)], []


def time_strides(length: int, steps: int = 20) -> list[int]:
    """Strides whose product compresses `length` to about `steps` (each 2..5)."""
    factor = max(length // steps, 1)
    out: list[int] = []
    while factor > 1:
        for s in (5, 4, 3, 2):
            if factor % s == 0:
                out.append(s)
                factor //= s
                break
        else:
            out.append(factor)
            factor = 1
    return out or [1]


def activity_network(channels: int, length: int, classes: int, *, width: int = 32,
                     hidden: int = 64, seed: int = 0
                     ) -> tuple[G.ImageNode, G.LossNode, G.Value]:
    """(input (C, 1, T), loss node, logits): (1, k) convolutions with strides compressing T to
    ~20 while the channels widen, an LSTM over the steps, FC -> relu -> FC -> softmax CE."""
    x = G.ImageNode((channels, 1, length), name="x")
    h: Any = x
    c_in = channels
    for i, s in enumerate(time_strides(length)):
        c_out = width * (2 ** min(i, 2))
        k = 2 * (s // 2) + 3  # odd kernel > stride; 'same'-like: out = ceil(in / s)
        h = G.ConvolutionNode(h, G.ConvolutionDataSource(c_in, c_out, (1, k), seed=seed + i),
                              stride=(1, s), padding=(0, 0, k // 2, k // 2), name=f"conv{i + 1}")
        h = G.ReLUNode(h, name=f"relu{i + 1}")
        c_in = c_out
    t_steps = h.result.shape[3]
    seq = PermuteNode(h, (3, 0, 1, 2), (t_steps, -1, c_in), name="to_time_major")
    lstm = G.LSTMNode(seq, G.RecurrentDataSource("lstm", c_in, hidden, seed=seed + 10), name="lstm")
    back = PermuteNode(lstm, (1, 0, 2), (-1, t_steps * hidden), name="to_batch_major")
    f = G.ReLUNode(G.FullyConnectedNode(back, G.FullyConnectedDataSource(
        t_steps * hidden, hidden, seed=seed + 11), name="fc1"))
    logits = G.FullyConnectedNode(f, G.FullyConnectedDataSource(hidden, classes, seed=seed + 12),
                                  name="fc2")
    return x, G.SoftmaxCrossEntropyLossNode(logits, name="loss"), logits.result


def load(args: argparse.Namespace):
    if args.synthetic or args.smoke:
        n_tr, n_te, length = (24, 8, args.length or 400) if args.smoke else (200, 80, args.length or 2000)
        tr, te = datasets.synthetic_activity(n_tr, n_te, length, seed=args.seed)
        return tr, te, list(datasets.ACTIVITIES), f"synthetic recordings ({length} samples)"
    tr, te, classes = datasets.load_ts_split("BasicMotions", args.data)
    return tr, te, classes, "BasicMotions"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default=None)
    ap.add_argument("--data", default=None, help="folder with BasicMotions_TRAIN.ts / _TEST.ts")
    ap.add_argument("--synthetic", action="store_true", help="generated 2,000-sample recordings")
    ap.add_argument("--length", type=int, default=None, help="synthetic recording length")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="a few steps on small synthetic data")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.smoke:
        args.backend = args.backend or "cpu"
        args.epochs = args.epochs or 3
        args.width, args.hidden = min(args.width, 8), min(args.hidden, 16)
    epochs = args.epochs or (30 if args.synthetic else 150)
    dev = pm.device(args.backend)
    (xtr, ytr), (xte, yte), classes, src = load(args)
    mean = np.nanmean(xtr, axis=(0, 2), keepdims=True)
    std = np.nanstd(xtr, axis=(0, 2), keepdims=True) + 1e-6
    xtr = np.nan_to_num((xtr - mean) / std)[:, :, None, :].astype(np.float32)
    xte = np.nan_to_num((xte - mean) / std)[:, :, None, :].astype(np.float32)
    print(f"device: {dev.name}; data: {src}: {len(xtr)} train / {len(xte)} test, "
          f"{xtr.shape[1]} channels x {xtr.shape[3]} samples, classes {classes}")
    _, loss, logits = activity_network(xtr.shape[1], xtr.shape[3], len(classes), width=args.width,
                                       hidden=args.hidden, seed=args.seed)
    tg = G.TrainingGraph(loss, optimizer=lambda p: optim.Adam(p, lr=args.lr), device=dev,
                         name="activity")
    t0 = time.perf_counter()
    hist = G.fit(tg, (xtr, ytr), epochs=epochs, batch_size=min(args.batch, len(xtr)),
                 test=(xte, yte), progress=not args.quiet, seed=args.seed)
    secs = time.perf_counter() - t0
    acc = G.accuracy(tg.inference_graph(logits), xte, yte)
    first = float(np.mean(hist.step_loss[:3]))
    last = float(np.mean(hist.step_loss[-3:]))
    print(f"test accuracy {acc:.4f} after {hist.epochs} epochs ({len(hist.step_loss)} steps, "
          f"{secs:.1f} s); loss {first:.4f} -> {last:.4f}")
    if args.smoke and not last < first:
        raise SystemExit(f"smoke: the loss did not go down ({first:.4f} -> {last:.4f})")
    return {"accuracy": acc, "first_loss": first, "last_loss": last, "epochs": hist.epochs,
            "seconds": secs, "device": dev.name}


if __name__ == "__main__":
    main()
