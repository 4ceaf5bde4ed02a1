"""Python mirrors of the parameter structs in kernels/params.h, one ctypes.Structure per struct,
and the constants kernels and host code share (`CONST`, read from params.h's #defines).

A kernel takes its struct as `constant XParams& p [[buffer(i)]]`; the host fills the mirror and
passes it. Fields are 4 bytes (uint32, int32, float32) so every backend agrees on the layout;
`parse_header` reads params.h so tests can check each mirror field by field. A constant such as
GEMM_TRANS_A or SM_CACHE exists once, in params.h; the op wrappers take it from `CONST`.
"""
from __future__ import annotations

import ctypes
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


# ---- conv / gemm --------------------------------------------------------------------------


class Conv2dParams(Params):
    """kernels/params.h Conv2dParams: conv geometry (conv_transpose2d uses its conv view)."""

    _fields_ = [("N", U32), ("C", U32), ("H", U32), ("W", U32), ("K", U32), ("OH", U32),
                ("OW", U32), ("KH", U32), ("KW", U32), ("SH", U32), ("SW", U32), ("PH", I32),
                ("PW", I32), ("DH", U32), ("DW", U32), ("G", U32), ("Cg", U32), ("Kg", U32),
                ("has_bias", U32), ("splits", U32), ("chunk", U32), ("act", U32),
                ("act_alpha", F32), ("out_nstride", U32)]


class WinogradParams(Params):
    """kernels/params.h WinogradParams: a 3x3 stride-1 conv on M x M output tiles."""

    _fields_ = [("N", U32), ("C", U32), ("H", U32), ("W", U32), ("K", U32), ("OH", U32),
                ("OW", U32), ("TH", U32), ("TW", U32), ("P", U32), ("PT", I32), ("PL", I32),
                ("flip", U32), ("has_bias", U32), ("act", U32), ("act_alpha", F32),
                ("out_nstride", U32)]


class GemmParams(Params):
    """kernels/params.h GemmParams: C = alpha * op(A) op(B) + beta * C (+ bias), batched."""

    _fields_ = [("M", U32), ("N", U32), ("K", U32), ("lda", U32), ("ldb", U32), ("ldc", U32),
                ("batch", U32), ("stride_a", U32), ("stride_b", U32), ("stride_c", U32),
                ("reduce_batch", U32), ("k_splits", U32), ("tiles_m", U32), ("tiles_n", U32),
                ("flags", U32), ("alpha", F32), ("beta", F32), ("act", U32),
                ("act_alpha", F32)]


class LinearBiasGradParams(Params):
    """kernels/params.h LinearBiasGradParams: column sums of a rows x cols matrix."""

    _fields_ = [("rows", U32), ("cols", U32)]


# ---- other CNN ops ------------------------------------------------------------------------

# -- pool / neuron --
class NeuronParams(Params):
    """kernels/params.h NeuronParams: y = f(x) over n elements with the op's scalars a, b."""

    _fields_ = [("n", U32), ("nvec", U32), ("a", F32), ("b", F32), ("inner", U32),
                ("x_nstride", U32), ("y_nstride", U32)]


class Pool2dParams(Params):
    """kernels/params.h Pool2dParams: max/avg pooling geometry per (N*C) plane."""

    _fields_ = [("planes", U32), ("IH", U32), ("IW", U32), ("OH", U32), ("OW", U32),
                ("KH", I32), ("KW", I32), ("SH", I32), ("SW", I32), ("PH", I32), ("PW", I32),
                ("DH", I32), ("DW", I32), ("flags", U32), ("divisor", I32)] + [
                    (f"{ms}_{d}", U32) for d in ("out", "in", "ow", "iw", "sh", "sw", "dh", "dw")
                    for ms in ("m", "s")] + [("out_C", U32), ("out_nstride", U32)] + [
                    (f, U32) for f in ("tiles_h", "tiles_w", "m_tw", "s_tw", "m_th", "s_th")]


class AdaptivePool2dParams(Params):
    """kernels/params.h AdaptivePool2dParams: adaptive average pooling geometry."""

    _fields_ = [("planes", U32), ("IH", U32), ("IW", U32), ("OH", U32), ("OW", U32), ("vec", U32)] + [
        (f"{ms}_{d}", U32) for d in ("out", "in", "ow", "iw", "oh", "ih") for ms in ("m", "s")]


# -- arith / copy / dropout (arrays of 8: per merged dimension, outermost first) --
MAXD = 8
U32x8 = U32 * MAXD


class ArithParams(Params):
    """kernels/params.h ArithParams: elementwise out = op(x0, x1, x2) with broadcast strides."""

    _fields_ = [("n", U32), ("ndim", U32), ("vec", U32), ("alpha", F32), ("shape", U32x8),
                ("stride0", U32x8), ("stride1", U32x8), ("stride2", U32x8), ("act", U32),
                ("act_alpha", F32)]


class ReduceParams(Params):
    """kernels/params.h ReduceParams: out[t] = alpha * sum over reduced dims of op(x0, x1, x2)."""

    _fields_ = [("n_out", U32), ("n_red", U32), ("inner", U32), ("splits", U32), ("chunk", U32),
                ("nk", U32), ("nr", U32), ("alpha", F32), ("vec", U32), ("istride0", U32),
                ("istride1", U32), ("istride2", U32), ("ksize", U32x8), ("kstride0", U32x8),
                ("kstride1", U32x8), ("kstride2", U32x8), ("rsize", U32x8), ("rstride0", U32x8),
                ("rstride1", U32x8), ("rstride2", U32x8)]


class CopyParams(Params):
    """kernels/params.h CopyParams: a rows x cols block copy with pitches, offsets, cast."""

    _fields_ = [("n", U32), ("rows", U32), ("cols", U32), ("vec", U32), ("src_pitch", U32),
                ("dst_pitch", U32), ("src_off", U32), ("dst_off", U32)]


class PermuteParams(Params):
    """kernels/params.h PermuteParams: gather through permuted strides."""

    _fields_ = [("n", U32), ("ndim", U32), ("vec", U32), ("pad", U32), ("shape", U32x8),
                ("stride", U32x8)]


class TransposeParams(Params):
    """kernels/params.h TransposeParams: batched (rows, cols) -> (cols, rows) in 32x32 tiles."""

    _fields_ = [("batch", U32), ("rows", U32), ("cols", U32), ("tiles_r", U32), ("tiles_c", U32),
                ("n_tiles", U32)]


class ConcatParams(Params):
    """kernels/params.h ConcatParams: up to 8 parts <-> column blocks of one matrix."""

    _fields_ = [("n", U32), ("parts", U32), ("rows", U32), ("vec", U32), ("pitch", U32),
                ("start", U32x8), ("cols", U32x8), ("off", U32x8)]


class DropoutParams(Params):
    """kernels/params.h DropoutParams: Philox4x32-10 key/counter words, threshold, scale."""

    _fields_ = [("n", U32), ("key0", U32), ("key1", U32), ("ctr2", U32), ("ctr3", U32),
                ("threshold", U32), ("scale", F32), ("inner", U32), ("channels", U32),
                ("items", U32), ("vec", U32)]


# -- softmax / loss / norm --
class SoftmaxParams(Params):
    """kernels/params.h SoftmaxParams: (outer, len, inner) view reduced over len, tile shape."""

    _fields_ = [("outer", U32), ("len", U32), ("inner", U32), ("W", U32), ("SW", U32),
                ("wblocks", U32), ("ntiles", U32), ("cached", U32)]


class LossParams(Params):
    """kernels/params.h LossParams: loss geometry, reduction/gradient mode and loss options."""

    _fields_ = [("N", U32), ("M", U32), ("total", U32), ("chunk", U32), ("chunks", U32),
                ("seglen", U32), ("ngroups", U32), ("reduce", U32), ("gmode", U32),
                ("has_weight", U32), ("ignore_index", I32), ("smoothing", F32), ("a", F32),
                ("elem_weight", U32), ("has_pos_weight", U32), ("target_grad", U32),
                ("has_class_weight", U32)]


class LossReduceParams(Params):
    """kernels/params.h LossReduceParams: partial-sum reduction and gradient-scale counting."""

    _fields_ = [("nseg", U32), ("seglen", U32), ("mode", U32), ("denom", F32), ("terms", U32),
                ("per_sample", U32), ("mult", U32), ("has_labels", U32), ("has_weight", U32),
                ("ignore_index", I32), ("has_class_weight", U32)]


class NormParams(Params):
    """kernels/params.h NormParams: (N, C, HW) geometry, statistics rows, tiling, options."""

    _fields_ = [("N", U32), ("C", U32), ("HW", U32), ("G", U32), ("rows", U32), ("row_len", U32),
                ("inner_len", U32), ("outer_stride", U32), ("row_stride", U32), ("chunk", U32),
                ("chunks", U32), ("cols", U32), ("col_rows", U32), ("col_chunks", U32),
                ("parts", U32), ("planes", U32), ("total", U32), ("has_weight", U32),
                ("has_bias", U32), ("has_running", U32), ("training", U32), ("eps", F32),
                ("momentum", F32), ("act", U32), ("act_alpha", F32),
                ("out_nstride", U32), ("dy_nstride", U32)]


class LayerNormParams(Params):
    """kernels/params.h LayerNormParams: rows x D, row tile width, options, gradient chunks."""

    _fields_ = [("rows", U32), ("D", U32), ("SW", U32), ("has_weight", U32), ("has_bias", U32),
                ("eps", F32), ("splits", U32), ("chunk_rows", U32), ("save_stats", U32)]


class EmbeddingParams(Params):
    """kernels/params.h EmbeddingParams: indices, table shape, backward segments."""

    _fields_ = [("n", U32), ("V", U32), ("D", U32), ("segments", U32), ("scale_by_freq", U32),
                ("max_norm", F32), ("norm_type", F32)]


# ---- recurrent and optimizers -------------------------------------------------------------

# -- rnn.metal (pymetalnn/ops/rnn.py) --
class RnnFwdParams(Params):
    """kernels/params.h RnnFwdParams: one forward step of an LSTM / GRU / RNN cell."""

    _fields_ = [("N", U32), ("H", U32), ("flags", U32), ("xp_off", U32), ("hprev_off", U32),
                ("cprev_off", U32), ("c0_off", U32), ("c_off", U32), ("y_off", U32),
                ("y_pitch", U32), ("hs_off", U32), ("gate_off", U32), ("hn_off", U32)]


class RnnBwdParams(Params):
    """kernels/params.h RnnBwdParams: one backward step of an LSTM / GRU / RNN cell."""

    _fields_ = [("N", U32), ("H", U32), ("flags", U32), ("dy_off", U32), ("dy_pitch", U32),
                ("dhr_off", U32), ("dhr_out_off", U32), ("dcn_off", U32), ("dc0_off", U32),
                ("gate_off", U32), ("c_off", U32), ("cprev_off", U32), ("c0_off", U32),
                ("hprev_off", U32), ("h_off", U32), ("dg_off", U32)]


# -- optimizer.metal (pymetalnn.optim) --


class OptimParams(Params):
    """kernels/params.h OptimParams: per-tensor size, step, lr and MPS gradient preprocessing."""

    _fields_ = [("n", U32), ("vec4", U32), ("step", U32), ("lr", F32), ("grad_rescale", F32),
                ("clip_value", U32), ("clip_min", F32), ("clip_max", F32), ("clip_norm", U32),
                ("max_norm", F32), ("reg_type", U32), ("reg_scale", F32), ("maximize", U32),
                ("step_index", U32)]


class OptimNormParams(Params):
    """kernels/params.h OptimNormParams: sum of squares of scale * x."""

    _fields_ = [("n", U32), ("scale", F32)]


class OptimChunk(Params):
    """kernels/params.h OptimChunk: a row of a multi-tensor update's chunk table (element
    offsets of the chunk in the params, grads and state bases, its length, 4-wide loads)."""

    _fields_ = [("param_off", U32), ("grad_off", U32), ("state_off", U32), ("n", U32),
                ("vec4", U32), ("step_index", U32)]


class OptimCountParams(Params):
    """kernels/params.h OptimCountParams: the device step counters a step advances."""

    _fields_ = [("first", U32), ("n", U32)]


class AmpParams(Params):
    """kernels/params.h AmpParams: dynamic loss scaling (GradScaler's update rule)."""

    _fields_ = [("n", U32), ("growth_factor", F32), ("backoff_factor", F32),
                ("growth_interval", U32), ("base", F32)]


OPTIM_CHUNK = CONST["OPTIM_CHUNK"]  # elements per chunk of a multi-tensor update


class SGDParams(Params):
    """kernels/params.h SGDParams: torch.optim.SGD hyperparameters."""

    _fields_ = [("momentum", F32), ("one_minus_dampening", F32), ("nesterov", U32),
                ("first_step", U32), ("weight_decay", F32)]


class AdamParams(Params):
    """kernels/params.h AdamParams: Adam/AdamW hyperparameters (log(beta) for the bias corrections,
    which the kernel computes from the device step count)."""

    _fields_ = [("one_minus_beta1", F32), ("beta2", F32), ("one_minus_beta2", F32), ("eps", F32),
                ("weight_decay", F32), ("decay", F32), ("lr", F32), ("log_beta1", F32),
                ("log_beta2", F32), ("amsgrad", U32)]


class RMSPropParams(Params):
    """kernels/params.h RMSPropParams: torch.optim.RMSprop hyperparameters."""

    _fields_ = [("alpha", F32), ("one_minus_alpha", F32), ("eps", F32), ("momentum", F32),
                ("centered", U32), ("weight_decay", F32)]


# ---- detection ------------------------------------------------------------------------------


class YoloParams(Params):
    """kernels/params.h YoloParams: YOLO v2 loss / decoding geometry, gradient mode and scales."""

    _fields_ = [("N", U32), ("A", U32), ("C", U32), ("GH", U32), ("GW", U32), ("B", U32),
                ("gmode", U32), ("rescore", U32), ("gscale", F32), ("coord_scale", F32),
                ("object_scale", F32), ("noobject_scale", F32), ("class_scale", F32),
                ("ignore_thresh", F32)]


class NmsParams(Params):
    """kernels/params.h NmsParams: greedy per-class NMS geometry and thresholds."""

    _fields_ = [("N", U32), ("C", U32), ("P", U32), ("max_det", U32), ("iou_thresh", F32),
                ("score_thresh", F32)]
