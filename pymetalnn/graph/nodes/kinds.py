"""Classes fixed to one kind of a family node (NeuronNode -> ReLUNode, LossNode -> HuberLossNode):
the family's constructor less its kind argument, the kind a class attribute."""
from __future__ import annotations

from typing import Any


def kind_class(base: type, attr: str, kind: str, suffix: str, doc: str, **extra: Any) -> type:
    """A subclass of `base` with `attr` = kind: base(source, None, **kw) reads it from the class
    (`kind or type(self).<attr>`); the name is kind in CamelCase + suffix ("leaky_relu", "Node" ->
    LeakyReluNode). A kind given again as a keyword is refused (base's own TypeError)."""

    def __init__(self: Any, source: Any, **kw: Any) -> None:
        base.__init__(self, source, None, **kw)

    name = "".join(p.capitalize() for p in kind.split("_")) + suffix
    return type(name, (base,), {"__init__": __init__, attr: kind, "__doc__": doc,
                                "__module__": base.__module__, **extra})
