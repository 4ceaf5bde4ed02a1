"""Batch / group / instance norm (kernels/norm.metal) against the float64 numpy references.

Shapes reach both batch-norm tilings (column mode for fewer than 32 positions per plane, including
(N, C) inputs; row mode otherwise), statistics rows split over several threadgroup chunks
(N * HW > 256 in row mode, N > 64 in column mode), batch 1, 1/3/31/32/33 channels, and data whose mean is
large next to its spread (where E[x^2] - E[x]^2 would lose the variance).
"""
from __future__ import annotations

import numpy as np
import pytest
from norm_checks import _data, _params
from reference import norm as ref
from reference._common import activation as np_act

import pymetalnn as pm
from pymetalnn import functional as F
from pymetalnn.ops import norm as ops

BN_SHAPES = [(2, 3), (5, 33), (70, 5), (1, 32, 5, 7), (3, 31, 4, 9), (2, 33, 3, 3), (4, 5, 40),
             (4, 3, 10, 10), (7, 1, 2, 3),
             # planes that are not whole 16-byte chunks, short enough for norm_part_planes
             (8, 3, 17, 17), (2, 4, 7, 7)]


def _tol(dtype, scale=1.0, offset=0.0, w=None):
    """Tolerance for normalized outputs; with data offset by `offset`, float32 cannot locate the
    mean better than a few ulps of the offset (x itself carries that rounding), and that error is
    scaled by the weights. Naive E[x^2] - E[x]^2 statistics miss by far more."""
    if dtype == np.float16:
        return dict(rtol=3e-3, atol=3e-3 * scale)
    extra = 3 * float(np.spacing(np.float32(offset))) * (1.0 if w is None else float(np.abs(w).max()))
    return dict(rtol=2e-5, atol=2e-5 * scale + extra)


@pytest.fixture(params=["device", "gpu"])
def tiling(request, dev, monkeypatch):
    """The statistics tiling of the device; on cpu also a GPU's (ops._target: ~1024 groups of
    few elements per thread; layer norm's lanes per row up to 256), so that the multi-chunk
    merges and multi-simdgroup rows of the shapes below run there too (the cpu's own tiling
    keeps them in one chunk, one simdgroup per row)."""
    if request.param == "gpu":
        if dev.name != "cpu":
            pytest.skip("the device's own tiling is a GPU's")
        monkeypatch.setattr(ops, "_target", lambda d: (ops.TARGET_GROUPS, 16))
        monkeypatch.setattr(ops, "CPU_LN_SW", 0)  # layer norm: up to 256 lanes per row
    return request.param


@pytest.fixture(params=["auto", "tree", "rows"])
def finalize(request, monkeypatch):
    """The per-row reductions (finalize, batch norm backward's per-channel sums, column-mode
    partials): the device's choice, and each form forced (a threadgroup per row on the cpu, a
    thread per row on a GPU, where "auto" would not pick them)."""
    monkeypatch.setattr(ops, "FINALIZE", request.param)
    return request.param


def test_finalize_rows_grid_stride(dev, monkeypatch):
    """The thread-per-row kernels stride past their grid (one threadgroup here): the finalize
    over 300 rows, the column-mode partials over 1500 columns, batch norm backward's sums over
    300 channels."""
    monkeypatch.setattr(ops, "FINALIZE", "rows")
    monkeypatch.setattr(ops, "MAX_GROUPS", 1)
    x = _data((3, 300, 5), np.float32, 7)
    w, b = _params(300, 7)
    y, mean, invstd = F.batch_norm_with_stats(pm.tensor(x, dev), None, None, w, b, True,
                                              0.1, 1e-5)
    ry, rmean, rvar, _ = ref.batch_norm_train(x, w, b, 1e-5)
    np.testing.assert_allclose(mean.numpy(), rmean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(invstd.numpy(), 1 / np.sqrt(rvar + 1e-5), rtol=1e-4)
    np.testing.assert_allclose(y.numpy(), ry, rtol=1e-4, atol=1e-4)
    dy = _data(x.shape, np.float32, 8)
    dev.reset_counts()
    dx, _, _, dw, db = F.batch_norm_backward(dy, x, None, None, w, b, True, 0.1, 1e-5)
    assert "batch_norm_grad_rows_bwd_float" in dev.dispatch_counts
    rdx, rdw, rdb = ref.batch_norm_train_backward(dy, x, w, 1e-5)
    np.testing.assert_allclose(dx.numpy(), rdx, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dw.numpy(), rdw, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(db.numpy(), rdb, rtol=1e-4, atol=1e-4)


def test_plans_cover_both_modes(monkeypatch):
    """BN_SHAPES reach multi-chunk partials in both modes under a GPU's tiling."""
    monkeypatch.setattr(ops, "_target", lambda d: (ops.TARGET_GROUPS, 16))
    modes = set()
    chunks = set()
    for s in BN_SHAPES:
        x = pm.empty(s, np.float32)
        p = ops._bn_params(x, 1e-5, 0.1, True, True, True, True)
        modes.add(bool(p.cols))
        chunks.add((bool(p.cols), p.parts // (p.HW if p.cols else 1) > 1))
    assert modes == {True, False}
    assert (True, True) in chunks and (False, True) in chunks  # multi-chunk partials, both modes


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_batch_norm_train(dev, dtype, tiling, finalize):
    _check_batch_norm_train(dev, dtype, BN_SHAPES)


# batch_norm_fwd_res's steps: a channel of 2048 = 8 x 256 elements (RU 8) and 2049 (RU 16),
# planes longer than the threadgroup (17x17, 2048) and shorter (6x6: several images per step),
# batch 1, the largest channel it holds (12288 = 48 x 256) and one past it (the three kernels)
RES_SHAPES = [(2, 3, 17, 17), (8, 5, 7, 7), (1, 2, 2048), (1, 2, 2049), (32, 4, 17, 17),
              (7, 3, 6, 6), (1, 1, 12288), (1, 2, 12289), (5, 33, 35)]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_batch_norm_train_resident(dev, dtype, monkeypatch):
    """The one-kernel training forward (a channel per threadgroup, held in registers), forced
    on every backend: the float64 reference as the three-kernel path, in one launch where the
    channel fits and three where it does not."""
    monkeypatch.setattr(ops, "RESIDENT", "all")
    launches = _check_batch_norm_train(dev, dtype, RES_SHAPES)
    for shape, n in zip(RES_SHAPES, launches):
        fits = shape[0] * int(np.prod(shape[2:])) <= max(ops.RES_UNROLLS) * 256
        assert n == (1 if fits else 3), (shape, n)
    # one threadgroup for every channel: its loop over channels reuses the reduction scratch
    monkeypatch.setattr(ops, "MAX_GROUPS", 1)
    assert _check_batch_norm_train(dev, dtype, [(3, 7, 6, 6), (2, 33, 35)]) == [1, 1]


def _check_batch_norm_train(dev, dtype, shapes):
    """Training forward (y, saved statistics, running estimates) and backward of each shape
    against the float64 reference; returns each forward's launch count."""
    launches = []
    for k, shape in enumerate(shapes):
        c = shape[1]
        # a large mean next to the spread, in float32 only (half cannot hold it precisely)
        off = 1000.0 if dtype == np.float32 and k % 2 else 0.5
        x = _data(shape, dtype, k, offset=off)
        w, b = _params(c, k)
        rm0 = np.random.default_rng(k).uniform(-1, 1, c).astype(np.float32)
        rv0 = np.random.default_rng(k).uniform(0.5, 2, c).astype(np.float32)
        rm, rv, xt = pm.tensor(rm0, dev), pm.tensor(rv0, dev), pm.tensor(x, dev)
        dev.reset_counts()
        y, sm, si = F.batch_norm_with_stats(xt, rm, rv, w, b, True, 0.2, 1e-5)
        launches.append(sum(dev.dispatch_counts.values()))
        ry, mean, var, uvar = ref.batch_norm_train(x, w, b, 1e-5)
        tol = _tol(dtype, 4, off, w)
        np.testing.assert_allclose(y.numpy().astype(np.float64), ry, **tol, err_msg=str(shape))
        np.testing.assert_allclose(sm.numpy(), mean, rtol=1e-6, atol=1e-5 + tol["atol"], err_msg=str(shape))
        np.testing.assert_allclose(si.numpy(), 1 / np.sqrt(var + 1e-5), rtol=1e-4, err_msg=str(shape))
        erm, erv = ref.running_update(rm0, rv0, mean, uvar, 0.2)
        np.testing.assert_allclose(rm.numpy(), erm, rtol=1e-5, atol=1e-5, err_msg=str(shape))
        np.testing.assert_allclose(rv.numpy(), erv, rtol=1e-4, atol=1e-6, err_msg=str(shape))
        # backward, recomputing the statistics and from the saved ones
        dy = _data(shape, dtype, 100 + k)
        rdx, rdw, rdb = ref.batch_norm_train_backward(dy, x, w, 1e-5)
        for saved in (None, (sm, si)):
            kw = {} if saved is None else {"save_mean": saved[0], "save_invstd": saved[1]}
            dx, n1, n2, dw, db = F.batch_norm_backward(dy, x, rm, rv, w, b, True, 0.2, 1e-5, **kw)
            assert n1 is None and n2 is None and dx.dtype == np.dtype(dtype)
            np.testing.assert_allclose(dx.numpy().astype(np.float64), rdx, **tol, err_msg=str(shape))
            np.testing.assert_allclose(dw.numpy(), rdw, rtol=1e-4, atol=1e-4 * np.sqrt(x.size))
            np.testing.assert_allclose(db.numpy(), rdb, rtol=1e-4, atol=1e-4 * np.sqrt(x.size))
        # the backward leaves the running statistics alone
        np.testing.assert_allclose(rm.numpy(), erm, rtol=1e-5, atol=1e-5)
    return launches


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_batch_norm_eval(dev, dtype):
    for k, shape in enumerate(BN_SHAPES[:6]):
        c = shape[1]
        x = _data(shape, dtype, k)
        w, b = _params(c, k)
        rm = np.random.default_rng(k).uniform(-1, 1, c).astype(np.float32)
        rv = np.random.default_rng(k).uniform(0.5, 2, c).astype(np.float32)
        for affine in (True, False):
            wa, ba = (w, b) if affine else (None, None)
            y = F.batch_norm(pm.tensor(x, dev), rm, rv, wa, ba, False)
            np.testing.assert_allclose(y.numpy().astype(np.float64), ref.batch_norm_eval(x, rm, rv, wa, ba),
                                       **_tol(dtype, 4))
            dy = _data(shape, dtype, 50 + k)
            dx, _, _, dw, db = F.batch_norm_backward(dy, x, rm, rv, wa, ba, False)
            rdx, rdw, rdb = ref.batch_norm_eval_backward(dy, x, rm, rv, wa)
            np.testing.assert_allclose(dx.numpy().astype(np.float64), rdx, **_tol(dtype, 4))
            if affine:
                np.testing.assert_allclose(dw.numpy(), rdw, rtol=1e-4, atol=1e-4 * np.sqrt(x.size))
                np.testing.assert_allclose(db.numpy(), rdb, rtol=1e-4, atol=1e-4 * np.sqrt(x.size))
            else:
                assert dw is None and db is None


def test_running_statistics_over_steps(dev):
    """Several training steps: running estimates equal the numpy reference's and PyTorch's."""
    rng = np.random.default_rng(4)
    shape, c, mom = (6, 5, 3, 4), 5, 0.1
    rm, rv = pm.tensor(np.zeros(c, np.float32), dev), pm.tensor(np.ones(c, np.float32), dev)
    erm, erv = np.zeros(c), np.ones(c)
    batches = [(rng.standard_normal(shape) * (1 + s) + s).astype(np.float32) for s in range(4)]
    for x in batches:
        F.batch_norm(x, rm, rv, None, None, True, mom, 1e-5)
        _, mean, _, uvar = ref.batch_norm_train(x)
        erm, erv = ref.running_update(erm, erv, mean, uvar, mom)
    np.testing.assert_allclose(rm.numpy(), erm, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rv.numpy(), erv, rtol=1e-5, atol=1e-6)
    torch = pytest.importorskip("torch")
    trm, trv = torch.zeros(c), torch.ones(c)
    for x in batches:
        torch.nn.functional.batch_norm(torch.tensor(x), trm, trv, None, None, True, mom, 1e-5)
    np.testing.assert_allclose(rm.numpy(), trm.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rv.numpy(), trv.numpy(), rtol=1e-5, atol=1e-6)


GN_CASES = [((2, 6, 5, 5), 1), ((2, 6, 5, 5), 2), ((2, 6, 5, 5), 6), ((1, 32, 3, 3), 8),
            ((3, 33, 7), 3), ((3, 33, 7), 11), ((2, 4), 2), ((1, 31, 17, 17), 31)]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_group_norm(dev, dtype, tiling, finalize):
    for k, (shape, groups) in enumerate(GN_CASES):
        c = shape[1]
        off = 300.0 if dtype == np.float32 and k % 2 else 0.0
        x = _data(shape, dtype, k, offset=off)
        w, b = _params(c, k)
        for affine in (True, False):
            wa, ba = (w, b) if affine else (None, None)
            y, mean, rstd = F.group_norm_with_stats(pm.tensor(x, dev), groups, wa, ba, 1e-5)
            ry, rmean, rrstd = ref.group_norm(x, groups, wa, ba, 1e-5)
            what = f"{shape} G={groups} affine={affine}"
            tol = _tol(dtype, 4, off, wa)
            np.testing.assert_allclose(y.numpy().astype(np.float64), ry, **tol, err_msg=what)
            np.testing.assert_allclose(mean.numpy(), rmean, rtol=1e-6, atol=1e-5 + tol["atol"], err_msg=what)
            np.testing.assert_allclose(rstd.numpy(), rrstd, rtol=1e-3, err_msg=what)
            dy = _data(shape, dtype, 30 + k)
            rdx, rdw, rdb = ref.group_norm_backward(dy, x, groups, wa, 1e-5)
            for kw in ({}, {"save_mean": mean, "save_rstd": rstd}):
                dx, dw, db = F.group_norm_backward(dy, x, groups, wa, ba, 1e-5, **kw)
                np.testing.assert_allclose(dx.numpy().astype(np.float64), rdx,
                                           **_tol(dtype, 8, off, wa), err_msg=what)
                if affine:
                    np.testing.assert_allclose(dw.numpy(), rdw, rtol=1e-4, atol=1e-4 * np.sqrt(x.size))
                    np.testing.assert_allclose(db.numpy(), rdb, rtol=1e-4, atol=1e-4 * np.sqrt(x.size))
                else:
                    assert dw is None and db is None


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_instance_norm(dev, dtype):
    for k, shape in enumerate([(2, 3, 5, 7), (1, 33, 4, 4), (3, 32, 9)]):
        c = shape[1]
        x = _data(shape, dtype, k)
        w, b = _params(c, k)
        y = F.instance_norm(pm.tensor(x, dev), None, None, w, b)
        np.testing.assert_allclose(y.numpy().astype(np.float64), ref.group_norm(x, c, w, b)[0],
                                   **_tol(dtype, 4))
        dy = _data(shape, dtype, 9 + k)
        dx, n1, n2, dw, db = F.instance_norm_backward(dy, x, None, None, w, b)
        rdx, rdw, rdb = ref.group_norm_backward(dy, x, c, w)
        assert n1 is None and n2 is None
        np.testing.assert_allclose(dx.numpy().astype(np.float64), rdx, **_tol(dtype, 8))
        np.testing.assert_allclose(dw.numpy(), rdw, rtol=1e-4, atol=1e-4 * np.sqrt(x.size))
        np.testing.assert_allclose(db.numpy(), rdb, rtol=1e-4, atol=1e-4 * np.sqrt(x.size))


def test_reference_backward_vs_finite_differences():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 2, 2, 2))
    dy = rng.standard_normal(x.shape)
    w, b = rng.standard_normal(2), rng.standard_normal(2)
    rm, rv = rng.standard_normal(2), rng.uniform(0.5, 2, 2)
    checks = [
        (lambda z: (dy * ref.batch_norm_train(z, w, b)[0]).sum(), ref.batch_norm_train_backward(dy, x, w)[0]),
        (lambda z: (dy * ref.batch_norm_eval(z, rm, rv, w, b)).sum(),
         ref.batch_norm_eval_backward(dy, x, rm, rv, w)[0]),
    ]
    x4 = rng.standard_normal((2, 4, 3))
    dy4 = rng.standard_normal(x4.shape)
    w4 = rng.standard_normal(4)
    for groups in (1, 2, 4):
        checks.append((lambda z, g=groups: (dy4 * ref.group_norm(z, g, w4)[0]).sum(),
                       ref.group_norm_backward(dy4, x4, groups, w4)[0]))
    for f, analytic in checks:
        z = x if analytic.shape == x.shape else x4
        np.testing.assert_allclose(analytic, ref.finite_difference(f, z), rtol=1e-5, atol=1e-6)
    # parameter gradients: d/dw of sum(dy * y)
    fw = ref.finite_difference(lambda ww: (dy * ref.batch_norm_train(x, ww, b)[0]).sum(), w)
    np.testing.assert_allclose(ref.batch_norm_train_backward(dy, x, w)[1], fw, rtol=1e-6, atol=1e-7)
    fb = ref.finite_difference(lambda bb: (dy4 * ref.group_norm(x4, 2, w4, bb)[0]).sum(), np.zeros(4))
    np.testing.assert_allclose(ref.group_norm_backward(dy4, x4, 2, w4)[2], fb, rtol=1e-6, atol=1e-7)
    fw4 = ref.finite_difference(lambda ww: (dy4 * ref.group_norm(x4, 2, ww)[0]).sum(), w4)
    np.testing.assert_allclose(ref.group_norm_backward(dy4, x4, 2, w4)[1], fw4, rtol=1e-6, atol=1e-7)


def test_against_torch(dev):
    torch = pytest.importorskip("torch")
    tf = torch.nn.functional
    rng = np.random.default_rng(6)
    x = (rng.standard_normal((4, 6, 5, 5)) * 2 + 1).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    w, b = _params(6, 1)

    def run(f):
        xt = torch.tensor(x, requires_grad=True)
        wt = torch.tensor(w, requires_grad=True)
        bt = torch.tensor(b, requires_grad=True)
        y = f(xt, wt, bt)
        y.backward(torch.tensor(dy))
        return y.detach().numpy(), xt.grad.numpy(), wt.grad.numpy(), bt.grad.numpy()

    tol = dict(rtol=1e-4, atol=1e-4)
    rm0, rv0 = np.zeros(6, np.float32), np.ones(6, np.float32)
    ty, tdx, tdw, tdb = run(lambda a, ww, bb: tf.batch_norm(a, torch.tensor(rm0), torch.tensor(rv0),
                                                            ww, bb, True, 0.1, 1e-5))
    y = F.batch_norm(x, pm.tensor(rm0, dev), pm.tensor(rv0, dev), w, b, True)
    dx, _, _, dw, db = F.batch_norm_backward(dy, x, pm.tensor(rm0, dev), pm.tensor(rv0, dev), w, b, True)
    for a, t in zip((y, dx, dw, db), (ty, tdx, tdw, tdb)):
        np.testing.assert_allclose(a.numpy(), t, **tol)
    for groups in (2, 6):
        ty, tdx, tdw, tdb = run(lambda a, ww, bb, g=groups: tf.group_norm(a, g, ww, bb, 1e-5))
        y = F.group_norm(x, groups, w, b)
        dx, dw, db = F.group_norm_backward(dy, x, groups, w, b)
        for a, t in zip((y, dx, dw, db), (ty, tdx, tdw, tdb)):
            np.testing.assert_allclose(a.numpy(), t, **tol)
    ty, tdx, tdw, tdb = run(lambda a, ww, bb: tf.instance_norm(a, weight=ww, bias=bb))
    y = F.instance_norm(x, weight=w, bias=b)
    dx, _, _, dw, db = F.instance_norm_backward(dy, x, weight=w, bias=b)
    for a, t in zip((y, dx, dw, db), (ty, tdx, tdw, tdb)):
        np.testing.assert_allclose(a.numpy(), t, **tol)


def test_bad_input(dev):
    x = pm.tensor(np.zeros((2, 3, 2, 2), np.float32), dev)
    rm, rv = pm.tensor(np.zeros(3, np.float32), dev), pm.tensor(np.ones(3, np.float32), dev)
    dev.reset_counts()
    cases = [
        ("eps", lambda: F.batch_norm(x, rm, rv, eps=float("nan"))),
        ("eps", lambda: F.group_norm(x, 3, eps=float("inf"))),
        ("momentum", lambda: F.batch_norm(x, rm, rv, training=True, momentum=float("nan"))),
        ("training", lambda: F.batch_norm(x, rm, rv, training="yes")),
        ("running_mean", lambda: F.batch_norm(x, None, None, training=False)),
        ("running_mean", lambda: F.batch_norm(x, np.zeros(3, np.float32), rv, training=True)),
        ("running_var", lambda: F.batch_norm(x, rm, pm.tensor(np.ones(4, np.float32), dev))),
        ("running_var", lambda: F.batch_norm(x, rm, None, training=True)),
        ("weight", lambda: F.batch_norm(x, rm, rv, np.ones(2, np.float32))),
        ("bias", lambda: F.group_norm(x, 3, None, pm.tensor(np.ones(3, np.int32), dev))),
        ("input", lambda: F.batch_norm(pm.tensor(np.zeros((2, 3), np.int32), dev), rm, rv)),
        ("input", lambda: F.batch_norm(pm.tensor(np.zeros(3, np.float32), dev), rm, rv)),
        ("input", lambda: F.batch_norm(pm.tensor(np.zeros((1, 3), np.float32), dev), rm, rv,
                                       training=True)),  # one value per channel
        ("num_groups", lambda: F.group_norm(x, 2)),
        ("num_groups", lambda: F.group_norm(x, 0)),
        ("grad_out", lambda: F.batch_norm_backward(np.zeros((2, 3, 2, 1), np.float32), x, rm, rv)),
        ("grad_out", lambda: F.group_norm_backward(pm.tensor(np.zeros((2, 3, 2, 2), np.float16), dev),
                                                   x, 3)),
        ("save_invstd", lambda: F.batch_norm_backward(x, x, rm, rv, training=True, save_mean=rm)),
        ("save_mean", lambda: F.group_norm_backward(x, x, 3, save_mean=np.zeros((2, 2), np.float32),
                                                    save_rstd=np.zeros((2, 3), np.float32))),
        ("running_mean", lambda: F.instance_norm(x, rm, rv)),
        ("use_input_stats", lambda: F.instance_norm(x, use_input_stats=False)),
        ("input", lambda: F.instance_norm(pm.tensor(np.zeros((2, 3), np.float32), dev))),
    ]
    for k, (arg, call) in enumerate(cases):
        with pytest.raises(ValueError, match=arg):
            call()
            pytest.fail(f"case {k} ({arg}) did not raise")
    assert sum(dev.dispatch_counts.values()) == 0




def test_batch_norm_training_forward_launches(dev):
    """A training forward makes its statistics and coefficients in one kernel
    (batch_norm_finalize_fwd), inference keeps the coefficient kernel: per layer, partials +
    finalize + apply."""
    rng = np.random.default_rng(41)
    x = pm.tensor(rng.standard_normal((2, 5, 3, 3)).astype(np.float32), dev)
    w, b = (pm.tensor(rng.standard_normal(5).astype(np.float32), dev) for _ in range(2))
    rm, rv = pm.tensor(np.zeros(5, np.float32), dev), pm.tensor(np.ones(5, np.float32), dev)
    dev.reset_counts()
    y = F.batch_norm(x, rm, rv, w, b, training=True)
    names = dict(dev.dispatch_counts)
    fin = "batch_norm_finalize_rows_fwd_float" if dev.name == "cpu" else \
        "batch_norm_finalize_fwd_float"  # ops.FINALIZE "auto"
    assert names.get(fin) == 1 and "batch_norm_coef_fwd_float" not in names, names
    assert sum(names.values()) == 3, names
    xn = x.numpy()
    mu, var = xn.mean(axis=(0, 2, 3)), xn.var(axis=(0, 2, 3))
    want = (xn - mu[None, :, None, None]) / np.sqrt(var[None, :, None, None] + 1e-5) \
        * w.numpy()[None, :, None, None] + b.numpy()[None, :, None, None]
    np.testing.assert_allclose(y.numpy(), want, rtol=1e-5, atol=1e-5)
    dev.reset_counts()
    F.batch_norm(x, rm, rv, w, b, training=False)
    assert "batch_norm_coef_fwd_float" in dev.dispatch_counts


# ---- layer norm ---------------------------------------------------------------------------------

def _np_layer_norm(x, ns, w, b, eps):
    ax = tuple(range(x.ndim - len(ns), x.ndim))
    m = x.mean(axis=ax, keepdims=True)
    v = x.var(axis=ax, keepdims=True)
    y = (x - m) / np.sqrt(v + eps)
    return y * (1.0 if w is None else w) + (0.0 if b is None else b)


LN_CASES = [((4, 7), (7,)), ((2, 3, 300), (300,)), ((2, 3, 4, 5), (4, 5)), ((5,), (5,)), ((3, 1), (1,)),
            ((1, 33), (33,)), ((65, 32), (32,)), ((2, 1025), (1025,)), ((3, 2, 31), (2, 31))]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm(dev, dtype, affine, tiling):
    """Forward and gradients against the float64 reference (its gradients checked by finite
    differences below), rows of 1 to 1025 elements, large offsets (mean >> spread)."""
    for k, (shape, ns) in enumerate(LN_CASES):
        rng = np.random.default_rng(k)
        x = (rng.standard_normal(shape) * 2 + (50 if k % 3 == 0 else 0)).astype(dtype)
        w = rng.uniform(0.5, 1.5, ns).astype(dtype) if affine else None
        b = rng.standard_normal(ns).astype(dtype) if affine else None
        x64 = x.astype(np.float64)
        w64 = None if w is None else w.astype(np.float64)
        b64 = None if b is None else b.astype(np.float64)
        want = _np_layer_norm(x64, ns, w64, b64, 1e-5)
        y = F.layer_norm(pm.tensor(x, dev), ns, w, b, 1e-5)
        tol = dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-2, atol=1e-2)
        np.testing.assert_allclose(y.numpy().astype(np.float64), want, **tol, err_msg=f"{shape}")
        g = rng.standard_normal(shape).astype(dtype)
        dx, dw, db = F.layer_norm_backward(pm.tensor(g, dev), pm.tensor(x, dev), ns, w, b, 1e-5)
        rx, rw, rb = ref_layer_norm_backward(g.astype(np.float64), x64, ns, w64, 1e-5)
        gt = dict(rtol=1e-3, atol=1e-3) if dtype == np.float32 else \
            dict(rtol=3e-2, atol=3e-2 * max(1, np.abs(rw).max()))
        np.testing.assert_allclose(dx.numpy().astype(np.float64), rx, **gt, err_msg=f"dx {shape}")
        if affine:
            np.testing.assert_allclose(dw.numpy().astype(np.float64), rw, **gt, err_msg=f"dw {shape}")
            np.testing.assert_allclose(db.numpy().astype(np.float64), rb, **gt, err_msg=f"db {shape}")
        else:
            assert dw is None and db is None


@pytest.mark.parametrize("d", [1, 7, 256, 1000, 4097])
def test_layer_norm_large_mean_accuracy(dev, d):
    """Rows near 1000 with unit spread: a float sum of D such values is off by up to ulp(1000 D),
    so a mean taken from it alone shifts every centred value by ~1e-5..1e-4 (the statistics need
    the second pass's correction); rows of equal values (rstd = 1/sqrt(eps)) amplify any rounding
    of dy * w that does not cancel against its mean. Float32 against the float64 reference at a
    few float32 ulps of the result's scale."""
    rng = np.random.default_rng(d)
    x = (1000 + rng.standard_normal((6, d))).astype(np.float32)
    x[1] = x[1, 0]  # a row of equal values
    w = rng.uniform(0.5, 1.5, d).astype(np.float32)
    b = rng.standard_normal(d).astype(np.float32)
    g = rng.standard_normal((6, d)).astype(np.float32)
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    want = _np_layer_norm(x64, (d,), w64, b.astype(np.float64), 1e-5)
    y = F.layer_norm(pm.tensor(x, dev), d, w, b).numpy().astype(np.float64)
    dx, dw, db = F.layer_norm_backward(pm.tensor(g, dev), pm.tensor(x, dev), d, w, b)
    rx, rw, rb = ref_layer_norm_backward(g.astype(np.float64), x64, (d,), w64, 1e-5)
    for what, got, exact in (("y", y, want), ("dx", dx.numpy(), rx), ("dw", dw.numpy(), rw),
                             ("db", db.numpy(), rb)):
        for r in range(exact.shape[0]) if what in ("y", "dx") else [None]:
            gr, rr = (got, exact) if r is None else (got[r], exact[r])
            scale = max(1.0, float(np.abs(rr).max()))
            err = float(np.abs(gr.astype(np.float64) - rr).max()) / scale
            assert err < 2e-6, f"{what} row {r}: max error {err:.3g} of scale {scale:.3g}"
    if d == 1:  # x - mean is exactly 0, so is the input gradient (any leftover is amplified 316x)
        assert not dx.numpy().any(), dx.numpy()


def ref_layer_norm_backward(g, x, ns, w, eps):
    """The analytic float64 gradients of _np_layer_norm."""
    ax = tuple(range(x.ndim - len(ns), x.ndim))
    d = int(np.prod(ns))
    m = x.mean(axis=ax, keepdims=True)
    rstd = 1 / np.sqrt(x.var(axis=ax, keepdims=True) + eps)
    xh = (x - m) * rstd
    gw = g * (1.0 if w is None else w)
    dx = rstd * (gw - gw.sum(axis=ax, keepdims=True) / d - xh * (gw * xh).sum(axis=ax, keepdims=True) / d)
    lead = tuple(range(x.ndim - len(ns)))
    return dx, (g * xh).sum(axis=lead), g.sum(axis=lead)


def test_layer_norm_reference_vs_finite_differences():
    rng = np.random.default_rng(1)
    x, w, b = rng.standard_normal((3, 2, 5)), rng.uniform(0.5, 1.5, (2, 5)), rng.standard_normal((2, 5))
    g = rng.standard_normal(x.shape)
    rx, rw, rb = ref_layer_norm_backward(g, x, (2, 5), w, 1e-5)
    for arr, want in ((x, rx), (w, rw), (b, rb)):
        fd = np.zeros_like(arr)
        for i in np.ndindex(arr.shape):
            old = arr[i]
            arr[i] = old + 1e-6
            hi = (g * _np_layer_norm(x, (2, 5), w, b, 1e-5)).sum()
            arr[i] = old - 1e-6
            lo = (g * _np_layer_norm(x, (2, 5), w, b, 1e-5)).sum()
            arr[i] = old
            fd[i] = (hi - lo) / 2e-6
        np.testing.assert_allclose(want, fd, rtol=1e-5, atol=1e-6)


def test_layer_norm_torch_and_bad_input(dev):
    x = np.random.default_rng(2).standard_normal((2, 3, 8)).astype(np.float32)
    dev.reset_counts()
    for call, arg in [(lambda: F.layer_norm(x, (3,)), "normalized_shape"),
                      (lambda: F.layer_norm(x, (8,), np.ones(7, np.float32)), "weight"),
                      (lambda: F.layer_norm(x, (8,), None, np.ones(8, np.float16)), "bias"),
                      (lambda: F.layer_norm(x, 8, eps=float("nan")), "eps"),
                      (lambda: F.layer_norm_backward(np.ones((2, 3), np.float32), x, 8), "grad_out")]:
        with pytest.raises(ValueError, match=arg):
            call()
    assert sum(dev.dispatch_counts.values()) == 0
    torch = pytest.importorskip("torch")
    w = np.linspace(0.5, 2, 8).astype(np.float32)
    want = torch.nn.functional.layer_norm(torch.tensor(x), (8,), torch.tensor(w), None, 1e-3)
    np.testing.assert_allclose(F.layer_norm(pm.tensor(x, dev), 8, w, None, 1e-3).numpy(), want.numpy(),
                               rtol=1e-5, atol=1e-5)


# ---- 16-byte-chunk kernels (norm_apply_vec, norm_part_vec) against the scalar ones -------------
# Views at an element offset that is not 16-byte aligned take the scalar kernels; the apply step
# must give the same bits either way (the same per-element math), planes of any size (chunks that
# straddle two planes: HW = 5, 49, 289): batch norm in inference (no statistics), forward and
# backward; group norm (statistics too) to the tolerance.
def _bn_eval_relu(xt, gt, dev, rm, rv, w, b):
    """(batch_norm eval + relu, its input gradient, group_norm with one group) as numpy."""
    y = F.batch_norm(xt, pm.tensor(rm, dev), pm.tensor(rv, dev), w, b, False, activation="relu")
    dx = F.batch_norm_backward(gt, xt, pm.tensor(rm, dev), pm.tensor(rv, dev), w, b, False,
                               activation="relu")[0]
    gn = F.group_norm(xt, 1, w, b) if xt.ndim > 2 else y
    return y.numpy(), dx.numpy(), gn.numpy()


VEC_SHAPES = [(2, 3, 7, 7), (3, 5, 17, 17), (1, 4, 5), (2, 6, 8, 8), (5, 3, 3, 3), (2, 2, 31)]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_norm_apply_chunks_match_scalar(dev, dtype):
    if not dev.supports_views:
        pytest.skip(f"{dev.name} binds whole buffers only")
    isz = np.dtype(dtype).itemsize

    def view(a):
        buf = dev.buffer(np.concatenate([np.zeros(1, dtype), a.ravel()]))
        return pm.Tensor(buf.view(isz, a.nbytes), a.shape, dtype)

    for k, shape in enumerate(VEC_SHAPES):
        c = shape[1]
        x, g = _data(shape, dtype, 10 + k), _data(shape, dtype, 20 + k)
        w, b = _params(c, 30 + k)
        rm = np.linspace(-0.5, 0.5, c).astype(np.float32)
        rv = np.linspace(0.5, 2.0, c).astype(np.float32)

        args = (dev, rm, rv, w, b)
        fast = _bn_eval_relu(pm.tensor(x, dev), pm.tensor(g, dev), *args)
        slow = _bn_eval_relu(view(x), view(g), *args)
        np.testing.assert_array_equal(fast[0], slow[0], err_msg=str(shape))
        np.testing.assert_array_equal(fast[1], slow[1], err_msg=str(shape))
        # group norm's statistics come from different partial kernels: same values, not bits
        np.testing.assert_allclose(fast[2], slow[2], **_tol(dtype))
        want = np_act(ref.batch_norm_eval(x, rm, rv, w, b), "relu")[0]
        np.testing.assert_allclose(fast[0].astype(np.float64), want, **_tol(dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_norm_stats_chunks(dev, dtype):
    """Training statistics from the 16-byte-chunk partials (aligned input, HW a multiple of the
    chunk; per plane, masked, for 17x17) and from the scalar ones (a misaligned view) both match
    float64, data offset far from zero included (the chunk Welford merge keeps the variance)."""
    if not dev.supports_views:
        pytest.skip(f"{dev.name} binds whole buffers only")
    isz = np.dtype(dtype).itemsize
    for k, (shape, off) in enumerate([((4, 3, 8, 8), 0.0), ((3, 5, 4, 16), 50.0),
                                      ((2, 33, 16), 0.0), ((40, 2, 8, 8), 0.0),
                                      ((8, 3, 17, 17), 50.0)]):
        c = shape[1]
        x = _data(shape, dtype, 40 + k, offset=off)
        w, b = _params(c, 50 + k)
        buf = dev.buffer(np.concatenate([np.zeros(1, dtype), x.ravel()]))
        for xt in (pm.tensor(x, dev), pm.Tensor(buf.view(isz, x.nbytes), shape, dtype)):
            y, mean, invstd = F.batch_norm_with_stats(xt, None, None, w, b, True)
            xf = x.astype(np.float64)
            axes = (0,) + tuple(range(2, len(shape)))
            np.testing.assert_allclose(mean.numpy(), xf.mean(axes), rtol=1e-5,
                                       atol=1e-5 * (1 + off))
            np.testing.assert_allclose(1 / invstd.numpy() ** 2 - 1e-5, xf.var(axes),
                                       rtol=1e-3 if dtype == np.float32 else 3e-3)
            want = ref.batch_norm_train(xf, w, b)[0]
            np.testing.assert_allclose(y.numpy().astype(np.float64), want,
                                       **_tol(dtype, offset=off, w=w))


def test_empty_inputs_and_torch_ranges(dev):
    """As torch: empty inputs give empty results and zero weight gradients (no dispatch); eps may
    be negative (NaN where var + eps < 0) and momentum outside [0, 1]. Against torch on the CPU."""
    torch = pytest.importorskip("torch")
    tf = torch.nn.functional
    rng = np.random.default_rng(7)

    def both(fn_pm, fn_t, shapes, nargs_grad):
        arrs = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        ts = [torch.tensor(a, requires_grad=True) for a in arrs]
        want = fn_t(*ts)
        got = fn_pm(*[pm.tensor(a, dev) for a in arrs])
        np.testing.assert_allclose(got[0].numpy(), want.detach().numpy(), rtol=1e-5, atol=1e-5)
        g = rng.standard_normal(want.shape).astype(np.float32)
        tg = torch.autograd.grad(want, ts[:nargs_grad], torch.tensor(g), allow_unused=True)
        for a, b in zip(got[1](pm.tensor(g, dev)), tg):
            b = np.zeros(0) if b is None else b.numpy()
            np.testing.assert_allclose(a.numpy(), b, rtol=1e-4, atol=1e-4)

    dev.reset_counts()
    x0 = pm.tensor(np.zeros((0, 3, 2), np.float32), dev)
    w, b = np.ones(3, np.float32), np.zeros(3, np.float32)
    rm, rv = pm.tensor(np.zeros(3, np.float32), dev), pm.tensor(np.ones(3, np.float32), dev)
    assert F.batch_norm(x0, rm, rv, w, b, training=True).shape == (0, 3, 2)
    _, _, _, dw, db = F.batch_norm_backward(x0, x0, rm, rv, w, b, training=True)
    assert not dw.numpy().any() and dw.shape == (3,) and not db.numpy().any()
    assert F.group_norm(x0, 3, w, b).shape == (0, 3, 2)
    dx, dw, db = F.group_norm_backward(x0, x0, 1, w, b)
    assert dx.shape == (0, 3, 2) and dw.shape == (3,) and not dw.numpy().any()
    assert F.layer_norm(x0, (3, 2)).shape == (0, 3, 2)
    assert F.batch_norm(pm.tensor(np.zeros(0, np.float32), dev), np.zeros(0, np.float32),
                        np.zeros(0, np.float32)).shape == (0,)
    assert sum(dev.dispatch_counts.values()) == 0
    np.testing.assert_array_equal(rm.numpy(), 0)  # an empty batch moves nothing
    # negative eps (torch: rsqrt(var + eps), NaN rows where var + eps < 0)
    x = rng.standard_normal((3, 4)).astype(np.float32)
    x[0] *= 4
    want = tf.layer_norm(torch.tensor(x), (4,), eps=-0.5).numpy()
    got = F.layer_norm(pm.tensor(x, dev), 4, eps=-0.5).numpy()
    assert np.isnan(want).any() and np.array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got[~np.isnan(want)], want[~np.isnan(want)], rtol=1e-5, atol=1e-5)
    both(lambda a, ww, bb: (F.group_norm(a, 2, ww, bb, eps=-0.01),
                            lambda g: F.group_norm_backward(g, a, 2, ww, bb, eps=-0.01)),
         lambda a, ww, bb: tf.group_norm(a, 2, ww, bb, eps=-0.01), [(2, 6, 5), (6,), (6,)], 3)
    # momentum outside [0, 1] extrapolates the running statistics, as torch
    x = rng.standard_normal((4, 3, 5)).astype(np.float32)
    trm, trv = torch.zeros(3), torch.ones(3)
    tf.batch_norm(torch.tensor(x), trm, trv, training=True, momentum=-1.0)
    F.batch_norm(pm.tensor(x, dev), rm, rv, training=True, momentum=-1.0)
    np.testing.assert_allclose(rm.numpy(), trm.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rv.numpy(), trv.numpy(), rtol=1e-5, atol=1e-6)


def test_float16_parameters_like_torch(dev):
    """A pure-half model: float16 weight, bias and running statistics (Tensors) are read as float
    (the statistics in float as always), the running statistics updated in place in float16,
    the weight gradients returned in float16; against torch's float16 CPU ops."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(11)
    x = rng.standard_normal((4, 3, 5)).astype(np.float16)
    w, b = rng.uniform(0.5, 1.5, 3).astype(np.float16), rng.standard_normal(3).astype(np.float16)
    rm, rv = (rng.standard_normal(3) * 0.1).astype(np.float16), rng.uniform(0.5, 2, 3).astype(np.float16)
    g = rng.standard_normal(x.shape).astype(np.float16)
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    trm, trv = torch.tensor(rm), torch.tensor(rv)
    ty = torch.nn.functional.batch_norm(tx, trm, trv, tw, tb, training=True, momentum=0.3)
    tgx, tgw, tgb = torch.autograd.grad(ty, [tx, tw, tb], torch.tensor(g))
    prm, prv = pm.tensor(rm, dev), pm.tensor(rv, dev)
    pw, pb = pm.tensor(w, dev), pm.tensor(b, dev)
    y = F.batch_norm(pm.tensor(x, dev), prm, prv, pw, pb, training=True, momentum=0.3)
    dx, _, _, dw, db = F.batch_norm_backward(pm.tensor(g, dev), pm.tensor(x, dev), prm, prv, pw, pb,
                                             training=True)
    assert prm.dtype == np.float16 and dw.dtype == np.float16 and db.dtype == np.float16
    for got, want in ((y, ty), (prm, trm), (prv, trv), (dx, tgx), (dw, tgw), (db, tgb)):
        np.testing.assert_allclose(got.numpy().astype(np.float32), want.detach().float().numpy(),
                                   rtol=1e-2, atol=1e-2)
    ty = torch.nn.functional.group_norm(tx, 3, tw, tb)
    tgx, tgw, tgb = torch.autograd.grad(ty, [tx, tw, tb], torch.tensor(g))
    y = F.group_norm(pm.tensor(x, dev), 3, pw, pb)
    dx, dw, db = F.group_norm_backward(pm.tensor(g, dev), pm.tensor(x, dev), 3, pw, pb)
    assert dw.dtype == np.float16
    for got, want in ((y, ty), (dx, tgx), (dw, tgw), (db, tgb)):
        np.testing.assert_allclose(got.numpy().astype(np.float32), want.detach().float().numpy(),
                                   rtol=1e-2, atol=1e-2)
