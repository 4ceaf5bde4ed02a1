"""Batch norm with a fused activation (kernels/norm.metal): the activation applied by the forward
(batch_norm(..., activation=)) and taken inside the backward (batch_norm_backward(...,
activation=)), and batch norm on channel slices of a larger tensor (out=, out_batch_stride=,
grad_out_batch_stride=: concat elimination), against the float64 numpy references.
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


@pytest.fixture(params=["gpu", "all"])
def resident(request, monkeypatch):
    """The training forward as the device picks it, and in one kernel (batch_norm_fwd_res)
    forced wherever a channel fits: its fused activation, strided y and relu mask (which the
    backward recomputes from the saved statistics) must hold as the three kernels' do."""
    monkeypatch.setattr(ops, "RESIDENT", request.param)
    return request.param

# ---- fused activation (batch_norm(..., activation=)) ----------------------------------------------

ACTS = [None, "relu", ("leaky_relu", {"negative_slope": 0.2}), "sigmoid", "tanh"]
ACT_IDS = ["none", "relu", "leaky_relu", "sigmoid", "tanh"]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
def test_batch_norm_fused_activation(dev, act, training, resident):
    """batch_norm(_with_stats)(..., activation=) == act(batch_norm(...)) with no extra kernel;
    batch_norm_backward(..., activation=, y=) == batch_norm_backward of grad_out * act'."""
    for k, shape in enumerate([(5, 33), (3, 31, 4, 9), (2, 3, 10, 10)]):
        c = shape[1]
        x, g = _data(shape, np.float32, k), _data(shape, np.float32, 50 + k)
        w, b = _params(c, k)
        rm, rv = _data((c,), np.float32, 9, 0.1), np.abs(_data((c,), np.float32, 8)) + 0.5
        xt, gt, wt, bt = (pm.tensor(v, dev) for v in (x, g, w, b))

        def run(activation, x=xt, w=wt, b=bt, rm=rm, rv=rv):
            rmt, rvt = pm.tensor(rm, dev), pm.tensor(rv, dev)
            before = sum(dev.dispatch_counts.values())
            y, mean, invstd = F.batch_norm_with_stats(x, rmt, rvt, w, b, training=training,
                                                      activation=activation)
            n = sum(dev.dispatch_counts.values()) - before
            return y, mean, invstd, n, rmt.numpy(), rvt.numpy()

        z, mean, invstd, n0, rm0, rv0 = run(None)
        y, mean1, invstd1, n1, rm1, rv1 = run(act)
        assert n1 == n0  # the activation rides in the apply kernel
        np.testing.assert_array_equal(rm1, rm0)
        np.testing.assert_array_equal(rv1, rv0)
        zf = z.numpy().astype(np.float64)
        want, d = np_act(zf, act)
        np.testing.assert_allclose(y.numpy(), want, rtol=1e-6, atol=1e-6)
        y2 = F.batch_norm(xt, pm.tensor(rm, dev), pm.tensor(rv, dev), wt, bt, training=training,
                          activation=act)
        np.testing.assert_array_equal(y2.numpy(), y.numpy())
        kw = dict(training=training, save_mean=mean, save_invstd=invstd)
        got = F.batch_norm_backward(gt, xt, pm.tensor(rm, dev), pm.tensor(rv, dev), wt, bt,
                                    activation=act, y=y, **kw)
        gz = pm.tensor((g * d).astype(np.float32), dev)
        want_g = F.batch_norm_backward(gz, xt, pm.tensor(rm, dev), pm.tensor(rv, dev), wt, bt,
                                       **kw)
        for name, a, r in zip(("dx", "dw", "db"), (got[0], got[3], got[4]),
                              (want_g[0], want_g[3], want_g[4])):
            np.testing.assert_allclose(a.numpy(), r.numpy(), rtol=1e-5, atol=1e-5,
                                       err_msg=f"{shape} {name}")


# ---- the activation inside the backward (batch_norm_backward(..., activation=)) ---------------
# The backward's sums and apply kernels take dy through act'(z) themselves, z recomputed from x
# and the forward's coefficients: y is not read and no element-wise pass runs.

BWD_ACT_SHAPES = [(1, 5, 33), (2, 3), (9, 4, 1, 1), (1, 3, 31), (3, 31, 4, 8), (2, 33, 31),
                  (1, 32, 32), (70, 5), (4, 3, 10, 10)]


def _bn_act_case(dev, shape, dtype, act, training, seed):
    """Inputs and the fused forward on the device: (x, dy, w, b, rm, rv, y, mean, invstd)."""
    c = shape[1]
    x, dy = _data(shape, dtype, seed), _data(shape, dtype, 100 + seed)
    w, b = _params(c, seed)
    rm = np.random.default_rng(seed).uniform(-1, 1, c).astype(np.float32)
    rv = np.random.default_rng(seed).uniform(0.5, 2, c).astype(np.float32)
    y, mean, invstd = F.batch_norm_with_stats(pm.tensor(x, dev), pm.tensor(rm, dev),
                                              pm.tensor(rv, dev), w, b, training, 0.1, 1e-5,
                                              activation=act)
    return x, dy, w, b, rm, rv, y, mean, invstd


def _ref_act_grad(x, dy, w, b, rm, rv, act, training, y):
    """float64 (dx, dw, db) of batch_norm + act; relu / leaky relu's mask from the device's y
    (y > 0 iff z > 0; float64's z could disagree with float32's in the last bit next to 0)."""
    z = ref.batch_norm_train(x, w, b)[0] if training else ref.batch_norm_eval(x, rm, rv, w, b)
    _, d = np_act(z, act)
    name = act[0] if isinstance(act, tuple) else act
    if name in ("relu", "leaky_relu"):
        slope = 0.0 if name == "relu" else act[1]["negative_slope"]
        d = np.where(y.numpy() > 0, 1.0, slope)
    g = dy.astype(np.float64) * d
    if training:
        return ref.batch_norm_train_backward(g, x, w)
    return ref.batch_norm_eval_backward(g, x, rm, rv, w)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("act", ACTS[1:], ids=ACT_IDS[1:])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_batch_norm_backward_activation_inside(dev, dtype, act, training):
    """batch_norm_backward(..., activation=) against float64, over both tilings and awkward
    shapes; the same launches as the plain backward (no element-wise pre-pass), y not needed."""
    for k, shape in enumerate(BWD_ACT_SHAPES):
        x, dy, w, b, rm, rv, y, mean, invstd = _bn_act_case(dev, shape, dtype, act, training, k)
        kw = dict(save_mean=mean, save_invstd=invstd) if training else {}
        rmt, rvt = pm.tensor(rm, dev), pm.tensor(rv, dev)
        before = dict(dev.dispatch_counts)
        dx, n1, n2, dw, db = F.batch_norm_backward(dy, x, rmt, rvt, w, b, training, **kw,
                                                   activation=act)
        launched = {n: v - before.get(n, 0) for n, v in dev.dispatch_counts.items()
                    if v != before.get(n, 0)}
        assert n1 is None and n2 is None and dx.dtype == np.dtype(dtype)
        assert not any("bwdy" in n or n.startswith(("relu", "leaky", "sigmoid", "tanh"))
                       for n in launched), launched
        assert sum(launched.values()) == (3 if training else 4), launched
        assert any(n.startswith("norm_apply_bwd_act_") for n in launched), launched
        rdx, rdw, rdb = _ref_act_grad(x, dy, w, b, rm, rv, act, training, y)
        scale = max(1.0, float(np.abs(rdx).max()))
        tol = dict(rtol=3e-3, atol=3e-3 * scale) if dtype == np.float16 else \
            dict(rtol=1e-4, atol=1e-5 * scale)
        np.testing.assert_allclose(dx.numpy().astype(np.float64), rdx, **tol,
                                   err_msg=f"{shape} dx")
        st = np.sqrt(x.size)
        np.testing.assert_allclose(dw.numpy(), rdw, rtol=1e-4, atol=1e-4 * st, err_msg=f"{shape} dw")
        np.testing.assert_allclose(db.numpy(), rdb, rtol=1e-4, atol=1e-4 * st, err_msg=f"{shape} db")
        # y, when given, is only checked: the result does not change
        dx2 = F.batch_norm_backward(dy, x, rmt, rvt, w, b, training, **kw, activation=act, y=y)[0]
        np.testing.assert_array_equal(dx2.numpy(), dx.numpy())


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_batch_norm_backward_relu_equals_from_output_path(dev, dtype):
    """The recomputed mask is the forward's: relu inside the backward gives
    relu_backward_from_output(dy, y) followed by the plain backward (the former path), bit for bit
    on cpu; on cuda the act variants' partial sums may round in another order (1 ulp seen on an
    H200), while one wrongly masked element would be off by O(|dy|)."""
    for k, shape in enumerate(BWD_ACT_SHAPES):
        for training in (True, False):
            x, dy, w, b, rm, rv, y, mean, invstd = _bn_act_case(dev, shape, dtype, "relu",
                                                                training, k)
            kw = dict(save_mean=mean, save_invstd=invstd) if training else {}
            rmt, rvt = pm.tensor(rm, dev), pm.tensor(rv, dev)
            got = F.batch_norm_backward(dy, x, rmt, rvt, w, b, training, **kw, activation="relu")
            g = F.relu_backward_from_output(pm.tensor(dy, dev), y)
            want = F.batch_norm_backward(g, x, rmt, rvt, w, b, training, **kw)
            for name, i in (("dx", 0), ("dw", 3), ("db", 4)):
                if dev.name == "cpu":
                    np.testing.assert_array_equal(got[i].numpy(), want[i].numpy(),
                                                  err_msg=f"{shape} {training} {name}")
                else:
                    w_ = want[i].numpy().astype(np.float64)
                    t = 1e-6 if dtype == np.float32 else 2e-3
                    np.testing.assert_allclose(got[i].numpy(), w_, rtol=t,
                                               atol=t * max(1.0, float(np.abs(w_).max())),
                                               err_msg=f"{shape} {training} {name}")


@pytest.mark.parametrize("act", ["relu", ("leaky_relu", {"negative_slope": 0.1})],
                         ids=["relu", "leaky_relu"])
def test_batch_norm_backward_activation_kinks(dev, act, resident):
    """Pre-activations exactly 0 (relu'(0) = 0, leaky_relu'(0) = slope) and whole channels
    below 0 (relu: every gradient of the channel 0), in row and column mode."""
    slope = 0.0 if act == "relu" else 0.1
    for hw in (1, 40):
        n, c = 6, 4
        x = np.random.default_rng(hw).standard_normal((n, c, hw)).astype(np.float32)
        x[:, 1] = 0.75                       # constant channel: z = beta = 0 exactly
        x[:, 2] = np.where(np.abs(x[:, 2]) < 0.5, 0.0, x[:, 2])  # z ~ 0 up to the mean's rounding
        w = np.array([1.0, 1.5, 2.0, 0.5], np.float32)
        b = np.array([-50.0, 0.0, 0.0, 0.3], np.float32)  # channel 0 entirely below 0
        dy = np.random.default_rng(7 + hw).standard_normal(x.shape).astype(np.float32)
        rm, rv = pm.tensor(np.zeros(c, np.float32), dev), pm.tensor(np.ones(c, np.float32), dev)
        y, mean, invstd = F.batch_norm_with_stats(pm.tensor(x, dev), rm, rv, w, b, True,
                                                  activation=act)
        yv = y.numpy()
        assert (yv[:, 0] < 0 if slope else yv[:, 0] == 0).all() and (yv[:, 1] == 0).all()
        dx, _, _, dw, db = F.batch_norm_backward(dy, x, rm, rv, w, b, True, save_mean=mean,
                                                 save_invstd=invstd, activation=act)
        # the mask from the forward's y: z of the x = 0 elements of channel 2 is the float32
        # rounding of the mean, its sign is the device's (see the from-output test)
        g = dy.astype(np.float64) * np.where(yv > 0, 1.0, slope)
        rdx, rdw, rdb = ref.batch_norm_train_backward(g, x, w)
        np.testing.assert_allclose(dx.numpy(), rdx, rtol=1e-4, atol=1e-4, err_msg=str(hw))
        np.testing.assert_allclose(dw.numpy(), rdw, rtol=1e-4, atol=1e-4, err_msg=str(hw))
        np.testing.assert_allclose(db.numpy(), rdb, rtol=1e-4, atol=1e-4, err_msg=str(hw))
        if act == "relu":
            assert (dx.numpy()[:, 0] == 0).all() and dw.numpy()[0] == 0 and db.numpy()[0] == 0
            assert (dx.numpy()[:, 1] == 0).all() and dw.numpy()[1] == 0 and db.numpy()[1] == 0


def test_batch_norm_backward_activation_finite_differences(dev):
    """d/dx, d/dweight, d/dbias of sum(dy * act(batch_norm(x))) by central differences of the
    float64 forward, against the device's fused backward."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((3, 2, 2, 3))
    dy = rng.standard_normal(x.shape)
    w, b = rng.standard_normal(2), rng.standard_normal(2)
    for act in ("relu", ("leaky_relu", {"negative_slope": 0.2}), "sigmoid", "tanh"):
        def f(xx, ww=w, bb=b, act=act):
            return (dy * np_act(ref.batch_norm_train(xx, ww, bb)[0], act)[0]).sum()

        dx, _, _, dw, db = F.batch_norm_backward(
            dy.astype(np.float32), x.astype(np.float32), None, None, w.astype(np.float32),
            b.astype(np.float32), True, activation=act)
        np.testing.assert_allclose(dx.numpy(), ref.finite_difference(f, x), rtol=1e-4,
                                   atol=1e-4, err_msg=str(act))
        np.testing.assert_allclose(dw.numpy(), ref.finite_difference(lambda ww: f(x, ww), w),
                                   rtol=1e-4, atol=1e-4, err_msg=str(act))
        np.testing.assert_allclose(db.numpy(), ref.finite_difference(lambda bb: f(x, w, bb), b),
                                   rtol=1e-4, atol=1e-4, err_msg=str(act))


def test_batch_norm_relu_against_torch(dev):
    """BatchNorm2d + ReLU / LeakyReLU training step with torch autograd (CPU)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(12)
    for shape in [(4, 6, 5, 5), (1, 3, 33, 1), (16, 7, 1, 1)]:
        c = shape[1]
        x = (rng.standard_normal(shape) * 2 + 1).astype(np.float32)
        dy = rng.standard_normal(shape).astype(np.float32)
        w, b = _params(c, 3)
        for act, tact in (("relu", torch.nn.ReLU()),
                          (("leaky_relu", {"negative_slope": 0.2}), torch.nn.LeakyReLU(0.2))):
            bn = torch.nn.BatchNorm2d(c, eps=1e-5, momentum=0.1)
            with torch.no_grad():
                bn.weight.copy_(torch.tensor(w))
                bn.bias.copy_(torch.tensor(b))
            xt = torch.tensor(x, requires_grad=True)
            ty = tact(bn(xt))
            ty.backward(torch.tensor(dy))
            rm, rv = pm.tensor(np.zeros(c, np.float32), dev), pm.tensor(np.ones(c, np.float32), dev)
            y, mean, invstd = F.batch_norm_with_stats(x, rm, rv, w, b, True, 0.1, 1e-5,
                                                      activation=act)
            dx, _, _, dw, db = F.batch_norm_backward(dy, x, rm, rv, w, b, True, save_mean=mean,
                                                     save_invstd=invstd, activation=act)
            tol = dict(rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(y.numpy(), ty.detach().numpy(), **tol)
            np.testing.assert_allclose(dx.numpy(), xt.grad.numpy(), **tol, err_msg=str(shape))
            np.testing.assert_allclose(dw.numpy(), bn.weight.grad.numpy(), **tol)
            np.testing.assert_allclose(db.numpy(), bn.bias.grad.numpy(), **tol)
            np.testing.assert_allclose(rm.numpy(), bn.running_mean.numpy(), **tol)


def test_batch_norm_backward_activation_bad_input(dev):
    x = pm.tensor(np.zeros((2, 3, 2, 2), np.float32), dev)
    rm, rv = pm.tensor(np.zeros(3, np.float32), dev), pm.tensor(np.ones(3, np.float32), dev)
    dev.reset_counts()
    cases = [
        ("activation", lambda: F.batch_norm_backward(x, x, rm, rv, training=True,
                                                     activation="elu")),
        ("activation", lambda: F.batch_norm_backward(x, x, rm, rv, training=True,
                                                     activation=("relu", {"alpha": 1.0}))),
        ("activation", lambda: F.batch_norm_backward(x, x, rm, rv, training=True, activation=3)),
        ("y", lambda: F.batch_norm_backward(x, x, rm, rv, training=True, activation="relu",
                                            y=np.zeros((2, 3, 2, 1), np.float32))),
        ("y", lambda: F.batch_norm_backward(x, x, rm, rv, training=True, activation="relu",
                                            y=pm.tensor(np.zeros((2, 3, 2, 2), np.float16), dev))),
        ("grad_out", lambda: F.batch_norm_backward(np.zeros((2, 3, 1, 2), np.float32), x, rm, rv,
                                                   training=True, activation="relu")),
    ]
    for k, (arg, call) in enumerate(cases):
        with pytest.raises(ValueError, match=arg):
            call()
            pytest.fail(f"case {k} ({arg}) did not raise")
    assert sum(dev.dispatch_counts.values()) == 0


# ---- channel slices of a larger tensor (concat elimination) ---------------------------------------
# batch_norm(..., out=, out_batch_stride=) writes y into a channel slice; batch_norm_backward(...,
# grad_out_batch_stride=) reads dy from one. The rest of the larger tensor is poisoned (NaN) to
# catch a write outside the slice, or a read of it.

SLICE_SHAPES = [(2, 5, 4, 6), (1, 3, 5, 7), (3, 7, 1, 1), (2, 33, 3, 3), (4, 3, 40), (5, 6)]


def _slice_views(dev, shape, dtype, ctot, c0, fill=np.nan):
    """(the larger (N, ctot, ...) tensor, a Tensor at channel c0 of it, the batch stride)."""
    n, rest = shape[0], shape[2:]
    inner = int(np.prod(rest)) if rest else 1
    big = pm.tensor(np.full((n, ctot) + rest, fill, dtype), dev)
    isz = np.dtype(dtype).itemsize
    view = pm.Tensor(big.buffer.view(c0 * inner * isz), shape, dtype)
    return big, view, ctot * inner


def _where(c, ctot):
    """channel offsets at the start, middle and end of a ctot-channel tensor"""
    return sorted({0, (ctot - c) // 2, ctot - c})


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("act", [None, "relu", "tanh"], ids=["none", "relu", "tanh"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_batch_norm_strided_out(dev, dtype, act, training, resident):
    """out= a view at channel c0 of a larger tensor, out_batch_stride=: the slice holds exactly
    the contiguous result, the running statistics move the same, nothing else is written."""
    if not dev.supports_views:
        pytest.skip("out= at an offset needs buffer views")
    for k, shape in enumerate(SLICE_SHAPES):
        c = shape[1]
        ctot = c + 5 + k % 3
        x = _data(shape, dtype, k)
        w, b = _params(c, k)
        rm = np.random.default_rng(k).uniform(-1, 1, c).astype(np.float32)
        rv = np.random.default_rng(k).uniform(0.5, 2, c).astype(np.float32)
        xt = pm.tensor(x, dev)
        rm0, rv0 = pm.tensor(rm, dev), pm.tensor(rv, dev)
        want, wm, wi = F.batch_norm_with_stats(xt, rm0, rv0, w, b, training, activation=act)
        for c0 in _where(c, ctot):
            big, view, ns = _slice_views(dev, shape, dtype, ctot, c0)
            rm1, rv1 = pm.tensor(rm, dev), pm.tensor(rv, dev)
            y, m1, i1 = F.batch_norm_with_stats(xt, rm1, rv1, w, b, training, activation=act,
                                                out=view, out_batch_stride=ns)
            assert y.shape == shape and y.buffer.offset == view.buffer.offset
            got = big.numpy()
            np.testing.assert_array_equal(got[:, c0:c0 + c], want.numpy(),
                                          err_msg=f"{shape} at {c0}")
            assert np.isnan(np.delete(got, np.s_[c0:c0 + c], axis=1)).all(), \
                f"{shape} at {c0}: wrote outside the slice"
            np.testing.assert_array_equal(m1.numpy(), wm.numpy())
            np.testing.assert_array_equal(i1.numpy(), wi.numpy())
            np.testing.assert_array_equal(rm1.numpy(), rm0.numpy() if training else rm)
            np.testing.assert_array_equal(rv1.numpy(), rv0.numpy() if training else rv)
            if training:  # undo the reference's second step, so each c0 compares one step
                rm0, rv0 = pm.tensor(rm, dev), pm.tensor(rv, dev)
                F.batch_norm(xt, rm0, rv0, w, b, True, activation=act)
        # batch_norm takes them too; a contiguous out= is plain batch_norm into that buffer
        big, view, ns = _slice_views(dev, shape, dtype, ctot, ctot - c)
        F.batch_norm(xt, pm.tensor(rm, dev), pm.tensor(rv, dev), w, b, training, activation=act,
                     out=view, out_batch_stride=ns)
        np.testing.assert_array_equal(big.numpy()[:, ctot - c:], want.numpy())
        y2 = F.batch_norm(xt, pm.tensor(rm, dev), pm.tensor(rv, dev), w, b, training,
                          activation=act, out=pm.tensor(np.zeros(shape, dtype), dev))
        np.testing.assert_array_equal(y2.numpy(), want.numpy())


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("act", [None, "relu", ("leaky_relu", {"negative_slope": 0.2}),
                                 "sigmoid"], ids=["none", "relu", "leaky_relu", "sigmoid"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_batch_norm_backward_strided_grad_out(dev, dtype, act, training):
    """grad_out a view at channel c0 of a larger (poisoned) tensor with grad_out_batch_stride=:
    the same dx, dweight, dbias as from the contiguous grad_out (bit for bit: the same sums in the
    same order), against float64 too; both tilings, batch 1, HW = 1, (N, C) inputs."""
    if not dev.supports_views:
        pytest.skip("views at an offset need buffer views")
    for k, shape in enumerate(SLICE_SHAPES):
        c = shape[1]
        ctot = c + 4 + k % 3
        x, dy, w, b, rm, rv, y, mean, invstd = _bn_act_case(dev, shape, dtype, act, training, k)
        kw = dict(save_mean=mean, save_invstd=invstd) if training else {}
        rmt, rvt = pm.tensor(rm, dev), pm.tensor(rv, dev)
        want = F.batch_norm_backward(dy, x, rmt, rvt, w, b, training, **kw, activation=act)
        if act is not None:
            rdx, rdw, rdb = _ref_act_grad(x, dy, w, b, rm, rv, act, training, y)
        elif training:
            rdx, rdw, rdb = ref.batch_norm_train_backward(dy.astype(np.float64), x, w)
        else:
            rdx, rdw, rdb = ref.batch_norm_eval_backward(dy.astype(np.float64), x, rm, rv, w)
        for c0 in _where(c, ctot):
            big, view, ns = _slice_views(dev, shape, dtype, ctot, c0)
            whole = big.numpy()
            whole[:, c0:c0 + c] = dy
            big.buffer.write(whole)
            dx, n1, n2, dw, db = F.batch_norm_backward(view, x, rmt, rvt, w, b, training, **kw,
                                                       activation=act, grad_out_batch_stride=ns)
            assert n1 is None and n2 is None and dx.shape == shape
            for name, a, r in zip(("dx", "dw", "db"), (dx, dw, db), (want[0], want[3], want[4])):
                np.testing.assert_array_equal(a.numpy(), r.numpy(),
                                              err_msg=f"{shape} at {c0}: {name}")
        scale = max(1.0, float(np.abs(rdx).max()))
        tol = dict(rtol=3e-3, atol=3e-3 * scale) if dtype == np.float16 else \
            dict(rtol=1e-4, atol=1e-5 * scale)
        np.testing.assert_allclose(dx.numpy().astype(np.float64), rdx, **tol, err_msg=str(shape))
        st = np.sqrt(x.size)
        np.testing.assert_allclose(dw.numpy(), rdw, rtol=1e-4, atol=1e-4 * st)
        np.testing.assert_allclose(db.numpy(), rdb, rtol=1e-4, atol=1e-4 * st)


def test_batch_norm_strided_bad_input(dev):
    """Bad out= / out_batch_stride= / grad_out_batch_stride= raise ValueError naming the
    argument before anything runs (the running statistics are not moved)."""
    if not dev.supports_views:
        pytest.skip("views at an offset need buffer views")
    shape = (2, 3, 2, 2)
    x = pm.tensor(np.ones(shape, np.float32), dev)
    rm, rv = pm.tensor(np.zeros(3, np.float32), dev), pm.tensor(np.ones(3, np.float32), dev)
    big, view, ns = _slice_views(dev, shape, np.float32, 5, 1)
    small = pm.Tensor(big.buffer.view(3 * 4 * 4), shape, np.float32)  # too few bytes left
    dev.reset_counts()
    cases = [
        ("out_batch_stride", lambda: F.batch_norm(x, rm, rv, training=True, out_batch_stride=20)),
        ("out_batch_stride", lambda: F.batch_norm(x, rm, rv, training=True, out=view,
                                                  out_batch_stride=11)),
        ("out", lambda: F.batch_norm(x, rm, rv, training=True, out=small, out_batch_stride=ns)),
        ("out", lambda: F.batch_norm(x, rm, rv, training=True,
                                     out=pm.tensor(np.zeros(shape, np.float16), dev))),
        ("out", lambda: F.batch_norm_with_stats(x, rm, rv, training=True, out=np.zeros(shape))),
        ("grad_out_batch_stride", lambda: F.batch_norm_backward(view, x, rm, rv, training=True,
                                                                grad_out_batch_stride=11)),
        ("grad_out_batch_stride", lambda: F.batch_norm_backward(view, x, rm, rv, training=True,
                                                                grad_out_batch_stride=20.0)),
        ("grad_out", lambda: F.batch_norm_backward(small, x, rm, rv, training=True,
                                                   grad_out_batch_stride=ns)),
    ]
    for k, (arg, call) in enumerate(cases):
        with pytest.raises((ValueError, TypeError), match=arg):
            call()
            pytest.fail(f"case {k} ({arg}) did not raise")
    assert sum(dev.dispatch_counts.values()) == 0
    np.testing.assert_array_equal(rm.numpy(), 0.0)
