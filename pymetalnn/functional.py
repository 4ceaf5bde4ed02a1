"""pymetalnn.functional: the ops, named and laid out as torch.nn.functional (NCHW activations;
conv weights (out, in/groups, kH, kW); conv-transpose weights (in, out/groups, kH, kW); linear
weights (out, in)), so PyTorch serves as a reference and weights move between the two.

Every forward op `f(input, ...)` has `f_backward(grad_out, <f's inputs>, <same options>)`
returning the gradients of f's tensor arguments in order (None for an absent bias, integer labels
or indices; losses return (d input, d target)). Forms that take the forward's output are named
`<f>_backward_from_output` (softmax, log_softmax, the neurons). Positional order, keyword names
(input=, weight=, bias=) and defaults are torch's. conv2d and linear
also have `*_weight_grad` (the parameter gradients alone). `ACTIVATIONS`: the activations a
fused `activation=` takes; `Labels`: class labels checked once (`class_labels`).
"""
from __future__ import annotations

# ---- conv / gemm (ops/conv.py, ops/gemm.py) ----
from .ops.conv import (  # noqa: E402, F401, I001
    conv1d, conv1d_backward, conv2d, conv2d_backward, conv2d_weight_grad, conv_transpose1d,
    conv_transpose1d_backward, conv_transpose2d, conv_transpose2d_backward,
)
from .ops.gemm import (  # noqa: E402, F401, I001
    gemm, linear, linear_backward, linear_weight_grad, matmul, matmul_backward,
)

# ---- other CNN ops (ops/pool.py, ops/neuron.py, ops/softmax.py, ops/loss.py, ops/dropout.py,
#      ops/norm.py, ops/norm_sync.py, ops/arith.py, ops/copy.py) ----
from .ops.arith import (  # noqa: F401
    add,
    add_backward,
    div,
    div_backward,
    mean,
    mean_backward,
    mul,
    mul_backward,
    sub,
    sub_backward,
    sum,
    sum_backward,
)
from .ops.copy import (  # noqa: F401
    cast,
    cast_backward,
    cat,
    concat,
    concat_backward,
    copy,
    image_to_matrix,
    image_to_matrix_backward,
    list_to_sequence,
    list_to_sequence_backward,
    matrix_to_image,
    matrix_to_image_backward,
    permute,
    permute_backward,
    sequence_to_list,
    sequence_to_list_backward,
    split,
    split_backward,
    stack,
    stack_backward,
    to_batch_first,
    to_batch_first_backward,
    to_time_major,
    to_time_major_backward,
    transpose,
    transpose_backward,
    unbind,
    unbind_backward,
)
from .ops.dropout import (  # noqa: F401
    dropout,
    dropout2d,
    dropout2d_backward,
    dropout_backward,
    dropout_offset_advance,
)
from .ops.embedding import embedding, embedding_backward  # noqa: F401
from .ops.loss import (  # noqa: F401
    Labels,
    binary_cross_entropy_with_logits,
    binary_cross_entropy_with_logits_backward,
    categorical_cross_entropy,
    categorical_cross_entropy_backward,
    class_labels,
    cosine_distance,
    cosine_distance_backward,
    cross_entropy,
    cross_entropy_backward,
    hinge_loss,
    hinge_loss_backward,
    huber_loss,
    huber_loss_backward,
    kl_div,
    kl_div_backward,
    l1_loss,
    l1_loss_backward,
    log_loss,
    log_loss_backward,
    mse_loss,
    mse_loss_backward,
    smooth_l1_loss,
    smooth_l1_loss_backward,
)
from .ops.neuron import (  # noqa: F401
    ACTIVATIONS,
    activation_backward_from_output,
    elu,
    elu_backward,
    gelu,
    gelu_backward,
    hard_sigmoid,
    hard_sigmoid_backward,
    hardsigmoid,
    hardsigmoid_backward,
    leaky_relu,
    leaky_relu_backward,
    leaky_relu_backward_from_output,
    linear_neuron,
    linear_neuron_backward,
    relu,
    relu_backward,
    relu_backward_from_output,
    sigmoid,
    sigmoid_backward,
    sigmoid_backward_from_output,
    softplus,
    softplus_backward,
    tanh,
    tanh_backward,
    tanh_backward_from_output,
)
from .ops.norm import (  # noqa: F401
    batch_norm,
    batch_norm_backward,
    batch_norm_with_stats,
    group_norm,
    group_norm_backward,
    group_norm_with_stats,
    instance_norm,
    instance_norm_backward,
    layer_norm,
    layer_norm_backward,
)
from .ops.norm_sync import sync_batch_norm_backward, sync_batch_norm_with_stats  # noqa: F401
from .ops.pool import (  # noqa: F401
    adaptive_avg_pool1d,
    adaptive_avg_pool1d_backward,
    adaptive_avg_pool2d,
    adaptive_avg_pool2d_backward,
    avg_pool1d,
    avg_pool1d_backward,
    avg_pool2d,
    avg_pool2d_backward,
    global_avg_pool2d,
    global_avg_pool2d_backward,
    max_pool1d,
    max_pool1d_backward,
    max_pool2d,
    max_pool2d_backward,
)
from .ops.softmax import (  # noqa: F401
    log_softmax,
    log_softmax_backward,
    log_softmax_backward_from_output,
    softmax,
    softmax_backward,
    softmax_backward_from_output,
)

# ---- recurrent (ops/rnn.py) ----
from .ops.rnn import (  # noqa: E402, F401, I001
    RNNWorkspace, gru, gru_backward, lstm, lstm_backward, rnn, rnn_backward, rnn_state_dict,
    rnn_weight_names, rnn_weights,
)

# ---- detection (ops/detection.py) ----
from .ops.detection import (  # noqa: E402, F401, I001
    YoloAnchors, YoloTargets, box_iou_matrix, check_targets, mean_average_precision,
    multiclass_nms, nms, yolo_decode, yolo_detect, yolo_anchors, yolo_loss, yolo_loss_backward,
    yolo_targets,
)
