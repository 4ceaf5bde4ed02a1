"""Arithmetic family benchmarks (kernels/arith.metal): memory-bound, so GB/s of the bytes each op
must move (every input read once, every output written once), the ratio to copy bandwidth
measured in the same run (target >= 0.85, reported, not asserted) and PyTorch's time for the same
op on the same GPU (numpy on cpu).

Shapes: x, g of 32x256x56x56 (a ResNet stage-1 activation), w of 1x256x1x1 (per channel);
--quick: 4x32x20x20 (cpu too).

    PYTHONPATH=. python benchmarks/bench_arith.py [--backend cpu|cuda] [--quick]
"""
from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import membound  # noqa: E402

import pymetalnn  # noqa: E402
from pymetalnn import functional as F  # noqa: E402


def cases(dev: pymetalnn.Device, quick: bool, dtype) -> list[dict]:
    shape = (4, 32, 20, 20) if quick else (32, 256, 56, 56)
    r = np.random.default_rng(0)
    n = int(np.prod(shape))
    isz = np.dtype(dtype).itemsize
    wshape = (1, shape[1], 1, 1)
    a_np = r.standard_normal(shape).astype(dtype)
    b_np = (r.standard_normal(shape) + 4).astype(dtype)
    w_np = (r.standard_normal(wshape) + 4).astype(dtype)
    a, b, g, w = (pymetalnn.tensor(v, dev) for v in (a_np, b_np, a_np * dtype(0.5), w_np))
    copy = common.copy_gbs(dev, n * isz)
    torch_ok = common.torch_available(dev)
    rows = []
    if torch_ok:
        import torch

        ta, tb, tg, tw = (common.torch_view(dev, t) for t in (a, b, g, w))
        to, to2 = torch.empty_like(ta), torch.empty_like(ta)
        peers = {
            "add": lambda: torch.add(ta, tb, out=to),
            "mul_bias": lambda: torch.mul(ta, tw, out=to),
            "div": lambda: torch.div(ta, tb, out=to),
            "add_bwd": lambda: (to.copy_(tg), to2.copy_(tg)),
            "mul_bwd": lambda: (torch.mul(tg, tb, out=to), torch.mul(tg, ta, out=to2)),
            "mul_bias_bwd": lambda: (torch.mul(tg, tw, out=to), (tg * ta).sum((0, 2, 3), keepdim=True)),
            "sum_bias": lambda: torch.sum(tg, (0, 2, 3), keepdim=True),
            "mean_all": lambda: torch.mean(tg),
            "sum_bwd": lambda: to.copy_(tw.expand(shape)),
        }
        peer_name = "torch"
    elif dev.name == "cpu":
        o, o2 = np.empty_like(a_np), np.empty_like(a_np)
        ga = a_np * dtype(0.5)
        peers = {
            "add": lambda: np.add(a_np, b_np, out=o),
            "mul_bias": lambda: np.multiply(a_np, w_np, out=o),
            "div": lambda: np.divide(a_np, b_np, out=o),
            "add_bwd": lambda: (np.copyto(o, ga), np.copyto(o2, ga)),
            "mul_bwd": lambda: (np.multiply(ga, b_np, out=o), np.multiply(ga, a_np, out=o2)),
            "mul_bias_bwd": lambda: (np.multiply(ga, w_np, out=o),
                                     np.sum(ga * a_np, (0, 2, 3), keepdims=True, dtype=np.float32)),
            "sum_bias": lambda: np.sum(ga, (0, 2, 3), keepdims=True, dtype=np.float32),
            "mean_all": lambda: np.mean(ga, dtype=np.float32),
            "sum_bwd": lambda: np.copyto(o, np.broadcast_to(w_np, shape)),
        }
        peer_name = "numpy"
    else:
        peers, peer_name = {}, "-"
    ours = {
        "add": (lambda: F.add(a, b), 3 * n),
        "mul_bias": (lambda: F.mul(a, w), 2 * n),
        "div": (lambda: F.div(a, b), 3 * n),
        "add_bwd": (lambda: F.add_backward(g, a, b), 3 * n),
        "mul_bwd": (lambda: F.mul_backward(g, a, b), 5 * n),
        "mul_bias_bwd": (lambda: F.mul_backward(g, a, w), 4 * n),
        "sum_bias": (lambda: F.sum(g, (0, 2, 3), keepdim=True), n),
        "mean_all": (lambda: F.mean(g), n),
        "sum_bwd": (lambda: F.sum_backward(w, a, (0, 2, 3), keepdim=True), n),
    }
    for name, (fn, elems) in ours.items():
        rows.append(membound.case(dev, name, dtype, shape, elems * isz, copy, fn, peers.get(name),
                                  peer_name))
    return rows


def main() -> int:
    return membound.run_dtypes("arith", __doc__, cases)


if __name__ == "__main__":
    raise SystemExit(main())
