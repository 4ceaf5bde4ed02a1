"""Dropout family (kernels/dropout.metal): Philox4x32-10 against the Random123 known-answer
vectors, the device's uint32 stream against a numpy Philox bit for bit (so every backend draws
the same masks), dropout / dropout2d and their backward against the references, mask statistics
and the seed/offset contract."""
from __future__ import annotations

import numpy as np
import pytest
from reference import arith as ref_arith
from reference import dropout as ref

import pymetalnn as pm
from pymetalnn import functional as F
from pymetalnn.ops import dropout as D

# Random123's kat_vectors: (counter words, key words) -> Philox4x32 output
KAT10 = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]
KAT7 = [
    ((0, 0, 0, 0), (0, 0), (0x5F6FB709, 0x0D893F64, 0x4F121F81, 0x4F730A48)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0x4DFCCABA, 0x190A87F0, 0xC47362BA, 0xB6B5242A)),
]
DTYPES = [np.float32, np.float16]


def rnd(shape: tuple, dtype, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def test_reference_philox_known_answers() -> None:
    for ctr, key, want in KAT10:
        np.testing.assert_array_equal(ref.philox4x32_10(np.array([ctr]), key)[0], want)
    for ctr, key, want in KAT7:  # the round structure, not just the 10-round end point
        np.testing.assert_array_equal(ref.philox4x32_10(np.array([ctr]), key, rounds=7)[0], want)


def test_device_philox_known_answers(dev) -> None:
    for ctr, key, want in KAT10:
        got = D.philox4x32_10(np.array([ctr]), key, device=dev)
        np.testing.assert_array_equal(got[0], np.array(want, np.uint32))


@pytest.mark.parametrize("seed,offset", [(0, 0), (1, 0), (0, 1), (2**64 - 1, 2**64 - 1),
                                         (0x0123456789ABCDEF, 2**32 + 3)])
@pytest.mark.parametrize("n", [1, 3, 33, 1001])
def test_stream_matches_numpy_bit_for_bit(dev, n, seed, offset) -> None:
    got = D.philox_stream(n, seed, offset, device=dev)
    assert got.dtype == np.uint32
    np.testing.assert_array_equal(got, ref.stream(n, seed, offset))


def tol(dtype) -> dict:
    # the kernel rounds x * float32(1 / (1 - p)) once (to float or half)
    return {"rtol": 2e-7, "atol": 0} if dtype == np.float32 else {"rtol": 1e-3, "atol": 0}


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f16"])
@pytest.mark.parametrize("shape", [(1,), (33,), (2, 31, 3, 3), (1, 32, 5, 7), (3, 5, 7, 9)])
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9])
def test_dropout_vs_reference(dev, shape, dtype, p) -> None:
    x = rnd(shape, dtype, 1)
    seed, offset = 1234 + int(p * 10), 40
    y = F.dropout(pm.tensor(x, dev), p, seed, offset).numpy()
    want = ref.dropout(x, p, seed, offset)
    mask = ref.keep_mask(x.size, p, seed, offset).reshape(shape)
    np.testing.assert_array_equal(y != 0, mask)  # x has no zeros: exact mask bits
    np.testing.assert_allclose(y.astype(np.float64), want, **tol(dtype))
    g = rnd(shape, dtype, 2)
    gx = F.dropout_backward(pm.tensor(g, dev), p, seed, offset).numpy()
    np.testing.assert_array_equal(gx == 0, ~mask)  # zero exactly where the forward dropped
    np.testing.assert_allclose(gx.astype(np.float64), ref.dropout_backward(g, p, seed, offset), **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f16"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 33, 3, 5), (1, 31, 4, 4), (3, 32, 2, 2)])
def test_dropout2d_vs_reference(dev, shape, dtype) -> None:
    p, seed, offset = 0.4, 77, 2**32 + 9
    x = rnd(shape, dtype, 3)
    y = F.dropout2d(pm.tensor(x, dev), p, seed, offset).numpy()
    np.testing.assert_allclose(y.astype(np.float64), ref.dropout2d(x, p, seed, offset), **tol(dtype))
    chan = ref.keep_mask(shape[0] * shape[1], p, seed, offset).reshape(shape[:2])
    np.testing.assert_array_equal((y != 0).all(axis=(2, 3)), chan)
    np.testing.assert_array_equal((y != 0).any(axis=(2, 3)), chan)  # whole channels
    g = rnd(shape, dtype, 4)
    gx = F.dropout2d_backward(pm.tensor(g, dev), p, seed, offset).numpy()
    np.testing.assert_allclose(gx.astype(np.float64), ref.dropout2d_backward(g, p, seed, offset),
                               **tol(dtype))


# the stream.h path (kernels/stream.h: 256-thread groups of 2 chunks of 4 float / 8 half) and its
# leftover Philox blocks: sizes around whole groups, tails of 1 to 7 elements; dropout2d channels
# of inner % 8 == 0 (chunks) and 4 (float chunks, half through the item loop)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f16"])
@pytest.mark.parametrize("n", [15, 16, 17, 2047, 2048, 2049, 3 * 4096 + 5])
def test_dropout_stream_sizes(dev, n, dtype) -> None:
    p, seed, offset = 0.3, 5, 7
    x = rnd((n,), dtype, 21)
    y = F.dropout(pm.tensor(x, dev), p, seed, offset).numpy()
    np.testing.assert_array_equal(y != 0, ref.keep_mask(n, p, seed, offset))
    np.testing.assert_allclose(y.astype(np.float64), ref.dropout(x, p, seed, offset), **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f16"])
@pytest.mark.parametrize("shape", [(4, 130, 4, 2), (3, 70, 2, 2), (2, 600, 3, 4)])
def test_dropout2d_stream_shapes(dev, shape, dtype) -> None:
    p, seed, offset = 0.5, 8, 3
    x = rnd(shape, dtype, 22)
    y = F.dropout2d(pm.tensor(x, dev), p, seed, offset).numpy()
    np.testing.assert_allclose(y.astype(np.float64), ref.dropout2d(x, p, seed, offset), **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f16"])
@pytest.mark.parametrize("lead", [1, 2, 4, 8])
def test_dropout_view_offsets(dev, lead, dtype) -> None:
    """Views `lead` elements into a buffer: 16-byte aligned ones take the chunks, the others the
    item loop; the mask is a function of the element index either way."""
    if not dev.supports_views:
        pytest.skip(f"{dev.name} binds whole buffers only")
    n = 2 * 4096 + 21
    x = rnd((n,), dtype, 23)
    isz = np.dtype(dtype).itemsize
    buf = dev.buffer(np.concatenate([np.ones(lead, dtype), x]))
    v = pm.Tensor(buf.view(lead * isz, x.nbytes), x.shape, dtype)
    np.testing.assert_allclose(F.dropout(v, 0.5, 9, 1).numpy().astype(np.float64),
                               ref.dropout(x, 0.5, 9, 1), **tol(dtype))
    np.testing.assert_allclose(F.dropout2d(v.reshape(1, 1, 1, n), 0.5, 9, 1).numpy().astype(np.float64),
                               ref.dropout2d(x.reshape(1, 1, 1, n), 0.5, 9, 1), **tol(dtype))


def test_reference_backward_vs_finite_differences() -> None:
    x = rnd((2, 3, 2, 2), np.float64, 5)
    g = rnd(x.shape, np.float64, 6)
    for fwd, bwd in ((ref.dropout, ref.dropout_backward), (ref.dropout2d, ref.dropout2d_backward)):
        num = ref_arith.numeric_grad(lambda fwd=fwd: float((fwd(x, 0.3, 9, 1) * g).sum()), x)
        np.testing.assert_allclose(bwd(g, 0.3, 9, 1), num, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_mask_rate_within_binomial_bounds(dev, p) -> None:
    n = 1 << 16
    y = F.dropout(pm.tensor(np.ones(n, np.float32), dev), p, seed=5, offset=0).numpy()
    dropped = int((y == 0).sum())
    assert abs(dropped - n * p) <= 5 * np.sqrt(n * p * (1 - p)), (dropped, n * p)
    np.testing.assert_allclose(y[y != 0], np.float32(1 / (1 - p)), rtol=1e-7)
    c = 4096
    y2 = F.dropout2d(pm.tensor(np.ones((16, c // 16, 3, 1), np.float32), dev), p, seed=6).numpy()
    dropped = int((y2[:, :, 0, 0] == 0).sum())
    assert abs(dropped - c * p) <= 5 * np.sqrt(c * p * (1 - p)), (dropped, c * p)


def test_seed_and_offset_contract(dev) -> None:
    x = pm.tensor(rnd((4, 33, 5), np.float16, 7), dev)
    a = F.dropout(x, 0.5, seed=11, offset=3).numpy()
    b = F.dropout(x, 0.5, seed=11, offset=3).numpy()
    np.testing.assert_array_equal(a.view(np.uint16), b.view(np.uint16))  # bit-identical
    c = F.dropout(x, 0.5, seed=12, offset=3).numpy()
    d = F.dropout(x, 0.5, seed=11, offset=4).numpy()
    e = F.dropout(x, 0.5, seed=11 + 2**32, offset=3).numpy()  # the seed's high word counts
    for other in (c, d, e):
        assert ((a == 0) != (other == 0)).mean() > 0.3  # independent masks differ in ~half
    # and each is the reference's mask for its own (seed, offset), high words included
    xn = x.numpy()
    for got, seed, offset in ((a, 11, 3), (c, 12, 3), (d, 11, 4), (e, 11 + 2**32, 3)):
        np.testing.assert_allclose(got.astype(np.float64), ref.dropout(xn, 0.5, seed, offset),
                                   **tol(np.float16), err_msg=f"seed {seed} offset {offset}")
    x2 = pm.tensor(rnd((2, 64, 3, 3), np.float32, 8), dev)
    a2 = F.dropout2d(x2, 0.5, seed=1, offset=2**33).numpy()
    np.testing.assert_allclose(a2.astype(np.float64), ref.dropout2d(x2.numpy(), 0.5, 1, 2**33),
                               **tol(np.float32))
    np.testing.assert_array_equal(a2.view(np.uint32), F.dropout2d(x2, 0.5, 1, 2**33).numpy().view(np.uint32))
    assert ((a2 == 0) != (F.dropout2d(x2, 0.5, 1, 2**33 + 1).numpy() == 0)).any()


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f16"])
@pytest.mark.parametrize("offset,base", [(0, 0), (5, 7), (2**32 - 2, 5), (3 + 2**32, 2**32 - 1),
                                         (1, 2**40 + 9)])
def test_offset_tensor_adds_to_the_offset(dev, dtype, offset, base) -> None:
    """offset_tensor (the graph's device step counter): the mask of offset + the tensor's 64-bit
    value, read when the kernel runs (the low word's carry into the high one included), for
    dropout and dropout2d, forward and backward; the reference's mask at that offset."""
    x = pm.tensor(rnd((2, 33, 3, 5), dtype, 3), dev)
    words = np.array([base & 0xFFFFFFFF, base >> 32], np.uint32).view(np.int32)
    ot = pm.tensor(words, dev)
    total = (offset + base) % 2**64
    for f, rf in ((F.dropout, ref.dropout), (F.dropout2d, ref.dropout2d)):
        got = f(x, 0.5, 9, offset, offset_tensor=ot).numpy()
        np.testing.assert_array_equal(got, f(x, 0.5, 9, total).numpy())
        np.testing.assert_allclose(got.astype(np.float64), rf(x.numpy(), 0.5, 9, total),
                                   **tol(dtype))
    gb = F.dropout_backward(x, 0.5, 9, offset, offset_tensor=ot).numpy()
    np.testing.assert_array_equal(gb, F.dropout_backward(x, 0.5, 9, total).numpy())
    g2 = F.dropout2d_backward(x, 0.5, 9, offset, offset_tensor=ot).numpy()
    np.testing.assert_array_equal(g2, F.dropout2d_backward(x, 0.5, 9, total).numpy())


@pytest.mark.parametrize("base", [0, 5, 2**32 - 1, 2**33 + 2**32 - 1, 2**64 - 1])
def test_dropout_offset_advance(dev, base) -> None:
    """dropout_offset_advance: the tensor's 64-bit value + 1 (the low word's carry into the high
    one, 2^64 - 1 wrapping to 0), so the next dropout draws the mask at the next offset."""
    words = np.array([base & 0xFFFFFFFF, base >> 32], np.uint32).view(np.int32)
    ot = pm.tensor(words, dev)
    F.dropout_offset_advance(ot)
    got = ot.numpy().view(np.uint32).astype(np.uint64)
    assert int(got[0]) + (int(got[1]) << 32) == (base + 1) % 2**64
    x = pm.tensor(rnd((3, 37), np.float32, 4), dev)
    np.testing.assert_array_equal(F.dropout(x, 0.5, 9, 0, offset_tensor=ot).numpy(),
                                  F.dropout(x, 0.5, 9, (base + 1) % 2**64).numpy())
    with pytest.raises(ValueError, match="^offset_tensor: expected a Tensor"):
        F.dropout_offset_advance(words)
    with pytest.raises(ValueError, match="^offset_tensor: expected a 32-bit integer Tensor"):
        F.dropout_offset_advance(pm.tensor(np.zeros(3, np.int32), dev))


def test_offset_tensor_checked(dev) -> None:
    x = pm.tensor(np.ones(8, np.float32), dev)
    for bad in (np.zeros(2, np.int32), pm.tensor(np.zeros(3, np.int32), dev),
                pm.tensor(np.zeros(2, np.float32), dev)):
        with pytest.raises(ValueError, match="^offset_tensor: "):
            F.dropout(x, 0.5, offset_tensor=bad)


def test_identity_cases_and_unaligned_views(dev) -> None:
    x = rnd((3, 7), np.float32, 9)
    tx = pm.tensor(x, dev)
    np.testing.assert_array_equal(F.dropout(tx, 0.0, 1).numpy(), x)
    np.testing.assert_array_equal(F.dropout(tx, 0.7, 1, training=False).numpy(), x)
    np.testing.assert_array_equal(F.dropout_backward(tx, 0.7, 1, training=False).numpy(), x)
    np.testing.assert_array_equal(F.dropout2d(tx.reshape(3, 7, 1, 1), 0.7, training=False).numpy(),
                                  x.reshape(3, 7, 1, 1))
    if dev.supports_views:  # pieces of a dim-0 split are views; the second starts at byte 28
        _, piece = F.split(tx, [1, 2], 0)
        np.testing.assert_allclose(F.dropout(piece, 0.5, 3).numpy(), ref.dropout(x[1:], 0.5, 3, 0),
                                   rtol=2e-7)


def test_reference_semantics_vs_torch() -> None:
    torch = pytest.importorskip("torch")
    x = torch.tensor(rnd((8, 16, 4, 4), np.float64, 10) + 5.0, requires_grad=True)
    y = torch.nn.functional.dropout(x, 0.25, training=True)
    kept = y != 0
    np.testing.assert_allclose(y[kept].detach().numpy(), (x[kept] / 0.75).detach().numpy(), rtol=1e-12)
    g = torch.ones_like(y)
    y.backward(g)
    np.testing.assert_allclose(x.grad.numpy(), np.where(kept.numpy(), 1 / 0.75, 0.0), rtol=1e-12)
    # our reference follows the same formulas: drop probability p, kept values scaled by 1/(1-p)
    xn = x.detach().numpy()
    yr = ref.dropout(xn, 0.25, 1, 0)
    np.testing.assert_allclose(yr[yr != 0], xn[yr != 0] / 0.75, rtol=1e-12)
    y2 = torch.nn.functional.dropout2d(x, 0.25, training=True).detach().numpy()
    np.testing.assert_array_equal((y2 != 0).all(axis=(2, 3)), (y2 != 0).any(axis=(2, 3)))
    y2r = ref.dropout2d(xn, 0.25, 1, 0)
    np.testing.assert_array_equal((y2r != 0).all(axis=(2, 3)), (y2r != 0).any(axis=(2, 3)))


def test_bad_input(dev) -> None:
    x = pm.tensor(np.ones((2, 3, 4, 4), np.float32), dev)
    for p in (1.0, -0.1, 1.5, float("nan"), "0.5", True):
        with pytest.raises(ValueError, match="^p: "):
            F.dropout(x, p)
    with pytest.raises(ValueError, match="^p: "):
        F.dropout_backward(x, 1.0)
    for seed in (-1, 2**64, 0.5):
        with pytest.raises(ValueError, match="^seed: "):
            F.dropout(x, 0.5, seed)
    with pytest.raises(ValueError, match="^offset: "):
        F.dropout2d(x, 0.5, 0, -3)
    with pytest.raises(ValueError, match="^x: expected 4 dimensions"):
        F.dropout2d(x.reshape(2, 3, 16), 0.5)
    with pytest.raises(ValueError, match="^grad_out: expected 4 dimensions"):
        F.dropout2d_backward(x.reshape(6, 16), 0.5)
    with pytest.raises(ValueError, match="^x: dtype"):
        F.dropout(pm.tensor(np.ones(4, np.int32), dev), 0.5)
    with pytest.raises(ValueError, match="^key: "):
        D.philox4x32_10([[0, 0, 0, 0]], (0, 2**32), device=dev)
