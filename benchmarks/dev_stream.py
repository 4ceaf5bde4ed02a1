"""Launch-shape shoot-out of the memory-bound element-wise kernels (kernels/stream.h): the numbered
versions of kernels/dev/stream_variants.metal on relu forward (1 read + 1 write) and relu backward
(2 reads + 1 write), float32 and float16, plus the production kernel (neuron.relu), each as GB/s
and as a ratio to CuPy's device-to-device copy of the same bytes, timed in the same run.

  v1 HEAD before stream.h (adjacent vec4 pairs per thread; half loads 8 bytes)
  v2 one coalesced 16-byte chunk per thread      v3 two (production, STREAM_U = 2)
  v4 four                                         v5 grid-stride, 2048 threads per SM

Every version is first checked bit for bit against numpy on an odd size (a failing version prints
FAIL and is not timed).

    PYTHONPATH=. python benchmarks/dev_stream.py [--backend cuda] [--quick] [--shape 32x256x56x56]

To change the production shape, set STREAM_U in kernels/stream.h and pymetalnn/ops/_common.py
(neuron.metal, copy.metal copy_flat write their STREAM_U = 2 chunks out explicitly).
"""
from __future__ import annotations

import argparse
import functools
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import common  # noqa: E402

import pymetalnn  # noqa: E402
from pymetalnn.ops import neuron as nn  # noqa: E402
from pymetalnn.params import NeuronParams  # noqa: E402

SOURCE = "dev/stream_variants.metal"
VERSIONS = ["v1", "v2", "v3", "v4", "v5"]
CHUNKS = {"v2": 1, "v3": 2, "v4": 4}


def launch(dev, name: str, version: str, bufs: list, n: int, itemsize: int) -> None:
    k = dev.library(SOURCE).kernel(name)
    tg = k.threadgroup_size
    w = 16 // itemsize
    if version == "v1":
        nvec = n // 8
        count = n - 7 * nvec
    elif version in CHUNKS:
        nvec = n // w
        u = CHUNKS[version]
        count = -(-nvec // (u * tg)) * tg + (n - w * nvec)
    else:
        nvec = n // w
        sms = int(getattr(dev, "props", {}).get("multiProcessorCount", 4)) if dev.name == "cuda" \
            else 4
        count = max(1, min(sms * 2048, nvec or n))
    k(count, *bufs, NeuronParams(n=n, nvec=nvec, a=0.0, b=0.0))


def run_version(dev, direction: str, version: str, dtype, n: int, arrays: dict) -> None:
    sfx = "float" if dtype == np.float32 else "half"
    name = f"relu_{direction}_{version}_{sfx}"
    isz = np.dtype(dtype).itemsize
    if direction == "fwd":
        launch(dev, name, version, [arrays["x"].buffer, arrays["y"].buffer], n, isz)
    else:
        launch(dev, name, version, [arrays["g"].buffer, arrays["x"].buffer, arrays["y"].buffer],
               n, isz)


def check(dev, direction: str, version: str, dtype) -> bool:
    n = 3 * 4096 + 13
    rng = np.random.default_rng(1)
    x = rng.standard_normal(n).astype(dtype)
    g = rng.standard_normal(n).astype(dtype)
    arrays = {"x": pymetalnn.tensor(x, dev), "g": pymetalnn.tensor(g, dev),
              "y": pymetalnn.zeros((n,), dtype, dev)}
    run_version(dev, direction, version, dtype, n, arrays)
    got = arrays["y"].numpy()
    want = np.where(x > 0, x, 0).astype(dtype) if direction == "fwd" else \
        np.where(x > 0, g, 0).astype(dtype)
    return bool(np.array_equal(got, want))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", choices=["cpu", "cuda", "metal"], default=None)
    ap.add_argument("--quick", action="store_true", help="small shape")
    ap.add_argument("--shape", default=None, help="e.g. 32x256x56x56")
    args = ap.parse_args()
    dev = pymetalnn.device(args.backend) if args.backend else pymetalnn.device()
    shape = tuple(int(s) for s in args.shape.split("x")) if args.shape else \
        ((4, 32, 20, 20) if args.quick else (32, 256, 56, 56))
    n = int(np.prod(shape))
    rows = []
    for dtype in (np.float32, np.float16):
        isz = np.dtype(dtype).itemsize
        arrays = {"x": pymetalnn.tensor(np.random.default_rng(2).standard_normal(n).astype(dtype),
                                        dev),
                  "g": pymetalnn.tensor(np.ones(n, dtype), dev),
                  "y": pymetalnn.empty((n,), dtype, dev)}
        for direction, streams in (("fwd", 2), ("bwd", 3)):
            nbytes = streams * n * isz
            copy = common.copy_gbs(dev, 2 * n * isz)
            row = {"bench": f"relu {direction}", "dtype": np.dtype(dtype).name,
                   "shape": "x".join(map(str, shape)), "copy_GB/s": copy}
            best = None
            for v in VERSIONS:
                if not check(dev, direction, v, dtype):
                    row[v] = "FAIL"
                    continue
                fn = functools.partial(run_version, dev, direction, v, dtype, n, arrays)
                sec, _ = common.time_on(dev, fn, args.quick)
                gbs = nbytes / sec / 1e9
                row[v] = round(gbs / copy, 3)
                if best is None or gbs > best[1]:
                    best = (v, gbs)
            prod = functools.partial(nn.relu, arrays["x"]) if direction == "fwd" else \
                functools.partial(nn.relu_backward, arrays["g"], arrays["x"])
            sec, _ = common.time_on(dev, prod, args.quick)
            row["production"] = round(nbytes / sec / 1e9 / copy, 3)
            row["best"] = best[0] if best else "-"
            rows.append(row)
    cols = ["bench", "dtype", "shape", "copy_GB/s", *VERSIONS, "production", "best"]
    print(f"# stream launch shapes on {common.device_label(dev)}: ratio to copy bandwidth "
          f"(bytes read + written)")
    common.print_table(rows, cols)
    print("results:", common.write_results(f"dev_stream_{dev.name}", rows))


if __name__ == "__main__":
    main()
