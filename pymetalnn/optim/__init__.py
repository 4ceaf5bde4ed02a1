"""Optimizers with fused Metal update kernels (kernels/optimizer.metal): SGD, Adam, AdamW,
RMSProp, and CustomOptimizer for a user's own kernel.

    opt = pymetalnn.optim.Adam(params, lr=1e-3, max_grad_norm=1.0)
    opt.step(grads)                 # grads[i] matches params[i]; None skips a parameter
    np.savez("opt.npz", **opt.state_dict()); opt.load_state_dict(np.load("opt.npz"))

Every optimizer follows torch.optim's algorithm of the same name and takes MPS's optimizer
descriptor options: grad_rescale, clip_value, max_grad_norm (global), regularization ('l1' or
'l2') with regularization_scale; see `Optimizer` for the order they apply in.

    ms = pymetalnn.optim.MultiTensorStep([opt_a, opt_b])  # params: views of one buffer
    ms.step([grads_a, grads_b])     # bit-identical to opt_a.step(grads_a); opt_b.step(grads_b),
                                    # one launch where the gradients share a base buffer too

Dynamic loss scaling (torch.cuda.amp.GradScaler's operations on a device-side state, `amp.py`):
amp_state, amp_scaled_fill, amp_non_finite_check_, amp_update_scale_; an optimizer whose
`amp` is such a state's buffer skips its step on an overflow and unscales in its update.
"""
from __future__ import annotations

from ._base import Optimizer
from .adam import Adam, AdamW
from .amp import amp_non_finite_check_, amp_scaled_fill, amp_state, amp_update_scale_
from .custom import CustomOptimizer, hyper_struct
from .multi import MultiTensorStep, why_not_multi
from .rmsprop import RMSProp
from .sgd import SGD

RMSprop = RMSProp  # torch.optim's spelling of the same class

__all__ = ["SGD", "Adam", "AdamW", "RMSProp", "RMSprop", "Optimizer", "CustomOptimizer", "hyper_struct",
           "MultiTensorStep", "why_not_multi", "amp_state", "amp_scaled_fill",
           "amp_non_finite_check_", "amp_update_scale_"]
