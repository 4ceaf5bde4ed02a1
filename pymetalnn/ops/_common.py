"""Helpers every op wrapper uses, so that each wrapper stays: validate, pick, fill, dispatch."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from ..runtime import Device, Kernel
from ..runtime import device as default_device
from ..tensor import Tensor, as_tensor, empty

DTYPE_SUFFIX = {np.dtype(np.float32): "float", np.dtype(np.float16): "half",
                np.dtype(np.int32): "int"}


def pick_device(*xs: Any) -> Device:
    """The device of the first Tensor among xs, else the default device."""
    for x in xs:
        if isinstance(x, Tensor):
            return x.device
    return default_device()


def kernel(dev: Device, source: str, name: str, defines: dict | None = None) -> Kernel:
    """`name` from `source` (kernels/), compiled once per device and defines."""
    return dev.library(source, defines).kernel(name)


def tensor_arg(x: Any, dev: Device, name: str, dtypes: Iterable[Any] | None = None,
               ndim: int | tuple[int, ...] | None = None) -> Tensor:
    """Validate one tensor argument: device, dtype, number of dimensions. Errors name `name`."""
    t = as_tensor(x, dev, name)
    if dtypes is not None:
        allowed = [np.dtype(d) for d in dtypes]
        if t.dtype not in allowed:
            raise ValueError(f"{name}: dtype {t.dtype} not supported here "
                             f"({', '.join(str(d) for d in allowed)})")
    if ndim is not None:
        dims = (ndim,) if isinstance(ndim, int) else ndim
        if t.ndim not in dims:
            raise ValueError(f"{name}: expected {' or '.join(map(str, dims))} dimensions, got "
                             f"{t.ndim} (shape {t.shape})")
    return t


def positive_ints(v: Any, n: int, name: str, allow_zero: bool = False) -> tuple[int, ...]:
    """An int or a sequence of n ints, each > 0 (>= 0 with allow_zero)."""
    try:
        vals = (v,) * n if isinstance(v, (int, np.integer)) else tuple(v)
    except TypeError:
        raise ValueError(f"{name}: expected an int or {n} ints, got {v!r}") from None
    if len(vals) != n or not all(isinstance(a, (int, np.integer)) for a in vals):
        raise ValueError(f"{name}: expected an int or {n} ints, got {v!r}")
    lo = 0 if allow_zero else 1
    if any(a < lo for a in vals):
        raise ValueError(f"{name}: values must be >= {lo}, got {v!r}")
    return tuple(int(a) for a in vals)


def out_like(shape: tuple[int, ...], dtype: Any, dev: Device) -> Tensor:
    return empty(shape, dtype, dev)


def suffix(dtype: Any) -> str:
    return DTYPE_SUFFIX[np.dtype(dtype)]
