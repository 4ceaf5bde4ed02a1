"""Saving and loading a graph's parameters and optimizer state.

Keys are `<node>.<parameter>` with PyTorch's parameter names (`conv1.weight`, `conv1.bias`,
`bn1.running_mean`, `bn1.num_batches_tracked`, `lstm.weight_ih_l0` ...), so a PyTorch model
whose modules are named like the graph's nodes loads directly from its `state_dict()` (as numpy
arrays: `{k: v.numpy() for k, v in model.state_dict().items()}`), and `mapping` renames
otherwise (`{"features.0": "conv1"}`: torch prefix -> node name). Optimizer state is saved under
`<node>.optim.<key>` (the optimizer's own state_dict keys). Files are `.npz` read with
`allow_pickle=False`.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..runtime.errors import AsyncError
from .datasource import DataSource
from .errors import GraphError

OPT = "optim"
STEPS = "__graph__.steps"  # steps encoded so far (dropout masks depend on the step number)
SCALER = "__graph__.grad_scaler."  # a mixed-precision graph's loss scale and growth tracker


def named_sources(g: Any) -> dict[str, DataSource]:
    """Data sources of the graph by the name of the (first) node that reads them."""
    out: dict[str, DataSource] = {}
    seen: set[int] = set()
    for n in getattr(g, "forward_order", []):
        ds = getattr(n, "weights", None)
        base = getattr(n, "base", None)  # fused nodes save under the original node's name
        name = base.name if base is not None else n.name
        if ds is not None and id(ds) not in seen:
            seen.add(id(ds))
            if name in out:
                raise GraphError(n, f"two weighted nodes are named {name!r}; names key the state")
            out[name] = ds
    return out


def graph_state_dict(g: Any, optimizer: bool = True, steps: bool = True) -> dict[str, np.ndarray]:
    """Host copies: parameters (and buffers) of every data source, and optimizer states and
    the step count unless turned off."""
    g.synchronize()
    d: dict[str, np.ndarray] = {STEPS: np.array(g.step_count, np.int64)} if steps else {}
    sc = getattr(g, "_scaler", None)
    if steps and sc is not None:
        st = sc.state_dict()
        d[SCALER + "scale"] = np.array(st["scale"], np.float32)
        d[SCALER + "growth_tracker"] = np.array(st["_growth_tracker"], np.int64)
    for name, ds in named_sources(g).items():
        for k, v in ds.state_dict().items():
            d[f"{name}.{k}"] = v
        if optimizer:
            st = ds.optimizer_state()
            if st is not None:
                for k, v in st.items():
                    d[f"{name}.{OPT}.{k}"] = np.asarray(v)
    return d


def load_graph_state(g: Any, d: Mapping[str, Any], strict: bool = True,
                     mapping: Mapping[str, Any] | None = None) -> list[str]:
    """Set parameters (and optimizer states, when present) from `d`, keyed as graph_state_dict
    or as a PyTorch state_dict (numpy arrays, or anything np.asarray takes). Every key is
    checked before anything changes; strict: every parameter of the graph must be present and
    every key used. Returns the keys used."""
    sources = named_sources(g)
    ren: dict[str, str] = {}
    for k, v in (mapping or {}).items():
        ren[k] = v if isinstance(v, str) else v.name
    keys = list(d.files) if hasattr(d, "files") else list(d)
    per: dict[str, dict[str, Any]] = {n: {} for n in sources}
    opt: dict[str, dict[str, Any]] = {n: {} for n in sources}
    unused: list[str] = []
    steps = None
    scaler: dict[str, Any] = {}
    for key in keys:
        if key == STEPS:
            steps = int(np.asarray(d[key]))
            continue
        if key.startswith(SCALER):
            scaler[key[len(SCALER):]] = np.asarray(d[key])
            continue
        prefix, _, rest = key.rpartition(".")
        head, param = prefix, rest
        # optimizer entries: <node>.optim.<opt key with dots>
        if f".{OPT}." in key:
            node, _, okey = key.partition(f".{OPT}.")
            node = ren.get(node, node)
            if node in opt:
                opt[node][okey] = d[key]
                continue
        head = ren.get(head, head)
        if head in per and param in sources[head].names() + ["num_batches_tracked"]:
            per[head][param] = d[key]
        else:
            unused.append(key)
    if strict and unused:
        raise GraphError(None, f"state: keys {', '.join(unused[:5])}{' ...' if len(unused) > 5 else ''}"
                               " match no parameter of the graph (pass mapping= or strict=False)")
    # check everything first: exact shapes and dtypes (a same-size array of another shape, e.g.
    # a transposed weight, is refused, not reshaped into place)
    for name, ds in sources.items():
        shapes = ds.shapes()
        for k, v in per[name].items():
            a = per[name][k] = np.asarray(v)
            key = f"{name}.{k}"
            if k == "num_batches_tracked":
                if a.shape != () or a.dtype.kind not in "iu" or int(a) < 0:
                    raise GraphError(None, f"state: {key} must be a non-negative integer scalar, "
                                           f"got {a.dtype} of shape {a.shape}")
                continue
            if a.shape != tuple(shapes[k]):
                raise GraphError(None, f"state: {key} has shape {a.shape}, the graph's is "
                                       f"{tuple(shapes[k])}")
            if a.dtype.kind != "f":  # floats convert to float32, as torch's load_state_dict
                raise GraphError(None, f"state: {key} has dtype {a.dtype}, the graph's is float32 "
                                       "(a floating-point array is expected)")
        if strict:
            missing = [k for k in ds.names() if k not in per[name]]
            if missing:
                raise GraphError(None, f"state: missing {', '.join(f'{name}.{k}' for k in missing)}")
    try:
        g.synchronize()
    except AsyncError:  # a failed step (raised at its wait): what it left is overwritten now
        pass
    # optimizer states first: each optimizer checks its whole state before changing anything;
    # if one refuses, those already loaded are put back, so nothing has changed
    done: list[tuple[DataSource, Any]] = []
    try:
        for name, ds in sources.items():
            if opt[name]:
                before = ds.optimizer_state()
                ds.load_optimizer_state({k: np.asarray(v) for k, v in opt[name].items()})
                done.append((ds, before))
    except (ValueError, TypeError, KeyError) as e:
        for ds, before in reversed(done):
            if ds.optimizer is not None and before is not None:
                ds.optimizer.load_state_dict(before)
            else:
                ds._pending_opt_state = before
        raise GraphError(None, f"state: optimizer state of {name!r}: {e}") from None
    used: list[str] = []
    if steps is not None:
        g.step_count = steps
    sc = getattr(g, "_scaler", None)
    if sc is not None and "scale" in scaler:
        sc.load_state_dict({"scale": scaler["scale"],
                            "_growth_tracker": scaler.get("growth_tracker", 0)})
    for name, ds in sources.items():
        if per[name]:
            ds.load_state_dict(per[name], strict=False)
            used += [f"{name}.{k}" for k in per[name]]
        if opt[name]:
            used += [f"{name}.{OPT}.{k}" for k in opt[name]]
    _forget_group_failures(g, sources, per, opt)
    g._failed_step = None  # fresh weights: a failed step no longer blocks training
    return used


def _forget_group_failures(g: Any, sources: dict, per: dict, opt: dict) -> None:
    """Grouped updates keep weights (and optimizer states) as views of flat buffers, which a
    failed update marks failed as a whole; the load rewrites every view but not the alignment
    gaps between them, so the flat buffers are declared clean once each member's weights (and
    states) were loaded (docs/errors.md)."""
    name_of = {ds: name for name, ds in sources.items()}
    dev = g.device
    for grp in getattr(g, "_update_groups", None) or []:
        names = [name_of.get(ds) for ds in grp.members]
        if grp.flat is None or None in names:
            continue
        if all(set(ds.trainable) <= set(per[n]) for ds, n in zip(grp.members, names)):
            dev.forget_failures(grp.flat)
        ms = grp.ms
        if ms is not None and all(opt[n] or not ds.optimizer.STATE_NAMES
                                  for ds, n in zip(grp.members, names)):
            for b in list(ms.states.values()) + [ms.steps_flat]:
                dev.forget_failures(b)


def checkpoint_path(path: Any) -> str:
    """`path` with the `.npz` suffix np.savez gives it (save("model") writes model.npz, and
    load("model") reads it back)."""
    p = os.fspath(path)
    return p if p.endswith(".npz") else p + ".npz"


def save_graph(g: Any, path: Any, optimizer: bool = True) -> str:
    """np.savez the graph's state (parameters, buffers, optimizer state) to `path` (".npz"
    appended when missing), atomically: a crash never leaves a half-written checkpoint.
    Returns the path written."""
    d = graph_state_dict(g, optimizer)
    out = checkpoint_path(path)
    tmp = f"{out}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **d)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def load_graph(g: Any, path: Any, strict: bool = True) -> list[str]:
    """Load what save_graph wrote (np.load with allow_pickle=False); `path` as given, else with
    ".npz" appended. Every check runs before anything changes; errors name the file."""
    import zipfile

    p = os.fspath(path)
    if not os.path.exists(p) and os.path.exists(checkpoint_path(p)):
        p = checkpoint_path(p)
    try:
        with np.load(p, allow_pickle=False) as z:
            if not hasattr(z, "files"):
                raise GraphError(None, f"checkpoint {p}: a single array, not a .npz archive")
            d = {}
            for k in z.files:
                try:
                    d[k] = z[k]
                except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
                    raise GraphError(None, f"checkpoint {p}: key {k!r} cannot be read "
                                           f"({e.__class__.__name__}: {e})") from None
    except FileNotFoundError:
        raise GraphError(None, f"checkpoint {p}: no such file") from None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise GraphError(None, f"checkpoint {p}: not a readable .npz file, truncated or corrupt "
                               f"({e.__class__.__name__}: {e})") from None
    try:
        return load_graph_state(g, d, strict)
    except GraphError as e:
        raise GraphError(None, f"checkpoint {p}: {e}") from None


def torch_state_dict(module: Any) -> dict[str, np.ndarray]:
    """A torch module's state_dict as numpy arrays (no torch needed to load them)."""
    return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}
