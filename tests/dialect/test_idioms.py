"""Idioms of real MLX / ggml kernels (see kernels/idioms.metal)."""
from __future__ import annotations

import numpy as np
from helpers import rng

F32 = np.float32


def test_mlx_idioms(load) -> None:
    lib = load("idioms")
    dev = lib.device
    k = lib.kernel("idioms")
    assert k.threadgroup_size == 64
    n = 64 * 3 + 20  # the last threadgroup is partial: every thread still reaches the barrier
    x = rng(1).uniform(-1, 2, n + 64).astype(F32)  # room for the float4 reads
    out = dev.buffer(np.zeros(n * 4, F32))
    k(n, dev.buffer(x), out, n)
    got = out.numpy(F32, (n, 4))
    v = x[:n]
    acc = v * F32(0) + v * F32(1) + v * F32(2) + v * F32(3)
    acc = acc + F32(-1.5) + F32(0.25) + F32(2.0) + F32(8.0)
    np.testing.assert_allclose(got[:, 0], 2 * acc + 32, rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(got[:, 1], np.clip(v, 0, 1))
    xs = np.where(np.arange(64 * 4) < n, x[:64 * 4], F32(0)).reshape(4, 64)
    np.testing.assert_array_equal(got[:, 2], xs[:, ::-1].reshape(-1)[:n],
                                  err_msg="threadgroup pointer passed to a helper")
    np.testing.assert_array_equal(got[:, 3], v, err_msg="(device const float4*) cast")


def test_struct_buffers(load) -> None:
    lib = load("idioms")
    dev = lib.device
    item = np.dtype([("w", F32), ("k", np.int32), ("flags", np.uint32)])
    n = 300
    r = rng(2)
    items = np.zeros(n, item)
    items["w"] = r.standard_normal(n)
    items["k"] = r.integers(-100, 100, n)
    items["flags"] = r.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
    out = dev.buffer(np.zeros(n, item))
    lib.kernel("struct_buffer")(n, dev.buffer(items), out, n)
    got = out.numpy(item)
    np.testing.assert_array_equal(got["w"], items["w"] * F32(2))
    np.testing.assert_array_equal(got["k"], items["k"] - 1)
    np.testing.assert_array_equal(got["flags"], items["flags"] | 1)


def test_64bit_integers(load) -> None:
    lib = load("idioms")
    dev = lib.device
    n = 500
    r = rng(3)
    a = r.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
    b = r.integers(-2**30, 2**30, n, dtype=np.int64).astype(np.int32)  # b*b*3 fits a long
    uo = dev.buffer(np.zeros(n, np.uint64))
    io = dev.buffer(np.zeros(n, np.int64))
    lib.kernel("int64_ops")(n, dev.buffer(a), dev.buffer(b), uo, io, n)
    x = [int(a[g]) * int(a[(g + 1) % n]) for g in range(n)]
    want_u = np.array([((v >> 7) ^ (v << 3)) % 2**64 for v in x], dtype=np.uint64)
    y = [int(v) * int(v) * -3 for v in b]
    want_i = np.array([-(-v // 7) if v < 0 else v // 7 for v in y], np.int64) - 2**31
    np.testing.assert_array_equal(uo.numpy(np.uint64), want_u)
    np.testing.assert_array_equal(io.numpy(np.int64), want_i)


def test_metal_stdlib_constants(load) -> None:
    lib = load("idioms")
    dev = lib.device
    f = dev.buffer(np.zeros(12, F32))
    i = dev.buffer(np.zeros(4, np.int32))
    u = dev.buffer(np.zeros(2, np.uint32))
    lib.kernel("stdlib_constants")(1, f, i, u)
    gf = f.numpy(F32)
    assert gf[0] == np.inf and gf[1] == -np.inf and np.isnan(gf[2])
    np.testing.assert_array_equal(
        gf[3:], np.array([np.pi, np.finfo(F32).max, np.finfo(F32).tiny, np.finfo(F32).eps, 65504.0,
                          2.0**-10, np.finfo(F32).max, np.e, np.sqrt(2)], F32))
    np.testing.assert_array_equal(i.numpy(np.int32), [2**31 - 1, -2**31, 32767, -128])
    np.testing.assert_array_equal(u.numpy(np.uint32),
                                  [2**32 - 1, np.float32(np.float16(2.0**-14)).view(np.uint32)])


def test_metal_func_macro(load) -> None:
    """METAL_FUNC comes with <metal_stdlib>, which the prelude stands in for."""
    lib = load("metal_func")
    dev = lib.device
    x = np.arange(256, dtype=F32)
    b = dev.buffer(x)
    lib.kernel("metal_func")(256, b)
    np.testing.assert_array_equal(b.numpy(F32), 2 * x)
