"""Synchronized batch norm: batch statistics over every rank's samples.

Design. The math is functional's sync_batch_norm_with_stats / sync_batch_norm_backward
(ops/norm_sync.py), given this group's collectives: the forward gathers each rank's per-chunk
Welford partials, the backward sums the per-chunk gradient sums over the ranks. Both
collectives run on the device's stream (the next kernel reads their result: nothing to
overlap). The graph and functional modules are imported inside the methods: the graph package
imports this package.
"""
from __future__ import annotations

from typing import Any

from .group import ProcessGroup


class SyncBatchNorm:
    """Batch statistics over every rank's samples (PyTorch's SyncBatchNorm), for the batch norm
    nodes of a graph trained by DataParallel(sync_bn=True). Ranks need equal batch sizes.

    Forward: each rank's per-chunk Welford partials (norm.metal's norm_part kernels) are
    gathered from every rank (all-gather, the device's stream), laid out as more chunks of the
    same channels, and merged by the same finalize kernel: mean and variance of the union, the
    running estimates moved by them (the same on every rank). Backward: the per-chunk sums
    (sum dy, sum dy (x - mean)) are summed over the ranks, and dx's coefficients use M = the
    global count: rank r computes S times its share of the global-batch gradient, as its weight
    gradients' average over the S ranks then expects; the batch norm's own weight and bias
    gradients come from the local sums (averaged like every other weight gradient)."""

    def __init__(self, group: ProcessGroup):
        self.group = group

    def forward(self, node: Any, rc: Any, xs: list, with_state: bool, activation: Any) -> list:
        from .. import functional as F
        from ..graph.nodes.base import _act

        ws = node.weights
        rm, rv, w, b = node._wb(rc)
        kw = _act(activation)
        kw.update(rc.take_out())
        yt, mean, invstd = F.sync_batch_norm_with_stats(
            xs[0], rm, rv, w, b, ws.momentum, ws.eps, world_size=self.group.size,
            all_gather=self.group.engine().all_gather, **kw)
        if rm is not None:
            ws.mark_dirty()
            ws.num_batches_tracked += 1
        rc.release(ws)
        return [yt, mean, invstd] if with_state else [yt]

    def backward(self, node: Any, rc: Any, gouts: list, saved: list, need: Any,
                 activation: Any) -> tuple:
        from .. import functional as F

        x, mean, invstd = saved
        ws = node.weights
        _, _, w, b = node._wb(rc)
        gx, dw, db = F.sync_batch_norm_backward(
            gouts[0], x, mean, invstd, w, b, ws.eps, world_size=self.group.size,
            all_reduce=self.group.engine().sum_in_place, activation=activation,
            grad_out_batch_stride=rc.state.pop(("grad_nstride", node), None))
        return [gx], ([dw, db] if ws.affine else [])
