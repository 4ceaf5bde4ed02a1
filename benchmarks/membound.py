"""Harness of the memory-bound benchmarks (bench_arith, bench_copy, bench_dropout, bench_loss,
bench_neuron, bench_norm, bench_pool, bench_softmax).

Every row reports GB/s of the bytes an op must read and write at least (each input once, each
output once), the device's copy bandwidth measured in the same run (CuPy device-to-device copy of
the same number of bytes on cuda; numpy's copy on cpu) and the ratio `vs_copy`, plus a peer's time
for the same op on the same data (PyTorch on the same GPU; numpy on cpu) and `speedup_vs_peer`.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable

import common  # benchmarks/ is on sys.path: the scripts run from there
import numpy as np

import pymetalnn

COLUMNS = ["bench", "dtype", "shape", "seconds", "spread", "GB/s", "copy_GB/s", "vs_copy", "peer",
           "peer_seconds", "speedup_vs_peer", "target"]
# with the time of the op allocating fresh outputs (bench_neuron, bench_pool)
COLUMNS_ALLOC = [*COLUMNS[:5], "alloc_seconds", *COLUMNS[5:]]
# with the host time per call (rows of `case`)
COLUMNS_HOST = [*COLUMNS[:8], "host_us", *COLUMNS[8:]]


def row(bench: str, dev: pymetalnn.Device, dtype: Any, shape: tuple, nbytes: int, sec: float,
        spread: float, copy: float, peer: str | None = None, peer_sec: float | None = None,
        target: str = "-") -> dict:
    gbs = nbytes / sec / 1e9
    return {"bench": bench, "backend": common.device_label(dev), "dtype": np.dtype(dtype).name,
            "shape": "x".join(map(str, shape)), "seconds": sec, "spread": spread, "GB/s": gbs,
            "copy_GB/s": copy, "vs_copy": gbs / copy, "peer": peer or "-", "peer_seconds": peer_sec,
            "speedup_vs_peer": (peer_sec / sec) if peer_sec else None, "target": target}


def case(dev: pymetalnn.Device, name: str, dtype: Any, shape: tuple, nbytes: int, copy: float,
         ours: Callable[[], Any], peer: Callable[[], Any] | None, peer_name: str) -> dict:
    """Time `ours` (and `peer`), moving `nbytes` bytes; one row, with `host_us`."""
    med, spread = common.time_on(dev, ours)
    # host time per call (queued, not waited for): when it exceeds `seconds` on a GPU, the op is
    # launch-bound and the GPU time above includes idle gaps
    dev.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        ours()
    host = (time.perf_counter() - t0) / 5
    dev.synchronize()
    p_med = None
    if peer is not None:
        p_med, _ = (common.time_cuda(peer) if dev.name == "cuda"
                    else common.time_host(peer, lambda: None, warmup=1, reps=5))
    r = row(name, dev, dtype, shape, nbytes, med, spread, copy, peer_name if peer else None, p_med,
            "vs_copy >= 0.85")
    r["host_us"] = host * 1e6
    return r


def run_dtypes(name: str, doc: str | None,
               cases: Callable[[pymetalnn.Device, bool, Any], list[dict]]) -> int:
    """main() of a script whose rows come from `cases(dev, quick, dtype)` for float32 and
    float16: parse --backend/--quick, run, print and write the rows."""
    args = common.parser(doc).parse_args()
    dev = pymetalnn.device(args.backend)
    rows = [r for dtype in (np.float32, np.float16) for r in cases(dev, args.quick, dtype)]
    batch = os.environ.get("PYMETALNN_BENCH_BATCH", "1")
    how = f"; {batch} calls back to back per timing sample" if batch != "1" and dev.name == "cuda" \
        else ""
    common.report(rows, COLUMNS_HOST, f"{name}_{dev.name}",
                  f"# {name} on {common.device_label(dev)}{how}")
    return 0
