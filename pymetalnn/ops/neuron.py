"""Element-wise activations ("neurons") and their gradients (kernels/neuron.metal).

Design note: every op is one kernel per direction and dtype, `<op>_<fwd|bwd>[_tanh]_<dtype>`,
instantiated from one template in neuron.metal; all share NeuronParams (n, a, b). Storage is
float32 or float16, arithmetic is float32. Each backward takes (grad_out, x, <same options>) and
returns grad_x = grad_out * f'(x), recomputing from x. Conventions at kinks follow torch:
relu'(0) = 0, leaky_relu'(0) = negative_slope, elu'(0) = alpha, hardsigmoid'(+-3) = 0.

Fused activations: conv2d, linear, gemm and batch_norm(_with_stats) take `activation=` (see
`activation_code`) and apply it in their store epilogue (one dispatch). Their output y is all a
gradient needs: `<op>_backward_from_output(grad_out, y)` (relu, leaky_relu with slope >= 0,
sigmoid, tanh; kernels <op>_bwdy_<dtype>) gives the pre-activation gradient, and
`activation_backward_from_output(grad_out, y, activation)` picks it from the same `activation=` value.
batch_norm_backward takes `activation=` itself and applies act' inside its own kernels
(nn_activation_bwd of neuron.h, from the recomputed pre-activation): no separate pass.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..params import CONST, NeuronParams
from ..runtime.core import MAX_GRID_THREADS
from ..tensor import Tensor, TensorLike
from ._common import (
    FLOATS,
    kernel,
    out_like,
    pick_device,
    stream_launch,
    strided_out,
    suffix,
    tensor_arg,
)

SOURCE = "neuron.metal"


def _scalar(v: Any, name: str, nonzero: bool = False) -> float:
    """A finite Python/numpy real that float32 can hold; errors name `name`."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name}: expected a real number, got {type(v).__name__}")
    f = float(v)
    if not math.isfinite(f) or abs(f) > float(np.finfo(np.float32).max):
        raise ValueError(f"{name}: must be finite in float32, got {v!r}")
    if nonzero and f == 0.0:
        raise ValueError(f"{name}: must be nonzero")
    return f


def _params(k: Any, n: int, a: float, b: float, *tensors: Tensor, inner: int = 0,
            x_nstride: int = 0, y_nstride: int = 0) -> tuple[int, NeuronParams]:
    """Launch count and params (kernels/stream.h). The vector path needs each buffer 16-byte
    aligned, true of every fresh tensor; a view at another offset (e.g. a piece of split) runs
    all-scalar instead, and so does a strided x or y (images x_nstride / y_nstride apart)."""
    nvec, count = stream_launch(n, tensors[0].dtype.itemsize, tensors,
                                vector=not (x_nstride or y_nstride))
    return count, NeuronParams(
        n=n, nvec=nvec, a=a, b=b, inner=inner, x_nstride=x_nstride, y_nstride=y_nstride)


def _batch_stride(t: Tensor, stride: Any, name: str) -> tuple[int, int]:
    """(inner, nstride) of a tensor whose images lie `stride` elements apart (None: contiguous)."""
    if stride is None or t.ndim < 2 or t.shape[0] <= 1:
        return 0, 0
    inner = math.prod(t.shape[1:])
    stride = int(stride)
    if stride < inner:
        raise ValueError(f"{name}: {stride} elements, less than one image's {inner}")
    if t.buffer.nbytes < ((t.shape[0] - 1) * stride + inner) * t.dtype.itemsize:
        raise ValueError(f"{name}: {t.buffer.nbytes} bytes of buffer, too few for {t.shape} with "
                         f"batch stride {stride}")
    return (inner, 0) if stride == inner else (inner, stride)


def _check_size(xt: Tensor) -> None:
    if xt.size > MAX_GRID_THREADS:
        raise ValueError(f"x: {xt.size} elements, at most {MAX_GRID_THREADS} are supported")


def _fwd(op: str, x: TensorLike, a: float = 0.0, b: float = 0.0, variant: str = "", out: Any = None,
         out_batch_stride: Any = None) -> Tensor:
    dev = pick_device(x)
    xt = tensor_arg(x, dev, "x", FLOATS)
    _check_size(xt)
    if out is None and out_batch_stride is None:
        y, (inner, ns) = out_like(xt.shape, xt.dtype, dev), (0, 0)
    else:
        if xt.ndim < 2:
            raise ValueError("out: needs a batched x (N, ...)")
        y, ns = strided_out(out, out_batch_stride, xt.shape, xt.dtype, dev)
        inner = math.prod(xt.shape[1:])
    if xt.size:
        k = kernel(dev, SOURCE, f"{op}_fwd{variant}_{suffix(xt.dtype)}")
        count, q = _params(k, xt.size, a, b, xt, y, inner=inner, y_nstride=ns)
        k(count, xt.buffer, y.buffer, q)
    return y


def _bwd(op: str, grad_out: TensorLike, x: TensorLike, a: float = 0.0, b: float = 0.0,
         variant: str = "", x_batch_stride: Any = None) -> Tensor:
    dev = pick_device(grad_out, x)
    gt = tensor_arg(grad_out, dev, "grad_out", FLOATS)
    xt = tensor_arg(x, dev, "x", FLOATS)
    if gt.shape != xt.shape:
        raise ValueError(f"grad_out: shape {gt.shape} differs from x's {xt.shape}")
    if gt.dtype != xt.dtype:
        raise ValueError(f"grad_out: dtype {gt.dtype} differs from x's {xt.dtype}")
    _check_size(xt)
    dx = out_like(xt.shape, xt.dtype, dev)
    if xt.size:
        k = kernel(dev, SOURCE, f"{op}_bwd{variant}_{suffix(xt.dtype)}")
        inner, ns = _batch_stride(xt, x_batch_stride, "y_batch_stride")
        count, q = _params(k, xt.size, a, b, gt, xt, dx, inner=inner, x_nstride=ns)
        k(count, gt.buffer, xt.buffer, dx.buffer, q)
    return dx


# ---- fused activations (NN_ACT_* of kernels/params.h, applied by kernels/neuron.h) ---------------

ACTIVATIONS = {k: CONST[f"NN_ACT_{k.upper()}"] for k in ("relu", "leaky_relu", "sigmoid", "tanh")}
_ACT_PARAMS = {"relu": (), "leaky_relu": ("negative_slope",), "sigmoid": (), "tanh": ()}


def _activation(activation: Any) -> tuple[str | None, dict]:
    """(name, params) of an activation= value: None, a name in ACTIVATIONS, or (name, params)
    with params a dict ({"negative_slope": 0.2}) or, for leaky_relu, the slope as a number."""
    if activation is None:
        return None, {}
    if isinstance(activation, str):
        name, params = activation, {}
    elif isinstance(activation, tuple) and len(activation) == 2 and \
            isinstance(activation[0], str):
        name, params = activation
        if not isinstance(params, dict):
            params = {"negative_slope": params} if name == "leaky_relu" else {"": params}
    else:
        raise ValueError(f"activation: expected None, a name or (name, params), got "
                         f"{activation!r}")
    if name not in ACTIVATIONS:
        raise ValueError(f"activation: expected None or one of {', '.join(ACTIVATIONS)}, got "
                         f"{name!r}")
    bad = set(params) - set(_ACT_PARAMS[name])
    if bad:
        raise ValueError(f"activation: {name} takes "
                         f"{', '.join(_ACT_PARAMS[name]) or 'no parameters'}, got "
                         f"{', '.join(sorted(map(str, bad)))}")
    return name, dict(params)


def activation_code(activation: Any) -> tuple[int, float]:
    """(act, act_alpha) for a kernel's params: act = NN_ACT_* of kernels/params.h (0 = none),
    act_alpha = leaky_relu's negative_slope (default 0.01, as torch), else 0."""
    name, params = _activation(activation)
    if name is None:
        return 0, 0.0
    alpha = _scalar(params.get("negative_slope", 0.01), "negative_slope") \
        if name == "leaky_relu" else 0.0
    return ACTIVATIONS[name], alpha


def activation_backward_from_output(grad_out: TensorLike, y: TensorLike, activation: Any) -> Any:
    """The pre-activation gradient of a fused op's output y = act(z): grad_out * act'(z), from y
    (`<act>_backward_from_output`); grad_out itself when activation is None."""
    name, params = _activation(activation)
    if name is None:
        return grad_out
    return globals()[f"{name}_backward_from_output"](grad_out, y, **params)


def relu_backward_from_output(grad_out: TensorLike, y: TensorLike, y_batch_stride: int | None = None
                              ) -> Tensor:
    """grad_x = grad_out where y = relu(x) > 0, else 0 (the same as from x). y_batch_stride (all
    the *_backward_from_output): y's images lie that many elements apart (y written with out=,
    out_batch_stride= into a channel slice); grad_out and the result are contiguous."""
    return _bwd("relu", grad_out, y, variant="y", x_batch_stride=y_batch_stride)


def leaky_relu_backward_from_output(grad_out: TensorLike, y: TensorLike,
                                    negative_slope: float = 0.01, y_batch_stride: int | None = None
                                    ) -> Tensor:
    """grad_x = grad_out if y > 0 else negative_slope * grad_out, y = leaky_relu(x); needs
    negative_slope >= 0 (then y > 0 iff x > 0)."""
    a = _scalar(negative_slope, "negative_slope")
    if a < 0:
        raise ValueError(f"negative_slope: the gradient from the output needs a slope >= 0, "
                         f"got {negative_slope!r}")
    return _bwd("leaky_relu", grad_out, y, a, variant="y", x_batch_stride=y_batch_stride)


def sigmoid_backward_from_output(grad_out: TensorLike, y: TensorLike,
                                 y_batch_stride: int | None = None) -> Tensor:
    """grad_x = grad_out * y (1 - y), y = sigmoid(x)."""
    return _bwd("sigmoid", grad_out, y, variant="y", x_batch_stride=y_batch_stride)


def tanh_backward_from_output(grad_out: TensorLike, y: TensorLike, y_batch_stride: int | None = None
                              ) -> Tensor:
    """grad_x = grad_out * (1 - y^2), y = tanh(x)."""
    return _bwd("tanh", grad_out, y, variant="y", x_batch_stride=y_batch_stride)


def relu(input: TensorLike, out: Tensor | None = None, out_batch_stride: int | None = None) -> Tensor:
    """relu(x) = max(x, 0) (NaN stays NaN). out=, out_batch_stride= (relu, leaky_relu, sigmoid,
    tanh): write y into out, images that many elements apart (a channel slice of a larger
    tensor; see pymetalnn.ops._common.strided_out)."""
    x = input
    return _fwd("relu", x, out=out, out_batch_stride=out_batch_stride)


def relu_backward(grad_out: TensorLike, input: TensorLike) -> Tensor:
    """grad_x = grad_out where x > 0, else 0 (0 at x = 0, as torch)."""
    x = input
    return _bwd("relu", grad_out, x)


def leaky_relu(input: TensorLike, negative_slope: float = 0.01, out: Tensor | None = None,
               out_batch_stride: int | None = None) -> Tensor:
    """leaky_relu(x) = x if x > 0 else negative_slope * x."""
    x = input
    return _fwd("leaky_relu", x, _scalar(negative_slope, "negative_slope"), out=out,
                out_batch_stride=out_batch_stride)


def leaky_relu_backward(grad_out: TensorLike, input: TensorLike, negative_slope: float = 0.01) -> Tensor:
    """grad_x = grad_out if x > 0 else negative_slope * grad_out."""
    x = input
    return _bwd("leaky_relu", grad_out, x, _scalar(negative_slope, "negative_slope"))


def elu(input: TensorLike, alpha: float = 1.0) -> Tensor:
    """elu(x) = x if x > 0 else alpha * (exp(x) - 1)."""
    x = input
    return _fwd("elu", x, _scalar(alpha, "alpha"))


def elu_backward(grad_out: TensorLike, input: TensorLike, alpha: float = 1.0) -> Tensor:
    """grad_x = grad_out if x > 0 else grad_out * alpha * exp(x)."""
    x = input
    return _bwd("elu", grad_out, x, _scalar(alpha, "alpha"))


def sigmoid(input: TensorLike, out: Tensor | None = None, out_batch_stride: int | None = None) -> Tensor:
    """sigmoid(x) = 1 / (1 + exp(-x))."""
    x = input
    return _fwd("sigmoid", x, out=out, out_batch_stride=out_batch_stride)


def sigmoid_backward(grad_out: TensorLike, input: TensorLike) -> Tensor:
    """grad_x = grad_out * s (1 - s), s = sigmoid(x)."""
    x = input
    return _bwd("sigmoid", grad_out, x)


def tanh(input: TensorLike, out: Tensor | None = None, out_batch_stride: int | None = None) -> Tensor:
    """tanh(x)."""
    x = input
    return _fwd("tanh", x, out=out, out_batch_stride=out_batch_stride)


def tanh_backward(grad_out: TensorLike, input: TensorLike) -> Tensor:
    """grad_x = grad_out * (1 - tanh(x)^2)."""
    x = input
    return _bwd("tanh", grad_out, x)


def softplus(input: TensorLike, beta: float = 1.0, threshold: float = 20.0) -> Tensor:
    """softplus(x) = log(1 + exp(beta x)) / beta, or x where beta x > threshold (as torch)."""
    x = input
    return _fwd("softplus", x, _scalar(beta, "beta", nonzero=True), _scalar(threshold, "threshold"))


def softplus_backward(grad_out: TensorLike, input: TensorLike, beta: float = 1.0, threshold: float = 20.0
                      ) -> Tensor:
    """grad_x = grad_out * sigmoid(beta x), or grad_out where beta x > threshold."""
    x = input
    return _bwd("softplus", grad_out, x, _scalar(beta, "beta", nonzero=True),
                _scalar(threshold, "threshold"))


def _gelu_variant(approximate: Any) -> str:
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate: expected 'none' or 'tanh', got {approximate!r}")
    return "" if approximate == "none" else "_tanh"


def gelu(input: TensorLike, approximate: str = "none") -> Tensor:
    """gelu(x) = x Phi(x) = x (1 + erf(x / sqrt 2)) / 2; approximate='tanh':
    x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) / 2."""
    x = input
    return _fwd("gelu", x, variant=_gelu_variant(approximate))


def gelu_backward(grad_out: TensorLike, input: TensorLike, approximate: str = "none") -> Tensor:
    """grad_x = grad_out * (Phi(x) + x phi(x)), phi(x) = exp(-x^2/2) / sqrt(2 pi); for 'tanh',
    the derivative of the tanh form (t = tanh(u), u = k (x + c x^3)):
    (1 + t)/2 + x (1 - t^2) k (1 + 3 c x^2) / 2."""
    x = input
    return _bwd("gelu", grad_out, x, variant=_gelu_variant(approximate))


def hardsigmoid(input: TensorLike) -> Tensor:
    """torch's hardsigmoid: relu6(x + 3) / 6 = clamp(x/6 + 1/2, 0, 1)."""
    x = input
    return _fwd("hardsigmoid", x)


def hardsigmoid_backward(grad_out: TensorLike, input: TensorLike) -> Tensor:
    """grad_x = grad_out / 6 for -3 < x < 3, else 0."""
    x = input
    return _bwd("hardsigmoid", grad_out, x)


def hard_sigmoid(input: TensorLike, a: float = 0.2, b: float = 0.5) -> Tensor:
    """MPS's hard sigmoid (MPSCNNNeuronHardSigmoid): clamp(a x + b, 0, 1).
    torch's hardsigmoid is the case a = 1/6, b = 1/2 (use `hardsigmoid` for its exact rounding)."""
    x = input
    return _fwd("hard_sigmoid", x, _scalar(a, "a"), _scalar(b, "b"))


def hard_sigmoid_backward(grad_out: TensorLike, input: TensorLike, a: float = 0.2, b: float = 0.5) -> Tensor:
    """grad_x = a * grad_out where 0 < a x + b < 1, else 0."""
    x = input
    return _bwd("hard_sigmoid", grad_out, x, _scalar(a, "a"), _scalar(b, "b"))


def linear_neuron(input: TensorLike, a: float = 1.0, b: float = 0.0) -> Tensor:
    """MPS's linear neuron (MPSCNNNeuronLinear): a x + b (one fused multiply-add).
    Named apart from torch's `linear` (the fully connected layer)."""
    x = input
    return _fwd("linear_neuron", x, _scalar(a, "a"), _scalar(b, "b"))


def linear_neuron_backward(grad_out: TensorLike, input: TensorLike, a: float = 1.0, b: float = 0.0) -> Tensor:
    """grad_x = a * grad_out (x only fixes shape and dtype)."""
    x = input
    return _bwd("linear_neuron", grad_out, x, _scalar(a, "a"), _scalar(b, "b"))


__all__ = [
    "ACTIVATIONS", "activation_backward_from_output", "activation_code", "leaky_relu_backward_from_output",
    "relu_backward_from_output", "sigmoid_backward_from_output", "tanh_backward_from_output",
    "elu", "elu_backward", "gelu", "gelu_backward", "hard_sigmoid", "hard_sigmoid_backward",
    "hardsigmoid", "hardsigmoid_backward", "leaky_relu", "leaky_relu_backward", "linear_neuron",
    "linear_neuron_backward", "relu", "relu_backward", "sigmoid", "sigmoid_backward", "softplus",
    "softplus_backward", "tanh", "tanh_backward",
]
