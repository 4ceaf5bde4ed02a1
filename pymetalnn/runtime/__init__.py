"""The kernel runtime: one `.metal` source, three backends (metal, cuda, cpu).

    dev = pymetalnn.device()                 # PYMETALNN_BACKEND, else metal, cuda, cpu
    lib = dev.library("conv.metal", defines={"ACC": "float"})
    k = lib.kernel("conv_fwd_float")
    k(count, buf_a, buf_b, params)           # queued; dev.synchronize() waits
"""
from __future__ import annotations

import os
import threading

from .core import Buffer, BufferView, Device, Kernel, Library
from .errors import (
    ArgumentTypeError,
    AsyncError,
    BackendUnavailable,
    CompileError,
    DispatchError,
    MSLError,
    ValidationError,
)

BACKENDS = ("metal", "cuda", "cpu")
_devices: dict[str, Device] = {}
# backends the automatic choice found unable to run, with the reason: probed once per process, as
# a failed import is retried by Python on every attempt (~80 us each, on every default-device op)
_unavailable: dict[str, BackendUnavailable] = {}
_lock = threading.Lock()


def _make(name: str) -> Device:
    if name == "cpu":
        from .backend_cpu import CpuDevice

        return CpuDevice()
    if name == "cuda":
        from .backend_cuda import CudaDevice

        return CudaDevice()
    if name == "metal":
        from .backend_metal import MetalDevice

        return MetalDevice()
    raise ValueError(f"name: unknown backend {name!r} (choose from {', '.join(BACKENDS)})")


def device(name: str | None = None) -> Device:
    """The device of backend `name`; with no name, $PYMETALNN_BACKEND, else the first available of
    metal, cuda, cpu. Devices are created once per process."""
    if name is None:
        name = os.environ.get("PYMETALNN_BACKEND") or None
    with _lock:
        if name is not None:
            if name not in _devices:
                _devices[name] = _make(name)
            return _devices[name]
        for cand in BACKENDS:
            if cand in _devices:
                return _devices[cand]
            if cand in _unavailable:
                continue
            try:
                _devices[cand] = _make(cand)
                return _devices[cand]
            except BackendUnavailable as e:
                _unavailable[cand] = e
    raise BackendUnavailable("no backend can run here: " + "; ".join(
        f"{b}: {r}" for b, r in availability().items() if r))


def availability() -> dict[str, str | None]:
    """Backend name -> None when it can run here, else the reason it cannot."""
    from . import backend_cpu, backend_cuda, backend_metal

    out: dict[str, str | None] = {}
    for name, mod in (("metal", backend_metal), ("cuda", backend_cuda), ("cpu", backend_cpu)):
        try:
            out[name] = mod.probe()
        except Exception as e:  # a probe must never take the report down
            out[name] = f"{e.__class__.__name__}: {e}"
    return out


__all__ = [
    "BACKENDS", "ArgumentTypeError", "AsyncError", "BackendUnavailable", "Buffer", "BufferView",
    "CompileError", "Device",
    "DispatchError", "Kernel", "Library", "MSLError", "ValidationError", "availability",
    "device",
]
