"""pymetalnn: hand-written Metal compute kernels for training and running neural networks,
driven from Python, on Apple GPUs (metal), NVIDIA GPUs (cuda) and any CPU (cpu)."""
from __future__ import annotations

from .runtime import (
    BackendUnavailable,
    Buffer,
    BufferView,
    CompileError,
    Device,
    DispatchError,
    Kernel,
    Library,
    MSLError,
    availability,
    device,
)

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailable", "Buffer", "BufferView", "CompileError", "Device", "DispatchError",
    "Kernel", "Library", "MSLError", "availability", "device",
]
