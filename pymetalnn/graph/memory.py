"""Memory planning: where every intermediate tensor of a graph step lives.

Every value a step produces (results, states kept for the gradient, gradients, weight gradients)
has a lifetime: from the step that makes it to the last step that reads it (views such as
reshapes and split gradients extend their base's lifetime). Two values whose lifetimes do not
overlap can share memory. The planner places them in ONE arena buffer at byte offsets chosen
greedily by size with best fit (the interval-graph heuristic of TFLite's and MPS's planners:
largest first, each into the smallest gap left by the blocks it overlaps in time), and the
tensors are views into the arena (cuda, cpu). On a backend without views (metal) it falls back
to whole-buffer reuse: values share whole buffers ("registers") when their lifetimes don't
overlap. The report gives the planned peak against the naive sum (one buffer per value) and the
lower bound (the most bytes live at once).

Placement without `out=` arguments: the ops allocate their own outputs. The graph learns, from
a normal run of each step (calibration: the second run of a batch size, once the ops' one-time
allocations such as cached dummies and workspaces are behind), which of the step's allocation
requests became its outputs -- the k-th request of n bytes -- and on later runs routes exactly
those requests into the planned slots (an allocation hook on the device, active only while the
graph's own thread runs that step; workspaces the ops allocate are untouched). Every routed
output is checked after its step.
"""
from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..runtime import Buffer

ALIGN = 256


def align(n: int, a: int = ALIGN) -> int:
    return -(-int(n) // a) * a


@dataclass(eq=False)
class Block:
    """One planned allocation: `size` bytes live over steps [start, end]."""

    key: Any
    size: int
    start: int
    end: int
    offset: int = -1
    children: list[tuple[Block, int]] = field(default_factory=list)  # (block, byte offset)
    register: int = -1


def best_fit(blocks: list[Block]) -> int:
    """Greedy-by-size best-fit offsets (block sizes must be multiples of ALIGN). Returns the
    arena size."""
    placed: list[Block] = []
    for b in sorted(blocks, key=lambda b: (-b.size, b.start, b.end)):
        occ = sorted((p.offset, p.offset + p.size) for p in placed
                     if p.start <= b.end and b.start <= p.end)
        best, best_gap, prev = -1, None, 0
        for lo, hi in occ:
            gap = lo - prev
            if gap >= b.size and (best_gap is None or gap < best_gap):
                best, best_gap = prev, gap
            prev = max(prev, hi)
        b.offset = best if best >= 0 else prev
        placed.append(b)
    return max((b.offset + b.size for b in blocks), default=0)


def registers(blocks: list[Block]) -> list[int]:
    """Whole-buffer reuse: assign each block a register (buffer) free over its lifetime, the
    smallest that fits, else grow one, else a new one. Returns the register sizes."""
    sizes: list[int] = []
    busy_until: list[int] = []
    for b in sorted(blocks, key=lambda b: (b.start, -b.size)):
        free = [r for r in range(len(sizes)) if busy_until[r] < b.start]
        fits = [r for r in free if sizes[r] >= b.size]
        if fits:
            r = min(fits, key=lambda r: sizes[r])
        elif free:
            r = max(free, key=lambda r: sizes[r])
            sizes[r] = b.size
        else:
            r = len(sizes)
            sizes.append(b.size)
            busy_until.append(-1)
        b.register = r
        busy_until[r] = b.end
    return sizes


def live_peak(blocks: list[Block]) -> int:
    """The most bytes live at any step (no plan can do better)."""
    if not blocks:
        return 0
    last = max(b.end for b in blocks)
    delta = [0] * (last + 2)
    for b in blocks:
        delta[b.start] += b.size
        delta[b.end + 1] -= b.size
    cur = peak = 0
    for d in delta:
        cur += d
        peak = max(peak, cur)
    return peak


@dataclass
class MemoryReport:
    """The plan of one compiled step: `planned` bytes (arena or registers) against `naive` (one
    buffer per value) and `lower_bound` (the most bytes live at once)."""

    strategy: str
    planned: int
    naive: int
    lower_bound: int
    values: int
    concat_eliminated: list[str]

    @property
    def ratio(self) -> float:
        return self.planned / self.naive if self.naive else 1.0

    def __str__(self) -> str:
        s = (f"memory plan ({self.strategy}): {self.values} intermediate tensors, planned peak "
             f"{self.planned / 1024:.1f} KiB vs naive sum {self.naive / 1024:.1f} KiB "
             f"({100 * self.ratio:.0f}%), lower bound {self.lower_bound / 1024:.1f} KiB")
        if self.concat_eliminated:
            s += f"; concatenations eliminated: {', '.join(self.concat_eliminated)}"
        return s


# ---- the allocation hook ------------------------------------------------------------------------

class AllocHook:
    """Serves the graph's planned slots through the runtime's allocation hook
    (`Device.allocation_hook`, which sees every `dev.buffer(nbytes)` on the calling thread, i.e.
    every op's output): records requests, or serves planned Buffers for expected ones.

    A step's expected requests are keyed by (size, ordinal among the step's requests of that
    size), as seen in the calibration run: robust to unrelated requests of other sizes."""

    def __init__(self, dev: Any):
        self.dev = dev
        self.record: list[tuple[int, Buffer]] | None = None
        self.expect: dict[tuple[int, int], Buffer] = {}  # (nbytes, ordinal) -> planned slot
        self.seen: dict[int, int] = {}
        self.keep: list[Buffer] | None = None
        self.skip: set[tuple[int, int]] = set()  # calibration requests no longer made (out=)

    @contextlib.contextmanager
    def installed(self) -> Iterator[AllocHook]:
        with self.dev.allocation_hook(self._serve):
            yield self

    def _serve(self, nbytes: int, zero: bool, allocate: Callable[[], Buffer]) -> Buffer:
        k = self.seen.get(nbytes, 0)
        while (nbytes, k) in self.skip:
            k += 1
        self.seen[nbytes] = k + 1
        slot = self.expect.get((nbytes, k))
        if slot is not None:
            return slot  # a planned output: the kernels overwrite it, no zero fill
        buf = allocate()
        if self.record is not None:
            self.record.append((nbytes, buf))
        if self.keep is not None:
            self.keep.append(buf)
        return buf

    def start_step(self, expect: dict[tuple[int, int], Buffer] | None, record: bool) -> None:
        self.expect = expect or {}
        self.seen = {}
        self.skip = set()
        self.record = [] if record else None

    def end_step(self) -> None:
        self.expect = {}
        self.seen = {}
        self.skip = set()


def ordinals(allocs: list[tuple[int, Any]]) -> list[tuple[int, int]]:
    """(nbytes, ordinal among the requests of that size) of each request, in order."""
    seen: dict[int, int] = {}
    out = []
    for nb, _b in allocs:
        k = seen.get(nb, 0)
        seen[nb] = k + 1
        out.append((nb, k))
    return out


def register_slot(reg: Buffer, nbytes: int) -> Buffer:
    """The first `nbytes` of a whole-buffer-reuse register, as a Buffer of exactly that size: a
    view where the backend has views, else a Buffer sharing the register's memory (binding
    whole buffers, the kernels see the register itself)."""
    if reg.device.supports_views:
        return reg.view(0, nbytes)
    return Buffer(reg.device, nbytes, reg.handle)


def same_slot(buf: Buffer, slot: Buffer) -> bool:
    """Whether `buf` starts at the planned slot (same base buffer, same byte offset)."""
    return buf.base is slot.base and buf.offset == slot.offset


# ---- calibration records that do not keep device memory alive -------------------------------
# The planner learns from one normal run which allocation requests became which values, matching
# buffers by identity across steps (a reshape made later is a view of an earlier step's buffer).
# Holding every value until the run ends would make that run's memory the naive sum (InceptionV3
# batch 32: ~12 GiB against a 2.6 GiB plan); freeing values lets their ids be reused by later
# buffers. So each step's record is taken over by ghosts: one stand-in object per live base
# buffer (found through a weak map while the real buffer lives, never reused afterwards), with
# the attributes the planner reads (shape, dtype, nbytes, buffer.base / offset / nbytes).


class GhostBuffer:
    """Stand-in for a Buffer or a view of one: its base is the base's ghost."""

    __slots__ = ("_base", "offset", "nbytes")

    def __init__(self, base: GhostBuffer | None, offset: int, nbytes: int):
        self._base, self.offset, self.nbytes = base, offset, nbytes

    @property
    def base(self) -> GhostBuffer:
        return self._base if self._base is not None else self


class GhostTensor:
    """Stand-in for a Tensor produced by a calibration step."""

    __slots__ = ("shape", "dtype", "nbytes", "buffer")

    def __init__(self, shape: tuple[int, ...], dtype: Any, nbytes: int, buffer: GhostBuffer):
        self.shape, self.dtype, self.nbytes, self.buffer = shape, dtype, nbytes, buffer


class Ghosts:
    """Maps live buffers to ghosts for one calibration run."""

    def __init__(self) -> None:
        self._of: weakref.WeakKeyDictionary[Buffer, GhostBuffer] = weakref.WeakKeyDictionary()

    def base(self, buf: Buffer) -> GhostBuffer:
        b = buf.base
        g = self._of.get(b)
        if g is None:
            g = self._of[b] = GhostBuffer(None, 0, b.nbytes)
        return g

    def buffer(self, buf: Buffer) -> GhostBuffer:
        gb = self.base(buf)
        return gb if buf.base is buf else GhostBuffer(gb, buf.offset, buf.nbytes)

    def step(self, record: list[tuple[int, Buffer]], produced: list[tuple[Any, Any]]
             ) -> tuple[list[tuple[int, GhostBuffer]], list[tuple[Any, Any]]]:
        """One step's (allocation requests, produced values) with ghosts for the buffers and
        tensors (other produced objects are kept as they are: the planner skips them)."""
        rec = [(nb, self.base(b)) for nb, b in record]
        out = []
        for v, t in produced:
            buf = getattr(t, "buffer", None)
            if isinstance(buf, Buffer) and hasattr(t, "shape"):
                t = GhostTensor(tuple(t.shape), t.dtype, t.nbytes, self.buffer(buf))
            out.append((v, t))
        return rec, out
