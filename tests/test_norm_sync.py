"""functional.sync_batch_norm_with_stats / sync_batch_norm_backward (ops/norm_sync.py) in one
process: two ranks simulated by running each rank's call with collectives that hand it the
other rank's partials (recorded from an earlier call), against numpy batch norm over the union
of the two ranks' inputs. The multi-process path (mpiexec) is tests/test_distributed.py's.
"""
from __future__ import annotations

import numpy as np
import pytest

import pymetalnn as pm
from pymetalnn import functional as F

# (N per rank, C, spatial): channel-major partials (HW >= 32), chunk-major (HW < 32), 2-D input
SHAPES = [(3, 5, (7, 7)), (2, 6, (3, 3)), (7, 33, ()), (1, 3, (1, 33))]
MOM, EPS = 0.3, 1e-5


def _ref(xs, gs, w, b, act):
    """Global-batch batch norm over the ranks' inputs xs (axis 0), float64: per rank y, dx, dw,
    db, and the union's mean, invstd and unbiased variance."""
    x = np.concatenate(xs).astype(np.float64)
    ax = (0,) + tuple(range(2, x.ndim))
    shp = (1, -1) + (1,) * (x.ndim - 2)
    mean, var = x.mean(ax), x.var(ax)
    m = x.size // x.shape[1]
    invstd = 1 / np.sqrt(var + EPS)
    xhat = (x - mean.reshape(shp)) * invstd.reshape(shp)
    z = xhat * w.reshape(shp) + b.reshape(shp)
    y = np.maximum(z, 0) if act else z
    g = np.concatenate(gs).astype(np.float64) * ((z > 0) if act else 1)
    sg, sgx = g.sum(ax), (g * xhat).sum(ax)
    dx = (w * invstd).reshape(shp) * (g - (sg / m).reshape(shp) - xhat * (sgx / m).reshape(shp))
    cut = np.cumsum([0] + [len(a) for a in xs])
    per = [(y[a:e], dx[a:e], (g * xhat)[a:e].sum(ax), g[a:e].sum(ax))
           for a, e in zip(cut[:-1], cut[1:])]
    return per, mean, invstd, var * m / (m - 1)


class Pair:
    """Collectives of one simulated rank of two: the other rank's tensor comes from `other`."""

    def __init__(self, rank, other=None):
        self.rank, self.other, self.seen = rank, other, None

    def all_gather(self, src, dst):
        self.seen = src.numpy()
        o = self.other if self.other is not None else self.seen
        parts = [self.seen, o] if self.rank == 0 else [o, self.seen]
        dst.buffer.write(np.concatenate(parts).astype(np.float32))

    def all_reduce(self, t):
        self.seen = t.numpy()
        o = self.other if self.other is not None else self.seen
        t.buffer.write((self.seen + o).astype(np.float32))


@pytest.mark.parametrize("act", [None, "relu"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_two_simulated_ranks(dev, shape, act):
    n, c, sp = shape
    rng = np.random.default_rng(n * 100 + c)
    xs = [(rng.standard_normal((n, c) + sp) * 2 + 0.5 + r).astype(np.float32) for r in (0, 1)]
    gs = [rng.standard_normal((n, c) + sp).astype(np.float32) for _ in (0, 1)]
    w = rng.uniform(0.5, 1.5, c).astype(np.float32)
    b = rng.standard_normal(c).astype(np.float32)
    rm0, rv0 = rng.standard_normal(c).astype(np.float32), rng.uniform(1, 2, c).astype(np.float32)
    per, mean, invstd, uvar = _ref(xs, gs, w, b, act)

    def fwd(r, coll):
        rm, rv = pm.tensor(rm0, dev), pm.tensor(rv0, dev)
        out = F.sync_batch_norm_with_stats(pm.tensor(xs[r], dev), rm, rv, pm.tensor(w, dev),
                                           pm.tensor(b, dev), MOM, EPS, world_size=2,
                                           all_gather=coll.all_gather, activation=act)
        return out, rm, rv

    for r in (0, 1):
        other = Pair(1 - r)
        fwd(1 - r, other)  # records the other rank's partials
        (y, sm, si), rm, rv = fwd(r, Pair(r, other.seen))
        np.testing.assert_allclose(y.numpy(), per[r][0], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(sm.numpy(), mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(si.numpy(), invstd, rtol=1e-4)
        np.testing.assert_allclose(rm.numpy(), (1 - MOM) * rm0 + MOM * mean, rtol=1e-5,
                                   atol=1e-5)
        np.testing.assert_allclose(rv.numpy(), (1 - MOM) * rv0 + MOM * uvar, rtol=1e-4)

        def bwd(q, coll, sm=sm, si=si):
            return F.sync_batch_norm_backward(
                pm.tensor(gs[q], dev), pm.tensor(xs[q], dev), sm, si, pm.tensor(w, dev),
                pm.tensor(b, dev), EPS, world_size=2, all_reduce=coll.all_reduce, activation=act)

        other = Pair(1 - r)
        bwd(1 - r, other)
        gx, dw, db = bwd(r, Pair(r, other.seen))
        np.testing.assert_allclose(gx.numpy(), per[r][1], rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(dw.numpy(), per[r][2], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(db.numpy(), per[r][3], rtol=1e-4, atol=1e-4)
    # the union's statistics differ from one rank's alone: the gather mattered
    assert np.abs(mean - xs[0].mean((0,) + tuple(range(2, xs[0].ndim)))).max() > 0.1


def test_bad_arguments(dev, no_dispatch):
    x = pm.tensor(np.ones((2, 3, 4), np.float32), dev)
    with no_dispatch(dev):
        with pytest.raises(ValueError, match="world_size"):
            F.sync_batch_norm_with_stats(x, None, None, world_size=0,
                                         all_gather=lambda s, d: None)
        with pytest.raises(ValueError, match="save_mean"):
            F.sync_batch_norm_backward(x, x, pm.tensor(np.ones(2, np.float32), dev),
                                       pm.tensor(np.ones(3, np.float32), dev), world_size=2,
                                       all_reduce=lambda t: None)
