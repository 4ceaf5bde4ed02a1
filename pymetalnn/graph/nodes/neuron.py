"""Neuron nodes (pymetalnn/ops/neuron.py): one element-wise activation each (MPS's neurons)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ... import functional as F
from ..errors import GraphError
from .base import FilterNode, _auto_name, _floats
from .kinds import kind_class


@dataclass(frozen=True)
class Neuron:
    """A neuron kind's functional ops: forward, backward (from the input) and, where it exists,
    the backward from the output (`<op>_backward_from_output`, which also reads y in a strided
    channel slice: y_batch_stride=); `params` are the keywords the ops take. The kinds that are
    keys of F.ACTIVATIONS are what a fused activation= covers, and their forward takes out=,
    out_batch_stride= (a strided channel slice of a concatenation)."""

    forward: Callable
    backward: Callable
    params: tuple[str, ...] = ()
    from_output: Callable | None = None


NEURONS = {
    "relu": Neuron(F.relu, F.relu_backward, (), F.relu_backward_from_output),
    "leaky_relu": Neuron(F.leaky_relu, F.leaky_relu_backward, ("negative_slope",),
                         F.leaky_relu_backward_from_output),
    "elu": Neuron(F.elu, F.elu_backward, ("alpha",)),
    "sigmoid": Neuron(F.sigmoid, F.sigmoid_backward, (), F.sigmoid_backward_from_output),
    "tanh": Neuron(F.tanh, F.tanh_backward, (), F.tanh_backward_from_output),
    "softplus": Neuron(F.softplus, F.softplus_backward, ("beta", "threshold")),
    "gelu": Neuron(F.gelu, F.gelu_backward, ("approximate",)),
    "hardsigmoid": Neuron(F.hardsigmoid, F.hardsigmoid_backward),
    "hard_sigmoid": Neuron(F.hard_sigmoid, F.hard_sigmoid_backward, ("a", "b")),
    "linear": Neuron(F.linear_neuron, F.linear_neuron_backward, ("a", "b")),
}


class NeuronNode(FilterNode):
    """An element-wise activation (MPS's neuron): kind in NEURONS, with its parameters."""

    prefix = "neuron"
    kind = "relu"

    def __init__(self, source: Any, kind: str | None = None, *, name: str | None = None,
                 register: bool = True, **params: Any):
        kind = kind or type(self).kind
        if kind not in NEURONS:
            raise GraphError(None, f"kind: unknown neuron {kind!r} (choose from "
                                   f"{', '.join(NEURONS)})")
        self.kind = kind
        allowed = NEURONS[kind].params
        bad = set(params) - set(allowed)
        if bad:
            raise GraphError(None, f"neuron {kind!r} takes {', '.join(allowed) or 'no parameters'}"
                                   f", got {', '.join(sorted(bad))}")
        self.params = params
        super().__init__([source], name or (_auto_name(kind) if type(self) is NeuronNode else None),
                         register)

    def infer(self, shapes, dtypes):
        return [(shapes[0], _floats(dtypes))]

    @property
    def from_output(self) -> bool:
        """relu and leaky relu (slope >= 0) take their gradient from the output (the input need
        not be kept)."""
        return self.kind == "relu" or (self.kind == "leaky_relu" and
                                       self.params.get("negative_slope", 0.01) >= 0)

    @property
    def grad_from_output(self) -> bool:
        """Whether the gradient can be computed from the output alone (a backward from the
        output exists; leaky relu also needs a slope >= 0): what a fused node's gradient uses."""
        if self.kind == "leaky_relu" and self.params.get("negative_slope", 0.01) < 0:
            return False
        return NEURONS[self.kind].from_output is not None

    def forward(self, rc, xs, training, with_state):
        return [NEURONS[self.kind].forward(xs[0], **self.params, **rc.take_out())]

    def strided_out(self):
        return self.kind in F.ACTIVATIONS

    def saved(self):
        return [("out", 0)] if self.from_output else [("in", 0)]

    def backward(self, rc, gouts, saved, need):
        ns = rc.state.get(("out_nstride", self))
        ops = NEURONS[self.kind]
        if ns and self.from_output:  # y in a strided channel slice of an eliminated concat
            return [ops.from_output(gouts[0], saved[0], **self.params, y_batch_stride=ns)], []
        return [ops.backward(gouts[0], saved[0], **self.params)], []


def _neuron_class(kind: str, doc: str) -> type:
    return kind_class(NeuronNode, "kind", kind, "Node", doc, prefix=kind)


ReLUNode = _neuron_class("relu", "max(x, 0)")
LeakyReLUNode = _neuron_class("leaky_relu", "x if x > 0 else negative_slope * x")
ELUNode = _neuron_class("elu", "x if x > 0 else alpha (exp(x) - 1)")
SigmoidNode = _neuron_class("sigmoid", "1 / (1 + exp(-x))")
TanhNode = _neuron_class("tanh", "tanh(x)")
SoftplusNode = _neuron_class("softplus", "log(1 + exp(beta x)) / beta")
GELUNode = _neuron_class("gelu", "x Phi(x)")
HardSigmoidNode = _neuron_class("hard_sigmoid", "clamp(a x + b, 0, 1) (MPS's hard sigmoid)")
LinearNeuronNode = _neuron_class("linear", "a x + b")
