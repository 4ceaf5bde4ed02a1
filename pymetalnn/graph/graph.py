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

The Graph class is this facade over its parts: build.py (steps from nodes, the gradient pass),
run.py (binding, encoding, handles), updates.py (grouped weight updates), capture.py (capture
and replay); optimize.py's passes and memory planner work through its public methods.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Callable

import numpy as np

from ..runtime import Device
from ..tensor import Tensor, tensor
from . import memory as M
from .build import OPTIMIZATIONS, GraphBuilder, Step, _options, topo_order
from .capture import CapturedStep, capture_step
from .datasource import DataSource
from .errors import GraphError
from .nodes import LossNode, Node, Value, as_value
from .run import GraphRunner, Handle, LossLabels, RunContext, log
from .updates import UpdateGroup, prepare_updates

__all__ = ["OPTIMIZATIONS", "CapturedStep", "Graph", "Handle", "LossLabels", "RunContext", "Step",
           "TrainingGraph", "UpdateGroup", "topo_order"]


class Graph(GraphBuilder, GraphRunner):
    """An inference graph (or the base of TrainingGraph): the nodes the `results` depend on.

    results: values or nodes to compute. training: run dropout / batch norm in training mode.
    optimize: True, False, or a dict of switches {"fuse", "concat", "dead_nodes", "memory",
    "group_updates"}
    (every pass logs what it did to `graph.log` and the "pymetalnn.graph" logger).
    low_memory: load weights before each use and purge them after. in_flight: how many encoded
    steps may be queued at once (2: double buffering). precision: "float32", or "mixed" (float16
    activations and conv / linear / recurrent math on float16 copies of the float32 weights,
    batch-norm statistics and losses in float; see mixed.py); accumulate: "float" (default) or
    "half" (float16 accumulation in conv / linear, mixed precision only)."""

    _loss_output_index: int | None = None  # which output holds the per-sample losses

    def __init__(self, results: Any, *, training: bool = False, device: Device | None = None,
                 optimize: Any = True, low_memory: bool = False, in_flight: int = 2,
                 strict: bool = False, name: str = "graph", precision: str = "float32",
                 accumulate: str = "float", _prebuilt: Any = None):
        from .mixed import check_precision

        self.name = name
        self.training = bool(training)
        self.precision, self.accumulate = check_precision(precision, accumulate)
        if self.precision == "mixed" and low_memory:
            raise ValueError("low_memory: not with precision='mixed' (the float16 weight copies "
                             "and deferred updates keep weights loaded)")
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
            sinks: list[Node] = [self.resolve(v).producer for v in self.outputs
                                 if self.resolve(v).producer is not None]
            sinks += self._dangling_kept
            self._finish(sinks, device)
        else:
            _prebuilt(self, device)

    @property
    def step_count(self) -> int:
        """Steps encoded so far (the step number of the next one: dropout offsets use it)."""
        return self._steps_encoded

    @step_count.setter
    def step_count(self, n: int) -> None:
        """Continue from step n (a loaded checkpoint's count)."""
        self._steps_encoded = int(n)
        self._set_step_counter(int(n))

    # ---- logging -------------------------------------------------------------------------------
    def note(self, msg: str) -> None:
        """Add a line to `log` (and the "pymetalnn.graph" logger): what a pass or a step did."""
        self.log.append(msg)
        log.info("%s: %s", self.name, msg)

    def note_once(self, msg: str) -> None:
        """note(msg) unless the same line was noted before (per-step remarks)."""
        if msg not in self._notes:
            self._notes.add(msg)
            self.note(msg)

    def _count(self, what: str, ds: DataSource) -> None:
        key = (what, ds.label)
        self.counts[key] = self.counts.get(key, 0) + 1

    def _const(self, key: Any, make: Callable[[], np.ndarray]) -> Tensor:
        t = self._consts.get(key)
        if t is None:
            t = self._consts[key] = tensor(make(), self.device)
        return t

    # ---- grouped updates, capture --------------------------------------------------------------
    def _prepare_updates(self) -> None:
        prepare_updates(self)

    def capture(self, inputs: Any, labels: Any = None) -> CapturedStep:
        """Record one step into a CapturedStep whose `run()` re-issues it (see capture.py)."""
        return capture_step(self, inputs, labels)

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
        """The model's parameters and buffers only, keyed `<node>.<param>` with PyTorch's names:
        what torch.nn.Module.load_state_dict takes for a module named like the nodes (no
        optimizer or step keys; those are in training_state_dict)."""
        from .io import graph_state_dict

        return graph_state_dict(self, optimizer=False, steps=False)

    def training_state_dict(self) -> dict[str, np.ndarray]:
        """state_dict plus the optimizer states (`<node>.optim.<key>`) and the step count: what
        save() writes and load_state_dict restores to continue training."""
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


class TrainingGraph(Graph):
    """The training graph of a loss node (MPS's trainingGraphWithSourceGradient): forward, the
    loss, the gradient pass (one gradient node per forward node that needs one; gradients of
    values read by several nodes summed) and the weight updates, which call each trainable data
    source's update() (with `optimizer`, a callable params -> pymetalnn.optim optimizer, for data
    sources that bring none).

    encode(images, labels) returns the per-sample losses in the handle (`handle.losses`).
    extra_results: other values to compute and return (e.g. predictions). strict (default): a
    node that reads the graph's values but reaches neither the loss nor an extra result is an
    error (strict=False drops it).

    precision="mixed" trains as PyTorch's autocast(float16) + GradScaler (mixed.py): float16
    activations and math, float32 master weights in the optimizers, dynamic loss scaling on the
    device. grad_scaler: None (GradScaler's defaults: init_scale 2^16, growth_factor 2,
    backoff_factor 0.5, growth_interval 2000), a dict of those options, or False (no loss
    scaling). `grad_scaler` (the attribute) reads its state: scale, found_inf, state_dict()."""

    def __init__(self, loss: Any, *, optimizer: Callable[[list[Tensor]], Any] | None = None,
                 extra_results: Sequence[Any] = (), device: Device | None = None,
                 optimize: Any = True, low_memory: bool = False, in_flight: int = 2,
                 strict: bool = True, name: str = "training graph", precision: str = "float32",
                 accumulate: str = "float", grad_scaler: Any = None):
        loss_node = loss.producer if isinstance(loss, Value) else loss
        self._grad_scaler_opts = grad_scaler
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
                         strict=strict, name=name, precision=precision, accumulate=accumulate,
                         _prebuilt=build)

    @property
    def grad_scaler(self) -> Any:
        """The loss scaler of a mixed-precision graph (mixed.GradScaler), None otherwise."""
        return self._scaler

    def _target_word(self) -> str:
        return "loss"

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
        kw.setdefault("precision", self.precision)
        kw.setdefault("accumulate", self.accumulate)
        kw.setdefault("name", f"inference of {self.name}")
        return Graph(res, training=False, **kw)
