"""Errors of the graph package."""
from __future__ import annotations


class GraphError(ValueError):
    """An inconsistent graph (shape mismatch, cycle, a node not reaching the loss, labels of the
    wrong shape, a missing optimizer): raised when the graph is built, naming the node."""

    def __init__(self, node: object, message: str):
        name = getattr(node, "name", None) if node is not None else None
        super().__init__(f"node '{name}': {message}" if name else message)
        self.node = node
