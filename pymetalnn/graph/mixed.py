"""Mixed precision for graphs (`precision="mixed"`): float16 activations and float16 convolution /
linear / recurrent math, float32 master weights, dynamic loss scaling, all on the device.

What runs in which precision (PyTorch's autocast + GradScaler recipe, as one graph option):

  inputs             float32 images are converted to float16 when they are bound
  conv / linear /    float16 weights (a float16 copy of the float32 weights, made by one cast per
  recurrent          tensor at its first use in a step), float16 activations and gradients;
                     accumulation in float (accumulate="half": float16 accumulation, MPS's option)
  batch norm         float16 activations, float32 statistics, weights and running statistics
  softmax, pooling,  float16 storage; softmax and normalizations reduce in float inside their
  activations        kernels
  losses             computed in float32 (the loss input is cast to float32, the gradient back)
  updates            every optimizer updates the float32 weights (its master copy) from the
                     float16 gradients, unscaled in the same kernel

Dynamic loss scaling follows torch.cuda.amp.GradScaler: the loss gradient is multiplied by the
scale (init_scale 2^16); once every weight gradient exists, one check per gradient sets an
overflow flag if any holds an inf or NaN; every update (and optimizer step count) is skipped when
it is set, and otherwise unscales by 1 / scale; then the scale is multiplied by backoff_factor
(0.5) after an overflow, or by growth_factor (2.0) after growth_interval (2000) clean steps in a
row. The state is one float4 device buffer (kernels/params.h AMP_*), read and written only by
kernels, so a step never waits for the host and a captured step replays the scaling exactly.
Updates therefore run after the whole gradient pass in a mixed-precision training graph (they
need the overflow verdict over all gradients).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from .. import functional as F
from ..optim import amp_non_finite_check_, amp_scaled_fill, amp_state, amp_update_scale_
from ..runtime import Device
from ..tensor import Tensor, float16, float32, tensor

PRECISIONS = ("float32", "mixed")
SCALER_DEFAULTS: dict[str, Any] = {"init_scale": 2.0**16, "growth_factor": 2.0,
                                   "backoff_factor": 0.5, "growth_interval": 2000,
                                   "enabled": True}


def check_precision(precision: Any, accumulate: Any) -> tuple[str, str]:
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    if accumulate not in ("float", "half"):
        raise ValueError(f"accumulate: expected 'float' or 'half', got {accumulate!r}")
    if accumulate == "half" and precision != "mixed":
        raise ValueError("accumulate: 'half' needs precision='mixed' (float32 math accumulates "
                         "in float)")
    return precision, accumulate


class GradScaler:
    """Dynamic loss scaling on the device, with torch.cuda.amp.GradScaler's options and rule.

    scale:   the current scale (reads the device: waits for queued steps)
    state_dict() / load_state_dict(): torch's keys ("scale", "growth_factor", "backoff_factor",
    "growth_interval", "_growth_tracker")."""

    def __init__(self, device: Device, init_scale: float = 2.0**16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000,
                 enabled: bool = True) -> None:
        self.device = device
        self.growth_factor = _positive(growth_factor, "grad_scaler['growth_factor']")
        if self.growth_factor <= 1.0:
            raise ValueError(f"grad_scaler['growth_factor']: must be > 1, got {growth_factor!r}")
        self.backoff_factor = _positive(backoff_factor, "grad_scaler['backoff_factor']")
        if self.backoff_factor >= 1.0:
            raise ValueError(f"grad_scaler['backoff_factor']: must be < 1, got {backoff_factor!r}")
        if isinstance(growth_interval, bool) or not isinstance(growth_interval, (int, np.integer)) \
                or not 0 < int(growth_interval) < 2**24:
            raise ValueError("grad_scaler['growth_interval']: expected an int in [1, 2^24), got "
                             f"{growth_interval!r}")
        self.growth_interval = int(growth_interval)
        self.enabled = bool(enabled)
        s = _positive(init_scale, "grad_scaler['init_scale']") if self.enabled else 1.0
        self.state = amp_state(device, s)  # [scale, 1 / scale, found_inf, growth tracker]
        self.buffer = self.state.buffer  # what the optimizers' update kernels read (opt.amp)
        self._seeds: dict[tuple[int, float], Tensor] = {}
        self._tables: dict = {}  # check's chunk tables per gradient layout
        self.launches = 0  # check launches of the last step (for logs and tests)

    # ---- the step's kernels (queued, never waited for)
    def seed(self, n: int, base: float) -> Tensor:
        """The loss gradient of n per-sample losses: base * scale each (a persistent tensor,
        rewritten on the device at every step)."""
        key = (int(n), float(base))
        t = self._seeds.get(key)
        if t is None:  # an array-backed buffer: outside the graph's memory plan
            t = self._seeds[key] = tensor(np.full(max(n, 1), base, np.float32), self.device)
        if self.enabled:
            amp_scaled_fill(t, self.state, base)
        return t

    def check(self, grads: list[Any]) -> None:
        """Clear the overflow flag, then set it if any of `grads` holds an inf or NaN: one
        launch per (base buffer, dtype) holding several of them (the memory plan's arena), one
        per gradient otherwise."""
        if self.enabled:
            self.launches = amp_non_finite_check_(
                [g for g in grads if isinstance(g, Tensor)], self.state, tables=self._tables)

    def update(self) -> None:
        """GradScaler.update(): back off after an overflow, grow after growth_interval clean
        steps."""
        if self.enabled:
            amp_update_scale_(self.state, self.growth_factor, self.backoff_factor,
                              self.growth_interval)

    # ---- host views
    def _read(self) -> np.ndarray:
        return self.buffer.numpy(np.float32)[:4].copy()

    @property
    def scale(self) -> float:
        return float(self._read()[0])

    @property
    def found_inf(self) -> bool:
        """Whether the last step's gradients overflowed (its updates were skipped)."""
        return bool(self._read()[2] != 0.0)

    @property
    def growth_tracker(self) -> int:
        return int(self._read()[3])

    def state_dict(self) -> dict[str, Any]:
        a = self._read()
        return {"scale": float(a[0]), "growth_factor": self.growth_factor,
                "backoff_factor": self.backoff_factor, "growth_interval": self.growth_interval,
                "_growth_tracker": int(a[3])}

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        scale = _positive(float(np.asarray(d["scale"])), "d['scale']")
        tracker = int(np.asarray(d.get("_growth_tracker", 0)))
        for k in ("growth_factor", "backoff_factor", "growth_interval"):
            if k in d:
                setattr(self, k, type(getattr(self, k))(np.asarray(d[k])))
        self.device.write_async(self.buffer, np.array([scale, 1.0 / scale, 0.0, tracker],
                                                      np.float32))


def _positive(v: Any, name: str) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a positive number, got {v!r}") from None
    if isinstance(v, bool) or not math.isfinite(x) or x <= 0:
        raise ValueError(f"{name}: expected a finite positive number, got {v!r}")
    return x


def make_scaler(device: Device, grad_scaler: Any) -> GradScaler:
    """grad_scaler: None (GradScaler's defaults), a dict of its options, or False (no loss
    scaling: the gradients are used as they come, and none is checked)."""
    if grad_scaler is False:
        return GradScaler(device, enabled=False)
    if grad_scaler is None or grad_scaler is True:
        return GradScaler(device)
    if not isinstance(grad_scaler, Mapping):
        raise ValueError("grad_scaler: expected None, False or a dict of GradScaler options "
                         f"({', '.join(SCALER_DEFAULTS)}), got {grad_scaler!r}")
    unknown = set(grad_scaler) - set(SCALER_DEFAULTS)
    if unknown:
        raise ValueError(f"grad_scaler: unknown option(s) {', '.join(sorted(unknown))}")
    return GradScaler(device, **{**SCALER_DEFAULTS, **grad_scaler})


def half_copies(g: Any, ds: Any, t: dict[str, Tensor], names: Any, rc: Any) -> dict[str, Tensor]:
    """float16 copies of data source ds's float32 tensors `names` (persistent buffers, refreshed
    by one cast each at the first use in a step): what float16 conv / linear / recurrent math
    reads. The float32 tensors stay the weights (the optimizers' master copies). Where the
    weights are views of a grouped update's flat buffer, ONE cast of the whole flat buffer per
    step refreshes the copies of every data source of the group (views of a flat float16
    buffer)."""
    key = ("half", id(ds))
    done = rc.state.get(key)
    if done is not None:
        return done
    flat = _flat_half(g, ds, t, names, rc)
    if flat is not None:
        rc.state[key] = flat
        return flat
    store = g._half_store.setdefault(id(ds), {})
    out: dict[str, Tensor] = {}
    for k in names:
        x = t.get(k)
        if x is None or x.dtype != float32:
            if x is not None:
                out[k] = x
            continue
        h = store.get(k)
        if h is None or h.shape != x.shape:  # array-backed: outside the graph's memory plan
            h = store[k] = tensor(np.zeros(x.shape, np.float16), g.device)
        if x.size:
            F.cast(x, float16, out=h)
        out[k] = h
    rc.state[key] = out
    return out


def _flat_half(g: Any, ds: Any, t: dict[str, Tensor], names: Any, rc: Any
               ) -> dict[str, Tensor] | None:
    """half_copies through the flat buffer of ds's update group, or None (not grouped)."""
    grp = next((u for u in g._update_groups or () if ds in u.layout), None)
    if grp is None or grp.flat is None:
        return None
    ts = {k: t[k] for k in names if k in t}
    if not all(x.dtype == float32 and x.buffer.base is grp.flat for x in ts.values()):
        return None
    skey = ("half_flat", id(grp))
    hf = g._half_store.get(skey)
    if hf is None or hf[0] is not grp.flat:  # array-backed: outside the graph's memory plan
        hf = g._half_store[skey] = (grp.flat, tensor(np.zeros(max(grp.size, 1), np.float16),
                                                     g.device), {})
    base, half, views = hf
    if not rc.state.get(skey):
        n = grp.size
        if n:
            F.cast(Tensor(base, (n,), float32), float16, out=half)
        rc.state[skey] = True
    out: dict[str, Tensor] = {}
    for k, x in ts.items():
        v = views.get((id(ds), k))
        if v is None or v.shape != x.shape or v.buffer.offset != x.buffer.offset // 2:
            v = views[(id(ds), k)] = Tensor(half.buffer.view(x.buffer.offset // 2,
                                                              max(x.size, 1) * 2), x.shape,
                                            float16)
        out[k] = v
    return out
