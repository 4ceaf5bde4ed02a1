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
                      (lambda: F.embedding(idx, w, max_norm=1.0), "max_norm"),
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
