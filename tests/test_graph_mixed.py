"""Mixed-precision training graphs (graph/mixed.py): float16 activations and math, float32 master
weights, and dynamic loss scaling on the device with torch.cuda.amp.GradScaler's rule, checked
against a reference of that rule (torch's own _amp_update_scale_ where torch is installed) and
against float32 training; a captured mixed-precision step replays like an encoded one."""
from __future__ import annotations

import numpy as np
import pytest
from graph_nets import data, lenet

from pymetalnn import graph as G
from pymetalnn import optim


class RefScaler:
    """GradScaler's update rule (torch/amp/grad_scaler.py, _amp_update_scale_), in float32."""

    def __init__(self, init_scale, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000):
        self.scale, self.tracker = np.float32(init_scale), 0
        self.g, self.b, self.n = growth_factor, backoff_factor, growth_interval

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self.scale, self.tracker = np.float32(self.scale * np.float32(self.b)), 0
            return
        self.tracker += 1
        if self.tracker == self.n:
            with np.errstate(over="ignore"):
                grown = np.float32(self.scale * np.float32(self.g))
            if np.isfinite(grown):
                self.scale = grown
            self.tracker = 0


def torch_update(scale: float, tracker: int, found_inf: bool, g: float, b: float, n: int):
    """The same step by torch's kernel (CPU), where torch is installed."""
    torch = pytest.importorskip("torch")
    s = torch.tensor([scale], dtype=torch.float32)
    t = torch.tensor([tracker], dtype=torch.int32)
    torch._amp_update_scale_(s, t, torch.tensor([float(found_inf)]), g, b, n)
    return float(s[0]), int(t[0])


def adam(p):
    return optim.Adam(p, lr=0.003)


def test_reference_scaler_matches_torch():
    """The reference rule agrees with torch's kernel over a sequence with overflows, growth and
    growth past float32's range."""
    ref = RefScaler(2.0**120, growth_factor=4.0, backoff_factor=0.25, growth_interval=2)
    s, t = float(ref.scale), 0
    for f in [True, False, False, False, False, True, False, False] + [False] * 12:
        s, t = torch_update(s, t, f, 4.0, 0.25, 2)
        ref.update(f)
        assert (s, t) == (float(ref.scale), ref.tracker)


def test_overflow_skips_backs_off_and_grows(dev):
    """A scale too large for float16 gradients (2^30): every step overflows, is skipped (weights,
    optimizer state and step counts untouched) and halves the scale, until the gradients fit;
    then clean steps update and the scale doubles after growth_interval of them, falls back at
    the next overflow, and so on, exactly as GradScaler's rule says given each step's verdict."""
    X, Y = data(n=8)
    _, loss, _ = lenet(record=False, dropout=True, bn=True)
    opts = dict(init_scale=2.0**30, growth_interval=2, growth_factor=2.0, backoff_factor=0.5)
    tg = G.TrainingGraph(loss, optimizer=adam, device=dev, precision="mixed", grad_scaler=opts)
    ref = RefScaler(**opts)
    prev = None
    skipped = clean = 0
    for _ in range(20):
        tg.step(X, Y)
        sc = tg.grad_scaler
        found = sc.found_inf
        sd = tg.training_state_dict()
        weights = {k: v for k, v in sd.items() if ".optim." in k or k.endswith(("weight", "bias"))}
        if prev is not None and found:
            for k, v in weights.items():
                np.testing.assert_array_equal(v, prev[k], err_msg=k)
        elif prev is not None:
            assert any(not np.array_equal(v, prev[k]) for k, v in weights.items())
        prev = weights
        ref.update(found)
        assert (sc.scale, sc.growth_tracker) == (float(ref.scale), ref.tracker)
        skipped += found
        clean += not found
        assert all(int(v) == clean for k, v in sd.items() if k.endswith(".optim.param0.step"))
    # 2^30 backs off to 2^16 (float16 gradients of this net fit from there), then grows
    assert skipped >= 14 and clean >= 4


def test_injected_inf_gradient(dev):
    """An inf in the loss gradient (a label weight of inf) makes every weight gradient non-finite:
    the step is skipped and the scale backs off; the next clean step trains again."""
    X = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    x = G.ImageNode((6,), name="x")
    fc = G.FullyConnectedDataSource(6, 3, seed=1, init="glorot")
    out = G.FullyConnectedNode(x, fc, name="fc")
    loss = G.MeanSquaredErrorLossNode(out, name="loss")
    tg = G.TrainingGraph(loss, optimizer=lambda p: optim.SGD(p, lr=0.1, momentum=0.9),
                         device=dev, precision="mixed", grad_scaler=dict(init_scale=8.0))
    T = np.zeros((4, 3), np.float32)
    tg.step(X, T)
    w0 = tg.state_dict()["fc.weight"]
    bad = T.copy()
    bad[1, 2] = np.inf
    tg.step(X, bad)
    assert tg.grad_scaler.found_inf and tg.grad_scaler.scale == 4.0
    np.testing.assert_array_equal(tg.state_dict()["fc.weight"], w0)
    assert int(tg.training_state_dict()["fc.optim.param0.step"]) == 1
    tg.step(X, T)
    assert not tg.grad_scaler.found_inf and tg.grad_scaler.growth_tracker == 1
    assert not np.array_equal(tg.state_dict()["fc.weight"], w0)


@pytest.mark.parametrize("accumulate", ["float", "half"])
def test_mixed_tracks_float32(dev, accumulate):
    """A small conv net (conv, batch norm, dropout, linear) trained 30 steps in mixed precision
    follows the float32 loss curve closely, runs its math in float16, keeps float32 weights.
    (The scale starts where no step overflows, so that the curves are step for step the same
    training; overflowed steps are the test above.)"""
    X, Y = data(n=16, seed=3)
    curves = {}
    for prec in ("float32", "mixed"):
        _, loss, _ = lenet(record=False, dropout=True, bn=True)
        kw = dict(precision=prec, accumulate=accumulate, grad_scaler=dict(init_scale=256.0)) \
            if prec == "mixed" else {}
        tg = G.TrainingGraph(loss, optimizer=adam, device=dev, **kw)
        dev.reset_counts()
        curve = []
        for _ in range(30):
            curve.append(tg.step(X, Y))
            assert prec == "float32" or not tg.grad_scaler.found_inf
        curves[prec] = np.array(curve)
        if prec == "mixed":
            names = set(dev.dispatch_counts)
            assert any(n.startswith("conv2d_fwd") and n.endswith("_half") for n in names)
            assert any(n.startswith("gemm_fwd") and n.endswith("_half") for n in names)
            assert all(v.dtype == np.float32 for v in tg.state_dict().values()
                       if v.dtype.kind == "f")
            # planned steps: the weight gradients sit in the arena, one finite check per dtype
            # (plus the flag's reset) instead of one per gradient
            if dev.supports_views:
                assert tg.grad_scaler.launches == 3
    f32, mixed = curves["float32"], curves["mixed"]
    assert f32[-1] < 0.5 * f32[0]  # it trains
    tol = 0.02 if accumulate == "float" else 0.05
    np.testing.assert_allclose(mixed, f32, rtol=tol, atol=tol)


@pytest.mark.parametrize("opt", ["Adam", "AdamW", "RMSProp", "SGD"])
def test_mixed_replay_is_encode(dev, opt):
    """A captured mixed-precision step (loss seed, finite check, skipped or applied updates, the
    scale's update, dropout, batch norm) replayed N times gives what N encoded steps give, bit
    for bit, across overflowed (skipped) and clean steps."""
    make = {"Adam": adam, "AdamW": lambda p: optim.AdamW(p, lr=0.003),
            "RMSProp": lambda p: optim.RMSProp(p, lr=0.003, momentum=0.5),
            "SGD": lambda p: optim.SGD(p, lr=0.05, momentum=0.9)}[opt]
    X, Y = data(n=8)
    res, warm = {}, 0
    for mode in ("replay", "encode"):
        _, loss, _ = lenet(record=False, dropout=True, bn=True)
        tg = G.TrainingGraph(loss, optimizer=make, device=dev, precision="mixed",
                             grad_scaler=dict(init_scale=2.0**19, growth_interval=2))
        if mode == "replay":
            cap = tg.capture(X, Y)
            warm = tg.step_count
            rows = []
            for _ in range(8):
                h = cap.run().wait()
                rows.append((h.losses.copy(), tg.grad_scaler.scale))
        else:
            rows = []
            for _ in range(warm + 8):
                h = tg.encode(X, Y).wait()
                rows.append((h.losses.copy(), tg.grad_scaler.scale))
            rows = rows[warm:]
        res[mode] = (rows, tg.training_state_dict())
    scales = [s for _, s in res["encode"][0]]
    assert len(set(scales)) > 1  # the window holds overflows and growth
    for (la, sa), (lb, sb) in zip(res["replay"][0], res["encode"][0]):
        np.testing.assert_array_equal(la, lb)
        assert sa == sb
    for k, v in res["encode"][1].items():
        np.testing.assert_array_equal(v, res["replay"][1][k], err_msg=k)


def test_mixed_save_load_continues_exactly(dev, tmp_path):
    """save / load carries the loss scale and its growth tracker (with weights, optimizer state
    and step count): a graph loaded from a checkpoint continues exactly as the original."""
    X, Y = data(n=8)

    def make():
        _, loss, _ = lenet(record=False, dropout=True, bn=True)
        return G.TrainingGraph(loss, optimizer=adam, device=dev, precision="mixed",
                               grad_scaler=dict(init_scale=2.0**18, growth_interval=3))

    a = make()
    for _ in range(4):
        a.step(X, Y)
    a.save(tmp_path / "mixed.npz")
    b = make()
    b.load(tmp_path / "mixed.npz")
    assert b.grad_scaler.state_dict() == a.grad_scaler.state_dict()
    for _ in range(4):
        assert a.step(X, Y) == b.step(X, Y)
        assert a.grad_scaler.scale == b.grad_scaler.scale
    sa, sb = a.training_state_dict(), b.training_state_dict()
    for k, v in sa.items():
        np.testing.assert_array_equal(v, sb[k], err_msg=k)


def test_mixed_recurrent_and_conv1d_net_tracks_float32(dev):
    """The activity classifier's net ((1, k) convolutions, an LSTM, linear layers): in mixed
    precision the LSTM runs its float16 kernels on float16 weight copies, and 10 Adam steps
    follow the float32 losses."""
    if not dev.supports_views:
        pytest.skip("its LSTM needs buffer views")
    from example_loader import load_example

    mod = load_example("activity_classifier")
    rng = np.random.default_rng(0)
    X = rng.standard_normal((8, 6, 1, 80)).astype(np.float32)
    Y = rng.integers(0, 4, 8)
    curves = {}
    for prec in ("float32", "mixed"):
        _, loss, _ = mod.activity_network(6, 80, 4, width=8, hidden=16)
        tg = G.TrainingGraph(loss, optimizer=lambda p: optim.Adam(p, lr=3e-3), device=dev,
                             precision=prec, grad_scaler=dict(init_scale=256.0))
        dev.reset_counts()
        curves[prec] = np.array([tg.step(X, Y) for _ in range(10)])
        if prec == "mixed":
            assert {"lstm_fwd_half", "lstm_bwd_half"} <= set(dev.dispatch_counts)
    assert curves["float32"][-1] < 0.7 * curves["float32"][0]
    np.testing.assert_allclose(curves["mixed"], curves["float32"], rtol=0.01, atol=0.01)


def test_mixed_embedding_layer_norm_tracks_float32(dev):
    """Embedding (looked up in float32, float16 activations out, its gradient accumulated in
    float32) and layer norm (float16 copies of its weights, as torch's layer norm takes the
    input's dtype) in a mixed-precision graph follow the float32 losses."""
    rng = np.random.default_rng(2)
    X = rng.integers(0, 50, (8, 5)).astype(np.int32)
    Y = rng.integers(0, 4, 8)
    curves = {}
    for prec in ("float32", "mixed"):
        x = G.ImageNode((5,), np.int32, name="tokens")
        h = G.EmbeddingNode(x, G.EmbeddingDataSource(50, 16, seed=1), name="emb")
        h = G.LayerNormalizationNode(h, G.LayerNormDataSource(16), name="ln")
        h = G.FlattenNode(h, name="flat")
        logits = G.FullyConnectedNode(h, G.FullyConnectedDataSource(80, 4, seed=2), name="fc")
        loss = G.SoftmaxCrossEntropyLossNode(logits, name="loss")
        tg = G.TrainingGraph(loss, optimizer=lambda p: optim.Adam(p, lr=1e-2), device=dev,
                             precision=prec, grad_scaler=dict(init_scale=256.0))
        curves[prec] = np.array([tg.step(X, Y) for _ in range(15)])
    assert curves["float32"][-1] < 0.7 * curves["float32"][0]
    np.testing.assert_allclose(curves["mixed"], curves["float32"], rtol=0.01, atol=0.01)


SCALE_SRC = """
#include "optimizer.h"
kernel void scale_update(device float* param [[buffer(0)]], const device float* grad [[buffer(1)]],
                         device float* master [[buffer(2)]], const device float* gnorm [[buffer(3)]],
                         constant OptimParams& c [[buffer(4)]], constant uint& h [[buffer(5)]],
                         uint gid [[thread_position_in_grid]]) {
  if (gid < c.n) param[gid] -= c.lr * float(c.step) * grad[gid];
}
"""


def test_custom_optimizers_refused_where_the_device_owns_the_step(dev, tmp_path):
    """A CustomOptimizer's kernel reads the host's step count (OptimParams.step) and cannot
    unscale or skip: capture refuses it (before recording) and mixed precision before the
    step is queued."""
    src = tmp_path / "scale_update.metal"
    src.write_text(SCALE_SRC)

    def custom(p):
        return optim.CustomOptimizer(p, str(src), "scale_update", lr=0.01)

    X, Y = data(n=4)
    _, loss, _ = lenet(record=False, dropout=False, bn=False)
    tg = G.TrainingGraph(loss, optimizer=custom, device=dev)
    tg.step(X, Y)
    with pytest.raises(G.GraphError, match="capture: the custom optimizer"):
        tg.capture(X, Y)
    _, loss, _ = lenet(record=False, dropout=False, bn=False)
    tg = G.TrainingGraph(loss, optimizer=custom, device=dev, precision="mixed")
    with pytest.raises(G.GraphError, match="mixed precision: the custom optimizer"):
        tg.step(X, Y)


def test_mixed_bad_options(dev):
    _, loss, _ = lenet(record=False)
    with pytest.raises(ValueError, match="^precision: "):
        G.TrainingGraph(loss, optimizer=adam, device=dev, precision="bfloat16")
    with pytest.raises(ValueError, match="^accumulate: "):
        G.TrainingGraph(loss, optimizer=adam, device=dev, accumulate="half")
    with pytest.raises(ValueError, match=r"^grad_scaler\['growth_factor'\]: "):
        G.TrainingGraph(loss, optimizer=adam, device=dev, precision="mixed",
                        grad_scaler=dict(growth_factor=0.5))
    with pytest.raises(ValueError, match="^grad_scaler: unknown"):
        G.TrainingGraph(loss, optimizer=adam, device=dev, precision="mixed",
                        grad_scaler=dict(init=2.0))
    with pytest.raises(ValueError, match="^low_memory: "):
        G.TrainingGraph(loss, optimizer=adam, device=dev, precision="mixed", low_memory=True)
