"""Data sources: the only way weights reach a node (MPS's MPSCNNConvolutionDataSource protocol,
in Python).

A data source describes its weights (names and shapes, PyTorch's layouts and state_dict names),
`load()`s them onto the device just in time, `purge()`s them (low-memory mode: after each use),
and `update()`s them after the gradient pass with an optimizer from pymetalnn.optim that it
creates once, at its first load. The graph calls all three itself:

  normal mode       load() once, before the first use; update() once per training step, right
                    after the node's gradient; never purged (until `Graph.purge()`). Data
                    sources that override none of the three may be grouped instead
                    (optimize['group_updates'], docs/graph.md): weights are views of one flat
                    buffer and one multi-tensor update runs after the group's last gradient.
  low-memory mode   load() before every use and purge() after it: per training step a weighted
                    node sees load, purge (forward), then load, update, purge (gradient).

Subclass one of these (or `DataSource`) and override the protocol methods to count calls, stream
weights from disk, or quantize. Initial values: "he" (Kaiming normal, fan_in, gain sqrt(2)),
"glorot" (Xavier uniform), "uniform" (PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for
linear/conv/recurrent layers), "zeros", or the arrays given. Biases start at zero (He/Glorot) or
U(-1/sqrt(fan_in), ...) ("uniform").
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from ..optim import Optimizer
from ..runtime import Device
from ..runtime import device as default_device
from ..tensor import Tensor, float32, tensor

INITS = ("he", "glorot", "uniform", "zeros")


def _rng(seed: Any) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def init_array(kind: Any, shape: tuple[int, ...], fan_in: int, fan_out: int,
               rng: np.random.Generator) -> np.ndarray:
    """Initial weights: 'he', 'glorot', 'uniform', 'zeros', or an array (copied, shape-checked)."""
    if not isinstance(kind, str):
        a = np.asarray(kind, dtype=np.float32)
        if a.shape != tuple(shape):
            raise ValueError(f"init: array of shape {a.shape}, expected {tuple(shape)}")
        return a.copy()
    if kind == "he":
        return (rng.standard_normal(shape) * np.sqrt(2.0 / max(fan_in, 1))).astype(np.float32)
    if kind == "glorot":
        lim = np.sqrt(6.0 / max(fan_in + fan_out, 1))
        return rng.uniform(-lim, lim, shape).astype(np.float32)
    if kind == "uniform":
        lim = 1.0 / np.sqrt(max(fan_in, 1))
        return rng.uniform(-lim, lim, shape).astype(np.float32)
    if kind == "zeros":
        return np.zeros(shape, np.float32)
    raise ValueError(f"init: expected one of {', '.join(INITS)} or an array, got {kind!r}")


def _bias_init(init: Any) -> str:
    """Biases start at zero, or uniform where the weights use PyTorch's default."""
    return "uniform" if isinstance(init, str) and init == "uniform" else "zeros"


class DataSource:
    """Base data source: named float32 parameters kept on the host until `load()`.

    Subclasses fill `self._host` (name -> array) and set `self.trainable` (names the optimizer
    updates, in order: `update(grads)` takes their gradients in this order) and
    `self.buffers` (names updated by the forward pass itself, such as running statistics).
    """

    kind = "weights"

    def __init__(self, *, optimizer: Callable[[list[Tensor]], Optimizer] | None = None,
                 device: Device | None = None, label: str | None = None) -> None:
        self.optimizer_factory = optimizer
        self.optimizer: Optimizer | None = None
        self.device = device
        self.label = label or type(self).__name__
        self._host: dict[str, np.ndarray] = {}
        self._dev: dict[str, Tensor] | None = None
        self._dirty = False
        self._pending_opt_state: Mapping[str, Any] | None = None
        self.trainable: list[str] = []
        self.buffers: list[str] = []

    # ---- description ------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Parameter and buffer names, in state_dict order."""
        return list(self._host)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self._host.items()}

    def describe(self) -> str:
        return f"{self.label}: " + ", ".join(f"{k} {v}" for k, v in self.shapes().items())

    @property
    def loaded(self) -> bool:
        return self._dev is not None

    # ---- the protocol -------------------------------------------------------------------------
    def load(self) -> bool:
        """Put the weights on the device (no-op if there). Creates the optimizer at the first
        load. Returns True (MPS's `load` returns success)."""
        if self._dev is None:
            dev = self.device = self.device or default_device()
            self._dev = {k: tensor(v, dev, float32) for k, v in self._host.items()}
            self._dirty = False
            self._bind_optimizer()
        return True

    def purge(self) -> None:
        """Release the device copy (copying changed weights back to the host first)."""
        if self._dev is None:
            return
        if self._dirty:
            self._download()
        self._dev = None

    def update(self, grads: list[Tensor | None]) -> None:
        """Apply the optimizer to the trainable weights given their gradients (in `trainable`
        order; None skips one). Queued on the device; returns at once."""
        if self._dev is None:
            raise RuntimeError(f"{self.label}: update() before load()")
        if self.optimizer is None:
            self._bind_optimizer()  # loaded before an optimizer factory was given
        if self.optimizer is None:
            raise RuntimeError(f"{self.label}: no optimizer (pass optimizer= to the data source "
                               "or to the TrainingGraph)")
        self.optimizer.step(list(grads))
        self._dirty = True

    # ---- helpers for nodes and the graph -----------------------------------------------------
    def tensors(self) -> dict[str, Tensor]:
        """The device tensors (after load)."""
        if self._dev is None:
            raise RuntimeError(f"{self.label}: weights used before load()")
        return self._dev

    def mark_dirty(self) -> None:
        """The device copy changed (e.g. running statistics updated by a forward pass)."""
        self._dirty = True

    def trainable_tensors(self) -> list[Tensor]:
        t = self.tensors()
        return [t[k] for k in self.trainable]

    def _bind_optimizer(self) -> None:
        if not self.trainable:
            return
        params = self.trainable_tensors()
        if self.optimizer is None:
            if self.optimizer_factory is None:
                return
            self.optimizer = self.optimizer_factory(params)
            if not isinstance(self.optimizer, Optimizer):
                raise TypeError(f"{self.label}: optimizer factory returned "
                                f"{type(self.optimizer).__name__}, not a pymetalnn.optim.Optimizer")
            if self._pending_opt_state is not None:
                self.optimizer.load_state_dict(self._pending_opt_state)
                self._pending_opt_state = None
        else:
            # reloaded after a purge: the optimizer keeps its state, updates the new tensors
            opt = self.optimizer
            opt.params = list(params)
            i = 0
            for g in opt.param_groups:
                n = len(g["params"])
                g["params"] = list(params[i:i + n])
                i += n

    def _download(self) -> None:
        assert self._dev is not None
        for k, t in self._dev.items():
            self._host[k] = t.numpy().astype(np.float32).reshape(self._host[k].shape)
        self._dirty = False

    # ---- save / load ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """Host copies of the parameters and buffers (reads the device copy if it changed)."""
        if self._dev is not None and self._dirty:
            self._download()
            self._dirty = False
        return {k: v.copy() for k, v in self._host.items()}

    def load_state_dict(self, d: Mapping[str, Any], strict: bool = True) -> list[str]:
        """Set parameters from arrays named as in `names()` (checked first). Returns the names
        set. strict: every name must be present."""
        new: dict[str, np.ndarray] = {}
        for k, v in self._host.items():
            if k not in d:
                if strict:
                    raise ValueError(f"{self.label}: missing {k!r}")
                continue
            a = np.asarray(d[k])
            # exact shape: a same-size array of another shape (a transposed weight) is refused,
            # not reshaped into place; floating-point values convert (as torch's load_state_dict)
            if a.shape != v.shape:
                raise ValueError(f"{self.label}: {k!r} has shape {a.shape}, expected {v.shape}")
            if a.dtype.kind != "f":
                raise ValueError(f"{self.label}: {k!r} has dtype {a.dtype}, expected a "
                                 f"floating-point array ({v.dtype})")
            new[k] = a.astype(v.dtype)
        self._host.update(new)
        if self._dev is not None:
            for k, a in new.items():
                self._dev[k].buffer.write(a)
            self._dirty = False
        return list(new)

    def optimizer_state(self) -> dict[str, np.ndarray] | None:
        if self.optimizer is not None:
            return self.optimizer.state_dict()
        return dict(self._pending_opt_state) if self._pending_opt_state is not None else None

    def load_optimizer_state(self, d: Mapping[str, Any]) -> None:
        if self.optimizer is not None:
            self.optimizer.load_state_dict(d)
        else:  # applied when the optimizer is created at the first load
            self._pending_opt_state = dict(d)

    def __repr__(self) -> str:
        return f"<{self.describe()}>"


class ConvolutionDataSource(DataSource):
    """Weights of a convolution: 'weight' (out, in/groups, kH, kW) and 'bias' (out,)."""

    kind = "convolution"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, *, groups: int = 1,
                 bias: bool = True, init: Any = "he", bias_init: Any = None, seed: Any = None,
                 optimizer: Any = None, device: Device | None = None, label: str | None = None):
        super().__init__(optimizer=optimizer, device=device, label=label)
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups: {groups} must divide in_channels {in_channels} and "
                             f"out_channels {out_channels}")
        self.in_channels, self.out_channels, self.groups = int(in_channels), int(out_channels), int(groups)
        self.kernel_size = (int(kh), int(kw))
        self.has_bias = bool(bias)
        rng = _rng(seed)
        shape = self.weight_shape()
        fan_in, fan_out = self._fans()
        self._host["weight"] = init_array(init, shape, fan_in, fan_out, rng)
        if self.has_bias:
            bi = bias_init if bias_init is not None else _bias_init(init)
            self._host["bias"] = init_array(bi, (self.bias_size(),), fan_in, fan_out, rng)
        self.trainable = list(self._host)

    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    def bias_size(self) -> int:
        return self.out_channels

    def _fans(self) -> tuple[int, int]:
        k = self.kernel_size[0] * self.kernel_size[1]
        return self.in_channels // self.groups * k, self.out_channels // self.groups * k

    def weights_and_bias(self) -> tuple[Tensor, Tensor | None]:
        t = self.tensors()
        return t["weight"], t.get("bias")


class Conv1dDataSource(ConvolutionDataSource):
    """Weights of a 1-D convolution (torch.nn.Conv1d): 'weight' (out, in/groups, k), 'bias'
    (out,). They run as a (1, k) 2-D convolution (the device tensor is (out, in/groups, 1, k), the
    same memory); shapes(), state_dict() and load_state_dict() use torch's 3-D shape."""

    kind = "convolution1d"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, **kw: Any):
        k = tuple(kernel_size) if isinstance(kernel_size, (tuple, list)) else (kernel_size,)
        if len(k) == 2 and int(k[0]) == 1:
            k = k[1:]
        if len(k) != 1:
            raise ValueError(f"kernel_size: expected an int, got {kernel_size!r}")
        super().__init__(in_channels, out_channels, (1, int(k[0])), **kw)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        d = super().shapes()
        d["weight"] = d["weight"][:2] + d["weight"][3:]
        return d

    def state_dict(self) -> dict[str, np.ndarray]:
        d = super().state_dict()
        d["weight"] = d["weight"][:, :, 0]
        return d

    def load_state_dict(self, d: Any, strict: bool = True) -> list[str]:
        d = dict(d)
        if "weight" in d:
            w = np.asarray(d["weight"], np.float32)
            if w.shape != self.shapes()["weight"]:
                raise ValueError(f"{self.label}: 'weight' has shape {w.shape}, expected "
                                 f"{self.shapes()['weight']}")
            d["weight"] = w[:, :, None]
        return super().load_state_dict(d, strict)


class ConvolutionTransposeDataSource(ConvolutionDataSource):
    """Weights of a transposed convolution: 'weight' (in, out/groups, kH, kW), 'bias' (out,)."""

    kind = "convolution_transpose"

    def weight_shape(self) -> tuple[int, ...]:
        return (self.in_channels, self.out_channels // self.groups, *self.kernel_size)

    def _fans(self) -> tuple[int, int]:
        k = self.kernel_size[0] * self.kernel_size[1]
        return self.out_channels // self.groups * k, self.in_channels // self.groups * k


class FullyConnectedDataSource(DataSource):
    """Weights of a fully connected layer: 'weight' (out, in), 'bias' (out,) (torch.nn.Linear)."""

    kind = "fully_connected"

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True,
                 init: Any = "he", bias_init: Any = None, seed: Any = None, optimizer: Any = None,
                 device: Device | None = None, label: str | None = None):
        super().__init__(optimizer=optimizer, device=device, label=label)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.has_bias = bool(bias)
        rng = _rng(seed)
        self._host["weight"] = init_array(init, (self.out_features, self.in_features),
                                          self.in_features, self.out_features, rng)
        if self.has_bias:
            bi = bias_init if bias_init is not None else _bias_init(init)
            self._host["bias"] = init_array(bi, (self.out_features,), self.in_features,
                                            self.out_features, rng)
        self.trainable = list(self._host)

    def weights_and_bias(self) -> tuple[Tensor, Tensor | None]:
        t = self.tensors()
        return t["weight"], t.get("bias")


class NormalizationDataSource(DataSource):
    """Batch / instance / group normalization parameters: 'weight' (gamma) and 'bias' (beta)
    (C,) when affine, and for batch norm the 'running_mean' / 'running_var' buffers (C,) that the
    training forward moves by `momentum` (torch.nn.BatchNorm2d's names and rules)."""

    kind = "normalization"

    def __init__(self, num_features: int, *, affine: bool = True, running_stats: bool = True,
                 eps: float = 1e-5, momentum: float = 0.1, gamma: Any = None, beta: Any = None,
                 running_mean: Any = None, running_var: Any = None, optimizer: Any = None,
                 device: Device | None = None, label: str | None = None):
        super().__init__(optimizer=optimizer, device=device, label=label)
        c = self.num_features = int(num_features)
        self.eps, self.momentum = float(eps), float(momentum)
        self.affine, self.running_stats = bool(affine), bool(running_stats)
        rng = _rng(0)
        if self.affine:
            self._host["weight"] = init_array(np.ones(c) if gamma is None else gamma, (c,), c, c, rng)
            self._host["bias"] = init_array(np.zeros(c) if beta is None else beta, (c,), c, c, rng)
            self.trainable = ["weight", "bias"]
        if self.running_stats:
            self._host["running_mean"] = init_array(np.zeros(c) if running_mean is None
                                                    else running_mean, (c,), c, c, rng)
            self._host["running_var"] = init_array(np.ones(c) if running_var is None
                                                   else running_var, (c,), c, c, rng)
            self.buffers = ["running_mean", "running_var"]
        self.num_batches_tracked = 0

    def state_dict(self) -> dict[str, np.ndarray]:
        d = super().state_dict()
        if self.running_stats:
            d["num_batches_tracked"] = np.array(self.num_batches_tracked, np.int64)
        return d

    def load_state_dict(self, d: Mapping[str, Any], strict: bool = True) -> list[str]:
        names = super().load_state_dict({k: v for k, v in d.items() if k != "num_batches_tracked"},
                                        strict)
        if "num_batches_tracked" in d:
            self.num_batches_tracked = int(np.asarray(d["num_batches_tracked"]))
        return names


class LayerNormDataSource(DataSource):
    """Weights of a layer norm: 'weight' and 'bias' shaped normalized_shape
    (torch.nn.LayerNorm(elementwise_affine=True)); ones and zeros unless given."""

    kind = "layer_norm"

    def __init__(self, normalized_shape: Any, *, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, weight: Any = None, beta: Any = None, optimizer: Any = None,
                 device: Device | None = None, label: str | None = None):
        super().__init__(optimizer=optimizer, device=device, label=label)
        ns = (normalized_shape,) if isinstance(normalized_shape, (int, np.integer)) else normalized_shape
        self.normalized_shape = tuple(int(v) for v in ns)
        self.eps = float(eps)
        if elementwise_affine:
            self._host["weight"] = (np.ones(self.normalized_shape, np.float32) if weight is None
                                    else np.asarray(weight, np.float32).reshape(self.normalized_shape))
            if bias:
                self._host["bias"] = (np.zeros(self.normalized_shape, np.float32) if beta is None
                                      else np.asarray(beta, np.float32).reshape(self.normalized_shape))
        self.trainable = list(self._host)


class EmbeddingDataSource(DataSource):
    """The table of an embedding: 'weight' (num_embeddings, embedding_dim) (torch.nn.Embedding;
    N(0, 1) initial values as torch's, or the array given)."""

    kind = "embedding"

    def __init__(self, num_embeddings: int, embedding_dim: int, *, padding_idx: int | None = None,
                 weight: Any = None, seed: Any = None, optimizer: Any = None,
                 device: Device | None = None, label: str | None = None):
        super().__init__(optimizer=optimizer, device=device, label=label)
        self.num_embeddings, self.embedding_dim = int(num_embeddings), int(embedding_dim)
        self.padding_idx = padding_idx
        shape = (self.num_embeddings, self.embedding_dim)
        if weight is None:
            w = _rng(seed).standard_normal(shape).astype(np.float32)
            if padding_idx is not None:
                w[padding_idx] = 0.0
        else:
            w = np.asarray(weight, np.float32)
            if w.shape != shape:
                raise ValueError(f"weight: expected shape {shape}, got {w.shape}")
        self._host["weight"] = w
        self.trainable = ["weight"]


class RecurrentDataSource(DataSource):
    """Weights of an LSTM / GRU / RNN stack, torch.nn.LSTM's names and layouts
    (weight_ih_l{k}[_reverse] (G*H, F_k), weight_hh_l{k} (G*H, H), bias_ih_l{k}, bias_hh_l{k})."""

    kind = "recurrent"
    GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}

    def __init__(self, mode: str, input_size: int, hidden_size: int, *, num_layers: int = 1,
                 bias: bool = True, bidirectional: bool = False, init: Any = "uniform",
                 weights: Mapping[str, Any] | None = None, seed: Any = None,
                 optimizer: Any = None, device: Device | None = None, label: str | None = None):
        super().__init__(optimizer=optimizer, device=device, label=label)
        if mode not in self.GATES:
            raise ValueError(f"mode: expected one of {', '.join(self.GATES)}, got {mode!r}")
        self.mode, self.input_size, self.hidden_size = mode, int(input_size), int(hidden_size)
        self.num_layers, self.has_bias, self.bidirectional = int(num_layers), bool(bias), bool(bidirectional)
        rng = _rng(seed)
        g, h, d = self.GATES[mode], self.hidden_size, 2 if bidirectional else 1
        for k in range(self.num_layers):
            f = self.input_size if k == 0 else h * d
            for sfx in ("", "_reverse")[:d]:
                shapes = {f"weight_ih_l{k}{sfx}": (g * h, f), f"weight_hh_l{k}{sfx}": (g * h, h)}
                if self.has_bias:
                    shapes.update({f"bias_ih_l{k}{sfx}": (g * h,), f"bias_hh_l{k}{sfx}": (g * h,)})
                for name, shp in shapes.items():
                    src = weights[name] if weights is not None and name in weights else init
                    self._host[name] = init_array(src, shp, h, g * h, rng)
        self.trainable = list(self._host)
