"""Optimizer base: parameter groups, the MPS gradient options, state, and the per-step dispatch.

Design. A step is one fused update kernel per parameter tensor (kernels/optimizer.metal), which
reads the weight, its gradient and its state once and writes them back in place. Everything that
depends only on the step or the hyperparameters (bias corrections, 1 - beta, AdamW's decay
factor) is computed here, in double, and handed over in the params structs, so the kernels do
only per-element work and every option costs nothing when it is off. Clip-by-global-norm needs
the norm of all gradients before any update; it is reduced on the device into a one-float buffer
(`optim_zero`, then `optim_sumsq` per gradient) that the update kernels read themselves, so a
step never waits for the host.

What changes from step to step lives on the device too, so that a step recorded once and replayed
(Graph.capture) is the same computation as a step encoded anew: each tensor's step count (a uint
per tensor, advanced by `optim_count` at the start of a step; the rules compute Adam's bias
corrections from it) and the loss-scaling state `amp` (params.h: the gradients' unscale factor
and whether this step overflowed, in which case every update and count is skipped; a constant
{1, 1, 0, 0} unless a mixed-precision graph installs its GradScaler state). `steps` is the host's
count of step() calls; `state_dict` reads the device counts.

All argument checking happens before the first kernel of a step is queued: a bad gradient list
or hyperparameter raises ValueError naming the argument and leaves weights and state untouched.
State lives on the device as float32 tensors (float16 weights get a float32 master copy that the
rule updates); `state_dict` copies it to numpy arrays under flat keys, so
`np.savez(f, **opt.state_dict())` and `opt.load_state_dict(np.load(f))` round-trip it.
"""
from __future__ import annotations

import ctypes
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..ops._common import dummy
from ..params import OptimCountParams, OptimNormParams, OptimParams
from ..runtime import Device, Kernel
from ..tensor import Tensor, float16, float32, tensor

SOURCE = "optimizer.metal"
# Options every optimizer takes (MPSNNOptimizerDescriptor's, plus torch's maximize); the
# optimizer-wide max_grad_norm is not a group option.
COMMON_DEFAULTS: dict[str, Any] = {
    "lr": 1e-3, "grad_rescale": 1.0, "clip_value": None, "regularization": None,
    "regularization_scale": 0.0, "maximize": False,
}
REG_TYPES = {None: 0, "l1": 1, "l2": 2}
MAX_ELEMENTS = 2**31 - 1  # kernels index with 32-bit uints and a grid-stride loop
SUMSQ_TG, SUMSQ_MAX_GROUPS = 256, 1024
DTYPE_SUFFIX = {float32: "float", float16: "half"}
_AMP_IDENTITY: dict[int, Any] = {}


def amp_identity(dev: Device) -> Any:
    """The loss-scaling state of a step without loss scaling ({scale 1, unscale 1, no overflow,
    0}), one read-only buffer per device."""
    b = _AMP_IDENTITY.get(id(dev))
    if b is None or b.device is not dev:
        b = _AMP_IDENTITY[id(dev)] = dev.buffer(np.array([1.0, 1.0, 0.0, 0.0], np.float32))
    return b


# ---- argument checks (each raises ValueError naming the argument) ---------------------------
def real(v: Any, name: str, lo: float | None = None, hi: float | None = None,
         lo_open: bool = False, hi_open: bool = False) -> float:
    """A finite real number in [lo, hi] (open ends where asked)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
        raise ValueError(f"{name}: expected a finite number, got {v!r}")
    x = float(v)
    if lo is not None and (x < lo or (lo_open and x == lo)):
        raise ValueError(f"{name}: must be {'>' if lo_open else '>='} {lo}, got {v!r}")
    if hi is not None and (x > hi or (hi_open and x == hi)):
        raise ValueError(f"{name}: must be {'<' if hi_open else '<='} {hi}, got {v!r}")
    return x


def flag(v: Any, name: str) -> bool:
    if not isinstance(v, (bool, np.bool_)):
        raise ValueError(f"{name}: expected True or False, got {v!r}")
    return bool(v)


def clip_range(v: Any, name: str) -> tuple[float, float] | None:
    """None, c (meaning [-c, c], as torch.nn.utils.clip_grad_value_) or (min, max)."""
    if v is None:
        return None
    if isinstance(v, (tuple, list, np.ndarray)):
        if len(v) != 2:
            raise ValueError(f"{name}: expected a number or (min, max), got {v!r}")
        lo, hi = real(v[0], f"{name}[0]"), real(v[1], f"{name}[1]")
    else:
        hi = real(v, name, lo=0.0)
        lo = -hi
    if lo > hi:
        raise ValueError(f"{name}: min {lo} > max {hi}")
    return lo, hi


def f32(x: float) -> float:
    """x rounded to float32, as the kernel will see it."""
    return float(np.float32(x))


# ---- the optimizer --------------------------------------------------------------------------
class Optimizer:
    """Base of every optimizer: `step(grads)` updates the parameters in place.

    Subclasses name their kernel (`KERNEL`, instantiated per dtype as `<KERNEL>_float` and
    `<KERNEL>_half`), the state buffers it takes (`STATE_NAMES`, in argument order), their
    defaults (`DEFAULTS`), and implement `_check_rule` (validate a group's rule options),
    `_used_states` (which state buffers a group's options need) and `_rule_params` (the rule's
    params struct for one tensor at one step).

    Gradient preprocessing shared by every rule, in this order (g is one element):
      g <- g * grad_rescale
      g <- g * min(1, max_grad_norm / (||G||_2 + 1e-6))     if max_grad_norm (G: every rescaled
                                                           gradient of the optimizer; as torch's
                                                           clip_grad_norm_)
      g <- clamp(g, clip_min, clip_max)                    if clip_value (c means [-c, c])
      g <- -g                                              if maximize
      g <- g + s * sign(w)  (regularization="l1")  or  g + s * w  ("l2"), s = regularization_scale
    """

    KERNEL = ""
    MULTI_KERNEL = ""  # the multi-tensor kernel (`<MULTI_KERNEL>_float`, see optim.multi)
    SOURCE = SOURCE
    STATE_NAMES: tuple[str, ...] = ()
    DEFAULTS: dict[str, Any] = {}
    ELEMENTS_PER_THREAD = 4  # threads launched: ceil(n / ELEMENTS_PER_THREAD)
    # the rule's kernel takes the device step counters and the loss-scaling state (args 6+k, 7+k)
    DEVICE_STEP = True

    def __init__(self, params: Sequence[Any], defaults: Mapping[str, Any],
                 max_grad_norm: float | None = None) -> None:
        self.defaults = {**COMMON_DEFAULTS, **self.DEFAULTS, **defaults}
        self._check_group(self.defaults, "")  # constructor arguments, named as such
        self.max_grad_norm = None if max_grad_norm is None else \
            real(max_grad_norm, "max_grad_norm", lo=0.0, lo_open=True)
        self.param_groups = self._make_groups(params)
        self.params: list[Tensor] = [p for g in self.param_groups for p in g["params"]]
        self.device: Device = self.params[0].device
        for i, p in enumerate(self.params):
            if p.device is not self.device:
                raise ValueError(f"params: tensor {i} is on {p.device.name}, tensor 0 on "
                                 f"{self.device.name}")
        self._group_of = [gi for gi, g in enumerate(self.param_groups) for _ in g["params"]]
        self._sizes = [p.size for p in self.params]
        self.state: list[dict[str, Tensor]] = [{} for _ in self.params]
        self.steps = [0] * len(self.params)
        # where new state tensors come from: None, a fresh zeroed buffer each; a
        # MultiTensorStep installs (self, i, name) -> a zeroed view of its flat state buffers
        self._state_alloc: Any = None
        self._gnorm = self.device.buffer(16)
        # each tensor's step count on the device (a MultiTensorStep swaps in a view of its flat
        # counters); `amp`: a mixed-precision graph's loss-scaling state (None: no scaling)
        self._steps_dev: Any = self.device.buffer(np.zeros(max(len(self.params), 4), np.uint32))
        self.amp: Any = None
        self._kernels: dict[str, Kernel] = {}
        self._load_kernels()

    # ---- construction
    def _make_groups(self, params: Sequence[Any]) -> list[dict[str, Any]]:
        if isinstance(params, Tensor) or not isinstance(params, (list, tuple)) or not params:
            raise ValueError("params: expected a non-empty list of Tensors or of dicts with "
                             f"'params', got {type(params).__name__}")
        if all(isinstance(p, Mapping) for p in params):
            raw = [dict(p) for p in params]
            names = [f"params[{i}]" for i in range(len(raw))]
        elif any(isinstance(p, Mapping) for p in params):
            raise ValueError("params: mix of Tensors and group dicts")
        else:
            raw, names = [{"params": list(params)}], ["params"]
        groups, seen = [], set()
        for g, name in zip(raw, names):
            if "params" not in g:
                raise ValueError(f"{name}: a group needs a 'params' entry")
            unknown = set(g) - set(self.defaults) - {"params"}
            if unknown:
                extra = " (max_grad_norm is optimizer-wide)" if "max_grad_norm" in unknown else ""
                raise ValueError(f"{name}: unknown option(s) {', '.join(sorted(unknown))}{extra}")
            ps = g["params"]
            ps = [ps] if isinstance(ps, Tensor) else ps
            if not isinstance(ps, (list, tuple)) or not ps:
                raise ValueError(f"{name}: 'params' must be a non-empty list of Tensors")
            for j, p in enumerate(ps):
                pname = f"{name}['params'][{j}]" if name != "params" else f"params[{j}]"
                if not isinstance(p, Tensor):
                    raise ValueError(f"{pname}: expected a Tensor, got {type(p).__name__}")
                if p.dtype not in DTYPE_SUFFIX:
                    raise ValueError(f"{pname}: dtype {p.dtype} not supported (float32, float16)")
                if p.size > MAX_ELEMENTS:
                    raise ValueError(f"{pname}: {p.size} elements, at most {MAX_ELEMENTS}")
                key = (id(p.buffer.base), p.buffer.offset)
                if key in seen and p.size:
                    raise ValueError(f"{pname}: the same tensor (memory) appears twice")
                seen.add(key)
            group = {**self.defaults, **{k: v for k, v in g.items() if k != "params"}}
            self._check_group(group, name if name != "params" else "")
            group["params"] = list(ps)
            groups.append(group)
        return groups

    def _load_kernels(self) -> None:
        lib = self.device.library(self.SOURCE)
        for sfx in {DTYPE_SUFFIX[p.dtype] for p in self.params}:
            self._kernels[sfx] = lib.kernel(f"{self.KERNEL}_{sfx}")
        self._zero = lib.kernel("optim_zero")
        self._sumsq = {s: lib.kernel(f"optim_sumsq_{s}") for s in ("float", "half")}
        self._count_kernel = lib.kernel("optim_count")

    def _kernel_for(self, pdt: Any, gdt: Any) -> Kernel:
        """The rule's kernel for parameters of dtype pdt and gradients of dtype gdt."""
        if pdt == gdt:
            return self._kernels[DTYPE_SUFFIX[pdt]]
        k = self._kernels.get("hgrad_float")
        if k is None:
            k = self._kernels["hgrad_float"] = \
                self.device.library(self.SOURCE).kernel(f"{self.KERNEL}_hgrad_float")
        return k

    def _amp_buffer(self) -> Any:
        return self.amp if self.amp is not None else amp_identity(self.device)

    def _advance(self, indices: Sequence[int], steps: Any, amp: Any) -> None:
        """Queue the device step counts' advance for tensors `indices` (sorted; one launch per
        contiguous run, usually one), skipped on the device when the step overflowed."""
        runs: list[list[int]] = []
        for i in indices:
            if runs and runs[-1][1] == i:
                runs[-1][1] = i + 1
            else:
                runs.append([i, i + 1])
        for a, b in runs:
            self._count_kernel(b - a, steps, amp, OptimCountParams(first=a, n=b - a))

    def device_steps(self) -> np.ndarray:
        """Each tensor's step count as the device holds it (waits for queued work): the count of
        steps applied, which a mixed-precision graph's skipped steps do not advance."""
        if not self.DEVICE_STEP:
            return np.array(self.steps, np.int64)
        return self._steps_dev.numpy(np.uint32)[:len(self.params)].astype(np.int64)

    def _write_steps(self, steps: Sequence[int]) -> None:
        self.steps = [int(s) for s in steps]
        arr = np.zeros(max(len(self.params), 4), np.uint32)
        arr[:len(steps)] = steps
        self.device.write_async(self._steps_dev, arr[:self._steps_dev.nbytes // 4])

    # ---- validation of options
    def _check_group(self, g: dict[str, Any], where: str) -> None:
        """Validate (and normalize in place) a group's options; errors name `where['key']`, or
        just `key` for the constructor's arguments (where == "")."""
        def nm(k: str) -> str:
            return f"{where}['{k}']" if where else k

        g["lr"] = real(g["lr"], nm("lr"), lo=0.0)
        g["grad_rescale"] = real(g["grad_rescale"], nm("grad_rescale"))
        g["clip_value"] = clip_range(g["clip_value"], nm("clip_value"))
        reg = g["regularization"]
        if isinstance(reg, str):
            reg = reg.lower()
        if reg not in REG_TYPES:
            raise ValueError(f"{nm('regularization')}: expected None, 'l1' or 'l2', got {reg!r}")
        g["regularization"] = reg
        g["regularization_scale"] = real(g["regularization_scale"], nm("regularization_scale"),
                                         lo=0.0)
        g["maximize"] = flag(g["maximize"], nm("maximize"))
        self._check_rule(g, nm)

    def _check_rule(self, g: dict[str, Any], nm: Any) -> None:
        """Validate the rule's own options of group g (nm(key) is the name to raise with)."""

    def _used_states(self, g: dict[str, Any]) -> tuple[bool, ...]:
        """Which of STATE_NAMES group g's options need (the others get a dummy buffer)."""
        return (True,) * len(self.STATE_NAMES)

    def _rule_params(self, g: dict[str, Any], step: int, fresh: set[str]) -> ctypes.Structure:
        """The rule's params struct for a tensor of group g at `step` (1-based); `fresh` names
        the state buffers created (zeroed) for this step."""
        raise NotImplementedError

    def _check_grads(self, grads: Sequence[Any]) -> list[Tensor | None]:
        if isinstance(grads, Tensor) or not isinstance(grads, (list, tuple)):
            raise ValueError(f"grads: expected a list of {len(self.params)} Tensors (None to skip "
                             f"a parameter), got {type(grads).__name__}")
        if len(grads) != len(self.params):
            raise ValueError(f"grads: {len(grads)} gradients for {len(self.params)} parameters")
        for i, (p, g) in enumerate(zip(self.params, grads)):
            if g is None:
                continue
            if not isinstance(g, Tensor):
                raise ValueError(f"grads[{i}]: expected a Tensor or None, got {type(g).__name__}")
            if g.device is not self.device:
                raise ValueError(f"grads[{i}]: on {g.device.name}, parameters on "
                                 f"{self.device.name}")
            if g.shape != p.shape:
                raise ValueError(f"grads[{i}]: shape {g.shape}, parameter {i} has {p.shape}")
            # float32 (master) weights take float16 gradients too (mixed precision)
            if g.dtype != p.dtype and not (self.DEVICE_STEP and p.dtype == float32
                                           and g.dtype == float16):
                raise ValueError(f"grads[{i}]: dtype {g.dtype}, parameter {i} is {p.dtype}")
            if g.buffer.base is p.buffer.base and g.buffer.offset == p.buffer.offset:
                raise ValueError(f"grads[{i}]: is parameter {i} itself")
        return list(grads)

    # ---- state
    def _ensure_state(self, i: int, used: tuple[bool, ...]) -> set[str]:
        """Create (zeroed) the state buffers tensor i needs; returns the names created."""
        p, st, fresh = self.params[i], self.state[i], set()
        if p.dtype == float16 and "master" not in st:
            st["master"] = tensor(p.numpy().astype(np.float32), self.device)
            fresh.add("master")
        for name, u in zip(self.STATE_NAMES, used):
            if u and name not in st:
                st[name] = self._zeros(p.shape) if self._state_alloc is None \
                    else self._state_alloc(self, i, name)
                fresh.add(name)
        return fresh

    def _zeros(self, shape: tuple[int, ...]) -> Tensor:
        n = int(np.prod(shape, dtype=np.int64))
        return Tensor(self.device.buffer(max(n, 1) * 4), shape, float32)

    def zero_state(self) -> None:
        """Forget all state (moments, momentum buffers, step counts); float16 master copies are
        re-read from the parameters at the next step."""
        self.state = [{} for _ in self.params]
        self._write_steps([0] * len(self.params))

    # ---- the step
    def _common_params(self, g: dict[str, Any]) -> OptimParams:
        """A group's OptimParams, without the per-tensor n, vec4 and step."""
        clip = g["clip_value"]
        return OptimParams(
            lr=g["lr"], grad_rescale=g["grad_rescale"], clip_value=int(clip is not None),
            clip_min=clip[0] if clip else 0.0, clip_max=clip[1] if clip else 0.0,
            clip_norm=int(self.max_grad_norm is not None), max_norm=self.max_grad_norm or 0.0,
            reg_type=REG_TYPES[g["regularization"]], reg_scale=g["regularization_scale"],
            maximize=int(g["maximize"]))

    def step(self, grads: Sequence[Tensor | None]) -> None:
        """Apply one update to every parameter whose gradient is not None (in place, queued on
        the device; returns at once). grads[i] matches params[i] in shape and dtype."""
        gs = self._check_grads(grads)
        for gi, g in enumerate(self.param_groups):
            # options may have been edited since construction (e.g. an lr schedule)
            self._check_group(g, f"param_groups[{gi}]")
        if self.max_grad_norm is not None:
            real(self.max_grad_norm, "max_grad_norm", lo=0.0, lo_open=True)
        sizes = self._sizes
        todo = [i for i, g in enumerate(gs) if g is not None and sizes[i]]
        if self.max_grad_norm is not None:
            self._zero(1, self._gnorm, 1)
            for i in todo:
                grad = gs[i]
                assert grad is not None
                groups = min(-(-sizes[i] // SUMSQ_TG), SUMSQ_MAX_GROUPS)
                scale = self.param_groups[self._group_of[i]]["grad_rescale"]
                self._sumsq[DTYPE_SUFFIX[grad.dtype]](groups * SUMSQ_TG, grad.buffer, self._gnorm,
                                                      OptimNormParams(n=sizes[i], scale=scale))
        # host work per tensor stays a few microseconds (a big step is ~100 us of GPU time per
        # tensor): structs are built once per group (and step count) and copied per tensor
        commons: dict[int, OptimParams] = {}
        used_by: dict[int, tuple[bool, ...]] = {}
        # unused state slots, and the norm when not clipping, bind the ops' placeholder (never read)
        unused = dummy(self.device)
        gnorm = self._gnorm if self.max_grad_norm is not None else unused
        rules: dict[tuple, ctypes.Structure] = {}
        extra: tuple = ()
        if self.DEVICE_STEP:
            steps_dev, amp = self._steps_dev, self._amp_buffer()
            self._advance(todo, steps_dev, amp)
            extra = (steps_dev, amp)
        for i in todo:
            p, grad, gi = self.params[i], gs[i], self._group_of[i]
            assert grad is not None
            g = self.param_groups[gi]
            if gi not in commons:
                commons[gi] = self._common_params(g)
                used_by[gi] = self._used_states(g)
            used = used_by[gi]
            fresh = self._ensure_state(i, used)
            step = self.steps[i] = self.steps[i] + 1
            st = self.state[i]
            master = st["master"].buffer if "master" in st else p.buffer
            states = [st[name].buffer if u else unused for name, u in zip(self.STATE_NAMES, used)]
            common = OptimParams.from_buffer_copy(commons[gi])
            common.n, common.step, common.step_index = sizes[i], step, i
            # our state buffers are whole allocations (aligned); only caller memory may not be
            common.vec4 = int((p.buffer.offset | grad.buffer.offset) % 16 == 0)
            key = (gi, step, tuple(sorted(fresh)))
            rule = rules.get(key)
            if rule is None:
                rule = rules[key] = self._rule_params(g, step, fresh)
            self._kernel_for(p.dtype, grad.dtype)(
                -(-sizes[i] // self.ELEMENTS_PER_THREAD), p.buffer, grad.buffer, master, *states,
                gnorm, common, rule, *extra)

    # ---- state_dict
    def state_dict(self) -> dict[str, np.ndarray]:
        """Host copy of the optimizer: flat keys -> numpy arrays (np.savez-ready).

        'param{i}.{name}' state buffers (float32, the parameter's shape; 'master' for float16
        parameters), 'param{i}.step', and 'group{j}.{option}' hyperparameters (None stored as
        an empty array, pairs as 2-vectors) plus 'max_grad_norm'."""
        d: dict[str, np.ndarray] = {}
        steps = self.device_steps()
        for i, st in enumerate(self.state):
            d[f"param{i}.step"] = np.array(steps[i], np.int64)
            for name, t in st.items():
                d[f"param{i}.{name}"] = t.numpy().copy()
        for gi, g in enumerate(self.param_groups):
            for k, v in g.items():
                if k != "params":
                    d[f"group{gi}.{k}"] = _encode(v)
        d["max_grad_norm"] = _encode(self.max_grad_norm)
        return d

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        """Restore what state_dict saved (for the same parameters in the same order). Checked in
        full before anything changes."""
        if not isinstance(d, Mapping) and not hasattr(d, "files"):
            raise ValueError(f"d: expected a mapping of numpy arrays, got {type(d).__name__}")
        keys = list(d.files) if hasattr(d, "files") else list(d)
        new_state: list[dict[str, np.ndarray]] = [{} for _ in self.params]
        new_steps = [0] * len(self.params)
        new_groups = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        allowed = set(self.STATE_NAMES) | {"master"}
        max_norm: Any = self.max_grad_norm
        for key in keys:
            v = np.asarray(d[key])
            head, _, name = key.partition(".")
            if key == "max_grad_norm":
                max_norm = _decode(v)
                if max_norm is not None:
                    max_norm = real(max_norm, "d['max_grad_norm']", lo=0.0, lo_open=True)
            elif head.startswith("param") and head[5:].isdigit():
                i = int(head[5:])
                if i >= len(self.params):
                    raise ValueError(f"d['{key}']: there are only {len(self.params)} parameters")
                p = self.params[i]
                if name == "step":
                    if v.shape != () or v.dtype.kind not in "iu" or int(v) < 0:
                        raise ValueError(f"d['{key}']: expected a non-negative integer")
                    new_steps[i] = int(v)
                elif name in allowed:
                    if name == "master" and p.dtype != float16:
                        raise ValueError(f"d['{key}']: parameter {i} is {p.dtype}, no master copy")
                    if v.shape != p.shape or v.dtype != np.float32:
                        raise ValueError(f"d['{key}']: expected float32 {p.shape}, got {v.dtype} "
                                         f"{v.shape}")
                    new_state[i][name] = v
                else:
                    raise ValueError(f"d['{key}']: unknown state {name!r}")
            elif head.startswith("group") and head[5:].isdigit():
                gi = int(head[5:])
                if gi >= len(new_groups) or name not in new_groups[gi]:
                    raise ValueError(f"d['{key}']: no such group option")
                new_groups[gi][name] = _decode(v)
            else:
                raise ValueError(f"d['{key}']: unknown key")
        for gi, g in enumerate(new_groups):
            self._check_group(g, f"d: group{gi}")
        # commit
        for gi, g in enumerate(new_groups):
            self.param_groups[gi].update(g)
        self.max_grad_norm = max_norm
        self._write_steps(new_steps)
        self.state = [{k: tensor(v, self.device) for k, v in st.items()} for st in new_state]


def _encode(v: Any) -> np.ndarray:
    if v is None:
        return np.zeros(0, np.float64)
    if isinstance(v, str):
        return np.array(v)
    if isinstance(v, (bool, np.bool_)):
        return np.array(bool(v))
    if isinstance(v, (tuple, list)):
        return np.array(v, np.float64)
    return np.array(v, np.float64 if isinstance(v, float) else None)


def _decode(v: np.ndarray) -> Any:
    if v.shape == (0,):
        return None
    if v.ndim == 1:
        return tuple(float(x) for x in v)
    if v.dtype.kind in "US":
        return str(v)
    if v.dtype.kind == "b":
        return bool(v)
    if v.dtype.kind in "iu":
        return int(v)
    return float(v)
