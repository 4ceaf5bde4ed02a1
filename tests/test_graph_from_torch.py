"""pymetalnn.graph.from_torch: a small ResNet (conv/bn/relu, max pool, residual blocks with a
strided 1x1 shortcut, global average pool, flatten, linear) converted from torch trains 3 SGD
steps with the same losses and weights as torch (float32, rel. 1e-3); its state_dict loads back
into the torch module; unsupported modules are named. Skips without torch."""
from __future__ import annotations

import numpy as np
import pytest

from pymetalnn import graph as G
from pymetalnn import optim

torch = pytest.importorskip("torch")
nn = torch.nn


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class TinyResNet(nn.Module):
    def __init__(self, classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = Block(8, 8, 1)
        self.layer2 = Block(8, 16, 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = self.pool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _close(a, b, tol, what):
    a = np.asarray(a, np.float64)
    b = b.detach().numpy().astype(np.float64) if isinstance(b, torch.Tensor) else np.asarray(b, np.float64)
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(1.0, float(np.abs(b).max())), err_msg=what)


def test_tiny_resnet_trains_like_torch(dev):
    torch.manual_seed(0)
    net = TinyResNet()
    rng = np.random.default_rng(0)
    X = rng.standard_normal((4, 3, 12, 12)).astype(np.float32)
    Y = np.array([0, 3, 1, 4], np.int32)
    tg = G.from_torch(net, X, loss="cross_entropy", optimizer=lambda p: optim.SGD(p, lr=0.1), device=dev)
    assert set(tg.state_dict()) == set(net.state_dict())
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for step in range(3):
        h = tg.encode(X, Y)
        opt.zero_grad()
        per = nn.functional.cross_entropy(net(torch.from_numpy(X)), torch.from_numpy(Y).long(),
                                          reduction="none")
        per.mean().backward()
        opt.step()
        _close(h.losses, per, 1e-3, f"step {step} losses")
    sd = tg.state_dict()
    for k, v in net.state_dict().items():
        if k.endswith("num_batches_tracked"):
            assert int(sd[k]) == int(v), k
        else:
            _close(sd[k], v, 1e-3, f"{k} after 3 steps")
    # the graph's state_dict loads into the torch module (strict), and back into the graph
    net2 = TinyResNet()
    net2.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()})
    assert sorted(tg.load_state_dict(G.torch_state_dict(net2))) == sorted(sd)


def test_unsupported_modules_are_named():
    class Up(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.up = nn.Upsample(scale_factor=2)

        def forward(self, x):
            return self.up(self.conv(x))

    with pytest.raises(G.GraphError, match="Upsample.*up"):
        G.from_torch(Up(), np.zeros((1, 1, 5, 5), np.float32))

    class Pad(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect")

        def forward(self, x):
            return self.conv(x)

    with pytest.raises(G.GraphError, match="padding_mode.*conv"):
        G.from_torch(Pad(), np.zeros((1, 1, 5, 5), np.float32))


class TokenNet(nn.Module):
    """Embedding (with a padding row) -> LayerNorm -> GELU -> flatten -> Linear."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 8, padding_idx=0)
        self.norm = nn.LayerNorm(8)
        self.act = nn.GELU()
        self.flat = nn.Flatten()
        self.fc = nn.Linear(5 * 8, 3)

    def forward(self, x):
        return self.fc(self.flat(self.act(self.norm(self.emb(x)))))


def test_embedding_layer_norm_nodes_train_like_torch(dev):
    torch.manual_seed(1)
    net = TokenNet()
    with torch.no_grad():
        net.norm.weight.uniform_(0.5, 1.5)
        net.norm.bias.uniform_(-0.2, 0.2)
    rng = np.random.default_rng(1)
    X = rng.integers(0, 11, (6, 5)).astype(np.int64)
    X[0, :2] = 0  # the padding row: no gradient
    Y = rng.integers(0, 3, 6).astype(np.int32)
    tg = G.from_torch(net, X, optimizer=lambda p: optim.SGD(p, lr=0.2), device=dev)
    opt = torch.optim.SGD(net.parameters(), lr=0.2)
    for step in range(3):
        h = tg.encode(X.astype(np.int32), Y)
        opt.zero_grad()
        per = nn.functional.cross_entropy(net(torch.from_numpy(X)), torch.from_numpy(Y).long(),
                                          reduction="none")
        per.mean().backward()
        opt.step()
        _close(h.losses, per, 1e-3, f"step {step} losses")
    sd = tg.state_dict()
    for k, v in net.state_dict().items():
        _close(sd[k], v, 1e-3, f"{k} after 3 steps")


class ConvLSTM(nn.Module):
    """A 1-D CNN + 2-layer LSTM classifier (batch-first), the last time step to a linear head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 6, 3, padding=1)
        self.relu = nn.ReLU()
        self.lstm = nn.LSTM(6, 5, num_layers=2, batch_first=True)
        self.fc = nn.Linear(5, 4)

    def forward(self, x):
        y = self.relu(self.conv(x)).permute(0, 2, 1)
        out, (h, c) = self.lstm(y)
        return self.fc(out[:, -1])


class GRULM(nn.Module):
    """A GRU language model: embedding, batch-first GRU, per-step linear to the vocabulary; the
    logits permuted to (N, V, T) for cross_entropy against (N, T) labels."""

    def __init__(self, vocab: int = 13):
        super().__init__()
        self.emb = nn.Embedding(vocab, 6)
        self.gru = nn.GRU(6, 7, batch_first=True)
        self.out = nn.Linear(7, vocab)

    def forward(self, x):
        y, h = self.gru(self.emb(x))
        return self.out(y).permute(0, 2, 1)


@pytest.mark.parametrize("kind", ["cnn_lstm", "gru_lm"])
def test_recurrent_models_train_like_torch(dev, kind):
    if not dev.supports_views:
        pytest.skip("the recurrent ops need buffer views (metal binds whole buffers)")
    torch.manual_seed(2)
    rng = np.random.default_rng(2)
    if kind == "cnn_lstm":
        net = ConvLSTM()
        X = rng.standard_normal((3, 3, 7)).astype(np.float32)
        Y = rng.integers(0, 4, 3).astype(np.int32)
        Xg = X
    else:
        net = GRULM()
        X = rng.integers(0, 13, (3, 6)).astype(np.int64)
        Y = rng.integers(0, 13, (3, 6)).astype(np.int32)
        Xg = X.astype(np.int32)
    tg = G.from_torch(net, X, optimizer=lambda p: optim.SGD(p, lr=0.3), device=dev)
    assert set(tg.state_dict()) == set(net.state_dict())
    opt = torch.optim.SGD(net.parameters(), lr=0.3)
    for step in range(3):
        h = tg.encode(Xg, Y)
        opt.zero_grad()
        per = nn.functional.cross_entropy(net(torch.from_numpy(X)), torch.from_numpy(Y).long(),
                                          reduction="none")
        per.mean().backward()  # torch's mean over every term (from_torch's default reduction)
        per = per.reshape(per.shape[0], -1).sum(1)  # the graph's per-sample losses
        opt.step()
        _close(h.losses, per, 1e-3, f"{kind} step {step} losses")
    sd = tg.state_dict()
    for k, v in net.state_dict().items():
        _close(sd[k], v, 1e-3, f"{kind} {k} after 3 steps")


def test_readable_gradients_with_grouped_updates(dev):
    """keep_gradients(): after each step, gradients() gives every weight gradient (torch's keys)
    while the grouped multi-tensor update still runs; they match torch's for 2 steps."""
    torch.manual_seed(3)
    net = TinyResNet()
    rng = np.random.default_rng(3)
    X = rng.standard_normal((2, 3, 10, 10)).astype(np.float32)
    Y = np.array([1, 4], np.int32)
    tg = G.from_torch(net, X, optimizer=lambda p: optim.SGD(p, lr=0.05), device=dev)
    tg.keep_gradients()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    for step in range(2):
        tg.encode(X, Y)
        grads = tg.gradients()
        # grouped (multi-tensor) updates need buffer views; where the backend has them they stay on
        assert bool(tg._update_groups) == dev.supports_views
        opt.zero_grad()
        nn.functional.cross_entropy(net(torch.from_numpy(X)), torch.from_numpy(Y).long()).backward()
        assert set(grads) == {k for k, p in net.named_parameters()}
        for k, p in net.named_parameters():
            _close(grads[k], p.grad, 2e-3, f"step {step} grad {k}")
        opt.step()
