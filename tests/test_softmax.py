"""softmax / log_softmax (kernels/softmax.metal) against the float64 numpy references.

Shapes cover every kernel the host can pick: the row kernels (innermost axis whose length is a
multiple of the 16-byte chunk, up to 1024 float / 2048 half), rows (inner = 1) with one simdgroup
or a whole threadgroup per row, strided axes with W = 2..32 columns, cached and uncached tiles (5000 classes
exceed the threadgroup cache), batch 1, 1/31/32/33/1000 classes, odd spatial sizes.
"""
from __future__ import annotations

import numpy as np
import pytest
from reference import softmax as ref

import pymetalnn as pm
from pymetalnn import functional as F
from pymetalnn.ops import softmax as ops

# (shape, dim)
CASES = [
    ((1, 1), 1),
    ((1, 33), 1),
    ((5, 31), 1),
    ((3, 32), -1),
    ((2, 1000), 1),
    ((2, 5000), 1),        # longer than the cache: re-read path
    ((33, 3), 0),          # strided axis of a 2-D tensor, W = 2
    ((2, 33, 5, 7), 1),    # channel axis, W = 32
    ((1, 32, 3, 1), 1),    # batch 1, W = 2
    ((3, 1, 4, 5), 1),     # one channel
    ((2, 3, 4, 5), 0),
    ((2, 3, 4, 5), 2),
    ((2, 3, 4, 5), -1),
    ((1, 300, 9, 9), 1),   # W shrinks to fit the cache
    # row kernels (innermost axis, a multiple of the 16-byte chunk, up to 32 x 8 chunks): one
    # chunk, a partial and a whole last lane round, the longest fp32 row, one past it (tiles)
    ((3, 8), 1),
    ((4, 520), 1),
    ((2, 3, 5, 16), 3),
    ((3, 1024), 1),
    ((2, 1032), -1),
    ((2, 2048), 1),
]


@pytest.fixture(params=["device", "gpu"])
def tiling(request, dev, monkeypatch):
    """The device's tile plans; on cpu also a GPU's (several slices of a tile's column: the
    slice reductions run there too; the cpu's own plans use one simdgroup of lanes per tile)."""
    if request.param == "gpu":
        if dev.name != "cpu":
            pytest.skip("the device's own plans are a GPU's")
        monkeypatch.setattr(ops, "CPU_ONE_SLICE", False)
    return request.param


# backward: the reference builds each position's full Jacobian, so 5000 classes are left to the
# forward; 2100 classes still overflow the cache of the backward (two cached arrays)
BWD_CASES = [(s, d) for s, d in CASES if s[d] <= 2100] + [((2, 2100), 1)]


@pytest.mark.parametrize("seq", ["off", "all"], ids=["rows", "seq"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("log", [False, True])
def test_row_kernels(dev, monkeypatch, log, dtype, seq):
    """Innermost-axis rows take the row kernels (one simdgroup per row; with SEQ_ROWS, the
    one-thread-per-row kernels, the cpu backend's default); a view at an offset that is not
    16-byte aligned takes the tile kernels: all match the reference, forward and backward."""
    if not dev.supports_views:
        pytest.skip(f"{dev.name} binds whole buffers only")
    monkeypatch.setattr(ops, "SEQ_ROWS", seq)
    kind = "_seq_" if seq == "all" else "_rows_"
    isz = np.dtype(dtype).itemsize
    fwd, bwd = (F.log_softmax, F.log_softmax_backward_from_output) if log else \
        (F.softmax, F.softmax_backward_from_output)
    rf = ref.log_softmax if log else ref.softmax
    shapes = [(5, 1000), (33, 64), (2, 1024)] + ([(3, 4104), (1, 8), (257, 24)] if seq == "all" else [])
    for k, shape in enumerate(shapes):
        x, g = _data(shape, dtype, 60 + k), _data(shape, dtype, 70 + k, 1.0)
        want = rf(x.astype(np.float64), 1)
        tol = dict(TOL[dtype], atol=TOL[dtype]["atol"] * (10 if log else 1))
        for view in (False, True):
            if view:
                buf = dev.buffer(np.concatenate([np.zeros(1, dtype), x.ravel()]))
                xt = pm.Tensor(buf.view(isz, x.nbytes), shape, dtype)
            else:
                xt = pm.tensor(x, dev)
            before = dict(dev.dispatch_counts)
            y = fwd(xt, 1)
            names = [n for n, v in dev.dispatch_counts.items() if v != before.get(n, 0)]
            assert names and all((kind in n) != view for n in names), (view, names)
            np.testing.assert_allclose(y.numpy().astype(np.float64), want, **tol)
            yn = y.numpy()
            dx = bwd(pm.tensor(g, dev), y, 1).numpy().astype(np.float64)
            yf, gf = yn.astype(np.float64), g.astype(np.float64)
            dwant = gf - np.exp(yf) * gf.sum(1, keepdims=True) if log else \
                yf * (gf - (gf * yf).sum(1, keepdims=True))
            np.testing.assert_allclose(dx, dwant, rtol=TOL[dtype]["rtol"] * 5,
                                       atol=TOL[dtype]["atol"] * 5)


TOL = {np.float32: dict(rtol=2e-5, atol=1e-6), np.float16: dict(rtol=2e-3, atol=2e-3)}


def _data(shape, dtype, seed, scale=3.0):
    x = np.random.default_rng(seed).standard_normal(shape) * scale
    return x.astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("log", [False, True])
def test_forward(dev, log, dtype, tiling):
    for k, (shape, dim) in enumerate(CASES):
        x = _data(shape, dtype, k)
        fn, rf = (F.log_softmax, ref.log_softmax) if log else (F.softmax, ref.softmax)
        y = fn(pm.tensor(x, dev), dim)
        assert y.dtype == np.dtype(dtype) and y.shape == shape
        # the reference sees the same (rounded) input; log_softmax's error scales with |x|
        want = rf(x.astype(np.float64), dim)
        tol = dict(TOL[dtype])
        if log:
            tol["atol"] = tol["atol"] * 10
        np.testing.assert_allclose(y.numpy().astype(np.float64), want, **tol,
                                   err_msg=f"shape {shape} dim {dim}")


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("log", [False, True])
def test_backward(dev, log, dtype, tiling):
    for k, (shape, dim) in enumerate(BWD_CASES):
        x = _data(shape, dtype, 100 + k)
        dy = _data(shape, dtype, 200 + k, scale=1.0)
        x64 = x.astype(np.float64)
        if log:
            y = ref.log_softmax(x64, dim).astype(dtype)
            got = F.log_softmax_backward_from_output(pm.tensor(dy, dev), pm.tensor(y, dev), dim)
            want = ref.log_softmax_backward(dy.astype(np.float64), x64, dim)
        else:
            y = ref.softmax(x64, dim).astype(dtype)
            got = F.softmax_backward_from_output(pm.tensor(dy, dev), pm.tensor(y, dev), dim)
            want = ref.softmax_backward(dy.astype(np.float64), x64, dim)
        assert got.dtype == np.dtype(dtype) and got.shape == shape
        # half: y itself was rounded to half before the kernel saw it
        tol = dict(rtol=1e-4, atol=2e-6) if dtype == np.float32 else dict(rtol=1e-2, atol=1e-2)
        np.testing.assert_allclose(got.numpy().astype(np.float64), want, **tol,
                                   err_msg=f"shape {shape} dim {dim}")


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_extreme_logits(dev, dtype):
    big = 6e4 if dtype == np.float16 else 1e30
    rows = np.array([
        np.full(33, 7.0),                                   # all equal: uniform
        np.full(33, -big),                                  # all equal and very negative
        np.r_[big, np.zeros(32)],                           # one huge logit
        np.r_[-big, np.linspace(-3, 3, 32)],                # one very negative logit
        np.r_[np.full(16, big), np.full(17, big * 0.5)],    # large and tied
    ])
    x = rows.astype(dtype)
    for log in (False, True):
        y = (F.log_softmax if log else F.softmax)(pm.tensor(x, dev), 1).numpy().astype(np.float64)
        assert np.all(np.isfinite(y)), y
        want = (ref.log_softmax if log else ref.softmax)(x.astype(np.float64), 1)
        if not log:
            np.testing.assert_allclose(y, want, **TOL[dtype])
            np.testing.assert_allclose(y.sum(axis=1), 1.0, rtol=0, atol=2e-2 if dtype == np.float16 else 1e-5)
        else:
            # entries of log_softmax of size ~big: compare relative to their magnitude
            np.testing.assert_allclose(y, want, rtol=TOL[dtype]["rtol"], atol=10 * TOL[dtype]["atol"])
    np.testing.assert_allclose(F.softmax(pm.tensor(x[:1], dev), 1).numpy().astype(np.float64),
                               1.0 / 33, rtol=TOL[dtype]["rtol"])


def test_reference_backward_vs_finite_differences():
    rng = np.random.default_rng(7)
    for shape, dim in [((3, 5), 1), ((2, 3, 2, 2), 1), ((2, 3, 2, 3), 3), ((4, 2), 0)]:
        x = rng.standard_normal(shape) * 2
        dy = rng.standard_normal(shape)
        for f, b in [(ref.softmax, ref.softmax_backward), (ref.log_softmax, ref.log_softmax_backward)]:
            fd = ref.finite_difference(lambda z, f=f, d=dim: f(z, d), x, dy)
            np.testing.assert_allclose(b(dy, x, dim), fd, rtol=1e-6, atol=1e-8)


def test_against_torch(dev):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(11)
    for shape, dim in [((4, 1000), 1), ((2, 33, 5, 7), 1), ((3, 4, 5, 6), 2)]:
        x = (rng.standard_normal(shape) * 4).astype(np.float32)
        dy = rng.standard_normal(shape).astype(np.float32)
        for log in (False, True):
            xt = torch.tensor(x, requires_grad=True)
            yt = (torch.log_softmax if log else torch.softmax)(xt, dim)
            yt.backward(torch.tensor(dy))
            y = (F.log_softmax if log else F.softmax)(pm.tensor(x, dev), dim)
            dx = (F.log_softmax_backward_from_output if log else F.softmax_backward_from_output)(
                pm.tensor(dy, dev), y, dim)
            # the input form (the contract every <op>_backward shares) gives the same gradient
            dxi = (F.log_softmax_backward if log else F.softmax_backward)(pm.tensor(dy, dev), x, dim)
            np.testing.assert_allclose(y.numpy(), yt.detach().numpy(), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(dx.numpy(), xt.grad.numpy(), rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(dxi.numpy(), xt.grad.numpy(), rtol=1e-4, atol=1e-5)


def test_bad_input(dev):
    x = pm.tensor(np.zeros((2, 3), np.float32), dev)
    dev.reset_counts()
    with pytest.raises(ValueError, match="input"):
        F.log_softmax(pm.tensor(np.zeros((2, 3), np.int32), dev), 1)
    with pytest.raises(ValueError, match="dim"):
        F.softmax(x, 2)
    with pytest.raises(ValueError, match="dim"):
        F.softmax(x, -3)
    with pytest.raises(ValueError, match="dim"):
        F.softmax(x, 1.0)
    with pytest.raises(ValueError, match="grad_out"):
        F.softmax_backward(pm.tensor(np.zeros((3, 2), np.float32), dev), x, 1)
    with pytest.raises(ValueError, match="grad_out"):
        F.log_softmax_backward(pm.tensor(np.zeros((2, 3), np.float16), dev), x, 1)
    with pytest.raises(ValueError, match="input"):
        F.softmax_backward(x, None, 1)
    with pytest.raises(ValueError, match="output"):
        F.softmax_backward_from_output(x, None, 1)
    with pytest.raises(ValueError, match="grad_out"):
        F.softmax_backward_from_output(pm.tensor(np.zeros((3, 2), np.float32), dev), x, 1)
    assert sum(dev.dispatch_counts.values()) == 0


@pytest.mark.parametrize("log", [False, True])
def test_any_rank_and_input_form_backward(dev, log):
    """Ranks 0, 1, 3, 5 and negative dims, with torch's implicit dim for dim=None; the input-form
    backward against the float64 reference."""
    fn, rf = (F.log_softmax, ref.log_softmax) if log else (F.softmax, ref.softmax)
    bw, rb = (F.log_softmax_backward, ref.log_softmax_backward) if log else \
        (F.softmax_backward, ref.softmax_backward)
    cases = [((), None, 0), ((7,), None, 0), ((1,), 0, 0), ((3, 33, 5), None, 0), ((3, 33, 5), -1, 2),
             ((2, 1, 3, 31, 2), 3, 3), ((2, 3, 4, 5, 2), -4, 1), ((5, 4), None, 1)]
    for k, (shape, dim, d_ref) in enumerate(cases):
        x = _data(shape, np.float32, 300 + k)
        dy = _data(shape, np.float32, 400 + k, scale=1.0)
        x64 = x.astype(np.float64).reshape(shape or (1,))
        y = fn(pm.tensor(x, dev), dim)
        assert y.shape == shape
        np.testing.assert_allclose(y.numpy().reshape(shape or (1,)), rf(x64, d_ref), rtol=1e-5,
                                   atol=1e-6, err_msg=f"{shape} {dim}")
        g = bw(pm.tensor(dy, dev), pm.tensor(x, dev), dim)
        np.testing.assert_allclose(g.numpy().reshape(shape or (1,)),
                                   rb(dy.astype(np.float64).reshape(shape or (1,)), x64, d_ref),
                                   rtol=1e-4, atol=1e-6, err_msg=f"{shape} {dim}")


def test_tile_plans_cover_all_shapes():
    """The cases above reach every plan: rows with one simdgroup and one threadgroup per row,
    several W, cached and uncached (else a kernel path would go untested)."""
    plans = [ops.tile_plan(*ops.split_shape(s, d % len(s))) for s, d in CASES]
    assert {p.W for p in plans} >= {1, 2, 8, 32}
    assert {p.SW for p in plans} >= {32, 256}
    assert {p.cached for p in plans} == {0, 1}
    assert any(p.SW < 256 and p.W > 1 for p in plans)
    bwd = [ops.tile_plan(*ops.split_shape(s, d % len(s)), cache_arrays=2) for s, d in BWD_CASES]
    assert {p.cached for p in bwd} == {0, 1}
    assert any(p.W == 1 and not p.cached for p in bwd)
