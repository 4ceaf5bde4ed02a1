"""Kernel-version shoot-out for the conv family: every version of every op, validated against the
numpy reference and timed against PyTorch (cuDNN, TF32 off) on the bench_conv.py shapes.

Versions (kernels/conv.metal templates, instantiated in kernels/dev/conv_tiles.metal):
  forward / input gradient: direct (one output per thread); t128x64u, the first tiled version
  (weights read in place); tiled with packed weights t<BM>x<BN>, BK = 8 (t128x64, t128x128,
  t64x64, t128x32) and BK = 16 (...k16; t128x64k16 and t128x32k16 are production tiles since the
  H200 sweep of 2026-11-26); and `auto` (what the op picks).
  weight gradient: t64x64, t64x128, t128x128 (BK 16, 16, 8), t64x64k8, t128x128k16, rows (the
  row-staged kernel, float32 with horizontal stride 1, version 3: narrow output rows packed
  several to a segment; the default tiles elsewhere), rows_v1 / rows_v2 (kernels/dev/
  conv_rows.metal: one row per segment; v2 with its pixel loop unrolled by KW), auto.
conv_transpose2d forward runs the input-gradient kernel, so its versions are those.
Each version is first checked on batch 1 of the shape against the float64 reference (a failing
version prints FAIL and is not timed), then timed on the full shape.

    PYTHONPATH=. python benchmarks/dev_conv.py [--backend cuda] [--quick] [--precision float ...]
                                               [--shape resnet-3x3 ...] [--op weight_grad ...]
                                               [--versions rows rows_v1 ...]

Output: one row per (shape, op, precision) with GFLOP/s of each version, the best version, and
PyTorch's GFLOP/s and the best ratio; results/dev_conv_<backend>.json has every timing. To
promote a version, set its row in TILES (pymetalnn/ops/conv.py; the throughput column steers the
tile choice) and instantiate it in kernels/conv.metal.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
import bench_conv  # noqa: E402
import common  # noqa: E402
from reference import conv as ref  # noqa: E402

import pymetalnn  # noqa: E402
from pymetalnn.ops import conv as ops  # noqa: E402

DEV_SOURCE = "dev/conv_tiles.metal"
DEV_TILES = {
    "fwd": {"t128x64u": (128, 64, 8, 8, 4, 1.0), "t128x128k16": (128, 128, 16, 8, 8, 1.0)},
    "weight": {"t64x64k8": (64, 64, 8, 4, 4, 1.0), "t128x128k16": (128, 128, 16, 8, 8, 1.0)},
}
FWD_VERSIONS = ["direct", "t128x64u", "t128x64", "t128x128", "t64x64", "t128x32", "t128x64k16", "t128x128k16",
                "t128x32k16", "auto"]
WEIGHT_VERSIONS = ["t64x64", "t64x128", "t128x128", "t64x64k8", "t128x128k16", "rows", "rows_v1",
                   "rows_v2", "auto"]
KIND = {"fwd": "fwd", "input_grad": "data", "conv_transpose2d": "data", "weight_grad": "weight"}
TOL = {"float": 1e-5, "half": 2e-3, "hacc_half": 5e-2}  # relative to each output's |terms| sum


PROD_TILES = ops.TILES
ALL_TILES = {kind: {**tiles, **DEV_TILES.get("fwd" if kind == "data" else kind, {})}
             for kind, tiles in PROD_TILES.items()}


def use_version(kind: str, v: str) -> None:
    """Force version v of the `kind` kernels (auto: the production tiles and choice; rows_vN:
    version N of the row-staged weight gradient, kernels/dev/conv_rows.metal)."""
    ops.TILES = PROD_TILES if v == "auto" else ALL_TILES
    ops.ROWS_DEV = v[len("rows_"):] if v.startswith("rows_") else ""
    ops.FORCE = {} if v == "auto" else {kind: "rows" if v.startswith("rows") else v}


def references(s: tuple, prec: str) -> tuple[bench_conv.Problem, dict, dict]:
    """Batch-1 problem of shape s on the host and its float64 results and error scales."""
    _, _, c, k, h, w, (kh, kw), st, (ph, pw) = s
    rng = np.random.default_rng(1)
    dtype = bench_conv.PRECISIONS[prec][0]
    g = ops._conv_geometry((1, c, h, w), (k, c, kh, kw), st, (ph, pw), 1, 1)
    a = {"x": rng.uniform(-1, 1, (1, c, h, w)).astype(dtype),
         "w": rng.uniform(-1, 1, (k, c, kh, kw)).astype(dtype),
         "b": rng.uniform(-1, 1, (k,)).astype(dtype),
         "gy": rng.uniform(-1, 1, (1, k, g.OH, g.OW)).astype(dtype)}
    kw_ref = dict(stride=(st, st), pad=(ph, ph, pw, pw), dilation=(1, 1), groups=1)
    want, scale = {}, {}
    want["fwd"] = ref.conv2d(a["x"], a["w"], a["b"], **kw_ref)
    scale["fwd"] = (ref.conv2d_abs(a["x"], a["w"], **kw_ref)
                    + np.abs(a["b"].astype(np.float64))[None, :, None, None])
    gx, gw, _ = ref.conv2d_backward(a["gy"], a["x"], a["w"], False, **kw_ref)
    sx, sw, _ = ref.conv2d_backward(np.abs(a["gy"]), np.abs(a["x"]), np.abs(a["w"]), False, **kw_ref)
    want["input_grad"], want["weight_grad"], want["conv_transpose2d"] = gx, gw, gx
    scale["input_grad"], scale["weight_grad"], scale["conv_transpose2d"] = sx, sw, sx
    return a, want, scale


class Small(bench_conv.Problem):
    """A Problem whose host arrays are given (the batch-1 validation problem)."""

    def __init__(self, dev, s, prec, source, arrays):
        super().__init__(dev, (s[0], 1, *s[2:]), prec, source)
        for name, arr in arrays.items():
            self.t[name].buffer.write(arr)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["cpu", "cuda", "metal"], default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--precision", nargs="*", default=list(bench_conv.PRECISIONS),
                    choices=list(bench_conv.PRECISIONS))
    ap.add_argument("--shape", nargs="*", default=None)
    ap.add_argument("--op", nargs="*", default=list(bench_conv.OPS), choices=list(bench_conv.OPS))
    ap.add_argument("--versions", nargs="*", default=None, help="only these versions (and auto)")
    args = ap.parse_args()
    dev = pymetalnn.device(args.backend)
    shapes = [bench_conv.quick_shape(s) if args.quick else s for s in bench_conv.SHAPES
              if args.shape is None or s[0] in args.shape]
    print(f"conv kernel versions on {common.device_label(dev)}", flush=True)
    rows, table = [], []
    for s in shapes:
        fl = bench_conv.flops(s)
        for prec in args.precision:
            arrays, want, scale = references(s, prec)
            for op in args.op:
                versions = WEIGHT_VERSIONS if op == "weight_grad" else FWD_VERSIONS
                versions = [v for v in versions if args.versions is None or v in args.versions]
                line = {"shape": s[0], "op": op, "prec": prec}
                best, best_sec = None, float("inf")
                for v in versions:
                    use_version(KIND[op], v)
                    small = Small(dev, s, prec, DEV_SOURCE, arrays)
                    small.run(op)
                    got = small.result(op).astype(np.float64)
                    err = float((np.abs(got - want[op]) / (scale[op] + 1e-7)).max())
                    rec = {"shape": s[0], "op": op, "prec": prec, "version": v,
                           "kernels": small.kernels(op), "err": err}
                    if not err <= TOL[prec]:
                        line[v] = "FAIL"
                        rec["status"] = "FAIL"
                        rows.append(rec)
                        print(f"  FAIL {s[0]} {op} {prec} {v}: error {err:.3g} > {TOL[prec]}", flush=True)
                        continue
                    big = bench_conv.Problem(dev, s, prec, DEV_SOURCE)
                    sec, spread = bench_conv.timeit(dev, lambda op=op, big=big: big.run(op), args.quick)
                    rec.update(seconds=sec, spread=spread, gflops=fl / sec / 1e9, kernels=big.kernels(op))
                    rows.append(rec)
                    line[v] = fl / sec / 1e9
                    if v != "auto" and sec < best_sec:
                        best, best_sec = v, sec
                use_version(KIND[op], "auto")
                line["best"] = best
                peer = bench_conv.torch_ops(dev, bench_conv.Problem(dev, s, prec))
                if peer is not None:
                    tsec, _ = bench_conv.timeit(dev, peer[op], args.quick, peer["_sync"])
                    line["torch"] = fl / tsec / 1e9
                    line["best/torch"] = tsec / best_sec if best else None
                    if isinstance(line.get("auto"), float):
                        line["auto/torch"] = line["auto"] / line["torch"]
                table.append(line)
                print("  " + " ".join(f"{k}={common._fmt(v)}" for k, v in line.items()), flush=True)
    print()
    for op_set, versions in (("fwd/input_grad/conv_transpose2d", FWD_VERSIONS),
                             ("weight_grad", WEIGHT_VERSIONS)):
        sel = [r for r in table if (r["op"] == "weight_grad") == (op_set == "weight_grad")]
        if sel:
            print(f"GFLOP/s, {op_set} ({common.device_label(dev)}):")
            common.print_table(sel, ["shape", "op", "prec", *versions, "best", "torch", "best/torch",
                                     "auto/torch"])
            print()
    print("results:", common.write_results(f"dev_conv_{dev.name}", rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
