"""CustomOptimizer: a user-written update kernel plugged into the optimizer machinery (groups, MPS
gradient options, global-norm clipping, state allocation, state_dict)."""
from __future__ import annotations

import ctypes
import keyword
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..params import OptimParams
from ..runtime import Kernel
from ..tensor import float16, float32
from ._base import Optimizer


def hyper_struct(hyper: Any) -> ctypes.Structure:
    """`hyper` as a ctypes struct: a ctypes.Structure is used as is; a dict becomes a struct with
    its keys as fields in order (Python/NumPy float -> float, bool -> uint, int and np.int32 ->
    int, np.uint32 -> uint); None becomes a struct with one uint field `unused` = 0."""
    if isinstance(hyper, ctypes.Structure):
        return hyper
    if hyper is None:
        hyper = {"unused": np.uint32(0)}
    if not isinstance(hyper, Mapping) or not hyper:
        raise ValueError("hyper: expected a ctypes.Structure, a non-empty dict or None, got "
                         f"{type(hyper).__name__}")
    fields = []
    for k, v in hyper.items():
        if not isinstance(k, str) or not k.isidentifier() or keyword.iskeyword(k):
            raise ValueError(f"hyper: field name {k!r} is not an identifier")
        if isinstance(v, (bool, np.bool_, np.uint32)):
            ty: Any = ctypes.c_uint32
        elif isinstance(v, (float, np.float32, np.float64)):
            ty = ctypes.c_float
        elif isinstance(v, (int, np.int32)):
            ty = ctypes.c_int32
        else:
            raise ValueError(f"hyper[{k!r}]: {type(v).__name__} is not a float, int or bool")
        fields.append((k, ty))
    cls = type("Hyper", (ctypes.Structure,), {"_fields_": fields})
    try:
        return cls(**{k: (int(v) if f is not ctypes.c_float else float(v))
                      for (k, f), v in zip(fields, hyper.values())})
    except (TypeError, OverflowError) as e:
        raise ValueError(f"hyper: {e}") from None


class CustomOptimizer(Optimizer):
    """An optimizer whose update rule is the user's own Metal kernel.

    `source` is a .metal file (absolute, relative to the working directory, or in kernels/); its
    kernel `kernel` (and `kernel_half` for float16 parameters) takes the argument layout of the
    built-in rules, k = len(state_names):

        #include "optimizer.h"   // OptimParams, optim_grad (the MPS gradient options), helpers
        kernel void my_update(device float* param       [[buffer(0)]],      // updated in place
                              const device float* grad  [[buffer(1)]],
                              device float* master      [[buffer(2)]],      // float16 params: the
                                      // float32 master weights; float32 params: param itself
                              device float* state_0     [[buffer(3)]],      // state_names[0], ...
                              ...                                           // float32, zeroed at
                                                                            // the first step
                              const device float* gnorm [[buffer(3 + k)]],  // optim_clip_coef
                              constant OptimParams& c   [[buffer(4 + k)]],  // n, step, lr, ...
                              constant MyHyper& h       [[buffer(5 + k)]],  // `hyper`
                              uint gid [[thread_position_in_grid]])

    It is launched with ceil(c.n / elements_per_thread) threads (more may run: bound-check
    against c.n). `optim_grad(g, w, optim_clip_coef(gnorm, c), c)` applies grad_rescale,
    max_grad_norm, clip_value, maximize and regularization exactly as the built-in rules do.
    `hyper`: a ctypes.Structure mirroring MyHyper, or a dict turned into one (see hyper_struct);
    `opt.hyper` may be edited between steps. state_dict saves the state buffers and the common
    options, not `hyper`.

    c.step is the host's count at the time the step is queued: a captured step (Graph.capture)
    replays it unchanged, so a rule that depends on the step cannot be captured faithfully (the
    graph refuses the capture), and a mixed-precision graph, whose updates are skipped and whose
    gradients are unscaled on the device, needs a built-in rule.
    """

    DEVICE_STEP = False

    def __init__(self, params: Sequence[Any], source: str, kernel: str,
                 state_names: Sequence[str] = (), hyper: Any = None, *, lr: float = 1e-3,
                 kernel_half: str | None = None, elements_per_thread: int = 1,
                 maximize: bool = False, grad_rescale: float = 1.0,
                 clip_value: float | tuple[float, float] | None = None,
                 max_grad_norm: float | None = None, regularization: str | None = None,
                 regularization_scale: float = 0.0) -> None:
        if not isinstance(source, (str, os.PathLike)):
            raise ValueError(f"source: expected a path to a .metal file, got {source!r}")
        if not isinstance(kernel, str) or not kernel:
            raise ValueError(f"kernel: expected a kernel name, got {kernel!r}")
        if kernel_half is not None and (not isinstance(kernel_half, str) or not kernel_half):
            raise ValueError(f"kernel_half: expected a kernel name, got {kernel_half!r}")
        if isinstance(state_names, str) or not all(
                isinstance(s, str) and s.isidentifier() for s in state_names):
            raise ValueError(f"state_names: expected a list of identifiers, got {state_names!r}")
        names = tuple(state_names)
        if len(set(names)) != len(names) or {"master", "step"} & set(names):
            raise ValueError(f"state_names: names must be unique and not 'master' or 'step', got "
                             f"{names!r}")
        if isinstance(elements_per_thread, bool) or not isinstance(elements_per_thread, int) or \
                elements_per_thread < 1:
            raise ValueError(f"elements_per_thread: expected an int >= 1, got "
                             f"{elements_per_thread!r}")
        self.SOURCE = os.fspath(source)
        self.STATE_NAMES = names
        self.ELEMENTS_PER_THREAD = elements_per_thread
        self.kernel_names = {float32: kernel, float16: kernel_half}
        self.hyper = hyper_struct(hyper)
        super().__init__(params, dict(
            lr=lr, maximize=maximize, grad_rescale=grad_rescale, clip_value=clip_value,
            regularization=regularization, regularization_scale=regularization_scale),
            max_grad_norm)

    def _load_kernels(self) -> None:
        try:
            lib = self.device.library(self.SOURCE)
        except FileNotFoundError as e:
            raise ValueError(f"source: {e}") from None
        base = self.device.library("optimizer.metal")
        self._zero = base.kernel("optim_zero")
        self._sumsq = {s: base.kernel(f"optim_sumsq_{s}") for s in ("float", "half")}
        for dt in {p.dtype for p in self.params}:
            arg = "kernel" if dt == float32 else "kernel_half"
            name = self.kernel_names[dt]
            if name is None:
                raise ValueError("kernel_half: float16 parameters need a kernel for half storage")
            try:
                k = lib.kernel(name)
            except KeyError as e:
                raise ValueError(f"{arg}: {e.args[0]}") from None
            self._check_layout(k, arg, "float" if dt == float32 else "half")
            self._kernels["float" if dt == float32 else "half"] = k

    def _check_layout(self, k: Kernel, arg: str, elem: str) -> None:
        nstate = len(self.STATE_NAMES)
        want = 6 + nstate
        kinds = ["buffer"] * (4 + nstate) + ["value", "value"]
        if len(k.args) != want or [a.kind for a in k.args] != kinds:
            raise ValueError(
                f"{arg}: '{k.name}' must take {want} arguments (param, grad, master, "
                f"{nstate} state buffer(s), gnorm, constant OptimParams&, constant hyper&), got "
                f"{len(k.args)}: {', '.join(f'{a.name} ({a.kind})' for a in k.args)}")
        if k.args[0].type != elem or k.args[1].type != elem:
            raise ValueError(f"{arg}: '{k.name}' takes {k.args[0].type} parameters, these are "
                             f"{elem}")
        sizes = k.arg_sizes
        if sizes[want - 2] and sizes[want - 2] != ctypes.sizeof(OptimParams):
            raise ValueError(f"{arg}: argument {want - 2} of '{k.name}' is {sizes[want - 2]} "
                             f"bytes, OptimParams is {ctypes.sizeof(OptimParams)}")
        if sizes[want - 1] and sizes[want - 1] != ctypes.sizeof(self.hyper):
            raise ValueError(f"hyper: {ctypes.sizeof(self.hyper)} bytes, the kernel's argument "
                             f"'{k.args[-1].name}' is {sizes[want - 1]}")

    def _rule_params(self, g: dict[str, Any], step: int, fresh: set[str]) -> ctypes.Structure:
        return self.hyper
