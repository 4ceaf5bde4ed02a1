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
    # tanh before the mean: the mean of an instance-normalized channel is its beta, which would
    # leave every gradient above the instance norm exactly zero (nothing checked there)
    k = G.GlobalAveragePoolingNode(G.TanhNode(G.ReshapeNode(j, (8, 4, 4))))
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
    tk = torch.tanh(tj.reshape(2, 8, 4, 4)).mean((2, 3))
    to = TF.linear(tk, P["fc"]["weight"], P["fc"]["bias"])
    per = ((to - torch.from_numpy(T)) ** 2).sum(1)
    per.mean().backward()
    close(h.losses, per.detach().numpy(), 1e-4, "losses")
    for n, s in d.items():
        for gr, k in zip(s.grads, s.trainable):
            assert float(P[n][k].grad.abs().max()) > 1e-3, f"{n}.{k}: no gradient reaches it"
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


@pytest.mark.parametrize("mode, batch_first, layers, bidir", [("lstm", True, 2, False),
                                                              ("gru", False, 1, True),
                                                              ("rnn_tanh", True, 1, False)])
def test_recurrent_node_states_like_torch(dev, mode, batch_first, layers, bidir):
    """A recurrent node with initial states (graph inputs of torch's (L*D, N, H) layout, batch on
    dim 1), return_state and either layout: its output sequence and final states, and through its
    gradient node (fed upstream gradients for all three results) the gradients of the sequence,
    the initial states and every weight, against torch autograd."""
    if not dev.supports_views:
        pytest.skip("the recurrent ops need buffer views (metal binds whole buffers)")
    torch = pytest.importorskip("torch")
    n, t, f, h = 3, 5, 4, 6
    d = 2 if bidir else 1
    cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn_tanh": torch.nn.RNN}[mode]
    torch.manual_seed(0)
    m = cls(f, h, num_layers=layers, bidirectional=bidir, batch_first=batch_first)
    ds = G.RecurrentDataSource(mode, f, h, num_layers=layers, bidirectional=bidir,
                               weights={k: v.detach().numpy() for k, v in m.named_parameters()})
    x = G.ImageNode((t, f)) if batch_first else G.ImageNode((t, f), batch_dim=1)
    states = [G.ImageNode((layers * d, h), batch_dim=1, name=f"s{i}")
              for i in range(2 if mode == "lstm" else 1)]
    node_cls = {"lstm": G.LSTMNode, "gru": G.GRUNode, "rnn_tanh": G.RNNNode}[mode]
    init = tuple(states) if mode == "lstm" else states[0]
    node = node_cls(x, ds, initial_state=init, batch_first=batch_first, return_state=True)
    gsrc = [G.ImageNode((t, d * h)) if batch_first else G.ImageNode((t, d * h), batch_dim=1)]
    gsrc += [G.ImageNode((layers * d, h), batch_dim=1, name=f"g{i}") for i in range(len(states))]
    grad = node.gradient(gsrc)
    g = G.Graph(node.results + grad.results + grad.weight_results, training=True, device=dev)
    rng = np.random.default_rng(1)
    X = rng.standard_normal((n, t, f) if batch_first else (t, n, f)).astype(np.float32)
    S = [rng.standard_normal((layers * d, n, h)).astype(np.float32) for _ in states]
    GO = [rng.standard_normal(v.shape if i else ((n, t, d * h) if batch_first else (t, n, d * h)))
          .astype(np.float32) for i, v in enumerate([None] + S)]
    outs = g.run([X, *S, *GO])
    tx = torch.tensor(X, requires_grad=True)
    ts = [torch.tensor(s, requires_grad=True) for s in S]
    y, hn = m(tx, tuple(ts) if mode == "lstm" else ts[0])
    finals = list(hn) if mode == "lstm" else [hn]
    params = [p for _, p in m.named_parameters()]
    want = torch.autograd.grad([y, *finals], [tx, *ts, *params], [torch.tensor(a) for a in GO])
    got_fwd, got_grads = outs[:1 + len(states)], outs[1 + len(states):]
    for a, b in zip(got_fwd, [y, *finals]):
        np.testing.assert_allclose(a, b.detach().numpy(), rtol=1e-4, atol=1e-5)
    names = ["x"] + [f"state{i}" for i in range(len(states))] + [k for k, _ in m.named_parameters()]
    for a, b, k in zip(got_grads, want, names):
        np.testing.assert_allclose(np.asarray(a).reshape(b.shape), b.numpy(), rtol=1e-4, atol=1e-5,
                                   err_msg=k)
    assert len(got_grads) == len(want)


def test_select_slice_permute_nodes(dev):
    """SelectNode (x[:, :, i], negative i, and the slice i:i+length kept) and PermuteNode
    (batch kept first): forward and gradients (zeros outside the selection, the inverse
    permutation) against numpy."""
    x = G.ImageNode((3, 5, 4))
    picks = [G.SelectNode(x, 2, -1), G.SelectNode(x, 2, 1, length=3), G.PermuteNode(x, (0, 3, 1, 2))]
    gsrc = [G.ImageNode(p.result.shape[1:], name=f"g{i}") for i, p in enumerate(picks)]
    grads = [p.gradient(s) for p, s in zip(picks, gsrc)]
    g = G.Graph([p.result for p in picks] + [gr.result for gr in grads], training=True, device=dev)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((2, 3, 5, 4)).astype(np.float32)
    GS = [rng.standard_normal((2, *s.sample_shape)).astype(np.float32) for s in gsrc]
    outs = g.run([X, *GS])
    np.testing.assert_array_equal(outs[0], X[:, :, -1])
    np.testing.assert_array_equal(outs[1], X[:, :, 1:4])
    np.testing.assert_array_equal(outs[2], X.transpose(0, 3, 1, 2))
    want = [np.zeros_like(X) for _ in range(3)]
    want[0][:, :, -1] = GS[0]
    want[1][:, :, 1:4] = GS[1]
    want[2] = GS[2].transpose(0, 2, 3, 1)
    for a, b in zip(outs[3:], want):
        np.testing.assert_array_equal(a, b)


def test_fully_connected_on_a_sequence_is_per_step_or_refused():
    """A time-major sequence (T, N, F) into a FullyConnectedNode without per_step: refused with a
    hint (flattening would take T as the batch), per_step=True gives (T, N, out)."""
    x = G.ImageNode((7, 5), batch_dim=1)
    with pytest.raises(G.GraphError, match="per_step=True"):
        G.FullyConnectedNode(x, G.FullyConnectedDataSource(5, 3))
    assert G.FullyConnectedNode(x, G.FullyConnectedDataSource(5, 3), per_step=True).result.shape == (7, 2, 3)
