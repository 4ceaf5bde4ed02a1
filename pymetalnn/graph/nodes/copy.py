"""Layout nodes (pymetalnn/ops/copy.py): concatenation (which the graph can eliminate), reshape
and flatten (views, no dispatch), images <-> matrices.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable

import numpy as np

from ... import functional as F
from ...tensor import Tensor
from ..errors import GraphError
from .base import FilterNode, _expect_ndim, _floats


class ConcatenationNode(FilterNode):
    """Concatenation along `dim` (feature channels by default). The graph can eliminate it:
    producers then write straight into their slices of the result."""

    prefix = "concat"

    def __init__(self, sources: Sequence[Any], dim: int = 1, *, name: str | None = None,
                 register: bool = True):
        if len(sources) < 1:
            raise GraphError(None, "concatenation needs at least one source")
        self.dim = int(dim)
        super().__init__(list(sources), name, register)

    def infer(self, shapes, dtypes):
        first = shapes[0]
        d = self.dim if self.dim >= 0 else self.dim + len(first)
        if not 0 <= d < len(first):
            raise ValueError(f"dim {self.dim} is outside the sources' {len(first)} dimensions")
        for i, s in enumerate(shapes):
            if len(s) != len(first) or s[:d] != first[:d] or s[d + 1:] != first[d + 1:]:
                raise ValueError(f"source {i} ({self.sources[i].name}) has shape {s}, which does "
                                 f"not match source 0's {first} outside dim {d}")
            if dtypes[i] != dtypes[0]:
                raise ValueError(f"source {i} has dtype {dtypes[i]}, source 0 {dtypes[0]}")
        self.axis = d
        out = list(first)
        out[d] = sum(s[d] for s in shapes)
        return [(tuple(out), dtypes[0])]

    def forward(self, rc, xs, training, with_state):
        rc.state[self] = [x.shape[self.axis] for x in xs]  # the split sizes for the gradient
        return [F.concat(list(xs), self.axis)]

    def strided_grad(self):
        # a concat nested in another's channel slice: its pieces are sub-slices of that
        return self.axis == 1

    def backward(self, rc, gouts, saved, need):
        g = gouts[0]
        sizes = rc.state.get(self) or [s.shape[self.axis] for s in self.sources]
        outer = int(np.prod(g.shape[:self.axis]))
        ns = rc.state.pop(("grad_nstride", self), None)
        strided = rc.g.strided_grads.get(self) \
            if outer > 1 and self.axis == 1 and rc.views and rc.concat_views else None
        if strided or ns:
            return self._strided_backward(rc, g, sizes, need, strided or {}, ns), []
        if outer == 1 and rc.views and rc.concat_views:
            # the pieces are consecutive slabs of g: views, no copy
            inner = int(np.prod(g.shape[self.axis + 1:]))
            out, off = [], 0
            for n, nd in zip(sizes, need):
                nb = n * inner * g.dtype.itemsize
                shape = list(g.shape)
                shape[self.axis] = n
                out.append(Tensor(g.buffer.view(off, nb), tuple(shape), g.dtype) if nd else None)
                off += nb
            return out, []
        parts = F.split(g, sizes, self.axis)
        return [p if nd else None for p, nd in zip(parts, need)], []

    def _strided_backward(self, rc, g: Tensor, sizes: list[int], need: list[bool],
                          strided: dict[int, FilterNode], ns: int | None
                          ) -> list[Tensor | None]:
        """Channel concat at batch > 1: piece k goes to the gradient of strided[k] (a node whose
        backward reads a batch-strided gradient) as a view of g at its channel slice, images
        `pitch` elements apart (C*inner, or ns when g itself is such a slice of an enclosing
        concat's gradient); only the other needed pieces are copied out (one split)."""
        n, inner = g.shape[0], int(np.prod(g.shape[2:]))
        pitch, isz = ns or g.shape[1] * inner, g.dtype.itemsize
        copied = [nd and k not in strided for k, nd in enumerate(need)]
        out = F.split(g, sizes, 1, x_batch_stride=pitch, need=copied) if any(copied) \
            else [None] * len(sizes)
        off = 0
        for k, (c, nd) in enumerate(zip(sizes, need)):
            if nd and k in strided:
                nb = ((n - 1) * pitch + c * inner) * isz
                out[k] = Tensor(g.buffer.view(off * isz, nb), (n, c) + tuple(g.shape[2:]),
                                g.dtype)
                rc.state[("grad_nstride", strided[k])] = pitch
            off += c * inner
        return out


class ReshapeNode(FilterNode):
    """The same memory seen with per-sample shape `shape` (one entry may be -1); no dispatch."""

    prefix = "reshape"

    def __init__(self, source: Any, shape: Sequence[int], *, name: str | None = None,
                 register: bool = True):
        self.target = tuple(int(s) for s in shape)
        super().__init__([source], name, register)

    def infer(self, shapes, dtypes):
        x = shapes[0]
        per = int(np.prod(x[1:]))
        t = list(self.target)
        if t.count(-1) > 1:
            raise ValueError("shape: at most one -1")
        if -1 in t:
            known = int(np.prod([s for s in t if s != -1]))
            if known == 0 or per % known:
                raise ValueError(f"cannot reshape {x[1:]} into {self.target}")
            t[t.index(-1)] = per // known
        if int(np.prod(t)) != per:
            raise ValueError(f"cannot reshape per-sample shape {x[1:]} ({per} elements) into "
                             f"{self.target}")
        self._t = tuple(t)
        return [((x[0], *t), dtypes[0])]

    def forward(self, rc, xs, training, with_state):
        x = xs[0]
        return [x.reshape(x.shape[0], *self._t)]

    def backward(self, rc, gouts, saved, need):
        g = gouts[0]
        return [g.reshape(g.shape[0], *self.sources[0].shape[1:])], []


class FlattenNode(ReshapeNode):
    """(N, ...) -> (N, features); no dispatch."""

    prefix = "flatten"

    def __init__(self, source: Any, *, name: str | None = None, register: bool = True):
        super().__init__(source, (-1,), name=name, register=register)


class _LayoutNode(FilterNode):
    """Images <-> matrices: the same memory seen with the result's per-sample shape (a view, no
    dispatch), or with channels_last a copy by `ops` (the functional op and its backward)."""

    ops: tuple[Callable, Callable]

    def _op_args(self) -> tuple:
        return ()

    def forward(self, rc, xs, training, with_state):
        x = xs[0]
        if not self.channels_last:
            return [x.reshape(x.shape[0], *self.result.shape[1:])]
        return [self.ops[0](x, *self._op_args(), True)]

    def saved(self):
        return [("in", 0)] if self.channels_last else []

    def backward(self, rc, gouts, saved, need):
        g = gouts[0]
        if not self.channels_last:
            return [g.reshape(g.shape[0], *self.sources[0].shape[1:])], []
        return [self.ops[1](g, saved[0], *self._op_args(), True)], []


class ImageToMatrixNode(_LayoutNode):
    """Images (N, C, H, W) as a matrix (N, C*H*W) (a view, no dispatch), or (N, H*W*C) with
    channels_last (a copy)."""

    prefix, ops = "im2mat", (F.image_to_matrix, F.image_to_matrix_backward)

    def __init__(self, source: Any, channels_last: bool = False, *, name: str | None = None,
                 register: bool = True):
        self.channels_last = bool(channels_last)
        super().__init__([source], name, register)

    def infer(self, shapes, dtypes):
        x = shapes[0]
        _expect_ndim(x, 4)
        return [((x[0], int(np.prod(x[1:]))), _floats(dtypes))]


class MatrixToImageNode(_LayoutNode):
    """A matrix (N, C*H*W) as images (N, C, H, W) with chw = (C, H, W) (a view), or from
    channels-last rows (a copy)."""

    prefix, ops = "mat2im", (F.matrix_to_image, F.matrix_to_image_backward)

    def __init__(self, source: Any, chw: Sequence[int], channels_last: bool = False, *,
                 name: str | None = None, register: bool = True):
        self.chw = tuple(int(v) for v in chw)
        self.channels_last = bool(channels_last)
        super().__init__([source], name, register)

    def _op_args(self) -> tuple:
        return (self.chw,)

    def infer(self, shapes, dtypes):
        m = shapes[0]
        _expect_ndim(m, 2)
        if m[1] != int(np.prod(self.chw)):
            raise ValueError(f"source has {m[1]} features, images {self.chw} need "
                             f"{int(np.prod(self.chw))}")
        return [((m[0], *self.chw), _floats(dtypes))]


class PermuteNode(FilterNode):
    """Per-sample dimensions permuted (torch's x.permute with the batch dimension kept first:
    `dims` is a permutation of 0..ndim-1 whose first entry is 0), a copy by F.permute."""

    prefix = "permute"

    def __init__(self, source: Any, dims: Sequence[int], *, name: str | None = None,
                 register: bool = True):
        self.dims = tuple(int(d) for d in dims)
        super().__init__([source], name, register)

    def infer(self, shapes, dtypes):
        x = shapes[0]
        if sorted(self.dims) != list(range(len(x))) or self.dims[0] != 0:
            raise ValueError(f"dims: {self.dims} is not a permutation of 0..{len(x) - 1} keeping "
                             "the batch dimension 0 first")
        return [(tuple(x[d] for d in self.dims), dtypes[0])]

    def forward(self, rc, xs, training, with_state):
        return [F.permute(xs[0], self.dims)]

    def backward(self, rc, gouts, saved, need):
        inv = tuple(int(i) for i in np.argsort(self.dims))
        return [F.permute(gouts[0], inv)], []


class SelectNode(FilterNode):
    """x.select(dim, index) (e.g. the last time step of a batch-first sequence, out[:, -1]) or,
    with `length`, the slice index:index+length along dim (kept); any dim but the source's batch
    dimension `batch_dim` (0; 1 for a recurrent node's final state (L*D, N, H), whose h_n[-1]
    is SelectNode(h_n, 0, -1, batch_dim=1), batch first again). Forward and gradient by F.split
    / F.split_backward (zeros for the other pieces)."""

    prefix = "select"

    def __init__(self, source: Any, dim: int, index: int, length: int | None = None, *,
                 batch_dim: int = 0, name: str | None = None, register: bool = True):
        self.dim, self.index, self.length = int(dim), int(index), length
        self.batch_dim = int(batch_dim)
        super().__init__([source], name, register)

    def infer(self, shapes, dtypes):
        x = shapes[0]
        d = self.dim % len(x)
        if not 0 <= self.batch_dim < len(x):
            raise ValueError(f"batch_dim: {self.batch_dim} is outside the source's {len(x)} dimensions")
        if d == self.batch_dim:
            raise ValueError("dim: the batch dimension cannot be selected from")
        if self.length is None and d < self.batch_dim and self.batch_dim > 1:
            raise ValueError("dim: selecting before the batch dimension leaves it at "
                             f"{self.batch_dim - 1}, not first")
        n = x[d]
        i = self.index % n if -n <= self.index < n else None
        if i is None:
            raise ValueError(f"index: {self.index} is out of range for size {n}")
        ln = 1 if self.length is None else int(self.length)
        if ln < 1 or i + ln > n:
            raise ValueError(f"length: {ln} from {i} runs past size {n}")
        self._d, self._sections = d, [s for s in (i, ln, n - i - ln) if s]
        self._piece = 1 if i else 0
        shape = list(x)
        if self.length is None:
            del shape[d]
        else:
            shape[d] = ln
        return [(tuple(shape), dtypes[0])]

    def forward(self, rc, xs, training, with_state):
        x = xs[0]
        # only the selected piece copied, into an allocation of its own (split's one-copy path for
        # dim 0 would make the result a view of a larger block, which memory planning cannot place)
        need = [k == self._piece for k in range(len(self._sections))]
        piece = F.split(x, self._sections, self._d, need=need)[self._piece]
        shape = list(x.shape)
        if self.length is None:
            del shape[self._d]
        return [piece.reshape(tuple(shape)) if self.length is None else piece]

    def saved(self):
        return [("in", 0)]

    def backward(self, rc, gouts, saved, need):
        x = saved[0]
        g = gouts[0]
        grads = []
        for k, s in enumerate(self._sections):
            shape = list(x.shape)
            shape[self._d] = s
            grads.append(g.reshape(tuple(shape)) if k == self._piece
                         else _zeros(tuple(shape), g.dtype, g.device))
        return [F.split_backward(grads, x, self._sections, self._d)], []


_ZEROS: dict[tuple, Tensor] = {}


def _zeros(shape: tuple[int, ...], dtype: Any, dev: Any) -> Tensor:
    """A read-only zero tensor uploaded from the host (a planned graph buffer is not zero-filled),
    cached per shape, dtype and device."""
    key = (shape, np.dtype(dtype).str, id(dev))
    t = _ZEROS.get(key)
    if t is None or t.device is not dev:
        from ...tensor import tensor

        t = _ZEROS[key] = tensor(np.zeros(shape, dtype), dev)
    return t
