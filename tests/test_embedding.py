"""embedding (kernels/embedding.metal) against numpy indexing and a numpy scatter-add for the
gradient (cross-checked with torch where installed): padding_idx, scale_grad_by_freq, repeated
and absent rows, 0-d and N-D indices, both storage types."""
from __future__ import annotations

import numpy as np
import pytest

import pymetalnn as pm
from pymetalnn import functional as F

CASES = [((4, 7), 10, 3, None, False), ((33,), 5, 33, 2, True), ((), 4, 1, None, False),
         ((2, 3, 2), 7, 16, -1, False), ((1,), 1, 5, None, True), ((300,), 3, 32, 0, True)]


def _np_grad(g, idx, v, pad, scale):
    d = g.shape[-1]
    flat, gf = idx.reshape(-1), g.reshape(-1, d).astype(np.float64)
    dw = np.zeros((v, d))
    np.add.at(dw, flat, gf)
    if scale:
        cnt = np.bincount(flat, minlength=v)
        dw /= np.maximum(cnt, 1)[:, None]
    if pad is not None:
        dw[pad % v] = 0.0
    return dw


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_embedding(dev, dtype):
    for k, (ishape, v, d, pad, scale) in enumerate(CASES):
        rng = np.random.default_rng(k)
        idx = rng.integers(0, v, ishape)
        w = rng.standard_normal((v, d)).astype(dtype)
        y = F.embedding(pm.tensor(idx.astype(np.int32), dev), pm.tensor(w, dev), pad,
                        scale_grad_by_freq=scale)
        assert y.shape == ishape + (d,) and y.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(y.numpy(), w[idx])
        g = rng.standard_normal(ishape + (d,)).astype(dtype)
        none, dw = F.embedding_backward(pm.tensor(g, dev), idx, pm.tensor(w, dev), pad,
                                        scale_grad_by_freq=scale)
        assert none is None and dw.shape == w.shape
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=2e-3, atol=2e-2)
        np.testing.assert_allclose(dw.numpy().astype(np.float64), _np_grad(g, idx, v, pad, scale), **tol,
                                   err_msg=f"{ishape} {v} {d}")


def test_embedding_torch_and_bad_input(dev):
    rng = np.random.default_rng(9)
    idx = rng.integers(0, 6, (3, 4))
    w = rng.standard_normal((6, 5)).astype(np.float32)
    dev.reset_counts()
    for call, arg in [(lambda: F.embedding(np.array([0, 6]), w), "input"),
                      (lambda: F.embedding(np.array([-1]), w), "input"),
                      (lambda: F.embedding(np.array([0.5]), w), "input"),
                      (lambda: F.embedding(idx, w, 6), "padding_idx"),
                      (lambda: F.embedding(idx, w, max_norm=1.0), "weight"),  # not in place
                      (lambda: F.embedding(idx, pm.tensor(w, dev), max_norm=-1.0), "max_norm"),
                      (lambda: F.embedding(idx, pm.tensor(w, dev), max_norm=1.0, norm_type=0),
                       "norm_type"),
                      (lambda: F.embedding(idx, w[0]), "weight"),
                      (lambda: F.embedding_backward(np.ones((3, 4, 4), np.float32), idx, w), "grad_out")]:
        with pytest.raises(ValueError, match=arg):
            call()
    assert sum(dev.dispatch_counts.values()) == 0
    torch = pytest.importorskip("torch")
    wt = torch.tensor(w, requires_grad=True)
    g = rng.standard_normal((3, 4, 5)).astype(np.float32)
    yt = torch.nn.functional.embedding(torch.tensor(idx), wt, 1, scale_grad_by_freq=True)
    yt.backward(torch.tensor(g))
    np.testing.assert_array_equal(F.embedding(idx, pm.tensor(w, dev), 1).numpy(), yt.detach().numpy())
    dw = F.embedding_backward(g, idx, pm.tensor(w, dev), 1, scale_grad_by_freq=True)[1]
    np.testing.assert_allclose(dw.numpy(), wt.grad.numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, float("inf")])
def test_embedding_max_norm_and_sparse_like_torch(dev, norm_type):
    """max_norm renormalizes the indexed rows of weight in place (torch's embedding_renorm_: rows
    over max_norm scaled by max_norm / (norm + 1e-7), the others and unindexed rows untouched);
    the gradient is the lookup's; sparse=True gives torch's sparse gradient as a dense table."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(int(norm_type) if np.isfinite(norm_type) else 9)
    w = (rng.standard_normal((7, 5)) * 1.5).astype(np.float32)
    idx = np.array([[0, 2, 2, 5], [6, 0, 3, 3]])
    wt = torch.tensor(w, requires_grad=True)
    with torch.no_grad():
        wref = wt.detach().clone()
    yt = torch.nn.functional.embedding(torch.tensor(idx), wref, max_norm=1.2, norm_type=norm_type)
    wp = pm.tensor(w, dev)
    y = F.embedding(idx, wp, max_norm=1.2, norm_type=norm_type)
    np.testing.assert_allclose(wp.numpy(), wref.numpy(), rtol=1e-6, atol=1e-6)  # in place
    assert not np.allclose(wp.numpy(), w) and np.array_equal(wp.numpy()[[1, 4]], w[[1, 4]])
    np.testing.assert_allclose(y.numpy(), yt.numpy(), rtol=1e-6, atol=1e-6)
    g = rng.standard_normal((2, 4, 5)).astype(np.float32)
    ys = torch.nn.functional.embedding(torch.tensor(idx), wt, sparse=True)
    (gs,) = torch.autograd.grad(ys, [wt], torch.tensor(g))
    _, dw = F.embedding_backward(g, idx, wp, max_norm=1.2, norm_type=norm_type, sparse=True)
    np.testing.assert_allclose(dw.numpy(), gs.to_dense().numpy(), rtol=1e-6, atol=1e-6)
