"""softmax / log_softmax over one axis of a 2-D or 4-D tensor, and their backward (softmax.metal).

Design: the tensor is viewed as (outer, len, inner) around the axis `dim`; `tile_plan` chooses
how a threadgroup of 256 threads cuts it into tiles of W inner positions x S slices of the axis
(kernels/tile_reduce.h): W as wide as the inner extent allows (coalesced loads on a strided
axis), S so that each thread handles a few elements, and the widest W whose tile still fits the
kernels' threadgroup cache, so the input is read once. The loss family's class-axis kernels use
the same plan.

Backward comes in two forms: `softmax_backward(grad_out, input, dim)` takes the forward's input
like every other `<op>_backward` (it recomputes the output: one more kernel), and
`softmax_backward_from_output(grad_out, output, dim)` takes the output, as autograd saves it
(the graph uses this one). Any rank: the kernels only see (outer, len, inner).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..params import CONST, SoftmaxParams
from ..runtime import Device
from ..tensor import Tensor, TensorLike
from ._common import FLOATS, MAX_GROUPS, empty, kernel, pick_device, suffix, tensor_arg

SOURCE = "softmax.metal"
TG = CONST["TR_TG"]  # threads per threadgroup of tile_reduce.h's kernels
CACHE_FLOATS = CONST["SM_CACHE"]  # row cache per threadgroup (softmax.metal, loss.metal)
MAX_ELEMENTS = 2**32 - 1  # kernels index with 32-bit uints
ROW_CHUNKS = CONST["SM_ROW_CHUNKS"]  # 16-byte chunks per lane of the row kernels
CPU_ONE_SLICE = True  # tile_plan on the cpu backend: one simdgroup of lanes per tile
# Contiguous float32 rows run one thread per row (softmax_seq_*) on the cpu backend: "cpu"; "all"
# takes them on every backend and dtype (tests), "off" nowhere. bench_softmax --quick on a 2-core
# EPYC (one run each, PyTorch CPU in the same run), ratio before -> after over 256x1000 float32:
# softmax forward 0.33 -> 0.38, backward 0.08 -> 0.30, log_softmax 0.08 -> 0.18 / 0.10 -> 0.14;
# float16 was slower this way (0.02-0.09 against 0.03-0.09: its per-element conversions), so it
# keeps the row kernels.
SEQ_ROWS = "cpu"


def _pow2_floor(n: int) -> int:
    return 1 << (max(int(n), 1).bit_length() - 1)


def _pow2_ceil(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def tile_plan(outer: int, length: int, inner: int, cache_arrays: int = 1,
              cache_floats: int = CACHE_FLOATS, dev: Device | None = None) -> SoftmaxParams:
    """Tile geometry for reducing a (outer, length, inner) view over `length`.

    cache_arrays: how many float arrays of the tile the kernel keeps in threadgroup memory (0:
    none). `cached` is set when R tiles x length x W x cache_arrays floats fit `cache_floats`;
    when the widest W does not fit, narrower W (down to 8 columns = 32-byte segments) is tried.
    On the cpu backend (`dev`, CPU_ONE_SLICE) a tile's threads are one simdgroup's worth (S =
    32 / W slices, down to 1): more tiles per threadgroup, fewer threadgroups, each of which pays
    its reduction tail as work-item loops (8x64x28x28 over dim 1, one worker: forward 5.8 ->
    4.3 ms, backward 2.3 -> 1.1 ms).
    """
    one = CPU_ONE_SLICE and dev is not None and dev.name == "cpu"

    def shape(w: int) -> tuple[int, int]:
        # S: enough slices for ~4 elements per thread; SW at least one simdgroup, at most the TG
        s = 1 if one else _pow2_ceil(-(-length // 4))
        sw = min(TG, max(32, w * s))
        return sw, TG // sw

    w0 = min(_pow2_floor(inner), 32)
    choice = None
    if cache_arrays:
        w = w0
        while True:
            sw, r = shape(w)
            if r * length * w * cache_arrays <= cache_floats:
                choice = (w, sw, 1)
                break
            if w <= 8:
                break
            w //= 2
    if choice is None:
        sw, _ = shape(w0)
        choice = (w0, sw, 0)
    w, sw, cached = choice
    wblocks = -(-inner // w)
    return SoftmaxParams(outer=outer, len=length, inner=inner, W=w, SW=sw, wblocks=wblocks,
                         ntiles=outer * wblocks, cached=cached)


def tile_groups(p: SoftmaxParams) -> int:
    """Threadgroups to launch for a tile plan."""
    r = TG // p.SW
    return max(1, min(-(-p.ntiles // r), MAX_GROUPS))


def check_dim(dim: Any, ndim: int, name: str = "dim") -> int:
    """`dim` as an index in [0, ndim); negative values count from the end."""
    if not isinstance(dim, (int, np.integer)) or isinstance(dim, bool):
        raise ValueError(f"{name}: expected an int, got {dim!r}")
    d = int(dim)
    if not -ndim <= d < ndim:
        raise ValueError(f"{name}: {d} is out of range for a {ndim}-D tensor")
    return d % ndim


def split_shape(shape: tuple[int, ...], d: int) -> tuple[int, int, int]:
    """(outer, len, inner) of `shape` around axis d."""
    outer = int(math.prod(shape[:d]))  # exact ints; np.prod costs microseconds
    inner = int(math.prod(shape[d + 1:]))
    return outer, int(shape[d]), inner


def check_size(t: Tensor, name: str) -> None:
    if t.size > MAX_ELEMENTS:
        raise ValueError(f"{name}: {t.size} elements exceed the kernels' 32-bit indexing")


def _torch_dim(dim: Any, ndim: int) -> Any:
    """torch's implicit dim for dim=None (deprecated there, kept for ported code)."""
    return (0 if ndim in (0, 1, 3) else 1) if dim is None else dim


def row_plan(outer: int, length: int, inner: int, dtype: Any, *ts: Tensor
             ) -> SoftmaxParams | None:
    """The params of the row kernels (softmax.metal's, loss.metal's cross-entropy ones: one
    simdgroup per row, the row in registers) when they apply: the axis innermost, its length a
    multiple of the 16-byte chunk and at most 32 * ROW_CHUNKS chunks, every buffer 16-byte
    aligned; else None (the tile kernels)."""
    w = 16 // np.dtype(dtype).itemsize
    if not _chunked_rows(length, inner, dtype, ts) or length > 32 * ROW_CHUNKS * w or outer * 32 > 2**31:
        return None
    return SoftmaxParams(outer=outer, len=length, inner=1)


def _chunked_rows(length: int, inner: int, dtype: Any, ts: tuple[Tensor, ...]) -> bool:
    """The axis innermost, its length whole 16-byte chunks, every buffer 16-byte aligned: what
    both row-kernel families need."""
    return inner == 1 and length % (16 // np.dtype(dtype).itemsize) == 0 and \
        not any(t.buffer.offset % 16 for t in ts)


def _seq(dev: Device, outer: int, length: int, inner: int, dtype: Any, *ts: Tensor) -> bool:
    """Whether the one-thread-per-row kernels take it: SEQ_ROWS (and dtype), the axis innermost,
    its length a multiple of the 16-byte chunk, every buffer 16-byte aligned (any length: no
    registers per lane to fit)."""
    if SEQ_ROWS == "off" or (SEQ_ROWS == "cpu" and (dev.name != "cpu" or np.dtype(dtype) != np.float32)):
        return False
    return _chunked_rows(length, inner, dtype, ts)


def _result_and_geometry(t: Tensor, name: str, dim: Any) -> tuple[Tensor, tuple[int, int, int]]:
    """A result like `t` (the forward's output, the backward's grad_input) and (outer, len, inner)
    around `dim`; `dim` and t's size are checked first."""
    d = check_dim(_torch_dim(dim, t.ndim), max(t.ndim, 1))
    check_size(t, name)
    return empty(t.shape, t.dtype, t.device), split_shape(t.shape or (1,), d)


def _with_grad_out(grad_out: Any, t: Any, name: str) -> tuple[Tensor, Tensor]:
    """(t, grad_out) as tensors on one device, grad_out of t's dtype and shape."""
    dev = pick_device(grad_out, t)
    tt = tensor_arg(t, dev, name, FLOATS)
    gt = tensor_arg(grad_out, dev, "grad_out", (tt.dtype,))
    if gt.shape != tt.shape:
        raise ValueError(f"grad_out: shape {gt.shape} does not match {name}'s {tt.shape}")
    return tt, gt


def _forward(x: Any, dim: Any, log: bool) -> Tensor:
    dev = pick_device(x)
    xt = tensor_arg(x, dev, "input", FLOATS)
    y, geom = _result_and_geometry(xt, "input", dim)
    if xt.size == 0:
        return y
    stem = "log_softmax" if log else "softmax"
    if _seq(dev, *geom, xt.dtype, xt, y):
        kernel(dev, SOURCE, f"{stem}_fwd_seq_{suffix(xt.dtype)}")(
            geom[0], xt.buffer, y.buffer, SoftmaxParams(outer=geom[0], len=geom[1], inner=1))
        return y
    rp = row_plan(*geom, xt.dtype, xt, y)
    if rp is not None:
        kernel(dev, SOURCE, f"{stem}_fwd_rows_{suffix(xt.dtype)}")(rp.outer * 32, xt.buffer,
                                                                   y.buffer, rp)
        return y
    p = tile_plan(*geom, cache_arrays=1, dev=dev)
    kernel(dev, SOURCE, f"{stem}_fwd_{suffix(xt.dtype)}")(tile_groups(p) * TG, xt.buffer, y.buffer, p)
    return y


def _backward(grad_out: Any, output: Any, dim: Any, log: bool) -> Tensor:
    yt, gt = _with_grad_out(grad_out, output, "output")
    dev = yt.device
    dx, geom = _result_and_geometry(yt, "output", dim)
    if yt.size == 0:
        return dx
    stem = "log_softmax" if log else "softmax"
    if _seq(dev, *geom, yt.dtype, gt, yt, dx):
        kernel(dev, SOURCE, f"{stem}_bwd_seq_{suffix(yt.dtype)}")(
            geom[0], gt.buffer, yt.buffer, dx.buffer, SoftmaxParams(outer=geom[0], len=geom[1], inner=1))
        return dx
    rp = row_plan(*geom, yt.dtype, gt, yt, dx)
    if rp is not None:
        kernel(dev, SOURCE, f"{stem}_bwd_rows_{suffix(yt.dtype)}")(rp.outer * 32, gt.buffer,
                                                                   yt.buffer, dx.buffer, rp)
        return dx
    p = tile_plan(*geom, cache_arrays=1 if log else 2, dev=dev)
    kernel(dev, SOURCE, f"{stem}_bwd_{suffix(yt.dtype)}")(tile_groups(p) * TG, gt.buffer, yt.buffer,
                                                          dx.buffer, p)
    return dx


def _input_for(grad_out: Any, input: Any) -> Tensor:
    """input, checked against grad_out before the forward is recomputed (nothing dispatched on
    bad arguments)."""
    return _with_grad_out(grad_out, input, "input")[0]


def softmax(input: TensorLike, dim: int | None = None) -> Tensor:
    """y = exp(x - max_d x) / sum_d exp(x - max_d x) along axis `dim` of a tensor of any rank
    (negative dims count from the end; None: torch's implicit choice, 0 for 0-, 1- and 3-D
    inputs, else 1). float32 or float16 storage, float arithmetic."""
    return _forward(input, dim, log=False)


def log_softmax(input: TensorLike, dim: int | None = None) -> Tensor:
    """y = x - max_d x - log(sum_d exp(x - max_d x)) along axis `dim` (as softmax)."""
    return _forward(input, dim, log=True)


def softmax_backward(grad_out: TensorLike, input: TensorLike, dim: int | None = None) -> Tensor:
    """Gradient of softmax w.r.t. its input x: with y = softmax(x, dim) (recomputed),
    dx = y * (dy - sum_d(dy * y))."""
    return _backward(grad_out, _forward(_input_for(grad_out, input), dim, log=False), dim, log=False)


def log_softmax_backward(grad_out: TensorLike, input: TensorLike, dim: int | None = None) -> Tensor:
    """Gradient of log_softmax w.r.t. its input x: with y = log_softmax(x, dim) (recomputed),
    dx = dy - exp(y) * sum_d dy."""
    return _backward(grad_out, _forward(_input_for(grad_out, input), dim, log=True), dim, log=True)


def softmax_backward_from_output(grad_out: TensorLike, output: TensorLike, dim: int | None = None) -> Tensor:
    """Gradient of softmax from the forward's OUTPUT y = softmax(x, dim):
    dx = y * (dy - sum_d(dy * y))."""
    return _backward(grad_out, output, dim, log=False)


def log_softmax_backward_from_output(grad_out: TensorLike, output: TensorLike,
                                     dim: int | None = None) -> Tensor:
    """Gradient of log_softmax from the forward's OUTPUT y = log_softmax(x, dim):
    dx = dy - exp(y) * sum_d dy."""
    return _backward(grad_out, output, dim, log=True)
