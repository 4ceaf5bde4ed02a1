"""Losses (loss.metal): MPS's loss set with per-sample weights, MPS's reductions and label
smoothing, each with a fused backward giving the gradient w.r.t. the network output.

Where PyTorch has the loss, the definition and the argument names are PyTorch's; the others
(categorical cross-entropy, hinge, log loss, cosine distance) follow MPS / TensorFlow's
`tf.losses`, which MPS mirrors:

| function | per-term loss l (x = input, t = target) | PyTorch |
| --- | --- | --- |
| cross_entropy | -sum_c t'_c log softmax(x)_c over dim 1; labels or probabilities | F.cross_entropy |
| binary_cross_entropy_with_logits | max(x, 0) - x t' + log(1 + exp(-abs(x))) | same (s = 0) |
| categorical_cross_entropy | -sum_c t'_c log x_c over dim 1 (x: probabilities; 0 log 0 = 0) | MPS only |
| mse_loss | (x - t)^2 | F.mse_loss |
| l1_loss | abs(x - t) (MPS's mean absolute error) | F.l1_loss |
| huber_loss | 0.5 d^2 if abs(d) < delta else delta (abs(d) - delta / 2), d = x - t | F.huber_loss |
| hinge_loss | max(0, 1 - (2 t - 1) x), t in {0, 1} | MPS only |
| kl_div | t (log t - x), or exp(t) (t - x) with log_target (x: log-probabilities) | F.kl_div |
| cosine_distance | 1 - x.t / sqrt(max(|x|^2 |t|^2, eps^2)) over dim 1 | 1 - F.cosine_similarity |
| log_loss | -t log(x + eps) - (1 - t) log(1 - x + eps) | MPS only |

t' is the label-smoothed target: (1 - s) t + s / C for the class-axis losses (PyTorch's and MPS's
definition, with labels one-hot), (1 - s) t + s / 2 for the sigmoid one (TensorFlow's/MPS's).

Terms are elements for the pointwise losses and (sample, position) pairs for the class-axis ones
(cross_entropy, categorical_cross_entropy, cosine_distance, whose class axis is dim 1). Every term
of sample n is multiplied by sample_weight[n] (MPS's per-image weights, keyword-only). PyTorch's
`weight` is the third positional argument where PyTorch has it: one weight per class for
cross_entropy (the term is sum_c w_c t'_c (lse - x_c); a 'mean' over labels divides by the sum of
w[label] of the counted terms, as PyTorch), one per element (broadcast to the input) for
binary_cross_entropy_with_logits, with its `pos_weight` (broadcast likewise):
l = (1 - t') x + (1 + (pos_weight - 1) t') softplus(-x). `weight=` and `sample_weight=` do not
combine. reduction:
  'none'        the weighted terms in PyTorch's shape (the input's for pointwise losses, the
                input's without dim 1 for class-axis losses), as MPS's per-element losses
  'per_sample'  (N,): the sum of each sample's weighted terms (MPS's per-image losses)
  'sum'         the sum of all weighted terms
  'mean'        that sum / the number of terms (labels equal to ignore_index are not terms)
  'sum_by_nonzero_weights'  that sum / the number of terms of nonzero weight (0 if there are none)
  'batchmean'   (kl_div only) that sum / N
'mean' with every label ignored is NaN, as in PyTorch (its gradient is 0).
An empty input (a batch of 0 or an empty class axis) is refused (ValueError naming `input`,
nothing dispatched) by every loss and backward, where PyTorch returns NaN for 'mean' (0 / 0),
0 for 'sum' and an empty tensor for 'none': in a training step such a value only hides an empty
batch from the data pipeline, and graphs refuse a batch of 0 likewise (graph/run.py).
Losses are float32 whatever the input's storage; gradients have the input's dtype.

Integer labels given from the host (numpy, lists) are range-checked there before anything is
dispatched (ValueError naming `target`). Labels in a device Tensor are checked by the kernels,
which costs no read-back or queue sync: a label outside [0, C) that is not ignore_index is
treated as ignored and recorded in the device's status words, and the call fails with an
AsyncError naming `target` and the label (see docs/errors.md, "Checks made by kernels"): on cpu
at the first read of its result or of anything computed from it, on metal and cuda at the next
synchronization (every read or wait); the next call runs normally. `class_labels(target,
num_classes)` checks labels once on the host and returns labels the class-axis losses then use
without any check.

Every `<loss>_backward(grad, input, target, <same options>)` takes grad shaped like the loss
(a number or one-element tensor for the scalar reductions) and returns (d/d input, d/d target) of
sum(grad * loss): the target's gradient where PyTorch differentiates the target (mse, l1, huber,
smooth_l1, binary_cross_entropy_with_logits, kl_div, cross_entropy with probability targets),
None otherwise (integer labels; the MPS-only losses) or with target_grad=False (a constant target,
as in training: the kernel then skips writing it).
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ..params import CONST, LossParams, LossReduceParams
from ..runtime import Buffer, Device
from ..tensor import Tensor, TensorLike, float32, int32
from ._common import (
    FLOATS,
    MAX_GROUPS,
    as_tensor,
    boolean,
    cdiv,
    dummy,
    empty,
    float32_arg,
    kernel,
    number,
    pick_device,
    stream_count,
    suffix,
    tensor_arg,
)
from .softmax import TG, row_plan, tile_groups, tile_plan

SOURCE = "loss.metal"
# "auto": unweighted pointwise backwards with a scalar gradient through loss_pw_bwd_plain;
# "general": loss_pw_bwd_vec there too (the earlier production, for benchmarks/dev_membound.py)
KERNELS = "auto"
REDUCTIONS = ("none", "per_sample", "sum", "mean", "sum_by_nonzero_weights")
_MODE = {k: CONST[f"LOSS_MODE_{m}"] for k, m in (  # LossReduceParams.mode per reduction
    ("sum", "SUM"), ("mean", "MEAN"), ("sum_by_nonzero_weights", "NONZERO"), ("batchmean", "DENOM"),
    ("per_sample", "SUM"))}
G_SCALAR, G_PER_SAMPLE, G_PER_TERM = (  # LossParams.gmode
    CONST[f"LOSS_G_{g}"] for g in ("SCALAR", "PER_SAMPLE", "PER_TERM"))

# pointwise losses whose target PyTorch differentiates
_TARGET_GRAD = {"mse_loss", "l1_loss", "huber_loss", "smooth_l1_loss", "bce_with_logits", "kl_div"}

CHUNK = 2048  # elements per threadgroup chunk of the pointwise forward
MAX_ELEMENTS = 2**31 - 1  # chunk arithmetic stays inside uint32


def _gmode(reduction: str) -> int:
    """LossParams.gmode: the backward's incoming-gradient layout for `reduction`."""
    return G_PER_TERM if reduction == "none" else G_PER_SAMPLE if reduction == "per_sample" \
        else G_SCALAR


# ---- validation ------------------------------------------------------------------------------

def _check_reduction(reduction: Any, extra: tuple[str, ...] = ()) -> str:
    allowed = REDUCTIONS + extra
    if reduction not in allowed:
        raise ValueError(f"reduction: {reduction!r} is not one of {', '.join(allowed)}")
    return reduction


def _check_float(v: Any, name: str, lo: float | None = None, hi: float | None = None,
                 lo_open: bool = False) -> float:
    f = number(v, name)
    if not np.isfinite(f):
        raise ValueError(f"{name}: must be finite, got {f}")
    if lo is not None and (f <= lo if lo_open else f < lo):
        raise ValueError(f"{name}: must be {'>' if lo_open else '>='} {lo}, got {f}")
    if hi is not None and f > hi:
        raise ValueError(f"{name}: must be <= {hi}, got {f}")
    return f


def _check_size(t: Tensor, name: str) -> None:
    if t.size > MAX_ELEMENTS:
        raise ValueError(f"{name}: {t.size} elements exceed the loss kernels' limit of 2^31 - 1")


def _weight(sample_weight: TensorLike | None, dev: Device, n: int) -> Tensor | None:
    if sample_weight is None:
        return None
    w = float32_arg(sample_weight, dev, "sample_weight")
    if w.shape != (n,):
        raise ValueError(f"sample_weight: expected shape ({n},) (one weight per sample), got {w.shape}")
    return w


def _elem_weight(v: Any, dev: Device, x: Tensor, name: str) -> Tensor | None:
    """torch's element weights (weight=, pos_weight=): broadcast to x's shape on the host (a
    device tensor is read back once), float32."""
    if v is None:
        return None
    arr = v.numpy() if isinstance(v, Tensor) else np.asarray(v)
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"{name}: expected numbers, got dtype {arr.dtype}")
    try:
        full = np.broadcast_to(arr.astype(np.float32), x.shape)
    except ValueError:
        raise ValueError(f"{name}: shape {arr.shape} does not broadcast to input's {x.shape}") from None
    return as_tensor(np.ascontiguousarray(full), dev, name)


def _class_weight(weight: Any, dev: Device, c: int) -> Tensor | None:
    if weight is None:
        return None
    if isinstance(weight, Tensor) and weight.dtype == np.float16:
        # a half model's class weights: read back once as float32 (as _elem_weight does), so
        # nothing is dispatched before the other arguments are checked
        if weight.device is not dev:
            raise ValueError(f"weight: tensor is on {weight.device.name}, expected {dev.name}")
        weight = weight.numpy().astype(np.float32)
    w = float32_arg(weight, dev, "weight")
    if w.shape != (c,):
        raise ValueError(f"weight: expected shape ({c},) (one weight per class), got {w.shape}")
    return w


def _no_both(weight: Any, sample_weight: Any) -> None:
    if weight is not None and sample_weight is not None:
        raise ValueError("weight: torch's weight= and sample_weight= do not combine; pass one")


def _pair(input: Any, target: Any, ndims: tuple[int, ...] | None) -> tuple[Device, Tensor]:
    dev = pick_device(input, target)
    x = tensor_arg(input, dev, "input", FLOATS, ndims)
    _check_size(x, "input")
    if x.size == 0:
        raise ValueError(f"input: empty tensor (shape {x.shape})")
    return dev, x


def _float_target(target: TensorLike, x: Tensor, dev: Device) -> Tensor:
    if not isinstance(target, Tensor) and target is not None:
        arr = np.asarray(target)
        if arr.dtype.kind in "fiub":
            target = arr.astype(x.dtype)
    t = tensor_arg(target, dev, "target", (x.dtype,))
    if t.shape != x.shape:
        raise ValueError(f"target: shape {t.shape} does not match input's {x.shape}")
    return t


def _check_ignore_index(ignore_index: Any) -> int:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
        raise ValueError(f"ignore_index: expected an int, got {ignore_index!r}")
    if not -(2**31) <= int(ignore_index) < 2**31:  # an int field of the kernels' params
        raise ValueError(f"ignore_index: {ignore_index} does not fit a 32-bit int")
    return int(ignore_index)


def _check_label_values(arr: np.ndarray, c: int, ignore_index: int, name: str) -> None:
    bad = ((arr < 0) | (arr >= c)) & (arr != ignore_index)
    if bad.any():
        v = arr[bad].reshape(-1)[0]
        raise ValueError(f"{name}: label {int(v)} out of range [0, {c}) (ignore_index="
                         f"{ignore_index})")


class Labels(Tensor):
    """int32 class labels already range-checked on the host for `num_classes` classes and
    `ignore_index` (made by `class_labels`). The class-axis losses skip their host check, which
    for a plain device Tensor reads the labels back (a queue synchronization) on every call."""

    def __init__(self, t: Tensor, num_classes: int, ignore_index: int):
        super().__init__(t.buffer, t.shape, t.dtype)
        self.num_classes = num_classes
        self.ignore_index = ignore_index


def class_labels(target: TensorLike, num_classes: int, ignore_index: int = -100,
                 device: Device | None = None) -> Labels:
    """Check integer labels once (each in [0, num_classes) or equal to ignore_index) and put them
    on the device, so that cross_entropy / categorical_cross_entropy and their backward need not
    check them again. The labels must not be modified afterwards."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) \
            or num_classes < 1:
        raise ValueError(f"num_classes: expected an int >= 1, got {num_classes!r}")
    ii = _check_ignore_index(ignore_index)
    if isinstance(target, Tensor):
        if target.dtype != int32:
            raise ValueError(f"target: labels must be int32, got {target.dtype}")
        arr = target.numpy()
        dev = device or target.device
    else:
        arr = np.asarray(target)
        if arr.dtype.kind not in "iu":
            raise ValueError(f"target: labels must be integers, got dtype {arr.dtype}")
        dev = device or pick_device()
    _check_label_values(arr, int(num_classes), ii, "target")
    t = target if isinstance(target, Tensor) else as_tensor(arr.astype(np.int32), dev, "target")
    return Labels(t, int(num_classes), ii)


def _class_target(target: TensorLike, x: Tensor, dev: Device, ignore_index: Any,
                  allow_labels: bool = True) -> tuple[Tensor, bool, bool]:
    """(target tensor, is_labels, checked on the device). Labels: int32 (N, *spatial) in [0, C)
    or ignore_index: host arrays checked here, a device Tensor by the kernels (no read-back;
    see _label_check), labels made by class_labels for the same C and ignore_index not again;
    probabilities: x's shape and dtype."""
    is_tensor = isinstance(target, Tensor)
    if target is None:
        raise ValueError("target: got None")
    labels = (target.dtype == int32) if is_tensor else np.asarray(target).dtype.kind in "iu"
    if not labels:
        return _float_target(target, x, dev), False, False
    if not allow_labels:
        raise ValueError("target: integer labels are not accepted here; pass a float tensor "
                         "shaped like input")
    ii = _check_ignore_index(ignore_index)
    want = (x.shape[0],) + x.shape[2:]
    if tuple(target.shape if is_tensor else np.shape(target)) != want:
        raise ValueError(f"target: integer labels must have shape {want} (input {x.shape} without "
                         f"the class axis), got {tuple(np.shape(target)) if not is_tensor else target.shape}")
    c = x.shape[1]
    if isinstance(target, Labels) and target.num_classes == c and target.ignore_index == ii:
        if target.device is not dev:
            raise ValueError(f"target: tensor is on {target.device.name}, expected {dev.name}")
        return target, True, False
    if is_tensor and not isinstance(target, Labels):
        return as_tensor(target, dev, "target"), True, True
    # host labels; or labels checked by class_labels for another C / ignore_index: again here
    arr = target.numpy() if is_tensor else np.asarray(target)
    _check_label_values(arr, c, ii, "target")
    t = as_tensor(target, dev, "target") if is_tensor else as_tensor(arr.astype(np.int32), dev, "target")
    return t, True, False


def _label_check(dev: Device, stem: str, kernel_name: str, *outputs: Tensor) -> None:
    """After a call's kernels: the kernels' label check (label_in_range, loss.metal) fails the
    call's results naming the first bad label they recorded (see Device.check_status)."""
    def message(w: np.ndarray) -> str:
        return (f"{stem}: target: label {int(w[1])} out of range [0, {int(w[2])}) "
                f"(ignore_index={int(w[3])}), found by the kernels on the device")

    dev.check_status(message, kernel_name, tuple(o.buffer for o in outputs))


def _grad_arg(grad: TensorLike, dev: Device, shape: tuple[int, ...]) -> Tensor:
    """grad as a float32 tensor of `shape` (() accepts a number or any one-element tensor)."""
    if shape == () and isinstance(grad, (int, float, np.integer, np.floating)) \
            and not isinstance(grad, bool):
        return as_tensor(np.array([grad], np.float32), dev, "grad")
    if not isinstance(grad, Tensor) and grad is not None:
        arr = np.asarray(grad)
        if arr.dtype.kind in "fiu":
            grad = arr.astype(np.float32)
    g = tensor_arg(grad, dev, "grad", (float32,))
    if shape == ():
        if g.size != 1:
            raise ValueError(f"grad: the loss is a scalar, expected one value, got shape {g.shape}")
    elif g.shape != shape:
        raise ValueError(f"grad: expected the loss's shape {shape}, got {g.shape}")
    return g


# ---- dispatch helpers ------------------------------------------------------------------------

def _reduce(dev: Device, part: Tensor, cnt: Buffer, nseg: int, seglen: int, mode: int,
            denom: float, out_shape: tuple[int, ...]) -> Tensor:
    out = empty(out_shape, float32, dev)
    p = LossReduceParams(nseg=nseg, seglen=seglen, mode=mode, denom=denom)
    groups = min(nseg, MAX_GROUPS)
    kernel(dev, SOURCE, "loss_reduce_fwd_float")(groups * TG, part.buffer, cnt, out.buffer, p)
    return out


def _scale(dev: Device, g: Tensor, reduction: str, n: int, labels: Tensor | None,
           w: Tensor | None, terms: int, per_sample: int, mult: int, ignore_index: int,
           cw: Tensor | None = None, classes: int = 0) -> Tensor:
    """The backward coefficient of a scalar reduction: g / count, on the device (a mean over
    labels with class weights cw: g / sum of cw[label] over the counted labels)."""
    if reduction == "sum":
        return g
    scale = empty((1,), float32, dev)
    p = LossReduceParams(mode=_MODE[reduction], denom=float(n), terms=terms, per_sample=per_sample,
                         mult=mult, has_labels=int(labels is not None),
                         has_weight=int(w is not None), ignore_index=int(ignore_index),
                         has_class_weight=int(cw is not None), classes=classes)
    d = dummy(dev)
    kernel(dev, SOURCE, "loss_scale_bwd_float")(
        TG, labels.buffer if labels is not None else d,
        w.buffer if w is not None else d, g.buffer, scale.buffer, p, cw.buffer if cw is not None else d,
        dev.status_buffer())
    return scale


def _pw_args(input: Any, target: Any, sample_weight: Any, weight: Any, pos_weight: Any,
             reduction: str) -> tuple[Device, Tensor, Tensor, Tensor | None, Tensor | None, bool]:
    """Validated (dev, x, t, weights, pos_weight, elementwise?) of a pointwise loss; a 0-d input
    is one sample of one element."""
    _no_both(weight, sample_weight)
    dev, x = _pair(input, target, None)
    t = _float_target(target, x, dev)
    if x.ndim == 0:
        x, t = x.reshape(1), t.reshape(1)
    ew = _elem_weight(weight, dev, x, "weight")
    if ew is not None and reduction in ("sum_by_nonzero_weights", "per_sample"):
        raise ValueError(f"reduction: {reduction!r} counts per-sample weights; weight= gives one "
                         "per element")
    w = ew if ew is not None else _weight(sample_weight, dev, x.shape[0])
    return dev, x, t, w, _elem_weight(pos_weight, dev, x, "pos_weight"), ew is not None


def _pointwise(stem: str, input: Any, target: Any, sample_weight: Any, reduction: str,
               smoothing: float = 0.0, a: float = 0.0, extra: tuple[str, ...] = (),
               weight: Any = None, pos_weight: Any = None) -> Tensor:
    reduction = _check_reduction(reduction, extra)
    shape = np.shape(input) if not isinstance(input, Tensor) else input.shape
    dev, x, t, w, pw, elem = _pw_args(input, target, sample_weight, weight, pos_weight, reduction)
    n = x.shape[0]
    total, m = x.size, x.size // n
    per_sample = reduction == "per_sample"
    seglen = m if per_sample else total
    chunks = cdiv(seglen, CHUNK)
    ngroups = (n if per_sample else 1) * chunks
    p = LossParams(N=n, M=m, total=total, chunk=CHUNK, chunks=chunks, seglen=seglen,
                   ngroups=ngroups, reduce=int(reduction != "none"), has_weight=int(w is not None),
                   smoothing=smoothing, a=a, elem_weight=int(elem), has_pos_weight=int(pw is not None))
    wb = w.buffer if w is not None else dummy(dev)
    pwb = pw.buffer if pw is not None else dummy(dev)
    k = kernel(dev, SOURCE, f"{stem}_fwd_{suffix(x.dtype)}")
    launch = min(ngroups, MAX_GROUPS) * TG
    if reduction == "none":
        out = empty(x.shape, float32, dev)
        k(launch, x.buffer, t.buffer, wb, out.buffer, dummy(dev), pwb, p)
        return out.reshape(tuple(shape))
    part = empty((ngroups,), float32, dev)
    cnt = dev.buffer(8 * ngroups)
    k(launch, x.buffer, t.buffer, wb, part.buffer, cnt, pwb, p)
    if per_sample:
        return _reduce(dev, part, cnt, n, chunks, 0, 1.0, (n,))
    return _reduce(dev, part, cnt, 1, ngroups, _MODE[reduction], float(n), ())


def _pointwise_backward(stem: str, grad: Any, input: Any, target: Any, sample_weight: Any,
                        reduction: str, smoothing: float = 0.0, a: float = 0.0,
                        extra: tuple[str, ...] = (), weight: Any = None, pos_weight: Any = None,
                        target_grad: bool = True) -> tuple[Tensor, Tensor | None]:
    reduction = _check_reduction(reduction, extra)
    shape0 = tuple(np.shape(input) if not isinstance(input, Tensor) else input.shape)
    dev, x, t, w, pw, elem = _pw_args(input, target, sample_weight, weight, pos_weight, reduction)
    n = x.shape[0]
    shape = shape0 if reduction == "none" else (n,) if reduction == "per_sample" else ()
    g = _grad_arg(grad, dev, shape)
    gmode = _gmode(reduction)
    if gmode == G_SCALAR:  # element weights are not counted: a mean divides by the element count
        g = _scale(dev, g, reduction, n, None, None if elem else w, n, 1, x.size // n, 0)
    tgrad = stem in _TARGET_GRAD and boolean(target_grad, "target_grad")
    p = LossParams(N=n, M=x.size // n, total=x.size, gmode=gmode, has_weight=int(w is not None),
                   smoothing=smoothing, a=a, elem_weight=int(elem), has_pos_weight=int(pw is not None),
                   target_grad=int(tgrad))
    dx = empty(x.shape, x.dtype, dev)
    dt = empty(x.shape, x.dtype, dev) if tgrad else None
    d = dummy(dev)
    # 16-byte chunks (loss_pw_bwd_vec) when a chunk meets at most two samples and every buffer
    # read or written per element starts 16-byte aligned
    wch = 16 // x.dtype.itemsize
    per_elem = [x, t, dx] + [v for v in (dt, pw, w if elem else None,
                                         g if gmode not in (G_SCALAR, G_PER_SAMPLE) else None)
                            if v is not None]
    if p.M >= wch and all(v.buffer.offset % 16 == 0 for v in per_elem):
        nvec = x.size // wch
        p.reduce = nvec  # the vector kernel's chunk count
        # no weights and one scalar gradient: the plain kernel (no per-element branches)
        plain = w is None and pw is None and gmode == G_SCALAR and KERNELS == "auto"
        name = f"{stem}_bwd_{'plain' if plain else 'vec'}_{suffix(x.dtype)}"
        count = stream_count(x.size, wch, nvec)
    else:
        name, count = f"{stem}_bwd_{suffix(x.dtype)}", min(cdiv(x.size, TG), MAX_GROUPS) * TG
    kernel(dev, SOURCE, name)(
        count, g.buffer, x.buffer, t.buffer, w.buffer if w is not None else d,
        dx.buffer, pw.buffer if pw is not None else d, dt.buffer if dt is not None else d, p)
    return dx.reshape(shape0), (dt.reshape(shape0) if dt is not None else None)


def _class_prep(input: Any, target: Any, sample_weight: Any, ignore_index: Any,
                allow_labels: bool
                ) -> tuple[Device, Tensor, Tensor, bool, bool, Tensor | None, int, int]:
    """A 1-D input (C,) is one unbatched sample, as in PyTorch (its labels a 0-d int)."""
    dev = pick_device(input, target)
    if (input.ndim if isinstance(input, Tensor) else np.ndim(input)) == 1:
        input = tensor_arg(input, dev, "input", FLOATS).reshape(1, -1)
        tn = np.ndim(target) if not isinstance(target, Tensor) else target.ndim
        target = (target.reshape(1) if isinstance(target, Tensor) else np.reshape(target, (1,))) \
            if tn == 0 else (target.reshape(1, -1) if isinstance(target, Tensor)
                             else np.reshape(target, (1, -1)))
    dev, x = _pair(input, target, None)
    if x.ndim < 2:
        raise ValueError(f"input: expected (C,) or (N, C, ...), got shape {x.shape}")
    t, labels, devcheck = _class_target(target, x, dev, ignore_index, allow_labels)
    n = x.shape[0]
    w = _weight(sample_weight, dev, n)
    m = x.size // (n * x.shape[1])
    return dev, x, t, labels, devcheck, w, n, m


def _class_forward(stem: str, input: Any, target: Any, sample_weight: Any, reduction: str,
                   ignore_index: Any = -100, smoothing: float = 0.0, a: float = 0.0,
                   allow_labels: bool = True, cache: int = 0, weight: Any = None) -> Tensor:
    reduction = _check_reduction(reduction)
    _no_both(weight, sample_weight)
    unbatched = (input.ndim if isinstance(input, Tensor) else np.ndim(input)) == 1
    dev, x, t, labels, devcheck, w, n, m = _class_prep(input, target, sample_weight,
                                                       ignore_index, allow_labels)
    cw = _class_weight(weight, dev, x.shape[1])
    # softmax cross-entropy on (N, C) logits with labels: the row kernels where they apply
    rq = row_plan(n, x.shape[1], m, x.dtype, x) if stem == "cross_entropy" and labels else None
    q = rq or tile_plan(n, x.shape[1], m, cache_arrays=cache, dev=x.device)
    p = LossParams(N=n, M=m, has_weight=int(w is not None),
                   ignore_index=int(ignore_index) if labels else 0, smoothing=smoothing, a=a,
                   has_class_weight=int(cw is not None))
    variant = ("labels_" if labels else "probs_") if allow_labels else ""
    terms = empty((n,) + x.shape[2:], float32, dev)
    cnt = dev.buffer(8 * n * m)
    d = dummy(dev)
    name = f"{stem}_fwd_{variant}{'rows_' if rq else ''}{suffix(x.dtype)}"
    kernel(dev, SOURCE, name)(
        n * 32 if rq else tile_groups(q) * TG, x.buffer, d if labels else t.buffer, t.buffer if labels else d,
        w.buffer if w is not None else d, terms.buffer, cnt, p, q, cw.buffer if cw is not None else d,
        dev.status_buffer())
    if reduction == "none":
        out = terms
    elif reduction == "per_sample":
        out = _reduce(dev, terms, cnt, n, m, 0, 1.0, (n,))
    elif cw is not None and labels and reduction == "mean":
        # sum / sum of w[label] over the counted labels: loss_scale with the sum as its g
        total = _reduce(dev, terms, cnt, 1, n * m, _MODE["sum"], float(n), ())
        out = _scale(dev, total, "mean", n, t, None, n * m, m, 1, int(ignore_index), cw,
                     x.shape[1])
    else:
        out = _reduce(dev, terms, cnt, 1, n * m, _MODE[reduction], float(n), ())
    if devcheck:
        _label_check(dev, stem, name, out)
    if reduction == "none":
        return out.reshape(()) if unbatched else out
    return out if reduction == "per_sample" else out.reshape(())


def _class_backward(stem: str, grad: Any, input: Any, target: Any, sample_weight: Any,
                    reduction: str, ignore_index: Any = -100, smoothing: float = 0.0,
                    a: float = 0.0, allow_labels: bool = True, cache: int = 0, weight: Any = None,
                    target_grad: bool = True) -> tuple[Tensor, Tensor | None]:
    reduction = _check_reduction(reduction)
    _no_both(weight, sample_weight)
    shape0 = tuple(input.shape if isinstance(input, Tensor) else np.shape(input))
    unbatched = len(shape0) == 1
    dev, x, t, labels, devcheck, w, n, m = _class_prep(input, target, sample_weight,
                                                       ignore_index, allow_labels)
    cw = _class_weight(weight, dev, x.shape[1])
    shape = (n,) + x.shape[2:] if reduction == "none" else (n,) if reduction == "per_sample" else ()
    if unbatched and reduction == "none":
        shape = ()
    g = _grad_arg(grad, dev, shape)
    gmode = _gmode(reduction)
    if gmode == G_SCALAR:
        if labels:
            g = _scale(dev, g, reduction, n, t, w, n * m, m, 1, int(ignore_index), cw, x.shape[1])
        else:
            g = _scale(dev, g, reduction, n, None, w, n, 1, m, 0)
    tgrad = stem == "cross_entropy" and not labels and boolean(target_grad, "target_grad")
    dx = empty(x.shape, x.dtype, dev)
    rq = row_plan(n, x.shape[1], m, x.dtype, x, dx) if stem == "cross_entropy" and labels \
        else None
    q = rq or tile_plan(n, x.shape[1], m, cache_arrays=cache, dev=x.device)
    p = LossParams(N=n, M=m, gmode=gmode, has_weight=int(w is not None),
                   ignore_index=int(ignore_index) if labels else 0, smoothing=smoothing, a=a,
                   has_class_weight=int(cw is not None), target_grad=int(tgrad))
    variant = ("labels_" if labels else "probs_") if allow_labels else ""
    dt = empty(x.shape, x.dtype, dev) if tgrad else None
    d = dummy(dev)
    name = f"{stem}_bwd_{variant}{'rows_' if rq else ''}{suffix(x.dtype)}"
    kernel(dev, SOURCE, name)(
        n * 32 if rq else tile_groups(q) * TG, g.buffer, x.buffer, d if labels else t.buffer,
        t.buffer if labels else d, w.buffer if w is not None else d, dx.buffer, p, q,
        cw.buffer if cw is not None else d, dt.buffer if dt is not None else d,
        dev.status_buffer())
    if devcheck:
        _label_check(dev, stem, name, dx)
    return dx.reshape(shape0), (dt.reshape(shape0) if dt is not None else None)


def _smoothing(label_smoothing: Any) -> float:
    return _check_float(label_smoothing, "label_smoothing", 0.0, 1.0)


# ---- public API ------------------------------------------------------------------------------

def cross_entropy(input: TensorLike, target: TensorLike, weight: TensorLike | None = None, *,
                  sample_weight: TensorLike | None = None,
                  ignore_index: int = -100, reduction: str = "mean",
                  label_smoothing: float = 0.0) -> Tensor:
    """Softmax cross-entropy on logits (N, C[, d1, ...]) or one unbatched sample (C,), class axis
    1, as F.cross_entropy.

    target: int32 labels (N[, d1, ...]) or class probabilities shaped like input. weight: None or
    one weight per class (C,). l = sum_c w_c t'_c (log sum_j exp(x_j) - x_c) with
    t' = (1 - s) onehot(y) + s / C (labels) or (1 - s) t + s / C (probabilities); labels equal to
    ignore_index give no term; 'mean' over labels with weight divides by sum of w[label].
    """
    s = _smoothing(label_smoothing)
    return _class_forward("cross_entropy", input, target, sample_weight, reduction, ignore_index,
                          s, cache=1, weight=weight)


def cross_entropy_backward(grad: TensorLike, input: TensorLike, target: TensorLike,
                           weight: TensorLike | None = None, *,
                           sample_weight: TensorLike | None = None, ignore_index: int = -100,
                           reduction: str = "mean", label_smoothing: float = 0.0,
                           target_grad: bool = True) -> tuple[Tensor, Tensor | None]:
    """(d/dx, d/dt) of cross_entropy: dx = g (softmax(x) sum_c w_c t'_c - w t') per term;
    dt_c = g (1 - s) w_c (lse - x_c) for probability targets (None for labels)."""
    s = _smoothing(label_smoothing)
    return _class_backward("cross_entropy", grad, input, target, sample_weight, reduction,
                           ignore_index, s, cache=1, weight=weight, target_grad=target_grad)


def categorical_cross_entropy(input: TensorLike, target: TensorLike, *,
                              sample_weight: TensorLike | None = None, ignore_index: int = -100,
                              reduction: str = "mean", label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy on probabilities (MPS's categorical cross-entropy): l = -sum_c t'_c log x_c
    over axis 1 (terms with t'_c = 0 contribute 0). target: labels or probabilities."""
    s = _smoothing(label_smoothing)
    return _class_forward("categorical_cross_entropy", input, target, sample_weight, reduction,
                          ignore_index, s)


def categorical_cross_entropy_backward(grad: TensorLike, input: TensorLike, target: TensorLike, *,
                                       sample_weight: TensorLike | None = None, ignore_index: int = -100,
                                       reduction: str = "mean",
                                       label_smoothing: float = 0.0,
                                       target_grad: bool = True) -> tuple[Tensor, Tensor | None]:
    """(d/dx, None) of categorical_cross_entropy: -g w t'_c / x_c."""
    s = _smoothing(label_smoothing)
    return _class_backward("categorical_cross_entropy", grad, input, target, sample_weight,
                           reduction, ignore_index, s, target_grad=target_grad)


def cosine_distance(input: TensorLike, target: TensorLike, *,
                    sample_weight: TensorLike | None = None, reduction: str = "mean",
                    eps: float = 1e-8) -> Tensor:
    """l = 1 - cos(x, t) along axis 1, cos = sum_c x_c t_c / sqrt(max(|x|^2 |t|^2, eps^2)) (as
    1 - F.cosine_similarity(x, t, dim=1, eps); MPS's/TF's cosine distance for unit vectors)."""
    e = _check_float(eps, "eps", 0.0, lo_open=True)
    return _class_forward("cosine_distance", input, target, sample_weight, reduction, a=e,
                          allow_labels=False)


def cosine_distance_backward(grad: TensorLike, input: TensorLike, target: TensorLike, *,
                             sample_weight: TensorLike | None = None,
                             reduction: str = "mean", eps: float = 1e-8,
                             target_grad: bool = True) -> tuple[Tensor, Tensor | None]:
    """(d/dx, None) of cosine_distance: g w (cos x / |x|^2 - t / D), D = |x| |t| (or -g w t / eps
    when clamped)."""
    e = _check_float(eps, "eps", 0.0, lo_open=True)
    return _class_backward("cosine_distance", grad, input, target, sample_weight, reduction, a=e,
                           allow_labels=False, cache=1, target_grad=target_grad)


def binary_cross_entropy_with_logits(input: TensorLike, target: TensorLike,
                                     weight: TensorLike | None = None, *,
                                     sample_weight: TensorLike | None = None, reduction: str = "mean",
                                     pos_weight: TensorLike | None = None,
                                     label_smoothing: float = 0.0) -> Tensor:
    """Sigmoid cross-entropy on logits: l = w ((1 - t') x + (1 + (p - 1) t') softplus(-x)), which
    is max(x, 0) - x t' + log(1 + exp(-|x|)) for p = 1; weight w and pos_weight p broadcast to
    the input (PyTorch's); t' = t (1 - s) + s / 2 (label smoothing as MPS / TF; s = 0 is
    F.binary_cross_entropy_with_logits)."""
    return _pointwise("bce_with_logits", input, target, sample_weight, reduction,
                      smoothing=_smoothing(label_smoothing), weight=weight, pos_weight=pos_weight)


def binary_cross_entropy_with_logits_backward(grad: TensorLike, input: TensorLike, target: TensorLike,
                                              weight: TensorLike | None = None,
                                              *, sample_weight: TensorLike | None = None,
                                              reduction: str = "mean",
                                              pos_weight: TensorLike | None = None,
                                              label_smoothing: float = 0.0,
                                              target_grad: bool = True) -> tuple[Tensor, Tensor]:
    """(d/dx, d/dt): dx = g w ((1 + (p - 1) t') sigmoid(x) - p t'),
    dt = g w (1 - s) (-x + (p - 1) softplus(-x))."""
    return _pointwise_backward("bce_with_logits", grad, input, target, sample_weight, reduction,
                               smoothing=_smoothing(label_smoothing), weight=weight,
                               pos_weight=pos_weight, target_grad=target_grad)


def _parameterless(stem: str, doc: str, grad_doc: str) -> tuple[Callable, Callable]:
    """A pointwise loss without parameters of its own (`stem`'s kernels) and its backward."""

    def loss(input: TensorLike, target: TensorLike, *, sample_weight: TensorLike | None = None,
             reduction: str = "mean") -> Tensor:
        return _pointwise(stem, input, target, sample_weight, reduction)

    def backward(grad: Any, input: Any, target: Any, *, sample_weight: Any = None,
                 reduction: str = "mean", target_grad: bool = True) -> tuple[Tensor, Tensor | None]:
        return _pointwise_backward(stem, grad, input, target, sample_weight, reduction,
                                   target_grad=target_grad)

    for f, name, d in ((loss, stem, doc), (backward, f"{stem}_backward", grad_doc)):
        f.__name__ = f.__qualname__ = name
        f.__doc__ = d
    return loss, backward


mse_loss, mse_loss_backward = _parameterless(
    "mse_loss", "l = (x - t)^2 (F.mse_loss).", "(d/dx, d/dt): 2 g w (x - t) and its negation.")
l1_loss, l1_loss_backward = _parameterless(
    "l1_loss", "l = |x - t| (F.l1_loss; MPS's mean absolute error).",
    "(d/dx, d/dt): g w sign(x - t) (0 where x == t, as PyTorch) and its negation.")


def huber_loss(input: TensorLike, target: TensorLike, *, sample_weight: TensorLike | None = None,
               reduction: str = "mean", delta: float = 1.0) -> Tensor:
    """l = d^2 / 2 if |d| < delta else delta (|d| - delta / 2), d = x - t (F.huber_loss)."""
    dl = _check_float(delta, "delta", 0.0, lo_open=True)
    return _pointwise("huber_loss", input, target, sample_weight, reduction, a=dl)


def huber_loss_backward(grad: TensorLike, input: TensorLike, target: TensorLike, *,
                        sample_weight: TensorLike | None = None,
                        reduction: str = "mean", delta: float = 1.0,
                        target_grad: bool = True) -> tuple[Tensor, Tensor | None]:
    """(d/dx, d/dt): g w clamp(x - t, -delta, delta) and its negation."""
    dl = _check_float(delta, "delta", 0.0, lo_open=True)
    return _pointwise_backward("huber_loss", grad, input, target, sample_weight, reduction, a=dl,
                               target_grad=target_grad)


hinge_loss, hinge_loss_backward = _parameterless(
    "hinge_loss", "l = max(0, 1 - (2 t - 1) x): targets in {0, 1} map to {-1, +1} (MPS / "
    "tf.losses.hinge_loss; PyTorch has no such loss).",
    "(d/dx, None): -g w (2 t - 1) where 1 - (2 t - 1) x > 0, else 0.")


def kl_div(input: TensorLike, target: TensorLike, *, sample_weight: TensorLike | None = None,
           reduction: str = "mean", log_target: bool = False) -> Tensor:
    """F.kl_div: input holds log-probabilities; l = t (log t - x) (0 where t = 0), or
    exp(t) (t - x) with log_target. reduction also takes 'batchmean' (sum / N)."""
    boolean(log_target, "log_target")
    return _pointwise("kl_div", input, target, sample_weight, reduction, a=float(log_target),
                      extra=("batchmean",))


def kl_div_backward(grad: TensorLike, input: TensorLike, target: TensorLike, *,
                    sample_weight: TensorLike | None = None,
                    reduction: str = "mean", log_target: bool = False,
                    target_grad: bool = True) -> tuple[Tensor, Tensor | None]:
    """(d/dx, d/dt): -g w t and g w (log t + 1 - x) (NaN at t = 0, as PyTorch); with log_target
    -g w exp(t) and g w exp(t) (t - x + 1)."""
    boolean(log_target, "log_target")
    return _pointwise_backward("kl_div", grad, input, target, sample_weight, reduction,
                               a=float(log_target), extra=("batchmean",), target_grad=target_grad)


def log_loss(input: TensorLike, target: TensorLike, *, sample_weight: TensorLike | None = None,
             reduction: str = "mean", epsilon: float = 1e-7) -> Tensor:
    """l = -t log(x + eps) - (1 - t) log(1 - x + eps) on probabilities x (MPS / tf.losses.log_loss;
    PyTorch's binary_cross_entropy clamps the logs instead)."""
    e = _check_float(epsilon, "epsilon", 0.0, lo_open=True)
    return _pointwise("log_loss", input, target, sample_weight, reduction, a=e)


def log_loss_backward(grad: TensorLike, input: TensorLike, target: TensorLike, *,
                      sample_weight: TensorLike | None = None,
                      reduction: str = "mean", epsilon: float = 1e-7,
                      target_grad: bool = True) -> tuple[Tensor, Tensor | None]:
    """(d/dx, None): g w (-t / (x + eps) + (1 - t) / (1 - x + eps))."""
    e = _check_float(epsilon, "epsilon", 0.0, lo_open=True)
    return _pointwise_backward("log_loss", grad, input, target, sample_weight, reduction, a=e,
                               target_grad=target_grad)


def smooth_l1_loss(input: TensorLike, target: TensorLike, *, sample_weight: TensorLike | None = None,
                   reduction: str = "mean",
                   beta: float = 1.0) -> Tensor:
    """l = d^2 / (2 beta) if |d| < beta else |d| - beta / 2, d = x - t (F.smooth_l1_loss; beta = 0
    is l1_loss, as PyTorch)."""
    b = _check_float(beta, "beta", 0.0)
    if b == 0.0:
        return _pointwise("l1_loss", input, target, sample_weight, reduction)
    return _pointwise("smooth_l1_loss", input, target, sample_weight, reduction, a=b)


def smooth_l1_loss_backward(grad: TensorLike, input: TensorLike, target: TensorLike, *,
                            sample_weight: TensorLike | None = None,
                            reduction: str = "mean", beta: float = 1.0,
                            target_grad: bool = True) -> tuple[Tensor, Tensor]:
    """(d/dx, d/dt): g w (d / beta if |d| < beta else sign(d)) and its negation."""
    b = _check_float(beta, "beta", 0.0)
    return _pointwise_backward("smooth_l1_loss" if b else "l1_loss", grad, input, target,
                               sample_weight, reduction, a=b, target_grad=target_grad)
