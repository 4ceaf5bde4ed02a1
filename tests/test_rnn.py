"""Recurrent layers (pymetalnn/ops/rnn.py, kernels/rnn.metal): LSTM, GRU, RNN tanh / relu, forward
(training and inference) and backward through time, float32 and float16, against the float64
numpy reference in tests/reference/rnn.py; the reference's backward against finite differences;
PyTorch's nn.LSTM / GRU / RNN (weights copied in by name) as a second opinion when it imports.

Shapes are the awkward ones: T = 1, batch 1, hidden 1, 31 / 32 / 33 input features, hidden 33
(N*H not a multiple of a SIMD-group), 2 layers, bidirectional, no bias, with and without initial
states, list-of-steps input, missing output gradients.
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest
from reference import rnn as ref
from reference._common import numeric_grad

import pymetalnn
from pymetalnn.ops import rnn as R

CELLS = ["lstm", "gru", "rnn_tanh", "rnn_relu"]


@pytest.fixture
def dev(dev):
    """The backend's device; the recurrent layers need buffer views (the per-step gemm operands
    are views into the sequences), so backends that bind whole buffers (metal) skip here and
    test_whole_buffer_backends_refuse checks that they refuse."""
    if not dev.supports_views:
        pytest.skip(f"the recurrent layers need buffer views, which {dev.name} lacks")
    return dev


def test_whole_buffer_backends_refuse(backend, no_dispatch):
    d = pymetalnn.device(backend)
    if d.supports_views:
        pytest.skip(f"{backend} has buffer views")
    x = pymetalnn.tensor(np.zeros((2, 1, 3), np.float32), d)
    w = {"weight_ih_l0": pymetalnn.tensor(np.zeros((4, 3), np.float32), d),
         "weight_hh_l0": pymetalnn.tensor(np.zeros((4, 4), np.float32), d)}
    with no_dispatch(d), pytest.raises(NotImplementedError, match="buffer views"):
        R.rnn(x, w, None, 1, "tanh", False, False, False)


# (T, N, F, H, layers, bidirectional, bias, initial states, list input, which gradients given)
CASES = {
    "T1-N1-H1": (1, 1, 4, 1, 1, False, True, True, False, "all"),
    "F31-noh0": (3, 2, 31, 5, 1, False, True, False, False, "all"),
    "F32-list": (4, 3, 32, 8, 1, False, True, True, True, "all"),
    "F33-2layers-bi": (3, 2, 33, 6, 2, True, True, True, False, "all"),
    "H33-bi-only-h_n-grad": (2, 2, 5, 33, 1, True, True, True, False, "h_n"),
    "T1-bi-nobias-only-y-grad": (1, 2, 3, 4, 1, True, False, False, False, "y"),
    "2layers-noh0": (5, 1, 7, 3, 2, False, True, False, False, "all"),
}


def _run(dev, mode, x, w, h0, c0, layers, bias, bi, training=True):
    """pymetalnn forward: (output, h_n, c_n or None, workspace)."""
    if mode == "lstm":
        y, (hn, cn), ws = R.lstm(x, w, (h0, c0), layers, bias, bi, training)
        return y, hn, cn, ws
    if mode == "gru":
        y, hn, ws = R.gru(x, w, h0, layers, bias, bi, training)
    else:
        y, hn, ws = R.rnn(x, w, h0, layers, mode[4:], bias, bi, training)
    return y, hn, None, ws


def _run_backward(mode, dy, dhn, dcn, ws):
    """pymetalnn backward: (grad_input, grad_h0, grad_c0 or None, grad_weights)."""
    if mode == "lstm":
        gx, (gh0, gc0), gw = R.lstm_backward(dy, dhn, dcn, ws)
        return gx, gh0, gc0, gw
    fn = R.gru_backward if mode == "gru" else R.rnn_backward
    gx, gh0, gw = fn(dy, dhn, ws)
    return gx, gh0, None, gw


def _close(got, want, dtype, what):
    """Max error against the float64 reference, relative to the reference's largest magnitude
    (at least 1). float16 stores every intermediate (projections, gates, h, dG) at 2^-11
    relative and the errors compound over steps and layers: ~1.2e-3 measured, 6e-3 allowed."""
    got = np.asarray(got, np.float64)
    assert got.shape == np.shape(want), f"{what}: shape {got.shape}, expected {np.shape(want)}"
    scale = max(1.0, float(np.abs(want).max()))
    tol = (2e-5 if dtype == np.float32 else 6e-3) * scale
    err = float(np.abs(got - want).max())
    assert err <= tol, f"{what}: max error {err:.3g} > {tol:.3g}"


def _data(rng, mode, T, N, F, H, L, bi, bias, states, dtype):
    D = 2 if bi else 1
    w = {k: v.astype(dtype) for k, v in ref.random_weights(rng, mode, F, H, L, bias, bi).items()}
    x = rng.standard_normal((T, N, F)).astype(dtype)
    h0 = rng.standard_normal((L * D, N, H)).astype(dtype) if states else None
    c0 = rng.standard_normal((L * D, N, H)).astype(dtype) if states and mode == "lstm" else None
    return w, x, h0, c0


# float16 also through the simdgroup-matrix GEMMs (the projections of every cell), on any device
DTYPES = [pytest.param(np.float32, False, id="float32"), pytest.param(np.float16, False, id="float16"),
          pytest.param(np.float16, True, id="float16-matrix")]


@pytest.mark.parametrize("dtype,matrix", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", CELLS)
def test_forward_backward_vs_reference(dev, monkeypatch, mode, case, dtype, matrix):
    if matrix:
        monkeypatch.setattr(dev, "simdgroup_matrix", True, raising=False)
    T, N, F, H, L, bi, bias, states, as_list, grads = CASES[case]
    D = 2 if bi else 1
    rng = np.random.default_rng(zlib.crc32(f"{mode}-{case}".encode()))
    w, x, h0, c0 = _data(rng, mode, T, N, F, H, L, bi, bias, states, dtype)
    wt = {k: pymetalnn.tensor(v, dev) for k, v in w.items()}
    xt = [pymetalnn.tensor(s, dev) for s in x] if as_list else pymetalnn.tensor(x, dev)
    y, hn, cn, ws = _run(dev, mode, xt, wt, h0, c0, L, bias, bi)
    ry, rhn, rcn, cache = ref.forward(mode, x, w, h0, c0, L, bias, bi)
    if as_list:
        assert isinstance(y, list) and len(y) == T
        y = np.stack([s.numpy() for s in y])
    assert hn.dtype == dtype
    _close(y, ry, dtype, "output")
    _close(hn, rhn, dtype, "h_n")
    if mode == "lstm":
        _close(cn, rcn, dtype, "c_n")

    dy = rng.standard_normal((T, N, D * H)).astype(dtype) if grads in ("all", "y") else None
    dhn = rng.standard_normal((L * D, N, H)).astype(dtype) if grads in ("all", "h_n") else None
    dcn = dhn[::-1].copy() if mode == "lstm" and dhn is not None else None
    gy = [pymetalnn.tensor(s, dev) for s in dy] if as_list and dy is not None else dy
    gx, gh0, gc0, gw = _run_backward(mode, gy, dhn, dcn, ws)
    rdx, rdh0, rdc0, rdw = ref.backward(dy, dhn, dcn, cache)
    if as_list:
        assert isinstance(gx, list) and len(gx) == T
        gx = np.stack([s.numpy() for s in gx])
    _close(gx, rdx, dtype, "grad_input")
    if states:
        _close(gh0, rdh0, dtype, "grad_h0")
        if mode == "lstm":
            _close(gc0, rdc0, dtype, "grad_c0")
    else:
        assert gh0 is None and gc0 is None
    assert list(gw) == ref.names(L, bias, bi)
    for k in gw:
        _close(gw[k], rdw[k], dtype, f"grad {k}")


@pytest.mark.parametrize("mode", CELLS)
def test_inference_keeps_nothing(dev, mode):
    """training=False: same outputs as the reference, no workspace."""
    rng = np.random.default_rng(7)
    T, N, F, H, L = 4, 3, 6, 5, 2
    w, x, h0, c0 = _data(rng, mode, T, N, F, H, L, True, True, True, np.float32)
    y, hn, cn, ws = _run(dev, mode, pymetalnn.tensor(x, dev), w, h0, c0, L, True, True,
                         training=False)
    assert ws is None
    ry, rhn, rcn, _ = ref.forward(mode, x, w, h0, c0, L, True, True)
    _close(y, ry, np.float32, "output")
    _close(hn, rhn, np.float32, "h_n")
    if mode == "lstm":
        _close(cn, rcn, np.float32, "c_n")


def test_lstm_half_cell_state_accumulates_in_float(dev):
    """f ~ 1 and i * g ~ 0.01: c grows by 0.01 for 100 steps. Half storage of c between steps
    would lose up to half an ulp (2^-11 near 1) per step; the float state keeps c_n within one
    final rounding of the reference."""
    T, H = 100, 4
    w = {"weight_ih_l0": np.zeros((4 * H, 1)), "weight_hh_l0": np.zeros((4 * H, H)),
         "bias_ih_l0": np.concatenate([np.full(H, 8.0), np.full(H, 12.0),
                                       np.full(H, 0.0100), np.full(H, -8.0)]),
         "bias_hh_l0": np.zeros(4 * H)}
    w = {k: v.astype(np.float16) for k, v in w.items()}
    x = np.zeros((T, 1, 1), np.float16)
    _, _, cn, _ = _run(dev, "lstm", pymetalnn.tensor(x, dev), w, None, None, 1, True, False,
                       training=False)
    _, _, rcn, _ = ref.forward("lstm", x, w)
    assert abs(float(rcn.max()) - 1.0) < 0.01  # the setup does what the docstring says
    np.testing.assert_allclose(np.asarray(cn, np.float64), rcn, rtol=0, atol=1e-3)


def test_captured_training_step_replays_on_new_input(dev):
    """A training step (forward + backward) captured with dev.capture() after a warm-up call of
    the same shapes, replayed after writing new values into the input's buffer, gives the
    reference's results for the new values: the scratch buffers the step uses stay live. T = 5
    is long enough that the per-step gemms would be replayed from their own captures, which
    must give way to the enclosing capture."""
    rng = np.random.default_rng(13)
    T, N, F, H, L = 5, 2, 4, 3, 2
    w, x1, h0, c0 = _data(rng, "lstm", T, N, F, H, L, True, True, True, np.float32)
    dy = rng.standard_normal((T, N, 2 * H)).astype(np.float32)
    wt = {k: pymetalnn.tensor(v, dev) for k, v in w.items()}
    xt, h0t, c0t, dyt = (pymetalnn.tensor(a, dev) for a in (x1, h0, c0, dy))

    def step():
        y, (hn, _), ws = R.lstm(xt, wt, (h0t, c0t), L, True, True)
        gx, (gh0, _), gw = R.lstm_backward(dyt, None, None, ws)
        return y, hn, gx, gh0, gw

    step()
    dev.synchronize()
    with dev.capture() as rec:
        y, hn, gx, gh0, gw = step()
    x2 = rng.standard_normal((T, N, F)).astype(np.float32)
    xt.buffer.write(x2)
    rec.replay()
    ry, rhn, _, cache = ref.forward("lstm", x2, w, h0, c0, L, True, True)
    rdx, rdh0, _, rdw = ref.backward(dy, None, None, cache)
    _close(y, ry, np.float32, "output")
    _close(hn, rhn, np.float32, "h_n")
    _close(gx, rdx, np.float32, "grad_input")
    _close(gh0, rdh0, np.float32, "grad_h0")
    for k in gw:
        _close(gw[k], rdw[k], np.float32, f"grad {k}")


@pytest.mark.parametrize("mode", CELLS)
def test_reference_backward_vs_finite_differences(mode):
    """tests/reference/rnn.py's backward through time against central differences of its
    forward in float64: every input, initial state and weight, 2 layers, bidirectional."""
    rng = np.random.default_rng(11)
    T, N, F, H, L = 3, 2, 3, 2, 2
    w, x, h0, c0 = _data(rng, mode, T, N, F, H, L, True, True, True, np.float64)
    ry, rhn, rcn, cache = ref.forward(mode, x, w, h0, c0, L, True, True)
    wy, wh = rng.standard_normal(ry.shape), rng.standard_normal(rhn.shape)
    wc = rng.standard_normal(rhn.shape) if mode == "lstm" else None

    def loss():
        y, hn, cn, _ = ref.forward(mode, x, w, h0, c0, L, True, True)
        return (y * wy).sum() + (hn * wh).sum() + ((cn * wc).sum() if wc is not None else 0.0)

    dx, dh0, dc0, dw = ref.backward(wy, wh, wc, cache)
    checks = [("x", x, dx), ("h0", h0, dh0)] + ([("c0", c0, dc0)] if mode == "lstm" else [])
    checks += [(k, w[k], dw[k]) for k in w]
    eps = 1e-6
    for name, arr, grad in checks:
        fd = numeric_grad(loss, arr, eps)
        np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-8, err_msg=name)


@pytest.mark.parametrize("mode", CELLS)
def test_matches_torch(dev, mode):
    """Weights copied from torch.nn.LSTM / GRU / RNN by name give its outputs and, through
    autograd, its gradients for the input, the initial states and every parameter."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(3)
    T, N, F, H, L = 4, 3, 5, 6, 2
    kw = {"num_layers": L, "bidirectional": True}
    if mode == "lstm":
        m = torch.nn.LSTM(F, H, **kw)
    elif mode == "gru":
        m = torch.nn.GRU(F, H, **kw)
    else:
        m = torch.nn.RNN(F, H, nonlinearity=mode[4:], **kw)
    assert R.rnn_weight_names(L, True, True) == list(m._flat_weights_names)
    x = torch.randn(T, N, F, requires_grad=True)
    h0 = torch.randn(2 * L, N, H, requires_grad=True)
    c0 = torch.randn(2 * L, N, H, requires_grad=True)
    out = m(x, (h0, c0)) if mode == "lstm" else m(x, h0)
    y, hx = out
    hn, cn = hx if mode == "lstm" else (hx, None)
    wy, wh, wc = torch.randn(y.shape), torch.randn(hn.shape), torch.randn(hn.shape)
    loss = (y * wy).sum() + (hn * wh).sum() + ((cn * wc).sum() if cn is not None else 0.0)
    loss.backward()

    # three ways in: a list in torch's parameter order, the module itself, its state_dict
    if mode == "lstm":
        weights = [p.detach().numpy() for p in m.parameters()]
    elif mode == "gru":
        weights = m
    else:
        weights = R.rnn_weights(m.state_dict(), dev)
    xn, h0n = x.detach().numpy(), h0.detach().numpy()
    c0n = c0.detach().numpy() if mode == "lstm" else None
    gy, ghn, gcn, ws = _run(dev, mode, pymetalnn.tensor(xn, dev), weights, h0n, c0n, L, True,
                            True)
    _close(gy, y.detach().numpy(), np.float32, "output")
    _close(ghn, hn.detach().numpy(), np.float32, "h_n")
    if mode == "lstm":
        _close(gcn, cn.detach().numpy(), np.float32, "c_n")
    gx, gh0, gc0, gw = _run_backward(mode, wy.numpy(), wh.numpy(),
                                     wc.numpy() if mode == "lstm" else None, ws)
    _close(gx, x.grad.numpy(), np.float32, "grad_input")
    _close(gh0, h0.grad.numpy(), np.float32, "grad_h0")
    if mode == "lstm":
        _close(gc0, c0.grad.numpy(), np.float32, "grad_c0")
    for name, p in m.named_parameters():
        _close(gw[name], p.grad.numpy(), np.float32, f"grad {name}")
    # and back: our gradients load into the module by name (strict: names and shapes match)
    m.load_state_dict({k: torch.from_numpy(v) for k, v in R.rnn_state_dict(gw).items()})
    for name, p in m.named_parameters():
        np.testing.assert_array_equal(p.detach().numpy(), np.asarray(gw[name]))


def _lstm_args(dev, T=3, N=2, F=4, H=3, L=1, bi=False):
    rng = np.random.default_rng(5)
    w, x, h0, c0 = _data(rng, "lstm", T, N, F, H, L, bi, True, True, np.float32)
    return pymetalnn.tensor(x, dev), w, h0, c0


def _bad(dev, match, fn, *args, **kw):
    before = sum(dev.dispatch_counts.values())
    with pytest.raises(ValueError, match=match):
        fn(*args, **kw)
    assert sum(dev.dispatch_counts.values()) == before, "dispatched before raising"


def test_bad_input_raises_before_dispatch(dev):
    x, w, h0, c0 = _lstm_args(dev)
    f32 = np.float32
    # sequence length 0, as a tensor and as a list
    _bad(dev, "input: sequence length 0", R.lstm, np.zeros((0, 2, 4), f32), w)
    _bad(dev, "input: sequence length 0", R.lstm, [], w)
    _bad(dev, r"input\[1\]", R.lstm, [np.zeros((2, 4), f32), np.zeros((3, 4), f32)], w)
    _bad(dev, "input: expected 3 dimensions", R.lstm, np.zeros((2, 4), f32), w)
    # mismatched hidden sizes: initial states, and between the weights
    _bad(dev, r"hx\[0\]: shape", R.lstm, x, w, (np.zeros((1, 2, 4), f32), c0))
    _bad(dev, r"hx\[1\]: shape", R.lstm, x, w, (h0, np.zeros((1, 2, 2), f32)))
    _bad(dev, "hx: shape", R.gru, x, {k: v[: 3 * 3] for k, v in w.items()},
         np.zeros((1, 2, 5), f32))
    w2 = ref.random_weights(np.random.default_rng(0), "lstm", 4, 3, 2, True, False)
    w2["weight_hh_l1"] = np.zeros((16, 4))
    _bad(dev, r"weights\['weight_hh_l1'\].*hidden size mismatch", R.lstm, x, w2, None, 2)
    # wrong weight shapes, names, counts
    _bad(dev, r"weights\['weight_ih_l0'\]: shape \(12, 5\)", R.lstm, x,
         dict(w, weight_ih_l0=np.zeros((12, 5))))
    _bad(dev, r"weights\['bias_hh_l0'\]", R.lstm, x, dict(w, bias_hh_l0=np.zeros(11)))
    _bad(dev, r"weights\['weight_ih_l0'\]", R.gru, x, w)  # LSTM weights (4H rows) for a GRU
    _bad(dev, "weights: missing weight_ih_l0_reverse", R.lstm, x, w, None, 1, True, True)
    _bad(dev, "weights: unexpected bias_ih_l0", R.lstm, x, w, None, 1, False)
    _bad(dev, "weights: expected 4 tensors", R.lstm, x, list(w.values())[:3])
    _bad(dev, r"weights\['weight_ih_l0'\]: dtype", R.lstm, x,
         {k: pymetalnn.tensor(v.astype(np.float16), dev) for k, v in w.items()})
    # options
    _bad(dev, "num_layers", R.lstm, x, w, None, 0)
    _bad(dev, "nonlinearity", R.rnn, x, w, None, 1, "sigmoid")
    _bad(dev, "hx: expected", R.lstm, x, w, h0)
    _bad(dev, "training", R.lstm, x, w, None, 1, True, False, "yes")


def test_bad_backward_input_raises_before_dispatch(dev):
    x, w, h0, c0 = _lstm_args(dev)
    y, (hn, cn), ws = R.lstm(x, w, (h0, c0))
    _, _, gws = R.gru(x, {k: v[:9] for k, v in w.items()}, None)
    _, _, infer = R.lstm(x, w, (h0, c0), training=False)
    dev.synchronize()
    g = np.ones((3, 2, 3), np.float32)
    _bad(dev, "workspace: expected", R.lstm_backward, g, None, None, infer)
    _bad(dev, "workspace: it comes from a gru", R.lstm_backward, g, None, None, gws)
    _bad(dev, "workspace: it comes from a lstm", R.rnn_backward, g, None, ws)
    _bad(dev, "grad_output: shape", R.lstm_backward, np.ones((3, 2, 4), np.float32), None,
         None, ws)
    _bad(dev, "grad_h_n: shape", R.lstm_backward, g, np.ones((2, 2, 3), np.float32), None, ws)
    _bad(dev, "grad_c_n: shape", R.lstm_backward, g, None, np.ones((1, 2, 4), np.float32), ws)
    _bad(dev, "grad_output: dtype", R.lstm_backward, pymetalnn.tensor(g.astype(np.float16), dev),
         None, None, ws)
    _bad(dev, "grad_output: sequence length 0", R.lstm_backward, [], None, None, ws)


# ---- the fp32 accuracy budget (pymetalnn/accuracy.py, docs/accuracy.md) ------------------------
# benchmarks/bench_rnn.py's LSTM cases, scaled for cpu: "lstm-512" (T300, N64, F512, H512) keeps
# its sequence length (the recurrence depth) and its weight gradients' reduction over T*N = 19200
# with F = H = 32; "activity-h64" (T20, N32, F64, H64) runs as benchmarked.
BUDGET_CASES = {"lstm-512": (300, 64, 32, 32), "activity-h64": (20, 32, 64, 64)}


@pytest.mark.parametrize("case", list(BUDGET_CASES))
def test_lstm_fp32_budget(dev, case):
    """float32 LSTM forward (output, h_n, c_n) and backward through time (input, initial-state
    and weight gradients) against float64: each within the ceiling (its gemm + cell kernels are
    its only algorithm)."""
    from pymetalnn import accuracy

    T, N, F, H = BUDGET_CASES[case]
    rng = np.random.default_rng(zlib.crc32(case.encode()))
    w, x, h0, c0 = _data(rng, "lstm", T, N, F, H, 1, False, True, True, np.float32)
    y, hn, cn, ws = _run(dev, "lstm", pymetalnn.tensor(x, dev),
                         {k: pymetalnn.tensor(v, dev) for k, v in w.items()}, h0, c0, 1, True,
                         False)
    ry, rhn, rcn, cache = ref.forward("lstm", x, w, h0, c0, 1, True, False)
    dy = rng.standard_normal((T, N, H)).astype(np.float32)
    dhn = rng.standard_normal((1, N, H)).astype(np.float32)
    gx, gh0, gc0, gw = _run_backward("lstm", dy, dhn, dhn.copy(), ws)
    rdx, rdh0, rdc0, rdw = ref.backward(dy, dhn, dhn.copy(), cache)
    got = {"output": y, "h_n": hn, "c_n": cn, "grad_input": gx, "grad_h0": gh0, "grad_c0": gc0,
           **{f"grad {k}": v for k, v in gw.items()}}
    want = {"output": ry, "h_n": rhn, "c_n": rcn, "grad_input": rdx, "grad_h0": rdh0,
            "grad_c0": rdc0, **{f"grad {k}": v for k, v in rdw.items()}}
    errs = {k: accuracy.rel_err(np.asarray(got[k].numpy() if hasattr(got[k], "numpy") else got[k]),
                                want[k]) for k in want}
    print(case, {k: f"{e:.2g}" for k, e in errs.items()})
    over = {k: e for k, e in errs.items() if not accuracy.within(e)}
    assert not over, f"over the {accuracy.CEILING} ceiling: {over}"
