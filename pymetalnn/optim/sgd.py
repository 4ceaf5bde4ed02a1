"""SGD with momentum, dampening, Nesterov and weight decay: torch.optim.SGD's algorithm, one fused
kernel per tensor (kernels/optimizer.metal `sgd_step_*`)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..params import SGDParams
from ._base import Optimizer, f32, flag, real


class SGD(Optimizer):
    """Stochastic gradient descent, as torch.optim.SGD (with g the preprocessed gradient, see
    `Optimizer`):

        g <- g + weight_decay * w                           if weight_decay != 0
        b <- g  (first step),  momentum * b + (1 - dampening) * g  (later)   if momentum != 0
        g <- g + momentum * b  (nesterov)  or  b                           if momentum != 0
        w <- w - lr * g

    State: 'momentum_buffer' (float32, only when momentum != 0).
    """

    KERNEL = "sgd_step"
    MULTI_KERNEL = "sgd_step_multi"
    STATE_NAMES = ("momentum_buffer",)
    DEFAULTS = {"lr": 1e-3, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0,
                "nesterov": False}

    def __init__(self, params: Sequence[Any], lr: float = 1e-3, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False, *,
                 maximize: bool = False, grad_rescale: float = 1.0,
                 clip_value: float | tuple[float, float] | None = None,
                 max_grad_norm: float | None = None, regularization: str | None = None,
                 regularization_scale: float = 0.0) -> None:
        super().__init__(params, dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            nesterov=nesterov, maximize=maximize, grad_rescale=grad_rescale,
            clip_value=clip_value, regularization=regularization,
            regularization_scale=regularization_scale), max_grad_norm)

    def _check_rule(self, g: dict[str, Any], nm: Any) -> None:
        g["momentum"] = real(g["momentum"], nm("momentum"), lo=0.0)
        g["dampening"] = real(g["dampening"], nm("dampening"), lo=0.0, hi=1.0)
        g["weight_decay"] = real(g["weight_decay"], nm("weight_decay"), lo=0.0)
        g["nesterov"] = flag(g["nesterov"], nm("nesterov"))
        if g["nesterov"] and (g["momentum"] <= 0 or g["dampening"] != 0):
            raise ValueError(f"{nm('nesterov')}: Nesterov momentum requires momentum > 0 and "
                             "dampening = 0")

    def _used_states(self, g: dict[str, Any]) -> tuple[bool, ...]:
        return (g["momentum"] != 0,)

    def _rule_params(self, g: dict[str, Any], step: int, fresh: set[str]) -> SGDParams:
        return SGDParams(momentum=g["momentum"], one_minus_dampening=f32(1.0 - g["dampening"]),
                         nesterov=int(g["nesterov"]),
                         first_step=int("momentum_buffer" in fresh),
                         weight_decay=g["weight_decay"])
