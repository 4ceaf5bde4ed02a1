"""Synchronized batch norm: batch statistics over every rank's samples.

Design. The forward gathers each rank's per-chunk Welford partials and merges them with the
same finalize kernel the one-process batch norm uses, so the statistics (and the running
estimates) are those of the global batch, identical on every rank; the backward sums the
per-chunk gradient sums over the ranks for dx's coefficients. Both collectives run on the
device's stream (the next kernel reads their result: nothing to overlap). The graph and op
modules are imported inside the methods: the graph package imports this package.
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
        from ..graph.nodes.base import _act
        from ..ops import norm as N
        from ..ops.copy import _block
        from ..params import NormParams
        from ..tensor import float32

        ws = node.weights
        rm, rv, w, b = node._wb(rc)
        kw = _act(activation)
        kw.update(rc.take_out())
        dev, x, rm, rv, w, b, _, momentum, eps = N._bn_validate(
            xs[0], rm, rv, w, b, True, ws.momentum, ws.eps)
        out = kw.get("out")
        y, ns = N.strided_out(out, kw.get("out_batch_stride"), x.shape, x.dtype, dev)
        p = N._bn_params(x, eps, momentum, True, w is not None, b is not None, rm is not None)
        p.act, p.act_alpha = N.activation_code(kw.get("activation"))
        p.out_nstride = ns
        size = self.group.size
        part = N._partials(dev, p, x, None, None)
        count = part.shape[0]
        gathered = N.empty((size * count, 4), float32, dev)
        self.group.engine().all_gather(part, gathered)
        q = NormParams.from_buffer_copy(p)
        if p.cols:  # chunk-major: the ranks' partials are more chunks as they lie
            q.col_chunks = p.col_chunks * size
            q.parts = q.col_chunks * p.HW
            allp = gathered
        else:  # channel-major: each channel's chunks from every rank side by side
            allp = N.empty((size * count, 4), float32, dev)
            k4 = p.chunks * 4
            for r in range(size):
                _block(gathered, allp, p.rows, k4, k4, size * k4, r * count * 4, r * k4)
            q.chunks = p.chunks * size
            q.parts = q.chunks
        c = x.shape[1]
        d = N.dummy(dev)
        mean, invstd = N.empty((c,), float32, dev), N.empty((c,), float32, dev)
        coef = N.empty((c, 4), float32, dev)
        N.kernel(dev, N.SOURCE, "batch_norm_finalize_fwd_float")(
            min(c, N.MAX_GROUPS) * N.TG, allp.buffer, rm.buffer if rm is not None else d,
            rv.buffer if rv is not None else d, mean.buffer, invstd.buffer, q,
            w.buffer if w is not None else d, b.buffer if b is not None else d, coef.buffer)
        yt = N._apply(dev, p, x, None, coef, y if out is not None else None)
        if rm is not None:
            ws.mark_dirty()
            ws.num_batches_tracked += 1
        rc.release(ws)
        return [yt, mean, invstd] if with_state else [yt]

    def backward(self, node: Any, rc: Any, gouts: list, saved: list, need: Any,
                 activation: Any) -> tuple:
        from ..graph.nodes.base import _act
        from ..ops import norm as N
        from ..params import NormParams
        from ..tensor import float32

        x, mean, invstd = saved
        ws = node.weights
        rm, rv, w, b = node._wb(rc)
        kw = _act(activation)
        ns = rc.state.pop(("grad_nstride", node), None)
        dev, x, rm, rv, w, b, _, momentum, eps = N._bn_validate(
            x, rm, rv, w, b, True, ws.momentum, ws.eps)
        g = N._grad_out(gouts[0], x, dev)
        p = N._bn_params(x, eps, momentum, True, w is not None, b is not None, False)
        p.act, p.act_alpha = N.activation_code(kw.get("activation"))
        p.dy_nstride = N._grad_stride(g, ns)
        part = N._partials(dev, p, x, g, mean, (invstd, w, b))
        c = x.shape[1]
        d = N.dummy(dev)
        dw = N.empty((c,), float32, dev) if w is not None else None
        db = N.empty((c,), float32, dev) if b is not None else None
        ncoef = 2 * c if p.act else c
        grad = N.kernel(dev, N.SOURCE, "batch_norm_grad_bwd_float")
        groups = min(c, N.MAX_GROUPS) * N.TG
        wb = (w.buffer if w is not None else d, b.buffer if b is not None else d)
        # this rank's sums: its weight and bias gradients
        grad(groups, part.buffer, *wb, mean.buffer, invstd.buffer,
             dw.buffer if dw is not None else d, db.buffer if db is not None else d,
             N.empty((ncoef, 4), float32, dev).buffer, p)
        # every rank's sums, M = the global count: dx's coefficients
        self.group.engine().sum_in_place(part)
        q = NormParams.from_buffer_copy(p)
        q.row_len = p.row_len * self.group.size
        coef = N.empty((ncoef, 4), float32, dev)
        scratch = N.empty((c,), float32, dev)
        grad(groups, part.buffer, *wb, mean.buffer, invstd.buffer, scratch.buffer, scratch.buffer,
             coef.buffer, q)
        gx = N._apply(dev, p, g, x, coef)
        return [gx], ([dw, db] if ws.affine else [])
