"""Embedding lookup (embedding.metal), as torch.nn.functional.embedding.

    y[..., j] = weight[input[...], j]

input: integer indices of any shape (int32 tensors, or host integer arrays of any width), range-
checked on the host before anything is dispatched (a device tensor is read back for it, as the
losses' labels are); weight (V, D) float32 or float16. padding_idx: that row receives no
gradient (negative values count from V). scale_grad_by_freq: each row's gradient is divided by
the number of times it is indexed. max_norm: as torch, the forward first renormalizes in place
every indexed row of weight whose norm_type-norm exceeds max_norm (scaled by max_norm / (norm +
1e-7); weight must then be a pymetalnn Tensor); the backward does not renormalize (torch's
gradient is that of the lookup of the renormalized rows). sparse=True gives the same gradient
as a dense table (pymetalnn has no sparse tensors; the values are torch's sparse gradient's).

Backward follows the functional convention: embedding_backward(grad_out, input, weight, ...)
returns (None, dL/dweight) -- None for the integer indices. The gradient is deterministic: the
host sorts the indices into one segment per distinct row and the kernel sums each segment in
index order (embedding.metal's note), so no float atomics; it writes every row (no zero fill).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..params import EmbeddingParams
from ..runtime import Device
from ..tensor import Tensor, TensorLike, int32
from ._common import (
    FLOATS,
    MAX_ELEMS_U32,
    as_tensor,
    boolean,
    empty,
    kernel,
    number,
    pick_device,
    suffix,
    tensor_arg,
)

SOURCE = "embedding.metal"


def _indices(input: Any, dev: Device, v: int) -> tuple[Tensor, np.ndarray]:
    arr = input.numpy() if isinstance(input, Tensor) else np.asarray(input)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"input: indices must be integers, got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() >= v):
        bad = arr[(arr < 0) | (arr >= v)].reshape(-1)[0]
        raise ValueError(f"input: index {int(bad)} is out of range for a table of {v} rows")
    if isinstance(input, Tensor) and input.dtype == int32:
        if input.device is not dev:
            raise ValueError(f"input: tensor is on {input.device.name}, expected {dev.name}")
        return input, arr
    return as_tensor(arr.astype(np.int32), dev, "input"), arr


def _args(input: Any, weight: Any, padding_idx: Any, max_norm: Any, norm_type: Any, sparse: Any,
          renorm: bool = False) -> tuple[Device, Tensor, Tensor, np.ndarray, int | None]:
    dev = pick_device(weight, input)
    w = tensor_arg(weight, dev, "weight", FLOATS, 2)
    v, d = w.shape
    if max_norm is not None:
        mn = number(max_norm, "max_norm")
        if not mn >= 0 or not np.isfinite(mn):
            raise ValueError(f"max_norm: expected a finite number >= 0, got {max_norm!r}")
        pn = number(norm_type, "norm_type")
        if not pn > 0:
            raise ValueError(f"norm_type: expected a number > 0 (or inf), got {norm_type!r}")
        if renorm and not isinstance(weight, Tensor):
            raise ValueError("weight: max_norm renormalizes rows in place, so weight must be a "
                             f"pymetalnn Tensor, got {type(weight).__name__}")
    boolean(sparse, "sparse")
    pad = None
    if padding_idx is not None:
        if isinstance(padding_idx, bool) or not isinstance(padding_idx, (int, np.integer)):
            raise ValueError(f"padding_idx: expected an int or None, got {padding_idx!r}")
        if not -v <= int(padding_idx) < v:
            raise ValueError(f"padding_idx: {padding_idx} is out of range for {v} rows")
        pad = int(padding_idx) % v
    idx, arr = _indices(input, dev, v)
    if idx.size * d > MAX_ELEMS_U32 or w.size > MAX_ELEMS_U32:
        raise ValueError("input: the output would exceed the kernels' 32-bit indexing")
    return dev, idx, w, arr, pad


def embedding(input: TensorLike, weight: TensorLike, padding_idx: int | None = None, max_norm: Any = None,
              norm_type: float = 2.0, scale_grad_by_freq: bool = False, sparse: bool = False
              ) -> Tensor:
    """y = weight[input] (shape input.shape + (D,)); torch's positional order. max_norm: the
    indexed rows of weight renormalized in place first (module docstring)."""
    dev, idx, w, arr, _ = _args(input, weight, padding_idx, max_norm, norm_type, sparse, True)
    boolean(scale_grad_by_freq, "scale_grad_by_freq")
    if max_norm is not None and arr.size and w.shape[1]:
        rows = np.unique(arr.reshape(-1)).astype(np.int32)
        p = EmbeddingParams(n=rows.size, V=w.shape[0], D=w.shape[1], max_norm=float(max_norm),
                            norm_type=float(norm_type))
        kernel(dev, SOURCE, f"embedding_renorm_{suffix(w.dtype)}")(
            rows.size, as_tensor(rows, dev, "rows").buffer, w.buffer, p)
    y = empty(tuple(idx.shape) + (w.shape[1],), w.dtype, dev)
    if y.size:
        p = EmbeddingParams(n=idx.size, V=w.shape[0], D=w.shape[1])
        kernel(dev, SOURCE, f"embedding_fwd_{suffix(w.dtype)}")(y.size, idx.buffer, w.buffer, y.buffer, p)
    return y


def embedding_backward(grad_out: TensorLike, input: TensorLike, weight: TensorLike,
                       padding_idx: int | None = None,
                       max_norm: Any = None, norm_type: float = 2.0,
                       scale_grad_by_freq: bool = False, sparse: bool = False
                       ) -> tuple[None, Tensor]:
    """(None, dL/dweight): dweight[r, j] = sum over positions i with input[i] = r of
    grad_out[i, j] (/ count of r with scale_grad_by_freq); 0 for the padding row."""
    dev, idx, w, arr, pad = _args(input, weight, padding_idx, max_norm, norm_type, sparse)
    scale = boolean(scale_grad_by_freq, "scale_grad_by_freq")
    if scale and boolean(sparse, "sparse"):
        raise ValueError("scale_grad_by_freq: not supported with sparse gradients (as torch)")
    g = tensor_arg(grad_out, dev, "grad_out", (w.dtype,))
    want = tuple(idx.shape) + (w.shape[1],)
    if g.shape != want:
        raise ValueError(f"grad_out: shape {g.shape}, expected {want} (input's shape + (D,))")
    dw = empty(w.shape, w.dtype, dev)  # every element written by the kernel (no zero fill)
    if not dw.size:
        return None, dw
    flat = arr.reshape(-1).astype(np.int64)
    keep = np.nonzero(flat != pad)[0] if pad is not None else np.arange(flat.size)
    perm = keep[np.argsort(flat[keep], kind="stable")]
    srt = flat[perm]
    starts = np.flatnonzero(np.r_[True, srt[1:] != srt[:-1]]) if srt.size else np.zeros(0, np.int64)
    seg = np.r_[starts, srt.size].astype(np.int32)
    rowseg = np.full(w.shape[0], -1, np.int32)
    rowseg[srt[starts]] = np.arange(starts.size, dtype=np.int32)
    p = EmbeddingParams(n=flat.size, V=w.shape[0], D=w.shape[1], segments=starts.size,
                        scale_by_freq=int(scale))
    kernel(dev, SOURCE, f"embedding_bwd_{suffix(w.dtype)}")(
        dw.size, g.buffer, as_tensor(np.r_[perm, 0].astype(np.int32), dev, "perm").buffer,
        as_tensor(seg, dev, "seg").buffer, as_tensor(rowseg, dev, "rowseg").buffer, dw.buffer, p)
    return None, dw
