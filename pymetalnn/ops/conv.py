"""Convolutions: conv2d, conv1d and their backward passes (kernels/conv.metal); the transposed
convolutions that run the same kernels are in ops/conv_transpose.py (re-exported here).

Design note: every op is one of four kernels on a conv geometry x (N, C, H, W) -> y (N, K, OH,
OW) with weights (K, C/G, KH, KW): forward, input gradient, weight gradient, bias gradient.
conv_transpose2d is the input gradient of the conv whose input is the transpose's output, so its
forward runs the input-gradient kernel and its backward runs the forward kernel (for dx) and the
weight-gradient kernel with dy and x swapped (for dw). Weight and bias gradients are split
reductions (float partials in a workspace, then a fixed-order sum), so any batch size reduces
correctly and deterministically. Wide GEMMs run tiled kernels (after a small kernel that packs
the weights tap-major so the tiles' weight loads coalesce), the tile shape picked per shape by a
wave model (_pick_tile); narrow ones (depthwise, fewer than 16 channels per group on the GEMM's
column side) run one-output-per-thread kernels. 3x3 and 5x5 stride-1 float32 convs (undilated,
one group, >= 16 channels each side) run Winograd F(4x4, 3x3) / F(2x2, 5x5) on cuda instead
(kernels/conv_winograd.metal, plans in ops/conv_winograd.py; this module decides when, see
WINOGRAD: memory-bound transforms around one batched GEMM of gemm.metal, 2.25 multiply-adds per
output and channel pair instead of 9, 9 instead of 25; measured faster on every such layer of
InceptionV3 and LeNet).

Precision (`accumulate=`): float32 tensors accumulate in float; float16 tensors accumulate in
float by default ("float") or in half ("half", MPS-style fp16 accumulation: fastest, least
accurate; weight-gradient chunks are then capped at HACC_CHUNK terms unless the workspace bound
WORKSPACE_BYTES forces longer ones, and bias gradients always sum in float). float32 with
accumulate="half" is rejected.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

import numpy as np

from ..params import CONST, Conv2dParams
from ..runtime import Device
from ..tensor import Tensor, TensorLike
from . import conv_im2col as im2col
from . import conv_winograd as wino
from ._common import (
    FLOATS,
    MAX_GROUPS,
    as_tensor,
    cdiv,
    dummy,
    kernel,
    matrix_hw,
    mma_gen,
    out_like,
    pick_device,
    positive_ints,
    scratch,
    strided_out,
    suffix,
    tensor_arg,
)
from .neuron import activation_backward_from_output, activation_code

SOURCE = "conv.metal"
THREADS = CONST["CONV_THREADS"]
# Tile shapes of the instantiations in kernels/conv.metal (kernel conv2d_<op>_<name>_<prec>):
# name -> (BM, BN, BK, TM, TN, relative throughput per SM). fwd/data: rows = output pixels,
# columns = output (fwd) or input (data) channels of a group; weight: rows = output channels,
# columns = (c, r, s). "fwd" and "data" instantiate the same shapes (tests cycle both through
# every name) but have their own throughputs.
# Throughputs: fitted to the float sweep of benchmarks/dev_conv.py on an NVIDIA H200 (132 SMs,
# 2026-11-26, docs/results/h200-2026-11-26/dev_conv.log): for each bench_conv shape, a tile's
# GFLOP/s times its modeled work (the wave-padded area of _pick_tile) relative to the shape's
# best, geometric mean over the six shapes (fwd; data: input_grad and conv_transpose2d). With
# them _pick_tile picks the measured best or within 3% of it on every shape. BK = 16 (k16) beats
# BK = 8 on 128-row tiles (a slice's loop/barrier overhead is halved), most for the input
# gradient. Weight gradients split their reduction to fill the device, so only the tiles' rate
# matters (geometric mean of GFLOP/s relative to t64x64): t64x64 won on all six shapes.
TILES: dict[str, dict[str, tuple[int, int, int, int, int, float]]] = {
    "fwd": {"t128x64": (128, 64, 8, 8, 4, 0.88), "t128x128": (128, 128, 8, 8, 8, 0.98),
            "t64x64": (64, 64, 8, 4, 4, 0.78), "t128x32": (128, 32, 8, 4, 4, 0.72),
            "t128x64k16": (128, 64, 16, 8, 4, 0.92), "t128x32k16": (128, 32, 16, 4, 4, 0.76)},
    "data": {"t128x64": (128, 64, 8, 8, 4, 0.83), "t128x128": (128, 128, 8, 8, 8, 0.95),
             "t64x64": (64, 64, 8, 4, 4, 0.69), "t128x32": (128, 32, 8, 4, 4, 0.63),
             "t128x64k16": (128, 64, 16, 8, 4, 0.96), "t128x32k16": (128, 32, 16, 4, 4, 0.74)},
    "weight": {"t64x64": (64, 64, 16, 4, 4, 1.0), "t64x128": (64, 128, 16, 4, 8, 0.93),
               "t128x128": (128, 128, 8, 8, 8, 0.69)},
}
# Simdgroup-matrix tiles (conv.metal's MMA variant, fp16 storage, BK = 32), picked instead of
# TILES for half / hacc_half where the device has matrix hardware (matrix_hw). Throughputs are
# relative to TILES' rows (matrix hardware several times the SIMD-FMA rate).
MMA_TILES: dict[str, dict[str, tuple[int, int, int, int, int, float]]] = {
    "fwd": {"m128x64": (128, 64, 32, 8, 4, 3.2), "m64x64": (64, 64, 32, 4, 4, 2.4),
            "m128x32": (128, 32, 32, 4, 4, 2.4)},
    "data": {"m128x64": (128, 64, 32, 8, 4, 3.2), "m64x64": (64, 64, 32, 4, 4, 2.4),
             "m128x32": (128, 32, 32, 4, 4, 2.4)},
    "weight": {"m64x64": (64, 64, 32, 4, 4, 3.0), "m64x128": (64, 128, 32, 4, 8, 3.2)},
}
# The same tiles on 16-deep simdgroup tile products (conv.metal's MMA = 2: ldmatrix and full-rate
# mma.sync.m16n8k16 on cuda), named "n*". MMA_GEN picks which generation the automatic choice
# takes (1: "m*", 2: "n*"); both stay callable through FORCE and are tested. H100, 2026-12-06
# 22:45 UTC (bench_conv.py --precision half): "n*" faster on 20 of the 24 rows (resnet-3x3
# forward 0.230 -> 0.182 ms, input gradient 0.280 -> 0.177), within noise on the others.
for _kind, _table in list(MMA_TILES.items()):
    _table.update({"n" + name[1:]: v for name, v in list(_table.items())})
# Default 2 since the merged generation 2 (B read by the product through ldmatrix.trans, 16-byte
# tile loads) ran the cuda suite and compute-sanitizer (H100, 2026-12-07): "n*" faster on all 24
# rows of bench_conv.py --precision half, the same errors as "m*" (resnet-3x3 input gradient
# 0.22 -> 0.41 of cuDNN fp16). PYMETALNN_MMA_GEN=1 keeps generation 1.
MMA_GEN = mma_gen(2)
DIRECT_BELOW = 16        # GEMM column widths below this use the direct kernels
TARGET_GROUPS = 512      # threadgroups a split reduction aims for off cuda
SPLIT_GROUPS_PER_SM = 6  # ... and per SM on cuda (two waves of three resident threadgroups)
HACC_CHUNK = 512         # reduction terms per fp16 partial sum of the half-accumulating dw
WORKSPACE_BYTES = 1 << 28  # bound on a split reduction's float partials
MAX_ELEMS = 2**31        # kernels use 32-bit offsets
# Row-staged fp32 weight gradient (conv.metal's conv2d_bwd_weight_rows<KW>): output channels x
# (c, r) pairs per threadgroup and output pixels per reduction step (the kernel's RK, RQ, SEG),
# for convs with horizontal stride and dilation 1 and KW in ROWS_KW. The tiled kernel gathers
# every im2col element with its own index math and bounds check; the row kernel slides a
# KW-wide register window along staged input rows instead.
ROWS_TILE = (64, 32, 32)
ROWS_KW = (3, 5, 7)
# Where cuda takes it by default (float32); elsewhere only when forced (FORCE["weight"] =
# "rows"; 3x3 weight gradients run Winograd F(2x2, 3x3) before this is asked). H100, 2026-12-07
# (docs/results/h100-2026-12-07c/rows_sweep.log), ms tiled -> rows (version 1, now
# kernels/dev/conv_rows.metal's v1; version 3, which packs narrow rows, is not yet timed on a
# GPU: benchmarks/dev_conv.py --op weight_grad --versions rows rows_v1) at 2 threadgroups per SM:
# LeNet conv2 (N64, 32->64, 14x14, 5x5) 0.0822 -> 0.0689, LeNet conv1 (N64, 1->6, 28x28)
# 0.0667 -> 0.0532, InceptionV3's 5x5 (N32, 48->64, 35x35) 0.267 -> 0.249, 5x5 128->128 17x17
# 0.355 -> 0.320, InceptionV3's 1x7 (N32, 128->128, 17x17) 0.1115 -> 0.1040; split targets of
# 1, 3, 4, 6 and 8 per SM were slower on the LeNet and 1x7 shapes (4 won by 6% on 5x5 128->128).
ROWS_DEFAULT_KW = (5, 7)
ROWS_GROUPS_PER_SM = 2   # split target: fewer, longer chunks than the tiled kernel's (float partials)
ROWS_DEV = ""  # a numbered version of kernels/dev/conv_rows.metal ("v1", "v2"), set by dev_conv.py
# Tests and benchmarks force a path: {"fwd"|"data": "direct" or a tile name, "weight": a tile;
# any of the three: "wino2" / "wino4" (Winograd F(2x2, 3x3) / F(4x4, 3x3) where the conv is
# eligible, the tiled kernels otherwise) or "im2col" (ops/conv_im2col.py where eligible, on any
# backend; the cpu backend's default for eligible convs)}.
FORCE: dict[str, str] = {}
# Winograd F(M x M, R x R) for stride-1 undilated ungrouped float32 convs with square kernels:
# per op and kernel size R, the output tile M used on cuda when the conv is eligible (absent:
# the direct/tiled kernels; instantiated pairs: conv_winograd.PAIRS). Speed, from
# benchmarks/dev_inception.py on an NVIDIA H200 (2026-11-26,
# docs/results/h200-2026-11-26/dev_inception.log): F(4x4) beat the best tiled kernel on all 18
# eligible (layer, op) pairs of InceptionV3 at batch 32, by 1.01-3.3x, and F(2x2) on every one
# of them; the model's conv time fell from 54.9 to 46.4 ms (cuDNN 44.1). F(2x2, 5x5), same GPU
# and day, ms tiled -> Winograd: LeNet conv2 (N64, 32->64, 14x14) forward 0.078 -> 0.048, input
# grad 0.104 -> 0.068, weight grad 0.080 -> 0.078; InceptionV3's 48->64 35x35 (N32) 0.262 ->
# 0.161, 0.337 -> 0.193, 0.285 -> 0.216.
# Accuracy decides first (pymetalnn/accuracy.py, docs/accuracy.md: within 10x of the direct
# kernels' error and 1e-4 of max|reference|). Measured on cpu against float64 on bench_conv's
# shapes, three seeds (error over the tiled kernels' on the same inputs): F(4x4, 3x3) forward
# 7.2-9.2x, input grad 7.4-7.6x, weight grad 10.5-15x; F(2x2, 3x3) forward and input grad
# 0.3-0.4x, weight grad 1.6-2.1x; F(2x2, 5x5) forward 2.6-3.4x, input grad 2.3-2.9x, weight grad 30-44x
# (1.4-1.5e-5 of max|dw| on LeNet conv2). So by default ("budget") 3x3 weight
# gradients run F(2x2, 3x3) and 5x5 ones the tiled kernels; set_winograd("fast") opts into
# the fastest measured variants whatever their error, set_winograd("off") into none.
# cpu and metal are unmeasured for speed: there Winograd runs only when forced.
WINOGRAD_MODES: dict[str, dict[str, dict[int, int]]] = {
    "budget": {"fwd": {3: 4, 5: 2}, "data": {3: 4, 5: 2}, "weight": {3: 2}},
    "fast": {"fwd": {3: 4, 5: 2}, "data": {3: 4, 5: 2}, "weight": {3: 4, 5: 2}},
    "off": {"fwd": {}, "data": {}, "weight": {}},
}
WINOGRAD: dict[str, dict[int, int]] = WINOGRAD_MODES["budget"]  # the table in use


def set_winograd(mode: str) -> None:
    """Which Winograd variants float32 convs run on cuda (the others run the tiled kernels):

    - "budget" (default): only those within the fp32 accuracy budget (docs/accuracy.md):
      F(4x4, 3x3) forward and input gradient, F(2x2, 3x3) weight gradient, F(2x2, 5x5) forward
      and input gradient;
    - "fast": the fastest measured, out of budget included: the 3x3 weight gradient by
      F(4x4, 3x3) (10.5-15x the tiled kernels' error, up to 1e-5 of max|dw| on ResNet 3x3) and the
      5x5 weight gradient by F(2x2, 5x5) (30-44x, ~1.5e-5 on LeNet conv2);
    - "off": none.

    Process-wide, like torch.backends.cudnn.allow_tf32; float16 convs never run Winograd.
    """
    global WINOGRAD
    if mode not in WINOGRAD_MODES:
        raise ValueError(f"mode: expected one of {', '.join(map(repr, WINOGRAD_MODES))}, got {mode!r}")
    WINOGRAD = WINOGRAD_MODES[mode]


Padding = Union[int, str, tuple]


@dataclass(frozen=True)
class ConvGeometry:
    """A conv x (N, C, H, W) * w (K, C/G, KH, KW) -> y (N, K, OH, OW)."""

    N: int
    C: int
    H: int
    W: int
    K: int
    OH: int
    OW: int
    KH: int
    KW: int
    SH: int
    SW: int
    PT: int
    PL: int
    DH: int
    DW: int
    G: int

    @property
    def Cg(self) -> int:
        return self.C // self.G

    @property
    def Kg(self) -> int:
        return self.K // self.G

    def params(self, has_bias: bool = False, splits: int = 1, chunk: int = 0) -> Conv2dParams:
        return Conv2dParams(self.N, self.C, self.H, self.W, self.K, self.OH, self.OW, self.KH,
                            self.KW, self.SH, self.SW, self.PT, self.PL, self.DH, self.DW, self.G,
                            self.Cg, self.Kg, int(has_bias), splits, chunk)


# ---- argument checking ------------------------------------------------------------------------

def _precision(dtype: np.dtype, accumulate: str | None) -> str:
    """Kernel suffix: float, half (fp16 storage, float accumulation) or hacc_half."""
    if accumulate not in (None, "float", "half"):
        raise ValueError(f"accumulate: expected None, 'float' or 'half', got {accumulate!r}")
    if dtype == np.float32:
        if accumulate == "half":
            raise ValueError("accumulate: 'half' needs float16 tensors (float32 accumulates in float)")
        return "float"
    return "hacc_half" if accumulate == "half" else "half"


def _nonzero(t: Tensor, name: str) -> None:
    if any(s <= 0 for s in t.shape):
        raise ValueError(f"{name}: every dimension must be > 0, got shape {t.shape}")
    if t.size >= MAX_ELEMS:
        raise ValueError(f"{name}: {t.size} elements; the conv kernels take fewer than 2^31")


def _same_dtype(t: Tensor, name: str, ref: Tensor) -> None:
    if t.dtype != ref.dtype:
        raise ValueError(f"{name}: dtype {t.dtype} does not match x ({ref.dtype})")


def _bias(b: TensorLike | None, dev: Device, x: Tensor, k: int) -> Tensor | None:
    if b is None:
        return None
    b = tensor_arg(b, dev, "b", FLOATS, 1)
    _same_dtype(b, "b", x)
    if b.shape != (k,):
        raise ValueError(f"b: expected shape ({k},), got {b.shape}")
    return b


def _padding_values(padding: Any, expected: str) -> tuple:
    """padding as a tuple; a non-sequence raises naming what was `expected`."""
    try:
        return tuple(padding)
    except TypeError:
        raise ValueError(f"padding: expected {expected}, got {padding!r}") from None


def _padding2d(padding: Padding, h: int, w: int, kh: int, kw: int, stride: tuple[int, int],
               dil: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) from an int, (ph, pw), (top, bottom, left, right), 'valid' or
    'same' (output ceil(size / stride); an odd total puts the extra row/column at the bottom/right,
    as TensorFlow and MPS do)."""
    if isinstance(padding, str):
        mode = padding.lower()
        if mode == "valid":
            return (0, 0, 0, 0)
        if mode != "same":
            raise ValueError(f"padding: expected 'same' or 'valid', got {padding!r}")
        pads = []
        for n, k, s, d in ((h, kh, stride[0], dil[0]), (w, kw, stride[1], dil[1])):
            total = max((-(-n // s) - 1) * s + d * (k - 1) + 1 - n, 0)
            pads += [total // 2, total - total // 2]
        return tuple(pads)  # type: ignore[return-value]
    if isinstance(padding, (int, np.integer)):
        vals = (int(padding),) * 4
    else:
        vals = _padding_values(padding, "an int, a pair, 4 ints or 'same'/'valid'")
        if len(vals) == 2:
            vals = (vals[0], vals[0], vals[1], vals[1])
        elif len(vals) != 4:
            raise ValueError(f"padding: expected an int, a pair, 4 ints (top, bottom, left, right) "
                             f"or 'same'/'valid', got {padding!r}")
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in vals):
        raise ValueError(f"padding: expected ints, got {padding!r}")
    if any(v < 0 for v in vals):
        raise ValueError(f"padding: values must be >= 0, got {padding!r}")
    return tuple(int(v) for v in vals)  # type: ignore[return-value]


def _group_count(groups: Any) -> int:
    if not isinstance(groups, (int, np.integer)) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups: expected a positive int, got {groups!r}")
    return int(groups)


def _conv_geometry(xs: tuple[int, ...], ws: tuple[int, ...], stride: Any, padding: Padding,
                   dilation: Any, groups: Any) -> ConvGeometry:
    n, c, h, w = xs
    k, cg, kh, kw = ws
    st = positive_ints(stride, 2, "stride")
    dil = positive_ints(dilation, 2, "dilation")
    g = _group_count(groups)
    if c % g:
        raise ValueError(f"groups: {g} does not divide the {c} input channels of x")
    if k % g:
        raise ValueError(f"groups: {g} does not divide the {k} output channels of w")
    if cg * g != c:
        raise ValueError(f"w: has {cg} input channels per group, x has {c} channels in {g} "
                         f"group(s) (expected {c // g})")
    pt, pb, pl, pr = _padding2d(padding, h, w, kh, kw, st, dil)
    eh, ew = dil[0] * (kh - 1) + 1, dil[1] * (kw - 1) + 1
    if eh > h + pt + pb or ew > w + pl + pr:
        raise ValueError(f"w: the (dilated) kernel {eh}x{ew} is larger than the padded input "
                         f"{h + pt + pb}x{w + pl + pr}")
    oh = (h + pt + pb - eh) // st[0] + 1
    ow = (w + pl + pr - ew) // st[1] + 1
    return ConvGeometry(n, c, h, w, k, oh, ow, kh, kw, st[0], st[1], pt, pl, dil[0], dil[1], g)


def _operands(x: TensorLike, w: TensorLike, b: TensorLike | None
              ) -> tuple[Device, Tensor, Tensor]:
    """The device, x and w of a 2-D conv or transposed conv: 4-D, one float dtype, non-empty."""
    dev = pick_device(x, w, b)
    x = tensor_arg(x, dev, "x", FLOATS, 4)
    w = tensor_arg(w, dev, "w", FLOATS, 4)
    _same_dtype(w, "w", x)
    _nonzero(x, "x")
    _nonzero(w, "w")
    return dev, x, w


def _conv_args(x: TensorLike, w: TensorLike, b: TensorLike | None, stride: Any, padding: Padding,
               dilation: Any, groups: Any, accumulate: str | None
               ) -> tuple[Device, Tensor, Tensor, Tensor | None, ConvGeometry, str]:
    dev, x, w = _operands(x, w, b)
    geo = _conv_geometry(x.shape, w.shape, stride, padding, dilation, groups)
    b = _bias(b, dev, x, geo.K)
    prec = _precision(x.dtype, accumulate)
    return dev, x, w, b, geo, prec


def _grad_arg(grad_out: TensorLike, dev: Device, x: Tensor, shape: tuple[int, ...]) -> Tensor:
    gy = tensor_arg(grad_out, dev, "grad_out", FLOATS, len(shape))
    _same_dtype(gy, "grad_out", x)
    if gy.shape != shape:
        raise ValueError(f"grad_out: expected shape {shape}, got {gy.shape}")
    return gy


# ---- dispatch -----------------------------------------------------------------------------------
# A plan is the list of launches (kernel, thread count, args) one op makes, built after
# validation and run at once; benchmarks time plans directly, without the host-side checks.

Launch = tuple  # (Kernel, count, args)

def run(plan: list[Launch]) -> None:
    for k, count, args in plan:
        k(count, *args)


def _groups(n: int) -> int:
    return max(1, min(n, MAX_GROUPS)) * THREADS


def _sms(dev: Device) -> int:
    """Compute units that run threadgroups at once (SMs on cuda, worker threads on cpu): a
    device's own constant, looked up once (the plan functions ask on every call)."""
    n = _SMS.get(dev)
    if n is None:
        props = getattr(dev, "props", None)
        if props is not None and "multiProcessorCount" in props:
            n = int(props["multiProcessorCount"])
        else:
            n = int(getattr(dev, "num_workers", 8))
        _SMS[dev] = n
    return n


_SMS: dict[Device, int] = {}


def tile_shape(kind: str, tile: str) -> tuple[int, int, int, int, int, float]:
    """(BM, BN, BK, TM, TN, throughput) of a tile name of TILES[kind] or MMA_TILES[kind]."""
    return TILES[kind][tile] if tile in TILES[kind] else MMA_TILES[kind][tile]


def _mma_table(kind: str) -> dict[str, tuple[int, int, int, int, int, float]]:
    """MMA_TILES[kind]'s tiles of generation MMA_GEN (one dict object per kind and generation:
    _TILE_MEMO tells tables apart by identity)."""
    key = (kind, MMA_GEN)
    t = _MMA_TABLES.get(key)
    if t is None:
        prefix = "m" if MMA_GEN == 1 else "n"
        t = _MMA_TABLES[key] = {k: v for k, v in MMA_TILES[kind].items() if k.startswith(prefix)}
    return t


_MMA_TABLES: dict[tuple[str, int], dict[str, tuple[int, int, int, int, int, float]]] = {}


def _pick_tile(kind: str, dev: Device, rows: int, cols: int, batches: int, prec: str = "float"
               ) -> str:
    """The tile of TILES[kind] (MMA_TILES[kind] for fp16 on matrix hardware) with the least
    modeled time: threadgroups are dealt round-robin to the SMs, so time ~ ceil(tiles / SMs) *
    padded tile area / the tile's throughput. Weight gradients split their reduction to fill the
    device, so only their padding counts."""
    forced = FORCE.get(kind)
    if forced is not None and not forced.startswith("wino") and forced not in ("im2col", "rows"):
        return forced
    table = _mma_table(kind) if prec != "float" and matrix_hw(dev) else TILES[kind]
    sms = _sms(dev)
    key = (kind, sms, rows, cols, batches)
    hit = _TILE_MEMO.get(key)
    if hit is not None and hit[0] is table:
        return hit[1]
    best, best_cost = "", float("inf")
    for name, (bm, bn, _bk, _tm, _tn, eff) in table.items():
        if kind == "weight":
            cost = cdiv(rows, bm) * bm * cdiv(cols, bn) * bn / eff
        else:
            cost = cdiv(batches * cdiv(rows, bm) * cdiv(cols, bn), sms) * bm * bn / eff
        if cost < best_cost:
            best, best_cost = name, cost
    _TILE_MEMO[key] = (table, best)
    return best


# (kind, SMs, rows, cols, batches) -> (the TILES[kind] table it was picked from, tile): the model
# is a pure function of these, so each shape is modeled once per table (benchmarks that swap
# TILES for another table get fresh picks)
_TILE_MEMO: dict[tuple, tuple[dict, str]] = {}


def _im2col(kind: str, dev: Device, geo: ConvGeometry, prec: str, source: str) -> bool:
    """The GEMM-over-unfolded-input path (ops/conv_im2col.py): the cpu backend's choice unless
    another path is forced; forced ("im2col") on any backend where the conv is eligible. Never
    for other kernel sources (benchmarks' candidates)."""
    forced = FORCE.get(kind)
    if source != SOURCE or forced not in (None, "im2col"):
        return False
    return im2col.eligible(dev, geo, prec, any_device=forced == "im2col")


def _use_direct(kind: str, width: int) -> bool:
    forced = FORCE.get(kind)
    if forced is not None and not forced.startswith("wino") and forced != "im2col":
        return forced == "direct"
    return width < DIRECT_BELOW


def forward_plan(dev: Device, prec: str, geo: ConvGeometry, x: Tensor, w: Tensor, b: Tensor | None,
                 y: Tensor, source: str = SOURCE, act: tuple[int, float] = (0, 0.0),
                 out_nstride: int = 0) -> list[Launch]:
    """y = act(conv(x, w) + b); act = (NN_ACT_* code, alpha) from neuron.activation_code;
    out_nstride > 0: elements between y's images (a channel slice of a larger tensor)."""
    p = geo.params(has_bias=b is not None)
    p.act, p.act_alpha = act
    p.out_nstride = out_nstride
    args = (x.buffer, w.buffer, b.buffer if b is not None else dummy(dev), y.buffer, p)
    if _im2col("fwd", dev, geo, prec, source) and not out_nstride:
        return im2col.forward_plan(dev, geo, x, w, b, y, act)
    if _use_direct("fwd", geo.Kg):
        return [(kernel(dev, source, f"conv2d_fwd_direct_{prec}"), min(y.size, MAX_GROUPS * THREADS),
                 args)]
    m = _winograd("fwd", dev, geo, prec)
    if m:
        return wino.conv_plan(dev, m, geo, False, x, w, b, y, act, out_nstride)
    tile = _pick_tile("fwd", dev, geo.N * geo.OH * geo.OW, geo.Kg, geo.G, prec)
    bm, bn = tile_shape("fwd", tile)[:2]
    tiles = geo.G * cdiv(geo.N * geo.OH * geo.OW, bm) * cdiv(geo.Kg, bn)
    pack, args = _packed_weights(dev, geo, w, args, 1, source, tile)
    return pack + [(kernel(dev, source, f"conv2d_fwd_{tile}_{prec}"), _groups(tiles), args)]


def _packed_weights(dev: Device, geo: ConvGeometry, w: Tensor, args: tuple, k_inner: int,
                    source: str, tile: str = "") -> tuple[list[Launch], tuple]:
    """The launch that packs w tap-major for the tiled kernels, and `args` with w replaced by the
    packed copy (dev tiles named *u read w as it is). A 1x1 kernel's input-gradient layout
    [g][0][k][c] is w's own (K, C/G, 1, 1): no pack."""
    if tile.endswith("u") or (k_inner == 0 and geo.KH == geo.KW == 1):
        return [], args
    wp = scratch(dev, [w.nbytes], SOURCE)[0]
    k = kernel(dev, source, f"conv2d_pack_weight_{suffix(w.dtype)}")
    launch = (k, min(w.size, MAX_GROUPS * THREADS), (w.buffer, wp, geo.params(), np.uint32(k_inner)))
    return [launch], (args[0], wp, *args[2:])


def input_grad_plan(dev: Device, prec: str, geo: ConvGeometry, dy: Tensor, w: Tensor,
                    b: Tensor | None, dx: Tensor, source: str = SOURCE) -> list[Launch]:
    """dx of the conv `geo` (b: conv_transpose2d's bias, added to every dx[:, c])."""
    p = geo.params(has_bias=b is not None)
    args = (dy.buffer, w.buffer, b.buffer if b is not None else dummy(dev), dx.buffer, p)
    if _im2col("data", dev, geo, prec, source):
        return im2col.input_grad_plan(dev, geo, dy, w, b, dx)
    if _use_direct("data", geo.Cg):
        return [(kernel(dev, source, f"conv2d_bwd_data_direct_{prec}"),
                 min(dx.size, MAX_GROUPS * THREADS), args)]
    m = _winograd("data", dev, geo, prec)
    if m:
        return wino.conv_plan(dev, m, geo, True, dy, w, b, dx, (0, 0.0), 0)
    rows = geo.N * cdiv(geo.H, geo.SH) * cdiv(geo.W, geo.SW)
    tile = _pick_tile("data", dev, rows, geo.Cg, geo.G * geo.SH * geo.SW, prec)
    bm, bn = tile_shape("data", tile)[:2]
    tiles = geo.G * geo.SH * geo.SW * cdiv(rows, bm) * cdiv(geo.Cg, bn)
    pack, args = _packed_weights(dev, geo, w, args, 0, source, tile)
    return pack + [(kernel(dev, source, f"conv2d_bwd_data_{tile}_{prec}"), _groups(tiles), args)]


def _splits(red: int, base: int, step: int, target: int, cap: int | None = None,
            out_size: int = 1) -> tuple[int, int]:
    """(splits, chunk): cut a reduction of `red` terms into chunks (multiples of `step`, at most
    `cap`) so that base * splits threadgroups come near `target` without passing it: the target
    is whole rounds of resident threadgroups, and overshooting it by less than one row of `base`
    tiles (LeNet conv2's weight gradient on 132 SMs: 13 * 61 = 793 for 792) adds a round for a
    handful of them. The float workspace (splits * out_size) stays within WORKSPACE_BYTES,
    which can stretch chunks past `cap`."""
    splits = max(1, min(target // base, cdiv(red, 4 * step)))
    chunk = cdiv(cdiv(red, splits), step) * step
    if cap is not None:
        chunk = min(chunk, cap)
    most = max(1, WORKSPACE_BYTES // (4 * out_size))
    if cdiv(red, chunk) > most:
        chunk = cdiv(cdiv(red, most), step) * step
    return cdiv(red, chunk), chunk


def _target_groups(dev: Device, per_sm: int = SPLIT_GROUPS_PER_SM) -> int:
    # per_sm threadgroups per SM on a GPU; a fixed count elsewhere so that cpu tests split the
    # same way
    return per_sm * _sms(dev) if dev.name == "cuda" else TARGET_GROUPS


def _reduce_launch(dev: Device, ws: Any, out: Tensor, splits: int, source: str) -> Launch:
    k = kernel(dev, source, f"conv2d_bwd_reduce_{suffix(out.dtype)}")
    return (k, min(out.size, MAX_GROUPS * THREADS),
            (ws, out.buffer, np.uint32(out.size), np.uint32(splits)))


def weight_grad_plan(dev: Device, prec: str, geo: ConvGeometry, dy: Tensor, x: Tensor, dw: Tensor,
                     source: str = SOURCE) -> list[Launch]:
    """dw of the conv `geo`: float partials over chunks of (n, oh, ow), then their ordered sum."""
    if _im2col("weight", dev, geo, prec, source):
        return im2col.weight_grad_plan(dev, geo, dy, x, dw)
    m = _winograd("weight", dev, geo, prec)
    if m:
        return wino.weight_grad_plan(dev, m, geo, dy, x, dw)
    if _use_rows(dev, geo, prec):
        return _rows_weight_plan(dev, geo, dy, x, dw, source)
    crs = geo.Cg * geo.KH * geo.KW
    tile = _pick_tile("weight", dev, geo.Kg, crs, geo.G, prec)
    bm, bn, bk = tile_shape("weight", tile)[:3]
    base = geo.G * cdiv(geo.Kg, bm) * cdiv(crs, bn)
    splits, chunk = _splits(geo.N * geo.OH * geo.OW, base, bk, _target_groups(dev),
                            HACC_CHUNK if prec == "hacc_half" else None, dw.size)
    ws = scratch(dev, [splits * dw.size * 4], SOURCE)[0]
    k = kernel(dev, source, f"conv2d_bwd_weight_{tile}_{prec}")
    return [(k, _groups(base * splits), (dy.buffer, x.buffer, ws, geo.params(splits=splits, chunk=chunk))),
            _reduce_launch(dev, ws, dw, splits, source)]


def _use_rows(dev: Device, geo: ConvGeometry, prec: str) -> bool:
    """The row-staged weight-gradient kernel: float32 with horizontal stride and dilation 1 and
    an instantiated KW; by default on cuda for ROWS_DEFAULT_KW, anywhere when forced."""
    if prec != "float" or geo.SW != 1 or geo.DW != 1 or geo.KW not in ROWS_KW:
        return False
    forced = FORCE.get("weight")
    if forced is not None:
        return forced == "rows"
    return dev.name == "cuda" and geo.KW in ROWS_DEFAULT_KW


def _rows_per_segment(geo: ConvGeometry) -> int:
    """Output rows per segment of the row kernel (its rows_per_segment): as many whole rows as
    fit SEG pixels and SEG + KW - 1 staged inputs, 1 for rows wider than SEG."""
    seg = ROWS_TILE[2]
    if geo.OW > seg:
        return 1
    return min(seg // geo.OW, (seg + geo.KW - 1) // (geo.OW + geo.KW - 1))


def _rows_weight_plan(dev: Device, geo: ConvGeometry, dy: Tensor, x: Tensor, dw: Tensor,
                      source: str) -> list[Launch]:
    """dw through conv2d_bwd_weight_rows<KW>: float partials over chunks of output-row
    segments (n, oh, SEG pixels), then their ordered sum."""
    rk, rq, seg = ROWS_TILE
    base = geo.G * cdiv(geo.Kg, rk) * cdiv(geo.Cg * geo.KH, rq)
    r = 1 if ROWS_DEV else _rows_per_segment(geo)  # the dev versions take one row a segment
    splits, chunk = _splits(geo.N * cdiv(geo.OH, r) * cdiv(geo.OW, seg), base, 1,
                            _target_groups(dev, ROWS_GROUPS_PER_SM), None, dw.size)
    ws = scratch(dev, [splits * dw.size * 4], SOURCE)[0]
    if ROWS_DEV:
        source = "dev/conv_rows.metal"
    k = kernel(dev, source, f"conv2d_bwd_weight_rows{geo.KW}{ROWS_DEV}_float")
    return [(k, _groups(base * splits), (dy.buffer, x.buffer, ws, geo.params(splits=splits, chunk=chunk))),
            _reduce_launch(dev, ws, dw, splits, source)]


def bias_grad_plan(dev: Device, dy: Tensor, db: Tensor, source: str = SOURCE) -> list[Launch]:
    """db[k] = sum of dy[:, k] (float partial sums in every precision)."""
    n, c, h, w = dy.shape
    splits, chunk = _splits(n * h * w, c, THREADS, _target_groups(dev), None, c)
    p = Conv2dParams(N=n, K=c, OH=h, OW=w, splits=splits, chunk=chunk)
    ws = scratch(dev, [splits * c * 4], SOURCE)[0]
    k = kernel(dev, source, f"conv2d_bwd_bias_{suffix(dy.dtype)}")
    return [(k, _groups(splits * c), (dy.buffer, ws, p)), _reduce_launch(dev, ws, db, splits, source)]


# ---- Winograd F(M x M, R x R) (ops/conv_winograd.py) -------------------------------------------

def _winograd(kind: str, dev: Device, geo: ConvGeometry, prec: str) -> int:
    """The Winograd tile M to use for op `kind` of `geo`, 0 for the direct/tiled kernels."""
    forced = FORCE.get(kind)
    if forced is not None:
        m = int(forced[4:]) if forced in ("wino2", "wino4") else 0
    else:
        m = WINOGRAD[kind].get(geo.KH, 0) if dev.name == "cuda" else 0
    return m if m and wino.eligible(geo, prec, m) else 0


def _forward(dev: Device, prec: str, geo: ConvGeometry, x: Tensor, w: Tensor, b: Tensor | None,
             dtype: np.dtype, act: tuple[int, float] = (0, 0.0), out: Any = None,
             out_batch_stride: Any = None) -> Tensor:
    y, nstride = strided_out(out, out_batch_stride, (geo.N, geo.K, geo.OH, geo.OW), dtype, dev)
    run(forward_plan(dev, prec, geo, x, w, b, y, act=act, out_nstride=nstride))
    return y


def _input_grad(dev: Device, prec: str, geo: ConvGeometry, dy: Tensor, w: Tensor, b: Tensor | None,
                dtype: np.dtype) -> Tensor:
    dx = out_like((geo.N, geo.C, geo.H, geo.W), dtype, dev)
    run(input_grad_plan(dev, prec, geo, dy, w, b, dx))
    return dx


def _weight_grad(dev: Device, prec: str, geo: ConvGeometry, dy: Tensor, x: Tensor,
                 dtype: np.dtype) -> Tensor:
    dw = out_like((geo.K, geo.Cg, geo.KH, geo.KW), dtype, dev)
    run(weight_grad_plan(dev, prec, geo, dy, x, dw))
    return dw


def _bias_grad(dev: Device, dy: Tensor) -> Tensor:
    db = out_like((dy.shape[1],), dy.dtype, dev)
    run(bias_grad_plan(dev, dy, db))
    return db


# ---- public ops ---------------------------------------------------------------------------------

def _batched(x: Any, nd: int, *others: Any) -> tuple[Any, bool]:
    """torch's unbatched inputs ((C, H, W) for 2-D ops, (C, L) for 1-D): x with a batch of one
    added, and whether it was added (the result then drops it)."""
    if (x.ndim if isinstance(x, Tensor) else np.ndim(x)) != nd - 1:
        return x, False
    t = as_tensor(x, pick_device(x, *others), "input")
    return t.reshape((1,) + t.shape), True


def _unbatched(t: Any, unb: bool) -> Any:
    return t.reshape(t.shape[1:]) if unb and t is not None else t


def _as_2d(t: Tensor) -> Tensor:
    """A 1-D op's (N, C, L) tensor as the 2-D kernels' (N, C, 1, L)."""
    return t.reshape(t.shape[0], t.shape[1], 1, t.shape[2])


def _as_1d(t: Tensor) -> Tensor:
    """The 2-D kernels' (N, C, 1, L) result as a 1-D op's (N, C, L)."""
    return t.reshape(t.shape[0], t.shape[1], t.shape[3])


def conv2d(input: TensorLike, weight: TensorLike, bias: TensorLike | None = None, stride: Any = 1,
           padding: Padding = 0,
           dilation: Any = 1, groups: int = 1, accumulate: str | None = None, activation: Any = None,
           out: Tensor | None = None, out_batch_stride: int | None = None) -> Tensor:
    """2-D convolution (cross-correlation, as torch.nn.functional.conv2d), NCHW.

        y[n, k, oh, ow] = b[k] + sum_{c < C/G, r < KH, s < KW}
                          x[n, g*C/G + c, oh*sh - pt + r*dh, ow*sw - pl + s*dw] * w[k, c, r, s]

    with g = k // (K/G) and x zero outside the image. x (N, C, H, W), w (K, C/groups, KH, KW),
    b (K,) or None; float32 or float16 (all the same dtype). stride, dilation: int or pair.
    padding: int, (ph, pw), explicit (top, bottom, left, right), "valid" (none) or "same"
    (OH = ceil(H / sh): total padding max((OH-1)*sh + dh*(KH-1) + 1 - H, 0), with the odd extra row
    or column at the bottom/right as TensorFlow and MPS do). Output size
    OH = (H + pt + pb - dh*(KH-1) - 1) // sh + 1. groups = C = K/m is a depthwise conv.
    accumulate: None/"float", or "half" (float16 only: fp16 accumulation).
    activation: None, "relu", "leaky_relu", "sigmoid", "tanh" or (name, params), e.g.
    ("leaky_relu", {"negative_slope": 0.2}): y = act(conv + b) in the same kernel (one dispatch;
    see pymetalnn.ops.neuron.activation_code). Its gradient: conv2d_backward(..., activation=,
    y=) or neuron.activation_backward_from_output(grad_out, y, activation) then conv2d_backward.
    out=: write y there instead of a new tensor, `out_batch_stride` elements between images
    (None: contiguous), e.g. a BufferView-backed tensor at channel c0 of a larger (N, K', OH, OW)
    tensor with out_batch_stride = K' * OH * OW (a channel slice of a concatenation: the graph's
    concat elimination); the elements between the images are left untouched. The returned tensor
    is out's buffer with shape (N, K, OH, OW) (its images are out_batch_stride apart).
    """
    x, w, b = input, weight, bias
    x, unb = _batched(x, 4, w, b)
    act = activation_code(activation)
    dev, x, w, b, geo, prec = _conv_args(x, w, b, stride, padding, dilation, groups, accumulate)
    return _unbatched(_forward(dev, prec, geo, x, w, b, x.dtype, act, out, out_batch_stride), unb)


def conv2d_backward(grad_out: TensorLike, input: TensorLike, weight: TensorLike,
                    bias: TensorLike | None = None, stride: Any = 1,
                    padding: Padding = 0, dilation: Any = 1, groups: int = 1,
                    accumulate: str | None = None, activation: Any = None, y: TensorLike | None = None
                    ) -> tuple[Tensor, Tensor, Tensor | None]:
    """Gradients of conv2d: (dL/dx, dL/dw, dL/db or None when b is None), given dL/dy.

        dx[n, c, h, w]  = sum_{k in c's group, r, s: h = oh*sh - pt + r*dh, w = ow*sw - pl + s*dw}
                          dy[n, k, oh, ow] * w[k, c', r, s]
        dw[k, c', r, s] = sum_{n, oh, ow} dy[n, k, oh, ow] * x[n, c, oh*sh - pt + r*dh, ow*sw - pl + s*dw]
        db[k]           = sum_{n, oh, ow} dy[n, k, oh, ow]

    Each is its own kernel (dw and db as split reductions over n, oh, ow: any batch size).
    activation (with y, the output of conv2d(..., activation=)): grad_out is first taken through
    the activation from y (neuron.activation_backward_from_output, one element-wise kernel).
    """
    x, w, b = input, weight, bias
    x, unb = _batched(x, 4, w, b)
    if unb:
        grad_out, _ = _batched(grad_out, 4, x)
        y = _batched(y, 4, x)[0] if y is not None else None
    if activation is not None:
        if y is None:
            raise ValueError("y: activation= needs y, the output of the fused conv2d")
        grad_out = activation_backward_from_output(grad_out, y, activation)
    dev, x, w, b, geo, prec = _conv_args(x, w, b, stride, padding, dilation, groups, accumulate)
    gy = _grad_arg(grad_out, dev, x, (geo.N, geo.K, geo.OH, geo.OW))
    gx = _input_grad(dev, prec, geo, gy, w, None, x.dtype)
    gw = _weight_grad(dev, prec, geo, gy, x, x.dtype)
    gb = _bias_grad(dev, gy) if b is not None else None
    return _unbatched(gx, unb), gw, gb


def conv2d_weight_grad(grad_out: TensorLike, x: TensorLike, w: TensorLike,
                       b: TensorLike | None = None, stride: Any = 1, padding: Padding = 0,
                       dilation: Any = 1, groups: int = 1, accumulate: str | None = None
                       ) -> tuple[Tensor, Tensor | None]:
    """(dL/dw, dL/db or None when b is None) of conv2d: conv2d_backward without the input
    gradient (dw, db as there), for a layer whose input gradient nothing reads (a network's first
    convolution; the graph's dead-node pass)."""
    dev, x, w, b, geo, prec = _conv_args(x, w, b, stride, padding, dilation, groups, accumulate)
    gy = _grad_arg(grad_out, dev, x, (geo.N, geo.K, geo.OH, geo.OW))
    gw = _weight_grad(dev, prec, geo, gy, x, x.dtype)
    return gw, (_bias_grad(dev, gy) if b is not None else None)


def _conv1d_args(x: TensorLike, w: TensorLike, stride: Any, padding: Padding, dilation: Any,
                 dev: Device) -> tuple[Tensor, Tensor, tuple, Padding, tuple]:
    x = tensor_arg(x, dev, "x", FLOATS, 3)
    w = tensor_arg(w, dev, "w", FLOATS, 3)
    st = positive_ints(stride, 1, "stride")
    dil = positive_ints(dilation, 1, "dilation")
    if isinstance(padding, str):
        pad2: Padding = padding
    elif isinstance(padding, (int, np.integer)):
        pad2 = (0, 0, int(padding), int(padding))
    else:
        vals = _padding_values(padding, "an int, (left, right) or 'same'/'valid'")
        if len(vals) == 1:
            vals = vals * 2
        if len(vals) != 2:
            raise ValueError(f"padding: expected an int, (left, right) or 'same'/'valid', got "
                             f"{padding!r}")
        pad2 = (0, 0, *vals)
    return _as_2d(x), _as_2d(w), (1, st[0]), pad2, (1, dil[0])


def conv1d(input: TensorLike, weight: TensorLike, bias: TensorLike | None = None, stride: Any = 1,
           padding: Padding = 0,
           dilation: Any = 1, groups: int = 1, accumulate: str | None = None) -> Tensor:
    """1-D convolution, x (N, C, L), w (K, C/groups, KL) -> (N, K, OL):

        y[n, k, o] = b[k] + sum_{c, s} x[n, g*C/G + c, o*stride - pl + s*dilation] * w[k, c, s]

    padding: int, (left, right), "valid" or "same" (extra on the right). The conv2d kernels with H = 1.
    """
    x, w, b = input, weight, bias
    x, unb = _batched(x, 3, w, b)
    dev = pick_device(x, w, b)
    x4, w4, st, pad, dil = _conv1d_args(x, w, stride, padding, dilation, dev)
    return _unbatched(_as_1d(conv2d(x4, w4, b, st, pad, dil, groups, accumulate)), unb)


def conv1d_backward(grad_out: TensorLike, input: TensorLike, weight: TensorLike,
                    bias: TensorLike | None = None, stride: Any = 1,
                    padding: Padding = 0, dilation: Any = 1, groups: int = 1,
                    accumulate: str | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Gradients of conv1d: (dL/dx, dL/dw, dL/db or None), the conv2d_backward kernels with H = 1."""
    x, w, b = input, weight, bias
    x, unb = _batched(x, 3, w, b)
    if unb:
        grad_out, _ = _batched(grad_out, 3, x)
    dev = pick_device(grad_out, x, w, b)
    x4, w4, st, pad, dil = _conv1d_args(x, w, stride, padding, dilation, dev)
    gy = tensor_arg(grad_out, dev, "grad_out", FLOATS, 3)
    gx, gw, gb = conv2d_backward(_as_2d(gy), x4, w4, b, st, pad, dil, groups, accumulate)
    return _unbatched(_as_1d(gx), unb), _as_1d(gw), gb


# the transposed convolutions run these kernels too (their module imports this one's helpers)
from .conv_transpose import (  # noqa: E402, F401, I001
    conv_transpose1d, conv_transpose1d_backward, conv_transpose2d, conv_transpose2d_backward,
)
