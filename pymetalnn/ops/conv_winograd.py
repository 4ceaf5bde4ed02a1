"""Winograd F(M x M, R x R) convolutions (kernels/conv_winograd.metal): the launch plans of a
stride-1 conv's forward, input gradient and weight gradient through the transforms around one
batched GEMM of gemm.metal.

Design note: pymetalnn/ops/conv.py decides whether a conv runs here (conv.WINOGRAD, conv.FORCE)
and calls conv_plan / weight_grad_plan; this module knows which convs the kernels can run
(eligible) and how to lay out their operands. Each transform is one memory-bound kernel writing
[xi][rows][P] matrices (xi < alpha^2, alpha = M + R - 1, P = N * TH * TW output tiles), so the
channel reductions are alpha^2 independent GEMMs:
    forward / input grad   Mt[xi] (K x P) = U[xi] (K x C) . V[xi] (C x P)
    weight grad            dU[xi] (K x C) = Z[xi] (K x P) . V[xi]^T (P x C)
The transformed operands live in the conv's per-op scratch (_common.scratch, tag conv.metal: one
op's temporaries, apart from the GEMM's split-K partials).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..params import CONST, WinogradParams
from ..runtime import Device
from ..tensor import Tensor
from ._common import MAX_GROUPS, cdiv, dummy, kernel, scratch
from .gemm import gemm_launches

if TYPE_CHECKING:
    from .conv import ConvGeometry

SOURCE = "conv_winograd.metal"
SCRATCH_TAG = "conv.metal"  # the conv plans' scratch: one op's temporaries at a time
THREADS = CONST["CONV_THREADS"]  # max_total_threads_per_threadgroup of every transform kernel
PAIRS = {(2, 3), (4, 3), (2, 5)}  # (M, R) instantiated in conv_winograd.metal
MIN_CHANNELS = 16           # both channel counts at least this (narrower GEMMs waste the tiles)
MAX_ELEMS = 2**31           # the transforms use 32-bit offsets
# The weight gradient's GEMMs reduce over all P tiles, in the transformed domain where the terms
# are larger than the result (alpha = 4: up to ~10x, alpha = 6: ~100x), so the length of each
# float partial sum drives the error: split K so that a partial sum covers at most this many
# tiles (up to gemm.MAX_SPLITS splits). Measured on cpu, ResNet 3x3 (N32, 64 -> 64, 56x56)
# F(2x2, 3x3) weight gradient: one sum over 25088 tiles 6.5e-6 of max|dw| (9x the tiled
# kernels'), 16 splits 1.1-1.4e-6 (1.6-1.9x); docs/accuracy.md.
WGRAD_SPLIT_TILES = 512


def eligible(geo: ConvGeometry, prec: str, m: int | None = None) -> bool:
    """Whether the conv can run Winograd (F(m x m, ...) instantiated for its kernel, if m):
    square kernel, stride 1, undilated, one group, float32, >= MIN_CHANNELS channels each side,
    and (given m) every transformed matrix within the kernels' 32-bit offsets."""
    r = geo.KH
    if not (geo.KW == r and any(rr == r and (m is None or mm == m) for mm, rr in PAIRS)
            and geo.SH == geo.SW == 1 and geo.DH == geo.DW == 1 and geo.G == 1
            and prec == "float" and min(geo.C, geo.K) >= MIN_CHANNELS):
        return False
    if m is None:
        return True
    tiles = geo.N * cdiv(max(geo.OH, geo.H), m) * cdiv(max(geo.OW, geo.W), m)
    return (m + r - 1) ** 2 * max(geo.C, geo.K) * tiles < MAX_ELEMS


def _params(geo: ConvGeometry, m: int, flip: bool) -> WinogradParams:
    """Params of the conv run by the transforms: the forward's, or (flip) the input gradient's
    conv of dy (channels K -> C, size OH x OW -> H x W, padding R - 1 - pad)."""
    p = WinogradParams()
    if flip:
        p.N, p.C, p.H, p.W, p.K, p.OH, p.OW = geo.N, geo.K, geo.OH, geo.OW, geo.C, geo.H, geo.W
        p.PT, p.PL = geo.KH - 1 - geo.PT, geo.KW - 1 - geo.PL
    else:
        p.N, p.C, p.H, p.W, p.K, p.OH, p.OW = geo.N, geo.C, geo.H, geo.W, geo.K, geo.OH, geo.OW
        p.PT, p.PL = geo.PT, geo.PL
    p.TH, p.TW = cdiv(p.OH, m), cdiv(p.OW, m)
    p.P = p.N * p.TH * p.TW
    return p


def _filter_params(geo: ConvGeometry, flip: bool) -> WinogradParams:
    p = WinogradParams()
    p.K, p.C, p.flip = geo.K, geo.C, int(flip)
    return p


def _tmp(dev: Device, *shapes: tuple[int, ...]) -> list[Tensor]:
    """One op's transformed operands (float32), from the conv scratch."""
    bufs = scratch(dev, [int(np.prod(s)) * 4 for s in shapes], SCRATCH_TAG)
    return [Tensor(b, s, np.float32) for b, s in zip(bufs, shapes)]


def _launch(dev: Device, m: int, geo: ConvGeometry, stage: str, total: int, *args: Any) -> tuple:
    return (kernel(dev, SOURCE, f"conv2d_wino{m}x{geo.KH}_{stage}_float"),
            min(total, MAX_GROUPS * THREADS), args)


def conv_plan(dev: Device, m: int, geo: ConvGeometry, flip: bool, x: Tensor, w: Tensor,
              b: Tensor | None, y: Tensor, act: tuple[int, float], out_nstride: int
              ) -> list[tuple]:
    """y = act(conv(x, w) + b) by F(m x m, R x R): filter and input transforms, alpha^2 GEMMs
    Mt[xi] (K x P) = U[xi] (K x C) V[xi] (C x P), output transform. flip: the input gradient
    (x is dy, w the conv's weights, y is dx)."""
    p = _params(geo, m, flip)
    p.has_bias = int(b is not None)
    p.act, p.act_alpha = act
    p.out_nstride = out_nstride
    a2 = (m + geo.KH - 1) ** 2
    u, v, mt = _tmp(dev, (a2, p.K, p.C), (a2, p.C, p.P), (a2, p.K, p.P))
    return [_launch(dev, m, geo, "filter", geo.K * geo.C, w.buffer, u.buffer,
                    _filter_params(geo, flip)),
            _launch(dev, m, geo, "input", p.C * p.P, x.buffer, v.buffer, p),
            *gemm_launches(u, v, mt),
            _launch(dev, m, geo, "output", p.K * p.P, mt.buffer,
                    b.buffer if b is not None else dummy(dev), y.buffer, p)]


def weight_grad_plan(dev: Device, m: int, geo: ConvGeometry, dy: Tensor, x: Tensor, dw: Tensor
                     ) -> list[tuple]:
    """dw by F(m x m, R x R): Z = A dY A^T and V = B^T d B per output tile, alpha^2 GEMMs
    dU[xi] (K x C) = Z[xi] (K x P) V[xi]^T (reduced over the P tiles), dw = G^T dU G."""
    p = _params(geo, m, False)
    a2 = (m + geo.KH - 1) ** 2
    z, v, du = _tmp(dev, (a2, p.K, p.P), (a2, p.C, p.P), (a2, p.K, p.C))
    return [_launch(dev, m, geo, "grad_output", p.K * p.P, dy.buffer, z.buffer, p),
            _launch(dev, m, geo, "input", p.C * p.P, x.buffer, v.buffer, p),
            *gemm_launches(z, v, du, transpose_b=True,
                           min_k_splits=cdiv(p.P, WGRAD_SPLIT_TILES)),
            _launch(dev, m, geo, "filter_grad", geo.K * geo.C, du.buffer, dw.buffer, p)]
