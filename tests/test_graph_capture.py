"""Capture and replay (graph/capture.py) and grouped weight updates (graph/updates.py): a
replayed or grouped step computes exactly what encoded steps compute."""
from __future__ import annotations

import functools

import numpy as np
import pytest
from graph_nets import Events, data, dispatches, inception, lenet, sgd, small_net

import pymetalnn
from pymetalnn import graph as G
from pymetalnn import optim


def test_captured_step_replays_like_encode(dev):
    X, Y = data(n=4)
    X2, Y2 = data(n=4, seed=9)
    res = {}
    warm = 0
    for mode in ("replay", "encode"):
        _, loss, _ = lenet(record=False, dropout=False)
        tg = G.TrainingGraph(loss, optimizer=lambda p: optim.SGD(p, lr=0.1, momentum=0.5),
                             device=dev)
        if mode == "replay":
            cap = tg.capture(X, Y)  # runs the step until it is planned, then records one
            warm = tg.step_count
            assert len(cap) > 0 and any(m.startswith("capture:") for m in tg.log)
            before = dispatches(dev)
            hs = [cap.run().wait() for _ in range(3)]
            assert dispatches(dev) - before == 3 * len(cap)
            hs.append(cap.run(X2, Y2).wait())
        else:
            hs = [tg.encode(X, Y).wait() for _ in range(warm + 3)][warm:]
            hs.append(tg.encode(X2, Y2).wait())
        res[mode] = ([h.losses.copy() for h in hs], tg.training_state_dict())
    np.testing.assert_array_equal(res["replay"][0][-1], res["encode"][0][-1])
    for k, v in res["encode"][1].items():
        np.testing.assert_array_equal(v, res["replay"][1][k], err_msg=k)


STEP_DEPENDENT_OPTS = {
    "Adam": lambda p: optim.Adam(p, lr=0.01),
    "AdamW-amsgrad": lambda p: optim.AdamW(p, lr=0.01, weight_decay=0.05, amsgrad=True),
    "RMSProp": lambda p: optim.RMSProp(p, lr=0.01, centered=True, momentum=0.5),
    "SGD-nesterov": lambda p: optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
}


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "per-tensor"])
@pytest.mark.parametrize("opt", list(STEP_DEPENDENT_OPTS))
def test_replay_is_encode_with_dropout_adam_batchnorm(dev, opt, grouped):
    """Replay == encode where the step matters: dropout (a new mask every step), batch norm
    (running statistics) and the optimizers' step counts (Adam's bias corrections). N replays of
    a captured step leave the losses of every step, the weights, running statistics, optimizer
    state and step counts bit for bit as N encoded steps; replays also draw masks that differ
    from step to step (the same batch gives different losses at the same weights' neighbourhood
    only because the mask moved)."""
    if grouped and not dev.supports_views:
        pytest.skip("backend binds whole buffers only")
    X, Y = data(n=4)
    res, warm = {}, 0
    for mode in ("replay", "encode"):
        _, loss, _ = lenet(record=False, dropout=True, bn=True)
        tg = G.TrainingGraph(loss, optimizer=STEP_DEPENDENT_OPTS[opt], device=dev,
                             optimize={"group_updates": grouped})
        if mode == "replay":
            cap = tg.capture(X, Y)
            warm = tg.step_count
            # the outputs are the recording's buffers: read each step's losses before the next
            losses = [cap.run().wait().losses.copy() for _ in range(5)]
        else:
            losses = [tg.encode(X, Y).wait().losses.copy() for _ in range(warm + 5)][warm:]
        res[mode] = (losses, tg.training_state_dict())
    for a, b in zip(res["replay"][0], res["encode"][0]):
        np.testing.assert_array_equal(a, b)
    assert set(res["replay"][1]) == set(res["encode"][1])
    for k, v in res["encode"][1].items():
        np.testing.assert_array_equal(v, res["replay"][1][k], err_msg=k)
    steps = [v for k, v in res["replay"][1].items() if k.endswith(".step")]
    assert steps and all(int(s) == warm + 5 for s in steps)


def test_dropout_mask_of_a_replay_is_the_step_mask(dev):
    """The mask a replayed step draws is F.dropout's mask at offset = the step number (what the
    encoded step of that number draws), read back through an extra result."""
    x = G.ImageNode((64,), name="x")
    ds = G.FullyConnectedDataSource(64, 64, seed=1, init="glorot")
    h = G.FullyConnectedNode(x, ds, name="fc")
    d = G.DropoutNode(h, 0.5, seed=11, name="drop")
    loss = G.MeanSquaredErrorLossNode(d, name="loss")
    tg = G.TrainingGraph(loss, optimizer=lambda p: optim.SGD(p, lr=0.0), device=dev,
                         extra_results=[h, d])
    X = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    T = np.zeros((2, 64), np.float32)
    cap = tg.capture(X, T)
    for _ in range(3):
        step = tg.step_count
        hv, dv = [t.numpy().copy() for t in cap.run().wait().outputs[1:]]
        ref = pymetalnn.functional.dropout(pymetalnn.tensor(hv, dev), 0.5, 11, step).numpy()
        np.testing.assert_array_equal(dv, ref)


# ---- grouped weight updates (optimize={"group_updates": ...}) --------------------------------

def update_launches(dev):
    return {k: v for k, v in dev.dispatch_counts.items() if "_step_" in k}


@pytest.mark.parametrize("net,opt", [
    ("lenet", lambda p: optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-3)),
    ("lenet", lambda p: optim.Adam(p, lr=0.01, amsgrad=True)),
    ("inception", lambda p: optim.RMSProp(p, lr=0.01, centered=True, momentum=0.5)),
])
def test_grouped_updates_bit_identical(dev, net, opt):
    """Grouping the data sources' updates into one multi-tensor launch per planned step leaves
    losses, weights and optimizer state bit for bit as one update per data source after its
    gradient does."""
    if not dev.supports_views:
        pytest.skip("backend binds whole buffers only")
    X, Y = data(n=4) if net == "lenet" else \
        (np.random.default_rng(1).standard_normal((2, 4, 6, 6)).astype(np.float32), [0, 2])
    res, launches = {}, {}
    for grouped in (True, False):
        loss = lenet(record=False)[1] if net == "lenet" else inception(dev)[1]
        tg = G.TrainingGraph(loss, optimizer=opt, device=dev,
                             optimize={"group_updates": grouped})
        hs, launches[grouped] = [], []
        for _ in range(5):
            dev.synchronize()
            dev.reset_counts()
            hs.append(tg.encode(X, Y).wait())
            launches[grouped].append(update_launches(dev))
        res[grouped] = ([h.losses.copy() for h in hs], tg.training_state_dict())
        if grouped:
            assert any(m.startswith("updates:") and "updated together" in m for m in tg.log)
    ntensors = sum(launches[False][-1].values())
    kernel = opt([pymetalnn.zeros((1,), device=dev)]).KERNEL
    # the first two steps of a batch size are unplanned: gradients in buffers of their own
    assert launches[True][0] == launches[True][1] == {f"{kernel}_float": ntensors}
    assert all(c == {f"{kernel}_multi_float": 1} for c in launches[True][2:]), launches[True]
    assert all(c == {f"{kernel}_float": ntensors} for c in launches[False]), launches[False]
    for a, b in zip(res[True][0], res[False][0]):
        np.testing.assert_array_equal(a, b)
    assert set(res[True][1]) == set(res[False][1])
    for k, v in res[True][1].items():
        np.testing.assert_array_equal(v, res[False][1][k], err_msg=k)


def test_grouped_updates_purge_save_load_low_memory_capture(dev, tmp_path):
    """Grouped weights survive a purge (reloaded into the flat buffer), save / load round-trip
    (optimizer state included), a captured step replays the one launch, and low-memory mode
    (not grouped) trains to the same weights, bit for bit."""
    if not dev.supports_views:
        pytest.skip("backend binds whole buffers only")
    X, Y = data(n=4)

    def make(**kw):
        _, loss, _ = lenet(record=False, dropout=False)
        return G.TrainingGraph(loss, optimizer=lambda p: optim.SGD(p, lr=0.1, momentum=0.9),
                               device=dev, **kw)

    a, b = make(), make(optimize={"group_updates": False})
    low = make(low_memory=True)
    for step in range(4):
        for tg in (a, b, low):
            tg.encode(X, Y)
        if step == 1:
            a.purge()
    assert any("not grouped in low-memory mode" in m for m in low.log)
    path = tmp_path / "grouped.npz"
    a.save(path)
    c = make()
    c.encode(X, Y)  # groups and places its weights, then loads over them
    c.load(path)
    sa, sb, sl, sc = a.state_dict(), b.state_dict(), low.state_dict(), c.state_dict()
    for k in sb:
        np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)
        np.testing.assert_array_equal(sa[k], sc[k], err_msg=k)
        if ".optim." not in k:
            np.testing.assert_array_equal(sl[k], sb[k], err_msg=k)
    cap = c.capture(X, Y)
    assert cap.recording.names.count("sgd_step_multi_float") == 1
    assert "sgd_step_float" not in cap.recording.names
    hc = [cap.run().wait() for _ in range(2)]
    hb = [b.encode(X, Y).wait() for _ in range(c.step_count - b.step_count)]
    np.testing.assert_array_equal(hc[-1].losses, hb[-1].losses)
    sb, sc = b.state_dict(), c.state_dict()
    for k in sb:
        np.testing.assert_array_equal(sc[k], sb[k], err_msg=k)


def test_grouped_updates_leave_custom_data_sources_alone(dev):
    """Data sources that override the protocol (here update(), to record gradients) keep their
    own update step; the others are grouped."""
    ev = Events()
    loss, conv, fc = small_net(ev)
    tg = G.TrainingGraph(loss, optimizer=sgd(0.1), device=dev)
    X, T = np.ones((2, 1, 4, 4), np.float32), np.ones((2, 3))
    tg.encode(X, T).wait()
    assert ev.log == [("conv", "load"), ("fc", "load"), ("fc", "update"), ("conv", "update")]
    if dev.supports_views:
        assert any("overrides load, purge, update" in m for m in tg.log)
    else:  # whole buffers only: no update is grouped
        assert any("not grouped (needs buffer views" in m for m in tg.log)


@pytest.mark.parametrize("mode", ["encode", "replay"])
def test_bad_device_labels_fail_the_step(dev, mode):
    """Class labels given as a device Tensor are range-checked by the loss's kernels (no
    read-back before the step): a bad one fails its step -- an encoded step or a replay of a
    captured step whose label buffer was overwritten on the device -- at the handle's wait,
    naming the label; as after any failed training step, the graph takes no further step until
    its weights are loaded again, and then trains exactly as a graph that never saw the bad
    labels."""
    from pymetalnn.runtime.errors import AsyncError

    X, Y = data(n=4)
    Y = Y.astype(np.int32)
    bad = Y.copy()
    bad[2] = 10  # 10 classes: one past the last
    res = {}
    for run in ("bad", "clean"):
        _, loss, _ = lenet(record=False, dropout=False)
        tg = G.TrainingGraph(loss, optimizer=sgd(0.1), device=dev)
        labels = pymetalnn.tensor(Y, dev)
        if mode == "replay":
            step = tg.capture(X, labels).run
        else:
            tg.encode(X, labels).wait()
            step = functools.partial(tg.encode, X, labels)
        sd = tg.training_state_dict()
        if run == "bad":
            labels.buffer.write(bad)
            with pytest.raises(AsyncError, match=r"target: label 10 out of range \[0, 10\)"):
                step().wait()
            with pytest.raises(AsyncError, match="load a checkpoint"):
                step()
            tg.load_state_dict(sd)
            labels.buffer.write(Y)
        res[run] = [step().wait().losses.copy() for _ in range(2)], tg.training_state_dict()
    for a, b in zip(res["bad"][0], res["clean"][0]):
        np.testing.assert_array_equal(a, b)
    for k, v in res["clean"][1].items():
        np.testing.assert_array_equal(res["bad"][1][k], v, err_msg=k)
