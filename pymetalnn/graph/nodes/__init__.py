"""Graph nodes, one module per op family mirroring pymetalnn/ops/ (conv, gemm, pool, neuron,
softmax, dropout, norm, copy, arith, rnn, loss, detection), on the base classes in base.py.

As in MPSNNGraph, the result of one node is the source of the next:

    x = ImageNode((1, 28, 28))
    c = ConvolutionNode(x, ConvolutionDataSource(1, 6, 5), padding=2)
    r = ReLUNode(c)                    # a node stands for its result image
    loss = SoftmaxCrossEntropyLossNode(FullyConnectedNode(FlattenNode(r), fc_weights))
    g = r.gradient(...)                # one line: the gradient node of a forward node

Shapes are inferred when a node is made (and again when a graph is built); an inconsistent node
raises GraphError naming it. Every filter node implements its forward and backward with the
functional ops (`pymetalnn.functional`) and declares what its backward needs, so the graph keeps
exactly those alive and frees everything else.
"""
from __future__ import annotations

from .arith import (
    AdditionNode,
    DivisionNode,
    MultiplicationNode,
    SubtractionNode,
)

# ruff: noqa: F401  (the package re-exports its modules' public names)
from .base import (
    NOMINAL_BATCH,
    FilterNode,
    GradientNode,
    GradientSumNode,
    ImageNode,
    LabelsNode,
    Node,
    TensorNode,
    UpdateNode,
    Value,
    as_value,
)
from .conv import (
    Convolution1dNode,
    ConvolutionNode,
    ConvolutionTransposeNode,
)
from .copy import (
    ConcatenationNode,
    FlattenNode,
    ImageToMatrixNode,
    MatrixToImageNode,
    PermuteNode,
    ReshapeNode,
    SelectNode,
)
from .detection import (
    YoloLossNode,
)
from .dropout import (
    DropoutNode,
)
from .embedding import EmbeddingNode
from .gemm import (
    FullyConnectedNode,
)
from .loss import (
    LOSSES,
    CategoricalCrossEntropyLossNode,
    CosineDistanceLossNode,
    CrossEntropyLossNode,
    HingeLossNode,
    HuberLossNode,
    KLDivergenceLossNode,
    LogLossNode,
    LossNode,
    MeanAbsoluteErrorLossNode,
    MeanSquaredErrorLossNode,
    SigmoidCrossEntropyLossNode,
    SoftmaxCrossEntropyLossNode,
)
from .neuron import (
    NEURONS,
    ELUNode,
    GELUNode,
    HardSigmoidNode,
    LeakyReLUNode,
    LinearNeuronNode,
    NeuronNode,
    ReLUNode,
    SigmoidNode,
    SoftplusNode,
    TanhNode,
)
from .norm import (
    BatchNormalizationNode,
    GroupNormalizationNode,
    InstanceNormalizationNode,
    LayerNormalizationNode,
)
from .pool import (
    AdaptiveAveragePooling1dNode,
    AdaptiveAveragePoolingNode,
    GlobalAveragePoolingNode,
    PoolingAverage1dNode,
    PoolingAverageNode,
    PoolingMax1dNode,
    PoolingMaxNode,
)
from .rnn import (
    GRUNode,
    LSTMNode,
    RNNNode,
)
from .softmax import (
    LogSoftMaxNode,
    SoftMaxNode,
)
