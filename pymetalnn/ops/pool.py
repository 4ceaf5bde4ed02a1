"""Pooling and its gradients (kernels/pool.metal): max, average, adaptive and global average,
in 2-d (NCHW or CHW) and 1-d (NCL or CL), float32 and float16.

Design note: 1-d pooling is 2-d pooling of (N, C, 1, L) with a 1-row window, so every op has one
kernel per direction and dtype. Output sizes, the padding limit (padding <= kernel_size // 2),
ceil_mode, count_include_pad and divisor_override follow torch.nn.functional exactly.
Max-pool indices are int32 flat offsets h * W + w within each plane (torch: int64, same values);
the forward returns them with return_indices=True and the backward accepts them (`indices=`) or
recomputes the argmax from x. Gradients gather per input element (no atomics): deterministic.
The average gradient takes avg_pool2d_bwd_const when every window has the same divisor, the max
gradient from indices takes a tiled variant for strides (2, 2) and (1, 2) (pool.metal's note).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..params import CONST, AdaptivePool2dParams, Pool2dParams
from ..runtime.core import MAX_GRID_THREADS
from ..tensor import Tensor, TensorLike
from ._common import (
    FLOATS,
    boolean,
    kernel,
    number,
    out_like,
    pick_device,
    positive_ints,
    scratch,
    strided_out,
    suffix,
    tensor_arg,
    vec4_aligned,
)

SOURCE = "pool.metal"
POOL_WRITE_INDICES, POOL_COUNT_PAD = CONST["POOL_WRITE_INDICES"], CONST["POOL_COUNT_PAD"]


MAX_ELEMENTS = 2**31 - 1  # pool.metal's magic_div needs numerators < 2^31
AVG_ROWS = CONST["POOL_AVG_ROWS"]  # input rows per thread of avg_pool2d_bwd_const
MAX_TILES = {(2, 2): "s2x2", (1, 2): "s1x2"}  # (SH, SW) -> max_pool2d_bwd_idx_tile instantiation
# each tile kernel's form with its candidate loads unrolled (suffix _c<CH>x<CW>) and the most
# candidate rows / columns it takes; False: the runtime loops everywhere (dev_membound's v1b)
TILE_CANDIDATES = {"s2x2": (2, 2), "s1x2": (3, 2)}
UNROLLED_CANDIDATES = True
# max pooling's backward without the forward's indices: True makes them first (the forward
# kernel with POOL_WRITE_INDICES into scratch: one read of x) and runs the indices gradient, the
# same terms in the same order as recomputing every candidate window's argmax from x (False:
# max_pool2d_bwd, KH * KW reads per candidate window, e.g. 36 per element for 3x3 / stride 2)
MAX_BWD_VIA_INDICES = True
# windows with forward kernels of their own (max_pool2d_fwd_k<KH>x<KW>, avg_pool2d_fwd_k...: the
# taps unrolled, every load issued before the first comparison; the same bits as the generic
# kernels); () runs the generic kernels everywhere (benchmarks/dev_membound.py's v1)
FIXED_WINDOWS = ((2, 2), (3, 3))


def _fwd_name(op: str, q: Any, dtype: Any) -> str:
    """The forward kernel for q's window: a fixed-window one where FIXED_WINDOWS has it."""
    k = f"_k{q.KH}x{q.KW}" if (q.KH, q.KW) in FIXED_WINDOWS else ""
    return f"{op}_pool2d_fwd{k}_{suffix(dtype)}"


def _magic(d: int) -> tuple[int, int]:
    """(m, s) such that n // d == ((n * m >> 32) + n) >> s for 0 <= n < 2^31, 1 <= d < 2^31
    (Granlund-Montgomery; PyTorch's IntDivider): pool.metal divides with a multiply-high."""
    s = 0
    while (1 << s) < d:
        s += 1
    return ((1 << 32) * ((1 << s) - d)) // d + 1, s


def _set_magic(q: Any, **divisors: int) -> None:
    for name, d in divisors.items():
        m, s = _magic(d)
        setattr(q, f"m_{name}", m)
        setattr(q, f"s_{name}", s)


def _out_size(n: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    """torch's pooling_output_shape: floor (or ceil) of the window count; in ceil mode the last
    window must start inside the input or its left padding."""
    o = (n + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (o - 1) * s >= n + p:
        o -= 1
    return o


def _as_4d(x: TensorLike, dev: Any, name: str, one_d: bool
           ) -> tuple[Tensor, tuple[int, ...], tuple]:
    """x as (N, C, H, W), the batch/channel prefix of the caller's layout and x's shape."""
    nd = (2, 3) if one_d else (3, 4)
    t = tensor_arg(x, dev, name, FLOATS, nd)
    if any(s == 0 for s in t.shape[-(nd[0]):]):
        raise ValueError(f"{name}: non-batch dimensions must be nonzero, got shape {t.shape}")
    prefix = t.shape[:-1] if one_d else t.shape[:-2]
    n, c = (1, prefix[0]) if len(prefix) == 1 else prefix
    h, w = (1, t.shape[-1]) if one_d else t.shape[-2:]
    if n * c * h * w > MAX_ELEMENTS:
        raise ValueError(f"{name}: {t.size} elements, at most {MAX_ELEMENTS} are supported")
    return t.reshape(n, c, h, w), prefix, t.shape


def _window(n_dims: int, kernel_size: Any, stride: Any, padding: Any, dilation: Any
            ) -> tuple[tuple[int, ...], ...]:
    k = positive_ints(kernel_size, n_dims, "kernel_size")
    default = stride is None or (isinstance(stride, (tuple, list)) and len(stride) == 0)
    s = k if default else positive_ints(stride, n_dims, "stride")  # torch: None or [] means kernel_size
    p = positive_ints(padding, n_dims, "padding", allow_zero=True)
    d = positive_ints(dilation, n_dims, "dilation")
    for kk, pp in zip(k, p):
        if pp > kk // 2:
            raise ValueError(f"padding: must be at most half of kernel_size ({kernel_size!r}), "
                             f"got {padding!r}")
    return k, s, p, d


def _geometry(x4: Tensor, one_d: bool, kernel_size: Any, stride: Any, padding: Any, dilation: Any,
              ceil_mode: bool) -> Pool2dParams:
    k, s, p, d = _window(1 if one_d else 2, kernel_size, stride, padding, dilation)
    if one_d:  # a 1-row window over (N, C, 1, L)
        k, s, p, d = (1, *k), (1, *s), (0, *p), (1, *d)
    boolean(ceil_mode, "ceil_mode")
    n, c, ih, iw = x4.shape
    oh = _out_size(ih, k[0], s[0], p[0], d[0], bool(ceil_mode))
    ow = _out_size(iw, k[1], s[1], p[1], d[1], bool(ceil_mode))
    if oh < 1 or ow < 1:
        size = f"{iw}" if one_d else f"{ih}x{iw}"
        raise ValueError(f"kernel_size: {kernel_size!r} (dilation {dilation!r}) does not fit the "
                         f"input {size} padded by {padding!r}: output size would be {max(oh, 0)}"
                         f"x{max(ow, 0)}")
    if n * c * oh * ow > MAX_ELEMENTS:
        raise ValueError(f"x: the output would have {n * c * oh * ow} elements, at most "
                         f"{MAX_ELEMENTS} are supported")
    q = Pool2dParams(planes=n * c, IH=ih, IW=iw, OH=oh, OW=ow, KH=k[0], KW=k[1], SH=s[0],
                     SW=s[1], PH=p[0], PW=p[1], DH=d[0], DW=d[1], flags=0, divisor=0)
    _set_magic(q, out=oh * ow, **{"in": ih * iw}, ow=ow, iw=iw, sh=s[0], sw=s[1], dh=d[0], dw=d[1])
    return q


def _tiles(q: Any, th: int, tw: int) -> int:
    """Set q's tiles of th x tw input elements per plane (pool.metal tile_of); the thread count."""
    q.tiles_h, q.tiles_w = -(-q.IH // th), -(-q.IW // tw)
    _set_magic(q, th=q.tiles_h, tw=q.tiles_w)
    return q.planes * q.tiles_h * q.tiles_w


def _out_shape(prefix: tuple[int, ...], q: Any, one_d: bool) -> tuple[int, ...]:
    return (*prefix, q.OW) if one_d else (*prefix, q.OH, q.OW)


def _grad_arg(grad_out: TensorLike, x4: Tensor, dev: Any, shape: tuple[int, ...]) -> Tensor:
    g = tensor_arg(grad_out, dev, "grad_out", FLOATS)
    if g.shape != shape:
        raise ValueError(f"grad_out: shape {g.shape}, expected the forward's output shape {shape}")
    if g.dtype != x4.dtype:
        raise ValueError(f"grad_out: dtype {g.dtype} differs from x's {x4.dtype}")
    return g


# ---- max ------------------------------------------------------------------------------------
def _max_fwd(x: TensorLike, one_d: bool, kernel_size: Any, stride: Any, padding: Any, dilation: Any,
             ceil_mode: bool, return_indices: bool, out: Any = None, out_batch_stride: Any = None
             ) -> Tensor | tuple[Tensor, Tensor]:
    dev = pick_device(x)
    x4, prefix, _ = _as_4d(x, dev, "x", one_d)
    q = _geometry(x4, one_d, kernel_size, stride, padding, dilation, ceil_mode)
    shape = _out_shape(prefix, q, one_d)
    y = _pool_out(out, out_batch_stride, shape, x4, q, one_d, dev)
    idx = out_like(shape if return_indices else (1,), np.int32, dev)
    q.flags = POOL_WRITE_INDICES if return_indices else 0
    if y.size:
        kernel(dev, SOURCE, _fwd_name("max", q, x4.dtype))(y.size, x4.buffer, y.buffer,
                                                            idx.buffer, q)
    return (y, idx) if return_indices else y


def _pool_out(out: Any, out_batch_stride: Any, shape: tuple[int, ...], x4: Tensor, q: Any,
              one_d: bool, dev: Any) -> Tensor:
    """The forward result: new, or out= with a batch stride (q.out_C / q.out_nstride)."""
    if out is None or len(shape) < (3 if one_d else 4):
        if out is not None:
            raise ValueError("out: needs a batched input ((N, C, H, W), or (N, C, L) for 1-d)")
        return out_like(shape, x4.dtype, dev)
    y, q.out_nstride = strided_out(out, out_batch_stride, shape, x4.dtype, dev)
    q.out_C = x4.shape[1]
    return y


def _tile_candidates(k: int, st: int, d: int) -> int:
    """Most windows whose span [o st - p, o st - p + E - 1] (E = (k - 1) d + 1, the window's
    extent) meets a tile of st consecutive inputs along one axis: (st + E - 2) // st + 1."""
    return (st + (k - 1) * d - 1) // st + 1


def _candidate_form(q: Any, tile: str) -> str:
    """"_c<CH>x<CW>" where the tile kernel's unrolled form covers q's candidate ranges."""
    ch, cw = TILE_CANDIDATES[tile]
    fits = _tile_candidates(q.KH, q.SH, q.DH) <= ch and _tile_candidates(q.KW, q.SW, q.DW) <= cw
    return f"_c{ch}x{cw}" if UNROLLED_CANDIDATES and fits else ""


def _max_bwd(grad_out: TensorLike, x: TensorLike, one_d: bool, kernel_size: Any, stride: Any,
             padding: Any, dilation: Any, ceil_mode: bool, indices: TensorLike | None) -> Tensor:
    dev = pick_device(grad_out, x, indices)
    x4, prefix, xshape = _as_4d(x, dev, "x", one_d)
    q = _geometry(x4, one_d, kernel_size, stride, padding, dilation, ceil_mode)
    shape = _out_shape(prefix, q, one_d)
    g = _grad_arg(grad_out, x4, dev, shape)
    idx = None
    if indices is not None:
        idx = tensor_arg(indices, dev, "indices", (np.int32,))
        if idx.shape != shape:
            raise ValueError(f"indices: shape {idx.shape}, expected the forward's output shape "
                             f"{shape}")
    dx = out_like(x4.shape, x4.dtype, dev)
    if dx.size:
        sfx = suffix(x4.dtype)
        if idx is None and MAX_BWD_VIA_INDICES and g.size:
            n_out = g.size
            ybuf, ibuf = scratch(dev, [n_out * x4.dtype.itemsize, n_out * 4], "max_pool_indices")
            q.flags = POOL_WRITE_INDICES
            kernel(dev, SOURCE, _fwd_name("max", q, x4.dtype))(n_out, x4.buffer, ybuf, ibuf, q)
            q.flags = 0
            idx = Tensor(ibuf, shape, np.int32)
        tile = MAX_TILES.get((q.SH, q.SW))
        if idx is not None and tile:  # one thread per stride x stride tile
            tile += _candidate_form(q, tile)
            kernel(dev, SOURCE, f"max_pool2d_bwd_idx_{tile}_{sfx}")(
                _tiles(q, q.SH, q.SW), g.buffer, idx.buffer, dx.buffer, q)
        elif idx is not None:
            kernel(dev, SOURCE, f"max_pool2d_bwd_idx_{sfx}")(dx.size, g.buffer, idx.buffer,
                                                             dx.buffer, q)
        else:
            kernel(dev, SOURCE, f"max_pool2d_bwd_{sfx}")(dx.size, g.buffer, x4.buffer, dx.buffer, q)
    return dx.reshape(xshape)


def max_pool2d(input: TensorLike, kernel_size: Any, stride: Any = None, padding: Any = 0, dilation: Any = 1,
               ceil_mode: bool = False, return_indices: bool = False, out: Tensor | None = None,
               out_batch_stride: int | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """y[n, c, oh, ow] = max over r < kH, s < kW of x[n, c, oh*sH - pH + r*dH, ow*sW - pW + s*dW]
    (taps in the padding skipped). x is (N, C, H, W) or (C, H, W); stride defaults to kernel_size.
    With return_indices, also the int32 argmax h*W + w per output (first maximum on ties; the
    indices are always a new contiguous tensor).
    out= (x batched): write y there instead, `out_batch_stride` elements between images (e.g. a
    view at channel c0 of a larger (N, C', OH, OW) tensor with stride C' * OH * OW: a channel
    slice of a concatenation); see pymetalnn.ops._common.strided_out."""
    x = input
    return _max_fwd(x, False, kernel_size, stride, padding, dilation, ceil_mode, return_indices,
                    out, out_batch_stride)


def max_pool2d_backward(grad_out: TensorLike, input: TensorLike, kernel_size: Any, stride: Any = None,
                        padding: Any = 0, dilation: Any = 1, ceil_mode: bool = False,
                        return_indices: bool = False, indices: TensorLike | None = None) -> Tensor:
    """grad_x[n, c, h, w] = sum of grad_out over the outputs whose argmax is (h, w). Uses
    `indices` from max_pool2d(..., return_indices=True) when given, else makes them from x first
    (one forward pass into a temporary) and uses those.
    return_indices: the forward's option, accepted for the shared calling convention (unused)."""
    x = input
    return _max_bwd(grad_out, x, False, kernel_size, stride, padding, dilation, ceil_mode, indices)


def max_pool1d(input: TensorLike, kernel_size: Any, stride: Any = None, padding: Any = 0, dilation: Any = 1,
               ceil_mode: bool = False, return_indices: bool = False
               ) -> Tensor | tuple[Tensor, Tensor]:
    """y[n, c, o] = max over r < k of x[n, c, o*s - p + r*d]; x is (N, C, L) or (C, L)."""
    x = input
    return _max_fwd(x, True, kernel_size, stride, padding, dilation, ceil_mode, return_indices)


def max_pool1d_backward(grad_out: TensorLike, input: TensorLike, kernel_size: Any, stride: Any = None,
                        padding: Any = 0, dilation: Any = 1, ceil_mode: bool = False,
                        return_indices: bool = False, indices: TensorLike | None = None) -> Tensor:
    """grad_x[n, c, l] = sum of grad_out over the outputs whose argmax is l."""
    x = input
    return _max_bwd(grad_out, x, True, kernel_size, stride, padding, dilation, ceil_mode, indices)


# ---- average --------------------------------------------------------------------------------
def _avg_geometry(x4: Tensor, one_d: bool, kernel_size: Any, stride: Any, padding: Any,
                  ceil_mode: bool, count_include_pad: bool, divisor_override: Any) -> Pool2dParams:
    q = _geometry(x4, one_d, kernel_size, stride, padding, 1, ceil_mode)
    boolean(count_include_pad, "count_include_pad")
    q.flags = POOL_COUNT_PAD if count_include_pad else 0
    if divisor_override is not None:
        d = number(divisor_override, "divisor_override")
        if d != int(d) or d == 0 or abs(d) >= 2**31:  # torch: any nonzero int (< 0 flips signs)
            raise ValueError(f"divisor_override: expected a nonzero int, got {divisor_override!r}")
        q.divisor = int(d)
    return q


def _constant_divisor(q: Any) -> int:
    """The divisor shared by every window, 0 if they differ: divisor_override, or windows that
    the border that counts (the padded input with count_include_pad, else the input) never clips."""
    if q.divisor:
        return q.divisor
    for i, o, k, st, p in ((q.IH, q.OH, q.KH, q.SH, q.PH), (q.IW, q.OW, q.KW, q.SW, q.PW)):
        last = (o - 1) * st - p + k  # end of the last window (the first starts at -p)
        if (last > i + p) if q.flags & POOL_COUNT_PAD else (p > 0 or last > i):
            return 0
    return q.KH * q.KW


def _avg_fwd(x: TensorLike, one_d: bool, kernel_size: Any, stride: Any, padding: Any,
             ceil_mode: bool, count_include_pad: bool, divisor_override: Any, out: Any = None,
             out_batch_stride: Any = None) -> Tensor:
    dev = pick_device(x)
    x4, prefix, _ = _as_4d(x, dev, "x", one_d)
    q = _avg_geometry(x4, one_d, kernel_size, stride, padding, ceil_mode, count_include_pad,
                      divisor_override)
    y = _pool_out(out, out_batch_stride, _out_shape(prefix, q, one_d), x4, q, one_d, dev)
    if y.size:
        kernel(dev, SOURCE, _fwd_name("avg", q, x4.dtype))(y.size, x4.buffer, y.buffer, q)
    return y


def _avg_bwd(grad_out: TensorLike, x: TensorLike, one_d: bool, kernel_size: Any, stride: Any,
             padding: Any, ceil_mode: bool, count_include_pad: bool, divisor_override: Any
             ) -> Tensor:
    dev = pick_device(grad_out, x)
    x4, prefix, xshape = _as_4d(x, dev, "x", one_d)
    q = _avg_geometry(x4, one_d, kernel_size, stride, padding, ceil_mode, count_include_pad,
                      divisor_override)
    g = _grad_arg(grad_out, x4, dev, _out_shape(prefix, q, one_d))
    dx = out_like(x4.shape, x4.dtype, dev)
    if dx.size:
        sfx, div = suffix(x4.dtype), _constant_divisor(q)
        if div:  # column strips of AVG_ROWS rows, no per-window divisor
            q.divisor = div
            kernel(dev, SOURCE, f"avg_pool2d_bwd_const_{sfx}")(_tiles(q, AVG_ROWS, 1), g.buffer,
                                                               dx.buffer, q)
        else:
            kernel(dev, SOURCE, f"avg_pool2d_bwd_{sfx}")(dx.size, g.buffer, dx.buffer, q)
    return dx.reshape(xshape)


def avg_pool2d(input: TensorLike, kernel_size: Any, stride: Any = None, padding: Any = 0,
               ceil_mode: bool = False, count_include_pad: bool = True,
               divisor_override: int | None = None, out: Tensor | None = None,
               out_batch_stride: int | None = None) -> Tensor:
    """y[n, c, oh, ow] = (sum of x over the window clipped to the input) / divisor, where the
    divisor is divisor_override, else the window's size clipped to the padded input
    (count_include_pad=True) or to the input (False; MPS's "exclude edges").
    out=, out_batch_stride: as max_pool2d's (write into a channel slice)."""
    x = input
    return _avg_fwd(x, False, kernel_size, stride, padding, ceil_mode, count_include_pad,
                    divisor_override, out, out_batch_stride)


def avg_pool2d_backward(grad_out: TensorLike, input: TensorLike, kernel_size: Any, stride: Any = None,
                        padding: Any = 0, ceil_mode: bool = False, count_include_pad: bool = True,
                        divisor_override: int | None = None) -> Tensor:
    """grad_x[n, c, h, w] = sum over the windows containing (h, w) of grad_out / divisor
    (x gives the shape only)."""
    x = input
    return _avg_bwd(grad_out, x, False, kernel_size, stride, padding, ceil_mode, count_include_pad,
                    divisor_override)


def avg_pool1d(input: TensorLike, kernel_size: Any, stride: Any = None, padding: Any = 0,
               ceil_mode: bool = False, count_include_pad: bool = True) -> Tensor:
    """y[n, c, o] = (sum of x over the window clipped to the input) / divisor (as avg_pool2d)."""
    x = input
    return _avg_fwd(x, True, kernel_size, stride, padding, ceil_mode, count_include_pad, None)


def avg_pool1d_backward(grad_out: TensorLike, input: TensorLike, kernel_size: Any, stride: Any = None,
                        padding: Any = 0, ceil_mode: bool = False, count_include_pad: bool = True
                        ) -> Tensor:
    """grad_x[n, c, l] = sum over the windows containing l of grad_out / divisor."""
    x = input
    return _avg_bwd(grad_out, x, True, kernel_size, stride, padding, ceil_mode, count_include_pad,
                    None)


# ---- adaptive / global average --------------------------------------------------------------
def _adaptive_params(x4: Tensor, output_size: Any) -> AdaptivePool2dParams:
    n, c, ih, iw = x4.shape
    if isinstance(output_size, (int, np.integer)) or output_size is None:
        output_size = (output_size, output_size)
    try:
        sizes = tuple(output_size)
    except TypeError:
        raise ValueError(f"output_size: expected an int or 2 ints, got {output_size!r}") from None
    if len(sizes) != 2:
        raise ValueError(f"output_size: expected an int or 2 ints, got {output_size!r}")
    oh, ow = (ih if sizes[0] is None else sizes[0]), (iw if sizes[1] is None else sizes[1])
    oh, ow = positive_ints((oh, ow), 2, "output_size")
    if n * c * oh * ow > MAX_ELEMENTS or ih * oh > MAX_ELEMENTS or iw * ow > MAX_ELEMENTS:
        raise ValueError(f"output_size: {output_size!r} is too large for input {ih}x{iw} "
                         f"(pool.metal's index arithmetic stays below 2^31)")
    q = AdaptivePool2dParams(planes=n * c, IH=ih, IW=iw, OH=oh, OW=ow)
    _set_magic(q, out=oh * ow, **{"in": ih * iw}, ow=ow, iw=iw, oh=oh, ih=ih)
    return q


def _adaptive_fwd(x4: Tensor, prefix: tuple[int, ...], q: Any, dev: Any) -> Tensor:
    y = out_like((*prefix, q.OH, q.OW), x4.dtype, dev)
    if y.size:
        sfx = suffix(x4.dtype)
        if q.OH == 1 and q.OW == 1:  # a reduction per plane: one simdgroup each
            q.vec = int((q.IH * q.IW) % 4 == 0 and vec4_aligned(x4))
            if q.planes * 32 >= MAX_GRID_THREADS:
                raise ValueError(f"x: {q.planes} planes, at most {MAX_GRID_THREADS // 32 - 1} for "
                                 "global pooling")
            kernel(dev, SOURCE, f"global_avg_pool2d_fwd_{sfx}")(q.planes * 32, x4.buffer, y.buffer, q)
        else:
            kernel(dev, SOURCE, f"adaptive_avg_pool2d_fwd_{sfx}")(y.size, x4.buffer, y.buffer, q)
    return y


def _adaptive_bwd(grad_out: TensorLike, x: TensorLike, output_size: Any) -> Tensor:
    dev = pick_device(grad_out, x)
    x4, prefix, xshape = _as_4d(x, dev, "x", False)
    q = _adaptive_params(x4, output_size)
    g = _grad_arg(grad_out, x4, dev, (*prefix, q.OH, q.OW))
    dx = out_like(x4.shape, x4.dtype, dev)
    if dx.size:
        kernel(dev, SOURCE, f"adaptive_avg_pool2d_bwd_{suffix(x4.dtype)}")(dx.size, g.buffer,
                                                                           dx.buffer, q)
    return dx.reshape(xshape)


def adaptive_avg_pool2d(input: TensorLike, output_size: Any) -> Tensor:
    """y[n, c, i, j] = mean of x[n, c, h, w] over h in [floor(i H / OH), ceil((i + 1) H / OH)),
    w likewise; output_size is an int or (OH, OW) (None keeps that input size)."""
    x = input
    dev = pick_device(x)
    x4, prefix, _ = _as_4d(x, dev, "x", False)
    return _adaptive_fwd(x4, prefix, _adaptive_params(x4, output_size), dev)


def adaptive_avg_pool2d_backward(grad_out: TensorLike, input: TensorLike, output_size: Any) -> Tensor:
    """grad_x[n, c, h, w] = sum over the cells (i, j) containing (h, w) of grad_out / cell size."""
    x = input
    return _adaptive_bwd(grad_out, x, output_size)


def _adaptive1d_size(output_size: Any) -> tuple[int, Any]:
    if isinstance(output_size, (tuple, list)):
        if len(output_size) != 1:
            raise ValueError(f"output_size: expected an int or 1 int, got {output_size!r}")
        output_size = output_size[0]
    return (1, output_size)


def adaptive_avg_pool1d(input: TensorLike, output_size: Any) -> Tensor:
    """y[n, c, i] = mean of x[n, c, l] over l in [floor(i L / O), ceil((i + 1) L / O)); x is
    (N, C, L) or (C, L) (torch.nn.functional.adaptive_avg_pool1d). The 2-D kernels with H = 1."""
    dev = pick_device(input)
    x4, prefix, _ = _as_4d(input, dev, "input", True)
    y = _adaptive_fwd(x4, prefix, _adaptive_params(x4, _adaptive1d_size(output_size)), dev)
    return y.reshape(*prefix, y.shape[-1])


def adaptive_avg_pool1d_backward(grad_out: TensorLike, input: TensorLike, output_size: Any) -> Tensor:
    """grad_x[n, c, l] = sum over the cells i containing l of grad_out / cell size."""
    dev = pick_device(grad_out, input)
    x4, prefix, xshape = _as_4d(input, dev, "input", True)
    q = _adaptive_params(x4, _adaptive1d_size(output_size))
    g = _grad_arg(grad_out, x4, dev, (*prefix, q.OW))
    return _adaptive_bwd(g.reshape(*prefix, 1, q.OW), x4.reshape(*prefix, 1, x4.shape[-1]),
                         _adaptive1d_size(output_size)).reshape(xshape)


def global_avg_pool2d(input: TensorLike) -> Tensor:
    """y[n, c, 0, 0] = mean of x[n, c] over H and W (adaptive_avg_pool2d(x, 1))."""
    x = input
    return adaptive_avg_pool2d(x, 1)


def global_avg_pool2d_backward(grad_out: TensorLike, input: TensorLike) -> Tensor:
    """grad_x[n, c, h, w] = grad_out[n, c, 0, 0] / (H W)."""
    x = input
    return _adaptive_bwd(grad_out, x, 1)


__all__ = [
    "adaptive_avg_pool1d", "adaptive_avg_pool1d_backward", "adaptive_avg_pool2d",
    "adaptive_avg_pool2d_backward", "avg_pool1d", "avg_pool1d_backward",
    "avg_pool2d", "avg_pool2d_backward", "global_avg_pool2d", "global_avg_pool2d_backward",
    "max_pool1d", "max_pool1d_backward", "max_pool2d", "max_pool2d_backward",
]
