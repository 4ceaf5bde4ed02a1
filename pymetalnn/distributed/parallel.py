"""DataParallel (a training graph's weight gradients averaged over the ranks at every step) and
DistributedSampler (each rank's share of a data set).

Design. DataParallel is a step hook of the training graph (Graph.step_hooks). At the first step
after the graph's steps change it schedules buckets, filled in the order the backward produces
the weight gradients and closed at their size cap, after the last gradient, or when the next step
reads one of theirs; each bucket's collective starts right after the step that produced its last
gradient and finishes right before the first update that reads it. The schedule depends only on
the graph and the tensors' sizes, the same on every rank, so every rank queues the same
collectives in the same order. State (parameters, buffers, optimizer state) travels over the host
communicator; checkpoints are written by rank 0 while the others wait for its verdict.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from ..tensor import Tensor
from .engines import _Bucket
from .group import DistributedError, ProcessGroup, get_rank, get_world_size, init
from .sync_bn import SyncBatchNorm

if TYPE_CHECKING:
    from ..graph.graph import Graph, TrainingGraph
    from ..graph.nodes import Value


class DataParallel:
    """Data-parallel training of `tg` over the ranks of `group` (default: init()).

    At construction, rank `src`'s parameters, buffers and optimizer state are copied to every
    rank (broadcast=False skips it). At every training step (encoded or replayed), the weight
    gradients are averaged over the ranks in buckets: the first of `first_bucket_mb` MiB, the
    others of `bucket_cap_mb`, filled in the order the backward produces them; each bucket's
    collective is queued as soon as its last gradient is, and the step's first update that
    reads it waits for it. Optimizers, grouped updates and captured steps see the averaged
    gradients. Batch norm statistics stay per rank (sync_buffers() averages the running ones),
    or with sync_bn=True are those of all ranks' samples together (SyncBatchNorm; equal
    per-rank batch sizes, checked at every step).
    To resume, load a checkpoint on every rank (tg.load), or on rank 0 and then call
    broadcast_state().
    """

    def __init__(self, tg: TrainingGraph, group: ProcessGroup | None = None, *,
                 bucket_cap_mb: float = 25.0, first_bucket_mb: float = 1.0,
                 broadcast: bool = True, src: int = 0, sync_bn: bool = False):
        if not getattr(tg, "training", False):
            raise ValueError("tg: expected a TrainingGraph (gradients to average)")
        if bucket_cap_mb <= 0 or first_bucket_mb <= 0:
            raise ValueError(f"bucket_cap_mb, first_bucket_mb: expected > 0, got "
                             f"{bucket_cap_mb}, {first_bucket_mb}")
        self.tg = tg
        self.group = group if group is not None else init()
        if tg.device is not self.group.device:
            raise ValueError(f"tg: runs on {tg.device.name}, the group's collectives on "
                             f"{self.group.device.name} (init(device=...))")
        self.cap = int(bucket_cap_mb * 2**20)
        self.first_cap = int(first_bucket_mb * 2**20)
        self._steps: list | None = None  # the g.steps the schedule was made for
        self.buckets: list[tuple[list[Value], _Bucket]] = []
        self.step_hook_calls = 0
        tg.step_hooks.append(self._hook)
        self.sync_bn = bool(sync_bn)
        self._bn_nodes: list = []
        if self.sync_bn:
            from ..graph.nodes import BatchNormalizationNode

            sync = SyncBatchNorm(self.group)
            for n in tg.forward_order:
                base = getattr(n, "base", None)  # a fused node runs its batch norm's code
                for m in (n, base):
                    if isinstance(m, BatchNormalizationNode) and m.sync is None:
                        m.sync = sync
                        self._bn_nodes.append(m)
            tg.note(f"distributed: {len(self._bn_nodes)} batch norms with statistics over "
                    f"all {self.size} ranks")
        if broadcast:
            self.broadcast_state(src)

    def detach(self) -> None:
        """Stop averaging (the graph trains on this rank's gradients alone again)."""
        if self._hook in self.tg.step_hooks:
            self.tg.step_hooks.remove(self._hook)

    @property
    def rank(self) -> int:
        return self.group.rank

    @property
    def size(self) -> int:
        return self.group.size

    # ---- state
    def broadcast_state(self, src: int = 0) -> None:
        """Every rank gets rank src's parameters, buffers, optimizer state and step count."""
        pg, tg = self.group, self.tg
        sd = tg.state_dict()
        meta = [(k, v.shape, v.dtype.str) for k, v in sd.items()]
        theirs = pg.broadcast_object(meta, src)
        if theirs != meta:
            mine, other = {m[0]: m[1:] for m in meta}, {m[0]: m[1:] for m in theirs}
            diff = sorted(set(mine) ^ set(other)) or \
                [k for k in mine if mine[k] != other[k]]
            pg.barrier()
            raise DistributedError(f"broadcast_state: rank {pg.rank}'s graph differs from rank "
                                   f"{src}'s (first differing keys: {', '.join(diff[:4])})")
        out = {}
        for k, _, _ in meta:
            a = np.array(sd[k], copy=True, order="C")  # keeps 0-d arrays 0-d
            out[k] = pg.broadcast_host(a, src)
        if pg.rank != src:
            tg.load_state_dict(out)

    def sync_buffers(self) -> None:
        """Average the batch norms' running statistics over the ranks (before evaluating or
        saving: each rank tracked its own batches)."""
        sd = self.tg.state_dict()
        keys = sorted(k for k in sd if k.endswith((".running_mean", ".running_var")))
        if not keys:
            return
        flat = np.concatenate([sd[k].astype(np.float64).ravel() for k in keys])
        flat = self.group.all_reduce_host(flat, "mean")
        new, o = {}, 0
        for k in keys:
            n = sd[k].size
            new[k] = flat[o:o + n].reshape(sd[k].shape).astype(sd[k].dtype)
            o += n
        self.tg.load_state_dict(new, strict=False)

    def save(self, path: Any, sync_buffers: bool = True) -> None:
        """Rank 0 writes the checkpoint (Graph.save); every rank waits until it is written.
        Running statistics are averaged over the ranks first unless sync_buffers=False."""
        if sync_buffers:
            self.sync_buffers()
        err = None
        if self.rank == 0:
            try:
                self.tg.save(path)
            except Exception as e:  # noqa: BLE001 -- every rank learns that it failed
                err = f"{type(e).__name__}: {e}"
        err = self.group.broadcast_object(err, 0)
        if err is not None:
            raise DistributedError(f"save: rank 0 could not write {path}: {err}")

    def mean_loss(self, value: float) -> float:
        """The mean of a per-rank loss over the ranks (for logging)."""
        return self.group.mean(value)

    # ---- the gradient hook (Graph.step_hooks)
    def _schedule(self, g: Graph) -> None:
        """Weight gradients (the update steps' inputs), the step producing each, and the
        first step reading each."""
        prod: dict[Any, int] = {}
        for i, st in enumerate(g.steps):
            for v in st.outs:
                prod[v] = i
        first_use: dict[Any, int] = {}
        for j, st in enumerate(g.steps):
            if st.kind == "update":
                for v in st.ins:
                    first_use.setdefault(v, j)
        missing = [v for v in first_use if v not in prod]
        if missing:
            raise DistributedError(f"gradients without a producing step: {missing[:3]}")
        self._grads = sorted(first_use, key=lambda v: prod[v])
        self._prod, self._use = prod, first_use
        self._by_step: dict[int, list[Any]] = {}
        for v in self._grads:
            self._by_step.setdefault(prod[v], []).append(v)
        self._last = max(prod[v] for v in self._grads) if self._grads else -1
        self.buckets = []
        self._open: list[Any] = []
        self._starts: dict[int, list[tuple[list[Any], _Bucket]]] = {}
        self._finishes: dict[int, list[_Bucket]] = {}
        self._frozen = False
        self._steps = g.steps
        g.note(f"distributed: {len(self._grads)} weight gradients averaged over {self.size} "
               f"ranks in buckets (first {self.first_cap / 2**20:g} MiB, then "
               f"{self.cap / 2**20:g} MiB)")

    def _hook(self, g: Graph, i: int, env: dict) -> None:
        if g.steps is not self._steps:
            self._schedule(g)
        if i == 0 and self.sync_bn and self._bn_nodes:
            n = g._batch_of(env)
            ns = self.group.comm.allgather(n)
            if len(set(ns)) > 1:
                raise DistributedError(f"sync_bn: ranks' batch sizes differ ({ns}); "
                                       "synchronized batch norm needs equal per-rank batches")
        self.step_hook_calls += i == 0
        if not self._frozen:
            self._grow(g, i, env)
        for vals, b in self._starts.get(i, ()):
            b.start([env[v] for v in vals])
        for b in self._finishes.get(i, ()):
            b.finish()
        if i == len(g.steps) - 1:
            self._frozen = True

    def _grow(self, g: Graph, i: int, env: dict) -> None:
        """First step: buckets fill in the order gradients appear; sizes come from the tensors
        (the same on every rank, so every rank makes the same buckets). A bucket closes at its
        size cap, after the last gradient, or when the next step reads one of its gradients
        (updates not grouped: each follows its gradient, so no later gradient can wait)."""
        for v in self._by_step.get(i, ()):
            t = env.get(v)
            if not isinstance(t, Tensor):
                raise DistributedError(f"weight gradient {v.name}: no tensor at step {i}")
            self._open.append((v, t))
            cap = self.first_cap if not self.buckets else self.cap
            if sum(tt.nbytes for _, tt in self._open) >= cap:
                self._close(i)
        if self._open and (i == self._last or
                           min(self._use[v] for v, _ in self._open) - 1 <= i):
            self._close(i)

    def _close(self, i: int) -> None:
        vals = [v for v, _ in self._open]
        ts = [t for _, t in self._open]
        self._open = []
        for b in _Bucket.split(self.group, ts, "mean", math.inf):
            bv = [vals[k] for k in b.idx]
            b.idx = list(range(len(bv)))
            self.buckets.append((bv, b))
            self._starts.setdefault(i, []).append((bv, b))
            j = min(self._use[v] for v in bv) - 1
            if j < i:
                raise DistributedError(f"bucket read at step {j + 1} before its last gradient "
                                       f"(step {i})")
            self._finishes.setdefault(j, []).append(b)


class DistributedSampler:
    """The indices of this rank's share of a data set of `n` samples (torch's
    DistributedSampler): each epoch a permutation (seed + epoch; the same on every rank) whose
    positions rank, rank + size, ... are this rank's. drop_last: drop the tail that does not
    divide evenly; else pad with the first indices so every rank has as many.

    With per-rank batches of b taken in order from the rank's indices, step k of the ranks
    together sees the samples of step k of one process with batch size*b over the permutation.
    """

    def __init__(self, n: int, num_replicas: int | None = None, rank: int | None = None,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False):
        self.n = int(n)
        self.num_replicas = get_world_size() if num_replicas is None else int(num_replicas)
        self.rank = get_rank() if rank is None else int(rank)
        if self.num_replicas < 1 or not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank: {self.rank} outside [0, {self.num_replicas})")
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch = 0
        if drop_last:
            self.num_samples = self.n // self.num_replicas
        else:
            self.num_samples = -(-self.n // self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def indices(self) -> np.ndarray:
        if self.shuffle:
            idx = np.random.default_rng(self.seed + self.epoch).permutation(self.n)
        else:
            idx = np.arange(self.n)
        if self.drop_last:
            idx = idx[:self.total_size]
        elif self.total_size > self.n:
            idx = np.concatenate([idx, np.resize(idx, self.total_size - self.n)])
        return idx[self.rank:self.total_size:self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return self.num_samples
