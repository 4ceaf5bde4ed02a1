"""Helpers of the memory-bound benchmarks (bench_softmax.py, bench_loss.py, bench_norm.py).

Every row reports GB/s of the bytes an op must read and write at least (each input once, each
output once), the device's copy bandwidth measured in the same run (CuPy device-to-device copy of
the same number of bytes on cuda; numpy's copy on cpu) and the ratio, plus a peer's time for the
same op (PyTorch on the same GPU; numpy on cpu).
"""
from __future__ import annotations

from typing import Any

import common
import numpy as np

import pymetalnn

timeit = common.time_on
torch_cuda = common.torch_view


def copy_gbs(dev: pymetalnn.Device, nbytes: int, quick: bool = False) -> float:
    """Copy bandwidth for a copy of `nbytes` (see common.copy_gbs)."""
    return common.copy_gbs(dev, nbytes)


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


torch_disable_tf32 = common.disable_tf32
