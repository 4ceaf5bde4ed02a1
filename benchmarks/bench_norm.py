"""Normalization benchmarks (norm.metal): memory-bound, GB/s of the bytes an op must move at least
(forward: read x, write y; backward: read dy and x, write dx; per-channel vectors ignored), the CuPy
device-to-device copy bandwidth of the same size measured in the same run, and PyTorch's time for
the same op on the same GPU (forward; backward through autograd as fwd+bwd minus fwd).

Our batch-norm training forward reads x twice (statistics, then the normalization: no grid-wide
barrier in the dialect) and the backward reads dy and x twice, as PyTorch's kernels do; the GB/s
column counts the minimum bytes, so 2/3 (forward) and 3/5 (backward) of copy bandwidth is the
ceiling of a two-pass algorithm unless the second read hits L2.

Targets (reported, not asserted): batch norm forward + backward at least as fast as PyTorch's;
>= 85% of copy bandwidth on 32x256x56x56 (see above for what a two-pass op can reach).

    PYTHONPATH=. python benchmarks/bench_norm.py [--backend cpu|cuda] [--quick]

On cpu the peer is PyTorch on the CPU (numpy doing the same arithmetic where torch is not
installed).
"""
from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import membound  # noqa: E402

import pymetalnn as pm  # noqa: E402
from pymetalnn import functional as F  # noqa: E402


def _np_bn(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    ax = (0,) + tuple(range(2, x.ndim))
    s = (1, -1) + (1,) * (x.ndim - 2)
    m = x.mean(axis=ax, keepdims=True)
    v = x.var(axis=ax, keepdims=True)
    return (x - m) / np.sqrt(v + 1e-5) * w.reshape(s) + b.reshape(s)


def _np_bn_bwd(dy: np.ndarray, x: np.ndarray, w: np.ndarray) -> np.ndarray:
    ax = (0,) + tuple(range(2, x.ndim))
    s = (1, -1) + (1,) * (x.ndim - 2)
    m = x.mean(axis=ax, keepdims=True)
    r = 1 / np.sqrt(x.var(axis=ax, keepdims=True) + 1e-5)
    xh = (x - m) * r
    mcount = x.size // x.shape[1]
    return w.reshape(s) * r * (dy - dy.sum(axis=ax, keepdims=True) / mcount
                               - xh * (dy * xh).sum(axis=ax, keepdims=True) / mcount)


def _inputs(dev: pm.Device, shape: tuple, dtype, seed: int) -> tuple[tuple, tuple]:
    """x and dy of `shape` in `dtype`, per-channel float32 weight and bias: as numpy arrays and as
    tensors on `dev`."""
    rng = np.random.default_rng(seed)
    arrays = (rng.standard_normal(shape).astype(dtype), rng.standard_normal(shape).astype(dtype),
              rng.standard_normal(shape[1]).astype(np.float32),
              rng.standard_normal(shape[1]).astype(np.float32))
    return arrays, tuple(pm.tensor(a, dev) for a in arrays)


def bench_batch_norm(dev: pm.Device, shape: tuple, dtype, quick: bool) -> list[dict]:
    c = shape[1]
    (x_np, g_np, w_np, b_np), (x, g, w, b) = _inputs(dev, shape, dtype, 0)
    rm, rv = pm.tensor(np.zeros(c, np.float32), dev), pm.tensor(np.ones(c, np.float32), dev)
    nb = x.nbytes
    copy = common.copy_gbs(dev, nb)
    _, sm, si = F.batch_norm_with_stats(x, rm, rv, w, b, True)

    def fwd() -> None:
        F.batch_norm_with_stats(x, rm, rv, w, b, True)

    def bwd() -> None:
        F.batch_norm_backward(g, x, rm, rv, w, b, True, save_mean=sm, save_invstd=si)

    def both() -> None:
        _, m, s = F.batch_norm_with_stats(x, rm, rv, w, b, True)
        F.batch_norm_backward(g, x, rm, rv, w, b, True, save_mean=m, save_invstd=s)

    def evalf() -> None:
        F.batch_norm(x, rm, rv, w, b, False)

    times = {k: common.time_on(dev, f, quick) for k, f in
             (("fwd", fwd), ("bwd", bwd), ("fwd+bwd", both), ("eval", evalf))}
    peer, pt = None, {}
    if common.torch_available(dev):
        xt, gt = common.torch_view(dev, x), common.torch_view(dev, g)
        if xt is not None:
            import torch

            tf = torch.nn.functional
            wt = common.torch_view(dev, w).clone().requires_grad_(True)
            bt = common.torch_view(dev, b).clone().requires_grad_(True)
            trm, trv = torch.zeros(c, device=xt.device), torch.ones(c, device=xt.device)
            xr = xt.detach().clone().requires_grad_(True)
            ref = tf.batch_norm(xt.float(), trm.clone(), trv.clone(), wt, bt, True)
            ours = common.torch_view(dev, F.batch_norm(x, pm.tensor(np.zeros(c, np.float32), dev),
                                                         pm.tensor(np.ones(c, np.float32), dev), w, b,
                                                         True))
            assert (ref - ours.float()).abs().max().item() < (2e-2 if dtype == np.float16 else 1e-3)

            def t_both() -> None:
                y = tf.batch_norm(xr, trm, trv, wt, bt, True)
                torch.autograd.grad(y, (xr, wt, bt), gt)

            peer = "torch (cuDNN)" if dev.name == "cuda" else "torch"
            with torch.no_grad():
                pt["fwd"], _ = common.time_on(dev, lambda: tf.batch_norm(xt, trm, trv, wt, bt, True), quick)
                pt["eval"], _ = common.time_on(dev, lambda: tf.batch_norm(xt, trm, trv, wt, bt, False),
                                                quick)
            pt["fwd+bwd"], _ = common.time_on(dev, t_both, quick)
            pt["bwd"] = common.torch_backward_time(
                dev, tf.batch_norm(xr, trm, trv, wt, bt, True), (xr, wt, bt), quick, gt)
    else:
        xf, gf = x_np.astype(np.float32), g_np.astype(np.float32)
        assert np.abs(_np_bn(xf, w_np, b_np) - F.batch_norm(x, pm.tensor(np.zeros(c, np.float32), dev),
                                                            pm.tensor(np.ones(c, np.float32), dev), w, b,
                                                            True).numpy()).max() < 5e-2
        peer = "numpy"
        pt["fwd"], _ = common.time_on(dev, lambda: _np_bn(xf, w_np, b_np), quick)
        pt["bwd"], _ = common.time_on(dev, lambda: _np_bn_bwd(gf, xf, w_np), quick)
        pt["fwd+bwd"] = pt["fwd"] + pt["bwd"]
        pt["eval"] = pt["fwd"]
    target = {"fwd+bwd": ">= torch"}
    sizes = {"fwd": 2 * nb, "bwd": 3 * nb, "fwd+bwd": 5 * nb, "eval": 2 * nb}
    return [membound.row(f"batch_norm {k}{' (train)' if k != 'eval' else ''}", dev, dtype, shape,
                         sizes[k], times[k][0], times[k][1], copy, peer, pt.get(k), target.get(k, "-"))
            for k in ("fwd", "bwd", "fwd+bwd", "eval")]


def bench_group_norm(dev: pm.Device, shape: tuple, groups: int, dtype, quick: bool) -> list[dict]:
    (x_np, _, w_np, b_np), (x, g, w, b) = _inputs(dev, shape, dtype, 1)
    nb = x.nbytes
    copy = common.copy_gbs(dev, nb)
    _, sm, sr = F.group_norm_with_stats(x, groups, w, b)
    sec_f, spr_f = common.time_on(dev, lambda: F.group_norm_with_stats(x, groups, w, b), quick)
    sec_b, spr_b = common.time_on(
        dev, lambda: F.group_norm_backward(g, x, groups, w, b, save_mean=sm, save_rstd=sr), quick)
    peer = pf = pb = None
    if common.torch_available(dev):
        xt, gt = common.torch_view(dev, x), common.torch_view(dev, g)
        if xt is not None:
            import torch

            tf = torch.nn.functional
            # torch's CUDA group norm wants weight and bias in the input's dtype
            wt = common.torch_view(dev, w).to(xt.dtype).requires_grad_(True)
            bt = common.torch_view(dev, b).to(xt.dtype).requires_grad_(True)
            xr = xt.detach().clone().requires_grad_(True)
            peer = "torch"
            with torch.no_grad():
                pf, _ = common.time_on(dev, lambda: tf.group_norm(xt, groups, wt, bt), quick)
            pb = common.torch_backward_time(dev, tf.group_norm(xr, groups, wt, bt), (xr, wt, bt),
                                            quick, gt)
    else:
        xf = x_np.astype(np.float32)

        def np_gn() -> np.ndarray:
            xg = xf.reshape(shape[0], groups, -1)
            y = (xg - xg.mean(axis=2, keepdims=True)) / np.sqrt(xg.var(axis=2, keepdims=True) + 1e-5)
            return y.reshape(shape) * w_np.reshape(1, -1, 1, 1) + b_np.reshape(1, -1, 1, 1)

        assert np.abs(np_gn() - F.group_norm(x, groups, w, b).numpy().astype(np.float32)).max() < 5e-2
        peer = "numpy (fwd only)"
        pf, _ = common.time_on(dev, np_gn, quick)
    return [membound.row(f"group_norm G={groups} fwd", dev, dtype, shape, 2 * nb, sec_f, spr_f, copy,
                         peer, pf),
            membound.row(f"group_norm G={groups} bwd", dev, dtype, shape, 3 * nb, sec_b, spr_b, copy,
                         peer, pb)]


def bench_layer_norm(dev: pm.Device, shape: tuple, dtype, quick: bool) -> list[dict]:
    """layer_norm over the last dimension (a transformer's (tokens, hidden) activations), weight and
    bias in the input's dtype; bwd includes the weight and bias gradients."""
    rng = np.random.default_rng(2)
    d = shape[-1]
    x_np, g_np = (rng.standard_normal(shape).astype(dtype) for _ in range(2))
    w_np, b_np = (rng.standard_normal(d).astype(dtype) for _ in range(2))
    x, g, w, b = (pm.tensor(a, dev) for a in (x_np, g_np, w_np, b_np))
    nb = x.nbytes
    copy = common.copy_gbs(dev, nb)
    sec_f, spr_f = common.time_on(dev, lambda: F.layer_norm(x, d, w, b), quick)
    sec_b, spr_b = common.time_on(dev, lambda: F.layer_norm_backward(g, x, d, w, b), quick)
    peer = pf = pb = None
    if dev.name == "cuda":
        xt, gt = common.torch_view(dev, x), common.torch_view(dev, g)
        if xt is not None:
            import torch

            tf = torch.nn.functional
            wt = common.torch_view(dev, w).clone().requires_grad_(True)
            bt = common.torch_view(dev, b).clone().requires_grad_(True)
            xr = xt.detach().clone().requires_grad_(True)
            peer = "torch"
            with torch.no_grad():
                pf, _ = common.time_on(dev, lambda: tf.layer_norm(xt, (d,), wt, bt), quick)
            pb = common.torch_backward_time(dev, tf.layer_norm(xr, (d,), wt, bt), (xr, wt, bt),
                                            quick, gt)
    else:
        xf = x_np.astype(np.float32)

        def np_ln() -> np.ndarray:
            return (xf - xf.mean(-1, keepdims=True)) / np.sqrt(xf.var(-1, keepdims=True) + 1e-5) * w_np + b_np

        assert np.abs(np_ln() - F.layer_norm(x, d, w, b).numpy().astype(np.float32)).max() < 5e-2
        peer = "numpy (fwd only)"
        pf, _ = common.time_on(dev, np_ln, quick)
    return [membound.row("layer_norm fwd", dev, dtype, shape, 2 * nb, sec_f, spr_f, copy, peer, pf),
            membound.row("layer_norm bwd", dev, dtype, shape, 3 * nb, sec_b, spr_b, copy, peer, pb)]


def main() -> int:
    args = common.parser(__doc__).parse_args()
    dev = pm.device(args.backend)
    common.disable_tf32()
    if dev.name == "cuda":
        bn_shapes = [(8, 64, 56, 56), (256, 1024)] if args.quick else \
            [(32, 256, 56, 56), (32, 64, 112, 112), (32, 288, 35, 35), (32, 768, 17, 17),
             (256, 1024)]  # ResNet, InceptionV3 (odd planes), (N, C)
        gn_shape = (8, 64, 56, 56) if args.quick else (32, 256, 56, 56)
    else:
        bn_shapes = [(4, 16, 14, 14), (64, 256)] if args.quick else [(8, 64, 28, 28), (256, 1024)]
        gn_shape = (4, 16, 14, 14) if args.quick else (8, 64, 28, 28)
    rows: list[dict] = []
    for dtype in (np.float32, np.float16):
        for shape in bn_shapes:
            rows.extend(bench_batch_norm(dev, shape, dtype, args.quick))
        rows.extend(bench_group_norm(dev, gn_shape, 8 if args.quick else 32, dtype, args.quick))
        ln_shape = (512, 768) if args.quick or dev.name != "cuda" else (8192, 1024)
        rows.extend(bench_layer_norm(dev, ln_shape, dtype, args.quick))
    common.report(rows, membound.COLUMNS, f"norm_{dev.name}", f"# norm on {common.device_label(dev)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
