"""gemm / matmul / linear (kernels/gemm.metal) against the float64 numpy references.

Tolerances are error bounds of the arithmetic, scaled by s = sum_k |op(a)[m,k]| |op(b)[k,n]|:
float accumulation is within K * 2^-24 * s (the classic recursive-summation bound); fp16
accumulation grows like sqrt(K) * 2^-11 * s for data with random signs (the bound used below is
3x that, exact for K <= 9); fp16 outputs add half an ulp. Shapes cover 1, 3, 31/32/33, 65 in
M, N and K, both tile shapes, split-K, batches (broadcast and summed) and every transpose pair.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import gemm as ref
from reference._common import activation as np_act

import pymetalnn as pm
from pymetalnn import functional as F
from pymetalnn.ops import gemm as ops

VARIANTS = {  # variant -> (dtype, accumulate=)
    "float": (np.float32, None),
    "half": (np.float16, "float"),
    "hacc_half": (np.float16, "half"),
}
LAYOUTS = [(False, False), (False, True), (True, False), (True, True)]
LAYOUT_IDS = ["nn", "nt", "tn", "tt"]
SHAPES = [(1, 1, 1), (3, 1, 65), (1, 33, 31), (31, 32, 33), (33, 65, 3), (65, 31, 32), (32, 12, 5),
          (64, 128, 16), (130, 132, 20), (128, 64, 12)]  # whole aligned tiles (unguarded loads)
U32, U16 = 2.0**-24, 2.0**-11


def tolerance(variant: str, k: int, prod_scale: np.ndarray, out_scale: np.ndarray) -> np.ndarray:
    """Elementwise bound on |kernel - exact| (see the module docstring). prod_scale: |alpha| *
    sum_k |a||b|; out_scale: bound on |result| (product, beta*C and bias terms)."""
    if variant == "hacc_half":
        acc = 3.0 * math.sqrt(k) * U16
    else:
        acc = 2.0 * k * U32
    out = U16 if variant != "float" else 4 * U32
    return acc * prod_scale + out * out_scale + 1e-30


def check(variant: str, got: np.ndarray, want: np.ndarray, k: int, prod_scale: np.ndarray,
          out_scale: np.ndarray | None = None) -> None:
    got = np.asarray(got, np.float64)
    out_scale = np.abs(want) + prod_scale if out_scale is None else out_scale
    tol = tolerance(variant, k, prod_scale, out_scale)
    err = np.abs(got - want)
    bad = ~(err <= tol)  # NaN counts as bad
    assert not bad.any(), (f"{variant}: {bad.sum()} of {bad.size} outside tolerance; worst "
                           f"err {np.nanmax(err / tol) if np.isfinite(err).all() else 'nan'} x tol, "
                           f"first at {np.argwhere(bad)[0]}: got {got[bad][0]}, want {want[bad][0]}")


def rand(shape, dtype, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def stored(m: int, k: int, transpose: bool) -> tuple[int, int]:
    return (k, m) if transpose else (m, k)


# ---- gemm: every variant x layout x tile, awkward shapes, split-K -------------------------------

# the (variant, tile) pairs that are instantiated (the others could only skip, on every backend)
VARIANT_TILES = [pytest.param(v, t, id=f"{t}-{v}") for v in VARIANTS for t in ops.TILES
                 if ops.TILES[t].supports(v)]


def fits(dev, tile: str, variant: str) -> bool:
    """Whether `tile` fits the device's threadgroup memory (metal: 32 KiB; some tiles tuned on
    NVIDIA do not, and gemm refuses them there: test_tiles_past_threadgroup_memory_refused)."""
    return ops.tile_fits(dev, ops.TILES[tile], variant)


def test_tiles_past_threadgroup_memory_refused(dev, no_dispatch) -> None:
    big = [(t, v) for t in ops.TILES for v in VARIANTS
           if ops.TILES[t].supports(v) and not fits(dev, t, v)]
    if not big:
        pytest.skip(f"every tile fits {dev.name}'s threadgroup memory")
    for t, v in big:
        dtype, accumulate = VARIANTS[v]
        out = pm.empty((8, 8), dtype, dev)
        with no_dispatch(dev), pytest.raises(ValueError, match="threadgroup memory"):
            F.gemm(pm.tensor(rand((8, 8), dtype, 1), dev), pm.tensor(rand((8, 8), dtype, 2), dev),
                   out, accumulate=accumulate, tile=t)
        # the automatic choice never takes it
        assert ops.plan(dev, 4096, 4096, 4096, 1, False, var=v)[0].name != t or fits(dev, t, v)


@pytest.mark.parametrize("ta,tb", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("variant,tile", VARIANT_TILES)
def test_gemm_layouts_shapes(dev, variant, ta, tb, tile) -> None:
    if not fits(dev, tile, variant):
        pytest.skip(f"{tile} ({variant}) exceeds {dev.name}'s threadgroup memory")
    dtype, accumulate = VARIANTS[variant]
    for i, (m, n, k) in enumerate(SHAPES):
        a = rand(stored(m, k, ta), dtype, i)
        b = rand(stored(k, n, tb), dtype, 100 + i)
        out = pm.empty((m, n), dtype, dev)
        F.gemm(pm.tensor(a, dev), pm.tensor(b, dev), out, transpose_a=ta, transpose_b=tb,
               accumulate=accumulate, tile=tile, k_splits=1)
        check(variant, out.numpy(), ref.gemm(a, b, None, ta, tb), k,
              ref.abs_product(a, b, ta, tb))


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("alpha,beta,with_bias", [(1.0, 0.0, True), (0.5, 1.0, False),
                                                  (-2.0, -0.75, True), (0.0, 1.0, True)])
def test_gemm_alpha_beta_bias(dev, variant, alpha, beta, with_bias) -> None:
    dtype, accumulate = VARIANTS[variant]
    m, n, k = 33, 67, 31
    a, b = rand((m, k), dtype, 1), rand((n, k), dtype, 2)
    c = rand((m, n), dtype, 3)
    if beta == 0.0:
        c[::3] = np.nan  # beta == 0 must not read C
    bias = rand(n, dtype, 4) if with_bias else None
    for tile, splits in (("128x128", 1), ("64x64", 3)):
        out = pm.tensor(c, dev)
        F.gemm(pm.tensor(a, dev), pm.tensor(b, dev), out, transpose_b=True, alpha=alpha,
               beta=beta, bias=None if bias is None else pm.tensor(bias, dev),
               accumulate=accumulate, tile=tile, k_splits=splits)
        want = ref.gemm(a, b, c, False, True, alpha, beta, bias)
        scale = abs(alpha) * ref.abs_product(a, b, False, True)
        out_scale = scale + (abs(beta) * np.abs(c.astype(np.float64)) if beta else 0) + \
            (np.abs(bias.astype(np.float64)) if bias is not None else 0)
        check(variant, out.numpy(), want, k, scale, out_scale)


@pytest.mark.parametrize("ta,tb", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gemm_split_k(dev, variant, ta, tb) -> None:
    """K split over several threadgroups, including more splits than slices (empty parts)."""
    dtype, accumulate = VARIANTS[variant]
    for i, (m, n, k, tile, splits) in enumerate([(31, 33, 65, "128x128", 3), (65, 32, 200, "64x64", 4),
                                                 (3, 5, 9, "64x64", 4), (130, 70, 100, "128x128k16", 3),
                                                 (37, 70, 100, "cpu512x128", 3)]):
        if not ops.TILES[tile].supports(variant) or not fits(dev, tile, variant):
            continue
        a, b = rand(stored(m, k, ta), dtype, 10 + i), rand(stored(k, n, tb), dtype, 20 + i)
        out = pm.empty((m, n), dtype, dev)
        F.gemm(pm.tensor(a, dev), pm.tensor(b, dev), out, transpose_a=ta, transpose_b=tb,
               accumulate=accumulate, tile=tile, k_splits=splits)
        check(variant, out.numpy(), ref.gemm(a, b, None, ta, tb), k, ref.abs_product(a, b, ta, tb))


def test_gemm_many_tiles(dev) -> None:
    """More tile-rows than one swizzle group (8), partial last tiles in both directions."""
    for tile, m in (("64x64", 9 * 64 + 5), ("128x128", 9 * 128 + 1), ("cpu128x512", 9 * 128 + 1)):
        n, k = 130, 9
        a, b = rand((m, k), np.float32, 5), rand((k, n), np.float32, 6)
        out = pm.empty((m, n), np.float32, dev)
        F.gemm(pm.tensor(a, dev), pm.tensor(b, dev), out, tile=tile)
        check("float", out.numpy(), ref.gemm(a, b, None), k, ref.abs_product(a, b))


CPU_TILES = [t for t in ops.TILES if ops.TILES[t].cpu]
# narrow C (m x n): the blocked tiles run it transposed (GEMM_TRANS_C); batch shapes as BATCH_CASES
NARROW_CASES = [(130, 4, 37, None, None, False), (257, 1, 20, 2, 2, False), (64, 4, 33, None, 3, False),
                (96, 3, 18, 3, 3, True), (40, 2, 70, 2, None, True)]


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("tile", CPU_TILES)
def test_gemm_blocked_narrow_transposed(dev, monkeypatch, variant, tile) -> None:
    """A narrow C through the blocked tiles runs as C^T = op(B)^T op(A)^T: against the float64
    reference with every layout, batches (broadcast and summed), split K, alpha, beta, bias and
    an activation; and bit for bit what the untransposed run gives (the same K order, fma)."""
    dtype, accumulate = VARIANTS[variant]
    rule = ops._cpu_transposed
    for i, (m, n, k, ba, bb, summed) in enumerate(NARROW_CASES):
        assert rule(ops.TILES[tile], m, n) and not rule(ops.TILES[tile], n, m)
        ta, tb = LAYOUTS[i % 4]
        batch = ba or bb
        a = rand(((ba,) if ba else ()) + stored(m, k, ta), dtype, 30 + i)
        b = rand(((bb,) if bb else ()) + stored(k, n, tb), dtype, 40 + i)
        oshape = (m, n) if summed or not batch else (batch, m, n)
        c = rand(oshape, dtype, 50 + i)
        bias = rand(n, dtype, 60 + i)
        alpha, beta = (0.5, -0.75) if i % 2 else (1.0, 0.0)
        got = []
        for transposed in (True, False):
            monkeypatch.setattr(ops, "_cpu_transposed", lambda t, m, n, tr=transposed: tr)
            for splits, act in ((1, None), (3, "relu")):
                out = pm.tensor(c, dev)
                F.gemm(pm.tensor(a, dev), pm.tensor(b, dev), out, transpose_a=ta, transpose_b=tb,
                       alpha=alpha, beta=beta, bias=pm.tensor(bias, dev), accumulate=accumulate,
                       tile=tile, k_splits=splits, activation=act)
                got.append(out.numpy())
        want = ref.gemm(a, b, c, ta, tb, alpha, beta, bias)
        kk = k * (batch if summed and batch else 1)
        scale = abs(alpha) * ref.abs_product(a, b, ta, tb, reduce_batch=summed)
        out_scale = scale + abs(beta) * np.abs(c.astype(np.float64)) + np.abs(bias.astype(np.float64))
        check(variant, got[0], want, kk, scale, out_scale)
        check(variant, got[1], np.maximum(want, 0), kk, scale, out_scale)
        for j in range(2):
            np.testing.assert_array_equal(got[j], got[j + 2], err_msg=f"case {i}, split {j}")


def _every_layout(dev, tile: str, variant: str, m: int, n: int, k: int, seed_a: int,
                  seed_b: int) -> None:
    """op(a) op(b) (m x n x k) through `tile` in every layout, split K on every other one,
    against the float64 reference."""
    dtype, accumulate = VARIANTS[variant]
    for j, (ta, tb) in enumerate(LAYOUTS):
        a = rand(stored(m, k, ta), dtype, seed_a + j)
        b = rand(stored(k, n, tb), dtype, seed_b + j)
        out = pm.empty((m, n), dtype, dev)
        F.gemm(pm.tensor(a, dev), pm.tensor(b, dev), out, transpose_a=ta, transpose_b=tb,
               accumulate=accumulate, tile=tile, k_splits=1 + j % 2)
        check(variant, out.numpy(), ref.gemm(a, b, None, ta, tb), k, ref.abs_product(a, b, ta, tb))


@pytest.mark.parametrize("tile", CPU_TILES)
def test_gemm_blocked_whole_blocks(dev, tile) -> None:
    """The blocked tiles' in-place paths (whole blocks and whole BK slices: A and B read where
    they lie, no copy) beside the copying ones (a short last slice, the blocks at M's and N's
    edges): every layout, float32 and fp16 storage, split K, a batch summed into one output."""
    t = ops.TILES[tile]
    tm, tn = t.block
    m, n, k = 3 * tm * (256 * tn // t.bn) // 2 + 5, 3 * t.bn // 2 + 7, 3 * t.bk + 5
    for variant in ("float", "half"):
        _every_layout(dev, tile, variant, m, n, k, 3, 30)
    a, b = rand((3, 2 * tm, 2 * t.bk), np.float32, 8), rand((3, 2 * t.bk, 2 * tn), np.float32, 9)
    out = pm.empty((2 * tm, 2 * tn), np.float32, dev)
    F.gemm(pm.tensor(a, dev), pm.tensor(b, dev), out, tile=tile)
    check("float", out.numpy(), ref.gemm(a, b, np.zeros(out.shape)), 6 * t.bk,
          ref.abs_product(a, b, False, False, reduce_batch=True))


@pytest.mark.parametrize("m,n", [(70, 300), (300, 70)], ids=["A_smaller", "B_smaller"])
def test_gemm_blocked_nt_transposes_smaller_operand(dev, monkeypatch, m, n) -> None:
    """x w^T (both operands K-contiguous) on the blocked tiles: the smaller operand is
    transposed into the scratch first (A: run as C^T). Against the float64 reference with
    batches (broadcast, per entry, summed), split K, alpha, beta, bias and an activation; and
    bit for bit what the per-slice copies give (the same K order, fma)."""
    if dev.name != "cpu":
        pytest.skip("the automatic choice takes the blocked tiles on the cpu backend only")
    k, default = 45, ops.NT_TRANSPOSE_WORK
    for i, (ba, bb, summed) in enumerate([(None, None, False), (3, 3, False), (None, 2, False),
                                          (2, 2, True)]):
        batch = ba or bb
        a = rand(((ba,) if ba else ()) + (m, k), np.float32, 70 + i)
        b = rand(((bb,) if bb else ()) + (n, k), np.float32, 80 + i)
        c = rand((m, n) if summed or not batch else (batch, m, n), np.float32, 90 + i)
        bias = rand(n, np.float32, 95 + i)
        got = []
        for limit in (default, 1 << 62):
            monkeypatch.setattr(ops, "NT_TRANSPOSE_WORK", limit)
            for splits, act in ((None, None), (3, "relu")):
                out = pm.tensor(c, dev)
                before = dict(dev.dispatch_counts)
                F.gemm(pm.tensor(a, dev), pm.tensor(b, dev), out, transpose_b=True, alpha=0.5,
                       beta=-0.25, bias=pm.tensor(bias, dev), k_splits=splits, activation=act)
                moved = dev.dispatch_counts["transpose_fwd_float"] - before.get("transpose_fwd_float", 0)
                assert moved == (limit == default)
                got.append(out.numpy())
        want = ref.gemm(a, b, c, False, True, 0.5, -0.25, bias)
        kk = k * (batch if summed and batch else 1)
        scale = 0.5 * ref.abs_product(a, b, False, True, reduce_batch=summed)
        out_scale = scale + 0.25 * np.abs(c.astype(np.float64)) + np.abs(bias.astype(np.float64))
        check("float", got[0], want, kk, scale, out_scale)
        check("float", got[1], np.maximum(want, 0), kk, scale, out_scale)
        for j in range(2):
            np.testing.assert_array_equal(got[j], got[j + 2], err_msg=f"case {i}, run {j}")


def test_gemm_cpu_tiles_follow_vector_width(monkeypatch) -> None:
    """On the cpu backend the automatic choice takes 8 x 32 blocks where the host has 512-bit
    vectors (32 registers hold their accumulators), 6 x 16 elsewhere (16 registers)."""
    dev = pm.device("cpu")
    for bits, block in ((512, (8, 32)), (256, (6, 16)), (128, (6, 16))):
        monkeypatch.setattr(ops, "vector_bits", lambda b=bits: b)
        for m, n, k in ((512, 512, 512), (64, 3136, 256), (3, 5, 7)):
            t, _ = ops.plan(dev, m, n, k, 1, False)
            assert t.cpu and t.block == block, (bits, m, n, k, t.name)


MATRIX_TILES = [t for t in ops.TILES if ops.TILES[t].matrix]


@pytest.mark.parametrize("tile", MATRIX_TILES)
def test_gemm_matrix_whole_tiles(dev, tile) -> None:
    """The matrix tiles' unguarded paths: operands covering whole BM x BN tiles and whole
    BK slices (plus a partial last slice), every layout, split K, and a batch summed into one
    output (a K walk that crosses batch entries); edges in the last tile row / column."""
    t = ops.TILES[tile]
    for variant in ("half", "hacc_half"):
        if not fits(dev, tile, variant):
            continue
        dtype, accumulate = VARIANTS[variant]
        k = 3 * t.bk + 8
        _every_layout(dev, tile, variant, 2 * t.bm + 8, t.bn, k, 7, 70)
        a, b = rand((2, t.bm, k), dtype, 5), rand((2, k, t.bn + 4), dtype, 6)
        out = pm.empty((t.bm, t.bn + 4), dtype, dev)
        F.gemm(pm.tensor(a, dev), pm.tensor(b, dev), out, accumulate=accumulate, tile=tile,
               k_splits=2)
        check(variant, out.numpy(), ref.gemm(a, b, np.zeros(out.shape)), 2 * k,
              ref.abs_product(a, b, False, False, reduce_batch=True))


# ---- batches ------------------------------------------------------------------------------------

BATCH_CASES = [  # (a batch, b batch, out 2-D: sum over the batch)
    (3, 3, False), (3, None, False), (None, 2, False), (1, 1, False), (4, 4, True), (3, None, True),
]


@pytest.mark.parametrize("ba,bb,summed", BATCH_CASES)
@pytest.mark.parametrize("variant", ["float", "hacc_half"])
def test_gemm_batched(dev, variant, ba, bb, summed) -> None:
    dtype, accumulate = VARIANTS[variant]
    m, n, k = 33, 17, 31
    for j, (ta, tb) in enumerate(LAYOUTS):
        a = rand(((ba,) if ba else ()) + stored(m, k, ta), dtype, j)
        b = rand(((bb,) if bb else ()) + stored(k, n, tb), dtype, 50 + j)
        batch = ba or bb
        c = rand((m, n) if summed else (batch, m, n), dtype, 99)
        for splits in (1, 2):
            out = pm.tensor(c, dev)
            F.gemm(pm.tensor(a, dev), pm.tensor(b, dev), out, transpose_a=ta, transpose_b=tb,
                   beta=1.0, accumulate=accumulate, k_splits=splits)
            want = ref.gemm(a, b, c, ta, tb, 1.0, 1.0)
            kk = k * (batch if summed else 1)
            scale = ref.abs_product(a, b, ta, tb, reduce_batch=summed)
            check(variant, out.numpy(), want, kk, scale, scale + np.abs(c.astype(np.float64)))


# ---- public ops: matmul, linear and their backward passes --------------------------------------

@pytest.mark.parametrize("ta,tb", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matmul(dev, variant, ta, tb) -> None:
    dtype, accumulate = VARIANTS[variant]
    for i, (ashape, bshape) in enumerate([((5, 7), (7, 3)), ((2, 33, 32), (2, 32, 31)),
                                          ((3, 1, 65), (65, 1))]):
        m, k = ashape[-2:]
        a = rand(ashape[:-2] + stored(m, k, ta), dtype, i)
        k, n = bshape[-2:]
        b = rand(bshape[:-2] + stored(k, n, tb), dtype, 10 + i)
        y = F.matmul(pm.tensor(a, dev), pm.tensor(b, dev), ta, tb, accumulate=accumulate)
        want = ref.matmul(a, b, ta, tb)
        assert y.shape == want.shape and y.dtype == dtype
        check(variant, y.numpy(), want, k, ref.abs_product(a, b, ta, tb))


@pytest.mark.parametrize("ta,tb", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("abatch,bbatch", [(None, None), (3, 3), (3, None), (None, 2)])
def test_matmul_backward(dev, ta, tb, abatch, bbatch) -> None:
    m, n, k = 5, 33, 31
    a = rand(((abatch,) if abatch else ()) + stored(m, k, ta), np.float32, 1)
    b = rand(((bbatch,) if bbatch else ()) + stored(k, n, tb), np.float32, 2)
    batch = abatch or bbatch
    g = rand(((batch,) if batch else ()) + (m, n), np.float32, 3)
    ga, gb = F.matmul_backward(pm.tensor(g, dev), pm.tensor(a, dev), pm.tensor(b, dev), ta, tb)
    wa, wb = ref.matmul_backward(g, a, b, ta, tb)
    assert ga.shape == a.shape and gb.shape == b.shape
    nb = batch or 1
    # dA sums over n (and the batch when a is shared), dB over m (and the batch)
    sa = ref.matmul(np.abs(g), np.abs(b), False, not tb) if not ta else \
        ref.matmul(np.abs(b), np.abs(g), tb, True)
    sb = ref.matmul(np.abs(a), np.abs(g), not ta, False) if not tb else \
        ref.matmul(np.abs(g), np.abs(a), True, ta)
    if sa.ndim > a.ndim:
        sa = sa.sum(0)
    if sb.ndim > b.ndim:
        sb = sb.sum(0)
    check("float", ga.numpy(), wa, n * nb, sa)
    check("float", gb.numpy(), wb, m * nb, sb)


LINEAR_CASES = [  # (x shape, out features)
    ((1, 1), 1), ((1, 33), 31), ((5, 32), 33), ((2, 3, 31), 65), ((65,), 3), ((33, 1), 32),
]


def linear_cases(dev, dtype, with_bias: bool):
    """Per LINEAR_CASES entry: the host arrays (x, w, b or None, g = dL/dy) and their device
    tensors, in that order."""
    for i, (xshape, out_f) in enumerate(LINEAR_CASES):
        x = rand(xshape, dtype, i)
        w = rand((out_f, xshape[-1]), dtype, 10 + i)
        b = rand(out_f, dtype, 20 + i) if with_bias else None
        g = rand(xshape[:-1] + (out_f,), dtype, 30 + i)
        yield (x, w, b, g), tuple(None if a is None else pm.tensor(a, dev) for a in (x, w, b, g))


def check_param_grads(variant: str, gw, gb, x, w, b, g) -> None:
    """linear's dL/dw and dL/db (None without a bias) against the reference."""
    _, ww, wb = ref.linear_backward(g, x, w, b)
    out_f, rows = w.shape[0], x.size // x.shape[-1]
    ag, ax = (np.abs(v.astype(np.float64)).reshape(rows, -1) for v in (g, x))
    check(variant, gw.numpy(), ww, rows, ag.T @ ax)
    if b is None:
        assert gb is None
    else:
        assert gb.shape == (out_f,)
        check(variant, gb.numpy(), wb, rows, ag.sum(0))


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_linear(dev, variant, with_bias) -> None:
    dtype, accumulate = VARIANTS[variant]
    for (x, w, b, _), (xt, wt, bt, _) in linear_cases(dev, dtype, with_bias):
        y = F.linear(xt, wt, bt, accumulate=accumulate)
        want = ref.linear(x, w, b)
        assert y.shape == want.shape
        scale = np.einsum("...j,oj->...o", np.abs(x.astype(np.float64)), np.abs(w.astype(np.float64)))
        out_scale = scale + (np.abs(b.astype(np.float64)) if b is not None else 0)
        check(variant, y.numpy(), want, x.shape[-1], scale, out_scale)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_linear_backward(dev, variant, with_bias) -> None:
    dtype, accumulate = VARIANTS[variant]
    for (x, w, b, g), (xt, wt, bt, gt) in linear_cases(dev, dtype, with_bias):
        gx, gw, gb = F.linear_backward(gt, xt, wt, bt, accumulate=accumulate)
        wx = ref.linear_backward(g, x, w, b)[0]
        ag, aw = (np.abs(v.astype(np.float64)) for v in (g, w))
        check(variant, gx.numpy(), wx, w.shape[0], np.einsum("...o,oj->...j", ag, aw))
        check_param_grads(variant, gw, gb, x, w, b, g)


@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_weight_grad(dev, with_bias) -> None:
    """linear_backward's parameter gradients alone, against the reference."""
    for (x, w, b, g), (xt, wt, bt, gt) in linear_cases(dev, np.float32, with_bias):
        gw, gb = F.linear_weight_grad(gt, xt, wt, bt)
        check_param_grads("float", gw, gb, x, w, b, g)
    with pytest.raises(ValueError, match="^grad_out: shape"):
        F.linear_weight_grad(pm.tensor(np.zeros((2, 3), np.float32), dev),
                             pm.tensor(np.zeros((2, 4), np.float32), dev),
                             pm.tensor(np.zeros((5, 4), np.float32), dev))


def test_linear_bias_grad_many_rows(dev) -> None:
    """Rows beyond one pass of the 8 row-lanes, columns beyond one threadgroup (32)."""
    g = rand((1000, 70), np.float32, 7)
    gb = ops.linear_bias_grad(pm.tensor(g, dev))
    check("float", gb.numpy(), g.astype(np.float64).sum(0), 1000, np.abs(g.astype(np.float64)).sum(0))


def test_half_accumulation_is_half(dev) -> None:
    """accumulate='half' really accumulates in fp16 (every tile, with and without split-K): its
    error against the exact product is of the order of a sequential fp16 accumulation's and far
    above the float-accumulating variant's."""
    m, n, k = 16, 16, 1024
    a = np.random.default_rng(1).uniform(0, 1, (m, k)).astype(np.float16)
    b = np.random.default_rng(2).uniform(0, 1, (k, n)).astype(np.float16)
    exact = ref.matmul(a, b)
    ta, tb = pm.tensor(a, dev), pm.tensor(b, dev)
    out = pm.empty((m, n), np.float16, dev)
    for tile in (t for t in ops.TILES if ops.TILES[t].supports("hacc_half")
                 and fits(dev, t, "hacc_half")):
        # SIMD-FMA tiles round per k; simdgroup-matrix tiles once per 8-deep product, the tile
        # products of gemm_mma2 once per 16-deep one on cuda (m16n8k16)
        t = ops.TILES[tile]
        step = (16 if t.gen == 2 and dev.name == "cuda" else 8) if t.matrix else 1
        err_seq = np.abs(ref.half_accumulate_matmul(a, b, step) - exact).max()
        for splits in (1, 3):
            F.gemm(ta, tb, out, accumulate="float", tile="64x64", k_splits=splits)
            err_f = np.abs(out.numpy() - exact).max()
            F.gemm(ta, tb, out, accumulate="half", tile=tile, k_splits=splits)
            err_h = np.abs(out.numpy() - exact).max()
            assert err_f <= U16 * np.abs(exact).max()
            assert err_h > (2 if step > 1 else 4) * err_f, (tile, splits, err_h, err_f)
            assert err_seq / 8 < err_h < 8 * err_seq, (tile, splits, err_h, err_seq)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_gemm_random_configs(dev, data) -> None:
    variant = data.draw(st.sampled_from(list(VARIANTS)))
    dtype, accumulate = VARIANTS[variant]
    m, n, k = (data.draw(st.integers(1, 70)) for _ in range(3))
    ta, tb = data.draw(st.booleans()), data.draw(st.booleans())
    ba = data.draw(st.sampled_from([None, 1, 2, 3]))
    bb = data.draw(st.sampled_from([None, ba])) if ba else data.draw(st.sampled_from([None, 2]))
    batch = ba or bb
    summed = batch is not None and data.draw(st.booleans())
    alpha = data.draw(st.sampled_from([1.0, -0.5, 2.0]))
    beta = data.draw(st.sampled_from([0.0, 1.0, 0.25]))
    with_bias = data.draw(st.booleans())
    tile = data.draw(st.sampled_from([None, *(t for t in ops.TILES if ops.TILES[t].supports(variant)
                                              and fits(dev, t, variant))]))
    splits = data.draw(st.sampled_from([None, 1, 2, 5]))
    seed = data.draw(st.integers(0, 2**16))
    a = rand(((ba,) if ba else ()) + stored(m, k, ta), dtype, seed)
    b = rand(((bb,) if bb else ()) + stored(k, n, tb), dtype, seed + 1)
    c = rand((m, n) if summed or batch is None else (batch, m, n), dtype, seed + 2)
    bias = rand(n, dtype, seed + 3) if with_bias else None
    out = pm.tensor(c, dev)
    F.gemm(pm.tensor(a, dev), pm.tensor(b, dev), out, transpose_a=ta, transpose_b=tb, alpha=alpha,
           beta=beta, bias=None if bias is None else pm.tensor(bias, dev), accumulate=accumulate,
           tile=tile, k_splits=splits)
    want = ref.gemm(a, b, c, ta, tb, alpha, beta, bias)
    scale = abs(alpha) * ref.abs_product(a, b, ta, tb, reduce_batch=summed)
    out_scale = scale + abs(beta) * np.abs(c.astype(np.float64)) + \
        (np.abs(bias.astype(np.float64)) if bias is not None else 0)
    check(variant, out.numpy(), want, k * (batch if summed else 1), scale, out_scale)


# ---- the references themselves: finite differences (float64) and PyTorch ------------------------

def test_reference_linear_backward_finite_differences() -> None:
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((2, 3, 4)), rng.standard_normal((5, 4)), rng.standard_normal(5)
    r = rng.standard_normal((2, 3, 5))  # L = sum(r * y): dL/dy = r

    def loss(x_, w_, b_):
        return float((r * ref.linear(x_, w_, b_)).sum())

    gx, gw, gb = ref.linear_backward(r, x, w, b)
    np.testing.assert_allclose(gx, ref.numeric_grad(lambda v: loss(v, w, b), x), rtol=1e-7, atol=1e-8)
    np.testing.assert_allclose(gw, ref.numeric_grad(lambda v: loss(x, v, b), w), rtol=1e-7, atol=1e-8)
    np.testing.assert_allclose(gb, ref.numeric_grad(lambda v: loss(x, w, v), b), rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("ta,tb", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("abatch,bbatch", [(None, None), (2, 2), (2, None), (None, 3)])
def test_reference_matmul_backward_finite_differences(ta, tb, abatch, bbatch) -> None:
    rng = np.random.default_rng(1)
    m, n, k = 3, 4, 5
    a = rng.standard_normal(((abatch,) if abatch else ()) + stored(m, k, ta))
    b = rng.standard_normal(((bbatch,) if bbatch else ()) + stored(k, n, tb))
    batch = abatch or bbatch
    r = rng.standard_normal(((batch,) if batch else ()) + (m, n))

    def loss(a_, b_):
        return float((r * ref.matmul(a_, b_, ta, tb)).sum())

    ga, gb = ref.matmul_backward(r, a, b, ta, tb)
    np.testing.assert_allclose(ga, ref.numeric_grad(lambda v: loss(v, b), a), rtol=1e-7, atol=1e-8)
    np.testing.assert_allclose(gb, ref.numeric_grad(lambda v: loss(a, v), b), rtol=1e-7, atol=1e-8)


def test_reference_half_accumulation_emulation() -> None:
    """The sequential fp16-accumulation emulation: exact on small integers, and stuck at 2048 when
    adding ones (2049 is not a half), as fp16 arithmetic is."""
    a = np.arange(12, dtype=np.float16).reshape(3, 4) - 5
    b = np.arange(8, dtype=np.float16).reshape(4, 2)
    np.testing.assert_array_equal(ref.half_accumulate_matmul(a, b), ref.matmul(a, b))
    ones = np.ones((1, 3000), np.float16)
    assert ref.half_accumulate_matmul(ones, ones.T)[0, 0] == 2048


def test_references_match_torch() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    for ta, tb in LAYOUTS:
        a = rng.standard_normal((3,) + stored(4, 5, ta))
        b = rng.standard_normal(stored(5, 6, tb))
        at = torch.tensor(a, requires_grad=True)
        bt = torch.tensor(b, requires_grad=True)
        y = torch.matmul(at.transpose(-1, -2) if ta else at, bt.t() if tb else bt)
        np.testing.assert_allclose(ref.matmul(a, b, ta, tb), y.detach().numpy(), rtol=1e-12)
        g = rng.standard_normal(y.shape)
        y.backward(torch.tensor(g))
        ga, gb = ref.matmul_backward(g, a, b, ta, tb)
        np.testing.assert_allclose(ga, at.grad.numpy(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(gb, bt.grad.numpy(), rtol=1e-12, atol=1e-12)
    x, w, b = rng.standard_normal((2, 3, 4)), rng.standard_normal((5, 4)), rng.standard_normal(5)
    xt, wt, bt = (torch.tensor(v, requires_grad=True) for v in (x, w, b))
    y = torch.nn.functional.linear(xt, wt, bt)
    np.testing.assert_allclose(ref.linear(x, w, b), y.detach().numpy(), rtol=1e-12)
    g = rng.standard_normal(y.shape)
    y.backward(torch.tensor(g))
    for mine, theirs in zip(ref.linear_backward(g, x, w, b), (xt.grad, wt.grad, bt.grad)):
        np.testing.assert_allclose(mine, theirs.numpy(), rtol=1e-12, atol=1e-12)


def test_kernels_match_torch_cpu(dev) -> None:
    """Our kernels against PyTorch's CPU matmul / linear for fp32 and fp16."""
    torch = pytest.importorskip("torch")
    for dtype, tdtype in ((np.float32, torch.float32), (np.float16, torch.float16)):
        x, w, b = rand((7, 33), dtype, 1), rand((31, 33), dtype, 2), rand(31, dtype, 3)
        y = F.linear(pm.tensor(x, dev), pm.tensor(w, dev), pm.tensor(b, dev)).numpy()
        yt = torch.nn.functional.linear(*(torch.tensor(v).to(tdtype) for v in (x, w, b)))
        scale = np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64)).T + np.abs(b)
        tol = (2e-3 if dtype == np.float16 else 1e-5) * scale
        assert (np.abs(y.astype(np.float64) - yt.float().numpy()) <= tol).all()


# ---- bad input: ValueError naming the argument, before anything is dispatched ------------------

def _bad_cases(dev):
    f32 = lambda *s: pm.tensor(np.ones(s, np.float32), dev)  # noqa: E731
    f16 = lambda *s: pm.tensor(np.ones(s, np.float16), dev)  # noqa: E731
    i32 = pm.tensor(np.ones((3, 4), np.int32), dev)
    out = f32(3, 5)
    return [
        ("b", lambda: F.matmul(f32(3, 4), f32(5, 6))),                          # inner dims
        ("b", lambda: F.matmul(f32(3, 4), f32(6, 4), transpose_b=False)),
        ("input", lambda: F.matmul(f32(), f32(4, 3))),                          # 0-d
        ("other", lambda: F.matmul(f32(5), f32(4, 3))),                         # 1-D inner dims
        ("other", lambda: F.matmul(f32(3, 3, 4), f32(2, 2, 4, 3))),             # batch broadcast
        ("input", lambda: F.matmul(i32, f32(4, 3))),                            # dtype
        ("b", lambda: F.matmul(f32(3, 4), f16(4, 3))),                          # dtype mismatch
        ("other", lambda: F.matmul(f32(2, 3, 4), f32(3, 4, 5))),                # batch mismatch
        ("accumulate", lambda: F.matmul(f32(3, 4), f32(4, 3), accumulate="half")),
        ("accumulate", lambda: F.matmul(f16(3, 4), f16(4, 3), accumulate="double")),
        ("out", lambda: F.gemm(f32(3, 4), f32(4, 5), f32(5, 3))),               # out shape
        ("out", lambda: F.gemm(f32(3, 4), f32(4, 5), f16(3, 5))),               # out dtype
        ("out", lambda: F.gemm(out, f32(5, 5), out)),                           # out aliases a
        ("bias", lambda: F.gemm(f32(3, 4), f32(4, 5), out, bias=f32(4))),
        ("beta", lambda: F.gemm(f32(3, 4), f32(4, 5), out, beta=float("nan"))),
        ("tile", lambda: F.gemm(f32(3, 4), f32(4, 5), out, tile="32x32")),
        ("k_splits", lambda: F.gemm(f32(3, 4), f32(4, 5), out, k_splits=0)),
        ("w", lambda: F.linear(f32(2, 4), f32(3, 5))),                          # in features
        ("w", lambda: F.linear(f32(2, 4), f32(3, 4, 1))),                       # w ndim
        ("w", lambda: F.linear(f32(2, 4), f16(3, 4))),                          # x/w dtype
        ("x", lambda: F.linear(i32, f32(3, 4))),
        ("b", lambda: F.linear(f32(2, 4), f32(3, 4), f32(4))),                  # bias shape
        ("b", lambda: F.linear(f32(2, 4), f32(3, 4), f16(3))),
        ("accumulate", lambda: F.linear(f32(2, 4), f32(3, 4), accumulate="half")),
        ("grad_out", lambda: F.linear_backward(f32(2, 4), f32(2, 4), f32(3, 4))),
        ("grad_out", lambda: F.linear_backward(f16(2, 3), f32(2, 4), f32(3, 4))),
        ("w", lambda: F.linear_backward(f32(2, 3), f32(2, 4), f32(3, 5))),
        ("grad_out", lambda: F.matmul_backward(f32(3, 6), f32(3, 4), f32(4, 5))),
        ("b", lambda: F.matmul_backward(f32(3, 5), f32(3, 4), f32(3, 5))),
    ]


def test_bad_input_names_the_argument(dev, no_dispatch) -> None:
    cases = _bad_cases(dev)
    dev.synchronize()
    with no_dispatch(dev, "a kernel ran before the error"):
        for name, call in cases:
            with pytest.raises(ValueError) as e:
                call()
            assert str(e.value).startswith(f"{name}:"), (name, str(e.value))


def test_plan_fills_the_gpu() -> None:
    """The 256 x 4096 x 4096 linear layer on a 132-SM GPU: the plan splits K so the grid covers
    the machine instead of leaving it half idle with 64 tiles."""

    class FakeCuda:
        name = "cuda"
        props = {"multiProcessorCount": 132}

    t, s = ops.plan(FakeCuda(), 256, 4096, 4096, 1, False)
    groups = math.ceil(256 / t.bm) * math.ceil(4096 / t.bn) * s
    assert groups >= 132, (t, s)
    t, s = ops.plan(FakeCuda(), 4096, 4096, 256, 1, False)  # already 1024 tiles: no split
    assert (t.name, s) == ("128x128", 1)


# ---- fused activation (gemm / linear(..., activation=)) -------------------------------------------

ACTS = [None, "relu", ("leaky_relu", 0.2), "sigmoid", "tanh"]
ACT_IDS = ["none", "relu", "leaky_relu", "sigmoid", "tanh"]


@pytest.mark.parametrize("variant", ["float", "half"])
@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
def test_gemm_linear_fused_activation(dev, variant, act) -> None:
    """The activation is applied to the whole epilogue (alpha, beta, bias), also after split-K;
    linear(..., activation=) == act(linear(...)) and linear_backward(..., activation=, y=)."""
    dtype, accumulate = VARIANTS[variant]
    t = 1e-6 if dtype == np.float32 else 2 * 2.0 ** -11
    m, n, k = 33, 67, 31
    a, b, c, bias = rand((m, k), dtype, 1), rand((n, k), dtype, 2), rand((m, n), dtype, 3), \
        rand(n, dtype, 4)
    for tile, splits in (("128x128", 1), ("64x64", 3)):
        outs = []
        for activation in (None, act):
            out = pm.tensor(c, dev)
            F.gemm(pm.tensor(a, dev), pm.tensor(b, dev), out, transpose_b=True, alpha=0.5,
                   beta=-0.75, bias=pm.tensor(bias, dev), accumulate=accumulate, tile=tile,
                   k_splits=splits, activation=activation)
            outs.append(out.numpy().astype(np.float64))
        np.testing.assert_allclose(outs[1], np_act(outs[0], act)[0], rtol=t, atol=t,
                                   err_msg=f"{tile} splits={splits}")
    # linear forward (the same dispatches as without activation: none added for it) and backward
    x, w, gb = rand((5, 3, k), dtype, 5), rand((n, k), dtype, 6), rand((5, 3, n), dtype, 7)
    xt, wt, bt, gt = (pm.tensor(v, dev) for v in (x, w, bias, gb))
    before = sum(dev.dispatch_counts.values())
    z = F.linear(xt, wt, bt).numpy().astype(np.float64)
    plain = sum(dev.dispatch_counts.values()) - before
    before += plain
    y = F.linear(xt, wt, bt, activation=act)
    assert sum(dev.dispatch_counts.values()) - before == plain
    np.testing.assert_allclose(y.numpy().astype(np.float64), np_act(z, act)[0], rtol=t, atol=t)
    if dtype != np.float32:
        return
    got = F.linear_backward(gt, xt, wt, bt, activation=act, y=y)
    gz = pm.tensor((gb * np_act(z, act)[1]).astype(dtype), dev)
    for name, r, v in zip(("dx", "dw", "db"), F.linear_backward(gz, xt, wt, bt), got):
        np.testing.assert_allclose(v.numpy(), r.numpy(), rtol=1e-5, atol=1e-5, err_msg=name)
    # matmul takes it too
    mm = F.matmul(xt.reshape(15, k), wt, transpose_b=True, activation=act).numpy()
    want = np_act(F.matmul(xt.reshape(15, k), wt, transpose_b=True).numpy().astype(np.float64),
                  act)[0]
    np.testing.assert_allclose(mm, want, rtol=t, atol=t)
    with pytest.raises(ValueError, match="y: activation= needs y"):
        F.linear_backward(gt, xt, wt, bt, activation=act or "relu")


@pytest.mark.parametrize("hw", [True, False])
def test_matrix_hardware_choice(dev, monkeypatch, hw) -> None:
    """fp16 GEMMs take the simdgroup-matrix tiles exactly where the device has them; without them
    (Intel/AMD Macs, or forced off) the SIMD-FMA tiles compute the same product; fp32 never takes
    them (its math stays exact fp32)."""
    monkeypatch.setattr(dev, "simdgroup_matrix", hw, raising=False)
    for var in ("half", "hacc_half"):
        t, _ = ops.plan(dev, 512, 512, 512, 1, False, var=var)
        assert t.matrix == hw, (var, t.name)
    assert not ops.plan(dev, 512, 512, 512, 1, False, var="float")[0].matrix
    r = np.random.default_rng(3)
    a = r.standard_normal((37, 70)).astype(np.float16)
    b = r.standard_normal((70, 33)).astype(np.float16)
    got = F.matmul(pm.tensor(a, dev), pm.tensor(b, dev)).numpy().astype(np.float64)
    exact = ref.matmul(a, b)
    assert np.abs(got - exact).max() <= 4 * U16 * (np.abs(a.astype(np.float64)) @ np.abs(b)).max()


# ---- torch.matmul's shape rules: 1-D, N-D and broadcast batch operands ---------------------------

MATMUL_SHAPES = [((5,), (5,)), ((5,), (5, 3)), ((4, 5), (5,)), ((2, 3, 4, 5), (5,)), ((5,), (2, 5, 3)),
                 ((2, 1, 3, 5), (4, 5, 2)), ((1, 3, 5), (1, 5, 2)), ((3, 1, 4, 5), (1, 2, 5, 3)),
                 ((2, 2, 3, 5), (2, 2, 5, 1)), ((1, 33), (2, 3, 33, 1)), ((2, 3, 4), (1, 4, 2))]


@pytest.mark.parametrize("sa,sb", MATMUL_SHAPES)
def test_matmul_broadcast(dev, sa, sb) -> None:
    """Values against np.matmul (float64), gradients against finite differences of the float64
    product (and torch where installed)."""
    rng = np.random.default_rng(len(sa) * 7 + len(sb))
    a = rng.standard_normal(sa).astype(np.float32)
    b = rng.standard_normal(sb).astype(np.float32)
    want = np.matmul(a.astype(np.float64), b.astype(np.float64))
    y = F.matmul(pm.tensor(a, dev), pm.tensor(b, dev))
    assert y.shape == want.shape
    np.testing.assert_allclose(y.numpy(), want, rtol=1e-5, atol=1e-5)
    g = rng.standard_normal(want.shape)
    ga, gb = F.matmul_backward(pm.tensor(g.astype(np.float32), dev), pm.tensor(a, dev), pm.tensor(b, dev))
    assert ga.shape == sa and gb.shape == sb

    def fd(x, f, eps=1e-6):
        out = np.zeros_like(x)
        for i in np.ndindex(x.shape):
            e = np.zeros_like(x)
            e[i] = eps
            out[i] = ((g * f(x + e)).sum() - (g * f(x - e)).sum()) / (2 * eps)
        return out
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    np.testing.assert_allclose(ga.numpy(), fd(a64, lambda z: np.matmul(z, b64)), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gb.numpy(), fd(b64, lambda z: np.matmul(a64, z)), rtol=1e-4, atol=1e-4)
    torch = pytest.importorskip("torch")
    ta, tb = torch.tensor(a, requires_grad=True), torch.tensor(b, requires_grad=True)
    torch.matmul(ta, tb).backward(torch.tensor(g.astype(np.float32)))
    np.testing.assert_allclose(ga.numpy(), ta.grad.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gb.numpy(), tb.grad.numpy(), rtol=1e-4, atol=1e-4)


def test_matmul_bad_shapes(dev) -> None:
    x = pm.tensor(np.zeros((2, 3, 4), np.float32), dev)
    with pytest.raises(ValueError, match="inner dimension"):
        F.matmul(x, pm.tensor(np.zeros((5, 2), np.float32), dev))
    with pytest.raises(ValueError, match="other: batch"):
        F.matmul(pm.tensor(np.zeros((2, 2, 3, 4), np.float32), dev),
                 pm.tensor(np.zeros((3, 4, 2), np.float32), dev))
    with pytest.raises(ValueError, match="input"):
        F.matmul(pm.tensor(np.zeros((), np.float32), dev), x)


# ---- the fp32 accuracy budget (pymetalnn/accuracy.py, docs/accuracy.md) ------------------------
# benchmarks/bench_gemm.py's linear 4096 -> 4096 at batch 256, scaled for cpu: each product keeps
# its reduction length (forward and grad_x 4096, grad_w the batch, 256) and 64 outputs aside.
@pytest.mark.parametrize("what", ["forward", "grad_x", "grad_w"])
def test_linear_fp32_budget(dev, what) -> None:
    """float32 against float64 on the benchmark's reduction lengths: the unsplit tiled kernel
    (the direct algorithm) within the ceiling, and every split-K count the planner may pick
    within min(10x the unsplit kernel's error, ceiling)."""
    from pymetalnn import accuracy

    rng = np.random.default_rng(7)
    fin, fout, batch = {"forward": (4096, 64, 16), "grad_x": (64, 4096, 16),
                        "grad_w": (64, 64, 256)}[what]
    x = rng.standard_normal((batch, fin)).astype(np.float32)
    w = (rng.standard_normal((fout, fin)) / np.sqrt(fin)).astype(np.float32)
    g = rng.standard_normal((batch, fout)).astype(np.float32)
    xd, wd, gd = (v.astype(np.float64) for v in (x, w, g))
    # (a, b, transpose_a, transpose_b, reference) of the product
    a, b, ta, tb, want = {"forward": (x, w, False, True, xd @ wd.T),
                          "grad_x": (g, w, False, False, gd @ wd),
                          "grad_w": (g, x, True, False, gd.T @ xd)}[what]
    ta_, tb_ = pm.tensor(a, dev), pm.tensor(b, dev)
    errs = {}
    for splits in (1, 4, ops.MAX_SPLITS):
        out = pm.empty(want.shape, np.float32, dev)
        ops.gemm(ta_, tb_, out, transpose_a=ta, transpose_b=tb, k_splits=splits)
        errs[splits] = accuracy.rel_err(out.numpy(), want)
    assert errs[1] <= accuracy.CEILING, errs
    for s, e in errs.items():
        assert accuracy.within(e, errs[1]), f"k_splits {s}: error {e:.3g} (unsplit {errs[1]:.3g})"


def test_accuracy_budget_helpers() -> None:
    """pymetalnn.accuracy: err = max|got - ref| / max|ref|, the limit min(10x direct, 1e-4)."""
    from pymetalnn import accuracy

    assert accuracy.rel_err([1.0, 2.0], [1.0, 4.0]) == 0.5
    assert accuracy.rel_err([0.5], [0.0]) == 0.5  # a zero reference: the absolute error
    assert accuracy.limit() == accuracy.CEILING == 1e-4
    assert accuracy.limit(1e-7) == pytest.approx(1e-6) and accuracy.limit(1e-4) == 1e-4
    assert accuracy.within(9e-7, 1e-7) and not accuracy.within(2e-6, 1e-7)
    with pytest.raises(ValueError, match="got: shape"):
        accuracy.rel_err(np.zeros(3), np.zeros(4))


def test_empty_operands_like_torch(dev):
    """As torch: an empty dimension gives an empty result, an empty inner dimension (K = 0, or an
    empty batch summed into a 2-D result) zeros (+ bias), and the gradients follow (zeros for the
    weights of an empty batch); nothing is refused."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)

    def check(ours, want):
        ours = ours if isinstance(ours, tuple) else (ours,)
        want = want if isinstance(want, tuple) else (want,)
        for o, w in zip(ours, want):
            assert o.shape == tuple(w.shape)
            np.testing.assert_allclose(o.numpy(), w.detach().numpy(), rtol=1e-6, atol=1e-6)

    for sa, sb in [((5, 0), (0, 10)), ((5, 5, 0), (0, 5)), ((0, 0), (5, 0, 0)), ((0, 3), (3, 4)),
                   ((2, 0, 3), (3, 4)), ((4, 0), (3, 0, 2)), ((0,), (0,)), ((3, 0), (0,))]:
        a = torch.tensor(rng.standard_normal(sa).astype(np.float32), requires_grad=True)
        b = torch.tensor(rng.standard_normal(sb).astype(np.float32), requires_grad=True)
        y = torch.matmul(a, b)
        check(F.matmul(pm.tensor(a.detach().numpy(), dev), pm.tensor(b.detach().numpy(), dev)), y)
        g = torch.randn(y.shape)
        check(F.matmul_backward(pm.tensor(g.numpy(), dev), pm.tensor(a.detach().numpy(), dev),
                                pm.tensor(b.detach().numpy(), dev)), torch.autograd.grad(y, [a, b], g))
    for sx, sw in [((0, 3), (4, 3)), ((2, 0), (4, 0)), ((0, 5, 3), (4, 3))]:
        x, w, b = (torch.tensor(rng.standard_normal(s).astype(np.float32), requires_grad=True)
                   for s in (sx, sw, sw[:1]))
        y = torch.nn.functional.linear(x, w, b)
        args = [pm.tensor(t.detach().numpy(), dev) for t in (x, w, b)]
        check(F.linear(*args), y)
        g = torch.randn(y.shape)
        check(F.linear_backward(pm.tensor(g.numpy(), dev), *args), torch.autograd.grad(y, [x, w, b], g))
