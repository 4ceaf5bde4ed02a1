"""GEMM / fully-connected benchmarks.

linear 4096 -> 4096 at batch 256: forward y = x w^T + b, and backward (grad_x = g w,
grad_w = g^T x, grad_b = sum_rows g), for fp32 (`float`), fp16 storage with float accumulation
(`half`) and fp16 accumulation (`hacc_half`, accumulate="half"). Each row: median time, spread,
TFLOP/s, and on cuda PyTorch on the same GPU in the same run (fp32 with TF32 off; fp16 through
cuBLAS, which uses tensor cores -- shown for reference) with the ratio peer_time / our_time.
Targets: fp32 forward >= 0.8x PyTorch fp32; hacc_half >= 1.8x our fp32 (x_ours_fp32).
On cpu (--quick: batch 32, 512 -> 512) the peer is PyTorch on the CPU in float32 (numpy without
torch).
`err`: max|ours - ref| / max|ref| against float64 (backward: the largest of grad_x, grad_w,
grad_b); float32 rows are marked against the fp32 accuracy budget (docs/accuracy.md: 1e-4).

    PYTHONPATH=. python benchmarks/bench_gemm.py [--backend cpu|cuda] [--quick]
"""
from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import pymetalnn  # noqa: E402
from pymetalnn import accuracy  # noqa: E402
from pymetalnn import functional as F  # noqa: E402

VARIANTS = {"float": (np.float32, None), "half": (np.float16, "float"),
            "hacc_half": (np.float16, "half")}
BOUND = {"float": 1e-5, "half": 2e-3, "hacc_half": 5e-2}  # max|err| / max(sum|a||b|)


def _check(got: np.ndarray, want: np.ndarray, scale: float, var: str, what: str) -> float:
    """Assert the error bound of the arithmetic; return the error relative to max|want|."""
    err = float(np.abs(got.astype(np.float64) - want).max()) / scale
    assert err <= BOUND[var], f"{what} ({var}): relative error {err:.3g} > {BOUND[var]}"
    return accuracy.rel_err(got, want)


def bench(dev: pymetalnn.Device, batch: int, fin: int, fout: int, quick: bool) -> list[dict]:
    torch = common.cuda_torch(dev)
    rng = np.random.default_rng(0)
    x32 = rng.standard_normal((batch, fin)).astype(np.float32)
    w32 = (rng.standard_normal((fout, fin)) / np.sqrt(fin)).astype(np.float32)
    b32 = rng.standard_normal(fout).astype(np.float32)
    g32 = rng.standard_normal((batch, fout)).astype(np.float32)
    flop_f = 2.0 * batch * fin * fout
    label = f"linear {fin}->{fout} batch {batch}"
    reps = 5 if quick else 20

    def timeit(fn):
        if dev.name == "cuda":
            return common.time_cuda(fn, warmup=3, reps=reps)
        return common.time_host(fn, dev.synchronize, warmup=1, reps=reps)

    rows: list[dict] = []
    for var in VARIANTS:
        rows += bench_variant(dev, torch, var, (x32, w32, b32, g32), label, flop_f, timeit)
    fp32 = {r["bench"]: r["ms"] for r in rows if r["variant"] == "float"}
    for r in rows:
        r["x_ours_fp32"] = fp32[r["bench"]] / r["ms"]
        if r["variant"] == "float" and r["bench"].endswith("forward") and dev.name == "cuda":
            r["target"] = "x_peer >= 0.8"
        if r["variant"] == "hacc_half":
            r["target"] = "x_ours_fp32 >= 1.8"
    return rows


def bench_variant(dev: pymetalnn.Device, torch, var: str, data: tuple, label: str, flop_f: float,
                  timeit) -> list[dict]:
    """Forward and backward of one precision variant: validated, then timed against the peer."""
    dtype, acc = VARIANTS[var]
    x, w, b, g = (v.astype(dtype) for v in data)
    tx, tw, tb, tg = (pymetalnn.tensor(v, dev) for v in (x, w, b, g))
    # validity first (the timed runs repeat the same launches)
    xd, wd, gd = (v.astype(np.float64) for v in (x, w, g))
    y = F.linear(tx, tw, tb, accumulate=acc).numpy()
    errs = {"forward": _check(y, xd @ wd.T + b.astype(np.float64),
                              float((np.abs(xd) @ np.abs(wd).T).max()), var, "forward")}
    gx, gw, gb = F.linear_backward(tg, tx, tw, tb, accumulate=acc)
    errs["backward"] = max(
        _check(gx.numpy(), gd @ wd, float((np.abs(gd) @ np.abs(wd)).max()), var, "grad_x"),
        _check(gw.numpy(), gd.T @ xd, float((np.abs(gd).T @ np.abs(xd)).max()), var, "grad_w"),
        _check(gb.numpy(), gd.sum(0), float(np.abs(gd).sum(0).max()), var, "grad_b"))

    rows = []
    for what, flop, fn in (
        ("forward", flop_f, lambda: F.linear(tx, tw, tb, accumulate=acc)),
        ("backward", 2 * flop_f, lambda: F.linear_backward(tg, tx, tw, tb, accumulate=acc)),
    ):
        med, spread = timeit(fn)
        row = {"bench": f"{label} {what}", "variant": var, "backend": common.device_label(dev),
               "ms": med * 1e3, "spread": spread, "TFLOP/s": flop / med / 1e12,
               "err": errs[what]}
        if var == "float":
            row["budget"] = common.budget_mark(errs[what])
        peer = _peer(dev, torch, var, what, x, w, b, g, tx, tw, tb, tg, timeit)
        if peer is not None:
            row["peer"], pmed = peer
            row["peer_ms"] = pmed * 1e3
            row["x_peer"] = pmed / med
        rows.append(row)
    return rows


def _peer(dev, torch, var, what, x, w, b, g, tx, tw, tb, tg, timeit):
    """(peer name, seconds) of the same computation: PyTorch on the same GPU, numpy on cpu."""
    if dev.name == "cuda" and torch is not None:
        t = [torch.as_tensor(dev.as_cupy(v.buffer, v.dtype, v.shape), device="cuda")
             for v in (tx, tw, tb, tg)]
        xt, wt, bt, gt = t
        if what == "forward":
            fn = lambda: torch.nn.functional.linear(xt, wt, bt)  # noqa: E731
        else:
            def fn():
                torch.matmul(gt, wt)
                torch.matmul(gt.t(), xt)
                gt.sum(0)
        name = "torch fp32 (no TF32)" if var == "float" else "torch fp16 (tensor cores)"
        return name, timeit(fn)[0]
    if dev.name == "cpu":
        # PyTorch on the CPU in float32 (its fp16 matmuls there are no meaningful peer), numpy
        # where torch is not installed
        x32, w32, b32, g32 = (v.astype(np.float32) for v in (x, w, b, g))
        try:
            import torch as ctorch
        except ImportError:
            ctorch = None
        if ctorch is not None:
            xt, wt, bt, gt = (ctorch.from_numpy(v) for v in (x32, w32, b32, g32))
            name, mm, lin = "torch CPU fp32", ctorch.matmul, ctorch.nn.functional.linear
        else:
            xt, wt, bt, gt = x32, w32, b32, g32
            name, mm, lin = "numpy fp32", np.matmul, lambda a, m, c: a @ m.T + c
        if what == "forward":
            fn = lambda: lin(xt, wt, bt)  # noqa: E731
        else:
            def fn():
                mm(gt, wt)
                mm(gt.T, xt)
                gt.sum(0)
        return name, common.time_host(fn, lambda: None, warmup=1, reps=5)[0]
    return None


def bench_square(dev: pymetalnn.Device, size: int, quick: bool) -> list[dict]:
    """C = A B, all size x size, fp16 storage (half and hacc_half): the dense fp16 rate against
    torch.matmul fp16 (cuBLAS, tensor cores) in the same run. Validated on 16 sampled rows."""
    torch = common.cuda_torch(dev)
    rng = np.random.default_rng(1)
    a = rng.standard_normal((size, size)).astype(np.float16)
    b = rng.standard_normal((size, size)).astype(np.float16)
    ta, tb = pymetalnn.tensor(a, dev), pymetalnn.tensor(b, dev)
    rows_i = rng.choice(size, 16, replace=False)
    want = a[rows_i].astype(np.float64) @ b.astype(np.float64)
    scale = float((np.abs(a[rows_i]).astype(np.float64) @ np.abs(b).astype(np.float64)).max())
    flop = 2.0 * size ** 3
    reps = 3 if quick else 10
    rows = []
    for var in ("half", "hacc_half"):
        acc = VARIANTS[var][1]
        c = F.matmul(ta, tb, accumulate=acc)
        got = c.numpy()[rows_i]
        err = _check(got, want, scale, var, f"gemm {size}^3")
        if dev.name == "cuda":
            med, spread = common.time_cuda(lambda acc=acc: F.matmul(ta, tb, accumulate=acc), warmup=2,
                                           reps=reps)
        else:
            med, spread = common.time_host(lambda acc=acc: F.matmul(ta, tb, accumulate=acc), dev.synchronize,
                                           warmup=1, reps=reps)
        row = {"bench": f"gemm {size}^3", "variant": var, "backend": common.device_label(dev),
               "ms": med * 1e3, "spread": spread, "TFLOP/s": flop / med / 1e12, "err": err}
        if torch is not None:
            at = torch.as_tensor(dev.as_cupy(ta.buffer, ta.dtype, ta.shape), device="cuda")
            bt = torch.as_tensor(dev.as_cupy(tb.buffer, tb.dtype, tb.shape), device="cuda")
            pmed = common.time_cuda(lambda at=at, bt=bt: torch.matmul(at, bt), warmup=2, reps=reps)[0]
            row.update(peer="torch fp16 (cuBLAS)", peer_ms=pmed * 1e3, x_peer=pmed / med,
                       target="x_peer >= 0.6")
        rows.append(row)
    return rows


def main() -> int:
    args = common.parser(__doc__, quick_help="batch 32, 512 -> 512").parse_args()
    dev = pymetalnn.device(args.backend)
    if args.quick:
        rows = bench(dev, 32, 512, 512, True)
        rows += bench_square(dev, 256, True)
    else:
        rows = bench(dev, 256, 4096, 4096, False)
        rows += bench_square(dev, 8192 if dev.name == "cuda" else 1024, False)
    common.report(rows, ["bench", "variant", "backend", "ms", "spread", "TFLOP/s", "err", "budget",
                         "peer", "peer_ms", "x_peer", "x_ours_fp32", "target"], f"gemm_{dev.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
