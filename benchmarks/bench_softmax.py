"""softmax / log_softmax benchmarks (softmax.metal): memory-bound, so GB/s of the bytes the op
must move (forward: read x, write y; backward: read dy and y, write dx), against a CuPy
device-to-device copy of the same size measured in the same run, and PyTorch's time for the same
op on the same GPU (torch.softmax / torch._softmax_backward_data).

Targets (reported, not asserted): >= 85% of copy bandwidth on 32x256x56x56 over the channel axis.

    PYTHONPATH=. python benchmarks/bench_softmax.py [--backend cpu|cuda] [--quick]

On cpu the peer is PyTorch on the CPU (numpy where torch is not installed).
"""
from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import membound  # noqa: E402

import pymetalnn as pm  # noqa: E402
from pymetalnn import functional as F  # noqa: E402


def np_softmax(x: np.ndarray, dim: int, log: bool) -> np.ndarray:
    m = x.max(axis=dim, keepdims=True)
    e = np.exp(x - m)
    s = e.sum(axis=dim, keepdims=True)
    return (x - m - np.log(s)) if log else e / s


def np_softmax_bwd(g: np.ndarray, y: np.ndarray, dim: int, log: bool) -> np.ndarray:
    if log:
        return g - np.exp(y) * g.sum(axis=dim, keepdims=True)
    return y * (g - (g * y).sum(axis=dim, keepdims=True))


def bench_op(dev: pm.Device, x_np: np.ndarray, g_np: np.ndarray, dim: int, log: bool,
             quick: bool) -> list[dict]:
    x, g = pm.tensor(x_np, dev), pm.tensor(g_np, dev)
    dtype, shape, nbytes = x_np.dtype, x_np.shape, x.nbytes
    copy = common.copy_gbs(dev, nbytes)
    target = ">= 0.85 of copy" if shape == (32, 256, 56, 56) else "-"
    name = "log_softmax" if log else "softmax"
    fwd = F.log_softmax if log else F.softmax
    bwd = F.log_softmax_backward_from_output if log else F.softmax_backward_from_output
    y = fwd(x, dim)
    dx = bwd(g, y, dim)
    sec_f, spr_f = common.time_on(dev, lambda: fwd(x, dim), quick)
    sec_b, spr_b = common.time_on(dev, lambda: bwd(g, y, dim), quick)
    peer = peer_f = peer_b = None
    if common.torch_available(dev):
        xt, gt, yt = (common.torch_view(dev, t) for t in (x, g, y))
        if xt is not None:
            import torch

            tf = torch.log_softmax if log else torch.softmax
            tb = torch._log_softmax_backward_data if log else torch._softmax_backward_data
            err = (tf(xt, dim).float() - yt.float()).abs().max().item()
            assert err < (2e-2 if dtype == np.float16 else 1e-4), (name, err)
            peer = "torch"
            peer_f, _ = common.time_on(dev, lambda: tf(xt, dim), quick)
            peer_b, _ = common.time_on(dev, lambda: tb(gt, yt, dim, yt.dtype), quick)
    else:
        xf, gf = x_np.astype(np.float32), g_np.astype(np.float32)
        yf = y.numpy().astype(np.float32)
        assert np.abs(np_softmax(xf, dim, log) - yf).max() < 1e-2
        assert np.abs(np_softmax_bwd(gf, yf, dim, log) - dx.numpy().astype(np.float32)).max() < 5e-2
        peer = "numpy"
        peer_f, _ = common.time_on(dev, lambda: np_softmax(xf, dim, log), quick)
        peer_b, _ = common.time_on(dev, lambda: np_softmax_bwd(gf, yf, dim, log), quick)
    return [membound.row(f"{name} fwd dim={dim}", dev, dtype, shape, 2 * nbytes, sec_f, spr_f,
                         copy, peer, peer_f, target),
            membound.row(f"{name} bwd dim={dim}", dev, dtype, shape, 3 * nbytes, sec_b, spr_b,
                         copy, peer, peer_b, target)]


def bench_case(dev: pm.Device, shape: tuple, dim: int, dtype, quick: bool) -> list[dict]:
    rng = np.random.default_rng(0)
    x_np = (rng.standard_normal(shape) * 2).astype(dtype)
    g_np = rng.standard_normal(shape).astype(dtype)
    return bench_op(dev, x_np, g_np, dim, False, quick) + bench_op(dev, x_np, g_np, dim, True, quick)


def main() -> int:
    args = common.parser(__doc__).parse_args()
    dev = pm.device(args.backend)
    common.disable_tf32()
    if dev.name == "cuda":
        cases = [((32, 256, 56, 56), 1), ((4096, 1000), 1)] if not args.quick else \
            [((8, 64, 56, 56), 1), ((1024, 1000), 1)]
    else:
        cases = [((4, 64, 14, 14), 1), ((256, 1000), 1)] if args.quick else \
            [((8, 64, 28, 28), 1), ((1024, 1000), 1)]
    rows: list[dict] = []
    for shape, dim in cases:
        for dtype in (np.float32, np.float16):
            rows.extend(bench_case(dev, shape, dim, dtype, args.quick))
    common.report(rows, membound.COLUMNS, f"softmax_{dev.name}", f"# softmax on {common.device_label(dev)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
