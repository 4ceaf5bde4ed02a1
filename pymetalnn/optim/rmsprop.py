"""RMSProp (centered, momentum, weight decay): torch.optim.RMSprop's algorithm, one fused kernel per
tensor (kernels/optimizer.metal `rmsprop_step_*`)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..params import RMSPropParams
from ._base import Optimizer, f32, flag, real


class RMSProp(Optimizer):
    """RMSProp, as torch.optim.RMSprop (g the preprocessed gradient, see `Optimizer`):

        g <- g + weight_decay * w                     if weight_decay != 0
        s <- alpha s + (1 - alpha) g^2
        a <- a + (1 - alpha) (g - a),  d = sqrt(s - a^2) + eps      if centered
                                       d = sqrt(s) + eps            otherwise
        b <- momentum b + g / d,  w <- w - lr b       if momentum > 0
        w <- w - lr g / d                             otherwise

    State: 'square_avg', 'grad_avg' (centered only), 'momentum_buffer' (momentum > 0 only).
    """

    KERNEL = "rmsprop_step"
    MULTI_KERNEL = "rmsprop_step_multi"
    STATE_NAMES = ("square_avg", "grad_avg", "momentum_buffer")
    DEFAULTS = {"lr": 1e-2, "alpha": 0.99, "eps": 1e-8, "weight_decay": 0.0, "momentum": 0.0,
                "centered": False}

    def __init__(self, params: Sequence[Any], lr: float = 1e-2, alpha: float = 0.99,
                 eps: float = 1e-8, weight_decay: float = 0.0, momentum: float = 0.0,
                 centered: bool = False, *, maximize: bool = False, grad_rescale: float = 1.0,
                 clip_value: float | tuple[float, float] | None = None,
                 max_grad_norm: float | None = None, regularization: str | None = None,
                 regularization_scale: float = 0.0) -> None:
        super().__init__(params, dict(
            lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
            centered=centered, maximize=maximize, grad_rescale=grad_rescale,
            clip_value=clip_value, regularization=regularization,
            regularization_scale=regularization_scale), max_grad_norm)

    def _check_rule(self, g: dict[str, Any], nm: Any) -> None:
        g["alpha"] = real(g["alpha"], nm("alpha"), lo=0.0, hi=1.0)
        g["eps"] = real(g["eps"], nm("eps"), lo=0.0, lo_open=True)
        g["weight_decay"] = real(g["weight_decay"], nm("weight_decay"), lo=0.0)
        g["momentum"] = real(g["momentum"], nm("momentum"), lo=0.0)
        g["centered"] = flag(g["centered"], nm("centered"))

    def _used_states(self, g: dict[str, Any]) -> tuple[bool, ...]:
        return (True, g["centered"], g["momentum"] > 0)

    def _rule_params(self, g: dict[str, Any], step: int, fresh: set[str]) -> RMSPropParams:
        return RMSPropParams(alpha=g["alpha"], one_minus_alpha=f32(1.0 - g["alpha"]),
                             eps=g["eps"], momentum=g["momentum"], centered=int(g["centered"]),
                             weight_decay=g["weight_decay"])
