"""The graph's nodes beyond the LeNet set (graph/nodes/: pool, norm, neuron, copy, arith, rnn,
loss) against PyTorch autograd."""
from __future__ import annotations

import numpy as np
import pytest
from graph_nets import close, recorded, sgd, train_weights

from pymetalnn import graph as G


def to_torch(torch, a):
    return torch.from_numpy(np.asarray(a, np.float64)).requires_grad_(True)


def test_node_zoo_gradients_match_torch(dev):
    """conv transpose, average pooling, group / instance norm, neurons, arithmetic, concat,
    global pooling, image<->matrix, reshape and an MSE loss: weight gradients against torch."""
    torch = pytest.importorskip("torch")
    TF = torch.nn.functional
    x = G.ImageNode((3, 4, 4), name="x")
    d = {"ct": recorded(G.ConvolutionTransposeDataSource)(3, 4, 3, seed=1),
         "gn": recorded(G.NormalizationDataSource)(4, running_stats=False,
                                                   gamma=[1.0, 0.5, 1.5, 2.0], beta=[0.1, 0, -0.1, 0.2]),
         "c1": recorded(G.ConvolutionDataSource)(3, 4, 1, seed=2),
         "in": recorded(G.NormalizationDataSource)(8, running_stats=False,
                                                   gamma=np.linspace(0.5, 1.5, 8),
                                                   beta=np.linspace(-1, 1, 8)),
         "fc": recorded(G.FullyConnectedDataSource)(8, 3, seed=3)}
    a = G.ConvolutionTransposeNode(x, d["ct"], stride=2, padding="same")         # (4, 8, 8)
    b = G.PoolingAverageNode(a, 2)                                              # (4, 4, 4)
    c = G.LeakyReLUNode(G.GroupNormalizationNode(b, d["gn"], 2), negative_slope=0.1)
    e = G.ConvolutionNode(x, d["c1"], padding="valid")                          # (4, 4, 4)
    f = G.MultiplicationNode(c, G.TanhNode(e))
    gsub = G.SubtractionNode(f, G.SigmoidNode(e))
    hdiv = G.DivisionNode(f, G.AdditionNode(G.SigmoidNode(e), G.SigmoidNode(e)))
    cat = G.ConcatenationNode([gsub, hdiv])                                     # (8, 4, 4)
    m = G.MatrixToImageNode(G.ImageToMatrixNode(cat), (8, 4, 4))
    j = G.InstanceNormalizationNode(G.ReshapeNode(m, (8, 16, 1)), d["in"])
    k = G.GlobalAveragePoolingNode(G.ReshapeNode(j, (8, 4, 4)))
    out = G.FullyConnectedNode(k, d["fc"])
    loss = G.MeanSquaredErrorLossNode(out)
    tg = G.TrainingGraph(loss, optimizer=sgd(0.0), device=dev)
    rng = np.random.default_rng(0)
    X, T = rng.standard_normal((2, 3, 4, 4)).astype(np.float32), rng.standard_normal((2, 3))
    h = tg.encode(X, T.astype(np.float32))
    P = {n: {k: to_torch(torch, v) for k, v in s.state_dict().items()} for n, s in d.items()}
    xt = torch.from_numpy(X).double()
    ta = TF.conv_transpose2d(xt, P["ct"]["weight"], P["ct"]["bias"], stride=2, padding=1,
                             output_padding=1)
    tc = TF.leaky_relu(TF.group_norm(TF.avg_pool2d(ta, 2), 2, P["gn"]["weight"], P["gn"]["bias"]), 0.1)
    te = TF.conv2d(xt, P["c1"]["weight"], P["c1"]["bias"])
    tf_ = tc * torch.tanh(te)
    tcat = torch.cat([tf_ - torch.sigmoid(te), tf_ / (2 * torch.sigmoid(te))], 1)
    tj = TF.instance_norm(tcat.reshape(2, 8, 16, 1), weight=P["in"]["weight"], bias=P["in"]["bias"])
    tk = tj.reshape(2, 8, 4, 4).mean((2, 3))
    to = TF.linear(tk, P["fc"]["weight"], P["fc"]["bias"])
    per = ((to - torch.from_numpy(T)) ** 2).sum(1)
    per.mean().backward()
    close(h.losses, per.detach().numpy(), 1e-4, "losses")
    for n, s in d.items():
        for gr, k in zip(s.grads, s.trainable):
            close(gr, P[n][k].grad, 5e-4, f"{n}.{k}")


@pytest.mark.parametrize("mode", ["lstm", "gru", "rnn_tanh"])
def test_recurrent_nodes_match_torch(dev, mode):
    torch = pytest.importorskip("torch")
    if not dev.supports_views:
        pytest.skip("the recurrent ops need buffer views")
    T_, N, Fi, H = 3, 2, 4, 5
    x = G.ImageNode((T_, Fi), batch_dim=1, name="seq")                 # (T, N, F) time-major
    ds = recorded(G.RecurrentDataSource)(mode, Fi, H, seed=0)
    node = {"lstm": G.LSTMNode, "gru": G.GRUNode, "rnn_tanh": G.RNNNode}[mode](x, ds)
    loss = G.MeanSquaredErrorLossNode(node)                              # per time step
    tg = G.TrainingGraph(loss, optimizer=sgd(0.0), device=dev)
    rng = np.random.default_rng(1)
    X = rng.standard_normal((T_, N, Fi)).astype(np.float32)
    Y = rng.standard_normal((T_, N, H)).astype(np.float32)
    h = tg.encode(X, Y)
    mod = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn_tanh": torch.nn.RNN}[mode](Fi, H).double()
    with torch.no_grad():
        for k, v in ds.state_dict().items():
            getattr(mod, k).copy_(torch.from_numpy(v.astype(np.float64)))
    out, _ = mod(torch.from_numpy(X).double())
    per = ((out - torch.from_numpy(Y).double()) ** 2).sum((1, 2))
    per.mean().backward()
    close(h.losses, per.detach().numpy(), 1e-4, "losses")
    for gr, k in zip(ds.grads, ds.trainable):
        close(gr, getattr(mod, k).grad, 5e-4, k)


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_recurrent_memory_plan_keeps_workspace_operands(dev, mode):
    """The recurrent backward reads the forward's input and output through its workspace: with
    both produced by planned steps (a neuron before, a stacked layer after), planning must keep
    them live until the backward -- results bit-identical with planning on and off."""
    if not dev.supports_views:
        pytest.skip("the recurrent ops need buffer views")
    T_, N, Fi, H = 4, 2, 6, 5
    rng = np.random.default_rng(2)
    X = rng.standard_normal((T_, N, Fi)).astype(np.float32)
    Y = rng.standard_normal((T_, N, H)).astype(np.float32)
    results = {}
    for memory in (True, False):
        x = G.ImageNode((T_, Fi), batch_dim=1, name="seq")
        cls = {"lstm": G.LSTMNode, "gru": G.GRUNode}[mode]
        h1 = cls(G.TanhNode(x), G.RecurrentDataSource(mode, Fi, H, seed=0))
        h2 = cls(h1, G.RecurrentDataSource(mode, H, H, seed=1))
        loss = G.MeanSquaredErrorLossNode(G.TanhNode(h2))
        tg = G.TrainingGraph(loss, optimizer=sgd(0.1), device=dev, optimize={"memory": memory})
        results[memory] = train_weights(tg, X, Y, 4)
        assert (tg.memory_report() is not None) == memory
    (la, wa), (lb, wb) = results[True], results[False]
    for a, b in zip(la, lb):
        np.testing.assert_array_equal(a, b)
    assert len(wa) == len(wb) > 0  # the node names differ between the two graphs: in order
    for (k, a), b in zip(wa.items(), wb.values()):
        np.testing.assert_array_equal(a, b, err_msg=k)


def test_other_losses_run(dev):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((3, 4)).astype(np.float32)
    for cls, t in [(G.SigmoidCrossEntropyLossNode, rng.integers(0, 2, (3, 4)).astype(np.float32)),
                   (G.MeanAbsoluteErrorLossNode, rng.standard_normal((3, 4))),
                   (G.HuberLossNode, rng.standard_normal((3, 4))),
                   (G.HingeLossNode, rng.integers(0, 2, (3, 4)).astype(np.float32)),
                   (G.CosineDistanceLossNode, rng.standard_normal((3, 4))),
                   (G.KLDivergenceLossNode, np.full((3, 4), 0.25))]:
        x = G.ImageNode((4,))
        fc = G.FullyConnectedNode(x, G.FullyConnectedDataSource(4, 4, seed=0))
        tg = G.TrainingGraph(cls(fc), optimizer=sgd(0.01), device=dev)
        h = tg.encode(X, np.asarray(t, np.float32))
        assert h.losses.shape == (3,) and np.isfinite(h.losses).all(), cls.__name__
