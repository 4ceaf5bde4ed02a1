"""Helpers every op wrapper uses, so that each wrapper stays: validate, pick, fill, dispatch."""
from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterable
from typing import Any

import numpy as np

from ..params import CONST
from ..runtime import Buffer, Device, Kernel
from ..runtime import device as default_device
from ..tensor import Tensor, TensorLike
from ..tensor import as_tensor as _as_tensor
from ..tensor import empty as _empty
from ..tensor import zeros as _zeros

FLOATS = (np.float32, np.float16)  # the storage dtypes of the float ops
DTYPE_SUFFIX = {np.dtype(np.float32): "float", np.dtype(np.float16): "half",
                np.dtype(np.int32): "int"}


_SCRATCH = threading.local()
SCRATCH_ALIGN = 256


def scratch(dev: Device, sizes: Iterable[int], tag: str) -> list[Buffer]:
    """Temporary buffers of `sizes` bytes for ONE op's launches (split-reduction partials,
    packed weights, Winograd's transformed operands): non-overlapping views of a buffer cached
    per (device, thread, tag) and grown on demand, instead of fresh allocations per call.

    Why: a captured step (CUDA graph) keeps every buffer its launches touch alive, so fresh
    temporaries per op add up (InceptionV3: gigabytes); one shared region costs the largest op's
    need. Reuse is safe because a thread's launches run in order on the device queue, so the
    next op's writes follow this op's reads. Callers take all their temporaries in one call (the
    views of one call never overlap) and must not keep them past their launches; `tag` separates
    users whose temporaries are live at once (a conv plan's operands and its GEMM's split-K
    partials). A grown-out buffer is retired, not freed, so launch lists recorded earlier
    (Device.capture) keep valid memory. Without buffer views (metal) each size gets its own
    fresh buffer."""
    sizes = [max(int(n), 1) for n in sizes]
    for n in sizes:  # temporaries of 4-byte elements (partials, packed operands)
        if n > 4 * MAX_ELEMS_U32:
            check_elems(n // 4, f"temporary '{tag}'")
    if not dev.supports_views:
        return [dev.buffer(n, zero=False) for n in sizes]
    offs, total = [], 0
    for n in sizes:
        offs.append(total)
        total += -(-n // SCRATCH_ALIGN) * SCRATCH_ALIGN
    cache = getattr(_SCRATCH, "bufs", None)
    if cache is None:
        cache = _SCRATCH.bufs = {}
        _SCRATCH.retired = []
    key = (id(dev), tag)
    buf = cache.get(key)
    if buf is None or buf.device is not dev or buf.nbytes < total:
        if buf is not None and buf.device is dev:
            _SCRATCH.retired.append(buf)
            total = max(total, buf.nbytes + buf.nbytes // 2)  # geometric growth
        buf = cache[key] = dev.buffer(total, zero=False)
    # every temporary is written before it is read (the contract above): a failure recorded on
    # the region by an earlier op's failed launch must not poison this op (docs/errors.md)
    dev.forget_failures(buf)
    return [buf.view(o, n) for o, n in zip(offs, sizes)]


def pick_device(*xs: Any) -> Device:
    """The device of the first Tensor among xs, else the default device."""
    for x in xs:
        if isinstance(x, Tensor):
            return x.device
    return default_device()


def kernel(dev: Device, source: str, name: str, defines: dict | None = None) -> Kernel:
    """`name` from `source` (kernels/), compiled once per device and defines."""
    if defines:
        return dev.library(source, defines).kernel(name)
    k = _KERNEL_MEMO.get((dev, source, name))  # the hot path: no defines, looked up before
    if k is None:
        k = _KERNEL_MEMO[(dev, source, name)] = dev.library(source, defines).kernel(name)
    return k


# (device, source, name) -> Kernel of kernel() without defines: a device's libraries are compiled
# once and kept for its lifetime (Device.library), so the memo returns what the lookup would
_KERNEL_MEMO: dict[tuple[Device, str, str], Kernel] = {}


_ALLOWED: dict[tuple, list[np.dtype]] = {}  # tensor_arg's dtypes tuple -> its np.dtype list


def tensor_arg(x: TensorLike, dev: Device, name: str, dtypes: Iterable[Any] | None = None,
               ndim: int | tuple[int, ...] | None = None) -> Tensor:
    """Validate one tensor argument: device, dtype, number of dimensions. Errors name `name`."""
    t = as_tensor(x, dev, name)
    if dtypes is not None:
        try:  # a tuple of dtypes: converted once
            allowed = _ALLOWED[dtypes] if dtypes.__class__ is tuple else None
        except (KeyError, TypeError):
            allowed = None
        if allowed is None:
            allowed = [np.dtype(d) for d in dtypes]
            if dtypes.__class__ is tuple:
                _ALLOWED[dtypes] = allowed
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
    """An int or a sequence of n ints, each > 0 (>= 0 with allow_zero) and below 2^31 (sizes,
    strides and paddings travel in the kernels' 32-bit params fields, which would wrap)."""
    lo = 0 if allow_zero else 1
    if v.__class__ is int:  # fast paths: a valid int, or a valid tuple of n ints (returned as is)
        if lo <= v < 2**31:
            return (v,) * n
    elif v.__class__ is tuple and len(v) == n:
        for a in v:
            if a.__class__ is not int or a < lo or a >= 2**31:
                break
        else:
            return v
    try:
        vals = (v,) * n if isinstance(v, (int, np.integer)) else tuple(v)
    except TypeError:
        raise ValueError(f"{name}: expected an int or {n} ints, got {v!r}") from None
    if len(vals) == 1 and n > 1:  # torch's (k,) for every dimension
        vals = vals * n
    if len(vals) != n or not all(isinstance(a, (int, np.integer)) for a in vals):
        raise ValueError(f"{name}: expected an int or {n} ints, got {v!r}")
    if any(a < lo for a in vals):
        raise ValueError(f"{name}: values must be >= {lo}, got {v!r}")
    if any(a >= 2**31 for a in vals):
        raise ValueError(f"{name}: values must be below 2^31 (32-bit kernel parameters), got {v!r}")
    return tuple(int(a) for a in vals)


def float32_arg(v: Any, dev: Device, name: str) -> Tensor:
    """A float32 tensor argument; host numbers (any int or float array) are converted first."""
    if not isinstance(v, Tensor):
        arr = np.asarray(v)
        if arr.dtype.kind not in "fiu":
            raise ValueError(f"{name}: expected numbers, got dtype {arr.dtype}")
        v = arr.astype(np.float32)
    return tensor_arg(v, dev, name, (np.float32,))


def out_like(shape: tuple[int, ...], dtype: Any, dev: Device) -> Tensor:
    """A result tensor without a fill pass (the op writes every element), allocated through
    Device.buffer so an allocation hook (the graph's memory planner) sees it; refused beyond
    the elements the kernels index (see check_elems)."""
    check_elems(math.prod(shape), "output", shape)
    return _empty(shape, dtype, dev)


def empty(shape: Any, dtype: Any = np.float32, device: Device | None = None) -> Tensor:
    """tensor.empty for an op's outputs and temporaries, within the kernels' index width."""
    check_elems(math.prod(shape), "output", shape)
    return _empty(shape, dtype, device)


def zeros(shape: Any, dtype: Any = np.float32, device: Device | None = None) -> Tensor:
    """tensor.zeros for an op's outputs and temporaries, within the kernels' index width."""
    check_elems(math.prod(shape), "output", shape)
    return _zeros(shape, dtype, device)


def as_tensor(x: Any, dev: Device | None, name: str, dtype: Any = None) -> Tensor:
    """tensor.as_tensor for an op's inputs, within the kernels' index width."""
    t = _as_tensor(x, dev, name, dtype)
    if t.size > MAX_ELEMS_U32:
        check_elems(t.size, name, t.shape)
    return t


# ---- launch shapes and limits shared by the wrappers -------------------------------------------
MAX_GROUPS = 1 << 20      # threadgroups per launch; the kernels grid-stride over the rest
# Elements a kernel with 32-bit offsets addresses: every kernel indexes with uint, and a
# grid-stride loop `for (i = gid; i < n; i += stride)` must not wrap i past 2^32, so n stays
# 2^30 (the widest grid: MAX_GROUPS groups of up to 1024 threads) below 2^32.
MAX_ELEMS_U32 = 2**32 - 2**30


def check_elems(n: int, what: str, shape: Any = None) -> None:
    """Refuse a tensor of `n` elements that a kernel's 32-bit index cannot address (before
    anything is allocated or dispatched); the error names the op and the tensor."""
    if n > MAX_ELEMS_U32:
        import sys

        # the op: the outermost public function of pymetalnn's ops on the stack
        here = os.path.dirname(os.path.abspath(__file__))
        ours = (here, os.path.join(os.path.dirname(here), "functional.py"))
        f, op = sys._getframe(1), "op"
        while f is not None and f.f_code.co_filename.startswith(ours):
            if not f.f_code.co_name.startswith("_"):
                op = f.f_code.co_name
            f = f.f_back
        shp = f" (shape {tuple(shape)})" if shape is not None else ""
        raise ValueError(f"{op}: {what}{shp} has {n} elements, more than the {MAX_ELEMS_U32} "
                         "its kernels address with 32-bit indices; split the work into smaller "
                         "tensors")


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints."""
    return -(-a // b)


def tensor_arg_u32(x: TensorLike, dev: Device, name: str, dtypes: Iterable[Any] | None = None,
                   ndim: int | tuple[int, ...] | None = None) -> Tensor:
    """tensor_arg for a kernel with 32-bit offsets: also refuses more than MAX_ELEMS_U32
    elements (check_elems names the op)."""
    t = tensor_arg(x, dev, name, dtypes, ndim)
    if t.size > MAX_ELEMS_U32:
        check_elems(t.size, name, t.shape)
    return t


def vec4_aligned(t: Tensor) -> bool:
    """4-element vector accesses need the tensor's first byte aligned to 4 elements."""
    return t.buffer.offset % (4 * t.dtype.itemsize) == 0


_DUMMY: dict[int, Buffer] = {}


def dummy(dev: Device) -> Buffer:
    """A 16-byte buffer per device, bound where a kernel's optional input is absent (never read)."""
    b = _DUMMY.get(id(dev))
    if b is None or b.device is not dev:
        b = _DUMMY[id(dev)] = dev.buffer(16)
    # never read, so a failure recorded on it (every launch it is bound to may write it, as far
    # as the queue's failure tracking knows) means nothing: keep it from tainting later launches
    dev.forget_failures(b)
    return b


# ---- scalar arguments (each raises ValueError naming the argument) ----------------------------
def number(v: Any, name: str) -> float:
    """A Python/numpy real (not a bool) as float; range checks are the caller's."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name}: expected a number, got {v!r}")
    return float(v)


def boolean(v: Any, name: str) -> bool:
    """A Python/numpy bool."""
    if not isinstance(v, (bool, np.bool_)):
        raise ValueError(f"{name}: expected a bool, got {v!r}")
    return bool(v)


def suffix(dtype: Any) -> str:
    return DTYPE_SUFFIX[np.dtype(dtype)]


def strided_out(out: Tensor | None, out_batch_stride: Any, shape: tuple[int, ...], dtype: Any,
                dev: Device) -> tuple[Tensor, int]:
    """The destination of a forward op's result of `shape` (N, ...): a new tensor, or `out=`, a
    tensor whose buffer starts at the result's first element (e.g. a BufferView-backed Tensor at
    a channel slice of a larger NCHW tensor) with `out_batch_stride` elements between
    consecutive n (None: contiguous). Returns (tensor of `shape` on that buffer, the kernels'
    out_nstride: 0 when contiguous). Elements between the images are left untouched."""
    if out is None:
        if out_batch_stride is not None:
            raise ValueError("out_batch_stride: needs out=")
        return out_like(shape, dtype, dev), 0
    if not isinstance(out, Tensor):
        raise TypeError(f"out: expected a Tensor, got {type(out).__name__}")
    if out.device is not dev:
        raise ValueError(f"out: on {out.device}, the op runs on {dev}")
    if out.dtype != np.dtype(dtype):
        raise ValueError(f"out: dtype {out.dtype}, expected {np.dtype(dtype)}")
    n, per = int(shape[0]), int(math.prod(shape[1:]))  # exact ints; np.prod costs microseconds
    stride = per if out_batch_stride is None else int(out_batch_stride)
    if stride < per:
        raise ValueError(f"out_batch_stride: {stride} elements, less than one image's {per}")
    need = ((n - 1) * stride + per) * np.dtype(dtype).itemsize if n and per else 0
    if out.buffer.nbytes < need:
        raise ValueError(f"out: {out.buffer.nbytes} bytes, the result of shape {shape} with batch "
                         f"stride {stride} needs {need}")
    if n > 1 and stride >= 2**32:
        raise ValueError(f"out_batch_stride: {stride} does not fit 32 bits")
    return Tensor(out.buffer, shape, dtype), (0 if stride == per or n <= 1 else stride)


# ---- the stream.h launch shape (neuron, dropout, flat arith and copy kernels) ----------------------
STREAM_U = CONST["STREAM_U"]    # chunks per thread
STREAM_TG = CONST["STREAM_TG"]  # threads per block of chunks (not the dispatch's group size)


def stream_chunk(*itemsizes: int) -> int:
    """Elements per 16-byte chunk of the narrowest dtype among itemsizes (4 float, 8 half): the
    wider streams then take 16 * k bytes per chunk."""
    return 16 // min(itemsizes)


def stream_nvec(n: int, w: int, tensors: Iterable[Tensor]) -> int:
    """Chunks of w elements: n // w when every tensor's buffer offset is 16-byte aligned (always
    true of fresh tensors), else 0 (every element through the scalar tail)."""
    for t in tensors:
        if t.buffer.offset % 16:
            return 0
    return n // w


def stream_vthreads(nvec: int) -> int:
    """Threads of a stream.h kernel that own chunks: whole blocks of STREAM_TG, STREAM_U chunks
    each."""
    return -(-nvec // (STREAM_U * STREAM_TG)) * STREAM_TG


def stream_count(n: int, w: int, nvec: int) -> int:
    """Threads a stream.h kernel is launched with: the chunk owners, then one thread per tail
    element (n - w nvec)."""
    return stream_vthreads(nvec) + (n - w * nvec)


def stream_launch(n: int, itemsize: int, tensors: Iterable[Tensor], vector: bool = True
                  ) -> tuple[int, int]:
    """(nvec, threads) of a stream.h kernel over n elements of one itemsize: 16-byte chunks where
    `vector` and every tensor is aligned (stream_nvec), else all through the scalar tail."""
    w = stream_chunk(itemsize)
    nvec = stream_nvec(n, w, tensors) if vector else 0
    return nvec, stream_count(n, w, nvec)


def matrix_hw(dev: Device) -> bool:
    """Whether ops pick their kernels on simdgroup matrices for `dev`: Apple GPUs from Apple7
    (M1, A14) on and every NVIDIA GPU we compile for (sm_80+ tensor cores) have matrix hardware;
    Macs with Intel or AMD GPUs keep the SIMD-FMA kernels. The cpu backend runs the matrix kernels
    correctly (an emulation, see the prelude) but slower than its SIMD-FMA kernels, so it does not
    pick them. `dev.simdgroup_matrix = True/False` (or PYMETALNN_SIMDGROUP_MATRIX=1/0) overrides
    the choice on any device; tests use it, and name the matrix tiles explicitly, to keep both
    paths covered everywhere."""
    forced = getattr(dev, "simdgroup_matrix", None)
    if forced is not None:
        return bool(forced)
    env = os.environ.get("PYMETALNN_SIMDGROUP_MATRIX")
    if env in ("0", "1"):
        return env == "1"
    if dev.name == "metal":
        return bool(getattr(dev, "apple_gpu", False))
    return dev.name == "cuda"


def mma_gen(default: int) -> int:
    """Which generation of simdgroup-matrix kernels the automatic tile choices of ops.gemm and
    ops.conv take (their MMA_GEN): 1, 8x8 matrix products; 2, 16-deep tile products
    (kernels/simdgroup_tile.h). PYMETALNN_MMA_GEN=1|2, read at import, overrides `default`, so
    both can be timed on one checkout."""
    env = os.environ.get("PYMETALNN_MMA_GEN")
    if env is None:
        return default
    if env not in ("1", "2"):
        raise ValueError(f"PYMETALNN_MMA_GEN: expected 1 or 2, got {env!r}")
    return int(env)


def fits_threadgroup_memory(dev: Device, k: Kernel) -> bool:
    """Whether kernel `k`'s threadgroup memory fits `dev`: Apple GPUs have 32 KiB, and the metal
    backend knows each kernel's (pipeline creation fails past it); elsewhere always."""
    limit = getattr(dev, "max_threadgroup_memory", None)
    return limit is None or getattr(k, "threadgroup_memory", 0) <= limit


def matrix_capable(dev: Device) -> bool:
    """Whether kernels on simdgroup matrices can run on `dev` at all (matrix_hw says whether ops
    prefer them): everywhere but Metal devices without them (Intel/AMD Macs)."""
    return dev.name != "metal" or bool(getattr(dev, "apple_gpu", False))
