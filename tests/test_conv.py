"""conv2d / conv1d / conv_transpose2d and their backward passes against the float64 references.

Errors are measured against the scale of each output's sum: |got - ref| <= tol * sum|terms|
(+ |b|), computed by running the reference on |x|, |w|. Per precision: float32 storage and
accumulation; float16 storage with float accumulation (one final fp16 rounding); float16 with
fp16 accumulation (one rounding per term: the tolerance grows as sqrt of the terms per sum).
float16 inputs are rounded before the reference sees them, so only the kernel's arithmetic is
measured. Every algorithm (direct, tiled; im2col, GEMMs over the unfolded input, for float32)
runs on every configuration.
"""
from __future__ import annotations

import numpy as np
import pytest
from conv_checks import PRECISIONS, U16, assert_close, rand, ref_pads, tol
from reference import conv as ref
from reference._common import activation as np_act
from reference._common import numeric_grad

import pymetalnn
from pymetalnn import functional as F
from pymetalnn.ops import conv as ops

FWD_TILES = list(ops.TILES["fwd"])
WEIGHT_TILES = list(ops.TILES["weight"])
# per generation: "m*" 8x8 matrix products ("mma"), "n*" 16-deep tile products ("mma2")
MMA_FWD_TILES = {g: [t for t in ops.MMA_TILES["fwd"] if t[0] == g[0]] for g in ("m", "n")}
MMA_WEIGHT_TILES = {g: [t for t in ops.MMA_TILES["weight"] if t[0] == g[0]] for g in ("m", "n")}


def force(algo: str, i: int) -> dict:
    """The kernels to use for case number i: direct or tiled forward / input gradient, with the
    tile shapes cycling over the cases so that each instantiation meets several shapes."""
    if algo == "direct":
        return {"fwd": "direct", "data": "direct", "weight": WEIGHT_TILES[i % len(WEIGHT_TILES)]}
    if algo == "im2col":  # GEMMs over the unfolded input (float32, one group; else the default)
        return {"fwd": "im2col", "data": "im2col", "weight": "im2col"}
    if algo in ("mma", "mma2"):  # the simdgroup-matrix tiles (fp16), on every device
        fwd, weight = (t["m" if algo == "mma" else "n"] for t in (MMA_FWD_TILES, MMA_WEIGHT_TILES))
        return {"fwd": fwd[i % len(fwd)], "data": fwd[(i + 1) % len(fwd)],
                "weight": weight[(i + 1) % len(weight)]}
    return {"fwd": FWD_TILES[i % len(FWD_TILES)], "data": FWD_TILES[(i + 1) % len(FWD_TILES)],
            "weight": WEIGHT_TILES[(i + 1) % len(WEIGHT_TILES)]}


@pytest.fixture(params=["direct", "tiled", "im2col"])
def algo(request) -> str:
    return request.param



def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


# (N, C, H, W, K, KH, KW, stride, padding, dilation, groups)
CONV_CASES = {
    "all-ones-1x1": (1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1),
    "c3-3x3-pad1": (1, 3, 7, 9, 5, 3, 3, 1, 1, 1, 1),
    "1x1-31to33": (2, 31, 5, 6, 33, 1, 1, 1, 0, 1, 1),
    "5x5-s2-32ch": (1, 32, 9, 7, 32, 5, 5, 2, 2, 1, 1),
    "1x7": (2, 33, 5, 9, 31, 1, 7, 1, (0, 3), 1, 1),
    "7x1-s(1,2)": (1, 4, 11, 5, 6, 7, 1, (1, 2), (3, 0), 1, 1),
    "stride>kernel": (2, 5, 9, 10, 7, 2, 2, 3, 0, 1, 1),
    "pad>half-kernel": (1, 3, 4, 5, 4, 3, 3, 1, (2, 3, 3, 2), 1, 1),
    "dilation2": (2, 6, 9, 8, 8, 3, 3, 1, 2, 2, 1),
    "groups2": (2, 8, 7, 7, 6, 3, 3, 2, 1, 1, 2),
    "depthwise-x2": (2, 6, 8, 7, 12, 3, 3, 1, 1, 1, 6),
    "depthwise-s2": (1, 33, 5, 6, 33, 3, 3, 2, 1, 1, 33),
    "asym-pad-dil": (2, 3, 9, 7, 5, 3, 2, 2, (1, 2, 0, 1), (2, 1), 1),
    "same-even-s2": (1, 3, 7, 8, 4, 4, 2, 2, "same", 1, 1),
    "same-s1-dil": (1, 2, 5, 6, 3, 3, 4, 1, "same", (1, 2), 1),
    "valid": (1, 3, 6, 6, 2, 3, 3, 1, "valid", 1, 1),
    "tile-edges": (3, 20, 9, 10, 70, 3, 3, 1, 1, 1, 1),     # M = 270, Kg = 70 cross tiles
    "groups-wide": (1, 40, 6, 5, 36, 3, 3, (2, 1), (1, 0), (1, 2), 2),
}


def run_conv2d_case(case, prec: str, seed: int = 0) -> None:
    n, c, h, w, k, kh, kw, stride, padding, dilation, groups = case
    dtype, acc = PRECISIONS[prec]
    rng = np.random.default_rng(seed)
    x = rand(rng, (n, c, h, w), dtype)
    wt = rand(rng, (k, c // groups, kh, kw), dtype)
    b = rand(rng, (k,), dtype)
    st, dil = _pair(stride), _pair(dilation)
    pads = ref_pads(padding, h, w, kh, kw, st, dil)
    kw_ref = dict(stride=st, pad=pads, dilation=dil, groups=groups)
    want = ref.conv2d(x, wt, b, **kw_ref)
    scale = ref.conv2d_abs(x, wt, **kw_ref) + np.abs(b.astype(np.float64))[None, :, None, None]
    y = F.conv2d(x, wt, b, stride, padding, dilation, groups, accumulate=acc)
    assert y.dtype == dtype
    assert_close("y", y, want, scale, tol(prec, c // groups * kh * kw))

    gy = rand(rng, want.shape, dtype)
    gx, gw, gb = F.conv2d_backward(gy, x, wt, b, stride, padding, dilation, groups, accumulate=acc)
    rx, rw, rb = ref.conv2d_backward(gy, x, wt, True, **kw_ref)
    sx, sw, sb = ref.conv2d_backward(np.abs(gy), np.abs(x), np.abs(wt), True, **kw_ref)
    assert_close("grad_x", gx, rx, sx, tol(prec, k // groups * kh * kw))
    red = n * want.shape[2] * want.shape[3]
    assert_close("grad_w", gw, rw, sw, tol(prec, min(red, ops.HACC_CHUNK)))
    assert_close("grad_b", gb, rb, sb, tol("half" if prec != "float" else "float", red))


# (algorithm, precision) pairs: the simdgroup-matrix kernels exist for fp16 storage only
ALGO_PRECS = [pytest.param(a, p, id=f"{a}-{p}") for a in ("direct", "tiled", "mma", "mma2")
              for p in PRECISIONS if not (a.startswith("mma") and p == "float")] + \
    [pytest.param("im2col", "float", id="im2col-float")]


@pytest.mark.parametrize("algo,prec", ALGO_PRECS)
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv2d(dev, monkeypatch, algo, case, prec):
    monkeypatch.setattr(ops, "FORCE", force(algo, list(CONV_CASES).index(case)))
    run_conv2d_case(CONV_CASES[case], prec)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("case", ["stride>kernel", "groups2", "pad>half-kernel"])
def test_conv2d_weight_grad(dev, case, with_bias):
    """conv2d_backward's dw and db alone (no input gradient), against the reference."""
    n, c, h, w, k, kh, kw, stride, padding, dilation, groups = CONV_CASES[case]
    rng = np.random.default_rng(5)
    x, wt = rand(rng, (n, c, h, w), np.float32), rand(rng, (k, c // groups, kh, kw), np.float32)
    b = rand(rng, (k,), np.float32) if with_bias else None
    st, dil = _pair(stride), _pair(dilation)
    kw_ref = dict(stride=st, pad=ref_pads(padding, h, w, kh, kw, st, dil), dilation=dil,
                  groups=groups)
    gy = rand(rng, ref.conv2d(x, wt, None, **kw_ref).shape, np.float32)
    gw, gb = F.conv2d_weight_grad(gy, x, wt, b, stride, padding, dilation, groups)
    _, rw, rb = ref.conv2d_backward(gy, x, wt, True, **kw_ref)
    _, sw, sb = ref.conv2d_backward(np.abs(gy), np.abs(x), np.abs(wt), True, **kw_ref)
    red = n * gy.shape[2] * gy.shape[3]
    assert_close("grad_w", gw, rw, sw, tol("float", red))
    if with_bias:
        assert_close("grad_b", gb, rb, sb, tol("float", red))
    else:
        assert gb is None
    with pytest.raises(ValueError, match="^grad_out"):
        F.conv2d_weight_grad(gy[:, :1], x, wt, b, stride, padding, dilation, groups)


# The row-staged weight gradient (horizontal stride and dilation 1, KW in ops.ROWS_KW): the
# CONV_CASES it takes plus rows past one 32-pixel segment, vertical stride and dilation, pairs
# (c, r) across 32-pair tiles, channels across 64-channel tiles, and a chunk of one segment
ROWS_CASES = {name: c for name, c in CONV_CASES.items()
              if _pair(c[7])[1] == 1 and _pair(c[9])[1] == 1 and c[6] in ops.ROWS_KW}
ROWS_CASES.update({
    "rows-wide-70": (1, 3, 4, 70, 5, 3, 5, 1, (1, 2), 1, 1),
    "rows-33-sh2-dh2": (2, 5, 9, 33, 9, 5, 5, (2, 1), 2, (2, 1), 1),
    "rows-pairs-99-k70": (1, 33, 5, 31, 70, 3, 3, 1, 1, 1, 1),
    "rows-groups3-1x7": (2, 6, 3, 9, 9, 1, 7, 1, (0, 3), 1, 3),
    "rows-pad>kernel": (1, 2, 3, 5, 3, 3, 5, 1, (2, 5), 1, 1),
    # narrow rows, several to a segment (the production version): 2 of 14 (13 rows: the last
    # segment of an image holds one), 4 of 6 with vertical stride, 11 of 1 (a whole image)
    "rows-2x14-oh13": (2, 3, 13, 14, 5, 5, 5, 1, 2, 1, 1),
    "rows-4x6-sh2": (3, 4, 7, 6, 5, 3, 3, (2, 1), 1, 1, 1),
    "rows-11x1": (2, 3, 11, 1, 4, 1, 3, 1, (0, 1), 1, 1),
})


@pytest.mark.parametrize("version", ["", "v1", "v2"], ids=["rows", "rows_v1", "rows_v2"])
@pytest.mark.parametrize("case", list(ROWS_CASES))
def test_conv2d_weight_grad_rows(dev, monkeypatch, case, version):
    """conv2d_bwd_weight_rows<KW> (and its numbered dev versions, kernels/dev/conv_rows.metal)
    against the reference: it runs (forced) and matches."""
    n, c, h, w, k, kh, kw, stride, padding, dilation, groups = ROWS_CASES[case]
    rng = np.random.default_rng(7)
    x, wt = rand(rng, (n, c, h, w), np.float32), rand(rng, (k, c // groups, kh, kw), np.float32)
    st, dil = _pair(stride), _pair(dilation)
    kw_ref = dict(stride=st, pad=ref_pads(padding, h, w, kh, kw, st, dil), dilation=dil,
                  groups=groups)
    gy = rand(rng, ref.conv2d(x, wt, None, **kw_ref).shape, np.float32)
    monkeypatch.setattr(ops, "FORCE", {"weight": "rows"})
    monkeypatch.setattr(ops, "ROWS_DEV", version)
    name = f"conv2d_bwd_weight_rows{kw}{version}_float"
    before = dev.dispatch_counts.get(name, 0)
    gw, _ = F.conv2d_weight_grad(gy, x, wt, None, stride, padding, dilation, groups)
    assert dev.dispatch_counts.get(name, 0) == before + 1
    _, rw, _ = ref.conv2d_backward(gy, x, wt, False, **kw_ref)
    _, sw, _ = ref.conv2d_backward(np.abs(gy), np.abs(x), np.abs(wt), False, **kw_ref)
    assert_close("grad_w", gw, rw, sw, tol("float", n * gy.shape[2] * gy.shape[3]))


def test_conv2d_weight_grad_rows_choice(dev, monkeypatch):
    """Where the row kernel cannot run (horizontal stride or dilation 2, fp16, KW = 1) a forced
    "rows" falls back to the tiled kernels; by default only cuda takes it, for ROWS_DEFAULT_KW."""
    geo = ops._conv_geometry((2, 32, 14, 14), (64, 32, 5, 5), 1, 2, 1, 1)
    s2 = ops._conv_geometry((2, 32, 14, 14), (64, 32, 5, 5), (1, 2), 2, 1, 1)
    d2 = ops._conv_geometry((2, 32, 14, 14), (64, 32, 5, 5), 1, 2, (1, 2), 1)
    k1 = ops._conv_geometry((2, 32, 14, 14), (64, 32, 7, 1), 1, (3, 0), 1, 1)
    monkeypatch.setattr(ops, "FORCE", {"weight": "rows"})
    assert ops._use_rows(dev, geo, "float")
    assert not any(ops._use_rows(dev, g, "float") for g in (s2, d2, k1))
    assert not ops._use_rows(dev, geo, "half")
    monkeypatch.setattr(ops, "FORCE", {})
    assert ops._use_rows(dev, geo, "float") == (dev.name == "cuda" and 5 in ops.ROWS_DEFAULT_KW)


# (N, C_in, H, W, C_out, KH, KW, stride, padding, output_padding, dilation, groups)
TRANSPOSE_CASES = {
    "all-ones-1x1": (1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1),
    "3x3-s2-op1": (2, 3, 5, 4, 4, 3, 3, 2, 1, 1, 1, 1),
    "33to31": (1, 33, 4, 5, 31, 3, 3, 1, 1, 0, 1, 1),
    "stride>kernel-op2": (2, 4, 3, 4, 6, 2, 2, 3, 0, 2, 1, 1),
    "dilation2-op1": (1, 4, 5, 5, 4, 3, 3, 1, 0, 1, 2, 1),
    "groups2": (2, 6, 4, 4, 8, 3, 3, 2, 1, 1, 1, 2),
    "depthwise": (1, 8, 5, 5, 8, 3, 3, 2, 1, 0, 1, 8),
    "1x7-s(1,2)": (1, 5, 3, 6, 7, 1, 7, (1, 2), (0, 3), (0, 1), 1, 1),
    "7x1": (2, 3, 6, 2, 3, 7, 1, 1, (3, 0), 0, 1, 1),
    "tile-edges": (2, 20, 7, 6, 70, 4, 4, 2, 1, 0, 1, 1),
}


def run_transpose_case(case, prec: str, seed: int = 1) -> None:
    n, cin, h, w, cout, kh, kw, stride, padding, opad, dilation, groups = case
    dtype, acc = PRECISIONS[prec]
    rng = np.random.default_rng(seed)
    x = rand(rng, (n, cin, h, w), dtype)
    wt = rand(rng, (cin, cout // groups, kh, kw), dtype)
    b = rand(rng, (cout,), dtype)
    kw_ref = dict(stride=_pair(stride), padding=_pair(padding), output_padding=_pair(opad),
                  dilation=_pair(dilation), groups=groups)
    want = ref.conv_transpose2d(x, wt, b, **kw_ref)
    scale = ref.conv_transpose2d(np.abs(x), np.abs(wt), np.abs(b), **kw_ref)
    y = F.conv_transpose2d(x, wt, b, stride, padding, opad, groups, dilation, accumulate=acc)
    terms = cin // groups * kh * kw
    assert_close("y", y, want, scale, tol(prec, terms))

    gy = rand(rng, want.shape, dtype)
    gx, gw, gb = F.conv_transpose2d_backward(gy, x, wt, b, stride, padding, opad, groups, dilation,
                                             accumulate=acc)
    rx, rw, rb = ref.conv_transpose2d_backward(gy, x, wt, True, **kw_ref)
    sx, sw, sb = ref.conv_transpose2d_backward(np.abs(gy), np.abs(x), np.abs(wt), True, **kw_ref)
    assert_close("grad_x", gx, rx, sx, tol(prec, cout // groups * kh * kw))
    assert_close("grad_w", gw, rw, sw, tol(prec, min(n * h * w, ops.HACC_CHUNK)))
    assert_close("grad_b", gb, rb, sb, tol("half" if prec != "float" else "float", want[0, 0].size * n))


@pytest.mark.parametrize("algo,prec", ALGO_PRECS)
@pytest.mark.parametrize("case", list(TRANSPOSE_CASES))
def test_conv_transpose2d(dev, monkeypatch, algo, case, prec):
    monkeypatch.setattr(ops, "FORCE", force(algo, list(TRANSPOSE_CASES).index(case)))
    run_transpose_case(TRANSPOSE_CASES[case], prec)


# (N, C, L, K, KL, stride, padding, dilation, groups)
CONV1D_CASES = {
    "same": (2, 3, 11, 5, 4, 1, "same", 1, 1),
    "asym-s2-dil2": (1, 4, 9, 6, 3, 2, (2, 1), 2, 2),
    "depthwise-valid": (3, 5, 7, 5, 3, 3, "valid", 1, 5),
    "len1": (1, 33, 1, 31, 1, 1, 0, 1, 1),
}


@pytest.mark.parametrize("prec", ["float", "hacc_half"])
@pytest.mark.parametrize("case", list(CONV1D_CASES))
def test_conv1d(dev, case, prec):
    n, c, L, k, kl, stride, padding, dilation, groups = CONV1D_CASES[case]
    dtype, acc = PRECISIONS[prec]
    rng = np.random.default_rng(2)
    x = rand(rng, (n, c, L), dtype)
    wt = rand(rng, (k, c // groups, kl), dtype)
    b = rand(rng, (k,), dtype)
    if padding == "same":
        tot = max((-(-L // stride) - 1) * stride + dilation * (kl - 1) + 1 - L, 0)
        lr = (tot // 2, tot - tot // 2)
    elif padding == "valid":
        lr = (0, 0)
    else:
        lr = (padding, padding) if isinstance(padding, int) else padding
    kw_ref = dict(stride=(1, stride), pad=(0, 0, *lr), dilation=(1, dilation), groups=groups)
    want = ref.conv2d(x[:, :, None], wt[:, :, None], b, **kw_ref)[:, :, 0]
    scale = ref.conv2d_abs(x[:, :, None], wt[:, :, None], **kw_ref)[:, :, 0] + np.abs(b)[None, :, None]
    y = F.conv1d(x, wt, b, stride, padding, dilation, groups, accumulate=acc)
    assert_close("y", y, want, scale, tol(prec, c // groups * kl))
    gy = rand(rng, want.shape, dtype)
    gx, gw, gb = F.conv1d_backward(gy, x, wt, b, stride, padding, dilation, groups, accumulate=acc)
    rx, rw, rb = ref.conv2d_backward(gy[:, :, None], x[:, :, None], wt[:, :, None], True, **kw_ref)
    sx, sw, sb = ref.conv2d_backward(np.abs(gy[:, :, None]), np.abs(x[:, :, None]),
                                     np.abs(wt[:, :, None]), True, **kw_ref)
    assert_close("grad_x", gx, rx[:, :, 0], sx[:, :, 0], tol(prec, k // groups * kl))
    assert_close("grad_w", gw, rw[:, :, 0], sw[:, :, 0], tol(prec, min(n * want.shape[2], ops.HACC_CHUNK)))
    assert_close("grad_b", gb, rb, sb, tol("half" if prec != "float" else "float", n * want.shape[2]))


@pytest.mark.parametrize("prec", list(PRECISIONS))
def test_weight_grad_huge_batch(dev, prec):
    """batch 65536 (more than a CUDA grid's y/z extent) on a 2x2 image: the split reduction."""
    dtype, acc = PRECISIONS[prec]
    rng = np.random.default_rng(3)
    n = 65536
    x = rand(rng, (n, 2, 2, 2), dtype)
    wt = rand(rng, (3, 2, 1, 2), dtype)
    b = rand(rng, (3,), dtype)
    gy = rand(rng, (n, 3, 2, 1), dtype)
    kw_ref = dict(stride=(1, 1), pad=(0, 0, 0, 0), dilation=(1, 1), groups=1)
    gx, gw, gb = F.conv2d_backward(gy, x, wt, b, accumulate=acc)
    rx, rw, rb = ref.conv2d_backward(gy, x, wt, True, **kw_ref)
    sx, sw, sb = ref.conv2d_backward(np.abs(gy), np.abs(x), np.abs(wt), True, **kw_ref)
    assert_close("grad_x", gx, rx, sx, tol(prec, 6))
    # partial sums are float across chunks: the chunk length bounds the fp16 accumulation
    assert_close("grad_w", gw, rw, sw, tol(prec, ops.HACC_CHUNK) if prec == "hacc_half" else
                 tol(prec, 2 * n))
    assert_close("grad_b", gb, rb, sb, tol("half" if prec != "float" else "float", 2 * n))


def test_dedicated_kernels(dev, monkeypatch):
    """Backward passes dispatch the input-, weight- and bias-gradient kernels (not forward calls);
    conv_transpose2d runs the input-gradient kernel, its backward the forward and weight kernels.
    (The tiled path: Winograd, which takes this 3x3 conv on cuda, and the unfolded GEMMs, which
    take it on cpu, are checked in their own tests.)"""
    monkeypatch.setattr(ops, "WINOGRAD", {"fwd": {}, "data": {}, "weight": {}})
    monkeypatch.setattr(ops.im2col, "eligible", lambda *a, **k: False)
    rng = np.random.default_rng(4)
    x, wt, b = rand(rng, (1, 32, 5, 5), np.float32), rand(rng, (32, 32, 3, 3), np.float32), \
        rand(rng, (32,), np.float32)
    dev.reset_counts()
    F.conv2d_backward(rand(rng, (1, 32, 5, 5), np.float32), x, wt, b, padding=1)
    dev.synchronize()
    names = set(dev.dispatch_counts)
    kinds = {n.split("_t")[0] for n in names}
    pack = "conv2d_pack_weight_float"  # re-layout of w for the tiled kernels
    assert kinds == {"conv2d_bwd_data", "conv2d_bwd_weight", "conv2d_bwd_bias_float",
                     "conv2d_bwd_reduce_float", pack}, names
    # 1x1: the input gradient reads w as it is (its packed layout is w's own)
    dev.reset_counts()
    gx1 = F.conv2d_backward(rand(rng, (1, 32, 5, 5), np.float32), x, wt[:, :, :1, :1].copy(), None)
    assert pack not in dev.dispatch_counts and gx1[0].shape == x.shape
    dev.reset_counts()
    F.conv_transpose2d(x, wt, b, padding=1)
    assert {n.split("_t")[0] for n in dev.dispatch_counts} == {"conv2d_bwd_data", pack}
    dev.reset_counts()
    F.conv_transpose2d_backward(rand(rng, (1, 32, 5, 5), np.float32), x, wt, b, padding=1)
    assert {n.split("_t")[0] for n in dev.dispatch_counts} == {
        "conv2d_fwd", "conv2d_bwd_weight", "conv2d_bwd_bias_float", "conv2d_bwd_reduce_float", pack}


def test_im2col_chunks(dev, monkeypatch):
    """The unfolded-GEMM path (the cpu backend's default for ungrouped float32 convs) in chunks
    of images smaller than the batch (the last one partial): forward with bias and activation,
    input gradient, weight gradient accumulated over the chunks, conv_transpose2d with bias;
    on cpu every conv's default dispatch is this path."""
    if not dev.supports_views:
        pytest.skip("the unfolded path needs buffer views (metal binds whole buffers)")
    monkeypatch.setattr(ops, "FORCE", {"fwd": "im2col", "data": "im2col", "weight": "im2col"})
    rng = np.random.default_rng(12)
    n, c, h, w, k = 5, 3, 9, 7, 4
    x, wt, b = rand(rng, (n, c, h, w), np.float32), rand(rng, (k, c, 3, 2), np.float32), \
        rand(rng, (k,), np.float32)
    kw = dict(stride=(2, 1), padding=(1, 1), dilation=(1, 2))
    kw_ref = dict(stride=(2, 1), pad=(1, 1, 1, 1), dilation=(1, 2), groups=1)
    per = c * 3 * 2 * 5 * 5 * 4  # one image's columns (OH = OW = 5)
    monkeypatch.setattr(ops.im2col, "COL_BYTES", 2 * per)  # chunks of 2, 2, 1 images
    dev.reset_counts()
    y = F.conv2d(x, wt, b, activation="relu", **kw).numpy()
    want = np.maximum(ref.conv2d(x, wt, b, **kw_ref), 0)
    scale = ref.conv2d(np.abs(x), np.abs(wt), np.abs(b), **kw_ref)
    assert_close("y", y, want, scale, tol("float", c * 6))
    gy = rand(rng, want.shape, np.float32)
    gx, gw, gb = F.conv2d_backward(gy, x, wt, b, **kw)
    rx, rw, rb = ref.conv2d_backward(gy, x, wt, True, **kw_ref)
    sx, sw, _ = ref.conv2d_backward(np.abs(gy), np.abs(x), np.abs(wt), True, **kw_ref)
    assert_close("grad_x", gx.numpy(), rx, sx, tol("float", k * 6))
    assert_close("grad_w", gw.numpy(), rw, sw, tol("float", n * 25))
    assert_close("grad_b", gb.numpy(), rb, np.abs(rb) + 1, tol("float", n * 25))
    names = set(dev.dispatch_counts)
    assert {"conv2d_im2col_float", "conv2d_col2im_float", "conv2d_bias_fill_float"} <= names
    assert not any(s.startswith(("conv2d_fwd", "conv2d_bwd_data", "conv2d_bwd_weight")) for s in names), names
    # conv_transpose2d (the input gradient's plan) with its bias
    xt = rand(rng, (n, k, 5, 5), np.float32)
    bt = rand(rng, (c,), np.float32)
    yt = F.conv_transpose2d(xt, wt, bt, stride=(2, 1), padding=(1, 1), dilation=(1, 2),
                            output_padding=(0, 0)).numpy()
    g_ref = ref.conv2d_backward(xt, np.zeros((n, c, 9, 5)), wt, False, **kw_ref)[0] + bt[:, None, None]
    assert_close("conv_transpose2d", yt, g_ref, np.abs(g_ref) + 1, tol("float", k * 6))
    if dev.name == "cpu":  # the default there for the forward and both gradients
        monkeypatch.setattr(ops, "FORCE", {})
        dev.reset_counts()
        F.conv2d_backward(gy, x, wt, b, **kw)[1].numpy()
        assert {"conv2d_col2im_float", "conv2d_im2col_t_float"} <= set(dev.dispatch_counts)
        dev.reset_counts()
        F.conv2d(x, wt, b, **kw).numpy()
        assert "conv2d_im2col_float" in dev.dispatch_counts
        assert not any(s.startswith("conv2d_fwd") for s in dev.dispatch_counts)


@pytest.mark.parametrize("w, pad, dil", [(37, (1, 3), (1, 2)), (16, (0, 0), (1, 1)),
                                          (1, (1, 2), (2, 1)), (33, (2, 0), (1, 3))])
def test_im2col_input_grad_stride1_row_chunks(dev, monkeypatch, w, pad, dil) -> None:
    """At stride 1 col2im adds whole runs of a row per tap (CONV_COL2IM_W elements per thread):
    widths below, at and past one chunk, taps that fall off either edge, dilation."""
    if not dev.supports_views:
        pytest.skip("the unfolded path needs buffer views (metal binds whole buffers)")
    monkeypatch.setattr(ops, "FORCE", {"fwd": "im2col", "data": "im2col", "weight": "im2col"})
    rng = np.random.default_rng(13)
    n, c, h, k = 2, 3, 5, 4
    x, wt = rand(rng, (n, c, h, w), np.float32), rand(rng, (k, c, 3, 5), np.float32)
    kw = dict(stride=1, padding=pad, dilation=dil)
    kw_ref = dict(stride=(1, 1), pad=(pad[0], pad[0], pad[1], pad[1]), dilation=dil, groups=1)
    oh = h + 2 * pad[0] - dil[0] * 2
    ow = w + 2 * pad[1] - dil[1] * 4
    if oh < 1 or ow < 1:
        pytest.skip("no output")
    gy = rand(rng, (n, k, oh, ow), np.float32)
    dev.reset_counts()
    gx = F.conv2d_backward(gy, x, wt, None, **kw)[0].numpy()
    assert "conv2d_col2im_float" in dev.dispatch_counts
    rx = ref.conv2d_backward(gy, x, wt, False, **kw_ref)[0]
    sx = ref.conv2d_backward(np.abs(gy), np.abs(x), np.abs(wt), False, **kw_ref)[0]
    assert_close("grad_x", gx, rx, sx, tol("float", k * 15))
    bt = rand(rng, (c,), np.float32)  # conv_transpose2d: the same kernel with a bias
    yt = F.conv_transpose2d(gy, wt, bt, stride=1, padding=pad, dilation=dil).numpy()
    assert_close("conv_transpose2d", yt, rx + bt[:, None, None], sx + np.abs(bt)[:, None, None],
                 tol("float", k * 15))


# ---- the references themselves ------------------------------------------------------------------

def _fd_check(f, args, grads, seed=0, eps=1e-6):
    """grads[i] == d/d args[i] of sum(f(*args) * R) by central differences (float64)."""
    rng = np.random.default_rng(seed)
    y = f(*args)
    proj = rng.standard_normal(y.shape)
    for i, (a, g) in enumerate(zip(args, grads)):
        num = numeric_grad(lambda: np.sum(f(*args) * proj), a, eps)
        np.testing.assert_allclose(g, num, rtol=1e-6, atol=1e-7, err_msg=f"argument {i}")
    return proj


@pytest.mark.parametrize("case", [
    ((2, 4, 5, 6), (4, 2, 3, 2), dict(stride=(2, 1), pad=(1, 2, 0, 1), dilation=(1, 2), groups=2)),
    ((1, 2, 4, 4), (3, 2, 2, 2), dict(stride=(3, 3), pad=(0, 0, 0, 0), dilation=(1, 1), groups=1)),
])
def test_reference_conv2d_backward_finite_differences(case):
    xs, ws, kw = case
    rng = np.random.default_rng(5)
    x, w, b = rng.standard_normal(xs), rng.standard_normal(ws), rng.standard_normal(ws[0])
    f = lambda x_, w_, b_: ref.conv2d(x_, w_, b_, **kw)
    rng2 = np.random.default_rng(0)
    proj = rng2.standard_normal(f(x, w, b).shape)
    gx, gw, gb = ref.conv2d_backward(proj, x, w, True, **kw)
    _fd_check(f, [x, w, b], [gx, gw, gb], seed=0)


@pytest.mark.parametrize("case", [
    ((2, 4, 3, 3), (4, 3, 3, 2), dict(stride=(2, 1), padding=(1, 0), output_padding=(1, 0),
                                      dilation=(1, 2), groups=2)),
    ((1, 2, 2, 3), (2, 1, 2, 2), dict(stride=(3, 2), padding=(0, 1), output_padding=(2, 0),
                                      dilation=(1, 1), groups=1)),
])
def test_reference_conv_transpose2d_backward_finite_differences(case):
    xs, ws, kw = case
    rng = np.random.default_rng(6)
    x, w = rng.standard_normal(xs), rng.standard_normal(ws)
    b = rng.standard_normal(ws[1] * kw["groups"])
    f = lambda x_, w_, b_: ref.conv_transpose2d(x_, w_, b_, **kw)
    proj = np.random.default_rng(0).standard_normal(f(x, w, b).shape)
    gx, gw, gb = ref.conv_transpose2d_backward(proj, x, w, True, **kw)
    _fd_check(f, [x, w, b], [gx, gw, gb], seed=0)


def test_reference_against_torch():
    torch = pytest.importorskip("torch")
    tf = torch.nn.functional
    rng = np.random.default_rng(7)
    for (n, c, h, w, k, kh, kw, st, pad, dil, g) in [
            (2, 4, 7, 6, 6, 3, 2, (2, 1), (1, 2, 0, 1), (2, 1), 2),
            (1, 6, 5, 5, 6, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 6),
            (2, 3, 9, 8, 4, 5, 3, (3, 2), (2, 2, 1, 1), (1, 2), 1)]:
        x, wt, b = rng.standard_normal((n, c, h, w)), rng.standard_normal((k, c // g, kh, kw)), \
            rng.standard_normal(k)
        tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, wt, b))
        ty = tf.conv2d(tf.pad(tx, (pad[2], pad[3], pad[0], pad[1])), tw, tb, st, 0, dil, g)
        y = ref.conv2d(x, wt, b, st, pad, dil, g)
        np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-10, atol=1e-10)
        gy = rng.standard_normal(y.shape)
        ty.backward(torch.tensor(gy))
        for mine, theirs in zip(ref.conv2d_backward(gy, x, wt, True, st, pad, dil, g),
                                (tx.grad, tw.grad, tb.grad)):
            np.testing.assert_allclose(mine, theirs.numpy(), rtol=1e-10, atol=1e-10)
        # the transpose, with the same tensors' shapes reinterpreted
        for op in ((0, 0), (1, 0)):
            if op[0] >= max(st[0], dil[0]):
                continue
            wt2 = rng.standard_normal((c, k // g, kh, kw))
            kw_t = dict(stride=st, padding=(1, 0), output_padding=op, dilation=dil, groups=g)
            tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, wt2, b))
            ty = tf.conv_transpose2d(tx, tw, tb, st, (1, 0), op, g, dil)
            y = ref.conv_transpose2d(x, wt2, b, **kw_t)
            np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-10, atol=1e-10)
            gy = rng.standard_normal(y.shape)
            ty.backward(torch.tensor(gy))
            for mine, theirs in zip(ref.conv_transpose2d_backward(gy, x, wt2, True, **kw_t),
                                    (tx.grad, tw.grad, tb.grad)):
                np.testing.assert_allclose(mine, theirs.numpy(), rtol=1e-10, atol=1e-10)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_same_padding_matches_torch_and_tensorflow_convention():
    """'same' with stride 1 equals torch's padding='same' (extra on the bottom/right); with
    stride 2 the output is ceil(H / 2), also extra at the bottom/right (TensorFlow/MPS)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(8)
    x, w = rng.standard_normal((1, 2, 6, 7)), rng.standard_normal((3, 2, 4, 2))
    ty = torch.nn.functional.conv2d(torch.tensor(x), torch.tensor(w), padding="same")
    np.testing.assert_allclose(F.conv2d(x.astype(np.float32), w.astype(np.float32), padding="same"),
                               ty.numpy(), rtol=1e-5, atol=1e-5)
    y = F.conv2d(x.astype(np.float32), w.astype(np.float32), stride=2, padding="same")
    assert y.shape == (1, 3, 3, 4)
    # total padding 2 rows (top 1, bottom 1) and 0 columns... with stride 2: H 6 -> rows
    # (3-1)*2 + 4 - 6 = 2 -> (1, 1); W 7 -> (4-1)*2 + 2 - 7 = 1 -> (0, 1)
    want = ref.conv2d(x, w, None, (2, 2), (1, 1, 0, 1), (1, 1), 1)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


# ---- property test ----------------------------------------------------------------------------

def test_random_configurations(dev):
    hyp = pytest.importorskip("hypothesis")
    st = pytest.importorskip("hypothesis.strategies")

    @st.composite
    def configs(draw):
        g = draw(st.sampled_from([1, 1, 2, 3]))
        cg, kg = draw(st.integers(1, 5)), draw(st.integers(1, 20))
        kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
        sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
        dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
        pads = tuple(draw(st.integers(0, 3)) for _ in range(4))
        h = draw(st.integers(max(1, dh * (kh - 1) + 1 - pads[0] - pads[1]), 9))
        w = draw(st.integers(max(1, dw * (kw - 1) + 1 - pads[2] - pads[3]), 9))
        n = draw(st.integers(1, 3))
        prec = draw(st.sampled_from(list(PRECISIONS)))
        path = draw(st.sampled_from([None, ("direct", 0)] + [("tiled", i) for i in range(len(FWD_TILES))]))
        return (n, cg * g, h, w, kg * g, kh, kw, (sh, sw), pads, (dh, dw), g), prec, path

    @hyp.settings(max_examples=12, deadline=None, derandomize=True, database=None)
    @hyp.given(configs())
    def check(cfg):
        case, prec, path = cfg
        old = ops.FORCE
        ops.FORCE = force(*path) if path else {}
        try:
            run_conv2d_case(case, prec, seed=9)
        finally:
            ops.FORCE = old

    check()


# ---- bad input --------------------------------------------------------------------------------

def _x(*s, dtype=np.float32):
    return np.zeros(s, dtype)


BAD = [
    ("w", lambda: F.conv2d(_x(1, 4, 5, 5), _x(2, 3, 3, 3))),                        # in-channels
    ("groups", lambda: F.conv2d(_x(1, 4, 5, 5), _x(2, 2, 3, 3), groups=3)),
    ("groups", lambda: F.conv2d(_x(1, 4, 5, 5), _x(3, 2, 3, 3), groups=2)),          # K % groups
    ("groups", lambda: F.conv2d(_x(1, 4, 5, 5), _x(4, 2, 3, 3), groups=0)),
    ("w", lambda: F.conv2d(_x(1, 4, 2, 5), _x(4, 4, 3, 3))),                         # kernel > input
    ("w", lambda: F.conv2d(_x(1, 4, 5, 5), _x(4, 4, 3, 3), padding=1, dilation=4)),
    ("x", lambda: F.conv2d(_x(0, 4, 5, 5), _x(4, 4, 3, 3))),
    ("w", lambda: F.conv2d(_x(1, 4, 5, 5), _x(0, 4, 3, 3))),
    ("stride", lambda: F.conv2d(_x(1, 4, 5, 5), _x(4, 4, 3, 3), stride=0)),
    ("stride", lambda: F.conv2d(_x(1, 4, 5, 5), _x(4, 4, 3, 3), stride=(1, -1))),
    ("dilation", lambda: F.conv2d(_x(1, 4, 5, 5), _x(4, 4, 3, 3), dilation=0)),
    ("padding", lambda: F.conv2d(_x(1, 4, 5, 5), _x(4, 4, 3, 3), padding=-1)),
    ("padding", lambda: F.conv2d(_x(1, 4, 5, 5), _x(4, 4, 3, 3), padding=(1, 2, 3))),
    ("padding", lambda: F.conv2d(_x(1, 4, 5, 5), _x(4, 4, 3, 3), padding="full")),
    ("x", lambda: F.conv2d(_x(1, 4, 5, 5, dtype=np.int32), _x(4, 4, 3, 3, dtype=np.int32))),
    ("w", lambda: F.conv2d(_x(1, 4, 5, 5), _x(4, 4, 3, 3, dtype=np.float16))),
    ("b", lambda: F.conv2d(_x(1, 4, 5, 5), _x(4, 4, 3, 3), _x(4, dtype=np.float16))),
    ("b", lambda: F.conv2d(_x(1, 4, 5, 5), _x(4, 4, 3, 3), _x(5))),
    ("x", lambda: F.conv2d(_x(5, 5), _x(4, 4, 3, 3))),  # (C, H, W) is torch's unbatched form
    ("w", lambda: F.conv2d(_x(1, 4, 5, 5), _x(4, 4, 3))),
    ("accumulate", lambda: F.conv2d(_x(1, 4, 5, 5), _x(4, 4, 3, 3), accumulate="half")),
    ("accumulate", lambda: F.conv2d(_x(1, 4, 5, 5), _x(4, 4, 3, 3), accumulate="double")),
    ("grad_out", lambda: F.conv2d_backward(_x(1, 4, 3, 4), _x(1, 4, 5, 5), _x(4, 4, 3, 3))),
    ("grad_out", lambda: F.conv2d_backward(_x(1, 4, 3, 3, dtype=np.float16), _x(1, 4, 5, 5),
                                           _x(4, 4, 3, 3))),
    ("accumulate", lambda: F.conv2d_backward(_x(1, 4, 3, 3), _x(1, 4, 5, 5), _x(4, 4, 3, 3),
                                             accumulate="half")),
    ("x", lambda: F.conv1d(_x(1, 4, 5, 5), _x(4, 4, 3))),
    ("padding", lambda: F.conv1d(_x(1, 4, 5), _x(4, 4, 3), padding=(1, 2, 3))),
    ("output_padding", lambda: F.conv_transpose2d(_x(1, 4, 5, 5), _x(4, 2, 3, 3), stride=2,
                                                  output_padding=2)),
    ("output_padding", lambda: F.conv_transpose2d(_x(1, 4, 5, 5), _x(4, 2, 3, 3), stride=(2, 1),
                                                  dilation=(1, 1), output_padding=(0, 1))),
    ("w", lambda: F.conv_transpose2d(_x(1, 4, 5, 5), _x(3, 2, 3, 3))),
    ("groups", lambda: F.conv_transpose2d(_x(1, 4, 5, 5), _x(4, 2, 3, 3), groups=3)),
    ("padding", lambda: F.conv_transpose2d(_x(1, 4, 1, 1), _x(4, 2, 1, 1), padding=1)),
    ("padding", lambda: F.conv_transpose2d(_x(1, 4, 5, 5), _x(4, 2, 3, 3), padding=-1)),
    ("b", lambda: F.conv_transpose2d(_x(1, 4, 5, 5), _x(4, 2, 3, 3), _x(4))),
    ("grad_out", lambda: F.conv_transpose2d_backward(_x(1, 2, 4, 5), _x(1, 4, 5, 5), _x(4, 2, 3, 3),
                                                     padding=1)),
    ("x", lambda: F.conv_transpose2d(_x(4, 5), _x(4, 2, 3, 3))),
]


@pytest.mark.parametrize("name,call", BAD, ids=[f"{i}-{b[0]}" for i, b in enumerate(BAD)])
def test_bad_input_raises_before_dispatch(name, call, no_dispatch):
    dev = pymetalnn.device()  # where numpy arguments go
    dev.synchronize()
    with no_dispatch(dev), pytest.raises(ValueError, match=rf"^{name}:"):
        call()


# ---- fused activation (conv2d(..., activation=)) --------------------------------------------------

ACTS = [None, "relu", ("leaky_relu", {"negative_slope": 0.2}), "sigmoid", "tanh"]
ACT_IDS = ["none", "relu", "leaky_relu", "sigmoid", "tanh"]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
def test_conv2d_fused_activation(dev, monkeypatch, algo, act, dtype):
    """conv2d(..., activation=) == act(conv2d(...)) in one dispatch; conv2d_backward(...,
    activation=, y=) == conv2d_backward of grad_out * act'(pre-activation)."""
    monkeypatch.setattr(ops, "FORCE", force(algo, ACTS.index(act)))
    rng = np.random.default_rng(11)
    x, w, b = rand(rng, (2, 5, 6, 6), dtype), rand(rng, (20, 5, 3, 3), dtype), \
        rand(rng, (20,), dtype)
    g = rand(rng, (2, 20, 6, 6), dtype)
    xt, wt, bt, gt = (pymetalnn.tensor(a, dev) for a in (x, w, b, g))
    z = F.conv2d(xt, wt, bt, padding=1).numpy().astype(np.float64)
    before = sum(dev.dispatch_counts.values())
    yt = F.conv2d(xt, wt, bt, padding=1, activation=act)
    n_fused = sum(dev.dispatch_counts.values()) - before
    before = sum(dev.dispatch_counts.values())
    F.conv2d(xt, wt, bt, padding=1)
    assert n_fused == sum(dev.dispatch_counts.values()) - before  # no extra kernel
    y = yt.numpy().astype(np.float64)
    want, d = np_act(z, act)
    t = 1e-6 if dtype == np.float32 else 2 * U16
    np.testing.assert_allclose(y, want, rtol=t, atol=t)
    if dtype == np.float16:
        return
    got = F.conv2d_backward(gt, xt, wt, bt, padding=1, activation=act, y=yt)
    gz = pymetalnn.tensor((g * d).astype(dtype), dev)
    ref_grads = F.conv2d_backward(gz, xt, wt, bt, padding=1)
    for name, a, r in zip(("dx", "dw", "db"), got, ref_grads):
        np.testing.assert_allclose(a.numpy(), r.numpy(), rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("tile", ["direct"] + FWD_TILES)
def test_conv2d_strided_out(dev, monkeypatch, tile):
    """conv2d(..., out=view at channel c0 of a larger tensor, out_batch_stride=) writes exactly
    the contiguous result into that channel slice (bias and fused activation included) and leaves
    the rest of the destination (poisoned) untouched: every tile kernel and the direct one."""
    if not dev.supports_views:
        pytest.skip("out= at an offset needs buffer views")
    monkeypatch.setattr(ops, "FORCE", {"fwd": tile})
    rng = np.random.default_rng(21)
    n, k, ktot, c0 = 3, 6, 11, 4
    x, w, b = rand(rng, (n, 5, 7, 6), np.float32), rand(rng, (k, 5, 3, 3), np.float32), \
        rand(rng, (k,), np.float32)
    xt, wt, bt = (pymetalnn.tensor(a, dev) for a in (x, w, b))
    want = F.conv2d(xt, wt, bt, padding=1, activation="relu").numpy()
    poison = np.full((n, ktot, 7, 6), np.nan, np.float32)
    dest = pymetalnn.tensor(poison, dev)
    hw = 7 * 6
    view = pymetalnn.Tensor(dest.buffer.view(c0 * hw * 4), (n, k, 7, 6), np.float32)
    y = F.conv2d(xt, wt, bt, padding=1, activation="relu", out=view,
                 out_batch_stride=ktot * hw)
    assert y.shape == (n, k, 7, 6)
    got = dest.numpy()
    np.testing.assert_array_equal(got[:, c0:c0 + k], want)
    rest = np.delete(got, np.s_[c0:c0 + k], axis=1)
    assert np.isnan(rest).all(), "wrote outside the slice"
    # contiguous out= (no stride) is plain conv2d into that buffer
    y2 = F.conv2d(xt, wt, bt, padding=1, activation="relu",
                  out=pymetalnn.tensor(np.zeros((n, k, 7, 6), np.float32), dev))
    np.testing.assert_array_equal(y2.numpy(), want)
    with pytest.raises(ValueError, match="out_batch_stride"):
        F.conv2d(xt, wt, bt, padding=1, out=view, out_batch_stride=k * hw - 1)
    with pytest.raises(ValueError, match="out: .* bytes"):
        F.conv2d(xt, wt, bt, padding=1, out=pymetalnn.Tensor(dest.buffer.view(
            (ktot - k + 1) * hw * 4), (n, k, 7, 6), np.float32), out_batch_stride=ktot * hw)


def test_conv_temporaries_come_from_scratch(dev):
    """Packed weights, split-reduction partials and Winograd operands come from the per-device
    scratch (_common.scratch): repeating an op allocates only its results, and the scratch views
    of one call never overlap."""
    if not dev.supports_views:
        pytest.skip("the scratch needs buffer views")
    from pymetalnn.ops._common import scratch
    rng = np.random.default_rng(31)
    x = pymetalnn.tensor(rand(rng, (2, 16, 9, 9), np.float32), dev)
    w = pymetalnn.tensor(rand(rng, (16, 16, 3, 3), np.float32), dev)
    gy = pymetalnn.tensor(rand(rng, (2, 16, 9, 9), np.float32), dev)
    for force in ({}, {"fwd": "wino4", "data": "wino4", "weight": "wino4"}):
        old, ops.FORCE = ops.FORCE, force
        try:
            keep = [F.conv2d_backward(gy, x, w, None, padding=1)]  # grows the scratch
            before = dev.memory_allocated()
            keep += [F.conv2d_backward(gy, x, w, None, padding=1) for _ in range(2)]
            results = 2 * (x.nbytes + w.nbytes)  # grad_x and grad_w of the two calls
            assert dev.memory_allocated() - before == results
        finally:
            ops.FORCE = old
    views = scratch(dev, [100, 1, 4096], "test")
    spans = sorted((v.offset, v.offset + v.nbytes) for v in views)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    assert [v.nbytes for v in views] == [100, 1, 4096]
    grown = scratch(dev, [1 << 20], "test")[0]
    assert grown.base is not views[0].base and grown.nbytes == 1 << 20


# ---- torch's calling conventions: unbatched inputs, keywords, conv_transpose1d ------------------

@pytest.mark.parametrize("case", [
    # (N, C_in, L, C_out, K, stride, padding, output_padding, groups, dilation)
    (2, 4, 5, 6, 3, 2, 1, 1, 2, 1), (1, 3, 1, 2, 1, 1, 0, 0, 1, 1), (3, 2, 7, 4, 4, 3, 2, 0, 1, 2),
    (1, 6, 33, 3, 5, 1, 2, 0, 3, 1), (2, 1, 4, 1, 2, 5, 0, 4, 1, 1),
])
def test_conv_transpose1d(dev, case):
    """conv_transpose1d (torch's positional order) against the 2-D reference with H = 1, the
    gradients by finite differences of the reference, unbatched (C, L) input too."""
    n, cin, length, cout, k, s, p, op, g, d = case
    rng = np.random.default_rng(sum(case))
    x = rng.standard_normal((n, cin, length))
    w = rng.standard_normal((cin, cout // g, k))
    b = rng.standard_normal(cout)
    kw = dict(stride=(1, s), padding=(0, p), output_padding=(0, op), dilation=(1, d), groups=g)
    want = ref.conv_transpose2d(x[:, :, None], w[:, :, None], b, **kw)[:, :, 0]
    y = F.conv_transpose1d(x.astype(np.float32), w.astype(np.float32), b.astype(np.float32), s, p, op, g, d)
    np.testing.assert_allclose(y.numpy(), want, rtol=1e-5, atol=1e-5)
    gy = rng.standard_normal(want.shape)
    gx, gw, gb = F.conv_transpose1d_backward(gy.astype(np.float32), x.astype(np.float32),
                                             w.astype(np.float32), b.astype(np.float32), s, p, op, g, d)
    f = lambda x_, w_: (gy * ref.conv_transpose2d(x_[:, :, None], w_[:, :, None], b, **kw)[:, :, 0]).sum()  # noqa: E731
    np.testing.assert_allclose(gx.numpy(), numeric_grad(lambda: f(x, w), x), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gw.numpy(), numeric_grad(lambda: f(x, w), w), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gb.numpy(), gy.sum(axis=(0, 2)), rtol=1e-5, atol=1e-5)
    y1 = F.conv_transpose1d(x[0].astype(np.float32), w.astype(np.float32), None, s, p, op, g, d)
    np.testing.assert_allclose(y1.numpy(), want[0] - b[:, None], rtol=1e-5, atol=1e-5)


def test_unbatched_and_keywords(dev):
    """(C, H, W) / (C, L) inputs give torch's unbatched results (forward and input gradient), and
    torch's keyword names input=/weight=/bias= work."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 7, 6)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    y = F.conv2d(input=x, weight=w, bias=b, stride=2, padding=1)
    want = F.conv2d(x[None], w, b, 2, 1).numpy()[0]
    assert y.shape == want.shape
    np.testing.assert_allclose(y.numpy(), want, rtol=1e-6)
    gy = rng.standard_normal(want.shape).astype(np.float32)
    gx, gw, gb = F.conv2d_backward(gy, x, w, b, 2, 1)
    rx, rw, rb = F.conv2d_backward(gy[None], x[None], w, b, 2, 1)
    assert gx.shape == x.shape
    np.testing.assert_allclose(gx.numpy(), rx.numpy()[0], rtol=1e-6)
    np.testing.assert_allclose(gw.numpy(), rw.numpy(), rtol=1e-6)
    x1 = rng.standard_normal((3, 9)).astype(np.float32)
    w1 = rng.standard_normal((5, 3, 2)).astype(np.float32)
    y1 = F.conv1d(input=x1, weight=w1, bias=None, dilation=2)
    np.testing.assert_allclose(y1.numpy(), F.conv1d(x1[None], w1, None, 1, 0, 2).numpy()[0], rtol=1e-6)
    g1 = rng.standard_normal(y1.shape).astype(np.float32)
    np.testing.assert_allclose(F.conv1d_backward(g1, x1, w1, None, 1, 0, 2)[0].numpy(),
                               F.conv1d_backward(g1[None], x1[None], w1, None, 1, 0, 2)[0].numpy()[0],
                               rtol=1e-6)
    wt = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    yt = F.conv_transpose2d(input=x, weight=wt, stride=2)
    np.testing.assert_allclose(yt.numpy(), F.conv_transpose2d(x[None], wt, None, 2).numpy()[0], rtol=1e-6)
    xl = rng.standard_normal((2, 5)).astype(np.float32)
    wl = rng.standard_normal((3, 5)).astype(np.float32)
    np.testing.assert_allclose(F.linear(input=xl, weight=wl, bias=None).numpy(), xl @ wl.T, rtol=1e-5)
    torch = pytest.importorskip("torch")
    tf = torch.nn.functional
    np.testing.assert_allclose(y.numpy(), tf.conv2d(torch.tensor(x), torch.tensor(w), torch.tensor(b), 2, 1),
                               rtol=1e-4, atol=1e-5)
    # conv_transpose2d's positional order is torch's (..., output_padding, groups, dilation)
    xg = rng.standard_normal((1, 4, 5, 5)).astype(np.float32)
    wg = rng.standard_normal((4, 1, 3, 3)).astype(np.float32)
    np.testing.assert_allclose(F.conv_transpose2d(xg, wg, None, 2, 1, 1, 2, 3).numpy(),
                               tf.conv_transpose2d(torch.tensor(xg), torch.tensor(wg), None, 2, 1, 1, 2, 3),
                               rtol=1e-4, atol=1e-5)


# ---- the fp32 accuracy budget (pymetalnn/accuracy.py, docs/accuracy.md) ------------------------
# benchmarks/bench_conv.py's six shapes (N, C, K, H, W, (KH, KW), stride, padding), scaled for
# cpu: each op keeps the image size and the reduction length that drives its error (forward
# C*KH*KW, input gradient K*KH*KW, weight gradient N*OH*OW) and sheds what only repeats
# independent sums (the batch of the forward and input gradient; 16 channels on the side that is
# not reduced, still wide enough for the tiled and Winograd kernels).
BENCH_SHAPES = {
    "lenet-conv2-5x5": (64, 32, 64, 14, 14, (5, 5), 1, (2, 2)),
    "resnet-3x3": (32, 64, 64, 56, 56, (3, 3), 1, (1, 1)),
    "1x1-256to64": (32, 256, 64, 56, 56, (1, 1), 1, (0, 0)),
    "inception-1x7": (32, 128, 128, 17, 17, (1, 7), 1, (0, 3)),
    "inception-7x1": (32, 128, 128, 17, 17, (7, 1), 1, (3, 0)),
    "3x3-s2": (32, 128, 256, 28, 28, (3, 3), 2, (1, 1)),
}
BUDGET_RUNS = [pytest.param(s, op, id=f"{s}-{op}") for s in BENCH_SHAPES
               for op in ("fwd", "data", "weight")]


def _budget_shape(name: str, op: str) -> tuple:
    n, c, k, h, w, ks, st, pad = BENCH_SHAPES[name]
    if op == "fwd":
        return 1, c, 16, h, w, ks, st, pad
    if op == "data":
        return 1, 16, k, h, w, ks, st, pad
    return n, 16, 16, h, w, ks, st, pad


@pytest.mark.parametrize("name,op", BUDGET_RUNS)
def test_conv2d_fp32_budget(dev, monkeypatch, name, op):
    """float32 on bench_conv's shapes against float64: the direct/tiled kernels within the
    ceiling; the unfolded GEMMs (im2col) and the Winograd variant the default selection
    ("budget") runs on cuda, if any, within min(10x the tiled kernels' error on the same inputs,
    ceiling). (Every variant, opt-in
    ones included: benchmarks/dev_accuracy.py.)"""
    from pymetalnn import accuracy
    from pymetalnn.ops import conv_winograd as wino

    n, c, k, h, w, (kh, kw), st, pad = _budget_shape(name, op)
    rng = np.random.default_rng(41)
    x, wt = rand(rng, (n, c, h, w), np.float32), rand(rng, (k, c, kh, kw), np.float32)
    geo = ops._conv_geometry((n, c, h, w), (k, c, kh, kw), st, pad, 1, 1)
    gy = rand(rng, (n, k, geo.OH, geo.OW), np.float32)
    kw_ref = dict(stride=(st, st), pad=(pad[0], pad[0], pad[1], pad[1]), dilation=(1, 1), groups=1)
    if op == "fwd":
        want = ref.conv2d(x, wt, None, **kw_ref)
    else:
        want = ref.conv2d_backward(gy, x, wt, False, **kw_ref)[0 if op == "data" else 1]
    xt, wtt, gyt = (pymetalnn.tensor(a, dev) for a in (x, wt, gy))

    def run() -> np.ndarray:
        if op == "fwd":
            return ops._forward(dev, "float", geo, xt, wtt, None, np.float32).numpy()
        if op == "data":
            return ops._input_grad(dev, "float", geo, gyt, wtt, None, np.float32).numpy()
        return ops._weight_grad(dev, "float", geo, gyt, xt, np.float32).numpy()

    monkeypatch.setattr(ops, "WINOGRAD", ops.WINOGRAD_MODES["off"])
    monkeypatch.setattr(ops, "ROWS_DEFAULT_KW", ())  # the base is the tiled kernels' error
    eligible = ops.im2col.eligible
    monkeypatch.setattr(ops.im2col, "eligible", lambda *a, **k: False)  # the tiled kernels
    direct = accuracy.rel_err(run(), want)
    assert direct <= accuracy.CEILING, f"direct/tiled kernels: error {direct:.3g}"
    # the unfolded GEMMs (the cpu backend's default) within the same budget as Winograd
    monkeypatch.setattr(ops.im2col, "eligible", eligible)
    monkeypatch.setattr(ops, "FORCE", {"fwd": "im2col", "data": "im2col", "weight": "im2col"})
    err = accuracy.rel_err(run(), want)
    assert accuracy.within(err, direct), f"im2col {op}: error {err:.3g} (tiled {direct:.3g})"
    if op == "weight" and st == 1 and kw in ops.ROWS_KW:  # the row-staged kernel, cuda's 5x5 default
        monkeypatch.setattr(ops, "FORCE", {"weight": "rows"})
        err = accuracy.rel_err(run(), want)
        assert accuracy.within(err, direct), f"rows{kw}: error {err:.3g} (tiled {direct:.3g})"
    monkeypatch.setattr(ops, "FORCE", {})
    m = ops.WINOGRAD_MODES["budget"][op].get(kh, 0)
    if not (m and wino.eligible(geo, "float", m)):
        return
    monkeypatch.setattr(ops, "FORCE", {op: f"wino{m}"})
    before = dict(dev.dispatch_counts)
    err = accuracy.rel_err(run(), want)
    ran = {q for q, cnt in dev.dispatch_counts.items() if cnt > before.get(q, 0)}
    assert any(f"wino{m}x{kh}" in q for q in ran), ran
    assert accuracy.within(err, direct), (
        f"F({m}x{m}, {kh}x{kh}) {op}, a default: error {err:.3g} > {accuracy.limit(direct):.3g} "
        f"(direct {direct:.3g})")
