"""Winograd F(2x2, 3x3) / F(4x4, 3x3) / F(2x2, 5x5) convolutions (ops/conv_winograd.py,
kernels/conv_winograd.metal) against the float64 references, the fallback where they do not
apply, and the mode table that picks them on cuda. Tolerances as in test_conv.py (conv_checks.py).
"""
from __future__ import annotations

import numpy as np
import pytest
from conv_checks import assert_close, rand, ref_pads, tol
from reference import conv as ref

import pymetalnn
from pymetalnn import functional as F
from pymetalnn.ops import conv as ops

# ---- Winograd F(2x2, 3x3) / F(4x4, 3x3) / F(2x2, 5x5) (ops/conv_winograd.py) ----------------
# Its transforms round differently from a direct sum: F(2x2, 3x3) stays near direct accuracy, the
# alpha = 6 variants multiply the rounding of their larger coefficients (up to 8 in A^T, 5 in
# B^T). The factors over the direct tolerance hold the worst case measured on these cases (cpu,
# three seeds: F(2x2, 3x3) 0.12, F(4x4, 3x3) 3.5, F(2x2, 5x5) 2.5) with a 3x margin. A weight
# gradient's transform mixes all taps of one (k, c) filter, so its error is measured against the
# filter's largest tap scale (a tap outside a 1x1 image has scale 0 but picks up rounding).
WINO_TOL = {("wino2", 3): 1.0, ("wino4", 3): 12.0, ("wino2", 5): 8.0}
# filter size R -> {case: (N, C, H, W, K, padding)}: sizes 1, odd, 31/32/33 around the 2/4 tiles,
# padding 0/1/2/... (asymmetric; the input gradient's flipped conv then crops), batch 1
WINO_CASES = {
    3: {
        "1x1-image-pad1": (2, 16, 1, 1, 17, 1),
        "odd-5x7": (1, 17, 5, 7, 33, 1),
        "33x31-b1": (1, 16, 33, 31, 16, 1),
        "32x32-valid": (2, 20, 32, 32, 16, 0),
        "pad2": (1, 16, 6, 5, 18, 2),
        "asym-pad": (2, 16, 9, 10, 16, (1, 0, 2, 1)),
        "3x3-valid": (3, 16, 3, 3, 20, 0),
    },
    5: {
        "5x5-odd-pad2": (1, 16, 7, 9, 17, 2),
        "5x5-valid-b2": (2, 17, 6, 6, 16, 0),
        "5x5-1x1-image": (1, 16, 1, 1, 16, 2),
        "5x5-33x32-pad4": (1, 16, 33, 32, 16, 4),
        "5x5-asym": (2, 16, 5, 4, 20, (2, 1, 0, 3)),
    },
}


# the (case, variant) pairs whose F(m x m, r x r) is instantiated (the others could only skip)
WINO_RUNS = [pytest.param(r, case, m, id=f"{case}-{m}") for r, cases in WINO_CASES.items()
             for case in cases for m in ("wino2", "wino4") if (m, r) in WINO_TOL]


@pytest.mark.parametrize("r,case,m", WINO_RUNS)
def test_conv2d_winograd(dev, monkeypatch, r, case, m):
    """Stride-1 conv forward (bias + fused relu), input gradient, weight gradient and the
    conv_transpose2d forward through the Winograd path against the float64 references, and the
    Winograd kernels (not the tiled ones) are what ran."""
    n, c, h, w, k, pad = WINO_CASES[r][case]
    monkeypatch.setattr(ops, "FORCE", {"fwd": m, "data": m, "weight": m})
    rng = np.random.default_rng(5)
    x, wt, b = rand(rng, (n, c, h, w), np.float32), rand(rng, (k, c, r, r), np.float32), \
        rand(rng, (k,), np.float32)
    kw_ref = dict(stride=(1, 1), pad=ref_pads(pad, h, w, r, r, (1, 1), (1, 1)), dilation=(1, 1),
                  groups=1)
    want = ref.conv2d(x, wt, b, **kw_ref)
    scale = ref.conv2d_abs(x, wt, **kw_ref) + np.abs(b.astype(np.float64))[None, :, None, None]
    t = WINO_TOL[(m, r)]
    before = dict(dev.dispatch_counts)
    y = F.conv2d(x, wt, b, padding=pad, activation="relu")
    ran = {name for name, cnt in dev.dispatch_counts.items() if cnt > before.get(name, 0)}
    assert f"conv2d_{m}x{r}_output_float" in ran and not any("fwd_t" in q for q in ran), ran
    assert_close("y", y, np.maximum(want, 0), scale, t * tol("float", c * r * r))

    gy = rand(rng, want.shape, np.float32)
    gx, gw, gb = F.conv2d_backward(gy, x, wt, b, padding=pad)
    rx, rw, rb = ref.conv2d_backward(gy, x, wt, True, **kw_ref)
    sx, sw, sb = ref.conv2d_backward(np.abs(gy), np.abs(x), np.abs(wt), True, **kw_ref)
    assert_close("grad_x", gx, rx, sx, t * tol("float", k * r * r))
    sw = np.broadcast_to(sw.max(axis=(2, 3), keepdims=True), sw.shape)
    assert_close("grad_w", gw, rw, sw, t * tol("float", n * want[0, 0].size))
    assert_close("grad_b", gb, rb, sb, tol("float", n * want[0, 0].size))

    if isinstance(pad, int):  # the transpose of this conv
        gxt = F.conv_transpose2d(gy, wt, None, 1, pad)
        assert_close("conv_transpose2d", gxt, rx, sx, t * tol("float", k * r * r))


def test_conv2d_winograd_strided_out(dev, monkeypatch):
    """The Winograd output transform honours out= / out_batch_stride= (concat slices)."""
    if not dev.supports_views:
        pytest.skip("out= at an offset needs buffer views")
    monkeypatch.setattr(ops, "FORCE", {"fwd": "wino4"})
    rng = np.random.default_rng(22)
    n, k, ktot, c0 = 2, 16, 21, 3
    x, w = rand(rng, (n, 16, 9, 7), np.float32), rand(rng, (k, 16, 3, 3), np.float32)
    want = ref.conv2d(x, w, None, stride=(1, 1), pad=(1, 1, 1, 1), dilation=(1, 1), groups=1)
    dest = pymetalnn.tensor(np.full((n, ktot, 9, 7), np.nan, np.float32), dev)
    view = pymetalnn.Tensor(dest.buffer.view(c0 * 63 * 4), (n, k, 9, 7), np.float32)
    F.conv2d(pymetalnn.tensor(x, dev), pymetalnn.tensor(w, dev), padding=1, out=view,
             out_batch_stride=ktot * 63)
    got = dest.numpy()
    np.testing.assert_allclose(got[:, c0:c0 + k], want, rtol=1e-4, atol=1e-4)
    assert np.isnan(got[:, :c0]).all() and np.isnan(got[:, c0 + k:]).all()


def test_conv2d_winograd_not_eligible(dev, monkeypatch):
    """Forcing Winograd on a conv it cannot run (stride 2, a 5x5 kernel with F(4x4), which is
    not instantiated, groups) falls back to the tiled kernels with correct results."""
    monkeypatch.setattr(ops, "FORCE", {"fwd": "wino4", "data": "wino4", "weight": "wino4"})
    rng = np.random.default_rng(23)
    for wshape, kw in (((16, 16, 3, 3), {"stride": 2}), ((16, 16, 5, 5), {}),
                       ((16, 8, 3, 3), {"groups": 2})):
        x, w = rand(rng, (1, 16, 8, 8), np.float32), rand(rng, wshape, np.float32)
        before = dict(dev.dispatch_counts)
        y = F.conv2d(x, w, None, padding=1, **kw)
        ran = {nm for nm, cnt in dev.dispatch_counts.items() if cnt > before.get(nm, 0)}
        assert not any("wino" in r for r in ran), ran
        st = kw.get("stride", 1)
        want = ref.conv2d(x, w, None, stride=(st, st), pad=(1, 1, 1, 1), dilation=(1, 1),
                          groups=kw.get("groups", 1))
        np.testing.assert_allclose(y.numpy(), want, rtol=1e-4, atol=1e-4)


def test_set_winograd_modes(monkeypatch):
    """conv.set_winograd picks the table cuda's default selection reads: "budget" keeps the
    weight gradients out-of-budget variants off (3x3 by F(2x2, 3x3), 5x5 tiled), "fast" runs them,
    "off" runs none; other backends never pick Winograd unforced; a bad mode names the argument."""
    monkeypatch.setattr(ops, "WINOGRAD", ops.WINOGRAD)  # restored after the test

    class Cuda:
        name = "cuda"

    class Cpu:
        name = "cpu"

    g3 = ops._conv_geometry((2, 16, 8, 8), (16, 16, 3, 3), 1, 1, 1, 1)
    g5 = ops._conv_geometry((2, 16, 8, 8), (16, 16, 5, 5), 1, 2, 1, 1)
    want = {"budget": {"fwd": (4, 2), "data": (4, 2), "weight": (2, 0)},
            "fast": {"fwd": (4, 2), "data": (4, 2), "weight": (4, 2)},
            "off": {"fwd": (0, 0), "data": (0, 0), "weight": (0, 0)}}
    for mode, kinds in want.items():
        ops.set_winograd(mode)
        for kind, ms in kinds.items():
            assert (ops._winograd(kind, Cuda, g3, "float"), ops._winograd(kind, Cuda, g5, "float")) \
                == ms, (mode, kind)
            assert ops._winograd(kind, Cpu, g3, "float") == 0
            assert ops._winograd(kind, Cuda, g3, "half") == 0
    with pytest.raises(ValueError, match="mode"):
        ops.set_winograd("fastest")
