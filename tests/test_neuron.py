"""Activations ("neurons"): every op and variant, forward and backward, float32 and float16,
against the float64 numpy references in tests/reference/neuron.py; the references' derivatives
against finite differences; PyTorch as a second opinion when it imports.

Sizes cover the kernels' two paths (16-byte chunks, 4 float or 8 half, two per thread, then a
scalar tail): 1, 7, 8, 9, 31, 32, 33 and a 4-d tensor of 990 elements; test_stream_sizes adds
sizes around whole threadgroups of chunks and views at 16-byte aligned and unaligned offsets.
Inputs include each op's kinks exactly (0, +-3, the hard_sigmoid corners) and extremes (+-1e30,
+-88.5, NaN).
"""
from __future__ import annotations

import numpy as np
import pytest
from reference import neuron as ref

import pymetalnn
from pymetalnn.ops import neuron as nn
from pymetalnn.tensor import Tensor

# (op, kwargs, kink points where the derivative jumps)
CASES = [
    ("relu", {}, [0.0]),
    ("leaky_relu", {}, [0.0]),
    ("leaky_relu", {"negative_slope": -0.3}, [0.0]),
    ("elu", {"alpha": 1.3}, [0.0]),
    ("sigmoid", {}, []),
    ("tanh", {}, []),
    ("softplus", {}, []),
    ("softplus", {"beta": 2.0, "threshold": 3.0}, [1.5]),
    ("gelu", {}, []),
    ("gelu", {"approximate": "tanh"}, []),
    ("hardsigmoid", {}, [-3.0, 3.0]),
    ("hard_sigmoid", {}, [-2.5, 2.5]),
    ("hard_sigmoid", {"a": -0.75, "b": 0.25}, [1.0 / 3.0, -1.0]),
    ("linear_neuron", {"a": 1.5, "b": -0.25}, []),
]
IDS = [f"{op}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" if kw else op for op, kw, _ in CASES]
SIZES = [(1,), (7,), (8,), (9,), (31,), (32,), (33,), (2, 33, 3, 5)]
EXTREMES = [1e30, -1e30, 1e10, -1e10, 1e4, -1e4, 100.0, -100.0, 88.5, -88.5, 20.0, -20.0, 10.0,
            -10.0, 5.0, -5.0, 0.0, -0.0, 1e-7, -1e-7, 1e-30, -1e-30, np.nan]
HALF_EXTREMES = [6e4, -6e4, 1e4, -1e4, 20.0, -20.0, 10.0, -10.0, 0.0, 1e-7, -1e-7, np.nan]


def _fns(op):
    return getattr(nn, op), getattr(nn, op + "_backward"), getattr(ref, op), \
        getattr(ref, op + "_backward")


def _inputs(rng, shape, dtype, kinks):
    x = (rng.standard_normal(shape) * 3.0).astype(dtype)
    flat = x.reshape(-1)
    specials = np.array([*kinks, 0.0], dtype)
    flat[: min(flat.size, specials.size)] = specials[: flat.size]
    g = rng.standard_normal(shape).astype(dtype)
    return x, g


def _check(got, want, dtype):
    got = np.asarray(got, np.float64)
    if dtype == np.float16:
        # one half ulp of the exactly rounded result (2^-10 relative at most), plus the float
        # arithmetic's absolute error where a result cancels to near 0
        want = np.asarray(want).astype(np.float16).astype(np.float64)
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=2e-6)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("op,kw,kinks", CASES, ids=IDS)
def test_forward_backward(dev, op, kw, kinks, dtype):
    fwd, bwd, rfwd, rbwd = _fns(op)
    rng = np.random.default_rng(len(op) + len(kw))
    for shape in SIZES:
        x, g = _inputs(rng, shape, dtype, kinks)
        xt, gt = pymetalnn.tensor(x, dev), pymetalnn.tensor(g, dev)
        y = fwd(xt, **kw)
        assert y.shape == x.shape and y.dtype == x.dtype
        _check(y.numpy(), rfwd(x, **kw), dtype)
        dx = bwd(gt, xt, **kw)
        assert dx.shape == x.shape and dx.dtype == x.dtype
        _check(dx.numpy(), rbwd(g, x, **kw), dtype)


@pytest.mark.parametrize("op,kw,kinks", CASES, ids=IDS)
def test_extremes(dev, op, kw, kinks):
    fwd, bwd, rfwd, rbwd = _fns(op)
    for dtype, vals in ((np.float32, EXTREMES), (np.float16, HALF_EXTREMES)):
        x = np.array(vals, dtype)
        g = np.linspace(-2.0, 2.0, x.size).astype(dtype)
        with np.errstate(over="ignore", invalid="ignore"):
            _check(fwd(pymetalnn.tensor(x, dev), **kw).numpy(), rfwd(x, **kw), dtype)
            _check(bwd(pymetalnn.tensor(g, dev), pymetalnn.tensor(x, dev), **kw).numpy(),
                   rbwd(g, x, **kw), dtype)


@pytest.mark.parametrize("op,kw,kinks", CASES, ids=IDS)
def test_reference_gradient_vs_finite_differences(op, kw, kinks):
    _, _, rfwd, rbwd = _fns(op)
    rng = np.random.default_rng(7)
    x = rng.uniform(-6.0, 6.0, 400)
    for k in kinks:  # the derivative jumps there: no finite difference can agree
        x = x[np.abs(x - k) > 1e-3]
    g = rng.standard_normal(x.size)
    fd = ref.finite_diff(lambda v: rfwd(v, **kw), x, g)
    np.testing.assert_allclose(rbwd(g, x, **kw), fd, rtol=1e-6, atol=1e-8)


def test_kink_conventions(dev):
    """torch's choices where the derivative jumps: relu'(0) = 0, hardsigmoid'(+-3) = 0."""
    x = pymetalnn.tensor(np.array([0.0, -3.0, 3.0, 1e-30], np.float32), dev)
    g = pymetalnn.tensor(np.ones(4, np.float32), dev)
    assert nn.relu_backward(g, x).numpy().tolist() == [0.0, 0.0, 1.0, 1.0]
    np.testing.assert_array_equal(nn.hardsigmoid_backward(g, x).numpy(),
                                  np.float32([1 / 6, 0.0, 0.0, 1 / 6]))
    np.testing.assert_array_equal(nn.leaky_relu_backward(g, x, 0.25).numpy(),
                                  np.float32([0.25, 0.25, 1.0, 1.0]))


def _torch_fn(F, op, kw):
    if op == "hard_sigmoid":
        a, b = kw.get("a", 0.2), kw.get("b", 0.5)
        return lambda t: (a * t + b).clamp(0.0, 1.0)
    if op == "linear_neuron":
        return lambda t: kw["a"] * t + kw["b"]
    return lambda t: getattr(F, op)(t, **kw)


@pytest.mark.parametrize("op,kw,kinks", CASES, ids=IDS)
def test_vs_torch(dev, op, kw, kinks):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    fwd, bwd, _, _ = _fns(op)
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.standard_normal(333) * 4.0, [-30.0, -12.0, 12.0, 30.0]]).astype(np.float32)
    x = x[np.min([np.abs(x - k) for k in [*kinks, 1e9]], axis=0) > 1e-4]  # clamp's grad at corners
    g = rng.standard_normal(x.size).astype(np.float32)
    tx = torch.tensor(x, requires_grad=True)
    ty = _torch_fn(F, op, kw)(tx)
    ty.backward(torch.tensor(g))
    np.testing.assert_allclose(fwd(pymetalnn.tensor(x, dev), **kw).numpy(), ty.detach().numpy(),
                               rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(bwd(pymetalnn.tensor(g, dev), pymetalnn.tensor(x, dev), **kw).numpy(),
                               tx.grad.numpy(), rtol=1e-5, atol=2e-6)


def test_gelu_tail_accuracy(dev):
    """The in-kernel erf: gelu(x) = x Phi(x) to a few float ulps relative, down to x = -13 where
    Phi is 1e-38 (torch's 1 + erf form loses all digits there)."""
    x = np.concatenate([np.linspace(-13.0, 13.0, 20001), -np.logspace(-30, 1, 301)]).astype(np.float32)
    got = nn.gelu(pymetalnn.tensor(x, dev)).numpy().astype(np.float64)
    want = ref.gelu(x)
    keep = np.abs(want) > 1e-36  # float normal range
    np.testing.assert_allclose(got[keep], want[keep], rtol=8 * 2.0**-24, atol=0)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_unaligned_views(dev, dtype):
    """Tensors that are views at an odd element offset (as split makes) take the scalar path."""
    if not dev.supports_views:
        pytest.skip(f"{dev.name} binds whole buffers only")
    rng = np.random.default_rng(2)
    x, g = (rng.standard_normal(37) * 3).astype(dtype), rng.standard_normal(37).astype(dtype)
    isz = np.dtype(dtype).itemsize

    def view(a):
        buf = dev.buffer(np.concatenate([np.zeros(1, dtype), a]))
        return Tensor(buf.view(isz, a.nbytes), a.shape, dtype)

    _check(nn.gelu(view(x)).numpy(), ref.gelu(x), dtype)
    _check(nn.elu_backward(view(g), view(x), 0.5).numpy(), ref.elu_backward(g, x, 0.5), dtype)
    _check(nn.relu_backward(view(g), pymetalnn.tensor(x, dev)).numpy(), ref.relu_backward(g, x), dtype)


# sizes around the stream.h boundaries (kernels/stream.h: 256-thread groups of 2 chunks of 4 float
# or 8 half elements): one chunk short of / past a whole group, a partial last group, tails of 1 to
# W - 1 elements
STREAM_SIZES = [15, 16, 17, 2047, 2048, 2049, 4096 + 8 * 256 + 13, 3 * 4096 + 5]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("n", STREAM_SIZES)
def test_stream_sizes(dev, n, dtype):
    rng = np.random.default_rng(n)
    x, g = _inputs(rng, (n,), dtype, [0.0])
    _check(nn.relu(pymetalnn.tensor(x, dev)).numpy(), ref.relu(x), dtype)
    _check(nn.linear_neuron(pymetalnn.tensor(x, dev), 1.5, -0.25).numpy(),
           ref.linear_neuron(x, 1.5, -0.25), dtype)
    _check(nn.sigmoid_backward(pymetalnn.tensor(g, dev), pymetalnn.tensor(x, dev)).numpy(),
           ref.sigmoid_backward(g, x), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("lead", [1, 2, 4, 8, 16])
def test_view_offsets(dev, dtype, lead):
    """Views at `lead` elements into a buffer: 16-byte aligned ones (4 float, 8 or 16 half) take
    the vector path, the others (8-byte aligned included) the scalar one; same results."""
    if not dev.supports_views:
        pytest.skip(f"{dev.name} binds whole buffers only")
    rng = np.random.default_rng(lead)
    n = 2 * 4096 + 21
    x, g = _inputs(rng, (n,), dtype, [0.0])
    isz = np.dtype(dtype).itemsize

    def view(a):
        buf = dev.buffer(np.concatenate([np.zeros(lead, dtype), a]))
        return Tensor(buf.view(lead * isz, a.nbytes), a.shape, dtype)

    _check(nn.tanh(view(x)).numpy(), ref.tanh(x), dtype)
    _check(nn.elu_backward(view(g), view(x), 0.5).numpy(), ref.elu_backward(g, x, 0.5), dtype)


def test_empty(dev):
    dev.reset_counts()
    x = pymetalnn.tensor(np.zeros((0, 3), np.float32), dev)
    assert nn.gelu(x).shape == (0, 3)
    assert nn.relu_backward(x, x).shape == (0, 3)
    assert sum(dev.dispatch_counts.values()) == 0


@pytest.mark.parametrize("call,arg", [
    (lambda x, g: nn.relu(pymetalnn.tensor(np.arange(4, dtype=np.int32), x.device)), "x"),
    (lambda x, g: nn.relu_backward(g.reshape(3, 2), x), "grad_out"),
    (lambda x, g: nn.sigmoid_backward(pymetalnn.tensor(np.zeros(6, np.float16), x.device), x),
     "grad_out"),
    (lambda x, g: nn.gelu(x, approximate="erf"), "approximate"),
    (lambda x, g: nn.softplus(x, beta=0.0), "beta"),
    (lambda x, g: nn.softplus_backward(g, x, threshold=float("inf")), "threshold"),
    (lambda x, g: nn.leaky_relu(x, negative_slope="0.1"), "negative_slope"),
    (lambda x, g: nn.hard_sigmoid(x, a=1e40), "a"),
    (lambda x, g: nn.linear_neuron(x, b=None), "b"),
    (lambda x, g: nn.elu(None), "x"),
])
def test_bad_input(dev, call, arg):
    x = pymetalnn.tensor(np.zeros(6, np.float32), dev)
    g = pymetalnn.tensor(np.zeros(6, np.float32), dev)
    dev.reset_counts()
    with pytest.raises(ValueError, match=f"^{arg}:"):
        call(x, g)
    assert sum(dev.dispatch_counts.values()) == 0


# ---- gradients from the output and the fused activation= values --------------------------------

FROM_OUTPUT = [("relu", {}), ("leaky_relu", {"negative_slope": 0.2}),
               ("leaky_relu", {"negative_slope": 0.0}), ("sigmoid", {}), ("tanh", {})]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("op,kw", FROM_OUTPUT, ids=[f"{o}{k}" for o, k in FROM_OUTPUT])
def test_backward_from_output(dev, op, kw, dtype):
    """<op>_backward_from_output(g, y = op(x)) == <op>_backward(g, x) (the fused ops' gradient)."""
    rng = np.random.default_rng(5)
    x, g = _inputs(rng, (2, 33, 3), dtype, [0.0, 1e-3, -1e-3])
    xt, gt = pymetalnn.tensor(x, dev), pymetalnn.tensor(g, dev)
    y = getattr(nn, op)(xt, **kw)
    got = getattr(nn, op + "_backward_from_output")(gt, y, **kw).numpy()
    # the reference from x, at the precision of y's storage (y rounds before f' is formed)
    yf = np.asarray(y.numpy(), np.float64)
    slope = kw.get("negative_slope", 0.01)
    d = {"relu": (yf > 0).astype(np.float64), "leaky_relu": np.where(yf > 0, 1.0, slope),
         "sigmoid": yf * (1 - yf), "tanh": 1 - yf * yf}[op]
    want = g.astype(np.float64) * d
    np.testing.assert_allclose(got.astype(np.float64), want,
                               rtol=1e-6 if dtype == np.float32 else 2e-3,
                               atol=1e-7 if dtype == np.float32 else 1e-4)
    # and it is the x-based gradient up to the rounding of y
    want_x = getattr(nn, op + "_backward")(gt, xt, **kw).numpy().astype(np.float64)
    np.testing.assert_allclose(got.astype(np.float64), want_x,
                               rtol=1e-5 if dtype == np.float32 else 4e-3,
                               atol=1e-6 if dtype == np.float32 else 5e-3)
    np.testing.assert_array_equal(
        nn.activation_backward_from_output(gt, y, (op, kw)).numpy(), got)


def test_activation_values():
    assert nn.activation_code(None) == (0, 0.0)
    assert nn.activation_code("relu") == (1, 0.0)
    assert nn.activation_code("leaky_relu") == (2, pytest.approx(0.01))
    assert nn.activation_code(("leaky_relu", 0.25)) == (2, 0.25)
    assert nn.activation_code(("leaky_relu", {"negative_slope": 0.5})) == (2, 0.5)
    assert nn.activation_code(("sigmoid", {})) == (3, 0.0)
    assert nn.activation_code("tanh") == (4, 0.0)
    with pytest.raises(ValueError, match="activation: expected None or one of"):
        nn.activation_code("gelu")
    with pytest.raises(ValueError, match="relu takes no parameters"):
        nn.activation_code(("relu", {"negative_slope": 0.1}))
    with pytest.raises(ValueError, match="activation: expected None, a name"):
        nn.activation_code(3)


def test_leaky_relu_from_output_needs_nonnegative_slope(dev):
    t = pymetalnn.tensor(np.ones(4, np.float32), dev)
    with pytest.raises(ValueError, match="slope >= 0"):
        nn.leaky_relu_backward_from_output(t, t, negative_slope=-0.5)


@pytest.mark.parametrize("name", ["relu", "leaky_relu", "sigmoid", "tanh"])
def test_strided_out_and_from_output(dev, name):
    """out= a view at channel c0 of a larger (poisoned) tensor with out_batch_stride= writes the
    contiguous result there and nothing else; <op>_backward_from_output(..., y_batch_stride=)
    reads such a y and equals the contiguous gradient."""
    if not dev.supports_views:
        pytest.skip("out= at an offset needs buffer views")
    rng = np.random.default_rng(2)
    n, c, ctot, c0, hw = 3, 5, 8, 2, 9
    x = pymetalnn.tensor(rng.standard_normal((n, c, 3, 3)).astype(np.float32), dev)
    g = pymetalnn.tensor(rng.standard_normal((n, c, 3, 3)).astype(np.float32), dev)
    f = getattr(nn, name)
    want = f(x)
    dest = pymetalnn.tensor(np.full((n, ctot, 3, 3), np.nan, np.float32), dev)
    view = Tensor(dest.buffer.view(c0 * hw * 4), (n, c, 3, 3), np.float32)
    y = f(x, out=view, out_batch_stride=ctot * hw)
    d = dest.numpy()
    np.testing.assert_array_equal(d[:, c0:c0 + c], want.numpy())
    assert np.isnan(np.delete(d, np.s_[c0:c0 + c], axis=1)).all()
    b = getattr(nn, f"{name}_backward_from_output")
    np.testing.assert_array_equal(b(g, y, y_batch_stride=ctot * hw).numpy(), b(g, want).numpy())
