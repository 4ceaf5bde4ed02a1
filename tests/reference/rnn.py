"""Plain numpy (float64) references for the recurrent layers: LSTM, GRU and Elman RNN (tanh /
relu) over a time-major sequence, stacked layers, bidirectional, with their backward through time.

Written straight from the definitions (PyTorch's documentation of torch.nn.LSTM / GRU / RNN),
one time step at a time, with no shared code with pymetalnn. Gate order and weight names are
PyTorch's:

    LSTM  i, f, g, o:  c' = f * c + i * g,  h' = o * tanh(c')
    GRU   r, z, n:     n = tanh(x W_in^T + b_in + r * (h W_hn^T + b_hn)),  h' = (1 - z) n + z h
    RNN                h' = act(x W_ih^T + b_ih + h W_hh^T + b_hh)

Weights: dict name -> array, names weight_ih_l{k}{sfx} (G*H, F_k), weight_hh_l{k}{sfx}
(G*H, H), bias_ih_l{k}{sfx}, bias_hh_l{k}{sfx} (G*H,), sfx = "" or "_reverse".
"""
from __future__ import annotations

import numpy as np

GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def names(num_layers: int, bias: bool, bidirectional: bool) -> list[str]:
    out = []
    for k in range(num_layers):
        for sfx in ([""] + (["_reverse"] if bidirectional else [])):
            out += [f"weight_ih_l{k}{sfx}", f"weight_hh_l{k}{sfx}"]
            if bias:
                out += [f"bias_ih_l{k}{sfx}", f"bias_hh_l{k}{sfx}"]
    return out


def random_weights(rng: np.random.Generator, mode: str, input_size: int, hidden: int,
                   num_layers: int, bias: bool, bidirectional: bool,
                   scale: float = 0.5) -> dict[str, np.ndarray]:
    g, d = GATES[mode], 2 if bidirectional else 1
    w = {}
    for name in names(num_layers, bias, bidirectional):
        k = int(name.split("_l")[1].split("_")[0])
        f = input_size if k == 0 else d * hidden
        if name.startswith("weight_ih"):
            shape = (g * hidden, f)
        elif name.startswith("weight_hh"):
            shape = (g * hidden, hidden)
        else:
            shape = (g * hidden,)
        w[name] = rng.uniform(-scale, scale, shape)
    return w


# ---- one cell step --------------------------------------------------------------------------
def cell_forward(mode, x, h, c, w_ih, w_hh, b_ih, b_hh):
    """One step: returns (h', c' or None, cache for cell_backward)."""
    H = w_hh.shape[1]
    gi = x @ w_ih.T + (b_ih if b_ih is not None else 0.0)
    gh = h @ w_hh.T + (b_hh if b_hh is not None else 0.0)
    if mode == "lstm":
        a = gi + gh
        i = sigmoid(a[:, 0:H])
        f = sigmoid(a[:, H:2 * H])
        g = np.tanh(a[:, 2 * H:3 * H])
        o = sigmoid(a[:, 3 * H:4 * H])
        c_new = f * c + i * g
        h_new = o * np.tanh(c_new)
        return h_new, c_new, (x, h, c, i, f, g, o, c_new)
    if mode == "gru":
        r = sigmoid(gi[:, 0:H] + gh[:, 0:H])
        z = sigmoid(gi[:, H:2 * H] + gh[:, H:2 * H])
        hn = gh[:, 2 * H:3 * H]
        n = np.tanh(gi[:, 2 * H:3 * H] + r * hn)
        h_new = (1.0 - z) * n + z * h
        return h_new, None, (x, h, r, z, n, hn)
    a = gi + gh
    h_new = np.tanh(a) if mode == "rnn_tanh" else np.maximum(a, 0.0)
    return h_new, None, (x, h, a, h_new)


def cell_backward(mode, dh, dc, cache, w_ih, w_hh):
    """Gradients of one step given dL/dh' (and dL/dc' for LSTM): returns dx, dh, dc (or None),
    d w_ih, d w_hh, d b_ih, d b_hh."""
    if mode == "lstm":
        x, h, c, i, f, g, o, c_new = cache
        tc = np.tanh(c_new)
        do = dh * tc
        dc = dc + dh * o * (1.0 - tc * tc)
        di, df, dg = dc * g, dc * c, dc * i
        dc_prev = dc * f
        da = np.concatenate([di * i * (1 - i), df * f * (1 - f), dg * (1 - g * g),
                             do * o * (1 - o)], axis=1)
        return da @ w_ih, da @ w_hh, dc_prev, da.T @ x, da.T @ h, da.sum(0), da.sum(0)
    if mode == "gru":
        x, h, r, z, n, hn = cache
        dn = dh * (1.0 - z)
        dz = dh * (h - n)
        dn_pre = dn * (1.0 - n * n)
        dr_pre = dn_pre * hn * r * (1.0 - r)
        dz_pre = dz * z * (1.0 - z)
        dgi = np.concatenate([dr_pre, dz_pre, dn_pre], axis=1)
        dgh = np.concatenate([dr_pre, dz_pre, dn_pre * r], axis=1)
        dh_prev = dh * z + dgh @ w_hh
        return dgi @ w_ih, dh_prev, None, dgi.T @ x, dgh.T @ h, dgi.sum(0), dgh.sum(0)
    x, h, a, h_new = cache
    da = dh * ((1.0 - h_new * h_new) if mode == "rnn_tanh" else (a > 0.0))
    return da @ w_ih, da @ w_hh, None, da.T @ x, da.T @ h, da.sum(0), da.sum(0)


# ---- whole sequence -------------------------------------------------------------------------
def forward(mode, x, weights, h0=None, c0=None, num_layers=1, bias=True, bidirectional=False):
    """x (T, N, F) -> (y (T, N, D*H), h_n (L*D, N, H), c_n (L*D, N, H) or None, cache)."""
    x = np.asarray(x, np.float64)
    T, N, _ = x.shape
    D = 2 if bidirectional else 1
    H = weights["weight_hh_l0"].shape[1]
    h_n = np.zeros((num_layers * D, N, H))
    c_n = np.zeros((num_layers * D, N, H)) if mode == "lstm" else None
    caches = []
    inp = x
    for k in range(num_layers):
        y = np.zeros((T, N, D * H))
        for d in range(D):
            sfx = "_reverse" if d else ""
            w_ih, w_hh = weights[f"weight_ih_l{k}{sfx}"], weights[f"weight_hh_l{k}{sfx}"]
            b_ih = weights[f"bias_ih_l{k}{sfx}"] if bias else None
            b_hh = weights[f"bias_hh_l{k}{sfx}"] if bias else None
            h = np.zeros((N, H)) if h0 is None else np.asarray(h0, np.float64)[k * D + d]
            c = np.zeros((N, H)) if c0 is None else np.asarray(c0, np.float64)[k * D + d]
            steps = range(T) if d == 0 else range(T - 1, -1, -1)
            for t in steps:
                h, c_new, cache = cell_forward(mode, inp[t], h, c, w_ih, w_hh, b_ih, b_hh)
                c = c_new
                y[t, :, d * H:(d + 1) * H] = h
                caches.append((k, d, t, cache))
            h_n[k * D + d] = h
            if c_n is not None:
                c_n[k * D + d] = c
        inp = y
    meta = (mode, x.shape, num_layers, bias, bidirectional, H, h0 is not None)
    return inp, h_n, c_n, (meta, caches, weights)


def backward(dy, dh_n, dc_n, cache):
    """Gradients of forward's outputs through time: (dx, dh0, dc0 or None, dweights dict).
    dy (T, N, D*H), dh_n / dc_n (L*D, N, H); any may be None (zero)."""
    (mode, (T, N, F), L, bias, bidirectional, H, _), caches, weights = cache
    D = 2 if bidirectional else 1
    dy = np.zeros((T, N, D * H)) if dy is None else np.asarray(dy, np.float64)
    dh0 = np.zeros((L * D, N, H))
    dc0 = np.zeros((L * D, N, H)) if mode == "lstm" else None
    dw = {k: np.zeros_like(np.asarray(v, np.float64)) for k, v in weights.items()}
    by_step = {(k, d, t): c for k, d, t, c in caches}
    for k in range(L - 1, -1, -1):
        fk = F if k == 0 else D * H
        dx = np.zeros((T, N, fk))
        for d in range(D):
            sfx = "_reverse" if d else ""
            w_ih, w_hh = weights[f"weight_ih_l{k}{sfx}"], weights[f"weight_hh_l{k}{sfx}"]
            dh = np.zeros((N, H)) if dh_n is None else np.asarray(dh_n, np.float64)[k * D + d]
            dc = np.zeros((N, H))
            if mode == "lstm" and dc_n is not None:
                dc = np.asarray(dc_n, np.float64)[k * D + d].copy()
            steps = range(T - 1, -1, -1) if d == 0 else range(T)  # reverse of the forward order
            for t in steps:
                dh = dh + dy[t, :, d * H:(d + 1) * H]
                gx, dh, dc, gwi, gwh, gbi, gbh = cell_backward(mode, dh, dc, by_step[(k, d, t)],
                                                               w_ih, w_hh)
                dx[t] += gx
                dw[f"weight_ih_l{k}{sfx}"] += gwi
                dw[f"weight_hh_l{k}{sfx}"] += gwh
                if bias:
                    dw[f"bias_ih_l{k}{sfx}"] += gbi
                    dw[f"bias_hh_l{k}{sfx}"] += gbh
            dh0[k * D + d] = dh
            if dc0 is not None:
                dc0[k * D + d] = dc
        dy = dx
    return dy, dh0, dc0, dw
