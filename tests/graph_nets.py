"""Networks, data and recording data sources shared by the graph tests (test_graph*.py)."""
from __future__ import annotations

import numpy as np

from pymetalnn import graph as G
from pymetalnn import optim

# ---- the LeNet-style network ----------------------------------------------------------------------

class Recording(G.ConvolutionDataSource):
    """Keeps a host copy of the gradients of every update."""

    def update(self, grads):
        self.grads = [g.numpy().copy() for g in grads]
        super().update(grads)


class RecordingFC(G.FullyConnectedDataSource):
    def update(self, grads):
        self.grads = [g.numpy().copy() for g in grads]
        super().update(grads)


class RecordingBN(G.NormalizationDataSource):
    def update(self, grads):
        self.grads = [g.numpy().copy() for g in grads]
        super().update(grads)


P_DROP, DROP_SEED = 0.25, 7


def lenet(bn: bool = True, lr: float = 0.1, record: bool = True, dropout: bool = True,
          hw: int = 12, classes: int = 10):
    """conv 3x3 same (+BN) relu pool2, conv 3x3 valid relu pool2, flatten, dropout, fc relu, fc,
    softmax cross-entropy."""
    C, CF, BN = (Recording, RecordingFC, RecordingBN) if record else \
        (G.ConvolutionDataSource, G.FullyConnectedDataSource, G.NormalizationDataSource)
    x = G.ImageNode((1, hw, hw), name="x")
    ds = {"conv1": C(1, 4, 3, seed=1), "conv2": C(4, 6, 3, seed=2),
          "fc1": CF(6 * ((hw // 2 - 2) // 2) ** 2, 16, seed=3, init="glorot"),
          "fc2": CF(16, classes, seed=4, init="glorot")}
    # non-zero biases so that bias gradients and updates are exercised
    for k, d in ds.items():
        b = np.random.default_rng(10 + len(k)).uniform(-0.1, 0.1, d._host["bias"].shape)
        d._host["bias"] = b.astype(np.float32)
    h = G.ConvolutionNode(x, ds["conv1"], padding="same", name="conv1")
    if bn:
        ds["bn1"] = BN(4, gamma=np.linspace(0.5, 1.5, 4), beta=np.linspace(-0.2, 0.2, 4))
        h = G.BatchNormalizationNode(h, ds["bn1"], name="bn1")
    h = G.ReLUNode(h, name="relu1")
    h = G.PoolingMaxNode(h, 2, name="pool1")
    h = G.ConvolutionNode(h, ds["conv2"], padding="valid", name="conv2")
    h = G.ReLUNode(h, name="relu2")
    h = G.PoolingMaxNode(h, 2, name="pool2")
    h = G.FlattenNode(h, name="flatten")
    if dropout:
        h = G.DropoutNode(h, P_DROP, seed=DROP_SEED, name="drop")
    h = G.FullyConnectedNode(h, ds["fc1"], name="fc1")
    h = G.ReLUNode(h, name="relu3")
    logits = G.FullyConnectedNode(h, ds["fc2"], name="fc2")
    loss = G.SoftmaxCrossEntropyLossNode(logits, name="loss")
    return x, loss, ds


def torch_lenet(torch, bn: bool, fc_in: int, classes: int):
    """graph's lenet() in PyTorch, float64 (weights still to be copied in): conv, optional batch
    norm, relu, pool, conv, relu, pool, fc, relu, fc. forward(x, mask) multiplies the flattened
    features by `mask` where given (the graph's dropout, replayed)."""
    nn = torch.nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
            if bn:
                self.bn1 = nn.BatchNorm2d(4)
            self.conv2 = nn.Conv2d(4, 6, 3)
            self.fc1 = nn.Linear(fc_in, 16)
            self.fc2 = nn.Linear(16, classes)

        def forward(self, x, mask=None):
            h = self.conv1(x)
            if bn:
                h = self.bn1(h)
            h = torch.max_pool2d(torch.relu(h), 2)
            h = torch.max_pool2d(torch.relu(self.conv2(h)), 2).flatten(1)
            if mask is not None:
                h = h * mask
            return self.fc2(torch.relu(self.fc1(h)))

    return Net().double()


def sgd(lr):
    return lambda params: optim.SGD(params, lr=lr)


def data(n=4, hw=12, classes=10, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 1, hw, hw)).astype(np.float32), rng.integers(0, classes, n)


def close(a, b, tol=2e-4, what=""):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    err = np.abs(a - b).max() / max(np.abs(b).max(), 1e-3)
    assert err < tol, f"{what}: relative error {err:.2e}"


# ---- memory planning -------------------------------------------------------------------------------

def inception(dev=None, n_classes=3, cin=4, hw=6, concat_only=False, seed=0):
    """An Inception-style block: 1x1 | 1x1 -> 3x3 | 1x1 -> 5x5 | maxpool 3x3 -> 1x1, concatenated,
    then global average pooling and a classifier."""
    x = G.ImageNode((cin, hw, hw), name="x")

    def conv(src, ci, co, k, name, s):
        return G.ReLUNode(G.ConvolutionNode(src, G.ConvolutionDataSource(ci, co, k, seed=s + seed),
                                            padding="same", name=name), name=name + "_relu")

    b1 = conv(x, cin, 4, 1, "b1", 1)
    b2 = conv(conv(x, cin, 4, 1, "b2a", 2), 4, 4, 3, "b2b", 3)
    b3 = conv(conv(x, cin, 4, 1, "b3a", 4), 4, 4, 5, "b3b", 5)
    b4 = conv(G.PoolingMaxNode(x, 3, 1, padding="same", name="b4pool"), cin, 4, 1, "b4", 6)
    cat = G.ConcatenationNode([b1, b2, b3, b4], name="concat")
    if concat_only:
        return x, cat
    gap = G.GlobalAveragePoolingNode(cat, name="gap")
    fc = G.FullyConnectedNode(gap, G.FullyConnectedDataSource(16, n_classes, seed=7 + seed),
                              name="fc")
    return x, G.SoftmaxCrossEntropyLossNode(fc, name="loss")


def train_weights(tg, X, Y, steps):
    losses = [tg.encode(X, Y) for _ in range(steps)]
    tg.synchronize()
    return [h.losses for h in losses], {k: v for k, v in tg.state_dict().items()
                                        if ".optim." not in k}


# ---- optimizations ------------------------------------------------------------------------------------

def dispatches(dev):
    return sum(dev.dispatch_counts.values())


def step_launches(dev, tg, X, Y) -> dict:
    """Kernel name -> launches of one encoded training step of tg (after a warm-up step)."""
    tg.encode(X, Y).wait()
    before = dict(dev.dispatch_counts)
    tg.encode(X, Y).wait()
    return {k: v - before.get(k, 0) for k, v in dev.dispatch_counts.items()
            if v != before.get(k, 0)}


# ---- data sources --------------------------------------------------------------------------------

class Events:
    def __init__(self):
        self.log = []


def counting(cls, events, tag):
    class Counting(cls):
        def load(self):
            events.log.append((tag, "load"))
            return super().load()

        def purge(self):
            events.log.append((tag, "purge"))
            super().purge()

        def update(self, grads):
            events.log.append((tag, "update"))
            super().update(grads)

    return Counting


def small_net(events, low_memory=False):
    x = G.ImageNode((1, 4, 4))
    conv = counting(G.ConvolutionDataSource, events, "conv")(1, 2, 3, seed=0)
    fc = counting(G.FullyConnectedDataSource, events, "fc")(32, 3, seed=1)
    h = G.ReLUNode(G.ConvolutionNode(x, conv, name="c"))
    loss = G.MeanSquaredErrorLossNode(G.FullyConnectedNode(G.FlattenNode(h), fc, name="f"))
    return loss, conv, fc


# ---- the other nodes against torch ---------------------------------------------------------------

def recorded(cls):
    class R(cls):
        def update(self, grads):
            self.grads = [g.numpy().copy() for g in grads]
            super().update(grads)

    return R
