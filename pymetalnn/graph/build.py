"""Building a graph: the order of its steps (topological, cycles reported), shape checks, dead
nodes, the training graph's gradient pass from the loss, and what each step reads and frees.

GraphBuilder is the part of Graph (graph.py) that turns nodes into `steps`.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

from ..runtime import Device
from ..runtime import device as default_device
from .datasource import DataSource
from .errors import GraphError
from .nodes import (
    ConcatenationNode,
    FilterNode,
    GradientNode,
    GradientSumNode,
    ImageNode,
    LabelsNode,
    LossNode,
    Node,
    UpdateNode,
    Value,
)

OPTIMIZATIONS = ("fuse", "concat", "dead_nodes", "memory", "group_updates")


def _options(optimize: Any) -> dict[str, bool]:
    if isinstance(optimize, bool):
        return {k: optimize for k in OPTIMIZATIONS}
    if isinstance(optimize, Mapping):
        bad = set(optimize) - set(OPTIMIZATIONS)
        if bad:
            raise ValueError(f"optimize: unknown switch(es) {', '.join(sorted(bad))} (choose from "
                             f"{', '.join(OPTIMIZATIONS)})")
        return {k: bool(optimize.get(k, True)) for k in OPTIMIZATIONS}
    raise ValueError(f"optimize: expected a bool or a dict of switches, got {optimize!r}")


# ---- ordering ---------------------------------------------------------------------------------

def topo_order(sinks: Sequence[Node], inputs_of: Callable[[Node], list[Value]]) -> list[Node]:
    """Nodes the sinks depend on, dependencies first (depth-first, in sink order). A cycle raises
    GraphError naming a node on it."""
    order: list[Node] = []
    state: dict[Node, int] = {}  # 1 visiting, 2 done
    for sink in sinks:
        if state.get(sink) == 2:
            continue
        stack: list[tuple[Node, int]] = [(sink, 0)]
        path: list[Node] = []
        while stack:
            node, i = stack.pop()
            if i == 0:
                if state.get(node) == 2:
                    continue
                if state.get(node) == 1:
                    cyc = path[path.index(node):] + [node]
                    raise GraphError(node, "is part of a cycle: " +
                                     " -> ".join(n.name for n in cyc))
                state[node] = 1
                path.append(node)
            deps = [v.producer for v in inputs_of(node) if v.producer is not None]
            if i < len(deps):
                stack.append((node, i + 1))
                d = deps[i]
                if state.get(d) == 1:
                    cyc = path[path.index(d):] + [d]
                    raise GraphError(d, "is part of a cycle: " + " -> ".join(n.name for n in cyc))
                if state.get(d) != 2:
                    stack.append((d, 0))
            else:
                state[node] = 2
                path.pop()
                order.append(node)
    return order


# ---- steps and handles -------------------------------------------------------------------------

@dataclass(eq=False)
class Step:
    kind: str                    # forward | gradient | sum | update
    node: Node
    ins: list[Value]
    outs: list[Value]
    with_state: bool = False
    need: list[bool] = field(default_factory=list)   # gradient: per forward source
    ngrads: int = 0              # gradient: how many of `ins` are incoming gradients
    grad_slots: list[int] = field(default_factory=list)  # gradient: result index of each ins grad
    update_after: bool = False   # gradient: an update step follows (keep weights loaded)
    group: Any = None            # update: the UpdateGroup it runs (updates.py) (all of its data sources)

    @property
    def name(self) -> str:
        return self.node.name


class GraphBuilder:
    """Graph's building part: from the result values to `nodes`, `inputs`, `data_sources`,
    `steps` and the values' lifetimes."""

    def resolve(self, v: Value) -> Value:
        """The value that stands for `v` after the graph's rewrites (a fused node's result)."""
        while v in self.subst:
            v = self.subst[v]
        return v

    def _inputs_of(self, n: Node) -> list[Value]:
        return [self.resolve(v) for v in n.input_values()]

    def _forward_nodes(self, outputs: list[Value], strict: bool) -> list[FilterNode]:
        sinks = [v.producer for v in outputs if v.producer is not None]
        order = topo_order(sinks, lambda n: [s for s in n.sources if s is not None])
        for n in order:
            if isinstance(n, FilterNode):
                n.check()  # again: sources may have been rewired since the node was made
        self._dangling_kept: list[Node] = []
        in_graph = set(order)
        seen: set[Node] = set()
        values = [s for n in order for s in n.sources if s is not None]
        values += [r for n in order for r in n.results]
        dangling: list[Node] = []
        for v in values:
            for c in v.consumers:
                if c not in in_graph and c not in seen and isinstance(c, FilterNode) \
                        and not c.internal:
                    seen.add(c)
                    dangling.append(c)
        if dangling:
            if strict:
                n = dangling[0]
                raise GraphError(n, f"does not reach the {self._target_word()} (it reads "
                                    f"{', '.join(s.name for s in n.sources if s is not None)}); "
                                    "pass it in extra_results, or strict=False to drop it")
            if self.options["dead_nodes"]:
                self.note(f"dead nodes: dropped {', '.join(n.name for n in dangling)} (nothing "
                          "the graph returns uses their results)")
            else:
                for n in dangling:
                    try:
                        extra = topo_order([n], lambda m: [s for s in m.sources if s is not None])
                    except GraphError:
                        continue
                    order += [m for m in extra if m not in in_graph]
                    in_graph.update(extra)
                self._dangling_kept = dangling
                self.note(f"dead nodes: kept {', '.join(n.name for n in dangling)} (dead_nodes off)")
        return [n for n in order if isinstance(n, FilterNode)]

    def _target_word(self) -> str:
        return "graph's results"

    def _rewrite(self) -> None:
        from .optimize import rewrite_forward

        self.forward_order = rewrite_forward(self)

    def _finish(self, sinks: list[Node], device: Device | None) -> None:
        order = topo_order(sinks, self._inputs_of)
        self.nodes = order
        # inputs: graph values without a producer, in first-use order
        self.inputs: list[ImageNode] = []
        for n in order:
            for v in self._inputs_of(n):
                if v.producer is None and v not in self.inputs:
                    if not isinstance(v, ImageNode):
                        raise GraphError(n, f"reads {v.name}, which is neither an input nor a "
                                            "node's result")
                    self.inputs.append(v)
        self.data_inputs = [v for v in self.inputs if not isinstance(v, LabelsNode)]
        self.label_inputs = [v for v in self.inputs if isinstance(v, LabelsNode)]
        self._loss_of: dict[Value, LossNode] = {}  # labels input -> the (first) loss reading it
        for n in order:
            if isinstance(n, LossNode):
                self._loss_of.setdefault(self.resolve(n.labels), n)
        # data sources and the device
        self.data_sources: list[DataSource] = []
        for n in order:
            ws = getattr(n, "weights", None) if isinstance(n, FilterNode) else None
            if ws is not None and ws not in self.data_sources:
                self.data_sources.append(ws)
        devs = {id(ds.device): ds.device for ds in self.data_sources if ds.device is not None}
        if device is None and len(devs) > 1:
            raise GraphError(None, "data sources live on different devices")
        self.device: Device = device or (next(iter(devs.values())) if devs else default_device())
        for ds in self.data_sources:
            if ds.device is None:
                ds.device = self.device
            elif ds.device is not self.device:
                raise GraphError(None, f"data source {ds.label} is on {ds.device.name}, the graph "
                                       f"on {self.device.name}")
        self._build_steps()
        self._init_running()  # GraphRunner's state (run.py)

    def _build_steps(self) -> None:
        out_eff = {self.resolve(v) for v in self.outputs}
        consumed: set[Value] = set()
        for n in self.nodes:
            consumed.update(self._inputs_of(n))
        grad_fwd = {n.forward for n in self.nodes if isinstance(n, GradientNode)}
        updates = {n.forward for n in self.nodes if isinstance(n, UpdateNode)}
        steps: list[Step] = []
        for n in self.nodes:
            if isinstance(n, FilterNode):
                ws = n in grad_fwd
                outs = list(n.results) + (list(n.state_values[:n.num_states()]) if ws else [])
                steps.append(Step("forward", n, self._inputs_of(n), outs, with_state=ws))
            elif isinstance(n, GradientNode):
                f = n.forward
                need = [(r in consumed or r in out_eff) or
                        (not self.options["dead_nodes"] and f.differentiable(i))
                        for i, r in enumerate(n.results)]
                grads = [(i, self.resolve(s)) for i, s in enumerate(n.sources) if s is not None]
                outs = [r for r, nd in zip(n.results, need) if nd] + list(n.weight_results)
                st = Step("gradient", n, [g for _, g in grads] +
                          [self.resolve(v) for v in n.saved_values()], outs, need=need,
                          ngrads=len(grads), grad_slots=[i for i, _ in grads],
                          update_after=f in updates)
                dropped = [f.sources[i].name for i, nd in enumerate(need)
                           if not nd and f.differentiable(i) and f.sources[i] is not None
                           and f.sources[i].producer is not None]
                if dropped and self.options["dead_nodes"]:
                    self.note(f"dead nodes: {n.name} skips the gradient of "
                              f"{', '.join(dropped)} (nothing uses it)")
                steps.append(st)
            elif isinstance(n, GradientSumNode):
                steps.append(Step("sum", n, self._inputs_of(n), [n.result]))
            elif isinstance(n, UpdateNode):
                steps.append(Step("update", n, self._inputs_of(n), []))
            else:
                raise GraphError(n, f"cannot run a {type(n).__name__}")
        if self.training and getattr(self, "precision", "float32") == "mixed" and \
                any(st.kind == "update" for st in steps):
            steps = self._defer_updates(steps)
        self.steps = steps
        self.strided_grads = self._strided_grads(steps, out_eff)
        self.keep = out_eff
        self._lifetimes()

    def _defer_updates(self, steps: list[Step]) -> list[Step]:
        """Mixed precision: the updates after the whole gradient pass, behind one overflow check
        of every weight gradient (amp_check) and followed by the loss scale's update."""
        upd = [st for st in steps if st.kind == "update"]
        rest = [st for st in steps if st.kind != "update"]
        grads = list(dict.fromkeys(v for st in upd for v in st.ins))
        loss = self.resolve(self.loss_node.result).producer  # type: ignore[attr-defined]
        self.note(f"mixed precision: {len(upd)} updates after the gradient pass, behind one "
                  f"finite check of {len(grads)} weight gradients (dynamic loss scaling)")
        return rest + [Step("amp_check", loss, grads, [])] + upd + \
            [Step("amp_update", loss, [], [])]

    def _lifetimes(self) -> None:
        """Last reads (what the memory planner and the freeing of values go by): values not
        returned are freed after their last reader."""
        steps = self.steps
        last: dict[Value, int] = {}
        for i, st in enumerate(steps):
            for v in st.ins:
                last[v] = i
        self.free_after: list[list[Value]] = [[] for _ in steps]
        for i, st in enumerate(steps):
            for v in st.outs:
                if v not in self.keep:
                    self.free_after[last.get(v, i)].append(v)
        self.last_use = last

    def _strided_grads(self, steps: list[Step], out_eff: set[Value]
                       ) -> dict[Node, dict[int, FilterNode]]:
        """Per concatenation: which pieces of its gradient can go, at batch > 1, as views at
        their channel slices (batch-strided) to the one gradient step that reads each, because
        that node's backward reads a strided gradient (FilterNode.strided_grad); the other
        pieces stay split copies (ConcatenationNode.backward). Only with the concat pass on."""
        if not (self.options["concat"] and self.device.supports_views):
            return {}
        readers: dict[Value, list[Step]] = {}
        for st in steps:
            for v in st.ins:
                readers.setdefault(v, []).append(st)
        found: dict[Node, dict[int, FilterNode]] = {}
        for st in steps:
            f = st.node.forward if st.kind == "gradient" else None
            if not isinstance(f, ConcatenationNode):
                continue
            pieces: dict[int, FilterNode] = {}
            for k, r in enumerate(st.node.results):
                rs = readers.get(r, [])
                if r in out_eff or len(rs) != 1 or rs[0].kind != "gradient":
                    continue
                q = rs[0]
                reads = [j for j, v in enumerate(q.ins) if v is r]
                # the reader's incoming gradient of its first result, nothing else
                if reads != [0] or q.ngrads != 1 or q.grad_slots != [0]:
                    continue
                if q.node.forward.strided_grad():
                    pieces[k] = q.node.forward
            if pieces:
                found[f] = pieces
                self.note(f"concat: {f.name}'s gradient reaches "
                          f"{', '.join(p.name for p in pieces.values())} as strided channel "
                          "slices at batch > 1 (no split copy)")
        return found

    def describe(self) -> str:
        """The steps, one per line."""
        lines = []
        for i, st in enumerate(self.steps):
            ins = ", ".join(v.name for v in st.ins)
            outs = ", ".join(v.name for v in st.outs)
            lines.append(f"{i:3d} {st.kind:8s} {st.name}: ({ins}) -> ({outs})")
        return "\n".join(lines)

    def _gradient_pass(self) -> list[Node]:
        """Gradient nodes from the loss back, gradient sums, updates; returns the sinks."""
        order = self.forward_order
        loss = self.resolve(self.loss_node.result).producer
        assert isinstance(loss, LossNode)
        requires: set[Value] = set()
        for n in order:
            srcs = [self.resolve(s) for s in n.sources if s is not None]
            if n.trainable or any(s in requires for s in srcs):
                requires.update(n.results)
        grads: dict[Value, list[Value]] = {}
        updates: list[Node] = []
        for n in reversed(order):
            if n is loss:
                gn = n.gradient()
            elif isinstance(n, LossNode) or not any(r in requires for r in n.results):
                continue
            else:
                gins: list[Any] = []
                for r in n.results:
                    cs = grads.get(r, [])
                    if not cs:
                        gins.append(None)
                    elif len(cs) == 1:
                        gins.append(cs[0])
                    else:
                        gins.append(GradientSumNode(cs, f"{r.name}.gradsum").result)
                if all(g is None for g in gins):
                    continue
                gn = n.gradient(gins)
            for i, s in enumerate(n.sources):
                if s is not None and self.resolve(s) in requires and n.differentiable(i):
                    grads.setdefault(self.resolve(s), []).append(gn.results[i])
            if gn.weight_results:
                updates.append(UpdateNode(gn))
        if not updates:
            raise GraphError(loss, "nothing to train: no node with trainable weights reaches the "
                                   "loss")
        sinks: list[Node] = [loss] + [self.resolve(v).producer for v in self.outputs[1:]
                                      if self.resolve(v).producer is not None]
        return sinks + self._dangling_kept + updates
