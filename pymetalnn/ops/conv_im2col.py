"""Convolutions as GEMMs over the unfolded input (kernels/conv_im2col.metal): the cpu backend's
launch plans for a conv's forward, input gradient and weight gradient.

Design note: pymetalnn/ops/conv.py asks `eligible` first on every plan; on the cpu backend an
ungrouped float32 conv (nothing forced through conv.FORCE, the package's own kernels) then runs
here instead of the tiled kernels, which run there as work-item loops around threadgroup tiles
and measured several times slower per core than gemm.metal's blocked tiles (ResNet-18 at 64x64,
batch 2: conv 91% of a step's kernel time; benchmarks/dev_resnet18.py). Each op is one unfold
(im2col, or col2im for the input gradient) and one batched GEMM per chunk of images whose
unfolded columns fit COL_BYTES:
    forward      y[n] (K x OH*OW)  = w (K x C*KH*KW) . col[n]       (bias placed first, beta = 1)
    input grad   dcol[n]           = w^T . dy[n];  dx = col2im(dcol) (+ conv_transpose2d's bias)
    weight grad  dw                = sum over n of dy[n] . colt[n]   (colt = col^T, unfolded so;
                                                                      later chunks: beta = 1)
The fused activation runs in the GEMM's epilogue. The unfolded columns live in the conv's
per-op scratch (tag conv.metal), apart from the GEMM's split-K partials.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..params import CONST
from ..runtime import Device
from ..tensor import Tensor
from ._common import MAX_GROUPS, cdiv, kernel, scratch
from .copy import transpose_launch
from .gemm import MAX_SPLITS, _launches, plan, variant

if TYPE_CHECKING:
    from .conv import ConvGeometry

SOURCE = "conv_im2col.metal"
SCRATCH_TAG = "conv.metal"  # the conv plans' scratch: one op's temporaries at a time
THREADS = CONST["CONV_THREADS"]  # max_total_threads_per_threadgroup of the unfold kernels
COL_BYTES = 64 << 20  # unfolded columns per chunk of images (one image may need more)
MAX_ELEMS = 2**31  # 32-bit offsets in the kernels
# The weight gradient reduces over every (n, oh, ow) of a chunk: its GEMM splits K so that a
# float partial sum covers about this many terms (up to gemm.MAX_SPLITS splits), keeping the
# error near the tiled kernels' (which sum short chunks; test_conv2d_fp32_budget)
WGRAD_SPLIT_TERMS = 256
# The forward transposes w once when its GEMM would read it at least this many times (images x
# 32-column blocks of a plane): measured break-even on the 2-core test box lies between 2
# (ResNet-18 at batch 2, 4x4 planes: transposing cost 11 ms of a 217 ms step) and 448 (MNIST).
TRANSPOSE_W_READS = 8
COL2IM_W = CONST["CONV_COL2IM_W"]  # dx elements of a row per col2im thread


def eligible(dev: Device, geo: ConvGeometry, prec: str, any_device: bool = False) -> bool:
    """Whether the conv runs here: the cpu backend (any_device: every backend, when forced),
    float32, one group, and every operand (one image's columns included) within the kernels'
    32-bit offsets; never without buffer views (metal binds whole buffers: the chunks and the
    weight matrix are views)."""
    if (dev.name != "cpu" and not any_device) or prec != "float" or geo.G != 1 \
            or not dev.supports_views:
        return False
    crs, ohw = geo.C * geo.KH * geo.KW, geo.OH * geo.OW
    return max(crs * ohw, geo.K * crs, geo.N * geo.C * geo.H * geo.W,
               geo.N * geo.K * ohw) < MAX_ELEMS


def _chunks(geo: ConvGeometry) -> list[tuple[int, int]]:
    """(first image, images) of each chunk whose columns fit COL_BYTES."""
    per = geo.C * geo.KH * geo.KW * geo.OH * geo.OW * 4
    step = max(1, min(geo.N, COL_BYTES // max(per, 1)))
    return [(n0, min(step, geo.N - n0)) for n0 in range(0, geo.N, step)]


def _params(geo: ConvGeometry, n: int, has_bias: bool = False) -> Any:
    p = geo.params(has_bias=has_bias)
    p.N = n
    return p


def _view(t: Tensor, n0: int, n: int, shape: tuple[int, ...]) -> Tensor:
    """Images n0 .. n0 + n - 1 of NCHW-like tensor `t` as a tensor of `shape`."""
    per = t.nbytes // t.shape[0]
    return Tensor(t.buffer.view(n0 * per, n * per), shape, t.dtype)


def _unfold(dev: Device, name: str, total: int, *args: Any) -> tuple:
    return (kernel(dev, SOURCE, f"conv2d_{name}_float"), min(total, MAX_GROUPS * THREADS), args)


def _gemm(a: Tensor, b: Tensor, out: Tensor, transpose_a: bool = False, transpose_b: bool = False,
          beta: float = 0.0, act: tuple[int, float] = (0, 0.0), min_splits: int = 1) -> list[tuple]:
    m, k = (a.shape[-1], a.shape[-2]) if transpose_a else (a.shape[-2], a.shape[-1])
    n = b.shape[-2] if transpose_b else b.shape[-1]
    batch = a.shape[0] if a.ndim == 3 else b.shape[0] if b.ndim == 3 else 1
    reduce_batch = out.ndim == 2 and batch > 1
    var = variant(a.dtype, None)
    tile, splits = plan(a.device, m, n, k, batch, reduce_batch, None, None, var)
    slices = cdiv(k, tile.bk) * (batch if reduce_batch else 1)
    splits = max(splits, min(min_splits, MAX_SPLITS, slices))
    return _launches(a.device, a, b, out, m, n, k, batch, reduce_batch, transpose_a, transpose_b,
                     1.0, beta, None, var, tile, splits, act)


def forward_plan(dev: Device, geo: ConvGeometry, x: Tensor, w: Tensor, b: Tensor | None,
                 y: Tensor, act: tuple[int, float]) -> list[tuple]:
    """y = act(conv(x, w) + b), y contiguous NCHW. Where w would be read many times (images x
    32-column blocks of OH*OW >= TRANSPOSE_W_READS), the GEMM takes it transposed (w^T, C*KH*KW
    x K, written first into the scratch): gemm_blocked then reads both operands in place
    (64 x 12544 x 800 on the 2-core test box: 133 -> 178 GFLOP/s) instead of copying a thread's
    rows of w per slice; below that the transpose would cost more than those copies (ResNet-18's
    512-channel layers at batch 2 read w twice)."""
    crs, ohw = geo.C * geo.KH * geo.KW, geo.OH * geo.OW
    out: list[tuple] = []
    transpose = geo.N * cdiv(ohw, 32) >= TRANSPOSE_W_READS
    wm: Tensor = Tensor(w.buffer, (geo.K, crs), w.dtype)
    wt: Tensor | None = None
    for n0, n in _chunks(geo):
        # w^T first: its offset in the scratch is the same for every chunk
        wt_buf, col_buf = scratch(dev, [geo.K * crs * 4 if transpose else 0, n * crs * ohw * 4],
                                  SCRATCH_TAG)
        if transpose and wt is None:
            wt = Tensor(wt_buf, (crs, geo.K), w.dtype)
            out.append(transpose_launch(dev, w.buffer, wt_buf, 1, geo.K, crs, w.dtype))
        col = Tensor(col_buf, (n, crs, ohw), np.float32)
        xs, ys = _view(x, n0, n, (n, *x.shape[1:])), _view(y, n0, n, (n, geo.K, ohw))
        p = _params(geo, n)
        out.append(_unfold(dev, "im2col", n * geo.C * geo.KH * geo.KW * geo.OH, xs.buffer,
                           col.buffer, p))
        if b is not None:
            out.append(_unfold(dev, "bias_fill", n * geo.K, b.buffer, ys.buffer, p))
        out += _gemm(wt if wt is not None else wm, col, ys, transpose_a=wt is not None,
                     beta=1.0 if b is not None else 0.0, act=act)
    return out


def input_grad_plan(dev: Device, geo: ConvGeometry, dy: Tensor, w: Tensor, b: Tensor | None,
                    dx: Tensor) -> list[tuple]:
    """dx of the conv (b: conv_transpose2d's bias, added to every dx[:, c])."""
    crs, ohw = geo.C * geo.KH * geo.KW, geo.OH * geo.OW
    wm = Tensor(w.buffer, (geo.K, crs), w.dtype)
    out: list[tuple] = []
    for n0, n in _chunks(geo):
        dcol = Tensor(scratch(dev, [n * crs * ohw * 4], SCRATCH_TAG)[0], (n, crs, ohw), np.float32)
        dys = _view(dy, n0, n, (n, geo.K, ohw))
        dxs = _view(dx, n0, n, (n, *dx.shape[1:]))
        out += _gemm(wm, dys, dcol, transpose_a=True)
        out.append(_unfold(dev, "col2im", n * geo.C * geo.H * cdiv(geo.W, COL2IM_W), dcol.buffer,
                           b.buffer if b is not None else dcol.buffer, dxs.buffer,
                           _params(geo, n, b is not None)))
    return out


def weight_grad_plan(dev: Device, geo: ConvGeometry, dy: Tensor, x: Tensor, dw: Tensor
                     ) -> list[tuple]:
    """dw = sum over the batch of dy[n] . col[n]^T (col[n]^T unfolded as such: B's columns
    contiguous for gemm_blocked)."""
    crs, ohw = geo.C * geo.KH * geo.KW, geo.OH * geo.OW
    dwm = Tensor(dw.buffer, (geo.K, crs), dw.dtype)
    out: list[tuple] = []
    for i, (n0, n) in enumerate(_chunks(geo)):
        colt = Tensor(scratch(dev, [n * crs * ohw * 4], SCRATCH_TAG)[0], (n, ohw, crs), np.float32)
        xs, dys = _view(x, n0, n, (n, *x.shape[1:])), _view(dy, n0, n, (n, geo.K, ohw))
        out.append(_unfold(dev, "im2col_t", n * ohw, xs.buffer, colt.buffer, _params(geo, n)))
        a = dys if n > 1 else Tensor(dys.buffer, (geo.K, ohw), dys.dtype)
        c = colt if n > 1 else Tensor(colt.buffer, (ohw, crs), colt.dtype)
        out += _gemm(a, c, dwm, beta=1.0 if i else 0.0,
                      min_splits=cdiv(n * ohw, WGRAD_SPLIT_TERMS))
    return out

