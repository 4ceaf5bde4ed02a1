"""Helpers of the memory-bound benchmarks (bench_softmax.py, bench_loss.py, bench_norm.py).

Every row reports GB/s of the bytes an op must read and write at least (each input once, each
output once), the device's copy bandwidth measured in the same run (CuPy device-to-device copy of
the same number of bytes on cuda; numpy's copy on cpu) and the ratio, plus a peer's time for the
same op (PyTorch on the same GPU; numpy on cpu).
"""
from __future__ import annotations

from typing import Any, Callable

import common
import numpy as np

import pymetalnn


def timeit(dev: pymetalnn.Device, fn: Callable[[], Any], quick: bool = False) -> tuple[float, float]:
    """Median seconds and spread of fn() on `dev` (CUDA events on cuda)."""
    if dev.name == "cuda":
        return common.time_cuda(fn, warmup=3, reps=5 if quick else 20)
    return common.time_host(fn, dev.synchronize, warmup=1, reps=3 if quick else 5)


_COPY: dict[tuple[str, int], float] = {}


def copy_gbs(dev: pymetalnn.Device, nbytes: int, quick: bool = False) -> float:
    """Copy bandwidth (bytes read + written per second / 1e9) for a copy of `nbytes`."""
    key = (dev.name, nbytes)
    if key in _COPY:
        return _COPY[key]
    if dev.name == "cuda":
        import cupy as cp

        a = cp.ones(nbytes // 4, cp.float32)
        b = cp.empty_like(a)
        sec, _ = common.time_cuda(lambda: b.data.copy_from_device(a.data, a.nbytes))
    else:
        a = np.ones(nbytes // 4, np.float32)
        b = np.empty_like(a)
        sec, _ = common.time_host(lambda: np.copyto(b, a), lambda: None)
    _COPY[key] = 2 * (nbytes // 4) * 4 / sec / 1e9
    return _COPY[key]


def torch_cuda(dev: pymetalnn.Device, t: pymetalnn.Tensor) -> Any:
    """A torch CUDA tensor over the same memory as `t` (no copy), or None without torch."""
    try:
        import torch
    except ImportError:
        return None
    arr = dev.as_cupy(t.buffer, t.dtype, t.shape)
    return torch.as_tensor(arr, device="cuda")


def row(bench: str, dev: pymetalnn.Device, dtype: Any, shape: tuple, nbytes: int, sec: float,
        spread: float, copy: float, peer: str | None = None, peer_sec: float | None = None,
        target: str = "-") -> dict:
    gbs = nbytes / sec / 1e9
    return {"bench": bench, "backend": common.device_label(dev), "dtype": np.dtype(dtype).name,
            "shape": "x".join(map(str, shape)), "seconds": sec, "spread": spread, "GB/s": gbs,
            "copy_GB/s": copy, "vs_copy": gbs / copy, "peer": peer or "-", "peer_seconds": peer_sec,
            "speedup_vs_peer": (peer_sec / sec) if peer_sec else None, "target": target}


COLUMNS = ["bench", "dtype", "shape", "seconds", "spread", "GB/s", "copy_GB/s", "vs_copy", "peer",
           "peer_seconds", "speedup_vs_peer", "target"]


def torch_disable_tf32() -> None:
    try:
        import torch

        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    except ImportError:
        pass
