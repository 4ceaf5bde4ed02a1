"""Per-layer conv sweep of InceptionV3's training step: every convolution of the model (batch 32,
299x299) in forward, input gradient and weight gradient, each tile version of ours against cuDNN
(PyTorch, TF32 off, cudnn.benchmark) on the same GPU in the same run.

Why: the InceptionV3 demo's step time is 75% convolution, on shapes the classic-layer sweep of
dev_conv.py does not cover (17x17 and 8x8 maps, 1x7/7x1/1x3/3x1 kernels, 768-2048 channels).
This script answers which tile (and, for weight gradients, how many split-reduction threadgroups
per SM) is fastest per layer, what the production choice (`auto`) costs summed over the model,
and where cuDNN is ahead.

    PYTHONPATH=. python benchmarks/dev_inception.py --backend cuda [--batch 32] [--ops fwd ...]

Each version is validated once on a small problem of the shape against the float64 reference
(batch 1) before it is timed; a failing version prints FAIL. Output: per-layer rows (ms per
version), then per-op totals over the model (each layer counted as often as it occurs):
auto, best-per-layer, cuDNN.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections import Counter
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
import bench_conv  # noqa: E402
import common  # noqa: E402
import dev_conv  # noqa: E402

import pymetalnn  # noqa: E402
from pymetalnn.ops import conv as ops  # noqa: E402
from pymetalnn.ops import conv_winograd as wino  # noqa: E402

OPS = ("fwd", "input_grad", "weight_grad")
WEIGHT_SPLITS = (3, 6, 12)  # SPLIT_GROUPS_PER_SM values tried with each weight tile
DEV_WEIGHT = {"t128x64k16": (128, 64, 16, 8, 4, 1.0), "t128x32k16": (128, 32, 16, 4, 4, 1.0),
              "t64x64k32": (64, 64, 32, 4, 4, 1.0)}


class ShapeBuilder:
    """The InceptionV3 architecture function run on shapes: records every conv as a
    bench_conv shape tuple (name, N, C, K, H, W, (KH, KW), stride, (ph, pw))."""

    def __init__(self, n: int):
        self.n = n
        self.convs: list[tuple] = []

    def conv(self, h: tuple, k: int, ks: Any, s: int, p: Any) -> tuple:
        c, hh, ww = h
        kh, kw = (ks, ks) if isinstance(ks, int) else ks
        ph, pw = (p, p) if isinstance(p, int) else p
        name = f"{c}>{k} {hh}x{ww} {kh}x{kw}" + (f" s{s}" if s > 1 else "")
        self.convs.append((name, self.n, c, k, hh, ww, (kh, kw), s, (ph, pw)))
        return (k, (hh + 2 * ph - kh) // s + 1, (ww + 2 * pw - kw) // s + 1)

    def maxpool(self, h: tuple, k: int, s: int) -> tuple:
        return (h[0], (h[1] - k) // s + 1, (h[2] - k) // s + 1)

    def avgpool(self, h: tuple, k: int, s: int, p: int) -> tuple:
        return (h[0], (h[1] + 2 * p - k) // s + 1, (h[2] + 2 * p - k) // s + 1)

    def cat(self, hs: list) -> tuple:
        return (sum(h[0] for h in hs), hs[0][1], hs[0][2])

    def head(self, h: tuple, classes: int) -> tuple:
        return h


def inception_shapes(n: int, size: int = 299) -> list[tuple[tuple, int]]:
    """(shape, occurrences) of every distinct conv of InceptionV3 at batch n."""
    path = os.path.join(os.path.dirname(HERE), "examples", "inception_v3.py")
    spec = importlib.util.spec_from_file_location("inception_v3_example", path)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    b = ShapeBuilder(n)
    mod.inception_v3(b, (3, size, size))
    counts = Counter(b.convs)
    return [(s, counts[s]) for s in dict.fromkeys(b.convs)]


def versions(op: str, s: tuple) -> list[str]:
    _, n, c, k, h, w, ks, st, _ = s
    geo = ops._conv_geometry((n, c, h, w), (k, c, *ks), st, s[8], 1, 1)
    wino = [f"wino{m}" for m in (2, 4) if wino.eligible(geo, "float", m)]
    if op == "weight_grad":
        tiles = [*ops.TILES["weight"], *DEV_WEIGHT]
        return [f"{t}/{w}" for t in tiles for w in WEIGHT_SPLITS] + wino
    kind = dev_conv.KIND[op]
    return list(ops.TILES[kind]) + wino  # direct kernels only serve widths below 16


def use(op: str, v: str) -> None:
    """Force version v of op (auto: production choice)."""
    kind = dev_conv.KIND[op]
    ops.TILES = {k: {**t, **(DEV_WEIGHT if k == "weight" else {})}
                 for k, t in dev_conv.PROD_TILES.items()}
    ops.SPLIT_GROUPS_PER_SM = 6
    if v == "auto":
        ops.TILES = dev_conv.PROD_TILES
        ops.FORCE = {}
        return
    tile, _, split = v.partition("/")
    ops.FORCE = {kind: tile}
    if split:
        ops.SPLIT_GROUPS_PER_SM = int(split)


def plan(p: bench_conv.Problem, op: str) -> list:
    t, g, dev = p.t, p.geo, p.dev
    if op == "fwd":
        return ops.forward_plan(dev, p.prec, g, t["x"], t["w"], t["b"], p.out["fwd"], dev_conv.DEV_SOURCE)
    if op == "input_grad":
        return ops.input_grad_plan(dev, p.prec, g, t["gy"], t["w"], None, p.out["input_grad"],
                                   dev_conv.DEV_SOURCE)
    return ops.weight_grad_plan(dev, p.prec, g, t["gy"], t["x"], p.out["weight_grad"],
                                dev_conv.DEV_SOURCE)


def validate(dev: Any, s: tuple, op: str, v: str, cache: dict) -> float:
    """Max error (relative to the |terms| sum) of version v on batch 1 of shape s."""
    if s not in cache:
        arrays, want, scale = dev_conv.references(s, "float")
        small = dev_conv.Small(dev, s, "float", dev_conv.DEV_SOURCE, arrays)
        cache[s] = (small, want, scale)
    small, want, scale = cache[s]
    use(op, v)
    ops.run(plan(small, op))
    got = small.result(op).astype(np.float64)
    return float((np.abs(got - want[op]) / (scale[op] + 1e-7)).max())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["cpu", "cuda", "metal"], default=None)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=299)
    ap.add_argument("--ops", nargs="*", default=list(OPS), choices=list(OPS))
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--no-validate", action="store_true")
    ap.add_argument("--limit", type=int, default=0, help="only the first N distinct shapes")
    ap.add_argument("--match", default=None, help="only layers whose name contains this")
    args = ap.parse_args()
    dev = pymetalnn.device(args.backend)
    shapes = inception_shapes(args.batch, args.size)
    if args.match:
        shapes = [(s, c) for s, c in shapes if args.match in s[0]]
    if args.limit:
        shapes = shapes[:args.limit]
    print(f"InceptionV3 convs (batch {args.batch}, {args.size}x{args.size}): {len(shapes)} distinct, "
          f"{sum(c for _, c in shapes)} in all, on {common.device_label(dev)}", flush=True)
    rows: list[dict] = []
    totals: dict[str, dict[str, float]] = {op: Counter() for op in args.ops}  # type: ignore[misc]
    vcache: dict = {}
    for s, count in shapes:
        p = bench_conv.Problem(dev, s, "float", dev_conv.DEV_SOURCE)
        peer = bench_conv.torch_ops(dev, p)
        for op in args.ops:
            if op == "input_grad" and s[2] == 3:
                continue  # the graph never takes the image's gradient
            line: dict[str, Any] = {"layer": s[0], "n": count, "op": op}
            best, best_ms = "", float("inf")
            for v in ["auto", *versions(op, s)]:
                if v != "auto" and not args.no_validate:
                    err = validate(dev, s, op, v, vcache)
                    if not err <= dev_conv.TOL["float"]:
                        print(f"  FAIL {s[0]} {op} {v}: error {err:.3g}", flush=True)
                        continue
                use(op, v)
                pl = plan(p, op)
                sec, _ = bench_conv.timeit(dev, lambda pl=pl: ops.run(pl), args.quick)
                ms = sec * 1e3
                line[v] = ms
                if v == "auto":
                    line["auto_kernel"] = "+".join(k.name for k, _, _ in pl)
                elif ms < best_ms:
                    best, best_ms = v, ms
            use(op, "auto")
            line["best"], line["best_ms"] = best, best_ms
            totals[op]["auto"] += count * line["auto"]
            totals[op]["best"] += count * best_ms
            if peer is not None:
                tsec, _ = bench_conv.timeit(dev, peer[op], args.quick, peer["_sync"])
                line["torch"] = tsec * 1e3
                totals[op]["torch"] += count * line["torch"]
            for tag, pick in (("auto|wino2", ("wino2",)), ("auto|wino4", ("wino4",)),
                              ("auto|best-wino", ("wino2", "wino4"))):
                totals[op][tag] += count * min([line["auto"]] + [line[v] for v in pick if v in line])
            for v in versions(op, s):
                if v in line:
                    totals[op][v] += count * line[v]
            rows.append(line)
            print(f"  {s[0]:26s} x{count} {op:11s} auto {line['auto']:.3f} ms ({line['auto_kernel']})"
                  f"  best {best} {best_ms:.3f}"
                  + (f"  cuDNN {line['torch']:.3f}" if "torch" in line else ""), flush=True)
        del p, peer
    print()
    for op in args.ops:
        t = totals[op]
        print(f"{op}: model total ms  auto {t['auto']:.2f}  best-per-layer {t['best']:.2f}"
              + (f"  cuDNN {t['torch']:.2f}" if "torch" in t else ""))
        print("   auto with Winograd where eligible and faster: " + ", ".join(
            f"{k} {t[k]:.2f}" for k in ("auto|wino2", "auto|wino4", "auto|best-wino")))
        singles = sorted((k, v) for k, v in t.items()
                         if k not in ("auto", "best", "torch") and "|" not in k)
        print("   one version everywhere (layers it failed on count as missing): "
              + ", ".join(f"{k} {v:.2f}" for k, v in singles))
    print("results:", common.write_results(f"dev_inception_{dev.name}", rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
