"""Normalization (norm.metal): batch norm (training with running-statistics update, and
inference), group norm and instance norm, with backward.

    y = (x - mean) / sqrt(var + eps) * weight + bias

batch norm: mean/var per channel over (N, *spatial) (biased variance for normalizing; training
moves running_mean/running_var by `momentum` toward the batch mean and the UNBIASED variance, in
place, as PyTorch; inference uses the running estimates). group norm: per (sample, group) over the
group's channels and positions; instance norm: group norm with one channel per group.

Design: statistics are Welford partials per threadgroup merged per row (norm.metal's note), then
every element is one multiply-add with per-plane coefficients; the host only chooses the tiling
(`_row_plan`, `_col_plan`) so that at least ~1024 threadgroups make partials when the tensor
allows (on the cpu backend a few per worker thread: `_target`). Inputs are float32 or float16;
weight, bias and running statistics float32 (as PyTorch's mixed-precision batch norm keeps
them).

Backward functions follow the functional convention (the gradients of the forward's tensor
arguments, in order, None for running statistics and absent weight/bias). The batch statistics of
a training-mode forward can be passed back as save_mean / save_invstd (from *_with_stats) to skip
recomputing them.

Layer norm (layer_norm, layer_norm_backward) normalizes each row of the trailing
normalized_shape dimensions with its own kernels (norm.metal's note); its weight and bias have
the input's dtype, as PyTorch's.

Channel slices (the graph's concat elimination): batch_norm(_with_stats)(..., out=,
out_batch_stride=) writes y into a slice of a larger NCHW tensor, and batch_norm_backward(...,
grad_out_batch_stride=) reads grad_out from one (the concat's gradient, without a split copy).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..params import LayerNormParams, NormParams
from ..runtime import Device
from ..tensor import Tensor, TensorLike, float16, float32, tensor
from ._common import (
    FLOATS,
    MAX_GROUPS,
    boolean,
    cdiv,
    dummy,
    empty,
    float32_arg,
    kernel,
    number,
    pick_device,
    stream_vthreads,
    strided_out,
    suffix,
    tensor_arg,
)
from .copy import _block, cast
from .neuron import activation_code
from .softmax import TG, check_size, tile_groups, tile_plan

SOURCE = "norm.metal"
MAX_ELEMENTS = 2**32 - 1
TARGET_GROUPS = 1024  # partial-making threadgroups to aim for (fills a large GPU)
# The cpu backend runs a threadgroup's 256 threads as work-item loops and pays each group's
# reduction tail (barriers, SIMD-group reductions, the finalize over its partials) in full: there
# ~1024 groups of a few elements per thread cost more than the elements (batch norm training
# forward on 8x64x28x28, one worker: 171 ms at 1024 groups, 14 ms at 16). So on cpu: a few
# groups per worker thread and up to CPU_ITEMS elements per thread (`_target`).
CPU_GROUPS_PER_WORKER = 4
CPU_ITEMS = 64
# Layer norm's lanes per row (SW): on a GPU ~4 elements per thread, up to 256 lanes; on the cpu
# backend one simdgroup per row (fewer threadgroups, each paying its reduction tail as work-item
# loops: 256x1000 forward 8.7 -> 2.0 ms, backward 13 -> 3.0 ms on one worker). 0: the GPU rule.
CPU_LN_SW = 32
COLUMN_MODE_HW = 32   # batch norm with fewer positions per plane reads columns
# norm_part_planes (batch norm forward statistics, HW not a multiple of the 16-byte chunk): planes
# of fewer than this many chunks, which one step of PLANE_U chunks per lane covers; longer planes
# (35x35) keep norm_part's threadgroup chunks
PLANES_MAX_CHUNKS = 126
# Kernel choice, for benchmarks/dev_membound.py's comparisons: "auto" (the 16-byte-chunk
# kernels norm_part_vec / norm_apply_vec where the layout allows, norm_part_planes for the
# forward statistics of short planes that are not whole chunks, else the scalar ones), "scalar"
# (the scalar kernels everywhere), "scalar_u1" (the scalar kernels with the statistics loop of
# one element per step, the earlier production), "vec_welford" (the production before the
# shifted sums and norm_part_planes: norm_part_vec's forward statistics as a Welford block per
# chunk, the scalar norm_part for planes that are not whole chunks).
KERNELS = "auto"
# Batch norm training forward in one kernel (batch_norm_fwd_res<RU>: a threadgroup holds a
# channel of N HW <= RU * TG elements in registers, reads it once): "gpu" (not on the cpu
# backend, and only with RES_MIN_CHANNELS channels or more, so that a large GPU gets enough
# threadgroups: 64 is a guess, not yet measured on a GPU), "all" (every eligible shape on every
# backend: tests), "off" (the partials, finalize and apply kernels).
RESIDENT = "gpu"
RES_UNROLLS = (8, 16, 24, 32, 40, 48)  # the instantiated RU, ascending
RES_MIN_CHANNELS = 64
# The statistics' finalize, batch norm backward's per-channel sums and the column-mode partials:
# "tree" (a threadgroup per row, norm_finalize_fwd / batch_norm_grad_bwd / norm_stats_*_cols_*),
# "rows" (a thread per row, norm_finalize_rows_fwd / batch_norm_grad_rows_bwd /
# norm_stats_*_colrows_*), "auto" (rows on the cpu backend, where a tree per row costs its
# barriers as work-item loops; tree elsewhere).
FINALIZE = "auto"


def _rows(dev: Device) -> bool:
    """Whether the per-row reductions (the forward's finalize, batch norm backward's per-channel
    sums, the column-mode partials) run a thread per row (else a threadgroup): see FINALIZE."""
    return FINALIZE == "rows" or (FINALIZE == "auto" and dev.name == "cpu")

# ---- validation ------------------------------------------------------------------------------

def _input(x: TensorLike, dev: Device, ndims: tuple[int, ...]) -> Tensor:
    """The input; an empty one is allowed (the ops return empty results and zero weight
    gradients without dispatching, as torch)."""
    t = tensor_arg(x, dev, "input", FLOATS, ndims)
    check_size(t, "input")
    return t


def _zeros(shape: tuple[int, ...], dev: Device) -> Tensor:
    """float32 zeros from the host (the weight gradients of an empty input)."""
    return tensor(np.zeros(shape, np.float32), dev)


def _finite(v: Any, name: str) -> float:
    """eps and momentum: any finite number, as torch (a negative eps with var + eps <= 0 gives
    inf/NaN there, as in torch; a momentum outside [0, 1] extrapolates the running statistics)."""
    return _number(v, name, -np.inf)


def _vec(v: Any, dev: Device, name: str, c: int, inplace: bool = False) -> Tensor | None:
    """An optional (c,) vector: float32, or a float16 device Tensor (a half model's parameters,
    converted by _f32 once every argument is checked); in-place ones must be device Tensors."""
    if v is None:
        return None
    if inplace and not isinstance(v, Tensor):
        raise ValueError(f"{name}: must be a pymetalnn Tensor to be updated in place, got "
                         f"{type(v).__name__}")
    if isinstance(v, Tensor) and v.dtype == float16:
        t = tensor_arg(v, dev, name, (float16,))
    else:
        t = float32_arg(v, dev, name)
    if t.shape != (c,):
        raise ValueError(f"{name}: expected shape ({c},), got {t.shape}")
    return t


def _f32(t: Tensor | None) -> Tensor | None:
    """A float16 parameter vector as the float32 the kernels read (statistics stay float)."""
    return cast(t, float32) if t is not None and t.dtype == float16 else t


def _write_back(orig: Any, t: Tensor | None) -> None:
    """A float16 running statistic updated through its float32 copy: the result stored back."""
    if t is not None and isinstance(orig, Tensor) and orig is not t:
        _block(t, orig, 1, t.size, t.size, t.size, 0, 0)


def _grad_like(g: Tensor | None, param: Any) -> Tensor | None:
    """A weight/bias gradient in its parameter's dtype (float16 parameters get float16)."""
    if g is not None and isinstance(param, Tensor) and param.dtype == float16:
        return cast(g, float16)
    return g


def _number(v: Any, name: str, lo: float, hi: float | None = None, lo_open: bool = False) -> float:
    f = number(v, name)
    if not np.isfinite(f) or (f <= lo if lo_open else f < lo) or (hi is not None and f > hi):
        rng = f"{'>' if lo_open else '>='} {lo}" + (f" and <= {hi}" if hi is not None else "")
        raise ValueError(f"{name}: must be {rng}, got {v!r}")
    return f


def _grad_out(g: Any, x: Tensor, dev: Device) -> Tensor:
    gt = tensor_arg(g, dev, "grad_out", (x.dtype,))
    if gt.shape != x.shape:
        raise ValueError(f"grad_out: shape {gt.shape} does not match input's {x.shape}")
    return gt


def _grad_stride(g: Tensor, stride: Any) -> int:
    """The kernels' dy_nstride of grad_out whose images lie `stride` elements apart (None:
    contiguous): 0 when contiguous. Mirrors strided_out's checks of out_batch_stride."""
    if stride is None:
        return 0
    if isinstance(stride, bool) or not isinstance(stride, (int, np.integer)):
        raise ValueError(f"grad_out_batch_stride: expected an int, got {stride!r}")
    n, per = g.shape[0], g.size // g.shape[0]
    stride = int(stride)
    if stride < per:
        raise ValueError(f"grad_out_batch_stride: {stride} elements, less than one image's {per}")
    need = ((n - 1) * stride + per) * g.dtype.itemsize
    if g.buffer.nbytes < need:
        raise ValueError(f"grad_out: {g.buffer.nbytes} bytes of buffer, too few for {g.shape} "
                         f"with batch stride {stride} ({need} bytes)")
    if (n - 1) * stride + per > MAX_ELEMENTS:
        raise ValueError(f"grad_out_batch_stride: {stride} puts the last image beyond the "
                         "kernels' 32-bit indexing")
    return 0 if stride == per or n <= 1 else stride


def _saved(mean: Any, invstd: Any, dev: Device, shape: tuple[int, ...],
           names: tuple[str, str]) -> tuple[Tensor, Tensor] | None:
    if mean is None and invstd is None:
        return None
    if mean is None or invstd is None:
        raise ValueError(f"{names[0] if mean is None else names[1]}: pass both {names[0]} and "
                         f"{names[1]}, or neither")
    out = []
    for v, name in ((mean, names[0]), (invstd, names[1])):
        t = tensor_arg(v, dev, name, (float32,))
        if t.shape != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {t.shape}")
        out.append(t)
    return out[0], out[1]


# ---- plans -----------------------------------------------------------------------------------

def _target(dev: Device | None) -> tuple[int, int]:
    """(threadgroups to aim for, most elements per thread) of the partial-making kernels on
    `dev` (None: a GPU's)."""
    if dev is not None and dev.name == "cpu":
        return CPU_GROUPS_PER_WORKER * max(1, getattr(dev, "num_workers", 1)), CPU_ITEMS
    return TARGET_GROUPS, 16


def _items(blocks_for: Any, dev: Device | None, start: int = 16, floor: int = 1) -> int:
    """Elements per thread: as many as keep >= _target(dev)'s threadgroups (at least `floor`;
    from max(start, its most elements per thread), a power of two times start)."""
    target, most = _target(dev)
    items = start
    while items < most:
        items *= 2
    while items > floor and blocks_for(items) < target:
        items //= 2
    return items


def _geometry(x: Tensor) -> tuple[int, int, int]:
    n, c = x.shape[0], x.shape[1]
    return n, c, x.size // (n * c)


def _row_plan(p: NormParams, dev: Device | None = None) -> None:
    """Row mode: chunks of each statistics row (fills chunk, chunks, parts)."""
    items = _items(lambda it: p.rows * -(-p.row_len // (TG * it)), dev)
    p.chunk = TG * items
    p.chunks = -(-p.row_len // p.chunk)
    p.parts = p.chunks
    p.cols = 0


def _col_plan(p: NormParams, dev: Device | None = None) -> None:
    """Column mode (batch norm, HW < 32): 32 columns x 8 sample slices per threadgroup."""
    cblocks = -(-p.cols // 32)
    # >= 64 samples per chunk keeps the 16-byte partials under 1/16 of the bytes read
    items = _items(lambda it: cblocks * -(-p.N // (8 * it)), dev, start=32, floor=8)
    p.col_rows = 8 * items
    p.col_chunks = -(-p.N // p.col_rows)
    p.parts = p.col_chunks * p.HW


def _bn_params(x: Tensor, eps: float, momentum: float, training: bool, has_w: bool, has_b: bool,
               has_running: bool) -> NormParams:
    n, c, hw = _geometry(x)
    p = NormParams(N=n, C=c, HW=hw, G=1, rows=c, row_len=n * hw, inner_len=hw, outer_stride=c * hw,
                   row_stride=hw, planes=c, total=x.size, has_weight=int(has_w), has_bias=int(has_b),
                   has_running=int(has_running), training=int(training), eps=eps, momentum=momentum)
    if hw < COLUMN_MODE_HW:
        p.cols = c * hw
        _col_plan(p, x.device)
    else:
        _row_plan(p, x.device)
    return p


def _gn_params(x: Tensor, groups: int, eps: float, has_w: bool, has_b: bool) -> NormParams:
    n, c, hw = _geometry(x)
    L = c // groups * hw
    p = NormParams(N=n, C=c, HW=hw, G=groups, rows=n * groups, row_len=L, inner_len=L,
                   outer_stride=0, row_stride=L, planes=n * c, total=x.size, has_weight=int(has_w),
                   has_bias=int(has_b), eps=eps)
    _row_plan(p, x.device)
    return p


# ---- dispatch helpers ------------------------------------------------------------------------

def _partials(dev: Device, p: NormParams, x: Tensor, dy: Tensor | None, mean: Tensor | None,
              fwd: tuple[Tensor, Tensor | None, Tensor | None] | None = None) -> Tensor:
    """norm_stats_{fwd,bwd}[_cols][_act]: Welford partials of x, or (sum g, sum g (x - mean))
    with g = dy, or g = act'(z) dy when p.act and fwd = (invstd, weight, bias) give the forward's
    pre-activation z (batch norm's fused activation). Sets p.chunks = p.parts = N where it picks
    norm_part_planes (one partial per plane, the finalize's layout)."""
    bwd = dy is not None
    act = "_act" if bwd and p.act else ""
    if p.cols:
        count = p.col_chunks * p.cols
        rows = _rows(dev)  # a thread per (column, chunk), else 32 columns per threadgroup
        groups = -(-count // TG) if rows else -(-p.cols // 32) * p.col_chunks
        name = f"norm_stats_{'bwd' if bwd else 'fwd'}_{'colrows' if rows else 'cols'}{act}_" \
            f"{suffix(x.dtype)}"
    else:
        count = groups = p.rows * p.chunks
        w = 16 // x.dtype.itemsize
        # 16-byte chunks (norm_part_vec) when no chunk straddles two runs of a row and every
        # chunk is aligned
        vec = KERNELS in ("auto", "vec_welford") and p.inner_len % w == 0 and p.dy_nstride % w == 0 and \
            x.buffer.offset % 16 == 0 and (dy is None or dy.buffer.offset % 16 == 0)
        form = "_vec" if vec else ("_u1" if KERNELS == "scalar_u1" else "")
        if vec and not bwd and KERNELS == "vec_welford":
            form = "_vec_welford"
        # batch norm forward, planes of a few chunks that are not whole chunks (17x17, 7x7):
        # one simdgroup per plane over the aligned chunks covering it (norm_part_planes); its
        # N partials per channel are the finalize's chunks
        if not vec and not bwd and KERNELS == "auto" and p.outer_stride and \
                p.HW < PLANES_MAX_CHUNKS * w and p.total % w == 0 and x.buffer.offset % 16 == 0:
            form = "_planes"
            p.chunks = p.parts = p.N
            count = p.N * p.C
            groups = -(-count * 32 // TG)
        name = f"norm_stats_{'bwd' if bwd else 'fwd'}{act}{form}_{suffix(x.dtype)}"
    part = empty((count, 4), float32, dev)
    d = dummy(dev)
    fb = [t.buffer if t is not None else d for t in (fwd or (None, None, None))]
    kernel(dev, SOURCE, name)(min(groups, MAX_GROUPS) * TG, x.buffer, dy.buffer if bwd else d,
                              mean.buffer if mean is not None else d, *fb, part.buffer, p)
    return part


def _stats(dev: Device, p: NormParams, x: Tensor, running_mean: Tensor | None = None,
           running_var: Tensor | None = None,
           bn_coef: tuple[Tensor | None, Tensor | None, Tensor] | None = None
           ) -> tuple[Tensor, Tensor]:
    """Per statistics row: (mean, invstd); updates running estimates when p.has_running.
    bn_coef = (weight, bias, coef): batch norm, whose forward coefficients per channel are
    written into coef by the same kernel (batch_norm_finalize_fwd)."""
    p = type(p).from_buffer_copy(p)  # _partials may re-plan the chunks for its kernel
    part = _partials(dev, p, x, None, None)
    mean, invstd = empty((p.rows,), float32, dev), empty((p.rows,), float32, dev)
    d = dummy(dev)
    w, b, coef = bn_coef if bn_coef is not None else (None, None, None)
    rows = _rows(dev)
    name = ("batch_norm_" if bn_coef is not None else "norm_") + \
        ("finalize_rows_fwd_float" if rows else "finalize_fwd_float")
    kernel(dev, SOURCE, name)(
        min(cdiv(p.rows, TG) if rows else p.rows, MAX_GROUPS) * TG, part.buffer,
        running_mean.buffer if running_mean is not None else d,
        running_var.buffer if running_var is not None else d, mean.buffer, invstd.buffer, p,
        w.buffer if w is not None else d, b.buffer if b is not None else d,
        coef.buffer if coef is not None else d)
    return mean, invstd


def _apply(dev: Device, p: NormParams, u: Tensor, v: Tensor | None, coef: Tensor,
           out: Tensor | None = None) -> Tensor:
    """norm_apply_fwd (act(a (x - m) + d)), norm_apply_bwd, or with p.act norm_apply_bwd_act
    (coef then holds the forward's coefficients after the backward's). out: the forward's
    destination from strided_out (p.out_nstride set to match); else a new tensor."""
    if out is None:
        out = empty(u.shape, u.dtype, dev)
    act = "_act" if v is not None and p.act else ""
    kind = f"{'bwd' if v is not None else 'fwd'}{act}"
    w = 16 // u.dtype.itemsize
    strided = p.out_nstride or p.dy_nstride
    if KERNELS in ("auto", "vec_welford") and (p.HW % w == 0 or p.HW >= w) and \
            (not strided or ((p.C * p.HW) % w == 0 and p.out_nstride % w == 0
                             and p.dy_nstride % w == 0)) and \
            all(t.buffer.offset % 16 == 0 for t in (u, v, out) if t is not None):
        # 16-byte chunks, STREAM_U per thread, then a scalar tail (norm.metal norm_apply_vec)
        nvec = p.total // w
        count = stream_vthreads(nvec) + p.total - w * nvec
        name = f"norm_apply_{kind}_vec_{suffix(u.dtype)}"
    else:
        count = min(-(-u.size // (TG * 4)), MAX_GROUPS) * TG  # 4 elements per thread
        name = f"norm_apply_{kind}_{suffix(u.dtype)}"
    kernel(dev, SOURCE, name)(count, u.buffer, v.buffer if v is not None else dummy(dev),
                              coef.buffer, out.buffer, p)
    return out


def _resident(dev: Device, p: NormParams) -> int:
    """RU of the batch_norm_fwd_res kernel that holds a channel (0: none, see RESIDENT). Column
    mode (HW < 32) stays out: a thread's elements would be a channel stride apart, uncoalesced."""
    if RESIDENT == "off" or KERNELS != "auto" or p.cols or \
            (RESIDENT == "gpu" and (dev.name == "cpu" or p.C < RES_MIN_CHANNELS)):
        return 0
    return next((u for u in RES_UNROLLS if u * TG >= p.row_len), 0)


def _threads(n: int) -> int:
    return max(n, 1)


# ---- batch norm ------------------------------------------------------------------------------

def _bn_validate(input: TensorLike, running_mean: TensorLike | None, running_var: TensorLike | None,
                 weight: TensorLike | None, bias: TensorLike | None, training: Any, momentum: Any,
                 eps: Any):
    dev = pick_device(input, running_mean, running_var, weight, bias)
    x = _input(input, dev, (1, 2, 3, 4))
    training = boolean(training, "training")
    momentum = _finite(momentum, "momentum")
    eps = _finite(eps, "eps")
    if x.ndim == 1 and x.size:  # torch's 1-D batch norm: only the empty input (no channels)
        raise ValueError(f"input: expected 2 or 3 or 4 dimensions, got 1 (shape {x.shape})")
    c = x.shape[1] if x.ndim > 1 else 0
    rm = _vec(running_mean, dev, "running_mean", c, inplace=training)
    rv = _vec(running_var, dev, "running_var", c, inplace=training)
    if (rm is None) != (rv is None):
        raise ValueError(f"{'running_mean' if rm is None else 'running_var'}: pass both running "
                         "statistics, or neither")
    if not training and rm is None:
        raise ValueError("running_mean: inference (training=False) needs running_mean and "
                         "running_var")
    w = _vec(weight, dev, "weight", c)
    b = _vec(bias, dev, "bias", c)
    n, _, hw = _geometry(x) if x.size else (0, 0, 0)
    if training and n * hw < 2 and x.size:
        raise ValueError(f"input: expected more than 1 value per channel when training, got "
                         f"shape {x.shape}")
    rm, rv, w, b = (_f32(t) for t in (rm, rv, w, b))
    return dev, x, rm, rv, w, b, training, momentum, eps


def batch_norm_with_stats(input: TensorLike, running_mean: TensorLike | None,
                          running_var: TensorLike | None, weight: TensorLike | None = None,
                          bias: TensorLike | None = None, training: bool = False,
                          momentum: float = 0.1, eps: float = 1e-5, activation: Any = None,
                          out: Tensor | None = None, out_batch_stride: int | None = None
                          ) -> tuple[Tensor, Tensor, Tensor]:
    """batch_norm, also returning (save_mean, save_invstd) per channel: the batch statistics
    (training) or the running ones (inference), for batch_norm_backward. activation, out,
    out_batch_stride: as batch_norm's."""
    act = activation_code(activation)
    dev, x, rm, rv, w, b, training, momentum, eps = _bn_validate(
        input, running_mean, running_var, weight, bias, training, momentum, eps)
    c = x.shape[1] if x.ndim > 1 else 0
    if x.size == 0:  # nothing to normalise; the running statistics stay (torch)
        y = strided_out(out, out_batch_stride, x.shape, x.dtype, dev)[0] if out is not None \
            else empty(x.shape, x.dtype, dev)
        return y, _zeros((c,), dev), _zeros((c,), dev)
    # before any launch: a bad out= must not leave the running statistics moved
    y, ns = strided_out(out, out_batch_stride, x.shape, x.dtype, dev)
    if ns and (x.shape[0] - 1) * ns + x.size // x.shape[0] > MAX_ELEMENTS:
        raise ValueError(f"out_batch_stride: {ns} puts the last image beyond the kernels' "
                         "32-bit indexing")
    p = _bn_params(x, eps, momentum, training, w is not None, b is not None, rm is not None)
    p.act, p.act_alpha = act
    p.out_nstride = ns
    c = x.shape[1]
    d = dummy(dev)
    coef = empty((c, 4), float32, dev)
    ru = _resident(dev, p) if training else 0
    if ru:  # statistics, running estimates, coefficients and y in one kernel
        mean, invstd = empty((c,), float32, dev), empty((c,), float32, dev)
        kernel(dev, SOURCE, f"batch_norm_fwd_res{ru}_{suffix(x.dtype)}")(
            min(c, MAX_GROUPS) * TG, x.buffer, y.buffer, rm.buffer if rm is not None else d,
            rv.buffer if rv is not None else d, mean.buffer, invstd.buffer, p,
            w.buffer if w is not None else d, b.buffer if b is not None else d, coef.buffer)
    elif training:  # statistics and coefficients in one kernel
        mean, invstd = _stats(dev, p, x, rm, rv, (w, b, coef))
    if training:
        _write_back(running_mean, rm)
        _write_back(running_var, rv)
    else:
        mean, invstd = empty((c,), float32, dev), empty((c,), float32, dev)
        kernel(dev, SOURCE, "batch_norm_coef_fwd_float")(
            _threads(c), w.buffer if w is not None else d, b.buffer if b is not None else d,
            rm.buffer if rm is not None else d, rv.buffer if rv is not None else d, mean.buffer,
            invstd.buffer, coef.buffer, p)
    # y is the destination either way (out= or a fresh tensor): a second allocation would shift
    # the graph memory planner's keys of same-size requests (e.g. float16 y beside float32 stats)
    return (y if ru else _apply(dev, p, x, None, coef, y)), mean, invstd


def batch_norm(input: TensorLike, running_mean: TensorLike | None, running_var: TensorLike | None,
               weight: TensorLike | None = None, bias: TensorLike | None = None,
               training: bool = False, momentum: float = 0.1, eps: float = 1e-5,
               activation: Any = None, out: Tensor | None = None,
               out_batch_stride: int | None = None) -> Tensor:
    """F.batch_norm over dim 1 of (N, C[, L]) or (N, C, H, W):
    y = (x - mean_c) / sqrt(var_c + eps) * weight_c + bias_c. training: batch statistics, and
    running_mean/var (if given, as Tensors) updated in place: r = (1 - momentum) r + momentum s,
    with the unbiased batch variance. Inference: the running statistics. activation: None,
    "relu", "leaky_relu", "sigmoid", "tanh" or (name, params): y = act(batch_norm(x)) in the same
    element-wise kernel (neuron.activation_code); gradient via batch_norm_backward(...,
    activation=), which takes dy through the activation inside its own kernels.
    out=, out_batch_stride=: write y into `out`, a tensor whose buffer starts at y's first
    element, images out_batch_stride elements apart (a channel slice of a larger NCHW tensor;
    pymetalnn.ops._common.strided_out); the elements between images are left untouched."""
    return batch_norm_with_stats(input, running_mean, running_var, weight, bias, training,
                                 momentum, eps, activation, out, out_batch_stride)[0]


def batch_norm_backward(grad_out: TensorLike, input: TensorLike, running_mean: TensorLike | None,
                        running_var: TensorLike | None, weight: TensorLike | None = None,
                        bias: TensorLike | None = None, training: bool = False,
                        momentum: float = 0.1, eps: float = 1e-5, *,
                        save_mean: TensorLike | None = None, save_invstd: TensorLike | None = None,
                        activation: Any = None, y: TensorLike | None = None,
                        grad_out_batch_stride: int | None = None
                        ) -> tuple[Tensor, None, None, Tensor | None, Tensor | None]:
    """(grad_input, None, None, grad_weight, grad_bias) of batch_norm (running statistics are
    not differentiated; grad_weight / grad_bias are None when weight / bias are).

    training: xhat = (x - mean) invstd over the batch, M = N * spatial,
      dx = weight invstd (dy - sum(dy) / M - xhat sum(dy xhat) / M)
    inference: dx = weight invstd_running dy.  dweight = sum dy xhat, dbias = sum dy.
    The running statistics are not touched. save_mean / save_invstd: the training forward's batch
    statistics (batch_norm_with_stats) instead of recomputing them from input.

    activation: the activation= of the forward, y = act(z), z = weight invstd (x - mean) + bias
    (same values as batch_norm's). The formulas above then hold with dy replaced by
    g = act'(z) dy (relu: dy where z > 0, else 0; leaky_relu: dy or negative_slope dy; sigmoid:
    dy s (1 - s), s = sigmoid(z); tanh: dy (1 - tanh(z)^2)). z is recomputed from input inside
    the backward's own kernels, exactly as the forward computed it (same kernel arithmetic, so
    relu's z > 0 is the forward's decision bit for bit; pass the forward's save_mean /
    save_invstd, or the same input to recompute them): no extra pass, and y is not needed.
    y: optional, the fused forward's output, checked (shape and dtype) but not read; accepted
    for callers of the earlier from-the-output gradient.

    grad_out_batch_stride: grad_out's images lie that many elements apart (None: contiguous):
    grad_out is then a tensor whose buffer starts at its first element inside a larger NCHW
    tensor, e.g. its channel slice of a concatenation's gradient (the forward's out=,
    out_batch_stride= read back), so no split copies it out. grad_input is contiguous."""
    act_code = activation_code(activation)
    dev, x, rm, rv, w, b, training, momentum, eps = _bn_validate(
        input, running_mean, running_var, weight, bias, training, momentum, eps)
    g = _grad_out(grad_out, x, dev)
    if x.size == 0:
        c = x.shape[1] if x.ndim > 1 else 0
        return (empty(x.shape, x.dtype, dev), None, None, _zeros((c,), dev) if w is not None else None,
                _zeros((c,), dev) if b is not None else None)
    dy_ns = _grad_stride(g, grad_out_batch_stride)
    if y is not None:
        yt = tensor_arg(y, dev, "y", (x.dtype,))
        if yt.shape != x.shape:
            raise ValueError(f"y: shape {yt.shape} does not match input's {x.shape}")
    c = x.shape[1]
    saved = _saved(save_mean, save_invstd, dev, (c,), ("save_mean", "save_invstd"))
    p = _bn_params(x, eps, momentum, training, w is not None, b is not None, False)
    d = dummy(dev)
    if training:
        mean, invstd = saved if saved is not None else _stats(dev, p, x)
    else:
        # the inference statistics, from the running estimates
        mean, invstd = empty((c,), float32, dev), empty((c,), float32, dev)
        kernel(dev, SOURCE, "batch_norm_coef_fwd_float")(
            _threads(c), w.buffer if w is not None else d, b.buffer if b is not None else d,
            rm.buffer, rv.buffer, mean.buffer, invstd.buffer, empty((c, 4), float32, dev).buffer, p)
    # the activation is applied to dy by the kernels below (p.act selects their *_act variants)
    p.act, p.act_alpha = act_code
    p.dy_nstride = dy_ns
    part = _partials(dev, p, x, g, mean, (invstd, w, b))
    dw = empty((c,), float32, dev) if w is not None else None
    db = empty((c,), float32, dev) if b is not None else None
    coef = empty((2 * c if p.act else c, 4), float32, dev)
    rows = _rows(dev)
    kernel(dev, SOURCE, "batch_norm_grad_rows_bwd_float" if rows else "batch_norm_grad_bwd_float")(
        min(cdiv(c, TG) if rows else c, MAX_GROUPS) * TG, part.buffer,
        w.buffer if w is not None else d,
        b.buffer if b is not None else d, mean.buffer, invstd.buffer,
        dw.buffer if dw is not None else d, db.buffer if db is not None else d, coef.buffer, p)
    return _apply(dev, p, g, x, coef), None, None, _grad_like(dw, weight), _grad_like(db, bias)


# ---- group norm / instance norm --------------------------------------------------------------

def _gn_validate(input: TensorLike, num_groups: Any, weight: TensorLike | None,
                 bias: TensorLike | None, eps: Any, ndims: tuple[int, ...] = (2, 3, 4)):
    dev = pick_device(input, weight, bias)
    x = _input(input, dev, ndims)
    c = x.shape[1]
    if isinstance(num_groups, bool) or not isinstance(num_groups, (int, np.integer)) \
            or num_groups < 1 or c % num_groups:
        raise ValueError(f"num_groups: expected a positive int dividing the {c} channels, got "
                         f"{num_groups!r}")
    eps = _finite(eps, "eps")
    w = _vec(weight, dev, "weight", c)
    b = _vec(bias, dev, "bias", c)
    return dev, x, int(num_groups), _f32(w), _f32(b), eps


def _group_norm(dev: Device, x: Tensor, groups: int, w: Tensor | None, b: Tensor | None,
                eps: float) -> tuple[Tensor, Tensor, Tensor]:
    if x.size == 0:
        return empty(x.shape, x.dtype, dev), _zeros((x.shape[0], groups), dev), \
            _zeros((x.shape[0], groups), dev)
    p = _gn_params(x, groups, eps, w is not None, b is not None)
    mean, invstd = _stats(dev, p, x)
    coef = empty((p.planes, 4), float32, dev)
    d = dummy(dev)
    kernel(dev, SOURCE, "group_norm_coef_fwd_float")(
        _threads(p.planes), w.buffer if w is not None else d, b.buffer if b is not None else d,
        mean.buffer, invstd.buffer, coef.buffer, p)
    n = x.shape[0]
    return _apply(dev, p, x, None, coef), mean.reshape(n, groups), invstd.reshape(n, groups)


def _group_norm_backward(dev: Device, g: Tensor, x: Tensor, groups: int, w: Tensor | None,
                         b: Tensor | None, eps: float, saved: tuple[Tensor, Tensor] | None
                         ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    if x.size == 0:
        c = x.shape[1]
        return (empty(x.shape, x.dtype, dev), _zeros((c,), dev) if w is not None else None,
                _zeros((c,), dev) if b is not None else None)
    p = _gn_params(x, groups, eps, w is not None, b is not None)
    if saved is not None:
        mean, invstd = saved[0].reshape(p.rows), saved[1].reshape(p.rows)
    else:
        mean, invstd = _stats(dev, p, x)
    n, c, hw = _geometry(x)
    q = tile_plan(n * c, hw, 1, cache_arrays=0, dev=x.device)
    sums = empty((n * c, 2), float32, dev)
    kernel(dev, SOURCE, f"group_norm_sums_bwd_{suffix(x.dtype)}")(
        tile_groups(q) * TG, g.buffer, x.buffer, mean.buffer, sums.buffer, p, q)
    d = dummy(dev)
    coef = empty((p.planes, 4), float32, dev)
    kernel(dev, SOURCE, "group_norm_coef_bwd_float")(
        _threads(p.rows), sums.buffer, w.buffer if w is not None else d, mean.buffer,
        invstd.buffer, coef.buffer, p)
    dw = empty((c,), float32, dev) if w is not None else None
    db = empty((c,), float32, dev) if b is not None else None
    if dw is not None or db is not None:
        kernel(dev, SOURCE, "group_norm_param_bwd_float")(
            _threads(c), sums.buffer, invstd.buffer, dw.buffer if dw is not None else d,
            db.buffer if db is not None else d, p)
    return _apply(dev, p, g, x, coef), dw, db


def group_norm_with_stats(input: TensorLike, num_groups: int, weight: TensorLike | None = None,
                          bias: TensorLike | None = None, eps: float = 1e-5
                          ) -> tuple[Tensor, Tensor, Tensor]:
    """group_norm, also returning (mean, rstd) of shape (N, num_groups)."""
    dev, x, groups, w, b, eps = _gn_validate(input, num_groups, weight, bias, eps)
    return _group_norm(dev, x, groups, w, b, eps)


def group_norm(input: TensorLike, num_groups: int, weight: TensorLike | None = None,
               bias: TensorLike | None = None, eps: float = 1e-5) -> Tensor:
    """F.group_norm: channels split into num_groups groups; per (sample, group),
    y = (x - mean) / sqrt(var + eps) (biased variance over the group's C/G channels and all
    positions), then weight_c y + bias_c."""
    dev, x, groups, w, b, eps = _gn_validate(input, num_groups, weight, bias, eps)
    return _group_norm(dev, x, groups, w, b, eps)[0]


def group_norm_backward(grad_out: TensorLike, input: TensorLike, num_groups: int,
                        weight: TensorLike | None = None, bias: TensorLike | None = None,
                        eps: float = 1e-5, *, save_mean: TensorLike | None = None,
                        save_rstd: TensorLike | None = None
                        ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(grad_input, grad_weight, grad_bias) of group_norm. Per (sample, group) of L elements with
    g = weight_c dy: dx = rstd (g - mean(g) - xhat mean(g xhat)); dweight = sum dy xhat,
    dbias = sum dy over samples and positions. save_mean / save_rstd: (N, num_groups) from
    group_norm_with_stats."""
    dev, x, groups, w, b, eps = _gn_validate(input, num_groups, weight, bias, eps)
    g = _grad_out(grad_out, x, dev)
    saved = _saved(save_mean, save_rstd, dev, (x.shape[0], groups), ("save_mean", "save_rstd"))
    dx, dw, db = _group_norm_backward(dev, g, x, groups, w, b, eps, saved)
    return dx, _grad_like(dw, weight), _grad_like(db, bias)


def _in_validate(input: TensorLike, running_mean: TensorLike | None, running_var: TensorLike | None,
                 weight: TensorLike | None, bias: TensorLike | None, use_input_stats: Any,
                 momentum: Any, eps: Any):
    if running_mean is not None or running_var is not None:
        name = "running_mean" if running_mean is not None else "running_var"
        raise ValueError(f"{name}: instance norm with running statistics is not supported")
    if not boolean(use_input_stats, "use_input_stats"):
        raise ValueError("use_input_stats: False (running statistics) is not supported")
    _finite(momentum, "momentum")
    dev = pick_device(input, weight, bias)
    x = _input(input, dev, (3, 4))
    return _gn_validate(x, x.shape[1], weight, bias, eps, (3, 4))


def instance_norm(input: TensorLike, running_mean: TensorLike | None = None,
                  running_var: TensorLike | None = None, weight: TensorLike | None = None,
                  bias: TensorLike | None = None, use_input_stats: bool = True,
                  momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """F.instance_norm of (N, C, L) or (N, C, H, W) with the input's statistics: group norm with
    one channel per group (running statistics are not supported)."""
    dev, x, groups, w, b, eps = _in_validate(input, running_mean, running_var, weight, bias,
                                             use_input_stats, momentum, eps)
    return _group_norm(dev, x, groups, w, b, eps)[0]


def instance_norm_backward(grad_out: TensorLike, input: TensorLike,
                           running_mean: TensorLike | None = None,
                           running_var: TensorLike | None = None, weight: TensorLike | None = None,
                           bias: TensorLike | None = None, use_input_stats: bool = True,
                           momentum: float = 0.1, eps: float = 1e-5
                           ) -> tuple[Tensor, None, None, Tensor | None, Tensor | None]:
    """(grad_input, None, None, grad_weight, grad_bias) of instance_norm (group_norm_backward with
    num_groups = C)."""
    dev, x, groups, w, b, eps = _in_validate(input, running_mean, running_var, weight, bias,
                                             use_input_stats, momentum, eps)
    g = _grad_out(grad_out, x, dev)
    dx, dw, db = _group_norm_backward(dev, g, x, groups, w, b, eps, None)
    return dx, None, None, _grad_like(dw, weight), _grad_like(db, bias)



# ---- layer norm -----------------------------------------------------------------------------

def _ln_args(input: Any, normalized_shape: Any, weight: Any, bias: Any, eps: Any, dev: Device
             ) -> tuple[Tensor, Tensor | None, Tensor | None, tuple[int, ...], LayerNormParams]:
    x = tensor_arg(input, dev, "input", FLOATS)
    check_size(x, "input")
    if isinstance(normalized_shape, (int, np.integer)) and not isinstance(normalized_shape, bool):
        normalized_shape = (int(normalized_shape),)
    try:
        ns = tuple(int(v) for v in normalized_shape)
    except (TypeError, ValueError):
        raise ValueError(f"normalized_shape: expected an int or a sequence of ints, got "
                         f"{normalized_shape!r}") from None
    if not ns or x.shape[x.ndim - len(ns):] != ns or len(ns) > x.ndim:
        raise ValueError(f"normalized_shape: {ns} is not the trailing shape of input {x.shape}")
    ps = []
    for v, name in ((weight, "weight"), (bias, "bias")):
        if v is None:
            ps.append(None)
            continue
        t = tensor_arg(v, dev, name, (x.dtype,))
        if t.shape != ns:
            raise ValueError(f"{name}: expected shape {ns} (normalized_shape), got {t.shape}")
        ps.append(t)
    d = int(np.prod(ns))
    rows = int(np.prod(x.shape[:x.ndim - len(ns)]))
    e = _finite(eps, "eps")
    sw = CPU_LN_SW if dev.name == "cpu" and CPU_LN_SW else 32
    while sw < 256 and sw * 4 < d and not (dev.name == "cpu" and CPU_LN_SW):
        sw *= 2  # ~4 elements per thread, a simdgroup at least
    p = LayerNormParams(rows=rows, D=d, SW=sw, has_weight=int(ps[0] is not None),
                        has_bias=int(ps[1] is not None), eps=e)
    return x, ps[0], ps[1], ns, p


def _ln_groups(p: LayerNormParams) -> int:
    return max(1, min(-(-p.rows // (TG // p.SW)), MAX_GROUPS))


def layer_norm(input: TensorLike, normalized_shape: Any, weight: TensorLike | None = None,
               bias: TensorLike | None = None,
               eps: float = 1e-5) -> Tensor:
    """torch.nn.functional.layer_norm: over the trailing `normalized_shape` dimensions of each
    row, y = (x - mean) / sqrt(var + eps) * weight + bias (biased variance); weight and bias
    shaped normalized_shape, in the input's dtype, or None. One tile of threads per row."""
    dev = pick_device(input, weight, bias)
    x, w, b, _, p = _ln_args(input, normalized_shape, weight, bias, eps, dev)
    y = empty(x.shape, x.dtype, dev)
    if x.size:
        d = dummy(dev)
        kernel(dev, SOURCE, f"layer_norm_fwd_{suffix(x.dtype)}")(
            _ln_groups(p) * TG, x.buffer, w.buffer if w is not None else d,
            b.buffer if b is not None else d, y.buffer, p)
    return y


def layer_norm_backward(grad_out: TensorLike, input: TensorLike, normalized_shape: Any,
                        weight: TensorLike | None = None,
                        bias: TensorLike | None = None, eps: float = 1e-5
                        ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(dL/dx, dL/dweight or None, dL/dbias or None) of layer_norm, the row statistics
    recomputed from the input:

        dx = rstd (g - mean_row(g) - xhat mean_row(g xhat)),  g = dy weight, xhat = (x - mean) rstd
        dweight = sum_rows dy xhat,  dbias = sum_rows dy
    """
    dev = pick_device(grad_out, input, weight, bias)
    x, w, b, ns, p = _ln_args(input, normalized_shape, weight, bias, eps, dev)
    g = _grad_out(grad_out, x, dev)
    dx = empty(x.shape, x.dtype, dev)
    need = w is not None or b is not None
    dw = empty(ns, x.dtype, dev) if w is not None else None
    db = empty(ns, x.dtype, dev) if b is not None else None
    if not x.size:
        for t in (dw, db):
            if t is not None:
                t.buffer.write(np.zeros(t.shape, t.dtype))
        return dx, dw, db
    d = dummy(dev)
    stats = dev.buffer(16 * p.rows) if need else d  # (m, c, rstd, 0) per row (norm.metal)
    p.save_stats = int(need)
    sfx = suffix(x.dtype)
    kernel(dev, SOURCE, f"layer_norm_bwd_{sfx}")(
        _ln_groups(p) * TG, g.buffer, x.buffer, w.buffer if w is not None else d, dx.buffer, stats, p)
    if need:
        # chunks of rows: enough columns x chunks to fill the device, each chunk >= 16 rows
        p.splits = max(1, min(-(-p.rows // 16), -(-_target(dev)[0] * TG // p.D)))
        p.chunk_rows = -(-p.rows // p.splits)
        p.splits = -(-p.rows // p.chunk_rows)
        part = dev.buffer(8 * p.splits * p.D)
        kernel(dev, SOURCE, f"layer_norm_bwd_params_{sfx}")(p.splits * p.D, g.buffer, x.buffer, stats,
                                                            part, p)
        kernel(dev, SOURCE, f"layer_norm_params_sum_{sfx}")(
            p.D, part, dw.buffer if dw is not None else d, db.buffer if db is not None else d, p)
    return dx, dw, db
