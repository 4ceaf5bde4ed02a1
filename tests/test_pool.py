"""Pooling: max / avg (2-d and 1-d), adaptive and global average, forward and backward, float32
and float16, against the float64 loop references in tests/reference/pool.py (whose backward
scatters while the kernels gather); the references' gradients against finite differences;
PyTorch as a second opinion when it imports.

Geometry covers batch 1, 1/31/32/33 channels, odd and rectangular sizes, padding = kernel // 2
(windows that start in the padding), ceil_mode (including a last window that starts in the right
padding), stride > kernel, dilation, a kernel as large as the padded input, overlapping windows
with many ties (integer data) and a window lying wholly in the padding.
"""
from __future__ import annotations

import numpy as np
import pytest
from reference import pool as ref

import pymetalnn
from pymetalnn.ops import pool as P
from pymetalnn.tensor import Tensor

# (shape, kernel_size, stride, padding, dilation, ceil_mode)
MAX_CASES = [
    ((1, 1, 1, 1), 1, None, 0, 1, False),
    ((2, 3, 7, 9), 2, None, 0, 1, False),
    ((1, 32, 8, 8), 3, 2, 1, 1, False),
    ((2, 33, 9, 7), (3, 2), (2, 1), (1, 1), 1, True),
    ((1, 31, 10, 11), 2, 3, 1, 1, False),
    ((1, 31, 10, 11), 2, 3, 1, 1, True),
    ((1, 2, 6, 6), 3, 2, 1, 1, True),
    ((1, 1, 5, 5), 5, 1, 2, 1, False),
    ((3, 2, 11, 10), 3, 2, 1, 2, True),
    ((2, 1, 4, 13), (1, 4), (1, 3), (0, 2), (1, 2), False),
]
AVG_CASES = [c for c in MAX_CASES if c[4] == 1]
TOL = {np.float32: dict(rtol=2e-6, atol=1e-6), np.float16: dict(rtol=2e-3, atol=1e-3)}


def _ids(cases):
    return ["x".join(map(str, c[0])) + f"-k{c[1]}-s{c[2]}-p{c[3]}-d{c[4]}" + ("-ceil" if c[5] else "")
            for c in cases]


def _data(shape, dtype, seed=0, integers=False):
    rng = np.random.default_rng(seed)
    if integers:  # many ties
        return rng.integers(-2, 3, shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def _t(a, dev):
    return pymetalnn.tensor(a, dev)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("case", MAX_CASES, ids=_ids(MAX_CASES))
def test_max_pool2d(dev, case, dtype):
    shape, k, s, p, d, ceil = case
    x = _data(shape, dtype)
    y_ref, i_ref = ref.max_pool2d(x, k, s, p, d, ceil)
    y, idx = P.max_pool2d(_t(x, dev), k, s, p, d, ceil, return_indices=True)
    assert y.dtype == x.dtype and idx.dtype == np.int32
    np.testing.assert_array_equal(y.numpy(), y_ref.astype(dtype))  # a max is one of the inputs
    np.testing.assert_array_equal(idx.numpy(), i_ref)
    np.testing.assert_array_equal(P.max_pool2d(_t(x, dev), k, s, p, d, ceil).numpy(), y.numpy())
    g = _data(y_ref.shape, dtype, seed=1)
    dx_ref = ref.max_pool2d_backward(g, x, k, s, p, d, ceil)
    dx = P.max_pool2d_backward(_t(g, dev), _t(x, dev), k, s, p, d, ceil)
    np.testing.assert_allclose(dx.numpy(), dx_ref, **TOL[dtype])
    dx_i = P.max_pool2d_backward(_t(g, dev), _t(x, dev), k, s, p, d, ceil, indices=idx)
    np.testing.assert_allclose(dx_i.numpy(), dx_ref, **TOL[dtype])


@pytest.mark.parametrize("k,s,p", [(3, 1, 1), (2, 1, 0), (3, 2, 1)])
def test_max_pool2d_ties_overlapping(dev, k, s, p):
    """Integer data: ties in every window; the first maximum (row-major) takes the gradient, and
    overlapping windows add theirs up."""
    x = _data((2, 3, 7, 8), np.float32, seed=5, integers=True)
    y_ref, i_ref = ref.max_pool2d(x, k, s, p)
    y, idx = P.max_pool2d(_t(x, dev), k, s, p, return_indices=True)
    np.testing.assert_array_equal(y.numpy(), y_ref)
    np.testing.assert_array_equal(idx.numpy(), i_ref)
    g = _data(y_ref.shape, np.float32, seed=6)
    dx_ref = ref.max_pool2d_backward(g, x, k, s, p)
    np.testing.assert_allclose(P.max_pool2d_backward(_t(g, dev), _t(x, dev), k, s, p).numpy(),
                               dx_ref, rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(P.max_pool2d_backward(_t(g, dev), _t(x, dev), k, s, p, indices=idx)
                               .numpy(), dx_ref, rtol=2e-6, atol=1e-6)


def test_max_pool2d_nan_and_inf(dev):
    """A NaN wins its window (torch), -inf inputs still give a valid index."""
    x = np.full((1, 1, 4, 4), -np.inf, np.float32)
    x[0, 0, 1, 1] = np.nan
    x[0, 0, 2, 3] = 5.0
    y_ref, i_ref = ref.max_pool2d(x, 2)
    y, idx = P.max_pool2d(_t(x, dev), 2, return_indices=True)
    np.testing.assert_array_equal(y.numpy(), y_ref)
    np.testing.assert_array_equal(idx.numpy(), i_ref)
    assert i_ref[0, 0, 0, 0] == 5 and i_ref[0, 0, 1, 0] == 8  # NaN; first of the -inf


# The fixed-window forward kernels (2x2, 3x3: every tap loaded first) against the generic ones:
# the same bits, indices included, on ties (integer data), NaN and -inf, windows in the padding,
# ceil_mode's last window, dilation and stride > kernel.
FIXED_CASES = [((2, 3, 7, 9), 2, None, 0, 1, False), ((1, 5, 8, 8), 3, 2, 1, 1, False),
               ((2, 3, 9, 7), 3, 1, 1, 1, True), ((1, 31, 10, 11), 2, 3, 1, 1, True),
               ((3, 2, 11, 10), 3, 2, 1, 2, True), ((1, 2, 6, 6), 3, 2, 1, 1, True),
               ((1, 1, 2, 2), 3, 1, 1, 1, False)]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("case", FIXED_CASES, ids=_ids(FIXED_CASES))
def test_fixed_window_kernels_match_generic(dev, case, dtype, monkeypatch):
    shape, k, s, p, d, ceil = case
    x = _data(shape, dtype, seed=3, integers=True)
    x.flat[::7] = np.nan
    x.flat[3::11] = -np.inf

    def run():
        dev.reset_counts()
        mx, idx = P.max_pool2d(_t(x, dev), k, s, p, d, ceil, return_indices=True)
        av = [P.avg_pool2d(_t(x, dev), k, s, p, ceil, cip, div).numpy()
              for cip, div in ((True, None), (False, None), (True, 3))] if d == 1 else []
        return mx.numpy(), idx.numpy(), av, set(dev.dispatch_counts)

    mx, idx, av, names = run()
    kk = f"{k}x{k}"
    assert f"max_pool2d_fwd_k{kk}_{'float' if dtype == np.float32 else 'half'}" in names, names
    y_ref, i_ref = ref.max_pool2d(x, k, s, p, d, ceil)
    np.testing.assert_array_equal(idx, i_ref)
    np.testing.assert_array_equal(mx, y_ref.astype(dtype))
    for a, (cip, div) in zip(av, ((True, None), (False, None), (True, 3))):
        np.testing.assert_allclose(a, ref.avg_pool2d(x, k, s, p, ceil, cip, div), **TOL[dtype])
    monkeypatch.setattr(P, "FIXED_WINDOWS", ())
    gmx, gidx, gav, gnames = run()
    assert not any("_fwd_k" in n for n in gnames), gnames
    np.testing.assert_array_equal(mx.view(np.uint16 if dtype == np.float16 else np.uint32),
                                  gmx.view(np.uint16 if dtype == np.float16 else np.uint32))
    np.testing.assert_array_equal(idx, gidx)
    for a, b in zip(av, gav):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("case", AVG_CASES, ids=_ids(AVG_CASES))
def test_avg_pool2d(dev, case, dtype):
    shape, k, s, p, _, ceil = case
    x = _data(shape, dtype)
    for cip, div in ((True, None), (False, None), (True, 3)):
        y_ref = ref.avg_pool2d(x, k, s, p, ceil, cip, div)
        y = P.avg_pool2d(_t(x, dev), k, s, p, ceil, cip, div)
        assert y.dtype == x.dtype
        np.testing.assert_allclose(y.numpy(), y_ref, **TOL[dtype])
        g = _data(y_ref.shape, dtype, seed=1)
        dx = P.avg_pool2d_backward(_t(g, dev), _t(x, dev), k, s, p, ceil, cip, div)
        np.testing.assert_allclose(dx.numpy(), ref.avg_pool2d_backward(g, x, k, s, p, ceil, cip, div),
                                   **TOL[dtype])


# Gradient variants picked by the host (pool.py): avg_pool2d_bwd_const when every window has one
# divisor, max_pool2d_bwd_idx_s2x2 / _s1x2 for strides (2, 2) / (1, 2) with indices.
# (shape, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override, const)
AVG_BWD_CASES = [
    ((1, 3, 35, 35), 3, 1, 1, False, True, None, True),      # InceptionV3's branch pool
    ((2, 2, 17, 31), 3, 1, 1, False, True, None, True),
    ((1, 2, 9, 32), 3, 1, 1, False, True, None, True),
    ((1, 2, 6, 33), 3, 1, 0, False, False, None, True),      # no padding: nothing clipped
    ((1, 2, 6, 33), 3, 1, 1, False, False, None, False),     # excluded padding clips
    ((1, 2, 7, 9), 2, 3, 0, False, True, None, True),        # stride > kernel: gaps
    ((1, 2, 6, 6), 3, 2, 1, True, True, None, False),        # ceil: last window past the padding
    ((1, 2, 6, 6), 3, 2, 1, True, True, 5, True),            # ... but divisor_override
    ((2, 4, 9, 9), 3, 3, 0, True, False, 2, True),
    ((3, 2, 1, 13), (1, 3), (1, 2), (0, 1), False, True, None, True),   # H = 1
    ((1, 2, 12, 1), (3, 1), 1, (1, 0), False, True, None, True),       # W = 1
    ((1, 1, 5, 5), 5, 1, 2, False, True, None, True),        # kernel = padded input
    ((1, 1, 8, 8), 3, 1, 1, False, True, None, True),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("case", AVG_BWD_CASES, ids=[
    "x".join(map(str, c[0])) + f"-k{c[1]}-s{c[2]}-p{c[3]}" + ("-ceil" if c[4] else "")
    + ("-cip" if c[5] else "") + (f"-div{c[6]}" if c[6] else "") for c in AVG_BWD_CASES])
def test_avg_pool2d_backward_variants(dev, case, dtype, monkeypatch):
    shape, k, s, p, ceil, cip, div, const = case
    x = _data(shape, dtype)
    y_ref = ref.avg_pool2d(x, k, s, p, ceil, cip, div)
    g = _data(y_ref.shape, dtype, seed=7)
    dev.reset_counts()
    dx = P.avg_pool2d_backward(_t(g, dev), _t(x, dev), k, s, p, ceil, cip, div)
    sfx = "float" if dtype == np.float32 else "half"
    assert set(dev.dispatch_counts) == {f"avg_pool2d_bwd_{'const_' if const else ''}{sfx}"}
    np.testing.assert_allclose(dx.numpy(), ref.avg_pool2d_backward(g, x, k, s, p, ceil, cip, div),
                               **TOL[dtype])
    if const:  # the same terms in the same order as the generic kernel: bitwise equal
        monkeypatch.setattr(P, "_constant_divisor", lambda q: 0)
        generic = P.avg_pool2d_backward(_t(g, dev), _t(x, dev), k, s, p, ceil, cip, div)
        np.testing.assert_array_equal(dx.numpy(), generic.numpy())


# (shape, kernel_size, stride, padding, dilation, ceil_mode, variant); integer data (ties) for some
# (the tile kernels' unrolled form _c<CH>x<CW> where a tile meets at most CH x CW windows; the
# dilated 3x3 window spans 5 rows, 3 candidates per tile: the runtime loops)
MAX_BWD_CASES = [
    ((1, 2, 35, 35), 3, 2, 0, 1, False, "s2x2_c2x2"),         # InceptionV3's reductions
    ((2, 3, 33, 31), 3, 2, 1, 1, True, "s2x2_c2x2"),
    ((1, 2, 32, 32), 2, 2, 0, 1, False, "s2x2_c2x2"),
    ((1, 2, 10, 11), 1, 2, 0, 1, False, "s2x2_c2x2"),         # stride > kernel: gaps
    ((1, 1, 1, 9), (1, 3), 2, (0, 1), 1, True, "s2x2_c2x2"),  # H = 1
    ((1, 2, 9, 1), (3, 1), 2, 0, 1, False, "s2x2_c2x2"),      # W = 1
    ((2, 2, 11, 10), 3, 2, 1, 2, True, "s2x2"),               # dilation
    ((1, 3, 7, 9), 3, (1, 2), 1, 1, False, "s1x2_c3x2"),
    ((1, 3, 7, 33), (2, 3), (1, 2), (1, 1), 1, True, "s1x2_c3x2"),
    ((1, 3, 7, 9), 3, 3, 1, 1, False, ""),
]


@pytest.mark.parametrize("integers", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("case", MAX_BWD_CASES, ids=_ids(MAX_BWD_CASES))
def test_max_pool2d_backward_indices_variants(dev, case, dtype, integers, monkeypatch):
    shape, k, s, p, d, ceil, variant = case
    x = _data(shape, dtype, seed=3, integers=integers)
    y_ref, i_ref = ref.max_pool2d(x, k, s, p, d, ceil)
    g = _data(y_ref.shape, dtype, seed=8)
    idx = _t(i_ref.astype(np.int32), dev)
    dev.reset_counts()
    dx = P.max_pool2d_backward(_t(g, dev), _t(x, dev), k, s, p, d, ceil, indices=idx)
    sfx = "float" if dtype == np.float32 else "half"
    assert set(dev.dispatch_counts) == {f"max_pool2d_bwd_idx_{variant + '_' if variant else ''}{sfx}"}
    np.testing.assert_allclose(dx.numpy(), ref.max_pool2d_backward(g, x, k, s, p, d, ceil),
                               **TOL[dtype])
    if variant:  # the same sums in the same order as the per-element kernel: bitwise equal
        if "_c" in variant:  # and as the tile kernel's runtime loops
            monkeypatch.setattr(P, "UNROLLED_CANDIDATES", False)
            dev.reset_counts()
            loops = P.max_pool2d_backward(_t(g, dev), _t(x, dev), k, s, p, d, ceil, indices=idx)
            assert set(dev.dispatch_counts) == {f"max_pool2d_bwd_idx_{variant[:4]}_{sfx}"}
            np.testing.assert_array_equal(dx.numpy(), loops.numpy())
        monkeypatch.setattr(P, "MAX_TILES", {})
        generic = P.max_pool2d_backward(_t(g, dev), _t(x, dev), k, s, p, d, ceil, indices=idx)
        np.testing.assert_array_equal(dx.numpy(), generic.numpy())


def test_tile_candidate_bound():
    """The unrolled tile gradient's premise, by brute force over geometries: a tile of S input
    rows lies in the span [o S - P, o S - P + (K - 1) D] (the kernel's out_range) of at most as
    many windows as pool._tile_candidates says (else a candidate would be dropped)."""
    for k in range(1, 6):
        for st in (1, 2, 3):
            for d in (1, 2):
                for p in range(0, k // 2 + 1):
                    for n in (1, 5, 8, 13):
                        for ceil in (False, True):
                            o = P._out_size(n, k, st, p, d, ceil)
                            if o < 1:
                                continue
                            bound = P._tile_candidates(k, st, d)
                            for h in range(0, n, st):  # tiles of st rows
                                hl = min(h + st, n) - 1
                                meet = [oh for oh in range(o)
                                        if oh * st - p <= hl and oh * st - p + (k - 1) * d >= h]
                                assert len(meet) <= bound, (k, st, d, p, n, ceil, h, meet)


def test_pool1d_backward_variants(dev):
    """1-d pooling reaches the variants too: stride 2 takes the (1, 2) tiles, average the
    constant divisor."""
    x = _data((2, 3, 33), np.float32)
    x4 = x.reshape(2, 3, 1, 33)
    y, idx = P.max_pool1d(_t(x, dev), 3, 2, 1, return_indices=True)
    g = _data(y.shape, np.float32, seed=2)
    dev.reset_counts()
    dx = P.max_pool1d_backward(_t(g, dev), _t(x, dev), 3, 2, 1, indices=idx)
    assert set(dev.dispatch_counts) == {"max_pool2d_bwd_idx_s1x2_c3x2_float"}
    np.testing.assert_allclose(dx.numpy(), ref.max_pool2d_backward(
        g.reshape(2, 3, 1, -1), x4, (1, 3), (1, 2), (0, 1)).reshape(x.shape), rtol=2e-6, atol=1e-6)
    ga = _data((2, 3, 33), np.float32, seed=4)
    dev.reset_counts()
    dxa = P.avg_pool1d_backward(_t(ga, dev), _t(x, dev), 3, 1, 1)
    assert set(dev.dispatch_counts) == {"avg_pool2d_bwd_const_float"}
    np.testing.assert_allclose(dxa.numpy(), ref.avg_pool2d_backward(
        ga.reshape(2, 3, 1, -1), x4, (1, 3), (1, 1), (0, 1), False, True).reshape(x.shape),
        rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_pool1d(dev, dtype):
    """1-d pooling = 2-d pooling of a (N, C, 1, L) view with a 1-row window; batched and
    unbatched; the last case has a window wholly in the padding (L=2, k=2, d=3, p=1)."""
    for shape, k, s, p, d, ceil in [((2, 3, 17), 3, 2, 1, 1, True), ((1, 33, 8), 2, None, 1, 1, False),
                                    ((5, 9), 4, 5, 2, 1, True), ((1, 2, 12), 3, 1, 1, 3, False),
                                    ((1, 1, 2), 2, 1, 1, 3, False)]:
        x = _data(shape, dtype)
        x4 = x.reshape(-1, x.shape[-2], 1, x.shape[-1])
        y_ref, i_ref = ref.max_pool2d(x4, (1, k), (1, k if s is None else s), (0, p), (1, d), ceil)
        y, idx = P.max_pool1d(_t(x, dev), k, s, p, d, ceil, return_indices=True)
        out_shape = (*shape[:-1], y_ref.shape[-1])
        assert y.shape == out_shape and idx.shape == out_shape
        np.testing.assert_array_equal(y.numpy(), y_ref.astype(dtype).reshape(out_shape))
        np.testing.assert_array_equal(idx.numpy(), i_ref.reshape(out_shape))
        g = _data(out_shape, dtype, seed=2)
        dx_ref = ref.max_pool2d_backward(g.reshape(y_ref.shape), x4, (1, k), (1, k if s is None else s),
                                         (0, p), (1, d), ceil).reshape(shape)
        for indices in (None, idx):
            dx = P.max_pool1d_backward(_t(g, dev), _t(x, dev), k, s, p, d, ceil, indices=indices)
            assert dx.shape == shape
            np.testing.assert_allclose(dx.numpy(), dx_ref, **TOL[dtype])
        if d == 1:
            for cip in (True, False):
                args = ((1, k), (1, k if s is None else s), (0, p), ceil, cip)
                ya = P.avg_pool1d(_t(x, dev), k, s, p, ceil, cip)
                np.testing.assert_allclose(ya.numpy(), ref.avg_pool2d(x4, *args).reshape(out_shape),
                                           **TOL[dtype])
                dxa = P.avg_pool1d_backward(_t(g, dev), _t(x, dev), k, s, p, ceil, cip)
                np.testing.assert_allclose(
                    dxa.numpy(), ref.avg_pool2d_backward(g.reshape(y_ref.shape), x4, *args).reshape(shape),
                    **TOL[dtype])
    y, idx = P.max_pool1d(_t(np.float32([[[1.0, 2.0]]]).astype(dtype), dev), 2, 1, 1, 3,
                          return_indices=True)
    assert y.numpy().tolist() == [[[-np.inf]]] and idx.numpy().tolist() == [[[-1]]]


def test_unbatched_2d(dev):
    x = _data((3, 6, 5), np.float32)
    y = P.max_pool2d(_t(x, dev), 2, 2, 1)
    np.testing.assert_array_equal(y.numpy(), ref.max_pool2d(x[None], 2, 2, 1)[0][0])
    g = _data(y.shape, np.float32, 1)
    dx = P.avg_pool2d_backward(_t(g, dev), _t(x, dev), 3, 2, 1, True)
    assert dx.shape == x.shape
    np.testing.assert_allclose(dx.numpy(), ref.avg_pool2d_backward(g[None], x[None], 3, 2, 1, True)[0],
                               rtol=2e-6, atol=1e-6)


ADAPTIVE = [((2, 3, 7, 9), (3, 4)), ((1, 33, 5, 5), 5), ((2, 2, 10, 7), (4, 3)),
            ((1, 3, 3, 3), (5, 4)), ((2, 3, 4, 4), 1), ((1, 5, 3, 3), 1), ((1, 2, 20, 21), 1),
            ((1, 32, 16, 16), 1), ((1, 2, 6, 8), (None, 3)),
            # global pooling past its 4-load rounds per lane: vector and scalar loads
            ((1, 3, 29, 32), 1), ((1, 2, 23, 25), 1)]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("shape,out", ADAPTIVE, ids=[f"{'x'.join(map(str, s))}-{o}" for s, o in ADAPTIVE])
def test_adaptive_avg_pool2d(dev, shape, out, dtype):
    x = _data(shape, dtype)
    o = (shape[2] if out[0] is None else out[0], out[1]) if isinstance(out, tuple) else out
    y_ref = ref.adaptive_avg_pool2d(x, o)
    y = P.adaptive_avg_pool2d(_t(x, dev), out)
    np.testing.assert_allclose(y.numpy(), y_ref, **TOL[dtype])
    g = _data(y_ref.shape, dtype, seed=3)
    dx = P.adaptive_avg_pool2d_backward(_t(g, dev), _t(x, dev), out)
    np.testing.assert_allclose(dx.numpy(), ref.adaptive_avg_pool2d_backward(g, x, o), **TOL[dtype])
    if out == 1:
        np.testing.assert_allclose(P.global_avg_pool2d(_t(x, dev)).numpy(), y_ref, **TOL[dtype])
        np.testing.assert_allclose(P.global_avg_pool2d_backward(_t(g, dev), _t(x, dev)).numpy(),
                                   ref.adaptive_avg_pool2d_backward(g, x, 1), **TOL[dtype])


def test_global_avg_pool2d_unaligned_view(dev):
    """A view at an odd offset cannot take the 4-vector loads; the scalar path must be exact."""
    if not dev.supports_views:
        pytest.skip(f"{dev.name} binds whole buffers only")
    x = _data((2, 3, 4, 4), np.float32)
    buf = dev.buffer(np.concatenate([np.zeros(1, np.float32), x.reshape(-1)]))
    xv = Tensor(buf.view(4, x.nbytes), x.shape, np.float32)
    np.testing.assert_allclose(P.global_avg_pool2d(xv).numpy(), ref.adaptive_avg_pool2d(x, 1),
                               rtol=2e-6, atol=1e-6)


def test_magic_division():
    """The kernels divide by multiply-high and shift with these constants (pool.metal magic_div)."""
    rng = np.random.default_rng(9)
    divisors = [*range(1, 600), 3136, 2**30, 2**31 - 1, *rng.integers(1, 2**31, 300).tolist()]
    for d in divisors:
        m, s = P._magic(d)
        assert 0 < m < 2**32
        n = np.array([0, 1, d - 1, d, d + 1, 2**31 - 1, *rng.integers(0, 2**31, 50)], np.uint64)
        n = n[n < 2**31]
        q = (((n * np.uint64(m)) >> np.uint64(32)) + n) >> np.uint64(s)
        np.testing.assert_array_equal(q, n // np.uint64(d))


def test_batch_zero(dev):
    dev.reset_counts()
    x = _t(np.zeros((0, 3, 4, 4), np.float32), dev)
    assert P.max_pool2d(x, 2).shape == (0, 3, 2, 2)
    assert P.avg_pool2d_backward(_t(np.zeros((0, 3, 2, 2), np.float32), dev), x, 2).shape == x.shape
    assert P.global_avg_pool2d(x).shape == (0, 3, 1, 1)
    assert sum(dev.dispatch_counts.values()) == 0


# ---- the references' gradients against finite differences (float64, no device) ---------------
@pytest.mark.parametrize("name,fwd,bwd", [
    ("max k3 s2 p1 ceil", lambda x: ref.max_pool2d(x, 3, 2, 1, 1, True)[0],
     lambda g, x: ref.max_pool2d_backward(g, x, 3, 2, 1, 1, True)),
    ("max k2 s1 d2", lambda x: ref.max_pool2d(x, 2, 1, 1, 2)[0],
     lambda g, x: ref.max_pool2d_backward(g, x, 2, 1, 1, 2)),
    ("avg k3 s2 p1 ceil excl", lambda x: ref.avg_pool2d(x, 3, 2, 1, True, False),
     lambda g, x: ref.avg_pool2d_backward(g, x, 3, 2, 1, True, False)),
    ("avg k2 s1 p1 incl", lambda x: ref.avg_pool2d(x, 2, 1, 1, False, True),
     lambda g, x: ref.avg_pool2d_backward(g, x, 2, 1, 1, False, True)),
    ("avg k3 s3 div5", lambda x: ref.avg_pool2d(x, 3, 3, 0, True, True, 5),
     lambda g, x: ref.avg_pool2d_backward(g, x, 3, 3, 0, True, True, 5)),
    ("adaptive 5x6->(4, 5)", lambda x: ref.adaptive_avg_pool2d(x, (4, 5)),
     lambda g, x: ref.adaptive_avg_pool2d_backward(g, x, (4, 5))),
])
def test_reference_gradients_vs_finite_differences(name, fwd, bwd):
    rng = np.random.default_rng(11)
    x = rng.permutation(60).reshape(1, 2, 5, 6) / 7.0  # distinct values: max is differentiable
    g = rng.standard_normal(fwd(x).shape)
    np.testing.assert_allclose(bwd(g, x), ref.finite_diff_vjp(fwd, x, g), rtol=1e-6, atol=1e-8)


# ---- PyTorch -----------------------------------------------------------------------------------
def test_vs_torch(dev):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(4)
    for shape, k, s, p, d, ceil in MAX_CASES:
        x = rng.standard_normal(shape).astype(np.float32)
        tx = torch.tensor(x, requires_grad=True)
        ty, ti = F.max_pool2d(tx, k, s, p, d, ceil, return_indices=True)
        g = rng.standard_normal(tuple(ty.shape)).astype(np.float32)
        ty.backward(torch.tensor(g))
        y, idx = P.max_pool2d(_t(x, dev), k, s, p, d, ceil, return_indices=True)
        np.testing.assert_array_equal(y.numpy(), ty.detach().numpy())
        np.testing.assert_array_equal(idx.numpy(), ti.numpy())
        np.testing.assert_allclose(P.max_pool2d_backward(_t(g, dev), _t(x, dev), k, s, p, d, ceil).numpy(),
                                   tx.grad.numpy(), rtol=1e-6, atol=1e-6)
        if d != 1:
            continue
        for cip, div in ((True, None), (False, None), (False, 2)):
            tx = torch.tensor(x, requires_grad=True)
            ty = F.avg_pool2d(tx, k, s, p, ceil, cip, div)
            ty.backward(torch.tensor(g))
            np.testing.assert_allclose(P.avg_pool2d(_t(x, dev), k, s, p, ceil, cip, div).numpy(),
                                       ty.detach().numpy(), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(
                P.avg_pool2d_backward(_t(g, dev), _t(x, dev), k, s, p, ceil, cip, div).numpy(),
                tx.grad.numpy(), rtol=1e-5, atol=1e-6)
    x = rng.standard_normal((2, 3, 17)).astype(np.float32)
    tx = torch.tensor(x)
    np.testing.assert_array_equal(P.max_pool1d(_t(x, dev), 3, 2, 1, 2, True).numpy(),
                                  F.max_pool1d(tx, 3, 2, 1, 2, True).numpy())
    np.testing.assert_allclose(P.avg_pool1d(_t(x, dev), 4, 3, 2, True, False).numpy(),
                               F.avg_pool1d(tx, 4, 3, 2, True, False).numpy(), rtol=1e-6, atol=1e-6)
    for shape, out in ADAPTIVE:
        x = rng.standard_normal(shape).astype(np.float32)
        tx = torch.tensor(x, requires_grad=True)
        ty = F.adaptive_avg_pool2d(tx, out)
        g = rng.standard_normal(tuple(ty.shape)).astype(np.float32)
        ty.backward(torch.tensor(g))
        np.testing.assert_allclose(P.adaptive_avg_pool2d(_t(x, dev), out).numpy(), ty.detach().numpy(),
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(P.adaptive_avg_pool2d_backward(_t(g, dev), _t(x, dev), out).numpy(),
                                   tx.grad.numpy(), rtol=1e-5, atol=1e-6)


# ---- bad input -------------------------------------------------------------------------------
def _x(dev, shape=(1, 2, 6, 6), dtype=np.float32):
    return _t(np.zeros(shape, dtype), dev)


@pytest.mark.parametrize("call,arg", [
    (lambda d: P.max_pool2d(_x(d, (6, 6)), 2), "x"),                       # 2-d input
    (lambda d: P.avg_pool2d(_x(d, (1, 1, 2, 6, 6)), 2), "x"),              # 5-d input
    (lambda d: P.max_pool1d(_x(d), 2), "x"),                               # 4-d for 1-d pooling
    (lambda d: P.max_pool2d(_x(d, dtype=np.int32), 2), "x"),
    (lambda d: P.avg_pool2d(_x(d, (1, 0, 6, 6)), 2), "x"),
    (lambda d: P.max_pool2d(_x(d, (1, 1, 2, 2)), 5, padding=1), "kernel_size"),  # > padded input
    (lambda d: P.avg_pool1d(_x(d, (1, 1, 3)), 4), "kernel_size"),
    (lambda d: P.max_pool2d(_x(d), 3, padding=2), "padding"),             # > kernel / 2
    (lambda d: P.avg_pool2d(_x(d), (4, 2), padding=(1, 2)), "padding"),
    (lambda d: P.max_pool2d(_x(d), (2, 2, 2)), "kernel_size"),
    (lambda d: P.max_pool2d(_x(d), 2.5), "kernel_size"),
    (lambda d: P.max_pool2d(_x(d), 2, stride=0), "stride"),
    (lambda d: P.max_pool2d(_x(d), 2, dilation=0), "dilation"),
    (lambda d: P.avg_pool2d(_x(d), 2, padding=-1), "padding"),
    (lambda d: P.avg_pool2d(_x(d), 2, divisor_override=0), "divisor_override"),
    (lambda d: P.max_pool2d(_x(d), 2, ceil_mode="yes"), "ceil_mode"),
    (lambda d: P.max_pool2d_backward(_x(d, (1, 2, 3, 4)), _x(d), 2), "grad_out"),
    (lambda d: P.avg_pool2d_backward(_x(d, (1, 2, 3, 3), np.float16), _x(d), 2), "grad_out"),
    (lambda d: P.max_pool2d_backward(_x(d, (1, 2, 3, 3)), _x(d), 2,
                                     indices=_x(d, (1, 2, 3, 3))), "indices"),
    (lambda d: P.max_pool2d_backward(_x(d, (1, 2, 3, 3)), _x(d), 2,
                                     indices=_x(d, (1, 2, 3, 2), np.int32)), "indices"),
    (lambda d: P.adaptive_avg_pool2d(_x(d), 0), "output_size"),
    (lambda d: P.adaptive_avg_pool2d(_x(d), (2, 2, 2)), "output_size"),
    (lambda d: P.global_avg_pool2d_backward(_x(d, (1, 2, 2, 1)), _x(d)), "grad_out"),
])
def test_bad_input(dev, call, arg):
    dev.reset_counts()
    with pytest.raises(ValueError, match=f"^{arg}:"):
        call(dev)
    assert sum(dev.dispatch_counts.values()) == 0


@pytest.mark.parametrize("kind", ["max", "max_indices", "avg"])
def test_pool2d_strided_out(dev, kind):
    """max/avg pooling with out= a view at channel c0 of a larger (poisoned) tensor and
    out_batch_stride=: the slice holds the contiguous result, the rest is untouched."""
    if not dev.supports_views:
        pytest.skip("out= at an offset needs buffer views")
    rng = np.random.default_rng(3)
    n, c, ctot, c0 = 3, 4, 9, 2
    x = pymetalnn.tensor(rng.standard_normal((n, c, 7, 7)).astype(np.float32), dev)
    f = P.avg_pool2d if kind == "avg" else P.max_pool2d
    kw = {"return_indices": True} if kind == "max_indices" else {}
    want = f(x, 3, 2, padding=1, **kw)
    dest = pymetalnn.tensor(np.full((n, ctot, 4, 4), np.nan, np.float32), dev)
    view = Tensor(dest.buffer.view(c0 * 16 * 4), (n, c, 4, 4), np.float32)
    got = f(x, 3, 2, padding=1, out=view, out_batch_stride=ctot * 16, **kw)
    if kind == "max_indices":
        np.testing.assert_array_equal(got[1].numpy(), want[1].numpy())
        want = want[0]
    d = dest.numpy()
    np.testing.assert_array_equal(d[:, c0:c0 + c], want.numpy())
    assert np.isnan(np.delete(d, np.s_[c0:c0 + c], axis=1)).all()


@pytest.mark.parametrize("shape,out", [((2, 3, 10), 4), ((3, 7), 7), ((1, 1, 5), 1), ((2, 2, 33), (32,))])
def test_adaptive_avg_pool1d(dev, shape, out):
    """adaptive_avg_pool1d (batched and unbatched) against the 2-D reference with H = 1; the
    gradient against the reference's."""
    x = _data(shape, np.float32, 4)
    o = out if isinstance(out, int) else out[0]
    x4 = x.reshape((-1 if len(shape) == 3 else 1, shape[-2], 1, shape[-1]))
    want = ref.adaptive_avg_pool2d(x4.astype(np.float64), (1, o)).reshape(shape[:-1] + (o,))
    y = P.adaptive_avg_pool1d(_t(x, dev), out)
    np.testing.assert_allclose(y.numpy(), want, rtol=1e-6, atol=1e-6)
    g = _data(want.shape, np.float32, 5)
    gx = P.adaptive_avg_pool1d_backward(_t(g, dev), _t(x, dev), out)
    rg = ref.adaptive_avg_pool2d_backward(g.reshape(x4.shape[:2] + (1, o)).astype(np.float64), x4, (1, o))
    np.testing.assert_allclose(gx.numpy(), rg.reshape(shape), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("case", MAX_BWD_CASES, ids=_ids(MAX_BWD_CASES))
def test_max_pool2d_backward_without_indices(dev, case, dtype, monkeypatch):
    """Without the forward's indices the backward makes them first (the forward kernel into a
    temporary) and takes the indices kernels: the reference's values, and bitwise the sums of
    the kernel that recomputes every candidate window's argmax (ties and NaN included)."""
    shape, k, s, p, d, ceil, variant = case
    for integers in (False, True):
        x = _data(shape, dtype, seed=4, integers=integers)
        if not integers:
            x.reshape(-1)[3] = np.nan
        y_ref, _ = ref.max_pool2d(x, k, s, p, d, ceil)
        g = _data(y_ref.shape, dtype, seed=9)
        dev.reset_counts()
        dx = P.max_pool2d_backward(_t(g, dev), _t(x, dev), k, s, p, d, ceil)
        sfx = "float" if dtype == np.float32 else "half"
        kh, kw = (k, k) if isinstance(k, int) else k
        fwd = f"_k{kh}x{kw}" if (kh, kw) in P.FIXED_WINDOWS else ""
        assert set(dev.dispatch_counts) == {
            f"max_pool2d_fwd{fwd}_{sfx}", f"max_pool2d_bwd_idx_{variant + '_' if variant else ''}{sfx}"}
        if integers:
            np.testing.assert_allclose(dx.numpy(), ref.max_pool2d_backward(g, x, k, s, p, d, ceil),
                                       **TOL[dtype])
        monkeypatch.setattr(P, "MAX_BWD_VIA_INDICES", False)
        recomputed = P.max_pool2d_backward(_t(g, dev), _t(x, dev), k, s, p, d, ceil)
        monkeypatch.setattr(P, "MAX_BWD_VIA_INDICES", True)
        np.testing.assert_array_equal(dx.numpy(), recomputed.numpy())


@pytest.mark.parametrize("padding, ceil", [(0, False), (1, True)])
def test_avg_pool_negative_divisor_override(dev, padding, ceil):
    """torch takes any nonzero divisor_override: a negative one divides every window sum by it
    (forward and gradient), whether the windows share it on the constant-divisor path or not."""
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(3).standard_normal((2, 3, 7, 6)).astype(np.float32)
    tx = torch.tensor(x, requires_grad=True)
    want = torch.nn.functional.avg_pool2d(tx, 3, 2, padding, ceil, True, -3)
    g = np.random.default_rng(4).standard_normal(tuple(want.shape)).astype(np.float32)
    (gx,) = torch.autograd.grad(want, [tx], torch.tensor(g))
    got = P.avg_pool2d(pymetalnn.tensor(x, dev), 3, 2, padding, ceil, True, -3)
    np.testing.assert_allclose(got.numpy(), want.detach().numpy(), rtol=1e-5, atol=1e-6)
    dx = P.avg_pool2d_backward(pymetalnn.tensor(g, dev), pymetalnn.tensor(x, dev), 3, 2, padding, ceil,
                               True, -3)
    np.testing.assert_allclose(dx.numpy(), gx.numpy(), rtol=1e-5, atol=1e-6)
