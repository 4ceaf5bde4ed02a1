"""Sweep of the simdgroup-matrix GEMM tiles (gemm_mma, gemm_mma2) on fp16, each validated against
float64 on sampled rows and timed, with torch.matmul fp16 (cuBLAS) in the same run on cuda; then
the fp16 convolutions (benchmarks/bench_conv.py's shapes) with each generation of matrix tiles
(ops.conv.MMA_GEN 1: 8x8 products, 2: 16-deep tile products) against float64 and cuDNN fp16.

GEMM shapes: square 4096^3 and 8192^3, and the fp16 linear layer 4096 -> 4096 at batch 256:
forward (x W^T), input gradient (g W) and weight gradient (g^T x).

    PYTHONPATH=. python benchmarks/dev_gemm_mma.py --backend cuda
"""
from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_conv  # noqa: E402
import common  # noqa: E402

import pymetalnn  # noqa: E402
from pymetalnn import accuracy  # noqa: E402
from pymetalnn import functional as F  # noqa: E402
from pymetalnn.ops import conv as conv_ops  # noqa: E402
from pymetalnn.ops import gemm as ops  # noqa: E402

# label, M, N, K, transpose_a, transpose_b
SHAPES = [("4096^3", 4096, 4096, 4096, False, False),
          ("linear-fwd", 256, 4096, 4096, False, True),
          ("linear-grad_x", 256, 4096, 4096, False, False),
          ("linear-grad_w", 4096, 4096, 256, True, False),
          ("8192^3", 8192, 8192, 8192, False, False)]
QUICK = [("256x128x64", 256, 128, 64, False, False), ("130x96x80-tn", 130, 96, 80, True, True)]
CONV_OPS = ("fwd", "input_grad", "weight_grad")


def gemm_rows(dev: pymetalnn.Device, shapes: list[tuple], torch) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for label, m, n, k, ta, tb in shapes:
        a = rng.standard_normal((k, m) if ta else (m, k)).astype(np.float16)
        b = rng.standard_normal((n, k) if tb else (k, n)).astype(np.float16)
        ta_, tb_ = pymetalnn.tensor(a, dev), pymetalnn.tensor(b, dev)
        out = pymetalnn.empty((m, n), np.float16, dev)
        opa = (a.T if ta else a).astype(np.float64)
        opb = (b.T if tb else b).astype(np.float64)
        ri = rng.choice(m, 8, replace=False)
        want = opa[ri] @ opb
        scale = float((np.abs(opa[ri]) @ np.abs(opb)).max())
        peer = None
        if torch is not None:
            at = torch.as_tensor(dev.as_cupy(ta_.buffer, ta_.dtype, ta_.shape), device="cuda")
            bt = torch.as_tensor(dev.as_cupy(tb_.buffer, tb_.dtype, tb_.shape), device="cuda")
            at, bt = (at.t() if ta else at), (bt.t() if tb else bt)
            peer = common.time_cuda(lambda at=at, bt=bt: torch.matmul(at, bt), warmup=2, reps=10)[0]
        for tile in [t for t in ops.TILES if ops.TILES[t].supports("half")]:
            for acc in ("float", "half"):
                def fn(tile=tile, acc=acc, ta_=ta_, tb_=tb_, out=out, ta=ta, tb=tb):
                    F.gemm(ta_, tb_, out, transpose_a=ta, transpose_b=tb, tile=tile,
                           accumulate=acc)
                fn()
                err = float(np.abs(out.numpy()[ri].astype(np.float64) - want).max()) / scale
                if dev.name == "cuda":
                    med = common.time_cuda(fn, warmup=2, reps=10)[0]
                else:
                    med = common.time_host(fn, dev.synchronize, warmup=1, reps=3)[0]
                splits = ops.plan(dev, m, n, k, 1, False, tile, None, "half")[1]
                row = {"shape": label, "tile": tile, "acc": acc, "splits": splits,
                       "ms": med * 1e3, "TFLOP/s": 2.0 * m * n * k / med / 1e12, "err": err}
                if peer is not None:
                    row["torch_ms"] = peer * 1e3
                    row["x_peer"] = peer / med
                rows.append(row)
    return rows


def conv_rows(dev: pymetalnn.Device, quick: bool) -> list[dict]:
    """Each bench_conv shape's fp16 forward, input and weight gradient with matrix tiles of
    generation 1 and 2 (the automatic tile choice within each)."""
    shapes = [bench_conv.quick_shape(s) for s in bench_conv.SHAPES[:2]] if quick else bench_conv.SHAPES
    saved_hw, saved_gen = getattr(dev, "simdgroup_matrix", None), conv_ops.MMA_GEN
    dev.simdgroup_matrix = True  # the cpu (quick runs) too: this sweep is about the matrix tiles
    rows = []
    try:
        for s in shapes:
            probs = {}
            for gen in (1, 2):
                conv_ops.MMA_GEN = gen
                probs[gen] = bench_conv.Problem(dev, s, "half")
            ref = bench_conv.reference64(dev, probs[1])
            peer = bench_conv.torch_ops(dev, probs[1]) if dev.name == "cuda" else None
            fl = bench_conv.flops(s)
            for op in CONV_OPS:
                peer_s = common.time_cuda(peer[op], warmup=2, reps=10)[0] if peer else None
                for gen, p in probs.items():
                    p.run(op)
                    err = accuracy.rel_err(p.result(op), ref[op])
                    if dev.name == "cuda":
                        med = common.time_cuda(lambda p=p, op=op: p.run(op), warmup=2, reps=10)[0]
                    else:
                        med = common.time_host(lambda p=p, op=op: p.run(op), dev.synchronize,
                                               warmup=1, reps=2)[0]
                    row = {"shape": s[0], "op": op, "gen": gen, "kernels": p.kernels(op),
                           "ms": med * 1e3, "TFLOP/s": fl / med / 1e12, "err": err}
                    if peer_s is not None:
                        row["torch_ms"] = peer_s * 1e3
                        row["x_peer"] = peer_s / med
                    rows.append(row)
    finally:
        conv_ops.MMA_GEN = saved_gen
        dev.simdgroup_matrix = saved_hw
    return rows


def main() -> int:
    args = common.parser(__doc__, quick_help="small shapes (any backend)").parse_args()
    dev = pymetalnn.device(args.backend)
    torch = common.cuda_torch(dev)
    quick = args.quick or dev.name != "cuda"
    common.report(gemm_rows(dev, QUICK if quick else SHAPES, torch),
                  ["shape", "tile", "acc", "splits", "ms", "TFLOP/s", "err", "torch_ms", "x_peer"],
                  f"dev_gemm_mma_{dev.name}")
    common.report(conv_rows(dev, quick),
                  ["shape", "op", "gen", "kernels", "ms", "TFLOP/s", "err", "torch_ms", "x_peer"],
                  f"dev_gemm_mma_conv_{dev.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
