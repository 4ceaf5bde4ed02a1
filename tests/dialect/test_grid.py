"""Built-ins, grid sizes, threadgroup sizes, barriers and threadgroup-memory reductions."""
from __future__ import annotations

import numpy as np
import pytest
from helpers import groups, rng

SENTINEL = np.uint32(0xFFFFFFFF)

BUILTIN_KERNELS = [
    ("builtins_32", 32), ("builtins_64", 64), ("builtins_256", 256), ("builtins_1024", 1024),
    ("builtins_default", 256), ("builtins_mlx_attr", 64),
]


def grid_counts(tg: int, n: int = 3) -> list[int]:
    return sorted({1, 31, 32, 33, n * tg - 1, n * tg, n * tg + 1})


def expected_builtins(count: int, tg: int) -> np.ndarray:
    ng = groups(count, tg)
    gid = np.arange(ng * tg, dtype=np.uint32)
    lid = gid % tg
    want = np.stack([
        gid, lid, gid // tg, np.full_like(gid, tg), np.full_like(gid, ng), lid % 32, lid // 32,
        np.full_like(gid, 32), np.full_like(gid, -(-tg // 32)), lid,
    ], axis=1).astype(np.uint32)
    want[count:] = SENTINEL  # threads past `count` return before writing
    return want


def metal_default_tg(dev, backend: str, observed: int) -> int:
    """The threadgroup size of a kernel without max_total_threads_per_threadgroup: 256 on cuda and
    cpu; on metal the pipeline's maximum (metalcompute dispatches that), which only the kernel
    sees: at most 1024 and a multiple of the SIMD width (1024 under the stand-in)."""
    if backend != "metal":
        return 256
    assert observed % 32 == 0 and 32 <= observed <= 1024, observed
    if type(dev.mc).__name__ == "module" and dev.mc.__name__.endswith("fake_metalcompute"):
        assert observed == dev.mc.DEVICE_MAX_THREADS
    return observed


@pytest.mark.parametrize("name,tg", BUILTIN_KERNELS)
def test_builtins_every_grid_size(load, backend: str, name: str, tg: int) -> None:
    k = load("grid").kernel(name)
    assert k.threadgroup_size == tg
    dev = k.library.device
    for count in grid_counts(tg):
        ng = groups(count, tg)
        out = dev.buffer(np.full(ng * tg * 10, SENTINEL, dtype=np.uint32))
        k(count, out, count)
        got = out.numpy(np.uint32, (ng * tg, 10))
        if name == "builtins_default":  # the size the kernel ran with
            seen = metal_default_tg(dev, backend, int(got[0, 3]))
            got = np.concatenate([got, np.full((max(groups(count, seen) * seen - ng * tg, 0), 10),
                                               SENTINEL, np.uint32)])
            want = expected_builtins(count, seen)
            got = got[: len(want)]
        else:
            want = expected_builtins(count, tg)
        for col, label in enumerate(["thread_position_in_grid", "thread_position_in_threadgroup",
                                     "threadgroup_position_in_grid", "threads_per_threadgroup",
                                     "threadgroups_per_grid", "thread_index_in_simdgroup",
                                     "simdgroup_index_in_threadgroup", "threads_per_simdgroup",
                                     "simdgroups_per_threadgroup", "thread_index_in_threadgroup"]):
            np.testing.assert_array_equal(got[:, col], want[:, col],
                                          err_msg=f"{name} count={count}: {label}")


def test_builtins_ushort(load, backend: str) -> None:
    k = load("grid").kernel("builtins_ushort")
    dev = k.library.device
    count = 700
    out = dev.buffer(np.full(count * 3, SENTINEL, dtype=np.uint32))
    k(count, out, count)
    got = out.numpy(np.uint32, (count, 3))
    resets = np.flatnonzero((got[:, 0] == 0) & (np.arange(count) > 0))  # lid back to 0
    tg = metal_default_tg(dev, backend, int(resets[0]) if len(resets) else 1024)
    lid = np.arange(count, dtype=np.uint32) % tg
    want = np.stack([lid, lid % 32, lid // 32], axis=1)
    np.testing.assert_array_equal(got, want)


def _grid_stride_partials(x: np.ndarray, tg: int, ng: int, acc_dtype) -> np.ndarray:
    g = (np.arange(x.size) % (tg * ng)) // tg
    return np.array([x[g == j].astype(acc_dtype).sum() for j in range(ng)])


@pytest.mark.parametrize("name,dtype,tg,ng,n", [
    ("reduce_int_64", np.int32, 64, 7, 10_001),
    ("reduce_int_256", np.int32, 256, 3, 256 * 3),
    ("reduce_int_256", np.int32, 256, 5, 1000),   # some threads load nothing
    ("reduce_float_256", np.float32, 256, 4, 50_000),
    ("reduce_uint_1024", np.uint32, 1024, 2, 9_999),
])
def test_threadgroup_tree_reduction(load, name, dtype, tg, ng, n) -> None:
    k = load("grid").kernel(name)
    dev = k.library.device
    r = rng(11)
    if dtype == np.float32:
        x = r.standard_normal(n).astype(np.float32)
    elif dtype == np.uint32:
        x = r.integers(0, 2**31, n, dtype=np.uint32)  # the sum wraps modulo 2**32
    else:
        x = r.integers(-1000, 1000, n, dtype=np.int32)
    part = dev.buffer(np.full(ng, 12345, dtype=dtype))
    k(ng * tg, dev.buffer(x), part, n)
    got = part.numpy(dtype)
    if dtype == np.float32:
        want = _grid_stride_partials(x, tg, ng, np.float64)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-3)
    elif dtype == np.uint32:
        want = (_grid_stride_partials(x, tg, ng, np.uint64) % 2**32).astype(np.uint32)
        np.testing.assert_array_equal(got, want)
    else:
        want = _grid_stride_partials(x, tg, ng, np.int64).astype(np.int32)
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("tg,n", [(256, 1), (256, 31), (256, 255), (256, 256), (256, 257),
                                  (256, 4097), (1024, 1000), (1024, 5000)])
def test_two_level_simd_reduction(load, tg: int, n: int) -> None:
    k = load("grid").kernel(f"reduce_simd_int_{tg}")
    assert k.threadgroup_size == tg
    dev = k.library.device
    x = rng(n).integers(-10_000, 10_000, n, dtype=np.int32)
    ng = groups(n, tg)
    part = dev.buffer(np.zeros(ng, dtype=np.int32))
    k(n, dev.buffer(x), part, n)
    want = np.array([x[g * tg:(g + 1) * tg].sum() for g in range(ng)], dtype=np.int32)
    np.testing.assert_array_equal(part.numpy(np.int32), want)


def test_barrier_rounds_exchange_between_threads(load) -> None:
    k = load("grid").kernel("barrier_rotate")
    dev = k.library.device
    tg, ng, rounds = 128, 5, 6
    x = rng(3).integers(-1000, 1000, tg * ng, dtype=np.int64)
    out = dev.buffer(np.zeros(tg * ng, dtype=np.int32))
    k(tg * ng, dev.buffer(x.astype(np.int32)), out, rounds)
    lid = np.arange(tg)
    want = []
    for g in range(ng):
        buf = x[g * tg:(g + 1) * tg].copy()
        for r in range(rounds):
            buf = np.roll(buf, -1) * 3 + lid - r
        want.append(buf)
    np.testing.assert_array_equal(out.numpy(np.int32), np.concatenate(want).astype(np.int32))


def test_barrier_in_helper_function_and_two_tg_arrays(load) -> None:
    k = load("grid").kernel("barrier_helper")
    dev = k.library.device
    ng = 4
    x = rng(5).standard_normal(64 * ng).astype(np.float32)
    out = dev.buffer(np.zeros(64 * ng, dtype=np.float32))
    k(64 * ng, dev.buffer(x), out)
    lid = np.arange(64)
    want = np.concatenate([x[g * 64:(g + 1) * 64][63 - lid] + ((lid + 5) % 64) * 2
                           for g in range(ng)]).astype(np.float32)
    np.testing.assert_array_equal(out.numpy(np.float32), want)
