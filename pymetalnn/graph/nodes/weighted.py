"""Calling an op with a node's data-source tensors acquired (the nodes whose weights come from a
DataSource's tensors() dict: embedding, the normalizations)."""
from __future__ import annotations

from typing import Any, Callable


def with_weights(rc: Any, ds: Any, op: Callable[[dict], Any], math: bool = False) -> Any:
    """op(t) with t = ds's tensors acquired for the call (math: rc.math_weights, float16 copies
    of the trainable tensors in a mixed-precision graph), released after it (the graph purges
    released weights in low-memory mode at the end of the step)."""
    t = rc.math_weights(ds) if math else rc.acquire_dict(ds)
    out = op(t)
    rc.release(ds)
    return out
