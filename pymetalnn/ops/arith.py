"""Elementwise arithmetic with broadcasting (add, sub, mul, div), sum and mean over dims, and their
gradients (kernels/arith.metal).

Design: broadcasting follows numpy/torch (shapes aligned on the right, size-1 dims stretch). The
host turns every operand into per-dimension element strides of the output (0 where broadcast)
and merges adjacent dimensions that broadcast alike, so the kernels see few dimensions (a
same-shape op is one flat dimension, a per-channel bias [N, C, H*W]). Gradients of broadcast
operands are sums over the broadcast dimensions, computed by the reduction kernels with the
elementwise factor (g * b, g / b, ...) fused in, so no full-size temporary is written.
Storage is float32 or float16; every computation and every sum runs in float.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Union

import numpy as np

from ..params import MAXD, ArithParams, ReduceParams
from ..runtime import Device, Kernel
from ..runtime.core import MAX_GRID_THREADS
from ..tensor import Tensor, TensorLike, tensor
from ._common import (
    FLOATS,
    MAX_ELEMS_U32,
    MAX_GROUPS,
    STREAM_TG,
    kernel,
    out_like,
    pick_device,
    stream_chunk,
    stream_count,
    stream_launch,
    suffix,
    tensor_arg,
    tensor_arg_u32,
    vec4_aligned,
)
from .neuron import activation_code

SOURCE = "arith.metal"
# "auto": the channel path (arith_chan) and the chunked sums (sum_rows_*) where they apply;
# "general": arith_ew and reduce_inner / reduce_outer there instead (the earlier production, for
# benchmarks/dev_membound.py's comparison)
KERNELS = "auto"
GRID_CAP = 1 << 22         # threads per launch; kernels loop (grid-stride) past it
# Reductions split the reduced range until there is enough memory traffic in flight to cover the
# GPU's latency: about this many threads (outer) or simdgroups (inner), each split >= MIN_CHUNK.
OUTER_THREADS = 1 << 17
INNER_SIMDGROUPS = 1 << 13
MIN_CHUNK = 256
MAX_SPLITS = 8192
INNER_MIN = 16             # innermost reduced run from which the simdgroup kernel pays off
# sum_rows_* (full sums, per-channel sums of NCHW): rows of at least this many elements (shorter
# rows leave a 256-thread group most idle: reduce_inner's simdgroup per row then), and at least
# this many threadgroups before a thread takes fewer than 4 chunks
MIN_ROW_ELEMS = 4096
SUM_ROWS_GROUPS = 1024

Operand = Union[Tensor, np.ndarray, float, int]
Dims = Union[int, Sequence[int], None]


# ---- shape helpers ----------------------------------------------------------------------------
def broadcast_shapes(sa: tuple[int, ...], sb: tuple[int, ...], names: str = "a, b"
                     ) -> tuple[int, ...]:
    """numpy/torch broadcasting: align on the right, a size-1 dim stretches to the other's size."""
    nd = max(len(sa), len(sb))
    pa = (1,) * (nd - len(sa)) + tuple(sa)
    pb = (1,) * (nd - len(sb)) + tuple(sb)
    out = []
    for x, y in zip(pa, pb):
        if x != y and x != 1 and y != 1:
            raise ValueError(f"{names}: shapes {tuple(sa)} and {tuple(sb)} are not broadcastable")
        out.append(y if x == 1 else x)
    return tuple(out)


def bcast_strides(shape: tuple[int, ...], out_shape: tuple[int, ...]) -> list[int]:
    """Element strides of a contiguous `shape` per dimension of `out_shape` (0 where broadcast)."""
    nd = len(out_shape)
    padded = (1,) * (nd - len(shape)) + tuple(shape)
    strides = [0] * nd
    s = 1
    for d in range(nd - 1, -1, -1):
        strides[d] = s if padded[d] != 1 else 0
        s *= padded[d]
    return strides


def merge_dims(sizes: Sequence[int], strides: Sequence[Sequence[int]],
               flags: Sequence[bool] | None = None) -> list[tuple[int, bool, list[int]]]:
    """Drop size-1 dims and merge neighbours d, d+1 that are alike: the same flag and, for every
    operand, stride[d] == stride[d+1] * size[d+1]. Returns [(size, flag, [strides])], outermost
    first."""
    flags = flags or [False] * len(sizes)
    out: list[tuple[int, bool, list[int]]] = []
    for d, n in enumerate(sizes):
        if n == 1:
            continue
        st = [s[d] for s in strides]
        if out:
            pn, pf, ps = out[-1]
            if pf == flags[d] and all(a == b * n for a, b in zip(ps, st)):
                out[-1] = (pn * n, pf, st)
                continue
        out.append((n, flags[d], st))
    return out


def _operand(x: TensorLike, dev: Device, name: str, dtype: Any = None) -> Tensor | None:
    """A tensor operand, or None for a Python number (materialized later with the right dtype)."""
    if isinstance(x, (bool, np.bool_)):
        raise ValueError(f"{name}: bool is not a number operand here")
    if isinstance(x, (int, float, np.integer, np.floating)):
        return None
    return tensor_arg_u32(x, dev, name, FLOATS)


def _binary_args(a: Operand, b: Operand) -> tuple[Tensor, Tensor, bool, bool, Device]:
    """Validate (a, b): at least one tensor, same float dtype; numbers become 0-d tensors.
    Returns (a, b, a_is_tensor, b_is_tensor, device)."""
    dev = pick_device(a, b)
    ta = _operand(a, dev, "a")
    tb = _operand(b, dev, "b")
    if ta is None and tb is None:
        raise ValueError("a, b: at least one operand must be a tensor or array")
    if ta is not None and tb is not None and ta.dtype != tb.dtype:
        raise ValueError(f"b: dtype {tb.dtype} does not match a's {ta.dtype}")
    dt = (ta if ta is not None else tb).dtype
    # numbers are 0-d operands (pm.tensor makes a 0-d array shape (1,); reshape restores it)
    a_t = ta if ta is not None else tensor(np.array(a, dtype=dt), dev).reshape(())
    b_t = tb if tb is not None else tensor(np.array(b, dtype=dt), dev).reshape(())
    broadcast_shapes(a_t.shape, b_t.shape)
    return a_t, b_t, ta is not None, tb is not None, dev


# ---- dispatch ---------------------------------------------------------------------------------
def _operands(xs: Sequence[Tensor], out_shape: tuple[int, ...], in_shape: tuple[int, ...]
              ) -> tuple[Tensor, list[Tensor], list[list[int]]]:
    """The result (out_shape, xs[0]'s dtype and device), xs padded to the kernels' three operands
    (with xs[0]) and their strides over in_shape."""
    x0 = xs[0]
    out = out_like(out_shape, x0.dtype, x0.device)
    xs = list(xs) + [x0] * (3 - len(xs))
    return out, xs, [bcast_strides(x.shape, in_shape) for x in xs]


def _ew(name: str, out_shape: tuple[int, ...], xs: Sequence[Tensor], alpha: float = 1.0,
        act: tuple[int, float] = (0, 0.0)) -> Tensor:
    """out = act(name(xs[0], xs[1], xs[2])) elementwise, each x broadcast to out_shape; act =
    (NN_ACT_*, its scalar) of neuron.activation_code, (0, 0) for none."""
    out, xs, strides = _operands(xs, out_shape, out_shape)
    if out.size == 0:
        return out
    dev, dt = out.device, out.dtype
    dims = merge_dims(out_shape, strides) or [(1, False, [0, 0, 0])]
    if len(dims) > MAXD:
        raise ValueError(f"shape: broadcasting {[x.shape for x in xs]} needs {len(dims)} dimensions "
                         f"after merging, the kernels take {MAXD}")
    k = _flat_kernel(dev, name, dt, dims, xs, out, alpha, act)
    if k is None:
        k = _chan_kernel(dev, name, dt, dims, xs, out, alpha, act)
    if k is not None:
        return out
    vec = 4 if dims[-1][0] % 4 == 0 and all(vec4_aligned(x) for x in xs) else 1
    p = ArithParams(n=out.size // vec, ndim=len(dims), vec=vec, alpha=float(alpha), act=act[0],
                    act_alpha=act[1])
    for d, (n, _, st) in enumerate(dims):
        p.shape[d] = n
        p.stride0[d], p.stride1[d], p.stride2[d] = st
    k = kernel(dev, SOURCE, f"{name}_{suffix(dt)}")
    # one pass (one item per thread): a grid capped at GRID_CAP left a partial second sweep
    k(min(p.n, MAX_GRID_THREADS), xs[0].buffer, xs[1].buffer, xs[2].buffer, out.buffer, p)
    return out


def _flat_kernel(dev: Device, name: str, dt: Any, dims: list, xs: Sequence[Tensor], out: Tensor,
                 alpha: float, act: tuple[int, float]) -> Kernel | None:
    """The fast path of _ew (arith_flat, kernels/stream.h): after merging, one dimension along
    which every operand is contiguous (stride 1) or a single element (stride 0), e.g. same-shape
    operands or tensor op number (the `_splat` kernels): no index math, 16-byte accesses.
    Launches it and returns the kernel, or None where it does not apply."""
    if len(dims) != 1 or any(s not in (0, 1) for s in dims[0][2]):
        return None
    n = out.size
    nvec, count = stream_launch(n, dt.itemsize, [out, *(x for x, s in zip(xs, dims[0][2]) if s)])
    splat = "_splat" if 0 in dims[0][2] else ""
    k = kernel(dev, SOURCE, f"{name}_flat_{suffix(dt)}{splat}")
    if count > MAX_GRID_THREADS:
        return None
    p = ArithParams(n=n, ndim=1, vec=nvec, alpha=float(alpha), act=act[0], act_alpha=act[1])
    p.shape[0] = n
    p.stride0[0], p.stride1[0], p.stride2[0] = dims[0][2]
    k(count, xs[0].buffer, xs[1].buffer, xs[2].buffer, out.buffer, p)
    return k


def _chan_kernel(dev: Device, name: str, dt: Any, dims: list, xs: Sequence[Tensor], out: Tensor,
                 alpha: float, act: tuple[int, float]) -> Kernel | None:
    """The channel path of _ew (arith_chan): after merging, [N, C, HW] or [C, HW] with HW at
    least a 16-byte chunk, every operand contiguous with the output or one value per channel
    (x * w[c], x + b[c]), the contiguous ones 16-byte aligned. Launches it and returns the kernel,
    or None where it does not apply."""
    if len(dims) not in (2, 3) or KERNELS != "auto":
        return None
    c, hw = dims[-2][0], dims[-1][0]
    n = out.size
    full = [c * hw, hw, 1][-len(dims):]
    chan = [0, 1, 0][-len(dims):]
    kinds = []
    for i in range(3):
        st = [d[2][i] for d in dims]
        if st == full:
            kinds.append(1)
        elif st == chan:
            kinds.append(0)
        else:
            return None
    w = stream_chunk(dt.itemsize)
    if hw < w or 1 not in kinds or any(x.buffer.offset % 16 for x, s in zip(xs, kinds) if s) \
            or out.buffer.offset % 16:
        return None
    nvec = n // w
    count = stream_count(n, w, nvec)
    if count > MAX_GRID_THREADS:
        return None
    k = kernel(dev, SOURCE, f"{name}_chan_{suffix(dt)}")
    p = ArithParams(n=n, ndim=len(dims), vec=nvec, alpha=float(alpha), act=act[0],
                    act_alpha=act[1])
    p.shape[0], p.shape[1] = c, hw
    p.stride0[0], p.stride1[0], p.stride2[0] = kinds
    k(count, xs[0].buffer, xs[1].buffer, xs[2].buffer, out.buffer, p)
    return k


def _reduce(name: str, in_shape: tuple[int, ...], target: tuple[int, ...], xs: Sequence[Tensor],
            alpha: float = 1.0) -> Tensor:
    """out (shape `target`, same rank as in_shape, 1 on reduced dims) = alpha * sum over the
    reduced dims of name(xs) (each x broadcast to in_shape)."""
    out, xs, strides = _operands(xs, target, in_shape)
    if out.size == 0:
        return out
    dev, dt = out.device, out.dtype
    flags = [t == 1 and n != 1 for t, n in zip(target, in_shape)]
    dims = merge_dims(in_shape, strides, flags)
    kept = [d for d in dims if not d[1]]
    red = [d for d in dims if d[1]]
    n_out = math.prod(d[0] for d in kept)
    n_red = math.prod(d[0] for d in red)
    if n_red == 0:  # an empty sum: 0 (alpha * 0, so a mean's nan), and no 0-size dims in kernels
        return tensor(np.full(target, 0.0 * alpha, dtype=dt), dev).reshape(target)
    if name == "sum_fwd" and KERNELS == "auto" and xs[0].shape == tuple(in_shape) and \
            _sum_rows(dims, xs[0], out, alpha):
        return out
    inner = bool(dims) and dims[-1][1] and dims[-1][0] >= INNER_MIN
    rdims = red[:-1] if inner else red
    if len(kept) > MAXD or len(rdims) > MAXD:
        raise ValueError(f"shape: reducing {in_shape} to {target} needs more than {MAXD} "
                         "dimensions after merging")
    aligned = all(vec4_aligned(x) for x in xs)
    if inner:
        vec = 4 if dims[-1][0] % 4 == 0 and aligned else 1
        units = n_out  # simdgroups per split
    else:
        vec = 4 if kept and dims[-1] is kept[-1] and kept[-1][0] % 4 == 0 and aligned else 1
        units = n_out // vec  # threads per split
    want = INNER_SIMDGROUPS if inner else OUTER_THREADS
    splits = max(1, min(-(-want // units), n_red // MIN_CHUNK, MAX_SPLITS))
    chunk = -(-n_red // splits) if n_red else 0
    if inner:
        chunk = -(-chunk // vec) * vec  # splits start on a vector boundary
    splits = -(-n_red // chunk) if chunk else 1
    items = units * splits * (32 if inner else 1)
    if items > MAX_ELEMS_U32:
        raise ValueError(f"shape: {in_shape} is too large for the reduction kernels")
    p = ReduceParams(n_out=n_out, n_red=n_red, splits=splits, chunk=chunk, nk=len(kept),
                     nr=len(rdims), alpha=float(alpha), vec=vec)
    for d, (n, _, st) in enumerate(kept):
        p.ksize[d] = n
        p.kstride0[d], p.kstride1[d], p.kstride2[d] = st
    for d, (n, _, st) in enumerate(rdims):
        p.rsize[d] = n
        p.rstride0[d], p.rstride1[d], p.rstride2[d] = st
    if inner:
        p.inner = dims[-1][0]
        p.istride0, p.istride1, p.istride2 = dims[-1][2]
    partial = out_like((n_out * splits if splits > 1 else 1,), np.float32, dev).buffer
    sfx = suffix(dt)
    k = kernel(dev, SOURCE, f"{name}_{'inner' if inner else 'outer'}_{sfx}")
    k(min(items, GRID_CAP), xs[0].buffer, xs[1].buffer, xs[2].buffer, out.buffer, partial, p)
    if splits > 1:
        kernel(dev, SOURCE, f"sum_fwd_finish_{sfx}")(min(32 * n_out, GRID_CAP), partial, out.buffer, p)
    return out


def _sum_rows(dims: list, x: Tensor, out: Tensor, alpha: float) -> bool:
    """sum_rows_part / sum_rows_finish (kernels/arith.metal) for a full sum of x, or the
    per-channel sum of an (N, C, HW) layout (merged dims [HW], [C, HW] or [N, C, HW] with HW
    reduced, C kept), HW a whole number of 16-byte chunks and x 16-byte aligned, at least
    MIN_ROW_ELEMS per row; x itself, not broadcast (so its merged dims are contiguous). The plan
    depends on the shape only. False where it does not apply."""
    if not dims:
        return False
    flags = [f for _, f, _ in dims]
    if flags == [True]:
        n, c, hw = 1, 1, dims[0][0]
    elif flags == [False, True]:
        n, c, hw = 1, dims[0][0], dims[1][0]
    elif flags == [True, False, True]:
        n, c, hw = dims[0][0], dims[1][0], dims[2][0]
    else:
        return False
    w = stream_chunk(x.dtype.itemsize)
    row = n * hw
    if hw % w or x.buffer.offset % 16 or row < MIN_ROW_ELEMS:
        return False
    # chunks per thread: 4 (64 bytes; 8 for a full sum, whose partials one threadgroup adds up:
    # half as many), halved while fewer than SUM_ROWS_GROUPS threadgroups
    q = 8 if c == 1 else 4
    while q > 1 and c * -(-row // (STREAM_TG * q * w)) < SUM_ROWS_GROUPS:
        q //= 2
    chunk = STREAM_TG * q * w
    splits = -(-row // chunk)
    p = ReduceParams(n_out=c, n_red=row, inner=hw, splits=splits, chunk=chunk, alpha=float(alpha),
                     vec=w)
    dev, sfx = x.device, suffix(x.dtype)
    part = out_like((c * splits,), np.float32, dev)
    groups = min(c * splits, MAX_GROUPS)
    kernel(dev, SOURCE, f"sum_rows_part_{sfx}")(groups * STREAM_TG, x.buffer, part.buffer, p)
    kernel(dev, SOURCE, f"sum_rows_finish_{sfx}")(min(c, MAX_GROUPS) * STREAM_TG, part.buffer,
                                                 out.buffer, p)
    return True


# ---- binary ops -------------------------------------------------------------------------------
def _binary(op: str, a: Operand, b: Operand, activation: Any = None) -> Tensor:
    a_t, b_t, _, _, _ = _binary_args(a, b)
    return _ew(f"{op}_fwd", broadcast_shapes(a_t.shape, b_t.shape), [a_t, b_t],
               act=activation_code(activation))


# activation= (as conv2d / linear / batch_norm take it): the result goes through relu, leaky relu
# (slope in ("leaky_relu", {"negative_slope": s})), sigmoid or tanh in the same pass, e.g. a
# residual add + relu; the gradient: <neuron>_backward_from_output of the result, then the op's.
def add(a: Operand, b: Operand, activation: Any = None) -> Tensor:
    """out = act(a + b), broadcast as numpy/torch (either operand may be a Python number)."""
    return _binary("add", a, b, activation)


def sub(a: Operand, b: Operand, activation: Any = None) -> Tensor:
    """out = act(a - b), broadcast as numpy/torch."""
    return _binary("sub", a, b, activation)


def mul(a: Operand, b: Operand, activation: Any = None) -> Tensor:
    """out = act(a * b), broadcast as numpy/torch."""
    return _binary("mul", a, b, activation)


def div(a: Operand, b: Operand, activation: Any = None) -> Tensor:
    """out = act(a / b), broadcast as numpy/torch (IEEE: x / 0 is +-inf or nan)."""
    return _binary("div", a, b, activation)


def _binary_backward(op: str, grad_out: TensorLike, a: Operand, b: Operand
                     ) -> tuple[Tensor | None, Tensor | None]:
    a_t, b_t, a_is, b_is, dev = _binary_args(a, b)
    out_shape = broadcast_shapes(a_t.shape, b_t.shape)
    g = tensor_arg(grad_out, dev, "grad_out", [a_t.dtype])
    if g.shape != out_shape:
        raise ValueError(f"grad_out: shape {g.shape}, expected the output shape {out_shape}")
    n = math.prod(out_shape)
    full_a, full_b = a_t.size == n, b_t.size == n
    if a_is and b_is and full_a and full_b and n and vec4_aligned(g) and vec4_aligned(a_t) \
            and vec4_aligned(b_t):
        # both gradients in one pass over g, a, b (kernels/stream.h shape)
        ga, gb = out_like(a_t.shape, g.dtype, dev), out_like(b_t.shape, g.dtype, dev)
        k = kernel(dev, SOURCE, f"{op}_bwd_{suffix(g.dtype)}")
        nvec, count = stream_launch(n, g.dtype.itemsize, [g, a_t, b_t, ga, gb])
        if count <= MAX_GRID_THREADS:
            p = ArithParams(n=n, ndim=1, vec=nvec, alpha=1.0)
            k(count, g.buffer, a_t.buffer, b_t.buffer, ga.buffer, gb.buffer, p)
            return ga, gb

    def grad(which: str) -> Tensor:
        t = a_t if which == "a" else b_t
        target = (1,) * (len(out_shape) - t.ndim) + t.shape
        sign = -1.0 if (op == "sub" and which == "b") else 1.0
        if op in ("add", "sub"):
            name, xs = "scale_fwd" if t.size == n else "sum_fwd", [g]
        elif op == "mul":
            name, xs = ("mul_fwd" if t.size == n else "mul_bwd"), [g, b_t if which == "a" else a_t]
        elif which == "a":
            name, xs = ("div_fwd" if t.size == n else "div_bwd_lhs"), [g, b_t]
        else:
            name, xs = "div_bwd_rhs", [g, a_t, b_t]
        if t.size == n:
            return _ew(name, out_shape, xs, sign).reshape(t.shape)
        return _reduce(name, out_shape, target, xs, sign).reshape(t.shape)

    return (grad("a") if a_is else None), (grad("b") if b_is else None)


def add_backward(grad_out: TensorLike, a: Operand, b: Operand
                 ) -> tuple[Tensor | None, Tensor | None]:
    """(dL/da, dL/db) of out = a + b: grad_out summed over the dims each operand was broadcast
    along, reshaped to its shape; None for a Python-number operand."""
    return _binary_backward("add", grad_out, a, b)


def sub_backward(grad_out: TensorLike, a: Operand, b: Operand
                 ) -> tuple[Tensor | None, Tensor | None]:
    """(dL/da, dL/db) of out = a - b: (reduce(g), -reduce(g)) over broadcast dims."""
    return _binary_backward("sub", grad_out, a, b)


def mul_backward(grad_out: TensorLike, a: Operand, b: Operand
                 ) -> tuple[Tensor | None, Tensor | None]:
    """(dL/da, dL/db) of out = a * b: (reduce(g * b), reduce(g * a)) over broadcast dims."""
    return _binary_backward("mul", grad_out, a, b)


def div_backward(grad_out: TensorLike, a: Operand, b: Operand
                 ) -> tuple[Tensor | None, Tensor | None]:
    """(dL/da, dL/db) of out = a / b: (reduce(g / b), reduce(-g * a / b^2)) over broadcast dims."""
    return _binary_backward("div", grad_out, a, b)


# ---- sum / mean -------------------------------------------------------------------------------
def normalize_dims(dim: Dims, ndim: int, name: str = "dim") -> tuple[int, ...]:
    """dim (None = all, int, or a sequence; negative counts from the end) as sorted axes."""
    if dim is None:
        return tuple(range(ndim))
    dims = (dim,) if isinstance(dim, (int, np.integer)) else tuple(dim)
    if not dims:
        raise ValueError(f"{name}: empty; pass None to reduce over every dimension")
    out = []
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)):
            raise ValueError(f"{name}: expected ints, got {dim!r}")
        lim = max(ndim, 1)
        if not -lim <= d < lim:
            raise ValueError(f"{name}: {d} is out of range for a tensor of {ndim} dimensions")
        out.append(int(d) % lim)
    if len(set(out)) != len(out):
        raise ValueError(f"{name}: repeated dimension in {dim!r}")
    return tuple(sorted(out))


def _reduced_shape(shape: tuple[int, ...], axes: tuple[int, ...], keepdim: bool) -> tuple[int, ...]:
    if keepdim:
        return tuple(1 if d in axes else n for d, n in enumerate(shape))
    return tuple(n for d, n in enumerate(shape) if d not in axes)


def _sum(x: TensorLike, dim: Dims, keepdim: bool, mean: bool) -> Tensor:
    dev = pick_device(x)
    x = tensor_arg_u32(x, dev, "x", FLOATS)
    axes = normalize_dims(dim, x.ndim)
    count = math.prod(x.shape[d] for d in axes if d < x.ndim)
    alpha = (1.0 / count if count else math.nan) if mean else 1.0
    target = tuple(1 if d in axes else n for d, n in enumerate(x.shape))
    out = _reduce("sum_fwd", x.shape, target, [x], alpha)
    return out.reshape(_reduced_shape(x.shape, axes, keepdim))


def sum(x: TensorLike, dim: Dims = None, keepdim: bool = False) -> Tensor:  # noqa: A001
    """out = sum of x over `dim` (None: all dims), as torch.sum; float accumulation."""
    return _sum(x, dim, keepdim, False)


def mean(x: TensorLike, dim: Dims = None, keepdim: bool = False) -> Tensor:
    """out = sum of x over `dim` / (number of elements summed), as torch.mean."""
    return _sum(x, dim, keepdim, True)


def _sum_backward(grad_out: TensorLike, x: TensorLike, dim: Dims, keepdim: bool, mean: bool
                  ) -> Tensor:
    dev = pick_device(grad_out, x)
    x = tensor_arg(x, dev, "x", FLOATS)
    g = tensor_arg(grad_out, dev, "grad_out", [x.dtype])
    axes = normalize_dims(dim, x.ndim)
    want = _reduced_shape(x.shape, axes, keepdim)
    if g.shape != want:
        raise ValueError(f"grad_out: shape {g.shape}, expected {want}")
    count = math.prod(x.shape[d] for d in axes if d < x.ndim)
    alpha = (1.0 / count if count else math.nan) if mean else 1.0
    g = g.reshape(tuple(1 if d in axes else n for d, n in enumerate(x.shape)))
    return _ew("scale_fwd", x.shape, [g], alpha)


def sum_backward(grad_out: TensorLike, x: TensorLike, dim: Dims = None, keepdim: bool = False
                 ) -> Tensor:
    """dL/dx of out = sum(x, dim, keepdim): grad_out broadcast back over the summed dims."""
    return _sum_backward(grad_out, x, dim, keepdim, False)


def mean_backward(grad_out: TensorLike, x: TensorLike, dim: Dims = None, keepdim: bool = False
                  ) -> Tensor:
    """dL/dx of out = mean(x, dim, keepdim): grad_out / count broadcast over the reduced dims."""
    return _sum_backward(grad_out, x, dim, keepdim, True)
