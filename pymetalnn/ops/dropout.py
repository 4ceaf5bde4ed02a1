"""Dropout and spatial dropout (kernels/dropout.metal) with a counter-based RNG.

    dropout(x, p)[i]   = x[i] * m[i] / (1 - p),       m[i] = [philox word i >= round(p * 2^32)]
    dropout2d(x, p)[n, c, h, w] = x[n, c, h, w] * m[n*C + c] / (1 - p)   (one draw per channel)

p is the probability of dropping, as in torch (MPS's keep probability is 1 - p). The mask is a
pure function of (seed, offset, index) through Philox4x32-10 (key = the 64-bit seed, counter =
(index // 4, 0, offset lo, offset hi)), so the backward recomputes it rather than storing it, and
every backend produces the same bits. Calls that share a seed should use different offsets (e.g.
advance the offset by the number of elements, rounded up to a multiple of 4, after each call).

offset_tensor (keyword): a 32-bit integer tensor of 2 words (lo, hi) on the device whose 64-bit value the
kernel adds to `offset` when it runs. A graph passes its step counter, which a kernel advances at
the end of each training step, so that a captured step replayed draws a fresh mask each time
(exactly the mask an encoded step would draw) without the host writing anything.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..params import DropoutParams
from ..runtime import Device
from ..runtime.core import MAX_GRID_THREADS
from ..tensor import Tensor, TensorLike
from ._common import (
    FLOATS,
    MAX_ELEMS_U32,
    kernel,
    out_like,
    pick_device,
    stream_chunk,
    stream_nvec,
    stream_vthreads,
    suffix,
    tensor_arg_u32,
)
from .arith import GRID_CAP
from .copy import copy

SOURCE = "dropout.metal"


def _u64(v: Any, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= int(v) < 2**64:
        raise ValueError(f"{name}: expected an int in [0, 2^64), got {v!r}")
    return int(v)


def _p(p: Any) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float, np.integer, np.floating)) or \
            not 0.0 <= float(p) < 1.0:
        raise ValueError(f"p: the drop probability must be in [0, 1), got {p!r}")
    return float(p)


def _params(n: int, p: float, seed: int, offset: int) -> DropoutParams:
    return DropoutParams(n=n, key0=seed & 0xFFFFFFFF, key1=seed >> 32, ctr2=offset & 0xFFFFFFFF,
                         ctr3=offset >> 32, threshold=min(round(p * 2.0**32), 2**32 - 1),
                         scale=1.0 / (1.0 - p), inner=1, channels=0, items=-(-n // 4), vec=1)


_ZERO: dict[int, Any] = {}


def _base(dev: Device, offset_tensor: Any) -> Any:
    """The buffer of offset_tensor (checked), or a per-device zero pair."""
    if offset_tensor is None:
        b = _ZERO.get(id(dev))
        if b is None or b.device is not dev:
            b = _ZERO[id(dev)] = dev.buffer(np.zeros(4, np.uint32))
        return b
    if not isinstance(offset_tensor, Tensor) or offset_tensor.dtype.itemsize != 4 or \
            offset_tensor.dtype.kind not in "iu" or offset_tensor.size != 2:
        raise ValueError("offset_tensor: expected a 32-bit integer Tensor of 2 elements (offset "
                         f"lo, hi; read as uint32), got {offset_tensor!r}")
    if offset_tensor.device is not dev:
        raise ValueError(f"offset_tensor: on {offset_tensor.device.name}, x on {dev.name}")
    return offset_tensor.buffer


def _run(name: str, x: Tensor, p: float, seed: int, offset: int, inner: int | None,
         offset_tensor: Any = None) -> Tensor:
    base = _base(x.device, offset_tensor)
    out = out_like(x.shape, x.dtype, x.device)
    if x.size == 0:
        return out
    prm = _params(x.size, p, seed, offset)
    k = kernel(x.device, SOURCE, f"{name}_{suffix(x.dtype)}")
    # stream.h path: nvec 16-byte chunks of w elements (w / 4 Philox blocks each); dropout then
    # does the leftover blocks with one thread each, dropout2d needs whole chunks per channel
    w = stream_chunk(x.dtype.itemsize)
    nvec = stream_nvec(x.size, w, (x, out))
    if inner is not None:
        prm.inner = inner
        prm.channels = x.size // inner
        prm.items = prm.channels * -(-inner // 4)
        if inner % w:
            nvec = 0
    count = stream_vthreads(nvec) + (prm.items - nvec * w // 4) if nvec else 0
    if nvec and count <= MAX_GRID_THREADS:
        prm.vec = nvec
        k(count, x.buffer, out.buffer, prm, base)
    else:
        prm.vec = 0
        k(min(prm.items, GRID_CAP), x.buffer, out.buffer, prm, base)
    return out


def _check(x: TensorLike, dev: Device, name: str, p: Any, seed: Any, offset: Any, spatial: bool
           ) -> tuple[Tensor, float, int, int]:
    t = tensor_arg_u32(x, dev, name, FLOATS, 4 if spatial else None)
    return t, _p(p), _u64(seed, "seed"), _u64(offset, "offset")


def dropout(input: TensorLike, p: float = 0.5, seed: int = 0, offset: int = 0, training: bool = True, *,
            offset_tensor: Tensor | None = None) -> Tensor:
    """Zero each element with probability p, scale the rest by 1 / (1 - p); identity (a copy)
    when not training."""
    x = input
    x, p, seed, offset = _check(x, pick_device(x), "x", p, seed, offset, False)
    return _run("dropout_fwd", x, p, seed, offset, None, offset_tensor) if training else copy(x)


def dropout_backward(grad_out: TensorLike, p: float = 0.5, seed: int = 0, offset: int = 0,
                     training: bool = True, *, offset_tensor: Tensor | None = None) -> Tensor:
    """dL/dx of dropout(x, p, seed, offset, training): grad_out * mask / (1 - p), the mask
    recomputed from (seed, offset)."""
    g, p, seed, offset = _check(grad_out, pick_device(grad_out), "grad_out", p, seed, offset, False)
    return _run("dropout_bwd", g, p, seed, offset, None, offset_tensor) if training else copy(g)


def dropout2d(input: TensorLike, p: float = 0.5, seed: int = 0, offset: int = 0, training: bool = True, *,
              offset_tensor: Tensor | None = None) -> Tensor:
    """Spatial dropout of x (N, C, H, W): zero whole channels with probability p (one draw per
    (n, c)), scale the rest by 1 / (1 - p)."""
    x = input
    x, p, seed, offset = _check(x, pick_device(x), "x", p, seed, offset, True)
    inner = x.shape[2] * x.shape[3]
    return _run("dropout2d_fwd", x, p, seed, offset, inner, offset_tensor) if training \
        else copy(x)


def dropout2d_backward(grad_out: TensorLike, p: float = 0.5, seed: int = 0, offset: int = 0,
                       training: bool = True, *, offset_tensor: Tensor | None = None) -> Tensor:
    """dL/dx of dropout2d(x, p, seed, offset, training), the channel mask recomputed."""
    g, p, seed, offset = _check(grad_out, pick_device(grad_out), "grad_out", p, seed, offset, True)
    inner = g.shape[2] * g.shape[3]
    return _run("dropout2d_bwd", g, p, seed, offset, inner, offset_tensor) if training \
        else copy(g)


def dropout_offset_advance(offset_tensor: Tensor) -> None:
    """offset_tensor's 64-bit value (2 words: lo, hi) += 1 on the device, in queue order (no host
    read or write): a graph's step counter moved on at the end of a training step, so a replayed
    capture draws the next step's masks, as a newly encoded step would."""
    if not isinstance(offset_tensor, Tensor):
        raise ValueError(f"offset_tensor: expected a Tensor, got {type(offset_tensor).__name__}")
    dev = offset_tensor.device
    kernel(dev, SOURCE, "dropout_offset_advance")(1, _base(dev, offset_tensor))


def philox_stream(n: int, seed: int, offset: int = 0, device: Device | None = None) -> np.ndarray:
    """The first n uint32 words of the stream dropout draws from (seed, offset), computed on the
    device: word 4b + j = word j of Philox4x32-10(counter (b, 0, offset lo, offset hi), seed)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 < n <= MAX_ELEMS_U32:
        raise ValueError(f"n: expected an int in [1, 2^32), got {n!r}")
    dev = device or pick_device()
    prm = _params(int(n), 0.0, _u64(seed, "seed"), _u64(offset, "offset"))
    out = dev.buffer(4 * int(n))
    kernel(dev, SOURCE, "philox_fwd_stream_uint")(min(prm.items, GRID_CAP), out, prm)
    return out.numpy(np.uint32)


def philox4x32_10(counters: Any, key: tuple[int, int], device: Device | None = None) -> np.ndarray:
    """Philox4x32-10 of explicit counters ((n, 4) uint32) under key (k0, k1), on the device."""
    ctr = np.ascontiguousarray(np.asarray(counters, dtype=np.uint64).reshape(-1, 4))
    if ctr.size == 0 or (ctr > 0xFFFFFFFF).any():
        raise ValueError("counters: expected a non-empty (n, 4) array of uint32 words")
    k = [int(v) for v in key]
    if len(k) != 2 or not all(0 <= v < 2**32 for v in k):
        raise ValueError(f"key: expected two uint32 words, got {key!r}")
    dev = device or pick_device()
    n = ctr.shape[0]
    prm = DropoutParams(n=4 * n, key0=k[0], key1=k[1], items=n)
    out = dev.buffer(16 * n)
    kernel(dev, SOURCE, "philox_fwd_block_uint")(n, dev.buffer(ctr.astype(np.uint32)), out, prm)
    return out.numpy(np.uint32).reshape(n, 4)
