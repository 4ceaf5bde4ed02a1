"""Embedding benchmarks (kernels/embedding.metal): GB/s of the rows gathered (forward: read and
write n x D) and scattered (backward: read dy, write the touched rows; the host's sort of the
indices is included in our time, the weight-gradient zero fill too), and PyTorch's time for the
same op on the same GPU (numpy indexing / np.add.at on cpu).

Shapes: 32000 x 1024 table, 8192 indices (a language model's batch of tokens); --quick:
1000 x 256, 512 indices.

    PYTHONPATH=. python benchmarks/bench_embedding.py [--backend cpu|cuda] [--quick]
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
    v, d, n = (1000, 256, 512) if quick else (32000, 1024, 8192)
    rng = np.random.default_rng(0)
    idx_np = rng.integers(0, v, n).astype(np.int32)
    w_np = rng.standard_normal((v, d)).astype(dtype)
    g_np = rng.standard_normal((n, d)).astype(dtype)
    idx, w, g = pymetalnn.tensor(idx_np, dev), pymetalnn.tensor(w_np, dev), pymetalnn.tensor(g_np, dev)
    isz = np.dtype(dtype).itemsize
    copy = common.copy_gbs(dev, n * d * isz)
    ours = {"embedding": lambda: F.embedding(idx, w),
            "embedding_bwd": lambda: F.embedding_backward(g, idx, w)}
    peers: dict = {}
    peer_name = "-"
    if common.torch_available(dev):
        import torch

        ti, tw, tg = (common.torch_view(dev, t) for t in (idx, w, g))
        ti = ti.long()
        peers = {"embedding": lambda: torch.nn.functional.embedding(ti, tw),
                 "embedding_bwd": lambda: torch.ops.aten.embedding_dense_backward(tg, ti, v, -1, False)}
        peer_name = "torch"
    elif dev.name == "cpu":
        def np_bwd() -> np.ndarray:
            out = np.zeros((v, d), dtype)
            np.add.at(out, idx_np, g_np)
            return out

        peers = {"embedding": lambda: w_np[idx_np], "embedding_bwd": np_bwd}
        peer_name = "numpy"
    return [membound.case(dev, name, dtype, (n, d), 2 * n * d * isz, copy, fn, peers.get(name), peer_name)
            for name, fn in ours.items()]


def main() -> int:
    return membound.run_dtypes("embedding", __doc__, cases)


if __name__ == "__main__":
    raise SystemExit(main())
