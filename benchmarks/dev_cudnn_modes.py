"""cuDNN's fp32 convolution under each algorithm-selection mode, with its error, beside ours.

bench_conv.py times PyTorch with cudnn.benchmark on (cuDNN autotunes and keeps its fastest
algorithm), which is not always an fp32-accurate one: on LeNet conv2's weight gradient an H100
picked an algorithm off by 6.07e-3 of max|dw| (docs/results/h100-2026-12-08). This script times
one op of one bench_conv shape under three modes, each in a process of its own (the choice is
made once per process): `bench` (autotuned), `heur` (benchmark off: cuDNN's heuristic) and
`determ` (deterministic algorithms), printing the time, PyTorch's error against float64 and
ours (the default path, TF32 off) from the same process.

    PYTHONPATH=. python benchmarks/dev_cudnn_modes.py [--shape lenet-conv2-5x5] [--op weight_grad]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_conv  # noqa: E402

import pymetalnn  # noqa: E402
from pymetalnn import accuracy  # noqa: E402

MODES = ("bench", "heur", "determ")


def one(mode: str, shape: str, op: str) -> str:
    import torch

    dev = pymetalnn.device("cuda")
    s = next(x for x in bench_conv.SHAPES if x[0] == shape)
    p = bench_conv.Problem(dev, s, "float")
    peer = bench_conv.torch_ops(dev, p)  # TF32 off
    torch.backends.cudnn.benchmark = mode == "bench"
    torch.backends.cudnn.deterministic = mode == "determ"
    ref = bench_conv.reference64(dev, p)
    fl = bench_conv.flops(s)
    ts, _ = bench_conv.timeit(dev, peer[op], False, peer["_sync"])
    peer_err = accuracy.rel_err(bench_conv.peer_result(peer, op), ref[op])
    ours, _ = bench_conv.timeit(dev, lambda: p.run(op), False)
    err = accuracy.rel_err(p.result(op), ref[op])
    return (f"{shape} {op} mode={mode}: torch {ts * 1e3:.4f} ms ({fl / ts / 1e12:.1f} TFLOP/s), "
            f"peer_err {peer_err:.2e} | ours {ours * 1e3:.4f} ms ({fl / ours / 1e12:.1f}), err "
            f"{err:.2e} | ratio {ts / ours:.3f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default=bench_conv.SHAPES[0][0],
                    choices=[s[0] for s in bench_conv.SHAPES])
    ap.add_argument("--op", default="weight_grad", choices=["fwd", "input_grad", "weight_grad"])
    ap.add_argument("--mode", choices=MODES, default=None, help="run one mode in this process")
    args = ap.parse_args()
    if args.mode:
        print(one(args.mode, args.shape, args.op), flush=True)
        return 0
    for mode in MODES:
        subprocess.run([sys.executable, __file__, "--shape", args.shape, "--op", args.op,
                        "--mode", mode], check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
