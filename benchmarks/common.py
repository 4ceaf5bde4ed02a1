"""Shared timing helpers for the benchmarks: warm up, repeat, report median and spread.

GPU work is timed with device events around the region (cuda) so host overhead does not count;
cpu work with perf_counter around a synchronize. Every figure is printed with the backend and
device that produced it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any, Callable

import numpy as np

import pymetalnn


def median_spread(samples: list[float]) -> tuple[float, float]:
    med = statistics.median(samples)
    spread = (max(samples) - min(samples)) / med if med > 0 else 0.0
    return med, spread


def time_host(fn: Callable[[], Any], sync: Callable[[], Any], warmup: int = 2, reps: int = 5
              ) -> tuple[float, float]:
    """Median seconds of fn() followed by sync(), and relative spread."""
    for _ in range(warmup):
        fn()
        sync()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - t0)
    return median_spread(samples)


def time_cuda(fn: Callable[[], Any], warmup: int = 3, reps: int = 20, batch: int | None = None,
              stream: Any = None) -> tuple[float, float]:
    """Median seconds of fn() between CUDA events on `stream` (default: the current stream).

    One call per sample by default, the GPU idle before it: the host's launch latency is inside
    the figure. batch=k (default PYMETALNN_BENCH_BATCH, else 1) times k calls back to back per
    sample and divides by k: the device's throughput, the host's cost hidden behind the previous
    call's kernels unless it exceeds them (then the figure is the host's time per call:
    launch-bound)."""
    import cupy as cp

    batch = batch or max(1, int(os.environ.get("PYMETALNN_BENCH_BATCH", "1")))
    for _ in range(warmup):
        fn()
    cp.cuda.runtime.deviceSynchronize()
    samples = []
    for _ in range(reps):
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record(stream)
        for _ in range(batch):
            fn()
        end.record(stream)
        end.synchronize()
        samples.append(cp.cuda.get_elapsed_time(start, end) / 1e3 / batch)
    return median_spread(samples)


def time_on(dev: pymetalnn.Device, fn: Callable[[], Any], quick: bool = False) -> tuple[float, float]:
    """Median seconds and spread of fn() on `dev`: CUDA events on cuda, host clock + synchronize
    elsewhere."""
    if dev.name == "cuda":
        return time_cuda(fn, warmup=3, reps=5 if quick else 20)
    return time_host(fn, dev.synchronize, warmup=1, reps=3 if quick else 5)


def torch_backward_time(dev: pymetalnn.Device, out: Any, inputs: Any, quick: bool = False,
                        grad_out: Any = None) -> float:
    """Median seconds of torch's backward alone: the gradients of `inputs` from one recorded
    forward `out` (graph retained between repetitions). A difference of two separately timed
    medians (fwd+bwd - fwd) can come out at or below zero on a busy machine."""
    import torch

    return time_on(dev, lambda: torch.autograd.grad(out, inputs, grad_out, retain_graph=True),
                   quick)[0]


def time_captured(dev: pymetalnn.Device, fn: Callable[[], Any], reps: int, batch: int
                  ) -> tuple[float, float]:
    """(seconds per call of fn's launches captured once (Device.capture, a CUDA graph) and
    replayed, seconds per call of fn itself), each `batch` calls back to back per sample: the
    kernels' device time without and with the Python wrapper's cost. Where the capture fails,
    both are the eager time; off cuda, both are the host time of fn + synchronize."""
    if dev.name != "cuda":
        sec, _ = time_host(fn, dev.synchronize, warmup=1, reps=reps)
        return sec, sec
    stream = getattr(dev, "cp_stream", None)
    eager = time_cuda(fn, 1, reps, batch, stream)[0]
    fn()
    dev.synchronize()
    try:
        with dev.capture() as rec:
            keep = fn()  # noqa: F841 -- outputs stay referenced while the graph is replayed
        graph = time_cuda(rec.replay, 1, reps, batch, stream)[0]
    except Exception as e:  # report eager only
        print(f"  capture failed ({type(e).__name__}: {str(e)[:80]}); eager time only")
        try:
            dev.synchronize()
        except Exception:
            pass
        graph = eager
    return graph, eager


_COPY_GBS: dict[tuple[str, int, int | None], float] = {}


def copy_gbs(dev: pymetalnn.Device, nbytes: int, batch: int | None = None, reps: int = 20) -> float:
    """The device's reference copy bandwidth for `nbytes` (bytes read + written / s / 1e9),
    measured once per process, size and batch (time_cuda's): CuPy's device-to-device copy on
    cuda, numpy's copy elsewhere. Memory-bound benchmarks report their GB/s as a ratio to this."""
    key = (dev.name, nbytes, batch)
    if key not in _COPY_GBS:
        n = nbytes // 4
        if dev.name == "cuda":
            import cupy as cp

            a = cp.ones(n, cp.float32)
            b = cp.empty_like(a)
            sec, _ = time_cuda(lambda: b.data.copy_from_device(a.data, a.nbytes), reps=reps,
                               batch=batch)
        else:
            a = np.ones(n, np.float32)
            b = np.empty_like(a)
            sec, _ = time_host(lambda: np.copyto(b, a), lambda: None, warmup=1, reps=5)
        _COPY_GBS[key] = 2 * n * 4 / sec / 1e9
    return _COPY_GBS[key]


def torch_available(dev: pymetalnn.Device) -> bool:
    """PyTorch can serve as the peer on this device: cuda (torch on the GPU) or cpu (torch on
    the CPU, same run, same cores)."""
    if dev.name not in ("cuda", "cpu"):
        return False
    try:
        import torch
    except ImportError:
        return False
    return dev.name == "cpu" or bool(torch.cuda.is_available())


def torch_view(dev: pymetalnn.Device, t: pymetalnn.Tensor) -> Any:
    """A torch tensor with the values of Tensor `t`, or None without torch: on cuda a CUDA tensor
    over its memory (no copy), on cpu a CPU tensor (a copy)."""
    try:
        import torch
    except ImportError:
        return None
    if dev.name == "cpu":
        return torch.from_numpy(np.ascontiguousarray(t.numpy()))
    return torch.as_tensor(dev.as_cupy(t.buffer, t.dtype, t.shape), device="cuda")


def cuda_torch(dev: pymetalnn.Device) -> Any:
    """torch with TF32 off (the fp32 peer computes in fp32) when `dev` is cuda and torch imports;
    None otherwise."""
    if dev.name != "cuda":
        return None
    try:
        import torch
    except ImportError:
        return None
    disable_tf32()
    return torch


def disable_tf32() -> None:
    """fp32 peers compute in fp32: no TF32 tensor-core math."""
    try:
        import torch
    except ImportError:
        return
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def budget_mark(err: float | None, direct_err: float | None = None) -> str:
    """A float32 row's standing against the fp32 accuracy budget (pymetalnn/accuracy.py,
    docs/accuracy.md): "ok", or "OVER" with the limit it exceeds."""
    from pymetalnn import accuracy

    if err is None:
        return "-"
    lim = accuracy.limit(direct_err)
    return "ok" if err <= lim else f"OVER (> {lim:.2g})"


def float64_torch(dev: pymetalnn.Device) -> tuple[Any, str] | None:
    """(torch, device name) for float64 references computed on `dev`'s GPU when it is cuda (fast
    fp64), on the cpu otherwise; None without torch."""
    try:
        import torch
    except ImportError:
        return None
    tdev = "cuda" if dev.name == "cuda" and torch.cuda.is_available() else "cpu"
    return torch, tdev


def device_label(dev: pymetalnn.Device) -> str:
    if dev.name == "cuda":
        return f"cuda ({dev.gpu_name})"
    if dev.name == "cpu":
        return f"cpu ({dev.num_workers} worker threads)"
    return dev.name


def parser(doc: str | None, quick_help: str = "small shapes",
           backends: tuple[str, ...] = ("cpu", "cuda", "metal")) -> argparse.ArgumentParser:
    """The arguments every bench script takes (--backend, --quick); scripts add their own."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=list(backends), default=None)
    ap.add_argument("--quick", action="store_true", help=quick_help)
    return ap


def report(rows: list[dict], cols: list[str], result_name: str, title: str | None = None) -> str:
    """Print `title` (if any) and the rows as a table, write them to <results>/<result_name>.json
    (which `python -m pymetalnn.bench` reads) and print the path."""
    if title:
        print(title)
    print_table(rows, cols)
    path = write_results(result_name, rows)
    print("results:", path)
    return path


def write_results(name: str, rows: list[dict], out_dir: str | None = None) -> str:
    out_dir = out_dir or os.environ.get("PYMETALNN_RESULTS", "results")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
    return path


def print_table(rows: list[dict], cols: list[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(cols, widths)))



def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
