"""Arithmetic family (kernels/arith.metal): add/sub/mul/div with broadcasting, sum/mean, and their
gradients, against the float64 references in tests/reference/arith.py on every backend.

Tolerances: float32 results are compared with rtol 1e-5 (one float rounding per op plus float
accumulation); float16 with 2e-3 (the kernels compute in float and round once to half, half's
epsilon is 9.8e-4), both against a reference computed from the same (rounded) inputs.
"""
from __future__ import annotations

import numpy as np
import pytest
from reference import arith as ref

import pymetalnn as pm
from pymetalnn import functional as F

DTYPES = [np.float32, np.float16]
OPS = ["add", "sub", "mul", "div"]

# (a, b): scalars, 1, 31/32/33, batch 1, size-1 dims in every position, 5-d and 6-d operands,
# inner dims that are and are not multiples of 4 (vector and scalar kernel paths)
SHAPES = [
    ((1,), (1,)),
    ((33,), (33,)),
    ((32,), ()),
    ((), (31,)),
    ((1, 3, 5, 7), (1, 3, 1, 1)),
    ((2, 33, 1, 1), (2, 33, 3, 4)),
    ((5, 1, 7), (1, 4, 1)),
    ((4, 1), (3,)),
    ((2, 3, 8), (3, 1)),
    ((2, 3, 8), (8,)),
    ((1, 32, 4), (1, 1, 4)),
    ((2, 1, 3, 1, 5), (1, 4, 1, 2, 1)),
    ((2, 3, 2, 1, 2, 3), (3,)),
    # per-channel operands (arith_chan: [N, C, HW] with HW >= a 16-byte chunk, chunks that
    # straddle planes, a scalar tail; HW = 7 is below half's chunk: the general kernel there)
    ((4, 5, 7, 9), (1, 5, 1, 1)),
    ((3, 1, 1), (2, 3, 8, 8)),
    ((2, 4, 7), (4, 1)),
    ((3, 6, 5, 5), (6, 1, 1)),
]


def rnd(shape: tuple, dtype, seed: int, positive: bool = False) -> np.ndarray:
    r = np.random.default_rng(seed)
    x = r.standard_normal(shape)
    if positive:  # divisors: keep away from 0 so that fp16 quotients stay well conditioned
        x = np.sign(x + 1e-9) * (0.5 + np.abs(x))
    return np.asarray(x).astype(dtype)


def dt(x: np.ndarray, dev) -> pm.Tensor:
    """x on the device with its exact shape (pm.tensor turns a 0-d array into shape (1,))."""
    return pm.tensor(x, dev).reshape(x.shape)


def tol(dtype) -> dict:
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == np.float32 else {"rtol": 2e-3, "atol": 2e-3}


def check(got, want: np.ndarray, dtype, scale: float = 1.0) -> None:
    got = np.asarray(got)
    assert got.dtype == np.dtype(dtype), (got.dtype, dtype)
    assert got.shape == want.shape, (got.shape, want.shape)
    t = tol(dtype)
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=t["rtol"], atol=t["atol"] * scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f16"])
@pytest.mark.parametrize("shapes", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_binary_forward(dev, shapes, dtype) -> None:
    sa, sb = shapes
    a, b = rnd(sa, dtype, 1), rnd(sb, dtype, 2, positive=True)
    ta, tb = dt(a, dev), dt(b, dev)
    for op in OPS:
        got = getattr(F, op)(ta, tb)
        check(got, ref.binary(op, a, b), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f16"])
@pytest.mark.parametrize("shapes", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_binary_backward(dev, shapes, dtype) -> None:
    sa, sb = shapes
    a, b = rnd(sa, dtype, 3), rnd(sb, dtype, 4, positive=True)
    out_shape = ref.broadcast_shape(sa, sb)
    g = rnd(out_shape, dtype, 5)
    ta, tb, tg = dt(a, dev), dt(b, dev), dt(g, dev)
    for op in OPS:
        ga, gb = getattr(F, f"{op}_backward")(tg, ta, tb)
        ra, rb = ref.binary_backward(op, g, a, b)
        # a sum of k terms: allow its absolute error to grow with the terms' magnitude
        k = max(1, int(np.prod(out_shape)) // max(1, a.size))
        check(ga, ra, dtype, scale=np.sqrt(k) * max(1.0, np.abs(ra).max()))
        k = max(1, int(np.prod(out_shape)) // max(1, b.size))
        check(gb, rb, dtype, scale=np.sqrt(k) * max(1.0, np.abs(rb).max()))


# same-shape operands take the flat kernels (arith_flat, arith_bwd: kernels/stream.h, 256-thread
# groups of 2 chunks of 4 float / 8 half): sizes around whole groups and with tails of 1 to W - 1
FLAT_SIZES = [15, 16, 17, 2047, 2048, 2049, 3 * 4096 + 5]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f16"])
@pytest.mark.parametrize("n", FLAT_SIZES)
def test_flat_sizes(dev, n, dtype) -> None:
    a, b, g = rnd((n,), dtype, 11), rnd((n,), dtype, 12, positive=True), rnd((n,), dtype, 13)
    ta, tb, tg = dt(a, dev), dt(b, dev), dt(g, dev)
    for op in OPS:
        check(getattr(F, op)(ta, tb), ref.binary(op, a, b), dtype)
        ga, gb = getattr(F, f"{op}_backward")(tg, ta, tb)
        ra, rb = ref.binary_backward(op, g, a, b)
        check(ga, ra, dtype, scale=max(1.0, np.abs(ra).max()))
        check(gb, rb, dtype, scale=max(1.0, np.abs(rb).max()))
    check(F.mul(ta, -3.0), a.astype(np.float64) * -3.0, dtype)
    check(F.sub(1, ta), 1 - a.astype(np.float64), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f16"])
@pytest.mark.parametrize("lead", [1, 2, 4, 8])
def test_flat_view_offsets(dev, lead, dtype) -> None:
    """Operands that are views `lead` elements into their buffers: 16-byte aligned ones take the
    vector chunks, the others the scalar tail path; same results either way."""
    if not dev.supports_views:
        pytest.skip(f"{dev.name} binds whole buffers only")
    n = 2 * 4096 + 21
    a, b, g = rnd((n,), dtype, 14), rnd((n,), dtype, 15, positive=True), rnd((n,), dtype, 16)
    isz = np.dtype(dtype).itemsize

    def view(x):
        buf = dev.buffer(np.concatenate([np.zeros(lead, dtype), x]))
        return pm.Tensor(buf.view(lead * isz, x.nbytes), x.shape, dtype)

    check(F.div(view(a), dt(b, dev)), ref.binary("div", a, b), dtype)
    check(F.add(view(a), 0.5), a.astype(np.float64) + 0.5, dtype)
    ga, gb = F.mul_backward(view(g), view(a), dt(b, dev))
    ra, rb = ref.binary_backward("mul", g, a, b)
    check(ga, ra, dtype, scale=max(1.0, np.abs(ra).max()))
    check(gb, rb, dtype, scale=max(1.0, np.abs(rb).max()))


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f16"])
def test_python_number_operands(dev, dtype) -> None:
    x = rnd((3, 33), dtype, 6, positive=True)
    tx = pm.tensor(x, dev)
    xs = x.astype(np.float64)
    check(F.add(tx, 2.5), xs + 2.5, dtype)
    check(F.sub(1, tx), 1 - xs, dtype)
    check(F.mul(tx, -3.0), xs * -3.0, dtype)
    check(F.div(2.0, tx), 2.0 / xs, dtype, scale=10)
    g = rnd((3, 33), dtype, 7)
    ga, gb = F.div_backward(pm.tensor(g, dev), 2.0, tx)
    assert ga is None
    check(gb, ref.binary_backward("div", g, np.full((1,), 2.0), x)[1], dtype, scale=10)
    ga, gb = F.mul_backward(pm.tensor(g, dev), tx, 0.5)
    assert gb is None
    check(ga, g.astype(np.float64) * 0.5, dtype)


def test_numpy_operands_and_zero_size(dev) -> None:
    x = rnd((2, 5), np.float32, 8)
    got = F.mul(pm.tensor(x, dev), np.arange(5, dtype=np.float32))
    check(got, ref.binary("mul", x, np.arange(5.0)), np.float32)
    empty = F.add(pm.tensor(np.zeros((0, 3), np.float32), dev), pm.tensor(np.ones(3, np.float32), dev))
    assert empty.shape == (0, 3)
    z = pm.tensor(np.zeros((0, 3), np.float32), dev)
    np.testing.assert_array_equal(F.sum(z, 0).numpy(), np.zeros(3, np.float32))
    assert np.isnan(F.mean(z, 0).numpy()).all()  # as torch: the mean of nothing is nan
    assert F.sum(z, 1).shape == (0,)


@pytest.mark.parametrize("op", OPS)
def test_reference_backward_vs_finite_differences(op) -> None:
    a, b = rnd((2, 1, 3), np.float64, 9), rnd((1, 4, 1), np.float64, 10, positive=True)
    g = rnd((2, 4, 3), np.float64, 11)
    ga, gb = ref.binary_backward(op, g, a, b)
    loss = lambda: float((ref.binary(op, a, b) * g).sum())
    np.testing.assert_allclose(ga, ref.numeric_grad(loss, a), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(gb, ref.numeric_grad(loss, b), rtol=1e-6, atol=1e-7)


def test_reference_vs_torch() -> None:
    torch = pytest.importorskip("torch")
    for (sa, sb) in SHAPES[4:8]:
        a, b = rnd(sa, np.float64, 12), rnd(sb, np.float64, 13, positive=True)
        g = rnd(ref.broadcast_shape(sa, sb), np.float64, 14)
        for op in OPS:
            ta = torch.tensor(a, requires_grad=True)
            tb = torch.tensor(b, requires_grad=True)
            out = getattr(torch, op)(ta, tb)
            out.backward(torch.tensor(g))
            np.testing.assert_allclose(ref.binary(op, a, b), out.detach().numpy(), rtol=1e-12)
            ra, rb = ref.binary_backward(op, g, a, b)
            np.testing.assert_allclose(ra, ta.grad.numpy(), rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(rb, tb.grad.numpy(), rtol=1e-10, atol=1e-12)
    x = rnd((3, 4, 5), np.float64, 15)
    for dim in [None, 1, (0, 2), -1]:
        for keepdim in (False, True):
            dims = tuple(range(3)) if dim is None else tuple(np.atleast_1d(dim) % 3)
            want = (torch.sum(torch.tensor(x)) if dim is None and not keepdim else
                    torch.sum(torch.tensor(x), dim=dims, keepdim=keepdim))
            np.testing.assert_allclose(ref.reduce_sum(x, dims, keepdim), want.numpy(), rtol=1e-12)
            tm = torch.mean(torch.tensor(x), dim=dims, keepdim=keepdim)
            np.testing.assert_allclose(ref.reduce_sum(x, dims, keepdim, mean=True), tm.numpy(),
                                       rtol=1e-12)


# sum / mean: (shape, dim) pairs that reach both reduction kernels (innermost dim kept or
# reduced), splits (long reductions with few outputs), vector loads and a 0-d tensor
SUMS = [
    ((33,), None), ((1,), 0), ((), None), ((3, 31, 5), 1), ((3, 31, 5), (0, 2)),
    ((3, 31, 5), -1), ((2, 32, 3, 3), (0, 2, 3)), ((1, 33, 7, 1), (1, 3)),
    ((3, 4100), 1), ((4100, 3), 0), ((5, 2, 7, 3, 2), (0, 2, 4)), ((45, 33, 7), None),
    # vector (4-wide) paths: kept innermost dim % 4 == 0 (outer), reduced one (inner, rows
    # shorter than a simdgroup's stride, splits)
    ((4100, 8), 0), ((5, 12), 0), ((2, 3, 32), (0, 2)), ((64, 40), None), ((5, 3, 20), (0, 2)),
    # chunked sums (sum_rows_*: rows of >= 4096 elements in whole 16-byte chunks): per channel
    # of NCHW, batch 1 ([C, HW]), a full sum, several splits with a partial last one
    ((5, 3, 50, 48), (0, 2, 3)), ((1, 6, 72, 72), (0, 2, 3)), ((3, 7, 40, 40), None),
    ((4, 2, 2, 2048), (0, 2, 3)), ((3, 4104), 1),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f16"])
@pytest.mark.parametrize("case", SUMS, ids=lambda c: f"{c[0]}-{c[1]}")
def test_sum_mean(dev, case, dtype) -> None:
    shape, dim = case
    x = rnd(shape, dtype, 16)
    tx = dt(x, dev)
    nd = max(len(shape), 1)
    dims = tuple(range(len(shape))) if dim is None else tuple(sorted(np.atleast_1d(dim) % nd))
    count = int(np.prod([shape[d] for d in dims if d < len(shape)]))
    for keepdim in (False, True):
        want = ref.reduce_sum(x, dims, keepdim)
        check(F.sum(tx, dim, keepdim), want, dtype, scale=np.sqrt(count))
        check(F.mean(tx, dim, keepdim), ref.reduce_sum(x, dims, keepdim, mean=True), dtype)
        g = rnd(want.shape, dtype, 17)
        check(F.sum_backward(dt(g, dev), tx, dim, keepdim),
              ref.reduce_sum_backward(g, shape, dims, keepdim), dtype)
        check(F.mean_backward(dt(g, dev), tx, dim, keepdim),
              ref.reduce_sum_backward(g, shape, dims, keepdim, mean=True), dtype)


def test_half_sums_accumulate_in_float(dev) -> None:
    # 2048 + 1 rounds back to 2048 in half: a half accumulator would stop at 2048
    x = np.ones((2, 4096), np.float16)
    got = F.sum(pm.tensor(x, dev), 1).numpy()
    np.testing.assert_array_equal(got, np.array([4096, 4096], np.float16))
    y = np.ones((4096, 3), np.float16)
    np.testing.assert_array_equal(F.sum(pm.tensor(y, dev), 0).numpy(), np.full(3, 4096, np.float16))
    ga, _ = F.add_backward(pm.tensor(np.ones((4096, 2), np.float16), dev),
                           pm.tensor(np.zeros((1, 2), np.float16), dev),
                           pm.tensor(np.zeros((4096, 2), np.float16), dev))
    np.testing.assert_array_equal(ga.numpy(), np.full((1, 2), 4096, np.float16))


def test_reference_sum_backward_vs_finite_differences() -> None:
    x = rnd((2, 3, 4), np.float64, 18)
    for dims, keepdim in [((1,), False), ((0, 2), True), ((0, 1, 2), False)]:
        for mean in (False, True):
            g = rnd(ref.reduce_sum(x, dims, keepdim).shape, np.float64, 19)

            def loss(dims=dims, keepdim=keepdim, mean=mean, g=g) -> float:
                return float((ref.reduce_sum(x, dims, keepdim, mean) * g).sum())

            np.testing.assert_allclose(ref.reduce_sum_backward(g, x.shape, dims, keepdim, mean),
                                       ref.numeric_grad(loss, x), rtol=1e-6, atol=1e-8)


def test_bad_input(dev) -> None:
    a = pm.tensor(np.zeros((2, 3), np.float32), dev)
    with pytest.raises(ValueError, match="a, b"):
        F.add(a, pm.tensor(np.zeros((4,), np.float32), dev))
    with pytest.raises(ValueError, match="^b: dtype"):
        F.mul(a, pm.tensor(np.zeros((3,), np.float16), dev))
    with pytest.raises(ValueError, match="^a: dtype"):
        F.sub(pm.tensor(np.zeros(3, np.int32), dev), a)
    with pytest.raises(ValueError, match="a, b: at least one"):
        F.div(1.0, 2.0)
    with pytest.raises(ValueError, match="^grad_out: shape"):
        F.add_backward(pm.tensor(np.zeros((3,), np.float32), dev), a, a)
    with pytest.raises(ValueError, match="^grad_out: dtype"):
        F.mul_backward(pm.tensor(np.zeros((2, 3), np.float16), dev), a, a)
    with pytest.raises(ValueError, match="^dim: 2 is out of range"):
        F.sum(a, 2)
    with pytest.raises(ValueError, match="^dim: -3 is out of range"):
        F.mean(a, (0, -3))
    with pytest.raises(ValueError, match="^dim: repeated"):
        F.sum(a, (1, -1))
    with pytest.raises(ValueError, match="^dim: empty"):
        F.sum(a, ())
    with pytest.raises(ValueError, match="^grad_out: shape"):
        F.sum_backward(pm.tensor(np.zeros((2, 1), np.float32), dev), a, 1, keepdim=False)
    with pytest.raises(ValueError, match="^x: dtype"):
        F.sum(pm.tensor(np.zeros(3, np.int32), dev))


@pytest.mark.parametrize("dtype", DTYPES)
def test_sum_many_splits(dev, dtype):
    """A full reduction split into more partials than the finish kernel's unrolled step (8 x 32)
    covers: the unrolled loop and its remainder, against float64."""
    x = rnd((300001,), dtype, 91)
    got = float(F.sum(dt(x, dev)).numpy())
    want = float(x.astype(np.float64).sum())
    assert abs(got - want) <= (1e-5 if dtype == np.float32 else 2e-3) * \
        np.abs(x.astype(np.float64)).sum()
    y = x[:300000].reshape(3, 100000)
    got = F.mean(dt(y, dev), 1).numpy().astype(np.float64)
    np.testing.assert_allclose(got, y.astype(np.float64).mean(1), atol=1e-3)


# (a, b): same shape (the flat kernel), a per-channel operand (the channel kernel), a general
# broadcast (the index-walking kernel)
ACT_SHAPES = [((3, 37), (3, 37)), ((2, 4, 5, 6), (1, 4, 1, 1)), ((5, 1, 7), (1, 4, 1))]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", OPS)
def test_binary_activation(dev, op, dtype):
    """activation= applies relu / leaky relu / sigmoid / tanh to the result in the same pass:
    against numpy, every kernel path."""
    fn = getattr(F, op)
    npop = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide}[op]
    acts = [("relu", lambda z: np.maximum(z, 0)), ("sigmoid", lambda z: 1 / (1 + np.exp(-z))),
            ("tanh", np.tanh),
            (("leaky_relu", {"negative_slope": 0.2}), lambda z: np.where(z > 0, z, 0.2 * z))]
    for k, (sa, sb) in enumerate(ACT_SHAPES):
        a, b = rnd(sa, dtype, 100 + k), rnd(sb, dtype, 200 + k, positive=True)
        z = npop(a.astype(np.float64), b.astype(np.float64))
        for act, act_ref in acts:
            got = fn(dt(a, dev), dt(b, dev), activation=act).numpy()
            check(got, act_ref(z), dtype, scale=max(1.0, float(np.abs(z).max())))
        check(fn(dt(a, dev), dt(b, dev), activation=None).numpy(), z, dtype,
              scale=max(1.0, float(np.abs(z).max())))
