"""Data-movement family (kernels/copy.metal) against the index-by-index references in
tests/reference/copy.py, on every backend. These ops move values without arithmetic, so results
must be bit-exact (cast: numpy's round-to-nearest-even float32 -> float16 conversion)."""
from __future__ import annotations

import numpy as np
import pytest
from reference import copy as ref

import pymetalnn as pm
from pymetalnn import functional as F

DTYPES = [np.float32, np.float16, np.int32]
IDS = ["f32", "f16", "i32"]


def rnd(shape: tuple, dtype, seed: int) -> np.ndarray:
    r = np.random.default_rng(seed)
    if np.dtype(dtype) == np.int32:
        return r.integers(-1000, 1000, shape).astype(np.int32)
    return r.standard_normal(shape).astype(dtype)


def same(got, want: np.ndarray, dtype) -> None:
    got = np.asarray(got)
    assert got.dtype == np.dtype(dtype), (got.dtype, dtype)
    assert got.shape == want.shape, (got.shape, want.shape)
    np.testing.assert_array_equal(got, want.astype(dtype))


# (shapes, dim): channels of NCHW with 1/31/32/33 channels, odd sizes, batch 1, other dims
CONCATS = [
    ([(1, 3, 5, 5), (1, 31, 5, 5)], 1),
    ([(2, 32, 3, 3), (2, 1, 3, 3), (2, 33, 3, 3)], 1),
    ([(2, 4, 2, 2), (2, 4, 2, 2)], 1),
    ([(3, 7), (5, 7), (1, 7)], 0),
    ([(2, 3, 5), (2, 3, 1), (2, 3, 4)], -1),
    ([(4, 0, 3), (4, 2, 3)], 1),
    ([(7,), (9,)], 0),
    ([(2, k, 2, 2) for k in range(1, 12)], 1),  # > 8 parts: two launches, vector path
    ([(3, k) for k in range(1, 11)], 1),  # odd widths: scalar path
    # whole 16-byte chunks in float16 too (concat_stream / split_stream), 3 rows
    ([(3, 2, 4, 4), (3, 6, 4, 4), (3, 1, 4, 4), (3, 4, 4, 4)], 1),
    # parts of several stream blocks (STREAM_U * STREAM_TG chunks), the last one partial
    ([(3, 40, 8, 9), (3, 24, 8, 9), (3, 1, 8, 9), (3, 4, 8, 9)], 1),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("case", CONCATS, ids=lambda c: f"{c[0]}-{c[1]}")
def test_concat_split(dev, case, dtype) -> None:
    shapes, dim = case
    xs = [rnd(s, dtype, i) for i, s in enumerate(shapes)]
    d = dim % len(shapes[0])
    out = F.concat([pm.tensor(x, dev) for x in xs], dim)
    same(out, ref.concat(xs, d), dtype)
    sizes = [s[d] for s in shapes]
    pieces = F.split(out, sizes, dim)
    for p, want in zip(pieces, ref.split(ref.concat(xs, d), sizes, d)):
        same(p, want, dtype)
    # backward: concat's is a split of grad_out, split's a concat of the pieces' gradients
    g = rnd(out.shape, dtype, 99)
    grads = F.concat_backward(pm.tensor(g, dev), [pm.tensor(x, dev) for x in xs], dim)
    for got, want in zip(grads, ref.concat_backward(g, shapes, d)):
        same(got, want, dtype)
    gs = [rnd(s, dtype, 50 + i) for i, s in enumerate(shapes)]
    same(F.split_backward([pm.tensor(v, dev) for v in gs], out, sizes, dim), ref.concat(gs, d), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["float32", "float16"])
def test_concat_split_stream_kernels(dev, dtype) -> None:
    """Parts of whole 16-byte chunks run concat_stream / split_stream (one part per block of
    STREAM_TG threads): a part of several blocks, one far shorter than a block, rows of the
    joined matrix that cross blocks; values against numpy."""
    shapes = [(2, 40, 72), (2, 1, 72), (2, 16, 72)]
    xs = [rnd(s, dtype, i) for i, s in enumerate(shapes)]
    name = "float" if dtype == np.float32 else "half"
    counts = dev.dispatch_counts
    before = (counts.get(f"concat_stream_fwd_{name}", 0), counts.get(f"split_stream_fwd_{name}", 0))
    out = F.concat([pm.tensor(x, dev) for x in xs], 1)
    same(out, ref.concat(xs, 1), dtype)
    pieces = F.split(out, [s[1] for s in shapes], 1)
    for p, want in zip(pieces, xs):
        same(p, want, dtype)
    assert (counts.get(f"concat_stream_fwd_{name}", 0), counts.get(f"split_stream_fwd_{name}", 0)) \
        == (before[0] + 1, before[1] + 1)


@pytest.mark.parametrize("split_size", [1, 2, 5, 7])
def test_split_by_size(dev, split_size) -> None:
    x = rnd((3, 7, 2), np.float32, 1)
    pieces = F.split(pm.tensor(x, dev), split_size, 1)
    sizes = [min(split_size, 7 - i) for i in range(0, 7, split_size)]
    assert [p.shape[1] for p in pieces] == sizes
    for p, want in zip(pieces, ref.split(x, sizes, 1)):
        same(p, want, np.float32)


@pytest.mark.parametrize("batch", [1, 3])
def test_split_channel_slice_of_larger_tensor(dev, batch) -> None:
    """x a channel slice of a larger tensor (x_batch_stride: its images further apart than
    C * inner), only some pieces copied (need); batch 1 and 3, 1/4/2 channels, odd 3x5 images."""
    if not dev.supports_views:
        pytest.skip("a channel slice is a buffer view")
    whole = rnd((batch, 11, 3, 5), np.float32, 3)
    c0, sizes = 2, [1, 4, 2]
    flat = pm.tensor(whole, dev)
    isz, per = 4, 11 * 15
    nb = ((batch - 1) * per + sum(sizes) * 15) * isz
    x = pm.Tensor(flat.buffer.view(c0 * 15 * isz, nb), (batch, sum(sizes), 3, 5), np.float32)
    pieces = F.split(x, sizes, 1, x_batch_stride=per, need=[True, False, True])
    assert pieces[1] is None
    want = ref.split(whole[:, c0:c0 + sum(sizes)], sizes, 1)
    same(pieces[0], want[0], np.float32)
    same(pieces[2], want[2], np.float32)
    with pytest.raises(ValueError, match="^x_batch_stride"):
        F.split(x, sizes, 1, x_batch_stride=sum(sizes) * 15 - 1)
    with pytest.raises(ValueError, match="^x_batch_stride"):
        F.split(x, 1, 2, x_batch_stride=per)
    with pytest.raises(ValueError, match="^need"):
        F.split(x, sizes, 1, need=[True])


def test_reference_concat_backward_vs_finite_differences() -> None:
    shapes = [(2, 1, 3), (2, 2, 3)]
    xs = [rnd(s, np.float64, i) for i, s in enumerate(shapes)]
    g = rnd((2, 3, 3), np.float64, 7)
    grads = ref.concat_backward(g, shapes, 1)
    for x, gr in zip(xs, grads):
        np.testing.assert_allclose(gr, ref.numeric_grad(lambda: float((ref.concat(xs, 1) * g).sum()), x),
                                   rtol=1e-6, atol=1e-8)


# (shape, permutation): the tiled transpose (innermost dim moves: NCHW <-> NHWC, matrices with
# 31/32/33 rows and columns), the vectorized gather (innermost dim kept: (N, T, F) -> (T, N, F))
# and the generic gather
PERMS = [
    ((2, 33, 5, 7), (0, 2, 3, 1)),
    ((1, 5, 7, 31), (0, 3, 1, 2)),
    ((32, 33), (1, 0)),
    ((33, 31), (1, 0)),
    ((65, 40), (1, 0)),
    ((3, 5, 8), (1, 0, 2)),
    ((3, 5, 7), (1, 0, 2)),
    ((2, 3, 4, 5), (3, 1, 0, 2)),
    ((2, 3, 4), (0, 1, 2)),
    ((4, 1, 3), (2, 1, 0)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("case", PERMS, ids=lambda c: f"{c[0]}-{c[1]}")
def test_permute(dev, case, dtype) -> None:
    shape, p = case
    x = rnd(shape, dtype, 2)
    out = F.permute(pm.tensor(x, dev), p)
    same(out, ref.permute(x, p), dtype)
    g = rnd(out.shape, dtype, 3)
    same(F.permute_backward(pm.tensor(g, dev), pm.tensor(x, dev), p),
         ref.permute_backward(g, shape, p), dtype)


def test_transpose_and_sequence_layouts(dev) -> None:
    x = rnd((3, 5, 4), np.float32, 4)  # (N, T, F)
    tx = pm.tensor(x, dev)
    same(F.transpose(tx, 0, 1), ref.permute(x, (1, 0, 2)), np.float32)
    same(F.transpose(tx, -1, 0), ref.permute(x, (2, 1, 0)), np.float32)
    tm = F.to_time_major(tx)
    same(tm, ref.permute(x, (1, 0, 2)), np.float32)
    same(F.to_batch_first(tm), x, np.float32)
    g = rnd((5, 3, 4), np.float32, 5)
    same(F.to_time_major_backward(pm.tensor(g, dev), tx), ref.permute_backward(g, x.shape, (1, 0, 2)),
         np.float32)
    same(F.to_batch_first_backward(pm.tensor(x, dev), tm), ref.permute_backward(x, (5, 3, 4), (1, 0, 2)),
         np.float32)
    same(F.transpose_backward(pm.tensor(g, dev), tx, 1, 0), ref.permute_backward(g, x.shape, (1, 0, 2)),
         np.float32)
    # (T, N, F) <-> [time][batch, features]
    seq = rnd((4, 1, 33), np.float16, 6)
    steps = F.sequence_to_list(pm.tensor(seq, dev))
    assert len(steps) == 4
    for s, want in zip(steps, ref.sequence_to_list(seq)):
        same(s, want, np.float16)
    same(F.list_to_sequence(steps), seq, np.float16)
    gsteps = [rnd((1, 33), np.float16, 10 + t) for t in range(4)]
    same(F.sequence_to_list_backward([pm.tensor(v, dev) for v in gsteps], pm.tensor(seq, dev)),
         np.stack(gsteps), np.float16)
    for got, want in zip(F.list_to_sequence_backward(pm.tensor(seq, dev), steps),
                         ref.sequence_to_list(seq)):
        same(got, want, np.float16)


def test_stack_unbind_any_dim(dev) -> None:
    xs = [rnd((2, 3), np.float32, i) for i in range(3)]
    for d in (0, 1, 2, -1):
        got = F.stack([pm.tensor(x, dev) for x in xs], d)
        nd = d % 3
        want = ref.concat([x.reshape(x.shape[:nd] + (1,) + x.shape[nd:]) for x in xs], nd)
        same(got, want, np.float32)
        for u, x in zip(F.unbind(got, d), xs):
            same(u, x, np.float32)
        grads = F.stack_backward(got, [pm.tensor(x, dev) for x in xs], d)
        for gr, x in zip(grads, xs):
            same(gr, x, np.float32)
        same(F.unbind_backward([pm.tensor(x, dev) for x in xs], got, d), want, np.float32)


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 33, 5, 7), (1, 32, 4, 4), (3, 31, 2, 9)])
def test_image_matrix(dev, shape, dtype) -> None:
    x = rnd(shape, dtype, 7)
    tx = pm.tensor(x, dev)
    n, c, h, w = shape
    for cl in (False, True):
        m = F.image_to_matrix(tx, channels_last=cl)
        same(m, ref.image_to_matrix(x, cl), dtype)
        same(F.matrix_to_image(m, (c, h, w), channels_last=cl), x, dtype)
        g = rnd((n, c * h * w), dtype, 8)
        same(F.image_to_matrix_backward(pm.tensor(g, dev), tx, channels_last=cl),
             ref.image_to_matrix_backward(g, shape, cl), dtype)
        same(F.matrix_to_image_backward(tx, m, (c, h, w), channels_last=cl), ref.image_to_matrix(x, cl),
             dtype)


def test_reference_image_matrix_backward_vs_finite_differences() -> None:
    x = rnd((2, 3, 2, 2), np.float64, 9)
    g = rnd((2, 12), np.float64, 10)
    for cl in (False, True):
        num = ref.numeric_grad(lambda cl=cl: float((ref.image_to_matrix(x, cl) * g).sum()), x)
        np.testing.assert_allclose(ref.image_to_matrix_backward(g, x.shape, cl), num, rtol=1e-6, atol=1e-8)
    gp = rnd((2, 2, 3, 2), np.float64, 11)
    num = ref.numeric_grad(lambda: float((ref.permute(x, (0, 2, 1, 3)) * gp).sum()), x)
    np.testing.assert_allclose(ref.permute_backward(gp, x.shape, (0, 2, 1, 3)), num, rtol=1e-6, atol=1e-8)


def test_reference_vs_torch() -> None:
    torch = pytest.importorskip("torch")
    xs = [rnd(s, np.float64, i) for i, s in enumerate([(2, 3, 4), (2, 5, 4)])]
    np.testing.assert_array_equal(ref.concat(xs, 1), torch.cat([torch.tensor(x) for x in xs], 1).numpy())
    x = rnd((2, 3, 4, 5), np.float64, 3)
    np.testing.assert_array_equal(ref.permute(x, (0, 2, 3, 1)),
                                  torch.tensor(x).permute(0, 2, 3, 1).contiguous().numpy())
    np.testing.assert_array_equal(ref.image_to_matrix(x, False), torch.tensor(x).flatten(1).numpy())
    np.testing.assert_array_equal(ref.image_to_matrix(x, True),
                                  torch.tensor(x).permute(0, 2, 3, 1).flatten(1).numpy())
    for s, t in zip(ref.split(x, [1, 2], 1), torch.split(torch.tensor(x), [1, 2], 1)):
        np.testing.assert_array_equal(s, t.numpy())


# copy_flat (kernels/stream.h: 256-thread groups of 2 chunks of the narrower type, 4 float / 8 half):
# sizes around whole groups and tails of 1 to 7
@pytest.mark.parametrize("n", [1, 3, 33, 4096 + 5, 15, 16, 17, 2047, 2048, 2049, 3 * 4096 + 5])
def test_copy_cast(dev, n) -> None:
    x = rnd((n,), np.float32, 12) * np.float32(100)
    x[:3] = [65519.0, 1e-8, -70000.0][: min(3, n)]  # rounds to max half, flushes to a subnormal, overflows
    tx = pm.tensor(x, dev)
    h = F.cast(tx, np.float16)
    with np.errstate(over="ignore"):  # -70000 overflows to -inf on purpose
        want = x.astype(np.float16)
    same(h, want, np.float16)
    same(F.cast(h, np.float32), want.astype(np.float32), np.float32)
    same(F.copy(tx), x, np.float32)
    same(F.cast(tx, np.float32), x, np.float32)
    g = rnd((n,), np.float16, 13)
    same(F.cast_backward(pm.tensor(g, dev), tx, np.float16), g.astype(np.float32), np.float32)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int32], ids=["f32", "f16", "i32"])
@pytest.mark.parametrize("lead", [1, 2, 4, 8])
def test_copy_cast_view_offsets(dev, lead, dtype) -> None:
    """Sources that are views `lead` elements into a buffer: 16-byte aligned ones take copy_flat's
    chunks, the others its scalar path."""
    if not dev.supports_views:
        pytest.skip(f"{dev.name} binds whole buffers only")
    n = 2 * 4096 + 21
    x = (rnd((n,), np.float32, 14) * 100).astype(dtype)
    isz = np.dtype(dtype).itemsize
    buf = dev.buffer(np.concatenate([np.zeros(lead, dtype), x]))
    v = pm.Tensor(buf.view(lead * isz, x.nbytes), x.shape, dtype)
    same(F.copy(v), x, dtype)
    if dtype != np.int32:
        other = np.float16 if dtype == np.float32 else np.float32
        same(F.cast(v, other), x.astype(other), other)


@pytest.mark.parametrize("n", [1, 33, 2 * 4096 + 5])
def test_copy_cast_out(dev, n) -> None:
    """out=: the result lands in the given tensor (overwriting what it held), returned as is;
    a wrong type, dtype, shape or device is refused before anything is dispatched."""
    x = rnd((n,), np.float32, 15) * np.float32(100)
    tx = pm.tensor(x, dev)
    o32 = pm.tensor(np.full(n, 7.0, np.float32), dev)
    assert F.copy(tx, out=o32) is o32
    same(o32.numpy(), x, np.float32)
    o16 = pm.tensor(np.full(n, 7.0, np.float16), dev)
    assert F.cast(tx, np.float16, out=o16) is o16
    same(o16.numpy(), x.astype(np.float16), np.float16)
    back = pm.tensor(np.zeros(n, np.float32), dev)
    same(F.cast(o16, np.float32, out=back).numpy(), x.astype(np.float16).astype(np.float32),
         np.float32)
    with pytest.raises(TypeError, match="^out: expected a Tensor"):
        F.copy(tx, out=np.zeros(n, np.float32))
    with pytest.raises(ValueError, match="^out: dtype float16, expected float32"):
        F.copy(tx, out=o16)
    with pytest.raises(ValueError, match="^out: dtype float32, expected float16"):
        F.cast(tx, np.float16, out=o32)
    with pytest.raises(ValueError, match=rf"^out: shape \(1, {n}\), expected \({n},\)"):
        F.copy(tx, out=pm.tensor(np.zeros((1, n), np.float32), dev))
    other = pm.device("cpu") if dev.name != "cpu" else None
    if other is not None:
        with pytest.raises(ValueError, match="^out: on cpu"):
            F.copy(tx, out=pm.tensor(np.zeros(n, np.float32), other))
    same(o32.numpy(), x, np.float32)  # the refused calls wrote nothing


def test_bad_input(dev) -> None:
    a = pm.tensor(np.zeros((2, 3, 4), np.float32), dev)
    b = pm.tensor(np.zeros((2, 5, 5), np.float32), dev)
    with pytest.raises(ValueError, match=r"^tensors\[1\]: shape"):
        F.concat([a, b], 1)
    with pytest.raises(ValueError, match=r"^tensors\[1\]: dtype"):
        F.concat([a, pm.tensor(np.zeros((2, 3, 4), np.float16), dev)], 1)
    with pytest.raises(ValueError, match="^dim: 3 is out of range"):
        F.concat([a, a], 3)
    with pytest.raises(ValueError, match="^tensors: expected a non-empty list"):
        F.concat([], 0)
    with pytest.raises(ValueError, match="^split_size_or_sections: .* sums to 5"):
        F.split(a, [2, 3], 2)
    with pytest.raises(ValueError, match="^split_size_or_sections: must be > 0"):
        F.split(a, 0, 2)
    with pytest.raises(ValueError, match="^dim: -4 is out of range"):
        F.split(a, 1, -4)
    with pytest.raises(ValueError, match="^dims: expected a permutation"):
        F.permute(a, (0, 1, 1))
    with pytest.raises(ValueError, match="^dims: expected a permutation"):
        F.permute(a, (0, 1))
    with pytest.raises(ValueError, match="^dim1: 5 is out of range"):
        F.transpose(a, 0, 5)
    with pytest.raises(ValueError, match="^dtype: int32 not supported"):
        F.cast(a, np.int32)
    with pytest.raises(ValueError, match="^x: expected"):
        F.image_to_matrix(a)
    with pytest.raises(ValueError, match="^m: expected"):
        F.matrix_to_image(pm.tensor(np.zeros((2, 10), np.float32), dev), (3, 2, 2))
    with pytest.raises(ValueError, match="^x: expected"):
        F.sequence_to_list(pm.tensor(np.zeros((2, 3), np.float32), dev))
    with pytest.raises(ValueError, match="^grad_out: shape"):
        F.concat_backward(pm.tensor(np.zeros((2, 7, 4), np.float32), dev), [a, a], 1)
    with pytest.raises(ValueError, match=r"^grad_outs: 1 gradients for 2 pieces"):
        F.split_backward([a], pm.tensor(np.zeros((2, 6, 4), np.float32), dev), 3, 1)
    with pytest.raises(ValueError, match=r"^tensors\[1\]: shape"):
        F.stack([a, b])


def test_dim0_split_concat_without_views(dev, monkeypatch) -> None:
    """The metal backend binds whole buffers only: dim-0 pieces are then copied one by one."""
    x = rnd((10, 4), np.float32, 14)
    monkeypatch.setattr(dev, "supports_views", False)
    pieces = F.split(pm.tensor(x, dev), [2, 3, 5], 0)
    assert all(p.buffer.offset == 0 and p.buffer.base is p.buffer for p in pieces)
    for p, want in zip(pieces, ref.split(x, [2, 3, 5], 0)):
        same(p, want, np.float32)
    same(F.concat(pieces, 0), x, np.float32)
    steps = F.sequence_to_list(pm.tensor(x.reshape(10, 1, 4), dev))  # 10 steps: 2 launches
    for s, want in zip(steps, x):
        same(s, want.reshape(1, 4), np.float32)
    same(F.list_to_sequence(steps), x.reshape(10, 1, 4), np.float32)
