"""Plain numpy references for pymetalnn.optim, in float64, from torch.optim's documented
algorithms (SGD, Adam, AdamW, RMSprop) and MPS's optimizer-descriptor gradient options.

Design note: each rule is written the way its documentation states it (bias corrections as
1 - beta^t, Nesterov as g + momentum * b, ...), on float64 copies of the weights, with no
attempt to copy the kernels' operation order; float32 kernels then agree to float32 rounding
accumulated over the trajectory.

Gradient preprocessing (pymetalnn.optim.Optimizer's order), per tensor, G = every gradient:
    g = g * rescale;  g = g * min(1, max_norm / (||rescale * G||_2 + 1e-6));
    g = clip(g, lo, hi);  g = -g if maximize;  g += s * sign(w) (l1) or s * w (l2)
"""
from __future__ import annotations

from typing import Any

import numpy as np

F64 = np.float64


def preprocess(grads: list[np.ndarray | None], params: list[np.ndarray], o: dict[str, Any],
               max_grad_norm: float | None) -> list[np.ndarray | None]:
    rescale = o.get("grad_rescale", 1.0)
    gs = [None if g is None else np.asarray(g, F64) * rescale for g in grads]
    if max_grad_norm is not None:
        total = np.sqrt(sum(float(np.sum(g * g)) for g in gs if g is not None))
        coef = min(1.0, max_grad_norm / (total + 1e-6))
        gs = [None if g is None else g * coef for g in gs]
    out = []
    for g, w in zip(gs, params):
        if g is None:
            out.append(None)
            continue
        clip = o.get("clip_value")
        if clip is not None:
            lo, hi = (-clip, clip) if np.isscalar(clip) else clip
            g = np.clip(g, lo, hi)
        if o.get("maximize", False):
            g = -g
        reg, s = o.get("regularization"), o.get("regularization_scale", 0.0)
        if reg == "l1":
            g = g + s * np.sign(w)
        elif reg == "l2":
            g = g + s * w
        out.append(g)
    return out


def sgd(w: np.ndarray, g: np.ndarray, st: dict, o: dict, t: int) -> np.ndarray:
    lr, mom = o.get("lr", 1e-3), o.get("momentum", 0.0)
    damp, wd = o.get("dampening", 0.0), o.get("weight_decay", 0.0)
    g = g + wd * w
    if mom != 0:
        if "momentum_buffer" not in st:
            st["momentum_buffer"] = g.copy()
        else:
            st["momentum_buffer"] = mom * st["momentum_buffer"] + (1 - damp) * g
        b = st["momentum_buffer"]
        g = g + mom * b if o.get("nesterov", False) else b
    return w - lr * g


def adam(w: np.ndarray, g: np.ndarray, st: dict, o: dict, t: int, decoupled: bool = False
         ) -> np.ndarray:
    lr, (b1, b2) = o.get("lr", 1e-3), o.get("betas", (0.9, 0.999))
    eps = o.get("eps", 1e-8)
    wd = o.get("weight_decay", 1e-2 if decoupled else 0.0)
    if decoupled:
        w = w * (1 - lr * wd)
    else:
        g = g + wd * w
    m = st.get("exp_avg", np.zeros_like(w))
    v = st.get("exp_avg_sq", np.zeros_like(w))
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    st["exp_avg"], st["exp_avg_sq"] = m, v
    if o.get("amsgrad", False):
        st["max_exp_avg_sq"] = np.maximum(st.get("max_exp_avg_sq", np.zeros_like(w)), v)
        v = st["max_exp_avg_sq"]
    m_hat = m / (1 - b1**t)
    # torch: denom = sqrt(v) / sqrt(1 - beta2^t) + eps (eps outside the bias correction)
    return w - lr * m_hat / (np.sqrt(v) / np.sqrt(1 - b2**t) + eps)


def adamw(w: np.ndarray, g: np.ndarray, st: dict, o: dict, t: int) -> np.ndarray:
    return adam(w, g, st, o, t, decoupled=True)


def rmsprop(w: np.ndarray, g: np.ndarray, st: dict, o: dict, t: int) -> np.ndarray:
    lr, alpha, eps = o.get("lr", 1e-2), o.get("alpha", 0.99), o.get("eps", 1e-8)
    mom, wd = o.get("momentum", 0.0), o.get("weight_decay", 0.0)
    g = g + wd * w
    sq = alpha * st.get("square_avg", np.zeros_like(w)) + (1 - alpha) * g * g
    st["square_avg"] = sq
    if o.get("centered", False):
        ga = alpha * st.get("grad_avg", np.zeros_like(w)) + (1 - alpha) * g
        st["grad_avg"] = ga
        d = np.sqrt(sq - ga * ga) + eps
    else:
        d = np.sqrt(sq) + eps
    if mom > 0:
        st["momentum_buffer"] = mom * st.get("momentum_buffer", np.zeros_like(w)) + g / d
        return w - lr * st["momentum_buffer"]
    return w - lr * g / d


def signum(w: np.ndarray, g: np.ndarray, st: dict, o: dict, t: int) -> np.ndarray:
    """Sign-SGD with momentum (the CustomOptimizer test's kernel): b = beta b + (1 - beta) g,
    w -= lr sign(b)."""
    beta = o["beta"]
    st["momentum"] = beta * st.get("momentum", np.zeros_like(w)) + (1 - beta) * g
    return w - o["lr"] * np.sign(st["momentum"])


RULES = {"SGD": sgd, "Adam": adam, "AdamW": adamw, "RMSProp": rmsprop, "signum": signum}


class Reference:
    """An optimizer over float64 copies of the weights: `step(grads)` as the rule says."""

    def __init__(self, rule: str, params: list[np.ndarray], max_grad_norm: float | None = None,
                 **options: Any) -> None:
        self.rule = RULES[rule]
        self.params = [np.asarray(p, F64).copy() for p in params]
        self.options = options
        self.max_grad_norm = max_grad_norm
        self.state: list[dict] = [{} for _ in params]
        self.steps = [0] * len(params)

    def step(self, grads: list[np.ndarray | None]) -> None:
        gs = preprocess(grads, self.params, self.options, self.max_grad_norm)
        for i, g in enumerate(gs):
            if g is None:
                continue
            self.steps[i] += 1
            self.params[i] = self.rule(self.params[i], g, self.state[i], self.options,
                                       self.steps[i])
