"""Losses (kernels/loss.metal) against the float64 numpy references, every reduction, with and
without per-sample weights (one of them 0), label smoothing, ignore_index, both storage types.

Shapes: batch 1, one class, 3/31/32/33/1000/5000 classes (5000 exceeds the threadgroup cache),
odd spatial sizes, and pointwise samples longer than one threadgroup chunk (4100 > 2048), so every
kernel path and the multi-chunk partial sums run.
"""
from __future__ import annotations

import numpy as np
import pytest
from reference import loss as ref

import pymetalnn as pm
from pymetalnn import functional as F

RED = ["none", "per_sample", "sum", "mean", "sum_by_nonzero_weights"]
PW_SHAPES = [(1, 1), (1, 31), (3, 33), (2, 3, 5, 7), (2, 4100)]
# (N, C) with C a multiple of 8 up to 1024 (4, 1000), (3, 64): cross-entropy's row kernels
CLS_SHAPES = [(1, 1), (5, 3), (3, 33), (4, 1000), (3, 64), (2, 31, 3, 5), (1, 32, 2, 2),
              (2, 5000)]

# name -> (forward, backward, options passed to both, reference options)
POINTWISE = {
    "mse_loss": (F.mse_loss, F.mse_loss_backward, {}, {}),
    "l1_loss": (F.l1_loss, F.l1_loss_backward, {}, {}),
    "huber_loss": (F.huber_loss, F.huber_loss_backward, {"delta": 0.7}, {"delta": 0.7}),
    "bce_with_logits": (F.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits_backward,
                        {"label_smoothing": 0.2}, {"smoothing": 0.2}),
    "hinge_loss": (F.hinge_loss, F.hinge_loss_backward, {}, {}),
    "kl_div": (F.kl_div, F.kl_div_backward, {}, {}),
    "kl_div_log_target": (F.kl_div, F.kl_div_backward, {"log_target": True}, {"log_target": True}),
    "log_loss": (F.log_loss, F.log_loss_backward, {"epsilon": 1e-3}, {"epsilon": 1e-3}),
}


def _pw_data(name: str, shape, dtype, seed: int):
    rng = np.random.default_rng(seed)
    if name in ("mse_loss", "l1_loss", "huber_loss"):
        x, t = rng.standard_normal(shape), rng.standard_normal(shape)
    elif name == "bce_with_logits":
        x, t = rng.standard_normal(shape) * 3, rng.uniform(0, 1, shape)
    elif name == "hinge_loss":
        x, t = rng.standard_normal(shape) * 2, rng.integers(0, 2, shape).astype(float)
    elif name == "kl_div":
        x = np.log(rng.uniform(0.05, 1, shape))
        t = rng.uniform(0, 1, shape) * (rng.uniform(0, 1, shape) > 0.2)  # some exact zeros
    elif name == "kl_div_log_target":
        x, t = np.log(rng.uniform(0.05, 1, shape)), np.log(rng.uniform(0.05, 1, shape))
    elif name == "log_loss":
        x, t = rng.uniform(0.02, 0.98, shape), rng.uniform(0, 1, shape)
    else:
        raise KeyError(name)
    return x.astype(dtype), t.astype(dtype)


def _weights(n: int, seed: int) -> np.ndarray:
    w = np.random.default_rng(seed).uniform(0.25, 2.0, n).astype(np.float32)
    if n > 1:
        w[1] = 0.0
    return w


def _grad_for(reduction: str, shape, seed: int):
    rng = np.random.default_rng(seed)
    if reduction == "none":
        return rng.standard_normal(shape).astype(np.float32)
    if reduction == "per_sample":
        return rng.standard_normal(shape[0]).astype(np.float32)
    return 0.7


def _close(got, want, dtype, what, grad=False):
    got = np.asarray(got, np.float64)
    if grad and dtype == np.float16:
        tol = dict(rtol=4e-3, atol=4e-3 * max(1.0, float(np.abs(want).max())))
    else:
        tol = dict(rtol=5e-5, atol=5e-5 * max(1.0, float(np.abs(want).max()) if np.size(want) else 1.0))
    np.testing.assert_allclose(got, want, **tol, err_msg=what)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("name", list(POINTWISE))
def test_pointwise(dev, name, dtype):
    fwd, bwd, opts, ropts = POINTWISE[name]
    rname = "kl_div" if name.startswith("kl_div") else name
    reds = RED + (["batchmean"] if rname == "kl_div" else [])
    for k, shape in enumerate(PW_SHAPES):
        x, t = _pw_data(name, shape, dtype, k)
        xt, tt = pm.tensor(x, dev), pm.tensor(t, dev)
        for weighted in (False, True):
            w = _weights(shape[0], k) if weighted else None
            for red in reds:
                what = f"{name} {shape} {red} weighted={weighted}"
                got = fwd(xt, tt, sample_weight=w, reduction=red, **opts)
                assert got.dtype == np.float32
                want = ref.forward(rname, x, t, w, red, **ropts)
                assert got.shape == want.shape, what
                _close(got.numpy(), want, dtype, what)
                g = _grad_for(red, shape, k + 50)
                dx, _ = bwd(g, xt, tt, sample_weight=w, reduction=red, **opts)
                assert dx.dtype == np.dtype(dtype) and dx.shape == shape
                _close(dx.numpy(), ref.backward(rname, g, x, t, w, red, **ropts), dtype, what, grad=True)


def _cls_data(name: str, shape, dtype, labels: bool, seed: int, ignore: bool = True):
    rng = np.random.default_rng(seed)
    c = shape[1]
    if name == "cross_entropy":
        x = rng.standard_normal(shape) * 3
    elif name == "categorical_cross_entropy":
        e = np.exp(rng.standard_normal(shape))
        x = e / e.sum(axis=1, keepdims=True)
    else:
        x = rng.standard_normal(shape)
    if labels:
        t = rng.integers(0, c, (shape[0],) + shape[2:]).astype(np.int32)
        if ignore and t.size > 2:
            t.reshape(-1)[1] = -100
        return x.astype(dtype), t
    if name == "cosine_distance":
        return x.astype(dtype), rng.standard_normal(shape).astype(dtype)
    p = rng.uniform(0, 1, shape) * (rng.uniform(0, 1, shape) > 0.3)
    p = p / np.maximum(p.sum(axis=1, keepdims=True), 1e-3)
    return x.astype(dtype), p.astype(dtype)


CLASS = {
    "cross_entropy": (F.cross_entropy, F.cross_entropy_backward),
    "categorical_cross_entropy": (F.categorical_cross_entropy, F.categorical_cross_entropy_backward),
    "cosine_distance": (F.cosine_distance, F.cosine_distance_backward),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("variant", ["cross_entropy/labels", "cross_entropy/probs",
                                     "categorical_cross_entropy/labels",
                                     "categorical_cross_entropy/probs", "cosine_distance/probs"])
def test_class_axis(dev, variant, dtype):
    name, kind = variant.split("/")
    labels = kind == "labels"
    fwd, bwd = CLASS[name]
    for k, shape in enumerate(CLS_SHAPES):
        x, t = _cls_data(name, shape, dtype, labels, k)
        xt, tt = pm.tensor(x, dev), pm.tensor(t, dev)
        for weighted in (False, True):
            w = _weights(shape[0], k) if weighted else None
            # smoothing varies with the shape so that both 0 and > 0 are seen everywhere
            s = 0.0 if (k + weighted) % 2 == 0 or name == "cosine_distance" else 0.15
            opts = {"eps": 1e-8} if name == "cosine_distance" else {"label_smoothing": s}
            ropts = {"eps": 1e-8} if name == "cosine_distance" else {"smoothing": s, "labels": labels}
            for red in RED:
                what = f"{variant} {shape} {red} weighted={weighted} s={s}"
                want = ref.forward(name, x, t, w, red, **ropts)
                if red == "mean" and not np.isfinite(want):
                    continue
                got = fwd(xt, tt, sample_weight=w, reduction=red, **opts)
                assert got.dtype == np.float32 and got.shape == want.shape, what
                _close(got.numpy(), want, dtype, what)
                g = _grad_for(red, want.shape if red == "none" else shape, k + 70)
                dx, _ = bwd(g, xt, tt, sample_weight=w, reduction=red, **opts)
                assert dx.dtype == np.dtype(dtype) and dx.shape == shape
                _close(dx.numpy(), ref.backward(name, g, x, t, w, red, **ropts), dtype, what, grad=True)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_cross_entropy_extreme_logits(dev, dtype):
    big = 6e4 if dtype == np.float16 else 1e30
    x = np.array([
        np.full(33, 3.0),                                  # all equal
        np.full(33, -big),                                 # all equal, very negative
        np.r_[big, np.zeros(32)],                          # one huge logit
        np.r_[np.linspace(-3, 3, 32), -big],               # one very negative logit
        np.r_[np.full(16, big), np.full(17, big / 2)],     # huge and tied
    ]).astype(dtype)
    y = np.array([5, 0, 0, 32, 20], np.int32)
    for s in (0.0, 0.1):
        got = F.cross_entropy(x, y, reduction="none", label_smoothing=s).numpy()
        want = ref.forward("cross_entropy", x, y, None, "none", labels=True, smoothing=s)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        dx = F.cross_entropy_backward(np.ones(5, np.float32), x, y, reduction="none",
                                      label_smoothing=s)[0].numpy().astype(np.float64)
        assert np.all(np.isfinite(dx))
        want = ref.backward("cross_entropy", np.ones(5), x, y, None, "none", labels=True, smoothing=s)
        np.testing.assert_allclose(dx, want, rtol=1e-3, atol=1e-3 if dtype == np.float16 else 1e-6)
    np.testing.assert_allclose(got[0], np.log(33.0), rtol=1e-6)


def test_reference_backward_vs_finite_differences():
    rng = np.random.default_rng(3)
    w = np.array([1.5, 0.0, 0.5])
    for name in ref.POINTWISE:
        ropts = {"huber_loss": {"delta": 0.7}, "bce_with_logits": {"smoothing": 0.2},
                 "log_loss": {"epsilon": 1e-3}}.get(name, {})
        x, t = _pw_data(name, (3, 2, 3), np.float64, 1)
        for red in ("none", "per_sample", "mean", "sum_by_nonzero_weights"):
            g = _grad_for(red, x.shape, 9)
            fd = ref.finite_difference(
                lambda z, red=red, g=g, name=name, t=t, ropts=ropts:
                (np.asarray(g) * ref.forward(name, z, t, w, red, **ropts)).sum(), x)
            np.testing.assert_allclose(ref.backward(name, g, x, t, w, red, **ropts), fd,
                                       rtol=1e-5, atol=1e-7, err_msg=f"{name} {red}")
    for name, labels in [("cross_entropy", True), ("cross_entropy", False),
                         ("categorical_cross_entropy", True), ("categorical_cross_entropy", False),
                         ("cosine_distance", False)]:
        x, t = _cls_data(name, (3, 4, 1, 2), np.float64, labels, 2)
        ropts = {"eps": 1e-8} if name == "cosine_distance" else {"smoothing": 0.1, "labels": labels}
        for red in ("none", "per_sample", "mean", "sum_by_nonzero_weights"):
            g = _grad_for(red, (3, 1, 2) if red == "none" else x.shape, 5)
            fd = ref.finite_difference(
                lambda z, red=red, g=g, name=name, t=t, ropts=ropts:
                (np.asarray(g) * ref.forward(name, z, t, w, red, **ropts)).sum(), x)
            np.testing.assert_allclose(ref.backward(name, g, x, t, w, red, **ropts), fd,
                                       rtol=1e-5, atol=1e-7, err_msg=f"{name} {labels} {red}")
    # the clamped branch of the cosine distance (a zero vector)
    x = rng.standard_normal((2, 3))
    x[0] = 0.0
    t = rng.standard_normal((2, 3))
    fd = ref.finite_difference(lambda z: ref.forward("cosine_distance", z, t, None, "sum", eps=0.5), x)
    np.testing.assert_allclose(ref.backward("cosine_distance", 1.0, x, t, None, "sum", eps=0.5)[0],
                               fd[0], rtol=1e-5, atol=1e-7)


@pytest.mark.filterwarnings("ignore:reduction")  # torch's kl_div 'mean' deprecation notice
def test_against_torch(dev):
    torch = pytest.importorskip("torch")
    tf = torch.nn.functional
    rng = np.random.default_rng(21)

    def check(ours_f, ours_b, torch_f, x, t, torch_t=None, **kw):
        for red in ("none", "sum", "mean"):
            xt = torch.tensor(x.astype(np.float64), requires_grad=True)
            tt = torch.tensor(t.astype(np.float64) if t.dtype.kind == "f" else t) if torch_t is None \
                else torch_t
            if tt.dtype.is_floating_point:
                tt.requires_grad_(True)
            lt = torch_f(xt, tt, red)
            g = rng.standard_normal(tuple(lt.shape)) if red == "none" else np.array(0.7)
            lt.backward(torch.tensor(g))
            got = ours_f(pm.tensor(x, dev), t, reduction=red, **kw).numpy()
            np.testing.assert_allclose(got, lt.detach().numpy(), rtol=2e-5, atol=2e-5,
                                       err_msg=f"{ours_f.__name__} {red}")
            dx, dt = ours_b(g.astype(np.float32) if red == "none" else 0.7, pm.tensor(x, dev), t,
                            reduction=red, **kw)
            np.testing.assert_allclose(dx.numpy(), xt.grad.numpy(), rtol=2e-5, atol=2e-6,
                                       err_msg=f"{ours_f.__name__} backward {red}")
            # the target's gradient where torch differentiates it (hinge/log loss: not torch's)
            if dt is None:
                assert tt.grad is None or ours_f in (F.hinge_loss, F.log_loss, F.cosine_distance), \
                    ours_f.__name__
            else:
                np.testing.assert_allclose(dt.numpy(), tt.grad.numpy(), rtol=2e-5, atol=2e-6,
                                           err_msg=f"{ours_f.__name__} target backward {red}")

    x = (rng.standard_normal((4, 1000)) * 3).astype(np.float32)
    y = rng.integers(0, 1000, 4).astype(np.int32)
    y[2] = -100
    for s in (0.0, 0.1):
        check(F.cross_entropy, F.cross_entropy_backward,
              lambda a, b, r, s=s: tf.cross_entropy(a, b.long(), reduction=r, label_smoothing=s),
              x, y, label_smoothing=s)
    x4 = rng.standard_normal((2, 5, 3, 3)).astype(np.float32)
    p4 = rng.uniform(0, 1, x4.shape).astype(np.float32)
    p4 /= p4.sum(axis=1, keepdims=True)
    check(F.cross_entropy, F.cross_entropy_backward,
          lambda a, b, r: tf.cross_entropy(a, b.double(), reduction=r, label_smoothing=0.2),
          x4, p4, label_smoothing=0.2)
    y4 = rng.integers(0, 5, (2, 3, 3)).astype(np.int32)
    probs = np.exp(x4) / np.exp(x4).sum(axis=1, keepdims=True)
    check(F.categorical_cross_entropy, F.categorical_cross_entropy_backward,
          lambda a, b, r: tf.nll_loss(torch.log(a), b.long(), reduction=r), probs, y4)
    check(F.cosine_distance, F.cosine_distance_backward,
          lambda a, b, r: _torch_reduce(1 - tf.cosine_similarity(a, b.double(), dim=1, eps=1e-8), r),
          x4, p4)
    a = rng.standard_normal((3, 7, 5)).astype(np.float32)
    b = rng.standard_normal((3, 7, 5)).astype(np.float32)
    u = rng.uniform(0, 1, a.shape).astype(np.float32)
    check(F.mse_loss, F.mse_loss_backward, lambda p, q, r: tf.mse_loss(p, q.double(), reduction=r), a, b)
    check(F.l1_loss, F.l1_loss_backward, lambda p, q, r: tf.l1_loss(p, q.double(), reduction=r), a, b)
    check(F.huber_loss, F.huber_loss_backward,
          lambda p, q, r: tf.huber_loss(p, q.double(), reduction=r, delta=0.6), a, b, delta=0.6)
    check(F.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits_backward,
          lambda p, q, r: tf.binary_cross_entropy_with_logits(p, q.double(), reduction=r), 3 * a, u)
    lp = np.log(u + 0.01).astype(np.float32)
    check(F.kl_div, F.kl_div_backward, lambda p, q, r: tf.kl_div(p, q.double(), reduction=r), lp, u)
    check(F.kl_div, F.kl_div_backward,
          lambda p, q, r: tf.kl_div(p, q.double(), reduction=r, log_target=True), lp, lp[::-1].copy(),
          log_target=True)
    check(F.hinge_loss, F.hinge_loss_backward,
          lambda p, q, r: _torch_reduce(torch.clamp(1 - (2 * q.double() - 1) * p, min=0), r),
          a, (u > 0.5).astype(np.float32))
    pr = np.clip(u, 0.05, 0.95).astype(np.float32)
    check(F.log_loss, F.log_loss_backward,
          lambda p, q, r: _torch_reduce(-q * torch.log(p + 1e-7) - (1 - q) * torch.log(1 - p + 1e-7), r),
          pr, (u[::-1] > 0.5).astype(np.float32))
    # batchmean: torch's definition of KL divergence proper
    got = F.kl_div(lp, u, reduction="batchmean").numpy()
    want = tf.kl_div(torch.tensor(lp), torch.tensor(u), reduction="batchmean").numpy()
    np.testing.assert_allclose(got, want, rtol=2e-5)


def _torch_reduce(v, r):
    return v if r == "none" else v.sum() if r == "sum" else v.mean()


def test_device_grad_and_weights(dev):
    """grad and sample_weight given as device tensors (the count for sum_by_nonzero_weights then
    runs on the device) give the same gradient as numpy inputs."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 6, 2, 2)).astype(np.float32)
    y = rng.integers(0, 6, (4, 2, 2)).astype(np.int32)
    y[0, 0, 0] = -100
    w = np.array([0.0, 1.0, 2.0, 0.5], np.float32)
    for red in ("mean", "sum_by_nonzero_weights", "sum"):
        want = ref.backward("cross_entropy", 1.3, x, y, w, red, labels=True)
        got = F.cross_entropy_backward(pm.tensor(np.array([1.3], np.float32), dev), pm.tensor(x, dev),
                                       pm.tensor(y, dev), sample_weight=pm.tensor(w, dev), reduction=red)[0]
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-7)
    # all weights zero: sum_by_nonzero_weights is 0 and so is its gradient
    z = np.zeros(4, np.float32)
    assert float(F.mse_loss(x, x + 1, sample_weight=z, reduction="sum_by_nonzero_weights").numpy()) == 0.0
    assert not np.any(F.mse_loss_backward(1.0, x, x + 1, sample_weight=z,
                                          reduction="sum_by_nonzero_weights")[0].numpy())


def test_bad_input(dev):
    x = pm.tensor(np.zeros((2, 3), np.float32), dev)
    y = np.array([0, 2], np.int32)
    t = np.zeros((2, 3), np.float32)
    dev.reset_counts()
    cases = [
        ("target", lambda: F.cross_entropy(x, np.array([0, 3], np.int32))),        # label == C
        ("target", lambda: F.cross_entropy(x, np.array([-1, 0], np.int32))),       # negative
        ("target", lambda: F.cross_entropy(x, np.array([0, 1, 2], np.int32))),     # shape
        ("target", lambda: F.categorical_cross_entropy(x, np.zeros((2, 1), np.int32))),
        ("target", lambda: F.cross_entropy(x, np.zeros((2, 4), np.float32))),      # prob shape
        ("target", lambda: F.cross_entropy(x, pm.tensor(np.zeros((2, 3), np.float16), dev))),
        ("target", lambda: F.mse_loss(x, np.zeros((2, 4), np.float32))),
        ("target", lambda: F.cosine_distance(x, y)),                                # labels
        ("input", lambda: F.mse_loss(pm.tensor(np.zeros((2, 3), np.int32), dev), t)),
        ("input", lambda: F.cross_entropy(pm.tensor(np.zeros((), np.float32), dev), y)),
        ("target", lambda: F.cross_entropy(pm.tensor(np.zeros(3, np.float32), dev), y)),  # unbatched
        ("input", lambda: F.mse_loss(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.float32))),
        ("reduction", lambda: F.mse_loss(x, t, reduction="avg")),
        ("reduction", lambda: F.mse_loss(x, t, reduction="batchmean")),
        ("label_smoothing", lambda: F.cross_entropy(x, y, label_smoothing=1.5)),
        ("label_smoothing", lambda: F.binary_cross_entropy_with_logits(x, t, label_smoothing=-0.1)),
        ("delta", lambda: F.huber_loss(x, t, delta=0.0)),
        ("epsilon", lambda: F.log_loss(x, t, epsilon=0.0)),
        ("eps", lambda: F.cosine_distance(x, t, eps=-1e-8)),
        ("ignore_index", lambda: F.cross_entropy(x, y, ignore_index=1.5)),
        ("log_target", lambda: F.kl_div(x, t, log_target=1)),
        ("sample_weight", lambda: F.mse_loss(x, t, sample_weight=np.ones(3, np.float32))),
        ("sample_weight", lambda: F.cross_entropy(x, y, sample_weight=pm.tensor(np.ones(2, np.float16),
                                                                                dev))),
        ("grad", lambda: F.mse_loss_backward(np.ones(2, np.float32), x, t)),                 # scalar
        ("grad", lambda: F.mse_loss_backward(np.ones(3, np.float32), x, t, reduction="per_sample")),
        ("grad", lambda: F.cross_entropy_backward(np.ones((2, 3), np.float32), x, y, reduction="none")),
        ("grad", lambda: F.mse_loss_backward(pm.tensor(np.ones((2, 3), np.float16), dev), x, t,
                                             reduction="none")),
        ("target", lambda: F.cross_entropy_backward(1.0, x, np.array([0, 5], np.int32))),
    ]
    for k, (arg, call) in enumerate(cases):
        with pytest.raises(ValueError, match=arg):
            call()
            pytest.fail(f"case {k} ({arg}) did not raise")
    with pytest.raises(ValueError, match="weight"):
        F.cross_entropy(x, y, weight=np.ones(4, np.float32))  # one weight per class: 3
    assert sum(dev.dispatch_counts.values()) == 0


_LOSSES = ("cross_entropy", "categorical_cross_entropy", "cosine_distance",
           "binary_cross_entropy_with_logits", "mse_loss", "l1_loss", "huber_loss", "hinge_loss",
           "kl_div", "log_loss", "smooth_l1_loss")


@pytest.mark.parametrize("shape", [(0, 3), (2, 0), (0, 3, 4)])
def test_empty_inputs_refused(dev, shape, no_dispatch):
    """Every loss and its backward refuse an empty input (a batch of 0, an empty class axis)
    naming `input`, before anything is dispatched: torch's 'mean' over no terms is NaN, a value
    that in a training step only hides a data pipeline's empty batch."""
    x = pm.tensor(np.zeros(shape, np.float32), dev)
    t = np.zeros(shape, np.float32)
    labels = np.zeros((shape[0],) + shape[2:], np.int32)
    with no_dispatch(dev):
        for name in _LOSSES:
            for tgt in ((t, labels) if name == "cross_entropy" else (t,)):
                with pytest.raises(ValueError, match=r"input: empty tensor"):
                    getattr(F, name)(x, tgt)
                with pytest.raises(ValueError, match=r"input: empty tensor"):
                    getattr(F, name + "_backward")(1.0, x, tgt)
    torch = pytest.importorskip("torch")
    if shape[0] == 0:  # what a value would have to match: torch's NaN mean
        assert torch.isnan(torch.nn.functional.mse_loss(torch.zeros(shape), torch.zeros(shape)))


def test_empty_batch_refused_by_graph(dev, no_dispatch):
    """A training step with a batch of 0 is refused naming the input, nothing dispatched; the
    next step with samples runs."""
    from graph_nets import data, lenet, sgd

    from pymetalnn import graph as G

    x, loss, _ = lenet(bn=False, record=False, dropout=False)
    tg = G.TrainingGraph(loss, optimizer=sgd(0.1), device=dev)
    X, Y = data(2)
    tg.encode(X, Y).wait()
    with no_dispatch(dev), pytest.raises(G.GraphError, match="'x'.*batch of 0"):
        tg.encode(X[:0], Y[:0])
    assert np.isfinite(tg.encode(X, Y).losses).all()


# (shape of the logits, loss, options): the (N, C) row kernels (C a multiple of the 16-byte chunk),
# the tile kernels (odd C, spatial labels), the class-weighted mean (loss_scale), categorical
_DEVICE_LABEL_CASES = [((4, 8), "cross_entropy", {}), ((4, 5), "cross_entropy", {}),
                       ((3, 5, 2), "cross_entropy", {"reduction": "none"}),
                       ((4, 5), "cross_entropy", {"weight": np.linspace(0.5, 2, 5, dtype=np.float32)}),
                       ((4, 5), "categorical_cross_entropy", {"reduction": "sum"})]


@pytest.mark.parametrize("case", range(len(_DEVICE_LABEL_CASES)))
def test_device_labels_checked_by_the_kernels(dev, case):
    """Labels in a device Tensor are range-checked by the kernels (no read-back): a bad label
    fails the call at the first read of its result (and at synchronize() if nothing read it),
    naming `target` and the label; the next call with good labels gives the reference's
    values, the forward's and the backward's."""
    from pymetalnn.runtime.errors import AsyncError

    shape, name, opts = _DEVICE_LABEL_CASES[case]
    rng = np.random.default_rng(30 + case)
    xn = rng.standard_normal(shape).astype(np.float32)
    if name == "categorical_cross_entropy":  # probabilities
        xn = (np.exp(xn) / np.exp(xn).sum(1, keepdims=True)).astype(np.float32)
    c = shape[1]
    lab_shape = (shape[0],) + shape[2:]
    good = rng.integers(0, c, lab_shape).astype(np.int32)
    good.reshape(-1)[1] = -100
    x = pm.tensor(xn, dev)
    fwd, bwd = getattr(F, name), getattr(F, name + "_backward")
    want = f"{name}: target: label {c + 2} out of range \\[0, {c}\\)"
    for bad_value in (c + 2, -3):
        bad = good.copy()
        bad.reshape(-1)[2] = bad_value
        msg = want.replace(str(c + 2), str(bad_value), 1)
        dev.synchronize()
        out = fwd(x, pm.tensor(bad, dev), **opts)
        with pytest.raises(AsyncError, match=msg):
            out.numpy()
        dev.synchronize()  # reported once: the queue is clean again
        fwd(x, pm.tensor(bad, dev), **opts)
        with pytest.raises(AsyncError, match=msg):  # nothing read it: the next sync raises
            dev.synchronize()
        g = np.ones(lab_shape, np.float32) if opts.get("reduction") == "none" else 1.0
        dx, _ = bwd(g, x, pm.tensor(bad, dev), **opts)
        with pytest.raises(AsyncError, match=msg):
            dx.numpy()
        dev.synchronize()
    red = opts.get("reduction", "mean")
    host = {k: v for k, v in opts.items() if k != "reduction"}
    got = fwd(x, pm.tensor(good, dev), **opts).numpy()
    np.testing.assert_allclose(got, fwd(x, good, **opts).numpy(), rtol=1e-6, atol=1e-6)
    if not host:  # the reference has no class weights
        np.testing.assert_allclose(got, ref.forward(name, xn, good, None, red, labels=True),
                                   rtol=1e-5, atol=1e-6)
    g = np.ones(lab_shape, np.float32) if red == "none" else 1.0
    np.testing.assert_allclose(bwd(g, x, pm.tensor(good, dev), **opts)[0].numpy(),
                               bwd(g, x, good, **opts)[0].numpy(), rtol=1e-6, atol=1e-7)


def test_class_labels(dev):
    """Labels checked once by class_labels are used without a re-check for the same class count
    and ignore_index, and re-checked otherwise."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((6, 5)).astype(np.float32)
    y = np.array([0, 4, -100, 2, 3, 1], np.int32)
    lab = F.class_labels(y, 5, device=dev)
    for red in ("none", "mean"):
        want = ref.forward("cross_entropy", x, y, None, red, labels=True)
        np.testing.assert_allclose(F.cross_entropy(pm.tensor(x, dev), lab, reduction=red).numpy(),
                                   want, rtol=1e-5, atol=1e-6)
        g = np.ones(6, np.float32) if red == "none" else 1.0
        np.testing.assert_allclose(
            F.cross_entropy_backward(g, pm.tensor(x, dev), lab, reduction=red)[0].numpy(),
            ref.backward("cross_entropy", g, x, y, None, red, labels=True), rtol=1e-5, atol=1e-7)
    dev.reset_counts()
    with pytest.raises(ValueError, match="target"):
        F.class_labels(np.array([0, 5]), 5)
    with pytest.raises(ValueError, match="num_classes"):
        F.class_labels(y, 0)
    with pytest.raises(ValueError, match="target"):   # checked for 5 classes, used with 4
        F.cross_entropy(pm.tensor(x[:, :4], dev), lab)
    with pytest.raises(ValueError, match="target"):   # other ignore_index: -100 is out of range
        F.cross_entropy(pm.tensor(x, dev), lab, ignore_index=-1)
    assert sum(dev.dispatch_counts.values()) == 0


def test_all_labels_ignored(dev):
    """Nothing to average: 'mean' is NaN (as PyTorch), 'sum' 0, and the gradient 0."""
    x = np.random.default_rng(2).standard_normal((3, 4)).astype(np.float32)
    y = np.full(3, -100, np.int32)
    assert np.isnan(float(F.cross_entropy(pm.tensor(x, dev), y).numpy()))
    assert float(F.cross_entropy(pm.tensor(x, dev), y, reduction="sum").numpy()) == 0.0
    assert not np.any(F.cross_entropy_backward(1.0, pm.tensor(x, dev), y)[0].numpy())
    torch = pytest.importorskip("torch")
    assert torch.isnan(torch.nn.functional.cross_entropy(torch.tensor(x), torch.tensor(y).long()))


# ---- torch's options: class weights, element weights, pos_weight, smooth L1, unbatched ----------

def _np_log_softmax(x, axis=1):
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def _np_ce(x, y, w, s, red, ignore=-100):
    """float64 reference of torch's weighted, smoothed cross-entropy (labels or probabilities)."""
    c = x.shape[1]
    lp = _np_log_softmax(x)
    wv = np.ones(c) if w is None else w
    shape = (1, c) + (1,) * (x.ndim - 2)
    if y.dtype.kind in "iu":
        valid = y != ignore
        oh = np.zeros_like(x)
        np.put_along_axis(oh, np.expand_dims(np.where(valid, y, 0), 1), 1.0, axis=1)
        tp = (1 - s) * oh + s / c
        terms = -(tp * wv.reshape(shape) * lp).sum(axis=1) * valid
        den = (wv[np.where(valid, y, 0)] * valid).sum()
    else:
        tp = (1 - s) * y + s / c
        terms = -(tp * wv.reshape(shape) * lp).sum(axis=1)
        den = terms.size
    return terms if red == "none" else terms.sum() if red == "sum" else terms.sum() / den


def _np_bce(x, t, w, pw, red):
    sp = np.logaddexp(0, -x)  # softplus(-x)
    pwv = 1.0 if pw is None else pw
    l_ = ((1 - t) * x + (1 + (pwv - 1) * t) * sp) * (1.0 if w is None else w)
    return l_ if red == "none" else l_.sum() if red == "sum" else l_.mean()


def _np_smooth_l1(x, t, beta, red):
    d = np.abs(x - t)
    l_ = np.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta)
    return l_ if red == "none" else l_.sum() if red == "sum" else l_.mean()


def _fd(f, x, eps=1e-6):
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[i] = eps
        g[i] = (f(x + e) - f(x - e)) / (2 * eps)
    return g


@pytest.mark.parametrize("shape", [(5, 3), (1, 33), (6, 40), (2, 4, 3, 5), (3,)])
def test_cross_entropy_class_weight(dev, shape):
    """weight= per class, labels (with an ignored one) and probabilities, with and without label
    smoothing, every torch reduction: numpy reference, its gradients by finite differences, ours
    against both, and torch's values where installed."""
    rng = np.random.default_rng(sum(shape))
    c = shape[0] if len(shape) == 1 else shape[1]
    x = (rng.standard_normal(shape) * 2).astype(np.float32)
    w = rng.uniform(0.2, 2.0, c).astype(np.float32)
    y = rng.integers(0, c, shape[:1] + shape[2:] if len(shape) > 1 else ()).astype(np.int32)
    if y.size > 2:
        y.reshape(-1)[1] = -100
    p = rng.uniform(0, 1, shape)
    p = (p / p.sum(axis=0 if len(shape) == 1 else 1, keepdims=True)).astype(np.float32)
    x2 = x.reshape((1,) + shape) if len(shape) == 1 else x
    for tgt in (y, p):
        t2 = tgt.reshape((1,) + tgt.shape) if len(shape) == 1 else tgt
        for s in (0.0, 0.2):
            for red in ("none", "sum", "mean"):
                want = _np_ce(x2.astype(np.float64), t2 if tgt is y else t2.astype(np.float64), w, s, red)
                got = F.cross_entropy(pm.tensor(x, dev), tgt, w, reduction=red, label_smoothing=s)
                what = f"{shape} {'labels' if tgt is y else 'probs'} s={s} {red}"
                np.testing.assert_allclose(got.numpy().reshape(np.shape(want)) if len(shape) > 1
                                           else got.numpy(), np.reshape(want, got.shape), rtol=2e-5,
                                           atol=2e-6, err_msg=what)
                g = rng.standard_normal(np.shape(want)) if red == "none" else np.array(0.7)
                f64 = lambda z, t2=t2, red=red, g=g, s=s, tgt=tgt: float(  # noqa: E731
                    (g * _np_ce(z, t2 if tgt is y else t2.astype(np.float64), w, s, red)).sum())
                rx = _fd(f64, x2.astype(np.float64))
                gg = g.astype(np.float32).reshape(got.shape) if red == "none" else 0.7
                dx, dt = F.cross_entropy_backward(gg, pm.tensor(x, dev), tgt, w, reduction=red,
                                                  label_smoothing=s)
                np.testing.assert_allclose(dx.numpy(), rx.reshape(shape), rtol=1e-4, atol=1e-5,
                                           err_msg=what)
                if tgt is y:
                    assert dt is None
                else:
                    ft = lambda q, red=red, g=g, s=s: float(  # noqa: E731
                        (g * _np_ce(x2.astype(np.float64), q, w, s, red)).sum())
                    rt = _fd(ft, t2.astype(np.float64))
                    np.testing.assert_allclose(dt.numpy(), rt.reshape(shape), rtol=1e-4, atol=1e-5,
                                               err_msg=what + " target")
    torch = pytest.importorskip("torch")
    for tgt in (y, p):
        tt = torch.tensor(tgt).long() if tgt is y else torch.tensor(tgt)
        want = torch.nn.functional.cross_entropy(torch.tensor(x), tt, torch.tensor(w), label_smoothing=0.1)
        got = F.cross_entropy(pm.tensor(x, dev), tgt, w, label_smoothing=0.1)
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=2e-5, atol=2e-6)


def test_bce_weight_pos_weight_and_smooth_l1(dev):
    """binary_cross_entropy_with_logits(weight=, pos_weight=) broadcast like torch, and
    smooth_l1_loss(beta=), with input and target gradients, against numpy references checked by
    finite differences (and torch where installed)."""
    rng = np.random.default_rng(5)
    for shape, wshape, pshape in [((4, 3), (3,), (3,)), ((2, 5, 3, 3), (5, 1, 1), (1, 3)),
                                  ((33,), (), (33,)), ((1, 7), None, (7,)), ((3, 4), (3, 4), None)]:
        x = (rng.standard_normal(shape) * 3).astype(np.float32)
        t = rng.uniform(0, 1, shape).astype(np.float32)
        w = None if wshape is None else rng.uniform(0, 2, wshape).astype(np.float32)
        pw = None if pshape is None else rng.uniform(0.5, 3, pshape).astype(np.float32)
        for red in ("none", "sum", "mean"):
            what = f"{shape} {wshape} {pshape} {red}"
            want = _np_bce(x.astype(np.float64), t.astype(np.float64), w, pw, red)
            got = F.binary_cross_entropy_with_logits(pm.tensor(x, dev), t, w, reduction=red, pos_weight=pw)
            np.testing.assert_allclose(got.numpy(), want, rtol=2e-5, atol=2e-6, err_msg=what)
            g = rng.standard_normal(shape) if red == "none" else np.array(0.7)
            rx = _fd(lambda z, g=g, red=red: float((g * _np_bce(z, t.astype(np.float64), w, pw, red)).sum()),  # noqa: B023 (called at once)
                     x.astype(np.float64))
            rt = _fd(lambda q, g=g, red=red: float((g * _np_bce(x.astype(np.float64), q, w, pw, red)).sum()),  # noqa: B023 (called at once)
                     t.astype(np.float64))
            gg = g.astype(np.float32) if red == "none" else 0.7
            dx, dt = F.binary_cross_entropy_with_logits_backward(gg, pm.tensor(x, dev), t, w, reduction=red,
                                                                 pos_weight=pw)
            np.testing.assert_allclose(dx.numpy(), rx, rtol=1e-4, atol=1e-5, err_msg=what)
            np.testing.assert_allclose(dt.numpy(), rt, rtol=1e-4, atol=1e-5, err_msg=what + " target")
            for beta in (1.0, 0.3):
                want = _np_smooth_l1(x.astype(np.float64), t.astype(np.float64), beta, red)
                got = F.smooth_l1_loss(pm.tensor(x, dev), t, reduction=red, beta=beta)
                np.testing.assert_allclose(got.numpy(), want, rtol=2e-5, atol=2e-6, err_msg=what)
                rx = _fd(lambda z, g=g, red=red, beta=beta: float(
                    (g * _np_smooth_l1(z, t.astype(np.float64), beta, red)).sum()), x.astype(np.float64))  # noqa: B023 (called at once)
                dx, dt = F.smooth_l1_loss_backward(gg, pm.tensor(x, dev), t, reduction=red, beta=beta)
                np.testing.assert_allclose(dx.numpy(), rx, rtol=1e-4, atol=1e-5, err_msg=what)
                np.testing.assert_allclose(dt.numpy(), -rx, rtol=1e-4, atol=1e-5, err_msg=what)
        torch = pytest.importorskip("torch")
        want = torch.nn.functional.binary_cross_entropy_with_logits(
            torch.tensor(x), torch.tensor(t), None if w is None else torch.tensor(w),
            pos_weight=None if pw is None else torch.tensor(pw))
        got = F.binary_cross_entropy_with_logits(x, t, w, pos_weight=pw)
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=2e-5)
    with pytest.raises(ValueError, match="weight"):
        F.binary_cross_entropy_with_logits(x, t, np.ones((5,), np.float32))
    with pytest.raises(ValueError, match="weight"):
        F.cross_entropy(np.zeros((2, 3), np.float32), np.zeros(2, np.int32), np.ones(4, np.float32))
    with pytest.raises(ValueError, match="weight"):
        F.cross_entropy(np.zeros((2, 3), np.float32), np.zeros(2, np.int32), np.ones(3),
                        sample_weight=np.ones(2))
    with pytest.raises(ValueError, match="beta"):
        F.smooth_l1_loss(x, t, beta=-0.5)
    # beta = 0 is the L1 loss, as torch
    np.testing.assert_allclose(F.smooth_l1_loss(x, t, beta=0.0).numpy(), F.l1_loss(x, t).numpy())


def test_cross_entropy_float16_class_weight_like_torch(dev):
    """A half model's class weights (a float16 Tensor) weight the float16 loss as torch's."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 4)).astype(np.float16)
    y = rng.integers(0, 4, 6)
    w = rng.uniform(0.5, 2, 4).astype(np.float16)
    tx = torch.tensor(x, requires_grad=True)
    want = torch.nn.functional.cross_entropy(tx, torch.tensor(y), torch.tensor(w))
    (gx,) = torch.autograd.grad(want, [tx])
    got = F.cross_entropy(pm.tensor(x, dev), y, pm.tensor(w, dev))
    np.testing.assert_allclose(np.float32(got.numpy()), float(want), rtol=1e-2, atol=1e-2)
    dx = F.cross_entropy_backward(np.float16(1.0), pm.tensor(x, dev), y, pm.tensor(w, dev))[0]
    np.testing.assert_allclose(dx.numpy().astype(np.float32), gx.float().numpy(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_pointwise_backward_chunks_match_scalar(dev, dtype):
    """The pointwise backwards' 16-byte-chunk kernel (aligned tensors, samples of at least one
    chunk, chunks straddling two samples) gives the bits of the per-element kernel (a view at an
    unaligned offset): per-sample and per-element weights, pos_weight, every reduction, d/dt."""
    if not dev.supports_views:
        pytest.skip(f"{dev.name} binds whole buffers only")
    rng = np.random.default_rng(12)
    shape = (3, 37)
    x = rng.standard_normal(shape).astype(dtype)
    t = rng.uniform(0, 1, shape).astype(dtype)
    def view(a):
        buf = dev.buffer(np.concatenate([np.zeros(1, a.dtype), a.ravel()]))
        return pm.Tensor(buf.view(a.dtype.itemsize, a.nbytes), a.shape, a.dtype)

    sw = rng.uniform(0, 2, 3).astype(np.float32)
    ew = rng.uniform(0, 2, shape).astype(np.float32)
    pwt = rng.uniform(0.5, 2, shape).astype(np.float32)
    cases = [
        (F.mse_loss_backward, {"sample_weight": sw}),
        (F.huber_loss_backward, {"delta": 0.7}),
        (F.binary_cross_entropy_with_logits_backward, {"weight": ew, "pos_weight": pwt}),
    ]
    for bwd, kw in cases:
        for red in ("none", "per_sample", "sum", "mean"):
            if red == "per_sample" and "weight" in kw:  # refused with element weights
                continue
            gshape = shape if red == "none" else (3,) if red == "per_sample" else ()
            g = rng.standard_normal(gshape).astype(np.float32) if gshape else 1.3
            fast = bwd(g, pm.tensor(x, dev), pm.tensor(t, dev), reduction=red, **kw)
            slow = bwd(g, view(x), view(t), reduction=red, **kw)
            for a, b in zip(fast, slow):
                if a is not None:
                    np.testing.assert_array_equal(a.numpy(), b.numpy(),
                                                  err_msg=f"{bwd.__name__} {red}")
