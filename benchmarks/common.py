"""Shared timing helpers for the benchmarks: warm up, repeat, report median and spread.

GPU work is timed with device events around the region (cuda) so host overhead does not count;
cpu work with perf_counter around a synchronize. Every figure is printed with the backend and
device that produced it.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any, Callable

import pymetalnn


def median_spread(samples: list[float]) -> tuple[float, float]:
    med = statistics.median(samples)
    spread = (max(samples) - min(samples)) / med if med > 0 else 0.0
    return med, spread


def time_host(fn: Callable[[], Any], sync: Callable[[], Any], warmup: int = 2, reps: int = 5
              ) -> tuple[float, float]:
    """Median seconds of fn() followed by sync(), and relative spread."""
    for _ in range(warmup):
        fn()
        sync()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - t0)
    return median_spread(samples)


def time_cuda(fn: Callable[[], Any], warmup: int = 3, reps: int = 20) -> tuple[float, float]:
    """Median seconds of fn() between CUDA events on the default stream."""
    import cupy as cp

    for _ in range(warmup):
        fn()
    cp.cuda.runtime.deviceSynchronize()
    samples = []
    for _ in range(reps):
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(cp.cuda.get_elapsed_time(start, end) / 1e3)
    return median_spread(samples)


def device_label(dev: pymetalnn.Device) -> str:
    if dev.name == "cuda":
        return f"cuda ({dev.gpu_name})"
    if dev.name == "cpu":
        return f"cpu ({dev.num_workers} worker threads)"
    return dev.name


def write_results(name: str, rows: list[dict], out_dir: str | None = None) -> str:
    out_dir = out_dir or os.environ.get("PYMETALNN_RESULTS", "results")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
    return path


def print_table(rows: list[dict], cols: list[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(cols, widths)))


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
