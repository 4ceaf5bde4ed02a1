"""Adam and AdamW (bias correction, amsgrad): torch.optim.Adam's and AdamW's algorithms, one fused
kernel per tensor (kernels/optimizer.metal `adam_step_*`). The bias corrections 1 - beta^t are
computed by the kernel from the tensor's device step count t, as -expm1(t log(beta)) in float
(log(beta) from here, in double): within a few float ulps of torch's double-precision values, and
the same computation whether the step is encoded or replayed from a capture."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ..params import AdamParams
from ._base import Optimizer, f32, flag, real


class Adam(Optimizer):
    """Adam, as torch.optim.Adam (g the preprocessed gradient, see `Optimizer`; t the step):

        g <- g + weight_decay * w                   (Adam; AdamW instead: w <- w (1 - lr wd))
        m <- m + (1 - beta1) (g - m)
        v <- beta2 v + (1 - beta2) g^2
        vmax <- max(vmax, v), v_hat = vmax          if amsgrad, else v_hat = v
        w <- w - lr / (1 - beta1^t) * m / (sqrt(v_hat) / sqrt(1 - beta2^t) + eps)

    State: 'exp_avg', 'exp_avg_sq', 'max_exp_avg_sq' (amsgrad only), float32.
    """

    KERNEL = "adam_step"
    MULTI_KERNEL = "adam_step_multi"
    STATE_NAMES = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    DEFAULTS = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0,
                "amsgrad": False}
    DECOUPLED = False

    def __init__(self, params: Sequence[Any], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False, *, maximize: bool = False,
                 grad_rescale: float = 1.0, clip_value: float | tuple[float, float] | None = None,
                 max_grad_norm: float | None = None, regularization: str | None = None,
                 regularization_scale: float = 0.0) -> None:
        super().__init__(params, dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            maximize=maximize, grad_rescale=grad_rescale, clip_value=clip_value,
            regularization=regularization, regularization_scale=regularization_scale),
            max_grad_norm)

    def _check_rule(self, g: dict[str, Any], nm: Any) -> None:
        b = g["betas"]
        if not isinstance(b, (tuple, list)) or len(b) != 2:
            raise ValueError(f"{nm('betas')}: expected (beta1, beta2), got {b!r}")
        g["betas"] = (real(b[0], nm("betas") + "[0]", lo=0.0, hi=1.0, hi_open=True),
                      real(b[1], nm("betas") + "[1]", lo=0.0, hi=1.0, hi_open=True))
        g["eps"] = real(g["eps"], nm("eps"), lo=0.0, lo_open=True)
        g["weight_decay"] = real(g["weight_decay"], nm("weight_decay"), lo=0.0)
        g["amsgrad"] = flag(g["amsgrad"], nm("amsgrad"))

    def _used_states(self, g: dict[str, Any]) -> tuple[bool, ...]:
        return (True, True, g["amsgrad"])

    def _rule_params(self, g: dict[str, Any], step: int, fresh: set[str]) -> AdamParams:
        beta1, beta2 = g["betas"]
        lr, wd = g["lr"], g["weight_decay"]
        return AdamParams(
            one_minus_beta1=f32(1.0 - beta1), beta2=beta2, one_minus_beta2=f32(1.0 - beta2),
            eps=g["eps"], weight_decay=0.0 if self.DECOUPLED else wd,
            decay=f32(1.0 - lr * wd) if self.DECOUPLED else 1.0, lr=lr,
            log_beta1=_log(beta1), log_beta2=_log(beta2), amsgrad=int(g["amsgrad"]))


def _log(beta: float) -> float:
    """log(beta) for the kernel's -expm1(t log(beta)); beta = 0 gives a huge negative number
    (beta^t = 0 for every t >= 1) rather than -inf, which fast math may not honour."""
    return math.log(beta) if beta > 0.0 else -1e30


class AdamW(Adam):
    """Adam with decoupled weight decay, as torch.optim.AdamW: w <- w (1 - lr weight_decay) before
    the Adam update instead of adding weight_decay * w to the gradient (see `Adam`)."""

    DEFAULTS = {**Adam.DEFAULTS, "weight_decay": 1e-2}
    DECOUPLED = True

    def __init__(self, params: Sequence[Any], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 grad_rescale: float = 1.0, clip_value: float | tuple[float, float] | None = None,
                 max_grad_norm: float | None = None, regularization: str | None = None,
                 regularization_scale: float = 0.0) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
                         grad_rescale=grad_rescale, clip_value=clip_value,
                         max_grad_norm=max_grad_norm, regularization=regularization,
                         regularization_scale=regularization_scale)
