"""Optimizer step benchmarks (kernels/optimizer.metal, pymetalnn.optim).

An optimizer step is memory-bound: each fused update reads weight, gradient and state once and
writes weight and state back, so the figure of merit is GB/s of those bytes against the device's
copy bandwidth measured in the same run (cuda: CuPy device-to-device copy; cpu: numpy.copyto),
target >= 85%, and the time of torch.optim's foreach (and fused, where torch has it)
implementations of the same step on the same device, target: faster than foreach.

Bytes per float32 parameter and step: SGD with momentum 20 (w, g, b read; w, b written), Adam 28
(w, g, m, v; w, m, v), Adam with max_grad_norm 32 (the norm pass reads g once more), AdamW with
float16 weights and float32 master 30 (w16, g16, master, m, v; w16, master, m, v).

Sizes: 100M parameters as 10 tensors of 10M (cuda); --quick: 4 tensors of 262147 (cpu too).

    PYTHONPATH=. python benchmarks/bench_optimizer.py [--backend cpu|cuda] [--quick]
"""
from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import pymetalnn as pm  # noqa: E402
from pymetalnn import optim  # noqa: E402

COLS = ["bench", "backend", "params", "seconds", "spread", "GB/s", "copy_GB/s", "ratio_vs_copy",
        "torch_foreach_s", "speedup_vs_foreach", "torch_fused_s", "speedup_vs_fused"]


def random_tensor(dev: pm.Device, n: int, dtype: Any, seed: int) -> pm.Tensor:
    """n standard-normal values on the device (generated there on cuda: no 100M-element upload)."""
    if dev.name == "cuda":
        import cupy as cp

        t = pm.empty((n,), dtype, dev)
        dev.as_cupy(t.buffer, dtype, (n,))[...] = \
            cp.random.RandomState(seed).standard_normal(n, dtype=cp.float32).astype(dtype)
        return t
    return pm.tensor(np.random.default_rng(seed).standard_normal(n).astype(dtype), dev)


def check_first_step(kind: str, w0: np.ndarray, g: np.ndarray, w1: np.ndarray) -> None:
    """The first step from fresh state has a closed form; a bad kernel fails the benchmark.
    (w1: the float32 weights after the step, the master copy for float16 weights.)"""
    w0, g = w0.astype(np.float64), g.astype(np.float64)
    if kind == "sgd":
        want = w0 - 1e-2 * g  # the momentum buffer starts as g
    else:  # Adam step 1: m_hat = g, v_hat = g^2
        want = w0 - 1e-3 * g / (np.abs(g) + 1e-8)
        if kind == "adamw16":
            want = want - 1e-3 * 1e-2 * w0
    np.testing.assert_allclose(w1.astype(np.float64), want, rtol=1e-5, atol=1e-6, err_msg=kind)


def torch_peer(dev: pm.Device, kind: str, sizes: list[int]) -> tuple[float | None, float | None]:
    """Median seconds of torch.optim's step (foreach, fused) over tensors of the same sizes."""
    try:
        import torch
    except ImportError:
        return None, None
    device = "cuda" if dev.name == "cuda" else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        return None, None
    out: list[float | None] = []
    for mode in ("foreach", "fused"):
        gen = torch.Generator(device=device).manual_seed(0)
        ps = [torch.randn(n, device=device, generator=gen) for n in sizes]
        for p in ps:
            p.grad = torch.randn(p.numel(), device=device, generator=gen)
        kw: dict[str, Any] = {mode: True}
        try:
            if kind == "sgd":
                opt = torch.optim.SGD(ps, lr=1e-2, momentum=0.9, **kw)
            else:
                opt = torch.optim.Adam(ps, lr=1e-3, **kw)
            opt.step()
        except (RuntimeError, ValueError, TypeError):
            out.append(None)  # this torch lacks the mode on this device
            continue

        def step(opt: Any = opt, ps: list = ps) -> None:
            if kind == "adam_clip":
                torch.nn.utils.clip_grad_norm_(ps, 1.0, foreach=True)
            opt.step()

        if device == "cuda":
            med, _ = common.time_cuda(step, warmup=3, reps=20)
        else:
            med, _ = common.time_host(step, lambda: None, warmup=1, reps=5)
        out.append(med)
        del opt, ps, step
    return out[0], out[1]


def bench(dev: pm.Device, sizes: list[int], copy_gbs: float) -> list[dict]:
    total = sum(sizes)
    rows = []
    specs = [
        ("sgd", "SGD momentum=0.9", 20, np.float32,
         lambda ps: optim.SGD(ps, lr=1e-2, momentum=0.9)),
        ("adam", "Adam", 28, np.float32, lambda ps: optim.Adam(ps, lr=1e-3)),
        ("adam_clip", "Adam max_grad_norm=1", 32, np.float32,
         lambda ps: optim.Adam(ps, lr=1e-3, max_grad_norm=1.0)),
        ("adamw16", "AdamW fp16 weights, fp32 master", 30, np.float16,
         lambda ps: optim.AdamW(ps, lr=1e-3)),
    ]
    for kind, label, bpe, dtype, make in specs:
        ps = [random_tensor(dev, n, dtype, 2 * i) for i, n in enumerate(sizes)]
        gs = [random_tensor(dev, n, dtype, 2 * i + 1) for i, n in enumerate(sizes)]
        k = min(sizes[0], 4096)
        w0, g0 = ps[0].numpy()[:k].copy(), gs[0].numpy()[:k].copy()
        opt = make(ps)
        opt.step(gs)
        if kind != "adam_clip":
            w1 = opt.state[0]["master"] if dtype == np.float16 else ps[0]
            check_first_step(kind, w0, g0, w1.numpy()[:k])
        med, spread = common.time_on(dev, lambda opt=opt, gs=gs: opt.step(gs))
        gbs = bpe * total / med / 1e9
        row = {"bench": label, "backend": common.device_label(dev),
               "params": f"{len(sizes)}x{sizes[0]}", "seconds": med, "spread": spread,
               "GB/s": gbs, "copy_GB/s": copy_gbs, "ratio_vs_copy": gbs / copy_gbs,
               "target": "ratio_vs_copy >= 0.85, faster than torch foreach"}
        del opt, ps, gs
        if kind != "adamw16":  # torch has no float16-weights-with-master step to compare with
            fe, fu = torch_peer(dev, kind, sizes)
            if fe is not None:
                row.update({"torch_foreach_s": fe, "speedup_vs_foreach": fe / med})
            if fu is not None:
                row.update({"torch_fused_s": fu, "speedup_vs_fused": fu / med})
        rows.append(row)
    return rows


def main() -> int:
    args = common.parser(__doc__, quick_help="small sizes", backends=("cpu", "cuda")).parse_args()
    dev = pm.device(args.backend)
    sizes = [262147] * 4 if args.quick else [10_000_000] * 10
    copy_gbs = common.copy_gbs(dev, (64 << 20) if args.quick else (1 << 30))
    rows = bench(dev, sizes, copy_gbs)
    common.report(rows, COLS, f"optimizer_{dev.name}", f"# optimizer step on {common.device_label(dev)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
