"""Padding policies of convolution, transposed convolution and pooling nodes, as MPS's
MPSNNPaddingMethod: "symmetric" (dilation*(k-1)//2 on every side: torch's explicit padding=k//2, the
convolution default; refused for an even kernel extent, which torch code pads either way), "valid"
(no padding), "same" (output = ceil(input / stride), the odd extra row/column at the bottom/right,
as MPS and TensorFlow), "full" (every window that touches the input: padding dilation*(k-1) on each
side), an int / pair / (top, bottom, left, right), or a custom policy: any object with `pads(node,
in_hw, kernel, stride, dilation) -> (top, bottom, left, right)` (subclass `Padding`), or a plain
callable with the same arguments.

Why the convolution default is "symmetric" and not MPS's "same": both agree for odd kernels at
stride 1, but at stride > 1 "same" pads only what ceil(input / stride) needs, at the bottom/right
(a 3x3 stride-2 convolution of 32 rows pads (0, 1)), where a model written for PyTorch pads k//2
on both sides ((1, 1)): same output size, other numbers. A model ported from torch without its
paddings spelled out then still computes torch's numbers; "same" stays available by name.
"""
from __future__ import annotations

from typing import Any

Pads = tuple[int, int, int, int]


class Padding:
    """A padding policy. Subclass and override `pads` for a custom one."""

    name = "custom"

    def pads(self, node: Any, in_hw: tuple[int, int], kernel: tuple[int, int],
             stride: tuple[int, int], dilation: tuple[int, int]) -> Pads:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"Padding({self.name})"


class _Valid(Padding):
    name = "valid"

    def pads(self, node, in_hw, kernel, stride, dilation):
        return (0, 0, 0, 0)


class _Same(Padding):
    name = "same"

    def pads(self, node, in_hw, kernel, stride, dilation):
        out = []
        for n, k, s, d in zip(in_hw, kernel, stride, dilation):
            total = max((-(-n // s) - 1) * s + d * (k - 1) + 1 - n, 0)
            out += [total // 2, total - total // 2]
        return tuple(out)  # type: ignore[return-value]


class _Symmetric(Padding):
    name = "symmetric"

    def pads(self, node, in_hw, kernel, stride, dilation):
        for k, d in zip(kernel, dilation):
            if d * (k - 1) % 2:
                # torch code pads such kernels either way (k//2 or (k-1)//2): no default is safe
                raise ValueError(f"padding: the kernel {tuple(kernel)} (dilation {tuple(dilation)}) "
                                 "spans an even number of pixels, which no symmetric padding "
                                 "centres; pass padding explicitly (ints, 'same', 'valid')")
        ph, pw = (d * (k - 1) // 2 for k, d in zip(kernel, dilation))
        return (ph, ph, pw, pw)


class _Full(Padding):
    name = "full"

    def pads(self, node, in_hw, kernel, stride, dilation):
        ph, pw = (d * (k - 1) for k, d in zip(kernel, dilation))
        return (ph, ph, pw, pw)


class _Explicit(Padding):
    def __init__(self, pads: Pads):
        self._p = pads
        self.name = str(pads)

    def pads(self, node, in_hw, kernel, stride, dilation):
        return self._p


class _Callable(Padding):
    def __init__(self, fn: Any):
        self._fn = fn
        self.name = getattr(fn, "__name__", "custom")

    def pads(self, node, in_hw, kernel, stride, dilation):
        return tuple(int(v) for v in self._fn(node, in_hw, kernel, stride, dilation))  # type: ignore


VALID, SAME, FULL, SYMMETRIC = _Valid(), _Same(), _Full(), _Symmetric()


def policy(p: Any) -> Padding:
    """A Padding from a name, ints, a Padding or a callable (raises ValueError otherwise)."""
    if isinstance(p, Padding):
        return p
    if isinstance(p, str):
        try:
            return {"valid": VALID, "same": SAME, "full": FULL, "symmetric": SYMMETRIC}[p.lower()]
        except KeyError:
            raise ValueError(f"padding: expected 'symmetric', 'valid', 'same', 'full', ints or a "
                             f"policy, got {p!r}") from None
    if isinstance(p, bool):
        raise ValueError(f"padding: got {p!r}")
    if isinstance(p, int):
        return _Explicit((p, p, p, p))
    if callable(p):
        return _Callable(p)
    vals = tuple(int(v) for v in p)
    if len(vals) == 2:
        return _Explicit((vals[0], vals[0], vals[1], vals[1]))
    if len(vals) == 4:
        return _Explicit(vals)  # type: ignore[arg-type]
    raise ValueError(f"padding: expected an int, a pair or (top, bottom, left, right), got {p!r}")
