"""Graphs: building (order, shape checks, training graph from the loss), and running (states,
data sources, memory plan, double buffering).

    g  = Graph(result)                         # inference: g.run(images) -> numpy result
    tg = TrainingGraph(loss, optimizer=...)    # forward, loss, gradient pass, weight updates
    h  = tg.encode(images, labels, callback=f) # returns at once; f(h) runs when the step is done
    h.losses                                   # per-sample losses (waits)

A graph is a list of steps (forward nodes, the loss, gradient nodes, gradient sums, weight
updates) in an order where every step's inputs exist; each step calls the functional ops, which
queue kernels on the device and return at once, so `encode` returns as soon as the whole step is
queued. A completion callback (`Device.signal`) releases one of `in_flight` (2) slots: the host
prepares step k+1 while the device runs step k.
"""
from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..runtime import Device
from ..runtime import device as default_device
from ..tensor import Tensor, int32, tensor
from . import memory as M
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
    as_value,
    op,
)

log = logging.getLogger("pymetalnn.graph")

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
    group: Any = None            # update: the _UpdateGroup it runs (all of its data sources)

    @property
    def name(self) -> str:
        return self.node.name


class LossLabels:
    """Labels for a training step that come back holding the per-sample losses (MPS's
    MPSCNNLossLabels): pass as `labels`; after the step, `.losses` (waits)."""

    def __init__(self, labels: Any):
        self.labels = labels
        self._handle: Handle | None = None

    @property
    def losses(self) -> np.ndarray:
        if self._handle is None:
            raise RuntimeError("these labels have not been encoded yet")
        return self._handle.losses


class Handle:
    """One encoded step. `done`, `wait()`, `outputs` (device tensors), `numpy()`, and for a
    training step `losses` (per-sample, numpy) and `loss` (their reduction)."""

    def __init__(self, graph: Graph, step: int, outputs: list[Any], loss_index: int | None):
        self.graph, self.step = graph, step
        self.outputs = outputs
        self._loss_index = loss_index
        self._event = threading.Event()
        self.error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> Handle:
        if not self._event.wait(timeout):
            raise TimeoutError(f"step {self.step} did not finish within {timeout} s")
        if self.error is not None:
            raise self.error
        return self

    def numpy(self) -> list[np.ndarray]:
        self.wait()
        return [t.numpy() if isinstance(t, Tensor) else t for t in self.outputs]

    @property
    def losses(self) -> np.ndarray:
        if self._loss_index is None:
            raise AttributeError("not a training step")
        self.wait()
        return self.outputs[self._loss_index].numpy()

    @property
    def loss(self) -> float:
        ls = self.losses
        red = getattr(self.graph, "loss_node", None)
        return float(ls.sum() if red is not None and red.reduction == "sum" else ls.mean())

    def __repr__(self) -> str:
        return f"<Handle step {self.step} {'done' if self.done else 'in flight'}>"


# ---- run context ------------------------------------------------------------------------------

class RunContext:
    """What a node sees while its step is encoded: the step number (dropout offsets), weights
    through the data-source protocol, cached constants, notes for the log."""

    def __init__(self, graph: Graph, step: int, training: bool):
        self.g = graph
        self.step = step
        self.training = training
        self.skip_dead = graph.options["dead_nodes"]
        self.views = graph.device.supports_views
        self.concat_views = graph.options["concat"]
        self.acquired: list[DataSource] = []
        self.state: dict[Any, Any] = {}  # host-side states from a forward node to its gradient
        # concat elimination at batch > 1: where the running step's op writes its result (a view
        # at its channel slice of the concatenation, and the elements between images)
        self.out_slot: tuple[Tensor, int] | None = None

    def take_out(self) -> dict[str, Any]:
        """out=, out_batch_stride= for the op of a node whose result the graph placed in a
        channel slice of a concatenation (empty otherwise); nodes that can pass them call this."""
        if self.out_slot is None:
            return {}
        t, ns = self.out_slot
        self.out_slot = None
        return {"out": t, "out_batch_stride": ns}

    def acquire_dict(self, ds: DataSource) -> dict[str, Tensor]:
        if not ds.loaded:
            ds.load()
            self.g._count("load", ds)
        if ds not in self.acquired:
            self.acquired.append(ds)
        return ds.tensors()

    def acquire(self, ds: DataSource) -> tuple[Tensor, Tensor | None]:
        t = self.acquire_dict(ds)
        return t["weight"], t.get("bias")

    def release(self, ds: DataSource) -> None:
        """Nodes say they are done with the weights; the graph purges them in low-memory mode
        at the end of the step."""

    def note(self, msg: str) -> None:
        self.g._note(msg)

    def loss_scale(self, n: int, reduction: str, dev: Device) -> Tensor:
        return self.g._const(("loss_scale", n, reduction),
                             lambda: np.full(n, 1.0 / n if reduction == "mean" else 1.0, np.float32))


# ---- compiled programs --------------------------------------------------------------------------

class _Program:
    """What depends on the batch size: the memory plan (after a calibration run)."""

    def __init__(self, batch: int):
        self.batch = batch
        self.runs = 0
        self.calibrated = False
        self.expect: list[dict[tuple[int, int], Any] | None] = []
        self.checks: list[list[tuple[int, Any]] | None] = []
        self.views: dict[int, tuple[int, int, tuple, Any]] = {}
        # step -> (arena offset, bytes, shape, dtype, batch stride, calibration key): a producer
        # of an eliminated concatenation writing into its strided channel slice
        self.strided: dict[int, tuple[int, int, tuple, Any, int, tuple[int, int]]] = {}
        self.arena: Any = None
        self.registers: list[Any] = []
        self.report: M.MemoryReport | None = None


class Graph:
    """An inference graph (or the base of TrainingGraph): the nodes the `results` depend on.

    results: values or nodes to compute. training: run dropout / batch norm in training mode.
    optimize: True, False, or a dict of switches {"fuse", "concat", "dead_nodes", "memory",
    "group_updates"}
    (every pass logs what it did to `graph.log` and the "pymetalnn.graph" logger).
    low_memory: load weights before each use and purge them after. in_flight: how many encoded
    steps may be queued at once (2: double buffering)."""

    _loss_output_index: int | None = None  # which output holds the per-sample losses

    def __init__(self, results: Any, *, training: bool = False, device: Device | None = None,
                 optimize: Any = True, low_memory: bool = False, in_flight: int = 2,
                 strict: bool = False, name: str = "graph", _prebuilt: Any = None):
        self.name = name
        self.training = bool(training)
        self.options = _options(optimize)
        self.low_memory = bool(low_memory)
        if not isinstance(in_flight, int) or in_flight < 1:
            raise ValueError(f"in_flight: expected an int >= 1, got {in_flight!r}")
        self.in_flight = in_flight
        self.log: list[str] = []
        self._notes: set[str] = set()
        self.counts: dict[tuple[str, str], int] = {}
        self.subst: dict[Value, Value] = {}
        outs = results if isinstance(results, (list, tuple)) else [results]
        self.outputs: list[Value] = [as_value(r) for r in outs]
        if _prebuilt is None:
            fwd = self._forward_nodes(self.outputs, strict)
            self.forward_order = fwd
            self._rewrite()
            sinks: list[Node] = [self._eff(v).producer for v in self.outputs
                                 if self._eff(v).producer is not None]
            sinks += self._dangling_kept
            self._finish(sinks, device)
        else:
            _prebuilt(self, device)

    # ---- building ------------------------------------------------------------------------------
    def _eff(self, v: Value) -> Value:
        while v in self.subst:
            v = self.subst[v]
        return v

    def _inputs_of(self, n: Node) -> list[Value]:
        return [self._eff(v) for v in n.input_values()]

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
                self._log(f"dead nodes: dropped {', '.join(n.name for n in dangling)} (nothing "
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
                self._log(f"dead nodes: kept {', '.join(n.name for n in dangling)} (dead_nodes off)")
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
                self._loss_of.setdefault(self._eff(n.labels), n)
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
        self._programs: dict[int, _Program] = {}
        self._consts: dict[Any, Tensor] = {}
        self._sem = threading.BoundedSemaphore(self.in_flight)
        self._cbq: queue.Queue | None = None
        self._steps_encoded = 0
        self._update_groups: list[_UpdateGroup] | None = None
        self._last: Handle | None = None
        self._encode_lock = threading.Lock()

    def _build_steps(self) -> None:
        out_eff = {self._eff(v) for v in self.outputs}
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
                grads = [(i, self._eff(s)) for i, s in enumerate(n.sources) if s is not None]
                outs = [r for r, nd in zip(n.results, need) if nd] + list(n.weight_results)
                st = Step("gradient", n, [g for _, g in grads] +
                          [self._eff(v) for v in n.saved_values()], outs, need=need,
                          ngrads=len(grads), grad_slots=[i for i, _ in grads],
                          update_after=f in updates)
                dropped = [f.sources[i].name for i, nd in enumerate(need)
                           if not nd and f.differentiable(i) and f.sources[i] is not None
                           and f.sources[i].producer is not None]
                if dropped and self.options["dead_nodes"]:
                    self._log(f"dead nodes: {n.name} skips the gradient of "
                              f"{', '.join(dropped)} (nothing uses it)")
                steps.append(st)
            elif isinstance(n, GradientSumNode):
                steps.append(Step("sum", n, self._inputs_of(n), [n.result]))
            elif isinstance(n, UpdateNode):
                steps.append(Step("update", n, self._inputs_of(n), []))
            else:
                raise GraphError(n, f"cannot run a {type(n).__name__}")
        self.steps = steps
        self.strided_grads = self._strided_grads(steps, out_eff)
        self.keep = out_eff
        self._lifetimes()

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
                self._log(f"concat: {f.name}'s gradient reaches "
                          f"{', '.join(p.name for p in pieces.values())} as strided channel "
                          "slices at batch > 1 (no split copy)")
        return found

    @property
    def step_count(self) -> int:
        """Steps encoded so far (the step number of the next one: dropout offsets use it)."""
        return self._steps_encoded

    # ---- logging -------------------------------------------------------------------------------
    def _log(self, msg: str) -> None:
        self.log.append(msg)
        log.info("%s: %s", self.name, msg)

    def _note(self, msg: str) -> None:
        if msg not in self._notes:
            self._notes.add(msg)
            self._log(msg)

    def _count(self, what: str, ds: DataSource) -> None:
        key = (what, ds.label)
        self.counts[key] = self.counts.get(key, 0) + 1

    def _const(self, key: Any, make: Callable[[], np.ndarray]) -> Tensor:
        t = self._consts.get(key)
        if t is None:
            t = self._consts[key] = tensor(make(), self.device)
        return t

    def describe(self) -> str:
        """The steps, one per line."""
        lines = []
        for i, st in enumerate(self.steps):
            ins = ", ".join(v.name for v in st.ins)
            outs = ", ".join(v.name for v in st.outs)
            lines.append(f"{i:3d} {st.kind:8s} {st.name}: ({ins}) -> ({outs})")
        return "\n".join(lines)

    # ---- inputs ----------------------------------------------------------------------------------
    def _write(self, t: Tensor, arr: np.ndarray) -> None:
        """Copy host data into t ordered with the queued work, without waiting for it."""
        self.device.write_async(t.buffer, np.array(arr, dtype=t.dtype, copy=True, order="C"))

    def _upload(self, arr: np.ndarray, dtype: Any) -> Tensor:
        t = Tensor(self.device.buffer(max(arr.nbytes, 1) if arr.size else 0), arr.shape, dtype)
        if arr.size:
            self._write(t, arr)
        return t

    def _bind_input(self, v: ImageNode, x: Any) -> Tensor:
        dev = self.device
        if isinstance(x, Tensor):
            if x.device is not dev:
                raise GraphError(v, f"input tensor is on {x.device.name}, the graph on {dev.name}")
            t = x
        else:
            arr = np.asarray(x)
            if v.dtype == int32 and arr.dtype.kind not in "iu":
                raise GraphError(v, f"expected integer labels, got dtype {arr.dtype}")
            t = None
        shape = t.shape if t is not None else arr.shape
        n = shape[v.batch_dim] if len(shape) > v.batch_dim else -1
        if len(shape) != len(v.sample_shape) + 1 or shape != v.full_shape(n):
            raise GraphError(v, f"got shape {shape}, expected {v.full_shape(max(n, 1))} (any "
                                "batch size)")
        if t is None:
            t = self._upload(arr, v.dtype)
        if t.dtype != v.dtype:
            raise GraphError(v, f"got dtype {t.dtype}, expected {v.dtype}")
        return t

    def _bind_labels(self, v: LabelsNode, x: Any) -> Any:
        loss = self._loss_of.get(v)
        if isinstance(x, LossLabels):
            x = x.labels
        if loss is None or not loss.class_labels:
            return self._bind_input(v, x)
        from ..ops.loss import Labels

        c = self._eff(loss.sources[0]).shape[1]
        ii = loss.options.get("ignore_index", -100)
        if isinstance(x, Labels) and x.num_classes == c and x.ignore_index == ii:
            t, shape = x, x.shape
        else:
            t, arr = None, x.numpy() if isinstance(x, Tensor) else np.asarray(x)
            if arr.dtype.kind not in "iu":
                raise GraphError(v, f"expected integer class labels, got dtype {arr.dtype}")
            bad = ((arr < 0) | (arr >= c)) & (arr != ii)
            if bad.any():
                raise GraphError(v, f"label {int(arr[bad].reshape(-1)[0])} out of range "
                                    f"[0, {c}) (ignore_index={ii})")
            shape = arr.shape
        n = shape[0] if len(shape) else -1
        if shape != v.full_shape(n):
            raise GraphError(v, f"labels of shape {shape}, expected {v.full_shape(max(n, 1))}"
                                f" (the loss {loss.name} reads class labels)")
        return t if t is not None else Labels(self._upload(arr.astype(np.int32), int32), c, ii)

    def labels(self, labels: Any) -> Any:
        """Put labels on the device ahead of time (checked once), e.g. to encode without any
        host-device copy."""
        if len(self.label_inputs) != 1:
            raise GraphError(None, "labels(): the graph has no single labels input")
        return self._bind_labels(self.label_inputs[0], labels)

    def bind(self, inputs: Any) -> list[Tensor]:
        """The data inputs on the device, checked (e.g. to encode without a host-device copy)."""
        return [self._bind_input(v, x) for v, x in zip(self.data_inputs, self._split(inputs))]

    def _split(self, inputs: Any) -> list[Any]:
        ins = self.data_inputs
        if isinstance(inputs, Mapping):
            try:
                return [inputs[v] if v in inputs else inputs[v.name] for v in ins]
            except KeyError as e:
                raise GraphError(None, f"inputs: missing {e}") from None
        if len(ins) == 1 and not (isinstance(inputs, (list, tuple)) and len(inputs) == 1
                                  and not isinstance(inputs[0], (int, float))):
            return [inputs]
        if not isinstance(inputs, (list, tuple)) or len(inputs) != len(ins):
            raise GraphError(None, f"inputs: the graph takes {len(ins)} inputs "
                                   f"({', '.join(v.name for v in ins)})")
        return list(inputs)

    # ---- running ---------------------------------------------------------------------------------
    def encode(self, inputs: Any, labels: Any = None, callback: Callable[[Handle], Any] | None = None
               ) -> Handle:
        """Queue one step on the device and return at once with its Handle; `callback(handle)`
        runs on a host thread when the device has finished it. Waits while `in_flight` steps are
        already queued."""
        with self._encode_lock:
            self._sem.acquire()
            try:
                h = self._encode(inputs, labels)
            except BaseException:
                self._sem.release()
                raise
            self._signal(h, callback)
            if isinstance(labels, LossLabels):
                labels._handle = h
            return h

    def run(self, inputs: Any, labels: Any = None) -> list[np.ndarray]:
        """Encode one step, wait, and return the outputs as numpy arrays."""
        return self.encode(inputs, labels).numpy()

    def __call__(self, inputs: Any) -> np.ndarray:
        out = self.run(inputs)
        return out[0] if len(out) == 1 else out

    def synchronize(self) -> None:
        """Wait for every encoded step and every callback."""
        self.device.synchronize()
        if self._last is not None:
            self._last.wait()
        if self._cbq is not None:
            self._cbq.join()

    def _signal(self, h: Handle, callback: Callable | None) -> None:
        def done(err: BaseException | None = None) -> None:
            if err is not None:  # work of this step failed: its wait() raises it
                h.error = h.error or err
            h._event.set()
            self._sem.release()
            if callback is not None:
                self._callbacks().put((callback, h))

        sig = getattr(self.device, "signal", None)
        if sig is not None:
            try:
                sig(done, with_error=True)
                return
            except NotImplementedError:
                pass

        def waiter() -> None:
            try:
                self.device.synchronize()
            except BaseException as e:  # noqa: BLE001
                h.error = e
            done()

        threading.Thread(target=waiter, daemon=True).start()

    def _callbacks(self) -> queue.Queue:
        if self._cbq is None:
            q: queue.Queue = queue.Queue()

            def worker() -> None:
                while True:
                    cb, h = q.get()
                    try:
                        cb(h)
                    except BaseException as e:  # noqa: BLE001
                        log.exception("callback of step %d failed", h.step)
                        h.error = h.error or e
                    finally:
                        q.task_done()

            threading.Thread(target=worker, name=f"{self.name}-callbacks", daemon=True).start()
            self._cbq = q
        return self._cbq

    def _bind_all(self, inputs: Any, labels: Any) -> dict[Value, Any]:
        env: dict[Value, Any] = {}
        for v, x in zip(self.data_inputs, self._split(inputs)):
            env[v] = self._bind_input(v, x)
        if self.label_inputs:
            if labels is None:
                raise GraphError(self.label_inputs[0], "this graph needs labels")
            labs = labels if isinstance(labels, (list, tuple)) and len(self.label_inputs) > 1 \
                else [labels]
            for v, x in zip(self.label_inputs, labs):
                env[v] = self._bind_labels(v, x)
        first: dict[int, tuple[int, Value]] = {}
        for v in self.inputs:  # one batch size per step (among inputs batched on the same axis)
            t = env[v]
            if t.ndim > v.batch_dim:
                n = t.shape[v.batch_dim]
                n0, v0 = first.setdefault(v.batch_dim, (n, v))
                if n != n0:
                    raise GraphError(v, f"batch of {n}, but {v0.name} has a batch of {n0}")
        return env

    def _batch_of(self, env: dict[Value, Any]) -> int:
        for v in self.data_inputs:
            return env[v].shape[v.batch_dim]
        return 0

    def _encode(self, inputs: Any, labels: Any) -> Handle:
        env = self._bind_all(inputs, labels)
        if self.training:
            self._prepare_updates()
        batch = self._batch_of(env)
        prog = self._programs.get(batch)
        if prog is None:
            prog = self._programs[batch] = _Program(batch)
        step_no = self._steps_encoded
        rc = RunContext(self, step_no, self.training)
        outs = self._execute(prog, env, rc)
        self._steps_encoded += 1
        h = Handle(self, step_no, outs, self._loss_output_index)
        self._last = h
        return h

    def _execute(self, prog: _Program, env: dict[Value, Any], rc: RunContext,
                 keep_alloc: list | None = None) -> list[Any]:
        plan_memory = self.options["memory"] and prog.calibrated and bool(prog.expect)
        # the first run of a batch size warms the ops' caches; the second one calibrates
        calibrate = self.options["memory"] and not prog.calibrated and prog.runs >= 1
        prog.runs += 1
        hook = M.AllocHook(self.device) if (plan_memory or calibrate or keep_alloc is not None) \
            else None
        calib: list[tuple[list, list]] = []
        ghosts = M.Ghosts() if calibrate else None  # the record without the memory (memory.py)
        ctx = hook.installed() if hook is not None else _nullcontext()
        if hook is not None:
            hook.keep = keep_alloc
        with ctx:
            for i, st in enumerate(self.steps):
                ins = [env[v] for v in st.ins]
                if plan_memory and i in prog.views:
                    # an eliminated concatenation: its sources already sit in its result
                    off, nb, shape, dt = prog.views[i]
                    outs = [Tensor(prog.arena.view(off, nb), shape, dt)]
                    d = getattr(st.node, "_d", 0)
                    rc.state[st.node] = [t.shape[d] for t in ins]
                else:
                    if hook is not None:
                        hook.start_step(prog.expect[i] if plan_memory else None, calibrate)
                    slot = prog.strided.get(i) if plan_memory else None
                    if slot is not None:
                        off, nb, shape, dt, ns, key = slot
                        rc.out_slot = (Tensor(prog.arena.view(off, nb), shape, dt), ns)
                        hook.skip = {key}  # the output request the op no longer makes
                    outs = self._run_step(st, rc, ins)
                    if slot is not None:
                        if rc.out_slot is not None:
                            raise GraphError(st.node, "concat elimination: the node did not take "
                                                      "its out= slice")
                        rc.state[("out_nstride", st.node)] = slot[4]
                    if hook is not None:
                        if ghosts is not None:
                            calib.append(ghosts.step(hook.record or [], list(zip(st.outs, outs))))
                        elif plan_memory and prog.checks[i]:
                            self._check_routed(st, i, prog, outs)
                        hook.end_step()
                self._after_step(st, rc)
                for v, t in zip(st.outs, outs):
                    env[v] = t
                for v in self.free_after[i]:
                    env.pop(v, None)
        if calibrate:
            from .optimize import plan_memory as _plan

            _plan(self, prog, calib)
        return [env[self._eff(v)] for v in self.outputs]

    def _check_routed(self, st: Step, i: int, prog: _Program, outs: list[Any]) -> None:
        for k, slot in prog.checks[i]:
            t = outs[k]
            if not isinstance(t, Tensor) or not M.same_slot(t.buffer, slot):
                raise GraphError(st.node, f"memory plan mismatch in step {i} ({st.kind}): "
                                          f"{st.outs[k].name} did not land in its planned slot "
                                          "(the op's allocations changed since calibration); "
                                          "build the graph with optimize={'memory': False} and "
                                          "report this")

    def _run_step(self, st: Step, rc: RunContext, ins: list[Any]) -> list[Any]:
        n = st.node
        if st.kind == "forward":
            assert isinstance(n, FilterNode)
            outs = n.forward(rc, ins, self.training, st.with_state)
            return list(outs)
        if st.kind == "gradient":
            assert isinstance(n, GradientNode)
            f = n.forward
            gouts: list[Any] = [None] * len(f.results)
            for slot, t in zip(st.grad_slots, ins[:st.ngrads]):
                gouts[slot] = t
            gins, wgrads = f.backward(rc, gouts, ins[st.ngrads:], st.need)
            return [g for g, nd in zip(gins, st.need) if nd] + list(wgrads)
        if st.kind == "sum":
            add = op("add", n)
            acc = ins[0]
            for t in ins[1:]:
                acc = add(acc, t)
            return [acc]
        if st.kind == "update" and st.group is not None:
            st.group.run(self, rc, ins)
            return []
        if st.kind == "update":
            assert isinstance(n, UpdateNode)
            ds = n.forward.weights
            assert ds is not None
            rc.acquire_dict(ds)
            ds.update(list(ins))
            self._count("update", ds)
            return []
        raise AssertionError(st.kind)

    def _after_step(self, st: Step, rc: RunContext) -> None:
        if not self.low_memory:
            rc.acquired.clear()
            return
        keep = st.kind == "gradient" and st.update_after
        for ds in rc.acquired:
            if not keep:
                ds.purge()
                self._count("purge", ds)
        rc.acquired.clear()

    # ---- grouped weight updates -----------------------------------------------------------------
    def _prepare_updates(self) -> None:
        """Before a training step: the first time, group the data sources whose updates can run
        as one multi-tensor launch (optimize['group_updates']); every time, make sure their
        weights still sit in their group's flat buffer (a purge drops the device copies)."""
        if self._update_groups is None:
            self._update_groups = self._group_updates()
        for grp in self._update_groups:
            grp.ensure_flat(self)

    def _group_updates(self) -> list[_UpdateGroup]:
        """Data sources of one optimizer class (SGD, Adam, AdamW, RMSProp; no max_grad_norm;
        the DataSource protocol not overridden) become one update step after the last of their
        gradients, their weights views of one flat buffer (see _UpdateGroup)."""
        if not self.options["group_updates"]:
            return []
        if self.low_memory:
            self._note("updates: not grouped in low-memory mode (weights are loaded and purged "
                       "around each use)")
            return []
        if not self.device.supports_views:
            self._note("updates: not grouped (needs buffer views, which this backend lacks)")
            return []
        from ..optim.multi import why_not_multi

        upd = [i for i, st in enumerate(self.steps) if st.kind == "update"]
        uses: dict[DataSource, int] = {}
        for i in upd:
            ds = self.steps[i].node.forward.weights
            uses[ds] = uses.get(ds, 0) + 1
        by_cls: dict[type, list[tuple[int, DataSource]]] = {}
        opt_owner: dict[int, DataSource] = {}
        skipped: list[str] = []
        for i in upd:
            ds = self.steps[i].node.forward.weights
            assert ds is not None
            custom = [m for m in ("load", "purge", "update")
                      if getattr(type(ds), m) is not getattr(DataSource, m)]
            if custom:
                skipped.append(f"{ds.label} (overrides {', '.join(custom)})")
                continue
            if uses[ds] > 1:
                skipped.append(f"{ds.label} (updated by {uses[ds]} nodes)")
                continue
            if not ds.loaded:
                ds.load()
                self._count("load", ds)
            opt = ds.optimizer
            if opt is None:
                continue  # update() raises, as without grouping
            why = why_not_multi(opt)
            tens = ds.trainable_tensors()
            if not why and (len(opt.params) != len(tens) or
                            any(a is not b for a, b in zip(opt.params, tens))):
                why = "its optimizer's params are not its weights"
            if not why and id(opt) in opt_owner:
                why = f"shares its optimizer with {opt_owner[id(opt)].label}"
            if why:
                skipped.append(f"{ds.label} ({why})")
                continue
            opt_owner[id(opt)] = ds
            by_cls.setdefault(type(opt), []).append((i, ds))
        if skipped:
            self._log("updates: updated on their own: " + "; ".join(skipped))
        groups: list[_UpdateGroup] = []
        drop: set[int] = set()
        for cls, mem in by_cls.items():
            ntens = sum(len(ds.trainable) for _, ds in mem)
            if ntens < 2:
                continue
            last = max(i for i, _ in mem)
            grp = _UpdateGroup([ds for _, ds in mem], [len(self.steps[i].ins) for i, _ in mem])
            ins = [v for i, _ in mem for v in self.steps[i].ins]
            self.steps[last] = Step("update", self.steps[last].node, ins, [], group=grp)
            drop.update(i for i, _ in mem if i != last)
            groups.append(grp)
            self._log(f"updates: {len(mem)} data sources ({cls.__name__}, {ntens} tensors, "
                      f"{grp.size:,} weights in one buffer) updated together after the last of "
                      f"their gradients ({self.steps[last - 1].name}): one {cls.MULTI_KERNEL} "
                      "launch per distinct set of options and step count where their weight "
                      "gradients share the memory plan's arena, one launch per tensor otherwise; "
                      "the results are those of updating each after its gradient")
        if drop:
            self.steps = [st for i, st in enumerate(self.steps) if i not in drop]
            self._lifetimes()
        return groups

    # ---- capture and replay --------------------------------------------------------------------
    def capture(self, inputs: Any, labels: Any = None) -> CapturedStep:
        """Record one step (`Device.capture`: a CUDA graph on cuda, a launch list elsewhere) into
        a CapturedStep whose `run()` re-issues it at a fraction of the host cost. The inputs (and
        labels) become fixed device buffers that `run(new_inputs, new_labels)` overwrites.

        Runs normal steps first (until memory is planned, and one planned step more when updates
        are grouped; they load weights, create optimizer state, upload the update chunk tables).
        Everything the recorded launches use stays allocated while the CapturedStep lives. What a
        replay cannot change: dropout masks (seed and offset are recorded), step-dependent
        optimizer terms (Adam's bias corrections); the outputs are the same buffers every replay
        (read a step's losses before its second successor is queued)."""
        if self.low_memory:
            raise GraphError(None, "capture: not in low-memory mode (a replay cannot load or purge)")
        env = self._bind_all(inputs, labels)
        data = [env[v] for v in self.data_inputs]
        labs = [env[v] for v in self.label_inputs]
        batch = self._batch_of(env)
        planned_runs = 0
        while True:  # runs the step until its memory plan exists (one or two runs)
            was_planned = batch in self._programs and self._programs[batch].calibrated
            self.encode(data, labs[0] if len(labs) == 1 else (labs or None)).wait()
            prog = self._programs[batch]
            planned_runs += was_planned
            if not self.options["memory"]:
                break
            # grouped updates upload their chunk tables at the first planned step (weight
            # gradients then sit in the arena); uploads cannot happen inside a CUDA-graph capture
            if prog.calibrated and (planned_runs or not self._update_groups):
                break
        self.synchronize()
        keep: list[Any] = []
        rc = RunContext(self, self._steps_encoded, self.training)
        # host-side counters the recording run would advance although nothing runs yet
        saved = [(ds, list(ds.optimizer.steps) if ds.optimizer is not None else None,
                  getattr(ds, "num_batches_tracked", None)) for ds in self.data_sources]
        with self._encode_lock, self.device.capture() as rec:
            outs = self._execute(prog, dict(env), rc, keep_alloc=keep)
        for ds, steps, nbt in saved:
            if steps is not None:
                ds.optimizer.steps = steps
            if nbt is not None:
                ds.num_batches_tracked = nbt
        if any(st.kind == "forward" and type(st.node).__name__ == "DropoutNode" for st in self.steps) \
                and self.training:
            self._note("capture: dropout masks repeat on every replay (seed and offset are recorded)")
        for ds in self.data_sources:
            if ds.optimizer is not None and type(ds.optimizer).__name__ in ("Adam", "AdamW"):
                self._note(f"capture: {ds.label}'s Adam bias corrections are frozen at step "
                           f"{ds.optimizer.steps[0]} in the recording")
        self._log(f"capture: {len(rec)} launches recorded for batch {prog.batch}")
        return CapturedStep(self, rec, data, labs, outs, keep, env)

    # ---- weights ----------------------------------------------------------------------------------
    def purge(self) -> None:
        """Purge every data source (waits for queued steps first)."""
        self.synchronize()
        for ds in self.data_sources:
            if ds.loaded:
                ds.purge()
                self._count("purge", ds)

    def memory_report(self, batch: int | None = None) -> M.MemoryReport | None:
        """The memory plan of the compiled step for `batch` (the last one compiled if None);
        None before a step of that size has run (planning needs one run)."""
        if not self._programs:
            return None
        prog = self._programs[batch] if batch is not None else list(self._programs.values())[-1]
        return prog.report

    def state_dict(self) -> dict[str, np.ndarray]:
        from .io import graph_state_dict

        return graph_state_dict(self)

    def load_state_dict(self, d: Mapping[str, Any], strict: bool = True,
                        mapping: Mapping[str, Any] | None = None) -> list[str]:
        """Parameters (and optimizer states) from a dict of arrays keyed `<node>.<param>`, as
        state_dict() or a PyTorch state_dict (mapping: torch prefix -> node or node name)."""
        from .io import load_graph_state

        return load_graph_state(self, d, strict, mapping)

    def save(self, path: Any) -> None:
        from .io import save_graph

        save_graph(self, path)

    def load(self, path: Any) -> None:
        from .io import load_graph

        load_graph(self, path)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}: {len(self.steps)} steps on {self.device.name}>"


class _UpdateGroup:
    """Data sources updated by one step (Graph._group_updates): their trainable weights are
    views of ONE flat float32 buffer (each at a 64-byte aligned offset, fixed for the graph's
    life), their optimizers share a MultiTensorStep (flat state buffers laid out like the
    weights), and the step updates them all at once: one <rule>_step_multi launch per distinct
    params struct where the weight gradients are views of one base buffer (the planner's arena),
    per-tensor launches where they are not (the first steps of a batch size, before the plan)."""

    ALIGN = 16  # floats

    def __init__(self, members: list[DataSource], nins: list[int]):
        self.members = members
        # the step's inputs: each member's weight gradients, in member order
        ends = np.cumsum(nins).tolist()
        self.bounds = list(zip([0] + ends[:-1], ends))
        self.layout: dict[DataSource, list[tuple[str, int]]] = {}
        off = 0
        for ds in members:
            ent = []
            for name in ds.trainable:
                ent.append((name, off))
                n = int(ds._host[name].size)
                off += -(-max(n, 1) // self.ALIGN) * self.ALIGN
            self.layout[ds] = ent
        self.size = off
        self.flat: Any = None
        self.ms: Any = None
        self._placed: dict[DataSource, Any] = {}

    def ensure_flat(self, g: Graph) -> None:
        """Weights into the flat buffer (at the first step, and after a purge or a reload)."""
        moved = False
        for ds in self.members:
            if ds._dev is not None and self._placed.get(ds) is ds._dev:
                continue
            if not ds.loaded:
                ds.load()
                g._count("load", ds)
            if self.flat is None:
                self.flat = g.device.buffer(max(self.size, 1) * 4)
            dev = ds.tensors()
            for name, off in self.layout[ds]:
                t = dev[name]
                if t.buffer.base is self.flat and t.buffer.offset == off * 4:
                    continue
                v = Tensor(self.flat.view(off * 4, t.size * 4), t.shape, t.dtype)
                if t.size:
                    # the host copy is current unless the device copy changed since the load
                    src = t.numpy() if ds._dirty else ds._host[name]
                    g.device.write_async(v.buffer, np.asarray(src, np.float32).ravel())
                dev[name] = v
            ds._bind_optimizer()  # the optimizer updates the views (its state stays)
            self._placed[ds] = ds._dev
            moved = True
        if moved or self.ms is None:
            from ..optim.multi import MultiTensorStep

            opts = [ds.optimizer for ds in self.members]
            if self.ms is None or any(a is not b for a, b in zip(self.ms.optimizers, opts)):
                self.ms = MultiTensorStep(opts)

    def run(self, g: Graph, rc: RunContext, ins: list[Any]) -> None:
        for ds in self.members:
            rc.acquire_dict(ds)
        self.ms.step([ins[a:b] for a, b in self.bounds])
        for ds in self.members:
            ds._dirty = True
            g._count("update", ds)


class CapturedStep:
    """A recorded step of a graph (Graph.capture); `run()` replays it."""

    def __init__(self, graph: Graph, rec: Any, inputs: list[Tensor], labels: list[Any],
                 outputs: list[Any], keep: list[Any], env: dict):
        self.graph, self.recording = graph, rec
        self.inputs, self.labels, self.outputs = inputs, labels, outputs
        self._keep, self._env = keep, env  # every buffer the recorded launches touch
        # batch norms whose running statistics (and counter) a training replay advances
        self._tracked = [ds for ds in graph.data_sources if graph.training and
                         hasattr(ds, "num_batches_tracked") and ds.running_stats]

    def __len__(self) -> int:
        return len(self.recording)

    def run(self, inputs: Any = None, labels: Any = None,
            callback: Callable[[Handle], Any] | None = None) -> Handle:
        """Write new inputs / labels (if given) into the recorded buffers and replay."""
        g = self.graph
        with g._encode_lock:
            g._sem.acquire()
            try:
                new: list[tuple[Value, Tensor, Any]] = []
                if inputs is not None:
                    new += zip(g.data_inputs, self.inputs, g._split(inputs))
                if labels is not None:
                    labs = labels if isinstance(labels, (list, tuple)) and len(self.labels) > 1 \
                        else [labels]
                    new += zip(g.label_inputs, self.labels, labs)
                for v, t, x in new:
                    arr = np.asarray(x)
                    if arr.shape != t.shape:
                        raise GraphError(v, f"captured with shape {t.shape}, got {arr.shape}")
                    if isinstance(v, LabelsNode) and t.dtype == int32:
                        g._bind_labels(v, arr)  # range check (and a throwaway upload)
                    g._write(t, arr)
                self.recording.replay()
                for ds in g.data_sources:
                    opt = ds.optimizer
                    if opt is not None:
                        opt.steps = [s + 1 for s in opt.steps]
                for ds in self._tracked:
                    ds.num_batches_tracked += 1
                    ds.mark_dirty()
                step = g._steps_encoded
                g._steps_encoded += 1
                h = Handle(g, step, self.outputs, g._loss_output_index)
                g._last = h
            except BaseException:
                g._sem.release()
                raise
            g._signal(h, callback)
            return h


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: Any) -> None:
        return None


class TrainingGraph(Graph):
    """The training graph of a loss node (MPS's trainingGraphWithSourceGradient): forward, the
    loss, the gradient pass (one gradient node per forward node that needs one; gradients of
    values read by several nodes summed) and the weight updates, which call each trainable data
    source's update() (with `optimizer`, a callable params -> pymetalnn.optim optimizer, for data
    sources that bring none).

    encode(images, labels) returns the per-sample losses in the handle (`handle.losses`).
    extra_results: other values to compute and return (e.g. predictions). strict (default): a
    node that reads the graph's values but reaches neither the loss nor an extra result is an
    error (strict=False drops it)."""

    def __init__(self, loss: Any, *, optimizer: Callable[[list[Tensor]], Any] | None = None,
                 extra_results: Sequence[Any] = (), device: Device | None = None,
                 optimize: Any = True, low_memory: bool = False, in_flight: int = 2,
                 strict: bool = True, name: str = "training graph"):
        loss_node = loss.producer if isinstance(loss, Value) else loss
        if not isinstance(loss_node, LossNode):
            raise GraphError(loss_node if isinstance(loss_node, Node) else None,
                             "TrainingGraph needs a loss node")
        self.loss_node = loss_node
        self.optimizer_factory = optimizer
        extras = [as_value(v) for v in extra_results]

        def build(g: Graph, dev: Device | None) -> None:
            fwd = g._forward_nodes([loss_node.result] + extras, strict)
            g.forward_order = fwd
            g._rewrite()
            sinks = g._gradient_pass()
            g._finish(sinks, dev)
            g._loss_output_index = 0
            missing = [ds for ds in g.data_sources if ds.trainable and ds.optimizer is None
                       and ds.optimizer_factory is None]
            for ds in missing:
                if optimizer is None:
                    owner = next(n for n in g.nodes if getattr(n, "weights", None) is ds)
                    raise GraphError(owner, f"data source {ds.label} has no optimizer: pass "
                                            "optimizer= to it or to the TrainingGraph")
                ds.optimizer_factory = optimizer

        super().__init__([loss_node.result] + extras, training=True, device=device,
                         optimize=optimize, low_memory=low_memory, in_flight=in_flight,
                         strict=strict, name=name, _prebuilt=build)

    def _target_word(self) -> str:
        return "loss"

    def _gradient_pass(self) -> list[Node]:
        """Gradient nodes from the loss back, gradient sums, updates; returns the sinks."""
        order = self.forward_order
        loss = self._eff(self.loss_node.result).producer
        assert isinstance(loss, LossNode)
        requires: set[Value] = set()
        for n in order:
            srcs = [self._eff(s) for s in n.sources if s is not None]
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
                if s is not None and self._eff(s) in requires and n.differentiable(i):
                    grads.setdefault(self._eff(s), []).append(gn.results[i])
            if gn.weight_results:
                updates.append(UpdateNode(gn))
        if not updates:
            raise GraphError(loss, "nothing to train: no node with trainable weights reaches the "
                                   "loss")
        sinks: list[Node] = [loss] + [self._eff(v).producer for v in self.outputs[1:]
                                      if self._eff(v).producer is not None]
        return sinks + self._dangling_kept + updates

    def step(self, images: Any, labels: Any) -> float:
        """One training step, synchronously; returns the loss."""
        return self.encode(images, labels).loss

    def inference_graph(self, result: Any = None, **kw: Any) -> Graph:
        """An inference graph over the same nodes and data sources (shared weights): dropout
        off, batch norm on its running statistics. result: the value to compute (default: the
        loss node's source, e.g. the logits)."""
        res = result if result is not None else self.loss_node.sources[0]
        kw.setdefault("optimize", self.options)
        kw.setdefault("device", self.device)
        kw.setdefault("name", f"inference of {self.name}")
        return Graph(res, training=False, **kw)
