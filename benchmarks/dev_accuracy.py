"""Accuracy of every float32 conv algorithm against float64 on the bench_conv.py shapes: the tiled
(direct) kernels and each eligible Winograd variant (F(2x2, 3x3), F(4x4, 3x3), F(2x2, 5x5)), for
the forward, input gradient and weight gradient, with each variant's error over the tiled
kernels' on the same inputs and its standing against the fp32 accuracy budget (docs/accuracy.md,
pymetalnn/accuracy.py: within 10x of the tiled kernels' error and 1e-4 of max|reference|). The
table conv.WINOGRAD_MODES["budget"] must only hold variants marked ok here, on every backend.

rounding error is algorithmic, so the cpu backend shows the magnitudes cuda does, within the
differences of summation order (split counts follow the device's size).

    PYTHONPATH=. python benchmarks/dev_accuracy.py [--backend cpu|cuda] [--quick] [--seeds 3]
                                                   [--shape resnet-3x3 ...]

--quick shrinks the batch to 4 (shorter weight-gradient reductions: smaller errors than the
benchmark's). Without --shape only the Winograd-eligible shapes run. Exit status 1 when a
variant of the default selection is over budget on some shape and seed.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_conv  # noqa: E402
import common  # noqa: E402

import pymetalnn  # noqa: E402
from pymetalnn import accuracy  # noqa: E402
from pymetalnn.ops import conv as ops  # noqa: E402
from pymetalnn.ops import conv_winograd as wino  # noqa: E402

OPS = {"fwd": "fwd", "input_grad": "data", "weight_grad": "weight"}  # bench op -> FORCE kind


def measure(dev: pymetalnn.Device, s: tuple, seed: int) -> list[dict]:
    """Rows (shape, op, variant, err, x_direct, budget, default) of one shape and seed."""
    saved = ops.WINOGRAD
    rows = []
    ops.set_winograd("off")
    try:
        p = bench_conv.Problem(dev, s, "float", seed=seed)
        ref = bench_conv.reference64(dev, p)
        direct = {}
        for op in OPS:
            p.run(op)
            direct[op] = accuracy.rel_err(p.result(op), ref[op])
            rows.append({"shape": s[0], "seed": seed, "op": op, "variant": "tiled",
                         "err": direct[op], "x_direct": 1.0,
                         "budget": common.budget_mark(direct[op], direct[op])})
        r = p.geo.KH
        for m in (2, 4):
            if not wino.eligible(p.geo, "float", m):
                continue
            ops.FORCE = {kind: f"wino{m}" for kind in OPS.values()}
            try:
                pw = bench_conv.Problem(dev, s, "float", seed=seed)
            finally:
                ops.FORCE = {}
            for op, kind in OPS.items():
                pw.run(op)
                err = accuracy.rel_err(pw.result(op), ref[op])
                rows.append({"shape": s[0], "seed": seed, "op": op, "variant": f"F({m}x{m},{r}x{r})",
                             "err": err, "x_direct": err / direct[op],
                             "budget": common.budget_mark(err, direct[op]),
                             "default": "yes" if ops.WINOGRAD_MODES["budget"][kind].get(r) == m
                             else "fast" if ops.WINOGRAD_MODES["fast"][kind].get(r) == m else "no"})
    finally:
        ops.WINOGRAD = saved
    return rows


def main() -> int:
    ap = common.parser(__doc__, quick_help="batch 4")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--shape", nargs="*", default=None, help="names of bench_conv shapes")
    args = ap.parse_args()
    dev = pymetalnn.device(args.backend)
    shapes = [s for s in bench_conv.SHAPES
              if (s[0] in args.shape if args.shape else s[6][0] == s[6][1] and s[7] == 1
                  and s[6][0] in (3, 5))]
    if args.quick:
        shapes = [(s[0], 4, *s[2:]) for s in shapes]
    print(f"fp32 conv accuracy vs float64 on {common.device_label(dev)}")
    rows = []
    for s in shapes:
        for seed in range(args.seeds):
            for r in measure(dev, s, seed):
                print(f"  {r['shape']:16s} {r['op']:12s} {r['variant']:12s} err {r['err']:.2e} "
                      f"({r['x_direct']:.1f}x) {r['budget']}", flush=True)
                r["backend"] = common.device_label(dev)
                rows.append(r)
    common.report(rows, ["shape", "seed", "op", "variant", "err", "x_direct", "budget", "default",
                         "backend"], f"dev_accuracy_{dev.name}{'_quick' if args.quick else ''}")
    bad = [r for r in rows if r.get("default") == "yes" and r["budget"] != "ok"]
    for r in bad:
        print(f"DEFAULT OVER BUDGET: {r['shape']} {r['op']} {r['variant']} seed {r['seed']}: "
              f"{r['err']:.3g} ({r['x_direct']:.1f}x the tiled kernels')")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
