"""Dropout benchmarks (kernels/dropout.metal): GB/s of x read + y written (the mask is recomputed,
never stored), the ratio to copy bandwidth measured in the same run (target >= 0.85, reported, not
asserted) and PyTorch's time for the same op on the same device (the GPU, or the CPU for the cpu
backend; numpy without torch). Peers store a mask
in the forward and read it in the backward (torch's native_dropout / native_dropout_backward);
their extra bytes are not counted in our GB/s.

Shape: 32x256x56x56, p = 0.5; --quick: 4x32x20x20.

    PYTHONPATH=. python benchmarks/bench_dropout.py [--backend cpu|cuda] [--quick]
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

P = 0.5


def cases(dev: pymetalnn.Device, quick: bool, dtype) -> list[dict]:
    shape = (4, 32, 20, 20) if quick else (32, 256, 56, 56)
    r = np.random.default_rng(0)
    n = int(np.prod(shape))
    isz = np.dtype(dtype).itemsize
    x_np = r.standard_normal(shape).astype(dtype)
    x = pymetalnn.tensor(x_np, dev)
    copy = common.copy_gbs(dev, n * isz)
    ours = {
        "dropout": lambda: F.dropout(x, P, seed=1, offset=0),
        "dropout_bwd": lambda: F.dropout_backward(x, P, seed=1, offset=0),
        "dropout2d": lambda: F.dropout2d(x, P, seed=1, offset=0),
        "dropout2d_bwd": lambda: F.dropout2d_backward(x, P, seed=1, offset=0),
    }
    peers: dict = {}
    peer_name = "-"
    if common.torch_available(dev):
        import torch

        tx = common.torch_view(dev, x)
        _, mask = torch.ops.aten.native_dropout(tx, P, True)
        # dropout2d's gradient in torch's autograd: grad times the saved per-channel mask * scale
        m2 = ((torch.rand(shape[:2] + (1, 1), device=tx.device) >= P) / (1 - P)).to(tx.dtype)
        o2 = torch.empty_like(tx)
        peers = {
            "dropout": lambda: torch.ops.aten.native_dropout(tx, P, True),
            "dropout_bwd": lambda: torch.ops.aten.native_dropout_backward(tx, mask, 1 / (1 - P)),
            "dropout2d": lambda: torch.nn.functional.dropout2d(tx, P, training=True),
            "dropout2d_bwd": lambda: torch.mul(tx, m2, out=o2),
        }
        peer_name = "torch"
    elif dev.name == "cpu":
        rng = np.random.default_rng(1)
        keep = rng.random(shape) >= P
        scale = dtype(1 / (1 - P))
        keep2d = ((rng.random(shape[:2] + (1, 1)) >= P) * scale).astype(dtype)
        peers = {
            "dropout": lambda: np.where(rng.random(shape) >= P, x_np * scale, dtype(0)),
            "dropout_bwd": lambda: np.where(keep, x_np * scale, dtype(0)),
            "dropout2d": lambda: x_np * ((rng.random(shape[:2] + (1, 1)) >= P) * scale).astype(dtype),
            "dropout2d_bwd": lambda: x_np * keep2d,
        }
        peer_name = "numpy"
    return [membound.case(dev, name, dtype, shape, 2 * n * isz, copy, fn, peers.get(name), peer_name)
            for name, fn in ours.items()]


def main() -> int:
    return membound.run_dtypes("dropout", __doc__, cases)


if __name__ == "__main__":
    raise SystemExit(main())
