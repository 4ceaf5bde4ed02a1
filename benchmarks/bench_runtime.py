"""Runtime benchmarks: one .metal source on three backends.

cpu:  threadgroup reduction of 2^20 floats (TG 256, simd_sum + barrier + atomic) on ONE worker
      thread (target < 0.25 s); elementwise y = a*x + b over 2^24 floats against numpy doing the
      same arithmetic (target: within 3x of numpy).
cuda: Python-side launch overhead per kernel (target < 10 us); a float4 copy kernel's bandwidth
      against CuPy's device-to-device copy in the same run (target >= 85%), and PyTorch's copy
      when importable.

    PYTHONPATH=. python benchmarks/bench_runtime.py [--backend cpu|cuda] [--quick]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import pymetalnn  # noqa: E402

KERNELS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels", "runtime.metal")


def bench_cpu_reduce(n: int) -> dict:
    dev = pymetalnn.device("cpu")
    lib = dev.library(KERNELS)
    k = lib.kernel("bench_reduce_sum")
    x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    xb = dev.buffer(x)
    out = dev.buffer(4)

    def run() -> None:
        out.write(np.zeros(1, np.float32))
        k(n, xb, out, n)

    med, spread = common.time_host(run, dev.synchronize)
    got = float(out.numpy(np.float32)[0])
    ref = float(x.astype(np.float64).sum())
    assert abs(got - ref) < 1e-3 * np.abs(x).sum(), (got, ref)
    return {"bench": f"reduce_sum 2^{int(np.log2(n))} (TG 256, simd_sum+barrier+atomic)",
            "backend": common.device_label(dev), "seconds": med, "spread": spread,
            "target": "< 0.25 s on 1 worker" if dev.num_workers == 1 else "-"}


def bench_cpu_elementwise(n: int) -> dict:
    dev = pymetalnn.device("cpu")
    k = dev.library(KERNELS).kernel("bench_axpb")
    x = np.random.default_rng(1).standard_normal(n).astype(np.float32)
    xb, yb = dev.buffer(x), dev.buffer(x.nbytes)
    a, b = np.float32(1.5), np.float32(-0.25)
    med, spread = common.time_host(lambda: k(n, xb, yb, a, b, n), dev.synchronize)
    y = np.empty_like(x)

    def np_run() -> None:
        np.multiply(x, a, out=y)
        np.add(y, b, out=y)

    np_med, _ = common.time_host(np_run, lambda: None)
    np.testing.assert_allclose(yb.numpy(np.float32), a * x + b, rtol=1e-6, atol=1e-6)
    return {"bench": f"axpb 2^{int(np.log2(n))} floats", "backend": common.device_label(dev),
            "seconds": med, "spread": spread, "peer": "numpy", "peer_seconds": np_med,
            "ratio_vs_peer": np_med / med, "target": "ratio >= 0.33"}


def bench_cuda(quick: bool) -> list[dict]:
    import cupy as cp

    dev = pymetalnn.device("cuda")
    lib = dev.library(KERNELS)
    rows = []
    # launch overhead: host time per launch of a one-thread kernel, queue kept from filling up
    empty = lib.kernel("bench_empty")
    xb = dev.buffer(4)
    for _ in range(100):
        empty(1, xb)
    dev.synchronize()
    reps = 2000 if quick else 20000
    samples = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            empty(1, xb)
        samples.append((time.perf_counter() - t0) / reps)
        dev.synchronize()
    med, spread = common.median_spread(samples)
    raw = cp.RawKernel(r'extern "C" __global__ void e(unsigned* x){ if (threadIdx.x == 12345) x[0] = 1; }',
                       "e")
    xc = cp.zeros(1, cp.uint32)
    for _ in range(100):
        raw((1,), (256,), (xc,))
    cp.cuda.runtime.deviceSynchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        raw((1,), (256,), (xc,))
    cupy_launch = (time.perf_counter() - t0) / reps
    cp.cuda.runtime.deviceSynchronize()
    rows.append({"bench": "launch overhead (host, per kernel)", "backend": common.device_label(dev),
                 "seconds": med, "spread": spread, "peer": "cupy RawKernel",
                 "peer_seconds": cupy_launch, "ratio_vs_peer": cupy_launch / med,
                 "target": "< 10 us"})

    # copy bandwidth
    n = (1 << 24) if quick else (1 << 28)  # floats: 64 MiB or 1 GiB per buffer
    src = dev.buffer(np.random.default_rng(2).standard_normal(n).astype(np.float32))
    dst = dev.buffer(n * 4)
    copy = lib.kernel("bench_copy_vec4")
    n4 = n // 4
    med, spread = common.time_cuda(lambda: copy(n4, src, dst, n4))
    assert np.array_equal(dst.numpy(np.float32)[:1024], src.numpy(np.float32)[:1024])
    assert np.array_equal(dst.numpy(np.float32)[-1024:], src.numpy(np.float32)[-1024:])
    a = dev.as_cupy(src, np.float32, (n,))
    b = cp.empty_like(a)
    cp_med, _ = common.time_cuda(lambda: b.data.copy_from_device(a.data, n * 4))
    row = {"bench": f"copy float4 {n * 4 >> 20} MiB", "backend": common.device_label(dev),
           "seconds": med, "spread": spread, "GB/s": 2 * n * 4 / med / 1e9,
           "peer": "cupy D2D copy", "peer_seconds": cp_med, "peer_GB/s": 2 * n * 4 / cp_med / 1e9,
           "ratio_vs_peer": cp_med / med, "target": "ratio >= 0.85"}
    rows.append(row)
    try:
        import torch

        ta = torch.as_tensor(a, device="cuda")
        tb = torch.empty_like(ta)
        t_med, _ = common.time_cuda(lambda: tb.copy_(ta))
        rows.append({"bench": f"copy {n * 4 >> 20} MiB (peer only)", "backend": "torch",
                     "seconds": t_med, "GB/s": 2 * n * 4 / t_med / 1e9,
                     "ratio_vs_peer": t_med / med, "peer": "ours vs torch copy_"})
    except ImportError:
        pass
    return rows


def main() -> int:
    ap = common.parser(__doc__, quick_help="small sizes", backends=("cpu", "cuda"))
    ap.add_argument("--one-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    rows: list[dict] = []
    backend = args.backend or pymetalnn.device().name
    if args.one_worker:  # child process: PYMETALNN_CPU_THREADS=1 is set
        rows.append(bench_cpu_reduce(1 << 20))
        common.print_table(rows, ["bench", "backend", "seconds", "spread", "target"])
        return 0
    if backend == "cpu":
        env = dict(os.environ, PYMETALNN_CPU_THREADS="1")
        subprocess.run([sys.executable, __file__, "--one-worker"], env=env, check=True)
        rows.append(bench_cpu_reduce(1 << 20))
        rows.append(bench_cpu_elementwise((1 << 20) if args.quick else (1 << 24)))
    elif backend == "cuda":
        rows.extend(bench_cuda(args.quick))
    common.report(rows, ["bench", "backend", "seconds", "spread", "GB/s", "peer", "peer_seconds",
                         "ratio_vs_peer", "target"], f"runtime_{backend}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
