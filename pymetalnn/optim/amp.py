"""Dynamic loss scaling on the device (kernels/optimizer.metal's amp_* kernels): the operations
of torch.cuda.amp.GradScaler, with its rule, as functions of one loss-scaling state.

Design. The state is a float32 tensor of 4 elements (kernels/params.h AMP_*):
  state[0] scale, state[1] 1 / scale, state[2] found_inf (0 or 1), state[3] growth tracker
(clean steps in a row). Only kernels read and write it, so a training step never waits for
the host and a captured step replays the scaling exactly. The optimizers' update kernels read
it too (`Optimizer.amp`): they skip the update while found_inf != 0 and otherwise multiply the
gradient by state[1] -- the unscale happens inside the update, not as a pass of its own.

One step: `amp_scaled_fill` (the loss gradient, times the scale) -> backward ->
`amp_non_finite_check_` over the weight gradients -> the optimizers' steps ->
`amp_update_scale_`. torch spells the check `torch._amp_foreach_non_finite_check_and_unscale_`
and the update `torch._amp_update_scale_`; the argument order here follows theirs with the
three scalars of the state in one tensor.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..ops._common import kernel, number
from ..params import OPTIM_CHUNK, AmpParams
from ..runtime import Device
from ..tensor import Tensor, float16, float32, tensor

SOURCE = "optimizer.metal"
CHECK_TG, CHECK_MAX_GROUPS = 256, 1024  # amp_check: threads per group, groups at most
TABLES_MAX = 64  # chunk tables a cache keeps (one per gradient layout)


def amp_state(device: Device, init_scale: float = 2.0**16) -> Tensor:
    """A new loss-scaling state [init_scale, 1 / init_scale, 0, 0] on `device`."""
    s = _positive(init_scale, "init_scale")
    return tensor(np.array([s, 1.0 / s, 0.0, 0.0], np.float32), device)


def amp_scaled_fill(out: Tensor, state: Tensor, base: float) -> Tensor:
    """out[i] = base * scale for every i (the loss gradient of out.size per-sample losses under
    loss scaling: base = 1 / N for a mean, 1 for a sum); returns out."""
    _check_state(state)
    if not isinstance(out, Tensor) or out.dtype != float32:
        raise ValueError(f"out: expected a float32 Tensor, got {_desc(out)}")
    if out.size:
        kernel(state.device, SOURCE, "amp_seed")(out.size, out.buffer, state.buffer,
                                                 AmpParams(n=out.size, base=float(base)))
    return out


def amp_non_finite_check_(grads: Sequence[Any], state: Tensor, reset: bool = True,
                          tables: dict | None = None) -> int:
    """found_inf = 1 if any element of any of `grads` is inf or NaN (state[2]; with reset, the
    flag is cleared first, so it speaks of these gradients alone; otherwise it accumulates, as
    torch's found_inf). None and empty entries are skipped; float32 and float16 gradients.

    Gradients that share a base buffer (a memory plan's arena) are checked by one launch per
    (base, dtype) through a chunk table of (element offset, n <= OPTIM_CHUNK) rows; `tables`,
    a dict the caller keeps across steps, caches those tables per layout (a capture cannot
    upload one while it records: without a cached table such gradients are checked one launch
    each). Returns the number of launches."""
    _check_state(state)
    dev = state.device
    by_base: dict[tuple[int, Any], list[Tensor]] = {}
    for i, g in enumerate(grads):
        if g is None:
            continue
        if not isinstance(g, Tensor) or g.dtype not in (float32, float16):
            raise ValueError(f"grads[{i}]: expected a float32 or float16 Tensor, got {_desc(g)}")
        if g.size:
            by_base.setdefault((id(g.buffer.base), g.dtype), []).append(g)
    launches = 0
    if reset:
        kernel(dev, SOURCE, "amp_begin")(1, state.buffer)
        launches = 1
    for (_, dt), ts in by_base.items():
        sfx = "half" if dt == float16 else "float"
        whole = [t for t in ts if t.buffer.offset % dt.itemsize == 0]
        hit = _table(dev, whole, tables) if len(whole) >= 2 else None
        if hit is not None:
            table, rows = hit
            k = kernel(dev, SOURCE, f"amp_check_multi_{sfx}")
            k(rows * k.threadgroup_size, whole[0].buffer.base, state.buffer, table)
            launches += 1
            ts = [t for t in ts if t not in whole]
        for g in ts:
            groups = min(-(-g.size // CHECK_TG), CHECK_MAX_GROUPS)
            kernel(dev, SOURCE, f"amp_check_{sfx}")(groups * CHECK_TG, g.buffer, state.buffer,
                                                    AmpParams(n=g.size))
            launches += 1
    return launches


def amp_update_scale_(state: Tensor, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                      growth_interval: int = 2000) -> Tensor:
    """GradScaler.update() on the device, in place: if found_inf, scale *= backoff_factor and
    tracker = 0; else tracker += 1, and when tracker reaches growth_interval, scale *=
    growth_factor (kept as is where that overflows float32) and tracker = 0. state[1] = 1 /
    scale. Returns state."""
    _check_state(state)
    g = _positive(growth_factor, "growth_factor")
    b = _positive(backoff_factor, "backoff_factor")
    if isinstance(growth_interval, bool) or not isinstance(growth_interval, (int, np.integer)) \
            or not 0 < int(growth_interval) < 2**24:
        raise ValueError(f"growth_interval: expected an int in [1, 2^24), got {growth_interval!r}")
    kernel(state.device, SOURCE, "amp_update")(1, state.buffer, AmpParams(
        growth_factor=g, backoff_factor=b, growth_interval=int(growth_interval)))
    return state


def _table(dev: Device, ts: list[Tensor], tables: dict | None) -> tuple[Any, int] | None:
    """The chunk table of tensors in one base buffer, from `tables` or made (an array-backed
    buffer); None while a capture records and none is cached."""
    key = tuple((id(t.buffer.base), t.buffer.offset, t.size, t.dtype.str) for t in ts)
    hit = tables.get(key) if tables is not None else None
    if hit is not None:
        return hit
    if getattr(dev, "_recording", None) is not None:
        return None
    rows = []
    for t in ts:
        off = t.buffer.offset // t.dtype.itemsize
        rows += [(off + s, min(OPTIM_CHUNK, t.size - s)) for s in range(0, t.size, OPTIM_CHUNK)]
    hit = (dev.buffer(np.array(rows, np.uint32).reshape(-1, 2)), len(rows))
    if tables is not None:
        if len(tables) >= TABLES_MAX:
            tables.pop(next(iter(tables)))
        tables[key] = hit
    return hit


def _check_state(state: Any) -> None:
    if not isinstance(state, Tensor) or state.dtype != float32 or state.size != 4:
        raise ValueError(f"state: expected a float32 Tensor of 4 elements (amp_state), got "
                         f"{_desc(state)}")


def _desc(x: Any) -> str:
    if isinstance(x, Tensor):
        return f"a {x.dtype} Tensor of shape {x.shape}"
    return type(x).__name__


def _positive(v: Any, name: str) -> float:
    x = number(v, name)
    if not math.isfinite(x) or x <= 0:
        raise ValueError(f"{name}: expected a finite positive number, got {v!r}")
    return x
