"""LSTM training step (forward for training + backward through time, pymetalnn/ops/rnn.py)
against torch.nn.LSTM on the same device in the same run (cuDNN on cuda, TF32 off).

Cases: hidden 512, batch 64, 300 steps, input 512 (a large layer), and the activity-
classifier sizes (20 steps, 64 input features, batch 32, hidden 64 / 128 / 200); float32 and
float16 storage. Each row: median seconds of one forward + backward, GFLOP/s of the matrix
products (2 T N (F + H) 4H per direction forward, twice that backward), torch's time and the
speed ratio (torch seconds / ours; target >= 0.7, reported, not asserted).

Two timings of ours on cuda:
  eager  -- the functional calls as written: every step is a gemm launch plus a cell launch from
            Python, so for short per-step GPU work the host's launch rate bounds it;
  graph  -- the same calls captured once with dev.capture() (a CUDA graph) and replayed: the GPU
            time of our kernels without the Python launch overhead. Capture happens after a
            warm-up call with the same shapes, so the memory pool and rnn/gemm scratch are sized.

    PYTHONPATH=. python benchmarks/bench_rnn.py [--backend cpu|cuda] [--quick]

--quick runs small shapes (cpu too); on cpu the peer is torch's CPU LSTM when torch imports.
`err`: max|ours - ref| / max|ref| against torch's LSTM in float64 on the same device (the output
and every gradient; the largest is shown, `err_of` names it); float32 rows are marked against the
fp32 accuracy budget (docs/accuracy.md: 1e-4).
"""
from __future__ import annotations

import os
import sys
from typing import Any, Callable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import pymetalnn as pm  # noqa: E402
from pymetalnn import accuracy  # noqa: E402
from pymetalnn import functional as F  # noqa: E402

COLUMNS = ["bench", "dtype", "T", "N", "F", "H", "mode", "seconds", "spread", "GFLOP/s", "peer",
           "peer_seconds", "speed_vs_peer", "target", "max_err_vs_peer", "err", "err_of", "budget"]


def _timeit(dev: pm.Device, fn: Callable[[], Any], quick: bool) -> tuple[float, float]:
    if dev.name == "cuda":
        return common.time_cuda(fn, warmup=2, reps=5 if quick else 15)
    return common.time_host(fn, dev.synchronize, warmup=1, reps=3 if quick else 5)


def _torch(dev: pm.Device) -> Any:
    try:
        import torch
    except ImportError:
        return None
    if dev.name == "cuda" and not torch.cuda.is_available():
        return None
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return torch


def errors64(dev: pm.Device, torch: Any, m: Any, x_np: np.ndarray, g_np: np.ndarray,
             ours: tuple) -> dict[str, float]:
    """Errors of our (output, grad_input, grad weights) against torch's LSTM in float64 on the
    same device (the cpu if that fails there)."""
    import copy

    y, _hn, _cn, (gx, _states, gw) = ours
    got = {"output": y, "grad_input": gx, **{f"grad {k}": v for k, v in gw.items()}}
    for tdev in dict.fromkeys(("cuda" if dev.name == "cuda" else "cpu", "cpu")):
        try:
            m64 = copy.deepcopy(m).to(device=tdev, dtype=torch.float64)
            xt = torch.tensor(x_np.astype(np.float64), device=tdev, requires_grad=True)
            yy = m64(xt)[0]
            gt = torch.tensor(g_np.astype(np.float64), device=tdev)
            names = [n for n, _ in m64.named_parameters()]
            grads = torch.autograd.grad(yy, [xt, *m64.parameters()], gt)
            break
        except RuntimeError:
            if tdev == "cpu":
                raise
    want = {"output": yy, "grad_input": grads[0],
            **{f"grad {n}": v for n, v in zip(names, grads[1:])}}
    return {k: accuracy.rel_err(got[k].numpy(), want[k].detach().cpu().numpy()) for k in got}


def flops(T: int, N: int, Fin: int, H: int) -> float:
    """Matrix-product flops of one LSTM forward + backward (one layer, one direction)."""
    fwd = 2.0 * T * N * (Fin + H) * 4 * H
    return 3.0 * fwd


def bench_case(dev: pm.Device, name: str, T: int, N: int, Fin: int, H: int, dtype: Any,
               quick: bool) -> list[dict]:
    torch = _torch(dev)
    rng = np.random.default_rng(0)
    if torch is not None:
        torch.manual_seed(0)
        m = torch.nn.LSTM(Fin, H)
        weights = F.rnn_weights(m, dev, dtype)
    else:
        m = None
        k = 1.0 / np.sqrt(H)
        shapes = {"weight_ih_l0": (4 * H, Fin), "weight_hh_l0": (4 * H, H),
                  "bias_ih_l0": (4 * H,), "bias_hh_l0": (4 * H,)}
        weights = {n: pm.tensor(rng.uniform(-k, k, s).astype(dtype), dev)
                   for n, s in shapes.items()}
    x_np = rng.standard_normal((T, N, Fin)).astype(dtype)
    g_np = rng.standard_normal((T, N, H)).astype(dtype)
    x, g = pm.tensor(x_np, dev), pm.tensor(g_np, dev)

    def step() -> tuple:
        y, (hn, cn), ws = F.lstm(x, weights)
        grads = F.lstm_backward(g, None, None, ws)
        return y, hn, cn, grads

    ours = step()
    y_ours = ours[0].numpy().astype(np.float32)
    work = flops(T, N, Fin, H)
    base = {"bench": name, "dtype": np.dtype(dtype).name, "T": T, "N": N, "F": Fin, "H": H,
            "target": ">= 0.7 of torch"}
    if torch is not None:
        errs = errors64(dev, torch, m, x_np, g_np, ours)
        base["err_of"] = max(errs, key=errs.get)
        base["err"] = errs[base["err_of"]]
        if np.dtype(dtype) == np.float32:
            base["budget"] = common.budget_mark(base["err"])
    del ours

    peer, peer_sec = "-", None
    if torch is not None:
        tdev = "cuda" if dev.name == "cuda" else "cpu"
        tdt = {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16}[
            np.dtype(dtype)]
        if tdev == "cpu" and tdt == torch.float16:
            tdt = torch.float32  # torch's CPU LSTM in half is not a meaningful peer
        mt = m.to(device=tdev, dtype=tdt)
        xt = torch.tensor(x_np, device=tdev, dtype=tdt, requires_grad=True)
        gt = torch.tensor(g_np, device=tdev, dtype=tdt)
        params = list(mt.parameters())
        with torch.no_grad():
            yt = mt(xt)[0].float().cpu().numpy()
        base["max_err_vs_peer"] = err = float(np.abs(yt - y_ours).max())
        tol = 5e-2 if np.dtype(dtype) == np.float16 else 1e-3
        if not err < tol:
            print(f"WARNING {name} {np.dtype(dtype).name}: output differs from {tdev} torch by "
                  f"{err:.3g} (> {tol})")

        def tstep() -> None:
            yy, _ = mt(xt)
            torch.autograd.grad(yy, [xt, *params], gt)

        if tdev == "cuda":
            peer = "torch cuDNN" if torch.backends.cudnn.enabled else "torch"
            peer_sec, _ = common.time_cuda(tstep, warmup=2, reps=5 if quick else 15)
        else:
            peer = "torch cpu"
            peer_sec, _ = common.time_host(tstep, lambda: None, warmup=1, reps=3 if quick else 5)

    rows = []
    sec, spread = _timeit(dev, step, quick)
    rows.append(dict(base, mode="eager", seconds=sec, spread=spread, **{"GFLOP/s": work / sec / 1e9},
                     peer=peer, peer_seconds=peer_sec,
                     speed_vs_peer=(peer_sec / sec) if peer_sec else None))
    if dev.name == "cuda":
        try:
            step()  # warm-up: the pool and scratch buffers get this call's sizes
            dev.synchronize()
            with dev.capture() as rec:
                keep = step()  # outputs stay referenced while the graph is replayed
            gsec, gspread = _timeit(dev, rec.replay, quick)
            del keep
            rows.append(dict(base, mode="graph", seconds=gsec, spread=gspread,
                             **{"GFLOP/s": work / gsec / 1e9}, peer=peer, peer_seconds=peer_sec,
                             speed_vs_peer=(peer_sec / gsec) if peer_sec else None))
        except Exception as e:  # report, keep the eager rows
            rows.append(dict(base, mode=f"graph failed: {type(e).__name__}: {e}"[:120]))
    return rows


def main() -> int:
    args = common.parser(__doc__).parse_args()
    dev = pm.device(args.backend)
    if args.quick:
        cases = [("lstm", 20, 4, 32, 32), ("activity", 20, 8, 16, 24)]
    else:
        cases = [("lstm-512", 300, 64, 512, 512)] + \
            [(f"activity-h{h}", 20, 32, 64, h) for h in (64, 128, 200)]
    rows: list[dict] = []
    for name, T, N, Fin, H in cases:
        for dtype in (np.float32, np.float16):
            rows.extend(bench_case(dev, name, T, N, Fin, H, dtype, args.quick))
    common.report(rows, COLUMNS, f"rnn_{dev.name}" + ("_quick" if args.quick else ""),
                  f"# rnn on {common.device_label(dev)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
