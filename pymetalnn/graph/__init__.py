"""pymetalnn.graph: MPSNNGraph for Python -- build a network from nodes, get its training graph
from the loss node in one call, and train it with data sources and optimizers.

    from pymetalnn import graph as G, optim
    x = G.ImageNode((1, 28, 28))
    c1 = G.ConvolutionNode(x, G.ConvolutionDataSource(1, 6, 5, seed=0), padding="valid")
    ...
    loss = G.SoftmaxCrossEntropyLossNode(logits)
    tg = G.TrainingGraph(loss, optimizer=lambda p: optim.SGD(p, lr=0.05))
    h = tg.encode(images, labels)        # returns at once
    h.losses                             # per-sample losses, when the step is done

See docs/graph.md.
"""
from __future__ import annotations

# ruff: noqa: F401, I001  (the package re-exports its modules' public names; __all__ below)

from .datasource import (
    Conv1dDataSource,
    ConvolutionDataSource,
    ConvolutionTransposeDataSource,
    DataSource,
    EmbeddingDataSource,
    FullyConnectedDataSource,
    LayerNormDataSource,
    NormalizationDataSource,
    RecurrentDataSource,
    init_array,
)
from .errors import GraphError
from .graph import Graph, Handle, LossLabels, TrainingGraph
from .memory import MemoryReport
from .nodes import (
    AdaptiveAveragePooling1dNode,
    AdaptiveAveragePoolingNode,
    AdditionNode,
    BatchNormalizationNode,
    CategoricalCrossEntropyLossNode,
    ConcatenationNode,
    Convolution1dNode,
    ConvolutionNode,
    ConvolutionTransposeNode,
    CosineDistanceLossNode,
    CrossEntropyLossNode,
    DivisionNode,
    DropoutNode,
    ELUNode,
    EmbeddingNode,
    FilterNode,
    FlattenNode,
    FullyConnectedNode,
    GELUNode,
    GlobalAveragePoolingNode,
    GradientNode,
    GroupNormalizationNode,
    GRUNode,
    HardSigmoidNode,
    HingeLossNode,
    HuberLossNode,
    ImageNode,
    ImageToMatrixNode,
    InstanceNormalizationNode,
    KLDivergenceLossNode,
    LabelsNode,
    LayerNormalizationNode,
    LeakyReLUNode,
    LinearNeuronNode,
    LogLossNode,
    LogSoftMaxNode,
    LossNode,
    LSTMNode,
    MatrixToImageNode,
    MeanAbsoluteErrorLossNode,
    MeanSquaredErrorLossNode,
    MultiplicationNode,
    NeuronNode,
    PermuteNode,
    PoolingAverageNode,
    PoolingAverage1dNode,
    PoolingMax1dNode,
    PoolingMaxNode,
    ReLUNode,
    ReshapeNode,
    RNNNode,
    SelectNode,
    SigmoidCrossEntropyLossNode,
    SigmoidNode,
    SoftMaxNode,
    SoftmaxCrossEntropyLossNode,
    SoftplusNode,
    SubtractionNode,
    TanhNode,
    TensorNode,
    Value,
    YoloLossNode,
)
from .padding import FULL, SAME, SYMMETRIC, VALID, Padding
from . import build, capture, io, memory, nodes, optimize, run, train, updates  # noqa: E402
from .io import load_graph, save_graph, torch_state_dict
from .from_torch import from_torch
from .train import History, NonFiniteLossError, Progress, accuracy, fit

__all__ = [name for name in dir() if not name.startswith("_") and name not in ("annotations",)]
