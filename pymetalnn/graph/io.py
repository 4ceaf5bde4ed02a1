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

from .datasource import DataSource
from .errors import GraphError

OPT = "optim"
STEPS = "__graph__.steps"  # steps encoded so far (dropout masks depend on the step number)


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


def graph_state_dict(g: Any, optimizer: bool = True) -> dict[str, np.ndarray]:
    """Host copies: parameters (and buffers) of every data source, and optimizer states."""
    g.synchronize()
    d: dict[str, np.ndarray] = {STEPS: np.array(g.step_count, np.int64)}
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
    for key in keys:
        if key == STEPS:
            steps = int(np.asarray(d[key]))
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
    # check everything first
    for name, ds in sources.items():
        shapes = ds.shapes()
        for k, v in per[name].items():
            if k == "num_batches_tracked":
                continue
            a = np.asarray(v)
            if a.size != int(np.prod(shapes[k])):
                raise GraphError(None, f"state: {name}.{k} has shape {a.shape}, the graph's is "
                                       f"{shapes[k]}")
        if strict:
            missing = [k for k in ds.names() if k not in per[name]]
            if missing:
                raise GraphError(None, f"state: missing {', '.join(f'{name}.{k}' for k in missing)}")
    g.synchronize()
    used: list[str] = []
    if steps is not None:
        g.step_count = steps
    for name, ds in sources.items():
        if per[name]:
            ds.load_state_dict({k: np.asarray(v) for k, v in per[name].items()}, strict=False)
            used += [f"{name}.{k}" for k in per[name]]
        if opt[name]:
            ds.load_optimizer_state({k: np.asarray(v) for k, v in opt[name].items()})
            used += [f"{name}.{OPT}.{k}" for k in opt[name]]
    return used


def save_graph(g: Any, path: Any, optimizer: bool = True) -> None:
    """np.savez the graph's state (parameters, buffers, optimizer state)."""
    d = graph_state_dict(g, optimizer)
    tmp = os.fspath(path)
    np.savez(tmp, **d)


def load_graph(g: Any, path: Any, strict: bool = True) -> list[str]:
    """Load what save_graph wrote (np.load with allow_pickle=False)."""
    with np.load(path, allow_pickle=False) as z:
        d = {k: z[k] for k in z.files}
    return load_graph_state(g, d, strict)


def torch_state_dict(module: Any) -> dict[str, np.ndarray]:
    """A torch module's state_dict as numpy arrays (no torch needed to load them)."""
    return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}
