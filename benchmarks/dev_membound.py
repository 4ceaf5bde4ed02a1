"""Memory-bound kernels, numbered versions side by side (kernels/dev/membound.metal and the
production ops), each validated against numpy on a small awkward shape, then timed on the large
shape against PyTorch and against a copy of the same bytes in the same run.

Every row: the version's device time per call (`us`), GB/s of the bytes the op must move (each
input read once, each output written once), `vs_copy` (fraction of CuPy's device-to-device copy
bandwidth for the same byte count, same run), `vs_torch` (PyTorch's time / ours; > 1: faster),
and `us_eager`, the production op timed the way the bench_* tables time it (one call between two
events, the GPU idle before it, so the host's launch latency is inside the figure).

How `us` is measured on cuda: ten calls back to back between two events, per sample; for ours the
calls are one captured launch list (Device.capture, a CUDA graph) replayed, so the figure is the
kernels' device time, without the Python wrapper's cost; torch and the copy are called back to
back (their launch cost, a few microseconds, hides behind the previous call's kernel). The row
`prod` is the production op (the kernels F.<op> launches today); `prod eager` is the same op
called back to back without capture (host cost included when it exceeds the kernel time).

Versions (see kernels/dev/membound.metal's note):
  mul_bias   prod (arith.metal arith_chan: stream.h chunks, one plane lookup per chunk)
             v1 (arith_ew, the earlier production: divisions per 4 outputs, 8-byte half loads)
             v2 chan_affine (kernels/dev: the same layout, multiply-add and activation fused)
  bias_relu  prod F.add(x, b, activation="relu"): arith_chan with the activation fused, one pass
             (what the graph's bias + neuron fusion calls)  v0 F.relu(F.add(x, b)): two passes
             (the row measured as prod before)  v1 (v0 with arith_ew)  v2 chan_affine with the
             activation (kernels/dev, one pass)
  add_relu   prod F.add(a, b, activation="relu") (one pass; the graph's fused residual add + relu)
             v1 F.relu(F.add(a, b)) (two passes)
  sum_bias   prod sum_rows_part + sum_rows_finish (arith.metal: v3's kernel, float partials;
             4 chunks per thread, so 8192 elements per threadgroup in float16 where v3 had 4096)
             v1 reduce_inner + finish (the earlier production)  v2/v3 chan_sum (kernels/dev:
             16-byte loads, 1/2 chunks in flight)
  mean_all   prod sum_rows_* as one row (8 chunks per thread, 3136 float32 partials added by
             one threadgroup, 8 loads in flight per thread)  v1 reduce_inner + finish (the earlier
             production: up to 8192 partials added by one simdgroup)
  bn_train_fwd, bn_bwd, bn_bwd_relu (ResNet 56x56 planes; InceptionV3 35x35, 17x17)
             prod: norm_part_vec / norm_apply_vec where the layout allows, else norm_part with 8
             elements per step;  v1: the earlier production (scalar, one element per step,
             norm.KERNELS = "scalar_u1");  v1b: the scalar kernels of now (KERNELS = "scalar");
             v2/v3 (56x56): chan_stats (kernels/dev) + norm finalize + norm_apply_vec
             bn_train_fwd v1c: the earlier production (norm.KERNELS = "vec_welford":
             norm_part_vec's statistics as a Welford block per chunk, a Welford threadgroup
             reduction; scalar norm_part for 17x17); prod's norm_part_vec statistics are
             shifted sums (d = x - K, K the chunk's first element) reduced as plain sums
             bn_train_fwd 17x17: prod's statistics are norm_part_planes (one simdgroup per
             plane over the aligned 16-byte chunks covering it, neighbours masked; HW = 289 is
             not whole chunks), v1b's the scalar norm_part (the earlier production there);
             prod there is batch_norm_fwd_res (the channel in registers, one kernel), v4 the
             three kernels (norm_part_planes, finalize, norm_apply_vec: the production before)
  bn_eval    prod  v1 norm_apply (scalar)  v2 norm_apply_vec (production from this version)
  group_norm_fwd  prod  v1 (earlier production)
  softmax_fwd/bwd, log_softmax_fwd/bwd (4096 x 1000)  prod: softmax.metal's row kernels (one
             simdgroup per row, the row in registers)  v1: the tile kernels (earlier production)
  max_pool2d_bwd_noidx (3x3 / 2 / 1 on 32x64x112x112, no indices given)  prod: indices made by
             the forward kernel first, then the indices gradient  v1: argmax recomputed per
             candidate window (earlier production)  idx: with the forward's indices
  avg_pool2d_3x3s1 (InceptionV3 32x192x35x35)  prod: pool.metal  v2: strips of 4 outputs per
             thread sharing row sums (kernels/dev)
  max_pool2d_fwd, avg_pool2d_fwd, avg_pool2d_3x3s1  prod: the fixed-window kernels (*_fwd_k3x3:
             every tap loaded before the first comparison)  v1: the generic window loops (earlier
             production); max_pool2d_bwd_noidx v1b: the earlier production (indices by the
             generic forward, the s2x2 tile gradient's runtime candidate loops; prod's _c2x2
             loads its 2 x 2 candidates together)
  cross_entropy_fwd_bwd (4096 x 1000, labels)  prod: loss.metal's row kernels (one simdgroup
             per row)  v1: the tile kernels (earlier production)
  mse_loss_bwd  prod loss_pw_bwd_plain (no weights, scalar gradient: g read once, x and t
             chunks loaded together, no per-element branch)  v1 loss_pw_bwd_vec (the earlier
             production)
  concat_c   prod concat_stream (copy.metal: stream.h chunks, STREAM_U per thread, one pass)
             v1 concat8 (the earlier production: grid-stride, one 16-byte access in flight)
  cast       prod (float16 input: cast_flat_h2f, lanes on consecutive 4-element quads: dense
             float stores)  v1 copy_flat (8 elements per lane, two float4 stores 32 bytes apart;
             the earlier production; a float32 input: the same kernel as prod)
  add, relu, copy, dropout (fwd+bwd, labels checked
  on the device), max_pool2d/avg_pool2d fwd+bwd, group_norm fwd/bwd: prod (diagnostic: device
  time vs eager time vs torch)

    PYTHONPATH=. PYMETALNN_BACKEND=cuda python benchmarks/dev_membound.py [--quick]
        [--only mul_bias,sum_bias,...] [--dtype float32|float16]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from typing import Any, Callable

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import common  # noqa: E402
import membound_refs as ref  # noqa: E402

import pymetalnn as pm  # noqa: E402
from pymetalnn import functional as F  # noqa: E402
from pymetalnn.ops import _common as oc  # noqa: E402
from pymetalnn.params import NormParams  # noqa: E402

DEV_SOURCE = "dev/membound.metal"
BATCH = 10  # calls between two events per sample


# ---- timing ----------------------------------------------------------------------------------

def _reps(quick: bool) -> int:
    return 3 if quick else 10


def time_peer(dev: pm.Device, fn: Callable[[], Any], quick: bool) -> float:
    if dev.name == "cuda":
        return common.time_cuda(fn, 1, _reps(quick), BATCH)[0]
    sec, _ = common.time_host(fn, lambda: None, warmup=1, reps=2 if quick else 5)
    return sec


# ---- helpers ---------------------------------------------------------------------------------

def tol(dtype: Any) -> float:
    return 2e-2 if dtype == np.float16 else 2e-5


def close(got: Any, want: Any, dtype: Any) -> bool:
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    if got.shape != want.shape:
        got = got.reshape(want.shape)
    t = tol(dtype)
    return bool(np.all(np.abs(got - want) <= t * (1 + np.abs(want))))


def k(dev: pm.Device, name: str) -> Any:
    return dev.library(DEV_SOURCE).kernel(name)


def kp(dev: pm.Device, name: str) -> Any:
    return dev.library("norm.metal").kernel(name)


def sfx(dtype: Any) -> str:
    return "float" if np.dtype(dtype) == np.float32 else "half"


def torch_of(dev: pm.Device) -> Any:
    if not common.torch_available(dev):
        return None
    import torch

    common.disable_tf32()
    return torch


def _with(module: str, fn: Callable[[], Any], **values: Any) -> Any:
    """fn() with the module settings pymetalnn.ops.<module>.<name> = value, then as before."""
    import importlib

    mod = importlib.import_module(f"pymetalnn.ops.{module}")
    saved = {k: getattr(mod, k) for k in values}
    for k, v in values.items():
        setattr(mod, k, v)
    try:
        return fn()
    finally:
        for k, v in saved.items():
            setattr(mod, k, v)


def _with_kernels(module: str, kind: str, fn: Callable[[], Any]) -> Any:
    """fn() with pymetalnn.ops.<module>.KERNELS = kind."""
    return _with(module, fn, KERNELS=kind)


def scalar_norm(fn: Callable[[], Any], kind: str = "scalar_u1") -> Any:
    """fn() with norm.py's kernel choice set to `kind` ("scalar_u1": the production before the
    16-byte-chunk kernels and the unrolled statistics; "scalar": the scalar kernels of now;
    "vec_welford": the production before the shifted-sum and per-plane statistics)."""
    return _with_kernels("norm", kind, fn)


def split_bn(fn: Callable[[], Any]) -> Any:
    """fn() with batch norm's one-kernel training forward off (norm.RESIDENT = "off": the
    partials, finalize and apply kernels, the production before batch_norm_fwd_res)."""
    return _with("norm", fn, RESIDENT="off")


def generic_pool(fn: Callable[[], Any]) -> Any:
    """fn() with pool.py's fixed-window forward kernels and the tile gradient's unrolled
    candidates off (FIXED_WINDOWS = (), UNROLLED_CANDIDATES = False: the runtime loops, one load
    in flight per thread, the production before max/avg_pool2d_fwd_k* and _c2x2)."""
    return _with("pool", fn, FIXED_WINDOWS=(), UNROLLED_CANDIDATES=False)


def general_arith(fn: Callable[[], Any]) -> Any:
    """fn() with arith.py's channel path off (arith_ew, the earlier production)."""
    return _with_kernels("arith", "general", fn)


def general_copy(fn: Callable[[], Any]) -> Any:
    """fn() with copy.py's stream concat / split off (concat8 / split8, the earlier production)."""
    return _with_kernels("copy", "general", fn)


def general_loss(fn: Callable[[], Any]) -> Any:
    """fn() with loss.py's plain pointwise backward off (loss_pw_bwd_vec, the earlier production)."""
    return _with_kernels("loss", "general", fn)


def cast_v1(dev: pm.Device, ctx: dict, to: Any) -> pm.Tensor:
    """half -> float through copy_flat (8-element chunks per lane, the earlier production); a
    float input is cast by the production op (the same kernel as prod)."""
    if ctx["dtype"] != np.float16:
        return F.cast(ctx["x"], to)
    from pymetalnn.params import CopyParams

    n = int(np.prod(ctx["shape"]))
    out = ctx.setdefault("cast_out", pm.empty(ctx["shape"], np.float32, dev))
    nvec = n // 8
    p = CopyParams(n=n, rows=1, cols=n, vec=nvec, src_pitch=n, dst_pitch=n, src_off=0, dst_off=0)
    dev.library("copy.metal").kernel("cast_fwd_tofloat_half_flat_v1")(
        oc.stream_count(n, 8, nvec), ctx["x"].buffer, out.buffer, p)
    return out


def bn_params(shape: tuple, **kw: Any) -> NormParams:
    """NormParams of batch norm over (N, C, HW) in row mode, as norm.py's _bn_params."""
    from pymetalnn.ops import norm as nm

    n, c = shape[0], shape[1]
    hw = int(np.prod(shape[2:]))
    p = NormParams(N=n, C=c, HW=hw, G=1, rows=c, row_len=n * hw, inner_len=hw, outer_stride=c * hw,
                   row_stride=hw, planes=c, total=n * c * hw, **kw)
    nm._row_plan(p)
    return p


# ---- families --------------------------------------------------------------------------------
# A family: make(dev, shape, dtype) -> ctx; ref(ctx) -> expected numpy result; versions:
# name -> fn(dev, ctx) returning the result Tensor (validated, then timed); peer(ctx) -> a torch
# callable or None; nbytes(ctx) -> minimal bytes moved.

class Family:
    def __init__(self, name: str, make: Callable, ref: Callable | None, versions: dict,
                 peer: Callable | None, nbytes: Callable, small: tuple, large: tuple,
                 result: Callable | None = None):
        self.name, self.make, self.ref, self.versions = name, make, ref, versions
        self.peer, self.nbytes, self.small, self.large = peer, nbytes, small, large
        self.result = result or (lambda out: out.numpy())


def _img(dev: pm.Device, shape: tuple, dtype: Any, seed: int = 0) -> dict:
    r = np.random.default_rng(seed)
    c = shape[1]
    x = r.standard_normal(shape, dtype=np.float32).astype(dtype)
    y = (r.standard_normal(shape, dtype=np.float32) + 4).astype(dtype)
    w = (r.standard_normal((1, c, 1, 1)) + 1).astype(dtype)
    b = r.standard_normal((1, c, 1, 1)).astype(dtype)
    ctx = {"shape": shape, "dtype": dtype, "x_np": x, "y_np": y, "w_np": w, "b_np": b}
    for key in ("x", "y", "w", "b"):
        ctx[key] = pm.tensor(ctx[key + "_np"], dev)
    ctx["out"] = pm.empty(shape, dtype, dev)
    return ctx


def chan_affine(dev: pm.Device, ctx: dict, act: int, has_w: bool, has_b: bool) -> pm.Tensor:
    shape, dtype = ctx["shape"], ctx["dtype"]
    p = bn_params(shape, has_weight=int(has_w), has_bias=int(has_b), act=act)
    w = 16 // np.dtype(dtype).itemsize
    k(dev, f"chan_affine_v2_{sfx(dtype)}")(oc.stream_vthreads(p.total // w), ctx["x"].buffer,
                                           ctx["w"].buffer, ctx["b"].buffer, ctx["out"].buffer, p)
    return ctx["out"]


def chan_sum(dev: pm.Device, ctx: dict, v: str) -> pm.Tensor:
    shape, dtype = ctx["shape"], ctx["dtype"]
    p = bn_params(shape, eps=1.0)
    part = ctx.setdefault("part", pm.empty((p.rows * p.chunks, 4), np.float32, dev))
    out = ctx.setdefault("sum_out", pm.empty((1, shape[1], 1, 1), dtype, dev))
    k(dev, f"chan_sum_{v}_{sfx(dtype)}")(min(p.rows * p.chunks, oc.MAX_GROUPS) * 256,
                                         ctx["x"].buffer, part.buffer, p)
    k(dev, f"chan_sum_finish_{sfx(dtype)}")(min(p.rows, oc.MAX_GROUPS) * 256, part.buffer,
                                            out.buffer, p)
    return out


def bn_train_fwd_dev(dev: pm.Device, ctx: dict, v: str) -> pm.Tensor:
    """chan_stats_<v> partials, production finalize (writes coef), norm_apply_vec."""
    shape, dtype = ctx["shape"], ctx["dtype"]
    c = shape[1]
    p = bn_params(shape, has_weight=1, has_bias=1, has_running=1, training=1, eps=1e-5,
                  momentum=0.1)
    part = ctx.setdefault("part", pm.empty((p.rows * p.chunks, 4), np.float32, dev))
    mean = ctx.setdefault("mean", pm.empty((c,), np.float32, dev))
    inv = ctx.setdefault("inv", pm.empty((c,), np.float32, dev))
    coef = ctx.setdefault("coef", pm.empty((c, 4), np.float32, dev))
    k(dev, f"chan_stats_{v}_{sfx(dtype)}")(min(p.rows * p.chunks, oc.MAX_GROUPS) * 256,
                                           ctx["x"].buffer, part.buffer, p)
    kp(dev, "batch_norm_finalize_fwd_float")(min(c, oc.MAX_GROUPS) * 256, part.buffer,
                                             ctx["rm"].buffer, ctx["rv"].buffer, mean.buffer,
                                             inv.buffer, p, ctx["bw"].buffer, ctx["bb"].buffer,
                                             coef.buffer)
    w = 16 // np.dtype(dtype).itemsize
    kp(dev, f"norm_apply_fwd_vec_{sfx(dtype)}")(oc.stream_vthreads(p.total // w), ctx["x"].buffer,
                                                oc.dummy(dev), coef.buffer, ctx["out"].buffer, p)
    return ctx["out"]


def _bn_ctx(dev: pm.Device, shape: tuple, dtype: Any) -> dict:
    ctx = _img(dev, shape, dtype)
    c = shape[1]
    r = np.random.default_rng(3)
    ctx["bw_np"] = (r.standard_normal(c) + 1).astype(np.float32)
    ctx["bb_np"] = r.standard_normal(c).astype(np.float32)
    ctx["bw"], ctx["bb"] = pm.tensor(ctx["bw_np"], dev), pm.tensor(ctx["bb_np"], dev)
    ctx["rm"] = pm.tensor(np.zeros(c, np.float32), dev)
    ctx["rv"] = pm.tensor(np.ones(c, np.float32), dev)
    ctx["g"] = pm.tensor((ctx["x_np"] * 0.5 + 0.1).astype(dtype), dev)
    _, ctx["sm"], ctx["si"] = F.batch_norm_with_stats(ctx["x"], ctx["rm"], ctx["rv"], ctx["bw"],
                                                      ctx["bb"], True)
    return ctx


def bn_eval_apply(dev: pm.Device, ctx: dict, vec: bool) -> pm.Tensor:
    shape, dtype = ctx["shape"], ctx["dtype"]
    c = shape[1]
    p = bn_params(shape, has_weight=1, has_bias=1, eps=1e-5)
    coef = ctx.setdefault("ecoef", pm.empty((c, 4), np.float32, dev))
    mean = ctx.setdefault("emean", pm.empty((c,), np.float32, dev))
    inv = ctx.setdefault("einv", pm.empty((c,), np.float32, dev))
    kp(dev, "batch_norm_coef_fwd_float")(c, ctx["bw"].buffer, ctx["bb"].buffer, ctx["rm"].buffer,
                                         ctx["rv"].buffer, mean.buffer, inv.buffer, coef.buffer, p)
    if vec:
        w = 16 // np.dtype(dtype).itemsize
        kp(dev, f"norm_apply_fwd_vec_{sfx(dtype)}")(oc.stream_vthreads(p.total // w),
                                                    ctx["x"].buffer, oc.dummy(dev), coef.buffer,
                                                    ctx["out"].buffer, p)
    else:
        groups = min(-(-p.total // (256 * 4)), oc.MAX_GROUPS)
        kp(dev, f"norm_apply_fwd_{sfx(dtype)}")(groups * 256, ctx["x"].buffer, oc.dummy(dev),
                                                coef.buffer, ctx["out"].buffer, p)
    return ctx["out"]


def _softmax_ctx(dev: pm.Device, shape: tuple, dtype: Any) -> dict:
    r = np.random.default_rng(0)
    x = (r.standard_normal(shape) * 2).astype(dtype)
    lab = r.integers(0, shape[1], shape[0]).astype(np.int32)
    g = r.standard_normal(shape).astype(dtype)
    e = np.exp(x.astype(np.float64) - x.max(1, keepdims=True))
    y = (e / e.sum(1, keepdims=True)).astype(dtype)
    # labels checked once (F.class_labels, as a training loop does when a batch arrives), the
    # upstream gradient a device scalar: no host transfer inside a call (captured as a graph)
    return {"shape": shape, "dtype": dtype, "x_np": x, "x": pm.tensor(x, dev), "lab_np": lab,
            "lab": F.class_labels(lab, shape[1], device=dev), "one": pm.tensor(np.ones(1, np.float32), dev),
            "lab_plain": pm.tensor(lab, dev), "g_np": g, "g": pm.tensor(g, dev), "y_np": y,
            "y": pm.tensor(y, dev), "ly_np": np.log(y.astype(np.float64)).astype(dtype),
            "ly": pm.tensor(np.log(y.astype(np.float64)).astype(dtype), dev),
            "out": pm.empty(shape, dtype, dev)}


def softmax_tiles(dev: pm.Device, ctx: dict, log: bool, bwd: bool) -> pm.Tensor:
    """softmax.metal's tile kernels (the production before the row kernels) on (rows, len)."""
    from pymetalnn.ops import softmax as sm

    rows, length = ctx["shape"]
    p = sm.tile_plan(rows, length, 1, cache_arrays=1 if (log or not bwd) else 2)
    name = f"{'log_' if log else ''}softmax_{'bwd' if bwd else 'fwd'}_{sfx(ctx['dtype'])}"
    y = ctx["ly" if log else "y"]
    bufs = [ctx["g"].buffer, y.buffer] if bwd else [ctx["x"].buffer]
    dev.library("softmax.metal").kernel(name)(sm.tile_groups(p) * sm.TG, *bufs, ctx["out"].buffer,
                                              p)
    return ctx["out"]


def ce_fwd_bwd(c: dict, tiles: bool = False) -> Any:
    """cross_entropy then its backward (labels checked once); tiles: loss.metal's tile kernels
    (the earlier production) instead of the row kernels."""
    from pymetalnn.ops import loss as lo

    keep = lo.row_plan
    if tiles:
        lo.row_plan = lambda *a, **k: None
    try:
        return (F.cross_entropy(c["x"], c["lab"]),
                F.cross_entropy_backward(c["one"], c["x"], c["lab"], target_grad=False))[1]
    finally:
        lo.row_plan = keep


def _t_cast(T: Any, c: dict, t: dict) -> Callable:
    to = T.empty(c["shape"], device="cuda",
                 dtype=T.float16 if c["dtype"] == np.float32 else T.float32)
    return lambda: to.copy_(t["x"])


def _t_mse_bwd(T: Any, t: dict) -> Callable:
    one = T.ones((), device=t["x"].device, dtype=t["x"].dtype)
    return lambda: T.ops.aten.mse_loss_backward(one, t["x"], t["y"], 1)


def _t_group_norm(T: Any, t: dict) -> Callable:
    tw, tb = t["bw"].to(t["x"].dtype), t["bb"].to(t["x"].dtype)
    return lambda: T.nn.functional.group_norm(t["x"], 32, tw, tb)


def avg_pool3_v2(dev: pm.Device, ctx: dict) -> pm.Tensor:
    """kernels/dev avg_pool3_s1_fwd_v2: 3x3 / stride 1 / padding 1, count_include_pad."""
    from pymetalnn.params import CONST, Pool2dParams

    n, c, h, w = ctx["shape"]
    strips = -(-h // 4)  # AP_ROWS
    q = Pool2dParams(planes=n * c, IH=h, IW=w, OH=h, OW=w, KH=3, KW=3, SH=1, SW=1, PH=1, PW=1,
                     DH=1, DW=1, flags=int(CONST["POOL_COUNT_PAD"]), divisor=0, tiles_h=strips)
    out = ctx.setdefault("pool_out", pm.empty((n, c, h, w), ctx["dtype"], dev))
    k(dev, f"avg_pool3_s1_fwd_v2_{sfx(ctx['dtype'])}")(n * c * strips * w, ctx["x"].buffer,
                                                      out.buffer, q)
    return out


def families(dev: pm.Device, torch: Any) -> list[Family]:
    img_large, img_small = (32, 256, 56, 56), (3, 5, 12, 12)
    fams: list[Family] = []
    n_of = lambda c: int(np.prod(c["shape"]))  # noqa: E731
    isz = lambda c: np.dtype(c["dtype"]).itemsize  # noqa: E731
    T = torch

    # element-wise, same shape
    fams.append(Family(
        "add", _img, lambda c: ref.f32(c["x_np"]) + ref.f32(c["y_np"]),
        {"prod": lambda d, c: F.add(c["x"], c["y"])},
        (lambda c, t: (lambda: T.add(t["x"], t["y"], out=t["out"]))) if T else None,
        lambda c: 3 * n_of(c) * isz(c), img_small, img_large))
    fams.append(Family(
        "relu", _img, lambda c: np.maximum(c["x_np"], 0),
        {"prod": lambda d, c: F.relu(c["x"])},
        (lambda c, t: (lambda: T.clamp_min(t["x"], 0, out=t["out"])))
        if T else None,
        lambda c: 2 * n_of(c) * isz(c), img_small, img_large))
    fams.append(Family(
        "add_relu", _img, lambda c: np.maximum(ref.f32(c["x_np"]) + ref.f32(c["y_np"]), 0),
        {"prod": lambda d, c: F.add(c["x"], c["y"], activation="relu"),
         "v1": lambda d, c: F.relu(F.add(c["x"], c["y"]))},
        (lambda c, t: (lambda: T.relu_(T.add(t["x"], t["y"], out=t["out"])))) if T else None,
        lambda c: 3 * n_of(c) * isz(c), img_small, img_large))
    def mse_ctx(d: pm.Device, shape: tuple, dtype: Any) -> dict:
        # the incoming gradient made once here: an upload inside the timed call is a host
        # synchronization (it failed every capture and made the eager figure the host's time)
        ctx = _img(d, shape, dtype)
        ctx["one"] = pm.tensor(np.ones(1, np.float32), d)
        return ctx

    fams.append(Family(
        "mse_loss_bwd", mse_ctx, lambda c: 2 * (ref.f32(c["x_np"]) - ref.f32(c["y_np"])) / c["x_np"].size,
        {"prod": lambda d, c: F.mse_loss_backward(c["one"], c["x"], c["y"], target_grad=False)[0],
         "v1": lambda d, c: general_loss(lambda: F.mse_loss_backward(
             c["one"], c["x"], c["y"], target_grad=False)[0])},
        (lambda c, t: _t_mse_bwd(T, t)) if T and dev.name == "cuda" else None,
        lambda c: 3 * n_of(c) * isz(c), img_small, img_large))
    fams.append(Family(
        "copy", _img, lambda c: c["x_np"], {"prod": lambda d, c: F.copy(c["x"])},
        (lambda c, t: (lambda: t["out"].copy_(t["x"]))) if T else None,
        lambda c: 2 * n_of(c) * isz(c), img_small, img_large))

    def cast_other(c: dict) -> Any:
        return np.float16 if c["dtype"] == np.float32 else np.float32

    fams.append(Family(
        "cast", _img, lambda c: c["x_np"].astype(cast_other(c)),
        {"prod": lambda d, c: F.cast(c["x"], cast_other(c)),
         "v1": lambda d, c: cast_v1(d, c, cast_other(c))},
        (lambda c, t: _t_cast(T, c, t))
        if T and dev.name == "cuda" else None,
        lambda c: n_of(c) * (isz(c) + np.dtype(cast_other(c)).itemsize), img_small, img_large))
    def concat_ctx(d: pm.Device, shape: tuple, dtype: Any) -> dict:
        ctx = _img(d, shape, dtype)
        half = (shape[0], shape[1] // 2, *shape[2:])
        ctx["a_np"] = ctx["x_np"][:, : shape[1] // 2].copy()
        ctx["b_np"] = ctx["x_np"][:, shape[1] // 2:].copy()
        ctx["a"], ctx["b2"] = pm.tensor(ctx["a_np"], d), pm.tensor(ctx["b_np"], d)
        ctx["half"] = half
        return ctx

    fams.append(Family(
        "concat_c", concat_ctx, lambda c: c["x_np"],
        {"prod": lambda d, c: F.concat([c["a"], c["b2"]], 1),
         "v1": lambda d, c: general_copy(lambda: F.concat([c["a"], c["b2"]], 1))},
        (lambda c, t: (lambda: T.cat([t["a"], t["b2"]], 1, out=t["out"]))) if T else None,
        lambda c: 2 * n_of(c) * isz(c), (3, 16, 12, 12), img_large))
    fams.append(Family(
        "dropout", _img, None, {"prod": lambda d, c: F.dropout(c["x"], 0.1, seed=1, offset=0)},
        (lambda c, t: (lambda: T.ops.aten.native_dropout(t["x"], 0.1, True)))
        if T else None,
        lambda c: 2 * n_of(c) * isz(c), img_small, img_large))

    # channel broadcast
    fams.append(Family(
        "mul_bias", _img, lambda c: ref.f32(c["x_np"]) * ref.f32(c["w_np"]),
        {"prod": lambda d, c: F.mul(c["x"], c["w"]),
         "v1": lambda d, c: general_arith(lambda: F.mul(c["x"], c["w"])),
         "v2": lambda d, c: chan_affine(d, c, 0, True, False)},
        (lambda c, t: (lambda: T.mul(t["x"], t["w"], out=t["out"]))) if T else None,
        lambda c: 2 * n_of(c) * isz(c), img_small, img_large))
    relu_code = 1  # NN_ACT_RELU
    from pymetalnn.params import CONST
    relu_code = int(CONST.get("NN_ACT_RELU", relu_code))
    fams.append(Family(
        "bias_relu", _img,
        lambda c: np.maximum(ref.f32(c["x_np"]) + ref.f32(c["b_np"]), 0).astype(c["dtype"]),
        {"prod": lambda d, c: F.add(c["x"], c["b"], activation="relu"),
         "v0": lambda d, c: F.relu(F.add(c["x"], c["b"])),
         "v1": lambda d, c: general_arith(lambda: F.relu(F.add(c["x"], c["b"]))),
         "v2": lambda d, c: chan_affine(d, c, relu_code, False, True)},
        (lambda c, t: (lambda: T.relu_(T.add(t["x"], t["b"], out=t["out"])))) if T else None,
        lambda c: 2 * n_of(c) * isz(c), img_small, img_large))

    # per-channel reduction (a bias gradient); the check shape's rows (3 x 40 x 40 elements) are
    # long enough for the chunked sums (arith.py MIN_ROW_ELEMS)
    sum_small = (3, 5, 40, 40)
    fams.append(Family(
        "sum_bias", _img, lambda c: c["x_np"].astype(np.float64).sum((0, 2, 3), keepdims=True),
        {"prod": lambda d, c: F.sum(c["x"], (0, 2, 3), keepdim=True),
         "v1": lambda d, c: general_arith(lambda: F.sum(c["x"], (0, 2, 3), keepdim=True)),
         "v2": lambda d, c: chan_sum(d, c, "v2"), "v3": lambda d, c: chan_sum(d, c, "v3")},
        (lambda c, t: (lambda: t["x"].sum((0, 2, 3), keepdim=True))) if T else None,
        lambda c: n_of(c) * isz(c), sum_small, img_large))
    fams.append(Family(
        "mean_all", _img, lambda c: np.array(c["x_np"].astype(np.float64).mean()),
        {"prod": lambda d, c: F.mean(c["x"]),
         "v1": lambda d, c: general_arith(lambda: F.mean(c["x"]))},
        (lambda c, t: (lambda: t["x"].mean())) if T else None,
        lambda c: n_of(c) * isz(c), sum_small, img_large))

    # batch norm
    def t_bn(c: dict, t: dict, training: bool) -> Callable:
        tx, tw, tb = t["x"], t["bw"], t["bb"]
        trm, trv = T.zeros(c["shape"][1], device=tx.device), T.ones(c["shape"][1], device=tx.device)
        return lambda: T.nn.functional.batch_norm(tx, trm, trv, tw, tb, training)

    def t_bn_bwd(c: dict, t: dict) -> Callable:
        tx, tg, tw, tm, ti = t["x"], t["g"], t["bw"], t["sm"], t["si"]
        return lambda: T.ops.aten.native_batch_norm_backward(
            tg, tx, tw, None, None, tm, ti, True, 1e-5, [True, True, True])

    # ResNet stage 1 (HW a multiple of the chunk), InceptionV3 35x35 and 17x17 (odd planes)
    for tag, large in (("", img_large), (" 35x35", (32, 288, 35, 35)), (" 17x17", (32, 768, 17, 17))):
        # check shape: 7x7 planes (not whole 16-byte chunks), 8 x 5 planes: a multiple of the
        # chunk in all, as norm_part_planes needs
        small = img_small if not tag else (8, 5, 7, 7)
        fams.append(Family(
            "bn_train_fwd" + tag, _bn_ctx, ref.bn_train,
            {"prod": lambda d, c: F.batch_norm(c["x"], c["rm"], c["rv"], c["bw"], c["bb"], True),
             "v1": lambda d, c: scalar_norm(lambda: F.batch_norm(c["x"], c["rm"], c["rv"], c["bw"],
                                                                 c["bb"], True)),
             "v1b": lambda d, c: scalar_norm(lambda: F.batch_norm(c["x"], c["rm"], c["rv"],
                                                                  c["bw"], c["bb"], True), "scalar"),
             "v1c": lambda d, c: scalar_norm(lambda: F.batch_norm(c["x"], c["rm"], c["rv"],
                                                                  c["bw"], c["bb"], True),
                                             "vec_welford"),
             **({"v2": lambda d, c: bn_train_fwd_dev(d, c, "v2"),
                 "v3": lambda d, c: bn_train_fwd_dev(d, c, "v3")} if not tag else {}),
             **({"v4": lambda d, c: split_bn(lambda: F.batch_norm(c["x"], c["rm"], c["rv"],
                                                                 c["bw"], c["bb"], True))}
                if tag == " 17x17" else {})},
            (lambda c, t: t_bn(c, t, True)) if T else None,
            lambda c: 2 * n_of(c) * isz(c), small, large))
        fams.append(Family(
            "bn_eval" + tag, _bn_ctx, ref.bn_eval,
            {"prod": lambda d, c: F.batch_norm(c["x"], c["rm"], c["rv"], c["bw"], c["bb"], False),
             "v1": lambda d, c: bn_eval_apply(d, c, False),
             **({"v2": lambda d, c: bn_eval_apply(d, c, True)} if not tag else {})},
            (lambda c, t: t_bn(c, t, False)) if T else None,
            lambda c: 2 * n_of(c) * isz(c), small, large))

        def bn_bwd(c: dict) -> Any:
            return F.batch_norm_backward(c["g"], c["x"], c["rm"], c["rv"], c["bw"], c["bb"], True,
                                         save_mean=c["sm"], save_invstd=c["si"])[0]

        def bn_bwd_relu(c: dict) -> Any:
            return F.batch_norm_backward(c["g"], c["x"], c["rm"], c["rv"], c["bw"], c["bb"], True,
                                         save_mean=c["sm"], save_invstd=c["si"],
                                         activation="relu")[0]

        fams.append(Family(
            "bn_bwd" + tag, _bn_ctx, ref.bn_bwd,
            {"prod": lambda d, c: bn_bwd(c), "v1": lambda d, c: scalar_norm(lambda: bn_bwd(c)),
             "v1b": lambda d, c: scalar_norm(lambda: bn_bwd(c), "scalar")},
            t_bn_bwd if T and dev.name == "cuda" else None,
            lambda c: 3 * n_of(c) * isz(c), small, large))
        fams.append(Family(
            "bn_bwd_relu" + tag, _bn_ctx, None,
            {"prod": lambda d, c: bn_bwd_relu(c),
             "v1": lambda d, c: scalar_norm(lambda: bn_bwd_relu(c)),
             "v1b": lambda d, c: scalar_norm(lambda: bn_bwd_relu(c), "scalar")},
            None, lambda c: 3 * n_of(c) * isz(c), small, large))
    fams.append(Family(
        "group_norm_fwd", _bn_ctx, None,
        {"prod": lambda d, c: F.group_norm(c["x"], 1 if c["shape"][1] % 32 else 32, c["bw"],
                                           c["bb"]),
         "v1": lambda d, c: scalar_norm(lambda: F.group_norm(c["x"], 1 if c["shape"][1] % 32 else 32,
                                                             c["bw"], c["bb"]))},
        (lambda c, t: _t_group_norm(T, t)) if T and dev.name == "cuda" else None,
        lambda c: 2 * n_of(c) * isz(c), img_small, img_large))

    def gn_ctx(d: pm.Device, shape: tuple, dtype: Any) -> dict:
        ctx = _bn_ctx(d, shape, dtype)
        g = 32 if shape[1] % 32 == 0 else 1
        _, ctx["gm"], ctx["gr"] = F.group_norm_with_stats(ctx["x"], g, ctx["bw"], ctx["bb"])
        ctx["groups"] = g
        return ctx

    fams.append(Family(
        "group_norm_bwd", gn_ctx, None,
        {"prod": lambda d, c: F.group_norm_backward(c["g"], c["x"], c["groups"], c["bw"], c["bb"],
                                                    save_mean=c["gm"], save_rstd=c["gr"])[0]},
        None, lambda c: 3 * n_of(c) * isz(c), img_small, img_large))
    # softmax over the channels of an NCHW tensor (the tile kernels, W = 32 columns)
    fams.append(Family(
        "softmax_fwd NCHW dim1", _img,
        lambda c: np.exp(c["x_np"].astype(np.float64)) / np.exp(c["x_np"].astype(np.float64)).sum(
            1, keepdims=True),
        {"prod": lambda d, c: F.softmax(c["x"], 1)},
        (lambda c, t: (lambda: T.softmax(t["x"], 1))) if T else None,
        lambda c: 2 * n_of(c) * isz(c), img_small, img_large))

    # softmax / cross-entropy on (N, classes)
    sm_small, sm_large = (7, 1000), (4096, 1000)
    for log in (False, True):
        nm = "log_softmax" if log else "softmax"
        fwd_op = F.log_softmax if log else F.softmax
        bwd_op = F.log_softmax_backward_from_output if log else F.softmax_backward_from_output
        tf = T.log_softmax if T else None
        fams.append(Family(
            f"{nm}_fwd", _softmax_ctx,
            (lambda c, log=log: np.log(ref.softmax(c)) if log else ref.softmax(c)),
            {"prod": lambda d, c, f=fwd_op: f(c["x"], 1),
             "v1": lambda d, c, log=log: softmax_tiles(d, c, log, False)},
            (lambda c, t, log=log: (lambda: (T.log_softmax if log else T.softmax)(t["x"], 1)))
            if tf else None,
            lambda c: 2 * n_of(c) * isz(c), sm_small, sm_large))
        fams.append(Family(
            f"{nm}_bwd", _softmax_ctx, (lambda c, log=log: ref.softmax_bwd(c, log)),
            {"prod": lambda d, c, f=bwd_op, log=log: f(c["g"], c["ly" if log else "y"], 1),
             "v1": lambda d, c, log=log: softmax_tiles(d, c, log, True)},
            (lambda c, t, log=log: (lambda: T.ops.aten._log_softmax_backward_data(
                t["g"], t["ly"], 1, t["x"].dtype) if log else
                T.ops.aten._softmax_backward_data(t["g"], t["y"], 1, t["x"].dtype)))
            if T else None,
            lambda c: 3 * n_of(c) * isz(c), sm_small, sm_large))

    def t_ce(c: dict, t: dict) -> Callable:
        tx = t["x"].detach().clone().requires_grad_(True)
        tl = t["lab"].long()

        def f() -> None:
            loss = T.nn.functional.cross_entropy(tx, tl)
            T.autograd.grad(loss, tx)
        return f

    fams.append(Family(
        "cross_entropy_fwd_bwd", _softmax_ctx, ref.cross_entropy,
        {"prod": lambda d, c: ce_fwd_bwd(c),
         "v1": lambda d, c: ce_fwd_bwd(c, tiles=True)},
        t_ce if T else None,
        lambda c: 2 * n_of(c) * isz(c), (7, 1000), (4096, 1000),
        result=lambda out: (out[0] if isinstance(out, tuple) else out).numpy()))

    # pooling (ResNet stem: 3x3 stride 2 pad 1 on 32x64x112x112)
    def pool_ctx(d: pm.Device, shape: tuple, dtype: Any) -> dict:
        ctx = _img(d, shape, dtype)
        return ctx

    pl_large, pl_small = (32, 64, 112, 112), (2, 3, 13, 11)
    fams.append(Family(
        "max_pool2d_fwd", pool_ctx, lambda c: ref.pool(c["x_np"].astype(np.float64), 3, 2, 1, "max"),
        {"prod": lambda d, c: F.max_pool2d(c["x"], 3, 2, 1),
         "v1": lambda d, c: generic_pool(lambda: F.max_pool2d(c["x"], 3, 2, 1))},
        (lambda c, t: (lambda: T.nn.functional.max_pool2d(t["x"], 3, 2, 1))) if T else None,
        lambda c: n_of(c) * isz(c) * 5 // 4, pl_small, pl_large))
    fams.append(Family(
        "avg_pool2d_fwd", pool_ctx, lambda c: ref.pool(c["x_np"].astype(np.float64), 3, 2, 1, "avg"),
        {"prod": lambda d, c: F.avg_pool2d(c["x"], 3, 2, 1),
         "v1": lambda d, c: generic_pool(lambda: F.avg_pool2d(c["x"], 3, 2, 1))},
        (lambda c, t: (lambda: T.nn.functional.avg_pool2d(t["x"], 3, 2, 1))) if T else None,
        lambda c: n_of(c) * isz(c) * 5 // 4, pl_small, pl_large))
    def max_bwd_ctx(d: pm.Device, shape: tuple, dtype: Any) -> dict:
        ctx = _img(d, shape, dtype)
        oh, ow = (shape[2] - 1) // 2 + 1, (shape[3] - 1) // 2 + 1
        g = np.random.default_rng(5).standard_normal((shape[0], shape[1], oh, ow),
                                                      dtype=np.float32).astype(dtype)
        ctx["g_np"], ctx["g"] = g, pm.tensor(g, d)
        _, ctx["idx"] = F.max_pool2d(ctx["x"], 3, 2, 1, return_indices=True)
        return ctx

    def max_bwd_ref(c: dict) -> np.ndarray:
        """numpy: each window's first maximum (row-major) gets the window's gradient."""
        x, g = c["x_np"].astype(np.float64), c["g_np"].astype(np.float64)
        n, ch, h, w = x.shape
        dx = np.zeros_like(x)
        for i in range(g.shape[2]):
            for j in range(g.shape[3]):
                r0, c0 = 2 * i - 1, 2 * j - 1
                rs, cs = slice(max(r0, 0), min(r0 + 3, h)), slice(max(c0, 0), min(c0 + 3, w))
                win = x[:, :, rs, cs].reshape(n, ch, -1)
                a = win.argmax(-1)
                ww = cs.stop - cs.start
                rr, cc = rs.start + a // ww, cs.start + a % ww
                for b in range(n):
                    for q in range(ch):
                        dx[b, q, rr[b, q], cc[b, q]] += g[b, q, i, j]
        return dx

    def recompute_max_bwd(c: dict) -> Any:
        from pymetalnn.ops import pool as P

        P.MAX_BWD_VIA_INDICES = False
        try:
            return F.max_pool2d_backward(c["g"], c["x"], 3, 2, 1)
        finally:
            P.MAX_BWD_VIA_INDICES = True

    fams.append(Family(
        "max_pool2d_bwd_noidx", max_bwd_ctx, max_bwd_ref,
        {"prod": lambda d, c: F.max_pool2d_backward(c["g"], c["x"], 3, 2, 1),
         "v1": lambda d, c: recompute_max_bwd(c),
         "v1b": lambda d, c: generic_pool(lambda: F.max_pool2d_backward(c["g"], c["x"], 3, 2, 1)),
         "idx": lambda d, c: F.max_pool2d_backward(c["g"], c["x"], 3, 2, 1, indices=c["idx"])},
        (lambda c, t: (lambda: T.ops.aten.max_pool2d_with_indices_backward(
            t["g"], t["x"], [3, 3], [2, 2], [1, 1], [1, 1], False, t["idx"].long())))
        if T and dev.name == "cuda" else None,
        lambda c: n_of(c) * isz(c) * 5 // 4, pl_small, pl_large))
    fams.append(Family(
        "avg_pool2d_3x3s1", pool_ctx,
        lambda c: ref.pool(c["x_np"].astype(np.float64), 3, 1, 1, "avg"),
        {"prod": lambda d, c: F.avg_pool2d(c["x"], 3, 1, 1), "v2": avg_pool3_v2,
         "v1": lambda d, c: generic_pool(lambda: F.avg_pool2d(c["x"], 3, 1, 1))},
        (lambda c, t: (lambda: T.nn.functional.avg_pool2d(t["x"], 3, 1, 1))) if T else None,
        lambda c: 2 * n_of(c) * isz(c), (2, 3, 13, 11), (32, 192, 35, 35)))
    return fams


def run_family(dev: pm.Device, fam: Family, dtype: Any, quick: bool, torch: Any) -> list[dict]:
    rows = []
    # validation on the small shape
    ok: dict[str, str] = {}
    small = fam.make(dev, fam.small, dtype)
    want = fam.ref(small) if fam.ref else None
    for v, fn in fam.versions.items():
        try:
            got = fam.result(fn(dev, small))
            ok[v] = "-" if want is None else ("ok" if close(got, want, dtype) else "FAIL")
        except Exception as e:
            ok[v] = f"ERROR {type(e).__name__}: {str(e)[:60]}"
    shape = fam.small if quick else fam.large
    ctx = fam.make(dev, shape, dtype)
    nbytes = fam.nbytes(ctx)
    copy = common.copy_gbs(dev, nbytes // 2, BATCH, _reps(quick))  # nbytes: read + written
    peer_sec = None
    if fam.peer is not None:
        try:
            views = {key: common.torch_view(dev, val) for key, val in ctx.items()
                     if isinstance(val, pm.Tensor)}
            peer_sec = time_peer(dev, fam.peer(ctx, views), quick)
        except Exception as e:
            print(f"  {fam.name}: torch peer failed: {type(e).__name__}: {str(e)[:100]}")
    for v, fn in fam.versions.items():
        row = {"bench": fam.name, "version": v, "dtype": np.dtype(dtype).name,
               "shape": "x".join(map(str, shape)), "check": ok[v], "copy_GB/s": copy}
        if ok[v] not in ("ok", "-"):
            rows.append(row)
            continue
        try:
            sec, eager = common.time_captured(dev, lambda fn=fn: fn(dev, ctx), _reps(quick), BATCH)
        except Exception as e:
            row["check"] = f"ERROR {type(e).__name__}: {str(e)[:60]}"
            rows.append(row)
            continue
        gbs = nbytes / sec / 1e9
        row.update({"us": sec * 1e6, "GB/s": gbs, "vs_copy": gbs / copy,
                    "vs_torch": (peer_sec / sec) if peer_sec else None,
                    "torch_us": peer_sec * 1e6 if peer_sec else None})
        if v == "prod":
            row["us_eager"] = eager * 1e6 if eager is not None else None
            try:
                row["us_single"] = common.time_on(dev, lambda fn=fn: fn(dev, ctx), quick)[0] * 1e6
            except Exception:
                pass
        rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["cpu", "cuda", "metal"], default=None)
    ap.add_argument("--quick", action="store_true", help="small shapes (also the check shapes)")
    ap.add_argument("--only", default=None, help="comma-separated family names")
    ap.add_argument("--dtype", choices=["float32", "float16"], default=None)
    args = ap.parse_args()
    dev = pm.device(args.backend) if args.backend else pm.device()
    torch = torch_of(dev)
    fams = families(dev, torch)
    if args.only:
        want = set(args.only.split(","))
        fams = [f for f in fams if f.name in want]
    dtypes = [np.dtype(args.dtype).type] if args.dtype else [np.float32, np.float16]
    cols = ["bench", "version", "dtype", "shape", "check", "us", "GB/s", "copy_GB/s", "vs_copy",
            "torch_us", "vs_torch", "us_eager", "us_single"]
    print(f"# memory-bound versions on {common.device_label(dev)}; us = device time per call "
          f"(captured launches replayed, {BATCH} back to back); vs_copy: same run's copy of the "
          "same bytes; vs_torch: torch time / ours", flush=True)
    rows: list[dict] = []
    t0 = time.time()
    for dtype in dtypes:
        for fam in fams:
            try:
                r = run_family(dev, fam, dtype, args.quick, torch)
            except Exception:
                print(f"# {fam.name} {np.dtype(dtype).name}: failed")
                traceback.print_exc()
                continue
            rows.extend(r)
            print(f"# {fam.name} {np.dtype(dtype).name}: {time.time() - t0:.0f} s into the run")
            common.print_table(r, cols)
            sys.stdout.flush()
    print(f"# all rows ({time.time() - t0:.0f} s)")
    common.print_table(rows, cols)
    print("results:", common.write_results(f"dev_membound_{dev.name}", rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
