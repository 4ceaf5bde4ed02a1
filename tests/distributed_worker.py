"""Run under `mpiexec -n N` by test_distributed.py (not collected by pytest).

Every case trains a small LeNet-style network (conv, optional batch norm, relu, pool, conv,
fc, fc, softmax cross-entropy; no dropout) on N ranks, rank r taking rows [r*B/N, (r+1)*B/N)
of each global batch of B, and compares the weights after a few steps with PyTorch (float64)
training one model on the whole batch, batch norm applied to each rank's rows on their own
(what per-rank statistics compute). Rank 1 starts from different weights: the broadcast from
rank 0 must undo that. Rank 0 prints one line `RESULT <json>`.

    mpiexec -n 2 python tests/distributed_worker.py            # the comparison cases
    mpiexec -n 2 python tests/distributed_worker.py --fail N   # rank 1 raises before step N
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from graph_nets import lenet, torch_lenet  # noqa: E402

from pymetalnn import distributed, optim  # noqa: E402
from pymetalnn import graph as G  # noqa: E402

B, STEPS, HW, CLASSES = 8, 4, 12, 10


def tiny(hw: int = 4):
    """conv 3x3 same, batch norm over 4x4 planes, relu, fc, batch norm over features, relu,
    fc: both batch norms in the kernels' column mode (fewer than 32 positions per plane)."""
    x = G.ImageNode((1, hw, hw), name="x")
    h = G.ConvolutionNode(x, G.ConvolutionDataSource(1, 4, 3, seed=1), padding="same",
                          name="conv1")
    h = G.ReLUNode(G.BatchNormalizationNode(h, G.NormalizationDataSource(
        4, gamma=np.linspace(0.5, 1.5, 4), beta=np.linspace(-0.2, 0.2, 4)), name="bn1"))
    h = G.FlattenNode(h, name="flatten")
    h = G.FullyConnectedNode(h, G.FullyConnectedDataSource(4 * hw * hw, 16, seed=3), name="fc1")
    h = G.ReLUNode(G.BatchNormalizationNode(h, G.NormalizationDataSource(16), name="bn2"))
    logits = G.FullyConnectedNode(h, G.FullyConnectedDataSource(16, CLASSES, seed=4), name="fc2")
    return x, G.SoftmaxCrossEntropyLossNode(logits, name="loss")


def torch_tiny(torch, sd: dict, hw: int = 4):
    nn = torch.nn
    net = nn.Sequential()
    net.add_module("conv1", nn.Conv2d(1, 4, 3, padding=1))
    net.add_module("bn1", nn.BatchNorm2d(4))
    net.add_module("r1", nn.ReLU())
    net.add_module("flat", nn.Flatten())
    net.add_module("fc1", nn.Linear(4 * hw * hw, 16))
    net.add_module("bn2", nn.BatchNorm1d(16))
    net.add_module("r2", nn.ReLU())
    net.add_module("fc2", nn.Linear(16, CLASSES))
    net = net.double()
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(torch.from_numpy(sd[name].astype(np.float64)))
    return net


def torch_net(torch, sd: dict, bn: bool, fc_in: int):
    net = torch_lenet(torch, bn, fc_in, CLASSES)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(torch.from_numpy(sd[name].astype(np.float64)))
    return net


def reference(case: dict, sd0: dict, data: list, size: int, fc_in: int) -> dict:
    """Weights after STEPS steps of one PyTorch model on the whole batches (float64); batch
    norm over each rank's rows separately; the loss: the mean of the per-rank mean losses."""
    import torch

    net = torch_tiny(torch, sd0) if case.get("net") == "tiny" else \
        torch_net(torch, sd0, case["bn"], fc_in)
    if case["opt"] == "sgd":
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    else:
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    parts = 1 if case.get("sync") else size  # synchronized statistics: one batch norm batch
    h = B // parts
    for X, Y in data:
        opt.zero_grad()
        losses = []
        for r in range(parts):
            out = net(torch.from_numpy(X[r * h:(r + 1) * h]).double())
            losses.append(torch.nn.functional.cross_entropy(out, torch.from_numpy(Y[r * h:(r + 1) * h])))
        (sum(losses) / parts).backward()
        opt.step()
    out = {k: v.detach().numpy() for k, v in net.named_parameters()}
    if case.get("sync"):
        for name, m in net.named_modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                out[f"{name}.running_mean"] = m.running_mean.numpy()
                out[f"{name}.running_var"] = m.running_var.numpy()
    return out


def run_case(case: dict, pg: distributed.ProcessGroup) -> dict:
    if case.get("net") == "tiny":
        x, loss = tiny()
    else:
        x, loss, ds = lenet(bn=case["bn"], record=False, dropout=False, hw=HW, classes=CLASSES)
    if case["opt"] == "sgd":
        def make(p):
            return optim.SGD(p, lr=0.05, momentum=0.9)
    else:
        def make(p):
            return optim.Adam(p, lr=1e-2)
    tg = G.TrainingGraph(loss, optimizer=make, device=pg.device,
                         optimize={"group_updates": case.get("group", True)})
    sd0 = {k: v.copy() for k, v in tg.state_dict().items()}
    if pg.rank != 0:  # the broadcast must undo this
        tg.load_state_dict({k: v * 1.5 + 0.1 for k, v in sd0.items()
                            if k.endswith(("weight", "bias"))}, strict=False)
    ddp = distributed.DataParallel(tg, pg, bucket_cap_mb=case.get("cap_mb", 25.0),
                                   first_bucket_mb=case.get("cap_mb", 1.0),
                                   sync_bn=case.get("sync", False))
    rng = np.random.default_rng(42)
    data = [(rng.standard_normal((B, 1, HW, HW)).astype(np.float32),
             rng.integers(0, CLASSES, B)) for _ in range(STEPS)]
    h = B // pg.size
    if case.get("net") == "tiny":
        data = [(np.ascontiguousarray(X[:, :, :4, :4]), Y) for X, Y in data]
    mine = [(X[pg.rank * h:(pg.rank + 1) * h], Y[pg.rank * h:(pg.rank + 1) * h]) for X, Y in data]
    handles = []
    used = list(range(STEPS))  # the global batches trained on, in order
    if case.get("capture"):
        # two eager steps, then a captured step replayed with new data (capturing runs normal
        # steps on its inputs until the memory plan exists: they train too)
        for X, Y in mine[:2]:
            handles.append(tg.encode(X, Y))
        cs = tg.capture(mine[2][0], mine[2][1])
        used = [0, 1] + [2] * (tg.step_count - 2) + list(range(2, STEPS))
        for X, Y in mine[2:]:
            handles.append(cs.run(X, Y))
    else:
        for X, Y in mine:
            handles.append(tg.encode(X, Y))
    tg.synchronize()
    steps = tg.step_count
    got = {k: v for k, v in tg.state_dict().items()
           if k.endswith(("weight", "bias", "running_mean", "running_var"))}
    # every rank holds the same weights, bit for bit
    # (per-rank batch norm statistics: the running estimates differ between ranks)
    same = [k for k in sorted(got) if case.get("sync") or k.endswith(("weight", "bias"))]
    flat = np.concatenate([got[k].ravel() for k in same]).astype(np.float64)
    spread = float(np.abs(pg.all_reduce_host(flat, "max") - pg.all_reduce_host(flat, "min")).max())
    out = {"spread": spread, "steps": int(steps), "buckets": len(ddp.buckets),
           "losses": float(np.mean([hh.loss for hh in handles]))}
    if pg.rank == 0:
        fc_in = sd0["fc1.weight"].shape[1]
        ref = reference(case, sd0, [data[i] for i in used], pg.size, fc_in)
        err, worst = 0.0, ""
        for k, r in ref.items():
            pre_bn = ("conv1.bias", "fc1.bias") if case.get("net") == "tiny" else ("conv1.bias",)
            if case["bn"] and (k in pre_bn or
                               (k.endswith("running_mean") and case["opt"] == "adam")):
                # a bias before batch norm has a zero gradient up to rounding, which Adam's
                # normalized step turns into updates of the size of lr: not comparable (nor
                # the running mean, which that bias shifts)
                continue
            a = got[k].astype(np.float64)
            e = float(np.abs(a - r).max() / max(np.abs(r).max(), 1e-3))
            if e >= err:
                err, worst = e, k
        out["err"] = err
        out["worst"] = worst
        out["moved"] = float(max(np.abs(ref[k] - sd0[k]).max() for k in ref))
    return out


def injector(ddp: distributed.DataParallel, at: int):
    """A step hook that queues, at step `at`, a failing job writing the first weight gradient
    (as a failed kernel would): the rank's gradients are then poisoned."""
    def hook(g, i, env):
        if g.step_count != at or i not in getattr(ddp, "_by_step", {}):
            return
        t = env[ddp._by_step[i][0]]
        dev = t.device

        def boom():
            raise RuntimeError("injected kernel failure")

        dev._put((boom, [dev._addr(t.buffer) + t.buffer.offset, t.nbytes], "injected", (True,)))
    return hook


def fit_case(pg: distributed.ProcessGroup) -> dict:
    """G.fit(distributed=...) on every rank (per-rank batch 4, two epochs over 24 samples,
    DistributedSampler shares) against one process encoding the union of the ranks' batches of
    each step, as fit's sampler lays them out: weights, logged losses, test accuracy."""
    rng = np.random.default_rng(3)
    n, b = 24, 4
    X = rng.standard_normal((n, 1, HW, HW)).astype(np.float32)
    Y = rng.integers(0, CLASSES, n)
    Xt, Yt = rng.standard_normal((10, 1, HW, HW)).astype(np.float32), rng.integers(0, CLASSES, 10)

    def graph(dev):
        x, loss, ds = lenet(bn=False, record=False, dropout=False, hw=HW, classes=CLASSES)
        return G.TrainingGraph(loss, optimizer=lambda p: optim.SGD(p, lr=0.05, momentum=0.9),
                               device=dev)

    tg = graph(pg.device)
    ddp = distributed.DataParallel(tg, pg)
    hist = G.fit(tg, (X, Y), epochs=2, batch_size=b, test=(Xt, Yt), progress=False, seed=7,
                 distributed=ddp)
    got = {k: v for k, v in tg.state_dict().items() if k.endswith(("weight", "bias"))}
    out = {"steps": len(hist.step_loss), "accuracy": hist.accuracy}
    if pg.rank == 0:
        ref = graph(pg.device)
        losses = []
        for ep in range(2):
            shares = [distributed.DistributedSampler(n, pg.size, r, seed=7, drop_last=True)
                      for r in range(pg.size)]
            idx = []
            for sh in shares:
                sh.set_epoch(ep)
                idx.append(sh.indices())
            for k in range(len(idx[0]) // b):
                sel = np.concatenate([i[k * b:(k + 1) * b] for i in idx])
                losses.append(ref.encode(X[sel], Y[sel]).loss)
        ref.synchronize()
        want = {k: v for k, v in ref.state_dict().items() if k.endswith(("weight", "bias"))}
        out["err"] = max(float(np.abs(got[k] - want[k]).max() / max(np.abs(want[k]).max(), 1e-3))
                         for k in want)
        out["loss_err"] = float(np.abs(np.array(hist.step_loss) - np.array(losses)).max())
        pred = np.concatenate([o.argmax(1) for o in [ref.inference_graph()(Xt)]])
        out["ref_accuracy"] = float((pred == Yt).mean())
    return out


CASES = {
    "sgd": {"opt": "sgd", "bn": False},
    "adam": {"opt": "adam", "bn": False},
    "sgd-bn": {"opt": "sgd", "bn": True},
    "adam-bn": {"opt": "adam", "bn": True},
    # one tensor per bucket (tiny cap), updates not grouped
    "sgd-small-buckets": {"opt": "sgd", "bn": True, "cap_mb": 1e-6, "group": False},
    # updates not grouped: each follows its gradient, so buckets close before it
    "adam-ungrouped": {"opt": "adam", "bn": False, "group": False},
    "sgd-capture": {"opt": "sgd", "bn": True, "capture": True},
    # batch norm statistics over both ranks: the reference normalizes the whole batch
    "sgd-syncbn": {"opt": "sgd", "bn": True, "sync": True},
    "adam-syncbn": {"opt": "adam", "bn": True, "sync": True},
    "sgd-syncbn-capture": {"opt": "sgd", "bn": True, "sync": True, "capture": True},
    # batch norms in column mode (4x4 planes, features), per-rank and synchronized
    "sgd-bn-columns": {"opt": "sgd", "bn": True, "net": "tiny"},
    "sgd-syncbn-columns": {"opt": "sgd", "bn": True, "net": "tiny", "sync": True},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--fail", type=int, default=None,
                    help="rank 1 raises before this step (the others must end too)")
    ap.add_argument("--fail-async", type=int, default=None,
                    help="on rank 1, queued work that writes a weight gradient fails in this "
                         "step (cpu)")
    ap.add_argument("--stop", type=int, default=None,
                    help="rank 1 stops (stuck, no error) before this step; collectives time out")
    ap.add_argument("--timeout", type=float, default=600.0)
    args = ap.parse_args()
    pg = distributed.init(timeout=args.timeout)
    if args.fail is not None or args.fail_async is not None or args.stop is not None:
        x, loss, ds = lenet(bn=False, record=False, dropout=False, hw=HW, classes=CLASSES)
        tg = G.TrainingGraph(loss, optimizer=lambda p: optim.SGD(p, lr=0.05), device=pg.device)
        ddp = distributed.DataParallel(tg, pg)
        if args.fail_async is not None and pg.rank == 1:
            tg.step_hooks.insert(0, injector(ddp, args.fail_async))
        rng = np.random.default_rng(0)
        X, Y = rng.standard_normal((4, 1, HW, HW)).astype(np.float32), rng.integers(0, 10, 4)
        for step in range(100):
            if pg.rank == 1 and step == args.fail:
                raise RuntimeError(f"injected failure on rank 1 at step {step}")
            if pg.rank == 1 and step == args.stop:
                time.sleep(300)  # stuck: no more steps, no error
            tg.encode(X, Y).loss  # noqa: B018 -- waits for the step
        return
    results = {name: fit_case(pg) if name == "fit" else run_case(CASES[name], pg)
               for name in args.cases.split(",")}
    if pg.rank == 0:
        print("RESULT " + json.dumps({"size": pg.size, "cases": results}), flush=True)


if __name__ == "__main__":
    main()
