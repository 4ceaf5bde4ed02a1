"""Data-movement benchmarks (kernels/copy.metal): GB/s of bytes read + written, the ratio to copy
bandwidth measured in the same run (target >= 0.85, reported, not asserted) and PyTorch's time for
the same movement on the same GPU (numpy on cpu).

Shapes: 32x256x56x56 images; sequences of the same element count: (N, T, F) = (32, 784, 1024)
for the batch-first <-> time-major transposition, (T, N, F) = (64, 128, 3136) for the sequence
<-> list of T steps. --quick: 4x32x20x20, (4, 25, 128), (8, 4, 400).

    PYTHONPATH=. python benchmarks/bench_copy.py [--backend cpu|cuda] [--quick]
"""
from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import membound  # noqa: E402

import pymetalnn  # noqa: E402
from pymetalnn import functional as F  # noqa: E402


def cases(dev: pymetalnn.Device, quick: bool, dtype) -> list[dict]:
    r = np.random.default_rng(0)
    img = (4, 32, 20, 20) if quick else (32, 256, 56, 56)
    seq_nt = (4, 25, 128) if quick else (32, 784, 1024)
    seq_tn = (8, 4, 400) if quick else (64, 128, 3136)
    n_, c_, h_, w_ = img
    isz = np.dtype(dtype).itemsize
    n = int(np.prod(img))
    x_np = r.standard_normal(img).astype(dtype)
    x = pymetalnn.tensor(x_np, dev)
    halves = F.split(x, [c_ // 2, c_ - c_ // 2], 1)
    nhwc = F.image_to_matrix(x, channels_last=True)
    s_np = r.standard_normal(seq_nt).astype(dtype)
    s = pymetalnn.tensor(s_np, dev)
    tm = F.to_time_major(s)
    q_np = r.standard_normal(seq_tn).astype(dtype)
    q = pymetalnn.tensor(q_np, dev)
    steps = [pymetalnn.tensor(v, dev) for v in q_np]  # separate buffers, as an LSTM makes them
    copy = common.copy_gbs(dev, n * isz)
    other = np.float16 if dtype == np.float32 else np.float32
    ours = {
        "copy": (lambda: F.copy(x), 2 * n * isz),
        f"cast_to_{np.dtype(other).name}": (lambda: F.cast(x, other),
                                            n * (isz + np.dtype(other).itemsize)),
        "concat_c": (lambda: F.concat(halves, 1), 2 * n * isz),
        "concat_c_bwd (split)": (lambda: F.concat_backward(x, halves, 1), 2 * n * isz),
        "nchw_to_nhwc": (lambda: F.image_to_matrix(x, channels_last=True), 2 * n * isz),
        "nchw_to_nhwc_bwd": (lambda: F.image_to_matrix_backward(nhwc, x, channels_last=True),
                             2 * n * isz),
        "to_time_major": (lambda: F.to_time_major(s), 2 * s.size * isz),
        "to_time_major_bwd": (lambda: F.to_time_major_backward(tm, s), 2 * s.size * isz),
        "sequence_to_list": (lambda: F.sequence_to_list(q), 2 * q.size * isz),
        "list_to_sequence": (lambda: F.list_to_sequence(steps), 2 * q.size * isz),
    }
    peers: dict = {}
    peer_name = "-"
    if common.torch_available(dev):
        import torch

        tx = common.torch_view(dev, x)
        th = [common.torch_view(dev, t) for t in halves]
        tnhwc = common.torch_view(dev, nhwc).view(n_, h_, w_, c_)
        ts, ttm, tq = (common.torch_view(dev, t) for t in (s, tm, q))
        tsteps = [common.torch_view(dev, t) for t in steps]
        tdt = torch.float16 if other == np.float16 else torch.float32
        o, oc = torch.empty_like(tx), torch.empty(img, dtype=tdt, device=tx.device)
        os_, otm = torch.empty_like(ts), torch.empty_like(ttm)
        o1, o2 = torch.empty_like(th[0]), torch.empty_like(th[1])
        oq = torch.empty_like(tq)
        onhwc = torch.empty_like(tnhwc)
        peers = {
            "copy": lambda: o.copy_(tx),
            f"cast_to_{np.dtype(other).name}": lambda: oc.copy_(tx),
            "concat_c": lambda: torch.cat(th, 1, out=o),
            "concat_c_bwd (split)": lambda: (o1.copy_(tx[:, : c_ // 2]), o2.copy_(tx[:, c_ // 2:])),
            "nchw_to_nhwc": lambda: onhwc.copy_(tx.permute(0, 2, 3, 1)),
            "nchw_to_nhwc_bwd": lambda: o.copy_(tnhwc.permute(0, 3, 1, 2)),
            "to_time_major": lambda: otm.copy_(ts.transpose(0, 1)),
            "to_time_major_bwd": lambda: os_.copy_(ttm.transpose(0, 1)),
            "sequence_to_list": lambda: [t.clone() for t in tq.unbind(0)],
            "list_to_sequence": lambda: torch.stack(tsteps, 0, out=oq),
        }
        peer_name = "torch"
    elif dev.name == "cpu":
        o = np.empty_like(x_np)
        ph = [np.ascontiguousarray(x_np[:, : c_ // 2]), np.ascontiguousarray(x_np[:, c_ // 2:])]
        peers = {
            "copy": lambda: np.copyto(o, x_np),
            f"cast_to_{np.dtype(other).name}": lambda: x_np.astype(other),
            "concat_c": lambda: np.concatenate(ph, 1, out=o),
            "concat_c_bwd (split)": lambda: [np.ascontiguousarray(v) for v in np.split(x_np, [c_ // 2], 1)],
            "nchw_to_nhwc": lambda: np.ascontiguousarray(x_np.transpose(0, 2, 3, 1)),
            "nchw_to_nhwc_bwd": lambda: np.ascontiguousarray(x_np.transpose(0, 2, 3, 1)),
            "to_time_major": lambda: np.ascontiguousarray(s_np.transpose(1, 0, 2)),
            "to_time_major_bwd": lambda: np.ascontiguousarray(s_np.transpose(1, 0, 2)),
            "sequence_to_list": lambda: [v.copy() for v in q_np],
            "list_to_sequence": lambda: np.stack(list(q_np), 0),
        }
        peer_name = "numpy"
    rows = []
    for name, (fn, nbytes) in ours.items():
        rows.append(membound.case(dev, name, dtype, img, nbytes, copy, fn, peers.get(name), peer_name))
    for row in rows:
        if row["bench"].startswith(("to_time", "sequence", "list")):
            row["shape"] = "x".join(map(str, seq_nt if row["bench"].startswith("to_") else seq_tn))
    return rows


def main() -> int:
    return membound.run_dtypes("copy", __doc__, cases)


if __name__ == "__main__":
    raise SystemExit(main())
