"""Running a graph: binding inputs and labels, encoding a step (each node's forward or backward
queues its kernels through the functional ops), handles and completion callbacks, and the
program of a batch size (its memory plan, made by optimize.plan_memory after a calibration run).

GraphRunner is the part of Graph (graph.py) that encodes steps.
"""
from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from .. import functional as F
from ..runtime import Device
from ..runtime.errors import AsyncError
from ..tensor import Tensor, int32
from . import memory as M
from .datasource import DataSource
from .errors import GraphError
from .nodes import FilterNode, GradientNode, ImageNode, LabelsNode, UpdateNode, Value

if TYPE_CHECKING:
    from .build import Step
    from .graph import Graph
    from .updates import UpdateGroup

log = logging.getLogger("pymetalnn.graph")


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
        """The weight and bias the node's math reads: float16 copies in a mixed-precision graph."""
        t = self.math_weights(ds)
        return t["weight"], t.get("bias")

    def math_weights(self, ds: DataSource) -> dict[str, Tensor]:
        """acquire_dict, with the trainable float32 tensors as float16 copies in a
        mixed-precision graph (conv / linear / recurrent math; see mixed.py)."""
        t = self.acquire_dict(ds)
        if self.g.precision != "mixed":
            return t
        from .mixed import half_copies

        return {**t, **half_copies(self.g, ds, t, ds.trainable, self)}

    @property
    def mixed(self) -> bool:
        return self.g.precision == "mixed"

    def accumulate(self) -> dict[str, str]:
        """accumulate= for conv / linear ops: {"accumulate": "half"} when the graph asks for it."""
        return {"accumulate": "half"} if self.g.accumulate == "half" else {}

    def loss_input(self, x: Any) -> Any:
        """A loss's input in float32 (mixed precision computes losses in float)."""
        if self.mixed and isinstance(x, Tensor) and x.dtype == np.float16:
            return F.cast(x, np.float32)
        return x

    def loss_unit(self, dev: Device) -> Any:
        """The gradient of a loss reduced by the op itself: 1, or the loss scale (mixed)."""
        if self.mixed and self.g._scaler is not None:
            return self.g._scaler.seed(1, 1.0)
        return 1.0

    def release(self, ds: DataSource) -> None:
        """Nodes say they are done with the weights; the graph purges them in low-memory mode
        at the end of the step."""

    def note(self, msg: str) -> None:
        self.g.note_once(msg)

    def loss_scale(self, n: int, reduction: str, dev: Device) -> Tensor:
        """The gradient of the reduced loss with respect to each of n per-sample losses (1 / n
        for a mean); times the loss scale in a mixed-precision training graph (written on the
        device in the step)."""
        base = 1.0 / n if reduction == "mean" else 1.0
        if self.mixed and self.g._scaler is not None:
            return self.g._scaler.seed(n, base)
        return self.g._const(("loss_scale", n, reduction), lambda: np.full(n, base, np.float32))


# ---- compiled programs --------------------------------------------------------------------------

class Program:
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


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: Any) -> None:
        return None


class GraphRunner:
    """Graph's running part: inputs, encode / run, the step loop."""

    def _init_running(self) -> None:
        self._programs: dict[int, Program] = {}
        self._consts: dict[Any, Tensor] = {}
        self._sem = threading.BoundedSemaphore(self.in_flight)
        self._cbq: queue.Queue | None = None
        self._steps_encoded = 0
        self._update_groups: list[UpdateGroup] | None = None
        self._grad_store: dict[Any, list[Tensor]] | None = None  # keep_gradients: ds -> copies
        self._last: Handle | None = None
        self._encode_lock = threading.Lock()
        self._step_ctr: Tensor | None = None  # the device step counter (see step_counter)
        self._half_store: dict[int, dict[str, Tensor]] = {}  # mixed: float16 weight copies
        self._scaler: Any = None
        if self.precision == "mixed" and self.training and \
                getattr(self, "loss_node", None) is not None:
            from .mixed import make_scaler

            self._scaler = make_scaler(self.device, self._grad_scaler_opts)

        # hook(graph, i, env) after step i of every encoded (or captured) step has queued its
        # work, its results in env (pymetalnn.distributed averages weight gradients here)
        self.step_hooks: list[Callable[[Any, int, dict[Value, Any]], None]] = []

    # ---- step-dependent values on the device -----------------------------------------------------
    def step_counter(self) -> Tensor:
        """The step number on the device (uint32 lo, hi): what dropout masks are drawn from. A
        kernel at the end of every training step advances it, so the recorded step of a capture
        replays with the step it runs at, as an encoded step does."""
        if self._step_ctr is None:
            from ..tensor import tensor

            n = self._steps_encoded
            words = np.array([n & 0xFFFFFFFF, n >> 32], np.uint32).view(np.int32)
            self._step_ctr = tensor(words, self.device)
        return self._step_ctr

    def _set_step_counter(self, n: int) -> None:
        if self._step_ctr is not None:
            self._write(self._step_ctr,
                        np.array([n & 0xFFFFFFFF, n >> 32], np.uint32).view(np.int32))

    def _step_dependent(self) -> bool:
        """Whether a training step reads the device step counter (dropout)."""
        got = getattr(self, "_uses_step_ctr", None)
        if got is None:
            got = self._uses_step_ctr = self.training and any(
                getattr(st.node, "uses_step_counter", False)
                for st in self.steps if st.kind == "forward")
        return got

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
            t = self._upload(arr, self._input_dtype(v))
        if t.dtype not in (v.dtype, self._input_dtype(v)):
            raise GraphError(v, f"got dtype {t.dtype}, expected {v.dtype}")
        if t.dtype != self._input_dtype(v):  # mixed precision: float16 activations
            t = F.cast(t, self._input_dtype(v))
        return t

    def _input_dtype(self, v: ImageNode) -> Any:
        """The dtype an input has on the device: float16 for a float32 data input of a
        mixed-precision graph (labels and targets keep theirs: losses compute in float)."""
        if self.precision == "mixed" and v.dtype == np.float32 and not isinstance(v, LabelsNode):
            return np.dtype(np.float16)
        return v.dtype

    def _bind_labels(self, v: LabelsNode, x: Any) -> Any:
        loss = self._loss_of.get(v)
        if isinstance(x, LossLabels):
            x = x.labels
        if loss is not None and hasattr(loss, "bind_labels"):  # a loss that checks its own labels
            return loss.bind_labels(self, v, x)
        if loss is None or not loss.class_labels:
            return self._bind_input(v, x)
        c = self.resolve(loss.sources[0]).shape[1]
        ii = loss.options.get("ignore_index", -100)
        if isinstance(x, F.Labels) and x.num_classes == c and x.ignore_index == ii:
            t, shape = x, x.shape
        elif isinstance(x, Tensor):  # range-checked by the loss's kernels: no read-back
            if x.dtype != int32:
                raise GraphError(v, f"expected int32 class labels, got dtype {x.dtype}")
            if x.device is not self.device:
                raise GraphError(v, f"labels are on {x.device.name}, the graph on "
                                    f"{self.device.name}")
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
        return t if t is not None else F.Labels(self._upload(arr.astype(np.int32), int32), c, ii)

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
            self._check_failed()
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

    _failed_step: tuple[int, BaseException] | None = None

    def _check_failed(self) -> None:
        """A training step whose work failed may have left garbage in the weights or optimizer
        state (an update reading a failed gradient, or an update not done): no further step is
        encoded until they are loaded again (load / load_state_dict)."""
        if self._failed_step is not None:
            step, err = self._failed_step
            raise AsyncError(f"step {step} of this training graph failed ({err}); its weights "
                             "and optimizer state may hold results of the failed work, so no "
                             "further step is encoded: load a checkpoint (load / "
                             "load_state_dict) first", getattr(err, "kernel", None))

    def _signal(self, h: Handle, callback: Callable | None) -> None:
        def done(err: BaseException | None = None) -> None:
            if err is not None:  # work of this step failed: its wait() raises it
                h.error = h.error or err
                if self.training and self._failed_step is None:
                    self._failed_step = (h.step, err)
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
                if n == 0:  # every loss refuses empty inputs (ops/loss.py), so the step does too
                    raise GraphError(v, f"a batch of 0 (shape {t.shape}); a step needs at least "
                                        "one sample")
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
        if self._scaler is not None:
            self._install_scaler()
        batch = self._batch_of(env)
        prog = self._programs.get(batch)
        if prog is None:
            prog = self._programs[batch] = Program(batch)
        if prog.arena is not None:  # per-step values, written before read: a failed earlier
            self.device.forget_failures(prog.arena)  # step does not fail this one
        step_no = self._steps_encoded
        rc = RunContext(self, step_no, self.training)
        outs = self._execute(prog, env, rc)
        self._steps_encoded += 1
        h = Handle(self, step_no, outs, self._loss_output_index)
        self._last = h
        return h

    def _execute(self, prog: Program, env: dict[Value, Any], rc: RunContext,
                 keep_alloc: list | None = None) -> list[Any]:
        plan_memory = self.options["memory"] and prog.calibrated and bool(prog.expect)
        # the first run of a batch size warms the ops' caches; the second one calibrates
        calibrate = self.options["memory"] and not prog.calibrated and prog.runs >= 1
        prog.runs += 1
        advance = self._step_dependent()
        if advance:  # made before the allocation hook sees requests (not a step's output)
            self.step_counter()
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
                    d = getattr(st.node, "axis", 0)
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
                for hook_fn in self.step_hooks:
                    hook_fn(self, i, env)
                for v in self.free_after[i]:
                    env.pop(v, None)
        if advance:  # the next step draws the next masks: advanced on the device, in the step
            assert self._step_ctr is not None
            F.dropout_offset_advance(self._step_ctr)
        if calibrate:
            from .optimize import plan_memory as _plan

            _plan(self, prog, calib)
        return [env[self.resolve(v)] for v in self.outputs]

    def _check_routed(self, st: Step, i: int, prog: Program, outs: list[Any]) -> None:
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
            acc = ins[0]
            for t in ins[1:]:
                acc = F.add(acc, t)
            return [acc]
        if st.kind == "amp_check":  # every weight gradient exists: the overflow verdict
            self._scaler.check(ins)
            return []
        if st.kind == "amp_update":
            self._scaler.update()
            return []
        if st.kind == "update" and st.group is not None:
            if self._grad_store is not None:
                for ds, (a, b) in zip(st.group.members, st.group.bounds):
                    self._keep_grads(ds, ins[a:b])
            st.group.run(self, rc, ins)
            return []
        if st.kind == "update":
            assert isinstance(n, UpdateNode)
            ds = n.forward.weights
            assert ds is not None
            if self._grad_store is not None:
                self._keep_grads(ds, ins)
            rc.acquire_dict(ds)
            ds.update(list(ins))
            self._count("update", ds)
            return []
        raise AssertionError(st.kind)

    def _install_scaler(self) -> None:
        """Every optimizer of a mixed-precision graph reads the scaler's state (unscale, skip);
        checked before anything of the step is queued."""
        for ds in self.data_sources:
            if ds.trainable and not ds.loaded:
                ds.load()
                self._count("load", ds)
            opt = ds.optimizer
            if opt is None:
                continue
            if not opt.DEVICE_STEP:
                raise GraphError(None, f"mixed precision: the custom optimizer of {ds.label} "
                                       "cannot unscale or skip on the device; use a built-in one")
            opt.amp = self._scaler.buffer

    # ---- readable weight gradients ----------------------------------------------------------------
    def keep_gradients(self, on: bool = True) -> None:
        """Keep a copy of every weight gradient of each training step (one queued copy per
        gradient, into buffers of its own outside the memory plan, made at the first step), so
        gradients() can read them; grouped updates and captured replays stay as they are. In
        mixed precision they are the gradients as computed: float16, multiplied by the loss
        scale of their step (as torch's .grad before GradScaler.unscale_)."""
        self._grad_store = {} if on else None

    def gradients(self) -> dict[str, np.ndarray]:
        """The weight gradients of the last training step, keyed like state_dict
        (`<node>.<param>`, trainable parameters only); needs keep_gradients() before the step."""
        if self._grad_store is None:
            raise GraphError(None, "gradients: call keep_gradients() before the training steps")
        from .io import named_sources

        self.synchronize()
        out: dict[str, np.ndarray] = {}
        for name, ds in named_sources(self).items():
            shapes = ds.shapes()  # the state_dict's shapes (a Conv1d's weight runs 4-D)
            for k, t in zip(ds.trainable, self._grad_store.get(ds, [])):
                out[f"{name}.{k}"] = t.numpy().reshape(shapes.get(k, t.shape)).copy()
        return out

    def _keep_grads(self, ds: Any, grads: list[Any]) -> None:
        from ..tensor import tensor

        store = self._grad_store.get(ds)
        if store is None:  # host-made buffers: not served by the allocation hook
            store = self._grad_store[ds] = [tensor(np.zeros(g.shape, g.dtype), g.device) for g in grads]
        for g, t in zip(grads, store):
            if g is not None and g.size:
                F.copy(g, out=t)

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
