"""Harness of the memory-bound benchmarks (bench_arith.py, bench_copy.py, bench_dropout.py).

Each case times one of our ops, counts the bytes it must read and write, and reports GB/s, the
ratio to the device's copy bandwidth measured in the same run (cuda: CuPy's device-to-device
copy; cpu: numpy.copyto, on a buffer of the op's size) and a peer's time for the same op (cuda:
PyTorch on the same GPU; cpu: numpy), on the same data.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import common  # benchmarks/ is on sys.path: the scripts run from there
import numpy as np

import pymetalnn

COLS = ["bench", "dtype", "shape", "seconds", "spread", "GB/s", "copy_GB/s", "ratio_vs_copy",
        "host_us", "peer", "peer_seconds", "ratio_vs_peer"]


def timer(dev: pymetalnn.Device) -> Callable[[Callable[[], Any]], tuple[float, float]]:
    return lambda fn: common.time_on(dev, fn)


copy_bandwidth = common.copy_gbs
torch_view = common.torch_view
torch_available = common.torch_available


def case(dev: pymetalnn.Device, name: str, dtype: Any, shape: tuple, nbytes: int, copy_gbs: float,
         ours: Callable[[], Any], peer: Callable[[], Any] | None, peer_name: str) -> dict:
    """Time `ours` (and `peer`), moving `nbytes` bytes; one result row."""
    t = timer(dev)
    med, spread = t(ours)
    # host time per call (queued, not waited for): when it exceeds `seconds` on a GPU, the op is
    # launch-bound and the GPU time above includes idle gaps
    dev.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        ours()
    host = (time.perf_counter() - t0) / 5
    dev.synchronize()
    row = {"bench": name, "backend": common.device_label(dev), "dtype": np.dtype(dtype).name,
           "shape": "x".join(map(str, shape)), "seconds": med, "spread": spread,
           "GB/s": nbytes / med / 1e9, "copy_GB/s": copy_gbs,
           "ratio_vs_copy": nbytes / med / 1e9 / copy_gbs, "host_us": host * 1e6,
           "target": "ratio_vs_copy >= 0.85"}
    if peer is not None:
        p_med, _ = (common.time_cuda(peer) if dev.name == "cuda"
                    else common.time_host(peer, lambda: None, warmup=1, reps=5))
        row.update({"peer": peer_name, "peer_seconds": p_med, "ratio_vs_peer": p_med / med})
    return row


def report(name: str, dev: pymetalnn.Device, rows: list[dict]) -> None:
    print(f"# {name} on {common.device_label(dev)}")
    common.print_table(rows, COLS)
    print("results:", common.write_results(f"{name}_{dev.name}", rows))
