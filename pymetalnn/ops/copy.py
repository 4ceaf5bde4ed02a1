"""Data movement (kernels/copy.metal): copy and cast, concat / split / stack / unbind along any
dim, permute / transpose, the image <-> matrix bridge between CNN and FC/RNN layers, and the
sequence layouts the LSTM uses; each with its backward.

Design: every op is a few launches of a handful of kernels. A tensor viewed around a dim `d` is a
matrix (prod(shape[:d]), shape[d] * prod(shape[d+1:])); one operand of a concat, or one piece of a
split, is then a block of its columns, and one launch moves up to 8 of them (the metal backend
binds whole buffers only, so pieces cannot be views of one buffer there; on cuda and cpu the
pieces of a dim-0 split are views of a single copy, and a concat of such adjacent views is one
copy).
Permutations are classified after merging the dims that stay adjacent: a plain copy, a gather
that keeps the innermost dim (coalesced, vectorized), or a batched matrix transpose when the
innermost dim moves (tiled through threadgroup memory).

    concat(xs, d)[..., o_i + j, ...] = xs[i][..., j, ...]   with o_i = sum_{k < i} xs[k].shape[d]
    permute(x, p)[i_0, ..., i_{n-1}] = x[j] with j[p[k]] = i_k
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Union

import numpy as np

from ..params import MAXD, ConcatParams, CopyParams, PermuteParams, TransposeParams
from ..runtime import Device
from ..runtime.core import MAX_GRID_THREADS
from ..tensor import Tensor, TensorLike
from ._common import (
    MAX_ELEMS_U32,
    STREAM_TG,
    STREAM_U,
    kernel,
    out_like,
    pick_device,
    stream_chunk,
    stream_count,
    suffix,
    tensor_arg_u32,
    vec4_aligned,
)
from .arith import GRID_CAP, merge_dims

SOURCE = "copy.metal"
MOVABLE = (np.float32, np.float16, np.int32)
SplitArg = Union[int, Sequence[int]]
# "auto": concat / split groups of whole 16-byte chunks through concat_stream / split_stream;
# "general": concat8 / split8 there too (the earlier production, for benchmarks/dev_membound.py)
KERNELS = "auto"


# ---- helpers ----------------------------------------------------------------------------------
def _arg(x: TensorLike, dev: Device, name: str, dtypes: Any = MOVABLE) -> Tensor:
    return tensor_arg_u32(x, dev, name, dtypes)


def _dim(dim: Any, ndim: int, name: str = "dim") -> int:
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)):
        raise ValueError(f"{name}: expected an int, got {dim!r}")
    if not -ndim <= dim < ndim:
        raise ValueError(f"{name}: {dim} is out of range for a tensor of {ndim} dimensions")
    return int(dim) % ndim


def _flat(src: Tensor, dst: Tensor, n: int, src_off: int, dst_off: int) -> bool:
    """One contiguous run of n elements: copy_flat (kernels/stream.h shape, 16-byte chunks of the
    narrower type). False where the launch would exceed the grid (the caller's block copy then)."""
    w = stream_chunk(src.dtype.itemsize, dst.dtype.itemsize)
    aligned = (src.buffer.offset + src_off * src.dtype.itemsize) % 16 == 0 and \
        (dst.buffer.offset + dst_off * dst.dtype.itemsize) % 16 == 0
    nvec = n // w if aligned else 0
    if src.dtype == dst.dtype:
        name = f"copy_fwd_{suffix(src.dtype)}_flat"
    else:
        name = f"cast_fwd_to{suffix(dst.dtype)}_{suffix(src.dtype)}_flat"
    k = kernel(src.device, SOURCE, name)
    count = stream_count(n, w, nvec)
    if count > MAX_GRID_THREADS:
        return False
    p = CopyParams(n=n, rows=1, cols=n, vec=nvec, src_pitch=n, dst_pitch=n, src_off=src_off,
                   dst_off=dst_off)
    k(count, src.buffer, dst.buffer, p)
    return True


def _vec(counts: tuple, ts: tuple, wide: int) -> int:
    """Elements per access of copy_block / concat8 / split8: `wide` (16 bytes) when every width,
    pitch and offset in `counts` is a multiple of it and the tensors start 16-byte aligned, else 4
    when they are multiples of 4 (4-element aligned), else 1."""
    if all(v % wide == 0 for v in counts) and all(t.buffer.offset % 16 == 0 for t in ts):
        return wide
    if all(v % 4 == 0 for v in counts) and all(vec4_aligned(t) for t in ts):
        return 4
    return 1


def _block(src: Tensor, dst: Tensor, rows: int, cols: int, src_pitch: int, dst_pitch: int,
           src_off: int, dst_off: int) -> None:
    """dst[dst_off + r * dst_pitch + c] = src[src_off + r * src_pitch + c] (cast to dst's type)."""
    if rows * cols == 0:
        return
    if (rows == 1 or src_pitch == dst_pitch == cols) and _flat(src, dst, rows * cols, src_off,
                                                               dst_off):
        return
    vec = _vec((cols, src_pitch, dst_pitch, src_off, dst_off), (src, dst),
               16 // src.dtype.itemsize if src.dtype == dst.dtype else 4)
    p = CopyParams(n=rows * cols // vec, rows=rows, cols=cols, vec=vec, src_pitch=src_pitch,
                   dst_pitch=dst_pitch, src_off=src_off, dst_off=dst_off)
    if src.dtype == dst.dtype:
        name = f"copy_fwd_{suffix(src.dtype)}"
    else:
        name = f"cast_fwd_to{suffix(dst.dtype)}_{suffix(src.dtype)}"
    kernel(src.device, SOURCE, name)(min(p.n, GRID_CAP), src.buffer, dst.buffer, p)


def _adjacent(ts: list[Tensor]) -> bool:
    """True when the tensors lie back to back, in order, in one buffer (views of one base)."""
    if len(ts) < 2 or not ts[0].device.supports_views:
        return False
    base = ts[0].buffer.base
    for a, b in zip(ts, ts[1:]):
        if b.buffer.base is not base or a.buffer.offset + a.nbytes != b.buffer.offset:
            return False
    return True


def _parts(op: str, whole: Tensor, rows: int, pitch: int, parts: list[tuple[Tensor, int, int]]
           ) -> None:
    """concat: whole[r, off + c] = part[r, c] for each (part, cols, off); split: the reverse.
    Up to 8 parts per launch."""
    parts = [pt for pt in parts if pt[1] and rows]
    for g in range(0, len(parts), 8):
        group = parts[g: g + 8]
        wide = 16 // whole.dtype.itemsize
        vec = _vec((pitch, *(c for _, c, _ in group), *(o for _, _, o in group)),
                   (whole, *(t for t, _, _ in group)), wide)
        if vec == wide and KERNELS == "auto" and _parts_stream(op, whole, rows, pitch, group):
            continue
        p = ConcatParams(parts=len(group), rows=rows, vec=vec, pitch=pitch)
        n = 0
        for i, (_, c, o) in enumerate(group):
            p.start[i], p.cols[i], p.off[i] = n, c, o
            n += rows * c // vec
        p.n = n
        bufs = [t.buffer for t, _, _ in group]
        bufs += [bufs[0]] * (8 - len(bufs))
        k = kernel(whole.device, SOURCE, f"{op}_fwd_{suffix(whole.dtype)}")
        if op == "concat":
            k(min(n, GRID_CAP), *bufs, whole.buffer, p)
        else:
            k(min(n, GRID_CAP), whole.buffer, *bufs, p)


def _parts_stream(op: str, whole: Tensor, rows: int, pitch: int,
                  group: list[tuple[Tensor, int, int]]) -> bool:
    """concat_stream / split_stream (stream.h shape, one part per block of STREAM_TG threads) for
    one group of consecutive parts whose widths, offsets and pitch are whole 16-byte chunks; False
    where the grid would be too wide."""
    w = 16 // whole.dtype.itemsize
    per_block = STREAM_U * STREAM_TG  # chunks of one block
    p = ConcatParams(parts=len(group), rows=rows, vec=w, pitch=pitch)
    blocks = 0
    for i, (_, c, o) in enumerate(group):
        p.start[i], p.cols[i], p.off[i] = blocks, c, o
        blocks += -(-rows * (c // w) // per_block)
    p.n = blocks
    count = blocks * STREAM_TG
    if count > MAX_GRID_THREADS or rows * pitch > MAX_ELEMS_U32:
        return False
    bufs = [t.buffer for t, _, _ in group]
    bufs += [bufs[0]] * (8 - len(bufs))
    k = kernel(whole.device, SOURCE, f"{op}_stream_fwd_{suffix(whole.dtype)}")
    if op == "concat":
        k(count, *bufs, whole.buffer, p)
    else:
        k(count, whole.buffer, *bufs, p)
    return True


def _around(shape: tuple[int, ...], d: int) -> tuple[int, int]:
    """(rows, inner) of `shape` viewed around dim d: rows = prod(shape[:d]), inner = prod(shape[d+1:])."""
    return math.prod(shape[:d]), math.prod(shape[d + 1:])


# ---- copy / cast ------------------------------------------------------------------------------
def _into(out: Tensor | None, shape: tuple[int, ...], dtype: np.dtype, dev: Device) -> Tensor:
    """The destination of copy / cast: a new tensor, or `out=` checked (a Tensor on dev of the
    result's shape and dtype), which the op overwrites in place."""
    if out is None:
        return out_like(shape, dtype, dev)
    if not isinstance(out, Tensor):
        raise TypeError(f"out: expected a Tensor, got {type(out).__name__}")
    if out.device is not dev:
        raise ValueError(f"out: on {out.device.name}, x on {dev.name}")
    if out.dtype != dtype:
        raise ValueError(f"out: dtype {out.dtype}, expected {dtype}")
    if out.shape != shape:
        raise ValueError(f"out: shape {out.shape}, expected {shape}")
    return out


def copy(x: TensorLike, out: Tensor | None = None) -> Tensor:
    """A new tensor with x's shape, dtype and values; out= (a tensor of x's shape and dtype):
    written in place of a new one (torch's out.copy_(x))."""
    x = _arg(x, pick_device(x), "x")
    out = _into(out, x.shape, x.dtype, x.device)
    _block(x, out, 1, x.size, x.size, x.size, 0, 0)
    return out


def cast(x: TensorLike, dtype: Any, out: Tensor | None = None) -> Tensor:
    """x converted to `dtype` (float32 <-> float16, round to nearest even; same dtype: a copy);
    out= (a tensor of x's shape and that dtype): written in place of a new one."""
    dev = pick_device(x)
    x = _arg(x, dev, "x", (np.float32, np.float16))
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise ValueError(f"dtype: {dtype!r} is not a dtype") from None
    if dt not in (np.dtype(np.float32), np.dtype(np.float16)):
        raise ValueError(f"dtype: {dt} not supported here (float32, float16)")
    out = _into(out, x.shape, dt, dev)
    _block(x, out, 1, x.size, x.size, x.size, 0, 0)
    return out


def cast_backward(grad_out: TensorLike, x: TensorLike, dtype: Any) -> Tensor:
    """dL/dx of cast(x, dtype): grad_out cast back to x's dtype."""
    dev = pick_device(grad_out, x)
    x = _arg(x, dev, "x", (np.float32, np.float16))
    g = _arg(grad_out, dev, "grad_out", (np.dtype(dtype),))
    if g.shape != x.shape:
        raise ValueError(f"grad_out: shape {g.shape}, expected {x.shape}")
    return cast(g, x.dtype)


# ---- concat / split ---------------------------------------------------------------------------
def _tensor_list(xs: Any, dev: Device, name: str) -> list[Tensor]:
    if isinstance(xs, Tensor) or not isinstance(xs, (list, tuple)) or not xs:
        raise ValueError(f"{name}: expected a non-empty list of tensors")
    ts = [_arg(x, dev, f"{name}[{i}]") for i, x in enumerate(xs)]
    for i, t in enumerate(ts[1:], 1):
        if t.dtype != ts[0].dtype:
            raise ValueError(f"{name}[{i}]: dtype {t.dtype} does not match {name}[0]'s {ts[0].dtype}")
    return ts


def concat(tensors: Sequence[Any], dim: int = 0) -> Tensor:
    """Join tensors along `dim` (as torch.cat): every other dim must match."""
    dev = pick_device(*tensors) if isinstance(tensors, (list, tuple)) else pick_device()
    ts = _tensor_list(tensors, dev, "tensors")
    nd = ts[0].ndim
    if nd == 0:
        raise ValueError("tensors[0]: zero-dimensional tensors cannot be concatenated")
    d = _dim(dim, nd)
    for i, t in enumerate(ts):
        if t.ndim != nd or t.shape[:d] != ts[0].shape[:d] or t.shape[d + 1:] != ts[0].shape[d + 1:]:
            raise ValueError(f"tensors[{i}]: shape {t.shape} does not match tensors[0]'s "
                             f"{ts[0].shape} outside dim {d}")
    total = sum(t.shape[d] for t in ts)
    out_shape = ts[0].shape[:d] + (total,) + ts[0].shape[d + 1:]
    rows, inner = _around(out_shape, d)
    if rows == 1 and _adjacent(ts):  # e.g. the steps sequence_to_list made: one copy
        whole = Tensor(ts[0].buffer.base.view(ts[0].buffer.offset, sum(t.nbytes for t in ts)),
                       out_shape, ts[0].dtype)
        return copy(whole)
    out = out_like(out_shape, ts[0].dtype, dev)
    offs = np.cumsum([0] + [t.shape[d] for t in ts])[:-1]
    _parts("concat", out, rows, total * inner, [(t, t.shape[d] * inner, int(o) * inner)
                                                for t, o in zip(ts, offs)])
    return out


cat = concat


def _sections(split: SplitArg, length: int) -> list[int]:
    if isinstance(split, (int, np.integer)) and not isinstance(split, bool):
        if split <= 0:
            raise ValueError(f"split_size_or_sections: must be > 0, got {split}")
        return [min(split, length - i) for i in range(0, length, int(split))] or [0]
    sizes = list(split)
    if not sizes or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0
                        for s in sizes):
        raise ValueError(f"split_size_or_sections: expected an int or a list of ints >= 0, got {split!r}")
    if sum(sizes) != length:
        raise ValueError(f"split_size_or_sections: {sizes} sums to {sum(sizes)}, the dim has {length}")
    return [int(s) for s in sizes]


def split(x: TensorLike, split_size_or_sections: SplitArg, dim: int = 0, *,
          x_batch_stride: int | None = None, need: Sequence[bool] | None = None
          ) -> list[Tensor | None]:
    """Pieces of x along `dim` (as torch.split): an int gives pieces of that size (the last may be
    smaller); a list gives the sizes.

    x_batch_stride (dim 1 only): elements between x's images as stored (None: contiguous), for an
    x that is itself a channel slice of a larger tensor (its images further apart than C * inner).
    need: one bool per piece; a piece whose entry is False is not copied (None in its place).
    """
    x = _arg(x, pick_device(x), "x")
    if x.ndim == 0:
        raise ValueError("x: a zero-dimensional tensor cannot be split")
    d = _dim(dim, x.ndim)
    sizes = _sections(split_size_or_sections, x.shape[d])
    rows, inner = _around(x.shape, d)
    pitch = x.shape[d] * inner
    if x_batch_stride is not None:
        if d != 1:
            raise ValueError(f"x_batch_stride: only for dim 1, got dim {dim}")
        if isinstance(x_batch_stride, bool) or not isinstance(x_batch_stride, (int, np.integer)) \
                or x_batch_stride < pitch:
            raise ValueError(f"x_batch_stride: expected an int >= {pitch} (an image's elements), "
                             f"got {x_batch_stride!r}")
        pitch = int(x_batch_stride)
    if need is not None:
        need = [bool(n) for n in need]
        if len(need) != len(sizes):
            raise ValueError(f"need: {len(need)} entries for {len(sizes)} pieces")
    outs: list[Tensor | None] = []
    off = 0
    if rows == 1 and len(sizes) > 1 and x.device.supports_views and need is None:
        # the pieces are consecutive slabs of x: one copy, and each piece a view of its slab
        whole = copy(x)
        isz = x.dtype.itemsize
        for s in sizes:
            view = whole.buffer.view(off * inner * isz, s * inner * isz)
            outs.append(Tensor(view, x.shape[:d] + (s,) + x.shape[d + 1:], x.dtype))
            off += s
        return outs
    parts = []
    for k, s in enumerate(sizes):
        if need is None or need[k]:
            piece = out_like(x.shape[:d] + (s,) + x.shape[d + 1:], x.dtype, x.device)
            parts.append((piece, s * inner, off * inner))
            outs.append(piece)
        else:
            outs.append(None)
        off += s
    _parts("split", x, rows, pitch, parts)
    return outs


def concat_backward(grad_out: TensorLike, tensors: Sequence[Any], dim: int = 0) -> list[Tensor]:
    """dL/d tensors[i] of concat(tensors, dim): the matching slabs of grad_out."""
    dev = pick_device(grad_out, *tensors) if isinstance(tensors, (list, tuple)) else pick_device()
    ts = _tensor_list(tensors, dev, "tensors")
    g = _arg(grad_out, dev, "grad_out", (ts[0].dtype,))
    d = _dim(dim, max(ts[0].ndim, 1))
    want = ts[0].shape[:d] + (sum(t.shape[d] for t in ts),) + ts[0].shape[d + 1:]
    if g.shape != want:
        raise ValueError(f"grad_out: shape {g.shape}, expected the concat's {want}")
    return split(g, [t.shape[d] for t in ts], d)


def split_backward(grad_outs: Sequence[Any], x: TensorLike, split_size_or_sections: SplitArg,
                   dim: int = 0) -> Tensor:
    """dL/dx of split(x, ...): the pieces' gradients joined along `dim`."""
    dev = pick_device(x, *grad_outs) if isinstance(grad_outs, (list, tuple)) else pick_device(x)
    x = _arg(x, dev, "x")
    d = _dim(dim, max(x.ndim, 1))
    sizes = _sections(split_size_or_sections, x.shape[d])
    gs = _tensor_list(grad_outs, dev, "grad_outs")
    if len(gs) != len(sizes):
        raise ValueError(f"grad_outs: {len(gs)} gradients for {len(sizes)} pieces")
    for i, (g, s) in enumerate(zip(gs, sizes)):
        want = x.shape[:d] + (s,) + x.shape[d + 1:]
        if g.shape != want or g.dtype != x.dtype:
            raise ValueError(f"grad_outs[{i}]: {g.shape} {g.dtype}, expected {want} {x.dtype}")
    return concat(gs, d)


# ---- stack / unbind (the LSTM's sequence <-> list of steps) -------------------------------------
def stack(tensors: Sequence[Any], dim: int = 0) -> Tensor:
    """Join same-shape tensors along a new dim (as torch.stack)."""
    dev = pick_device(*tensors) if isinstance(tensors, (list, tuple)) else pick_device()
    ts = _tensor_list(tensors, dev, "tensors")
    for i, t in enumerate(ts):
        if t.shape != ts[0].shape:
            raise ValueError(f"tensors[{i}]: shape {t.shape} does not match tensors[0]'s {ts[0].shape}")
    d = _dim(dim, ts[0].ndim + 1)
    return concat([t.reshape(t.shape[:d] + (1,) + t.shape[d:]) for t in ts], d)


def unbind(x: TensorLike, dim: int = 0) -> list[Tensor]:
    """The slices of x along `dim`, that dim removed (as torch.unbind)."""
    x = _arg(x, pick_device(x), "x")
    if x.ndim == 0:
        raise ValueError("x: a zero-dimensional tensor cannot be unbound")
    d = _dim(dim, x.ndim)
    shape = x.shape[:d] + x.shape[d + 1:]
    return [p.reshape(shape) for p in split(x, 1, d)] if x.shape[d] else []


def stack_backward(grad_out: TensorLike, tensors: Sequence[Any], dim: int = 0) -> list[Tensor]:
    """dL/d tensors[i] of stack(tensors, dim): the slices of grad_out."""
    dev = pick_device(grad_out, *tensors) if isinstance(tensors, (list, tuple)) else pick_device()
    ts = _tensor_list(tensors, dev, "tensors")
    g = _arg(grad_out, dev, "grad_out", (ts[0].dtype,))
    d = _dim(dim, ts[0].ndim + 1)
    want = ts[0].shape[:d] + (len(ts),) + ts[0].shape[d:]
    if g.shape != want:
        raise ValueError(f"grad_out: shape {g.shape}, expected the stack's {want}")
    return unbind(g, d)


def unbind_backward(grad_outs: Sequence[Any], x: TensorLike, dim: int = 0) -> Tensor:
    """dL/dx of unbind(x, dim): the slices' gradients stacked along `dim`."""
    dev = pick_device(x, *grad_outs) if isinstance(grad_outs, (list, tuple)) else pick_device(x)
    x = _arg(x, dev, "x")
    d = _dim(dim, max(x.ndim, 1))
    gs = _tensor_list(grad_outs, dev, "grad_outs")
    want = x.shape[:d] + x.shape[d + 1:]
    if len(gs) != x.shape[d]:
        raise ValueError(f"grad_outs: {len(gs)} gradients for {x.shape[d]} slices")
    for i, g in enumerate(gs):
        if g.shape != want or g.dtype != x.dtype:
            raise ValueError(f"grad_outs[{i}]: {g.shape} {g.dtype}, expected {want} {x.dtype}")
    return stack(gs, d)


def sequence_to_list(x: TensorLike) -> list[Tensor]:
    """A time-major sequence (T, N, F) as T matrices (N, F): [time][batch, features]."""
    x = _arg(x, pick_device(x), "x")
    if x.ndim != 3:
        raise ValueError(f"x: expected (T, N, F), got shape {x.shape}")
    return unbind(x, 0)


def list_to_sequence(steps: Sequence[Any]) -> Tensor:
    """T matrices (N, F) as one time-major sequence (T, N, F)."""
    dev = pick_device(*steps) if isinstance(steps, (list, tuple)) else pick_device()
    ts = _tensor_list(steps, dev, "steps")
    if ts[0].ndim != 2:
        raise ValueError(f"steps[0]: expected a matrix (N, F), got shape {ts[0].shape}")
    return stack(ts, 0)


def sequence_to_list_backward(grad_outs: Sequence[Any], x: TensorLike) -> Tensor:
    """dL/dx of sequence_to_list(x): the steps' gradients stacked into (T, N, F)."""
    return unbind_backward(grad_outs, x, 0)


def list_to_sequence_backward(grad_out: TensorLike, steps: Sequence[Any]) -> list[Tensor]:
    """dL/d steps[t] of list_to_sequence(steps): grad_out's time slices."""
    return stack_backward(grad_out, steps, 0)


# ---- permute / transpose ----------------------------------------------------------------------
def _perm(dims: Any, ndim: int) -> tuple[int, ...]:
    try:
        p = tuple(int(d) % max(ndim, 1) if -ndim <= int(d) < ndim else -1 for d in dims)
    except (TypeError, ValueError):
        raise ValueError(f"dims: expected a permutation of range({ndim}), got {dims!r}") from None
    if len(p) != ndim or sorted(p) != list(range(ndim)):
        raise ValueError(f"dims: expected a permutation of range({ndim}), got {tuple(dims)!r}")
    return p


def transpose_launch(dev: Device, src: Any, dst: Any, batch: int, rows: int, cols: int,
                     dtype: np.dtype) -> tuple:
    """The launch (kernel, threads, args) writing dst (batch, cols, rows) = src (batch, rows,
    cols) transposed: one threadgroup per 32 x 32 tile (grid-stride past GRID_CAP)."""
    tr, tc = -(-rows // 32), -(-cols // 32)
    tp = TransposeParams(batch=batch, rows=rows, cols=cols, tiles_r=tr, tiles_c=tc,
                         n_tiles=batch * tr * tc)
    k = kernel(dev, SOURCE, f"transpose_fwd_{suffix(dtype)}")
    tg = k.threadgroup_size
    return k, min(tp.n_tiles, GRID_CAP // tg) * tg, (src, dst, tp)


def _permute(x: Tensor, p: tuple[int, ...]) -> Tensor:
    out_shape = tuple(x.shape[d] for d in p)
    out = out_like(out_shape, x.dtype, x.device)
    if out.size == 0:
        return out
    xs = [math.prod(x.shape[d + 1:]) for d in range(x.ndim)]
    dims = merge_dims(out_shape, [[xs[d] for d in p]])
    sizes = [n for n, _, _ in dims]
    strides = [s[0] for _, _, s in dims]
    if len(dims) <= 1:
        _block(x, out, 1, x.size, x.size, x.size, 0, 0)
        return out
    if strides[-1] != 1:  # the innermost dim moves
        batch = sizes[0] if len(dims) == 3 else 1
        a, b = sizes[-2], sizes[-1]  # out (batch, a, b) from x (batch, b, a)
        if len(dims) <= 3 and strides[-2] == 1 and strides[-1] == a and \
                (len(dims) == 2 or strides[0] == a * b):
            k, count, args = transpose_launch(x.device, x.buffer, out.buffer, batch, b, a, x.dtype)
            k(count, *args)
            return out
    if len(dims) > MAXD:
        raise ValueError(f"dims: permuting {x.shape} needs {len(dims)} dimensions after merging, "
                         f"the kernels take {MAXD}")
    vec = 4 if strides[-1] == 1 and sizes[-1] % 4 == 0 and vec4_aligned(x) else 1
    pp = PermuteParams(n=out.size // vec, ndim=len(dims), vec=vec)
    for i, (n, s) in enumerate(zip(sizes, strides)):
        pp.shape[i], pp.stride[i] = n, s
    kernel(x.device, SOURCE, f"permute_fwd_{suffix(x.dtype)}")(min(pp.n, GRID_CAP), x.buffer,
                                                              out.buffer, pp)
    return out


def permute(x: TensorLike, dims: Sequence[int]) -> Tensor:
    """out with out.shape[k] = x.shape[dims[k]] (as torch.permute, but a contiguous copy)."""
    x = _arg(x, pick_device(x), "x")
    return _permute(x, _perm(dims, x.ndim))


def permute_backward(grad_out: TensorLike, x: TensorLike, dims: Sequence[int]) -> Tensor:
    """dL/dx of permute(x, dims): grad_out permuted by the inverse permutation."""
    dev = pick_device(grad_out, x)
    x = _arg(x, dev, "x")
    p = _perm(dims, x.ndim)
    g = _arg(grad_out, dev, "grad_out", (x.dtype,))
    want = tuple(x.shape[d] for d in p)
    if g.shape != want:
        raise ValueError(f"grad_out: shape {g.shape}, expected {want}")
    inv = [0] * len(p)
    for k, d in enumerate(p):
        inv[d] = k
    return _permute(g, tuple(inv))


def _swap(ndim: int, d0: int, d1: int) -> tuple[int, ...]:
    p = list(range(ndim))
    p[d0], p[d1] = p[d1], p[d0]
    return tuple(p)


def transpose(x: TensorLike, dim0: int, dim1: int) -> Tensor:
    """x with dims dim0 and dim1 exchanged (as torch.transpose, but a contiguous copy)."""
    x = _arg(x, pick_device(x), "x")
    return _permute(x, _swap(x.ndim, _dim(dim0, x.ndim, "dim0"), _dim(dim1, x.ndim, "dim1")))


def transpose_backward(grad_out: TensorLike, x: TensorLike, dim0: int, dim1: int) -> Tensor:
    """dL/dx of transpose(x, dim0, dim1): grad_out transposed back."""
    x = _arg(x, pick_device(grad_out, x), "x")
    return permute_backward(grad_out, x, _swap(x.ndim, _dim(dim0, x.ndim, "dim0"),
                                               _dim(dim1, x.ndim, "dim1")))


def _seq3(x: TensorLike, name: str) -> Tensor:
    t = _arg(x, pick_device(x), name)
    if t.ndim != 3:
        raise ValueError(f"{name}: expected 3 dimensions, got shape {t.shape}")
    return t


def to_time_major(x: TensorLike) -> Tensor:
    """(N, T, F) batch-first -> (T, N, F) time-major."""
    return _permute(_seq3(x, "x"), (1, 0, 2))


def to_batch_first(x: TensorLike) -> Tensor:
    """(T, N, F) time-major -> (N, T, F) batch-first."""
    return _permute(_seq3(x, "x"), (1, 0, 2))


def to_time_major_backward(grad_out: TensorLike, x: TensorLike) -> Tensor:
    """dL/dx of to_time_major(x) (x batch-first): grad_out back to (N, T, F)."""
    return permute_backward(grad_out, _seq3(x, "x"), (1, 0, 2))


def to_batch_first_backward(grad_out: TensorLike, x: TensorLike) -> Tensor:
    """dL/dx of to_batch_first(x) (x time-major): grad_out back to (T, N, F)."""
    return permute_backward(grad_out, _seq3(x, "x"), (1, 0, 2))


# ---- image <-> matrix -------------------------------------------------------------------------
def image_to_matrix(x: TensorLike, channels_last: bool = False) -> Tensor:
    """A batch of images (N, C, H, W) as a matrix with one image per row: (N, C*H*W) in NCHW order,
    or (N, H*W*C) with channels_last (feature index (h * W + w) * C + c)."""
    x = _arg(x, pick_device(x), "x", (np.float32, np.float16))
    if x.ndim != 4:
        raise ValueError(f"x: expected (N, C, H, W), got shape {x.shape}")
    n, c, h, w = x.shape
    if channels_last:
        return _permute(x, (0, 2, 3, 1)).reshape(n, h * w * c)
    return copy(x).reshape(n, c * h * w)


def matrix_to_image(m: TensorLike, chw: Sequence[int], channels_last: bool = False) -> Tensor:
    """The inverse of image_to_matrix: (N, C*H*W) (or (N, H*W*C) with channels_last) to
    (N, C, H, W), chw = (C, H, W)."""
    m = _arg(m, pick_device(m), "m", (np.float32, np.float16))
    try:
        c, h, w = (int(v) for v in chw)
    except (TypeError, ValueError):
        raise ValueError(f"chw: expected (C, H, W), got {chw!r}") from None
    if min(c, h, w) < 1:
        raise ValueError(f"chw: sizes must be >= 1, got {tuple(chw)}")
    if m.ndim != 2 or m.shape[1] != c * h * w:
        raise ValueError(f"m: expected (N, {c * h * w}) for images {(c, h, w)}, got shape {m.shape}")
    n = m.shape[0]
    if channels_last:
        return _permute(m.reshape(n, h, w, c), (0, 3, 1, 2))
    return copy(m).reshape(n, c, h, w)


def image_to_matrix_backward(grad_out: TensorLike, x: TensorLike, channels_last: bool = False
                             ) -> Tensor:
    """dL/dx of image_to_matrix(x, channels_last): grad_out back to (N, C, H, W)."""
    x = _arg(x, pick_device(grad_out, x), "x", (np.float32, np.float16))
    if x.ndim != 4:
        raise ValueError(f"x: expected (N, C, H, W), got shape {x.shape}")
    g = _arg(grad_out, x.device, "grad_out", (x.dtype,))
    if g.shape != (x.shape[0], x.size // max(x.shape[0], 1)):
        raise ValueError(f"grad_out: shape {g.shape}, expected {(x.shape[0], x.size // max(x.shape[0], 1))}")
    return matrix_to_image(g, x.shape[1:], channels_last)


def matrix_to_image_backward(grad_out: TensorLike, m: TensorLike, chw: Sequence[int],
                             channels_last: bool = False) -> Tensor:
    """dL/dm of matrix_to_image(m, chw, channels_last): grad_out back to a matrix."""
    m = _arg(m, pick_device(grad_out, m), "m", (np.float32, np.float16))
    g = _arg(grad_out, m.device, "grad_out", (m.dtype,))
    want = (m.shape[0], *(int(v) for v in chw))
    if g.shape != want:
        raise ValueError(f"grad_out: shape {g.shape}, expected {want}")
    return image_to_matrix(g, channels_last)
