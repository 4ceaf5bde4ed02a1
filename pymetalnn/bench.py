"""Run every kernel family's benchmark and gather one report.

    python -m pymetalnn.bench [--backend cuda|cpu|metal] [--quick] [--only conv,gemm] [--out DIR]

Each `benchmarks/bench_<family>.py` script (the repository's top-level `benchmarks/` folder in a
checkout, `pymetalnn/benchmarks` in an installed wheel) runs as a subprocess with the same --backend and
--quick, writing its JSON into `<out>/raw/`. Their rows (each family has its own columns) are
normalized into one table: family, kernel, shape/variant, time (s), throughput (GFLOP/s or
GB/s), peer time (s), ratio (ours vs the peer: > 1 is faster when a speedup, or a fraction of
copy bandwidth). Written to `<out>/bench.json` (normalized rows, each with its raw row),
`<out>/bench.md` (Markdown report) and `<out>/bench_ratios.png` (matplotlib, if importable).
The peer of the cpu rows is PyTorch on the CPU in the same process and run, with as many threads
as the cpu backend's pool (OMP_NUM_THREADS, unless set).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time
from typing import Any

from .runtime.core import PACKAGE_DIR, data_dir

BENCH_DIR = data_dir("benchmarks")
FIELDS = ["family", "kernel", "variant", "time_s", "throughput", "unit", "peer_time_s", "ratio",
          "ratio_kind", "backend"]


def cpu_threads() -> int:
    """Worker threads of the cpu backend: PYMETALNN_CPU_THREADS, else the usable cores (as the
    runtime counts them)."""
    v = os.environ.get("PYMETALNN_CPU_THREADS", "")
    if v.isdigit() and int(v) > 0:
        return int(v)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def families(bench_dir: str = BENCH_DIR) -> list[str]:
    """Names of the benchmark families (benchmarks/bench_<name>.py)."""
    paths = sorted(glob.glob(os.path.join(bench_dir, "bench_*.py")))
    return [os.path.basename(p)[len("bench_"):-3] for p in paths]


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def normalize(family: str, row: dict) -> dict:
    """One family row -> the common columns (None where the family has no such figure)."""
    kernel = row.get("op") or row.get("bench") or row.get("kernel") or family
    parts = [str(row[k]) for k in ("shape", "variant", "problem", "config", "dtype", "prec", "params",
                                   "batch") if row.get(k) not in (None, "")]
    t = _num(row.get("seconds"))
    if t is None and _num(row.get("ms")) is not None:
        t = _num(row["ms"]) / 1e3
    if t is None and _num(row.get("ms_per_step")) is not None:
        t = _num(row["ms_per_step"]) / 1e3
    thr, unit = None, None
    for key, scale, u in (("GFLOP/s", 1.0, "GFLOP/s"), ("gflops", 1.0, "GFLOP/s"),
                          ("TFLOP/s", 1e3, "GFLOP/s"), ("GB/s", 1.0, "GB/s"),
                          ("steps_per_s", 1.0, "steps/s")):
        if _num(row.get(key)) is not None:
            thr, unit = _num(row[key]) * scale, u
            break
    peer = None
    for key, scale in (("peer_seconds", 1.0), ("torch_ms", 1e-3), ("peer_ms", 1e-3),
                       ("torch_fused_s", 1.0), ("torch_foreach_s", 1.0)):
        if _num(row.get(key)) is not None:
            peer = _num(row[key]) * scale
            break
    ratio, kind = None, None
    for key in ("ratio", "speedup_vs_peer", "speedup_vs_torch", "x_peer", "speedup_vs_fused",
                "vs_copy", "ratio_vs_copy"):
        if _num(row.get(key)) is not None:
            ratio, kind = _num(row[key]), key
            break
    if ratio is None and peer is not None and t:
        ratio, kind = peer / t, "peer_time/time"
    return {"family": family, "kernel": str(kernel), "variant": " ".join(parts) or "-",
            "time_s": t, "throughput": thr, "unit": unit, "peer_time_s": peer, "ratio": ratio,
            "ratio_kind": kind, "backend": row.get("backend"), "raw": row}


def run_family(family: str, backend: str | None, quick: bool, raw_dir: str,
               timeout: float | None = None, extra: list[str] | None = None) -> tuple[list[dict], str]:
    """Run benchmarks/bench_<family>.py; returns (its normalized rows, status text)."""
    os.makedirs(raw_dir, exist_ok=True)
    before = {p: os.path.getmtime(p) for p in glob.glob(os.path.join(raw_dir, "*.json"))}
    cmd = [sys.executable, os.path.join(BENCH_DIR, f"bench_{family}.py")]
    if backend:
        cmd += ["--backend", backend]
    if quick:
        cmd.append("--quick")
    cmd += extra or []
    env = dict(os.environ, PYMETALNN_RESULTS=os.path.abspath(raw_dir))
    # the scripts import this very pymetalnn (checkout or installed)
    env["PYTHONPATH"] = os.path.dirname(PACKAGE_DIR) + os.pathsep + env.get("PYTHONPATH", "")
    # PyTorch on the CPU (the cpu rows' peer) gets as many threads as the cpu backend's pool
    env.setdefault("OMP_NUM_THREADS", str(cpu_threads()))
    log = os.path.join(raw_dir, f"{family}.log")
    t0 = time.perf_counter()
    try:
        with open(log, "w") as f:
            rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT,
                                timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        return [], f"timed out after {timeout:.0f} s (log: {log})"
    secs = time.perf_counter() - t0
    new = [p for p in glob.glob(os.path.join(raw_dir, "*.json"))
           if os.path.basename(p).startswith(family) and before.get(p) != os.path.getmtime(p)]
    rows: list[dict] = []
    for p in sorted(new):
        with open(p) as f:
            data = json.load(f)
        rows += [normalize(family, r) for r in (data if isinstance(data, list) else [data])
                 if isinstance(r, dict)]
    if rc != 0:
        return rows, f"exit {rc} after {secs:.0f} s (log: {log})"
    return rows, f"{len(rows)} rows in {secs:.0f} s"


def table(rows: list[dict]) -> list[list[str]]:
    head = ["family", "kernel", "shape/variant", "time", "throughput", "peer time", "ratio"]
    out = [head]
    for r in rows:
        t = r["time_s"]
        out.append([r["family"], r["kernel"], r["variant"],
                    "-" if t is None else (f"{t * 1e6:.1f} us" if t < 1e-3 else f"{t * 1e3:.3f} ms"),
                    "-" if r["throughput"] is None else f"{r['throughput']:.4g} {r['unit']}",
                    "-" if r["peer_time_s"] is None else f"{r['peer_time_s'] * 1e3:.3f} ms",
                    "-" if r["ratio"] is None else f"{r['ratio']:.3g} ({r['ratio_kind']})"])
    return out


def print_table(rows: list[dict]) -> None:
    t = table(rows)
    w = [max(len(r[i]) for r in t) for i in range(len(t[0]))]
    for r in t:
        print("  ".join(c.ljust(n) for c, n in zip(r, w)))


def markdown(rows: list[dict], status: dict[str, str], meta: dict) -> str:
    t = table(rows)
    lines = ["# pymetalnn kernel benchmarks", "",
             f"backend: {meta['backend'] or 'default'}, quick: {meta['quick']}, "
             f"date: {meta['date']}, python: {meta['python']}", "", "## Families", ""]
    lines += [f"- {k}: {v}" for k, v in status.items()]
    lines += ["", "## Results", "", "| " + " | ".join(t[0]) + " |",
              "|" + "---|" * len(t[0])]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in t[1:]]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str) -> str | None:
    """Bar chart of ratio per kernel (matplotlib); None with a message if unavailable."""
    pts = [(f"{r['family']}:{r['kernel']}", r["ratio"]) for r in rows if r["ratio"] is not None]
    if not pts:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return None
    by: dict[str, list[float]] = {}
    for k, v in pts:
        by.setdefault(k, []).append(v)
    names = list(by)
    import statistics

    vals = [statistics.median(by[k]) for k in names]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names)), 4))
    ax.bar(range(len(names)), vals)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=75, fontsize=7)
    ax.set_ylabel("ratio (median over shapes)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default=None, help="comma-separated families, e.g. conv,gemm")
    ap.add_argument("--out", default=os.path.join("results", "bench"))
    ap.add_argument("--timeout", type=float, default=None, help="seconds per family")
    args = ap.parse_args(argv)
    fams = families()
    if args.only:
        want = [f.strip() for f in args.only.split(",") if f.strip()]
        bad = [f for f in want if f not in fams]
        if bad:
            raise SystemExit(f"--only: unknown families {bad}; choose from {', '.join(fams)}")
        fams = want
    raw = os.path.join(args.out, "raw")
    rows: list[dict] = []
    status: dict[str, str] = {}
    for i, fam in enumerate(fams):
        print(f"[{i + 1}/{len(fams)}] {fam} ...", end="", flush=True)
        r, st = run_family(fam, args.backend, args.quick, raw, args.timeout)
        rows += r
        status[fam] = st
        print(f" {st}", flush=True)
    print()
    print_table(rows)
    meta = {"backend": args.backend, "quick": args.quick, "date": time.strftime("%Y-%m-%d %H:%M"),
            "peer_cpu_threads": os.environ.get("OMP_NUM_THREADS") or str(cpu_threads()),
            "python": sys.version.split()[0], "families": status}
    os.makedirs(args.out, exist_ok=True)
    jpath = os.path.join(args.out, "bench.json")
    with open(jpath, "w") as f:
        json.dump({"meta": meta, "fields": FIELDS, "rows": rows}, f, indent=1)
    mpath = os.path.join(args.out, "bench.md")
    with open(mpath, "w") as f:
        f.write(markdown(rows, status, meta))
    ppath = plot(rows, os.path.join(args.out, "bench_ratios.png"))
    print(f"\nwrote {jpath}, {mpath}" + (f", {ppath}" if ppath else ""))
    return {"rows": rows, "status": status, "json": jpath}


if __name__ == "__main__":
    main()
