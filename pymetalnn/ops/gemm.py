"""GEMM and the fully-connected layer (kernels/gemm.metal).

Design note: everything is one kernel family, `gemm` below:

    out = alpha * op(a) @ op(b) + beta * out (+ bias[n]),   op(x) = x or x^T,

over 2-D operands or batches of them (a 2-D operand is shared by every batch entry, stride 0);
a 2-D `out` with batched operands receives the sum over the batch (how weight gradients
accumulate over batch entries or time steps). `matmul`, `linear` and their backward passes are
thin layers that pick the transposes. The host picks the tile shape and a split of K from a small
cost model (`plan`); callers (tests, the dev benchmark) can override both.

Precision (`accumulate=`): float32 tensors accumulate in float (`_float` kernels); float16 tensors
accumulate in float (`_half`, the default) or, with accumulate="half", in half (`_hacc_half`, as
MPS's fp16 accumulation); float32 with accumulate="half" is an error.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..params import CONST, GemmParams, LinearBiasGradParams
from ..runtime import Device
from ..runtime.backend_cpu import vector_bits
from ..tensor import Tensor, TensorLike, float16, float32, tensor
from ._common import (
    fits_threadgroup_memory,
    kernel,
    matrix_capable,
    matrix_hw,
    mma_gen,
    number,
    out_like,
    pick_device,
    scratch,
    tensor_arg,
    vec4_aligned,
)
from .copy import transpose_launch
from .neuron import activation_backward_from_output, activation_code

SOURCE = "gemm.metal"
THREADS = CONST["GEMM_THREADS"]  # every kernel of gemm.metal

# GemmParams.flags (kernels/params.h GEMM_*)
TRANS_A, TRANS_B, VEC_A, VEC_B, VEC_C, BIAS, BETA, VEC8_A, VEC8_B, TRANS_C = (
    CONST[f"GEMM_{f}"] for f in ("TRANS_A", "TRANS_B", "VEC_A", "VEC_B", "VEC_C", "BIAS", "BETA",
                                 "VEC8_A", "VEC8_B", "TRANS_C"))

_MAX_MATRIX = 2**31  # elements per matrix: in-matrix offsets are 32-bit in the kernels
_MAX_THREADS = 2**32 - 1024


@dataclass(frozen=True)
class Tile:
    """One instantiated tile shape of gemm_tiled: BM x BN outputs per threadgroup, BK-deep
    slices; `efficiency` is its FMA rate relative to 128x128 (fewer FMAs per shared load) and
    `fixed_k` a per-threadgroup cost in K terms (a deeper prefetch's prologue / epilogue), so that
    a threadgroup covering kspan terms of K costs BM * BN * (kspan + fixed_k) / efficiency.
    Kernels gemm_fwd_<name>[_splitk]_<variant> and gemm_fwd_splitk_sum_<variant> of `source`
    (benchmarks/dev_gemm.py points it at candidate kernel files)."""

    name: str
    bm: int
    bn: int
    bk: int
    efficiency: float
    source: str = SOURCE
    variants: tuple[str, ...] | None = None  # instantiated only for these (None: all)
    fixed_k: int = 0
    matrix: bool = False  # runs on simdgroup matrices (gemm_mma): only where matrix_hw(dev)
    gen: int = 1  # matrix tiles: 1 gemm_mma (8x8 products), 2 gemm_mma2 (16-deep tile products)
    hacc_efficiency: float | None = None  # hacc_half's, where it differs (fewer registers)
    cpu: bool = False  # gemm_blocked: the automatic choice on the cpu backend (only there)
    block: tuple[int, int] = (0, 0)  # gemm_blocked: a thread's TM x TN block of C
    wide: bool = False  # gemm_blocked: for hosts with 512-bit vectors (else for narrower ones)

    def supports(self, variant: str) -> bool:
        return self.variants is None or variant in self.variants

    def efficiency_of(self, variant: str) -> float:
        if variant == "hacc_half" and self.hacc_efficiency is not None:
            return self.hacc_efficiency
        return self.efficiency


# 128x128k16 (BK = 16: half the slices' loop / barrier overhead) from the H200 sweep of
# benchmarks/dev_gemm.py (2026-11-26, docs/results/h200-2026-11-26/dev_gemm.log), float,
# 128x128k16 vs 128x128 TFLOP/s: forward 256x4096x4096 at k_splits 4 33.6 vs 31.2, grad_x 34.2 vs
# 32.1, but grad_w (K = 256, unsplit) 31.7 vs 32.6. Those three fit efficiency 1.11 with a fixed
# cost of 38 K terms, so long K spans take it and short ones keep 128x128. fp16 storage with
# float accumulation (half) measured no gain (forward 27.4 vs 28.6), so it is not instantiated
# there; hacc_half gains 1-4%.
# The mma tiles (gemm_mma, fp16 on simdgroup matrices / tensor cores) weigh several times the
# SIMD-FMA tiles, so fp16 calls take them wherever the device has them. Among them, small tiles
# first: on an H100 the 128x128 tile (208 registers, one threadgroup per SM) stalls on its global
# loads (ncu, 2026-12-06: 28% issue-slot use, 24 TFLOP/s at 4096^3), and more resident
# threadgroups hide that latency (benchmarks/dev_gemm_mma.py sweeps them).
_HALF = ("half", "hacc_half")
# The cpu backend runs gemm_blocked (per-thread register blocks read straight from memory, no
# threadgroup tiles or barriers: a thread's rank-1 updates vectorize) for float32: CPU time per
# core 256^3 5.4 -> 0.9 ms, 32x512x512 4.7 -> 0.5 ms against gemm_tiled as work-item loops (2-core
# Xeon, 2026-12-06); and for fp16 storage with float accumulation (half) since the cpu prelude's
# half -> float conversion is branch-free and vectorizes in its row updates: 256^3 0.75-1.2 ms
# against 3.5-8.7 ms for the tiled kernel (same box, 2026-12-07; with scalar conversions the
# blocked kernel had been 3x slower than the tiled one); and for half accumulation (hacc_half),
# whose per-term half FMA is a native instruction where the host has AVX512-FP16: 256^3 2.3 ms
# against 132-148 ms tiled (built without host tuning, PYMETALNN_CPU_NATIVE=0: 167 against
# 193 ms).
_CPU = ("float", "half", "hacc_half")
# Which generation of matrix tiles the automatic choice (plan) considers; the others stay callable
# by name (tile=) and swept by benchmarks/dev_gemm_mma.py. 2: gemm_mma2 (16-deep tile products,
# simdgroup_tile.h: full-rate mma.sync.m16n8k16 and ldmatrix on cuda); 1: gemm_mma (8x8 products).
# H100, 2026-12-06 22:45 UTC (dev_gemm_mma.py, fp16 8192^3): gemm_mma2 93.5 TFLOP/s with float
# accumulation (128x128k16), 125 with half accumulation (128x128k32); gemm_mma 48 at best.
# Default 2 since the merged generation 2 ran the cuda suite and compute-sanitizer (H100,
# 2026-12-07; ops/conv.py's MMA_GEN note). PYMETALNN_MMA_GEN=1 keeps generation 1.
MMA_GEN = mma_gen(2)
TILES = {t.name: t for t in (Tile("128x128", 128, 128, 8, 1.0), Tile("64x64", 64, 64, 16, 0.6),
                             Tile("128x128k16", 128, 128, 16, 1.11, variants=("float", "hacc_half"),
                                  fixed_k=38),
                             Tile("mma128x128", 128, 128, 16, 3.0, variants=_HALF, matrix=True),
                             Tile("mma64x64", 64, 64, 16, 3.4, variants=_HALF, matrix=True),
                             Tile("mma64x64k32", 64, 64, 32, 4.0, variants=_HALF, matrix=True),
                             Tile("mma128x64", 128, 64, 32, 3.6, variants=_HALF, matrix=True),
                             # gemm_mma2. Efficiencies: TFLOP/s / 32 (the fp32 128x128 rate), mean of
                             # 4096^3 and 8192^3 on an H100 (2026-12-07, the merged generation 2,
                             # docs/results/h100-2026-12-07/dev_gemm_mma_conv.log): float
                             # accumulation, then half accumulation (hacc_efficiency). p2: two
                             # slices of loads in flight; v8: 16-byte loads. Leaders: 128x128k16v8
                             # (float, 94-99 TFLOP/s), 128x128k32 (half, 125-138 TFLOP/s).
                             *(Tile("mma2_" + name, bm, bn, bk, eff, variants=_HALF, matrix=True,
                                    gen=2, hacc_efficiency=heff)
                               for name, bm, bn, bk, eff, heff in (
                                   ("128x128k16", 128, 128, 16, 2.82, 3.10),
                                   ("128x128k32", 128, 128, 32, 2.27, 4.11),
                                   ("64x64k32", 64, 64, 32, 1.64, 2.69),
                                   ("128x64k32", 128, 64, 32, 2.29, 2.36),
                                   ("128x256k16w2", 128, 256, 16, 2.57, 2.64),
                                   ("128x128k16p2", 128, 128, 16, 1.65, 2.92),
                                   ("128x128k32p2", 128, 128, 32, 2.31, 2.33),
                                   ("128x256k16w2p2", 128, 256, 16, 2.61, 2.61),
                                   ("64x64k32p2", 64, 64, 32, 1.53, 2.05),
                                   ("128x128k16v8", 128, 128, 16, 3.02, 3.41),
                                   ("128x256k16w2v8", 128, 256, 16, 2.64, 2.75),
                                   ("128x128k32p2v8", 128, 128, 32, 2.49, 2.55),
                                   ("128x64k32p2v8", 128, 64, 32, 2.27, 2.57),
                                   ("64x128k32w2p2v8", 64, 128, 32, 2.42, 2.68))),
                             # gemm_blocked (GEMM_CPU_INST): 8 x 32 blocks where the host
                             # has 512-bit vectors, 6 x 16 elsewhere (gemm.metal says why)
                             *(Tile(name, bm, bn, 16, 1.0, variants=_CPU, cpu=True, block=blk,
                                    wide=blk == (8, 32))
                               for name, bm, bn, blk in (
                                   ("cpu512x128", 512, 128, (8, 32)),
                                   ("cpu128x512", 128, 512, (8, 32)),
                                   ("cpu384x64", 384, 64, (6, 16)),
                                   ("cpu96x256", 96, 256, (6, 16)))))}
MAX_SPLITS = 16
NT_TRANSPOSE_WORK = 1 << 18  # FMAs from which the blocked tiles transpose a K-contiguous operand
MIN_SPLIT_SLICES = 16  # a split-K part covers at least this many BK slices


def variant(dtype: np.dtype, accumulate: str | None) -> str:
    """Kernel suffix for the storage dtype and the accumulate= choice (see module docstring)."""
    if accumulate not in (None, "float", "half"):
        raise ValueError(f"accumulate: expected None, 'float' or 'half', got {accumulate!r}")
    if dtype == float32:
        if accumulate == "half":
            raise ValueError("accumulate: 'half' needs float16 tensors (got float32)")
        return "float"
    return "hacc_half" if accumulate == "half" else "half"


def _compute_units(dev: Device) -> int:
    """Threadgroups that run at once (two 256-thread groups per SM on cuda)."""
    if dev.name == "cuda":
        return 2 * int(dev.props.get("multiProcessorCount", 1))
    if dev.name == "cpu":
        return max(1, int(getattr(dev, "num_workers", 1)))
    return 16


def tile_fits(dev: Device, t: Tile, var: str) -> bool:
    """Whether `t`'s kernels for `var` fit `dev`'s threadgroup memory (Apple GPUs: 32 KiB, which
    some tiles tuned on NVIDIA exceed)."""
    if getattr(dev, "max_threadgroup_memory", None) is None:
        return True
    names = [f"gemm_fwd_{t.name}_{var}"] + ([f"gemm_fwd_{t.name}_splitk_half"] if var == "half"
                                            else [])
    return all(fits_threadgroup_memory(dev, kernel(dev, t.source, n)) for n in names)


def plan(dev: Device, m: int, n: int, k: int, batch: int, reduce_batch: bool,
         tile: str | Tile | None = None, k_splits: int | None = None, var: str = "float"
         ) -> tuple[Tile, int]:
    """(tile, k_splits) for one call. Cost, in FMAs along the critical path of one compute
    unit: waves * work per threadgroup / tile efficiency, plus for split-K the partial sums'
    memory traffic (~1/4 FMA per element on current GPUs) and a launch. A split is considered
    only while the tiles alone leave compute units idle."""
    units = _compute_units(dev)
    nb = 1 if reduce_batch else batch
    if tile is None:
        hw = matrix_hw(dev)
        cands = [t for t in TILES.values() if t.supports(var)
                 and (not t.matrix or (hw and t.gen == MMA_GEN))
                 and tile_fits(dev, t, var)]
        # the cpu backend: blocked tiles (or simdgroup-matrix ones where a device reports them)
        if dev.name == "cpu" and any(t.cpu for t in cands):
            wide = vector_bits() >= 512
            cands = [t for t in cands if (t.cpu and t.wide == wide) or t.matrix]
        else:
            cands = [t for t in cands if not t.cpu]
    else:
        cands = [tile if isinstance(tile, Tile) else TILES[tile]]
    best: tuple[float, Tile, int] | None = None
    for t in cands:
        tiles = math.ceil(m / t.bm) * math.ceil(n / t.bn) * nb
        slices = math.ceil(k / t.bk) * (batch if reduce_batch else 1)
        if k_splits is not None:
            splits = [k_splits]
        else:
            most = max(1, min(MAX_SPLITS, units // tiles, slices // MIN_SPLIT_SLICES))
            splits = list(range(1, most + 1))
        for s in splits:
            waves = math.ceil(tiles * s / units)
            # gemm_blocked's threads past M or N return at once: a tile costs what it covers
            area = min(t.bm, m) * min(t.bn, n) if t.cpu else t.bm * t.bn
            cost = waves * area * (t.bk * math.ceil(slices / s) + t.fixed_k) / t.efficiency_of(var)
            if s > 1:
                cost += 0.25 * (s + 2) * m * n * nb + 2**19
            if best is None or cost < best[0]:
                best = (cost, t, s)
    assert best is not None
    return best[1], best[2]


def _cpu_transposed(t: Tile, m: int, n: int) -> bool:
    """Whether gemm_blocked runs C (m x n) as C^T = op(B)^T op(A)^T (GEMM_TRANS_C). A thread
    does the FMAs of its whole TM x TN block (t.block) however little of it lies inside C, so a
    narrow C wastes most of them (ResNet-18 at batch 2: N = 4 for the 2x2-plane convs, 8x the
    useful work); transposed, C's long side runs along the vectorized columns. Taken where it
    at least halves the padded work; each output still sums its K terms in order with fma, so
    the result is the same bits either way."""
    def padded(r: int, c: int) -> int:
        tm, tn = t.block
        return math.ceil(r / tm) * tm * math.ceil(c / tn) * tn
    return 2 * padded(n, m) <= padded(m, n)


def _span(t: Tensor) -> tuple[int, int, int]:
    """(base buffer id, first byte, end byte) of a tensor's memory."""
    return id(t.buffer.base.handle), t.buffer.offset, t.buffer.offset + t.nbytes


def _overlaps(x: Tensor, y: Tensor) -> bool:
    bx, x0, x1 = _span(x)
    by, y0, y1 = _span(y)
    return bx == by and x0 < y1 and y0 < x1


def _vec_ok(t: Tensor, pitch: int, stride: int) -> bool:
    """Aligned 4-vector access is legal: row pitch, batch stride and base are multiples of 4
    elements."""
    return pitch % 4 == 0 and stride % 4 == 0 and vec4_aligned(t)


def _vec8_ok(t: Tensor, pitch: int, stride: int) -> bool:
    """Aligned 8-vector (16-byte fp16) access is legal: row pitch, batch stride and base are
    multiples of 8 elements."""
    return pitch % 8 == 0 and stride % 8 == 0 and t.buffer.offset % (8 * t.dtype.itemsize) == 0


def _float(v: Any, name: str) -> float:
    f = number(v, name)
    if not math.isfinite(f):
        raise ValueError(f"{name}: must be finite, got {v!r}")
    return f


def gemm(a: TensorLike, b: TensorLike, out: Tensor, *, transpose_a: bool = False,
         transpose_b: bool = False, alpha: float = 1.0, beta: float = 0.0,
         bias: TensorLike | None = None, accumulate: str | None = None,
         tile: str | Tile | None = None, k_splits: int | None = None, activation: Any = None
         ) -> Tensor:
    """out = alpha * op(a) @ op(b) + beta * out (+ bias), in place; returns `out`.

    op(a) is (M, K) -- a stored (M, K), or (K, M) with transpose_a -- and op(b) is (K, N) -- b
    stored (K, N), or (N, K) with transpose_b. Either operand may carry a leading batch
    dimension; a 2-D operand is used for every batch entry. `out` is (batch, M, N), or (M, N):
    then with batched operands it receives the sum over the batch,
    out = alpha * sum_i op(a_i) @ op(b_i) + beta * out. bias (N,) is added to every row.
    beta == 0 never reads `out` (NaNs there do not propagate). `tile` / `k_splits` override the
    kernel choice (a name in TILES or a Tile; k_splits >= 1). activation (None, "relu",
    "leaky_relu", "sigmoid", "tanh" or (name, params); neuron.activation_code) is applied to the
    whole result in the same kernel's epilogue: out = act(alpha op(a) op(b) + beta out + bias).
    """
    act = activation_code(activation)
    dev = pick_device(a, b, out)
    if not isinstance(out, Tensor):
        raise ValueError(f"out: expected a Tensor to write into, got {type(out).__name__}")
    a = tensor_arg(a, dev, "a", (float32, float16), ndim=(2, 3))
    b = tensor_arg(b, dev, "b", (float32, float16), ndim=(2, 3))
    out = tensor_arg(out, dev, "out", (float32, float16), ndim=(2, 3))
    if b.dtype != a.dtype:
        raise ValueError(f"b: dtype {b.dtype} does not match a's {a.dtype}")
    if out.dtype != a.dtype:
        raise ValueError(f"out: dtype {out.dtype} does not match a's {a.dtype}")
    var = variant(a.dtype, accumulate)
    alpha, beta = _float(alpha, "alpha"), _float(beta, "beta")
    if tile is not None and not isinstance(tile, Tile) and tile not in TILES:
        raise ValueError(f"tile: expected one of {', '.join(TILES)}, got {tile!r}")
    if tile is not None and not (tile if isinstance(tile, Tile) else TILES[tile]).supports(var):
        raise ValueError(f"tile: {tile!r} is not instantiated for the {var} variant")
    if tile is not None and (tile if isinstance(tile, Tile) else TILES[tile]).matrix \
            and not matrix_capable(dev):
        raise ValueError(f"tile: {tile!r} needs simdgroup matrices, which this {dev.name} device "
                         "lacks")
    if tile is not None and not tile_fits(dev, tile if isinstance(tile, Tile) else TILES[tile], var):
        raise ValueError(f"tile: {tile!r} ({var}) needs more threadgroup memory than this "
                         f"{dev.name} device has ({dev.max_threadgroup_memory} bytes)")
    if k_splits is not None and (not isinstance(k_splits, (int, np.integer)) or k_splits < 1):
        raise ValueError(f"k_splits: expected an int >= 1, got {k_splits!r}")

    ar, ac = a.shape[-2:]
    br, bc = b.shape[-2:]
    m, k = (ac, ar) if transpose_a else (ar, ac)
    k2, n = (bc, br) if transpose_b else (br, bc)
    if k2 != k:
        raise ValueError(f"b: op(b) is ({k2}, {n}) but op(a) is ({m}, {k}): inner dimensions "
                         f"differ (transpose_a={transpose_a}, transpose_b={transpose_b})")
    ba = a.shape[0] if a.ndim == 3 else None
    bb = b.shape[0] if b.ndim == 3 else None
    if ba is not None and bb is not None and ba != bb:
        raise ValueError(f"b: batch {bb} does not match a's batch {ba}")
    batch = ba if ba is not None else bb if bb is not None else 1
    if out.ndim == 3:
        if out.shape != (batch, m, n):
            raise ValueError(f"out: shape {out.shape}, expected {(batch, m, n)}")
        reduce_batch = False
    else:
        if out.shape != (m, n):
            raise ValueError(f"out: shape {out.shape}, expected {(m, n)}")
        reduce_batch = batch > 1
    if bias is not None:
        bias = tensor_arg(bias, dev, "bias", (float32, float16), ndim=1)
        if bias.dtype != a.dtype:
            raise ValueError(f"bias: dtype {bias.dtype} does not match a's {a.dtype}")
        if bias.shape != (n,):
            raise ValueError(f"bias: shape {bias.shape}, expected ({n},)")
    for name, t in (("a", a), ("b", b), ("bias", bias)):
        if t is not None and _overlaps(out, t):
            raise ValueError(f"out: overlaps {name} (the product cannot be computed in place)")
    for name, t in (("a", a), ("b", b), ("out", out)):
        if t.shape[-1] * t.shape[-2] >= _MAX_MATRIX:
            raise ValueError(f"{name}: a {t.shape[-2]} x {t.shape[-1]} matrix exceeds 2^31 "
                             "elements")

    if out.size == 0:
        return out
    if k == 0 or batch == 0:
        # an empty sum (torch gives zeros): the kernels run one zero term (K = 1, one batch entry
        # per output matrix), so beta, bias and the activation apply as for any product
        lead = (out.shape[0],) if out.ndim == 3 else ()
        a = tensor(np.zeros(lead + ((1, m) if transpose_a else (m, 1)), a.dtype), dev)
        b = tensor(np.zeros(lead + ((n, 1) if transpose_b else (1, n)), a.dtype), dev)
        k, batch, reduce_batch, tile, k_splits = 1, max(1, len(lead) and lead[0]), False, None, None
    for kern, count, args in _launches(dev, a, b, out, m, n, k, batch, reduce_batch, transpose_a,
                                       transpose_b, alpha, beta, bias, var, tile, k_splits, act):
        kern(count, *args)
    return out


def gemm_launches(a: Tensor, b: Tensor, out: Tensor, *, transpose_a: bool = False,
                  transpose_b: bool = False, min_k_splits: int = 1) -> list[tuple]:
    """The launches (kernel, threads, args) of gemm(a, b, out, ...) for callers that build a
    plan once and run it later (the Winograd convolution): 3-D a, b, out of one device and dtype
    (float32 or float16 with float accumulation), shapes as gemm's, checked only by assertion.
    min_k_splits: split K at least this often (at most MAX_SPLITS), whatever the cost model
    prefers: each float partial sum then covers at most K / min_k_splits terms, which bounds the
    rounding error of long reductions the same way on every device."""
    m, k = (a.shape[-1], a.shape[-2]) if transpose_a else (a.shape[-2], a.shape[-1])
    n = b.shape[-2] if transpose_b else b.shape[-1]
    batch = a.shape[0] if a.ndim == 3 else b.shape[0]
    reduce_batch = out.ndim == 2 and batch > 1
    assert (b.shape[-1] if transpose_b else b.shape[-2]) == k and out.shape[-2:] == (m, n)
    var = variant(a.dtype, None)
    splits = None
    if min_k_splits > 1:
        tile, splits = plan(a.device, m, n, k, batch, reduce_batch, None, None, var)
        splits = max(splits, min(min_k_splits, MAX_SPLITS, math.ceil(k / tile.bk)))
    return _launches(a.device, a, b, out, m, n, k, batch, reduce_batch, transpose_a, transpose_b,
                     1.0, 0.0, None, var, None, splits, (0, 0.0))


def _launches(dev: Device, a: Tensor, b: Tensor, out: Tensor, m: int, n: int, k: int, batch: int,
              reduce_batch: bool, transpose_a: bool, transpose_b: bool, alpha: float, beta: float,
              bias: Tensor | None, var: str, tile: Any, k_splits: int | None,
              act: tuple[int, float]) -> list[tuple]:
    t, splits = plan(dev, m, n, k, batch, reduce_batch, tile, k_splits, var)
    ldc = n
    # Both operands stored K-contiguous (op(B) stored N x K: x w^T, the linear forward) on the
    # blocked tiles: each thread would copy its TN columns of B run by run per BK slice, every
    # thread row of the grid the same ones again (64 x 256 x 3136 on the 2-core EPYC: 45 GFLOP/s
    # against 150-188 for the layouts read in place). One operand is transposed into the scratch
    # first, the smaller: B (K x N) for C = A B, or A (K x M) for C^T = B A^T (GEMM_TRANS_C,
    # below), both then read in place (same box: 2.2-2.9 -> 0.83 ms there, linear 512 -> 512 at
    # batch 32 0.56-0.64 -> 0.28 ms; that B transpose alone took 0.32-0.37 ms). The layout is the
    # same after the swap, so the operand to transpose is then always B. Each output still sums
    # its K terms in order with fma: the same bits. Small products keep the copies (a launch).
    nt = t.cpu and transpose_b and not transpose_a and k >= t.bk and m * n * k >= NT_TRANSPOSE_WORK
    tc = t.cpu and (_cpu_transposed(t, m, n) or (nt and a.size <= b.size))
    if tc:
        a, b, m, n = b, a, n, m
        transpose_a, transpose_b = not transpose_b, not transpose_a
        if tile is None:  # the blocked tile that suits the transposed shape (TRANS_C is theirs)
            t2, s2 = plan(dev, m, n, k, batch, reduce_batch, None, k_splits, var)
            t, splits = (t2, s2) if t2.cpu else (t, splits)
    pre: list[tuple] = []
    if nt or splits > 1:  # the scratch only where it is used (a lookup costs ~3.5 us per call)
        nb_work = (1 if reduce_batch else batch) if splits > 1 else 0
        bt_buf, work = scratch(dev, [b.size * b.dtype.itemsize if nt else 0,
                                     splits * nb_work * m * n * (2 if var == "hacc_half" else 4)],
                               "gemm")
    if nt:
        br, bc = b.shape[-2:]
        pre.append(transpose_launch(dev, b.buffer, bt_buf, b.shape[0] if b.ndim == 3 else 1, br,
                                    bc, b.dtype))
        b = Tensor(bt_buf, (*b.shape[:-2], bc, br), b.dtype)
        transpose_b = False
    ar, ac = a.shape[-2:]
    br, bc = b.shape[-2:]
    p = GemmParams()
    p.M, p.N, p.K = m, n, k
    p.lda, p.ldb, p.ldc = ac, bc, ldc
    p.batch = batch
    p.stride_a = ar * ac if a.ndim == 3 else 0
    p.stride_b = br * bc if b.ndim == 3 else 0
    p.stride_c = m * n if out.ndim == 3 else 0
    p.reduce_batch = int(reduce_batch)
    p.k_splits = splits
    p.tiles_m, p.tiles_n = math.ceil(m / t.bm), math.ceil(n / t.bn)
    p.flags = ((TRANS_A if transpose_a else 0) | (TRANS_B if transpose_b else 0)
               | (VEC_A if _vec_ok(a, p.lda, p.stride_a) else 0)
               | (VEC_B if _vec_ok(b, p.ldb, p.stride_b) else 0)
               | (TRANS_C if tc else VEC_C if _vec_ok(out, p.ldc, p.stride_c) else 0)
               | (VEC8_A if _vec8_ok(a, p.lda, p.stride_a) else 0)
               | (VEC8_B if _vec8_ok(b, p.ldb, p.stride_b) else 0)
               | (BIAS if bias is not None else 0) | (BETA if beta != 0.0 else 0))
    p.alpha, p.beta = alpha, beta
    p.act, p.act_alpha = act
    nb = 1 if reduce_batch else batch
    groups = p.tiles_m * p.tiles_n * nb * splits
    if groups * THREADS > _MAX_THREADS or nb * m * n > _MAX_THREADS:
        raise ValueError(f"out: {nb} x {m} x {n} is too large for one launch")

    bias_buf = bias.buffer if bias is not None else out.buffer
    if splits == 1:
        return pre + [(kernel(dev, t.source, f"gemm_fwd_{t.name}_{var}"), groups * THREADS,
                       (a.buffer, b.buffer, out.buffer, bias_buf, p))]
    # split-K: the same kernel writes raw partial sums (ACC) of split s, batch entry e to the
    # workspace matrix s * nb + e; gemm_fwd_splitk_sum adds them and applies the epilogue.
    pp = GemmParams.from_buffer_copy(p)
    pp.ldc, pp.stride_c, pp.alpha, pp.beta, pp.act = n, m * n, 1.0, 0.0, 0
    pp.flags = (p.flags & ~(BIAS | BETA | VEC_C | TRANS_C)) | (VEC_C if n % 4 == 0 else 0)
    name = f"gemm_fwd_{t.name}_splitk_half" if var == "half" else f"gemm_fwd_{t.name}_{var}"
    return pre + [(kernel(dev, t.source, name), groups * THREADS,
                   (a.buffer, b.buffer, work, bias_buf, pp)),
                  (kernel(dev, t.source, f"gemm_fwd_splitk_sum_{var}"), nb * m * n,
                   (out.buffer, bias_buf, work, p))]


def _matmul3(a: Any, b: Any, transpose_a: bool = False, transpose_b: bool = False,
             accumulate: str | None = None, activation: Any = None) -> Tensor:
    """op(a) @ op(b), op(x) = x or x^T (of the last two dimensions).

    a: (M, K) or (batch, M, K) -- (K, M) / (batch, K, M) with transpose_a; b: (K, N) or
    (batch, K, N) -- (N, K) / (batch, N, K) with transpose_b. A 2-D operand is shared by every
    batch entry. Result (M, N), or (batch, M, N) if either operand is batched:
    out[i, m, n] = sum_k op(a_i)[m, k] op(b_i)[k, n]. activation: as gemm's (fused epilogue).
    """
    dev = pick_device(a, b)
    a = tensor_arg(a, dev, "a", (float32, float16), ndim=(2, 3))
    b = tensor_arg(b, dev, "b", (float32, float16), ndim=(2, 3))
    m = a.shape[-1] if transpose_a else a.shape[-2]
    n = b.shape[-2] if transpose_b else b.shape[-1]
    batch = a.shape[0] if a.ndim == 3 else b.shape[0] if b.ndim == 3 else None
    shape = (m, n) if batch is None else (batch, m, n)
    if b.dtype != a.dtype:
        raise ValueError(f"b: dtype {b.dtype} does not match a's {a.dtype}")
    variant(a.dtype, accumulate)  # validate before allocating
    out = out_like(shape, a.dtype, dev)
    return gemm(a, b, out, transpose_a=transpose_a, transpose_b=transpose_b, accumulate=accumulate,
                activation=activation)


def _matmul3_backward(grad_out: Any, a: Any, b: Any, transpose_a: bool = False,
                      transpose_b: bool = False, accumulate: str | None = None
                      ) -> tuple[Tensor, Tensor]:
    """Gradients (grad_a, grad_b) of C = op(a) @ op(b) given G = dL/dC, each shaped as its input:

    dL/dop(a) = G op(b)^T,  dL/dop(b) = op(a)^T G, transposed back where op transposes; a 2-D
    operand of a batched product gets the sum over the batch.
    """
    dev = pick_device(grad_out, a, b)
    a = tensor_arg(a, dev, "a", (float32, float16), ndim=(2, 3))
    b = tensor_arg(b, dev, "b", (float32, float16), ndim=(2, 3))
    g = tensor_arg(grad_out, dev, "grad_out", (float32, float16), ndim=(2, 3))
    if g.dtype != a.dtype:
        raise ValueError(f"grad_out: dtype {g.dtype} does not match a's {a.dtype}")
    m = a.shape[-1] if transpose_a else a.shape[-2]
    n = b.shape[-2] if transpose_b else b.shape[-1]
    batch = a.shape[0] if a.ndim == 3 else b.shape[0] if b.ndim == 3 else None
    want = (m, n) if batch is None else (batch, m, n)
    if g.shape != want:
        raise ValueError(f"grad_out: shape {g.shape}, expected {want} (the product's shape)")
    if b.dtype != a.dtype:
        raise ValueError(f"b: dtype {b.dtype} does not match a's {a.dtype}")
    ka = a.shape[-2] if transpose_a else a.shape[-1]
    kb = b.shape[-1] if transpose_b else b.shape[-2]
    if ka != kb:
        raise ValueError(f"b: inner dimension {kb} does not match a's {ka}")
    if a.ndim == 3 and b.ndim == 3 and a.shape[0] != b.shape[0]:
        raise ValueError(f"b: batch {b.shape[0]} does not match a's batch {a.shape[0]}")
    variant(a.dtype, accumulate)
    ga = out_like(a.shape, a.dtype, dev)
    gb = out_like(b.shape, b.dtype, dev)
    kw = {"accumulate": accumulate}
    if transpose_a:
        gemm(b, g, ga, transpose_a=transpose_b, transpose_b=True, **kw)
    else:
        gemm(g, b, ga, transpose_a=False, transpose_b=not transpose_b, **kw)
    if transpose_b:
        gemm(g, a, gb, transpose_a=True, transpose_b=transpose_a, **kw)
    else:
        gemm(a, g, gb, transpose_a=not transpose_a, transpose_b=False, **kw)
    return ga, gb


class _MatmulPlan:
    """torch.matmul's shape rules around the 2-/3-D kernels: a 1-D operand gains a dimension
    (dropped from the result), batch dimensions broadcast; an operand whose batch is all ones is
    shared (stride 0, 2-D), one whose batch already is the broadcast batch is flattened to 3-D,
    any other is expanded by a broadcasting add (and its gradient summed back)."""

    def __init__(self, a: Tensor, b: Tensor, ta: bool, tb: bool):
        from .arith import broadcast_shapes

        if b.dtype != a.dtype:
            raise ValueError(f"other: dtype {b.dtype} does not match input's {a.dtype}")
        if a.ndim == 0 or b.ndim == 0:
            raise ValueError(f"{'input' if a.ndim == 0 else 'other'}: matmul needs at least 1 "
                             "dimension")
        if (a.ndim == 1 and ta) or (b.ndim == 1 and tb):
            raise ValueError("transpose_a/transpose_b: a 1-D operand has nothing to transpose")
        self.a_shape, self.b_shape = a.shape, b.shape
        self.a2 = a.shape if a.ndim > 1 else (1, a.shape[0])
        self.b2 = b.shape if b.ndim > 1 else (b.shape[0], 1)
        ka = self.a2[-2] if ta else self.a2[-1]
        kb = self.b2[-1] if tb else self.b2[-2]
        if ka != kb:
            raise ValueError(f"other: inner dimension {kb} does not match input's {ka} "
                             f"(shapes {a.shape} and {b.shape})")
        try:
            self.batch = broadcast_shapes(self.a2[:-2], self.b2[:-2], "input, other")
        except ValueError:
            raise ValueError(f"other: batch dimensions {self.b2[:-2]} do not broadcast with input's "
                             f"{self.a2[:-2]}") from None
        self.m = self.a2[-1] if ta else self.a2[-2]
        self.n = self.b2[-2] if tb else self.b2[-1]
        out = self.batch + (self.m, self.n)
        if a.ndim == 1:
            out = out[:-2] + out[-1:]
        if b.ndim == 1:
            out = out[:-1]
        self.out_shape = out

    def operand(self, t: Tensor, shape2: tuple[int, ...]) -> tuple[Tensor, str]:
        """t as the kernels take it, and how: 'shared' (2-D), 'flat' (3-D) or 'expanded'."""
        from .arith import add

        mat, bat = shape2[-2:], shape2[:-2]
        nb = math.prod(self.batch)
        if math.prod(bat) == 1:
            return t.reshape(mat), "shared"
        if bat == self.batch:
            return t.reshape((nb,) + mat), "flat"
        # the zeros come from the host, not an allocation (a graph's planned buffers are unfilled)
        z = tensor(np.zeros(self.batch + mat, t.dtype), t.device)
        return add(t.reshape(shape2), z).reshape((nb,) + mat), "expanded"

    def result(self, y: Tensor) -> Tensor:
        return y.reshape(self.out_shape)

    def grad(self, g: Tensor, how: str, shape2: tuple[int, ...], orig: tuple[int, ...]) -> Tensor:
        """An operand's gradient from the kernels' back to its own shape."""
        from .arith import sum as _sum

        if how == "expanded":
            bat = (1,) * (len(self.batch) - (len(shape2) - 2)) + shape2[:-2]
            dims = tuple(i for i, (s, t) in enumerate(zip(bat, self.batch)) if s == 1 and t != 1)
            g = _sum(g.reshape(self.batch + shape2[-2:]), dims, keepdim=True)
        return g.reshape(orig)


def _gemm_shaped(a: Tensor, b: Tensor) -> bool:
    """2-D or 3-D operands whose batches gemm takes as they are (one shared, or equal)."""
    return a.ndim in (2, 3) and b.ndim in (2, 3) and (a.ndim == 2 or b.ndim == 2
                                                       or a.shape[0] == b.shape[0])


def _matmul_operands(input: Any, other: Any, grad_out: Any = None
                     ) -> tuple[Device, Tensor, Tensor]:
    """The device (grad_out's first, as the backward reads it) and matmul's two float operands."""
    dev = pick_device(grad_out, input, other)
    return (dev, tensor_arg(input, dev, "input", (float32, float16)),
            tensor_arg(other, dev, "other", (float32, float16)))


def matmul(input: TensorLike, other: TensorLike, transpose_a: bool = False, transpose_b: bool = False,
           accumulate: str | None = None, activation: Any = None) -> Tensor:
    """torch.matmul(input, other) with op(x) = x or x^T (of the last two dimensions):

        out[..., m, n] = sum_k op(input)[..., m, k] op(other)[..., k, n]

    1-D operands as torch (a vector is a row on the left, a column on the right, its dimension
    dropped from the result; 1-D @ 1-D is a 0-d dot product), leading (batch) dimensions
    broadcast. A 2-D operand (or one whose batch is all ones) is shared by every batch entry
    without a copy. activation: as gemm's (fused epilogue).
    """
    _, a, b = _matmul_operands(input, other)
    if _gemm_shaped(a, b):
        return _matmul3(a, b, transpose_a, transpose_b, accumulate, activation)
    plan = _MatmulPlan(a, b, transpose_a, transpose_b)
    a3, _ = plan.operand(a, plan.a2)
    b3, _ = plan.operand(b, plan.b2)
    y = _matmul3(a3, b3, transpose_a, transpose_b, accumulate, activation)
    return plan.result(y)


def matmul_backward(grad_out: TensorLike, input: TensorLike, other: TensorLike, transpose_a: bool = False,
                    transpose_b: bool = False, accumulate: str | None = None
                    ) -> tuple[Tensor, Tensor]:
    """Gradients (grad_input, grad_other) of C = matmul(input, other) given G = dL/dC, each
    shaped as its operand:

        dL/dop(a) = G op(b)^T,  dL/dop(b) = op(a)^T G,

    transposed back where op transposes; summed over the batch entries an operand was broadcast
    to (a shared 2-D operand of a batched product gets the sum over the batch).
    """
    dev, a, b = _matmul_operands(input, other, grad_out)
    if _gemm_shaped(a, b):
        return _matmul3_backward(grad_out, a, b, transpose_a, transpose_b, accumulate)
    plan = _MatmulPlan(a, b, transpose_a, transpose_b)
    g = tensor_arg(grad_out, dev, "grad_out", (a.dtype,))
    if g.shape != plan.out_shape:
        raise ValueError(f"grad_out: shape {g.shape}, expected {plan.out_shape} (the product's shape)")
    a3, ha = plan.operand(a, plan.a2)
    b3, hb = plan.operand(b, plan.b2)
    nb = math.prod(plan.batch)
    g3 = g.reshape(((nb,) if (ha != "shared" or hb != "shared") else ()) + (plan.m, plan.n))
    ga, gb = _matmul3_backward(g3, a3, b3, transpose_a, transpose_b, accumulate)
    return plan.grad(ga, ha, plan.a2, a.shape), plan.grad(gb, hb, plan.b2, b.shape)


def _linear_args(x: Any, w: Any, b: Any, dev: Device) -> tuple[Tensor, Tensor, Tensor | None]:
    x = tensor_arg(x, dev, "x", (float32, float16))
    if x.ndim < 1:
        raise ValueError("x: expected at least 1 dimension (..., in_features)")
    w = tensor_arg(w, dev, "w", (float32, float16), ndim=2)
    if w.dtype != x.dtype:
        raise ValueError(f"w: dtype {w.dtype} does not match x's {x.dtype}")
    if w.shape[1] != x.shape[-1]:
        raise ValueError(f"w: shape {w.shape} needs (out_features, {x.shape[-1]}) to match x's "
                         f"last dimension {x.shape[-1]}")
    if b is not None:
        b = tensor_arg(b, dev, "b", (float32, float16), ndim=1)
        if b.dtype != x.dtype:
            raise ValueError(f"b: dtype {b.dtype} does not match x's {x.dtype}")
        if b.shape != (w.shape[0],):
            raise ValueError(f"b: shape {b.shape}, expected ({w.shape[0]},)")
    return x, w, b


def linear(input: TensorLike, weight: TensorLike, bias: TensorLike | None = None,
           accumulate: str | None = None, activation: Any = None
           ) -> Tensor:
    """y = x w^T + b (torch.nn.functional.linear): x (..., in), w (out, in), b (out,) or None;
    y (..., out), y[..., o] = sum_i x[..., i] w[o, i] + b[o]. activation: None, "relu",
    "leaky_relu", "sigmoid", "tanh" or (name, params): y = act(x w^T + b) in the same kernel
    (neuron.activation_code); gradient via linear_backward(..., activation=, y=)."""
    x, w, b = input, weight, bias
    activation_code(activation)  # validate before allocating
    dev = pick_device(x, w, b)
    x, w, b = _linear_args(x, w, b, dev)
    variant(x.dtype, accumulate)
    rows = math.prod(x.shape[:-1])
    y = out_like((rows, w.shape[0]), x.dtype, dev)
    gemm(x.reshape(rows, x.shape[-1]), w, y, transpose_b=True, bias=b, accumulate=accumulate,
         activation=activation)
    return y.reshape(*x.shape[:-1], w.shape[0])


def linear_bias_grad(grad_out: Tensor, accumulate: str | None = None) -> Tensor:
    """db[o] = sum over rows r of grad_out[r, o] for a 2-D grad_out (rows, out)."""
    g = grad_out
    var = variant(g.dtype, accumulate)
    rows, cols = g.shape
    out = out_like((cols,), g.dtype, g.device)
    if rows == 0 or cols == 0:  # an empty sum
        if cols:
            out.buffer.write(np.zeros(cols, g.dtype))
        return out
    p = LinearBiasGradParams()
    p.rows, p.cols = rows, cols
    kernel(g.device, SOURCE, f"linear_bwd_bias_{var}")(math.ceil(cols / 32) * THREADS, g.buffer,
                                                        out.buffer, p)
    return out


def _linear_grad_args(grad_out: TensorLike, x: TensorLike, w: TensorLike, b: TensorLike | None,
                      accumulate: str | None
                      ) -> tuple[Device, Tensor, Tensor, Tensor | None, Tensor, Tensor]:
    """(device, x, w, b, grad_out and x as (rows, features) matrices), checked."""
    dev = pick_device(grad_out, x, w, b)
    x, w, b = _linear_args(x, w, b, dev)
    g = tensor_arg(grad_out, dev, "grad_out", (float32, float16))
    if g.dtype != x.dtype:
        raise ValueError(f"grad_out: dtype {g.dtype} does not match x's {x.dtype}")
    want = (*x.shape[:-1], w.shape[0])
    if g.shape != want:
        raise ValueError(f"grad_out: shape {g.shape}, expected {want}")
    variant(x.dtype, accumulate)
    rows = math.prod(x.shape[:-1])
    return dev, x, w, b, g.reshape(rows, w.shape[0]), x.reshape(rows, x.shape[-1])


def _linear_param_grads(g2: Tensor, x2: Tensor, w: Tensor, b: Tensor | None,
                        accumulate: str | None) -> tuple[Tensor, Tensor | None]:
    gw = out_like(w.shape, w.dtype, w.device)
    gemm(g2, x2, gw, transpose_a=True, accumulate=accumulate)
    return gw, (linear_bias_grad(g2, accumulate) if b is not None else None)


def linear_backward(grad_out: TensorLike, input: TensorLike, weight: TensorLike,
                    bias: TensorLike | None = None, accumulate: str | None = None,
                    activation: Any = None, y: TensorLike | None = None
                    ) -> tuple[Tensor, Tensor, Tensor | None]:
    """Gradients of y = x w^T + b: (grad_x, grad_w, grad_b or None when b is None).

    grad_x = grad_out w (..., in); grad_w = sum over rows of grad_out^T x (out, in);
    grad_b = sum over rows of grad_out (out,). activation (with y, the output of
    linear(..., activation=)): grad_out is first taken through the activation from y
    (neuron.activation_backward_from_output, one element-wise kernel).
    """
    x, w, b = input, weight, bias
    if activation is not None:
        if y is None:
            raise ValueError("y: activation= needs y, the output of the fused linear")
        grad_out = activation_backward_from_output(grad_out, y, activation)
    dev, x, w, b, g2, x2 = _linear_grad_args(grad_out, x, w, b, accumulate)
    gx = out_like(x2.shape, x.dtype, dev)
    gemm(g2, w, gx, accumulate=accumulate)
    gw, gb = _linear_param_grads(g2, x2, w, b, accumulate)
    return gx.reshape(x.shape), gw, gb


def linear_weight_grad(grad_out: TensorLike, x: TensorLike, w: TensorLike,
                       b: TensorLike | None = None, accumulate: str | None = None
                       ) -> tuple[Tensor, Tensor | None]:
    """(grad_w, grad_b or None when b is None) of y = x w^T + b: linear_backward without
    grad_x, for a layer whose input gradient nothing reads."""
    _, _, w, b, g2, x2 = _linear_grad_args(grad_out, x, w, b, accumulate)
    return _linear_param_grads(g2, x2, w, b, accumulate)
