"""pymetalnn.functional: the ops, named and laid out as torch.nn.functional (NCHW activations;
conv weights (out, in/groups, kH, kW); conv-transpose weights (in, out/groups, kH, kW); linear
weights (out, in)), so PyTorch serves as a reference and weights move between the two.

Every forward op `f(x, ...)` has `f_backward(grad_out, <f's inputs>, <same options>)` returning
the gradients of f's tensor arguments in order (None for an absent bias).
"""
from __future__ import annotations

# ---- conv / gemm (ops/conv.py, ops/gemm.py) ----

# ---- other CNN ops (ops/pool.py, ops/neuron.py, ops/softmax.py, ops/loss.py, ops/dropout.py,
#      ops/norm.py, ops/arith.py, ops/copy.py) ----

# ---- recurrent (ops/rnn.py) ----
