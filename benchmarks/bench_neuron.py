"""Activation ("neuron") benchmarks: every op's forward and backward, float32 and float16.

Memory-bound: a forward reads x and writes y (2 n elements), a backward reads grad_out and x and
writes grad_x (3 n). Each row gives GB/s of those bytes, the device's copy bandwidth measured in
the same run (CuPy device-to-device copy on cuda, numpy on cpu) and the ratio (target: >= 0.85 of
copy on cuda, reported, not asserted), and the same op in PyTorch on the same GPU (numpy on cpu)
with the speedup. Shape: 32x256x56x56 (--quick: 2x32x28x28).

`seconds` times the op with its output buffer reused across calls (as a training loop with an
allocator cache would): the runtime's fresh buffers are zero-filled, an extra full write that is
not the kernel's. `alloc_seconds` is the same op allocating a fresh output each call.

    PYTHONPATH=. python benchmarks/bench_neuron.py [--backend cpu|cuda] [--quick] [--ops relu,gelu]
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Iterator
from typing import Any, Callable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import membound  # noqa: E402

import pymetalnn  # noqa: E402
from pymetalnn.ops import neuron as nn  # noqa: E402

# name -> (our op name, kwargs)
OPS: dict[str, tuple[str, dict]] = {
    "relu": ("relu", {}),
    "leaky_relu": ("leaky_relu", {"negative_slope": 0.1}),
    "elu": ("elu", {"alpha": 1.0}),
    "sigmoid": ("sigmoid", {}),
    "tanh": ("tanh", {}),
    "softplus": ("softplus", {"beta": 1.0, "threshold": 20.0}),
    "gelu": ("gelu", {}),
    "gelu_tanh": ("gelu", {"approximate": "tanh"}),
    "hardsigmoid": ("hardsigmoid", {}),
    "hard_sigmoid": ("hard_sigmoid", {"a": 0.2, "b": 0.5}),
    "linear_neuron": ("linear_neuron", {"a": 1.5, "b": -0.25}),
}


@contextlib.contextmanager
def reuse_outputs(module: Any) -> Iterator[None]:
    """Within the block, `module`'s ops get the same output tensor back for the same shape and
    dtype instead of a fresh zero-filled one (every kernel here writes all of its output)."""
    orig = module.out_like
    cache: dict = {}

    def cached(shape: tuple, dtype: Any, dev: pymetalnn.Device) -> pymetalnn.Tensor:
        key = (tuple(shape), np.dtype(dtype).str, dev.name)
        if key not in cache:
            cache[key] = orig(shape, dtype, dev)
        return cache[key]

    module.out_like = cached
    try:
        yield
    finally:
        module.out_like = orig


def torch_ops(name: str, kw: dict) -> tuple[Callable, Callable]:
    """PyTorch's forward and its backward kernel for the same op (aten's *_backward where one
    exists, so the backward is timed alone; composite expressions for the MPS-style ops)."""
    import torch

    F, aten = torch.nn.functional, torch.ops.aten
    if name == "relu":
        return F.relu, lambda g, x: aten.threshold_backward(g, x, 0)
    if name == "leaky_relu":
        s = kw["negative_slope"]
        return (lambda x: F.leaky_relu(x, s)), lambda g, x: aten.leaky_relu_backward(g, x, s, False)
    if name == "elu":
        a = kw["alpha"]
        return (lambda x: F.elu(x, a)), lambda g, x: aten.elu_backward(g, a, 1, 1, False, x)
    if name == "sigmoid":  # torch's backward takes the output; recomputing it would not be fair
        return torch.sigmoid, aten.sigmoid_backward
    if name == "tanh":
        return torch.tanh, aten.tanh_backward
    if name == "softplus":
        b, t = kw["beta"], kw["threshold"]
        return (lambda x: F.softplus(x, b, t)), lambda g, x: aten.softplus_backward(g, x, b, t)
    if name in ("gelu", "gelu_tanh"):
        ap = kw.get("approximate", "none")
        return (lambda x: F.gelu(x, approximate=ap)), \
            lambda g, x: aten.gelu_backward(g, x, approximate=ap)
    if name == "hardsigmoid":
        return F.hardsigmoid, aten.hardsigmoid_backward
    if name == "hard_sigmoid":
        a, b = kw["a"], kw["b"]
        return (lambda x: (a * x + b).clamp_(0.0, 1.0)), \
            lambda g, x: g * (a * ((a * x + b > 0) & (a * x + b < 1)))
    if name == "linear_neuron":
        a, b = kw["a"], kw["b"]
        return (lambda x: x * a + b), lambda g, x: g * a  # torch has no fused a x + b: 2 kernels
    raise KeyError(name)


def numpy_ops(name: str, kw: dict) -> tuple[Callable, Callable | None] | None:
    """numpy float32 versions (the cpu peer); None where numpy has no vectorized form (erf)."""
    f32 = np.float32
    sig = lambda x: 1 / (1 + np.exp(-x))
    if name == "relu":
        return (lambda x: np.maximum(x, 0)), lambda g, x: np.where(x > 0, g, 0)
    if name == "leaky_relu":
        s = f32(kw["negative_slope"])
        return (lambda x: np.where(x > 0, x, s * x)), lambda g, x: np.where(x > 0, g, s * g)
    if name == "elu":
        a = f32(kw["alpha"])
        return (lambda x: np.where(x > 0, x, a * np.expm1(np.minimum(x, 0)))), \
            lambda g, x: np.where(x > 0, g, g * a * np.exp(np.minimum(x, 0)))
    if name == "sigmoid":
        return sig, lambda g, x: g * sig(x) * (1 - sig(x))
    if name == "tanh":
        return np.tanh, lambda g, x: g * (1 - np.tanh(x) ** 2)
    if name == "softplus":
        return (lambda x: np.maximum(x, 0) + np.log1p(np.exp(-np.abs(x)))), lambda g, x: g * sig(x)
    if name == "gelu_tanh":
        k = f32(math.sqrt(2 / math.pi))
        return (lambda x: 0.5 * x * (1 + np.tanh(k * (x + f32(0.044715) * x ** 3)))), None
    if name == "hardsigmoid":
        return (lambda x: np.clip(x + 3, 0, 6) / 6), lambda g, x: np.where(np.abs(x) < 3, g / 6, 0)
    if name == "hard_sigmoid":
        a, b = f32(kw["a"]), f32(kw["b"])
        return (lambda x: np.clip(a * x + b, 0, 1)), \
            lambda g, x: np.where((a * x + b > 0) & (a * x + b < 1), a * g, 0)
    if name == "linear_neuron":
        a, b = f32(kw["a"]), f32(kw["b"])
        return (lambda x: a * x + b), lambda g, x: a * g
    return None


def bench_one(dev: pymetalnn.Device, name: str, dtype: Any, shape: tuple, quick: bool,
              copy: float) -> list[dict]:
    op, kw = OPS[name]
    fwd, bwd = getattr(nn, op), getattr(nn, op + "_backward")
    rng = np.random.default_rng(0)
    x_np = (rng.standard_normal(shape, np.float32) * 3).astype(dtype)
    g_np = rng.standard_normal(shape, np.float32).astype(dtype)
    x, g = pymetalnn.tensor(x_np, dev), pymetalnn.tensor(g_np, dev)
    n, isz = x.size, np.dtype(dtype).itemsize
    y, dx = fwd(x, **kw), bwd(g, x, **kw)  # compile and warm
    alloc_f, _ = common.time_on(dev, lambda: fwd(x, **kw), quick)
    alloc_b, _ = common.time_on(dev, lambda: bwd(g, x, **kw), quick)
    with reuse_outputs(nn):
        sec_f, spr_f = common.time_on(dev, lambda: fwd(x, **kw), quick)
        sec_b, spr_b = common.time_on(dev, lambda: bwd(g, x, **kw), quick)
    peer, pf, pb = None, None, None
    if common.torch_available(dev):
        tx = common.torch_view(dev, x)
        if tx is not None:
            tg = common.torch_view(dev, g)
            t_fwd, t_bwd = torch_ops(name, kw)
            ty = t_fwd(tx)
            t_in = ty if name in ("sigmoid", "tanh") else tx  # aten's sigmoid/tanh_backward take y
            tol = 2e-2 if dtype == np.float16 else 1e-4
            np.testing.assert_allclose(y.numpy().astype(np.float32), ty.float().cpu().numpy(),
                                       rtol=tol, atol=tol)
            np.testing.assert_allclose(dx.numpy().astype(np.float32),
                                       t_bwd(tg, t_in).float().cpu().numpy(), rtol=tol, atol=tol)
            peer = "torch"
            pf, _ = common.time_on(dev, lambda: t_fwd(tx), quick)
            pb, _ = common.time_on(dev, lambda: t_bwd(tg, t_in), quick)
    else:
        fns = numpy_ops(name, kw)
        if fns is not None:
            np.seterr(over="ignore")
            peer = "numpy"
            pf, _ = common.time_host(lambda: fns[0](x_np), lambda: None, 1, 3)
            if fns[1] is not None:
                pb, _ = common.time_host(lambda: fns[1](g_np, x_np), lambda: None, 1, 3)
    rows = [membound.row(f"{name} fwd", dev, dtype, shape, 2 * n * isz, sec_f, spr_f, copy, peer,
                         pf, ">= 0.85 copy"),
            membound.row(f"{name} bwd", dev, dtype, shape, 3 * n * isz, sec_b, spr_b, copy,
                         peer if pb else None, pb, ">= 0.85 copy")]
    rows[0]["alloc_seconds"], rows[1]["alloc_seconds"] = alloc_f, alloc_b
    return rows


def main() -> int:
    ap = common.parser(__doc__, backends=("cpu", "cuda"))
    ap.add_argument("--ops", default=",".join(OPS), help="comma-separated subset of " + ",".join(OPS))
    args = ap.parse_args()
    dev = pymetalnn.device(args.backend)
    shape = (2, 32, 28, 28) if args.quick else (32, 256, 56, 56)
    print(f"neuron benchmarks on {common.device_label(dev)}, shape {shape}")
    rows: list[dict] = []
    for dtype in (np.float32, np.float16):
        copy = common.copy_gbs(dev, int(np.prod(shape)) * np.dtype(dtype).itemsize)
        for name in args.ops.split(","):
            rows.extend(bench_one(dev, name, dtype, shape, args.quick, copy))
    common.report(rows, membound.COLUMNS_ALLOC, f"neuron_{dev.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
