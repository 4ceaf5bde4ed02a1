"""pymetalnn: hand-written Metal compute kernels for training and running neural networks,
driven from Python, on Apple GPUs (metal), NVIDIA GPUs (cuda) and any CPU (cpu)."""
from __future__ import annotations

from . import functional, optim  # noqa: E402
from .runtime import (
    ArgumentTypeError,
    AsyncError,
    BackendUnavailable,
    Buffer,
    BufferView,
    CompileError,
    Device,
    DispatchError,
    Kernel,
    Library,
    MSLError,
    ValidationError,
    availability,
    device,
)
from .tensor import Tensor, TensorLike, as_tensor, empty, float16, float32, int32, tensor, zeros  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "Tensor", "TensorLike", "as_tensor", "empty", "float16", "float32", "functional", "int32",
    "optim", "tensor", "zeros",
    "BackendUnavailable", "Buffer", "BufferView", "CompileError", "Device", "DispatchError",
    "Kernel", "Library", "MSLError", "availability", "device", "ArgumentTypeError", "AsyncError",
    "ValidationError",
]
