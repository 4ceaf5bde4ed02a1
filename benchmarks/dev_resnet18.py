"""ResNet-18 training step (64x64 inputs, batch 2, 10 classes, SGD) on pymetalnn and on PyTorch
eager on the same device, same run.

The model is torchvision's ResNet-18 (architecture and initialisation) as
pymetalnn.testing.torch_models writes it out (torchvision is not a dependency): conv 7x7/2 + BN +
ReLU + max pool 3/2, four stages of two basic blocks (64, 128, 256, 512 channels, strided 1x1
shortcuts), global average pool, linear. pymetalnn runs it converted with
graph.from_torch (cross entropy, SGD lr 0.01); the first step's loss is checked against torch's.
Each figure is the median over `--reps` steps of the wall clock from encode to the step's losses
being readable (host overhead included); torch: forward, backward, optimizer.step. The process
CPU time of the same steps is printed too (steadier than wall time on a shared machine).

    PYTHONPATH=. python benchmarks/dev_resnet18.py [--backend cpu|cuda] [--batch 2] [--size 64]
                                                   [--reps 5] [--threads N]

--threads: torch's intra-op threads on cpu (default: the machine's cores, as the cpu backend's
worker pool uses).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

import pymetalnn as pm  # noqa: E402
from pymetalnn import graph as G  # noqa: E402
from pymetalnn import optim  # noqa: E402
from pymetalnn.testing.torch_models import resnet18  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default=None)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    import torch

    dev = pm.device(args.backend)
    if dev.name == "cpu":
        torch.set_num_threads(args.threads or os.cpu_count() or 1)
    tdev = "cuda" if dev.name == "cuda" else "cpu"
    torch.manual_seed(0)
    net = resnet18(10)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((args.batch, 3, args.size, args.size)).astype(np.float32)
    Y = rng.integers(0, 10, args.batch).astype(np.int32)
    tg = G.from_torch(net, X, loss="cross_entropy", optimizer=lambda p: optim.SGD(p, lr=0.01), device=dev)
    tnet = net.to(tdev)
    topt = torch.optim.SGD(tnet.parameters(), lr=0.01)
    tx, ty = torch.from_numpy(X).to(tdev), torch.from_numpy(Y).long().to(tdev)

    def torch_step() -> float:
        topt.zero_grad()
        loss = torch.nn.functional.cross_entropy(tnet(tx), ty)
        loss.backward()
        topt.step()
        return float(loss.detach())

    t0 = time.perf_counter()
    ours0 = tg.encode(X, Y).loss
    first = time.perf_counter() - t0
    peer0 = torch_step()
    ok = abs(ours0 - peer0) <= 1e-3 * max(1.0, abs(peer0))
    ours, peer, ours_cpu, peer_cpu = [], [], [], []
    for _ in range(args.reps):  # interleaved: both see the same machine load
        t0, c0 = time.perf_counter(), time.process_time()
        tg.encode(X, Y).wait()
        ours.append(time.perf_counter() - t0)
        ours_cpu.append(time.process_time() - c0)
        t0, c0 = time.perf_counter(), time.process_time()
        torch_step()
        if tdev == "cuda":
            torch.cuda.synchronize()
        peer.append(time.perf_counter() - t0)
        peer_cpu.append(time.process_time() - c0)
    o, p = statistics.median(ours), statistics.median(peer)
    oc, pc = statistics.median(ours_cpu), statistics.median(peer_cpu)
    print(f"resnet18 {args.size}x{args.size} batch {args.batch} on {common.device_label(dev)}: "
          f"first step (compile included) {first:.2f} s; step {o * 1e3:.1f} ms, torch {p * 1e3:.1f} ms "
          f"(torch threads {torch.get_num_threads()}), ours/torch {o / p:.1f}x; process CPU time "
          f"{oc * 1e3:.1f} vs {pc * 1e3:.1f} ms ({oc / pc:.1f}x); "
          f"first loss {ours0:.5f} vs torch {peer0:.5f} ({'ok' if ok else 'MISMATCH'})")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
