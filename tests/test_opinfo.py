"""PyTorch's own OpInfo samples (torch.testing._internal) for the ops pymetalnn.functional maps:
each float32 and float16 sample is run through our op with torch's arguments converted to numpy (positional
order and keyword names as torch's), the result compared with torch's on the CPU, and, where we
have `<op>_backward`, the gradients of the tensor arguments against torch's autograd.

A sample our op refuses with ValueError/TypeError (a documented non-goal) counts as refused,
never as passed; one whose gradient torch itself refuses counts as torch_refuses when ours
refuses it too; anything else that differs is a mismatch and fails the test. Skips without
torch. CI time: a deterministic subset of the samples (every op, at most SAMPLES_PER_OP each);
PYMETALNN_OPINFO_ALL=1 runs all of them and prints the counts.
"""
from __future__ import annotations

import inspect
import os
import sys
import types
import unittest

import numpy as np
import pytest

import pymetalnn as pm
from pymetalnn import functional as F

torch = pytest.importorskip("torch")

SAMPLES_PER_OP = 6
ALL = os.environ.get("PYMETALNN_OPINFO_ALL") == "1"


def _op_db():
    """torch's op_db; its test utilities import expecttest, a test-only package we do not need."""
    if "expecttest" not in sys.modules:
        try:
            import expecttest  # noqa: F401
        except ImportError:
            stub = types.ModuleType("expecttest")
            stub.TestCase = unittest.TestCase
            sys.modules["expecttest"] = stub
    try:
        from torch.testing._internal.common_methods_invocations import op_db
    except Exception as e:  # a torch build without its test utilities
        pytest.skip(f"torch's OpInfo database is not importable: {e}")
    return op_db


def _embedding(weight, idx, **kw):
    return F.embedding(idx, weight, **kw)


def _embedding_bwd(g, weight, idx, **kw):
    none, dw = F.embedding_backward(g, idx, weight, **kw)
    return dw, none


def _drop_inplace(fn):
    """torch's `inplace=False` is the only mode here (a new tensor is returned); inplace=True is
    refused."""
    def call(*args, inplace=False, **kw):
        if inplace:
            raise ValueError("inplace: in-place variants are not supported")
        return fn(*args, **kw)
    call.__signature__ = inspect.signature(fn)
    return call


# OpInfo name -> (forward, backward or None)
OPS = {
    "nn.functional.conv1d": (F.conv1d, F.conv1d_backward),
    "nn.functional.conv2d": (F.conv2d, F.conv2d_backward),
    "nn.functional.conv_transpose1d": (F.conv_transpose1d, F.conv_transpose1d_backward),
    "nn.functional.conv_transpose2d": (F.conv_transpose2d, F.conv_transpose2d_backward),
    "nn.functional.linear": (F.linear, F.linear_backward),
    "matmul": (F.matmul, F.matmul_backward),
    "nn.functional.max_pool1d": (F.max_pool1d, F.max_pool1d_backward),
    "nn.functional.max_pool2d": (F.max_pool2d, F.max_pool2d_backward),
    "nn.functional.avg_pool1d": (F.avg_pool1d, F.avg_pool1d_backward),
    "nn.functional.avg_pool2d": (F.avg_pool2d, F.avg_pool2d_backward),
    "nn.functional.adaptive_avg_pool1d": (F.adaptive_avg_pool1d, F.adaptive_avg_pool1d_backward),
    "nn.functional.adaptive_avg_pool2d": (F.adaptive_avg_pool2d, F.adaptive_avg_pool2d_backward),
    "nn.functional.relu": (_drop_inplace(F.relu), F.relu_backward),
    "nn.functional.leaky_relu": (_drop_inplace(F.leaky_relu), _drop_inplace(F.leaky_relu_backward)),
    "nn.functional.elu": (_drop_inplace(F.elu), _drop_inplace(F.elu_backward)),
    "nn.functional.gelu": (F.gelu, F.gelu_backward),
    "nn.functional.softplus": (F.softplus, F.softplus_backward),
    "nn.functional.hardsigmoid": (_drop_inplace(F.hardsigmoid), _drop_inplace(F.hardsigmoid_backward)),
    "sigmoid": (F.sigmoid, F.sigmoid_backward),
    "tanh": (F.tanh, F.tanh_backward),
    "softmax": (F.softmax, F.softmax_backward),
    "log_softmax": (F.log_softmax, F.log_softmax_backward),
    "nn.functional.cross_entropy": (F.cross_entropy, F.cross_entropy_backward),
    "nn.functional.binary_cross_entropy_with_logits": (F.binary_cross_entropy_with_logits,
                                                       F.binary_cross_entropy_with_logits_backward),
    "nn.functional.mse_loss": (F.mse_loss, F.mse_loss_backward),
    "nn.functional.l1_loss": (F.l1_loss, F.l1_loss_backward),
    "nn.functional.smooth_l1_loss": (F.smooth_l1_loss, F.smooth_l1_loss_backward),
    "nn.functional.huber_loss": (F.huber_loss, F.huber_loss_backward),
    "nn.functional.kl_div": (F.kl_div, F.kl_div_backward),
    "nn.functional.layer_norm": (F.layer_norm, F.layer_norm_backward),
    "nn.functional.group_norm": (F.group_norm, F.group_norm_backward),
    "nn.functional.batch_norm": (F.batch_norm, F.batch_norm_backward),
    "nn.functional.embedding": (_embedding, _embedding_bwd),
}


def _is_float(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point()


def _np(v):
    """torch's argument as a user passes it: float tensors as pymetalnn tensors of their dtype
    (updated in place where the op does, like batch norm's running statistics), integer ones as
    numpy arrays."""
    if isinstance(v, torch.Tensor):
        a = v.detach().numpy()
        if a.dtype.kind != "f":
            return a.copy()
        return pm.tensor(a if a.dtype in (np.float16, np.float32) else a.astype(np.float32))
    if isinstance(v, torch.Size):
        return tuple(v)
    if isinstance(v, (list, tuple)):
        return type(v)(_np(x) for x in v)
    return v


# (output rtol, atol), (gradient rtol, atol) per sample dtype: float16 results are rounded to
# 11 bits, and torch's CPU float16 ops round their intermediates differently
TOLS = {torch.float32: ((1e-4, 1e-5), (1e-3, 1e-4)), torch.float16: ((1e-2, 1e-2), (1e-2, 1e-2))}


def _close(got, want, what: str, rtol: float, atol: float) -> str | None:
    got = np.asarray(got.numpy() if isinstance(got, pm.Tensor) else got, np.float64)
    if isinstance(want, torch.Tensor) and want.is_sparse:  # embedding(sparse=True): dense here
        want = want.to_dense()
    want = np.asarray(want.detach().numpy() if isinstance(want, torch.Tensor) else want, np.float64)
    if got.shape != want.shape:
        return f"{what}: shape {got.shape}, torch {want.shape}"
    fin = np.isfinite(want)
    if not np.array_equal(fin, np.isfinite(got)) or not np.array_equal(np.isnan(want), np.isnan(got)):
        return f"{what}: non-finite entries differ"
    scale = max(1.0, float(np.abs(want[fin]).max())) if fin.any() else 1.0
    if not np.allclose(got[fin], want[fin], rtol=rtol, atol=atol * scale):
        return f"{what}: max |diff| {np.abs(got[fin] - want[fin]).max():.3g} (scale {scale:.3g})"
    return None


def _torch(o, fwd, sample, named=None):
    """torch's result for a sample; named: our parameter names bound to (leaf) torch tensors."""
    if named is None:
        return o.op(sample.input, *sample.args, **sample.kwargs)
    params = list(inspect.signature(fwd).parameters)
    pos = [named[p] for p in params[:1 + len(sample.args)]]
    return o.op(*pos, **{k: named.get(k, v) for k, v in sample.kwargs.items()})


def _run(o, fwd, bwd, sample, dtype=torch.float32, ref=None) -> tuple[str, str]:
    """('passed' | 'refused' | 'mismatch', detail) of one sample. ref: the sample torch computes,
    by default the same one; a float64 copy judges float16 results against exact math."""
    args = [_np(sample.input), *(_np(a) for a in sample.args)]
    kwargs = {k: _np(v) for k, v in sample.kwargs.items()}
    sample = sample if ref is None else ref
    try:
        y = fwd(*args, **kwargs)
    except (ValueError, TypeError) as e:
        return "refused", f"{type(e).__name__}: {e}"
    with torch.no_grad():
        want = _torch(o, fwd, sample)
    ys = y if isinstance(y, tuple) else (y,)
    ws = want if isinstance(want, tuple) else (want,)
    for i, (a, b) in enumerate(zip(ys, ws)):
        err = _close(a, b, f"output {i}", *TOLS[dtype][0])
        if err:
            return "mismatch", err
    if bwd is None or not isinstance(ws[0], torch.Tensor) or not ws[0].is_floating_point():
        return "passed", ""
    # gradients of the float tensors among our forward's bound arguments; our backward returns
    # one entry per tensor parameter, in our parameter order
    bound = inspect.signature(fwd).bind(sample.input, *sample.args, **sample.kwargs).arguments
    tensors = [n for n, v in bound.items() if isinstance(v, torch.Tensor)]
    names = [n for n in tensors if bound[n].is_floating_point()]
    while True:  # torch refuses requires_grad on some arguments (cross_entropy's weight)
        leaves = {n: bound[n].detach().clone().requires_grad_(True) for n in names}
        try:
            out = _torch(o, fwd, sample, {**bound, **leaves})
            break
        except RuntimeError as e:
            drop = [n for n in names if f"argument '{n}'" in str(e)]
            if not drop:
                raise
            names.remove(drop[0])
    out0 = out[0] if isinstance(out, tuple) else out
    g = torch.randn(out0.shape, generator=torch.Generator().manual_seed(0))
    g = g.to(out0.dtype if ref is None else dtype)  # float64 reference: the same float16 values
    try:
        grads = torch.autograd.grad(out0, list(leaves.values()), g.to(out0.dtype), allow_unused=True)
    except RuntimeError as e:  # torch refuses the gradient (embedding: sparse + scale_grad_by_freq)
        try:
            bwd(g.numpy() if out0.ndim or dtype != torch.float32 else float(g), *args, **kwargs)
        except (ValueError, TypeError) as ours:
            return "torch_refuses", f"backward refused by both: torch {e}; ours {ours}"
        return "mismatch", f"torch refuses the gradient ({e}), ours computes one"
    try:
        ours = bwd(g.numpy() if out0.ndim or dtype != torch.float32 else float(g), *args, **kwargs)
    except (ValueError, TypeError) as e:
        return "refused", f"backward {type(e).__name__}: {e}"
    ours = ours if isinstance(ours, tuple) else (ours,)
    for n, tg in zip(names, grads):
        i = tensors.index(n)
        mine = ours[i] if i < len(ours) else None
        if tg is None:
            continue
        if mine is None:
            if n == "input":
                return "mismatch", "no gradient for input"
            continue
        err = _close(mine, tg, f"grad {n}", *TOLS[dtype][1])
        if err:
            return "mismatch", err
    return "passed", ""


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_opinfo_samples(dtype):
    db = [o for o in _op_db() if o.name in OPS and not o.variant_test_name]
    assert {o.name for o in db} == set(OPS), set(OPS) - {o.name for o in db}
    counts = {"passed": 0, "refused": 0, "torch_refuses": 0, "mismatch": 0}
    details: list[str] = []
    for o in db:
        fwd, bwd = OPS[o.name]
        samples = list(o.sample_inputs("cpu", dtype, requires_grad=False))
        if not ALL and len(samples) > SAMPLES_PER_OP:
            step = len(samples) / SAMPLES_PER_OP
            samples = [samples[int(i * step)] for i in range(SAMPLES_PER_OP)]
        for k, s in enumerate(samples):
            status, detail = _run(o, fwd, bwd, s, dtype)
            if status == "mismatch" and dtype == torch.float16:
                # torch's CPU float16 kernels round their intermediates in float16 and may land
                # farther from the exact result than ours (float accumulation): the arbiter is
                # float64 math on the same float16 inputs, at the same float16 tolerance
                exact = s.transform(lambda t: t.double() if _is_float(t) else t)
                status, detail = _run(o, fwd, bwd, s, dtype, ref=exact)
            counts[status] += 1
            if status != "passed":
                details.append(f"{o.name} sample {k}: {status}: {detail}")
    print(f"\nOpInfo {str(dtype)[6:]} samples: {counts}")
    for d in details:
        print("  ", d)
    bad = [d for d in details if ": mismatch:" in d]
    assert not bad, "\n".join(bad)
    assert counts["passed"] > counts["refused"]
