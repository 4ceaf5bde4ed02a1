"""pymetalnn.graph.from_torch: a training graph from a PyTorch module, like coremltools'
converter for Core ML.

    tg = G.from_torch(model, example_input, loss="cross_entropy",
                      optimizer=lambda p: optim.SGD(p, lr=0.1))

The module is traced with torch.fx (torch is imported only here, when called); each traced operation
becomes a graph node holding the module's current weights, named after the module's qualified name,
so `tg.state_dict()` has the module's own state_dict keys (and loads back into it) and
`tg.load_state_dict(torch_state_dict(model))` reloads weights. Every padding, stride and dilation is
passed explicitly as numbers, so no graph default can change them. Supported: Conv1d/Conv2d (zeros
padding), Linear, Embedding (integer example input), LayerNorm, BatchNorm1d/2d, GroupNorm,
InstanceNorm2d, ReLU / LeakyReLU / ELU / GELU / Sigmoid / Tanh / Softplus (in place or not),
MaxPool1d/2d / AvgPool1d/2d (floor mode), AdaptiveAvgPool1d/2d, Flatten (from dim 1), Dropout,
Identity, Softmax / LogSoftmax, LSTM / GRU / RNN (batch_first, layers, bidirectional, their (output,
state) results), and the functions add and += (residuals), flatten, relu, tanh, sigmoid, cat along
channels, x.view(n, -1) / reshape to (n, -1), x.permute / x.transpose (batch kept first), x[:, i] (a
time step), h_n[i] (a recurrent layer's final state). Linear on a sequence applies to the last
dimension. Anything else raises GraphError naming the module or operation and its place in the
traced code.
"""
from __future__ import annotations

import operator
from typing import Any

import numpy as np

from ..tensor import float32, int32
from . import nodes as N
from .datasource import (
    Conv1dDataSource,
    ConvolutionDataSource,
    EmbeddingDataSource,
    FullyConnectedDataSource,
    LayerNormDataSource,
    NormalizationDataSource,
    RecurrentDataSource,
)
from .errors import GraphError
from .nodes.rnn import _RecurrentNode


def _np(t: Any) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float32)


def _ints(v: Any, n: int) -> tuple[int, ...]:
    return tuple(int(a) for a in v) if isinstance(v, (tuple, list)) else (int(v),) * n


class _Converter:
    def __init__(self, torch: Any, module: Any, example: Any):
        self.torch = torch
        self.nn = torch.nn
        self.module = module
        self.example = example

    def unsupported(self, what: str, where: str) -> GraphError:
        return GraphError(None, f"from_torch: {what} ({where}) has no pymetalnn node; supported: "
                                "see pymetalnn.graph.from_torch's docstring")

    # ---- modules ----------------------------------------------------------------------------
    def conv(self, m: Any, name: str, x: Any) -> Any:
        if m.padding_mode != "zeros":
            raise self.unsupported(f"padding_mode={m.padding_mode!r}", name)
        one_d = isinstance(m, self.nn.Conv1d)
        k = tuple(m.kernel_size)
        ds = (Conv1dDataSource if one_d else ConvolutionDataSource)(
            m.in_channels, m.out_channels, k[0] if one_d else k, groups=m.groups,
            bias=m.bias is not None, label=name)
        ds._host["weight"] = _np(m.weight).reshape(ds._host["weight"].shape)
        if m.bias is not None:
            ds._host["bias"] = _np(m.bias)
        if isinstance(m.padding, str):
            if m.padding == "valid":
                pads: list[int] = [0] * 2 * len(k)
            else:  # torch's "same" (stride 1): total d (k - 1), the odd one at the end
                tot = [d * (kk - 1) for d, kk in zip(m.dilation, k)]
                pads = [v for t in tot for v in (t // 2, t - t // 2)]
        else:
            pads = [v for p in m.padding for v in (p, p)]
        if one_d:
            return N.Convolution1dNode(x, ds, stride=m.stride[0], dilation=m.dilation[0],
                                       padding=tuple(pads), name=name)
        return N.ConvolutionNode(x, ds, stride=tuple(m.stride), dilation=tuple(m.dilation),
                                 padding=tuple(pads), name=name)

    def linear(self, m: Any, name: str, x: Any) -> Any:
        ds = FullyConnectedDataSource(m.in_features, m.out_features, bias=m.bias is not None,
                                      label=name)
        ds._host["weight"] = _np(m.weight)
        if m.bias is not None:
            ds._host["bias"] = _np(m.bias)
        per_step = len(N.as_value(x, None).shape) > 2  # torch applies Linear to the last dim
        return N.FullyConnectedNode(x, ds, per_step=per_step, name=name)

    def recurrent(self, m: Any, name: str, x: Any) -> Any:
        nn = self.nn
        if m.dropout:
            raise self.unsupported(f"{type(m).__name__}(dropout={m.dropout})", name)
        if getattr(m, "proj_size", 0):
            raise self.unsupported("LSTM(proj_size=...)", name)
        mode = "lstm" if isinstance(m, nn.LSTM) else "gru" if isinstance(m, nn.GRU) else \
            f"rnn_{m.nonlinearity}"
        ds = RecurrentDataSource(mode, m.input_size, m.hidden_size, num_layers=m.num_layers,
                                 bias=m.bias, bidirectional=m.bidirectional,
                                 weights={k: _np(v) for k, v in m.named_parameters()}, label=name)
        cls = {"lstm": N.LSTMNode, "gru": N.GRUNode}.get(mode, N.RNNNode)
        node = cls(x, ds, batch_first=m.batch_first, return_state=True, name=name)
        r = node.results
        return (r[0], (r[1], r[2])) if mode == "lstm" else (r[0], r[1])

    def norm(self, m: Any, name: str, x: Any) -> Any:
        nn = self.nn
        affine = bool(getattr(m, "affine", True))
        c = m.num_channels if isinstance(m, nn.GroupNorm) else m.num_features
        running = bool(getattr(m, "track_running_stats", False)) and m.running_mean is not None
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and m.momentum is None:
            raise self.unsupported("momentum=None (cumulative average)", name)
        ds = NormalizationDataSource(
            c, affine=affine, running_stats=running, eps=m.eps,
            momentum=m.momentum if m.momentum is not None else 0.1,
            gamma=_np(m.weight) if affine else None, beta=_np(m.bias) if affine else None,
            running_mean=_np(m.running_mean) if running else None,
            running_var=_np(m.running_var) if running else None, label=name)
        if running:
            ds.num_batches_tracked = int(m.num_batches_tracked)
        if isinstance(m, nn.GroupNorm):
            return N.GroupNormalizationNode(x, ds, m.num_groups, name=name)
        if isinstance(m, nn.InstanceNorm2d):
            if running:
                raise self.unsupported("InstanceNorm2d(track_running_stats=True)", name)
            return N.InstanceNormalizationNode(x, ds, name=name)
        return N.BatchNormalizationNode(x, ds, name=name)

    def pool(self, m: Any, name: str, x: Any) -> Any:
        nn = self.nn
        if isinstance(m, nn.AdaptiveAvgPool1d):
            return N.AdaptiveAveragePooling1dNode(x, _ints(m.output_size, 1), name=name)
        if isinstance(m, nn.AdaptiveAvgPool2d):
            size = m.output_size if isinstance(m.output_size, (tuple, list)) else (m.output_size,) * 2
            if None in size:
                raise self.unsupported(f"AdaptiveAvgPool2d(output_size={m.output_size})", name)
            if tuple(size) == (1, 1):
                return N.GlobalAveragePoolingNode(x, name=name)
            return N.AdaptiveAveragePoolingNode(x, tuple(size), name=name)
        if m.ceil_mode:
            raise self.unsupported("ceil_mode=True", name)
        one_d = isinstance(m, (nn.MaxPool1d, nn.AvgPool1d))
        n = 1 if one_d else 2
        k = _ints(m.kernel_size, n)
        s = _ints(m.stride if m.stride is not None else m.kernel_size, n)
        p = _ints(m.padding, n)
        if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d)):
            if one_d:
                return N.PoolingMax1dNode(x, k, s, padding=p, dilation=_ints(m.dilation, 1), name=name)
            return N.PoolingMaxNode(x, k, s, padding=p, dilation=_ints(m.dilation, 2), name=name)
        if getattr(m, "divisor_override", None) is not None:
            raise self.unsupported(f"{type(m).__name__}(divisor_override=...)", name)
        cls = N.PoolingAverage1dNode if one_d else N.PoolingAverageNode
        return cls(x, k, s, padding=p, count_include_pad=m.count_include_pad, name=name)

    def call_module(self, m: Any, name: str, args: list[Any], kwargs: dict) -> Any:
        nn = self.nn
        x = args[0] if args else None
        if kwargs or len(args) != 1:
            raise self.unsupported(f"{type(m).__name__} called with {len(args)} arguments", name)
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            return self.conv(m, name, x)
        if isinstance(m, nn.Linear):
            return self.linear(m, name, x)
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d)):
            return self.norm(m, name, x)
        if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
                          nn.AdaptiveAvgPool2d)):
            return self.pool(m, name, x)
        if isinstance(m, (nn.LSTM, nn.GRU, nn.RNN)):
            return self.recurrent(m, name, x)
        if isinstance(m, nn.Embedding):
            if m.max_norm is not None or m.sparse:
                raise self.unsupported("Embedding(max_norm=/sparse=)", name)
            ds = EmbeddingDataSource(m.num_embeddings, m.embedding_dim, padding_idx=m.padding_idx,
                                     weight=_np(m.weight), label=name)
            return N.EmbeddingNode(x, ds, name=name)
        if isinstance(m, nn.LayerNorm):
            affine = m.weight is not None
            ds = LayerNormDataSource(m.normalized_shape, eps=m.eps, elementwise_affine=affine,
                                     bias=m.bias is not None,
                                     weight=_np(m.weight) if affine else None,
                                     beta=_np(m.bias) if m.bias is not None else None, label=name)
            return N.LayerNormalizationNode(x, ds, name=name)
        if isinstance(m, nn.Flatten):
            if m.start_dim != 1 or m.end_dim != -1:
                raise self.unsupported(f"Flatten({m.start_dim}, {m.end_dim})", name)
            return N.FlattenNode(x, name=name)
        if isinstance(m, nn.Identity):
            return x
        if isinstance(m, nn.Dropout):
            return N.DropoutNode(x, m.p, name=name) if m.p > 0 else x
        if isinstance(m, (nn.Softmax, nn.LogSoftmax)):
            cls = N.SoftMaxNode if isinstance(m, nn.Softmax) else N.LogSoftMaxNode
            return cls(x, m.dim if m.dim is not None else 1, name=name)
        neuron = self.neuron_module(m)
        if neuron is not None:
            cls, params = neuron
            return cls(x, name=name, **params)
        raise self.unsupported(f"module {type(m).__name__}", name)

    def neuron_module(self, m: Any) -> tuple[type, dict] | None:
        nn = self.nn
        table = [(nn.ReLU, N.ReLUNode, {}), (nn.Sigmoid, N.SigmoidNode, {}), (nn.Tanh, N.TanhNode, {}),
                 (nn.LeakyReLU, N.LeakyReLUNode, {"negative_slope": "negative_slope"}),
                 (nn.ELU, N.ELUNode, {"alpha": "alpha"}),
                 (nn.GELU, N.GELUNode, {"approximate": "approximate"}),
                 (nn.Softplus, N.SoftplusNode, {"beta": "beta", "threshold": "threshold"})]
        for t, cls, attrs in table:
            if isinstance(m, t):
                return cls, {k: getattr(m, a) for k, a in attrs.items()}
        return None

    # ---- functions and methods -------------------------------------------------------------
    def call_function(self, fn: Any, where: str, args: list[Any], kwargs: dict) -> Any:
        torch, F = self.torch, self.torch.nn.functional
        if fn in (operator.add, operator.iadd, torch.add) and not kwargs:
            a, b = args
            if not (isinstance(a, (N.Value, N.Node)) and isinstance(b, (N.Value, N.Node))):
                raise self.unsupported("add with a constant", where)
            return N.AdditionNode(a, b, name=where)
        if fn in (torch.relu, F.relu) and not kwargs.get("inplace", False):
            return N.ReLUNode(args[0], name=where)
        if fn in (torch.tanh, F.tanh) and not kwargs:
            return N.TanhNode(args[0], name=where)
        if fn in (torch.sigmoid, F.sigmoid) and not kwargs:
            return N.SigmoidNode(args[0], name=where)
        if fn is torch.flatten:
            start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
            end = args[2] if len(args) > 2 else kwargs.get("end_dim", -1)
            if start != 1 or end != -1:
                raise self.unsupported(f"torch.flatten(start_dim={start}, end_dim={end})", where)
            return N.FlattenNode(args[0], name=where)
        if fn is torch.cat:
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            if dim != 1:
                raise self.unsupported(f"torch.cat(dim={dim})", where)
            return N.ConcatenationNode(list(args[0]), 1, name=where)
        if fn is operator.getitem:
            return self.getitem(args[0], args[1], where)
        raise self.unsupported(f"function {getattr(fn, '__name__', fn)}", where)

    def getitem(self, x: Any, key: Any, where: str) -> Any:
        if isinstance(x, (tuple, list)):  # a recurrent module's (output, state) structure
            return x[key]
        key = key if isinstance(key, tuple) else (key,)
        full = slice(None)
        v = N.as_value(x, None)
        if isinstance(v.producer, _RecurrentNode) and v.index >= 1 and len(key) == 1 \
                and isinstance(key[0], int):  # h_n[i] of a recurrent state (L*D, N, H)
            return N.SelectNode(x, 0, key[0], batch_dim=1, name=where)
        ints = [i for i, k in enumerate(key) if isinstance(k, int)]
        if len(ints) == 1 and all(k == full for i, k in enumerate(key) if i != ints[0]) and ints[0] > 0:
            return N.SelectNode(x, ints[0], key[ints[0]], name=where)
        raise self.unsupported(f"indexing {key} (only x[:, i] / x[:, :, i] ... and h_n[i])", where)

    def call_method(self, meth: str, where: str, args: list[Any], kwargs: dict) -> Any:
        x = args[0]
        if meth == "permute":
            dims = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
            return N.PermuteNode(x, dims, name=where)
        if meth == "transpose":
            nd = len(N.as_value(x, None).shape)
            d0, d1 = (a % nd for a in args[1:3])
            dims = list(range(nd))
            dims[d0], dims[d1] = dims[d1], dims[d0]
            return N.PermuteNode(x, dims, name=where)
        if meth == "size":
            return _Size(x, args[1] if len(args) > 1 else None)
        if meth in ("view", "reshape", "flatten"):
            shape = args[1:]
            if meth == "flatten":
                if tuple(shape) not in ((1,), (1, -1)) and kwargs.get("start_dim", 1) != 1:
                    raise self.unsupported(f"x.flatten{tuple(shape)}", where)
                return N.FlattenNode(x, name=where)
            if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
                shape = tuple(shape[0])
            if len(shape) == 2 and shape[1] == -1 and (isinstance(shape[0], _Size) and shape[0].dim == 0):
                return N.FlattenNode(x, name=where)
            raise self.unsupported(f"x.{meth}{tuple(shape)} (only x.{meth}(x.size(0), -1))", where)
        raise self.unsupported(f"method .{meth}()", where)


class _Size:
    """x.size(dim) in the traced code: only its use as the batch size of a flattening view."""

    def __init__(self, x: Any, dim: Any):
        self.x, self.dim = x, dim


def from_torch(module: Any, example_input: Any, *, loss: str | None = "cross_entropy",
               reduction: str = "elementwise_mean", loss_options: dict | None = None,
               optimizer: Any = None, name: str = "input", **graph_kw: Any) -> Any:
    """A pymetalnn training graph (loss given: TrainingGraph of `loss` on the module's output,
    with torch's "mean" over every term by default (LossNode's "elementwise_mean"; "mean" is the
    mean of per-sample sums), loss_options the loss op's (label_smoothing, ...), graph_kw passed
    to TrainingGraph) or the output Value
    (loss=None) of `module` traced with torch.fx. example_input: a batch (N, ...) whose per-sample
    shape fixes the graph input's. Node names are the module's qualified names; unsupported
    modules or operations raise GraphError naming them."""
    import torch
    import torch.fx

    gm = torch.fx.symbolic_trace(module)
    mods = dict(gm.named_modules())
    arr = example_input.detach().cpu().numpy() if isinstance(example_input, torch.Tensor) \
        else np.asarray(example_input)
    shape = tuple(arr.shape)
    if len(shape) < 2:
        raise ValueError(f"example_input: expected a batch (N, ...), got shape {shape}")
    cv = _Converter(torch, module, example_input)
    env: dict[Any, Any] = {}
    out = None

    def val(a: Any) -> Any:
        if isinstance(a, torch.fx.Node):
            return env[a]
        if isinstance(a, (list, tuple)):
            return type(a)(val(v) for v in a)
        return a

    for n in gm.graph.nodes:
        where = n.target if isinstance(n.target, str) else n.name
        if n.op == "placeholder":
            if env:
                raise cv.unsupported("a second input", n.name)
            env[n] = N.ImageNode(shape[1:], int32 if arr.dtype.kind in "iu" else float32, name=name)
        elif n.op == "call_module":
            env[n] = cv.call_module(mods[n.target], n.target, [val(a) for a in n.args],
                                    {k: val(v) for k, v in n.kwargs.items()})
        elif n.op == "call_function":
            env[n] = cv.call_function(n.target, n.name, [val(a) for a in n.args],
                                      {k: val(v) for k, v in n.kwargs.items()})
        elif n.op == "call_method":
            env[n] = cv.call_method(n.target, n.name, [val(a) for a in n.args],
                                    {k: val(v) for k, v in n.kwargs.items()})
        elif n.op == "output":
            out = val(n.args[0])
        else:
            raise cv.unsupported(f"{n.op} {n.target}", where)
    if not isinstance(out, (N.Value, N.Node)):
        raise GraphError(None, "from_torch: the module's output must be one tensor")
    if loss is None:
        return out
    from .graph import TrainingGraph

    return TrainingGraph(N.LossNode(out, loss, reduction=reduction, name="loss", **(loss_options or {})),
                         optimizer=optimizer, **graph_kw)
