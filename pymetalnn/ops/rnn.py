"""Recurrent layers over whole sequences: LSTM, GRU and Elman RNN (tanh / relu), stacked and
bidirectional, forward (training or inference) and backward through time (kernels/rnn.metal for
the cells, kernels/gemm.metal for every matrix product).

Design note
-----------
Layouts and weights are PyTorch's (torch.nn.LSTM / GRU / RNN, batch_first=False), so weights move
both ways by name: the input is time-major (T, N, F), or a list of T matrices (N, F) (MPS's
[time][batch, features] layout: the result then comes back as a list too); the output is
(T, N, D*H) with D = 2 directions concatenated on the last axis; h_n / c_n are (L*D, N, H),
index k*D + d. Weights are named weight_ih_l{k}[_reverse] (G*H, F_k), weight_hh_l{k}[_reverse]
(G*H, H), bias_ih_l{k}[_reverse], bias_hh_l{k}[_reverse] (G*H,), gate blocks in torch's order
(LSTM i, f, g, o; GRU r, z, n; G = 4, 3, 1), and are passed as a dict keyed by those names (a
torch module or its state_dict work too: `rnn_weights`) or a list in `rnn_weight_names` order.

One layer and direction runs as:

    xp = x W_ih^T + b_ih                        one gemm for all T steps, before the loop
    for each step t (reversed for the reverse direction):
        hp = h_{t-1} W_hh^T + b_hh              one gemm
        cell kernel: gates, state update, h_t    one fused launch (rnn.metal)

and backward through time, steps in the opposite order:

    cell backward kernel: dG_t from dh = dy_t + dhr (and the LSTM's float dc carry)
    dhr = dG_t W_hh (+ z * dh for GRU)          one gemm
    then, over all steps at once:  dW_ih = dG^T x,  dW_hh = dG^T h_prev,  db = sum_t,n dG,
                                   dx = dG W_ih  (the next-lower layer's dy)

The weight gradients are sums over steps, done as ONE product over the T*N rows of all steps
(the h_0 term is a second gemm with beta = 1), which is the same sum with far more parallelism
than T accumulating products.

Training forward keeps what backward needs in an `RNNWorkspace` (layer inputs, per-direction h
sequences, LSTM c_t in float, saved gate activations); inference (training=False) returns None
and keeps only a running state. float16 storage computes the cells in float and keeps the LSTM
state and its gradient carry in float; the gemms accumulate in float.

Host cost per step. A step's GPU work is small (two launches of a 64 x 2048 x 512 product and
N*H threads at hidden 512, batch 64), comparable to one gemm() call's Python (validation and
planning, ~60 us on the development box). So the cell kernel also writes h_t (backward:
dG_t) to a fixed `stage` buffer, the per-step gemm always reads that same operand, and after
its first call it is captured with dev.capture() and replayed (`_Replayed`): per step the host
does one cell launch and one replay. Temporaries live in per-device scratch buffers that
outlive a call (`_scratch_tensor`), so a caller may also capture a whole training step once
(after a warm-up call with the same shapes) and replay it.

The per-step products use Tensor views into the sequence buffers, so this needs a backend with
buffer views (cuda, cpu); the cell kernels themselves take whole buffers and offsets.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import numpy as np

from ..params import CONST, RnnBwdParams, RnnFwdParams
from ..runtime import Buffer, Device
from ..tensor import Tensor, TensorLike, float16, float32
from ._common import (
    as_tensor,
    boolean,
    empty,
    kernel,
    pick_device,
    suffix,
    tensor_arg,
    zeros,
)
from .copy import list_to_sequence, sequence_to_list
from .gemm import gemm, linear_bias_grad

SOURCE = "rnn.metal"
MODES = ("lstm", "gru", "rnn_tanh", "rnn_relu")
GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
SAVED = {"lstm": 4, "gru": 4, "rnn_tanh": 0, "rnn_relu": 0}  # saved columns per unit (x H)
GRID_CAP = 1 << 20  # cell threads per launch; the kernels loop past it
MAX_OFFSET = 2**32 - 1  # element offsets are uint in RnnFwdParams / RnnBwdParams
# a per-step gemm that will run at least this many more times is captured and replayed
# (`_Replayed`); a huge value turns replay off (every step calls gemm()).
REPLAY_MIN_CALLS = 2

# RnnFwdParams.flags / RnnBwdParams.flags (kernels/params.h RNN_*)
HS, SAVE, LAST, C0, ZERO_C, DY, DHR, FIRST, DCN, STAGE = (
    CONST[f"RNN_{f}"] for f in ("HS", "SAVE", "LAST", "C0", "ZERO_C", "DY", "DHR", "FIRST", "DCN",
                                "STAGE"))


# ---- weights --------------------------------------------------------------------------------
def rnn_weight_names(num_layers: int = 1, bias: bool = True, bidirectional: bool = False
                     ) -> list[str]:
    """torch's parameter names in its order (`_flat_weights_names`): per layer, per direction,
    weight_ih, weight_hh[, bias_ih, bias_hh]."""
    out: list[str] = []
    for k in range(num_layers):
        for sfx in ("", "_reverse")[: 2 if bidirectional else 1]:
            out += [f"weight_ih_l{k}{sfx}", f"weight_hh_l{k}{sfx}"]
            if bias:
                out += [f"bias_ih_l{k}{sfx}", f"bias_hh_l{k}{sfx}"]
    return out


def _host(v: Any) -> Any:
    """A torch tensor as a host numpy array (detached); anything else unchanged."""
    if hasattr(v, "detach") and hasattr(v, "cpu"):
        return v.detach().cpu().numpy()
    return v


def rnn_weights(source: Any, device: Device | None = None, dtype: Any = float32
                ) -> dict[str, Tensor]:
    """Weights keyed by torch's names from a torch.nn.LSTM / GRU / RNN module, its state_dict, or
    any mapping name -> array-like, copied to `device` as `dtype`. Keys other than torch's
    weight/bias names (none for these modules) are dropped."""
    if hasattr(source, "state_dict") and callable(source.state_dict):
        source = source.state_dict()
    if not isinstance(source, Mapping):
        raise ValueError(f"source: expected a torch module or a mapping of names to arrays, got "
                         f"{type(source).__name__}")
    out = {}
    for name, v in source.items():
        if name.startswith(("weight_ih_l", "weight_hh_l", "bias_ih_l", "bias_hh_l")):
            out[name] = as_tensor(_host(v), device, f"source[{name!r}]", dtype)
    return out


def rnn_state_dict(weights: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Host (numpy) copies of weights or gradients keyed by torch's names, ready for
    `module.load_state_dict({k: torch.from_numpy(v) for k, v in d.items()})`."""
    if not isinstance(weights, Mapping):
        raise ValueError(f"weights: expected a mapping of names to tensors, got "
                         f"{type(weights).__name__}")
    return {k: np.asarray(_host(v)) for k, v in weights.items() if v is not None}


def _weights(weights: Any, mode: str, num_layers: int, bias: bool, bidirectional: bool,
             input_size: int, dev: Device, dt: np.dtype) -> tuple[dict[str, Tensor], int]:
    """Validated weights keyed by name, and the hidden size they imply."""
    names = rnn_weight_names(num_layers, bias, bidirectional)
    if hasattr(weights, "state_dict") and callable(weights.state_dict):
        weights = weights.state_dict()
    if isinstance(weights, Mapping):
        missing = [n for n in names if n not in weights]
        if missing:
            raise ValueError(f"weights: missing {', '.join(missing)} (num_layers={num_layers}, "
                             f"bias={bias}, bidirectional={bidirectional})")
        extra = [n for n in weights if n not in names]
        if extra:
            raise ValueError(f"weights: unexpected {', '.join(map(str, extra))} "
                             f"(num_layers={num_layers}, bias={bias}, "
                             f"bidirectional={bidirectional})")
        items = [(n, weights[n]) for n in names]
    elif isinstance(weights, (list, tuple)):
        if len(weights) != len(names):
            raise ValueError(f"weights: expected {len(names)} tensors ({', '.join(names)}), got "
                             f"{len(weights)}")
        items = list(zip(names, weights))
    else:
        raise ValueError(f"weights: expected a dict keyed by torch's names or a list, got "
                         f"{type(weights).__name__}")
    w = {n: as_tensor(_host(v), dev, f"weights[{n!r}]", dt) for n, v in items}
    hh0 = w["weight_hh_l0"]
    if hh0.ndim != 2 or hh0.shape[1] < 1:
        raise ValueError(f"weights['weight_hh_l0']: expected (G*H, H), got shape {hh0.shape}")
    H, G, D = hh0.shape[1], GATES[mode], 2 if bidirectional else 1
    for n, t in w.items():
        k = int(n.split("_l")[1].split("_")[0])
        if n.startswith("weight_ih"):
            want: tuple[int, ...] = (G * H, input_size if k == 0 else D * H)
        elif n.startswith("weight_hh"):
            want = (G * H, H)
        else:
            want = (G * H,)
        if t.shape != want:
            what = "hidden size" if t.ndim == 2 and t.shape[0] % G == 0 and \
                t.shape[0] // G != H else "shape"
            raise ValueError(f"weights[{n!r}]: shape {t.shape}, expected {want} ({mode}, "
                             f"{G} gates, hidden size {H} from weight_hh_l0, input size "
                             f"{input_size if k == 0 else D * H}; {what} mismatch)")
    return w, H


# ---- arguments ------------------------------------------------------------------------------
def _sequence(x: TensorLike, dev: Device, name: str, dtypes: Any = (float32, float16)
              ) -> tuple[Tensor | list[Tensor], tuple[int, int, int], np.dtype]:
    """Validate a (T, N, F) Tensor / array or a list of T (N, F) steps, without dispatching:
    (the tensor or the list of steps, (T, N, F), dtype). `_stacked` makes it one Tensor."""
    if isinstance(x, (list, tuple)):
        if not x:
            raise ValueError(f"{name}: sequence length 0 (an empty list of steps)")
        steps = [tensor_arg(s, dev, f"{name}[{i}]", dtypes, ndim=2) for i, s in enumerate(x)]
        for i, s in enumerate(steps[1:], 1):
            if s.shape != steps[0].shape or s.dtype != steps[0].dtype:
                raise ValueError(f"{name}[{i}]: {s.shape} {s.dtype} differs from {name}[0]'s "
                                 f"{steps[0].shape} {steps[0].dtype}")
        if 0 in steps[0].shape:
            raise ValueError(f"{name}[0]: empty step of shape {steps[0].shape}")
        n, f = steps[0].shape
        return steps, (len(steps), n, f), steps[0].dtype
    t = tensor_arg(x, dev, name, dtypes, ndim=3)
    if t.shape[0] == 0:
        raise ValueError(f"{name}: sequence length 0 (shape {t.shape})")
    if 0 in t.shape:
        raise ValueError(f"{name}: empty dimension in shape {t.shape} (T, N, F)")
    return t, t.shape, t.dtype


def _stacked(x: Tensor | list[Tensor]) -> Tensor:
    """One (T, N, F) tensor from `_sequence`'s result (a list is copied into one)."""
    return list_to_sequence(x) if isinstance(x, list) else x


def _state(v: Any, dev: Device, name: str, dt: np.dtype, shape: tuple[int, ...]
           ) -> Tensor | None:
    if v is None:
        return None
    t = as_tensor(_host(v), dev, name, dt)
    if t.shape != shape:
        raise ValueError(f"{name}: shape {t.shape}, expected {shape} (num_layers * directions, "
                         f"batch, hidden size)")
    return t


def _options(num_layers: Any, bias: Any, bidirectional: Any, training: Any) -> tuple:
    if isinstance(num_layers, bool) or not isinstance(num_layers, (int, np.integer)) \
            or num_layers < 1:
        raise ValueError(f"num_layers: expected an int >= 1, got {num_layers!r}")
    return (int(num_layers), boolean(bias, "bias"), boolean(bidirectional, "bidirectional"),
            boolean(training, "training"))


def _view(t: Tensor, start: int, count: int) -> Tensor:
    """Rows [start, start + count) of t's first axis, as a Tensor sharing t's memory."""
    row = t.nbytes // t.shape[0]
    return Tensor(t.buffer.view(start * row, count * row), (count, *t.shape[1:]), t.dtype)


def _step(t: Tensor, i: int) -> Tensor:
    """t[i] (the first axis removed), sharing t's memory (one Tensor: this runs every step)."""
    row = t.nbytes // t.shape[0]
    return Tensor(t.buffer.view(i * row, row), t.shape[1:], t.dtype)


def _need_views(dev: Device) -> None:
    if not dev.supports_views:  # the per-step gemm operands are views into the sequences
        raise NotImplementedError(f"the recurrent layers need buffer views; the {dev.name} "
                                  "backend binds whole buffers only (use cuda or cpu)")


def _check_offsets(*sizes: int) -> None:
    if max(sizes) > MAX_OFFSET:
        raise ValueError(f"input: the sequence buffers hold {max(sizes)} elements; the cell "
                         "kernels address at most 2^32 - 1")


_scratch: dict[tuple[int, str], Buffer] = {}


def _scratch_tensor(dev: Device, role: str, shape: tuple[int, ...], dtype: Any) -> Tensor:
    """A per-device scratch tensor for `role` (temporaries that do not outlive a call: gate
    projections, gradient carries, intermediate layers), grown on demand and zero-filled when
    allocated. Reuse across calls is safe because the device queue runs launches in order (as
    gemm's split-K workspace); keeping them also means a call captured with `dev.capture()`
    after a warm-up call with the same shapes replays on live memory. "hzero" is never written.
    """
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    key = (id(dev), role)
    buf = _scratch.get(key)
    if buf is None or buf.device is not dev or buf.nbytes < nbytes:
        buf = dev.buffer(max(nbytes, 256))
        _scratch[key] = buf
    return Tensor(buf, shape, dtype)


# ---- workspace ------------------------------------------------------------------------------
@dataclass
class RNNWorkspace:
    """What a training forward keeps for its backward (opaque to callers: pass it back whole).
    It references the forward's input and weights, which must not change before backward."""

    mode: str
    num_layers: int
    bias: bool
    bidirectional: bool
    hidden_size: int
    input_list: bool
    weights: dict[str, Tensor]
    h0: Tensor | None
    c0: Tensor | None
    layer_inputs: list[Tensor] = field(default_factory=list)  # [k] (T, N, F_k)
    hs: list[list[Tensor]] = field(default_factory=list)  # [k][d] (T, N, H) h_t of a direction
    gates: list[list[Tensor | None]] = field(default_factory=list)  # [k][d] (T, N, S*H)
    cs: list[list[Tensor | None]] = field(default_factory=list)  # [k][d] LSTM c_t, float32


class _Replayed:
    """fn() -- the per-step recurrent gemm on fixed operands (`stage`, W_hh, a fixed output) --
    run once now, then, if it will run `again` >= REPLAY_MIN_CALLS more times, captured with
    dev.capture() and replayed: gemm()'s validation and planning (tens of microseconds of
    Python, comparable to a step's GPU time) are paid once per layer and direction instead of
    once per step. The first
    run has sized gemm's split-K scratch, so the capture allocates nothing. If the device is
    already capturing (a caller capturing a whole training step), fn() is called each time."""

    def __init__(self, dev: Device, fn: Callable[[], Any], again: int):
        self.fn = fn
        self.rec = None
        fn()
        if again >= REPLAY_MIN_CALLS:
            cm = dev.capture()
            try:
                self.rec = cm.__enter__()
            except RuntimeError:  # "already capturing": nested captures are not supported
                return
            try:
                fn()
            finally:
                cm.__exit__(None, None, None)

    def __call__(self) -> None:
        if self.rec is None:
            self.fn()
        else:
            self.rec.replay()


def _bind(t: Tensor | None, dummy: Buffer) -> Buffer:
    return dummy if t is None else t.buffer


# ---- forward --------------------------------------------------------------------------------
def _forward(mode: str, input: TensorLike, weights: Any, h0: Any, c0: Any, num_layers: Any,
             bias: TensorLike | None, bidirectional: Any, training: Any
             ) -> tuple[Any, Tensor, Tensor | None, RNNWorkspace | None]:
    L, bias, bi, training = _options(num_layers, bias, bidirectional, training)
    first = input[0] if isinstance(input, (list, tuple)) and input else input
    dev = pick_device(first, h0, c0)
    _need_views(dev)
    xv, (T, N, F), dt = _sequence(input, dev, "input")
    was_list = isinstance(xv, list)
    w, H = _weights(weights, mode, L, bias, bi, F, dev, dt)
    D, G, S = 2 if bi else 1, GATES[mode], SAVED[mode]
    h0 = _state(h0, dev, "hx" if mode != "lstm" else "hx[0]", dt, (L * D, N, H))
    c0 = _state(c0, dev, "hx[1]", dt, (L * D, N, H))
    _check_offsets(T * N * max(G, S) * H, T * N * D * H, T * N * F)

    x = _stacked(xv)  # every check is done: dispatch from here on
    sfx = suffix(dt)
    h_n = empty((L * D, N, H), dt, dev)
    c_n = empty((L * D, N, H), dt, dev) if mode == "lstm" else None
    # this step's h_{t-1} W_hh^T + b_hh, rewritten by every step
    hp = _scratch_tensor(dev, "hp", (N, G * H), dt)
    h_zero = _scratch_tensor(dev, "hzero", (N, H), dt) if h0 is None else None
    stage = _scratch_tensor(dev, "hstage", (N, H), dt)  # h_t again: the recurrent gemm's operand
    ws = RNNWorkspace(mode, L, bias, bi, H, was_list, w, h0, c0) if training else None
    name = {"lstm": "lstm_fwd", "gru": "gru_fwd", "rnn_tanh": "rnn_fwd_tanh",
            "rnn_relu": "rnn_fwd_relu"}[mode] + "_" + sfx
    cell = kernel(dev, SOURCE, name)  # looked up once: the step loop launches it T times
    count = min(N * H, GRID_CAP)
    inp = x
    for k in range(L):
        Fk = inp.shape[2]
        if training or k == L - 1:
            y = empty((T, N, D * H), dt, dev)
        else:  # inference: an intermediate layer's output only feeds the next layer
            y = _scratch_tensor(dev, f"y{k % 2}", (T, N, D * H), dt)
        if ws is not None:
            ws.layer_inputs.append(inp)
            ws.hs.append([])
            ws.gates.append([])
            ws.cs.append([])
        for d in range(D):
            tag = f"l{k}" + ("_reverse" if d else "")
            w_ih, w_hh = w[f"weight_ih_{tag}"], w[f"weight_hh_{tag}"]
            b_ih = w[f"bias_ih_{tag}"] if bias else None
            b_hh = w[f"bias_hh_{tag}"] if bias else None
            xp = _scratch_tensor(dev, "xp", (T * N, G * H), dt)
            gemm(inp.reshape(T * N, Fk), w_ih, xp, transpose_b=True, bias=b_ih)
            # contiguous h_t of this direction (y interleaves the two): dW_hh's operand, what
            # the backward cells read back, and the GRU cell's h_{t-1}
            write_hs = D == 2 and (training or mode == "gru")
            if D == 1:
                hs = y
            elif training:
                hs = empty((T, N, H), dt, dev)
            else:
                hs = _scratch_tensor(dev, "hs", (T, N, H) if write_hs else (1, N, H), dt)
            gates = empty((T, N, S * H), dt, dev) if training and S else None
            if mode == "lstm":  # float cell state: the sequence (training) or a running state
                cs = empty((T, N, H), float32, dev) if training else \
                    _scratch_tensor(dev, "c", (N, H), float32)
            else:
                cs = None
            if ws is not None:
                ws.hs[k].append(hs)
                ws.gates[k].append(gates)
                ws.cs[k].append(cs if training else None)
            blk = (k * D + d) * N * H  # this layer-direction's block of h_0 / c_0 / h_n / c_n
            steps = list(range(T)) if d == 0 else list(range(T - 1, -1, -1))
            p = RnnFwdParams(N=N, H=H, y_pitch=D * H, hn_off=blk)
            recurrent: _Replayed | None = None
            for s, t in enumerate(steps):
                # hp = h_{t-1} W_hh^T + b_hh; from step 1 on h_{t-1} is in `stage`
                if s == 0:
                    gemm(_step(h0, k * D + d) if h0 is not None else h_zero, w_hh, hp,
                         transpose_b=True, bias=b_hh)
                elif recurrent is None:
                    recurrent = _Replayed(dev, partial(gemm, stage, w_hh, hp, transpose_b=True,
                                                       bias=b_hh), T - 1 - s)
                else:
                    recurrent()
                flags = (HS if write_hs else 0) | (SAVE if gates is not None else 0) \
                    | (LAST if s == T - 1 else STAGE)
                p.xp_off = t * N * G * H
                p.y_off = t * N * D * H + d * H
                p.hs_off = t * N * H
                p.gate_off = t * N * S * H
                if mode == "lstm":
                    if s == 0:
                        flags |= C0 if c0 is not None else ZERO_C
                        p.c0_off = blk
                    p.cprev_off = steps[s - 1] * N * H if training and s else 0
                    p.c_off = t * N * H if training else 0
                    p.flags = flags
                    cell(count, xp.buffer, hp.buffer, cs.buffer, _bind(c0, cs.buffer),
                         cs.buffer, y.buffer, hs.buffer, _bind(gates, y.buffer), h_n.buffer,
                         c_n.buffer, stage.buffer, p)
                elif mode == "gru":
                    p.hprev_off = (blk if h0 is not None else 0) if s == 0 else steps[s - 1] * N * H
                    p.flags = flags
                    cell(count, xp.buffer, hp.buffer,
                         (h0 if h0 is not None else h_zero).buffer if s == 0 else hs.buffer,
                         y.buffer, hs.buffer, _bind(gates, y.buffer), h_n.buffer, stage.buffer,
                         p)
                else:
                    p.flags = flags
                    cell(count, xp.buffer, hp.buffer, y.buffer, hs.buffer, h_n.buffer,
                         stage.buffer, p)
        inp = y
    out: Any = sequence_to_list(inp) if was_list else inp
    return out, h_n, c_n, ws


# ---- backward -------------------------------------------------------------------------------
def _grad(v: Any, dev: Device, name: str, dt: np.dtype, shape: tuple[int, ...]
          ) -> Tensor | list[Tensor] | None:
    if v is None:
        return None
    if isinstance(v, (list, tuple)):
        t, have, _ = _sequence(v, dev, name, (dt,))
    else:
        t = tensor_arg(v, dev, name, (dt,))
        have = t.shape
    if have != shape:
        raise ValueError(f"{name}: shape {have}, expected {shape}")
    return t


def _backward(mode: str, grad_output: TensorLike | None, grad_h_n: TensorLike | None,
              grad_c_n: TensorLike | None, ws: Any
              ) -> tuple[Any, Tensor | None, Tensor | None, dict[str, Tensor]]:
    if not isinstance(ws, RNNWorkspace):
        raise ValueError(f"workspace: expected the RNNWorkspace of a training forward "
                         f"(training=True), got {type(ws).__name__}")
    if ws.mode != mode:
        raise ValueError(f"workspace: it comes from a {ws.mode} forward, not {mode}")
    x = ws.layer_inputs[0]
    dev, dt = x.device, x.dtype
    T, N, F = x.shape
    L, H, bias, D = ws.num_layers, ws.hidden_size, ws.bias, 2 if ws.bidirectional else 1
    G, S = GATES[mode], SAVED[mode]
    dy = _grad(grad_output, dev, "grad_output", dt, (T, N, D * H))
    dhn = _grad(grad_h_n, dev, "grad_h_n", dt, (L * D, N, H))
    dcn = _grad(grad_c_n, dev, "grad_c_n", dt, (L * D, N, H)) if mode == "lstm" else None
    dy = _stacked(dy) if dy is not None else None  # every check is done: dispatch from here on

    sfx = suffix(dt)
    beta_hr = 1.0 if mode == "gru" else 0.0
    name = {"lstm": "lstm_bwd", "gru": "gru_bwd", "rnn_tanh": "rnn_bwd_tanh",
            "rnn_relu": "rnn_bwd_relu"}[mode] + "_" + sfx
    dh0 = empty((L * D, N, H), dt, dev) if ws.h0 is not None else None
    dc0 = empty((L * D, N, H), dt, dev) if mode == "lstm" and ws.c0 is not None else None
    dhr_scratch = _scratch_tensor(dev, "dhr", (N, H), dt) if dh0 is None else None
    # the float dL/dc carry
    dc = _scratch_tensor(dev, "dc", (N, H), float32) if mode == "lstm" else None
    h_zero = _scratch_tensor(dev, "hzero", (N, H), dt) if ws.h0 is None else None
    stage = _scratch_tensor(dev, "gstage", (N, G * H), dt)  # dG_h again: the gemm's operand
    cell = kernel(dev, SOURCE, name)
    count = min(N * H, GRID_CAP)
    # weights start at zero (T == 1 without h_0 has no dW_hh term); biases are filled below
    gw: dict[str, Any] = {n: None if n.startswith("bias") else zeros(t.shape, dt, dev)
                          for n, t in ws.weights.items()}
    dummy = x.buffer
    for k in range(L - 1, -1, -1):
        xin = ws.layer_inputs[k]
        Fk = xin.shape[2]
        # the input gradient of layer k is the next-lower layer's dy (a temporary) or returned
        dx = empty((T * N, Fk), dt, dev) if k == 0 else \
            _scratch_tensor(dev, f"dx{k % 2}", (T * N, Fk), dt)
        for d in range(D):
            tag = f"l{k}" + ("_reverse" if d else "")
            w_ih, w_hh = ws.weights[f"weight_ih_{tag}"], ws.weights[f"weight_hh_{tag}"]
            hs, gates, cs = ws.hs[k][d], ws.gates[k][d], ws.cs[k][d]
            blk = (k * D + d) * N * H
            dgx = _scratch_tensor(dev, "dgx", (T, N, G * H), dt)
            dgh = _scratch_tensor(dev, "dgh", (T, N, G * H), dt) if mode == "gru" else dgx
            if dh0 is not None:
                dhr_buf, dhr_base, dhr_t = dh0.buffer, blk, _step(dh0, k * D + d)
            else:
                dhr_buf, dhr_base, dhr_t = dhr_scratch.buffer, 0, dhr_scratch
            fwd = list(range(T)) if d == 0 else list(range(T - 1, -1, -1))
            p = RnnBwdParams(N=N, H=H, dy_pitch=D * H, dhr_out_off=dhr_base, dcn_off=blk,
                             dc0_off=blk, c0_off=blk)
            recurrent: _Replayed | None = None
            for s in range(T - 1, -1, -1):  # forward step s, visited last to first
                t = fwd[s]
                tprev = fwd[s - 1] if s else None
                more = bool(s) or dh0 is not None  # dL/dh_{t-1} is needed
                flags = (DY if dy is not None else 0) | (STAGE if more else 0)
                if s == T - 1:  # the first backward step: the recurrent gradient is dL/dh_n
                    dhr_in = dhn.buffer if dhn is not None else dummy
                    p.dhr_off = blk
                    flags |= DHR if dhn is not None else 0
                else:
                    dhr_in, p.dhr_off = dhr_buf, dhr_base
                    flags |= DHR
                p.dy_off = t * N * D * H + d * H
                p.gate_off = t * N * S * H
                p.dg_off = t * N * G * H
                dyb = dy.buffer if dy is not None else dummy
                if mode == "lstm":
                    if s == T - 1:
                        flags |= FIRST | (DCN if dcn is not None else 0)
                    if s == 0:
                        flags |= (C0 if ws.c0 is not None else ZERO_C)
                        flags |= LAST if dc0 is not None else 0
                    p.c_off = t * N * H
                    p.cprev_off = tprev * N * H if s else 0
                    p.flags = flags
                    cell(count, dyb, dhr_in, dc.buffer, _bind(dcn, dummy), _bind(dc0, dummy),
                         gates.buffer, cs.buffer, cs.buffer, _bind(ws.c0, dummy), dgx.buffer,
                         stage.buffer, p)
                elif mode == "gru":
                    if s:
                        hprev_buf, p.hprev_off = hs.buffer, tprev * N * H
                    elif ws.h0 is not None:
                        hprev_buf, p.hprev_off = ws.h0.buffer, blk
                    else:
                        hprev_buf, p.hprev_off = h_zero.buffer, 0
                    p.flags = flags
                    cell(count, dyb, dhr_in, dhr_buf, gates.buffer, hprev_buf, dgx.buffer,
                         dgh.buffer, stage.buffer, p)
                else:
                    p.h_off = t * N * H
                    p.flags = flags
                    cell(count, dyb, dhr_in, hs.buffer, dgx.buffer, stage.buffer, p)
                if not more:
                    continue
                # dL/dh_{t-1} = dG_h W_hh (+ the GRU's direct part the cell left in dhr)
                if recurrent is None:
                    recurrent = _Replayed(dev, partial(gemm, stage, w_hh, dhr_t, beta=beta_hr),
                                          s - 1 + (dh0 is not None))
                else:
                    recurrent()
            # weight gradients: sums over all steps as single products over T*N rows
            dgx2, dgh2 = dgx.reshape(T * N, G * H), dgh.reshape(T * N, G * H)
            gemm(dgx2, xin.reshape(T * N, Fk), gw[f"weight_ih_{tag}"], transpose_a=True)
            gwh = gw[f"weight_hh_{tag}"]
            if T > 1:  # h_{t-1} of forward step s >= 1 is h of step s - 1
                if d == 0:
                    a, b = _view(dgh, 1, T - 1), _view(hs, 0, T - 1)
                else:
                    a, b = _view(dgh, 0, T - 1), _view(hs, 1, T - 1)
                gemm(a.reshape((T - 1) * N, G * H), b.reshape((T - 1) * N, H), gwh,
                     transpose_a=True)
            if ws.h0 is not None:  # the first forward step's h_{t-1} is h_0
                gemm(_step(dgh, fwd[0]), _step(ws.h0, k * D + d), gwh, transpose_a=True,
                     beta=1.0 if T > 1 else 0.0)
            if bias:
                gw[f"bias_ih_{tag}"] = linear_bias_grad(dgx2)
                gw[f"bias_hh_{tag}"] = linear_bias_grad(dgh2)
            gemm(dgx2, w_ih, dx, beta=1.0 if d else 0.0)
        dy = dx.reshape(T, N, Fk)
    grad_input: Any = sequence_to_list(dy) if ws.input_list else dy
    return grad_input, dh0, dc0, gw


# ---- public ---------------------------------------------------------------------------------
def lstm(input: TensorLike, weights: Any, hx: TensorLike | None = None, num_layers: int = 1,
         bias: bool = True,
         bidirectional: bool = False, training: bool = True
         ) -> tuple[Any, tuple[Tensor, Tensor], RNNWorkspace | None]:
    """Multi-layer LSTM over a sequence (torch.nn.LSTM, batch_first=False).

    input (T, N, F) or a list of T (N, F); hx = (h_0, c_0), each (L*D, N, H) or None (zeros);
    weights as in the module docstring. Per layer, direction and step, with a = x_t W_ih^T +
    b_ih + h_{t-1} W_hh^T + b_hh split into blocks (i, f, g, o):

        i, f, o = sigmoid(a_i, a_f, a_o),  g = tanh(a_g)
        c_t = f * c_{t-1} + i * g,         h_t = o * tanh(c_t)

    The reverse direction runs t = T-1 .. 0; layer k > 0 reads layer k-1's output.
    Returns (output (T, N, D*H) -- a list if input was a list --, (h_n, c_n), workspace), the
    workspace (for lstm_backward) only when training, else None.
    """
    h0, c0 = _lstm_hx(hx)
    out, h_n, c_n, ws = _forward("lstm", input, weights, h0, c0, num_layers, bias, bidirectional,
                                 training)
    assert c_n is not None
    return out, (h_n, c_n), ws


def _lstm_hx(hx: Any) -> tuple[Any, Any]:
    if hx is None:
        return None, None
    if not isinstance(hx, (tuple, list)) or len(hx) != 2:
        raise ValueError("hx: expected (h_0, c_0) (either may be None) or None")
    return hx[0], hx[1]


def lstm_backward(grad_output: TensorLike | None, grad_h_n: TensorLike | None,
                  grad_c_n: TensorLike | None, workspace: RNNWorkspace
                  ) -> tuple[Any, tuple[Tensor | None, Tensor | None], dict[str, Tensor]]:
    """Backward through time of `lstm` given dL/doutput (T, N, D*H) or a list (or None),
    dL/dh_n and dL/dc_n (L*D, N, H) (or None): returns (grad_input, (grad_h_0, grad_c_0),
    grad_weights). With the per-step gradients dh = dL/dh_t (output plus recurrent part),
    dc = dL/dc_t (carried plus dh o (1 - tanh(c_t)^2)),

        dG = [dc g i(1-i), dc c_{t-1} f(1-f), dc i (1-g^2), dh tanh(c_t) o(1-o)]
        dL/dc_{t-1} = dc f,  dL/dh_{t-1} = dG W_hh,  dL/dx_t = dG W_ih,
        dW_ih = sum_t dG^T x_t,  dW_hh = sum_t dG^T h_{t-1},  db_ih = db_hh = sum_t,n dG.

    grad_input has input's form; grad_h_0 / grad_c_0 are None where the forward had no initial
    state; grad_weights is keyed (and ordered) like rnn_weight_names.
    """
    gx, dh0, dc0, gw = _backward("lstm", grad_output, grad_h_n, grad_c_n, workspace)
    return gx, (dh0, dc0), gw


def gru(input: TensorLike, weights: Any, hx: TensorLike | None = None, num_layers: int = 1, bias: bool = True,
        bidirectional: bool = False, training: bool = True
        ) -> tuple[Any, Tensor, RNNWorkspace | None]:
    """Multi-layer GRU (torch.nn.GRU, batch_first=False); blocks (r, z, n):

        r = sigmoid(x W_ir^T + b_ir + h W_hr^T + b_hr),  z likewise,
        n = tanh(x W_in^T + b_in + r * (h W_hn^T + b_hn)),  h_t = (1 - z) n + z h_{t-1}.

    hx: h_0 (L*D, N, H) or None. Returns (output, h_n, workspace or None); see `lstm`.
    """
    out, h_n, _, ws = _forward("gru", input, weights, hx, None, num_layers, bias, bidirectional,
                               training)
    return out, h_n, ws


def gru_backward(grad_output: TensorLike | None, grad_h_n: TensorLike | None,
                 workspace: RNNWorkspace) -> tuple[Any, Tensor | None, dict[str, Tensor]]:
    """Backward through time of `gru`: (grad_input, grad_h_0 or None, grad_weights). Per step,
    with dh = dL/dh_t: dn = dh (1-z)(1-n^2), dz = dh (h_{t-1} - n) z(1-z),
    dr = dn (h W_hn^T + b_hn) r(1-r); dG_x = [dr, dz, dn] feeds dx, dW_ih, db_ih and
    dG_h = [dr, dz, r dn] feeds dW_hh, db_hh; dL/dh_{t-1} = z dh + dG_h W_hh."""
    gx, dh0, _, gw = _backward("gru", grad_output, grad_h_n, None, workspace)
    return gx, dh0, gw


def _mode(nonlinearity: Any) -> str:
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(f"nonlinearity: expected 'tanh' or 'relu', got {nonlinearity!r}")
    return f"rnn_{nonlinearity}"


def rnn(input: TensorLike, weights: Any, hx: TensorLike | None = None, num_layers: int = 1,
        nonlinearity: str = "tanh", bias: bool = True, bidirectional: bool = False,
        training: bool = True) -> tuple[Any, Tensor, RNNWorkspace | None]:
    """Multi-layer Elman RNN (torch.nn.RNN, batch_first=False):
    h_t = act(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh), act = tanh or relu.
    Returns (output, h_n, workspace or None); see `lstm`."""
    mode = _mode(nonlinearity)
    out, h_n, _, ws = _forward(mode, input, weights, hx, None, num_layers, bias, bidirectional,
                               training)
    return out, h_n, ws


def rnn_backward(grad_output: TensorLike | None, grad_h_n: TensorLike | None,
                 workspace: RNNWorkspace) -> tuple[Any, Tensor | None, dict[str, Tensor]]:
    """Backward through time of `rnn`: (grad_input, grad_h_0 or None, grad_weights), with
    dG = dL/dh_t * act'(.) (tanh: 1 - h_t^2; relu: [h_t > 0]), dL/dh_{t-1} = dG W_hh and the
    sums of `lstm_backward`."""
    mode = workspace.mode if isinstance(workspace, RNNWorkspace) else "rnn_tanh"
    if mode not in ("rnn_tanh", "rnn_relu"):
        raise ValueError(f"workspace: it comes from a {mode} forward, not rnn")
    gx, dh0, _, gw = _backward(mode, grad_output, grad_h_n, None, workspace)
    return gx, dh0, gw
