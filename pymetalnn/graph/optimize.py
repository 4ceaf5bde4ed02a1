"""What the graph does by itself, each behind a switch of `optimize=` and logged to `graph.log`:

fuse        graph rewrites that replace a chain of nodes by one node calling fewer kernels:
            softmax + categorical cross-entropy -> softmax cross-entropy on the logits (the
            softmax forward and gradient disappear); convolution / fully connected / batch norm
            + neuron -> one call with `activation=` (the activation in the op's store epilogue:
            one dispatch instead of two) for the activations the ops fuse (relu, leaky relu,
            sigmoid, tanh: pymetalnn.ops.neuron.ACTIVATIONS); the gradient is taken from the fused
            output (`<neuron>_backward_from_output`), so training fuses them too (leaky relu
            needs a slope >= 0). Logged as not fused otherwise. Biases are always part of the
            convolution / linear call.
concat      concatenation elimination: producers write straight into their slices of the
            concatenated result (needs the memory planner and slices that are contiguous: the
            concat axis's outer size must be 1, e.g. batch 1 or a batch-axis concat), and the
            gradient's split becomes views of the incoming gradient (no copy).
dead_nodes  nodes whose results nothing uses are dropped; gradients nothing reads are not
            computed (e.g. the first convolution's input gradient); dropout is an identity view
            at inference.
memory      the memory planner (see memory.py).
"""
from __future__ import annotations

import inspect
from typing import Any

import numpy as np

from ..tensor import Tensor
from . import memory as M
from .nodes import (
    BatchNormalizationNode,
    ConcatenationNode,
    ConvolutionNode,
    FilterNode,
    FullyConnectedNode,
    LossNode,
    NeuronNode,
    SoftMaxNode,
    Value,
    op,
)

STRATEGY: str | None = None  # force "arena" or "registers" (tests); None: arena where views exist
FUSABLE_NEURON = {ConvolutionNode: "conv2d", FullyConnectedNode: "linear",
                  BatchNormalizationNode: "batch_norm_with_stats"}


def supports(opname: str, kw: str) -> bool:
    """Whether the functional op takes keyword `kw` (e.g. a fused variant's activation=)."""
    try:
        return kw in inspect.signature(op(opname)).parameters
    except (ValueError, TypeError, Exception):  # noqa: BLE001 - a missing op is "no"
        return False


def fused_activations() -> dict[str, int]:
    """The neuron kinds the ops' activation= covers (pymetalnn.ops.neuron.ACTIVATIONS)."""
    try:
        from ..ops.neuron import ACTIVATIONS
    except ImportError:
        return {}
    return ACTIVATIONS


def grad_from_output(neuron: NeuronNode) -> bool:
    """Whether the neuron's gradient can be computed from its output alone (an op
    `<neuron>_backward_from_output` exists; leaky relu also needs a slope >= 0)."""
    from .nodes import NEURONS, has_op

    if neuron.kind == "leaky_relu" and neuron.params.get("negative_slope", 0.01) < 0:
        return False
    return has_op(NEURONS[neuron.kind][0] + "_backward_from_output")


class FusedNeuronNode(FilterNode):
    """base node + neuron as one call of the base op with activation=(kind, params). The
    gradient runs the neuron's gradient from the output (`<neuron>_backward_from_output`) then
    the base's."""

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

    def saved(self):
        return self.base.saved() + [("out", 0)]

    def backward(self, rc, gouts, saved, need):
        y = saved[-1]
        n = self.neuron
        from .nodes import NEURONS

        gy = op(NEURONS[n.kind][0] + "_backward_from_output", n)(gouts[0], y, **n.params)
        return self.base.backward(rc, [gy], saved[:-1], need)


def rewrite_forward(g: Any) -> list[FilterNode]:
    """The forward order after the fusion passes (g.subst maps replaced results)."""
    order: list[FilterNode] = list(g.forward_order)
    if not g.options["fuse"]:
        return order
    outs = {g._eff(v) for v in g.outputs}

    def consumers(v: Value) -> list[FilterNode]:
        return [n for n in order if any(g._eff(s) is v for s in n.sources if s is not None)]

    # softmax + categorical cross-entropy -> cross-entropy on logits
    for loss in [n for n in order if isinstance(n, LossNode)]:
        if loss.loss != "categorical_cross_entropy":
            continue
        src = g._eff(loss.sources[0])
        sm = src.producer
        if not isinstance(sm, SoftMaxNode) or sm.log or sm.dim != 1 or src in outs \
                or consumers(src) != [loss]:
            continue
        fused = LossNode(g._eff(sm.sources[0]), "cross_entropy", labels=loss.labels,
                         reduction=loss.reduction, name=f"{sm.name}+{loss.name}", register=False,
                         **loss.options)
        g.subst[loss.result] = fused.result
        order = [fused if n is loss else n for n in order if n is not sm]
        g._log(f"fuse: {sm.name} + {loss.name} -> {fused.name} (softmax cross-entropy on the "
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
        if not supports(opname, "activation"):
            g._note(f"fuse: {n.name} + {neuron.name} not fused: {opname} has no fused-neuron "
                    f"variant (needs {opname}(..., activation=))")
            continue
        if neuron.kind not in fused_activations():
            g._note(f"fuse: {n.name} + {neuron.name} not fused: {opname}(..., activation=) does "
                    f"not cover {neuron.kind} (only {', '.join(fused_activations())})")
            continue
        if g.training and not grad_from_output(neuron):
            g._note(f"fuse: {n.name} + {neuron.name} not fused: the {neuron.kind} gradient needs "
                    "the pre-activation")
            continue
        fused = FusedNeuronNode(n, neuron, [g._eff(s) for s in n.sources])
        g.subst[neuron.result] = fused.result
        order = [fused if m is n else m for m in order if m is not neuron]
        g._log(f"fuse: {n.name} + {neuron.name} -> {fused.name} ({opname} with "
               f"activation={neuron.kind!r}: one dispatch)")
    return order


# ---- memory planning ----------------------------------------------------------------------------

def plan_memory(g: Any, prog: Any, calib: list[tuple[list, list]]) -> None:
    """Build prog's plan from the calibration run (allocation requests and produced tensors of
    every step)."""
    dev = g.device
    steps = g.steps
    prog.calibrated = True
    handle_root: dict[int, Value] = {}
    roots: dict[Value, tuple[int, int, int]] = {}  # value -> (step, request index, nbytes)
    alias: dict[Value, Value] = {}
    tensors: dict[Value, Tensor] = {}
    for i, (allocs, produced) in enumerate(calib):
        index = {id(h): (j, nb) for j, (nb, h) in enumerate(allocs)}
        for v, t in produced:
            if not isinstance(t, Tensor):
                continue
            tensors[v] = t
            hid = id(t.buffer.base.handle)
            if hid in index and hid not in handle_root:
                j, nb = index[hid]
                roots[v] = (i, j, nb)
                handle_root[hid] = v
                alias[v] = v
            elif hid in handle_root:
                alias[v] = handle_root[hid]
    keep = {g._eff(v) for v in g.outputs}
    excluded = {alias[v] for v in keep if v in alias}
    end: dict[Value, int] = {r: roots[r][0] for r in roots}
    for v, r in alias.items():
        if r in end:
            end[r] = max(end[r], g.last_use.get(v, roots[r][0]))
    # per step: which requests (n bytes, k-th of that size) became values
    expect_idx: dict[int, list[tuple[tuple[int, int], Value]]] = {}
    for r, (i, j, _nb) in roots.items():
        expect_idx.setdefault(i, []).append((M.ordinals(calib[i][0])[j], r))
    routable = {r for lst in expect_idx.values() for _, r in lst if r not in excluded}
    # blocks
    blocks: dict[Value, M.Block] = {r: M.Block(r, M.align(roots[r][2]), roots[r][0], end[r])
                                    for r in routable}
    children: set[Value] = set()
    eliminated: list[str] = []
    views = dev.supports_views and dev.name in ("cpu", "cuda")
    if STRATEGY is not None:
        views = views and STRATEGY == "arena"
    if g.options["concat"]:
        if not views:
            g._note("concat: not eliminated (needs buffer views, which this backend lacks)")
        else:
            for i, st in enumerate(steps):
                if st.kind != "forward" or not isinstance(st.node, ConcatenationNode):
                    continue
                why = _concat_ok(st, tensors, alias, routable, children, roots)
                if why:
                    g._note(f"concat: {st.name} kept ({why})")
                    continue
                out = st.outs[0]
                parent = blocks[out]
                off = 0
                for v in st.ins:
                    b = blocks[v]
                    parent.children.append((b, off))
                    parent.start = min(parent.start, b.start)
                    parent.end = max(parent.end, b.end)
                    children.add(v)
                    off += tensors[v].nbytes
                eliminated.append(st.name)
                prog.views[i] = None  # filled once offsets are known
    top = [b for r, b in blocks.items() if r not in children]
    naive = sum(b.size for b in blocks.values())
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
    handles: dict[Value, Any] = {}
    for b in top:
        pieces = [(b, 0)] + [(c, o) for c, o in b.children]
        for blk, rel in pieces:
            r = blk.key
            nb = roots[r][2]
            if views:
                handles[r] = M.subhandle(dev, prog.arena, b.offset + rel, nb)
            else:
                handles[r] = prog.registers[b.register].handle
    for i in list(prog.views):
        out = steps[i].outs[0]
        t = tensors[out]
        prog.views[i] = (blocks[out].offset, t.nbytes, t.shape, t.dtype)
    prog.expect = [None] * len(steps)
    prog.checks = [None] * len(steps)
    for i, lst in expect_idx.items():
        exp = {key: handles[r] for key, r in lst if r in handles}
        if exp:
            prog.expect[i] = exp
            idx = {v: n for n, v in enumerate(steps[i].outs)}
            prog.checks[i] = [(idx[r], handles[r]) for _, r in lst if r in handles]
    if not any(e is not None for e in prog.expect) and not prog.views:
        prog.expect = []
    prog.report = M.MemoryReport(strategy, planned, naive, M.live_peak(top), len(blocks),
                                 eliminated)
    g._log(f"memory: batch {prog.batch}: {prog.report}")


def _concat_ok(st: Any, tensors: dict, alias: dict, routable: set, children: set,
               roots: dict) -> str:
    out = st.outs[0]
    t = tensors.get(out)
    if t is None or out not in routable:
        return "its result is not planned"
    d = st.node._d
    if int(np.prod(t.shape[:d])) != 1:
        return f"slices along dim {d} are strided (outer size {int(np.prod(t.shape[:d]))}; only " \
               "batch 1 or a concat along the first axis writes contiguous slices)"
    if len(set(st.ins)) != len(st.ins):
        return "a source appears twice"
    off = 0
    for v in st.ins:
        if v not in routable or alias.get(v) is not v or v in children:
            return f"source {v.name} is not a planned result of its own"
        if roots[v][2] != tensors[v].nbytes:
            return f"source {v.name}'s allocation is padded"
        if off % 16:
            return f"source {v.name} would start at a misaligned offset"
        off += tensors[v].nbytes
    return ""
