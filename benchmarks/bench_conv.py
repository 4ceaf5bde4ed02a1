"""Convolution benchmarks (conv.metal): conv2d forward, input gradient, weight gradient and
conv_transpose2d forward on the classic CNN layer shapes, against PyTorch (cuDNN) on the same GPU
in the same run (TF32 off for fp32; fp16 against fp16), plus our fp16-accumulation conv against
our own fp32 conv.

Shapes: LeNet conv2 (N64, 32->64, 14x14, 5x5, pad 2); ResNet 3x3 (N32, 64->64, 56x56, pad 1);
1x1 (N32, 256->64, 56x56); Inception 1x7 and 7x1 (N32, 128->128, 17x17, pad (0,3) / (3,0));
3x3 stride 2 (N32, 128->256, 28x28, pad 1). conv_transpose2d is timed on each shape's transpose
(input = the conv's output, output = the conv's input): the same FLOPs.
GFLOP/s = 2 * N*K*OH*OW * C/G*KH*KW / time for every op.

Targets (reported, not asserted): ratio vs cuDNN forward >= 0.8, input/weight gradients >= 0.7,
conv_transpose2d >= 0.7; fp16-accumulation (hacc) >= 1.8x our fp32.

Accuracy: `err` = max|ours - ref| / max|ref| against a float64 reference of the same inputs
(torch in float64 on the same device, numpy without torch), `peer_err` the same for PyTorch's
result; float32 rows are marked against the fp32 accuracy budget (docs/accuracy.md: within 10x of
the direct/tiled kernels' error on the same inputs, which Winograd rows also measure, and 1e-4).
--winograd budget|fast|off picks conv.set_winograd's mode (default: budget).

    PYTHONPATH=. python benchmarks/bench_conv.py [--backend cpu|cuda] [--quick] [--precision float ...]

--quick shrinks the shapes (batch 2, channels / 8) so the script also runs on cpu, where the
peer is PyTorch on the cpu when importable.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Callable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import pymetalnn  # noqa: E402
from pymetalnn import accuracy  # noqa: E402
from pymetalnn.ops import conv as ops  # noqa: E402
from pymetalnn.ops import conv_transpose  # noqa: E402

# name, N, C, K, H, W, (KH, KW), stride, padding (ph, pw)
SHAPES = [
    ("lenet-conv2-5x5", 64, 32, 64, 14, 14, (5, 5), 1, (2, 2)),
    ("resnet-3x3", 32, 64, 64, 56, 56, (3, 3), 1, (1, 1)),
    ("1x1-256to64", 32, 256, 64, 56, 56, (1, 1), 1, (0, 0)),
    ("inception-1x7", 32, 128, 128, 17, 17, (1, 7), 1, (0, 3)),
    ("inception-7x1", 32, 128, 128, 17, 17, (7, 1), 1, (3, 0)),
    ("3x3-s2", 32, 128, 256, 28, 28, (3, 3), 2, (1, 1)),
]
OPS = ("fwd", "input_grad", "weight_grad", "conv_transpose2d")
TARGETS = {"fwd": 0.8, "input_grad": 0.7, "weight_grad": 0.7, "conv_transpose2d": 0.7}
PRECISIONS = {"float": (np.float32, None), "half": (np.float16, None), "hacc_half": (np.float16, "half")}


def quick_shape(s: tuple) -> tuple:
    name, n, c, k, h, w, ks, st, pad = s
    return (name, 2, max(4, c // 8), max(4, k // 8), min(h, 14), min(w, 14), ks, st, pad)


def flops(s: tuple) -> float:
    _, n, c, k, h, w, (kh, kw), st, (ph, pw) = s
    oh = (h + 2 * ph - kh) // st + 1
    ow = (w + 2 * pw - kw) // st + 1
    return 2.0 * n * k * oh * ow * c * kh * kw


class Problem:
    """Device tensors and launch plans of one shape and precision (source: which .metal file)."""

    def __init__(self, dev: Any, s: tuple, prec: str, source: str = ops.SOURCE, seed: int = 0):
        _, n, c, k, h, w, (kh, kw), st, (ph, pw) = s
        dtype, _acc = PRECISIONS[prec]
        self.dev, self.shape, self.prec, self.dtype = dev, s, prec, dtype
        self.stride, self.padding = (st, st), (ph, pw)
        rng = np.random.default_rng(seed)
        self.geo = ops._conv_geometry((n, c, h, w), (k, c, kh, kw), st, (ph, pw), 1, 1)
        g = self.geo
        self.opad = (h + 2 * ph - kh) % st, (w + 2 * pw - kw) % st
        self.np = {
            "x": rng.uniform(-1, 1, (n, c, h, w)).astype(dtype),
            "w": rng.uniform(-1, 1, (k, c, kh, kw)).astype(dtype),
            "b": rng.uniform(-1, 1, (k,)).astype(dtype),
            "gy": rng.uniform(-1, 1, (n, k, g.OH, g.OW)).astype(dtype),
        }
        t = {name: pymetalnn.tensor(a, dev) for name, a in self.np.items()}
        self.t = t
        self.out = {
            "fwd": pymetalnn.empty((n, k, g.OH, g.OW), dtype, dev),
            "input_grad": pymetalnn.empty((n, c, h, w), dtype, dev),
            "weight_grad": pymetalnn.empty((k, c, kh, kw), dtype, dev),
            "conv_transpose2d": pymetalnn.empty((n, c, h, w), dtype, dev),
        }
        tgeo = conv_transpose._transpose_args(t["gy"], t["w"], None, st, (ph, pw), self.opad, 1, 1, _acc)[4]
        self.plans = {
            "fwd": ops.forward_plan(dev, prec, g, t["x"], t["w"], t["b"], self.out["fwd"], source),
            "input_grad": ops.input_grad_plan(dev, prec, g, t["gy"], t["w"], None,
                                              self.out["input_grad"], source),
            "weight_grad": ops.weight_grad_plan(dev, prec, g, t["gy"], t["x"], self.out["weight_grad"],
                                                source),
            # the transpose of this conv: input gy-shaped, weights w as (C_in=K, C_out=C, ...)
            "conv_transpose2d": ops.input_grad_plan(dev, prec, tgeo, t["gy"], t["w"], None,
                                                    self.out["conv_transpose2d"], source),
        }

    def kernels(self, op: str) -> str:
        return "+".join(k.name for k, _, _ in self.plans[op])

    def run(self, op: str) -> None:
        ops.run(self.plans[op])

    def result(self, op: str) -> np.ndarray:
        self.dev.synchronize()
        return self.out[op].numpy()


def reference64(dev: Any, p: Problem) -> dict[str, np.ndarray]:
    """The float64 results of p's inputs (as stored, so fp16 rows measure only the arithmetic):
    torch in float64 on the same device (numpy per kernel tap without torch)."""
    a = {k: v.astype(np.float64) for k, v in p.np.items()}
    st, pad = p.stride, p.padding
    tt = common.float64_torch(dev)
    if tt is not None:
        torch, tdev = tt
        x, w, b, gy = (torch.tensor(a[k], device=tdev) for k in ("x", "w", "b", "gy"))
        x.requires_grad_(True)
        w.requires_grad_(True)
        y = torch.nn.functional.conv2d(x, w, b, st, pad)
        y.backward(gy)
        out = {"fwd": y, "input_grad": x.grad, "weight_grad": w.grad}
        out = {k: v.detach().cpu().numpy() for k, v in out.items()}
    else:
        out = _numpy_reference(a, st, pad, p.geo)
    out["conv_transpose2d"] = out["input_grad"]  # the transpose of this conv is its input grad
    return out


def _numpy_reference(a: dict, st: tuple, pad: tuple, g: Any) -> dict[str, np.ndarray]:
    x, w, gy = a["x"], a["w"], a["gy"]
    xp = np.pad(x, ((0, 0), (0, 0), (pad[0], pad[0]), (pad[1], pad[1])))
    y = np.zeros((g.N, g.K, g.OH, g.OW)) + a["b"][None, :, None, None]
    dxp, dw = np.zeros_like(xp), np.zeros_like(w)
    for r in range(g.KH):
        for q in range(g.KW):
            win = (slice(None), slice(None), slice(r, r + st[0] * (g.OH - 1) + 1, st[0]),
                   slice(q, q + st[1] * (g.OW - 1) + 1, st[1]))
            y += np.einsum("nchw,kc->nkhw", xp[win], w[:, :, r, q], optimize=True)
            dxp[win] += np.einsum("nkhw,kc->nchw", gy, w[:, :, r, q], optimize=True)
            dw[:, :, r, q] = np.einsum("nkhw,nchw->kc", gy, xp[win], optimize=True)
    dx = dxp[:, :, pad[0]: pad[0] + g.H, pad[1]: pad[1] + g.W]
    return {"fwd": y, "input_grad": dx, "weight_grad": dw}


def direct_errors(dev: Any, s: tuple, prec: str, ref: dict[str, np.ndarray]) -> dict[str, float]:
    """Errors of the direct/tiled kernels (Winograd off) on the same inputs: the budget's base."""
    saved = ops.WINOGRAD
    ops.set_winograd("off")
    try:
        p = Problem(dev, s, prec)
    finally:
        ops.WINOGRAD = saved
    errs = {}
    for op in OPS:
        p.run(op)
        errs[op] = accuracy.rel_err(p.result(op), ref[op])
    return errs


def torch_ops(dev: Any, p: Problem) -> dict[str, Callable[[], Any]] | None:
    """The same ops in PyTorch on the same device (None when torch is missing)."""
    try:
        import torch
    except ImportError:
        return None
    if dev.name == "cuda":
        if not torch.cuda.is_available():
            return None
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.benchmark = True  # let cuDNN pick its fastest algorithm
        tdev = "cuda"
    elif dev.name == "cpu":
        tdev = "cpu"
    else:
        return None
    tt = {k: torch.tensor(v.astype(np.float32), device=tdev).to(
        torch.float16 if p.dtype == np.float16 else torch.float32) for k, v in p.np.items()}
    if tdev == "cpu" and p.dtype == np.float16:
        return None  # fp16 convs on the cpu are not a meaningful peer
    st, pad = p.stride, p.padding
    x, w, b, gy = tt["x"], tt["w"], tt["b"], tt["gy"]
    f = torch.nn.functional
    conv_bwd = torch.ops.aten.convolution_backward
    return {
        "fwd": lambda: f.conv2d(x, w, b, st, pad),
        "input_grad": lambda: conv_bwd(gy, x, w, None, st, pad, (1, 1), False, (0, 0), 1,
                                       (True, False, False)),
        "weight_grad": lambda: conv_bwd(gy, x, w, None, st, pad, (1, 1), False, (0, 0), 1,
                                        (False, True, False)),
        "conv_transpose2d": lambda: f.conv_transpose2d(gy, w, None, st, pad, p.opad),
        "_sync": (lambda: torch.cuda.synchronize()) if tdev == "cuda" else (lambda: None),
    }


def peer_result(peer: dict[str, Callable[[], Any]], op: str) -> np.ndarray:
    """PyTorch's result of `op` (torch_ops) as a float32 numpy array: convolution_backward's
    grad_input / grad_weight where it returns both slots."""
    theirs = peer[op]()
    theirs = theirs[0] if op == "input_grad" else theirs[1] if op == "weight_grad" else theirs
    return theirs.float().cpu().numpy()


def timeit(dev: Any, fn: Callable[[], Any], quick: bool, sync: Callable[[], Any] | None = None
           ) -> tuple[float, float]:
    """Median seconds per call. On cuda, events around `inner` back-to-back calls so host
    overhead overlaps the GPU work as it does in a real network."""
    if dev.name == "cuda":
        inner = 3

        def rep() -> None:
            for _ in range(inner):
                fn()

        med, spread = common.time_cuda(rep, warmup=2, reps=5 if quick else 15)
        return med / inner, spread
    return common.time_host(fn, sync or dev.synchronize, warmup=1, reps=3 if quick else 5)


def bench_shape(dev: Any, s: tuple, precs: list[str], quick: bool) -> list[dict]:
    rows = []
    ours_fp32: dict[str, float] = {}
    fl = flops(s)
    for prec in precs:
        p = Problem(dev, s, prec)
        peer = torch_ops(dev, p)
        ref = reference64(dev, p)
        direct = (direct_errors(dev, s, prec, ref) if prec == "float" and any(
            "wino" in p.kernels(op) for op in OPS) else {})
        for op in OPS:
            sec, spread = timeit(dev, lambda op=op, p=p: p.run(op), quick)
            row = {"shape": s[0], "op": op, "prec": prec, "kernels": p.kernels(op), "ms": sec * 1e3,
                   "spread": spread, "GFLOP/s": fl / sec / 1e9}
            if prec == "float":
                ours_fp32[op] = sec
            elif prec == "hacc_half" and op in ours_fp32:
                row["vs_our_fp32"] = ours_fp32[op] / sec
            if peer is not None:
                tsec, _ = timeit(dev, peer[op], quick, peer["_sync"])
                row["torch_ms"] = tsec * 1e3
                row["ratio"] = tsec / sec
                row["peer_err"] = accuracy.rel_err(peer_result(peer, op), ref[op])
            row["err"] = accuracy.rel_err(p.result(op), ref[op])
            if prec == "float":
                row["budget"] = common.budget_mark(row["err"], direct.get(op, row["err"]))
            row["target"] = f"ratio>={TARGETS[op]}" + (" hacc>=1.8x" if prec == "hacc_half" else "")
            rows.append(row)
            print(f"  {s[0]:18s} {op:17s} {prec:9s} {row['GFLOP/s']:9.1f} GFLOP/s"
                  + (f"  ratio {row['ratio']:.2f}" if "ratio" in row else "")
                  + f"  err {row['err']:.2e}" + (f" {row['budget']}" if "budget" in row else ""),
                  flush=True)
    return rows


COLS = ["shape", "op", "prec", "kernels", "ms", "spread", "GFLOP/s", "torch_ms", "ratio",
        "vs_our_fp32", "err", "peer_err", "budget", "target"]


def main() -> int:
    ap = common.parser(__doc__, quick_help="small shapes (runs on cpu too)")
    ap.add_argument("--precision", nargs="*", default=list(PRECISIONS), choices=list(PRECISIONS))
    ap.add_argument("--shape", nargs="*", default=None, help="names of shapes to run")
    ap.add_argument("--winograd", choices=list(ops.WINOGRAD_MODES), default="budget",
                    help="conv.set_winograd mode (default budget: only variants within the fp32 "
                         "accuracy budget)")
    args = ap.parse_args()
    ops.set_winograd(args.winograd)
    dev = pymetalnn.device(args.backend)
    shapes = [quick_shape(s) if args.quick else s for s in SHAPES
              if args.shape is None or s[0] in args.shape]
    print(f"conv benchmarks on {common.device_label(dev)} (Winograd: {args.winograd})")
    rows = []
    for s in shapes:
        rows.extend(bench_shape(dev, s, args.precision, args.quick))
    for r in rows:
        r["backend"] = common.device_label(dev)
    common.report(rows, COLS, f"conv_{dev.name}{'_quick' if args.quick else ''}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
