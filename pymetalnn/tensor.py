"""Tensor: a contiguous n-d array in device memory, the currency of the functional ops.

Deliberately small: shape, dtype (float32, float16; int32 for labels), the device and the buffer
behind it. Every tensor is C-contiguous, so a kernel receives a pointer and the shape in its
params struct and nothing else; reshape shares memory, everything else makes a new tensor.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Union

import numpy as np

from .runtime import Buffer, Device
from .runtime import device as _default_device

DTYPES = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.int32))
float32 = np.dtype(np.float32)
float16 = np.dtype(np.float16)
int32 = np.dtype(np.int32)


def _check_dtype(dtype: Any) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in DTYPES:
        raise ValueError(f"dtype: {dt} is not supported (float32, float16, int32)")
    return dt


def _int_shape(shape: Any) -> tuple[int, ...]:
    """tuple(int(s) for s in shape), without the conversions when every s is already an int."""
    for s in shape:
        if s.__class__ is not int:
            return tuple(int(s) for s in shape)
    return shape if shape.__class__ is tuple else tuple(shape)


class Tensor:
    """Device memory with a shape and a dtype. `np.asarray(t)` and `t.numpy()` copy to the host."""

    __array_priority__ = 100

    def __init__(self, buffer: Buffer, shape: tuple[int, ...], dtype: Any):
        self.buffer = buffer
        self.shape = shape = _int_shape(shape)
        # fast path: one of the supported dtype objects itself (what ops pass along)
        self.dtype = dtype if dtype is float32 or dtype is float16 or dtype is int32 \
            else _check_dtype(dtype)
        if math.prod(shape) * self.dtype.itemsize > buffer.nbytes:
            raise ValueError(f"shape: {self.shape} of {self.dtype} needs {self.nbytes} bytes, the "
                             f"buffer has {buffer.nbytes}")

    @property
    def device(self) -> Device:
        return self.buffer.device

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)  # exact Python ints; np.prod costs microseconds per view

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def numpy(self) -> np.ndarray:
        """A host copy (waits for queued kernels)."""
        if self.size == 0:
            return np.zeros(self.shape, self.dtype)
        buf = self.buffer
        if self.nbytes != buf.nbytes and buf.device.supports_views:
            buf = buf.view(0, self.nbytes)
            return buf.numpy(self.dtype, self.shape)
        return buf.numpy(np.uint8)[: self.nbytes].view(self.dtype).reshape(self.shape)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        a = self.numpy()
        return a if dtype is None else a.astype(dtype)

    def reshape(self, *shape: Any) -> Tensor:
        """Same memory, new shape (one dimension may be -1)."""
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        shape = tuple(int(s) for s in shape)
        if shape.count(-1) > 1:
            raise ValueError("shape: at most one dimension may be -1")
        if -1 in shape:
            known = math.prod(s for s in shape if s != -1)
            if known == 0 or self.size % known:
                raise ValueError(f"shape: cannot reshape {self.shape} into {shape}")
            shape = tuple(self.size // known if s == -1 else s for s in shape)
        if math.prod(shape) != self.size:
            raise ValueError(f"shape: cannot reshape {self.shape} ({self.size} elements) into {shape}")
        return Tensor(self.buffer, shape, self.dtype)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"Tensor(shape={self.shape}, dtype={self.dtype}, device={self.device.name})"


# A tensor argument of a public op: a device Tensor, or host data (a numpy array, nested sequences
# of numbers, a number) that the op copies to the device first (as_tensor).
TensorLike = Union[Tensor, np.ndarray, Sequence[Any], float]


def empty(shape: Any, dtype: Any = float32, device: Device | None = None) -> Tensor:
    """A tensor whose contents are unspecified until a kernel writes them (no fill pass)."""
    dev = device or _default_device()
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    for s in shape:  # fast path: sizes that are ints >= 0 need no conversion
        if s.__class__ is not int or s < 0:
            break
    else:
        dt = dtype if dtype is float32 or dtype is float16 or dtype is int32 \
            else _check_dtype(dtype)
        return Tensor(dev.buffer(math.prod(shape) * dt.itemsize, zero=False), shape, dt)
    if any(int(s) < 0 for s in shape):
        raise ValueError(f"shape: negative size in {shape}")
    dt = _check_dtype(dtype)
    nbytes = math.prod(int(d) for d in shape) * dt.itemsize
    return Tensor(dev.buffer(nbytes, zero=False), shape, dt)


def zeros(shape: Any, dtype: Any = float32, device: Device | None = None) -> Tensor:
    """A zero-filled tensor."""
    dev = device or _default_device()
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    t = empty(shape, dtype, dev)
    return Tensor(dev.buffer(t.nbytes), shape, t.dtype)


def tensor(data: Any, device: Device | None = None, dtype: Any = None) -> Tensor:
    """Copy an array-like to the device (float64 becomes float32, int64 becomes int32)."""
    if isinstance(data, Tensor):
        data = data.numpy()
    arr = np.asarray(data)
    if dtype is None:
        if arr.dtype == np.float64 or arr.dtype.kind in "b":
            dtype = float32
        elif arr.dtype.kind in "iu":
            dtype = int32
        else:
            dtype = arr.dtype
    dt = _check_dtype(dtype)
    if arr.dtype.kind in "iu" and dt == int32 and arr.size and \
            (arr.max() > np.iinfo(np.int32).max or arr.min() < np.iinfo(np.int32).min):
        raise ValueError("data: integer values do not fit int32")
    arr = np.array(arr, dtype=dt, order="C", copy=True)  # keeps 0-d shapes
    dev = device or _default_device()
    return Tensor(dev.buffer(arr) if arr.nbytes else dev.buffer(0), arr.shape, dt)


def as_tensor(x: Any, device: Device | None, name: str, dtype: Any = None) -> Tensor:
    """`x` as a Tensor on `device` (numpy input is copied there); names `name` in errors."""
    if isinstance(x, Tensor):
        if device is not None and x.device is not device:
            raise ValueError(f"{name}: tensor is on {x.device.name}, expected {device.name}")
        if dtype is not None and x.dtype != np.dtype(dtype):
            raise ValueError(f"{name}: dtype {x.dtype}, expected {np.dtype(dtype)}")
        return x
    if x is None:
        raise ValueError(f"{name}: got None")
    try:
        return tensor(x, device, dtype)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
