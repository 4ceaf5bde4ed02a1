"""Grouped weight updates: the data sources of one optimizer class updated by one step after the
last of their gradients, their weights views of one flat buffer (one multi-tensor launch where
the weight gradients share the memory plan's arena).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..tensor import Tensor
from .build import Step
from .datasource import DataSource

if TYPE_CHECKING:
    from .graph import Graph
    from .run import RunContext


def prepare_updates(g: Graph) -> None:
    """Before a training step: the first time, group the data sources whose updates can run
    as one multi-tensor launch (optimize['group_updates']); every time, make sure their
    weights still sit in their group's flat buffer (a purge drops the device copies)."""
    if g._update_groups is None:
        g._update_groups = group_updates(g)
    for grp in g._update_groups:
        grp.ensure_flat(g)

def group_updates(g: Graph) -> list[UpdateGroup]:
    """Data sources of one optimizer class (SGD, Adam, AdamW, RMSProp; no max_grad_norm;
    the DataSource protocol not overridden) become one update step after the last of their
    gradients, their weights views of one flat buffer (see UpdateGroup)."""
    if not g.options["group_updates"]:
        return []
    if g.low_memory:
        g.note_once("updates: not grouped in low-memory mode (weights are loaded and purged "
                   "around each use)")
        return []
    if not g.device.supports_views:
        g.note_once("updates: not grouped (needs buffer views, which this backend lacks)")
        return []
    from ..optim.multi import why_not_multi

    upd = [i for i, st in enumerate(g.steps) if st.kind == "update"]
    uses: dict[DataSource, int] = {}
    for i in upd:
        ds = g.steps[i].node.forward.weights
        uses[ds] = uses.get(ds, 0) + 1
    by_cls: dict[type, list[tuple[int, DataSource]]] = {}
    opt_owner: dict[int, DataSource] = {}
    skipped: list[str] = []
    for i in upd:
        ds = g.steps[i].node.forward.weights
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
            g._count("load", ds)
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
        g.note("updates: updated on their own: " + "; ".join(skipped))
    groups: list[UpdateGroup] = []
    drop: set[int] = set()
    for cls, mem in by_cls.items():
        ntens = sum(len(ds.trainable) for _, ds in mem)
        if ntens < 2:
            continue
        last = max(i for i, _ in mem)
        grp = UpdateGroup([ds for _, ds in mem], [len(g.steps[i].ins) for i, _ in mem])
        ins = [v for i, _ in mem for v in g.steps[i].ins]
        g.steps[last] = Step("update", g.steps[last].node, ins, [], group=grp)
        drop.update(i for i, _ in mem if i != last)
        groups.append(grp)
        g.note(f"updates: {len(mem)} data sources ({cls.__name__}, {ntens} tensors, "
                  f"{grp.size:,} weights in one buffer) updated together after the last of "
                  f"their gradients ({g.steps[last - 1].name}): one {cls.MULTI_KERNEL} "
                  "launch per distinct set of options and step count where their weight "
                  "gradients share the memory plan's arena, one launch per tensor otherwise; "
                  "the results are those of updating each after its gradient")
    if drop:
        g.steps = [st for i, st in enumerate(g.steps) if i not in drop]
        g._lifetimes()
    return groups



class UpdateGroup:
    """Data sources updated by one step (group_updates): their trainable weights are
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
