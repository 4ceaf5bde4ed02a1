"""Python mirrors of the parameter structs in kernels/params.h, one ctypes.Structure per struct,
and the constants kernels and host code share (`CONST`, read from params.h's #defines).

A kernel takes its struct as `constant XParams& p [[buffer(i)]]`; the host fills the mirror and
passes it. Fields are 4 bytes (uint32, int32, float32) so every backend agrees on the layout;
each mirror's fields are read from its declaration in params.h (`layout`, via `parse_header`),
so a layout is written once. A constant such as
GEMM_TRANS_A or SM_CACHE exists once, in params.h; the op wrappers take it from `CONST`.
"""
from __future__ import annotations

import ctypes
import functools
import os
import re

from .runtime.core import KERNEL_DIR

U32, I32, F32 = ctypes.c_uint32, ctypes.c_int32, ctypes.c_float
C_TYPES = {"uint": U32, "int": I32, "float": F32}


class Params(ctypes.Structure):
    """Base of every mirror; `Params.registry` maps struct name -> class."""

    registry: dict[str, type[Params]] = {}

    def __init_subclass__(cls, **kw: object) -> None:
        super().__init_subclass__(**kw)
        Params.registry[cls.__name__] = cls

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n, _ in self._fields_)
        return f"{type(self).__name__}({fields})"


def parse_header(path: str | None = None) -> dict[str, list[tuple[str, str]]]:
    """struct name -> [(type, field), ...] as declared in kernels/params.h."""
    path = path or os.path.join(KERNEL_DIR, "params.h")
    with open(path, encoding="utf-8") as f:
        text = re.sub(r"//[^\n]*|/\*.*?\*/", "", f.read(), flags=re.S)
    out: dict[str, list[tuple[str, str]]] = {}
    for m in re.finditer(r"struct\s+(\w+)\s*\{(.*?)\}\s*;", text, re.S):
        fields = []
        for decl in m.group(2).split(";"):
            decl = decl.strip()
            if not decl:
                continue
            ty, *names = decl.replace(",", " ").split()
            fields.extend((ty, n.replace(" ", "")) for n in names)  # "shape[8]" keeps its size
        out[m.group(1)] = fields
    return out


def parse_constants(path: str | None = None) -> dict[str, int]:
    """NAME -> value of every `#define NAME <integer literal>` in kernels/params.h (decimal or hex,
    with an optional u suffix); function-like macros and other defines are not constants."""
    path = path or os.path.join(KERNEL_DIR, "params.h")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    out: dict[str, int] = {}
    for m in re.finditer(r"^[ \t]*#[ \t]*define[ \t]+(\w+)[ \t]+(0[xX][0-9a-fA-F]+|\d+)[uU]?(?=\s|$)",
                         text, re.M):
        out[m.group(1)] = int(m.group(2), 0)
    return out


CONST: dict[str, int] = parse_constants()


@functools.cache
def _declared(path: str | None) -> dict[str, list[tuple[str, str]]]:
    return parse_header(path)


def layout(struct: str, path: str | None = None) -> list[tuple[str, type]]:
    """ctypes _fields_ of `struct` as params.h declares it: the header is the one definition of
    every layout, so a mirror cannot drift from what the kernels read."""
    fields = []
    for ty, decl in _declared(path)[struct]:
        m = re.fullmatch(r"(\w+)\[(\d+)\]", decl)
        if ty not in C_TYPES:
            raise TypeError(f"kernels/params.h {struct}.{decl}: {ty} is not a 4-byte field type")
        fields.append((m.group(1), C_TYPES[ty] * int(m.group(2))) if m else (decl, C_TYPES[ty]))
    return fields


# ---- conv / gemm --------------------------------------------------------------------------


class Conv2dParams(Params):
    """kernels/params.h Conv2dParams: conv geometry (conv_transpose2d uses its conv view)."""

    _fields_ = layout("Conv2dParams")


class WinogradParams(Params):
    """kernels/params.h WinogradParams: a 3x3 stride-1 conv on M x M output tiles."""

    _fields_ = layout("WinogradParams")


class GemmParams(Params):
    """kernels/params.h GemmParams: C = alpha * op(A) op(B) + beta * C (+ bias), batched."""

    _fields_ = layout("GemmParams")


class LinearBiasGradParams(Params):
    """kernels/params.h LinearBiasGradParams: column sums of a rows x cols matrix."""

    _fields_ = layout("LinearBiasGradParams")


# ---- other CNN ops ------------------------------------------------------------------------

# -- pool / neuron --
class NeuronParams(Params):
    """kernels/params.h NeuronParams: y = f(x) over n elements with the op's scalars a, b."""

    _fields_ = layout("NeuronParams")


class Pool2dParams(Params):
    """kernels/params.h Pool2dParams: max/avg pooling geometry per (N*C) plane."""

    _fields_ = layout("Pool2dParams")


class AdaptivePool2dParams(Params):
    """kernels/params.h AdaptivePool2dParams: adaptive average pooling geometry."""

    _fields_ = layout("AdaptivePool2dParams")


# -- arith / copy / dropout (arrays of 8: per merged dimension, outermost first) --
MAXD = 8


class ArithParams(Params):
    """kernels/params.h ArithParams: elementwise out = op(x0, x1, x2) with broadcast strides."""

    _fields_ = layout("ArithParams")


class ReduceParams(Params):
    """kernels/params.h ReduceParams: out[t] = alpha * sum over reduced dims of op(x0, x1, x2)."""

    _fields_ = layout("ReduceParams")


class CopyParams(Params):
    """kernels/params.h CopyParams: a rows x cols block copy with pitches, offsets, cast."""

    _fields_ = layout("CopyParams")


class PermuteParams(Params):
    """kernels/params.h PermuteParams: gather through permuted strides."""

    _fields_ = layout("PermuteParams")


class TransposeParams(Params):
    """kernels/params.h TransposeParams: batched (rows, cols) -> (cols, rows) in 32x32 tiles."""

    _fields_ = layout("TransposeParams")


class ConcatParams(Params):
    """kernels/params.h ConcatParams: up to 8 parts <-> column blocks of one matrix."""

    _fields_ = layout("ConcatParams")


class DropoutParams(Params):
    """kernels/params.h DropoutParams: Philox4x32-10 key/counter words, threshold, scale."""

    _fields_ = layout("DropoutParams")


# -- softmax / loss / norm --
class SoftmaxParams(Params):
    """kernels/params.h SoftmaxParams: (outer, len, inner) view reduced over len, tile shape."""

    _fields_ = layout("SoftmaxParams")


class LossParams(Params):
    """kernels/params.h LossParams: loss geometry, reduction/gradient mode and loss options."""

    _fields_ = layout("LossParams")


class LossReduceParams(Params):
    """kernels/params.h LossReduceParams: partial-sum reduction and gradient-scale counting."""

    _fields_ = layout("LossReduceParams")


class NormParams(Params):
    """kernels/params.h NormParams: (N, C, HW) geometry, statistics rows, tiling, options."""

    _fields_ = layout("NormParams")


class LayerNormParams(Params):
    """kernels/params.h LayerNormParams: rows x D, row tile width, options, gradient chunks."""

    _fields_ = layout("LayerNormParams")


class EmbeddingParams(Params):
    """kernels/params.h EmbeddingParams: indices, table shape, backward segments."""

    _fields_ = layout("EmbeddingParams")


# ---- recurrent and optimizers -------------------------------------------------------------

# -- rnn.metal (pymetalnn/ops/rnn.py) --
class RnnFwdParams(Params):
    """kernels/params.h RnnFwdParams: one forward step of an LSTM / GRU / RNN cell."""

    _fields_ = layout("RnnFwdParams")


class RnnBwdParams(Params):
    """kernels/params.h RnnBwdParams: one backward step of an LSTM / GRU / RNN cell."""

    _fields_ = layout("RnnBwdParams")


# -- optimizer.metal (pymetalnn.optim) --


class OptimParams(Params):
    """kernels/params.h OptimParams: per-tensor size, step, lr and MPS gradient preprocessing."""

    _fields_ = layout("OptimParams")


class OptimNormParams(Params):
    """kernels/params.h OptimNormParams: sum of squares of scale * x."""

    _fields_ = layout("OptimNormParams")


class OptimChunk(Params):
    """kernels/params.h OptimChunk: a row of a multi-tensor update's chunk table (element
    offsets of the chunk in the params, grads and state bases, its length, 4-wide loads)."""

    _fields_ = layout("OptimChunk")


class OptimCountParams(Params):
    """kernels/params.h OptimCountParams: the device step counters a step advances."""

    _fields_ = layout("OptimCountParams")


class AmpParams(Params):
    """kernels/params.h AmpParams: dynamic loss scaling (GradScaler's update rule)."""

    _fields_ = layout("AmpParams")


OPTIM_CHUNK = CONST["OPTIM_CHUNK"]  # elements per chunk of a multi-tensor update


class SGDParams(Params):
    """kernels/params.h SGDParams: torch.optim.SGD hyperparameters."""

    _fields_ = layout("SGDParams")


class AdamParams(Params):
    """kernels/params.h AdamParams: Adam/AdamW hyperparameters (log(beta) for the bias corrections,
    which the kernel computes from the device step count)."""

    _fields_ = layout("AdamParams")


class RMSPropParams(Params):
    """kernels/params.h RMSPropParams: torch.optim.RMSprop hyperparameters."""

    _fields_ = layout("RMSPropParams")


# ---- detection ------------------------------------------------------------------------------


class YoloParams(Params):
    """kernels/params.h YoloParams: YOLO v2 loss / decoding geometry, gradient mode and scales."""

    _fields_ = layout("YoloParams")


class NmsParams(Params):
    """kernels/params.h NmsParams: greedy per-class NMS geometry and thresholds."""

    _fields_ = layout("NmsParams")
