"""What the graph does by itself, each behind a switch of `optimize=` and logged to `graph.log`:

fuse        graph rewrites that replace a chain of nodes by one node calling fewer kernels:
            softmax + categorical cross-entropy -> softmax cross-entropy on the logits (the
            softmax forward and gradient disappear); convolution / fully connected / batch norm
            / element-wise arithmetic (a residual add) + neuron -> one call with `activation=`
            (the activation in the op's store epilogue: one dispatch instead of two) for the
            activations the ops fuse (relu, leaky relu, sigmoid, tanh:
            pymetalnn.functional.ACTIVATIONS); the gradient is taken from the fused
            output (`<neuron>_backward_from_output`), or for batch norm inside
            batch_norm_backward(..., activation=) (act' recomputed from the bn input: no extra
            kernel, the output not kept), so training fuses them too (leaky relu needs a slope
            >= 0). Logged as not fused otherwise. Biases are always part of the convolution /
            linear call.
concat      concatenation elimination: producers write straight into their slices of the
            concatenated result (needs the memory planner). Contiguous slices (the concat axis's
            outer size is 1: batch 1 or a batch-axis concat): the producers' results are views
            of the result and the gradient's split becomes views of the incoming gradient (no
            copy). Channel slices at batch > 1: the producers' ops get out= (a view at the
            slice) and out_batch_stride= (conv2d, max/avg pooling, relu / leaky relu / sigmoid /
            tanh, batch norm, fused conv / batch norm + neuron, an eliminated nested concat;
            see FilterNode.strided_out), their own gradients read the result with y_batch_stride=. The
            gradient's pieces reach gradients that read a strided incoming gradient (batch
            norm: grad_out_batch_stride=) as views (Graph._strided_grads); the others are
            copied by one split launch.
dead_nodes  nodes whose results nothing uses are dropped; gradients nothing reads are not
            computed (e.g. the first convolution's input gradient); dropout is an identity view
            at inference.
memory      the memory planner (see memory.py).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .. import functional as F
from ..tensor import Tensor
from . import memory as M
from .nodes import (
    NEURONS,
    AdditionNode,
    BatchNormalizationNode,
    ConcatenationNode,
    ConvolutionNode,
    DivisionNode,
    FilterNode,
    FullyConnectedNode,
    LossNode,
    MultiplicationNode,
    NeuronNode,
    SoftMaxNode,
    SubtractionNode,
    Value,
)

STRATEGY: str | None = None  # force "arena" or "registers" (tests); None: arena where views exist
# base node -> its op (named in the log): the ops that take activation= (a fused neuron)
FUSABLE_NEURON = {ConvolutionNode: "conv2d", FullyConnectedNode: "linear",
                  BatchNormalizationNode: "batch_norm_with_stats", AdditionNode: "add",
                  SubtractionNode: "sub", MultiplicationNode: "mul", DivisionNode: "div"}


class FusedNeuronNode(FilterNode):
    """base node + neuron as one call of the base op with activation=(kind, params). The
    gradient: a base whose backward takes the activation itself (`activation_in_backward`, batch
    norm: act' applied inside batch_norm_backward's kernels, recomputed from the base's input)
    gets it, and the fused output is not kept for the gradient; otherwise the neuron's gradient
    from the output (`<neuron>_backward_from_output`, one element-wise pass) then the base's."""

    prefix = "fused"

    def __init__(self, base: FilterNode, neuron: NeuronNode, sources: list[Value]):
        self.base, self.neuron = base, neuron
        self.weights = base.weights
        super().__init__(sources, f"{base.name}+{neuron.name}", register=False)

    def infer(self, shapes, dtypes):
        return [(self.neuron.result.shape, self.neuron.result.dtype)]

    def num_states(self):
        return self.base.num_states()

    def forward(self, rc, xs, training, with_state):
        return self.base.forward(rc, xs, training, with_state,
                                 activation=(self.neuron.kind, dict(self.neuron.params)))

    @property
    def _act_in_base(self) -> bool:
        return self.base.activation_in_backward(self.neuron)

    def strided_out(self):
        return self.base.strided_out()

    def strided_grad(self):
        return self._act_in_base and self.base.strided_grad()

    def saved(self):
        # what the gradient reads decides the operands' lifetimes (memory planner)
        return self.base.saved() + ([] if self._act_in_base else [("out", 0)])

    def backward(self, rc, gouts, saved, need):
        n = self.neuron
        if self._act_in_base:
            ns = rc.state.pop(("grad_nstride", self), None)
            if ns:  # the base reads the incoming gradient
                rc.state[("grad_nstride", self.base)] = ns
            return self.base.backward(rc, gouts, saved, need,
                                      activation=(n.kind, dict(n.params)))
        y = saved[-1]
        # y in a channel slice of an eliminated concatenation (batch > 1): images that far apart
        ns = rc.state.get(("out_nstride", self))
        kw = {"y_batch_stride": ns} if ns else {}
        gy = NEURONS[n.kind].from_output(gouts[0], y, **n.params, **kw)
        return self.base.backward(rc, [gy], saved[:-1], need)


def rewrite_forward(g: Any) -> list[FilterNode]:
    """The forward order after the fusion passes (g.subst maps replaced results)."""
    order: list[FilterNode] = list(g.forward_order)
    if not g.options["fuse"]:
        return order
    outs = {g.resolve(v) for v in g.outputs}

    def consumers(v: Value) -> list[FilterNode]:
        return [n for n in order if any(g.resolve(s) is v for s in n.sources if s is not None)]

    # softmax + categorical cross-entropy -> cross-entropy on logits
    for loss in [n for n in order if isinstance(n, LossNode)]:
        if loss.loss != "categorical_cross_entropy":
            continue
        src = g.resolve(loss.sources[0])
        sm = src.producer
        if not isinstance(sm, SoftMaxNode) or sm.log or sm.dim != 1 or src in outs \
                or consumers(src) != [loss]:
            continue
        fused = LossNode(g.resolve(sm.sources[0]), "cross_entropy", labels=loss.labels,
                         reduction=loss.reduction, name=f"{sm.name}+{loss.name}", register=False,
                         **loss.options)
        g.subst[loss.result] = fused.result
        order = [fused if n is loss else n for n in order if n is not sm]
        g.note(f"fuse: {sm.name} + {loss.name} -> {fused.name} (softmax cross-entropy on the "
               "logits: the softmax forward and gradient kernels disappear)")
    # base op + neuron -> one call with activation=
    for n in list(order):
        base_cls = next((c for c in FUSABLE_NEURON if type(n) is c), None)
        if base_cls is None:
            continue
        cs = consumers(n.result)
        if len(cs) != 1 or not isinstance(cs[0], NeuronNode) or n.result in outs:
            continue
        neuron = cs[0]
        opname = FUSABLE_NEURON[base_cls]
        if neuron.kind not in F.ACTIVATIONS:
            g.note_once(f"fuse: {n.name} + {neuron.name} not fused: {opname}(..., activation=) "
                        f"does not cover {neuron.kind} (only {', '.join(F.ACTIVATIONS)})")
            continue
        if g.training and not neuron.grad_from_output:
            g.note_once(f"fuse: {n.name} + {neuron.name} not fused: the {neuron.kind} gradient needs "
                    "the pre-activation")
            continue
        fused = FusedNeuronNode(n, neuron, [g.resolve(s) for s in n.sources])
        g.subst[neuron.result] = fused.result
        order = [fused if m is n else m for m in order if m is not neuron]
        g.note(f"fuse: {n.name} + {neuron.name} -> {fused.name} ({opname} with "
               f"activation={neuron.kind!r}: one dispatch)")
    return order


# ---- memory planning ----------------------------------------------------------------------------

def plan_memory(g: Any, prog: Any, calib: list[tuple[list, list]]) -> None:
    """Build prog's plan from the calibration run (allocation requests and produced tensors of
    every step)."""
    dev = g.device
    steps = g.steps
    prog.calibrated = True
    buf_root: dict[int, Value] = {}  # id of an allocated Buffer -> the value it became
    roots: dict[Value, tuple[int, int, int]] = {}  # value -> (step, request index, nbytes)
    alias: dict[Value, Value] = {}
    tensors: dict[Value, Tensor] = {}
    for i, (allocs, produced) in enumerate(calib):
        index = {id(b): (j, nb) for j, (nb, b) in enumerate(allocs)}
        for v, t in produced:
            if not isinstance(t, (Tensor, M.GhostTensor)):
                continue
            tensors[v] = t
            bid = id(t.buffer.base)
            if bid in index and bid not in buf_root:
                j, nb = index[bid]
                roots[v] = (i, j, nb)
                buf_root[bid] = v
                alias[v] = v
            elif bid in buf_root:
                alias[v] = buf_root[bid]
    keep = {g.resolve(v) for v in g.outputs}
    excluded = {alias[v] for v in keep if v in alias}
    end: dict[Value, int] = {r: roots[r][0] for r in roots}
    for v, r in alias.items():
        if r in end:
            end[r] = max(end[r], g.last_use.get(v, roots[r][0]))
    # per step: which requests (n bytes, k-th of that size) became values
    expect_idx: dict[int, list[tuple[tuple[int, int], Value]]] = {}
    ords: dict[int, list[tuple[int, int]]] = {}
    for r, (i, j, _nb) in roots.items():
        if i not in ords:
            ords[i] = M.ordinals(calib[i][0])
        expect_idx.setdefault(i, []).append((ords[i][j], r))
    routable = {r for lst in expect_idx.values() for _, r in lst if r not in excluded}
    # blocks
    blocks: dict[Value, M.Block] = {r: M.Block(r, M.align(roots[r][2]), roots[r][0], end[r])
                                    for r in routable}
    children: set[Value] = set()
    # a child value -> (the value whose block holds it, byte offset there): offsets of nested
    # eliminated concatenations (Inception-C's branch concats inside the block's) resolve
    # through it
    placed: dict[Value, tuple[Value, int]] = {}
    eliminated: list[str] = []
    strided_pending: dict[int, tuple] = {}
    strided_cats: set[int] = set()  # concat steps eliminated with strided slices
    dropped = 0  # bytes of producers' results that became strided slices
    views = dev.supports_views
    if STRATEGY is not None:
        views = views and STRATEGY == "arena"

    def absorb(out: Value, v: Value, rel: int) -> M.Block:
        """v's block becomes the piece at byte `rel` of out's: never allocated on its own, live
        as long as either."""
        parent, b = blocks[out], blocks[v]
        parent.start = min(parent.start, b.start)
        parent.end = max(parent.end, b.end)
        children.add(v)
        placed[v] = (out, rel)
        return b

    concats: list[tuple[int, Any]] = []
    if g.options["concat"]:
        if views:
            concats = [(i, st) for i, st in enumerate(steps)
                       if st.kind == "forward" and isinstance(st.node, ConcatenationNode)]
        else:
            g.note_once("concat: not eliminated (needs buffer views, which this backend lacks)")
    for i, st in concats:
        out = st.outs[0]
        why = _concat_ok(st, tensors, alias, routable, children, roots)
        if why.startswith(STRIDED) or why.endswith(MISALIGNED):
            # batch > 1: the producers write strided channel slices (out=, a batch stride);
            # batch 1 with a slice off the views' 16-byte alignment: the same out= path
            # (the ops take out= at any element offset; the stride is then moot)
            why2, slices = _concat_strided_ok(g, i, st, tensors, alias, routable, children,
                                              roots, expect_idx, strided_cats)
            if not why2:
                for j, v, rel, ns, key in slices:
                    dropped += absorb(out, v, rel).size
                    del blocks[v]  # a slice of the result
                    if j in strided_cats:
                        # a nested eliminated concat: its producers' slices move into this
                        # result, with this result's batch stride
                        for jj, pend in list(strided_pending.items()):
                            if pend[0] is v:
                                strided_pending[jj] = (out, rel + pend[1], ns) + pend[3:]
                        continue
                    strided_pending[j] = (out, rel, ns, tensors[v].shape, tensors[v].dtype, key)
                eliminated.append(st.name)
                strided_cats.add(i)
                prog.views[i] = None
                g.note(f"concat: {st.name} eliminated at batch {prog.batch}: "
                       f"{', '.join(v.name for _, v, *_ in slices)} write their channel "
                       "slices with a batch stride (out=, out_batch_stride=)")
                continue
            why = f"{why}; strided slices: {why2}"
        if why:
            g.note_once(f"concat: {st.name} kept ({why})")
            continue
        parent = blocks[out]
        off = 0
        for v in st.ins:
            b = absorb(out, v, off)
            parent.children.append((b, off))
            # a nested eliminated concat brings its own pieces along (one level of children
            # per top block: the slots below are top offset + rel)
            parent.children += [(c, off + o) for c, o in b.children]
            b.children = []
            off += tensors[v].nbytes
        eliminated.append(st.name)
        prog.views[i] = None  # filled once offsets are known
    top = [b for r, b in blocks.items() if r not in children]
    naive = sum(b.size for b in blocks.values()) + dropped
    if views:
        size = M.best_fit(top)
        prog.arena = dev.buffer(max(size, M.ALIGN))
        strategy = "arena, best-fit offsets"
        planned = size
    else:
        regs = M.registers(top)
        prog.registers = [dev.buffer(max(s, 1)) for s in regs]
        strategy = "whole-buffer reuse"
        planned = sum(regs)
    slots: dict[Value, Any] = {}  # value -> the planned Buffer its request is served
    for b in top:
        pieces = [(b, 0)] + [(c, o) for c, o in b.children]
        for blk, rel in pieces:
            r = blk.key
            nb = roots[r][2]
            if views:
                slots[r] = prog.arena.view(b.offset + rel, nb)
            else:
                slots[r] = M.register_slot(prog.registers[b.register], nb)

    def offset(v: Value) -> int:
        if v in placed:
            up, rel = placed[v]
            return offset(up) + rel
        return blocks[v].offset

    for j, (out, rel, ns, shape, dt, key) in strided_pending.items():
        n, per = shape[0], int(np.prod(shape[1:]))
        nb = ((n - 1) * ns + per) * dt.itemsize
        prog.strided[j] = (offset(out) + rel, nb, shape, dt, ns, key)
    for i in list(prog.views):
        out = steps[i].outs[0]
        t = tensors[out]
        # a nested strided concat's result is not contiguous there; only the enclosing
        # concat's step reads it, for its shape
        prog.views[i] = (offset(out), t.nbytes, t.shape, t.dtype)
    prog.expect = [None] * len(steps)
    prog.checks = [None] * len(steps)
    for i, lst in expect_idx.items():
        exp = {key: slots[r] for key, r in lst if r in slots}
        if exp:
            prog.expect[i] = exp
            idx = {v: n for n, v in enumerate(steps[i].outs)}
            prog.checks[i] = [(idx[r], slots[r]) for _, r in lst if r in slots]
    if not any(e is not None for e in prog.expect) and not prog.views:
        prog.expect = []
    prog.report = M.MemoryReport(strategy, planned, naive, M.live_peak(top), len(blocks),
                                 eliminated)
    g.note(f"memory: batch {prog.batch}: {prog.report}")


STRIDED = "slices along dim 1 are strided"
MISALIGNED = "would start at a misaligned offset"


def _concat_strided_ok(g: Any, i: int, st: Any, tensors: dict, alias: dict, routable: set,
                       children: set, roots: dict, expect_idx: dict, strided_cats: set
                       ) -> tuple[str, list]:
    """Whether a channel concatenation at batch > 1 can be eliminated by letting every producer
    write its slice with a batch stride; returns (why not, [(producer step, source, byte offset
    in the result, batch stride in elements, calibration key of its output request)]). A source
    made by a concat already eliminated that way (strided_cats) is a producer too: its own
    producers then write into this result."""
    out = st.outs[0]
    t = tensors.get(out)
    if t is None or out not in routable:
        return "its result is not planned", []
    if st.node.axis != 1 or len(t.shape) < 2:
        return "only a concat along dim 1 of batched tensors", []
    if len(set(st.ins)) != len(st.ins):
        return "a source appears twice", []
    steps = g.steps
    ns = int(np.prod(t.shape[1:]))
    rel, slices = 0, []
    for v in st.ins:
        tv = tensors.get(v)
        if tv is None or v not in routable or alias.get(v) is not v or v in children or \
                any(u is not v and r is v for u, r in alias.items()):
            return f"source {v.name} is not a planned result of its own", []
        j = next((k for k, s2 in enumerate(steps) if s2.kind == "forward" and v in s2.outs), None)
        if j is None or steps[j].outs[0] is not v:
            return f"source {v.name} is not the first result of a forward step", []
        node = steps[j].node
        if j not in strided_cats and not node.strided_out():
            return f"{node.name} ({type(node).__name__}) cannot write a strided slice (its op " \
                   "has no out=, out_batch_stride=)", []
        for k, s2 in enumerate(steps):
            if k == i or v not in s2.ins:
                continue
            # its own gradient may read it (neurons from the output, with y_batch_stride=)
            neuron = node.neuron if isinstance(node, FusedNeuronNode) else \
                node if isinstance(node, NeuronNode) and node.from_output else None
            own = s2.kind == "gradient" and s2.node.forward is node and neuron is not None and \
                NEURONS[neuron.kind].from_output is not None
            if not own:
                return f"{s2.name} ({s2.kind}) reads {v.name}", []
        key = next((key for key, r in expect_idx.get(j, []) if r is v), None)
        if key is None:
            return f"source {v.name}'s allocation was not seen", []
        slices.append((j, v, rel, ns, key))
        rel += int(np.prod(tv.shape[1:])) * tv.dtype.itemsize
    return "", slices


def _concat_ok(st: Any, tensors: dict, alias: dict, routable: set, children: set,
               roots: dict) -> str:
    out = st.outs[0]
    t = tensors.get(out)
    if t is None or out not in routable:
        return "its result is not planned"
    d = st.node.axis
    if int(np.prod(t.shape[:d])) != 1:
        return f"{STRIDED} (outer size {int(np.prod(t.shape[:d]))}; only batch 1 or a " \
               "concat along the first axis writes contiguous slices)"
    if len(set(st.ins)) != len(st.ins):
        return "a source appears twice"
    off = 0
    for v in st.ins:
        if v not in routable or alias.get(v) is not v or v in children:
            return f"source {v.name} is not a planned result of its own"
        if roots[v][2] != tensors[v].nbytes:
            return f"source {v.name}'s allocation is padded"
        if off % 16:
            return f"source {v.name} {MISALIGNED}"
        off += tensors[v].nbytes
    return ""
