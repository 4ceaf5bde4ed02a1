"""Capture and replay: one step recorded (`Device.capture`: a CUDA graph on cuda, a launch list
elsewhere) and re-issued by CapturedStep.run at a fraction of the host cost.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ..runtime import Buffer
from ..tensor import Tensor, int32
from .errors import GraphError
from .nodes import LabelsNode, Value
from .run import Handle, RunContext

if TYPE_CHECKING:
    from .graph import Graph


def capture_step(g: Graph, inputs: Any, labels: Any = None) -> CapturedStep:
    """Record one step (`Device.capture`: a CUDA graph on cuda, a launch list elsewhere) into
    a CapturedStep whose `run()` re-issues it at a fraction of the host cost. The inputs (and
    labels) become fixed device buffers that `run(new_inputs, new_labels)` overwrites.

    Runs normal steps first (until memory is planned, and one planned step more when updates
    are grouped; they load weights, create optimizer state, upload the update chunk tables).
    Everything the recorded launches use stays allocated while the CapturedStep lives.

    A replay is the same computation as an encoded step: what changes from step to step lives
    on the device and advances inside the recorded step (the step counter dropout masks are
    drawn from, each tensor's optimizer step count that Adam's bias corrections are computed
    from, a mixed-precision graph's loss scale), so N replays leave losses, weights and
    optimizer state as N encoded steps do. Host-side values are recorded as they are: learning
    rates and other options edited after the capture need a new capture, and a CustomOptimizer
    (whose kernel sees the host's step count) is refused. The outputs are the same buffers every
    replay (read a step's losses before its second successor is queued)."""
    if g.low_memory:
        raise GraphError(None, "capture: not in low-memory mode (a replay cannot load or purge)")
    env = g._bind_all(inputs, labels)
    data = [env[v] for v in g.data_inputs]
    labs = [env[v] for v in g.label_inputs]
    batch = g._batch_of(env)
    planned_runs = 0
    while True:  # runs the step until its memory plan exists (one or two runs)
        was_planned = batch in g._programs and g._programs[batch].calibrated
        g.encode(data, labs[0] if len(labs) == 1 else (labs or None)).wait()
        prog = g._programs[batch]
        planned_runs += was_planned
        if not g.options["memory"]:
            break
        # grouped updates (and a mixed-precision graph's finite check) make their chunk tables
        # at the first planned step (weight gradients then sit in the arena); uploads cannot
        # happen inside a CUDA-graph capture
        if prog.calibrated and (planned_runs or not (g._update_groups or g._scaler)):
            break
    g.synchronize()
    custom = [ds.label for ds in g.data_sources if g.training and ds.optimizer is not None
              and not ds.optimizer.DEVICE_STEP]
    if custom:
        raise GraphError(None, "capture: the custom optimizer of " + ", ".join(custom) + " sees "
                               "the host's step count, which a replay cannot advance")
    keep: list[Any] = []
    rc = RunContext(g, g._steps_encoded, g.training)
    # host-side counters the recording run would advance although nothing runs yet
    saved = [(ds, list(ds.optimizer.steps) if ds.optimizer is not None else None,
              getattr(ds, "num_batches_tracked", None)) for ds in g.data_sources]
    with g._encode_lock, g.device.capture() as rec:
        outs = g._execute(prog, dict(env), rc, keep_alloc=keep)
    for ds, steps, nbt in saved:
        if steps is not None:
            ds.optimizer.steps = steps
        if nbt is not None:
            ds.num_batches_tracked = nbt
    g.note(f"capture: {len(rec)} launches recorded for batch {prog.batch}")
    cs = CapturedStep(g, rec, data, labs, outs, keep, env)
    cs._arena = prog.arena  # per-step values: see run()
    return cs



class CapturedStep:
    """A recorded step of a graph (Graph.capture); `run()` replays it."""

    _arena: Any = None

    def __init__(self, graph: Graph, rec: Any, inputs: list[Tensor], labels: list[Any],
                 outputs: list[Any], keep: list[Any], env: dict):
        self.graph, self.recording = graph, rec
        self.inputs, self.labels, self.outputs = inputs, labels, outputs
        self._keep, self._env = keep, env  # every buffer the recorded launches touch
        # what the recorded step allocated outside the memory plan (outputs, workspaces): fresh
        # memory at every encoded step, so written there before it is read
        self._fresh = [b for b in keep if isinstance(b, Buffer)]
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
            g._check_failed()
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
                if self._arena is not None:  # a failed earlier replay does not fail this one
                    g.device.forget_failures(self._arena)
                for b in self._fresh:  # nor the step's own allocations (outputs, workspaces)
                    g.device.forget_failures(b)
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
