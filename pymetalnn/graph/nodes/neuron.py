"""Neuron nodes (pymetalnn/ops/neuron.py): one element-wise activation each (MPS's neurons)."""
from __future__ import annotations

from typing import Any

from ..errors import GraphError
from .base import FilterNode, _auto_name, _floats, op

NEURONS = {  # kind -> (op name, parameter names)
    "relu": ("relu", ()), "leaky_relu": ("leaky_relu", ("negative_slope",)),
    "elu": ("elu", ("alpha",)), "sigmoid": ("sigmoid", ()), "tanh": ("tanh", ()),
    "softplus": ("softplus", ("beta", "threshold")), "gelu": ("gelu", ("approximate",)),
    "hardsigmoid": ("hardsigmoid", ()), "hard_sigmoid": ("hard_sigmoid", ("a", "b")),
    "linear": ("linear_neuron", ("a", "b")),
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
        allowed = NEURONS[kind][1]
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

    def forward(self, rc, xs, training, with_state):
        return [op(NEURONS[self.kind][0], self)(xs[0], **self.params, **rc.take_out())]

    def saved(self):
        return [("out", 0)] if self.from_output else [("in", 0)]

    def backward(self, rc, gouts, saved, need):
        ns = rc.state.get(("out_nstride", self))
        if ns and self.from_output:  # y in a strided channel slice of an eliminated concat
            f = op(NEURONS[self.kind][0] + "_backward_from_output", self)
            return [f(gouts[0], saved[0], **self.params, y_batch_stride=ns)], []
        return [op(NEURONS[self.kind][0] + "_backward", self)(gouts[0], saved[0], **self.params)], []


def _neuron_class(kind: str, doc: str) -> type:
    def __init__(self, source, *, name=None, register=True, **params):
        NeuronNode.__init__(self, source, kind, name=name, register=register, **params)

    cls_name = "".join(p.capitalize() for p in kind.split("_"))
    return type(f"{cls_name}Node", (NeuronNode,), {"__init__": __init__, "kind": kind,
                                                    "prefix": kind, "__doc__": doc})


ReLUNode = _neuron_class("relu", "max(x, 0)")
LeakyReLUNode = _neuron_class("leaky_relu", "x if x > 0 else negative_slope * x")
ELUNode = _neuron_class("elu", "x if x > 0 else alpha (exp(x) - 1)")
SigmoidNode = _neuron_class("sigmoid", "1 / (1 + exp(-x))")
TanhNode = _neuron_class("tanh", "tanh(x)")
SoftplusNode = _neuron_class("softplus", "log(1 + exp(beta x)) / beta")
GELUNode = _neuron_class("gelu", "x Phi(x)")
HardSigmoidNode = _neuron_class("hard_sigmoid", "clamp(a x + b, 0, 1) (MPS's hard sigmoid)")
LinearNeuronNode = _neuron_class("linear", "a x + b")
