"""pymetalnn.graph: building, shape inference, the training graph against PyTorch autograd and a
numpy chain, data sources, double buffering, save/load, the training loop. Shapes are tiny (CI
runs the cpu backend on 2 cores)."""
from __future__ import annotations

import threading

import graph_nets
import numpy as np
import pytest
from graph_nets import DROP_SEED, P_DROP, Events, close, data, lenet, recorded, sgd, small_net

import pymetalnn
from pymetalnn import functional as F
from pymetalnn import graph as G
from pymetalnn import optim


def drop_mask(dev, shape, step):
    return F.dropout(pymetalnn.tensor(np.ones(shape, np.float32), dev), P_DROP, DROP_SEED,
                     step).numpy()


def torch_lenet(torch, ds, bn):
    net = graph_nets.torch_lenet(torch, bn, ds["fc1"].in_features, ds["fc2"].out_features)
    with torch.no_grad():
        for name, d in ds.items():
            for k, v in d.state_dict().items():
                if k != "num_batches_tracked":
                    getattr(getattr(net, name), k).copy_(torch.from_numpy(v.astype(np.float64)))
    return net


@pytest.mark.parametrize("bn", [False, True])
def test_lenet_gradients_and_sgd_match_torch(dev, bn):
    torch = pytest.importorskip("torch")
    x, loss, ds = lenet(bn=bn)
    tg = G.TrainingGraph(loss, optimizer=sgd(0.1), device=dev)
    net = torch_lenet(torch, ds, bn)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    X, Y = data()
    for step in range(5):
        h = tg.encode(X, Y)
        mask = drop_mask(dev, (4, 24), step)  # 0 or 1/(1-p): the graph's mask of this step
        opt.zero_grad()
        out = net(torch.from_numpy(X).double(), torch.from_numpy(mask).double())
        per = torch.nn.functional.cross_entropy(out, torch.from_numpy(Y), reduction="none")
        per.mean().backward()
        close(h.losses, per.detach().numpy(), 1e-4, f"step {step} losses")
        if step == 0:
            for name, d in ds.items():
                mod = getattr(net, name)
                close(d.grads[0], mod.weight.grad, 2e-4, f"{name}.weight grad")
                close(d.grads[1], mod.bias.grad, 2e-4, f"{name}.bias grad")
        opt.step()
    tg.synchronize()
    for name, d in ds.items():
        mod = getattr(net, name)
        sd = d.state_dict()
        close(sd["weight"], mod.weight.detach(), 5e-4, f"{name}.weight after 5 steps")
        close(sd["bias"], mod.bias.detach(), 5e-4, f"{name}.bias after 5 steps")
        if name == "bn1":
            close(sd["running_mean"], mod.running_mean, 5e-4, "running_mean")
            close(sd["running_var"], mod.running_var, 5e-4, "running_var")


# ---- numpy reference chain ------------------------------------------------------------------------

def np_conv(x, w, b, pad):
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    k = w.shape[2]
    oh, ow = xp.shape[2] - k + 1, xp.shape[3] - k + 1
    cols = np.stack([xp[:, :, r:r + oh, s:s + ow] for r in range(k) for s in range(k)], axis=2)
    return np.einsum("ncqhw,kcq->nkhw", cols, w.reshape(w.shape[0], w.shape[1], -1)) + \
        b[None, :, None, None], cols


def np_conv_back(gy, cols, w, pad, xshape):
    k = w.shape[2]
    gw = np.einsum("nkhw,ncqhw->kcq", gy, cols).reshape(w.shape)
    gcols = np.einsum("nkhw,kcq->ncqhw", gy, w.reshape(w.shape[0], w.shape[1], -1))
    n, c, h, wd = xshape
    gxp = np.zeros((n, c, h + 2 * pad, wd + 2 * pad))
    oh, ow = gy.shape[2:]
    for q, (r, s) in enumerate((r, s) for r in range(k) for s in range(k)):
        gxp[:, :, r:r + oh, s:s + ow] += gcols[:, :, q]
    return gxp[:, :, pad:pad + h, pad:pad + wd], gw, gy.sum(axis=(0, 2, 3))


def np_pool(x):
    n, c, h, w = x.shape
    v = x[:, :, :h // 2 * 2, :w // 2 * 2].reshape(n, c, h // 2, 2, w // 2, 2)
    y = v.max(axis=(3, 5))
    m = v == y[:, :, :, None, :, None]
    m &= np.cumsum(np.cumsum(m, 3), 5) == 1  # first maximum only
    return y, m


def np_pool_back(gy, m, shape):
    g = np.zeros(shape)
    n, c, h, w = shape
    g[:, :, :h // 2 * 2, :w // 2 * 2] = (m * gy[:, :, :, None, :, None]).reshape(
        n, c, h // 2 * 2, w // 2 * 2)
    return g


def test_lenet_gradients_match_numpy_chain(dev):
    x, loss, ds = lenet(bn=False)
    tg = G.TrainingGraph(loss, optimizer=sgd(0.0), device=dev)
    X, Y = data(seed=3)
    h = tg.encode(X, Y)
    p = {k: {n: a.astype(np.float64) for n, a in d.state_dict().items()} for k, d in ds.items()}
    mask = drop_mask(dev, (4, 24), 0).astype(np.float64)
    a1, cols1 = np_conv(X.astype(np.float64), p["conv1"]["weight"], p["conv1"]["bias"], 1)
    r1 = np.maximum(a1, 0)
    p1, m1 = np_pool(r1)
    a2, cols2 = np_conv(p1, p["conv2"]["weight"], p["conv2"]["bias"], 0)
    r2 = np.maximum(a2, 0)
    p2, m2 = np_pool(r2)
    f = p2.reshape(4, -1) * mask
    z1 = f @ p["fc1"]["weight"].T + p["fc1"]["bias"]
    r3 = np.maximum(z1, 0)
    z2 = r3 @ p["fc2"]["weight"].T + p["fc2"]["bias"]
    e = np.exp(z2 - z2.max(1, keepdims=True))
    sm = e / e.sum(1, keepdims=True)
    per = -np.log(sm[np.arange(4), Y])
    close(h.losses, per, 1e-4, "losses")
    g = (sm - np.eye(10)[Y]) / 4
    grads = {"fc2": (g.T @ r3, g.sum(0))}
    g = g @ p["fc2"]["weight"] * (z1 > 0)
    grads["fc1"] = (g.T @ f, g.sum(0))
    g = (g @ p["fc1"]["weight"]) * mask
    g = np_pool_back(g.reshape(p2.shape), m2, r2.shape) * (a2 > 0)
    gx, gw, gb = np_conv_back(g, cols2, p["conv2"]["weight"], 0, p1.shape)
    grads["conv2"] = (gw, gb)
    g = np_pool_back(gx, m1, r1.shape) * (a1 > 0)
    _, gw, gb = np_conv_back(g, cols1, p["conv1"]["weight"], 1, X.shape)
    grads["conv1"] = (gw, gb)
    for k, (gw, gb) in grads.items():
        close(ds[k].grads[0], gw, 2e-4, f"{k}.weight grad")
        close(ds[k].grads[1], gb, 2e-4, f"{k}.bias grad")


# ---- construction errors ---------------------------------------------------------------------------

def test_shape_inference_and_padding_policies():
    x = G.ImageNode((3, 9, 9))
    w = G.ConvolutionDataSource(3, 2, 3)
    assert G.ConvolutionNode(x, w, padding="same").result.shape[1:] == (2, 9, 9)
    assert G.ConvolutionNode(x, w, padding="valid").result.shape[1:] == (2, 7, 7)
    assert G.ConvolutionNode(x, w, padding="full").result.shape[1:] == (2, 11, 11)
    assert G.ConvolutionNode(x, w, padding="same", stride=2).result.shape[1:] == (2, 5, 5)
    assert G.ConvolutionNode(x, w, padding=lambda *a: (0, 2, 1, 1)).result.shape[1:] == (2, 9, 9)

    class TopOnly(G.Padding):
        def pads(self, node, in_hw, kernel, stride, dilation):
            return (2, 0, 0, 0)

    assert G.ConvolutionNode(x, w, padding=TopOnly()).result.shape[1:] == (2, 9, 7)
    assert G.PoolingMaxNode(x, 2).result.shape[1:] == (3, 4, 4)
    assert G.PoolingMaxNode(x, 2, padding="same").result.shape[1:] == (3, 5, 5)
    assert G.PoolingMaxNode(x, 3, 1, padding="same").result.shape[1:] == (3, 9, 9)
    t = G.ConvolutionTransposeNode(x, G.ConvolutionTransposeDataSource(3, 2, 3), stride=2,
                                   padding="same")
    assert t.result.shape[1:] == (2, 18, 18)
    assert G.FlattenNode(x).result.shape[1:] == (243,)
    assert G.ConcatenationNode([x, x]).result.shape[1:] == (6, 9, 9)


@pytest.mark.parametrize("k, stride, dil", [(3, 2, 1), (5, 2, 1), (3, 3, 2), (1, 2, 1), (3, 1, 1), (2, 2, 2)])
def test_default_padding_is_torchs_k_over_2(dev, k, stride, dil):
    """The convolution default pads dilation*(k-1)//2 on every side, as torch code writes
    padding=k//2: a strided convolution without a padding argument computes torch's numbers (the
    MPS/TensorFlow "same" of a 3x3 stride-2 convolution of 10 rows pads (0, 1) and differs), and
    "same" by name keeps its own semantics. Reference: numpy direct convolution."""
    rng = np.random.default_rng(k * 10 + stride)
    xs = rng.standard_normal((2, 3, 10, 11)).astype(np.float32)
    ds = G.ConvolutionDataSource(3, 4, k, seed=5)
    w, b = ds.state_dict()["weight"], rng.standard_normal(4).astype(np.float32)
    ds.load_state_dict({"weight": w, "bias": b})
    p = dil * (k - 1) // 2

    def ref(pads):
        xp = np.pad(xs.astype(np.float64), ((0, 0), (0, 0), pads[:2], pads[2:]))
        oh = (xp.shape[2] - dil * (k - 1) - 1) // stride + 1
        ow = (xp.shape[3] - dil * (k - 1) - 1) // stride + 1
        out = np.zeros((2, 4, oh, ow)) + b[None, :, None, None]
        for i in range(k):
            for j in range(k):
                patch = xp[:, :, i * dil:i * dil + stride * oh:stride, j * dil:j * dil + stride * ow:stride]
                out += np.einsum("nchw,oc->nohw", patch[:, :, :oh, :ow], w[:, :, i, j])
        return out

    x = G.ImageNode((3, 10, 11))
    node = G.ConvolutionNode(x, ds, stride=stride, dilation=dil)
    assert node.pads == (p, p, p, p)
    got = G.Graph(node, device=dev)(xs)
    np.testing.assert_allclose(got, ref((p, p, p, p)), rtol=1e-4, atol=1e-4)
    same = G.ConvolutionNode(G.ImageNode((3, 10, 11)), ds, stride=stride, dilation=dil, padding="same")
    if stride > 1 and k > 1:
        assert same.pads != node.pads  # the trap the default avoids
    np.testing.assert_allclose(G.Graph(same, device=dev)(xs), ref(same.pads), rtol=1e-4, atol=1e-4)
    if k == 3:  # an even kernel extent has no default: padding must be given
        with pytest.raises(G.GraphError, match="padding"):
            G.ConvolutionNode(x, G.ConvolutionDataSource(3, 4, (2, 3)), stride=stride)
    # the 1-D node: the same default along L, nothing above or below
    c1 = G.Convolution1dNode(G.ImageNode((3, 11)), G.Conv1dDataSource(3, 4, k), stride=stride,
                             dilation=dil)
    assert c1.pads == (0, 0, p, p)
    assert c1.result.shape[1:] == (4, (11 + 2 * p - dil * (k - 1) - 1) // stride + 1)


def test_inconsistent_graphs_fail_at_construction():
    x = G.ImageNode((3, 8, 8), name="img")
    with pytest.raises(G.GraphError, match="'convA'.*4 channels|'convA'.*expect 4"):
        G.ConvolutionNode(x, G.ConvolutionDataSource(4, 2, 3), name="convA")
    c = G.ConvolutionNode(x, G.ConvolutionDataSource(3, 2, 3), name="convB")
    with pytest.raises(G.GraphError, match="'fcA'"):
        G.FullyConnectedNode(c, G.FullyConnectedDataSource(100, 2), name="fcA")
    with pytest.raises(G.GraphError, match="'catA'"):
        G.ConcatenationNode([x, G.PoolingMaxNode(x, 2)], name="catA")
    with pytest.raises(G.GraphError, match="'lossA'.*labels"):
        G.SoftmaxCrossEntropyLossNode(G.FlattenNode(c), labels=G.LabelsNode((3,)), name="lossA")
    # a cycle, made by rewiring a source
    r = G.ReLUNode(c, name="reluC")
    f = G.FullyConnectedNode(G.FlattenNode(r), G.FullyConnectedDataSource(128, 2), name="fcC")
    loss = G.SoftmaxCrossEntropyLossNode(f, name="lossC")
    a = G.AdditionNode(r, r, name="addC")
    r.set_source(0, a)
    with pytest.raises(G.GraphError, match="cycle"):
        G.TrainingGraph(loss, optimizer=sgd(0.1))
    # a node that does not reach the loss
    x2 = G.ImageNode((3, 8, 8))
    c2 = G.ConvolutionNode(x2, G.ConvolutionDataSource(3, 2, 3), name="convD")
    f2 = G.FullyConnectedNode(c2, G.FullyConnectedDataSource(128, 2), name="fcD")
    G.SoftMaxNode(f2, name="probsD")
    loss2 = G.SoftmaxCrossEntropyLossNode(f2, name="lossD")
    with pytest.raises(G.GraphError, match="'probsD'.*does not reach the loss"):
        G.TrainingGraph(loss2, optimizer=sgd(0.1))
    tg = G.TrainingGraph(loss2, optimizer=sgd(0.1), strict=False)
    assert any("probsD" in m for m in tg.log)
    # a missing optimizer names the node
    x3 = G.ImageNode((4,))
    loss3 = G.MeanSquaredErrorLossNode(G.FullyConnectedNode(x3, G.FullyConnectedDataSource(4, 2),
                                                            name="fcE"))
    with pytest.raises(G.GraphError, match="'fcE'.*optimizer"):
        G.TrainingGraph(loss3)


def test_data_source_protocol(dev):
    ev = Events()
    loss, conv, fc = small_net(ev)
    tg = G.TrainingGraph(loss, optimizer=sgd(0.1), device=dev)
    assert ev.log == []  # nothing loaded at construction: just in time
    rng = np.random.default_rng(0)
    X, T = rng.standard_normal((2, 1, 4, 4)).astype(np.float32), rng.standard_normal((2, 3))
    tg.encode(X, T).wait()
    assert ev.log == [("conv", "load"), ("fc", "load"), ("fc", "update"), ("conv", "update")]
    opt = conv.optimizer
    tg.encode(X, T).wait()
    assert ev.log[4:] == [("fc", "update"), ("conv", "update")]
    assert conv.optimizer is opt  # created once, at the first load
    tg.purge()
    assert ev.log[6:] == [("conv", "purge"), ("fc", "purge")]
    # low-memory mode: load before every use, purge after
    ev2 = Events()
    loss, conv, fc = small_net(ev2)
    tg = G.TrainingGraph(loss, optimizer=sgd(0.1), device=dev, low_memory=True)
    h = tg.encode(X, T)
    assert ev2.log == [("conv", "load"), ("conv", "purge"), ("fc", "load"), ("fc", "purge"),
                       ("fc", "load"), ("fc", "update"), ("fc", "purge"),
                       ("conv", "load"), ("conv", "update"), ("conv", "purge")]
    h.wait()
    assert not conv.loaded and not fc.loaded
    # purged weights keep their updates, and training goes on from them
    ev3 = Events()
    loss3, conv3, fc3 = small_net(ev3)
    tg3 = G.TrainingGraph(loss3, optimizer=sgd(0.1), device=dev)
    tg3.encode(X, T)  # the low-memory graph ran one step already
    for _ in range(2):
        tg.encode(X, T)
        tg3.encode(X, T)
    tg.synchronize()
    tg3.synchronize()
    for a, b in ((conv, conv3), (fc, fc3)):
        for k, v in a.state_dict().items():
            np.testing.assert_array_equal(v, b.state_dict()[k])


def test_initializers():
    he = G.ConvolutionDataSource(16, 32, 3, seed=0).state_dict()["weight"]
    assert abs(he.std() - np.sqrt(2 / (16 * 9))) < 0.1 * np.sqrt(2 / (16 * 9))
    gl = G.FullyConnectedDataSource(100, 50, init="glorot", seed=0).state_dict()["weight"]
    assert np.abs(gl).max() <= np.sqrt(6 / 150) and gl.std() > 0.5 * np.sqrt(2 / 150)
    given = np.arange(6, dtype=np.float32).reshape(3, 2)
    np.testing.assert_array_equal(G.FullyConnectedDataSource(2, 3, init=given).state_dict()["weight"], given)
    with pytest.raises(ValueError, match="shape"):
        G.FullyConnectedDataSource(3, 3, init=given)


# ---- double buffering ------------------------------------------------------------------------------

def test_encode_returns_before_the_step_completes(dev):
    _, loss, _ = lenet(bn=False, record=False)
    tg = G.TrainingGraph(loss, optimizer=sgd(0.1), device=dev)
    X, Y = data()
    tg.encode(X, Y).wait()  # first step: compiles and plans
    xt, yt = tg.bind(X)[0], tg.labels(Y)
    gate = threading.Event()
    seen = []
    if dev.name == "cpu":
        dev.signal(lambda: gate.wait(30))  # holds the cpu queue: nothing queued after it runs
    h1 = tg.encode(xt, yt, callback=lambda h: seen.append(h.step))
    h2 = tg.encode(xt, yt, callback=lambda h: seen.append(h.step))
    if dev.name == "cpu":
        assert not h1.done and not h2.done
        third = threading.Thread(target=lambda: tg.encode(xt, yt))
        third.start()
        third.join(0.5)
        assert third.is_alive()  # a third step waits: at most two in flight
        gate.set()
        third.join(30)
    h2.wait()
    tg.synchronize()
    assert h1.done and h2.done and seen == [h1.step, h2.step]


def test_two_in_flight_same_weights_as_synchronous(dev):
    X, Y = data(n=4)
    res = {}
    for in_flight in (2, 1):
        _, loss, _ = lenet(record=False)
        tg = G.TrainingGraph(loss, optimizer=sgd(0.1), device=dev, in_flight=in_flight)
        hs = []
        for _ in range(4):
            h = tg.encode(X, Y)
            if in_flight == 1:
                h.wait()
            hs.append(h)
        tg.synchronize()
        res[in_flight] = ([h.losses for h in hs], tg.training_state_dict())
    for a, b in zip(res[2][0], res[1][0]):
        np.testing.assert_array_equal(a, b)
    for k, v in res[2][1].items():
        np.testing.assert_array_equal(v, res[1][1][k], err_msg=k)


# ---- save / load, inference graph ----------------------------------------------------------------

def test_save_load_npz_with_optimizer_state(dev, tmp_path):
    X, Y = data()

    def make(seed_shift=0):
        _, loss, ds = lenet(record=False)
        if seed_shift:
            for d in ds.values():
                for k in d.trainable:
                    d._host[k] = d._host[k] + seed_shift
        return G.TrainingGraph(loss, optimizer=lambda p: optim.SGD(p, lr=0.05, momentum=0.9),
                               device=dev), ds

    a, _ = make()
    for _ in range(2):
        a.encode(X, Y)
    path = tmp_path / "lenet.npz"
    a.save(path)
    with np.load(path, allow_pickle=False) as z:
        keys = set(z.files)
    assert "conv1.weight" in keys and "fc2.bias" in keys
    assert "conv1.optim.param0.momentum_buffer" in keys
    assert {"bn1.running_mean", "bn1.num_batches_tracked"} <= keys
    b, _ = make(seed_shift=1.0)
    b.load(path)
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)
    # both continue identically (momentum restored)
    ha, hb = a.encode(X, Y), b.encode(X, Y)
    np.testing.assert_array_equal(ha.losses, hb.losses)
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)
    with pytest.raises(G.GraphError, match="shape"):
        b.load_state_dict({**sa, "fc2.weight": np.zeros((3, 3), np.float32)})


def test_torch_state_dict_and_inference_graph(dev):
    torch = pytest.importorskip("torch")
    _, loss, ds = lenet(bn=True, record=False)
    tg = G.TrainingGraph(loss, optimizer=sgd(0.1), device=dev)
    torch.manual_seed(0)
    net = torch_lenet(torch, ds, True)
    with torch.no_grad():  # fresh random weights and statistics, loaded from torch's names
        for p in net.parameters():
            p.uniform_(-0.3, 0.3)
        net.bn1.running_mean.uniform_(-0.5, 0.5)
        net.bn1.running_var.uniform_(0.5, 1.5)
    used = tg.load_state_dict(G.torch_state_dict(net))
    assert "conv1.weight" in used
    inf = tg.inference_graph()
    X, _ = data(n=3)
    got = inf(X)
    net.eval()
    want = net(torch.from_numpy(X).double(), torch.ones(1, dtype=torch.float64)).detach().numpy()
    close(got, want, 1e-4, "inference logits (dropout off, running statistics)")
    # training updates the shared weights: the inference graph sees them
    tg.encode(X, np.array([1, 2, 3])).wait()
    assert not np.array_equal(inf(X), got)


# ---- the training loop -------------------------------------------------------------------------------

def bars(n, rng):
    """8x8 images: class 0 a horizontal bar, class 1 a vertical bar, at random places, in noise."""
    x = rng.normal(0, 0.3, (n, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 2, n)
    pos = rng.integers(1, 7, n)
    for i in range(n):
        if y[i] == 0:
            x[i, 0, pos[i], 1:7] += 1.0
        else:
            x[i, 0, 1:7, pos[i]] += 1.0
    return x, y


def test_small_cnn_learns_two_classes(dev, tmp_path):
    rng = np.random.default_rng(0)
    train, test = bars(256, rng), bars(128, rng)
    x = G.ImageNode((1, 8, 8))
    h = G.ReLUNode(G.ConvolutionNode(x, G.ConvolutionDataSource(1, 4, 3, seed=0), name="conv"))
    h = G.PoolingMaxNode(h, 2, name="pool")
    logits = G.FullyConnectedNode(h, G.FullyConnectedDataSource(64, 2, seed=1), name="fc")
    tg = G.TrainingGraph(G.SoftmaxCrossEntropyLossNode(logits, name="loss"),
                         optimizer=lambda p: optim.SGD(p, lr=0.1, momentum=0.9), device=dev)
    import io

    out = io.StringIO()
    hist = G.fit(tg, train, epochs=10, batch_size=16, test=test, target_accuracy=0.95, out=out)
    assert hist.accuracy[-1] >= 0.95, hist.accuracy
    assert hist.epochs <= 10 and len(hist.step_loss) == 16 * hist.epochs
    assert hist.epoch_loss[-1] < hist.epoch_loss[0]
    assert "epoch 1/10 [" in out.getvalue() and "test accuracy" in out.getvalue()
    if hist.plot(str(tmp_path / "h.png")) is not None:
        assert (tmp_path / "h.png").exists()


def test_fit_transform_augments_each_training_batch(dev):
    """fit(transform=): every training batch goes through transform(images, rng) before it is
    encoded, with a generator that repeats for the same seed; the test set is not transformed.
    A transform that wipes the images leaves nothing to learn: chance accuracy."""
    rng = np.random.default_rng(1)
    train, test = bars(96, rng), bars(64, rng)

    def make():
        x = G.ImageNode((1, 8, 8))
        logits = G.FullyConnectedNode(x, G.FullyConnectedDataSource(64, 2, seed=1), name="fc")
        return G.TrainingGraph(G.SoftmaxCrossEntropyLossNode(logits, name="loss"),
                               optimizer=lambda p: optim.SGD(p, lr=0.1), device=dev)

    seen: list[tuple[np.ndarray, float]] = []

    def record(xb: np.ndarray, g: np.random.Generator) -> np.ndarray:
        seen.append((xb.copy(), float(g.random())))
        return xb

    hist = G.fit(make(), train, epochs=2, batch_size=16, progress=False, seed=3, transform=record)
    assert len(seen) == len(hist.step_loss) == 12
    pool = {a.tobytes() for a in train[0]}
    assert all(b.shape == (16, 1, 8, 8) and all(a.tobytes() in pool for a in b) for b, _ in seen)
    draws = [d for _, d in seen]
    seen.clear()
    G.fit(make(), train, epochs=2, batch_size=16, progress=False, seed=3, transform=record)
    assert [d for _, d in seen] == draws  # the same seed, the same augmentation stream
    hist = G.fit(make(), train, epochs=3, batch_size=16, test=test, progress=False,
                 transform=lambda xb, g: np.zeros_like(xb))
    assert all(abs(a - 0.5) < 0.2 for a in hist.accuracy), hist.accuracy


def test_manual_gradient_nodes_and_loss_labels(dev):
    """One line per gradient node, assembled by hand, gives the training graph's gradients; loss
    labels come back holding the per-sample losses."""
    x = G.ImageNode((1, 4, 4))
    cw = recorded(G.ConvolutionDataSource)(1, 2, 3, seed=0)
    fw = recorded(G.FullyConnectedDataSource)(32, 3, seed=1)
    conv = G.ConvolutionNode(x, cw, name="mc")
    relu = G.ReLUNode(conv)
    fc = G.FullyConnectedNode(relu, fw, name="mf")
    loss = G.MeanSquaredErrorLossNode(fc)
    g_loss = loss.gradient()
    g_fc = fc.gradient(g_loss.result)
    g_relu = relu.gradient(g_fc.result)
    g_conv = conv.gradient(g_relu.result)
    manual = G.Graph([loss.result] + g_fc.weight_results + g_conv.weight_results, training=True,
                     device=dev)
    rng = np.random.default_rng(0)
    X, T = rng.standard_normal((2, 1, 4, 4)).astype(np.float32), rng.standard_normal((2, 3))
    outs = manual.run(X, T.astype(np.float32))
    tg = G.TrainingGraph(loss, optimizer=sgd(0.0), device=dev)
    labels = G.LossLabels(T.astype(np.float32))
    tg.encode(X, labels)
    np.testing.assert_allclose(labels.losses, outs[0], rtol=1e-6)
    for got, want in zip(outs[1:], fw.grads + cw.grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_bad_inputs_name_the_node(dev):
    _, loss, _ = lenet(record=False)
    tg = G.TrainingGraph(loss, optimizer=sgd(0.1), device=dev)
    X, Y = data()
    with pytest.raises(G.GraphError, match="node 'x'.*shape"):
        tg.encode(X[:, :, :10], Y)
    with pytest.raises(G.GraphError, match="out of range"):
        tg.encode(X, Y + 10)
    with pytest.raises(G.GraphError, match="labels"):
        tg.encode(X, Y[:3])
    assert tg.step_count == 0  # nothing was queued
    tg.encode(X, Y).wait()


def test_load_state_dict_exact_shapes():
    """A same-size array of another shape (a transposed weight) is refused, not reshaped."""
    ds = G.FullyConnectedDataSource(4, 6, seed=0)
    w = ds.state_dict()["weight"]
    assert w.shape == (6, 4)
    before = ds.state_dict()
    with pytest.raises(ValueError, match="weight"):
        ds.load_state_dict({"weight": w.T.copy(), "bias": before["bias"]})
    with pytest.raises(ValueError, match="bias"):
        ds.load_state_dict({"weight": w, "bias": before["bias"].reshape(1, 6)})
    np.testing.assert_array_equal(ds.state_dict()["weight"], before["weight"])
    ds.load_state_dict({"weight": w * 2, "bias": before["bias"]})
    np.testing.assert_array_equal(ds.state_dict()["weight"], w * 2)
