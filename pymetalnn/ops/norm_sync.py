"""Synchronized batch norm (norm.metal's batch norm kernels): training-mode batch norm whose
statistics are those of the global batch, the union of every rank's samples (PyTorch's
SyncBatchNorm). The collectives are the caller's (pymetalnn.distributed passes its engine's),
so this module knows nothing of processes: `all_gather(src, dst)` writes every rank's `src`
into `dst`, rank after rank; `all_reduce(t)` sums `t` over the ranks in place. Ranks need
equal input shapes.

Design. Forward: each rank's per-chunk Welford partials (count, mean, M2) are gathered and
laid out as more chunks of the same channels, then merged by the one-process batch norm's
finalize kernel: mean and biased variance of the union normalize, the running estimates move
toward the union's mean and unbiased variance (the same on every rank). Backward: the
per-chunk sums (sum g, sum g (x - mean)) are summed over the ranks, and dx's coefficients use
M = the global count:
  dx = weight invstd (g - sum_all(g) / M - xhat sum_all(g xhat) / M),  M = S N spatial
so rank r holds S times its share of the global-batch gradient (what averaging the weight
gradients over the S ranks then expects); dweight = sum g xhat and dbias = sum g come from the
rank's own sums.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..params import NormParams
from ..tensor import Tensor, TensorLike, float32
from ._common import MAX_GROUPS, dummy, empty, kernel, strided_out
from .copy import _block
from .neuron import activation_code
from .norm import SOURCE, _apply, _bn_params, _bn_validate, _grad_out, _grad_stride, _partials
from .softmax import TG


def _world(world_size: Any) -> int:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size: expected an int >= 1, got {world_size!r}")
    return world_size


def sync_batch_norm_with_stats(input: TensorLike, running_mean: TensorLike | None,
                               running_var: TensorLike | None, weight: TensorLike | None = None,
                               bias: TensorLike | None = None, momentum: float = 0.1,
                               eps: float = 1e-5, *, world_size: int,
                               all_gather: Callable[[Tensor, Tensor], None],
                               activation: Any = None, out: Tensor | None = None,
                               out_batch_stride: int | None = None
                               ) -> tuple[Tensor, Tensor, Tensor]:
    """batch_norm_with_stats(training=True) over the global batch of world_size ranks:
    y = act((x - mean) invstd weight + bias) with mean, invstd = 1 / sqrt(var + eps) of the
    union of the ranks' inputs; running_mean / running_var (if given) move by momentum toward
    the union's mean and unbiased variance. Returns (y, mean, invstd), mean and invstd equal on
    every rank. activation, out, out_batch_stride: as batch_norm's."""
    size = _world(world_size)
    act = activation_code(activation)
    dev, x, rm, rv, w, b, _, momentum, eps = _bn_validate(
        input, running_mean, running_var, weight, bias, True, momentum, eps)
    if x.size == 0:
        raise ValueError(f"input: synchronized batch norm of an empty input (shape {x.shape})")
    y, ns = strided_out(out, out_batch_stride, x.shape, x.dtype, dev)
    p = _bn_params(x, eps, momentum, True, w is not None, b is not None, rm is not None)
    p.act, p.act_alpha = act
    p.out_nstride = ns
    part = _partials(dev, p, x, None, None)
    count = part.shape[0]
    gathered = empty((size * count, 4), float32, dev)
    all_gather(part, gathered)
    q = NormParams.from_buffer_copy(p)
    if p.cols:  # chunk-major: the ranks' partials are more chunks as they lie
        q.col_chunks = p.col_chunks * size
        q.parts = q.col_chunks * p.HW
        allp = gathered
    else:  # channel-major: each channel's chunks from every rank side by side
        allp = empty((size * count, 4), float32, dev)
        k4 = p.chunks * 4
        for r in range(size):
            _block(gathered, allp, p.rows, k4, k4, size * k4, r * count * 4, r * k4)
        q.chunks = p.chunks * size
        q.parts = q.chunks
    c = x.shape[1]
    d = dummy(dev)
    mean, invstd = empty((c,), float32, dev), empty((c,), float32, dev)
    coef = empty((c, 4), float32, dev)
    kernel(dev, SOURCE, "batch_norm_finalize_fwd_float")(
        min(c, MAX_GROUPS) * TG, allp.buffer, rm.buffer if rm is not None else d,
        rv.buffer if rv is not None else d, mean.buffer, invstd.buffer, q,
        w.buffer if w is not None else d, b.buffer if b is not None else d, coef.buffer)
    return _apply(dev, p, x, None, coef, y), mean, invstd


def sync_batch_norm_backward(grad_out: TensorLike, input: TensorLike, save_mean: Tensor,
                             save_invstd: Tensor, weight: TensorLike | None = None,
                             bias: TensorLike | None = None, eps: float = 1e-5, *,
                             world_size: int, all_reduce: Callable[[Tensor], None],
                             activation: Any = None, grad_out_batch_stride: int | None = None
                             ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(grad_input, grad_weight, grad_bias) of sync_batch_norm_with_stats, given its save_mean
    and save_invstd (the global statistics). grad_input is world_size times this rank's share
    of the global-batch gradient (module note); grad_weight / grad_bias are this rank's own
    (None when weight / bias are). activation, grad_out_batch_stride: as batch_norm_backward's."""
    size = _world(world_size)
    act = activation_code(activation)
    dev, x, _, _, w, b, _, momentum, eps = _bn_validate(input, None, None, weight, bias, True,
                                                        0.1, eps)
    g = _grad_out(grad_out, x, dev)
    if x.size == 0:
        raise ValueError(f"input: synchronized batch norm of an empty input (shape {x.shape})")
    c = x.shape[1]
    for t, name in ((save_mean, "save_mean"), (save_invstd, "save_invstd")):
        if not isinstance(t, Tensor) or t.dtype != float32 or t.shape != (c,):
            raise ValueError(f"{name}: expected a float32 Tensor of shape ({c},), got {t!r}")
    p = _bn_params(x, eps, momentum, True, w is not None, b is not None, False)
    p.act, p.act_alpha = act
    p.dy_nstride = _grad_stride(g, grad_out_batch_stride)
    part = _partials(dev, p, x, g, save_mean, (save_invstd, w, b))
    d = dummy(dev)
    dw = empty((c,), float32, dev) if w is not None else None
    db = empty((c,), float32, dev) if b is not None else None
    ncoef = 2 * c if p.act else c
    grad = kernel(dev, SOURCE, "batch_norm_grad_bwd_float")
    groups = min(c, MAX_GROUPS) * TG
    wb = (w.buffer if w is not None else d, b.buffer if b is not None else d)
    stats = (save_mean.buffer, save_invstd.buffer)
    # this rank's sums: its weight and bias gradients
    grad(groups, part.buffer, *wb, *stats, dw.buffer if dw is not None else d,
         db.buffer if db is not None else d, empty((ncoef, 4), float32, dev).buffer, p)
    # every rank's sums, M = the global count: dx's coefficients
    all_reduce(part)
    q = NormParams.from_buffer_copy(p)
    q.row_len = p.row_len * size
    coef = empty((ncoef, 4), float32, dev)
    scratch = empty((c,), float32, dev)
    grad(groups, part.buffer, *wb, *stats, scratch.buffer, scratch.buffer, coef.buffer, q)
    return _apply(dev, p, g, x, coef), dw, db
