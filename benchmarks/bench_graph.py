"""Training-graph benchmark: LeNet-5 on 28x28 inputs, batch 64 (pymetalnn.graph).

Model: conv 6@5x5 (padding 2) relu maxpool2, conv 16@5x5 relu maxpool2, fc 400->120 relu,
fc 120->84 relu, fc 84->10, softmax cross-entropy; SGD (lr 0.01, momentum 0.9). The same
model in PyTorch eager on the same device, with the same weights (the first step's loss is
checked against it): TF32 off (torch_eager), and PyTorch's defaults (torch_default: TF32
convolutions). `--precision mixed`: our graph in mixed precision (float16 math, float32 master
weights, dynamic loss scaling) against PyTorch AMP (torch_amp: autocast float16 + GradScaler,
channels_last, cudnn.benchmark; cuda only) and PyTorch's defaults; speedups are against AMP.

Figures (each the median of `--repeats` runs of `--steps` steps, wall clock from the first
encode to the device finishing the last step, i.e. host overhead included):
  graph_eager      TrainingGraph.encode per step (two steps in flight)
  graph_replay     a captured step (Graph.capture: a CUDA graph on cuda) replayed per step
  torch_eager      forward, backward, optimizer.step per step
  speedup          torch_eager time / graph_replay time (target >= 2 on a GPU)
Peak device memory of a training step: ours = device memory held in steady state by the
captured step (weights, optimizer state, the planned arena, inputs, every workspace the
recording keeps), from CuPy's pool; torch = torch.cuda.max_memory_allocated() over a step
(parameters, gradients, optimizer state, activations). Plus the planner's report (planned arena
vs the naive sum of the intermediate tensors).

    PYTHONPATH=. python benchmarks/bench_graph.py [--backend cuda|cpu] [--quick]
    PYTHONPATH=. python benchmarks/bench_graph.py --backend cuda --precision mixed

--quick: cpu, batch 16, a few steps (a smoke run for CI).
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Any, Callable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import pymetalnn as pm  # noqa: E402
from pymetalnn import graph as G  # noqa: E402
from pymetalnn import optim  # noqa: E402

COLS = ["bench", "backend", "batch", "steps_per_s", "ms_per_step", "spread", "speedup_vs_torch",
        "peak_MiB", "note"]


def lenet5(seed: int = 0) -> tuple[G.ImageNode, G.LossNode]:
    x = G.ImageNode((1, 28, 28), name="x")
    h = G.ReLUNode(G.ConvolutionNode(x, G.ConvolutionDataSource(1, 6, 5, seed=seed), padding=2,
                                     name="conv1"))
    h = G.PoolingMaxNode(h, 2, name="pool1")
    h = G.ReLUNode(G.ConvolutionNode(h, G.ConvolutionDataSource(6, 16, 5, seed=seed + 1),
                                     padding="valid", name="conv2"))
    h = G.FlattenNode(G.PoolingMaxNode(h, 2, name="pool2"))
    h = G.ReLUNode(G.FullyConnectedNode(h, G.FullyConnectedDataSource(400, 120, seed=seed + 2),
                                        name="fc1"))
    h = G.ReLUNode(G.FullyConnectedNode(h, G.FullyConnectedDataSource(120, 84, seed=seed + 3),
                                        name="fc2"))
    logits = G.FullyConnectedNode(h, G.FullyConnectedDataSource(84, 10, seed=seed + 4), name="fc3")
    return x, G.SoftmaxCrossEntropyLossNode(logits, name="loss")


def torch_lenet5(torch: Any) -> Any:
    nn = torch.nn
    net = nn.Module()
    net.conv1 = nn.Conv2d(1, 6, 5, padding=2)
    net.conv2 = nn.Conv2d(6, 16, 5)
    net.fc1, net.fc2, net.fc3 = nn.Linear(400, 120), nn.Linear(120, 84), nn.Linear(84, 10)

    def forward(x: Any) -> Any:
        f = torch.nn.functional
        h = f.max_pool2d(f.relu(net.conv1(x)), 2)
        h = f.max_pool2d(f.relu(net.conv2(h)), 2).flatten(1)
        return net.fc3(f.relu(net.fc2(f.relu(net.fc1(h)))))

    net.forward = forward
    return net


def sgd(params: list) -> optim.SGD:
    return optim.SGD(params, lr=0.01, momentum=0.9)


def rate(run_steps: Callable[[int], Any], sync: Callable[[], Any], steps: int, repeats: int
         ) -> tuple[float, float]:
    """(median seconds per step, spread) of `steps` steps, wall clock."""
    run_steps(2)
    sync()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run_steps(steps)
        sync()
        samples.append((time.perf_counter() - t0) / steps)
    med = statistics.median(samples)
    return med, (max(samples) - min(samples)) / med


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--precision", choices=("float32", "mixed"), default="float32")
    args = ap.parse_args()
    backend = args.backend or ("cpu" if args.quick else None)
    dev = pm.device(backend)
    batch = args.batch or (16 if args.quick else 64)
    steps = args.steps or (3 if args.quick else 200)
    repeats = args.repeats or (2 if args.quick else 5)
    label = common.device_label(dev)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((batch, 1, 28, 28)).astype(np.float32)
    Y = rng.integers(0, 10, batch)
    rows: list[dict] = []

    dev.reset_peak_memory()  # peak of live buffers, as torch.cuda.max_memory_allocated
    base = dev.memory_allocated()
    _, loss = lenet5()
    tg = G.TrainingGraph(loss, optimizer=sgd, device=dev, name="lenet5",
                         precision=args.precision)
    torch = None
    try:
        import torch  # type: ignore[no-redef]
    except ImportError:
        pass
    tdev = "cuda" if dev.name == "cuda" else "cpu"
    net = None
    if torch is not None and (tdev == "cpu" or torch.cuda.is_available()):
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        net = torch_lenet5(torch).to(tdev)
        tg.load_state_dict(G.torch_state_dict(net))  # same starting weights
    xt, yt = tg.bind(X)[0], tg.labels(Y)

    first = tg.encode(xt, yt).loss
    med_e, sp_e = rate(lambda n: [tg.encode(xt, yt) for _ in range(n)], tg.synchronize, steps, repeats)
    cap = tg.capture(xt, yt)
    med_r, sp_r = rate(lambda n: [cap.run() for _ in range(n)], tg.synchronize, steps, repeats)
    # whole run: weights, optimizer state, the unplanned first steps, the arena, the capture
    ours_peak = (dev.max_memory_allocated() - base) / 2**20
    rep = tg.memory_report(batch)

    torch_s = None
    torch_note = "torch unavailable"
    if net is not None:
        from pymetalnn.testing import torch_peer

        tx = torch.from_numpy(X).to(tdev)
        ty = torch.from_numpy(Y).long().to(tdev)
        topt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        # the peer the speedup is against first (its first step's loss is checked), then
        # PyTorch's defaults; amp turns the model channels_last, so it runs last
        modes = ["fp32", "default"] if args.precision == "float32" else ["default", "amp"]
        if tdev != "cuda" and "amp" in modes:
            modes.remove("amp")
        bench = {"fp32": "torch_eager", "default": "torch_default", "amp": "torch_amp"}
        sync = torch.cuda.synchronize if tdev == "cuda" else (lambda: None)
        for mode in modes:
            tstep, _ = torch_peer.train_step(torch, mode, net, net.forward, topt, tx, ty)
            tloss = tstep().item()
            if mode == modes[0]:
                torch_note = f"first-step loss ours {first:.5f} torch {mode} {tloss:.5f}"
            t_s, sp_t = rate(lambda n, f=tstep: [f() for _ in range(n)], sync, steps, repeats)
            if mode == ("fp32" if args.precision == "float32" else "amp") or \
                    (torch_s is None and mode == modes[-1]):
                torch_s = t_s
            t_peak = None
            if tdev == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                tstep()
                torch.cuda.synchronize()
                t_peak = torch.cuda.max_memory_allocated() / 2**20
            rows.append({"bench": bench[mode], "backend": f"torch {tdev}", "batch": batch,
                         "steps_per_s": 1 / t_s, "ms_per_step": 1e3 * t_s, "spread": sp_t,
                         "peak_MiB": t_peak, "note": f"{mode} eager"})
    rows.insert(0, {"bench": "graph_eager", "backend": label, "batch": batch,
                    "steps_per_s": 1 / med_e, "ms_per_step": 1e3 * med_e, "spread": sp_e,
                    "speedup_vs_torch": torch_s / med_e if torch_s else None,
                    "note": f"encode, 2 in flight, {args.precision}"})
    rows.insert(1, {"bench": "graph_replay", "backend": label, "batch": batch,
                    "steps_per_s": 1 / med_r, "ms_per_step": 1e3 * med_r, "spread": sp_r,
                    "speedup_vs_torch": torch_s / med_r if torch_s else None,
                    "peak_MiB": ours_peak,
                    "note": f"{len(cap)} launches per step, {args.precision}"})
    rows.append({"bench": "memory_plan", "backend": label, "batch": batch,
                 "peak_MiB": rep.planned / 2**20 if rep else None,
                 "note": str(rep) if rep else "no plan"})
    common.report(rows, COLS, f"graph_{dev.name}" + ("_mixed" if args.precision == "mixed"
                                                      else ""))
    print(f"\ndevice: {label}; {torch_note}")
    for line in tg.log:
        print("graph:", line)


if __name__ == "__main__":
    main()
