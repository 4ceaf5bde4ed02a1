"""Each training demo's --smoke path runs and its loss goes down (the demos raise SystemExit
otherwise), on $PYMETALNN_BACKEND when set, else cpu."""
from __future__ import annotations

import os

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


def test_object_detection_smoke(tmp_path):
    r = load_example("object_detection").main(["--smoke", "--backend", "cpu", "--quiet",
                                           "--out", str(tmp_path)])
    assert r["last_loss"] < r["first_loss"]
    assert 0.0 <= r["map"] <= 1.0 and r["images_per_s"] > 0
    assert (tmp_path / "tiny_yolo.npz").exists() and (tmp_path / "detections.png").exists()
