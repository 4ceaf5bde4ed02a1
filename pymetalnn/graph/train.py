"""The training loop of MPSNNGraph's demos (WWDC 2018 session 609): epochs of batch iterations
(double buffered: each step is encoded while the device runs the previous one), test-set
accuracy after every epoch with an inference graph sharing the weights, an early stop at a target
accuracy, a plain-text progress bar, and a history that can be plotted.

    hist = fit(tg, (x_train, y_train), epochs=5, batch_size=64,
               test=(x_test, y_test), target_accuracy=0.98)
    hist.plot("loss.png")      # matplotlib, if installed
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, TextIO

import numpy as np

from .graph import Graph, Handle, TrainingGraph

CHECK_EVERY = 8  # steps between loss checks: a read drains the queue, so not after every step


class NonFiniteLossError(FloatingPointError):
    """fit() stopped at a NaN or infinite loss; `step` (counted over all epochs), `epoch`,
    `loss` and the `history` up to that step are attributes."""

    def __init__(self, message: str, step: int, epoch: int, loss: float, history: History):
        super().__init__(message)
        self.step, self.epoch, self.loss, self.history = step, epoch, loss, history


@dataclass
class History:
    """Per-step losses, per-epoch mean loss, test accuracy and wall time."""

    step_loss: list[float] = field(default_factory=list)
    epoch_loss: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    epoch_time: list[float] = field(default_factory=list)
    stopped_early: bool = False

    @property
    def epochs(self) -> int:
        return len(self.epoch_loss)

    def as_dict(self) -> dict[str, list[float]]:
        return {"step_loss": self.step_loss, "epoch_loss": self.epoch_loss,
                "accuracy": self.accuracy, "epoch_time": self.epoch_time}

    def plot(self, path: str | None = None) -> Any:
        """Loss per step and accuracy per epoch (matplotlib; returns None if it is missing)."""
        try:
            import matplotlib

            if path is not None:
                matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
        ax[0].plot(self.step_loss)
        ax[0].set_xlabel("step")
        ax[0].set_ylabel("loss")
        if self.accuracy:
            ax[1].plot(range(1, len(self.accuracy) + 1), self.accuracy, marker="o")
        ax[1].set_xlabel("epoch")
        ax[1].set_ylabel("test accuracy")
        fig.tight_layout()
        if path is not None:
            fig.savefig(path)
            plt.close(fig)
        return fig


def batches(n: int, batch_size: int, rng: np.random.Generator | None, drop_last: bool = True):
    """Index arrays of the batches of one epoch (shuffled when rng is given)."""
    idx = rng.permutation(n) if rng is not None else np.arange(n)
    stop = n - n % batch_size if drop_last else n
    for i in range(0, stop, batch_size):
        yield idx[i:i + batch_size]


def accuracy(g: Graph, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> float:
    """Fraction of samples whose argmax over dim 1 of the graph's output equals the label."""
    correct = 0
    handles: list[tuple[Handle, np.ndarray]] = []
    for i in range(0, len(x), batch_size):
        handles.append((g.encode(x[i:i + batch_size]), y[i:i + batch_size]))
    for h, yy in handles:
        out = h.numpy()[0]
        pred = out.reshape(out.shape[0], out.shape[1], -1).argmax(axis=1).reshape(yy.shape)
        correct += int((pred == yy).sum())
    return correct / max(len(x), 1)


class Progress:
    """A plain-text progress bar: `epoch 2/5 [########------------] 40/100`."""

    def __init__(self, total: int, prefix: str, out: TextIO | None = None, width: int = 24,
                 enabled: bool = True):
        self.total, self.prefix, self.width = total, prefix, width
        self.out = out or sys.stderr
        self.enabled = enabled
        self._last = -1

    def update(self, done: int, extra: str = "") -> None:
        if not self.enabled:
            return
        filled = self.width * done // max(self.total, 1)
        if filled == self._last and done != self.total and not extra:
            return
        self._last = filled
        bar = "#" * filled + "-" * (self.width - filled)
        end = "\n" if done == self.total and extra else ""
        self.out.write(f"\r{self.prefix} [{bar}] {done}/{self.total} {extra}{end}")
        self.out.flush()


def _check_losses(handles: list[Handle], start: int, upto: int, hist: History, ep: int,
                  steps: int, nb: int) -> int:
    """Raise NonFiniteLossError at the first non-finite loss of handles[start:upto]."""
    for j in range(start, upto):
        v = handles[j].loss
        if not np.isfinite(v):
            hist.step_loss += [h.loss for h in handles[:j + 1]]
            raise NonFiniteLossError(
                f"fit: loss {v} at epoch {ep + 1}, step {steps + j + 1} (batch {j + 1} of {nb}); "
                "training stopped, the weights after this step may be non-finite "
                "(nonfinite='ignore' trains on)", steps + j + 1, ep + 1, float(v), hist)
    return upto


def fit(tg: TrainingGraph, train: tuple[np.ndarray, np.ndarray], *, epochs: int = 1,
        batch_size: int = 32, test: tuple[np.ndarray, np.ndarray] | None = None,
        target_accuracy: float | None = None, max_steps: int | None = None, seed: int = 0,
        shuffle: bool = True, progress: bool = True, out: TextIO | None = None,
        inference: Graph | None = None,
        on_epoch: Callable[[int, History], Any] | None = None,
        nonfinite: str = "raise", distributed: Any = None,
        transform: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None
        ) -> History:
    """Train `tg` on (images, labels): `epochs` passes of shuffled batches (the last partial
    batch dropped), at most `max_steps` steps in all; after each epoch, the accuracy of an
    inference graph sharing the weights on `test`, stopping once it reaches `target_accuracy`.

    nonfinite: "raise" (default) stops training at the first NaN or infinite loss and raises
    NonFiniteLossError naming the step (losses are checked every few steps, so at most a few
    more steps were encoded after it; the weights are then suspect); "ignore" trains on.

    distributed: a pymetalnn.distributed.DataParallel wrapping `tg`. Each rank then trains on
    its share of every epoch (DistributedSampler: one permutation per epoch, the same on every
    rank), `batch_size` per rank; the history's losses are the means over the ranks, the test
    accuracy is over the whole test set (each rank scores its share, running statistics
    averaged first), and only rank 0 shows progress.

    transform: data augmentation, `transform(images, rng) -> images` applied to each training
    batch on the host before it is encoded (the images as a (batch, ...) array of the training
    set's dtype; rng a numpy Generator seeded from `seed` and the rank, so runs repeat). The test
    set is never transformed.
    """
    if nonfinite not in ("raise", "ignore"):
        raise ValueError(f"nonfinite: expected 'raise' or 'ignore', got {nonfinite!r}")
    x, y = train
    hist = History()
    rng = np.random.default_rng(seed) if shuffle else None
    aug_rng = np.random.default_rng([seed, 1 + (0 if distributed is None else distributed.rank)])
    inf = inference
    if test is not None and inf is None:
        inf = tg.inference_graph()
    steps = 0
    sampler = None
    if distributed is not None:
        from ..distributed import DistributedSampler

        if distributed.tg is not tg:
            raise ValueError("distributed: a DataParallel of another training graph")
        sampler = DistributedSampler(len(x), distributed.size, distributed.rank,
                                     shuffle=shuffle, seed=seed, drop_last=True)
        progress = progress and distributed.rank == 0
    for ep in range(epochs):
        t0 = time.perf_counter()
        if sampler is not None:
            sampler.set_epoch(ep)
            order = sampler.indices()
            epoch_batches = (order[i:i + batch_size]
                             for i in range(0, len(order) - len(order) % batch_size, batch_size))
        else:
            order = x
            epoch_batches = batches(len(x), batch_size, rng)
        nb = len(order) // batch_size
        if max_steps is not None:
            nb = min(nb, max_steps - steps)
        bar = Progress(nb, f"epoch {ep + 1}/{epochs}", out, enabled=progress)
        handles: list[Handle] = []
        checked = 0
        for i, idx in enumerate(epoch_batches):
            if i >= nb:
                break
            xb = x[idx] if transform is None else transform(x[idx], aug_rng)
            handles.append(tg.encode(xb, y[idx]))
            bar.update(i + 1)
            if nonfinite == "raise" and len(handles) - checked > CHECK_EVERY:
                # all but the newest step (it may still be running)
                checked = _check_losses(handles, checked, len(handles) - 1, hist, ep, steps, nb)
        tg.synchronize()
        if nonfinite == "raise":
            _check_losses(handles, checked, len(handles), hist, ep, steps, nb)
        losses = [h.loss for h in handles]
        if distributed is not None and losses:
            losses = distributed.group.all_reduce_host(np.array(losses), "mean").tolist()
        steps += len(handles)
        hist.step_loss += losses
        hist.epoch_loss.append(float(np.mean(losses)) if losses else float("nan"))
        msg = f"loss {hist.epoch_loss[-1]:.4f}"
        if test is not None and inf is not None:
            if distributed is not None:
                acc = _distributed_accuracy(distributed, inf, test)
            else:
                acc = accuracy(inf, test[0], test[1])
            hist.accuracy.append(acc)
            msg += f" test accuracy {acc:.4f}"
        hist.epoch_time.append(time.perf_counter() - t0)
        bar.update(nb, msg)
        if on_epoch is not None:
            on_epoch(ep, hist)
        if target_accuracy is not None and hist.accuracy and hist.accuracy[-1] >= target_accuracy:
            hist.stopped_early = ep + 1 < epochs
            break
        if max_steps is not None and steps >= max_steps:
            break
    return hist


def _distributed_accuracy(ddp: Any, inf: Graph, test: tuple[np.ndarray, np.ndarray]) -> float:
    """Accuracy over the whole test set: each rank scores positions rank, rank + size, ...
    (after averaging the running statistics, which each rank tracked on its own batches)."""
    ddp.sync_buffers()
    xs, ys = test[0][ddp.rank::ddp.size], test[1][ddp.rank::ddp.size]
    correct = accuracy(inf, xs, ys) * len(xs) if len(xs) else 0.0
    total = ddp.group.all_reduce_host(np.array([correct, len(xs)], np.float64), "sum")
    return float(total[0] / max(total[1], 1))
