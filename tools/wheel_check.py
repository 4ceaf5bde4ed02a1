"""Smoke check of an installed pymetalnn (a wheel in a fresh virtual environment), run from a
folder outside the checkout: the kernels, the prelude and the cpu runtime sources must come from
the installed package, so a conv, a graph training step and the benchmark driver all work.

    python tools/wheel_check.py            # with the environment's python, from any folder
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import numpy as np

import pymetalnn
from pymetalnn import functional as F
from pymetalnn import graph as G
from pymetalnn import optim
from pymetalnn.runtime import core


def main() -> None:
    pkg = os.path.dirname(os.path.abspath(pymetalnn.__file__))
    assert os.path.commonpath([sys.prefix, pkg]) == sys.prefix, f"imported {pkg}, not the installed wheel"
    for d in (core.KERNEL_DIR, core.PRELUDE_DIR, core.CPU_RT_DIR):
        assert os.path.commonpath([pkg, d]) == pkg, f"{d} is not inside the installed package {pkg}"
    print("installed package:", pkg)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 7, 7)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    y = F.conv2d(pymetalnn.tensor(x), pymetalnn.tensor(w), None, 2, 1).numpy()
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    ref = np.zeros((2, 4, 4, 4), np.float32)
    for i in range(4):
        for j in range(4):
            ref[:, :, i, j] = np.einsum("nchw,ochw->no", xp[:, :, 2 * i:2 * i + 3, 2 * j:2 * j + 3], w)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
    print("conv2d matches numpy")

    inp = G.ImageNode((1, 8, 8))
    h = G.ConvolutionNode(inp, G.ConvolutionDataSource(1, 4, 3, seed=0), padding=1)
    h = G.ReLUNode(h)
    h = G.FlattenNode(G.PoolingMaxNode(h, 2))
    logits = G.FullyConnectedNode(h, G.FullyConnectedDataSource(64, 3, seed=1))
    tg = G.TrainingGraph(G.SoftmaxCrossEntropyLossNode(logits), optimizer=lambda p: optim.SGD(p, lr=0.1))
    imgs = rng.standard_normal((4, 1, 8, 8)).astype(np.float32)
    labels = np.array([0, 1, 2, 1])
    first = float(np.mean(tg.encode(imgs, labels).losses))
    for _ in range(4):
        tg.encode(imgs, labels)
    last = float(np.mean(tg.encode(imgs, labels).losses))
    assert np.isfinite(first) and last < first, (first, last)
    print(f"graph training steps: loss {first:.4f} -> {last:.4f}")

    with tempfile.TemporaryDirectory() as out:
        subprocess.run([sys.executable, "-m", "pymetalnn.bench", "--quick", "--only", "softmax",
                        "--out", out], check=True, timeout=600)
        with open(os.path.join(out, "bench.json")) as f:
            status = json.load(f)["meta"]["families"]
        assert all(" rows in " in v for v in status.values()), status
    print("python -m pymetalnn.bench ran from the installed package")


if __name__ == "__main__":
    main()
