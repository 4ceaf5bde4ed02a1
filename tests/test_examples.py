"""Each training demo's --smoke path runs and its loss goes down (the demos raise SystemExit
otherwise), on $PYMETALNN_BACKEND when set, else cpu."""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest

import pymetalnn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKEND = os.environ.get("PYMETALNN_BACKEND") or "cpu"


def _example(name: str):
    path = os.path.join(ROOT, "examples", f"{name}.py")
    sys.path.insert(0, os.path.dirname(path))
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(autouse=True)
def _backend_available():
    reason = pymetalnn.availability().get(BACKEND)
    if reason:
        pytest.skip(f"{BACKEND} backend unavailable: {reason}")


def test_mnist_smoke(tmp_path):
    r = _example("mnist").main(["--smoke", "--backend", BACKEND, "--quiet", "--smoke-n", "120",
                                "--out", str(tmp_path)])
    assert r["last_loss"] < r["first_loss"]
    assert r["reloaded_accuracy"] == r["accuracy"]
    assert (tmp_path / "digits.npz").exists() and (tmp_path / "digits.png").exists()


def test_mnist_smoke_mixed_precision(tmp_path):
    r = _example("mnist").main(["--smoke", "--backend", BACKEND, "--quiet", "--smoke-n", "120",
                                "--out", str(tmp_path), "--precision", "mixed"])
    assert r["precision"] == "mixed" and r["last_loss"] < r["first_loss"]
    assert r["reloaded_accuracy"] == r["accuracy"]


def test_png_writer(tmp_path):
    import numpy as np

    c = _example("_common")
    p = tmp_path / "x.png"
    c.write_png(str(p), np.zeros((4, 5, 3), np.uint8))
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_activity_smoke():
    if not pymetalnn.device(BACKEND).supports_views:
        pytest.skip(f"its LSTM needs buffer views, which {BACKEND} lacks (tests/test_rnn.py)")
    r = _example("activity_classifier").main(["--smoke", "--backend", BACKEND, "--quiet"])
    assert r["last_loss"] < r["first_loss"]


def test_inception_smoke():
    r = _example("inception_v3").main(["--smoke", "--backend", BACKEND])
    ls = r["ours"]["losses"]
    assert ls[-1] < ls[0]


def test_inception_smoke_mixed_precision_replay():
    r = _example("inception_v3").main(["--smoke", "--backend", BACKEND, "--precision", "mixed",
                                       "--replay"])
    ls = r["ours"]["losses"]
    assert ls[-1] < ls[0] and r["ours"]["replay"]["launches"] > 0
    assert r["ours"]["loss_scale"] is not None


def test_object_detection_smoke(tmp_path):
    r = _example("object_detection").main(["--smoke", "--backend", "cpu", "--quiet",
                                           "--out", str(tmp_path)])
    assert r["last_loss"] < r["first_loss"]
    assert 0.0 <= r["map"] <= 1.0 and r["images_per_s"] > 0
    assert (tmp_path / "tiny_yolo.npz").exists() and (tmp_path / "detections.png").exists()
