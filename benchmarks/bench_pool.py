"""Pooling benchmarks: max / avg (2x2 s2 and 3x3 s2 p1), max/avg 1-d, adaptive (7x7) and global
average, forward and backward, float32 and float16, on 32x256x56x56 (--quick: 2x32x28x28).

Memory-bound: each row counts the bytes the op must move (forward: x read + y written, + int32
indices when returned; max backward from x: grad_out + x read, grad_x written; max backward from
indices: grad_out + indices read, grad_x written; average backward: grad_out read, grad_x
written), gives GB/s, the device's copy bandwidth measured in the same run (CuPy device-to-device
copy of x's bytes; numpy on cpu) and the ratio (target >= 0.85, reported, not asserted), and the
same op in PyTorch on the same device (the GPU, or the CPU for the cpu backend; aten's
*_backward kernels for the gradients; torch's max backward always uses its int64 indices), numpy's
forward where torch is not installed, with the speedup.
`seconds` reuses each op's output buffers across calls; `alloc_seconds` allocates fresh
(zero-filled) ones each call, as bench_neuron.py explains.

`--shapes inception` instead times the pooling gradients of an InceptionV3 training step (batch
32, the shapes of its profile): avg_pool2d backward 3x3 stride 1 padding 1 (count_include_pad)
at each branch-pool shape and max_pool2d backward 3x3 stride 2 from indices at each reduction,
one row per shape plus a total row per op (sum of the launches, as in the step's profile).

    PYTHONPATH=. python benchmarks/bench_pool.py [--backend cpu|cuda] [--quick] [--shapes default|inception]
"""
from __future__ import annotations

import os
import sys
from typing import Any, Callable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import membound  # noqa: E402
from bench_neuron import reuse_outputs  # noqa: E402

import pymetalnn  # noqa: E402
from pymetalnn.ops import pool as P  # noqa: E402

WINDOWS = {"k2s2": dict(kernel_size=2, stride=2, padding=0),
           "k3s2p1": dict(kernel_size=3, stride=2, padding=1)}


def numpy_pool(x: np.ndarray, k: int, s: int, p: int, reduce: str) -> np.ndarray:
    """numpy peer (count_include_pad=True for avg): windows as a strided view of the padded x."""
    fill = -np.inf if reduce == "max" else 0.0
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)), constant_values=fill) if p else x
    win = np.lib.stride_tricks.sliding_window_view(xp, (k, k), axis=(2, 3))[:, :, ::s, ::s]
    return win.max(axis=(4, 5)) if reduce == "max" else win.mean(axis=(4, 5))


class Case:
    """One benchmark: our forward and backward, the peer's (torch on cuda, numpy on cpu; None
    where it has no such op) and the bytes each direction must move."""

    def __init__(self, name: str, fwd: Callable, bwd: Callable, fwd_bytes: int, bwd_bytes: int,
                 t_fwd: Callable | None = None, t_bwd: Callable | None = None,
                 np_fwd: Callable | None = None):
        self.name, self.fwd, self.bwd = name, fwd, bwd
        self.fwd_bytes, self.bwd_bytes = fwd_bytes, bwd_bytes
        self.t_fwd, self.t_bwd, self.np_fwd = t_fwd, t_bwd, np_fwd

    def peers(self) -> tuple[str, Callable | None, Callable | None]:
        """torch's ops where torch runs on this device (the GPU, or the CPU for the cpu
        backend), numpy's forward without torch."""
        return ("torch", self.t_fwd, self.t_bwd) if self.t_fwd is not None else \
            ("numpy", self.np_fwd, None)


def cases(dev: pymetalnn.Device, x: pymetalnn.Tensor, x_np: np.ndarray) -> list[Case]:
    tx = common.torch_view(dev, x) if dev.name in ("cuda", "cpu") else None
    if tx is not None:
        import torch

        F, aten = torch.nn.functional, torch.ops.aten
    isz = x.dtype.itemsize
    n = x.size
    out: list[Case] = []
    for wname, w in WINDOWS.items():
        k, s, p = w["kernel_size"], w["stride"], w["padding"]
        y, idx = P.max_pool2d(x, **w, return_indices=True)
        g = pymetalnn.tensor(np.ones(y.shape, x.dtype), dev)
        m = y.size
        t_fwd = t_fwd_idx = t_bwd = t_bwd_idx = t_afwd = t_abwd = None
        if tx is not None:
            tg = common.torch_view(dev, g)
            _, ti = F.max_pool2d(tx, k, s, p, return_indices=True)
            t_fwd = lambda tx=tx, k=k, s=s, p=p: F.max_pool2d(tx, k, s, p)
            t_fwd_idx = lambda tx=tx, k=k, s=s, p=p: F.max_pool2d(tx, k, s, p, return_indices=True)
            t_bwd = t_bwd_idx = lambda tg=tg, tx=tx, ti=ti, k=k, s=s, p=p: \
                aten.max_pool2d_with_indices_backward(tg, tx, [k, k], [s, s], [p, p], [1, 1], False, ti)
            t_afwd = lambda tx=tx, k=k, s=s, p=p: F.avg_pool2d(tx, k, s, p)
            t_abwd = lambda tg=tg, tx=tx, k=k, s=s, p=p: \
                aten.avg_pool2d_backward(tg, tx, [k, k], [s, s], [p, p], False, True, None)
        out.append(Case(f"max_pool2d {wname}", lambda w=w: P.max_pool2d(x, **w),
                        lambda g=g, w=w: P.max_pool2d_backward(g, x, **w),
                        (n + m) * isz, (m + 2 * n) * isz, t_fwd, t_bwd,
                        lambda k=k, s=s, p=p: numpy_pool(x_np, k, s, p, "max")))
        out.append(Case(f"max_pool2d {wname} +indices",
                        lambda w=w: P.max_pool2d(x, **w, return_indices=True),
                        lambda g=g, w=w, idx=idx: P.max_pool2d_backward(g, x, **w, indices=idx),
                        (n + m) * isz + 4 * m, (m + n) * isz + 4 * m, t_fwd_idx, t_bwd_idx))
        out.append(Case(f"avg_pool2d {wname}", lambda w=w: P.avg_pool2d(x, **w),
                        lambda g=g, w=w: P.avg_pool2d_backward(g, x, **w),
                        (n + m) * isz, (m + n) * isz, t_afwd, t_abwd,
                        lambda k=k, s=s, p=p: numpy_pool(x_np, k, s, p, "avg")))
    # 1-d: the same bytes seen as (N, C*H, W) rows
    x1 = x.reshape(x.shape[0], x.shape[1] * x.shape[2], x.shape[3])
    y1 = P.max_pool1d(x1, 3, 2, 1)
    g1 = pymetalnn.tensor(np.ones(y1.shape, x.dtype), dev)
    t1f = t1b = ta1b = None
    if tx is not None:
        tx1 = tx.view(x1.shape)
        t1f = lambda: F.max_pool1d(tx1, 3, 2, 1)
        # torch's 1-d pooling gradients are its 2-d ones on (N, C, 1, L)
        tg1, tx14 = common.torch_view(dev, g1).unsqueeze(2), tx1.unsqueeze(2)
        ti1 = F.max_pool1d(tx1, 3, 2, 1, return_indices=True)[1].unsqueeze(2)
        t1b = lambda: aten.max_pool2d_with_indices_backward(tg1, tx14, [1, 3], [1, 2], [0, 1],
                                                           [1, 1], False, ti1)
        ta1b = lambda: aten.avg_pool2d_backward(tg1, tx14, [1, 3], [1, 2], [0, 1], False, True,
                                                None)
    out.append(Case("max_pool1d k3s2p1", lambda: P.max_pool1d(x1, 3, 2, 1),
                    lambda: P.max_pool1d_backward(g1, x1, 3, 2, 1), (n + y1.size) * isz,
                    (y1.size + 2 * n) * isz, t1f, t1b))
    out.append(Case("avg_pool1d k3s2p1", lambda: P.avg_pool1d(x1, 3, 2, 1),
                    lambda: P.avg_pool1d_backward(g1, x1, 3, 2, 1), (n + y1.size) * isz,
                    (y1.size + n) * isz, (lambda: F.avg_pool1d(tx1, 3, 2, 1)) if tx is not None else None,
                    ta1b))
    for name, osz in (("adaptive_avg_pool2d 7x7", 7), ("global_avg_pool2d", 1)):
        ya = P.adaptive_avg_pool2d(x, osz)
        ga = pymetalnn.tensor(np.ones(ya.shape, x.dtype), dev)
        taf = tab = None
        if tx is not None:
            tga = common.torch_view(dev, ga)
            taf = lambda osz=osz: F.adaptive_avg_pool2d(tx, osz)
            tab = lambda tga=tga: aten._adaptive_avg_pool2d_backward(tga, tx)
        out.append(Case(name, lambda osz=osz: P.adaptive_avg_pool2d(x, osz),
                        lambda ga=ga, osz=osz: P.adaptive_avg_pool2d_backward(ga, x, osz),
                        (n + ya.size) * isz, (ya.size + n) * isz, taf, tab,
                        (lambda: x_np.mean(axis=(2, 3))) if osz == 1 else None))
    return out


def bench(dev: pymetalnn.Device, dtype: Any, shape: tuple, quick: bool) -> list[dict]:
    x_np = np.random.default_rng(0).standard_normal(shape, np.float32).astype(dtype)
    x = pymetalnn.tensor(x_np, dev)
    copy = common.copy_gbs(dev, x.nbytes)
    rows = []
    for c in cases(dev, x, x_np):
        peer, peer_fwd, peer_bwd = c.peers()
        for direction, fn, nbytes, peer_fn in (("fwd", c.fwd, c.fwd_bytes, peer_fwd),
                                               ("bwd", c.bwd, c.bwd_bytes, peer_bwd)):
            fn()  # compile, warm
            alloc_sec, _ = common.time_on(dev, fn, quick)
            with reuse_outputs(P):
                sec, spread = common.time_on(dev, fn, quick)
            peer_sec = None
            if peer_fn is not None:
                peer_fn()
                peer_sec = common.time_on(dev, peer_fn, quick)[0] if dev.name == "cuda" else \
                    common.time_host(peer_fn, lambda: None, 1, 3)[0]
            rows.append(membound.row(f"{c.name} {direction}", dev, dtype, shape, nbytes, sec, spread,
                                     copy, peer if peer_fn else None, peer_sec, ">= 0.85 copy"))
            rows[-1]["alloc_seconds"] = alloc_sec
    return rows


# InceptionV3 (batch 32): (C, H, W) of each avg_pool2d 3x3 s1 p1 input (one launch each; 17x17
# four times) and of each max_pool2d 3x3 s2 input whose gradient comes from the indices
INCEPTION_AVG = [(192, 35, 35), (256, 35, 35), (288, 35, 35), *[(768, 17, 17)] * 4,
                 (1280, 8, 8), (2048, 8, 8)]
INCEPTION_MAX = [(64, 147, 147), (192, 71, 71), (288, 35, 35), (768, 17, 17)]


def bench_inception(dev: pymetalnn.Device, dtype: Any, quick: bool) -> list[dict]:
    """The gradient launches of the InceptionV3 step, each against torch's (aten) on cuda."""
    rng = np.random.default_rng(0)
    batch = 2 if quick else 32
    probe = pymetalnn.tensor(np.zeros(1, np.float32), dev)
    cuda = dev.name == "cuda" and common.torch_view(dev, probe) is not None
    if cuda:  # torch on the GPU as the peer
        import torch

        aten = torch.ops.aten
    rows: list[dict] = []
    totals: dict[str, list[float]] = {}
    for op, shapes in (("avg_pool2d k3s1p1 bwd", INCEPTION_AVG), ("max_pool2d k3s2 +indices bwd",
                                                                  INCEPTION_MAX)):
        avg = op.startswith("avg")
        w = dict(kernel_size=3, stride=1, padding=1) if avg else dict(kernel_size=3, stride=2)
        for c, h, wd in shapes:
            shape = (batch, c, h, wd)
            x = pymetalnn.tensor(rng.standard_normal(shape, np.float32).astype(dtype), dev)
            y, idx = P.max_pool2d(x, **w, return_indices=True)
            if avg:
                y = P.avg_pool2d(x, **w)
            g = pymetalnn.tensor(rng.standard_normal(y.shape, np.float32).astype(dtype), dev)
            fn = (lambda g=g, x=x, w=w: P.avg_pool2d_backward(g, x, **w)) if avg else \
                (lambda g=g, x=x, w=w, idx=idx: P.max_pool2d_backward(g, x, **w, indices=idx))
            nbytes = (y.size + x.size) * x.dtype.itemsize + (0 if avg else 4 * y.size)
            peer_fn = None
            if cuda:
                tx, tg = common.torch_view(dev, x), common.torch_view(dev, g)
                if avg:
                    peer_fn = lambda tg=tg, tx=tx: aten.avg_pool2d_backward(
                        tg, tx, [3, 3], [1, 1], [1, 1], False, True, None)
                else:
                    ti = torch.nn.functional.max_pool2d(tx, 3, 2, return_indices=True)[1]
                    peer_fn = lambda tg=tg, tx=tx, ti=ti: aten.max_pool2d_with_indices_backward(
                        tg, tx, [3, 3], [2, 2], [0, 0], [1, 1], False, ti)
            fn()  # compile, warm
            with reuse_outputs(P):
                sec, spread = common.time_on(dev, fn, quick)
            peer_sec = None
            if peer_fn is not None:
                peer_fn()
                peer_sec = common.time_on(dev, peer_fn, quick)[0]
            copy = common.copy_gbs(dev, x.nbytes)
            rows.append(membound.row(f"inception {op}", dev, dtype, shape, nbytes, sec, spread, copy,
                                     "torch" if peer_fn else None, peer_sec, ">= 0.85 copy"))
            t = totals.setdefault(op, [0.0, 0.0, 0, 0.0])
            t[0] += sec
            t[1] += peer_sec or 0.0
            t[2] += nbytes
            t[3] = copy
        sec, peer_sec, nbytes, copy = totals[op]
        rows.append(membound.row(f"inception {op} TOTAL ({len(shapes)} launches)", dev, dtype,
                                 (batch,), nbytes, sec, 0.0, copy, "torch" if cuda else None,
                                 peer_sec if cuda else None, ">= 0.85 copy"))
    return rows


def check(dev: pymetalnn.Device) -> None:
    """A quick correctness guard so a broken build cannot report a fast wrong number."""
    x = np.random.default_rng(1).standard_normal((2, 3, 9, 9)).astype(np.float32)
    got = P.max_pool2d(pymetalnn.tensor(x, dev), 3, 2, 1).numpy()
    np.testing.assert_array_equal(got, numpy_pool(x, 3, 2, 1, "max"))
    got = P.avg_pool2d(pymetalnn.tensor(x, dev), 3, 2, 1).numpy()
    np.testing.assert_allclose(got, numpy_pool(x, 3, 2, 1, "avg"), rtol=1e-5, atol=1e-6)


def main() -> int:
    ap = common.parser(__doc__, backends=("cpu", "cuda"))
    ap.add_argument("--shapes", choices=["default", "inception"], default="default",
                    help="inception: the pooling gradients of an InceptionV3 step (batch 32)")
    args = ap.parse_args()
    dev = pymetalnn.device(args.backend)
    shape = (2, 32, 28, 28) if args.quick else (32, 256, 56, 56)
    label = "InceptionV3 gradient shapes" if args.shapes == "inception" else f"shape {shape}"
    print(f"pool benchmarks on {common.device_label(dev)}, {label}")
    check(dev)
    rows: list[dict] = []
    for dtype in (np.float32, np.float16):
        if args.shapes == "inception":
            rows.extend(bench_inception(dev, dtype, args.quick))
        else:
            rows.extend(bench(dev, dtype, shape, args.quick))
    tag = "_inception" if args.shapes == "inception" else ""
    common.report(rows, membound.COLUMNS_ALLOC, f"pool{tag}_{dev.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
