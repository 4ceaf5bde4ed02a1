"""pymetalnn.optim's loss-scaling functions (optimizer.metal's amp_* kernels) against numpy:
the inf/NaN check over many gradients (separate tensors, and views of one base buffer checked
through a chunk table), the scaled loss gradient, GradScaler's growth/backoff rule, and the
unscale inside an optimizer's update that reads the state.
"""
from __future__ import annotations

import numpy as np
import pytest

import pymetalnn as pm
from pymetalnn import optim
from pymetalnn.params import OPTIM_CHUNK
from pymetalnn.tensor import Tensor

# sizes: 1, one short of / one past a 32 and a 256 boundary, more than one OPTIM_CHUNK, and
# more elements than the single-tensor check's grid (256 x 1024 threads: grid-stride loop)
SIZES = [1, 31, 33, 257, OPTIM_CHUNK + 3, 256 * 1024 + 5]
BAD = [np.inf, -np.inf, np.nan]


def _views(dev, arrays, dtype):
    """Views of one base buffer holding `arrays` back to back (a memory plan's arena)."""
    flat = pm.tensor(np.concatenate([a.ravel() for a in arrays]).astype(dtype), dev)
    out, off = [], 0
    for a in arrays:
        nb = a.size * flat.dtype.itemsize
        out.append(Tensor(flat.buffer.view(off, nb), a.shape, flat.dtype))
        off += nb
    return out


def _grads(rng, dtype, where):
    """Random finite gradients of SIZES; `where` (tensor index, element index, value) plants a
    non-finite value."""
    gs = [rng.standard_normal(n).astype(dtype) for n in SIZES]
    gs[0][0] = np.finfo(dtype).max  # the largest finite value is not an overflow
    gs[1][3] = np.finfo(dtype).tiny / 4  # nor is a subnormal
    if where is not None:
        i, j, v = where
        gs[i][j % gs[i].size] = v
    return gs


CASES = [None] + [(i, j, v) for i, j in ((0, 0), (2, 32), (4, OPTIM_CHUNK + 2), (5, -1),
                                         (5, 200_000)) for v in BAD]


@pytest.mark.parametrize("layout", ["separate", "one_buffer"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("where", CASES, ids=[str(c) for c in CASES])
def test_non_finite_check(dev, dtype, layout, where):
    if layout == "one_buffer" and not dev.supports_views:
        pytest.skip(f"{dev.name} binds whole buffers only (no views into one base buffer)")
    rng = np.random.default_rng(len(str(where)))
    gs = _grads(rng, dtype, where)
    want = not all(np.isfinite(g).all() for g in gs)
    state = optim.amp_state(dev, 1024.0)
    ts = [pm.tensor(g, dev) for g in gs] if layout == "separate" else _views(dev, gs, dtype)
    tables: dict = {}
    launches = optim.amp_non_finite_check_([None] + ts, state, tables=tables)
    assert launches == (1 + len(SIZES) if layout == "separate" else 2)
    a = state.numpy()
    assert a[2] == (1.0 if want else 0.0), f"found_inf {a[2]}, want {want}"
    np.testing.assert_array_equal(a[[0, 1, 3]], np.float32([1024.0, 1 / 1024.0, 0.0]))


def test_check_reset_and_accumulate(dev):
    state = optim.amp_state(dev)
    bad, good = pm.tensor(np.float32([1, np.nan]), dev), pm.tensor(np.ones(5, np.float32), dev)
    optim.amp_non_finite_check_([bad], state)
    assert state.numpy()[2] == 1.0
    optim.amp_non_finite_check_([good], state, reset=False)  # torch's found_inf accumulates
    assert state.numpy()[2] == 1.0
    optim.amp_non_finite_check_([good], state)
    assert state.numpy()[2] == 0.0


@pytest.mark.parametrize("n,base", [(1, 1.0), (33, 1 / 33), (1000, 0.25)])
def test_scaled_fill(dev, n, base):
    state = optim.amp_state(dev, 3.0 * 2**10)
    out = pm.tensor(np.full(n, -7.0, np.float32), dev)
    optim.amp_scaled_fill(out, state, base)
    np.testing.assert_allclose(out.numpy(), np.full(n, np.float32(base) * np.float32(3072.0)),
                               rtol=1e-7)


def _update_ref(scale, tracker, found, growth, backoff, interval):
    """torch._amp_update_scale_ in float32."""
    if found:
        return np.float32(scale * np.float32(backoff)), 0
    tracker += 1
    if tracker >= interval:
        grown = np.float32(scale * np.float32(growth))
        return (grown if np.isfinite(grown) else scale), 0
    return scale, tracker


@pytest.mark.parametrize("growth,backoff,interval", [(2.0, 0.5, 3), (1.5, 0.25, 1),
                                                     (2.0, 0.5, 2000)])
def test_update_scale(dev, growth, backoff, interval):
    rng = np.random.default_rng(interval)
    flags = rng.random(40) < 0.15
    flags[[5, 20]] = True
    state = optim.amp_state(dev, 2.0**16)
    bad, good = pm.tensor(np.float32([np.inf]), dev), pm.tensor(np.float32([1.0]), dev)
    scale, tracker = np.float32(2.0**16), 0
    for step, f in enumerate(flags):
        optim.amp_non_finite_check_([bad if f else good], state)
        optim.amp_update_scale_(state, growth, backoff, interval)
        scale, tracker = _update_ref(scale, tracker, f, growth, backoff, interval)
        a = state.numpy()
        assert (a[0], a[3]) == (scale, tracker), f"step {step}: {a} vs {scale}, {tracker}"
        assert a[1] == np.float32(1.0) / scale
    if interval < 40:
        assert scale != np.float32(2.0**16 * backoff ** flags.sum())  # growth happened


def test_update_keeps_a_scale_that_would_overflow(dev):
    big = float(np.finfo(np.float32).max) / 1.5
    state = optim.amp_state(dev, big)
    optim.amp_non_finite_check_([pm.tensor(np.ones(3, np.float32), dev)], state)
    optim.amp_update_scale_(state, 2.0, 0.5, 1)
    assert state.numpy()[0] == np.float32(big) and state.numpy()[3] == 0


def test_optimizer_unscales_and_skips(dev):
    """SGD(lr=1) with `amp` = the state: p -= g / scale on a clean step, p untouched (and the
    step count too) after an overflow."""
    p0 = np.linspace(-1, 1, 37).astype(np.float32)
    g = np.random.default_rng(0).standard_normal(37).astype(np.float32)
    p = pm.tensor(p0, dev)
    opt = optim.SGD([p], lr=1.0)
    state = optim.amp_state(dev, 512.0)
    opt.amp = state.buffer
    scaled = pm.tensor(g * 512.0, dev)
    optim.amp_non_finite_check_([scaled], state)
    opt.step([scaled])
    np.testing.assert_allclose(p.numpy(), p0 - g, rtol=1e-6, atol=1e-6)
    nan = pm.tensor(np.where(np.arange(37) == 36, np.nan, g * 512.0).astype(np.float32), dev)
    optim.amp_non_finite_check_([nan], state)
    opt.step([nan])
    np.testing.assert_allclose(p.numpy(), p0 - g, rtol=1e-6, atol=1e-6)


def test_bad_arguments(dev, no_dispatch):
    state = optim.amp_state(dev)
    with no_dispatch(dev):
        with pytest.raises(ValueError, match="state"):
            optim.amp_update_scale_(pm.tensor(np.ones(3, np.float32), dev))
        with pytest.raises(ValueError, match="growth_interval"):
            optim.amp_update_scale_(state, 2.0, 0.5, 0)
        with pytest.raises(ValueError, match="backoff_factor"):
            optim.amp_update_scale_(state, 2.0, -1.0, 10)
        with pytest.raises(ValueError, match=r"grads\[1\]"):
            optim.amp_non_finite_check_([pm.tensor(np.ones(2, np.float32), dev),
                                         pm.tensor(np.ones(2, np.int32), dev)], state)
        with pytest.raises(ValueError, match="out"):
            optim.amp_scaled_fill(pm.tensor(np.ones(2, np.float16), dev), state, 1.0)
        with pytest.raises(ValueError, match="init_scale"):
            optim.amp_state(dev, float("inf"))
