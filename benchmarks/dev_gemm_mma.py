"""Sweep of the simdgroup-matrix GEMM tiles (gemm_mma) on fp16, each validated against float64 on
sampled rows and timed, with torch.matmul fp16 (cuBLAS) in the same run on cuda.

    PYTHONPATH=. python benchmarks/dev_gemm_mma.py --backend cuda
"""
from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import pymetalnn  # noqa: E402
from pymetalnn import functional as F  # noqa: E402
from pymetalnn.ops import gemm as ops  # noqa: E402

SHAPES = [(4096, 4096, 4096), (256, 4096, 4096), (8192, 8192, 8192)]


def main() -> int:
    args = common.parser(__doc__, quick_help="1024^3 only").parse_args()
    dev = pymetalnn.device(args.backend)
    torch = common.cuda_torch(dev)
    shapes = [(1024, 1024, 1024)] if args.quick or dev.name != "cuda" else SHAPES
    rng = np.random.default_rng(0)
    rows = []
    for m, n, k in shapes:
        a = rng.standard_normal((m, k)).astype(np.float16)
        b = rng.standard_normal((k, n)).astype(np.float16)
        ta, tb = pymetalnn.tensor(a, dev), pymetalnn.tensor(b, dev)
        out = pymetalnn.empty((m, n), np.float16, dev)
        ri = rng.choice(m, 8, replace=False)
        want = a[ri].astype(np.float64) @ b.astype(np.float64)
        scale = float((np.abs(a[ri]).astype(np.float64) @ np.abs(b).astype(np.float64)).max())
        peer = None
        if torch is not None:
            at = torch.as_tensor(dev.as_cupy(ta.buffer, ta.dtype, ta.shape), device="cuda")
            bt = torch.as_tensor(dev.as_cupy(tb.buffer, tb.dtype, tb.shape), device="cuda")
            peer = common.time_cuda(lambda at=at, bt=bt: torch.matmul(at, bt), warmup=2, reps=10)[0]
        for tile in [t for t in ops.TILES if ops.TILES[t].supports("half")]:
            for acc in ("float", "half"):
                def fn(tile=tile, acc=acc, ta=ta, tb=tb, out=out):
                    F.gemm(ta, tb, out, tile=tile, accumulate=acc)
                fn()
                err = float(np.abs(out.numpy()[ri].astype(np.float64) - want).max()) / scale
                if dev.name == "cuda":
                    med = common.time_cuda(fn, warmup=2, reps=10)[0]
                else:
                    med = common.time_host(fn, dev.synchronize, warmup=1, reps=3)[0]
                row = {"shape": f"{m}x{n}x{k}", "tile": tile, "acc": acc, "ms": med * 1e3,
                       "TFLOP/s": 2.0 * m * n * k / med / 1e12, "err": err}
                if peer is not None:
                    row["torch_ms"] = peer * 1e3
                    row["x_peer"] = peer / med
                rows.append(row)
    common.report(rows, ["shape", "tile", "acc", "ms", "TFLOP/s", "err", "torch_ms", "x_peer"],
                  f"dev_gemm_mma_{dev.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
