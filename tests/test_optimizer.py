"""pymetalnn.optim (kernels/optimizer.metal) against the float64 numpy references of
tests/reference/optimizer.py, and against torch.optim on the CPU when torch imports.

Every case runs 100 steps over four parameter tensors of awkward sizes (1, 31, 3x11, 10x100:
scalar tails, a tensor smaller than one 4-element work item, several threadgroups) with random
gradients whose scale changes from step to step, so clip-by-norm engages on some steps and not on
others. Trajectories are compared at steps 1, 10 and 100.
"""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
from reference import optimizer as ref

import pymetalnn as pm
from pymetalnn import optim

SHAPES = [(1,), (31,), (3, 11), (10, 100)]
STEPS = 100
CHECK_AT = (1, 10, STEPS)
TOL = dict(rtol=2e-5, atol=2e-5)  # float32 trajectories of 100 steps against float64

# (optimizer, options): every torch option of each rule, then MPS's descriptor options
CASES = [
    ("SGD", dict(lr=0.05)),
    ("SGD", dict(lr=0.05, momentum=0.9)),
    ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.02)),
    ("SGD", dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.01)),
    ("SGD", dict(lr=0.05, momentum=0.5, maximize=True)),
    ("Adam", dict(lr=0.01)),
    ("Adam", dict(lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05)),
    ("Adam", dict(lr=0.01, amsgrad=True, maximize=True)),
    ("AdamW", dict(lr=0.01)),
    ("AdamW", dict(lr=0.02, betas=(0.5, 0.9), weight_decay=0.1, amsgrad=True)),
    ("RMSProp", dict(lr=0.01)),
    ("RMSProp", dict(lr=0.01, alpha=0.9, eps=1e-4, centered=True)),
    ("RMSProp", dict(lr=0.005, momentum=0.9, weight_decay=0.01)),
    ("RMSProp", dict(lr=0.005, alpha=0.95, momentum=0.5, centered=True, maximize=True)),
    # MPS options
    ("SGD", dict(lr=0.05, grad_rescale=0.25)),
    ("SGD", dict(lr=0.05, momentum=0.9, clip_value=0.5)),
    ("SGD", dict(lr=0.05, clip_value=(-0.3, 0.8))),
    ("SGD", dict(lr=0.05, momentum=0.9, max_grad_norm=20.0)),
    ("SGD", dict(lr=0.05, regularization="l1", regularization_scale=0.05)),
    ("SGD", dict(lr=0.05, momentum=0.9, regularization="l2", regularization_scale=0.05)),
    ("SGD", dict(lr=0.05, grad_rescale=-2.0, max_grad_norm=30.0, clip_value=1.5,
                 regularization="l2", regularization_scale=0.01, maximize=True)),
    ("Adam", dict(lr=0.01, grad_rescale=2.0, max_grad_norm=15.0, clip_value=(-2.0, 1.0),
                  regularization="l2", regularization_scale=0.02)),
    ("AdamW", dict(lr=0.01, amsgrad=True, max_grad_norm=10.0, regularization="l1",
                   regularization_scale=0.01)),
    ("RMSProp", dict(lr=0.01, centered=True, momentum=0.5, grad_rescale=0.5, max_grad_norm=8.0,
                     clip_value=0.75, regularization="l1", regularization_scale=0.01)),
]
IDS = [f"{n}-{'-'.join(k for k in o if k != 'lr')}" for n, o in CASES]


def make_params(seed: int, dtype=np.float32) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in SHAPES]


def make_grads(seed: int, steps: int = STEPS, dtype=np.float32) -> list[list[np.ndarray]]:
    """Per step, one gradient per tensor; the scale (0.1 .. 3) varies between steps."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        scale = rng.uniform(0.1, 3.0)
        out.append([(rng.standard_normal(s) * scale).astype(dtype) for s in SHAPES])
    return out


def run_ours(dev, name, opts, params0, grads, check_at=CHECK_AT):
    ps = [pm.tensor(p, dev) for p in params0]
    opt = getattr(optim, name)(ps, **opts)
    seen = {}
    for t, gs in enumerate(grads, 1):
        opt.step([pm.tensor(g, dev) for g in gs])
        if t in check_at:
            seen[t] = [p.numpy() for p in ps]
    return seen, opt, ps


def run_reference(name, opts, params0, grads, check_at=CHECK_AT):
    r = ref.Reference(name, params0, **opts)
    seen = {}
    for t, gs in enumerate(grads, 1):
        r.step(gs)
        if t in check_at:
            seen[t] = [p.copy() for p in r.params]
    return seen, r


@pytest.mark.parametrize("case", range(len(CASES)), ids=IDS)
def test_trajectory_matches_reference(dev, case):
    name, opts = CASES[case]
    params0, grads = make_params(case), make_grads(1000 + case)
    ours, _, _ = run_ours(dev, name, opts, params0, grads)
    want, r = run_reference(name, opts, params0, grads)
    for t in CHECK_AT:
        for i, (a, b) in enumerate(zip(ours[t], want[t])):
            np.testing.assert_allclose(a, b, **TOL, err_msg=f"{name} {opts} step {t} tensor {i}")
    # the run must have moved the weights far beyond the tolerance, or the test proves nothing
    moved = max(float(np.abs(a - b).max()) for a, b in zip(want[STEPS], params0))
    assert moved > 0.05


def torch_trajectory(name, opts, params0, grads):
    """torch.optim (single-tensor path) with the MPS options applied to .grad beforehand."""
    torch = pytest.importorskip("torch")
    mps_keys = ("grad_rescale", "clip_value", "max_grad_norm", "regularization",
                "regularization_scale")
    kw = {k: v for k, v in opts.items() if k not in mps_keys}
    reg = opts.get("regularization")
    own_maximize = bool(reg) and kw.get("maximize", False)
    if own_maximize:  # ours negates before regularizing; torch's maximize would negate both
        kw["maximize"] = False
    ps = [torch.tensor(p.astype(np.float32), requires_grad=True) for p in params0]
    cls = {"RMSProp": torch.optim.RMSprop}.get(name) or getattr(torch.optim, name)
    opt = cls(ps, foreach=False, **kw)
    for gs in grads:
        for p, g in zip(ps, gs):
            p.grad = torch.tensor(g) * opts.get("grad_rescale", 1.0)
        if "max_grad_norm" in opts:
            torch.nn.utils.clip_grad_norm_(ps, opts["max_grad_norm"], foreach=False)
        clip = opts.get("clip_value")
        with torch.no_grad():
            for p in ps:
                if clip is not None:
                    lo, hi = (-clip, clip) if np.isscalar(clip) else clip
                    p.grad.clamp_(lo, hi)
                if own_maximize:
                    p.grad.neg_()
                if reg == "l1":
                    p.grad.add_(torch.sign(p), alpha=opts["regularization_scale"])
                elif reg == "l2":
                    p.grad.add_(p, alpha=opts["regularization_scale"])
        opt.step()
    return [p.detach().numpy().copy() for p in ps]


@pytest.mark.parametrize("case", range(len(CASES)), ids=IDS)
def test_trajectory_matches_torch(dev, case):
    name, opts = CASES[case]
    params0, grads = make_params(case), make_grads(1000 + case)
    want = torch_trajectory(name, opts, params0, grads)
    ours, _, _ = run_ours(dev, name, opts, params0, grads, check_at=(STEPS,))
    for i, (a, b) in enumerate(zip(ours[STEPS], want)):
        np.testing.assert_allclose(a, b, **TOL, err_msg=f"{name} {opts} tensor {i}")


@pytest.mark.parametrize("name,opts", [
    ("SGD", dict(lr=0.05, momentum=0.9, weight_decay=0.01)),
    ("Adam", dict(lr=0.01, amsgrad=True, max_grad_norm=20.0)),
    ("RMSProp", dict(lr=0.01, centered=True, momentum=0.5)),
])
def test_float16_params_with_float32_master(dev, name, opts):
    params0 = make_params(7, np.float16)
    grads = make_grads(8, steps=30, dtype=np.float16)
    ours, opt, ps = run_ours(dev, name, opts, params0, grads, check_at=(30,))
    want, _ = run_reference(name, opts, [p.astype(np.float64) for p in params0],
                            [[g.astype(np.float64) for g in gs] for gs in grads], check_at=(30,))
    sd = opt.state_dict()
    for i, (p, w) in enumerate(zip(ours[30], want[30])):
        assert p.dtype == np.float16
        # the master copy carries the float32 trajectory; the half weights are its rounding
        np.testing.assert_allclose(sd[f"param{i}.master"], w, **TOL)
        np.testing.assert_allclose(p.astype(np.float64), w, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("t0", [0, 999, 9_999, 99_999, 2_000_000])
@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.5, 0.9999), (0.0, 0.99)])
def test_adam_bias_corrections_from_device_step(dev, t0, betas):
    """Adam computes 1 - beta^t on the device from its step count (-expm1(t log beta) in float):
    a step at t = t0 + 1 (the count restored by load_state_dict) lands where torch's double
    precision bias corrections put it, for t from 1 (where 1 - beta2^t is tiny) to 2e6."""
    rng = np.random.default_rng(t0 + int(betas[1] * 1e4))
    w0 = rng.standard_normal(257).astype(np.float32)
    g = rng.standard_normal(257).astype(np.float32)
    m0 = (0.1 * rng.standard_normal(257)).astype(np.float32)
    v0 = (0.01 * rng.random(257)).astype(np.float32)
    p = pm.tensor(w0, dev)
    opt = optim.Adam([p], lr=0.01, betas=betas)
    if t0:
        opt.load_state_dict({"param0.step": np.array(t0, np.int64), "param0.exp_avg": m0,
                             "param0.exp_avg_sq": v0})
    else:
        m0, v0 = np.zeros_like(m0), np.zeros_like(v0)
    opt.step([pm.tensor(g, dev)])
    b1, b2 = betas
    t = t0 + 1
    m = b1 * m0.astype(np.float64) + (1 - b1) * g
    v = b2 * v0.astype(np.float64) + (1 - b2) * g.astype(np.float64) ** 2
    want = w0 - 0.01 / (1 - b1**t) * m / (np.sqrt(v) / np.sqrt(1 - b2**t) + 1e-8)
    np.testing.assert_allclose(p.numpy(), want, rtol=2e-6, atol=2e-7)
    assert int(opt.state_dict()["param0.step"]) == t


@pytest.mark.parametrize("name,opts", [
    ("SGD", dict(lr=0.05, momentum=0.9, weight_decay=0.01)),
    ("Adam", dict(lr=0.01, amsgrad=True, weight_decay=0.01)),
    ("AdamW", dict(lr=0.01)),
    ("RMSProp", dict(lr=0.01, centered=True, momentum=0.5)),
])
def test_float32_params_with_float16_grads(dev, name, opts):
    """Mixed precision's update: float32 weights from float16 gradients (`<rule>_step_hgrad_float`,
    and the multi-tensor kernel's) follow the float64 reference fed the same float16 gradients,
    and match float32 gradients holding the same values bit for bit."""
    params0 = make_params(7)
    grads = make_grads(8, steps=30, dtype=np.float16)
    ours, _, _ = run_ours(dev, name, opts, params0, grads, check_at=(30,))
    up, _, _ = run_ours(dev, name, opts, params0,
                        [[g.astype(np.float32) for g in gs] for gs in grads], check_at=(30,))
    want, _ = run_reference(name, opts, [p.astype(np.float64) for p in params0],
                            [[g.astype(np.float64) for g in gs] for gs in grads], check_at=(30,))
    for a, b, w in zip(ours[30], up[30], want[30]):
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a, w, **TOL)
    if not dev.supports_views:
        return
    ws = [p.copy() for p in params0]
    _, pa = flat_views(dev, ws, 0, 1)
    o = getattr(optim, name)(pa, **opts)
    ms = optim.MultiTensorStep([o])
    for gs in grads:
        _, ga = flat_views(dev, gs, 0, 1, np.float16)
        ms.step([ga])
        assert ms.launches == 1 and ms.fallback == 0
    for a, b in zip(pa, ours[30]):
        np.testing.assert_array_equal(a.numpy(), b)


@pytest.mark.parametrize("name,opts", [
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True)),
    ("Adam", dict(lr=0.01, amsgrad=True, weight_decay=0.01)),
    ("RMSProp", dict(lr=0.01, centered=True, momentum=0.3)),
])
def test_state_dict_round_trip_continues_trajectory(dev, tmp_path, name, opts):
    """50 steps, save weights and optimizer to .npz, rebuild from the file, 50 more steps: the
    result is the reference's 100-step trajectory."""
    params0, grads = make_params(21), make_grads(22)
    _, opt, ps = run_ours(dev, name, opts, params0, grads[:50], check_at=())
    want50, r50 = run_reference(name, opts, params0, grads[:50], check_at=())
    sd = opt.state_dict()
    for i, st in enumerate(r50.state):
        assert int(sd[f"param{i}.step"]) == 50
        for k, v in st.items():
            np.testing.assert_allclose(sd[f"param{i}.{k}"], v, **TOL)
    path = tmp_path / "ckpt.npz"
    np.savez(path, **sd, **{f"weight{i}": p.numpy() for i, p in enumerate(ps)})
    f = np.load(path)
    ps2 = [pm.tensor(f[f"weight{i}"], dev) for i in range(len(ps))]
    opt2 = getattr(optim, name)(ps2, lr=123.0)  # hyperparameters come back from the file
    opt2.load_state_dict({k: f[k] for k in f.files if not k.startswith("weight")})
    for gs in grads[50:]:
        opt2.step([pm.tensor(g, dev) for g in gs])
    want, _ = run_reference(name, opts, params0, grads, check_at=(STEPS,))
    for a, b in zip(ps2, want[STEPS]):
        np.testing.assert_allclose(a.numpy(), b, **TOL)


def test_param_groups_and_skipped_grads(dev):
    """Groups with their own options; a None gradient leaves a tensor and its step count alone."""
    params0, grads = make_params(31), make_grads(32, steps=20)
    ps = [pm.tensor(p, dev) for p in params0]
    opt = optim.Adam([{"params": ps[:2], "lr": 0.05, "amsgrad": True}, {"params": ps[2:]}],
                     lr=0.01, max_grad_norm=12.0)
    ra = ref.Reference("Adam", params0, lr=0.05, amsgrad=True, max_grad_norm=12.0)
    rb = ref.Reference("Adam", params0, lr=0.01, max_grad_norm=12.0)
    for t, gs in enumerate(grads):
        gs = [None if (i == 1 and t % 3 == 0) else g for i, g in enumerate(gs)]
        opt.step([None if g is None else pm.tensor(g, dev) for g in gs])
        # both references see every gradient (the global norm spans the groups)
        ra.step(gs)
        rb.step(gs)
    want = ra.params[:2] + rb.params[2:]
    for i, (p, w) in enumerate(zip(ps, want)):
        np.testing.assert_allclose(p.numpy(), w, **TOL, err_msg=f"tensor {i}")
    assert opt.steps == ra.steps[:2] + rb.steps[2:] and opt.steps[1] < opt.steps[0]


def test_one_fused_kernel_per_tensor(dev):
    ps = [pm.tensor(p, dev) for p in make_params(41)]
    gs = [pm.tensor(g, dev) for g in make_grads(42, steps=1)[0]]
    opt = optim.Adam(ps, amsgrad=True)
    dev.synchronize()
    dev.reset_counts()
    opt.step(gs)
    # one launch advances the device step counts the rules read (bias corrections)
    assert dict(dev.dispatch_counts) == {"optim_count": 1, "adam_step_float": 4}
    opt = optim.SGD(ps, momentum=0.9, max_grad_norm=1.0)
    dev.reset_counts()
    opt.step(gs)
    # the norm: one clear and one reduction per gradient, read by the update kernels on device
    assert dict(dev.dispatch_counts) == {"optim_zero": 1, "optim_sumsq_float": 4,
                                         "optim_count": 1, "sgd_step_float": 4}


def test_global_norm_over_many_threadgroups(dev):
    """The norm reduction's grid-stride loop and atomics: 1.1M + 77 elements, SGD lr = 1 from 0
    recovers -clip_coef * g."""
    rng = np.random.default_rng(5)
    g0 = rng.standard_normal(1_100_000).astype(np.float32)
    g1 = rng.standard_normal(77).astype(np.float16)
    ps = [pm.zeros(g0.shape, device=dev), pm.zeros(g1.shape, np.float16, dev)]
    opt = optim.SGD(ps, lr=1.0, max_grad_norm=50.0, grad_rescale=0.5)
    opt.step([pm.tensor(g0, dev), pm.tensor(g1, dev)])
    g64 = [0.5 * g0.astype(np.float64), 0.5 * g1.astype(np.float64)]
    coef = 50.0 / (np.sqrt(sum(float((g * g).sum()) for g in g64)) + 1e-6)
    assert coef < 0.5
    np.testing.assert_allclose(ps[0].numpy(), -coef * g64[0], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(opt.state_dict()["param1.master"], -coef * g64[1], rtol=1e-5,
                               atol=1e-7)


def test_views_unaligned_use_scalar_path(dev):
    """Parameters and gradients that are views at odd offsets into larger buffers (no 16-byte
    alignment, so no 4-wide loads) still match the reference."""
    if not dev.supports_views:
        pytest.skip("backend binds whole buffers only")
    rng = np.random.default_rng(9)
    w0 = rng.standard_normal(40).astype(np.float32)
    g0 = rng.standard_normal(40).astype(np.float32)
    big_w = dev.buffer(np.concatenate([np.zeros(1, np.float32), w0]))
    big_g = dev.buffer(np.concatenate([np.zeros(3, np.float32), g0]))
    p = pm.Tensor(big_w.view(4, 160), (40,), np.float32)
    g = pm.Tensor(big_g.view(12, 160), (40,), np.float32)
    opt = optim.Adam([p], lr=0.1)
    r = ref.Reference("Adam", [w0], lr=0.1)
    for _ in range(3):
        opt.step([g])
        r.step([g0])
    np.testing.assert_allclose(p.numpy(), r.params[0], **TOL)
    assert big_w.numpy(np.float32)[0] == 0.0


# ---- CustomOptimizer ----------------------------------------------------------------------
SIGNUM_SRC = r"""
// sign-SGD with momentum, written as a user would: one element per thread
#include "optimizer.h"

struct SignumHyper {
    float beta;
    float one_minus_beta;
};

kernel void signum_update(device float* param [[buffer(0)]], const device float* grad [[buffer(1)]],
                          device float* master [[buffer(2)]], device float* momentum [[buffer(3)]],
                          const device float* gnorm [[buffer(4)]],
                          constant OptimParams& c [[buffer(5)]],
                          constant SignumHyper& h [[buffer(6)]],
                          uint gid [[thread_position_in_grid]]) {
  if (gid >= c.n) return;
  float w = param[gid];
  float g = optim_grad(grad[gid], w, optim_clip_coef(gnorm, c), c);
  float b = h.beta * momentum[gid] + h.one_minus_beta * g;
  momentum[gid] = b;
  param[gid] = w - c.lr * sign(b);
}

// not the optimizer layout (no master, states, gnorm or hyper)
kernel void plain_sgd(device float* param [[buffer(0)]], const device float* grad [[buffer(1)]],
                      constant OptimParams& c [[buffer(2)]], uint gid [[thread_position_in_grid]]) {
  if (gid < c.n) param[gid] = param[gid] - c.lr * grad[gid];
}
"""


@pytest.fixture(scope="module")
def signum_source(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("user_kernels") / "my_update.metal"
    path.write_text(SIGNUM_SRC)
    return str(path)


def test_custom_optimizer_sign_sgd(dev, signum_source):
    params0, grads = make_params(51), make_grads(52, steps=40)
    ps = [pm.tensor(p, dev) for p in params0]
    opts = dict(lr=0.01, clip_value=1.0, max_grad_norm=25.0)
    opt = optim.CustomOptimizer(ps, signum_source, "signum_update", state_names=["momentum"],
                                hyper={"beta": 0.9, "one_minus_beta": 0.1}, **opts)
    r = ref.Reference("signum", params0, beta=0.9, **opts)
    for gs in grads[:20]:
        opt.step([pm.tensor(g, dev) for g in gs])
        r.step(gs)
    # the hyper struct can change between steps
    opt.hyper.beta, opt.hyper.one_minus_beta = 0.5, 0.5
    r.options["beta"] = 0.5
    for gs in grads[20:]:
        opt.step([pm.tensor(g, dev) for g in gs])
        r.step(gs)
    for p, w in zip(ps, r.params):
        np.testing.assert_allclose(p.numpy(), w, **TOL)
    for i, st in enumerate(r.state):
        np.testing.assert_allclose(opt.state_dict()[f"param{i}.momentum"], st["momentum"], **TOL)


def test_custom_optimizer_bad_layout(dev, signum_source):
    p = [pm.tensor(np.zeros(4, np.float32), dev)]
    with pytest.raises(ValueError, match="^kernel: 'plain_sgd' must take 6 arguments"):
        optim.CustomOptimizer(p, signum_source, "plain_sgd")
    with pytest.raises(ValueError, match="^kernel: no kernel named 'nope'"):
        optim.CustomOptimizer(p, signum_source, "nope", state_names=["momentum"], hyper={"b": 1.0})
    with pytest.raises(ValueError, match="^hyper: 4 bytes"):
        optim.CustomOptimizer(p, signum_source, "signum_update", state_names=["momentum"],
                              hyper={"beta": 0.9})
    with pytest.raises(ValueError, match="^source: "):
        optim.CustomOptimizer(p, signum_source + ".missing", "signum_update")
    with pytest.raises(ValueError, match="^kernel_half: "):
        optim.CustomOptimizer([pm.tensor(np.zeros(4, np.float16), dev)], signum_source,
                              "signum_update", state_names=["momentum"],
                              hyper={"beta": 0.9, "one_minus_beta": 0.1})
    with pytest.raises(ValueError, match="^state_names: "):
        optim.CustomOptimizer(p, signum_source, "signum_update", state_names=["master"])


def test_hyper_struct_forms():
    class H(ctypes.Structure):
        _fields_ = [("a", ctypes.c_float)]

    h = H(1.5)
    assert optim.hyper_struct(h) is h
    s = optim.hyper_struct({"x": 0.25, "k": 3, "on": True, "u": np.uint32(7)})
    assert [f for f, _ in s._fields_] == ["x", "k", "on", "u"]
    assert ctypes.sizeof(s) == 16 and (s.x, s.k, s.on, s.u) == (0.25, 3, 1, 7)
    assert s._fields_[1][1] is ctypes.c_int32 and s._fields_[3][1] is ctypes.c_uint32
    with pytest.raises(ValueError, match="^hyper"):
        optim.hyper_struct({"x": "fast"})


# ---- bad input: ValueError naming the argument, nothing dispatched, nothing changed ---------
def test_bad_input(dev):
    w = np.arange(6, dtype=np.float32)
    p = pm.tensor(w, dev)
    g = pm.tensor(np.ones(6, np.float32), dev)
    ctor = [
        (lambda: optim.SGD([p], lr=-0.1), "^lr: "),
        (lambda: optim.SGD([p], lr=float("nan")), "^lr: "),
        (lambda: optim.SGD([p], momentum=-1), "^momentum: "),
        (lambda: optim.SGD([p], nesterov=True), "^nesterov: "),
        (lambda: optim.SGD([p], momentum=0.9, dampening=0.1, nesterov=True), "^nesterov: "),
        (lambda: optim.SGD([p], weight_decay=-1e-3), "^weight_decay: "),
        (lambda: optim.Adam([p], betas=(1.0, 0.999)), r"^betas\[0\]: "),
        (lambda: optim.Adam([p], betas=(0.9, -0.1)), r"^betas\[1\]: "),
        (lambda: optim.Adam([p], betas=0.9), "^betas: "),
        (lambda: optim.Adam([p], eps=0.0), "^eps: "),
        (lambda: optim.AdamW([p], eps=-1e-8), "^eps: "),
        (lambda: optim.Adam([p], amsgrad=1), "^amsgrad: "),
        (lambda: optim.RMSProp([p], alpha=1.5), "^alpha: "),
        (lambda: optim.RMSProp([p], eps=0), "^eps: "),
        (lambda: optim.RMSProp([p], momentum=-0.5), "^momentum: "),
        (lambda: optim.SGD([p], clip_value=(1.0, -1.0)), "^clip_value: "),
        (lambda: optim.SGD([p], clip_value=-1.0), "^clip_value: "),
        (lambda: optim.SGD([p], max_grad_norm=0.0), "^max_grad_norm: "),
        (lambda: optim.SGD([p], regularization="l3"), "^regularization: "),
        (lambda: optim.SGD([p], regularization_scale=-1.0), "^regularization_scale: "),
        (lambda: optim.SGD([p], grad_rescale=float("inf")), "^grad_rescale: "),
        (lambda: optim.SGD([]), "^params: "),
        (lambda: optim.SGD(p), "^params: "),
        (lambda: optim.SGD([p, p]), r"^params\[1\]: "),
        (lambda: optim.SGD([w]), r"^params\[0\]: "),
        (lambda: optim.SGD([pm.tensor(np.zeros(3, np.int32), dev)]), r"^params\[0\]: "),
        (lambda: optim.SGD([{"params": [p], "lr": -1.0}]), r"^params\[0\]\['lr'\]: "),
        (lambda: optim.SGD([{"params": [p], "max_grad_norm": 1.0}]), r"^params\[0\]: "),
        (lambda: optim.SGD([{"lr": 1.0}]), r"^params\[0\]: "),
    ]
    for fn, match in ctor:
        with pytest.raises(ValueError, match=match):
            fn()
    opt = optim.Adam([p], lr=0.1)
    steps = [
        (lambda: opt.step(g), "^grads: "),
        (lambda: opt.step([g, g]), "^grads: "),
        (lambda: opt.step([pm.tensor(np.ones(5, np.float32), dev)]), r"^grads\[0\]: shape"),
        (lambda: opt.step([pm.tensor(np.ones((2, 3), np.float32), dev)]), r"^grads\[0\]: shape"),
        # float16 gradients of float32 weights are allowed (mixed precision); integers are not
        (lambda: opt.step([pm.tensor(np.ones(6, np.int32), dev)]), r"^grads\[0\]: dtype"),
        (lambda: opt.step([np.ones(6, np.float32)]), r"^grads\[0\]: "),
        (lambda: opt.step([p]), r"^grads\[0\]: "),
    ]
    dev.synchronize()
    dev.reset_counts()
    for fn, match in steps:
        with pytest.raises(ValueError, match=match):
            fn()
    # an option edited to a bad value is caught at the next step, before any kernel runs
    opt.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match=r"^param_groups\[0\]\['lr'\]: "):
        opt.step([g])
    opt.param_groups[0]["lr"] = 0.1
    sd = opt.state_dict()
    bad_sd = [
        ({**sd, "param0.exp_avg": np.zeros(5, np.float32)}, r"^d\['param0.exp_avg'\]: "),
        ({**sd, "param3.exp_avg": np.zeros(6, np.float32)}, r"^d\['param3.exp_avg'\]: "),
        ({**sd, "param0.velocity": np.zeros(6, np.float32)}, r"^d\['param0.velocity'\]: "),
        ({**sd, "group0.lr": np.array(-2.0)}, r"^d: group0\['lr'\]: "),
        ({**sd, "bogus": np.array(1)}, r"^d\['bogus'\]: "),
    ]
    for d, match in bad_sd:
        with pytest.raises(ValueError, match=match):
            opt.load_state_dict(d)
    assert sum(dev.dispatch_counts.values()) == 0
    np.testing.assert_array_equal(p.numpy(), w)
    assert opt.steps == [0] and opt.param_groups[0]["lr"] == 0.1


def test_zero_state_restarts(dev):
    params0, grads = make_params(61), make_grads(62, steps=6)
    ps = [pm.tensor(p, dev) for p in params0]
    opt = optim.Adam(ps, lr=0.01)
    for gs in grads[:3]:
        opt.step([pm.tensor(g, dev) for g in gs])
    opt.zero_state()
    start = [p.numpy() for p in ps]
    for gs in grads[3:]:
        opt.step([pm.tensor(g, dev) for g in gs])
    _, r = run_reference("Adam", dict(lr=0.01), start, grads[3:], check_at=())
    for p, w in zip(ps, r.params):
        np.testing.assert_allclose(p.numpy(), w, **TOL)


# ---- multi-tensor updates (optim.MultiTensorStep, <rule>_step_multi_float) -------------------
MULTI_SIZES = [1, 3, 4097, 2 * 16384 + 5, 31, 8]
MULTI_CASES = [
    ("SGD", dict(lr=0.05)),
    ("SGD", dict(lr=0.1, grad_rescale=0.7)),  # plain SGD (no momentum), a gradient scale
    ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.02)),
    ("SGD", dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.01, maximize=True)),
    ("Adam", dict(lr=0.01, amsgrad=True, weight_decay=0.05)),
    ("AdamW", dict(lr=0.02, betas=(0.5, 0.9), weight_decay=0.1, amsgrad=True)),
    ("RMSProp", dict(lr=0.01, alpha=0.9, centered=True, momentum=0.5, weight_decay=0.01)),
    ("RMSProp", dict(lr=0.01, clip_value=0.5, regularization="l1", regularization_scale=1e-3)),
]


def flat_views(dev, arrays, first, gap, dtype=np.float32):
    """Tensors that are views of one buffer: the first at element `first`, `gap` elements
    between them (odd values: unaligned offsets)."""
    offs, o = [], first
    for a in arrays:
        offs.append(o)
        o += a.size + gap
    sz = np.dtype(dtype).itemsize
    buf = dev.buffer(np.zeros(o + 3, dtype))
    for a, of in zip(arrays, offs):
        buf.write(np.asarray(a, dtype), of * sz)
    return buf, [pm.Tensor(buf.view(of * sz, a.size * sz), a.shape, dtype)
                 for a, of in zip(arrays, offs)]


@pytest.mark.parametrize("first,gap", [(0, 0), (1, 1), (4, 3)])
@pytest.mark.parametrize("case", MULTI_CASES, ids=lambda c: f"{c[0]}-{'-'.join(c[1])}")
def test_multi_tensor_bit_identical(dev, case, first, gap):
    """Two optimizers over views of one buffer, stepped as one multi-tensor launch, leave weights
    and state bit for bit as their per-tensor steps do (sizes 1, 3, 4097, several chunks;
    aligned and unaligned offsets), one launch per step."""
    if not dev.supports_views:
        pytest.skip("backend binds whole buffers only")
    name, opts = case
    rng = np.random.default_rng(3)
    ws = [rng.standard_normal(n).astype(np.float32) for n in MULTI_SIZES]
    _, pa = flat_views(dev, ws, first, gap)
    pb = [pm.tensor(w, dev) for w in ws]
    cls = getattr(optim, name)
    A = [cls(pa[:3], **opts), cls(pa[3:], **opts)]
    B = [cls(pb[:3], **opts), cls(pb[3:], **opts)]
    ms = optim.MultiTensorStep(A)
    for _ in range(3):
        gs = [rng.standard_normal(n).astype(np.float32) for n in MULTI_SIZES]
        _, ga = flat_views(dev, gs, gap, first)
        gb = [pm.tensor(g, dev) for g in gs]
        dev.synchronize()
        dev.reset_counts()
        ms.step([ga[:3], ga[3:]])
        # and one launch advancing every tensor's device step count
        assert dict(dev.dispatch_counts) == {"optim_count": 1, f"{A[0].KERNEL}_multi_float": 1}
        B[0].step(gb[:3])
        B[1].step(gb[3:])
    for x, y in zip(pa, pb):
        np.testing.assert_array_equal(x.numpy(), y.numpy())
    for oa, ob in zip(A, B):
        da, db = oa.state_dict(), ob.state_dict()
        assert sorted(da) == sorted(db)
        for k in db:
            np.testing.assert_array_equal(da[k], db[k], err_msg=k)


def test_multi_tensor_fallback_mixed_and_state_dict(dev):
    """Gradients in separate buffers take the per-tensor path (state still flat); skipped
    gradients, per-group options (one launch per distinct struct) and a state_dict round trip
    (the loaded state is copied into the flat buffers) keep results identical."""
    if not dev.supports_views:
        pytest.skip("backend binds whole buffers only")
    rng = np.random.default_rng(4)
    ws = [rng.standard_normal(n).astype(np.float32) for n in (5, 17, 100, 3)]
    _, pa = flat_views(dev, ws, 0, 1)
    pb = [pm.tensor(w, dev) for w in ws]

    def make(ps):
        return [optim.SGD([{"params": ps[:1]}, {"params": ps[1:2], "lr": 0.02}], lr=0.1,
                          momentum=0.9, dampening=0.1),
                optim.SGD(ps[2:], lr=0.1, momentum=0.9, dampening=0.1)]

    A, B = make(pa), make(pb)
    ms = optim.MultiTensorStep(A)
    for s in range(4):
        gs = [rng.standard_normal(w.size).astype(np.float32) for w in ws]
        if s == 2:
            gs[3] = None
        dev.synchronize()
        dev.reset_counts()
        if s == 0:  # separate buffers: per tensor
            ms.step([[pm.tensor(g, dev) for g in gs[:2]], [pm.tensor(g, dev) for g in gs[2:]]])
            assert ms.launches == 0 and ms.fallback == 4
        else:
            _, ga = flat_views(dev, [g for g in gs if g is not None], 1, 2)
            it = iter(ga)
            ga = [None if g is None else next(it) for g in gs]
            ms.step([ga[:2], ga[2:]])
            # two learning rates; after the skipped gradient, two step counts of lr 0.1
            assert ms.fallback == 0 and ms.launches == (3 if s == 3 else 2)
        B[0].step([None if g is None else pm.tensor(g, dev) for g in gs[:2]])
        B[1].step([None if g is None else pm.tensor(g, dev) for g in gs[2:]])
        if s == 1:  # state_dict round trip
            for o in A:
                o.load_state_dict(o.state_dict())
    for x, y in zip(pa, pb):
        np.testing.assert_array_equal(x.numpy(), y.numpy())
    for oa, ob in zip(A, B):
        da, db = oa.state_dict(), ob.state_dict()
        for k in db:
            np.testing.assert_array_equal(da[k], db[k], err_msg=k)
    assert all(t.buffer.base is ms.states["momentum_buffer"] for o in A for st in o.state
               for t in st.values())


def test_multi_tensor_rejects(dev):
    if not dev.supports_views:
        pytest.skip("backend binds whole buffers only")
    _, ps = flat_views(dev, [np.ones(4, np.float32), np.ones(5, np.float32)], 0, 0)
    with pytest.raises(ValueError, match="max_grad_norm"):
        optim.MultiTensorStep([optim.SGD(ps, max_grad_norm=1.0)])
    with pytest.raises(ValueError, match="one rule"):
        optim.MultiTensorStep([optim.SGD(ps[:1]), optim.Adam(ps[1:])])
    with pytest.raises(ValueError, match="not a view of the base"):
        optim.MultiTensorStep([optim.SGD([ps[0], pm.tensor(np.ones(3, np.float32), dev)])])
    ms = optim.MultiTensorStep([optim.SGD(ps)])
    with pytest.raises(ValueError, match="grads"):
        ms.step([[None]])
    with pytest.raises(ValueError, match="gradient lists"):
        ms.step([])


def test_torch_spelling_rmsprop():
    """optim.RMSprop (torch.optim's spelling) is the RMSProp class, with torch's positional order."""
    from pymetalnn import optim as O

    assert O.RMSprop is O.RMSProp
    import inspect

    names = list(inspect.signature(O.RMSprop).parameters)[:7]
    assert names == ["params", "lr", "alpha", "eps", "weight_decay", "momentum", "centered"]
