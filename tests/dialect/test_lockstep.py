"""Control flow around barriers and SIMD-group functions (tests/dialect/kernels/lockstep.metal),
one kernel per case, against numpy references written from Metal's rules: every thread that has
not returned reaches each barrier; a SIMD-group function covers the lanes of the simdgroup that
execute it (the active lanes).

On the cpu backend these kernels run as work-item loops (pymetalnn/runtime/lockstep*.py) rather
than a fiber per thread; `test_cpu_runs_them_without_fibers` checks that they do, and that a
kernel outside the transform keeps fibers and says why.
"""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
from helpers import groups, rng

TG = 64


class LsParams(ctypes.Structure):
    _fields_ = [("n", ctypes.c_uint32), ("rounds", ctypes.c_uint32), ("mode", ctypes.c_uint32),
                ("pad", ctypes.c_uint32)]


def _dyadic(seed: int, n: int) -> np.ndarray:
    """Multiples of 1/8 in [-8, 8): the kernels' a * b + c on them is exact, so it is the same
    whether the compiler contracts it into an fma (NVRTC does) or not, and equals numpy's."""
    return (rng(seed).integers(-64, 64, n) / 8).astype(np.float32)


def _run(load, name, n, *arrays, outs=(np.float32,), width=1, params=None):
    lib = load("lockstep")
    dev = lib.device
    bufs = [dev.buffer(np.ascontiguousarray(a)) for a in arrays]
    count = groups(n, TG) * TG
    obufs = [dev.buffer(np.zeros(count * width, dt)) for dt in outs]
    args = bufs + obufs + ([params] if params is not None else [])
    lib.kernel(name)(count, *args)
    return [b.numpy(dt) for b, dt in zip(obufs, outs)]


@pytest.mark.parametrize("rounds", [0, 1, 3])
def test_barrier_in_loop(load, rounds) -> None:
    n = 3 * TG
    x = rng(1).standard_normal(n).astype(np.float32)
    (got,) = _run(load, "ls_barrier_loop", n, x, params=LsParams(n, rounds, 0, 0))
    want = x.reshape(-1, TG).copy()
    for _ in range(rounds):
        want = want * np.float32(0.5) + np.roll(want, -1, axis=1)
    np.testing.assert_array_equal(got, want.reshape(-1))


@pytest.mark.parametrize("mode", [0, 1])
def test_barrier_in_uniform_branch(load, mode) -> None:
    n = 4 * TG
    x = rng(2).standard_normal(n).astype(np.float32)
    (got,) = _run(load, "ls_barrier_branch", n, x, params=LsParams(n, 0, mode, 0))
    v = x.reshape(-1, TG).copy()
    v = v[:, ::-1] if mode == 1 else v * np.float32(2)
    v[1::2] = np.roll(v[1::2], -3, axis=1)
    want = v + np.arange(TG, dtype=np.float32)
    np.testing.assert_array_equal(got, want.reshape(-1))


def test_barrier_in_nested_loops(load) -> None:
    n, rounds = 2 * TG, 3
    x = rng(3).standard_normal(n).astype(np.float32)
    (got,) = _run(load, "ls_nested", n, x, params=LsParams(n, rounds, 0, 0))
    x2 = x.reshape(-1, TG)
    lid = np.arange(TG)
    acc = np.zeros_like(x2)
    for i in range(rounds):
        v = x2 + np.float32(i)
        for j in range(2):
            v = v[:, (lid + j + 1) % TG]
        v = v + (lid % 3).astype(np.float32)
        acc = acc + v
    np.testing.assert_array_equal(got, acc.reshape(-1))


@pytest.mark.parametrize("n", [1, 31, 33, 64, 100, 129])
def test_early_return_before_barrier(load, n) -> None:
    x = rng(4).integers(-8, 8, n).astype(np.float32)  # exact sums in any order
    (got,) = _run(load, "ls_early_return", n, x, params=LsParams(n, 0, 0, 0))
    want = np.zeros(groups(n, TG) * TG, np.float32)
    for base in range(0, n, TG):
        want[base:min(n, base + TG)] = x[base:base + TG].sum()
    np.testing.assert_array_equal(got[:n], want[:n])
    assert not got[n:].any()  # returned threads wrote nothing


def test_threadgroup_arrays(load) -> None:
    n = 2 * TG
    x = rng(5).standard_normal(n).astype(np.float32)
    got, igot = _run(load, "ls_tg_arrays", n, x, outs=(np.float32, np.int32))
    x2 = x.reshape(-1, 8, 8)
    want = x2.transpose(0, 2, 1).reshape(-1, TG) + x.reshape(-1, TG)[:, ::-1] * np.float32(3)
    np.testing.assert_array_equal(got, want.reshape(-1))
    lid = np.arange(TG)
    np.testing.assert_array_equal(igot, np.tile(((lid + 5) % TG) * 2, n // TG))


def _simd_divergent_ref(x: np.ndarray) -> np.ndarray:
    """Metal's active-lane semantics, simulated per simdgroup in lockstep."""
    out = np.zeros((len(x), 4), np.int64)
    for base in range(0, len(x), 32):
        v = x[base:base + 32].astype(np.int64)
        lanes = np.arange(32)
        # a: for i < lane % 5, a += simd_sum(v + i) over the lanes still looping
        a = np.zeros(32, np.int64)
        for i in range(5):
            act = lanes % 5 > i
            if act.any():
                a[act] += (v[act] + i).sum()
        # b: break when i > (v & 7); simd_max over the lanes still looping; then lanes with
        # (lane + i) % 3 == 0 continue (skip the + 1)
        b = np.zeros(32, np.int64)
        looping = np.ones(32, bool)
        for i in range(8):
            looping &= ~(i > (v & 7))
            if looping.any():
                b[looping] += (v[looping] * (i + 1)).max()
            b[looping & ((lanes + i) % 3 != 0)] += 1
        # c: even lanes: exclusive prefix sum + shuffle_down(1) among the even lanes; odd: min
        c = np.zeros(32, np.int64)
        even = v % 2 == 0
        idx = np.flatnonzero(even)
        if len(idx):
            ev = v[idx]
            pre = np.concatenate([[0], np.cumsum(ev)[:-1]])
            down = np.array([v[j + 1] if j + 1 < 32 and even[j + 1] else v[j] for j in idx])
            c[idx] = pre + down
        odd = np.flatnonzero(~even)
        if len(odd):
            c[odd] = v[odd].min()
        # d: halve while any lane (all lanes loop together) has d > 3; C division truncates
        d = v.copy()
        while (d > 3).any():
            d = np.trunc(d / 2).astype(np.int64)
        out[base:base + 32] = np.stack([a, b, c, d], axis=1)
    return out.astype(np.int32)


def test_simd_functions_in_divergent_control_flow(load) -> None:
    n = 2 * TG
    x = rng(6).integers(-50, 200, n).astype(np.int32)
    (got,) = _run(load, "ls_simd_divergent", n, x, outs=(np.int32,), width=4)
    np.testing.assert_array_equal(got.reshape(-1, 4), _simd_divergent_ref(x))


def test_simd_shuffles_and_reductions(load) -> None:
    """Every lane active: reductions, prefix sum, the shuffles (an out-of-range source keeps the
    lane's own value), broadcast; results kept across a barrier; a butterfly in a loop."""
    n = 2 * TG
    x = rng(9).integers(-1000, 1000, n).astype(np.int32)
    (got,) = _run(load, "ls_simd_convergent", n, x, outs=(np.int32,), width=10)
    want = np.zeros((n, 10), np.int64)
    lanes = np.arange(32)
    sums = x.astype(np.int64).reshape(-1, 32).sum(axis=1)
    for g in range(n // 32):
        v = x[32 * g:32 * g + 32].astype(np.int64)
        w = want[32 * g:32 * g + 32]
        w[:, 0] = v.sum()
        w[:, 1] = v.max()
        w[:, 2] = np.cumsum(v)
        w[:, 3] = v[(lanes * 7 + 3) % 32]
        w[:, 4] = v[lanes ^ 5]
        w[:, 5] = np.where(lanes >= 3, v[np.maximum(lanes - 3, 0)], v)
        w[:, 6] = np.where(lanes + 2 < 32, v[np.minimum(lanes + 2, 31)], v)
        w[:, 7] = v[17]
        w[:, 9] = v.sum()
    lid = np.arange(n) % TG
    want[:, 8] = sums[(np.arange(n) // TG) * (TG // 32) + (TG - 1 - lid) // 32]
    np.testing.assert_array_equal(got.reshape(-1, 10), want.astype(np.int32))


@pytest.mark.parametrize("rounds", [1, 2])
def test_helper_with_barriers_and_simd(load, rounds) -> None:
    n = 3 * TG
    x = rng(7).integers(-4, 5, n).astype(np.float32)  # exact float sums
    (got,) = _run(load, "ls_helper", n, x, params=LsParams(n, rounds, 0, 0))
    x2 = x.reshape(-1, TG)
    total = np.zeros_like(x2)
    for r in range(rounds):
        s = (x2 * np.float32(r + 1)).sum(axis=1, keepdims=True)
        total[:, :32] += s
    np.testing.assert_array_equal(got, total.reshape(-1))


@pytest.mark.parametrize("mode", [0, 1])
def test_fallback_kernel(load, mode) -> None:
    n = TG
    x = rng(8).standard_normal(n).astype(np.float32)
    (got,) = _run(load, "ls_fallback_switch", n, x, params=LsParams(n, 0, mode, 0))
    np.testing.assert_array_equal(got, x[::-1] if mode == 1 else x)


@pytest.mark.parametrize("n", [1, 33, 64, 100])
def test_mixed_uniform_declaration(load, n) -> None:
    x = _dyadic(9, n)
    (got,) = _run(load, "ls_mixed_decl", n, x, params=LsParams(n, 0, 0, 0))
    count = groups(n, TG) * TG
    mine = np.minimum(np.arange(count), n - 1)
    v = x[mine].reshape(-1, TG)
    want = np.roll(v, -1, axis=1).reshape(-1) * np.float32(n) + mine.astype(np.float32)
    np.testing.assert_array_equal(got, want)


def test_cpu_runs_them_without_fibers(load) -> None:
    lib = load("lockstep")
    if lib.device.name != "cpu":
        pytest.skip("fibers are a cpu-backend matter")
    from pymetalnn.runtime.backend_cpu import fiber_report

    report = fiber_report(lib)
    assert set(report) == {"ls_fallback_switch"}, report
    assert "switch" in report["ls_fallback_switch"]
    for name in ("ls_barrier_loop", "ls_simd_divergent", "ls_helper", "ls_early_return",
                 "ls_mixed_decl", "ls_ref_param1", "ls_ref_param2", "ls_ref_local",
                 "ls_ref_member", "ls_ref_ternary"):
        assert not lib.kernel(name).uses_fibers


def test_package_kernels_transform_without_fibers() -> None:
    """Every kernel of the package's own sources (kernels/*.metal) that synchronizes translates
    to work-item loops on cpu (a translation check: fast, no compiler): a parser regression
    otherwise sends whole libraries back to a fiber per thread without failing a test (once:
    generated code held in one token, read as a declaration, put softmax, norm and loss there)."""
    import glob
    import os

    from pymetalnn.runtime.core import KERNEL_DIR
    from pymetalnn.runtime.msl import translate_file

    fibers = {}
    for path in sorted(glob.glob(os.path.join(KERNEL_DIR, "*.metal"))):
        tr = translate_file(path, "cpu", {}, [KERNEL_DIR], lockstep=True)
        fibers.update({f"{os.path.basename(path)}: {k}": v.fiber_reason
                       for k, v in tr.kernels.items() if v.needs_fibers})
    assert not fibers, fibers


def _counter(rounds: int, mode: int) -> np.ndarray:
    """The counter after each round's step: k = (k + 1) mod (mode + 2), from 0."""
    return (np.arange(1, rounds + 1) % (mode + 2)).astype(np.float32)


def _ref_kernel(load, name: str, n: int, rounds: int, mode: int, seed: int, want):
    """Runs a reference-counter kernel; want(nxt, k): the expected (rounds, count) values from
    each thread's right neighbour's input nxt (row) and the counter per round k (column)."""
    x = _dyadic(seed, n)
    count = groups(n, TG) * TG
    (got,) = _run(load, name, n, x, outs=(np.float32,), width=max(rounds, 1),
                  params=LsParams(n, rounds, mode, 0))
    v = np.zeros(count, np.float32)
    v[:n] = x
    nxt = np.roll(v.reshape(-1, TG), -1, axis=1).reshape(-1)[None, :]
    expected = want(nxt, _counter(rounds, mode)[:, None])
    np.testing.assert_array_equal(got.reshape(rounds, count)[:, :n], expected[:, :n])


@pytest.mark.parametrize("name", ["ls_ref_param1", "ls_ref_param2", "ls_ref_ternary"])
@pytest.mark.parametrize("n,rounds,mode", [(1, 1, 0), (64, 4, 5), (100, 5, 3), (33, 7, 1)])
def test_reference_parameter_across_barriers(load, name, n, rounds, mode) -> None:
    """A counter stepped through a helper's `thread uint&` parameter, inside a loop whose inner
    loop holds the barriers: each thread steps its own counter once a round."""
    _ref_kernel(load, name, n, rounds, mode, 10, lambda nxt, k: nxt + k)


@pytest.mark.parametrize("n,rounds,mode", [(1, 2, 0), (64, 3, 4), (100, 6, 2)])
def test_reference_local_and_synchronizing_helper(load, n, rounds, mode) -> None:
    """The same counter stepped through a local `thread uint&`, and a second one inside a
    helper with a barrier (inlined by the work-item loops)."""
    _ref_kernel(load, "ls_ref_local", n, rounds, mode, 11,
                lambda nxt, k: (nxt + k) + np.float32(10) * (nxt + k))


@pytest.mark.parametrize("n,rounds,mode", [(1, 1, 0), (64, 3, 4), (100, 6, 2)])
def test_member_function_and_parenthesized_reference(load, n, rounds, mode) -> None:
    """The counter as a struct stepped by its member function, and by a helper's reference
    parameter bound through a parenthesized argument."""
    _ref_kernel(load, "ls_ref_member", n, rounds, mode, 12,
                lambda nxt, k: nxt + k + np.float32(10) * k)
