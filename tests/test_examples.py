"""Each training demo's --smoke path runs and its loss goes down (the demos raise SystemExit
otherwise), on $PYMETALNN_BACKEND when set, else cpu."""
from __future__ import annotations

import os

import numpy as np
import pytest
from example_loader import load_example

import pymetalnn

BACKEND = os.environ.get("PYMETALNN_BACKEND") or "cpu"


@pytest.fixture(autouse=True)
def _backend_available():
    reason = pymetalnn.availability().get(BACKEND)
    if reason:
        pytest.skip(f"{BACKEND} backend unavailable: {reason}")


def test_mnist_smoke(tmp_path):
    r = load_example("mnist").main(["--smoke", "--backend", BACKEND, "--quiet", "--smoke-n", "120",
                                "--out", str(tmp_path)])
    assert r["last_loss"] < r["first_loss"]
    assert r["reloaded_accuracy"] == r["accuracy"]
    assert (tmp_path / "digits.npz").exists() and (tmp_path / "digits.png").exists()


def test_mnist_random_shift():
    """--shift's augmentation: each image moved by (dy, dx) with |dy|, |dx| <= n, the uncovered
    border zero, the rest the image itself; the smoke run trains with it."""
    import numpy as np

    shift = load_example("mnist").random_shift(2)
    rng = np.random.default_rng(0)
    x = rng.random((64, 1, 9, 11)).astype(np.float32) + 1.0  # no zeros of its own
    out = shift(x, np.random.default_rng(5))
    assert out.shape == x.shape and out.dtype == x.dtype
    moves = set()
    for a, b in zip(x, out):
        found = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                 if np.array_equal(b, np.pad(a, ((0, 0), (2, 2), (2, 2)))[
                     :, 2 + dy:2 + dy + 9, 2 + dx:2 + dx + 11])]
        assert len(found) == 1
        moves.add(found[0])
    assert len(moves) > 10  # the moves vary


def test_mnist_smoke_with_shift(tmp_path):
    r = load_example("mnist").main(["--smoke", "--backend", BACKEND, "--quiet", "--smoke-n", "120",
                                "--out", str(tmp_path), "--shift", "2"])
    assert r["last_loss"] < r["first_loss"]


def test_mnist_smoke_mixed_precision(tmp_path):
    r = load_example("mnist").main(["--smoke", "--backend", BACKEND, "--quiet", "--smoke-n", "120",
                                "--out", str(tmp_path), "--precision", "mixed"])
    assert r["precision"] == "mixed" and r["last_loss"] < r["first_loss"]
    assert r["reloaded_accuracy"] == r["accuracy"]


def test_png_writer(tmp_path):
    import numpy as np

    c = load_example("_common")
    p = tmp_path / "x.png"
    c.write_png(str(p), np.zeros((4, 5, 3), np.uint8))
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_activity_smoke():
    if not pymetalnn.device(BACKEND).supports_views:
        pytest.skip(f"its LSTM needs buffer views, which {BACKEND} lacks (tests/test_rnn.py)")
    r = load_example("activity_classifier").main(["--smoke", "--backend", BACKEND, "--quiet"])
    assert r["last_loss"] < r["first_loss"]


def test_inception_smoke():
    r = load_example("inception_v3").main(["--smoke", "--backend", BACKEND])
    ls = r["ours"]["losses"]
    assert ls[-1] < ls[0]


def test_inception_smoke_mixed_precision_replay():
    r = load_example("inception_v3").main(["--smoke", "--backend", BACKEND, "--precision", "mixed",
                                       "--replay"])
    ls = r["ours"]["losses"]
    assert ls[-1] < ls[0] and r["ours"]["replay"]["launches"] > 0
    assert r["ours"]["loss_scale"] is not None


def test_object_detection_torch_peer_mixed(tmp_path):
    """--precision mixed times PyTorch under AMP (float16 autocast, loss scaling, channels-last),
    the comparison the example prints; no training steps (--epochs 0), no loss line."""
    pytest.importorskip("torch")
    r = load_example("object_detection").main([
        "--backend", "cpu", "--quiet", "--size", "64", "--width", "0.25", "--train", "8",
        "--test", "4", "--batch", "4", "--epochs", "0", "--time-steps", "2", "--torch", "on",
        "--precision", "mixed", "--out", str(tmp_path)])
    assert r["torch"]["precision"] == "AMP float16, channels-last"
    assert r["torch"]["images_per_s"] > 0 and np.isfinite(r["torch"]["loss"])
    assert r["steps"] == 0 and "first_loss" not in r


def test_object_detection_smoke(tmp_path):
    r = load_example("object_detection").main(["--smoke", "--backend", "cpu", "--quiet",
                                           "--out", str(tmp_path)])
    assert r["last_loss"] < r["first_loss"]
    assert 0.0 <= r["map"] <= 1.0 and r["images_per_s"] > 0
    assert (tmp_path / "tiny_yolo.npz").exists() and (tmp_path / "detections.png").exists()
