"""InceptionV3 training with pymetalnn.graph (WWDC 2018 session 609's third demo), against the
same model in PyTorch on the same device in the same run.

The real block structure (torchvision's Inception3 without the aux head): stem (3x3/2, 3x3,
3x3, max pool, 1x1, 3x3, max pool), 3x Inception-A, reduction-A, 4x Inception-B (1x7 / 7x1
factorized convolutions), reduction-B, 2x Inception-C (1x3 / 3x1 split branches), every
convolution followed by batch norm and relu, branches concatenated, global average pool,
dropout, fully connected to 1000 classes; SGD with momentum, softmax cross-entropy. One
architecture function drives two builders (graph nodes, torch modules), so both are the same.

Trained `--iters` (30) iterations on generated data (random images and labels; a throughput
benchmark), printing images/s and peak memory for both. `--precision mixed`: float16 activations
and math, float32 master weights, dynamic loss scaling (TrainingGraph(precision="mixed")), with
PyTorch AMP (autocast float16 + GradScaler, channels_last, cudnn.benchmark) as the peer. PyTorch
rows (pymetalnn.testing.torch_peer): AMP (mixed only, cuda), fp32 with TF32 off (float32 only),
and PyTorch's defaults (TF32 convolutions), each eager. `--replay`: also a captured step
replayed per iteration (the same training as encoding every step).

    PYTHONPATH=. python examples/inception_v3.py --backend cuda [--batch 32] [--iters 30]
    PYTHONPATH=. python examples/inception_v3.py --backend cuda --precision mixed --replay
    PYTHONPATH=. python examples/inception_v3.py --smoke [--precision mixed]  # cpu, 75x75, batch 4
    NCCL_NVLS_ENABLE=0 mpiexec -n 2 python examples/inception_v3.py --backend cuda --distributed

--distributed: data-parallel over the ranks of `mpiexec -n N` (pymetalnn.distributed; one GPU
per rank, --batch per rank, each rank its slice of one generated batch); images/s count all ranks'
images over the slowest rank's time; the PyTorch peer is not run.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Callable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

import pymetalnn as pm  # noqa: E402
from pymetalnn import graph as G  # noqa: E402
from pymetalnn import optim  # noqa: E402


def inception_v3(b: Any, x: Any, w: float = 1.0, classes: int = 1000) -> Any:
    """InceptionV3 on builder `b` (conv+bn+relu, pools, concat, global pool, fc); `w` scales
    every channel count (1.0: the real model)."""
    def c(n: int) -> int:
        return max(int(round(n * w)), 1)

    def conv(h: Any, n: int, k: Any, s: int = 1, p: Any = 0) -> Any:
        return b.conv(h, c(n), k, s, p)

    def block_a(h: Any, pool: int) -> Any:
        b1 = conv(h, 64, 1)
        b5 = conv(conv(h, 48, 1), 64, 5, p=2)
        b3 = conv(conv(conv(h, 64, 1), 96, 3, p=1), 96, 3, p=1)
        bp = conv(b.avgpool(h, 3, 1, 1), pool, 1)
        return b.cat([b1, b5, b3, bp])

    def reduction_a(h: Any) -> Any:
        b3 = conv(h, 384, 3, 2)
        bd = conv(conv(conv(h, 64, 1), 96, 3, p=1), 96, 3, 2)
        return b.cat([b3, bd, b.maxpool(h, 3, 2)])

    def block_b(h: Any, c7: int) -> Any:
        b1 = conv(h, 192, 1)
        b7 = conv(conv(conv(h, c7, 1), c7, (1, 7), p=(0, 3)), 192, (7, 1), p=(3, 0))
        bd = conv(h, c7, 1)
        for n, k, p in [(c7, (7, 1), (3, 0)), (c7, (1, 7), (0, 3)), (c7, (7, 1), (3, 0)),
                        (192, (1, 7), (0, 3))]:
            bd = conv(bd, n, k, p=p)
        bp = conv(b.avgpool(h, 3, 1, 1), 192, 1)
        return b.cat([b1, b7, bd, bp])

    def reduction_b(h: Any) -> Any:
        b3 = conv(conv(h, 192, 1), 320, 3, 2)
        b7 = conv(conv(conv(conv(h, 192, 1), 192, (1, 7), p=(0, 3)), 192, (7, 1), p=(3, 0)), 192, 3, 2)
        return b.cat([b3, b7, b.maxpool(h, 3, 2)])

    def block_c(h: Any) -> Any:
        b1 = conv(h, 320, 1)
        t = conv(h, 384, 1)
        b3 = b.cat([conv(t, 384, (1, 3), p=(0, 1)), conv(t, 384, (3, 1), p=(1, 0))])
        d = conv(conv(h, 448, 1), 384, 3, p=1)
        bd = b.cat([conv(d, 384, (1, 3), p=(0, 1)), conv(d, 384, (3, 1), p=(1, 0))])
        bp = conv(b.avgpool(h, 3, 1, 1), 192, 1)
        return b.cat([b1, b3, bd, bp])

    h = conv(x, 32, 3, 2)
    h = conv(h, 32, 3)
    h = conv(h, 64, 3, p=1)
    h = b.maxpool(h, 3, 2)
    h = conv(h, 80, 1)
    h = conv(h, 192, 3)
    h = b.maxpool(h, 3, 2)
    for pool in (32, 64, 64):
        h = block_a(h, pool)
    h = reduction_a(h)
    for c7 in (128, 160, 160, 192):
        h = block_b(h, c7)
    h = reduction_b(h)
    h = block_c(h)
    h = block_c(h)
    return b.head(h, classes)


def _pads(p: Any) -> tuple[int, int, int, int]:
    ph, pw = (p, p) if isinstance(p, int) else p
    return (ph, ph, pw, pw)


class GraphBuilder:
    """Builds the model from pymetalnn.graph nodes."""

    def __init__(self, seed: int = 0):
        self.n = 0
        self.seed = seed

    def _name(self, kind: str) -> str:
        self.n += 1
        return f"{kind}{self.n}"

    def conv(self, h: Any, n: int, k: Any, s: int, p: Any) -> Any:
        cin = G.nodes.as_value(h).shape[1]
        name = self._name("conv")
        y = G.ConvolutionNode(h, G.ConvolutionDataSource(cin, n, k, bias=False, seed=self.seed + self.n),
                              stride=s, padding=_pads(p), name=name)
        y = G.BatchNormalizationNode(y, G.NormalizationDataSource(n, eps=1e-3), name=name + "_bn")
        return G.ReLUNode(y, name=name + "_relu")

    def maxpool(self, h: Any, k: int, s: int) -> Any:
        return G.PoolingMaxNode(h, k, s, name=self._name("maxpool"))

    def avgpool(self, h: Any, k: int, s: int, p: int) -> Any:
        return G.PoolingAverageNode(h, k, s, padding=p, name=self._name("avgpool"))

    def cat(self, hs: list) -> Any:
        return G.ConcatenationNode(hs, 1, name=self._name("concat"))

    def head(self, h: Any, classes: int) -> Any:
        g = G.FlattenNode(G.GlobalAveragePoolingNode(h, name="avgpool"))
        g = G.DropoutNode(g, 0.5, seed=self.seed, name="dropout")
        feat = G.nodes.as_value(g).shape[1]
        return G.FullyConnectedNode(g, G.FullyConnectedDataSource(feat, classes, seed=self.seed),
                                    name="fc")


class TorchBuilder:
    """Builds the same model from torch.nn modules (created on the first call)."""

    def __init__(self, torch: Any):
        self.torch = torch
        self.mods = torch.nn.ModuleList()
        self.i = 0
        self.first = True

    def _mod(self, make: Callable[[], Any]) -> Any:
        if self.first:
            self.mods.append(make())
        m = self.mods[self.i]
        self.i += 1
        return m

    def conv(self, h: Any, n: int, k: Any, s: int, p: Any) -> Any:
        nn = self.torch.nn
        m = self._mod(lambda: nn.Sequential(nn.Conv2d(h.shape[1], n, k, s, p, bias=False),
                                            nn.BatchNorm2d(n, eps=1e-3), nn.ReLU()).to(h.device))
        return m(h)

    def maxpool(self, h: Any, k: int, s: int) -> Any:
        return self.torch.nn.functional.max_pool2d(h, k, s)

    def avgpool(self, h: Any, k: int, s: int, p: int) -> Any:
        return self.torch.nn.functional.avg_pool2d(h, k, s, p)

    def cat(self, hs: list) -> Any:
        return self.torch.cat(hs, 1)

    def head(self, h: Any, classes: int) -> Any:
        g = self.torch.nn.functional.dropout(h.mean((2, 3)), 0.5, self.mods.training)
        m = self._mod(lambda: self.torch.nn.Linear(g.shape[1], classes).to(h.device))
        return m(g)

    def forward(self, x: Any, w: float, classes: int) -> Any:
        self.i = 0
        out = inception_v3(self, x, w, classes)
        self.first = False
        return out


def run_ours(args: argparse.Namespace, dev: pm.Device, X: np.ndarray, Y: np.ndarray,
             pg: Any = None) -> dict:
    x = G.ImageNode((3, args.image_size, args.image_size), name="x")
    logits = inception_v3(GraphBuilder(), x, args.width, args.classes)
    loss = G.SoftmaxCrossEntropyLossNode(logits, name="loss")
    dev.reset_peak_memory()  # buffers of this device: as torch.cuda.max_memory_allocated
    base = dev.memory_allocated()
    tg = G.TrainingGraph(loss, optimizer=lambda p: optim.SGD(p, lr=args.lr, momentum=0.9),
                         device=dev, name="inception_v3", precision=args.precision,
                         accumulate=args.accumulate,
                         grad_scaler=dict(init_scale=args.init_scale) if args.precision == "mixed"
                         else None)
    ranks = 1
    if pg is not None:
        from pymetalnn import distributed

        # rank 0's weights; gradients averaged in buckets
        distributed.DataParallel(tg, pg, sync_bn=args.sync_bn)
        ranks = pg.size
    xt, yt = tg.bind(X)[0], tg.labels(Y)
    losses = []
    t_first = time.perf_counter()
    for _ in range(min(args.warmup, args.iters)):
        losses.append(tg.encode(xt, yt).loss)
    warm_s = time.perf_counter() - t_first
    if args.profile:
        with dev.profile() as prof:
            losses.append(tg.encode(xt, yt).loss)
            tg.synchronize()
        print("one training step, kernel time on the device:\n" + prof.table(args.profile))
    n = args.iters - len(losses)
    whole_run_peak = dev.max_memory_allocated()
    dev.reset_peak_memory()
    if pg is not None:
        tg.synchronize()
        pg.barrier()
    t0 = time.perf_counter()
    hs = [tg.encode(xt, yt) for _ in range(n)]
    tg.synchronize()
    secs = time.perf_counter() - t0
    if pg is not None:  # the slowest rank's time
        secs = float(pg.all_reduce_host(np.array([secs]), "max")[0])
    losses += [h.loss for h in hs]
    replay = None
    if args.replay:
        # one captured step (a CUDA graph on cuda) replayed per iteration: the host cost of
        # encoding ~1000 launches goes away; the training is the same (dropout masks, step
        # counts and the loss scale advance on the device), so it continues the run above
        step = tg.capture(xt, yt)
        tg.synchronize()
        if pg is not None:
            pg.barrier()
        t1 = time.perf_counter()
        rl = [step.run() for _ in range(n)]
        tg.synchronize()
        rsecs = time.perf_counter() - t1
        if pg is not None:
            rsecs = float(pg.all_reduce_host(np.array([rsecs]), "max")[0])
        if rl:  # the outputs are the recording's buffers: the last replay's loss
            losses.append(rl[-1].loss)
        replay = {"seconds": rsecs,
                  "images_per_s": n * args.batch * ranks / rsecs if n else None,
                  "launches": len(step)}
    if pg is not None:  # losses: means over the ranks
        losses = pg.all_reduce_host(np.array(losses), "mean").tolist()
    steady = dev.max_memory_allocated() - base  # after the warm-up steps planned the memory
    peak = max(whole_run_peak, dev.max_memory_allocated()) - base
    rep = tg.memory_report(args.batch)
    sc = tg.grad_scaler
    return {"losses": losses, "timed_iters": n, "seconds": secs, "warmup_seconds": warm_s,
            "replay": replay, "loss_scale": sc.scale if sc is not None else None,
            "images_per_s": (n * args.batch / secs if n else args.batch * len(losses) / warm_s)
            * ranks, "ranks": ranks,
            "peak_MiB": peak / 2**20, "steady_peak_MiB": steady / 2**20,
            "peak_kind": "buffers, whole run incl. unplanned warm-up steps",
            "plan": str(rep) if rep else None,
            "params": sum(int(np.prod(v.shape)) for k, v in tg.state_dict().items()
                          if k.endswith("weight") or k.endswith("bias"))}


def run_torch(args: argparse.Namespace, dev: pm.Device, X: np.ndarray, Y: np.ndarray,
              mode: str) -> dict | None:
    """The same model in PyTorch eager, in torch_peer's `mode` (fp32, default, amp)."""
    try:
        import torch
    except ImportError:
        return None
    from pymetalnn.testing import torch_peer

    tdev = "cuda" if dev.name == "cuda" else "cpu"
    if tdev == "cuda" and not torch.cuda.is_available():
        return None
    if mode == "amp" and tdev != "cuda":
        return None
    torch.manual_seed(0)
    torch_peer.configure(torch, mode)
    b = TorchBuilder(torch)
    tx = torch.from_numpy(X).to(tdev)
    ty = torch.from_numpy(Y).long().to(tdev)
    with torch.no_grad():
        b.forward(tx, args.width, args.classes)  # creates the modules
    b.mods.train()
    opt = torch.optim.SGD(b.mods.parameters(), lr=args.lr, momentum=0.9)
    sync = torch.cuda.synchronize if tdev == "cuda" else (lambda: None)
    step, _ = torch_peer.train_step(torch, mode, b.mods, lambda x: b.forward(x, args.width,
                                                                             args.classes),
                                    opt, tx, ty)
    if tdev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    losses = [float(step().detach()) for _ in range(min(args.warmup, args.iters))]
    n = args.iters - len(losses)
    sync()
    t0 = time.perf_counter()
    ls = [step() for _ in range(n)]
    sync()
    secs = time.perf_counter() - t0
    losses += [float(v) for v in ls]
    peak = torch.cuda.max_memory_allocated() if tdev == "cuda" else None
    return {"losses": losses, "timed_iters": n, "seconds": secs,
            "images_per_s": n * args.batch / secs if n else None,
            "peak_MiB": peak / 2**20 if peak else None, "device": f"torch {tdev} {mode}",
            "params": None}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default=None)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3, help="untimed first iterations")
    ap.add_argument("--image-size", type=int, default=299)
    ap.add_argument("--width", type=float, default=1.0, help="channel multiplier (1: the real model)")
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--replay", action="store_true", help="also time a captured step replayed "
                    "per iteration (Graph.capture), after the encoded iterations")
    ap.add_argument("--precision", choices=("float32", "mixed"), default="float32",
                    help="mixed: float16 activations and math, float32 master weights, dynamic "
                    "loss scaling (the PyTorch peer: AMP)")
    ap.add_argument("--accumulate", choices=("float", "half"), default="float",
                    help="mixed precision: float or half accumulation in conv / linear")
    ap.add_argument("--lr", type=float, default=0.01, help="SGD's learning rate (momentum 0.9)")
    ap.add_argument("--compare-fp32", action="store_true", help="mixed precision: also train "
                    "the same model in float32 from the same weights on the same batch and "
                    "print how far the mixed loss curve is from the float32 one")
    ap.add_argument("--init-scale", type=float, default=2.0**16,
                    help="mixed precision: the loss scale's start (GradScaler's init_scale)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after the warm-up, profile one step and print the N slowest kernels")
    ap.add_argument("--smoke", action="store_true", help="cpu, 75x75, narrow, 2 iterations")
    ap.add_argument("--distributed", action="store_true", help="data-parallel over the ranks of "
                    "mpiexec -n N (--batch per rank; no PyTorch peer)")
    ap.add_argument("--sync-bn", action="store_true", help="with --distributed: batch norm "
                    "statistics over all ranks' images")
    args = ap.parse_args(argv)
    if args.smoke:
        # batch 4, not 2: batch norm over the 1x1 tail at batch 2 normalizes two values, which makes the
        # gradients chaotic (float32 and float64 torch disagree by 100x there; at 4 they agree to 1e-3)
        _common.smoke_caps(args, image_size=75, batch=4, iters=3, width=0.0625, classes=10)
        args.warmup = 1
        args.no_torch = True
        if args.precision == "mixed":
            # this narrow random-init net's weight gradients reach ~5e3: a few steps cannot
            # afford GradScaler's first backoffs (overflowed steps are skipped), and lr 0.01
            # moves the weights so far that float16 activations overflow (float16's max: 65504)
            args.init_scale = min(args.init_scale, 1.0)
            args.lr = min(args.lr, 1e-3)
            args.iters = 8  # a few more steps: the first ones at lr 1e-3 are noisy
    if args.image_size < 75:
        raise SystemExit("--image-size: InceptionV3 needs at least 75x75 to reach its last blocks")
    pg = None
    if args.distributed:
        from pymetalnn import distributed

        pg = distributed.init(backend=args.backend)  # cuda: GPU local_rank % count
        dev = pg.device
        args.no_torch = True
    else:
        dev = pm.device(args.backend)
    say = print if pg is None or pg.rank == 0 else (lambda *a, **k: None)
    rng = np.random.default_rng(0)
    ranks, rank = (1, 0) if pg is None else (pg.size, pg.rank)
    # one generated global batch; each rank trains on its slice of it
    X = rng.standard_normal((args.batch * ranks, 3, args.image_size, args.image_size)
                            ).astype(np.float32)[rank * args.batch:(rank + 1) * args.batch]
    Y = rng.integers(0, args.classes, args.batch * ranks).astype(np.int32)[
        rank * args.batch:(rank + 1) * args.batch]
    say(f"InceptionV3 ({args.image_size}x{args.image_size}, width x{args.width}, "
        f"{args.classes} classes), {args.precision} precision, batch {args.batch}, "
        f"{args.iters} iterations on "
        f"{dev.name}" + (f" ({dev.gpu_name})" if dev.name == "cuda" else ""))
    ours = run_ours(args, dev, X, Y, pg)
    if pg is not None:
        say(f"{pg.size} ranks x batch {args.batch}: {ours['images_per_s'] / pg.size:.1f} "
            "images/s per rank")
    say(f"pymetalnn: {ours['images_per_s']:.1f} images/s ({ours['timed_iters']} timed "
        f"iterations, {ours['seconds']:.2f} s; first {args.warmup}: {ours['warmup_seconds']:.1f} s), "
        f"peak {ours['peak_MiB']:.0f} MiB ({ours['peak_kind']}; "
        f"{ours['steady_peak_MiB']:.0f} MiB once planned), "
        f"{ours['params']:,} parameters; loss {ours['losses'][0]:.4f} -> {ours['losses'][-1]:.4f}")
    if ours["replay"]:
        r = ours["replay"]
        say(f"pymetalnn captured step replayed: {r['images_per_s'] or float('nan'):.1f} "
              f"images/s ({r['launches']} launches per step)")
    if ours["loss_scale"] is not None:
        say(f"  loss scale at the end: {ours['loss_scale']:g}")
    if ours["plan"]:
        say(f"  memory plan: {ours['plan']}")
    res = {"ours": ours, "torch": None, "torch_rows": {}, "args": vars(args)}
    if args.compare_fp32 and args.precision == "mixed":
        ref_args = argparse.Namespace(**{**vars(args), "precision": "float32",
                                         "accumulate": "float", "replay": args.replay,
                                         "profile": 0})
        ref = run_ours(ref_args, dev, X, Y)
        m, f = np.array(ours["losses"]), np.array(ref["losses"])
        k = min(len(m), len(f))
        rel = np.abs(m[:k] - f[:k]) / np.abs(f[:k])
        w = max(k // 10, 1)  # the last tenth, averaged (per-step losses of a batch are noisy)
        tail = abs(m[k - w:k].mean() - f[k - w:k].mean()) / abs(f[k - w:k].mean())
        res["compare_fp32"] = {"max_rel": float(rel.max()), "mean_rel": float(rel.mean()),
                               "last_tenth_rel": float(tail), "steps": k}
        say(f"mixed vs float32 loss curve over {k} steps: max {rel.max():.2%}, mean "
              f"{rel.mean():.2%} relative difference per step; last tenth's mean "
              f"{tail:.2%} (float32 {f[0]:.4f} -> {f[k - 1]:.4f})")
    if not args.no_torch:
        modes = ("amp", "default") if args.precision == "mixed" else ("fp32", "default")
        for mode in modes:
            t = run_torch(args, dev, X, Y, mode)
            res["torch_rows"][mode] = t
            if t is None:
                say(f"torch {mode}: not importable, no CUDA, or cuda-only mode -- skipped")
                continue
            res["torch"] = res["torch"] or t
            say(f"torch ({t['device']}, eager): {t['images_per_s'] or float('nan'):.1f} "
                  f"images/s, peak {t['peak_MiB'] or float('nan'):.0f} MiB; "
                  f"loss {t['losses'][0]:.4f} -> {t['losses'][-1]:.4f}")
            if t["images_per_s"]:
                line = f"  ours/torch {mode}: eager {ours['images_per_s'] / t['images_per_s']:.2f}"
                if ours["replay"] and ours["replay"]["images_per_s"]:
                    line += f", captured {ours['replay']['images_per_s'] / t['images_per_s']:.2f}"
                say(line)
    if args.smoke:
        ls = ours["losses"]
        if not ls[-1] < ls[0]:
            raise SystemExit(f"smoke: the loss did not go down ({ls[0]:.4f} -> {ls[-1]:.4f})")
    return res


if __name__ == "__main__":
    main()
