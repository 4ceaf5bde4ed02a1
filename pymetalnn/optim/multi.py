"""Multi-tensor updates: the steps of several optimizers of one rule as ONE launch (or a few).

PyTorch's multi_tensor_apply, for pymetalnn's optimizers: when the float32 parameters of some
optimizers (of one class: SGD, Adam, AdamW or RMSProp, without max_grad_norm) are views of ONE
base buffer, their state lives in one flat buffer per state kind laid out like the parameters
(state element offset = parameter element offset), and the gradients of a step are views of
one base buffer too, `MultiTensorStep.step` updates them all with `<rule>_step_multi_float`
(kernels/optimizer.metal): a chunk table (kernels/params.h OptimChunk rows, at most OPTIM_CHUNK
elements of one tensor each, one threadgroup per chunk) over the base buffers. The kernel runs
the per-tensor kernel's block function, so weights and state come out bit for bit as
`opt.step(grads)` of every optimizer would leave them.

Their device step counters (see optim._base) become views of one flat counter buffer too, each
chunk row naming its tensor's slot, and one `optim_count` launch advances them all.

Tensors whose OptimParams and rule struct are byte-identical share a launch: one launch per
distinct (options, step count, first-step) combination, i.e. one per step when every optimizer
has the same hyperparameters and step count. Gradients outside the common gradient base (or all
of them when no two share one) take the per-tensor path (`Optimizer.step`) of their optimizer;
state stays in the flat buffers either way, so the two paths mix freely from step to step.

    ms = MultiTensorStep([opt_a, opt_b])   # their params: views of one buffer
    ms.step([grads_a, grads_b])            # as opt_a.step(grads_a); opt_b.step(grads_b)
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..ops._common import dummy
from ..params import OPTIM_CHUNK, OptimChunk
from ..runtime import Buffer
from ..tensor import Tensor, float32
from ._base import Optimizer

MAX_TABLES = 64  # cached chunk tables per MultiTensorStep (one per distinct gradient layout)


def multi_kernel_of(opt: Optimizer) -> str | None:
    """The multi-tensor kernel of an optimizer's rule, or None (CustomOptimizer, or a class
    without one)."""
    return getattr(type(opt), "MULTI_KERNEL", None) or None


def why_not_multi(opt: Optimizer) -> str:
    """Why `opt` cannot take part in a multi-tensor update ('' if it can)."""
    mk = multi_kernel_of(opt)
    if not mk or mk != f"{type(opt).KERNEL}_multi":
        return f"{type(opt).__name__} has no multi-tensor kernel"
    if opt.max_grad_norm is not None:
        return "max_grad_norm (clip by the optimizer's own global norm)"
    if any(p.dtype != float32 for p in opt.params):
        return "float16 parameters"
    return ""


class MultiTensorStep:
    """Steps of `optimizers` (one class, see `why_not_multi`) whose parameters are all views of
    one base buffer, as one launch per distinct params struct. Installs itself as the
    optimizers' state allocator: state they create (in either path) is a view of the flat state
    buffers; state they get otherwise (load_state_dict) is copied in at the next step."""

    def __init__(self, optimizers: Sequence[Optimizer]) -> None:
        opts = list(optimizers)
        if not opts or not all(isinstance(o, Optimizer) for o in opts):
            raise ValueError("optimizers: expected a non-empty list of Optimizers")
        cls = type(opts[0])
        for k, o in enumerate(opts):
            if type(o) is not cls:
                raise ValueError(f"optimizers[{k}]: {type(o).__name__}, optimizers[0] is "
                                 f"{cls.__name__} (one rule per multi-tensor step)")
            why = why_not_multi(o)
            if why:
                raise ValueError(f"optimizers[{k}]: {why}")
            if o.device is not opts[0].device:
                raise ValueError(f"optimizers[{k}]: on {o.device.name}, optimizers[0] on "
                                 f"{opts[0].device.name}")
        if len({id(o) for o in opts}) != len(opts):
            raise ValueError("optimizers: the same optimizer appears twice")
        self.optimizers = opts
        self.device = opts[0].device
        self.base: Buffer = opts[0].params[0].buffer.base
        self._check_params()
        self.STATE_NAMES = cls.STATE_NAMES
        lib = self.device.library(cls.SOURCE)
        # float32 and float16 gradients (a mixed-precision graph's) of the float32 weights
        self.kernels = {np.dtype(np.float32): lib.kernel(f"{cls.MULTI_KERNEL}_float"),
                        np.dtype(np.float16): lib.kernel(f"{cls.MULTI_KERNEL}_hgrad_float")}
        self.kernel = self.kernels[np.dtype(np.float32)]
        self.states: dict[str, Buffer] = {}
        self._tables: dict[tuple, tuple[Buffer, int]] = {}
        self._adopted: dict[int, tuple[Any, Any]] = {}
        self.launches = 0  # multi-tensor launches of the last step (for logs and tests)
        self.fallback = 0  # tensors updated per tensor at the last step
        for o in opts:
            o._state_alloc = self._state_view
        # the optimizers' step counters: views of one flat buffer (their counts copied in)
        self._step_base: list[int] = []
        total = sum(len(o.params) for o in opts)
        self.steps_flat: Buffer = self.device.buffer(np.zeros(max(total, 4), np.uint32))
        at = 0
        for o in opts:
            k = len(o.params)
            counts = o.device_steps()
            view = self.steps_flat.view(at * 4, max(k, 1) * 4)
            if k:
                self.device.write_async(view, counts.astype(np.uint32))
            o._steps_dev = view
            self._step_base.append(at)
            at += k

    # ---- layout
    def _check_params(self) -> None:
        seen: dict[int, str] = {}
        for k, o in enumerate(self.optimizers):
            for i, p in enumerate(o.params):
                b = p.buffer
                if b.base is not self.base:
                    raise ValueError(f"optimizers[{k}].params[{i}]: not a view of the base "
                                     "buffer of optimizers[0].params[0]")
                if b.offset % 4:
                    raise ValueError(f"optimizers[{k}].params[{i}]: byte offset {b.offset} is "
                                     "not a whole float32")
                if p.size and b.offset in seen:
                    raise ValueError(f"optimizers[{k}].params[{i}]: same memory as "
                                     f"{seen[b.offset]}")
                seen[b.offset] = f"optimizers[{k}].params[{i}]"
        if self.base.nbytes // 4 >= 2**32:
            raise ValueError("the parameters' base buffer has 2^32 floats or more (32-bit offsets)")

    def _state_base(self, name: str) -> Buffer:
        b = self.states.get(name)
        if b is None:
            b = self.states[name] = self.device.buffer(max(self.base.nbytes, 16))
        return b

    def _state_view(self, opt: Optimizer, i: int, name: str) -> Tensor:
        """A zeroed state tensor for opt.params[i], at the parameter's offset in the flat state
        buffer `name` (the optimizers' `_state_alloc`)."""
        p = opt.params[i]
        nb = p.size * 4
        t = Tensor(self._state_base(name).view(p.buffer.offset, max(nb, 4)), p.shape, float32)
        if nb:
            self.device.write_async(t.buffer, np.zeros(p.size, np.float32))
        return t

    def _adopt(self, opt: Optimizer) -> None:
        """Move opt's state into the flat buffers (state from load_state_dict or made before
        this MultiTensorStep) once per state list / params list."""
        key = (opt.state, opt.params)
        got = self._adopted.get(id(opt))
        if got is not None and got[0] is key[0] and got[1] is key[1]:
            return
        for i, p in enumerate(opt.params):
            if p.buffer.base is not self.base:
                raise ValueError(f"{type(opt).__name__}: params[{i}] is no longer a view of the "
                                 "multi-tensor step's base buffer")
            for name, t in list(opt.state[i].items()):
                want = p.buffer.offset
                if t.buffer.base is self.states.get(name) and t.buffer.offset == want:
                    continue
                v = Tensor(self._state_base(name).view(want, max(p.size * 4, 4)), p.shape,
                           float32)
                if p.size:
                    self.device.write_async(v.buffer, t.numpy().astype(np.float32).ravel())
                opt.state[i][name] = v
        self._adopted[id(opt)] = key

    def _table(self, rows: list[tuple[int, int, int, int]]) -> tuple[Buffer, int]:
        """The chunk table of (param offset, grad offset, n, step slot) rows (element offsets),
        cached."""
        key = tuple(rows)
        hit = self._tables.get(key)
        if hit is not None:
            return hit
        out: list[tuple[int, int, int, int, int, int]] = []
        for po, go, n, si in rows:
            vec4 = int(po % 4 == 0 and go % 4 == 0)
            for s in range(0, n, OPTIM_CHUNK):
                out.append((po + s, go + s, po + s, min(OPTIM_CHUNK, n - s), vec4, si))
        arr = np.array(out, np.uint32).reshape(-1, len(OptimChunk._fields_))
        if len(self._tables) >= MAX_TABLES:
            self._tables.pop(next(iter(self._tables)))
        buf = self.device.buffer(nbytes=arr.nbytes, zero=False)
        self.device.write_async(buf, arr)  # ordered with the queue, no wait
        hit = self._tables[key] = (buf, len(out))
        return hit

    # ---- the step
    def step(self, grads: Sequence[Sequence[Tensor | None]]) -> None:
        """As `opt.step(g)` for every (opt, g) of zip(optimizers, grads), in one launch per
        distinct params struct where the gradients share a base buffer. Everything is checked
        before the first kernel is queued."""
        opts = self.optimizers
        if isinstance(grads, (str, bytes)) or not isinstance(grads, Sequence) \
                or len(grads) != len(opts):
            raise ValueError(f"grads: expected {len(opts)} gradient lists, one per optimizer")
        checked = [o._check_grads(g) for o, g in zip(opts, grads)]
        if any(o._amp_buffer() is not opts[0]._amp_buffer() for o in opts):
            raise ValueError("optimizers: one multi-tensor step needs one loss-scaling state (amp)")
        for o in opts:
            for gi, g in enumerate(o.param_groups):
                o._check_group(g, f"param_groups[{gi}]")
            if o.max_grad_norm is not None:
                raise ValueError(f"{type(o).__name__}: max_grad_norm was set after the "
                                 "multi-tensor step was made")
            if o.params[0].buffer.base is not self.base:
                self._check_params()
        # the common gradient base: the one most gradients are views of
        count: dict[int, int] = {}
        bases: dict[int, Buffer] = {}
        for gs in checked:
            for t in gs:
                if t is not None and t.size:
                    b = t.buffer.base
                    count[id(b)] = count.get(id(b), 0) + 1
                    bases[id(b)] = b
        gbase = bases[max(count, key=count.__getitem__)] if count else None
        if gbase is not None and count[id(gbase)] < 2:
            gbase = None
        # one bucket (launch) per distinct (OptimParams, rule params) bytes; the structs, and
        # their bytes, are built once per (optimizer, group, step count, fresh state)
        buckets: dict[tuple[bytes, bytes],
                      tuple[Any, Any, list[tuple[int, int, int, int]], tuple]] = {}
        counted: list[int] = []  # flat step slots of the tensors the multi-tensor launches update
        rest: list[list[Tensor | None]] = []
        structs: dict[tuple, list] = {}
        self.fallback = 0
        for o, gs, sb in zip(opts, checked, self._step_base):
            left: list[Tensor | None] = [None] * len(gs)
            any_left = False
            if gbase is not None:
                self._adopt(o)
            used_by: dict[int, tuple[bool, ...]] = {}
            for i, g in enumerate(gs):
                if g is None or not o._sizes[i]:
                    continue
                if g.buffer.base is not gbase or g.buffer.offset % g.dtype.itemsize:
                    left[i] = g
                    any_left = True
                    continue
                gi = o._group_of[i]
                grp = o.param_groups[gi]
                used = used_by.get(gi)
                if used is None:
                    used = used_by[gi] = o._used_states(grp)
                fresh = o._ensure_state(i, used)
                step = o.steps[i] = o.steps[i] + 1
                skey = (id(o), gi, step, tuple(sorted(fresh)), g.dtype)
                rows = structs.get(skey)
                if rows is None:
                    common = o._common_params(grp)
                    common.step = step
                    rule = o._rule_params(grp, step, fresh)
                    bucket = buckets.setdefault((bytes(common), bytes(rule), g.dtype),
                                                (common, rule, [], used))
                    rows = structs[skey] = bucket[2]
                rows.append((o.params[i].buffer.offset // 4, g.buffer.offset // g.dtype.itemsize,
                             o._sizes[i], sb + i))
                counted.append(sb + i)
            rest.append(left if any_left else [])
        self.launches = 0
        tg = self.kernel.threadgroup_size
        # unused state slots and the norm (grouped optimizers never clip): the ops' placeholder
        unused = dummy(self.device)
        amp = opts[0]._amp_buffer()
        if counted:
            opts[0]._advance(sorted(counted), self.steps_flat, amp)
        for (_, _, gdt), (common, rule, rows, used) in buckets.items():
            table, nchunks = self._table(rows)
            states = [self._state_base(name) if u else unused
                      for name, u in zip(self.STATE_NAMES, used)]
            self.kernels[gdt](nchunks * tg, self.base, gbase, self.base, *states, unused, common,
                              rule, table, self.steps_flat, amp)
            self.launches += 1
        for o, left in zip(opts, rest):
            if left:
                self.fallback += sum(g is not None for g in left)
                o.step(left)
