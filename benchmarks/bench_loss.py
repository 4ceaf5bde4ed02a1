"""Loss benchmarks (loss.metal): memory-bound, GB/s of the bytes a loss must move (forward: the
input, target and labels once; backward: the same plus the gradient written), the CuPy
device-to-device copy bandwidth of the same size measured in the same run, and PyTorch's time for
the same loss on the same GPU (forward, and backward through autograd as fwd+bwd minus fwd).

Targets (reported, not asserted): softmax + cross-entropy over (4096, 1000) logits, forward +
backward, at least as fast as PyTorch's fused F.cross_entropy; >= 85% of copy bandwidth on
32x256x56x56.

    PYTHONPATH=. python benchmarks/bench_loss.py [--backend cpu|cuda] [--quick]

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


def _np_ce(x: np.ndarray, y: np.ndarray, grad: bool) -> np.ndarray:
    xs = np.moveaxis(x, 1, -1)
    m = xs.max(axis=-1, keepdims=True)
    e = np.exp(xs - m)
    s = e.sum(axis=-1, keepdims=True)
    if not grad:
        picked = np.take_along_axis(xs - m, y[..., None].astype(np.int64), axis=-1)
        return np.mean(np.log(s) - picked)
    p = e / s
    np.put_along_axis(p, y[..., None].astype(np.int64), np.take_along_axis(p, y[..., None].astype(
        np.int64), axis=-1) - 1, axis=-1)
    return np.moveaxis(p / y.size, -1, 1)


def bench_cross_entropy(dev: pm.Device, shape: tuple, dtype, quick: bool) -> list[dict]:
    rng = np.random.default_rng(0)
    x_np = (rng.standard_normal(shape) * 2).astype(dtype)
    y_np = rng.integers(0, shape[1], (shape[0],) + shape[2:]).astype(np.int32)
    x = pm.tensor(x_np, dev)
    # labels checked once (as a training loop does when a batch arrives); a plain int32 Tensor is
    # checked by the kernels themselves at every call (no read-back): timed separately below
    y = F.class_labels(y_np, shape[1], device=dev)
    y_plain = pm.tensor(y_np, dev)
    nb_x, nb_y = x.nbytes, y.nbytes
    copy = common.copy_gbs(dev, nb_x)
    fwd = lambda: F.cross_entropy(x, y)  # noqa: E731
    bwd = lambda: F.cross_entropy_backward(1.0, x, y, target_grad=False)  # noqa: E731
    both = lambda: (fwd(), bwd())  # noqa: E731
    sec_f, spr_f = common.time_on(dev, fwd, quick)
    sec_b, spr_b = common.time_on(dev, bwd, quick)
    sec_fb, spr_fb = common.time_on(dev, both, quick)
    sec_pl, spr_pl = common.time_on(
        dev, lambda: (F.cross_entropy(x, y_plain),
                      F.cross_entropy_backward(1.0, x, y_plain, target_grad=False)), quick)
    peer = pf = pb = pfb = None
    if common.torch_available(dev):
        xt, yt = common.torch_view(dev, x), common.torch_view(dev, y)
        if xt is not None:
            import torch

            yl = yt.long()
            xr = xt.detach().clone().requires_grad_(True)
            ref = torch.nn.functional.cross_entropy(xr.float(), yl)
            assert abs(ref.item() - float(fwd().numpy())) < 1e-3 * max(1.0, abs(ref.item()))

            def t_both() -> None:
                loss = torch.nn.functional.cross_entropy(xr, yl)
                torch.autograd.grad(loss, xr)

            peer = "torch F.cross_entropy"
            pf, _ = common.time_on(dev, lambda: torch.nn.functional.cross_entropy(xr, yl), quick)
            pfb, _ = common.time_on(dev, t_both, quick)
            pb = common.torch_backward_time(dev, torch.nn.functional.cross_entropy(xr, yl), xr, quick)
    else:
        xf = x_np.astype(np.float32)
        assert abs(_np_ce(xf, y_np, False) - float(fwd().numpy())) < 1e-3
        peer = "numpy"
        pf, _ = common.time_on(dev, lambda: _np_ce(xf, y_np, False), quick)
        pb, _ = common.time_on(dev, lambda: _np_ce(xf, y_np, True), quick)
        pfb = pf + pb
    tgt = "fwd+bwd >= torch" if shape == (4096, 1000) else "-"
    return [
        membound.row("cross_entropy fwd (mean)", dev, dtype, shape, nb_x + nb_y, sec_f, spr_f, copy,
                     peer, pf),
        membound.row("cross_entropy bwd", dev, dtype, shape, 2 * nb_x + nb_y, sec_b, spr_b, copy,
                     peer, pb),
        membound.row("cross_entropy fwd+bwd", dev, dtype, shape, 3 * nb_x + 2 * nb_y, sec_fb, spr_fb,
                     copy, peer, pfb, tgt),
        membound.row("cross_entropy fwd+bwd, labels checked on device", dev, dtype, shape,
                     3 * nb_x + 2 * nb_y, sec_pl, spr_pl, copy, peer, pfb),
    ]


def bench_pointwise(dev: pm.Device, name: str, shape: tuple, dtype, quick: bool) -> list[dict]:
    rng = np.random.default_rng(1)
    x_np = rng.standard_normal(shape).astype(dtype)
    t_np = (rng.uniform(0, 1, shape) if name == "bce" else rng.standard_normal(shape)).astype(dtype)
    x, t = pm.tensor(x_np, dev), pm.tensor(t_np, dev)
    nb = x.nbytes
    copy = common.copy_gbs(dev, nb)
    ours_f = F.binary_cross_entropy_with_logits if name == "bce" else F.mse_loss
    ours_b = F.binary_cross_entropy_with_logits_backward if name == "bce" else F.mse_loss_backward
    sec_f, spr_f = common.time_on(dev, lambda: ours_f(x, t), quick)
    sec_b, spr_b = common.time_on(dev, lambda: ours_b(1.0, x, t, target_grad=False), quick)
    peer = pf = pb = None
    if common.torch_available(dev):
        xt, tt = common.torch_view(dev, x), common.torch_view(dev, t)
        if xt is not None:
            import torch

            tf = torch.nn.functional
            f = tf.binary_cross_entropy_with_logits if name == "bce" else tf.mse_loss
            xr = xt.detach().clone().requires_grad_(True)
            peer = "torch"
            pf, _ = common.time_on(dev, lambda: f(xr, tt), quick)
            pb = common.torch_backward_time(dev, f(xr, tt), xr, quick)
    else:
        xf, tf32 = x_np.astype(np.float32), t_np.astype(np.float32)
        if name == "bce":
            npf = lambda: np.mean(np.maximum(xf, 0) - xf * tf32 + np.log1p(np.exp(-np.abs(xf))))  # noqa: E731
            npb = lambda: (1 / (1 + np.exp(-xf)) - tf32) / xf.size  # noqa: E731
        else:
            npf = lambda: np.mean((xf - tf32) ** 2)  # noqa: E731
            npb = lambda: 2 * (xf - tf32) / xf.size  # noqa: E731
        assert abs(npf() - float(ours_f(x, t).numpy())) < 1e-3
        peer = "numpy"
        pf, _ = common.time_on(dev, npf, quick)
        pb, _ = common.time_on(dev, npb, quick)
    tgt = ">= 0.85 of copy" if shape == (32, 256, 56, 56) else "-"
    label = "bce_with_logits" if name == "bce" else "mse_loss"
    return [membound.row(f"{label} fwd (mean)", dev, dtype, shape, 2 * nb, sec_f, spr_f, copy, peer,
                         pf, tgt),
            membound.row(f"{label} bwd", dev, dtype, shape, 3 * nb, sec_b, spr_b, copy, peer, pb, tgt)]


def main() -> int:
    args = common.parser(__doc__).parse_args()
    dev = pm.device(args.backend)
    if dev.name == "cuda" and not args.quick:
        ce_shapes, pw_shape = [(4096, 1000), (32, 256, 56, 56)], (32, 256, 56, 56)
    elif dev.name == "cuda":
        ce_shapes, pw_shape = [(4096, 1000)], (8, 64, 56, 56)
    else:
        ce_shapes, pw_shape = [(256, 1000), (4, 32, 14, 14)], (4, 64, 28, 28)
        if not args.quick:
            ce_shapes, pw_shape = [(1024, 1000), (8, 64, 28, 28)], (8, 64, 56, 56)
    rows: list[dict] = []
    for dtype in (np.float32, np.float16):
        for shape in ce_shapes:
            rows.extend(bench_cross_entropy(dev, shape, dtype, args.quick))
        for name in ("mse", "bce"):
            rows.extend(bench_pointwise(dev, name, pw_shape, dtype, args.quick))
    common.report(rows, membound.COLUMNS, f"loss_{dev.name}", f"# loss on {common.device_label(dev)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
